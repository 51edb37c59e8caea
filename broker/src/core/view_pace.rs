//! At most one alarm view per device per second. Every change of a device's alarms republishes
//! its whole view (up to `max_active_alarms_per_device` alarms) to every subscriber, so changes a
//! device can cause at will (clearing and raising again a refused code, say) must not each cost
//! a view: the first change of a quiet device goes out at once, later ones within the second are
//! folded into one view sent by the core's tick, built from the store as it then stands.
//!
//! A view that carries a newly raised alarm goes out at once all the same: a fault is what the
//! service desk must hear of without delay, and raises are already bounded by the alarm limit
//! (`alarm_limit.rs`: a burst, then a rate per minute). Without this, a device that cleared one
//! fault a moment before (its view paced) had its next fault held for up to a second.

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
    /// Whether `serial`'s view may go out now; if not, it is owed at the next tick. `raised`:
    /// the change raised a new alarm, and the view goes out now (holding what was owed too:
    /// it is built from the store as it stands).
    pub(super) fn now_or_later(&self, serial: &str, now: Timestamp, raised: bool) -> bool {
        let now_ms = now.timestamp_millis();
        let Ok(mut last) = self.last.lock() else {
            return true;
        };
        match last.get_mut(serial) {
            Some(l)
                if !raised && now_ms < l.at_ms.saturating_add(EVERY_MS) && now_ms >= l.at_ms =>
            {
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
        assert!(pace.now_or_later("C1", at(0), false));
        assert!(pace.now_or_later("C2", at(0), false), "per device");
        assert!(!pace.now_or_later("C1", at(10), false));
        assert!(!pace.now_or_later("C1", at(999), false));
        assert!(pace.due(at(500)).is_empty());
        assert_eq!(pace.due(at(1000)), ["C1"]);
        assert!(
            !pace.now_or_later("C1", at(1500), false),
            "C1's last view went out at 1000"
        );
        assert!(pace.due(at(1999)).is_empty());
        assert_eq!(pace.due(at(2000)), ["C1"]);
        assert!(pace.due(at(5000)).is_empty(), "quiet devices are forgotten");
        assert!(pace.now_or_later("C1", at(5001), false));
    }

    #[test]
    fn a_new_fault_goes_out_at_once_and_takes_what_was_owed_with_it() {
        let pace = ViewPace::default();
        for serial in ["C1", "C2"] {
            assert!(pace.now_or_later(serial, at(0), true));
            assert!(
                !pace.now_or_later(serial, at(10), false),
                "a clear is paced"
            );
            assert!(pace.now_or_later(serial, at(20), true), "a raise is not");
        }
        // C1 changes again after its raise's view: paced from that view on. C2's owed clear
        // went out in its raise's view: nothing is owed.
        assert!(!pace.now_or_later("C1", at(30), false));
        assert!(pace.due(at(1019)).is_empty());
        assert_eq!(pace.due(at(1020)), ["C1"]);
    }
}
