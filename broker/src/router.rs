//! The embedded rumqttd router. It routes; it is not the front door (docs/decisions.md, D1): no
//! listener of rumqttd's is ever started; every host and integrator session reaches it through a
//! local link made by the gateway, device sessions not at all (the hub, D7).

use std::sync::Arc;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{Broker, Config, RouterConfig};
use tracing::debug;

/// Starts the router thread and returns the handle links are made from.
///
/// rumqttd panics when connections exceed `max_connections` (rumqtt #991), so the router is sized
/// above the gateway's own admission limit plus the broker's internal links.
pub fn start(max_clients: usize) -> Arc<Broker> {
    let router = RouterConfig {
        max_connections: max_clients + 64,
        // Messages the router hands a link per round before the link must ask for more. Devices
        // share one link (the gateway's hub), which carries every device's traffic, so it gets
        // rumqttd's default rather than the 200 that once kept 18,000 per-device links small.
        max_outgoing_packet_count: 1024,
        // The commit log every publish passes through; segments are reused in a ring.
        max_segment_size: 16 * 1024 * 1024,
        max_segment_count: 8,
        ..Default::default()
    };
    Arc::new(Broker::new(Config {
        router,
        ..Default::default()
    }))
}

/// A QoS 0 publish from the broker itself. Reliability of what the broker sends comes from
/// retained messages and end-to-end acks, not from MQTT QoS.
pub fn publish(topic: &str, payload: Vec<u8>, retain: bool) -> Packet {
    Packet::Publish(
        Publish::new(Bytes::from(topic.to_owned()), Bytes::from(payload), retain),
        None,
    )
}

/// The next publish the router forwards to an internal link (the core's, the device hub's).
/// When the router pauses the link because its queue was full, asks to be scheduled again: the
/// queue has been drained by then, as every forward is taken as it comes. Cancel-safe.
pub async fn next_forward(rx: &mut LinkRx) -> Result<Publish, Box<LinkError>> {
    loop {
        match rx.next().await.map_err(Box::new)? {
            Some(Notification::Forward(fwd)) => return Ok(fwd.publish),
            Some(Notification::Unschedule) => rx.wake().await.map_err(Box::new)?,
            Some(other) => debug!(notification = ?other, "internal link notification"),
            None => {}
        }
    }
}
