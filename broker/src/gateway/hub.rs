//! Every device session shares one router link: the hub.
//!
//! rumqttd gives each link its own buffers (about 40 KiB, fixed by constants inside rumqttd) and
//! matches every publish against every link's filters on its single router thread. With a link
//! per device, a relay of 18,000 devices spent 95–98 % of its CPU matching topics and 40 KiB of
//! its ~55 KiB per idle device on rumqttd state (bench/RESULTS.md). A device may only subscribe
//! under `dev/{its serial}/` (the ACL), and only the core and the device itself publish there, so
//! the hub routes device topics itself: the core hands it what it sends devices ([`Hub::deliver`],
//! from `core_link`), a device's own publish is offered to its session too ([`Hub::publish`]), and
//! each message goes to the session of the serial it names: a hash lookup instead of a scan.
//!
//! Retained orders are the relay's memory of what a device still has to do (DESIGN D2). The hub
//! keeps the retained device topics (job orders and merged data; an empty payload clears one) and
//! replays them to a device when it subscribes; the core hands it the store's retained orders at
//! startup, before the gateway accepts anyone.
//!
//! Upstream, device publishes go into the router as QoS 0 through one pump and its one link: the
//! gateway answers PUBACK itself once a publish is handed on (what rumqttd's PUBACK meant too: "in
//! the router", not "stored"); reliability comes from the core's end-to-end acks. Packet ids of
//! different devices would collide on a shared link at QoS 1. The link subscribes to nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rumqttd::Broker;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, matches};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

/// The hub's client id in the router. A space is not allowed in any certificate id, so no client
/// can take this link over.
const HUB_CLIENT_ID: &str = "chukei device hub";

/// Publishes from all devices waiting for the upstream pump. The pump drains them in batches; a
/// full queue makes the publishing sessions wait (backpressure), never drops.
const UPSTREAM_QUEUE: usize = 8192;

/// How many publishes the upstream pump hands the router per notification.
const UPSTREAM_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Boxed: rumqttd's error carries a whole router event (over 800 bytes).
    #[error("could not attach the device hub to the router: {0}")]
    Link(Box<rumqttd::local::LinkError>),
    #[error("the router thread is gone")]
    RouterGone,
}

/// Why a device session's downstream ended; the session reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// Another session of the same serial connected (MQTT: the newer session wins).
    TakenOver,
    /// More messages were waiting for the device than it was allowed to fall behind by.
    TooSlow { queued: usize },
}

/// What the hub sends a session.
#[derive(Debug)]
pub enum Down {
    Publish(Publish),
    Detach(Detached),
}

/// A subscription the hub refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("more than {max} subscriptions")]
    TooMany { max: usize },
    #[error("the session was already replaced by a newer one")]
    Detached,
}

/// The registry of device sessions and the retained device topics.
pub struct Hub {
    state: Mutex<State>,
    upstream: mpsc::Sender<Publish>,
    generations: AtomicU64,
    /// Messages a device may fall behind by before its session is closed.
    max_queued: usize,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Entry>,
    /// Serial → topic → payload, for job orders and merged data still in force.
    retained: HashMap<String, BTreeMap<String, Bytes>>,
}

struct Entry {
    generation: u64,
    filters: Vec<String>,
    tx: flume::Sender<Down>,
}

/// One device session's place in the hub. Dropping it detaches the session, unless a newer
/// session of the same serial has already taken the place.
pub struct Attachment<'a> {
    hub: &'a Hub,
    serial: String,
    generation: u64,
    pub rx: flume::Receiver<Down>,
}

impl Hub {
    /// Attaches the hub to the router and starts its upstream pump.
    pub async fn attach(
        router: std::sync::Arc<Broker>,
        max_queued: usize,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<std::sync::Arc<Hub>, HubError> {
        let (tx, rx) =
            tokio::task::spawn_blocking(move || router.link(HUB_CLIENT_ID).map_err(Box::new))
                .await
                .map_err(|_| HubError::RouterGone)?
                .map_err(HubError::Link)?;
        let (up_tx, up_rx) = mpsc::channel(UPSTREAM_QUEUE);
        let hub = std::sync::Arc::new(Hub {
            state: Mutex::new(State::default()),
            upstream: up_tx,
            generations: AtomicU64::new(0),
            max_queued,
        });
        tracker.spawn(pump_up(tx, rx, up_rx, stop));
        Ok(hub)
    }

    /// Registers the session of `serial`; an older session of the same serial is told it was
    /// taken over.
    pub fn attach_session(&self, serial: &str) -> Attachment<'_> {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = flume::bounded(self.max_queued);
        let entry = Entry {
            generation,
            filters: Vec::new(),
            tx,
        };
        let old = self.lock().sessions.insert(serial.to_owned(), entry);
        if let Some(old) = old {
            // If its queue is full, dropping the sender ends it all the same.
            let _ = old.tx.try_send(Down::Detach(Detached::TakenOver));
        }
        Attachment {
            hub: self,
            serial: serial.to_owned(),
            generation,
            rx,
        }
    }

    /// Hands a device's publish to the router (as QoS 0; see the module doc). Waits while the
    /// upstream queue is full. `false`: the hub has stopped.
    pub async fn publish(&self, topic: Bytes, payload: Bytes) -> bool {
        let publish = Publish::new(topic, payload, false);
        // A device subscribed to its own topics hears its publish, as from any MQTT broker.
        self.route(publish.clone());
        self.upstream.send(publish).await.is_ok()
    }

    /// A message from the core for a device (`dev/…`), handed over without the router.
    pub fn deliver(&self, topic: &str, payload: Vec<u8>) {
        self.route(Publish::new(
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::from(payload),
            false,
        ));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind, still consistent enough to
        // route by: keep serving rather than take every device down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes one message from the router to the session of the serial it names, and keeps the
    /// retained copy.
    fn route(&self, publish: Publish) {
        // A cheap clone (a reference count) so `publish` can be moved on while `topic` borrows.
        let topic_bytes = publish.topic.clone();
        let Ok(topic) = std::str::from_utf8(&topic_bytes) else {
            warn!("device hub: topic is not UTF-8; dropped");
            return;
        };
        // Only the core (which builds topics with `protocol::topic`) and ACL-checked devices
        // publish under `dev/`, so the levels are known good: `dev/{serial}/{kind}[/…]`. Split
        // rather than parse, without allocating, as this runs for every device message.
        let mut levels = topic.split('/');
        let (Some("dev"), Some(serial), Some(kind)) = (levels.next(), levels.next(), levels.next())
        else {
            warn!(topic, "device hub: not a device topic; dropped");
            return;
        };
        let retained = matches!(kind, "jobs" | "merged");
        let mut state = self.lock();
        if retained {
            if publish.payload.is_empty() {
                if let Some(topics) = state.retained.get_mut(serial) {
                    topics.remove(topic);
                    if topics.is_empty() {
                        state.retained.remove(serial);
                    }
                }
            } else {
                state
                    .retained
                    .entry(serial.to_owned())
                    .or_default()
                    .insert(topic.to_owned(), publish.payload.clone());
            }
        }
        let Some(entry) = state.sessions.get(serial) else {
            return;
        };
        if !entry.filters.iter().any(|f| matches(topic, f)) {
            return;
        }
        match entry.tx.try_send(Down::Publish(publish)) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(_)) => {
                warn!(%serial, topic, queued = self.max_queued, "device too slow; closing its session");
                // Removing the entry drops the sender: the session ends once it has drained.
                state.sessions.remove(serial);
            }
            Err(flume::TrySendError::Disconnected(_)) => {}
        }
    }
}

impl Attachment<'_> {
    /// Adds filters (each already allowed by the ACL) and returns the retained messages they
    /// match, to send after the SUBACK. Under the hub's lock, so a message routed concurrently is
    /// either in this snapshot or delivered live, never both or neither.
    pub fn subscribe(
        &self,
        filters: impl IntoIterator<Item = String>,
        max_subscriptions: usize,
    ) -> Result<Vec<Publish>, SubscribeError> {
        let mut state = self.hub.lock();
        let State { sessions, retained } = &mut *state;
        let entry = match sessions.get_mut(&self.serial) {
            Some(e) if e.generation == self.generation => e,
            _ => return Err(SubscribeError::Detached),
        };
        let mut added = Vec::new();
        for filter in filters {
            if !entry.filters.contains(&filter) {
                if entry.filters.len() >= max_subscriptions {
                    return Err(SubscribeError::TooMany {
                        max: max_subscriptions,
                    });
                }
                entry.filters.push(filter.clone());
            }
            added.push(filter);
        }
        let mut replay = Vec::new();
        if let Some(topics) = retained.get(&self.serial) {
            for (topic, payload) in topics {
                if added.iter().any(|f| matches(topic, f)) {
                    let topic = Bytes::copy_from_slice(topic.as_bytes());
                    replay.push(Publish::new(topic, payload.clone(), true));
                }
            }
        }
        Ok(replay)
    }

    /// Removes filters; unknown ones are ignored, as MQTT asks.
    pub fn unsubscribe(&self, filters: &[String]) {
        let mut state = self.hub.lock();
        if let Some(entry) = state.sessions.get_mut(&self.serial)
            && entry.generation == self.generation
        {
            entry.filters.retain(|f| !filters.contains(f));
        }
    }

    /// Why the downstream ended, once the receiver reports the sender gone.
    pub fn detached_reason(&self) -> Detached {
        Detached::TooSlow {
            queued: self.hub.max_queued,
        }
    }

    pub fn hub(&self) -> &Hub {
        self.hub
    }
}

impl Drop for Attachment<'_> {
    fn drop(&mut self) {
        let mut state = self.hub.lock();
        if state
            .sessions
            .get(&self.serial)
            .is_some_and(|e| e.generation == self.generation)
        {
            state.sessions.remove(&self.serial);
        }
    }
}

/// Device sessions → router, in batches: one router event per batch, not per publish.
///
/// `_rx` is held, not read: the link subscribes to nothing and sends QoS 0, so the router has
/// nothing to tell it, but a dropped receiver would read to rumqttd as a vanished connection.
async fn pump_up(
    mut tx: LinkTx,
    _rx: LinkRx,
    mut publishes: mpsc::Receiver<Publish>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(UPSTREAM_BATCH);
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return,
            n = publishes.recv_many(&mut batch, UPSTREAM_BATCH) => n,
        };
        if received == 0 {
            return;
        }
        let last = batch.pop();
        {
            let mut buffer = tx.buffer();
            buffer.extend(batch.drain(..).map(|p| Packet::Publish(p, None)));
        }
        if let Some(last) = last
            && let Err(e) = tx.send(Packet::Publish(last, None)).await
        {
            if !stop.is_cancelled() {
                error!(error = %e, "device hub could not publish into the router");
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(max_queued: usize) -> Hub {
        let (upstream, _rx) = mpsc::channel(1);
        Hub {
            state: Mutex::new(State::default()),
            upstream,
            generations: AtomicU64::new(0),
            max_queued,
        }
    }

    fn publish(topic: &str, payload: &[u8]) -> Publish {
        Publish::new(
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(payload),
            false,
        )
    }

    fn received(a: &Attachment<'_>) -> Vec<String> {
        a.rx.try_iter()
            .map(|d| match d {
                Down::Publish(p) => String::from_utf8_lossy(&p.topic).into_owned(),
                Down::Detach(why) => format!("{why:?}"),
            })
            .collect()
    }

    #[test]
    fn messages_reach_only_the_subscribed_session_of_their_serial() {
        let hub = hub(16);
        let a = hub.attach_session("A1");
        let b = hub.attach_session("B2");
        a.subscribe(["dev/A1/jobs/+".to_owned()], 8).unwrap();
        b.subscribe(["dev/B2/#".to_owned()], 8).unwrap();
        hub.route(publish("dev/A1/jobs/J-000001", b"order"));
        hub.route(publish("dev/A1/ack", b"ack")); // A1 is not subscribed to its acks
        hub.route(publish("dev/B2/ack", b"ack"));
        assert_eq!(received(&a), ["dev/A1/jobs/J-000001"]);
        assert_eq!(received(&b), ["dev/B2/ack"]);
    }

    #[tokio::test]
    async fn a_device_subscribed_to_its_own_topic_hears_its_publish() {
        let hub = hub(16);
        let a = hub.attach_session("A1");
        a.subscribe(["dev/A1/up/+".to_owned()], 8).unwrap();
        hub.publish(
            Bytes::from_static(b"dev/A1/up/state"),
            Bytes::from_static(b"x"),
        )
        .await;
        assert_eq!(received(&a), ["dev/A1/up/state"]);
    }

    #[test]
    fn retained_orders_are_replayed_on_subscribe_until_emptied() {
        let hub = hub(16);
        hub.route(publish("dev/A1/jobs/J-000001", b"one"));
        hub.route(publish("dev/A1/jobs/J-000002", b"two"));
        hub.route(publish("dev/A1/ack", b"not retained"));
        hub.route(publish("dev/A1/jobs/J-000001", b"")); // the job ended
        let a = hub.attach_session("A1");
        let replay = a.subscribe(["dev/A1/jobs/+".to_owned()], 8).unwrap();
        let topics: Vec<_> = replay.iter().map(|p| p.topic.clone()).collect();
        assert_eq!(topics, [Bytes::from_static(b"dev/A1/jobs/J-000002")]);
        assert!(replay[0].retain);
        assert!(!hub.lock().retained.contains_key("B2"));
        hub.route(publish("dev/A1/jobs/J-000002", b""));
        assert!(
            hub.lock().retained.is_empty(),
            "emptied orders take no memory"
        );
    }

    #[test]
    fn a_newer_session_takes_over_and_the_old_one_cannot_detach_it() {
        let hub = hub(16);
        let old = hub.attach_session("A1");
        let new = hub.attach_session("A1");
        assert_eq!(received(&old), ["TakenOver"]);
        assert_eq!(
            old.subscribe(["dev/A1/ack".to_owned()], 8),
            Err(SubscribeError::Detached)
        );
        drop(old);
        new.subscribe(["dev/A1/ack".to_owned()], 8).unwrap();
        hub.route(publish("dev/A1/ack", b"x"));
        assert_eq!(received(&new), ["dev/A1/ack"]);
        drop(new);
        assert!(hub.lock().sessions.is_empty());
    }

    #[test]
    fn a_session_that_falls_behind_is_cut_off_and_others_are_not() {
        let hub = hub(2);
        let slow = hub.attach_session("A1");
        let other = hub.attach_session("B2");
        slow.subscribe(["dev/A1/ack".to_owned()], 8).unwrap();
        other.subscribe(["dev/B2/ack".to_owned()], 8).unwrap();
        for _ in 0..3 {
            hub.route(publish("dev/A1/ack", b"x"));
            hub.route(publish("dev/B2/ack", b"x"));
            let _ = received(&other);
        }
        assert_eq!(
            received(&slow).len(),
            2,
            "what was queued is still delivered"
        );
        assert!(slow.rx.is_disconnected());
        assert!(!other.rx.is_disconnected());
    }

    #[test]
    fn subscriptions_are_limited_and_repeats_count_once() {
        let hub = hub(2);
        let a = hub.attach_session("A1");
        a.subscribe(["dev/A1/ack".to_owned(), "dev/A1/ack".to_owned()], 1)
            .unwrap();
        assert_eq!(
            a.subscribe(["dev/A1/jobs/+".to_owned()], 1),
            Err(SubscribeError::TooMany { max: 1 })
        );
        a.unsubscribe(&["dev/A1/ack".to_owned()]);
        a.subscribe(["dev/A1/jobs/+".to_owned()], 1).unwrap();
    }
}
