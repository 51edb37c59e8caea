//! Device sessions do not use the router: the hub routes their traffic.
//!
//! rumqttd gives each link its own buffers (about 40 KiB, fixed by constants inside rumqttd) and
//! matches every publish against every link's filters on its single router thread. With a link
//! per device, a relay of 18,000 devices spent 95–98 % of its CPU matching topics and 40 KiB of
//! its ~55 KiB per idle device on rumqttd state (bench/RESULTS.md). A device may only subscribe
//! under `dev/{its serial}/` (the ACL), and only the core and the device itself publish there, so
//! the hub routes device topics itself: the core hands it what it sends devices ([`Hub::deliver`],
//! from `core_link`), a device's own publish is offered to its session too ([`Hub::publish_all`]), and
//! each message goes to the session of the serial it names: a hash lookup instead of a scan.
//!
//! Retained orders are the relay's memory of what a device still has to do (docs/decisions.md, D2). The hub
//! keeps the retained device topics (job orders and merged data; an empty payload clears one) and
//! replays them to a device when it subscribes; the core hands it the store's retained orders at
//! startup, before the gateway accepts anyone.
//!
//! A device that connects with `clean_session` 0 has a persistent session: when it goes, the
//! hub keeps its filters ([`Hub::restore_sessions`] puts back those a restarted relay read from
//! the store), and its next connection resumes them — CONNACK says "session present", the
//! retained messages they match follow, and the device need not subscribe again: a relay
//! restarted under a fleet is spared a SUBSCRIBE and a SUBACK per device. What the relay sends a
//! device is QoS 0, so a session holds no queued messages; the retained orders it is sent on
//! resuming are what a SUBACK would have brought.
//!
//! Upstream, a device may publish only on `dev/{its serial}/up/{kind}` (the ACL), and only the core
//! listens there, so the hub hands device publishes to the core's queue directly, without the
//! router: a report reaches the core in one hand-off instead of three (session → router thread →
//! core link → core). The gateway answers PUBACK itself once the core's queue has a publish (what
//! rumqttd's PUBACK meant too: "accepted", not "stored"); reliability comes from the core's
//! end-to-end acks. So devices touch the router not at all: it carries hosts and integrators.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use protocol::topic::UpKind;
use rumqttd::protocol::{Publish, matches};
use tokio::sync::{Notify, mpsc};
use tracing::warn;

use crate::core::Inbound;

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
    /// The core's queue. A full queue makes the publishing sessions wait (backpressure), never
    /// drops.
    core: mpsc::Sender<Inbound>,
    /// The alarm lane's queue, where the store has a second writer
    /// ([`crate::core::spawn_alarm_lane`]): devices' alarms go there, not to `core`.
    alarms: Option<mpsc::Sender<Inbound>>,
    /// Told when a device's alarm is queued for the core ([`crate::core::CommitWindow::urgent`]).
    urgent: Arc<Notify>,
    generations: AtomicU64,
    /// Messages a device may fall behind by before its session is closed.
    max_queued: usize,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Entry>,
    /// Serial → the filters of its persistent session while no connection holds it.
    dormant: HashMap<String, Vec<String>>,
    /// Serial → topic → payload, for job orders and merged data still in force.
    retained: HashMap<String, BTreeMap<String, Bytes>>,
}

struct Entry {
    /// Which attachment this is, and in its lowest bit whether the client connected with
    /// `clean_session` 0 (its filters outlive the connection): a field of its own would add 8
    /// bytes to every device's entry.
    generation: u64,
    filters: Vec<String>,
    tx: flume::Sender<Down>,
}

impl Entry {
    fn persistent(&self) -> bool {
        is_persistent(self.generation)
    }
}

/// Whether a generation ([`Entry`]'s, [`Attachment`]'s) is a persistent session's: its lowest bit.
fn is_persistent(generation: u64) -> bool {
    generation & 1 == 1
}

/// One device session's place in the hub. Dropping it detaches the session, unless a newer
/// session of the same serial has already taken the place.
pub struct Attachment<'a> {
    hub: &'a Hub,
    serial: String,
    /// As [`Entry`]'s, the lowest bit saying the session is persistent.
    generation: u64,
    pub rx: flume::Receiver<Down>,
}

/// A session attached ([`Hub::attach`]), and what it found of the device's previous one.
pub struct Attached<'a> {
    pub attachment: Attachment<'a>,
    /// `Some`: a persistent session resumed (MQTT "session present"), with the retained messages
    /// its filters match, to send after the CONNACK.
    pub resumed: Option<Vec<Publish>>,
    /// A clean session replaced a persistent one that had filters: the store must forget them.
    pub discarded: bool,
}

impl Hub {
    /// A hub that hands device publishes to `core`; a session more than `max_queued` messages
    /// behind is cut off.
    pub fn new(core: mpsc::Sender<Inbound>, max_queued: usize) -> Hub {
        Hub {
            state: Mutex::new(State::default()),
            core,
            alarms: None,
            urgent: Arc::default(),
            generations: AtomicU64::new(0),
            max_queued,
        }
    }

    /// Makes room for `devices` sessions at once ([`crate::core::Core::known_devices`]): a
    /// relay restarting under a fleet attaches all of them within seconds.
    pub fn expect_devices(&self, devices: usize) {
        let mut state = self.lock();
        let more = devices.saturating_sub(state.sessions.len());
        state.sessions.reserve(more);
    }

    /// This hub, handing devices' alarms to the alarm lane's queue `alarms` rather than to the
    /// core's.
    pub fn with_alarm_lane(mut self, alarms: mpsc::Sender<Inbound>) -> Hub {
        self.alarms = Some(alarms);
        self
    }

    /// What the hub notifies when a device's alarm is queued for the core: a commit window
    /// ends at once.
    pub fn urgent(&self) -> Arc<Notify> {
        self.urgent.clone()
    }

    /// Registers the session of `serial`; an older session of the same serial is told it was
    /// taken over. Without `clean`, it resumes the device's persistent session if the hub holds
    /// one (the older connection's, or one kept since the last ended); with `clean`, whatever the
    /// device had is discarded, as MQTT asks.
    pub fn attach(&self, serial: &str, clean: bool) -> Attached<'_> {
        let generation = self.generations.fetch_add(2, Ordering::Relaxed) | u64::from(!clean);
        let (tx, rx) = flume::bounded(self.max_queued);
        let mut state = self.lock();
        let State {
            sessions,
            dormant,
            retained,
        } = &mut *state;
        // The key of the entry replaced (or of the session kept) serves the new entry.
        let (mut key, mut old) = match sessions.remove_entry(serial) {
            Some((key, old)) => (Some(key), Some(old)),
            None => (None, None),
        };
        let mut previous = match &mut old {
            Some(old) if old.persistent() => std::mem::take(&mut old.filters),
            _ => Vec::new(),
        };
        if let Some((kept_key, kept)) = dormant.remove_entry(serial) {
            key = Some(kept_key);
            previous = kept;
            if dormant.is_empty() {
                // The fleet is back: give the room it took back.
                dormant.shrink_to_fit();
            }
        }
        let (filters, resumed, discarded) = match (clean, previous.is_empty()) {
            (false, false) => {
                let replay = replay_of(retained, serial, &previous);
                (previous, Some(replay), false)
            }
            (true, false) => (Vec::new(), None, true),
            (_, true) => (Vec::new(), None, false),
        };
        let entry = Entry {
            generation,
            filters,
            tx,
        };
        sessions.insert(key.unwrap_or_else(|| serial.to_owned()), entry);
        drop(state);
        if let Some(old) = old {
            // If its queue is full, dropping the sender ends it all the same.
            let _ = old.tx.try_send(Down::Detach(Detached::TakenOver));
        }
        Attached {
            attachment: Attachment {
                hub: self,
                serial: serial.to_owned(),
                generation,
                rx,
            },
            resumed,
            discarded,
        }
    }

    /// Puts back the persistent sessions a restarted relay read from its store
    /// ([`crate::core::Core::take_stored_sessions`]), before the gateway accepts anyone.
    pub fn restore_sessions(&self, sessions: Vec<(protocol::Serial, Vec<String>)>) {
        let mut state = self.lock();
        state.dormant.reserve(sessions.len());
        for (serial, filters) in sessions {
            if !filters.is_empty() {
                state.dormant.insert(serial.as_str().to_owned(), filters);
            }
        }
    }

    /// Hands a device's publishes to the core (see the module doc), together: they stay next to
    /// each other in the core's queue, so they are likely to share a commit, and the session
    /// waits for room once rather than per publish. `false`: the core has stopped.
    ///
    /// A session passes at most one read's worth (64 packets), far below the queue's capacity:
    /// `reserve_many` refuses more than the capacity outright, as if the core had stopped.
    ///
    /// With an alarm lane ([`Hub::with_alarm_lane`]), alarms go to its queue instead.
    pub async fn publish_all(&self, publishes: Vec<Publish>) -> bool {
        let mut to_core = Vec::with_capacity(publishes.len());
        let mut to_lane = Vec::new();
        let mut alarm_for_core = false;
        for publish in &publishes {
            let inbound = Inbound {
                topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                payload: publish.payload.clone(),
            };
            match (is_alarm(&inbound.topic), &self.alarms) {
                (true, Some(_)) => to_lane.push(inbound),
                (alarm, _) => {
                    alarm_for_core |= alarm;
                    to_core.push(inbound);
                }
            }
        }
        if !to_core.is_empty() {
            let Ok(permits) = self.core.reserve_many(to_core.len()).await else {
                return false;
            };
            for (permit, inbound) in permits.zip(to_core) {
                permit.send(inbound);
            }
        }
        if let Some(lane) = &self.alarms {
            for inbound in to_lane {
                if lane.send(inbound).await.is_err() {
                    return false;
                }
            }
        }
        if alarm_for_core {
            self.urgent.notify_one();
        }
        // A device subscribed to its own topics hears its publish, as from any MQTT broker.
        for publish in publishes {
            self.route(publish);
        }
        true
    }

    /// A message from the core for a device (`dev/…`), handed over without the router.
    pub fn deliver(&self, topic: &str, payload: Vec<u8>) {
        self.route(Publish::new(
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::from(payload),
            false,
        ));
    }

    /// The retained messages (job orders, merged data) of `serial`.
    pub fn retained_of(&self, serial: &str) -> Vec<(String, Bytes)> {
        self.lock()
            .retained
            .get(serial)
            .map(|topics| topics.iter().map(|(t, p)| (t.clone(), p.clone())).collect())
            .unwrap_or_default()
    }

    /// Every retained device topic the hub holds (job orders and merged data), of every serial.
    pub fn retained_topics(&self) -> HashSet<String> {
        self.lock()
            .retained
            .values()
            .flat_map(|topics| topics.keys().cloned())
            .collect()
    }

    /// Forgets every retained message (a child relay, before its parent sends them all again).
    pub fn clear_retained(&self) {
        self.lock().retained.clear();
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
            warn!(topic = %protocol::Shown(topic), "device hub: not a device topic; dropped");
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
                let kept = state.retained.entry(serial.to_owned()).or_default();
                if kept.get(topic) == Some(&publish.payload) {
                    // The same order again (a cluster node catching up from the database): the
                    // session had it when it was first routed, or in its replay on subscribe.
                    return;
                }
                kept.insert(topic.to_owned(), publish.payload.clone());
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
                warn!(%serial, topic = %protocol::Shown(topic), queued = self.max_queued, "device too slow; closing its session");
                // Removing the entry drops the sender: the session ends once it has drained.
                if let Some((key, gone)) = state.sessions.remove_entry(serial) {
                    keep_if_persistent(&mut state.dormant, key, gone);
                }
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
    ) -> Result<Subscribed, SubscribeError> {
        let mut state = self.hub.lock();
        let State {
            sessions, retained, ..
        } = &mut *state;
        let entry = match sessions.get_mut(&self.serial) {
            Some(e) if e.generation == self.generation => e,
            _ => return Err(SubscribeError::Detached),
        };
        let mut added = Vec::new();
        let mut changed = false;
        for filter in filters {
            if !entry.filters.contains(&filter) {
                if entry.filters.len() >= max_subscriptions {
                    return Err(SubscribeError::TooMany {
                        max: max_subscriptions,
                    });
                }
                entry.filters.push(filter.clone());
                changed = true;
            }
            added.push(filter);
        }
        let kept = (changed && self.persistent()).then(|| entry.filters.clone());
        Ok(Subscribed {
            replay: replay_of(retained, &self.serial, &added),
            kept,
        })
    }

    /// Removes filters; unknown ones are ignored, as MQTT asks. `Some`: the filters a persistent
    /// session now keeps, changed by this.
    pub fn unsubscribe(&self, filters: &[String]) -> Option<Vec<String>> {
        let mut state = self.hub.lock();
        let entry = state.sessions.get_mut(&self.serial)?;
        if entry.generation != self.generation {
            return None;
        }
        let before = entry.filters.len();
        entry.filters.retain(|f| !filters.contains(f));
        (self.persistent() && entry.filters.len() != before).then(|| entry.filters.clone())
    }

    fn persistent(&self) -> bool {
        is_persistent(self.generation)
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
            && let Some((key, gone)) = state.sessions.remove_entry(&self.serial)
        {
            keep_if_persistent(&mut state.dormant, key, gone);
        }
    }
}

/// What a SUBSCRIBE did in the hub.
#[derive(Debug, PartialEq)]
pub struct Subscribed {
    /// The retained messages the filters match, to send after the SUBACK.
    pub replay: Vec<Publish>,
    /// `Some`: the filters a persistent session now keeps, changed by this.
    pub kept: Option<Vec<String>>,
}

/// The retained messages of `serial` that any of `filters` matches, as publishes to send.
fn replay_of(
    retained: &HashMap<String, BTreeMap<String, Bytes>>,
    serial: &str,
    filters: &[String],
) -> Vec<Publish> {
    let Some(topics) = retained.get(serial) else {
        return Vec::new();
    };
    topics
        .iter()
        .filter(|(topic, _)| filters.iter().any(|f| matches(topic, f)))
        .map(|(topic, payload)| {
            Publish::new(
                Bytes::copy_from_slice(topic.as_bytes()),
                payload.clone(),
                true,
            )
        })
        .collect()
}

/// A session's entry leaving the hub: a persistent one's filters stay for its next connection.
fn keep_if_persistent(dormant: &mut HashMap<String, Vec<String>>, serial: String, gone: Entry) {
    if gone.persistent() && !gone.filters.is_empty() {
        dormant.insert(serial, gone.filters);
    }
}

/// Whether a device's publish is a fault report (`dev/{serial}/up/alarm`). The ACL let only
/// `dev/{its serial}/up/{kind}` through, so the last two levels say it: no need to parse the
/// serial again on every report.
fn is_alarm(topic: &str) -> bool {
    topic
        .strip_suffix(UpKind::Alarm.as_str())
        .is_some_and(|rest| rest.ends_with("/up/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(max_queued: usize) -> Hub {
        Hub::new(mpsc::channel(1).0, max_queued)
    }

    /// A clean session of `serial`.
    fn clean<'a>(hub: &'a Hub, serial: &str) -> Attachment<'a> {
        hub.attach(serial, true).attachment
    }

    #[test]
    fn room_is_made_for_the_devices_expected_and_never_taken_back() {
        let hub = hub(16);
        hub.expect_devices(1000);
        let room = hub.lock().sessions.capacity();
        assert!(room >= 1000, "{room}");
        hub.expect_devices(10);
        assert_eq!(hub.lock().sessions.capacity(), room);
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
        let a = clean(&hub, "A1");
        let b = clean(&hub, "B2");
        a.subscribe(["dev/A1/jobs/+".to_owned()], 8).unwrap();
        b.subscribe(["dev/B2/#".to_owned()], 8).unwrap();
        hub.route(publish("dev/A1/jobs/J-000001", b"order"));
        hub.route(publish("dev/A1/ack", b"ack")); // A1 is not subscribed to its acks
        hub.route(publish("dev/B2/ack", b"ack"));
        assert_eq!(received(&a), ["dev/A1/jobs/J-000001"]);
        assert_eq!(received(&b), ["dev/B2/ack"]);
    }

    #[tokio::test]
    async fn a_device_publish_reaches_the_core_and_its_own_subscription() {
        let (core_tx, mut core_rx) = mpsc::channel(4);
        let hub = Hub::new(core_tx, 16);
        let a = clean(&hub, "A1");
        let b = clean(&hub, "B2");
        a.subscribe(["dev/A1/up/+".to_owned()], 8).unwrap();
        b.subscribe(["dev/B2/up/+".to_owned()], 8).unwrap();
        assert!(
            hub.publish_all(vec![publish("dev/A1/up/state", b"x")])
                .await
        );
        assert_eq!(received(&a), ["dev/A1/up/state"]);
        assert!(received(&b).is_empty());
        let inbound = core_rx.try_recv().expect("the core has the publish");
        assert_eq!(inbound.topic, "dev/A1/up/state");
        assert_eq!(&inbound.payload[..], b"x");
        drop(core_rx);
        assert!(
            !hub.publish_all(vec![publish("dev/A1/up/state", b"")]).await,
            "a stopped core is reported to the session"
        );
    }

    #[tokio::test]
    async fn a_devices_alarm_tells_the_core_to_commit_at_once_and_a_report_does_not() {
        let (core_tx, mut core_rx) = mpsc::channel(8);
        let hub = Hub::new(core_tx, 16);
        let urgent = hub.urgent();
        let notified = |urgent: &Notify| {
            let mut wait = std::pin::pin!(urgent.notified());
            // Polled once: a stored notification completes it at once, none leaves it pending.
            futures_util::FutureExt::now_or_never(&mut wait).is_some()
        };
        assert!(
            hub.publish_all(vec![publish("dev/A1/up/counters", b"x")])
                .await
        );
        assert!(!notified(&urgent), "a report does not hurry the core");
        assert!(
            hub.publish_all(vec![
                publish("dev/A1/up/counters", b"y"),
                publish("dev/A1/up/alarm", b"z"),
            ])
            .await
        );
        assert!(notified(&urgent), "an alarm ends the core's commit window");
        let topics: Vec<String> = std::iter::from_fn(|| core_rx.try_recv().ok())
            .map(|i| i.topic)
            .collect();
        assert_eq!(
            topics,
            [
                "dev/A1/up/counters",
                "dev/A1/up/counters",
                "dev/A1/up/alarm"
            ]
        );
    }

    #[tokio::test]
    async fn with_an_alarm_lane_alarms_go_there_and_everything_else_to_the_core() {
        let (core_tx, mut core_rx) = mpsc::channel(8);
        let (lane_tx, mut lane_rx) = mpsc::channel(8);
        let hub = Hub::new(core_tx, 16).with_alarm_lane(lane_tx);
        let urgent = hub.urgent();
        let a = clean(&hub, "A1");
        a.subscribe(["dev/A1/up/+".to_owned()], 8).unwrap();
        assert!(
            hub.publish_all(vec![
                publish("dev/A1/up/counters", b"x"),
                publish("dev/A1/up/alarm", b"y"),
                publish("dev/A1/up/state", b"z"),
            ])
            .await
        );
        let drain = |rx: &mut mpsc::Receiver<Inbound>| -> Vec<String> {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|i| i.topic)
                .collect()
        };
        assert_eq!(
            drain(&mut core_rx),
            ["dev/A1/up/counters", "dev/A1/up/state"]
        );
        assert_eq!(drain(&mut lane_rx), ["dev/A1/up/alarm"]);
        let mut wait = std::pin::pin!(urgent.notified());
        assert!(
            futures_util::FutureExt::now_or_never(&mut wait).is_none(),
            "the core's window is not cut for an alarm it does not get"
        );
        assert_eq!(
            received(&a),
            ["dev/A1/up/counters", "dev/A1/up/alarm", "dev/A1/up/state"],
            "the device still hears its own publishes, in order"
        );
        drop(lane_rx);
        assert!(
            !hub.publish_all(vec![publish("dev/A1/up/alarm", b"")]).await,
            "a stopped lane is reported to the session"
        );
    }

    #[test]
    fn retained_orders_are_replayed_on_subscribe_until_emptied() {
        let hub = hub(16);
        hub.route(publish("dev/A1/jobs/J-000001", b"one"));
        hub.route(publish("dev/A1/jobs/J-000002", b"two"));
        hub.route(publish("dev/A1/ack", b"not retained"));
        hub.route(publish("dev/A1/jobs/J-000001", b"")); // the job ended
        let a = clean(&hub, "A1");
        let replay = a.subscribe(["dev/A1/jobs/+".to_owned()], 8).unwrap().replay;
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
    fn a_retained_order_routed_again_unchanged_is_not_sent_again_and_a_changed_one_is() {
        let hub = hub(16);
        let a = clean(&hub, "A1");
        a.subscribe(["dev/A1/#".to_owned()], 8).unwrap();
        hub.route(publish("dev/A1/jobs/J-000001", b"one"));
        hub.route(publish("dev/A1/jobs/J-000001", b"one"));
        hub.route(publish("dev/A1/ack", b"x"));
        hub.route(publish("dev/A1/ack", b"x"));
        assert_eq!(
            received(&a),
            ["dev/A1/jobs/J-000001", "dev/A1/ack", "dev/A1/ack"],
            "an order once, acks (not retained) each time"
        );
        hub.route(publish("dev/A1/jobs/J-000001", b"other"));
        hub.route(publish("dev/A1/jobs/J-000001", b""));
        hub.route(publish("dev/A1/jobs/J-000001", b"one"));
        assert_eq!(
            received(&a),
            [
                "dev/A1/jobs/J-000001",
                "dev/A1/jobs/J-000001",
                "dev/A1/jobs/J-000001"
            ],
            "a changed order, its clear, and the order again after the clear"
        );
    }

    #[test]
    fn a_newer_session_takes_over_and_the_old_one_cannot_detach_it() {
        let hub = hub(16);
        let old = clean(&hub, "A1");
        let new = clean(&hub, "A1");
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
        let slow = clean(&hub, "A1");
        let other = clean(&hub, "B2");
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
        let a = clean(&hub, "A1");
        a.subscribe(["dev/A1/ack".to_owned(), "dev/A1/ack".to_owned()], 1)
            .unwrap();
        assert_eq!(
            a.subscribe(["dev/A1/jobs/+".to_owned()], 1),
            Err(SubscribeError::TooMany { max: 1 })
        );
        a.unsubscribe(&["dev/A1/ack".to_owned()]);
        a.subscribe(["dev/A1/jobs/+".to_owned()], 1).unwrap();
    }

    fn filters(list: &[&str]) -> Vec<String> {
        list.iter().map(|f| (*f).to_owned()).collect()
    }

    fn topics(replay: &[Publish]) -> Vec<String> {
        replay
            .iter()
            .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
            .collect()
    }

    #[test]
    fn a_persistent_session_resumes_its_filters_and_the_orders_they_match() {
        let hub = hub(16);
        hub.route(publish("dev/A1/jobs/J-000001", b"order"));
        let first = hub.attach("A1", false);
        assert!(first.resumed.is_none(), "nothing to resume yet");
        let subscribed = first
            .attachment
            .subscribe(filters(&["dev/A1/jobs/+", "dev/A1/ack"]), 8)
            .unwrap();
        assert_eq!(
            subscribed.kept.as_deref(),
            Some(&filters(&["dev/A1/jobs/+", "dev/A1/ack"])[..]),
            "a persistent session's new filters are to be recorded"
        );
        let again = first
            .attachment
            .subscribe(filters(&["dev/A1/ack"]), 8)
            .unwrap();
        assert!(again.kept.is_none(), "nothing changed, nothing to record");
        drop(first);

        // Routed while no connection held the session: live delivery has no one to reach.
        hub.route(publish("dev/A1/jobs/J-000002", b"second"));
        let back = hub.attach("A1", false);
        let replay = back.resumed.as_deref().expect("session present");
        assert_eq!(
            topics(replay),
            ["dev/A1/jobs/J-000001", "dev/A1/jobs/J-000002"]
        );
        assert!(replay.iter().all(|p| p.retain));
        hub.route(publish("dev/A1/ack", b"live"));
        assert_eq!(
            received(&back.attachment),
            ["dev/A1/ack"],
            "the resumed filters route live messages without a SUBSCRIBE"
        );
        assert!(hub.lock().dormant.is_empty());
    }

    #[test]
    fn a_clean_session_discards_a_persistent_one_and_clean_sessions_keep_nothing() {
        let hub = hub(16);
        let persistent = hub.attach("A1", false);
        persistent
            .attachment
            .subscribe(filters(&["dev/A1/ack"]), 8)
            .unwrap();
        drop(persistent);
        let clean = hub.attach("A1", true);
        assert!(clean.resumed.is_none());
        assert!(clean.discarded, "the store must forget the filters too");
        let subscribed = clean
            .attachment
            .subscribe(filters(&["dev/A1/ack"]), 8)
            .unwrap();
        assert!(subscribed.kept.is_none(), "a clean session records nothing");
        drop(clean);
        assert!(hub.lock().dormant.is_empty());
        let next = hub.attach("A1", false);
        assert!(next.resumed.is_none() && !next.discarded);
    }

    #[test]
    fn a_session_taken_over_hands_its_filters_to_the_new_connection() {
        let hub = hub(16);
        let old = hub.attach("A1", false);
        old.attachment
            .subscribe(filters(&["dev/A1/ack"]), 8)
            .unwrap();
        let new = hub.attach("A1", false);
        assert_eq!(
            new.resumed.as_deref().map(<[Publish]>::len),
            Some(0),
            "session present, nothing retained"
        );
        assert_eq!(received(&old.attachment), ["TakenOver"]);
        drop(old);
        hub.route(publish("dev/A1/ack", b"x"));
        assert_eq!(received(&new.attachment), ["dev/A1/ack"]);
        let unsubscribed = new.attachment.unsubscribe(&filters(&["dev/A1/ack"]));
        assert_eq!(unsubscribed, Some(Vec::new()), "now empty: to be recorded");
        drop(new);
        assert!(
            hub.attach("A1", false).resumed.is_none(),
            "a session without filters is not kept"
        );
    }

    #[test]
    fn sessions_restored_at_startup_resume() {
        let hub = hub(16);
        let serial = protocol::Serial::parse("A1").unwrap();
        hub.restore_sessions(vec![(serial, filters(&["dev/A1/jobs/+"]))]);
        hub.route(publish("dev/A1/jobs/J-000003", b"order"));
        let back = hub.attach("A1", false);
        assert_eq!(
            topics(back.resumed.as_deref().expect("session present")),
            ["dev/A1/jobs/J-000003"]
        );
    }
}
