//! One device's session with the relay (Fig. 2 from the device's side).
//!
//! Three tasks per device:
//! - the **link** ([`link`]) owns rumqttc's `EventLoop`: it polls it, reconnects with backoff
//!   when the connection drops (rumqttc's `poll` returns the error; retrying is ours) and
//!   forwards what matters to the session. It connects only while the session *wants* a
//!   connection; told to go offline it lets the session's DISCONNECT out, drops the socket and
//!   parks. While connected it is never cancelled halfway through a poll, so no packet is ever
//!   torn;
//! - the **session** ([`Session`]) reacts: on every CONNACK it subscribes to the device's jobs,
//!   acks, merged data and firmware chunks, announces the device's state and resends everything
//!   pending ([`online`]); it hands job orders to the worker and what a job asked for to its
//!   inbox ([`dispatch`]), publishes what the outbox commits, drops what the relay acks and
//!   resends the rest with backoff ([`outgoing`]). It decides when to be connected
//!   ([`schedule`]): always in a **persistent** session; in a **periodic** one only for a
//!   check-in (interval, calendar, power-on, operator action, condition) that lasts until the
//!   jobs are run and the outbox is empty — and never while a firmware write has **suspended**
//!   relay access (claims 5, 12);
//! - the **worker** ([`crate::worker`]) runs the jobs, one at a time.

mod dispatch;
mod link;
mod online;
mod outgoing;
mod schedule;

use std::path::PathBuf;
use std::sync::Arc;

use protocol::device::DeviceState;
use protocol::schedule::Schedule;
use protocol::{MsgId, Serial};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::checkin::{Planner, Reason};
use crate::config::SessionSettings;
use crate::device::SharedDevice;
use crate::failover::Relays;
use crate::faults::{self, MonitorSettings};
use crate::jobs::set_schedule::describe;
use crate::jobs::{JobEnv, PublisherKey};
use crate::outbox::{Outbox, OutboxError, Pending};
use crate::relay::{self, RelayHandle, SessionEnds};
use crate::report::Reporter;
use crate::store::WriteIntent;
use crate::transport::Endpoint;

use self::dispatch::WorkerEnds;
use self::link::LinkEnds;
use self::outgoing::Outgoing;
use self::schedule::Plan;

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
    let restored = Restored::load(&outbox, &serial, schedule).await?;
    let suspended = restored.intent.is_some();
    let (relay, ends) = relay::pair();
    let (fresh_tx, fresh) = mpsc::unbounded_channel();
    let report = Reporter::new(serial.clone(), outbox.clone(), fresh_tx);
    let monitors = Monitors::spawn(&serial, &device, &report, &relay, monitor, &stop);
    let (link, link_task) = link::spawn(
        &serial,
        Relays::new(relays),
        tls,
        &settings,
        !suspended,
        &stop,
    );
    let env = JobEnv {
        device: device.clone(),
        report: report.clone(),
        relay,
        store: outbox.store(),
        outbox: outbox.clone(),
        home,
        publisher,
        fetch_timeout: settings.fetch_timeout,
        stop: stop.clone(),
    };
    let (worker, worker_task) = dispatch::spawn_worker(env, restored.intent);

    let planner = Planner::new(restored.schedule, Instant::now(), chrono::Utc::now());
    let mut session = Session {
        serial,
        site,
        device,
        outbox,
        report,
        settings,
        link,
        worker,
        fresh,
        ends,
        operator,
        ready,
        relay: None,
        connected: false,
        subscribed_at: None,
        subscribed_at_relays: Default::default(),
        disconnect_requested: false,
        state_sent: None,
        out: Outgoing::default(),
        plan: Plan::new(planner, suspended),
    };
    session.start(restored.pending);
    session.run(&stop).await;
    drop(session);
    monitors.abort();
    let _ = link_task.await;
    let _ = worker_task.await;
    Ok(())
}

/// What a device takes over from its last run, read from its store before it connects.
struct Restored {
    /// What the last run sent but never saw acked: it goes out on the first connect.
    pending: Vec<Pending>,
    /// A firmware write cut off by a power cut: concluded before the device reconnects.
    intent: Option<WriteIntent>,
    /// The schedule in effect: one a job set (stored) wins over the configured one.
    schedule: Schedule,
}

impl Restored {
    async fn load(
        outbox: &Outbox,
        serial: &Serial,
        configured: Schedule,
    ) -> Result<Restored, OutboxError> {
        let store = outbox.store();
        let pending = outbox.pending(serial).await?;
        if !pending.is_empty() {
            info!(serial = %serial, count = pending.len(), "pending messages reloaded from the outbox");
        }
        let intent = store.write_intent(serial).await?;
        let schedule = match store.schedule(serial).await? {
            Some(stored) => {
                info!(serial = %serial, job = %stored.job, schedule = %describe(&stored.schedule), "schedule in effect, as set by a job");
                stored.schedule
            }
            None => configured,
        };
        Ok(Restored {
            pending,
            intent,
            schedule,
        })
    }
}

/// The tasks beside the session: fault handling and, if configured, periodic meter reads.
struct Monitors {
    faults: JoinHandle<()>,
    meter: Option<JoinHandle<()>>,
}

impl Monitors {
    fn spawn(
        serial: &Serial,
        device: &SharedDevice,
        report: &Reporter,
        relay: &RelayHandle,
        settings: MonitorSettings,
        stop: &CancellationToken,
    ) -> Monitors {
        let faults = tokio::spawn(
            faults::Monitor {
                serial: serial.clone(),
                report: report.clone(),
                relay: relay.clone(),
                device: device.clone(),
                settings: settings.faults,
            }
            .run(stop.clone()),
        );
        let meter = settings.counters_every.map(|every| {
            tokio::spawn(crate::meter::run(
                device.clone(),
                report.clone(),
                every,
                stop.clone(),
            ))
        });
        Monitors { faults, meter }
    }

    /// They only wait on timers and requests: nothing is lost by ending them here.
    fn abort(self) {
        self.faults.abort();
        if let Some(meter) = self.meter {
            meter.abort();
        }
    }
}

/// The session: one device's state between the link, the worker and the outbox. Its methods
/// live in the submodules, one concern each.
struct Session {
    serial: Serial,
    site: String,
    device: SharedDevice,
    outbox: Outbox,
    report: Reporter,
    settings: SessionSettings,
    /// The link's ends: rumqttc's client, the link's events, and what the session wants of it.
    link: LinkEnds,
    /// The worker's ends: job orders, the running job's inbox, how many jobs it holds.
    worker: WorkerEnds,
    /// Messages the outbox just committed, from the worker and from this session.
    fresh: mpsc::UnboundedReceiver<Pending>,
    /// What running jobs ask of the session.
    ends: SessionEnds,
    operator: Option<watch::Receiver<u64>>,
    ready: Option<mpsc::UnboundedSender<Serial>>,
    /// The relay of the current connection (the last one, while offline).
    relay: Option<Endpoint>,
    connected: bool,
    /// When the subscriptions of this connection were granted.
    subscribed_at: Option<Instant>,
    /// The relays this agent process has subscribed at: there, a connection that resumes the
    /// persistent session need not subscribe again (see `online.rs`).
    subscribed_at_relays: std::collections::HashSet<String>,
    /// A DISCONNECT is on its way: publish nothing more on this connection.
    disconnect_requested: bool,
    /// The last state announced, while it is unacked: a reconnect does not pile up copies.
    state_sent: Option<(MsgId, DeviceState)>,
    /// What is unacked or waiting to be published.
    out: Outgoing,
    /// When to be connected: the schedule, the check-in in progress, a suspension.
    plan: Plan,
}

impl Session {
    /// Takes in what the last run left unacked, and checks a periodic device in at power-on.
    fn start(&mut self, reloaded: Vec<Pending>) {
        for p in reloaded {
            self.add(p);
        }
        if self.is_periodic() {
            // Power-on: a periodic device checks in once when it starts, whatever its moments
            // say, so it announces itself (and sends what a recovery committed) without waiting
            // a period.
            self.begin_checkin(Reason::PowerOn);
        }
    }

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
                event = self.link.events.recv() => match event {
                    Some(event) => self.on_link(event).await,
                    None => return,
                },
                Some(p) = self.fresh.recv() => self.add(p),
                Some(c) = self.ends.control.recv() => self.on_control(c),
                changed = self.worker.busy.changed(), if busy_alive => {
                    busy_alive = changed.is_ok();
                }
                alive = operator => {
                    if alive {
                        self.on_operator();
                    } else {
                        self.operator = None;
                    }
                }
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    self.resend_due();
                    self.on_timers().await;
                }
            }
        }
    }

    fn is_periodic(&self) -> bool {
        self.plan.planner.is_periodic()
    }

    fn online(&self) -> bool {
        self.connected && self.subscribed_at.is_some() && !self.disconnect_requested
    }

    /// Jobs queued or running in the worker.
    fn busy(&self) -> usize {
        *self.worker.busy.borrow()
    }

    /// When the session must act without an event: to publish or resend, or for the schedule.
    fn next_wake(&self) -> Option<Instant> {
        let now = Instant::now();
        [self.next_send_wake(now), self.next_plan_wake(now)]
            .into_iter()
            .flatten()
            .min()
    }
}
