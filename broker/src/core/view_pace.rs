//! At most one alarm view per device per second. Every change of a device's alarms republishes
//! its whole view (up to `max_active_alarms_per_device` alarms) to every subscriber, so changes a
//! device can cause at will (clearing and raising again a refused code, say) must not each cost
//! a view: the first change of a quiet device goes out at once, later ones within the second are
//! folded into one view sent by the core's tick, built from the store as it then stands.

use std::collections::HashMap;
use std::sync::Mutex;

use protocol::Timestamp;

/// The shortest time between two views of one device.
const EVERY_MS: i64 = 1000;

#[derive(Clone, Copy)]
struct Last {
    /// When the device's view last went out (Unix ms).
    at_ms: i64,
    /// A change since then waits for the tick.
    pending: bool,
}

#[derive(Default)]
pub(super) struct ViewPace {
    last: Mutex<HashMap<String, Last>>,
}

impl ViewPace {
    /// Whether `serial`'s view may go out now; if not, it is owed at the next tick.
    pub(super) fn now_or_later(&self, serial: &str, now: Timestamp) -> bool {
        let now_ms = now.timestamp_millis();
        let Ok(mut last) = self.last.lock() else {
            return true;
        };
        match last.get_mut(serial) {
            Some(l) if now_ms < l.at_ms.saturating_add(EVERY_MS) && now_ms >= l.at_ms => {
                l.pending = true;
                false
            }
            _ => {
                last.insert(
                    serial.to_owned(),
                    Last {
                        at_ms: now_ms,
                        pending: false,
                    },
                );
                true
            }
        }
    }

    /// The serials whose owed view may go out now (marked sent); forgets devices that are quiet.
    pub(super) fn due(&self, now: Timestamp) -> Vec<String> {
        let now_ms = now.timestamp_millis();
        let Ok(mut last) = self.last.lock() else {
            return Vec::new();
        };
        let mut due = Vec::new();
        last.retain(|serial, l| {
            let waited = now_ms >= l.at_ms.saturating_add(EVERY_MS) || now_ms < l.at_ms;
            if !waited {
                return true;
            }
            if l.pending {
                due.push(serial.clone());
                l.at_ms = now_ms;
                l.pending = false;
                return true;
            }
            false
        });
        due.sort_unstable();
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        chrono::DateTime::from_timestamp_millis(1_790_000_000_000 + ms).unwrap()
    }

    #[test]
    fn one_view_a_second_and_the_rest_at_the_tick() {
        let pace = ViewPace::default();
        assert!(pace.now_or_later("C1", at(0)));
        assert!(pace.now_or_later("C2", at(0)), "per device");
        assert!(!pace.now_or_later("C1", at(10)));
        assert!(!pace.now_or_later("C1", at(999)));
        assert!(pace.due(at(500)).is_empty());
        assert_eq!(pace.due(at(1000)), ["C1"]);
        assert!(
            !pace.now_or_later("C1", at(1500)),
            "C1's last view went out at 1000"
        );
        assert!(pace.due(at(1999)).is_empty());
        assert_eq!(pace.due(at(2000)), ["C1"]);
        assert!(pace.due(at(5000)).is_empty(), "quiet devices are forgotten");
        assert!(pace.now_or_later("C1", at(5001)));
    }
}
