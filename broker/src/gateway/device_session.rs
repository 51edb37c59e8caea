//! A device's MQTT session once CONNECT is accepted: the same ACL as every session, but instead
//! of a router link of its own, the device's place in the shared [`Hub`].
//!
//! The gateway answers what rumqttd would have answered on a device's own link: SUBACK (with the
//! retained orders the filters match), UNSUBACK, PINGRESP, and PUBACK once a publish is in the
//! core's queue; a PUBACK then waits for the message's ack, up to `puback_hold_ms`, so that
//! both leave in one write. What the broker sends a device is QoS 0, as before: reliability
//! comes from retained orders and end-to-end acks, not from MQTT QoS.

use std::future::Future;

use protocol::Identity;
use protocol::acl::Action;
use rumqttd::protocol::{
    Packet, PubAck, PubAckReason, Publish, QoS, SubAck, Subscribe, SubscribeReasonCode, UnsubAck,
    Unsubscribe,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::conn::{ClientConn, PublishId};
use super::keepalive::Keepalive;
use super::limits::{Inflight, Limit, LimitExceeded};
use super::session::{SessionError, check_acl};
use super::session_loop::{Side, drive};
use super::{Gateway, GatewaySettings};
use crate::switch::hub::{Attachment, Detached, Down, SubscribeError};

/// Most client packets handled before the replies are flushed: what one read brought in.
const MAX_BATCH: usize = 64;

/// Most queued messages written to the device in one flush.
const MAX_DELIVER_BATCH: usize = 64;

/// Runs the session until the client leaves, misbehaves, is replaced or the broker stops.
/// Returns whether the client said DISCONNECT.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut ClientConn<S>,
    who: &Identity,
    gw: &Gateway,
    attachment: Attachment<'_>,
    keepalive: &mut Keepalive,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let mut session = DeviceSession {
        who,
        gw,
        attachment,
    };
    drive(conn, &mut session, keepalive, stop).await.map(|_| ())
}

struct DeviceSession<'a> {
    who: &'a Identity,
    gw: &'a Gateway,
    attachment: Attachment<'a>,
}

// Each handler returns its future without an `async fn` around it: the loop holds that future
// inline in every device's task, and an `async fn` would keep room for its arguments (a whole
// packet) there. Boxed instead, a device's task (most of them idle) holds only what waiting
// takes, not room for handling a batch.
impl Side for DeviceSession<'_> {
    type Down = Down;

    fn on_packet<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut ClientConn<S>,
        first: Packet,
    ) -> impl Future<Output = Result<bool, SessionError>> {
        Box::pin(self.handle_packets(conn, first))
    }

    fn next_down(&mut self) -> impl Future<Output = Result<Option<Down>, SessionError>> {
        let attachment = &self.attachment;
        async move {
            match attachment.rx.recv_async().await {
                Ok(down) => Ok(Some(down)),
                Err(_) => Err(detached(attachment.detached_reason())),
            }
        }
    }

    fn reply_hold(&self) -> std::time::Duration {
        self.gw.settings().puback_hold
    }

    fn send_down<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut ClientConn<S>,
        first: Down,
    ) -> impl Future<Output = Result<(), SessionError>> {
        Box::pin(self.deliver(conn, first))
    }
}

impl DeviceSession<'_> {
    /// Handles `first` and every whole packet that arrived with it, then flushes the replies in
    /// one write. Returns whether the client said DISCONNECT.
    async fn handle_packets<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut ClientConn<S>,
        first: Packet,
    ) -> Result<bool, SessionError> {
        let mut next = Some(first);
        let mut count = 0;
        let mut outcome = Ok(false);
        // Whether a reply must leave now: anything but a PUBLISH's PUBACK, which waits for the
        // message's ack (`puback_hold_ms`).
        let mut answer_now = false;
        // This read's publishes, handed to the hub together once the read is handled.
        let mut up = Vec::new();
        // Once per read, not per packet: a reload may replace them, and reading them is shared
        // by every session.
        let limits = self.gw.settings();
        while let Some(packet) = next {
            answer_now |= !matches!(packet, Packet::Publish(..));
            match self.handle(conn, packet, &mut up, &limits) {
                Ok(false) => {}
                other => {
                    outcome = other;
                    break;
                }
            }
            count += 1;
            if count >= MAX_BATCH {
                break;
            }
            next = match conn.buffered_packet() {
                Ok(p) => p,
                Err(e) => {
                    outcome = Err(e.into());
                    None
                }
            };
        }
        // What was handled before a violation still goes on, and its replies out, as they would
        // one by one. The PUBACKs queued above leave only after the core's queue has the publishes,
        // and, unless something else must go now, with the next thing the device is sent: the
        // publishes' acks, once committed (the session loop bounds the wait).
        if !up.is_empty() && !self.attachment.hub().publish_all(up).await {
            return Err(SessionError::HubStopped);
        }
        if answer_now || limits.puback_hold.is_zero() || !matches!(outcome, Ok(false)) {
            conn.flush().await?;
        }
        outcome
    }

    /// One client packet; replies are queued on `conn`, a publish allowed on is added to `up`.
    /// Returns whether it was DISCONNECT.
    fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut ClientConn<S>,
        packet: Packet,
        up: &mut Vec<Publish>,
        limits: &GatewaySettings,
    ) -> Result<bool, SessionError> {
        match packet {
            Packet::Publish(publish, _) => self.publish(conn, publish, up, limits.max_inflight)?,
            Packet::Subscribe(subscribe, _) => {
                self.subscribe(conn, subscribe, limits.max_subscriptions)?
            }
            Packet::Unsubscribe(unsubscribe, _) => self.unsubscribe(conn, unsubscribe)?,
            Packet::PingReq(_) => conn.queue(Packet::PingResp(rumqttd::protocol::PingResp))?,
            Packet::Disconnect(..) => return Ok(true),
            Packet::Connect(..) => return Err(SessionError::SecondConnect),
            // PUBACKs (we send QoS 0, so there are none to expect) and anything else a client
            // may send that needs no answer.
            _ => {}
        }
        Ok(false)
    }

    fn publish<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut ClientConn<S>,
        publish: Publish,
        up: &mut Vec<Publish>,
        max_inflight: usize,
    ) -> Result<(), SessionError> {
        let topic = String::from_utf8_lossy(&publish.topic);
        check_acl(self.who, self.gw, Action::Publish, &topic)?;
        let id = conn.publish_id().unwrap_or(PublishId { qos: 0, pkid: 0 });
        // The gateway acks as soon as the hub has the publish, so the count only ever holds
        // this batch; what it adds here is the same QoS 2 refusal every session gives.
        let mut inflight = Inflight::new(max_inflight);
        inflight.publish(id.qos)?;
        // Nothing a client publishes is retained (the router's path clears it too).
        let mut publish = publish;
        publish.retain = false;
        up.push(publish);
        if id.qos == 1 {
            conn.queue(Packet::PubAck(
                PubAck {
                    pkid: id.pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ))?;
        }
        Ok(())
    }

    fn subscribe<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut ClientConn<S>,
        subscribe: Subscribe,
        max_subscriptions: usize,
    ) -> Result<(), SessionError> {
        for filter in &subscribe.filters {
            check_acl(self.who, self.gw, Action::Subscribe, &filter.path)?;
        }
        let return_codes = subscribe
            .filters
            .iter()
            .map(|f| match f.qos {
                QoS::AtMostOnce => SubscribeReasonCode::QoS0,
                _ => SubscribeReasonCode::QoS1,
            })
            .collect();
        let filters = subscribe.filters.into_iter().map(|f| f.path);
        let subscribed = match self.attachment.subscribe(filters, max_subscriptions) {
            Ok(subscribed) => subscribed,
            // The hub holds the device's filters (one copy, not two), so it counts them; the
            // refusal reads like every other session's.
            Err(SubscribeError::TooMany { max }) => {
                return Err(LimitExceeded::new(
                    Limit::MaxSubscriptions,
                    format!("SUBSCRIBE would hold more than {max} topic filters"),
                )
                .into());
            }
            Err(SubscribeError::Detached) => return Err(detached(Detached::TakenOver)),
        };
        conn.queue(Packet::SubAck(
            SubAck {
                pkid: subscribe.pkid,
                return_codes,
            },
            None,
        ))?;
        for publish in subscribed.replay {
            conn.queue(Packet::Publish(publish, None))?;
        }
        self.keep_filters(subscribed.kept);
        Ok(())
    }

    /// A persistent session's filters changed: recorded, so that a restarted relay resumes them.
    fn keep_filters(&self, kept: Option<Vec<String>>) {
        if let (Some(filters), Some(presence)) = (kept, &self.gw.presence) {
            presence.session_filters(self.who, filters);
        }
    }

    fn unsubscribe<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut ClientConn<S>,
        unsubscribe: Unsubscribe,
    ) -> Result<(), SessionError> {
        for filter in &unsubscribe.filters {
            check_acl(self.who, self.gw, Action::Unsubscribe, filter)?;
        }
        let kept = self.attachment.unsubscribe(&unsubscribe.filters);
        self.keep_filters(kept);
        conn.queue(Packet::UnsubAck(
            UnsubAck {
                pkid: unsubscribe.pkid,
                reasons: Vec::new(),
            },
            None,
        ))?;
        Ok(())
    }

    /// Writes `first` and whatever else is already queued for the device, in one flush.
    async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut ClientConn<S>,
        first: Down,
    ) -> Result<(), SessionError> {
        let mut next = Some(first);
        let mut count = 0;
        while let Some(down) = next {
            match down {
                Down::Publish(publish) => conn.queue(Packet::Publish(publish, None))?,
                Down::Detach(why) => {
                    conn.flush().await?;
                    return Err(detached(why));
                }
            }
            count += 1;
            next = if count < MAX_DELIVER_BATCH {
                self.attachment.rx.try_recv().ok()
            } else {
                None
            };
        }
        conn.flush().await?;
        Ok(())
    }
}

fn detached(why: Detached) -> SessionError {
    match why {
        Detached::TakenOver => SessionError::TakenOver,
        Detached::TooSlow { queued } => SessionError::TooSlow { queued },
    }
}
