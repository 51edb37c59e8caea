//! One client's MQTT session, from CONNECT to close: identity check, ACL check of every packet,
//! and the bridge between the client's socket and its local link into the router.

use std::sync::Arc;
use std::time::Duration;

use protocol::acl::{self, Action, Decision};
use protocol::{Identity, Role, Shown};
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, Packet, UnsubAck,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, field, info, warn};

use super::Gateway;
use super::conn::{ClientConn, ConnError, PublishId};
use super::keepalive::Keepalive;
use super::limits::{Inflight, LimitExceeded, Subscriptions};
use super::session_loop::{Side, drive};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("first packet was not CONNECT")]
    NotConnect,
    #[error("connect refused: {0}")]
    Refused(&'static str),
    /// `topic` as a log shows it ([`Shown`]): cut short, control characters escaped.
    #[error("{action:?} on {topic} denied: {reason}")]
    Acl {
        action: Action,
        topic: String,
        reason: &'static str,
    },
    #[error("keepalive expired")]
    KeepaliveExpired,
    #[error("second CONNECT on an open session")]
    SecondConnect,
    #[error("taken over by a newer session of the same client id")]
    TakenOver,
    #[error("too slow: more than {queued} messages were waiting for it")]
    TooSlow { queued: usize },
    #[error("the relay's core has stopped taking device messages")]
    HubStopped,
    /// A limit of [`super::limits`]; the gateway logs and counts it when the session ends.
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
    /// Boxed: rumqttd's error carries a whole router event (over 800 bytes).
    #[error("router link: {0}")]
    Link(Box<rumqttd::local::LinkError>),
    #[error(transparent)]
    Conn(#[from] ConnError),
}

impl From<rumqttd::local::LinkError> for SessionError {
    fn from(e: rumqttd::local::LinkError) -> Self {
        SessionError::Link(Box::new(e))
    }
}

/// Runs a session on an authenticated TLS connection until the client leaves, misbehaves, the
/// broker stops (`stop`) or the session is closed alone (`session`, a child of `stop`: its
/// certificate was revoked). Every exit path tells the router the session is gone.
pub async fn serve<S>(
    mut conn: ClientConn<S>,
    who: Identity,
    gw: Arc<Gateway>,
    stop: &CancellationToken,
    session: &CancellationToken,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connect_timeout = gw.settings().connect_timeout;
    let connect = match timeout(connect_timeout, conn.read_packet()).await {
        Err(_) => return Err(SessionError::ConnectTimeout(connect_timeout)),
        Ok(Ok(Some(Packet::Connect(connect, ..)))) => connect,
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(_))) => return Err(SessionError::NotConnect),
        Ok(Err(e)) => return Err(e.into()),
    };
    if let Decision::Deny(reason) = acl::check_client_id(&who, &connect.client_id) {
        if let Some(suppressed) = gw.logs.connect_refused.check() {
            warn!(client_id = %Shown(&connect.client_id), reason, suppressed, "connect refused");
        }
        return refuse(&mut conn, &gw, ConnectReturnCode::NotAuthorized, reason).await;
    }
    // Admission below rumqttd's own limit: over it rumqttd panics (rumqtt #991).
    let Ok(_permit) = gw.admission.clone().try_acquire_owned() else {
        if let Some(suppressed) = gw.logs.connect_refused.check() {
            warn!(
                max_clients = gw.settings().max_clients,
                suppressed, "connect refused: broker full"
            );
        }
        return refuse(
            &mut conn,
            &gw,
            ConnectReturnCode::ServiceUnavailable,
            "broker full",
        )
        .await;
    };
    // Devices go through the hub; everyone else gets a router link of their own. A device is
    // attached before the CONNACK: whether it resumed a session is the CONNACK's to say. Only
    // what waiting takes is kept across the session (`route`): what resuming found is spent on
    // the CONNACK and the presence event first.
    let (route, resumed, discarded) = if who.role() == Role::Device {
        let attached = gw.hub.attach(who.id(), connect.clean_session);
        (
            Route::Hub(attached.attachment),
            attached.resumed,
            attached.discarded,
        )
    } else {
        match open_link(&gw, &router_client_id(&who, &connect.client_id)).await {
            Ok((link_tx, link_rx)) => (Route::Link(link_tx, link_rx), None, false),
            Err(reason) => {
                return refuse(
                    &mut conn,
                    &gw,
                    ConnectReturnCode::ServiceUnavailable,
                    reason,
                )
                .await;
            }
        }
    };
    let session_present = resumed.is_some();
    connack(&mut conn, resumed).await?;
    Metrics::inc(&gw.metrics.sessions_started);
    if session_present {
        Metrics::inc(&gw.metrics.sessions_resumed);
    }
    Metrics::inc(&gw.metrics.sessions_active);
    let (client_id, keep_alive) = (Shown(&connect.client_id), connect.keep_alive);
    match gw.session_logs.started.check() {
        Some(0) => info!(client_id = %client_id, keep_alive, session_present, "session started"),
        Some(suppressed) => {
            info!(client_id = %client_id, keep_alive, session_present, suppressed, "session started")
        }
        None => {}
    }
    if let Some(presence) = &gw.presence {
        presence.session(&who, true);
        if discarded {
            presence.session_filters(&who, Vec::new());
        }
    }

    let mut keepalive = Keepalive::new(connect.keep_alive);
    let result = match route {
        // Boxed: a host's bridge is far larger than a device's session, and every device's
        // task would otherwise keep room for one.
        Route::Link(link_tx, link_rx) => {
            Box::pin(bridge(
                &mut conn,
                &who,
                &gw,
                link_tx,
                link_rx,
                &mut keepalive,
                stop,
                session,
            ))
            .await
        }
        Route::Hub(attachment) => {
            super::device_session::run(&mut conn, &who, &gw, attachment, &mut keepalive, session)
                .await
        }
    };
    Metrics::dec(&gw.metrics.sessions_active);
    if let Some(presence) = &gw.presence {
        presence.session(&who, false);
    }
    conn.shutdown().await;
    result
}

/// Runs a session over a router link of its own until it ends, then tells the router.
#[allow(clippy::too_many_arguments)] // one call site; `stop` (the relay's) and `session` (this one's) differ
async fn bridge<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut ClientConn<S>,
    who: &Identity,
    gw: &Gateway,
    link_tx: LinkTx,
    link_rx: LinkRx,
    keepalive: &mut Keepalive,
    stop: &CancellationToken,
    session: &CancellationToken,
) -> Result<(), SessionError> {
    let settings = gw.settings();
    let mut bridge = Bridge {
        who,
        gw,
        link_tx,
        link_rx,
        inflight: Inflight::new(settings.max_inflight),
        subscriptions: Subscriptions::new(settings.max_subscriptions),
    };
    let result = drive(conn, &mut bridge, keepalive, session).await;
    let client_left = matches!(result, Ok(true));
    // Whatever else ended the session, the router must forget it; a dropped link alone
    // is not noticed. After the client's own DISCONNECT it already has (a second one
    // logs an error). When the whole broker stops, the router goes with it: telling it
    // about every session one by one (each a blocking send into its 1,000-event
    // channel) held up a stop of 18,000 sessions past the grace period.
    if !client_left && !stop.is_cancelled() {
        let _ = bridge
            .link_tx
            .send(Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            ))
            .await;
    }
    result.map(|_| ())
}

/// How a session reaches the router.
enum Route<'a> {
    /// A link of its own (hosts, integrators).
    Link(LinkTx, LinkRx),
    /// A place in the device hub (see [`crate::switch::hub`]).
    Hub(crate::switch::hub::Attachment<'a>),
}

/// Accepts the session: CONNACK, "session present" if `resumed`, followed by the retained orders
/// a resumed session's filters match, as they would follow a SUBACK.
async fn connack<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut ClientConn<S>,
    resumed: Option<Vec<rumqttd::protocol::Publish>>,
) -> Result<(), ConnError> {
    let connack = ConnAck {
        session_present: resumed.is_some(),
        code: ConnectReturnCode::Success,
    };
    let replay = resumed.into_iter().flatten();
    conn.write_packets(
        std::iter::once(Packet::ConnAck(connack, None))
            .chain(replay.map(|publish| Packet::Publish(publish, None))),
    )
    .await
}

/// The session's client id in the router: the MQTT client id after its role (`host svc:watch`).
/// Client ids are checked per role (the certificate's CN, or CN:SUFFIX), so one name may be a
/// host's and an integrator's at once; the router keys sessions by client id alone, and would let
/// one take the other's over. No id holds a space, so role and client id cannot run together, and
/// no role is `chukei`, so no session can be the core's (`chukei core`). (rumqttd refuses `/`,
/// `+`, `#` and `$` in a client id.)
fn router_client_id(who: &Identity, client_id: &str) -> String {
    format!("{} {client_id}", who.role())
}

/// A router link of the session's own, made off the async threads (rumqttd blocks while the
/// router registers it). `Err`: why the client is turned away.
async fn open_link(gw: &Gateway, client_id: &str) -> Result<(LinkTx, LinkRx), &'static str> {
    let router = gw.router.clone();
    let client_id = client_id.to_owned();
    match tokio::task::spawn_blocking(move || router.link(&client_id).map_err(Box::new)).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => {
            warn!(error = %e, "router refused the session");
            Err("router refused")
        }
        Err(_) => Err("router gone"),
    }
}

/// Turns a client away before its session starts because of `why` (a limit already reported):
/// reads its CONNECT (under the connect deadline) and answers CONNACK "server unavailable", a
/// load condition, so that a client does not take it for a problem with its certificate.
pub(super) async fn refuse_connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: ClientConn<S>,
    gw: &Gateway,
    why: LimitExceeded,
) {
    if let Ok(Ok(Some(Packet::Connect(..)))) =
        timeout(gw.settings().connect_timeout, conn.read_packet()).await
    {
        let _ = refuse(
            &mut conn,
            gw,
            ConnectReturnCode::ServiceUnavailable,
            why.limit.key(),
        )
        .await;
    } else {
        Metrics::inc(&gw.metrics.connect_refused);
        conn.shutdown().await;
    }
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut ClientConn<S>,
    gw: &Gateway,
    code: ConnectReturnCode,
    reason: &'static str,
) -> Result<(), SessionError> {
    Metrics::inc(&gw.metrics.connect_refused);
    let _ = conn
        .write_packets([Packet::ConnAck(
            ConnAck {
                session_present: false,
                code,
            },
            None,
        )])
        .await;
    conn.shutdown().await;
    Err(SessionError::Refused(reason))
}

struct Bridge<'a> {
    who: &'a Identity,
    gw: &'a Gateway,
    link_tx: LinkTx,
    link_rx: LinkRx,
    /// QoS 1 publishes forwarded whose PUBACK the client has not been sent (`max_inflight`).
    inflight: Inflight,
    /// Topic filters the client holds (`max_subscriptions`).
    subscriptions: Subscriptions,
}

/// Most client packets handed to the router on one notification: what one read brought in.
const MAX_FORWARD_BATCH: usize = 64;

impl Side for Bridge<'_> {
    type Down = Notification;

    async fn on_packet<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut ClientConn<S>,
        first: Packet,
    ) -> Result<bool, SessionError> {
        self.forward(conn, first).await
    }

    async fn next_down(&mut self) -> Result<Option<Notification>, SessionError> {
        // `None`: the router dropped the link because another session took its client id.
        Ok(self.link_rx.next().await?)
    }

    async fn send_down<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut ClientConn<S>,
        first: Notification,
    ) -> Result<(), SessionError> {
        self.deliver(conn, first).await
    }
}

impl Bridge<'_> {
    /// Checks `first` and every whole packet that arrived with it against the ACL and hands them
    /// to the router with one notification: the router's channel carries one event per batch, not
    /// per packet (`LinkTx::send` blocks the thread when that channel is full). Returns whether
    /// the client said DISCONNECT.
    async fn forward<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut ClientConn<S>,
        first: Packet,
    ) -> Result<bool, SessionError> {
        let mut held: Option<Packet> = None;
        let mut next = Some(first);
        let mut count = 0;
        let mut leaving = false;
        let mut failed = None;
        // UNSUBACKs are the gateway's to send (see `unsuback`), after the router has the
        // UNSUBSCRIBEs.
        let mut unsubacks = Vec::new();
        while let Some(mut packet) = next {
            if let Err(e) = self.check_packet(&packet, conn.publish_id()) {
                failed = Some(e);
                break;
            }
            match &mut packet {
                // Nothing a client publishes is kept: on `host/…` (the only topic a client may
                // publish on through the router) nothing is retained, and a retained request
                // would be replayed to the host's every later session.
                Packet::Publish(publish, _) => publish.retain = false,
                Packet::Unsubscribe(unsubscribe, _) => unsubacks.push(unsuback(unsubscribe.pkid)),
                _ => {}
            }
            leaving = matches!(packet, Packet::Disconnect(..));
            if let Some(previous) = held.replace(packet) {
                self.link_tx.buffer().push_back(previous);
            }
            count += 1;
            if leaving || count >= MAX_FORWARD_BATCH {
                break;
            }
            next = match conn.buffered_packet() {
                Ok(p) => p,
                Err(e) => {
                    failed = Some(e.into());
                    None
                }
            };
        }
        // What came before a violation or a broken packet still goes in, as it would one by one.
        if let Some(last) = held {
            self.link_tx.send(last).await?;
        }
        if !unsubacks.is_empty() && failed.is_none() {
            conn.write_packets(unsubacks).await?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(leaving),
        }
    }

    /// The ACL and limit checks of one client packet, in that order: a packet the ACL refuses
    /// is an ACL violation whatever the counts say.
    /// `publish`: the QoS and packet id [`ClientConn::publish_id`] gave for this packet.
    fn check_packet(
        &mut self,
        packet: &Packet,
        publish: Option<PublishId>,
    ) -> Result<(), SessionError> {
        self.check_acl(packet)?;
        match packet {
            Packet::Publish(..) => self.inflight.publish(publish.map_or(0, |id| id.qos))?,
            other => self.subscriptions.apply(other)?,
        }
        Ok(())
    }

    fn check_acl(&self, packet: &Packet) -> Result<(), SessionError> {
        match packet {
            Packet::Publish(publish, _) => {
                let topic = String::from_utf8_lossy(&publish.topic);
                self.check(Action::Publish, &topic)
            }
            Packet::Subscribe(subscribe, _) => subscribe
                .filters
                .iter()
                .try_for_each(|f| self.check(Action::Subscribe, &f.path)),
            Packet::Unsubscribe(unsubscribe, _) => unsubscribe
                .filters
                .iter()
                .try_for_each(|f| self.check(Action::Unsubscribe, f)),
            Packet::Connect(..) => Err(SessionError::SecondConnect),
            _ => Ok(()),
        }
    }

    fn check(&self, action: Action, topic: &str) -> Result<(), SessionError> {
        check_acl(self.who, self.gw, action, topic)
    }

    /// Encodes what the router has for this client (everything queued, in one write).
    async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut ClientConn<S>,
        first: Notification,
    ) -> Result<(), SessionError> {
        let mut unscheduled = false;
        let mut next = Some(first);
        while let Some(notification) = next {
            match notification {
                Notification::Unschedule => unscheduled = true,
                n => match Option::<Packet>::from(n) {
                    // Already answered by the gateway (see `unsuback`).
                    Some(Packet::UnsubAck(..)) => {}
                    Some(packet) => {
                        self.inflight.delivered(&packet);
                        conn.queue(packet)?;
                    }
                    None => {}
                },
            }
            next = self.queued()?;
        }
        conn.flush().await?;
        if unscheduled {
            // The router paused this session because its queue was full; we have drained it.
            self.link_rx.wake().await?;
        }
        debug!("forwarded to client");
        Ok(())
    }

    /// The next notification the router has already queued, without waiting. LinkRx has no
    /// try_recv; a deadline of "now" returns the queued batch and never blocks.
    fn queued(&mut self) -> Result<Option<Notification>, SessionError> {
        match self.link_rx.recv_deadline(std::time::Instant::now()) {
            Ok(n) => Ok(n),
            Err(rumqttd::local::LinkError::RecvTimeout(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// The one UNSUBACK an UNSUBSCRIBE gets (MQTT 3.1.1 §3.10.4), whatever the client held. The
/// router answers only for filters the client held, once per filter: nothing for a filter never
/// subscribed, two for two. So the gateway answers every UNSUBSCRIBE itself, once the router has
/// it, and drops the router's own.
fn unsuback(pkid: u16) -> Packet {
    Packet::UnsubAck(
        UnsubAck {
            pkid,
            reasons: Vec::new(),
        },
        None,
    )
}

/// The ACL check of one topic or filter a client named; a denial is counted and logged (within
/// its budget) with the identity and topic. Every session path calls this, so every violation
/// reads the same. The topic is the client's: logged and kept only as [`Shown`] makes it.
pub(super) fn check_acl(
    who: &Identity,
    gw: &Gateway,
    action: Action,
    topic: &str,
) -> Result<(), SessionError> {
    match acl::check(who, action, topic) {
        Decision::Allow => Ok(()),
        Decision::Deny(reason) => {
            let total = Metrics::inc(&gw.metrics.acl_violations);
            let shown = Shown(topic).to_string();
            Span::current().record("topic", field::display(&shown));
            if let Some(suppressed) = gw.logs.acl.check() {
                warn!(identity = %who, ?action, topic = %shown, reason, suppressed, total, "acl violation");
            }
            Err(SessionError::Acl {
                action,
                topic: shown,
                reason,
            })
        }
    }
}
