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
//! its disk.
//!
//! Presence goes beside the queue, not in it ([`tell_presence`]): on every connection the whole
//! set of devices online at the child, then what changes. A set that supersedes what was lost
//! needs no disk.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::relay::{BatchAck, ChildPresence, UplinkBatch};
use protocol::topic::{self, UpKind};
use protocol::url::BrokerUrl;
use protocol::{Envelope, RelayId};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeFilter};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::core::Core;
use crate::store::{Store, StoreError};
use crate::switch::hub::Hub;
use crate::telemetry::CoreStats;

/// How a child reaches its parent and how it batches.
#[derive(Clone)]
pub struct UplinkSettings {
    pub relay: RelayId,
    pub parent: BrokerUrl,
    pub tls: Arc<rustls::ClientConfig>,
    pub max_items: usize,
    pub max_bytes: usize,
    pub delay: Duration,
    /// A batch not acked within this is sent again.
    pub ack_timeout: Duration,
    /// Periodic parent sessions (claim 21): connect this often, exchange everything, disconnect.
    /// `None`: stay connected.
    pub periodic: Option<Duration>,
}

/// In a periodic session, what must have been quiet this long before the child says goodbye:
/// the subscription (its retained orders arrive after it) and the last order.
const SETTLE: Duration = Duration::from_secs(1);

/// Largest ack a child decodes.
const MAX_ACK_BYTES: usize = 1024 * 1024;
/// Waits between connection attempts: from the first to the last, doubling.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_LAST: Duration = Duration::from_secs(30);

/// How often a child tells its parent which of its devices came and went.
const PRESENCE_EVERY: Duration = Duration::from_millis(200);

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
    let mut opts = link::mqtt_options(
        settings.relay.as_str(),
        &settings.parent,
        None,
        settings.tls.clone(),
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    let room = settings.max_bytes + 64 * 1024;
    opts.set_max_packet_size(room, room);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let mut net = eventloop.network_options();
    // Without it a batch's ack (and so the next batch, an alarm among them) can stall ~40 ms on
    // Nagle and delayed ACK: measured in bench alarm-latency --through-child.
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    eventloop.set_network_options(net);
    let (acks_tx, acks) = mpsc::channel(16);
    let (up_tx, up) = watch::channel(Link::default());
    let (idle_tx, idle) = watch::channel(false);
    info!(relay = %settings.relay, parent = %settings.parent, "uplink to the parent relay starting");
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
    };
    let driver = tokio::spawn(driver.run(stop.clone()));
    let presence = tokio::spawn(tell_presence(
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
}

/// Tells the parent which devices are online here: the whole set each time the link comes up,
/// then the changes every [`PRESENCE_EVERY`]. Changes while the link is down are dropped: the
/// next whole set covers them.
async fn tell_presence(
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

/// Whether the uplink may send, and which connection it is on (a new number for each).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Link {
    up: bool,
    generation: u64,
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
        } = self;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quiet_since = tokio::time::Instant::now();
        let ack_topic = topic::relay_ack(&relay);
        let down_filter = topic::relay_down_filter(&relay);
        let mut retry = RETRY_FIRST;
        let mut lost_logged = false;
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
                    stats.uplink_connected.store(1, Ordering::Relaxed);
                    // This session carries whatever alarm is queued.
                    alarm.store(false, Ordering::Relaxed);
                    info!(relay = %relay, "uplink connected to the parent relay");
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
                    match topic::strip_relay_down(&relay, &p.topic) {
                        Some(dev_topic) if own_job(&relay, dev_topic) => {
                            quiet_since = tokio::time::Instant::now();
                            answer_own_job(&*store, &relay, &stats, &p.payload, &wake);
                        }
                        Some(dev_topic) => {
                            quiet_since = tokio::time::Instant::now();
                            keep(&*store, &relay, dev_topic, &p.payload, &wake);
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

/// Whether `dev_topic` is a job order for this child itself (`jobs submit --relay R1`: the job's
/// serial is the child's id).
fn own_job(relay: &RelayId, dev_topic: &str) -> bool {
    let mut levels = dev_topic.split('/');
    levels.next() == Some("dev")
        && levels.next() == Some(relay.as_str())
        && levels.next() == Some("jobs")
}

/// Runs a job the parent filed for this child itself, and queues its answer as its own device
/// would (the job's number is the message id: one answer per job, deduplicated at the parent
/// like any). A get-data job reads the child's own status: its program, version and devices;
/// any other kind fails with the reason (a child's own program is not replaced yet).
fn answer_own_job(
    store: &dyn Store,
    relay: &RelayId,
    stats: &CoreStats,
    payload: &[u8],
    wake: &Notify,
) {
    use protocol::data::{DeviceData, Section, SectionData, Value};
    use protocol::device::JobUpdate;
    use protocol::job::{JobOrder, JobSpec, JobStatus};
    if payload.is_empty() {
        return; // the job ended: its retained order was emptied
    }
    let Ok(order) = Envelope::<JobOrder>::from_cbor(payload, 1 << 20).map(|e| e.body) else {
        warn!(relay = %relay, "unreadable job order for this relay itself; ignored");
        return;
    };
    let Some(n) = crate::store::job_number(order.job.as_str()) else {
        return;
    };
    let get = |c: &std::sync::atomic::AtomicU64| {
        Value::Int(i64::try_from(c.load(Ordering::Relaxed)).unwrap_or(i64::MAX))
    };
    let update = match &order.spec {
        JobSpec::GetData { .. } => {
            let identification = SectionData::from([
                ("model".to_owned(), Value::Text("chukei child relay".into())),
                ("firmware".to_owned(), Value::Text(env!("CARGO_PKG_VERSION").into())),
                ("relay".to_owned(), Value::Text(relay.to_string())),
            ]);
            let comms = SectionData::from([
                ("devices_online".to_owned(), get(&stats.devices_online)),
                ("uplink_waiting".to_owned(), get(&stats.uplink_waiting)),
                ("uplink_acked".to_owned(), get(&stats.uplink_acked)),
            ]);
            JobUpdate {
                job: order.job.clone(),
                status: JobStatus::Succeeded,
                note: Some("the child relay's own status".into()),
                data: Some(DeviceData::from([
                    (Section::Identification, identification),
                    (Section::Comms, comms),
                ])),
                errors: Default::default(),
            }
        }
        _ => JobUpdate {
            job: order.job.clone(),
            status: JobStatus::Failed,
            note: Some(
                "a child relay runs get-data for itself; replacing its own program is not supported yet"
                    .into(),
            ),
            data: None,
            errors: Default::default(),
        },
    };
    let queued = Envelope::new(n, chrono::Utc::now(), update)
        .to_cbor()
        .map_err(|e| StoreError::Encode {
            table: "uplink",
            key: order.job.to_string(),
            reason: e.to_string(),
        })
        .and_then(|bytes| {
            let mut txn = store.begin()?;
            txn.push_uplink(&order.serial, UpKind::Job.as_str(), &bytes)?;
            txn.commit()
        });
    match queued {
        Ok(_) => {
            info!(relay = %relay, job = %order.job, "answered a job for this relay itself");
            wake.notify_one();
        }
        Err(e) => {
            warn!(relay = %relay, job = %order.job, error = %e, "could not queue the answer to a job for this relay; the parent resends the order on the next connection")
        }
    }
}

/// Keeps an order or merged data the parent sent a device on this child's disk, and tells the
/// parent (through the queue) that a new job order is here: the job is `forwarded` (Fig. 8,
/// S508). Failing to keep it is logged; the device gets it anyway.
fn keep(store: &dyn Store, relay: &RelayId, dev_topic: &str, payload: &[u8], wake: &Notify) {
    let mut levels = dev_topic.split('/');
    let (Some("dev"), Some(serial), Some(kind)) = (levels.next(), levels.next(), levels.next())
    else {
        return;
    };
    if !matches!(kind, "jobs" | "merged") {
        return;
    }
    let job = levels.next().unwrap_or_default();
    let kept = store.begin().and_then(|mut txn| {
        if payload.is_empty() {
            txn.remove_mirrored(dev_topic)?;
        } else if txn.put_mirrored(dev_topic, payload)?
            && kind == "jobs"
            && let Ok(serial) = protocol::Serial::parse(serial)
        {
            txn.push_uplink(&serial, crate::core::relay::FORWARDED, job.as_bytes())?;
        }
        txn.commit()
    });
    match kept {
        Ok(_) => wake.notify_one(),
        Err(e) => {
            warn!(relay = %relay, topic = %protocol::Shown(dev_topic), error = %e, "could not keep an order from the parent relay on disk")
        }
    }
}

struct Forwarder {
    settings: UplinkSettings,
    store: Arc<dyn Store>,
    stats: Arc<CoreStats>,
    client: AsyncClient,
    /// Whether it has nothing to send and nothing in flight (a periodic session may end).
    idle: watch::Sender<bool>,
}

/// What the forwarder waits for next.
enum Woken {
    Stop,
    Ack(BatchAck),
    /// The connection was made again: what was in flight is sent again.
    Reconnected,
    TimedOut,
}

impl Forwarder {
    async fn run(
        self,
        mut acks: mpsc::Receiver<BatchAck>,
        mut up: watch::Receiver<Link>,
        wake: Arc<Notify>,
        stop: CancellationToken,
    ) {
        loop {
            // Connected and subscribed before anything is sent.
            let link = *up.borrow_and_update();
            if !link.up {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = up.changed() => if r.is_err() { return },
                }
                continue;
            }
            let Some(batch) = self.next_batch(&wake, &stop).await else {
                return;
            };
            let Some(last) = batch.items.last().map(|i| i.seq) else {
                continue;
            };
            let first = batch.items[0].seq;
            let count = batch.items.len();
            let payload = match Envelope::new(first, chrono::Utc::now(), batch).to_cbor() {
                Ok(p) => p,
                Err(e) => {
                    error!(relay = %self.settings.relay, error = %e, "could not encode a batch for the parent relay");
                    return;
                }
            };
            let topic = topic::relay_up(&self.settings.relay);
            if let Err(e) = self
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
            {
                warn!(relay = %self.settings.relay, error = %e, "could not queue a batch for the parent relay");
                return;
            }
            debug!(relay = %self.settings.relay, first, last, count, "batch sent to the parent relay");
            let deadline = tokio::time::Instant::now() + self.settings.ack_timeout;
            loop {
                let woken = tokio::select! {
                    _ = stop.cancelled() => Woken::Stop,
                    ack = acks.recv() => ack.map_or(Woken::Stop, Woken::Ack),
                    r = up.changed() => match r {
                        Err(_) => Woken::Stop,
                        // Down, or up again on a new connection: sent again from the head once up.
                        Ok(()) if *up.borrow() != link => Woken::Reconnected,
                        Ok(()) => continue,
                    },
                    _ = tokio::time::sleep_until(deadline) => Woken::TimedOut,
                };
                match woken {
                    Woken::Stop => return,
                    Woken::Ack(ack) => {
                        let done = ack.upto >= last;
                        if !self.acked(ack, &stop).await {
                            return;
                        }
                        if done {
                            break;
                        }
                    }
                    Woken::Reconnected => break,
                    Woken::TimedOut => {
                        warn!(relay = %self.settings.relay, first, last, timeout = ?self.settings.ack_timeout, "the parent relay did not ack a batch in time; sending it again");
                        break;
                    }
                }
            }
        }
    }

    /// The next batch from the head of the queue, once it is full, holds an alarm, or has
    /// waited `delay`; `None` when the uplink stops.
    async fn next_batch(&self, wake: &Notify, stop: &CancellationToken) -> Option<UplinkBatch> {
        let mut deadline = None;
        loop {
            let items = match self.read_head() {
                Ok(items) => items,
                Err(e) => {
                    warn!(relay = %self.settings.relay, error = %e, "could not read the queue for the parent relay; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            let now = tokio::time::Instant::now();
            self.idle
                .send_if_modified(|i| std::mem::replace(i, items.is_empty()) != items.is_empty());
            if !items.is_empty() {
                let full = items.len() >= self.settings.max_items
                    || items.iter().map(|i| i.payload.len()).sum::<usize>() * 10
                        >= self.settings.max_bytes * 9;
                let alarm = items.iter().any(|i| i.up_kind() == Some(UpKind::Alarm));
                let due = *deadline.get_or_insert(now + self.settings.delay);
                if full || alarm || now >= due {
                    return Some(UplinkBatch { items });
                }
            }
            let until = deadline.unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = wake.notified() => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    fn read_head(&self) -> Result<Vec<protocol::relay::UplinkItem>, StoreError> {
        let txn = self.store.begin()?;
        let items = txn.uplink_after(0, self.settings.max_items, self.settings.max_bytes)?;
        let waiting = txn.uplink_count()?;
        self.stats.uplink_waiting.store(waiting, Ordering::Relaxed);
        Ok(items)
    }

    /// Forgets what the parent committed; `false` when the uplink stops first.
    async fn acked(&self, ack: BatchAck, stop: &CancellationToken) -> bool {
        for r in &ack.refused {
            warn!(relay = %self.settings.relay, serial = %r.serial, seq = r.seq, reason = %r.reason, "the parent relay refused a forwarded message; dropped");
        }
        loop {
            let removed = self.store.begin().and_then(|mut txn| {
                let n = txn.remove_uplink_upto(ack.upto)?;
                txn.commit()?;
                Ok(n)
            });
            match removed {
                Ok(n) => {
                    self.stats.uplink_acked.fetch_add(n, Ordering::Relaxed);
                    debug!(relay = %self.settings.relay, upto = ack.upto, removed = n, "parent relay acked");
                    return true;
                }
                Err(e) => {
                    warn!(relay = %self.settings.relay, error = %e, "could not forget what the parent acked; trying again (a resend would be a duplicate there)");
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}
