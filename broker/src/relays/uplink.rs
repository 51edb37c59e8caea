//! A child relay's uplink: it connects **out** to its parent with its relay certificate, as a
//! device does, and forwards the device messages the core queued (`UplinkTables`) in batches on
//! `relay/{id}/up/batch`, until the parent acks each batch on `relay/{id}/ack` after its commit.
//!
//! One batch is in flight at a time, taken from the head of the queue: the parent applies a
//! device's messages in the order the child stored them (an alarm raised, then cleared), and an
//! ack for `upto` means every queued item up to it is committed there. A batch waits up to
//! `delay` to fill (count and bytes bound it), except one holding an alarm, which goes at once.
//! A batch not acked in time, or cut off by a lost connection, is sent again from the head; the
//! parent deduplicates each item by the device's own message id, so a resend stores nothing twice.
//! While the parent cannot be reached the child goes on serving its devices; the queue waits on
//! its disk. A parent that is a cluster is given as its nodes: the child moves to the next node
//! when the one it is on is lost, and backs off only when it has tried them all (claim 26).
//!
//! The parts: this module connects and drives the connection ([`Driver`]); [`super::forwarder`]
//! sends the queue; [`super::presence`] tells which devices are online here, beside the queue;
//! [`super::down`] takes what the parent sends this child's devices (and the child itself).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::relay::BatchAck;
use protocol::topic;
use protocol::url::BrokerUrl;
use protocol::{Envelope, RelayId};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeFilter};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::forwarder::Forwarder;
use crate::core::Core;
use crate::store::Store;
use crate::switch::hub::Hub;
use crate::telemetry::CoreStats;

/// How a child reaches its parent and how it batches.
#[derive(Clone)]
pub struct UplinkSettings {
    pub relay: RelayId,
    /// The parent's nodes, most preferred first: the child moves to the next one when the one it
    /// is on cannot be reached (claim 26).
    pub parents: Vec<BrokerUrl>,
    pub tls: Arc<rustls::ClientConfig>,
    pub max_items: usize,
    pub max_bytes: usize,
    pub delay: Duration,
    /// A batch not acked within this is sent again.
    pub ack_timeout: Duration,
    /// Periodic parent sessions (claim 21): connect this often, exchange everything, disconnect.
    /// `None`: stay connected.
    pub periodic: Option<Duration>,
    /// What the child needs to replace its own program ([`super::own`]).
    pub own: super::own::OwnSettings,
}

/// In a periodic session, what must have been quiet this long before the child says goodbye:
/// the subscription (its retained orders arrive after it) and the last order.
const SETTLE: Duration = Duration::from_secs(1);

/// Messages for the child itself waiting for [`super::own`]: orders and firmware chunks.
const OWN_QUEUE: usize = 4 * protocol::artifact::MAX_CHUNKS_PER_FETCH;

/// Largest ack a child decodes.
const MAX_ACK_BYTES: usize = 1024 * 1024;
/// Waits between connection attempts: from the first to the last, doubling.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_LAST: Duration = Duration::from_secs(30);

/// Runs the uplink until `stop`. What the parent sends the child's devices goes to `hub`.
pub async fn run(
    settings: UplinkSettings,
    core: Arc<Core>,
    hub: Arc<Hub>,
    stop: CancellationToken,
) {
    let store = core.shared_store();
    let stats = core.shared_stats();
    let wake = core.uplink_wake();
    let alarm = core.uplink_alarm();
    let room = settings.max_bytes + 64 * 1024;
    let parents: Vec<(String, rumqttc::MqttOptions)> = settings
        .parents
        .iter()
        .map(|parent| {
            let mut opts =
                link::mqtt_options(settings.relay.as_str(), parent, None, settings.tls.clone());
            opts.set_keep_alive(Duration::from_secs(30));
            opts.set_clean_session(true);
            opts.set_max_packet_size(room, room);
            (parent.to_string(), opts)
        })
        .collect();
    let Some((_, first)) = parents.first() else {
        warn!(relay = %settings.relay, "no parent relay to connect to");
        return;
    };
    let (client, mut eventloop) = AsyncClient::new(first.clone(), 16);
    let mut net = eventloop.network_options();
    // Without it a batch's ack (and so the next batch, an alarm among them) can stall ~40 ms on
    // Nagle and delayed ACK: measured in bench alarm-latency --through-child.
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    eventloop.set_network_options(net);
    let (acks_tx, acks) = mpsc::channel(16);
    let (up_tx, up) = watch::channel(Link::default());
    let (idle_tx, idle) = watch::channel(false);
    // Room for several windows of chunks: the task writes each to disk as it comes.
    let (own_tx, own_rx) = mpsc::channel(OWN_QUEUE);
    let names: Vec<&str> = parents.iter().map(|(name, _)| name.as_str()).collect();
    info!(relay = %settings.relay, parents = ?names, "uplink to the parent relay starting");
    let driver = Driver {
        eventloop,
        client: client.clone(),
        relay: settings.relay.clone(),
        acks: acks_tx,
        up: up_tx,
        hub,
        store: store.clone(),
        wake: wake.clone(),
        stats: stats.clone(),
        periodic: settings.periodic,
        idle,
        alarm,
        own: own_tx,
        parents,
    };
    let driver = tokio::spawn(driver.run(stop.clone()));
    let own = tokio::spawn(
        super::own::OwnJobs {
            relay: settings.relay.clone(),
            store: store.clone(),
            stats: stats.clone(),
            wake: wake.clone(),
            settings: settings.own.clone(),
            up: up.clone(),
            rx: own_rx,
        }
        .run(stop.clone()),
    );
    let presence = tokio::spawn(super::presence::tell_presence(
        core,
        client.clone(),
        settings.relay.clone(),
        up.clone(),
        stop.clone(),
    ));
    let forwarder = Forwarder {
        settings,
        store,
        stats,
        client,
        idle: idle_tx,
    };
    forwarder.run(acks, up, wake, stop.clone()).await;
    stop.cancel();
    let _ = driver.await;
    let _ = presence.await;
    let _ = own.await;
}

/// Whether the uplink may send, and which connection it is on (a new number for each).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Link {
    pub(super) up: bool,
    pub(super) generation: u64,
}

/// Drives rumqttc's connection: subscribes to the acks on every CONNACK, hands acks to the
/// forwarder, says when the link is up (subscribed) or down, and reconnects with backoff.
struct Driver {
    eventloop: EventLoop,
    client: AsyncClient,
    relay: RelayId,
    acks: mpsc::Sender<BatchAck>,
    up: watch::Sender<Link>,
    hub: Arc<Hub>,
    /// Where orders from the parent are kept, and the forwarder woken when one is new.
    store: Arc<dyn Store>,
    wake: Arc<Notify>,
    stats: Arc<CoreStats>,
    periodic: Option<Duration>,
    /// The forwarder has nothing to send and nothing in flight.
    idle: watch::Receiver<bool>,
    /// An alarm was queued (a periodic child connects at once).
    alarm: Arc<std::sync::atomic::AtomicBool>,
    /// What the parent sends for the child itself.
    own: mpsc::Sender<super::own::OwnMessage>,
    /// Each of the parent's nodes (its address, its options); the eventloop is on one of them.
    parents: Vec<(String, rumqttc::MqttOptions)>,
}

impl Driver {
    async fn run(self, stop: CancellationToken) {
        let Driver {
            mut eventloop,
            client,
            relay,
            acks,
            up,
            hub,
            store,
            wake,
            stats,
            periodic,
            idle,
            alarm,
            own,
            parents,
        } = self;
        let mut on = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quiet_since = tokio::time::Instant::now();
        let ack_topic = topic::relay_ack(&relay);
        let down_filter = topic::relay_down_filter(&relay);
        let mut retry = RETRY_FIRST;
        let mut lost_logged = false;
        // Connection attempts failed since the last success: a whole round of the parent's
        // nodes failing backs off, moving to the next node does not.
        let mut failed_in_row = 0usize;
        loop {
            let polled = tokio::select! {
                _ = stop.cancelled() => return,
                polled = eventloop.poll() => polled,
                _ = tick.tick(), if periodic.is_some() && up.borrow().up => {
                    // A periodic session ends once everything is exchanged.
                    if *idle.borrow() && quiet_since.elapsed() >= SETTLE {
                        let _ = client.try_disconnect();
                    }
                    continue;
                }
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    retry = RETRY_FIRST;
                    lost_logged = false;
                    failed_in_row = 0;
                    stats.uplink_connected.store(1, Ordering::Relaxed);
                    // This session carries whatever alarm is queued.
                    alarm.store(false, Ordering::Relaxed);
                    info!(relay = %relay, parent = %parents[on].0, "uplink connected to the parent relay");
                    // The parent sends every retained order again on the subscription: what it
                    // cleared meanwhile must not linger here.
                    hub.clear_retained();
                    if let Err(e) = store.begin().and_then(|mut t| {
                        t.clear_mirrored()?;
                        t.commit()
                    }) {
                        warn!(relay = %relay, error = %e, "could not forget the orders kept from the parent relay");
                    }
                    let filters = [ack_topic.clone(), down_filter.clone()]
                        .map(|path| SubscribeFilter::new(path, QoS::AtLeastOnce));
                    if let Err(e) = client.try_subscribe_many(filters) {
                        warn!(relay = %relay, error = %e, "could not subscribe at the parent relay");
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                    eventloop.clean();
                    stats.uplink_connected.store(0, Ordering::Relaxed);
                    up.send_if_modified(|l| std::mem::replace(&mut l.up, false));
                    let Some(interval) = periodic else { continue };
                    info!(relay = %relay, next_in = ?interval, "periodic session with the parent relay over");
                    if !wait_for_session(&alarm, interval, &stop).await {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    quiet_since = tokio::time::Instant::now();
                    // Subscribed: batches may go (their acks will come back).
                    up.send_modify(|l| {
                        l.up = true;
                        l.generation += 1;
                    });
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic != ack_topic => {
                    let dev_topic = topic::strip_relay_down(&relay, &p.topic);
                    let mine =
                        dev_topic.and_then(|t| super::down::for_this_relay(&relay, t, &p.payload));
                    match dev_topic {
                        Some(_) if mine.is_some() => {
                            quiet_since = tokio::time::Instant::now();
                            if let Some(Err(e)) = mine.flatten().map(|m| own.try_send(m)) {
                                warn!(relay = %relay, error = %e, "a message for this relay itself was dropped (the parent sends an order again, a chunk is asked again)");
                            }
                        }
                        Some(dev_topic) => {
                            quiet_since = tokio::time::Instant::now();
                            super::down::keep(&*store, &relay, dev_topic, &p.payload, &wake);
                            hub.deliver(dev_topic, p.payload.to_vec())
                        }
                        None => {
                            warn!(relay = %relay, topic = %protocol::Shown(&p.topic), "the parent relay sent a topic a child does not serve; dropped")
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    match Envelope::<BatchAck>::from_cbor(&p.payload, MAX_ACK_BYTES) {
                        Ok(env) => {
                            if acks.send(env.body).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(relay = %relay, error = %e, "unreadable ack from the parent relay")
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    stats.uplink_connected.store(0, Ordering::Relaxed);
                    up.send_if_modified(|l| std::mem::replace(&mut l.up, false));
                    if !lost_logged {
                        warn!(relay = %relay, error = %e, retry_in = ?retry, "uplink to the parent relay down; the child keeps serving its devices and queues what they send");
                        lost_logged = true;
                    } else {
                        debug!(relay = %relay, error = %e, "uplink still down");
                    }
                    failed_in_row += 1;
                    if parents.len() > 1 {
                        on = (on + 1) % parents.len();
                        eventloop.mqtt_options = parents[on].1.clone();
                        info!(relay = %relay, parent = %parents[on].0, "trying the parent relay's next node");
                    }
                    if failed_in_row.is_multiple_of(parents.len()) {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(RETRY_LAST);
                    }
                }
            }
        }
    }
}

/// Between periodic sessions: waits `interval`, or less if an alarm is queued (alarms never
/// wait). `false` when the relay stops first.
async fn wait_for_session(
    alarm: &std::sync::atomic::AtomicBool,
    interval: Duration,
    stop: &CancellationToken,
) -> bool {
    let until = tokio::time::Instant::now() + interval;
    loop {
        if alarm.swap(false, Ordering::Relaxed) || tokio::time::Instant::now() >= until {
            return true;
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
