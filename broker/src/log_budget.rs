//! A per-second budget for log lines a peer can trigger at will.
//!
//! A device flooding the relay with broken messages, or a client opening connections only to be
//! refused, must not fill the disk with log lines (one flood here wrote 290 MB a minute): the
//! first few each second are logged in full, the rest are counted and the next line logged says
//! how many were left out. Every kind of refusal has a budget of its own, so one flood does not
//! hide another kind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug)]
pub struct LogBudget {
    per_second: AtomicU64,
    second: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget::new()
    }
}

impl LogBudget {
    /// Lines logged in full per second, unless a budget says otherwise.
    pub const PER_SECOND: u64 = 10;

    pub const fn new() -> Self {
        LogBudget::per_second(Self::PER_SECOND)
    }

    pub const fn per_second(per_second: u64) -> Self {
        LogBudget {
            per_second: AtomicU64::new(per_second),
            second: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Lines logged in full per second from now on (a reloaded setting).
    pub fn set_per_second(&self, per_second: u64) {
        self.per_second.store(per_second, Ordering::Relaxed);
    }

    /// `Some(lines suppressed since the last one logged)` if this one may be logged.
    pub fn check(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.check_at(now)
    }

    fn check_at(&self, now: u64) -> Option<u64> {
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.per_second.load(Ordering::Relaxed) {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_budget_and_counted() {
        let budget = LogBudget::per_second(20);
        let logged = (0..1000).filter(|_| budget.check_at(7).is_some()).count();
        assert_eq!(logged, 20);
        assert_eq!(budget.check_at(8), Some(1000 - 20));
        assert_eq!(budget.check_at(8), Some(0));
        let default = LogBudget::new();
        let logged = (0..100).filter(|_| default.check_at(5).is_some()).count();
        assert_eq!(logged as u64, LogBudget::PER_SECOND);
    }

    #[test]
    fn a_new_budget_applies_from_the_next_line() {
        let budget = LogBudget::per_second(2);
        assert_eq!((0..2).filter(|_| budget.check_at(1).is_some()).count(), 2);
        budget.set_per_second(4);
        assert!(
            budget.check_at(1).is_some(),
            "two more fit in this second now"
        );
        assert!(budget.check_at(1).is_some());
        assert_eq!(budget.check_at(1), None);
        assert_eq!(budget.check_at(2), Some(1), "the one left out is counted");
    }
}
