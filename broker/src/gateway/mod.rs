//! The front door (docs/decisions.md, D1): accepts TCP, runs each TLS handshake concurrently under a
//! deadline, takes the client's identity from its certificate, and runs its MQTT session with
//! every packet checked before anything reaches the router.
//!
//! rumqttd's own listener handshakes inline in its accept loop with no timeout, so one silent
//! socket stalls every client after it; here the accept loop only accepts.

mod conn;
mod device_session;
mod keepalive;
pub mod limits;
pub mod revocation;
mod session;
mod session_loop;
mod slots;
pub mod tickets;
mod tls;
mod ws;

pub use conn::{ClientConn, ConnError};

use std::sync::{Arc, RwLock};
use std::time::Duration;

use protocol::Shown;
use rumqttd::Broker;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, field, info, info_span, warn};

use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub handshake_timeout: Duration,
    /// A new connection must send the first byte of its ClientHello within this; a silent
    /// socket is closed then rather than at `handshake_timeout`.
    pub first_byte_timeout: Duration,
    pub connect_timeout: Duration,
    /// A device's PUBACK waits up to this for the message's ack, to leave in one write with it
    /// (`puback_hold_ms`; zero: at once).
    pub puback_hold: Duration,
    pub max_packet_bytes: usize,
    pub max_clients: usize,
    pub max_handshakes: usize,
    /// QoS 1 PUBLISHes from one client the relay may hold unacknowledged to it; one more
    /// closes that client.
    pub max_inflight: usize,
    /// Distinct topic filters one client may hold; a SUBSCRIBE past it closes that client.
    pub max_subscriptions: usize,
    /// Sessions one certificate identity may hold at once; one more is refused at CONNECT.
    pub max_connections_per_identity: usize,
    /// Connection attempts per second one source address may make (token bucket refill);
    /// 0: no limit.
    pub connect_rate_per_source: u32,
    /// Connection attempts one source address may make at once before the rate applies.
    pub connect_burst_per_source: u32,
    /// Loopback sources (a proxy on the same host, benchmarks, tests) skip the rate limit.
    pub connect_rate_exempt_loopback: bool,
    /// Session start and end lines logged in full per second, each ([`limits::SessionLogs`]);
    /// 0: every one.
    pub session_log_lines_per_second: u64,
}

/// What every connection task shares: built once at startup; a reload replaces its settings
/// ([`Gateway::set_settings`]) and its TLS configuration ([`Gateway::set_tls`]).
pub struct Gateway {
    settings: RwLock<Arc<GatewaySettings>>,
    /// The server's TLS configuration ([`with_tickets`]) and the revocation list it checks.
    tls: revocation::CurrentTls,
    /// Seals session tickets; `None`: none are sent.
    tickets: Option<Arc<tickets::Ticketer>>,
    /// Open sessions by certificate serial: a reload closes those of a revoked certificate.
    sessions: Arc<revocation::OpenSessions>,
    pub router: Arc<Broker>,
    pub metrics: Arc<Metrics>,
    /// Where device sessions opening and closing are reported (presence); `None`: nowhere.
    pub presence: Option<crate::switch::presence::PresenceTx>,
    /// Where device sessions go: every device's session is a place in the hub, never a router
    /// link.
    pub hub: Arc<crate::switch::hub::Hub>,
    admission: Arc<Semaphore>,
    /// `max_handshakes` slots; a silent connection's may be taken back ([`slots`]).
    handshakes: Arc<slots::HandshakeSlots>,
    /// Sessions per certificate identity ([`limits::IdentityCounts`]), for both listeners.
    identities: Arc<limits::IdentityCounts>,
    /// New connections per source address, checked before any TLS work.
    sources: limits::SourceRates,
    /// Every kind of refusal a peer can repeat at will is logged within a budget of its own.
    logs: limits::RefusalLogs,
    /// Sessions opening and closing, logged within a budget ([`limits::SessionLogs`]).
    session_logs: limits::SessionLogs,
}

/// How long open sessions get to finish when the broker stops.
const GRACE: Duration = Duration::from_secs(5);

/// The server configuration with stateless session tickets sealed by `tickets`, or with none.
///
/// Never rustls' default: a 256-entry in-memory cache that a fleet of ~19,000 devices per relay
/// almost never hits and a restart voids, holding each client's chain (docs/decisions.md, D11).
/// Stateless tickets hold nothing on the relay, and their keys outlive a restart. One ticket per
/// handshake: a device holds one connection, and each resumption brings it a fresh ticket.
fn with_tickets(
    tls: Arc<rustls::ServerConfig>,
    tickets: Option<&Arc<tickets::Ticketer>>,
) -> Arc<rustls::ServerConfig> {
    let mut config = (*tls).clone();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    match tickets {
        Some(t) => {
            config.ticketer = t.clone();
            config.send_tls13_tickets = 1;
        }
        None => config.send_tls13_tickets = 0,
    }
    Arc::new(config)
}

impl Gateway {
    /// `tls` checks the revocation list `revoked` was read from (both from [`pki::load_crl`]);
    /// `tickets`, if given, seals session tickets.
    pub fn new(
        settings: GatewaySettings,
        tls: Arc<rustls::ServerConfig>,
        revoked: std::collections::HashSet<Vec<u8>>,
        tickets: Option<Arc<tickets::Ticketer>>,
        router: Arc<Broker>,
        hub: Arc<crate::switch::hub::Hub>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Gateway {
            admission: Arc::new(Semaphore::new(settings.max_clients)),
            handshakes: slots::HandshakeSlots::new(settings.max_handshakes),
            identities: limits::IdentityCounts::new(settings.max_connections_per_identity),
            sources: limits::SourceRates::new(
                settings.connect_rate_per_source,
                settings.connect_burst_per_source,
                settings.connect_rate_exempt_loopback,
            ),
            logs: limits::RefusalLogs::default(),
            session_logs: limits::SessionLogs::new(settings.session_log_lines_per_second),
            tls: revocation::CurrentTls::new(revocation::TlsState::new(
                with_tickets(tls, tickets.as_ref()),
                revoked,
            )),
            tickets,
            sessions: Arc::default(),
            settings: RwLock::new(Arc::new(settings)),
            router,
            metrics,
            presence: None,
            hub,
        }
    }

    /// The settings now (a reload may change them; a session reads them as it needs them).
    pub fn settings(&self) -> Arc<GatewaySettings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies reloaded settings. `max_clients` and `max_handshakes` size what the gateway
    /// built at startup and keep their values; every other setting applies to the next
    /// connection, packet or session that checks it.
    pub fn set_settings(&self, new: GatewaySettings) {
        let mut settings = self.settings.write().unwrap_or_else(|p| p.into_inner());
        let new = GatewaySettings {
            max_clients: settings.max_clients,
            max_handshakes: settings.max_handshakes,
            ..new
        };
        self.identities.set_max(new.max_connections_per_identity);
        self.session_logs.set(new.session_log_lines_per_second);
        self.sources.set(
            new.connect_rate_per_source,
            new.connect_burst_per_source,
            new.connect_rate_exempt_loopback,
        );
        *settings = Arc::new(new);
    }

    /// Replaces the TLS configuration and the revocation list (a reload), then closes every
    /// open session whose certificate the new list revokes; returns how many it closed. New
    /// handshakes use the new configuration; sessions of other certificates go on.
    pub fn set_tls(
        &self,
        tls: Arc<rustls::ServerConfig>,
        revoked: std::collections::HashSet<Vec<u8>>,
    ) -> usize {
        self.tls.set(revocation::TlsState::new(
            with_tickets(tls, self.tickets.as_ref()),
            revoked,
        ));
        let closed = self.sessions.close(&self.tls.get());
        Metrics::add(&self.metrics.sessions_revoked, closed as u64);
        closed
    }

    /// Reports every device session's start and end to the core (claim 42's presence).
    pub fn with_presence(mut self, presence: crate::switch::presence::PresenceTx) -> Self {
        self.presence = Some(presence);
        self
    }

    /// Accepts MQTT over TLS until `stop`, then waits (up to a grace period) for every session
    /// to end.
    pub async fn run(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        self.accept_loop(listener, Listener::Tls, stop).await
    }

    /// The accept loop of either listener: it only accepts; each handshake runs in its own task.
    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        kind: Listener,
        stop: CancellationToken,
    ) {
        let tasks = TaskTracker::new();
        let inherited = no_delay_for_accepted(&listener);
        loop {
            let (tcp, peer) = tokio::select! {
                () = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            Metrics::inc(&self.metrics.tcp_accepted);
            if !self.sources.admit(peer.ip()) {
                // Closed at once, before any TLS work: a flood from one address costs an
                // accept and a close.
                self.sources.report_refused(&self.metrics, peer);
                drop(tcp);
                continue;
            }
            let Some(slot) = self.slot(&stop).await else {
                break;
            };
            if !inherited {
                let _ = tcp.set_nodelay(true);
            }
            let gw = self.clone();
            let stop = stop.clone();
            let span = info_span!("conn", %peer, identity = field::Empty, topic = field::Empty);
            tasks.spawn(gw.serve(kind, tcp, slot, stop).instrument(span));
        }
        // Closed before the open sessions wind down, not after: while the socket listens, the
        // kernel completes handshakes nobody will accept, and a client that reconnects in that
        // time sends its ClientHello, spends its one session ticket on a connection that is then
        // reset, and pays a full handshake on its next try. Closed, it is refused at once and
        // keeps its ticket for the relay that comes back.
        drop(listener);
        tasks.close();
        info!(open = tasks.len(), listener = ?kind, "gateway stopped accepting");
        if timeout(GRACE, tasks.wait()).await.is_err() {
            warn!("grace period over; dropping open connections");
        }
    }

    /// A handshake slot for a connection just accepted; `None` if the gateway stops first. With
    /// every slot taken, the connection that has been silent longest makes room ([`slots`]); if
    /// every one has started its handshake, this one waits for a slot (and the connections after
    /// it in the kernel's backlog, costing us nothing).
    async fn slot(&self, stop: &CancellationToken) -> Option<slots::Slot> {
        loop {
            if let Some(slot) = self.handshakes.try_take() {
                return Some(slot);
            }
            let Some(answer) = self.handshakes.ask_oldest_silent() else {
                break;
            };
            let gave_up = tokio::select! {
                () = stop.cancelled() => return None,
                a = answer => a.unwrap_or(true),
            };
            if gave_up {
                limits::report_shed(
                    &self.metrics,
                    &self.logs.shed,
                    self.settings().max_handshakes,
                );
                break;
            }
        }
        tokio::select! {
            () = stop.cancelled() => None,
            slot = self.handshakes.take() => Some(slot),
        }
    }

    /// A connection's task, from its handshake to the end of its session. Every connection
    /// holds one for its whole life, so its size is memory per device.
    async fn serve(
        self: Arc<Self>,
        kind: Listener,
        tcp: TcpStream,
        slot: slots::Slot,
        stop: CancellationToken,
    ) {
        match kind {
            Listener::Tls => self.serve_conn(tcp, slot, stop).await,
            // Boxed: a WebSocket session's future is several times a TLS one's (tungstenite's
            // stream state), and a task is as large as the largest thing it may await.
            Listener::Ws => Box::pin(self.serve_ws(tcp, slot, stop)).await,
        }
    }

    async fn serve_conn(
        self: Arc<Self>,
        tcp: TcpStream,
        slot: slots::Slot,
        stop: CancellationToken,
    ) {
        // In its own async fn: the TLS connection it makes (1.2 KiB) would otherwise keep a slot in
        // this task for the connection's whole life after being moved into the session.
        let Some((conn, who)) = self.handshake(tcp, slot).await else {
            return;
        };
        self.serve_session(conn, who, stop).await
    }

    /// The TLS handshake under its deadline and the identity from the client's certificate.
    /// `None`: counted and logged here.
    async fn handshake(
        &self,
        tcp: TcpStream,
        mut slot: slots::Slot,
    ) -> Option<(ClientConn<tls::TlsConn>, pki::PeerCert)> {
        let settings = self.settings();
        let deadline = Instant::now() + settings.handshake_timeout;
        let first = self.first_byte(&tcp, &mut slot, deadline).await?;
        let tls = self.tls_accept(tcp, first, deadline).await?;
        drop(slot);
        let who = self.identity(&tls)?;
        Some((ClientConn::new(tls, settings.max_packet_bytes), who))
    }

    /// Waits for a new connection's first bytes (what a client sends first is its ClientHello,
    /// at once) and returns them, for the handshake to begin with: read here rather than peeked
    /// at, which was one system call more per connection (a reconnect storm makes thousands a
    /// second). `None`: the connection must close — it gave its slot to a newer one (reported
    /// where that was asked), or it sent nothing by the first-byte deadline or by `deadline`,
    /// whichever is sooner (reported here). A connection closed before a byte goes on with
    /// nothing read, so that the TLS handshake reports it as it always has.
    async fn first_byte(
        &self,
        tcp: &TcpStream,
        slot: &mut slots::Slot,
        deadline: Instant,
    ) -> Option<Vec<u8>> {
        let first_byte = Instant::now() + self.settings().first_byte_timeout;
        let until = first_byte.min(deadline);
        let mut first = Vec::new();
        let read = tokio::select! {
            ask = slot.asked() => {
                // A byte may have arrived before this task had a chance to see it.
                let spoke = slots::has_bytes(tcp);
                let _ = ask.send(!spoke);
                if !spoke {
                    return None;
                }
                Ok(())
            }
            // Cancel-safe: when the slot is asked for instead, nothing was read.
            r = timeout_at(until, tls::read_first(tcp, &mut first)) => r,
        };
        match read {
            Ok(()) => {
                slot.spoke();
                Some(first)
            }
            Err(_) if first_byte < deadline => {
                limits::report_first_byte_timeout(&self.metrics, &self.logs.first_byte);
                None
            }
            Err(_) => {
                limits::report_handshake_timeout(
                    &self.metrics,
                    &self.logs.handshake_timeout,
                    "TLS",
                );
                None
            }
        }
    }

    /// The TLS handshake, by `deadline`; `None`: counted and logged (within their budgets).
    async fn tls_accept(
        &self,
        tcp: TcpStream,
        first: Vec<u8>,
        deadline: Instant,
    ) -> Option<tls::TlsConn> {
        let config = self.tls.get().config.clone();
        match timeout_at(deadline, tls::accept(tcp, first, config)).await {
            Ok(Ok(tls)) => {
                let counter = if tls.resumed() {
                    &self.metrics.tls_resumed
                } else {
                    &self.metrics.tls_full
                };
                Metrics::inc(counter);
                Some(tls)
            }
            Ok(Err(e)) => {
                Metrics::inc(&self.metrics.tls_failed);
                if let Some(suppressed) = self.logs.tls_failed.check() {
                    // rustls' reasons are its own words, but a failed read may quote the peer.
                    info!(error = %Shown(&e.to_string()), suppressed, "TLS handshake failed");
                }
                None
            }
            Err(_) => {
                limits::report_handshake_timeout(
                    &self.metrics,
                    &self.logs.handshake_timeout,
                    "TLS",
                );
                None
            }
        }
    }

    /// Makes room in the per-session maps for `devices` sessions at once
    /// ([`crate::core::Core::known_devices`]): after a restart the whole fleet comes back within
    /// seconds, and growing each map a dozen times on the way was about 1 % of the relay's CPU.
    pub fn expect_devices(&self, devices: usize) {
        self.sessions.expect(devices);
        self.identities.expect(devices);
    }

    /// The client's identity, from its certificate (docs/decisions.md, D5), with the
    /// certificate's serial and expiry; `None`, counted and logged, if it has none we accept.
    fn identity(&self, tls: &tls::TlsConn) -> Option<pki::PeerCert> {
        let identity = tls
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|cert| pki::peer_cert(cert));
        match identity {
            Some(Ok(peer)) => {
                Span::current().record("identity", field::display(&peer.identity));
                Some(peer)
            }
            Some(Err(e)) => {
                Metrics::inc(&self.metrics.connect_refused);
                if let Some(suppressed) = self.logs.no_identity.check() {
                    warn!(error = %Shown(&e.to_string()), suppressed, "client certificate carries no identity");
                }
                None
            }
            None => {
                Metrics::inc(&self.metrics.connect_refused);
                if let Some(suppressed) = self.logs.no_identity.check() {
                    warn!(suppressed, "client presented no certificate");
                }
                None
            }
        }
    }

    /// Runs an authenticated client's session, whatever carries its bytes, and logs how it ended.
    async fn serve_session<S: AsyncRead + AsyncWrite + Unpin>(
        self: Arc<Self>,
        mut conn: ClientConn<S>,
        peer: pki::PeerCert,
        stop: CancellationToken,
    ) {
        // Registered before the revocation list is checked: a reload that swaps the list
        // between the two finds this session and closes it ([`revocation`]).
        let open = self.sessions.open(&peer.serial, &stop);
        if let Err(why) = self.still_valid(&peer) {
            Metrics::inc(&self.metrics.cert_refused);
            if let Some(suppressed) = self.logs.tls_failed.check() {
                warn!(serial = %peer.serial_text(), why, suppressed, "certificate refused after the handshake; connection closed");
            }
            conn.shutdown().await;
            return;
        }
        let who = peer.identity.clone();
        // Held until the session ends, whichever path serves it.
        let place = match self.identities.acquire(&who) {
            Ok(place) => place,
            Err(e) => {
                e.report(&self.metrics, &self.logs, &who);
                session::refuse_connect(conn, &self, e).await;
                return;
            }
        };
        let limited = |e: &limits::LimitExceeded| e.report(&self.metrics, &self.logs, &who);
        let result = session::serve(conn, who.clone(), self.clone(), &stop, open.token()).await;
        let revoked = open.token().is_cancelled() && !stop.is_cancelled();
        drop(open);
        // Given back before the end is logged: once a session is logged as ended, its identity
        // may open another.
        drop(place);
        use session::SessionError as E;
        match result {
            Ok(()) if revoked => {
                warn!(serial = %peer.serial_text(), "session closed: its certificate was revoked (reload)")
            }
            // Info like "session started": a device that closes its session on purpose (a
            // firmware write, a periodic check-in ending) is seen doing so from the relay's log.
            Ok(()) => match self.session_logs.ended.check() {
                Some(0) => info!("session ended"),
                Some(suppressed) => info!(suppressed, "session ended"),
                None => {}
            },
            // Logged (within their budgets) where they were refused; one line each is enough.
            Err(E::Acl { .. } | E::Refused(_)) => {}
            Err(E::Limit(e)) => limited(&e),
            Err(E::Conn(ConnError::TooLarge { max })) => {
                Metrics::inc(&self.metrics.bad_packets);
                limited(&limits::LimitExceeded::new(
                    limits::Limit::MaxPacketBytes,
                    format!("sent a packet larger than {max} bytes"),
                ));
            }
            // A reset or EOF is a network event, logged like any end of a session.
            Err(e @ E::Conn(ConnError::Io(_))) => match self.session_logs.ended.check() {
                Some(0) => info!(error = %e, "session closed"),
                Some(suppressed) => info!(error = %e, suppressed, "session closed"),
                None => {}
            },
            // Breaking the protocol is something a client can repeat at will.
            Err(e @ (E::Conn(_) | E::NotConnect | E::SecondConnect | E::ConnectTimeout(_))) => {
                if matches!(e, E::Conn(_)) {
                    Metrics::inc(&self.metrics.bad_packets);
                }
                if let Some(suppressed) = self.logs.bad_client.check() {
                    info!(error = %e, suppressed, "session closed");
                }
            }
            Err(e) => info!(error = %e, "session closed"),
        }
    }
}

impl Gateway {
    /// Whether a certificate that passed the handshake may still open a session: not revoked by
    /// the list now in force, and not expired. A full handshake has checked both already, but
    /// the list may have changed since, and a resumed handshake checks neither (its certificate
    /// comes out of the session ticket, sealed by the relay when the session began).
    fn still_valid(&self, peer: &pki::PeerCert) -> Result<(), &'static str> {
        if self.tls.get().is_revoked(&peer.serial) {
            return Err("revoked");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if peer.not_after < now {
            return Err("expired");
        }
        Ok(())
    }
}

/// Turns Nagle's algorithm off on `listener`, so that every connection it accepts has it off
/// from the start: alarms must not wait on Nagle and delayed ACKs. The kernel copies the option
/// to each accepted socket (Linux and the BSDs), which saves setting it per connection, one
/// system call each. `false` if the listener refused it: then each connection sets its own.
fn no_delay_for_accepted(listener: &TcpListener) -> bool {
    match rustix::net::sockopt::set_tcp_nodelay(listener, true) {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "cannot turn Nagle off on the listener; setting it per connection");
            false
        }
    }
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy)]
enum Listener {
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket over TLS ([`ws`]).
    Ws,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what a function's call returns (here: an async fn's future), without calling it.
    fn returned_size<A, B, C, D, E, R>(_: impl FnOnce(A, B, C, D, E) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every connection holds its task for its whole life, and a task is as large as the largest
    /// future it may await: a WebSocket session (11 KiB) awaited in line made every idle TLS
    /// device's task 11 KiB, half of the relay's memory per device (bench/RESULTS.md, "Memory").
    /// The relay sets TCP_NODELAY once, on the listener; every connection must still have it.
    #[tokio::test]
    async fn accepted_connections_have_nagle_off_from_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(no_delay_for_accepted(&listener));
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, client) = tokio::join!(listener.accept(), client);
        let (accepted, _) = accepted.unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "the accepted socket inherited TCP_NODELAY"
        );
        assert!(
            !client.unwrap().nodelay().unwrap(),
            "the client's own socket is untouched"
        );
    }

    #[test]
    fn a_connection_task_stays_small_whatever_else_a_connection_may_become() {
        let task = returned_size(Gateway::serve);
        assert!(task <= 4096, "a connection's task future is {task} bytes");
        // The reason it is boxed: were it in line, the assertion above would fail.
        let ws =
            returned_size(|gw: Arc<Gateway>, tcp, slot, stop, (): ()| gw.serve_ws(tcp, slot, stop));
        assert!(
            ws > 4096,
            "the WebSocket session is {ws} bytes: boxing it may no longer be needed"
        );
    }
}
