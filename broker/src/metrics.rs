//! Counters the gateway keeps about what it admitted and refused. Plain atomics: cheap on every
//! connection, readable from anywhere (the Prometheus endpoint and tests read them).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub tcp_accepted: AtomicU64,
    pub tls_failed: AtomicU64,
    pub tls_timed_out: AtomicU64,
    pub connect_refused: AtomicU64,
    pub sessions_started: AtomicU64,
    pub sessions_active: AtomicU64,
    pub acl_violations: AtomicU64,
    pub bad_packets: AtomicU64,
}

impl Metrics {
    /// Adds one and returns the new count.
    pub fn inc(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
