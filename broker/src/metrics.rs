//! Counters the gateway keeps about what it admitted and refused. Plain atomics: cheap on every
//! connection, readable from anywhere (the Prometheus endpoint and tests read them).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::gateway::limits::Limit;

#[derive(Debug, Default)]
pub struct Metrics {
    pub tcp_accepted: AtomicU64,
    pub tls_failed: AtomicU64,
    pub tls_timed_out: AtomicU64,
    /// Silent connections closed to give their handshake slot to a new one.
    pub handshakes_shed: AtomicU64,
    /// Metrics-endpoint connections closed at once: `metrics_max_connections` were open.
    pub metrics_http_refused: AtomicU64,
    /// Metrics-endpoint connections closed because a request's headers did not all arrive within
    /// `metrics_header_timeout_secs`.
    pub metrics_http_timed_out: AtomicU64,
    pub connect_refused: AtomicU64,
    pub sessions_started: AtomicU64,
    pub sessions_active: AtomicU64,
    pub acl_violations: AtomicU64,
    pub bad_packets: AtomicU64,
    /// Clients closed (or, for the connect rate, sockets refused) per limit, in the order of
    /// [`Limit::ALL`].
    limits: [AtomicU64; Limit::ALL.len()],
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

    /// The counter of clients closed for exceeding `limit`.
    pub fn limit(&self, limit: Limit) -> &AtomicU64 {
        let i = Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0);
        &self.limits[i]
    }

    /// `chukei_limit_exceeded_total{limit="KEY"}`, one line per limit, in Prometheus text.
    pub fn render_limits(&self) -> String {
        let mut out = String::from(
            "# HELP chukei_limit_exceeded_total Clients closed for exceeding a limit (for \
             connect_rate_per_source: sockets closed before TLS), by the limit's config key.\n\
             # TYPE chukei_limit_exceeded_total counter\n",
        );
        for limit in Limit::ALL {
            let _ = writeln!(
                out,
                "chukei_limit_exceeded_total{{limit=\"{}\"}} {}",
                limit.key(),
                Metrics::get(self.limit(limit))
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_has_its_own_counter_and_line() {
        let m = Metrics::default();
        Metrics::inc(m.limit(Limit::MaxInflight));
        Metrics::inc(m.limit(Limit::MaxInflight));
        Metrics::inc(m.limit(Limit::Qos2));
        let text = m.render_limits();
        assert!(
            text.contains("chukei_limit_exceeded_total{limit=\"max_inflight\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("{limit=\"qos2\"} 1\n"), "{text}");
        assert!(text.contains("{limit=\"max_packet_bytes\"} 0\n"), "{text}");
        assert_eq!(text.lines().count(), 2 + Limit::ALL.len());
    }
}
