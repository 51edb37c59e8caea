//! What the core counts about itself (messages, commits and their latency, alarms, notifications)
//! and the Prometheus text format the metrics endpoint serves ([`crate::metrics_http`]).
//!
//! Plain atomics, like the gateway's [`crate::metrics::Metrics`]: the core bumps them on its
//! commit path, so they must cost nothing there.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::Metrics;
use crate::store::StoreStats;

/// Upper bounds of the commit-latency histogram, in seconds.
pub const COMMIT_BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default)]
pub struct CoreStats {
    /// Messages the core handled (device reports, host requests).
    pub messages: AtomicU64,
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Commit latency: a count per bucket of [`COMMIT_BUCKETS`] (not cumulative), and the sum.
    commit_buckets: [AtomicU64; COMMIT_BUCKETS.len() + 1],
    commit_micros: AtomicU64,
    /// Alarms raised since the start (faults and overdue).
    pub alarms_raised: AtomicU64,
    /// New alarms refused because their device had `max_active_alarms_per_device` active.
    pub alarms_refused_max_active: AtomicU64,
    /// New alarms refused because their device raised them too fast.
    pub alarms_refused_rate: AtomicU64,
    pub notify_sent: AtomicU64,
    pub notify_failed: AtomicU64,
    /// Devices with an open session now.
    pub devices_online: AtomicU64,
    /// At a parent: messages child relays forwarded, stored (or found duplicate), and refused.
    pub relay_items_stored: AtomicU64,
    /// At a parent: batches (upstream messages) child relays sent.
    pub relay_batches: AtomicU64,
    pub relay_items_refused: AtomicU64,
    /// At a child: messages the parent has acked (those waiting are counted in the store).
    pub uplink_acked: AtomicU64,
    /// At a child: whether its uplink to the parent is connected (0 or 1).
    pub uplink_connected: AtomicU64,
    /// On a cluster node: orders the order sweep delivered or cleared from the database.
    pub cluster_orders_repaired: AtomicU64,
}

impl CoreStats {
    /// Records one commit that took `took`.
    pub fn commit(&self, took: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = COMMIT_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(COMMIT_BUCKETS.len());
        self.commit_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.commit_micros.fetch_add(
            took.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Everything in Prometheus text exposition format (version 0.0.4).
pub fn render(gw: &Metrics, core: &CoreStats, store: Option<&StoreStats>) -> String {
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "chukei_connections_active",
        "gauge",
        "MQTT sessions open now.",
        get(&gw.sessions_active),
    );
    metric(
        "chukei_sessions_started_total",
        "counter",
        "MQTT sessions admitted.",
        get(&gw.sessions_started),
    );
    metric(
        "chukei_sessions_resumed_total",
        "counter",
        "Device sessions that resumed a persistent MQTT session (no SUBSCRIBE needed).",
        get(&gw.sessions_resumed),
    );
    metric(
        "chukei_tcp_accepted_total",
        "counter",
        "TCP connections accepted.",
        get(&gw.tcp_accepted),
    );
    metric(
        "chukei_tls_failed_total",
        "counter",
        "TLS handshakes that failed.",
        get(&gw.tls_failed),
    );
    metric(
        "chukei_tls_timed_out_total",
        "counter",
        "TLS handshakes that took too long.",
        get(&gw.tls_timed_out),
    );
    metric(
        "chukei_handshakes_shed_total",
        "counter",
        "Silent connections closed to give their handshake slot to a new one (max_handshakes).",
        get(&gw.handshakes_shed),
    );
    metric(
        "chukei_metrics_http_refused_total",
        "counter",
        "Metrics-endpoint connections closed at once (metrics_max_connections).",
        get(&gw.metrics_http_refused),
    );
    metric(
        "chukei_metrics_http_timed_out_total",
        "counter",
        "Metrics-endpoint connections closed for slow request headers (metrics_header_timeout_secs).",
        get(&gw.metrics_http_timed_out),
    );
    metric(
        "chukei_tls_full_handshakes_total",
        "counter",
        "TLS handshakes completed in full (certificate chains and signatures).",
        get(&gw.tls_full),
    );
    metric(
        "chukei_tls_resumed_total",
        "counter",
        "TLS handshakes resumed with a session ticket (tls_tickets).",
        get(&gw.tls_resumed),
    );
    metric(
        "chukei_connect_refused_total",
        "counter",
        "Clients refused at CONNECT (identity, client id, broker full).",
        get(&gw.connect_refused),
    );
    metric(
        "chukei_acl_violations_total",
        "counter",
        "Packets refused by the ACL (each closes its connection).",
        get(&gw.acl_violations),
    );
    metric(
        "chukei_sessions_revoked_total",
        "counter",
        "Open sessions closed because a reload found their certificate revoked.",
        get(&gw.sessions_revoked),
    );
    metric(
        "chukei_cert_refused_total",
        "counter",
        "Connections closed after the handshake: certificate revoked by the list in force, or expired.",
        get(&gw.cert_refused),
    );
    metric(
        "chukei_config_reloads_total",
        "counter",
        "Configuration reloads applied (SIGHUP, broker reload).",
        get(&gw.reloads),
    );
    metric(
        "chukei_config_reload_failures_total",
        "counter",
        "Configuration reloads refused; the running configuration was kept.",
        get(&gw.reloads_failed),
    );
    metric(
        "chukei_bad_packets_total",
        "counter",
        "Connections closed for a malformed MQTT packet.",
        get(&gw.bad_packets),
    );
    metric(
        "chukei_relay_items_total",
        "counter",
        "At a parent: device messages child relays forwarded that were stored or found duplicate.",
        get(&core.relay_items_stored),
    );
    metric(
        "chukei_relay_batches_total",
        "counter",
        "At a parent: batches (upstream messages) child relays sent, each many device messages.",
        get(&core.relay_batches),
    );
    metric(
        "chukei_relay_items_refused_total",
        "counter",
        "At a parent: forwarded messages refused (a serial the child is not assigned, an unknown child).",
        get(&core.relay_items_refused),
    );
    metric(
        "chukei_uplink_acked_total",
        "counter",
        "At a child: device messages the parent relay has committed.",
        get(&core.uplink_acked),
    );
    metric(
        "chukei_uplink_connected",
        "gauge",
        "At a child: 1 while the uplink to the parent relay is connected.",
        get(&core.uplink_connected),
    );
    metric(
        "chukei_cluster_orders_repaired_total",
        "counter",
        "On a cluster node: job orders the bus lost, delivered (or cleared) from the database by the order sweep.",
        get(&core.cluster_orders_repaired),
    );
    metric(
        "chukei_devices_online",
        "gauge",
        "Devices with an open session.",
        get(&core.devices_online),
    );
    metric(
        "chukei_messages_total",
        "counter",
        "Messages the core handled (device reports and host requests).",
        get(&core.messages),
    );
    metric(
        "chukei_alarms_raised_total",
        "counter",
        "Alarms raised since the broker started (faults and overdue devices).",
        get(&core.alarms_raised),
    );
    let _ = writeln!(
        out,
        "# HELP chukei_alarms_refused_total New alarms refused by a per-device limit (listed in the device's overflow alarm).\n# TYPE chukei_alarms_refused_total counter\nchukei_alarms_refused_total{{limit=\"max_active_alarms_per_device\"}} {}\nchukei_alarms_refused_total{{limit=\"alarms_per_minute_per_device\"}} {}",
        get(&core.alarms_refused_max_active),
        get(&core.alarms_refused_rate)
    );
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "chukei_notifications_sent_total",
        "counter",
        "Mails and webhook calls delivered.",
        get(&core.notify_sent),
    );
    metric(
        "chukei_notifications_failed_total",
        "counter",
        "Mail and webhook deliveries that failed (each is retried or dropped).",
        get(&core.notify_failed),
    );

    let _ = writeln!(
        out,
        "# HELP chukei_redb_commit_seconds Time to commit one transaction (one group of messages).\n# TYPE chukei_redb_commit_seconds histogram"
    );
    let mut cumulative = 0u64;
    for (i, bound) in COMMIT_BUCKETS.iter().enumerate() {
        cumulative += get(&core.commit_buckets[i]);
        let _ = writeln!(
            out,
            "chukei_redb_commit_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    cumulative += get(&core.commit_buckets[COMMIT_BUCKETS.len()]);
    let _ = writeln!(
        out,
        "chukei_redb_commit_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        out,
        "chukei_redb_commit_seconds_sum {}",
        get(&core.commit_micros) as f64 / 1e6
    );
    let _ = writeln!(out, "chukei_redb_commit_seconds_count {cumulative}");

    if let Some(s) = store {
        let _ = writeln!(
            out,
            "# HELP chukei_jobs Jobs in the store by status.\n# TYPE chukei_jobs gauge"
        );
        for (status, n) in &s.jobs {
            let _ = writeln!(out, "chukei_jobs{{status=\"{status}\"}} {n}");
        }
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "chukei_alarms_active",
            "Alarms not yet cleared.",
            s.alarms_active,
        );
        gauge(
            "chukei_alarms_stored",
            "Alarms in the store, cleared ones included.",
            s.alarms_total,
        );
        gauge(
            "chukei_notification_queue",
            "Mails and webhook calls waiting to be delivered.",
            s.notify_queue,
        );
        gauge(
            "chukei_uplink_waiting",
            "At a child: device messages committed here and not yet acked by the parent relay.",
            s.uplink_waiting,
        );
        gauge(
            "chukei_devices_known",
            "Devices the relay has heard from.",
            s.devices,
        );
        gauge(
            "chukei_counter_readings",
            "Meter readings kept for export.",
            s.readings,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative_and_the_text_is_prometheus() {
        let core = CoreStats::default();
        core.commit(Duration::from_micros(300));
        core.commit(Duration::from_millis(3));
        core.commit(Duration::from_secs(9));
        let gw = Metrics::default();
        Metrics::inc(&gw.acl_violations);
        let mut store = StoreStats::default();
        store.jobs.insert("queued", 4);
        store.notify_queue = 2;
        let text = render(&gw, &core, Some(&store));
        for want in [
            "chukei_redb_commit_seconds_bucket{le=\"0.0005\"} 1\n",
            "chukei_redb_commit_seconds_bucket{le=\"0.005\"} 2\n",
            "chukei_redb_commit_seconds_bucket{le=\"+Inf\"} 3\n",
            "chukei_redb_commit_seconds_count 3\n",
            "chukei_acl_violations_total 1\n",
            "chukei_alarms_refused_total{limit=\"max_active_alarms_per_device\"} 0\n",
            "chukei_jobs{status=\"queued\"} 4\n",
            "chukei_notification_queue 2\n",
            "# TYPE chukei_connections_active gauge\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert_eq!(get(&core.commits), 3);
    }
}
