//! Meter reads for billing (Fig. 3 counters).
//!
//! A *reading* is one set of a device's counters at one time. The relay keeps one for every
//! get-data job that brought back the `counters` section and for every periodic [`CounterReport`]
//! a device sends on `dev/{serial}/up/counters`; `host-agent export counters` asks for them by
//! time range ([`crate::host::HostRequest::ExportCounters`]) and prints one CSV row per reading.

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::data::{SectionData, Value};

/// `dev/{serial}/up/counters`: the device's counters, read on its own schedule (the seed's
/// periodic call), sent through the outbox like every report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterReport {
    /// When the device read them.
    pub read_at: Timestamp,
    /// The counters section: `total`, per paper size, per function…
    pub counters: SectionData,
}

/// One reading, as the relay keeps and exports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterReading {
    pub serial: String,
    /// Installation site, as the device last reported it.
    #[serde(default)]
    pub site: String,
    /// When the counters were read (a report's own time; for a get-data job, when its result was
    /// stored).
    pub read_at: Timestamp,
    /// Where it came from: `job J-000042` or `report`.
    pub source: String,
    pub counters: SectionData,
}

/// Checks a counters section before it becomes a meter reading: a counter counts pages, so it is
/// a whole number from 0 up. (The wire has no floats for it: a value that is not a boolean, an
/// integer or a string is refused when the message is decoded, so NaN and infinities never get
/// here.) The error names the counter and says what is wrong, for the device's log.
pub fn check_counters(counters: &SectionData) -> Result<(), String> {
    for (name, value) in counters {
        if let Value::Int(n) = value
            && *n < 0
        {
            return Err(format!(
                "counter {name:?} is {n}: counters are whole numbers from 0 up"
            ));
        }
    }
    Ok(())
}

/// Most readings one export reply carries; the host asks for the rest from the reply's `next`.
pub const MAX_READINGS_PER_PAGE: usize = 500;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_counters_are_refused_with_the_counter_named() {
        let mut counters = SectionData::new();
        counters.insert("total".into(), Value::Int(1200));
        counters.insert("model".into(), Value::from("C300"));
        assert_eq!(check_counters(&counters), Ok(()));
        counters.insert("duplex".into(), Value::Int(-999));
        let why = check_counters(&counters).unwrap_err();
        assert!(why.contains("\"duplex\" is -999"), "{why}");
    }
}
