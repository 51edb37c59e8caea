//! A child tells its parent which devices are online at it, on `relay/{id}/up/presence`: beside
//! the queue, not in it. On every connection the whole set (in parts), then what changes; a set
//! that supersedes whatever was lost needs no disk.

use std::sync::Arc;
use std::time::Duration;

use protocol::relay::ChildPresence;
use protocol::{Envelope, RelayId, topic};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::uplink::Link;
use crate::core::Core;

/// How often a child tells its parent which of its devices came and went.
const PRESENCE_EVERY: Duration = Duration::from_millis(200);

/// Tells the parent which devices are online here: the whole set each time the link comes up,
/// then the changes every [`PRESENCE_EVERY`]. Changes while the link is down are dropped: the
/// next whole set covers them.
pub(super) async fn tell_presence(
    core: Arc<Core>,
    client: AsyncClient,
    relay: RelayId,
    mut up: watch::Receiver<Link>,
    stop: CancellationToken,
) {
    let topic = topic::relay_presence(&relay);
    let mut told: Option<u64> = None;
    let mut tick = tokio::time::interval(PRESENCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = up.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let link = *up.borrow_and_update();
        let deltas = core.take_presence_deltas();
        if !link.up {
            continue;
        }
        let messages = if told != Some(link.generation) {
            told = Some(link.generation);
            ChildPresence::whole(core.online_devices())
        } else if deltas.is_empty() {
            continue;
        } else {
            changes(deltas)
        };
        for msg in messages {
            match Envelope::new(0, chrono::Utc::now(), &msg).to_cbor() {
                Ok(payload) => {
                    if let Err(e) = client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                        .await
                    {
                        warn!(relay = %relay, error = %e, "could not tell the parent relay about device presence");
                    }
                }
                Err(e) => warn!(relay = %relay, error = %e, "could not encode device presence"),
            }
        }
    }
}

/// Presence changes as messages of at most [`protocol::relay::PRESENCE_PART`] serials each way: a
/// whole site reconnecting is thousands of them.
fn changes(deltas: Vec<(protocol::Serial, bool)>) -> Vec<ChildPresence> {
    let (online, offline): (Vec<_>, Vec<_>) = deltas.into_iter().partition(|(_, on)| *on);
    let part = protocol::relay::PRESENCE_PART;
    let parts = online.len().max(offline.len()).div_ceil(part).max(1);
    let take = |v: &[(protocol::Serial, bool)], i: usize| {
        v.iter()
            .skip(i * part)
            .take(part)
            .map(|(s, _)| s.clone())
            .collect()
    };
    (0..parts)
        .map(|i| ChildPresence {
            full: false,
            first: true,
            last: true,
            online: take(&online, i),
            offline: take(&offline, i),
        })
        .collect()
}
