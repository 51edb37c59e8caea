//! The front door (DESIGN D1): accepts TCP, runs each TLS handshake concurrently under a
//! deadline, takes the client's identity from its certificate, and runs its MQTT session with
//! every packet checked before anything reaches the router.
//!
//! rumqttd's own listener handshakes inline in its accept loop with no timeout, so one silent
//! socket stalls every client after it; here the accept loop only accepts.

mod conn;
mod session;
mod ws;

pub use conn::{ClientConn, ConnError};

use std::sync::Arc;
use std::time::Duration;

use protocol::Identity;
use rumqttd::Broker;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_packet_bytes: usize,
    pub max_clients: usize,
    pub max_handshakes: usize,
}

/// What every connection task shares: built once at startup.
pub struct Gateway {
    pub settings: GatewaySettings,
    pub tls: TlsAcceptor,
    pub router: Arc<Broker>,
    pub metrics: Arc<Metrics>,
    /// Where device sessions opening and closing are reported (presence); `None`: nowhere.
    pub presence: Option<crate::presence::PresenceTx>,
    admission: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
}

/// How long open sessions get to finish when the broker stops.
const GRACE: Duration = Duration::from_secs(5);

/// The server configuration without TLS 1.3 session tickets. rustls sends two per handshake by
/// default and keeps a 256-entry resumption cache: at fleet scale (~19,000 devices per relay) a
/// reconnecting device almost never finds its entry, and a relay restart voids them all, yet
/// every handshake would pay two ticket encryptions, two more records and a cache entry holding
/// the client's certificate chain.
fn without_tickets(tls: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    let mut config = (*tls).clone();
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Arc::new(config)
}

impl Gateway {
    pub fn new(
        settings: GatewaySettings,
        tls: Arc<rustls::ServerConfig>,
        router: Arc<Broker>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Gateway {
            admission: Arc::new(Semaphore::new(settings.max_clients)),
            handshakes: Arc::new(Semaphore::new(settings.max_handshakes)),
            tls: TlsAcceptor::from(without_tickets(tls)),
            settings,
            router,
            metrics,
            presence: None,
        }
    }

    /// Reports every device session's start and end to the core (claim 42's presence).
    pub fn with_presence(mut self, presence: crate::presence::PresenceTx) -> Self {
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
        loop {
            // Wait for a handshake slot before accepting: excess connections queue in the
            // kernel's backlog instead of costing us memory and file descriptors.
            let permit = tokio::select! {
                () = stop.cancelled() => break,
                p = self.handshakes.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
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
            let gw = self.clone();
            let stop = stop.clone();
            let span = info_span!("conn", %peer, identity = field::Empty, topic = field::Empty);
            tasks.spawn(
                async move {
                    match kind {
                        Listener::Tls => gw.serve_conn(tcp, permit, stop).await,
                        Listener::Ws => gw.serve_ws(tcp, permit, stop).await,
                    }
                }
                .instrument(span),
            );
        }
        tasks.close();
        info!(open = tasks.len(), listener = ?kind, "gateway stopped accepting");
        if timeout(GRACE, tasks.wait()).await.is_err() {
            warn!("grace period over; dropping open connections");
        }
    }

    async fn serve_conn(
        self: Arc<Self>,
        tcp: TcpStream,
        permit: tokio::sync::OwnedSemaphorePermit,
        stop: CancellationToken,
    ) {
        // Alarms must not wait on Nagle and delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let tls = match timeout(self.settings.handshake_timeout, self.tls.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                Metrics::inc(&self.metrics.tls_failed);
                info!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                Metrics::inc(&self.metrics.tls_timed_out);
                debug!("TLS handshake timed out");
                return;
            }
        };
        drop(permit);
        let Some(who) = self.identity(tls.get_ref().1) else {
            return;
        };
        let conn = ClientConn::new(tls, self.settings.max_packet_bytes);
        self.serve_session(conn, who, stop).await
    }

    /// The client's identity, from its certificate (DESIGN D5); `None`, counted and logged, if
    /// it has none we accept.
    fn identity(&self, tls: &rustls::ServerConnection) -> Option<Identity> {
        let identity = tls
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|cert| pki::identity_from_der(cert));
        match identity {
            Some(Ok(who)) => {
                Span::current().record("identity", field::display(&who));
                Some(who)
            }
            Some(Err(e)) => {
                Metrics::inc(&self.metrics.connect_refused);
                warn!(error = %e, "client certificate carries no identity");
                None
            }
            None => {
                Metrics::inc(&self.metrics.connect_refused);
                warn!("client presented no certificate");
                None
            }
        }
    }

    /// Runs an authenticated client's session, whatever carries its bytes, and logs how it ended.
    async fn serve_session<S: AsyncRead + AsyncWrite + Unpin>(
        self: Arc<Self>,
        conn: ClientConn<S>,
        who: Identity,
        stop: CancellationToken,
    ) {
        match session::serve(conn, who, self.clone(), stop).await {
            // Info like "session started": a device that closes its session on purpose (a
            // firmware write, a periodic check-in ending) is seen doing so from the relay's log.
            Ok(()) => info!("session ended"),
            Err(e @ session::SessionError::Acl { .. }) => info!(error = %e, "session closed"),
            Err(session::SessionError::Conn(e)) => {
                // A reset or EOF is a network event; only a broken packet counts as bad input.
                if !matches!(e, ConnError::Io(_)) {
                    Metrics::inc(&self.metrics.bad_packets);
                }
                info!(error = %e, "session closed")
            }
            Err(e) => info!(error = %e, "session closed"),
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
