//! What one client may cost the relay: packets in flight, subscriptions, sessions per
//! certificate, and new connections per source address. Each check is a small type of its own so
//! that every session path (the host/integrator path in [`super::session`] and the device path)
//! applies the very same rule, and each breach is reported the same way: a `warn!` naming the
//! identity (the connection's span adds the peer) and the limit's config key, and a metric.
//!
//! Exceeding a per-session limit closes that client only; nothing here is shared between
//! clients except the two maps, each behind its own short lock.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use protocol::Identity;
use rumqttd::protocol::Packet;
use tracing::warn;

use crate::metrics::Metrics;

/// A TLS (or WebSocket) handshake that did not finish within `handshake_timeout_secs`: counted
/// in `tls_timed_out` and logged within `budget`, since a client can open silent sockets at will.
pub fn report_handshake_timeout(metrics: &Metrics, budget: &LogBudget, what: &str) {
    let total = Metrics::inc(&metrics.tls_timed_out);
    if let Some(suppressed) = budget.check() {
        warn!(
            limit = "handshake_timeout_secs",
            what,
            suppressed,
            total,
            "limit exceeded: handshake not finished in time, connection closed"
        );
    }
}

/// A connection that sent nothing within `first_byte_timeout_secs`: counted with the handshake
/// timeouts (`tls_timed_out`) and logged within `budget`.
pub fn report_first_byte_timeout(metrics: &Metrics, budget: &LogBudget) {
    let total = Metrics::inc(&metrics.tls_timed_out);
    if let Some(suppressed) = budget.check() {
        warn!(
            limit = "first_byte_timeout_secs",
            suppressed, total, "limit exceeded: no TLS ClientHello in time, connection closed"
        );
    }
}

/// Every handshake slot was taken, so the oldest connection that had not yet sent a byte was
/// closed to make room for a new one: counted in `handshakes_shed`, logged within `budget`.
pub fn report_shed(metrics: &Metrics, budget: &LogBudget, max_handshakes: usize) {
    let total = Metrics::inc(&metrics.handshakes_shed);
    if let Some(suppressed) = budget.check() {
        warn!(
            limit = "max_handshakes",
            max_handshakes,
            suppressed,
            total,
            "limit exceeded: every handshake slot taken; the oldest silent connection was shed"
        );
    }
}

/// One log budget for each kind of refusal a peer can repeat at will, so that a flood of one kind
/// neither fills the log nor hides the others. Each refusal is still counted in full.
#[derive(Debug, Default)]
pub struct RefusalLogs {
    /// TLS handshakes that failed (a foreign, expired or revoked certificate, not TLS at all).
    pub tls_failed: LogBudget,
    /// Handshakes past `handshake_timeout_secs`.
    pub handshake_timeout: LogBudget,
    /// Connections silent past `first_byte_timeout_secs`.
    pub first_byte: LogBudget,
    /// Silent connections shed for a new one (`max_handshakes`).
    pub shed: LogBudget,
    /// Certificates without an identity we accept.
    pub no_identity: LogBudget,
    /// WebSocket upgrades refused.
    pub ws_refused: LogBudget,
    /// CONNECTs refused (client id, broker full).
    pub connect_refused: LogBudget,
    /// ACL violations.
    pub acl: LogBudget,
    /// Sessions closed for breaking the protocol (a malformed packet, no CONNECT, a second one).
    pub bad_client: LogBudget,
    /// Per-client limits, one budget each, in the order of [`Limit::ALL`].
    limits: [LogBudget; Limit::ALL.len()],
}

impl RefusalLogs {
    /// The budget of `limit`'s "limit exceeded" lines.
    pub fn limit(&self, limit: Limit) -> &LogBudget {
        let i = Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0);
        &self.limits[i]
    }
}

/// Sessions opening and closing are logged one by one at the pace a fleet usually keeps, but not
/// in a storm: when a restarted relay's whole fleet comes back within seconds, a line per device
/// was about 2 % of the relay's CPU and thousands of lines nobody reads one by one. Past the
/// budget, the next line logged says how many were left out (`suppressed`); the metrics
/// (`sessions_started`) and each device's presence count every one.
#[derive(Debug)]
pub struct SessionLogs {
    pub started: LogBudget,
    pub ended: LogBudget,
}

impl SessionLogs {
    /// Lines of each kind logged in full per second, by default
    /// (`session_log_lines_per_second`).
    pub const PER_SECOND: u64 = 100;

    /// `per_second` lines of each kind; 0: every line.
    pub fn new(per_second: u64) -> Self {
        let per_second = Self::budget(per_second);
        SessionLogs {
            started: LogBudget::per_second(per_second),
            ended: LogBudget::per_second(per_second),
        }
    }

    /// A reload's new budget, from the next line on.
    pub fn set(&self, per_second: u64) {
        let per_second = Self::budget(per_second);
        self.started.set_per_second(per_second);
        self.ended.set_per_second(per_second);
    }

    /// The lines a budget of `per_second` lets through each second: 0 means all of them.
    pub(crate) fn budget(per_second: u64) -> u64 {
        if per_second == 0 {
            u64::MAX
        } else {
            per_second
        }
    }
}

pub use crate::log_budget::LogBudget;
pub use crate::metrics::Limit;

/// A client went past a limit; the session that sees this closes the client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{limit} exceeded: {detail}")]
pub struct LimitExceeded {
    pub limit: Limit,
    /// What the client did, in words for the log.
    pub detail: String,
}

impl LimitExceeded {
    pub fn new(limit: Limit, detail: impl Into<String>) -> Self {
        LimitExceeded {
            limit,
            detail: detail.into(),
        }
    }

    /// Logs the breach within the limit's budget (a warning with the identity and the limit's
    /// key; the connection's span adds the peer) and counts it. Call once, where the session
    /// decides to close.
    pub fn report(&self, metrics: &Metrics, logs: &RefusalLogs, who: &Identity) {
        let total = Metrics::inc(metrics.limit(self.limit));
        if let Some(suppressed) = logs.limit(self.limit).check() {
            warn!(
                identity = %who,
                limit = self.limit.key(),
                detail = %self.detail,
                suppressed,
                total,
                "limit exceeded: closing the client"
            );
        }
    }
}

/// QoS 1 PUBLISHes a client sent that the relay has not yet acknowledged to it.
///
/// Counted up when a PUBLISH goes to the router and down when its PUBACK is written to the
/// client. The client's own count (sent minus acks received) is never lower, so a client that
/// honours an inflight window of `max` (rumqttc's default is 100) never trips this; one that
/// floods without reading its acks does, before the router queues its flood.
#[derive(Debug)]
pub struct Inflight {
    held: usize,
    max: usize,
}

impl Inflight {
    pub fn new(max: usize) -> Self {
        Inflight { held: 0, max }
    }

    /// Before a client PUBLISH of QoS `qos` (0, 1 or 2: [`super::ClientConn::publish_id`],
    /// as rumqttd keeps a publish's QoS private) is forwarded. QoS 2 is refused: chukei's
    /// messages are QoS 1 with ids of their own, and rumqttd would hold each QoS 2 publish
    /// until its PUBREL, a queue this count would not see.
    pub fn publish(&mut self, qos: u8) -> Result<(), LimitExceeded> {
        match qos {
            0 => Ok(()),
            1 if self.held >= self.max => Err(LimitExceeded::new(
                Limit::MaxInflight,
                format!(
                    "more than {} QoS 1 PUBLISHes not yet acknowledged",
                    self.max
                ),
            )),
            1 => {
                self.held += 1;
                Ok(())
            }
            _ => Err(LimitExceeded::new(
                Limit::Qos2,
                "QoS 2 PUBLISH: chukei accepts QoS 0 and 1 only; publish with QoS 1",
            )),
        }
    }

    /// After a PUBACK for the client was written to it.
    pub fn acked(&mut self) {
        self.held = self.held.saturating_sub(1);
    }

    /// Counts every PUBACK among packets going to the client.
    pub fn delivered(&mut self, packet: &Packet) {
        if matches!(packet, Packet::PubAck(..)) {
            self.acked();
        }
    }

    pub fn held(&self) -> usize {
        self.held
    }
}

/// The distinct topic filters one client holds: SUBSCRIBE adds, UNSUBSCRIBE removes, the same
/// filter twice counts once (MQTT replaces a repeated subscription).
#[derive(Debug)]
pub struct Subscriptions {
    filters: HashSet<String>,
    max: usize,
}

impl Subscriptions {
    pub fn new(max: usize) -> Self {
        Subscriptions {
            filters: HashSet::new(),
            max,
        }
    }

    /// Applies a SUBSCRIBE or UNSUBSCRIBE (other packets pass); call after the ACL allowed it,
    /// before it is forwarded. On `Err` the set is left as it was.
    pub fn apply(&mut self, packet: &Packet) -> Result<(), LimitExceeded> {
        match packet {
            Packet::Subscribe(subscribe, _) => {
                let new: HashSet<&str> = subscribe
                    .filters
                    .iter()
                    .map(|f| f.path.as_str())
                    .filter(|f| !self.filters.contains(*f))
                    .collect();
                if self.filters.len() + new.len() > self.max {
                    return Err(LimitExceeded::new(
                        Limit::MaxSubscriptions,
                        format!(
                            "SUBSCRIBE would hold {} topic filters; the limit is {}",
                            self.filters.len() + new.len(),
                            self.max
                        ),
                    ));
                }
                self.filters.extend(new.into_iter().map(str::to_owned));
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe, _) => {
                for f in &unsubscribe.filters {
                    self.filters.remove(f);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    pub fn len(&self) -> usize {
        self.filters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }
}

/// Sessions per certificate identity, open now. One certificate holding thousands of sessions
/// (a stolen host key in a loop) would take the admission slots of a whole fleet.
#[derive(Debug)]
pub struct IdentityCounts {
    /// A reload may change it; sessions already open stay.
    max: AtomicUsize,
    held: Mutex<HashMap<Identity, usize>>,
}

/// One session's place in [`IdentityCounts`]; dropping it gives the place back.
#[derive(Debug)]
pub struct IdentityGuard {
    counts: Arc<IdentityCounts>,
    who: Identity,
}

impl IdentityCounts {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(IdentityCounts {
            max: AtomicUsize::new(max),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Makes room for `identities` at once.
    pub fn expect(&self, identities: usize) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let more = identities.saturating_sub(held.len());
        held.reserve(more);
    }

    /// Takes a place for `who`, held until the guard drops; `Err` if `who` already holds `max`.
    pub fn acquire(self: &Arc<Self>, who: &Identity) -> Result<IdentityGuard, LimitExceeded> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(who.clone()).or_insert(0);
        let max = self.max.load(Ordering::Relaxed);
        if *n >= max {
            return Err(LimitExceeded::new(
                Limit::MaxConnectionsPerIdentity,
                format!(
                    "this certificate already holds {} sessions; the limit is {}",
                    *n, max
                ),
            ));
        }
        *n += 1;
        Ok(IdentityGuard {
            counts: self.clone(),
            who: who.clone(),
        })
    }

    /// A new limit (a reload): identities over it keep their sessions but open no more.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Sessions `who` holds now.
    pub fn held(&self, who: &Identity) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(who).copied().unwrap_or(0)
    }

    /// Identities holding at least one session (the map's size: it never keeps zeros).
    pub fn identities(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for IdentityGuard {
    fn drop(&mut self) {
        let mut held = self.counts.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.who);
            }
        }
    }
}

/// Sources tracked at most. A bucket that has refilled is forgotten (it is the same as a new
/// one), so only sources that connected within the last `burst / rate` seconds count; past this
/// many even after forgetting those, a new source is let through untracked: the table's memory
/// stays bounded (~5 MB), and `max_handshakes` still bounds the work a flood can cause.
const MAX_SOURCES: usize = 65_536;
/// The table is swept for refilled buckets when it reaches this size, then when it doubles.
const FIRST_SWEEP: usize = 1_024;
/// How often a table that is full of active sources is swept again.
const SWEEP_FULL_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// New connections per source address: a token bucket per address, refilled at `rate` per
/// second up to `burst`. IPv6 sources count per /64, what one customer site is given.
#[derive(Debug)]
pub struct SourceRates {
    /// Per second; 0: no limit. Atomics: a reload may change all three ([`SourceRates::set`]).
    rate: AtomicU32,
    burst: AtomicU32,
    exempt_loopback: AtomicBool,
    table: Mutex<Table>,
    log: LogBudget,
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<IpAddr, Bucket>,
    next_sweep: usize,
    swept: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl SourceRates {
    /// `rate` 0: no limit.
    pub fn new(rate: u32, burst: u32, exempt_loopback: bool) -> Self {
        SourceRates {
            rate: AtomicU32::new(rate),
            burst: AtomicU32::new(burst.max(1)),
            exempt_loopback: AtomicBool::new(exempt_loopback),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                next_sweep: FIRST_SWEEP,
                swept: None,
            }),
            log: LogBudget::new(),
        }
    }

    /// New values (a reload); buckets already filled keep their tokens, capped at the new burst
    /// on their next connection.
    pub fn set(&self, rate: u32, burst: u32, exempt_loopback: bool) {
        self.rate.store(rate, Ordering::Relaxed);
        self.burst.store(burst.max(1), Ordering::Relaxed);
        self.exempt_loopback
            .store(exempt_loopback, Ordering::Relaxed);
    }

    fn rate(&self) -> f64 {
        f64::from(self.rate.load(Ordering::Relaxed))
    }

    fn burst(&self) -> f64 {
        f64::from(self.burst.load(Ordering::Relaxed))
    }

    /// Whether a new connection from `ip` may go on to its TLS handshake.
    pub fn admit(&self, ip: IpAddr) -> bool {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(&self, ip: IpAddr, now: Instant) -> bool {
        let (rate, burst) = (self.rate(), self.burst());
        if rate <= 0.0
            || (self.exempt_loopback.load(Ordering::Relaxed) && ip.to_canonical().is_loopback())
        {
            return true;
        }
        let key = source_key(ip);
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if !table.buckets.contains_key(&key) && table.buckets.len() >= table.next_sweep {
            // A full table is swept at most once a second: a flood of new sources must not
            // cost a walk of the whole table per connection.
            let full = table.buckets.len() >= MAX_SOURCES;
            if !full
                || table
                    .swept
                    .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_FULL_EVERY)
            {
                Self::sweep(&mut table, now, rate, burst);
            }
            if table.buckets.len() >= MAX_SOURCES {
                return true;
            }
        }
        let bucket = table.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets every source whose bucket would be full again by now.
    fn sweep(table: &mut Table, now: Instant, rate: f64, burst: f64) {
        table.buckets.retain(|_, b| {
            let idle = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + idle * rate < burst
        });
        table.next_sweep = (table.buckets.len() * 2).clamp(FIRST_SWEEP, MAX_SOURCES);
        table.swept = Some(now);
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buckets
            .len()
    }

    /// Logs a refused connection within a per-second budget (a flood must not flood the log)
    /// and counts it.
    pub fn report_refused(&self, metrics: &Metrics, peer: std::net::SocketAddr) {
        let total = Metrics::inc(metrics.limit(Limit::ConnectRatePerSource));
        if let Some(suppressed) = self.log.check() {
            warn!(
                %peer,
                limit = Limit::ConnectRatePerSource.key(),
                rate = self.rate(),
                burst = self.burst(),
                suppressed,
                total,
                "limit exceeded: connection closed before TLS"
            );
        }
    }
}

/// IPv4 addresses as they are; IPv6 ones by their /64 (a site's prefix: an attacker holds the
/// other 2^64 addresses too).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Role;
    use rumqttd::protocol::{
        Filter, PubAck, PubAckReason, QoS, RetainForwardRule, Subscribe, Unsubscribe,
    };
    use std::time::Duration;

    fn subscribe(filters: &[&str]) -> Packet {
        Packet::Subscribe(
            Subscribe {
                pkid: 1,
                filters: filters
                    .iter()
                    .map(|f| Filter {
                        path: (*f).to_owned(),
                        qos: QoS::AtLeastOnce,
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                    })
                    .collect(),
            },
            None,
        )
    }

    #[test]
    fn inflight_counts_qos1_until_acked_and_refuses_qos2() {
        let mut inflight = Inflight::new(2);
        inflight.publish(1).unwrap();
        inflight.publish(0).unwrap();
        inflight.publish(1).unwrap();
        let e = inflight.publish(1).unwrap_err();
        assert_eq!(e.limit, Limit::MaxInflight);
        let ack = Packet::PubAck(
            PubAck {
                pkid: 1,
                reason: PubAckReason::Success,
            },
            None,
        );
        inflight.delivered(&ack);
        inflight.delivered(&Packet::PingResp(rumqttd::protocol::PingResp));
        assert_eq!(inflight.held(), 1);
        inflight.publish(1).unwrap();
        assert_eq!(inflight.publish(2).unwrap_err().limit, Limit::Qos2);
        // An ack we never counted (e.g. for a publish before a reset) does not wrap around.
        let mut fresh = Inflight::new(1);
        fresh.acked();
        assert_eq!(fresh.held(), 0);
    }

    #[test]
    fn subscriptions_count_distinct_filters() {
        let mut subs = Subscriptions::new(3);
        subs.apply(&subscribe(&["a/1", "a/2"])).unwrap();
        subs.apply(&subscribe(&["a/1", "a/2", "a/3"])).unwrap();
        assert_eq!(subs.len(), 3);
        let e = subs.apply(&subscribe(&["a/4"])).unwrap_err();
        assert_eq!(e.limit, Limit::MaxSubscriptions);
        assert_eq!(subs.len(), 3, "a refused SUBSCRIBE adds nothing");
        subs.apply(&Packet::Unsubscribe(
            Unsubscribe {
                pkid: 2,
                filters: vec!["a/1".into(), "never/held".into()],
            },
            None,
        ))
        .unwrap();
        subs.apply(&subscribe(&["a/4"])).unwrap();
        assert_eq!(subs.len(), 3);
        // The same new filter twice in one SUBSCRIBE is one filter.
        let mut subs = Subscriptions::new(1);
        subs.apply(&subscribe(&["b", "b"])).unwrap();
    }

    #[test]
    fn room_is_made_for_the_identities_expected() {
        let counts = IdentityCounts::new(1);
        counts.expect(500);
        let held = counts.held.lock().unwrap();
        assert!(held.capacity() >= 500, "{}", held.capacity());
        assert!(held.is_empty());
    }

    #[test]
    fn identity_places_are_given_back_on_drop() {
        let counts = IdentityCounts::new(2);
        let svc = Identity::new(Role::Host, "svc").unwrap();
        let other = Identity::new(Role::Device, "svc").unwrap();
        let a = counts.acquire(&svc).unwrap();
        let _b = counts.acquire(&svc).unwrap();
        let e = counts.acquire(&svc).unwrap_err();
        assert_eq!(e.limit, Limit::MaxConnectionsPerIdentity);
        // Same id, other role: another identity.
        let _c = counts.acquire(&other).unwrap();
        drop(a);
        assert_eq!(counts.held(&svc), 1);
        let _d = counts.acquire(&svc).unwrap();
        drop(_c);
        assert_eq!(counts.identities(), 1, "zeros are not kept");
    }

    #[test]
    fn source_rate_allows_a_burst_then_the_rate() {
        let rates = SourceRates::new(2, 3, true);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = Instant::now();
        let admitted = (0..10).filter(|_| rates.admit_at(ip, t0)).count();
        assert_eq!(admitted, 3);
        // Another source is unaffected.
        assert!(rates.admit_at("192.0.2.8".parse().unwrap(), t0));
        // Half a second at 2/s: one more.
        let t1 = t0 + Duration::from_millis(500);
        assert!(rates.admit_at(ip, t1));
        assert!(!rates.admit_at(ip, t1));
        // Loopback is exempt when asked, and limited when not.
        let lo: IpAddr = "127.0.0.9".parse().unwrap();
        assert!((0..100).all(|_| rates.admit_at(lo, t0)));
        let strict = SourceRates::new(1, 1, false);
        assert!(strict.admit_at(lo, t0));
        assert!(!strict.admit_at(lo, t0));
        // An IPv4-mapped IPv6 address is the IPv4 source.
        assert!(!strict.admit_at("::ffff:127.0.0.9".parse().unwrap(), t0));
        // Rate 0: no limit.
        let off = SourceRates::new(0, 1, false);
        assert!((0..100).all(|_| off.admit_at(ip, t0)));
    }

    #[test]
    fn session_lines_keep_a_budget_each_that_a_reload_changes_and_zero_lifts() {
        let logs = SessionLogs::new(2);
        let logged = |b: &LogBudget| (0..10).filter(|_| b.check().is_some()).count();
        // A check may straddle a second: at most the budget of two seconds.
        assert!(logged(&logs.started) <= 4);
        assert!(logged(&logs.ended) >= 2, "ended has a budget of its own");
        logs.set(0);
        assert_eq!(logged(&logs.started), 10, "0: every line");
        assert_eq!(logged(&SessionLogs::new(0).ended), 10);
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let rates = SourceRates::new(1, 1, false);
        let t0 = Instant::now();
        assert!(rates.admit_at("2001:db8::1".parse().unwrap(), t0));
        assert!(!rates.admit_at("2001:db8::ffff:2".parse().unwrap(), t0));
        assert!(rates.admit_at("2001:db8:0:1::1".parse().unwrap(), t0));
    }

    #[test]
    fn the_source_table_forgets_refilled_buckets_and_stays_bounded() {
        let rates = SourceRates::new(10, 10, false);
        let t0 = Instant::now();
        let ip = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        for n in 0..FIRST_SWEEP as u32 {
            assert!(rates.admit_at(ip(n), t0));
        }
        assert_eq!(rates.tracked(), FIRST_SWEEP);
        // Two seconds later every bucket is full again: the next new source sweeps them away.
        let t1 = t0 + Duration::from_secs(2);
        assert!(rates.admit_at(ip(1_000_000), t1));
        assert_eq!(rates.tracked(), 1);
        // A flood of distinct sources, all at once, never grows the table past its cap.
        for n in 0..(MAX_SOURCES as u32 + 5_000) {
            rates.admit_at(ip(2_000_000 + n), t1);
        }
        assert!(rates.tracked() <= MAX_SOURCES, "{}", rates.tracked());
    }
}
