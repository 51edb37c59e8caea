//! Meter reads for billing (Fig. 3 counters).
//!
//! A *reading* is one set of a device's counters at one time. The relay keeps one for every
//! get-data job that brought back the `counters` section and for every periodic [`CounterReport`]
//! a device sends on `dev/{serial}/up/counters`; `host-agent export counters` asks for them by
//! time range ([`crate::host::HostRequest::ExportCounters`]) and prints one CSV row per reading.

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::data::SectionData;

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

/// Most readings one export reply carries; the host asks for the rest from the reply's `next`.
pub const MAX_READINGS_PER_PAGE: usize = 500;
