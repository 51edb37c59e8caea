//! Counters the gateway keeps about what it admitted and refused. Plain atomics: cheap on every
//! connection, readable from anywhere (the Prometheus endpoint and tests read them).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// TLS handshakes completed in full (certificates and signatures), and resumed with a
    /// session ticket.
    pub tls_full: AtomicU64,
    pub tls_resumed: AtomicU64,
    pub sessions_started: AtomicU64,
    /// Devices' sessions that resumed a persistent MQTT session (CONNACK "session present").
    pub sessions_resumed: AtomicU64,
    pub sessions_active: AtomicU64,
    pub acl_violations: AtomicU64,
    /// Open sessions closed because a reload found their certificate revoked.
    pub sessions_revoked: AtomicU64,
    /// Connections closed right after their handshake: the certificate is revoked by the list
    /// now in force, or expired (a resumed handshake checks neither itself: its certificate
    /// comes from the ticket).
    pub cert_refused: AtomicU64,
    /// Configuration reloads applied, and refused (the old configuration kept).
    pub reloads: AtomicU64,
    pub reloads_failed: AtomicU64,
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

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
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

/// Which limit was hit; [`Limit::key`] is its name in `broker.toml` (and, with dashes, its flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MaxPacketBytes,
    MaxInflight,
    MaxSubscriptions,
    MaxConnectionsPerIdentity,
    ConnectRatePerSource,
    /// Not a number but a rule: chukei speaks QoS 0 and 1 only (the gateway refuses QoS 2 publishes).
    Qos2,
}

impl Limit {
    pub const ALL: [Limit; 6] = [
        Limit::MaxPacketBytes,
        Limit::MaxInflight,
        Limit::MaxSubscriptions,
        Limit::MaxConnectionsPerIdentity,
        Limit::ConnectRatePerSource,
        Limit::Qos2,
    ];

    /// The config key an operator would raise, as logs and metrics name it.
    pub fn key(self) -> &'static str {
        match self {
            Limit::MaxPacketBytes => "max_packet_bytes",
            Limit::MaxInflight => "max_inflight",
            Limit::MaxSubscriptions => "max_subscriptions",
            Limit::MaxConnectionsPerIdentity => "max_connections_per_identity",
            Limit::ConnectRatePerSource => "connect_rate_per_source",
            Limit::Qos2 => "qos2",
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
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
