//! What one device may make the relay hold and send in alarms: at most `max_active` active
//! alarms at once, and new alarms at most `burst` at once and `per_minute` after that (a token
//! bucket per device). Only a *new* alarm costs: a repeated `raised` for an active code, an
//! `in-progress` or a `cleared` never does.
//!
//! The buckets live in memory, keyed by serial (devices are authenticated, so there is one entry
//! per device that raised an alarm since the start, a few dozen bytes each); a restarted relay
//! gives every device a full burst again. Each entry also remembers whether the device is in a
//! burst of refusals, so that a burst is logged once when it starts and once when it ends.

use std::collections::HashMap;
use std::sync::Mutex;

use protocol::{Serial, Timestamp};

/// The limits, from `broker.toml` (`max_active_alarms_per_device`, `alarm_burst_per_device`,
/// `alarms_per_minute_per_device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlarmLimits {
    pub max_active: usize,
    pub burst: u32,
    /// 0: no rate limit.
    pub per_minute: u32,
}

impl Default for AlarmLimits {
    fn default() -> Self {
        AlarmLimits {
            max_active: 64,
            burst: 16,
            per_minute: 12,
        }
    }
}

/// Which limit refused an alarm; its name is the config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Limit {
    MaxActive,
    Rate,
}

impl Limit {
    pub(super) fn key(self) -> &'static str {
        match self {
            Limit::MaxActive => "max_active_alarms_per_device",
            Limit::Rate => "alarms_per_minute_per_device",
        }
    }
}

/// Entries kept before full, quiet buckets are dropped (they hold nothing a fresh one would not).
const PRUNE_AT: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens (new alarms allowed now), in thousandths.
    milli: u64,
    /// When `milli` was last brought up to date (Unix ms).
    at_ms: i64,
    /// Alarms refused since the last one accepted: non-zero while a burst of refusals lasts.
    refused: u64,
}

#[derive(Default)]
pub(super) struct AlarmLimiter {
    buckets: Mutex<HashMap<Serial, Bucket>>,
}

impl AlarmLimiter {
    /// Takes a token for one new alarm of `serial` at `now`; false when its bucket is empty.
    pub(super) fn take(&self, limits: &AlarmLimits, serial: &Serial, now: Timestamp) -> bool {
        if limits.per_minute == 0 {
            return true;
        }
        let full = u64::from(limits.burst) * 1000;
        let now_ms = now.timestamp_millis();
        let Ok(mut buckets) = self.buckets.lock() else {
            return true; // a panic elsewhere must not stop alarms
        };
        if buckets.len() >= PRUNE_AT {
            buckets.retain(|_, b| b.refused > 0 || b.milli < full);
        }
        let b = buckets.entry(serial.clone()).or_insert(Bucket {
            milli: full,
            at_ms: now_ms,
            refused: 0,
        });
        // Per minute in thousandths of a token per millisecond: per_minute * 1000 / 60_000.
        let elapsed = u64::try_from(now_ms.saturating_sub(b.at_ms)).unwrap_or(0);
        let earned = elapsed.saturating_mul(u64::from(limits.per_minute)) / 60;
        if earned > 0 {
            b.milli = b.milli.saturating_add(earned).min(full);
            b.at_ms = now_ms;
        } else if now_ms < b.at_ms {
            b.at_ms = now_ms; // the clock went back: start counting from here
        }
        if b.milli >= 1000 {
            b.milli -= 1000;
            true
        } else {
            false
        }
    }

    /// Records a refused alarm of `serial`; true for the first of a burst (log it).
    pub(super) fn refused(&self, limits: &AlarmLimits, serial: &Serial, now: Timestamp) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        // A device refused for its cap alone may have no bucket yet: it gets a full one.
        let b = buckets.entry(serial.clone()).or_insert(Bucket {
            milli: u64::from(limits.burst) * 1000,
            at_ms: now.timestamp_millis(),
            refused: 0,
        });
        b.refused += 1;
        b.refused == 1
    }

    /// Records an accepted alarm of `serial`; the number refused in the burst that this ends,
    /// if one did (log it).
    pub(super) fn accepted(&self, serial: &Serial) -> Option<u64> {
        let mut buckets = self.buckets.lock().ok()?;
        let b = buckets.get_mut(serial)?;
        (b.refused > 0).then(|| std::mem::take(&mut b.refused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> Timestamp {
        chrono::Utc.timestamp_opt(1_790_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn a_burst_then_the_rate_per_device() {
        let limits = AlarmLimits {
            max_active: 64,
            burst: 3,
            per_minute: 12,
        };
        let l = AlarmLimiter::default();
        let c1 = Serial::parse("C1").unwrap();
        let c2 = Serial::parse("C2").unwrap();
        let taken = (0..10).filter(|_| l.take(&limits, &c1, at(0))).count();
        assert_eq!(taken, 3, "the burst");
        assert!(
            l.take(&limits, &c2, at(0)),
            "another device has its own bucket"
        );
        assert!(!l.take(&limits, &c1, at(4)), "12 a minute: one every 5 s");
        assert!(l.take(&limits, &c1, at(5)));
        assert!(!l.take(&limits, &c1, at(5)));
        let refill = (0..10).filter(|_| l.take(&limits, &c1, at(3600))).count();
        assert_eq!(refill, 3, "never more than the burst");
        let open = AlarmLimits {
            per_minute: 0,
            ..limits
        };
        assert!(
            (0..100).all(|_| l.take(&open, &c1, at(3600))),
            "0: no rate limit"
        );
    }

    #[test]
    fn a_burst_of_refusals_is_reported_at_its_start_and_its_end() {
        let l = AlarmLimiter::default();
        let limits = AlarmLimits::default();
        let c1 = Serial::parse("C1").unwrap();
        assert_eq!(l.accepted(&c1), None);
        assert!(l.refused(&limits, &c1, at(0)));
        assert!(!l.refused(&limits, &c1, at(0)));
        assert!(!l.refused(&limits, &c1, at(0)));
        assert!(
            l.take(&limits, &c1, at(0)),
            "a refusal for the cap costs no token"
        );
        assert_eq!(l.accepted(&c1), Some(3));
        assert_eq!(l.accepted(&c1), None);
        assert!(l.refused(&limits, &c1, at(0)), "a new burst");
    }
}
