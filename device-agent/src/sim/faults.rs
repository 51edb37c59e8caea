//! The simulated copier's fault log: faults reported to it (Fig. 5) on top of the jams and service
//! calls its page count implies, shown in its JAM/SC data (Fig. 3).

use std::collections::BTreeMap;

use chrono::SecondsFormat;
use protocol::Timestamp;
use protocol::data::{SectionData, Value};

#[derive(Debug, Clone, Default)]
pub struct FaultLog {
    jams: i64,
    service_calls: i64,
    last_jam: Option<(String, Timestamp)>,
    last_sc: Option<(String, Timestamp)>,
    /// Fatal faults not yet cleared: code → detail.
    active: BTreeMap<String, String>,
}

impl FaultLog {
    pub fn record(&mut self, code: &str, detail: &str, fatal: bool, at: Timestamp) {
        let text = if detail.is_empty() {
            code.to_owned()
        } else {
            format!("{code} {detail}")
        };
        if code.starts_with("SC") || fatal {
            self.service_calls += 1;
            self.last_sc = Some((text, at));
        } else {
            self.jams += 1;
            self.last_jam = Some((detail.to_owned(), at));
        }
        if fatal {
            self.active.insert(code.to_owned(), detail.to_owned());
        }
    }

    pub fn clear(&mut self, code: &str) {
        self.active.remove(code);
    }

    /// Adds the log to the JAM/SC section the page count produced.
    pub fn apply(&self, out: &mut SectionData) {
        let add = |out: &mut SectionData, key: &str, n: i64| {
            let base = out.get(key).and_then(Value::as_int).unwrap_or(0);
            out.insert(key.to_owned(), Value::Int(base + n));
        };
        add(out, "jam_count", self.jams);
        add(out, "sc_count", self.service_calls);
        let time = |t: &Timestamp| Value::Text(t.to_rfc3339_opts(SecondsFormat::Secs, true));
        if let Some((location, at)) = &self.last_jam {
            out.insert("last_jam_location".into(), Value::Text(location.clone()));
            out.insert("last_jam_at".into(), time(at));
        }
        if let Some((text, at)) = &self.last_sc {
            out.insert("last_sc".into(), Value::Text(text.clone()));
            out.insert("last_sc_at".into(), time(at));
        }
        let active: Vec<&str> = self.active.keys().map(String::as_str).collect();
        out.insert("active_faults".into(), Value::Text(active.join(",")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_add_to_the_counts_and_fatal_ones_stay_active_until_cleared() {
        let mut log = FaultLog::default();
        let at = chrono::Utc::now();
        log.record("JAM", "tray 2 feed", false, at);
        log.record("SC-541", "main motor failure", true, at);
        let mut out = SectionData::new();
        out.insert("jam_count".into(), Value::Int(10));
        log.apply(&mut out);
        assert_eq!(out["jam_count"], Value::Int(11));
        assert_eq!(out["sc_count"], Value::Int(1));
        assert_eq!(out["last_jam_location"], Value::Text("tray 2 feed".into()));
        assert_eq!(out["active_faults"], Value::Text("SC-541".into()));
        log.clear("SC-541");
        log.apply(&mut out);
        assert_eq!(out["active_faults"], Value::Text(String::new()));
    }
}
