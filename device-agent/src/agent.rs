//! One device's session with the relay (Fig. 2 from the device's side).
//!
//! Three tasks per device:
//! - the **link** owns rumqttc's `EventLoop`: it polls it, reconnects with backoff when the
//!   connection drops (rumqttc's `poll` returns the error; retrying is ours) and forwards what
//!   matters to the session. The event loop is polled by nothing else, so no `select!` ever
//!   cancels it halfway through a packet;
//! - the **session** reacts: on every CONNACK it subscribes to the device's jobs and acks,
//!   announces the device's state and resends everything pending; it hands job orders to the
//!   worker, publishes what the outbox commits, drops what the relay acks and resends the rest with
//!   backoff;
//! - the **worker** ([`crate::worker`]) runs the jobs, one at a time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use protocol::device::{AckBatch, AckOutcome, DeviceState};
use protocol::job::JobOrder;
use protocol::topic::{self, Topic, UpKind};
use protocol::url::BrokerUrl;
use protocol::{Envelope, MsgId, Serial};
use rand::Rng;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS, SubAck,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::SessionSettings;
use crate::device::{self, SharedDevice};
use crate::outbox::{Outbox, OutboxError, Pending};
use crate::report::Reporter;
use crate::worker::{Worker, WorkerMsg};

/// Requests the session may queue in rumqttc's channel before it has to wait for the link.
const REQUEST_CAPACITY: usize = 64;
/// QoS 1 publishes in flight per connection. rumqttc preallocates a slot per possible packet, so
/// this also sets memory per device; resends cover anything held back.
const INFLIGHT: u16 = 32;
/// How soon the session tries again when rumqttc's request channel was full.
const FLUSH_RETRY: Duration = Duration::from_millis(20);
/// How long a clean DISCONNECT may take at shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

/// Everything one device needs to run.
pub struct DeviceAgent {
    pub serial: Serial,
    /// The installation site announced with the device's state.
    pub site: String,
    pub broker: BrokerUrl,
    pub tls: Arc<rustls::ClientConfig>,
    pub device: SharedDevice,
    pub outbox: Outbox,
    pub settings: SessionSettings,
}

/// Runs one device until `stop`. Sends its serial on `ready` once, when its first session is
/// connected and subscribed. Fails only if its pending messages cannot be read at startup.
pub async fn run_device(
    agent: DeviceAgent,
    stop: CancellationToken,
    ready: Option<mpsc::UnboundedSender<Serial>>,
) -> Result<(), OutboxError> {
    let DeviceAgent {
        serial,
        site,
        broker,
        tls,
        device,
        outbox,
        settings,
    } = agent;
    // Reloaded from disk: what the last run sent but never saw acked goes out on the first connect.
    let reloaded = outbox.pending(&serial).await?;
    if !reloaded.is_empty() {
        info!(serial = %serial, count = reloaded.len(), "pending messages reloaded from the outbox");
    }

    let (client, eventloop) = mqtt_client(&serial, &broker, tls, &settings);
    let (link_tx, link_rx) = mpsc::channel(64);
    let (fresh_tx, fresh_rx) = mpsc::unbounded_channel();
    let (worker_tx, worker_rx) = mpsc::unbounded_channel();
    let report = Reporter::new(serial.clone(), outbox.clone(), fresh_tx);

    let link = tokio::spawn(drive_link(
        eventloop,
        client.clone(),
        link_tx,
        serial.clone(),
        broker.clone(),
        settings.clone(),
        stop.clone(),
    ));
    let worker = tokio::spawn(
        Worker::new(
            device.clone(),
            report.clone(),
            outbox.clone(),
            worker_rx,
            stop.clone(),
        )
        .run(),
    );

    let mut session = Session {
        serial,
        site,
        broker,
        device,
        outbox,
        report,
        settings,
        client,
        link: link_rx,
        fresh: fresh_rx,
        worker: worker_tx,
        ready,
        pending: BTreeMap::new(),
        queue: VecDeque::new(),
        connected: false,
        state_sent: None,
    };
    for p in reloaded {
        session.add(p);
    }
    session.run(&stop).await;
    drop(session);
    let _ = link.await;
    let _ = worker.await;
    Ok(())
}

fn mqtt_client(
    serial: &Serial,
    broker: &BrokerUrl,
    tls: Arc<rustls::ClientConfig>,
    settings: &SessionSettings,
) -> (AsyncClient, EventLoop) {
    // MQTT 3.1.1, client id = serial (the relay checks it against the certificate), clean
    // session: the outbox, not a broker-side session, is what we rely on (DESIGN D1).
    let mut opts = MqttOptions::new(serial.as_str(), broker.host.clone(), broker.port);
    opts.set_keep_alive(settings.keepalive)
        .set_clean_session(true)
        .set_max_packet_size(settings.max_packet_bytes, settings.max_packet_bytes)
        .set_inflight(INFLIGHT)
        .set_request_channel_capacity(REQUEST_CAPACITY)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let mut net = eventloop.network_options();
    net.set_connection_timeout(settings.connect_timeout.as_secs().max(1));
    // Without it a lone small publish can stall ~40 ms on Nagle and delayed ACK.
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// What the link tells the session.
#[derive(Debug)]
enum LinkEvent {
    Connected,
    Disconnected,
    SubAck(SubAck),
    Publish(Publish),
}

/// `base` scaled by a random factor in [0.5, 1.5), so a fleet that lost the relay together does
/// not come back in lockstep.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
}

/// Polls the event loop until `stop`, reconnecting with backoff: reconnect_min doubling to
/// reconnect_max, jittered.
async fn drive_link(
    mut eventloop: EventLoop,
    client: AsyncClient,
    events: mpsc::Sender<LinkEvent>,
    serial: Serial,
    broker: BrokerUrl,
    settings: SessionSettings,
    stop: CancellationToken,
) {
    let mut backoff = settings.reconnect_min;
    let mut failures: u32 = 0;
    let mut connected = false;
    loop {
        let polled = tokio::select! {
            () = stop.cancelled() => break,
            polled = eventloop.poll() => polled,
        };
        let event = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff = settings.reconnect_min;
                failures = 0;
                LinkEvent::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => LinkEvent::Publish(p),
            Ok(Event::Incoming(Packet::SubAck(s))) => LinkEvent::SubAck(s),
            Ok(_) => continue,
            Err(e) => {
                failures += 1;
                let delay = jittered(backoff).min(settings.reconnect_max);
                if connected {
                    warn!(serial = %serial, error = %e, "connection to broker lost; reconnecting");
                } else if failures == 1 || failures.is_multiple_of(10) {
                    // A fleet of thousands facing a relay that is down would otherwise log
                    // thousands of lines a minute.
                    warn!(serial = %serial, broker = %broker, error = %e, attempts = failures, "could not connect to broker; retrying");
                } else {
                    debug!(serial = %serial, error = %e, attempts = failures, "could not connect to broker; retrying");
                }
                if connected {
                    connected = false;
                    if events.send(LinkEvent::Disconnected).await.is_err() {
                        break;
                    }
                }
                backoff = (backoff * 2).min(settings.reconnect_max);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = sleep(delay) => continue,
                }
            }
        };
        if events.send(event).await.is_err() {
            break;
        }
    }
    if connected {
        // Polite, not essential: the relay would notice the closed socket anyway.
        let _ = client.try_disconnect();
        let _ = timeout(DISCONNECT_GRACE, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        info!(serial = %serial, "disconnected from broker");
    }
}

/// A message the relay has not acked yet.
struct Inflight {
    msg: Pending,
    next_try: Instant,
    backoff: Duration,
    /// Already waiting in `queue`, so a resend does not queue it twice.
    queued: bool,
}

struct Session {
    serial: Serial,
    site: String,
    broker: BrokerUrl,
    device: SharedDevice,
    outbox: Outbox,
    report: Reporter,
    settings: SessionSettings,
    client: AsyncClient,
    link: mpsc::Receiver<LinkEvent>,
    /// Messages the outbox just committed, from the worker and from this session.
    fresh: mpsc::UnboundedReceiver<Pending>,
    worker: mpsc::UnboundedSender<WorkerMsg>,
    ready: Option<mpsc::UnboundedSender<Serial>>,
    pending: BTreeMap<MsgId, Inflight>,
    /// Ids to publish as soon as rumqttc's request channel has room.
    queue: VecDeque<MsgId>,
    connected: bool,
    /// The last state announced, while it is unacked: a reconnect does not pile up copies.
    state_sent: Option<(MsgId, DeviceState)>,
}

impl Session {
    async fn run(&mut self, stop: &CancellationToken) {
        loop {
            self.flush();
            let wake = self.next_wake();
            tokio::select! {
                () = stop.cancelled() => return,
                event = self.link.recv() => match event {
                    Some(event) => self.on_link(event).await,
                    None => return,
                },
                Some(p) = self.fresh.recv() => self.add(p),
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => self.resend_due(),
            }
        }
    }

    async fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected => self.on_connected().await,
            LinkEvent::Disconnected => {
                self.connected = false;
                self.queue.clear();
                for m in self.pending.values_mut() {
                    m.queued = false;
                }
            }
            LinkEvent::SubAck(ack) => self.on_suback(&ack),
            LinkEvent::Publish(p) => self.on_publish(p).await,
        }
    }

    async fn on_connected(&mut self) {
        self.connected = true;
        info!(serial = %self.serial, broker = %self.broker, pending = self.pending.len(), "connected to broker");
        // Subscribe first: requests leave in order, so the subscriptions are in place before the
        // relay can ack anything we send next.
        let filters = [
            SubscribeFilter::new(topic::dev_jobs_filter(&self.serial), QoS::AtLeastOnce),
            SubscribeFilter::new(topic::dev_ack(&self.serial), QoS::AtLeastOnce),
        ];
        if let Err(e) = self.client.try_subscribe_many(filters) {
            // Only a full request channel can cause this, and a fresh connection has an empty one.
            error!(serial = %self.serial, error = %e, "could not subscribe");
        }
        // Everything pending goes out at once, each with its backoff reset.
        let now = Instant::now();
        self.queue.clear();
        for (id, m) in &mut self.pending {
            m.backoff = self.settings.resend_min;
            m.next_try = now + m.backoff;
            m.queued = true;
            self.queue.push_back(*id);
        }
        self.announce_state().await;
    }

    /// Tells the relay the device's site, model and firmware.
    async fn announce_state(&mut self) {
        let mut state = device::state_of(&self.device).await;
        state.site = self.site.clone();
        if let Some((id, sent)) = &self.state_sent
            && self.pending.contains_key(id)
            && *sent == state
        {
            return; // the same announcement is still pending and was just queued again
        }
        match self.report.send(UpKind::State, state.clone(), None).await {
            Ok(id) => self.state_sent = Some((id, state)),
            Err(e) => error!(serial = %self.serial, error = %e, "could not store the device state"),
        }
    }

    fn on_suback(&mut self, ack: &SubAck) {
        if ack
            .return_codes
            .iter()
            .any(|c| matches!(c, SubscribeReasonCode::Failure))
        {
            error!(
                serial = %self.serial,
                "broker refused our subscriptions; check that the certificate's CN is this serial"
            );
            return;
        }
        if let Some(ready) = self.ready.take() {
            info!(serial = %self.serial, "subscribed; ready for jobs");
            let _ = ready.send(self.serial.clone());
        }
    }

    async fn on_publish(&mut self, p: Publish) {
        match Topic::parse(&p.topic) {
            Ok(Topic::DevAck { serial }) if serial == self.serial => self.on_acks(&p).await,
            Ok(Topic::DevJob { serial, job }) if serial == self.serial => {
                if p.payload.is_empty() {
                    // The relay emptied the retained order: the job ended there.
                    debug!(serial = %self.serial, job = %job, "job cleared by broker");
                    let _ = self.worker.send(WorkerMsg::Ended(job));
                    return;
                }
                match Envelope::<JobOrder>::from_cbor(&p.payload, self.settings.max_packet_bytes) {
                    Ok(env) => {
                        let _ = self.worker.send(WorkerMsg::Order {
                            order: env.body,
                            in_topic: job,
                        });
                    }
                    Err(e) => {
                        warn!(serial = %self.serial, topic = %p.topic, error = %e, "malformed job order ignored");
                    }
                }
            }
            _ => debug!(serial = %self.serial, topic = %p.topic, "unexpected message ignored"),
        }
    }

    async fn on_acks(&mut self, p: &Publish) {
        let batch = match Envelope::<AckBatch>::from_cbor(
            &p.payload,
            self.settings.max_packet_bytes,
        ) {
            Ok(env) => env.body,
            Err(e) => {
                warn!(serial = %self.serial, topic = %p.topic, error = %e, "malformed ack ignored");
                return;
            }
        };
        let mut done = Vec::with_capacity(batch.acks.len());
        for ack in batch.acks {
            let outcome = match &ack.outcome {
                AckOutcome::Stored => "stored",
                AckOutcome::Duplicate => "duplicate",
                AckOutcome::Rejected { reason } => {
                    warn!(serial = %self.serial, msg_id = ack.id, reason = %reason, "broker rejected message");
                    "rejected"
                }
            };
            info!(serial = %self.serial, msg_id = ack.id, outcome = %outcome, "ack received");
            self.pending.remove(&ack.id);
            done.push(ack.id);
        }
        if let Err(e) = self.outbox.ack(&self.serial, done).await {
            // They stay on disk and are resent after a restart; the relay will answer duplicate.
            warn!(serial = %self.serial, error = %e, "could not remove acked messages from the outbox");
        }
    }

    /// A message the outbox committed: publish it now if we can.
    fn add(&mut self, msg: Pending) {
        let id = msg.id;
        let backoff = self.settings.resend_min;
        let queued = self.connected;
        self.pending.insert(
            id,
            Inflight {
                msg,
                next_try: Instant::now() + backoff,
                backoff,
                queued,
            },
        );
        if queued {
            self.queue.push_back(id);
        }
    }

    /// Queues every unacked message whose time has come, and doubles its wait.
    fn resend_due(&mut self) {
        if !self.connected {
            return;
        }
        let now = Instant::now();
        for (id, m) in &mut self.pending {
            if m.next_try <= now && !m.queued {
                m.backoff = (m.backoff * 2).min(self.settings.resend_max);
                m.next_try = now + m.backoff;
                m.queued = true;
                self.queue.push_back(*id);
                debug!(serial = %self.serial, msg_id = *id, "resending unacked message");
            }
        }
    }

    /// Publishes queued messages until rumqttc's request channel is full.
    fn flush(&mut self) {
        if !self.connected {
            return;
        }
        while let Some(&id) = self.queue.front() {
            let Some(m) = self.pending.get_mut(&id) else {
                self.queue.pop_front(); // acked meanwhile
                continue;
            };
            match self.client.try_publish(
                m.msg.topic.clone(),
                QoS::AtLeastOnce,
                false,
                m.msg.payload.clone(),
            ) {
                Ok(()) => {
                    m.queued = false;
                    self.queue.pop_front();
                }
                Err(_) => break, // full: the link drains it; try again shortly
            }
        }
    }

    /// When the session must act without an event: to retry a full channel or to resend.
    fn next_wake(&self) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        if !self.queue.is_empty() {
            return Some(Instant::now() + FLUSH_RETRY);
        }
        self.pending
            .values()
            .filter(|m| !m.queued)
            .map(|m| m.next_try)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d < Duration::from_secs(3),
                "{d:?}"
            );
        }
    }
}
