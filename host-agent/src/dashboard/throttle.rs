//! Failed logins per source: after [`MAX_FAILURES`] wrong passwords within [`WINDOW`] from one
//! address, its login attempts get **429 Too Many Requests** with `Retry-After` until the oldest
//! of those failures is a window old. Checked before the password is, so a locked-out guesser
//! costs no argon2 hash either; the right password is refused too while locked out, or guessing
//! would go on at full speed.
//!
//! An IPv6 source counts by its /64 (one host usually holds the whole prefix). Behind a reverse
//! proxy every login comes from the proxy's address, so one guesser locks out everyone for a
//! minute: the price of not trusting a forwarded header anyone can forge.
//!
//! At most [`MAX_SOURCES`] addresses are remembered: past it, expired ones go first, then the
//! one whose last failure is oldest.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Wrong passwords one source may send within [`WINDOW`].
pub const MAX_FAILURES: usize = 5;
/// The window failures are counted over.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Sources remembered at once.
pub const MAX_SOURCES: usize = 4096;

#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

/// The address failures are counted under: IPv4 as is, IPv6 by its /64.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

impl LoginThrottle {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, VecDeque<Instant>>> {
        // Each operation leaves the map consistent, so a poisoned lock is still usable.
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(wait)` while `ip` is locked out: how long until it may try again.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut map = self.lock();
        let Some(times) = map.get_mut(&source(ip)) else {
            return Ok(());
        };
        expire(times, now);
        match times.front() {
            Some(oldest) if times.len() >= MAX_FAILURES => {
                Err((*oldest + WINDOW).saturating_duration_since(now))
            }
            _ => Ok(()),
        }
    }

    /// A wrong password from `ip`. Returns whether this one locked the source out.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let mut map = self.lock();
        let key = source(ip);
        if !map.contains_key(&key) && map.len() >= MAX_SOURCES {
            map.retain(|_, times| {
                expire(times, now);
                !times.is_empty()
            });
            if map.len() >= MAX_SOURCES {
                let stalest = map
                    .iter()
                    .min_by_key(|(_, times)| times.back().copied())
                    .map(|(ip, _)| *ip);
                if let Some(ip) = stalest {
                    map.remove(&ip);
                }
            }
        }
        let times = map.entry(key).or_default();
        expire(times, now);
        times.push_back(now);
        times.len() == MAX_FAILURES
    }

    /// The right password: the source's failures are forgotten.
    pub fn succeeded(&self, ip: IpAddr) {
        self.lock().remove(&source(ip));
    }
}

fn expire(times: &mut VecDeque<Instant>, now: Instant) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
    {
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_a_minute_lock_a_source_out_until_the_oldest_expires() {
        let t = LoginThrottle::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let start = Instant::now();
        for i in 0..MAX_FAILURES {
            assert_eq!(t.check(a, start), Ok(()));
            let at = start + Duration::from_secs(i as u64);
            assert_eq!(t.failed(a, at), i + 1 == MAX_FAILURES);
        }
        let now = start + Duration::from_secs(10);
        assert_eq!(t.check(a, now), Err(Duration::from_secs(50)));
        assert_eq!(t.check(b, now), Ok(()), "another source is not locked out");
        assert_eq!(t.check(a, start + WINDOW), Ok(()), "the oldest expired");
        t.succeeded(a);
        assert_eq!(t.check(a, now), Ok(()));
    }

    #[test]
    fn ipv6_counts_by_its_64_and_the_map_stays_bounded() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..MAX_FAILURES {
            let ip: IpAddr = format!("2001:db8::{i}").parse().unwrap();
            t.failed(ip, now);
        }
        assert!(t.check("2001:db8::ffff".parse().unwrap(), now).is_err());
        assert!(t.check("2001:db8:0:1::1".parse().unwrap(), now).is_ok());
        for i in 0..(MAX_SOURCES as u32 + 10) {
            t.failed(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(t.lock().len() <= MAX_SOURCES);
    }
}
