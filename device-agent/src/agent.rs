//! One device's session with the relay (Fig. 2 from the device's side).
//!
//! Three tasks per device:
//! - the **link** owns rumqttc's `EventLoop`: it polls it, reconnects with backoff when the
//!   connection drops (rumqttc's `poll` returns the error; retrying is ours) and forwards what
//!   matters to the session. It connects only while the session *wants* a connection; told to go
//!   offline it lets the session's DISCONNECT out, drops the socket and parks. While connected
//!   it is never cancelled halfway through a poll, so no packet is ever torn;
//! - the **session** reacts: on every CONNACK it subscribes to the device's jobs, acks, merged
//!   data and firmware chunks, announces the device's state and resends everything pending; it
//!   hands job orders to the worker and what a job asked for to its inbox, publishes what the
//!   outbox commits, drops what the relay acks and resends the rest with backoff. It decides
//!   when to be connected: always in a **persistent** session; in a **periodic** one only for a
//!   check-in (interval, calendar, power-on, operator action, condition) that lasts until the
//!   jobs are run and the outbox is empty — and never while a firmware write has **suspended**
//!   relay access (claims 5, 12);
//! - the **worker** ([`crate::worker`]) runs the jobs, one at a time.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use protocol::artifact::Chunk;
use protocol::device::{AckBatch, AckOutcome, DeviceState, JobUpdate, Merged};
use protocol::job::JobOrder;
use protocol::presence::StateReport;
use protocol::schedule::{Moment, Schedule};
use protocol::topic::{self, Topic, UpKind};
use protocol::{Envelope, JobId, MsgId, Serial};
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, Publish, QoS, SubAck, SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::checkin::{self, Planner, Reason};
use crate::config::SessionSettings;
use crate::device::{self, SharedDevice};
use crate::failover::{self, NO_TARGET, Relays};
use crate::faults::{self, MonitorSettings};
use crate::jobs::set_schedule::describe;
use crate::jobs::{JobEnv, PublisherKey};
use crate::outbox::{Outbox, OutboxError, Pending};
use crate::relay::{self, Control, Incoming, SessionEnds};
use crate::report::Reporter;
use crate::transport::Endpoint;
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
/// How many recent ack outcomes the session remembers.
const RECENT_ACKS: usize = 64;
/// How often counters are read when a schedule has a count condition.
const CONDITION_POLL: Duration = Duration::from_secs(5);

/// Everything one device needs to run.
pub struct DeviceAgent {
    pub serial: Serial,
    /// The installation site announced with the device's state.
    pub site: String,
    /// The relays in order of preference (claims 16–17), each with its way there (direct or
    /// through a proxy, TLS or WebSocket): see [`crate::failover`].
    pub relays: Vec<Endpoint>,
    pub tls: Arc<rustls::ClientConfig>,
    pub device: SharedDevice,
    pub outbox: Outbox,
    pub settings: SessionSettings,
    /// The device's own directory: firmware downloads (and the simulated copier's files).
    pub home: PathBuf,
    /// The schedule from flags and config; one set by a set-schedule job (stored) wins over it.
    pub schedule: Schedule,
    /// The key firmware must be signed with; `None` refuses every firmware job.
    pub publisher: Option<PublisherKey>,
    /// Counts operator actions (SIGUSR1), which make a periodic device check in.
    pub operator: Option<watch::Receiver<u64>>,
    /// Fault handling (Fig. 5) and periodic meter reads, beside the session.
    pub monitor: MonitorSettings,
}

/// Runs one device until `stop`. Sends its serial on `ready` once, when its first session is
/// connected and subscribed. Fails only if its store cannot be read at startup.
pub async fn run_device(
    agent: DeviceAgent,
    stop: CancellationToken,
    ready: Option<mpsc::UnboundedSender<Serial>>,
) -> Result<(), OutboxError> {
    let DeviceAgent {
        serial,
        site,
        relays,
        tls,
        device,
        outbox,
        settings,
        home,
        schedule,
        publisher,
        operator,
        monitor,
    } = agent;
    let relays = Relays::new(relays);
    let store = outbox.store();
    // Reloaded from disk: what the last run sent but never saw acked goes out on the first connect.
    let reloaded = outbox.pending(&serial).await?;
    if !reloaded.is_empty() {
        info!(serial = %serial, count = reloaded.len(), "pending messages reloaded from the outbox");
    }
    // A firmware write cut off by a power cut is concluded before the device reconnects.
    let intent = store.write_intent(&serial).await?;
    let schedule = match store.schedule(&serial).await? {
        Some(stored) => {
            info!(serial = %serial, job = %stored.job, schedule = %describe(&stored.schedule), "schedule in effect, as set by a job");
            stored.schedule
        }
        None => schedule,
    };

    let (client, eventloop) = mqtt_client(&serial, relays.current(), tls.clone(), &settings);
    let (idle_tx, idle_rx) = watch::channel(true);
    let suspended = intent.is_some();
    let (want_tx, want_rx) = watch::channel(!suspended);
    let (link_tx, link_rx) = mpsc::channel(64);
    let (fresh_tx, fresh_rx) = mpsc::unbounded_channel();
    let (worker_tx, worker_rx) = mpsc::unbounded_channel();
    let (relay, ends) = relay::pair();
    let (inbox_tx, inbox) = relay::inbox();
    let (busy_tx, busy_rx) = watch::channel(0usize);
    let report = Reporter::new(serial.clone(), outbox.clone(), fresh_tx);
    let faults = tokio::spawn(
        faults::Monitor {
            serial: serial.clone(),
            report: report.clone(),
            relay: relay.clone(),
            device: device.clone(),
            settings: monitor.faults,
        }
        .run(stop.clone()),
    );
    let meter = monitor.counters_every.map(|every| {
        tokio::spawn(crate::meter::run(
            device.clone(),
            report.clone(),
            every,
            stop.clone(),
        ))
    });

    let link = tokio::spawn(drive_link(
        eventloop,
        client.clone(),
        link_tx,
        want_rx,
        serial.clone(),
        Route {
            relays,
            tls,
            idle: idle_rx,
        },
        settings.clone(),
        stop.clone(),
    ));
    let env = JobEnv {
        device: device.clone(),
        report: report.clone(),
        relay,
        store,
        outbox: outbox.clone(),
        home,
        publisher,
        fetch_timeout: settings.fetch_timeout,
        stop: stop.clone(),
    };
    let worker = tokio::spawn(Worker::new(env, inbox, worker_rx, busy_tx, intent).run());

    let planner = Planner::new(schedule, Instant::now(), chrono::Utc::now());
    let mut session = Session {
        serial,
        site,
        relay: None,
        device,
        outbox,
        report,
        settings,
        client,
        link: link_rx,
        fresh: fresh_rx,
        worker: worker_tx,
        inbox: inbox_tx,
        ends,
        want: want_tx,
        idle: idle_tx,
        busy: busy_rx,
        operator,
        ready,
        pending: BTreeMap::new(),
        queue: VecDeque::new(),
        loose: VecDeque::new(),
        connected: false,
        subscribed_at: None,
        disconnect_requested: false,
        state_sent: None,
        suspended,
        parked: false,
        suspend_waiters: Vec::new(),
        ack_waiters: Vec::new(),
        recent_acks: VecDeque::new(),
        origins: HashMap::new(),
        planner,
        checkin: None,
        last_activity: Instant::now(),
        next_condition_poll: None,
    };
    for p in reloaded {
        session.add(p);
    }
    if session.planner.is_periodic() {
        // Power-on: a periodic device checks in once when it starts, whatever its moments say,
        // so it announces itself (and sends what a recovery committed) without waiting a period.
        session.begin_checkin(Reason::PowerOn);
    }
    session.run(&stop).await;
    drop(session);
    // They only wait on timers and requests: nothing is lost by ending them here.
    faults.abort();
    if let Some(meter) = meter {
        meter.abort();
    }
    let _ = link.await;
    let _ = worker.await;
    Ok(())
}

fn mqtt_client(
    serial: &Serial,
    relay: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    settings: &SessionSettings,
) -> (AsyncClient, EventLoop) {
    let opts = mqtt_options(serial, relay, tls, settings);
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let mut net = eventloop.network_options();
    net.set_connection_timeout(settings.connect_timeout.as_secs().max(1));
    // Without it a lone small publish can stall ~40 ms on Nagle and delayed ACK.
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// rumqttc's options for one relay; rebuilt when the link moves to another.
fn mqtt_options(
    serial: &Serial,
    relay: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    settings: &SessionSettings,
) -> MqttOptions {
    // MQTT 3.1.1, client id = serial (the relay checks it against the certificate), clean session:
    // the outbox, not a broker-side session, is what we rely on (docs/decisions.md, D2, D3).
    let mut opts = relay.mqtt_options(serial.as_str(), tls);
    opts.set_keep_alive(settings.keepalive)
        .set_clean_session(true)
        .set_max_packet_size(settings.max_packet_bytes, settings.max_packet_bytes)
        .set_inflight(INFLIGHT)
        .set_request_channel_capacity(REQUEST_CAPACITY);
    opts
}

/// Where the link connects, and what it needs to move between relays.
struct Route {
    relays: Relays,
    tls: Arc<rustls::ClientConfig>,
    /// The session is idle (no job, nothing unacked): a return to a preferred relay may start.
    idle: watch::Receiver<bool>,
}

/// What the link tells the session.
#[derive(Debug)]
enum LinkEvent {
    /// Connected to this relay.
    Connected(Endpoint),
    Disconnected,
    /// Offline on purpose and not trying to connect.
    Parked,
    SubAck(SubAck),
    Publish(Publish),
}

/// What a CONNACK refusal from a chukei relay asks of whoever runs this device; `None` for a
/// failure that is not a refusal. The relay sends "server unavailable" for load (it is full, or
/// this serial already holds its sessions: a second agent running with the same certificate),
/// and "not authorized" for a client id that is not the certificate's serial.
fn refusal_hint(e: &ConnectionError) -> Option<&'static str> {
    let ConnectionError::ConnectionRefused(code) = e else {
        return None;
    };
    Some(match code {
        ConnectReturnCode::ServiceUnavailable => {
            "the relay is full (max_clients) or this serial already holds \
             max_connections_per_identity sessions: stop any other agent running with this \
             certificate; the agent keeps retrying, and the relay's log says which"
        }
        ConnectReturnCode::NotAuthorized => {
            "the relay refused this serial for the certificate: the serial must be the \
             certificate's CN (`broker pki issue --role device --id SERIAL`)"
        }
        ConnectReturnCode::Success
        | ConnectReturnCode::RefusedProtocolVersion
        | ConnectReturnCode::BadClientId
        | ConnectReturnCode::BadUserNamePassword => {
            "a chukei relay never answers this; check that --broker is the chukei relay's address"
        }
    })
}

/// `base` scaled by a random factor in [0.5, 1.5), so a fleet that lost the relay together does
/// not come back in lockstep.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
}

/// Polls the event loop until `stop`, while `want` says so, reconnecting with backoff:
/// reconnect_min doubling to reconnect_max, jittered. With several relays, a failed attempt
/// moves to the next one at once and the backoff applies only after every relay has failed;
/// a lost connection starts over from the preferred relay; and while connected to a fallback
/// relay a [`failover::failback`] task probes the preferred ones (see [`crate::failover`]).
#[allow(clippy::too_many_arguments)]
async fn drive_link(
    mut eventloop: EventLoop,
    client: AsyncClient,
    events: mpsc::Sender<LinkEvent>,
    mut want: watch::Receiver<bool>,
    serial: Serial,
    route: Route,
    settings: SessionSettings,
    stop: CancellationToken,
) {
    let Route {
        mut relays,
        tls,
        idle,
    } = route;
    // Points rumqttc at the relay `relays` names now; used by the next connection attempt.
    let aim = |eventloop: &mut EventLoop, relays: &Relays| {
        eventloop.mqtt_options = mqtt_options(&serial, relays.current(), tls.clone(), &settings);
    };
    // The preferred relay a failback task found again, to connect to after its DISCONNECT.
    let target = Arc::new(AtomicUsize::new(NO_TARGET));
    let mut failback: Option<tokio::task::JoinHandle<()>> = None;
    let stop_failback = |failback: &mut Option<tokio::task::JoinHandle<()>>| {
        if let Some(task) = failback.take() {
            task.abort();
        }
    };
    let mut backoff = settings.reconnect_min;
    let mut failures: u32 = 0;
    let mut connected = false;
    loop {
        if !connected && !*want.borrow_and_update() {
            if events.send(LinkEvent::Parked).await.is_err() {
                break;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                r = want.wait_for(|w| *w) => if r.is_err() { break },
            }
            backoff = settings.reconnect_min;
            failures = 0;
            // Every check-in starts with the preferred relay.
            if relays.rank() != 0 {
                relays.restart();
                aim(&mut eventloop, &relays);
            }
            continue;
        }
        let polled = if connected {
            // Never cancelled while connected: the session closes the connection with a
            // DISCONNECT, which comes back here as an outgoing event.
            tokio::select! {
                () = stop.cancelled() => break,
                polled = eventloop.poll() => polled,
            }
        } else {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = want.changed() => continue,
                polled = eventloop.poll() => polled,
            }
        };
        let event = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff = settings.reconnect_min;
                failures = 0;
                if relays.rank() > 0 && !settings.failback.is_zero() {
                    target.store(NO_TARGET, Ordering::SeqCst);
                    failback = Some(tokio::spawn(failover::failback(
                        serial.clone(),
                        relays.preferred().to_vec(),
                        relays.rank(),
                        tls.clone(),
                        client.clone(),
                        idle.clone(),
                        target.clone(),
                        settings.failback,
                        settings.connect_timeout,
                    )));
                }
                LinkEvent::Connected(relays.current().clone())
            }
            Ok(Event::Incoming(Packet::Publish(p))) => LinkEvent::Publish(p),
            Ok(Event::Incoming(Packet::SubAck(s))) => LinkEvent::SubAck(s),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                // The session (or a failback) closed the connection on purpose: drop the socket
                // now rather than wait for the relay to close it.
                eventloop.clean();
                connected = false;
                stop_failback(&mut failback);
                info!(serial = %serial, relay = %relays.current(), "disconnected from broker");
                let back = target.swap(NO_TARGET, Ordering::SeqCst);
                if back != NO_TARGET {
                    relays.switch_to(back);
                    aim(&mut eventloop, &relays);
                }
                LinkEvent::Disconnected
            }
            Ok(_) => continue,
            Err(e) => {
                failures += 1;
                stop_failback(&mut failback);
                // A return the connection did not live to make is void.
                target.store(NO_TARGET, Ordering::SeqCst);
                let failed = relays.current().clone();
                if connected {
                    warn!(serial = %serial, relay = %failed, error = %e, "connection to broker lost; reconnecting");
                } else if failures == 1 || failures.is_multiple_of(10) {
                    // A fleet of thousands facing a relay that is down would otherwise log
                    // thousands of lines a minute.
                    match refusal_hint(&e) {
                        Some(hint) => {
                            warn!(serial = %serial, broker = %failed, error = %e, attempts = failures, hint, "the broker refused the connection; retrying")
                        }
                        None => {
                            warn!(serial = %serial, broker = %failed, error = %e, attempts = failures, "could not connect to broker; retrying")
                        }
                    }
                } else {
                    debug!(serial = %serial, broker = %failed, error = %e, attempts = failures, "could not connect to broker; retrying");
                }
                // Where to try next, and whether to wait first.
                let back_off = if connected {
                    // A blip is the likeliest cause: after a pause, the preferred relay first.
                    relays.restart();
                    true
                } else {
                    relays.failed()
                };
                if relays.current() != &failed {
                    aim(&mut eventloop, &relays);
                    if !back_off {
                        info!(serial = %serial, from = %failed, relay = %relays.current(), rank = relays.rank(), "relay unreachable; trying the next one");
                    }
                }
                if connected {
                    connected = false;
                    if events.send(LinkEvent::Disconnected).await.is_err() {
                        break;
                    }
                }
                if !back_off {
                    continue;
                }
                let delay = jittered(backoff).min(settings.reconnect_max);
                backoff = (backoff * 2).min(settings.reconnect_max);
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = want.changed() => continue,
                    () = sleep(delay) => continue,
                }
            }
        };
        if events.send(event).await.is_err() {
            break;
        }
    }
    stop_failback(&mut failback);
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

/// Whether a message may go to `relay`: a job's report only to the relay the job came from
/// (see [`Session::origins`]); everything else anywhere.
fn deliverable(
    job: Option<&JobId>,
    origins: &HashMap<JobId, protocol::url::BrokerUrl>,
    relay: Option<&Endpoint>,
) -> bool {
    match (job, relay) {
        (Some(job), Some(relay)) => origins.get(job).is_none_or(|from| *from == relay.url),
        _ => true,
    }
}

/// A message the relay has not acked yet.
struct Inflight {
    msg: Pending,
    /// The job a report is about: it goes only to the relay that issued the job (see
    /// [`Session::origins`]).
    job: Option<JobId>,
    next_try: Instant,
    backoff: Duration,
    /// Already waiting in `queue`, so a resend does not queue it twice.
    queued: bool,
}

/// A periodic check-in in progress.
struct CheckIn {
    reason: Reason,
    started: Instant,
}

struct Session {
    serial: Serial,
    site: String,
    /// The relay of the current connection (the last one, while offline).
    relay: Option<Endpoint>,
    device: SharedDevice,
    outbox: Outbox,
    report: Reporter,
    settings: SessionSettings,
    client: AsyncClient,
    link: mpsc::Receiver<LinkEvent>,
    /// Messages the outbox just committed, from the worker and from this session.
    fresh: mpsc::UnboundedReceiver<Pending>,
    worker: mpsc::UnboundedSender<WorkerMsg>,
    /// Merged data and chunks, for the running job.
    inbox: mpsc::UnboundedSender<Incoming>,
    ends: SessionEnds,
    /// Whether the link should be connected.
    want: watch::Sender<bool>,
    /// Whether the device is idle — no job queued or running, nothing unacked — so the link may
    /// move it back to a preferred relay without leaving work behind.
    idle: watch::Sender<bool>,
    /// Jobs queued or running in the worker.
    busy: watch::Receiver<usize>,
    operator: Option<watch::Receiver<u64>>,
    ready: Option<mpsc::UnboundedSender<Serial>>,
    pending: BTreeMap<MsgId, Inflight>,
    /// Ids to publish as soon as rumqttc's request channel has room.
    queue: VecDeque<MsgId>,
    /// Messages outside the outbox (fetches) waiting for room in the request channel.
    loose: VecDeque<(String, Vec<u8>)>,
    connected: bool,
    /// When the subscriptions of this connection were granted.
    subscribed_at: Option<Instant>,
    /// A DISCONNECT is on its way: publish nothing more on this connection.
    disconnect_requested: bool,
    /// The last state announced, while it is unacked: a reconnect does not pile up copies.
    state_sent: Option<(MsgId, DeviceState)>,
    /// A firmware write holds relay access suspended.
    suspended: bool,
    /// The link reported it is offline and not trying to connect.
    parked: bool,
    suspend_waiters: Vec<oneshot::Sender<()>>,
    ack_waiters: Vec<(MsgId, oneshot::Sender<AckOutcome>)>,
    /// The last few acks, for a job that asks after its message was already acked.
    recent_acks: VecDeque<(MsgId, AckOutcome)>,
    /// Which relay each job came from. Relays keep separate stores and number their jobs
    /// independently, so a job's reports are held while the device is on another relay (after a
    /// failover) and go out when it is back on the one that issued the job: sent elsewhere they
    /// would be refused, or worse, taken for that relay's job of the same id.
    origins: HashMap<JobId, protocol::url::BrokerUrl>,
    planner: Planner,
    checkin: Option<CheckIn>,
    /// The last time the relay sent something; a check-in ends only after a quiet spell.
    last_activity: Instant,
    next_condition_poll: Option<Instant>,
}

impl Session {
    async fn run(&mut self, stop: &CancellationToken) {
        let mut busy_alive = true;
        self.plan_conditions();
        self.publish_online();
        loop {
            self.flush();
            self.settle();
            let wake = self.next_wake();
            let op = self.operator.as_mut();
            let operator = async move {
                match op {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                event = self.link.recv() => match event {
                    Some(event) => self.on_link(event).await,
                    None => return,
                },
                Some(p) = self.fresh.recv() => self.add(p),
                Some(c) = self.ends.control.recv() => self.on_control(c),
                changed = self.busy.changed(), if busy_alive => {
                    busy_alive = changed.is_ok();
                }
                alive = operator => {
                    if alive {
                        self.on_operator();
                    } else {
                        self.operator = None;
                    }
                }
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => self.on_tick().await,
            }
        }
    }

    fn is_periodic(&self) -> bool {
        self.planner.is_periodic()
    }

    fn online(&self) -> bool {
        self.connected && self.subscribed_at.is_some() && !self.disconnect_requested
    }

    async fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected(relay) => {
                self.relay = Some(relay);
                self.on_connected().await
            }
            LinkEvent::Disconnected => {
                self.connected = false;
                self.subscribed_at = None;
                self.disconnect_requested = false;
                self.queue.clear();
                self.loose.clear();
                for m in self.pending.values_mut() {
                    m.queued = false;
                }
                self.publish_online();
            }
            LinkEvent::Parked => {
                // Answered in settle(), which also covers a link that had parked already.
                self.parked = !*self.want.borrow();
            }
            LinkEvent::SubAck(ack) => self.on_suback(&ack),
            LinkEvent::Publish(p) => {
                self.last_activity = Instant::now();
                self.on_publish(p).await;
            }
        }
    }

    /// Tells the worker and jobs whether the relay can be reached, and whether waiting jobs may start.
    fn publish_online(&self) {
        let online = self.online();
        self.ends.online.send_if_modified(|v| {
            let changed = *v != online;
            *v = online;
            changed
        });
        let release = !self.is_periodic() || online;
        self.ends.release.send_if_modified(|v| {
            let changed = *v != release;
            *v = release;
            changed
        });
    }

    async fn on_connected(&mut self) {
        self.connected = true;
        self.subscribed_at = None;
        self.disconnect_requested = false;
        let relay = self
            .relay
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        info!(serial = %self.serial, broker = %relay, pending = self.pending.len(), "connected to broker");
        // Subscribe first: requests leave in order, so the subscriptions are in place before the
        // relay can ack anything we send next.
        let filters = [
            SubscribeFilter::new(topic::dev_jobs_filter(&self.serial), QoS::AtLeastOnce),
            SubscribeFilter::new(topic::dev_ack(&self.serial), QoS::AtLeastOnce),
            SubscribeFilter::new(topic::dev_merged_filter(&self.serial), QoS::AtLeastOnce),
            SubscribeFilter::new(topic::dev_blob_filter(&self.serial), QoS::AtLeastOnce),
        ];
        if let Err(e) = self.client.try_subscribe_many(filters) {
            // Only a full request channel can cause this, and a fresh connection has an empty one.
            error!(serial = %self.serial, error = %e, "could not subscribe");
        }
        // Everything pending goes out at once, each with its backoff reset.
        let now = Instant::now();
        self.queue.clear();
        let (origins, relay) = (&self.origins, self.relay.as_ref());
        for (id, m) in &mut self.pending {
            m.backoff = self.settings.resend_min;
            m.next_try = now + m.backoff;
            m.queued = deliverable(m.job.as_ref(), origins, relay);
            if m.queued {
                self.queue.push_back(*id);
            } else {
                debug!(serial = %self.serial, msg_id = *id, "report held for the relay that issued its job");
            }
        }
        // A fatal fault's alarm goes first, ahead of any backlog (Fig. 5, S306).
        let alarm = topic::dev_up(&self.serial, UpKind::Alarm);
        let (mut first, rest): (VecDeque<MsgId>, VecDeque<MsgId>) = self
            .queue
            .drain(..)
            .partition(|id| self.pending.get(id).is_some_and(|m| m.msg.topic == alarm));
        first.extend(rest);
        self.queue = first;
        self.last_activity = now;
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
        // With the schedule, so the relay knows when to expect a periodic device back.
        let report = StateReport {
            state: state.clone(),
            schedule: Some(self.planner.schedule().clone()),
        };
        match self.report.send(UpKind::State, report, None).await {
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
        self.subscribed_at = Some(Instant::now());
        self.publish_online();
        if let Some(ready) = self.ready.take() {
            info!(serial = %self.serial, "subscribed; ready for jobs");
            let _ = ready.send(self.serial.clone());
        }
    }

    async fn on_publish(&mut self, p: Publish) {
        let max = self.settings.max_packet_bytes;
        match Topic::parse(&p.topic) {
            Ok(Topic::DevAck { serial }) if serial == self.serial => self.on_acks(&p).await,
            Ok(Topic::DevJob { serial, job }) if serial == self.serial => {
                if p.payload.is_empty() {
                    // The relay emptied the retained order: the job ended there.
                    debug!(serial = %self.serial, job = %job, "job cleared by broker");
                    if self.relay.as_ref().map(|r| &r.url) == self.origins.get(&job) {
                        self.origins.remove(&job);
                    }
                    let _ = self.worker.send(WorkerMsg::Ended(job));
                    return;
                }
                match Envelope::<JobOrder>::from_cbor(&p.payload, max) {
                    Ok(env) => {
                        if let Some(relay) = &self.relay {
                            self.origins
                                .entry(job.clone())
                                .or_insert_with(|| relay.url.clone());
                        }
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
            Ok(Topic::DevMerged { serial, job }) if serial == self.serial => {
                if p.payload.is_empty() {
                    return; // cleared when the job ended
                }
                match Envelope::<Merged>::from_cbor(&p.payload, max) {
                    Ok(env) if env.body.job == job => {
                        let _ = self.inbox.send(Incoming::Merged(env.body));
                    }
                    Ok(_) => {
                        warn!(serial = %self.serial, topic = %p.topic, "merged data for another job ignored");
                    }
                    Err(e) => {
                        warn!(serial = %self.serial, topic = %p.topic, error = %e, "malformed merged data ignored");
                    }
                }
            }
            Ok(Topic::DevBlob { serial, artifact }) if serial == self.serial => {
                match Envelope::<Chunk>::from_cbor(&p.payload, max) {
                    Ok(env) if env.body.artifact == artifact => {
                        let _ = self.inbox.send(Incoming::Chunk(env.body));
                    }
                    Ok(_) => {
                        warn!(serial = %self.serial, topic = %p.topic, "chunk of another artifact ignored");
                    }
                    Err(e) => {
                        warn!(serial = %self.serial, topic = %p.topic, error = %e, "malformed chunk ignored");
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
            if let Some(inc) = ack.inc
                && self.pending.get(&ack.id).is_none_or(|m| m.msg.inc != inc)
            {
                // Meant for a message this numbering never sent (an earlier store of this
                // device's, before it was wiped): deleting ours under that id would lose it.
                debug!(serial = %self.serial, msg_id = ack.id, inc, "ack of another outbox ignored");
                continue;
            }
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
            if self.recent_acks.len() == RECENT_ACKS {
                self.recent_acks.pop_front();
            }
            self.recent_acks.push_back((ack.id, ack.outcome.clone()));
            let mut i = 0;
            while i < self.ack_waiters.len() {
                if self.ack_waiters[i].0 == ack.id {
                    let (_, w) = self.ack_waiters.swap_remove(i);
                    let _ = w.send(ack.outcome.clone());
                } else {
                    i += 1;
                }
            }
            done.push(ack.id);
        }
        if let Err(e) = self.outbox.ack(&self.serial, done).await {
            // They stay on disk and are resent after a restart; the relay will answer duplicate.
            warn!(serial = %self.serial, error = %e, "could not remove acked messages from the outbox");
        }
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::Publish {
                topic,
                payload,
                reply,
            } => {
                let sent = self.online();
                if sent {
                    self.loose.push_back((topic, payload));
                }
                let _ = reply.send(sent);
            }
            Control::WhenAcked { id, reply } => {
                // What the job committed just before asking may still be in the channel.
                while let Ok(p) = self.fresh.try_recv() {
                    self.add(p);
                }
                if self.pending.contains_key(&id) {
                    self.ack_waiters.push((id, reply));
                } else {
                    let outcome = self
                        .recent_acks
                        .iter()
                        .rev()
                        .find(|(acked, _)| *acked == id)
                        .map_or(AckOutcome::Stored, |(_, o)| o.clone());
                    let _ = reply.send(outcome);
                }
            }
            Control::Suspend { reply } => {
                self.suspended = true;
                self.suspend_waiters.push(reply);
                // Answered when the link reports it is parked.
            }
            Control::Resume => {
                self.suspended = false;
                // A periodic device reconnects to send the result, as the seed's S423 does.
                if self.is_periodic() {
                    self.begin_checkin(Reason::Job);
                }
            }
            Control::Schedule(schedule) => self.apply_schedule(schedule),
            Control::FaultSeen(code) => {
                let watched = self.planner.conditions().iter().any(
                    |c| matches!(c, protocol::schedule::Condition::FaultSeen { code: w } if *w == code),
                );
                if watched && self.is_periodic() {
                    self.begin_checkin(Reason::Condition(format!("fault:{code}")));
                }
            }
        }
    }

    fn apply_schedule(&mut self, schedule: Schedule) {
        info!(
            serial = %self.serial, mode = %schedule.mode, interval_secs = schedule.interval_secs,
            schedule = %describe(&schedule), "schedule applied"
        );
        let was_periodic = self.is_periodic();
        self.planner = Planner::new(schedule, Instant::now(), chrono::Utc::now());
        self.plan_conditions();
        if self.is_periodic() {
            if !was_periodic || self.checkin.is_some() {
                // The connection in use counts as a check-in: it ends once this job's report is
                // acked, and the interval counts from now.
                self.checkin = None;
                self.begin_checkin(Reason::Job);
            }
        } else {
            self.checkin = None;
        }
        self.publish_online();
    }

    fn on_operator(&mut self) {
        if self.is_periodic() && self.planner.honours(Moment::OperatorAction) {
            self.begin_checkin(Reason::OperatorAction);
        } else {
            debug!(serial = %self.serial, "operator action: no check-in (not in the schedule's moments)");
        }
    }

    fn begin_checkin(&mut self, reason: Reason) {
        if self.checkin.is_some() {
            return;
        }
        let now = Instant::now();
        info!(serial = %self.serial, reason = %reason, "periodic check-in");
        self.planner.started(now);
        self.checkin = Some(CheckIn {
            reason,
            started: now,
        });
        self.last_activity = now;
    }

    /// Whether a periodic check-in has done its work: connected long enough for the relay's
    /// retained orders to arrive, nothing received for a quiet spell, no job queued or running,
    /// nothing unacked.
    fn drained(&self) -> bool {
        let quiet = self.settings.drain_quiet;
        let now = Instant::now();
        self.online()
            && self
                .subscribed_at
                .is_some_and(|at| now.duration_since(at) >= quiet)
            && now.duration_since(self.last_activity) >= quiet
            && *self.busy.borrow() == 0
            && !self.has_deliverable()
            && self.ack_waiters.is_empty()
            && self.loose.is_empty()
    }

    /// Whether anything unacked may go to the current relay (reports held for another relay
    /// do not count: they wait for that one).
    fn has_deliverable(&self) -> bool {
        let relay = self.relay.as_ref();
        self.pending
            .values()
            .any(|m| deliverable(m.job.as_ref(), &self.origins, relay))
    }

    /// Decides whether to be connected, and acts on it.
    fn settle(&mut self) {
        // Reports held for a preferred relay do not keep the device here: they are why it goes back.
        let idle =
            *self.busy.borrow() == 0 && !self.has_deliverable() && self.ack_waiters.is_empty();
        self.idle.send_if_modified(|v| {
            let changed = *v != idle;
            *v = idle;
            changed
        });
        if self.is_periodic() && !self.suspended {
            if self.checkin.is_none() && (*self.busy.borrow() > 0 || !self.ack_waiters.is_empty()) {
                self.begin_checkin(Reason::Job);
            }
            if let Some(c) = &self.checkin
                && self.drained()
            {
                info!(
                    serial = %self.serial, reason = %c.reason,
                    duration_ms = c.started.elapsed().as_millis() as u64,
                    "check-in drained; disconnecting"
                );
                self.checkin = None;
            }
        }
        let want = !self.suspended && (!self.is_periodic() || self.checkin.is_some());
        self.want.send_if_modified(|w| {
            let changed = *w != want;
            *w = want;
            changed
        });
        if !want && self.connected && !self.disconnect_requested {
            // A full request channel is tried again at the next wake.
            if self.client.try_disconnect().is_ok() {
                self.disconnect_requested = true;
                self.publish_online();
            }
        }
        if want {
            self.parked = false;
        } else if self.parked && self.suspended {
            for w in self.suspend_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Timers: resends, the next timed check-in, condition polls.
    async fn on_tick(&mut self) {
        self.resend_due();
        let utc = chrono::Utc::now();
        if self.checkin.is_none()
            && let Some((at, reason)) = self.planner.next(utc)
            && at <= Instant::now()
        {
            if let Reason::Calendar(_) = reason {
                self.planner.calendar_done(utc);
            }
            self.begin_checkin(reason);
        }
        if let Some(at) = self.next_condition_poll
            && at <= Instant::now()
        {
            self.next_condition_poll = Some(Instant::now() + CONDITION_POLL);
            let read =
                device::read_sections(&self.device, vec![protocol::data::Section::Counters]).await;
            if let Ok(data) = read
                && let Some(counters) = data.get(&protocol::data::Section::Counters)
            {
                let conditions = self.planner.conditions().to_vec();
                if let Some(fired) = self.planner.marks.check(&conditions, counters)
                    && self.is_periodic()
                {
                    self.begin_checkin(Reason::Condition(fired));
                }
            }
        }
    }

    fn plan_conditions(&mut self) {
        let watches = self.is_periodic()
            && self
                .planner
                .conditions()
                .iter()
                .any(|c| matches!(c, protocol::schedule::Condition::CountReached { .. }));
        self.next_condition_poll = watches.then(Instant::now);
    }

    /// A message the outbox committed: publish it now if we can.
    fn add(&mut self, msg: Pending) {
        let id = msg.id;
        let backoff = self.settings.resend_min;
        let job = self.job_of(&msg);
        let queued =
            self.connected && deliverable(job.as_ref(), &self.origins, self.relay.as_ref());
        self.pending.insert(
            id,
            Inflight {
                msg,
                job,
                next_try: Instant::now() + backoff,
                backoff,
                queued,
            },
        );
        if queued {
            // An alarm goes ahead of everything but older alarms (Fig. 5, S306).
            let alarm = topic::dev_up(&self.serial, UpKind::Alarm);
            let is_alarm = |m: Option<&Inflight>| m.is_some_and(|m| m.msg.topic == alarm);
            if is_alarm(self.pending.get(&id)) {
                let at = self
                    .queue
                    .iter()
                    .take_while(|q| is_alarm(self.pending.get(q)))
                    .count();
                self.queue.insert(at, id);
            } else {
                self.queue.push_back(id);
            }
        }
    }

    /// The job a job report (`up/job`) is about.
    fn job_of(&self, msg: &Pending) -> Option<JobId> {
        match Topic::parse(&msg.topic) {
            Ok(Topic::DevUp {
                kind: UpKind::Job, ..
            }) => Envelope::<JobUpdate>::from_cbor(&msg.payload, self.settings.max_packet_bytes)
                .ok()
                .map(|e| e.body.job),
            _ => None,
        }
    }

    /// Queues every unacked message whose time has come, and doubles its wait.
    fn resend_due(&mut self) {
        if !self.connected {
            return;
        }
        let now = Instant::now();
        let (origins, relay) = (&self.origins, self.relay.as_ref());
        for (id, m) in &mut self.pending {
            if m.next_try <= now && !m.queued && deliverable(m.job.as_ref(), origins, relay) {
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
        if !self.connected || self.disconnect_requested {
            return;
        }
        while let Some((topic, payload)) = self.loose.pop_front() {
            if let Err(e) =
                self.client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            {
                debug!(serial = %self.serial, error = %e, "request channel full; fetch waits");
                self.loose.push_front((topic, payload));
                return;
            }
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

    /// When the session must act without an event.
    fn next_wake(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut wakes: Vec<Instant> = Vec::new();
        if self.connected && !self.disconnect_requested {
            if !self.queue.is_empty() || !self.loose.is_empty() {
                wakes.push(now + FLUSH_RETRY);
            }
            if let Some(t) = self
                .pending
                .values()
                .filter(|m| !m.queued)
                .map(|m| m.next_try)
                .min()
            {
                wakes.push(t);
            }
        }
        let want = !self.suspended && (!self.is_periodic() || self.checkin.is_some());
        if !want && self.connected && !self.disconnect_requested {
            wakes.push(now + FLUSH_RETRY); // a DISCONNECT that did not fit yet
        }
        if self.checkin.is_some() {
            // The end of the quiet spell, when the check-in may be drained. Only worth a timer
            // when nothing else holds it open: a job's end or an ack wakes the session anyway.
            if let Some(at) = self.subscribed_at
                && self.online()
                && *self.busy.borrow() == 0
                && !self.has_deliverable()
                && self.ack_waiters.is_empty()
                && self.loose.is_empty()
            {
                let quiet = self.settings.drain_quiet;
                let t = (self.last_activity + quiet).max(at + quiet);
                wakes.push(t.max(now + FLUSH_RETRY));
            }
        } else if let Some((at, _)) = self.planner.next(chrono::Utc::now()) {
            wakes.push(at.min(now + checkin::MAX_NAP));
        }
        if let Some(t) = self.next_condition_poll {
            wakes.push(t);
        }
        wakes.into_iter().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connack_says_what_to_do_for_its_code() {
        let busy = refusal_hint(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::ServiceUnavailable,
        ))
        .expect("a refusal");
        assert!(
            busy.contains("max_connections_per_identity") && busy.contains("max_clients"),
            "{busy}"
        );
        let denied = refusal_hint(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized,
        ))
        .expect("a refusal");
        assert!(denied.contains("CN"), "{denied}");
        assert_eq!(refusal_hint(&ConnectionError::NetworkTimeout), None);
    }

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
