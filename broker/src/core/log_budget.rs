//! A per-second budget for warnings a peer can trigger at will. A device flooding the relay with
//! broken messages must not fill the disk with log lines (one flood here wrote 290 MB a minute):
//! the first few each second are logged in full, the rest are counted and reported once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lines logged in full per second.
const PER_SECOND: u64 = 20;

pub struct LogBudget {
    second: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

/// What the caller may log now.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log this line; `suppressed` lines were dropped since the last one that was logged.
    Log {
        suppressed: u64,
    },
    Skip,
}

impl LogBudget {
    pub const fn new() -> LogBudget {
        LogBudget {
            second: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    pub fn check(&self) -> Verdict {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.check_at(now)
    }

    fn check_at(&self, now: u64) -> Verdict {
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < PER_SECOND {
            Verdict::Log {
                suppressed: self.suppressed.swap(0, Ordering::Relaxed),
            }
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            Verdict::Skip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_budget_and_counted() {
        let budget = LogBudget::new();
        let logged = (0..1000)
            .filter(|_| budget.check_at(7) != Verdict::Skip)
            .count();
        assert_eq!(logged as u64, PER_SECOND);
        assert_eq!(
            budget.check_at(8),
            Verdict::Log {
                suppressed: 1000 - PER_SECOND
            }
        );
        assert_eq!(budget.check_at(8), Verdict::Log { suppressed: 0 });
    }
}
