//! The core's thread: group commit (docs/decisions.md, D8).
//!
//! While one batch is being committed (an fsync), the messages that arrive queue up in the
//! channel; the next batch takes all of them at once. So under load a commit covers many
//! messages, and durability does not cap throughput; when idle, a lone message commits at once.
//!
//! Paced traffic (a report every millisecond, each alone) would still cost one commit per
//! message: a wake-up, a transaction and a disk flush each. So while the relay is busy — a batch
//! committed within the last ten windows — a small batch (under 32 messages) sleeps one *commit
//! window* (`commit_window_us`, 1 ms by default, 5 ms on a cluster node) and takes what came
//! meanwhile before it commits, as PostgreSQL's `commit_delay` waits only when `commit_siblings`
//! are active. Measured side by side: a quarter less relay CPU at 1,000 and 4,000 paced reports/s
//! for about 2.5 ms more ack latency; an idle relay's lone message still commits at once. A
//! device's alarm ends the window at once ([`CommitWindow::urgent`]): a fault does not wait for
//! paced reports.
//!
//! The core is the store's single writer and blocks on every commit, so it has an OS thread of
//! its own and handles each batch on it, in line, rather than handing every batch to tokio's
//! blocking pool and back (two thread wake-ups per batch, and a pool thread the async workers
//! never needed). Acks leave from this thread straight after the commit.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::{Core, Inbound, Outbound, SessionEvent};
use crate::store::StoreError;

/// Most messages in one transaction: bounds the time a batch holds the writer and the size of
/// what it publishes afterwards.
pub const MAX_BATCH: usize = 512;

/// Where what the core publishes goes once a commit has made it true. The core decides what is
/// sent; the relay's switch decides the route (a device's own session, the router, later an uplink
/// or a bus), so the core knows nothing of sessions, the router or the gateway.
pub trait Outlet {
    /// Takes everything one commit (or tick) publishes, in order. Called on the core's thread right
    /// after the commit: what devices get can leave from here at once.
    fn publish(
        &self,
        batch: Vec<Outbound>,
    ) -> impl std::future::Future<Output = Result<(), OutletClosed>> + Send;
}

/// The outlet's far side is gone: the relay is stopping.
#[derive(Debug, thiserror::Error)]
#[error("the core's outlet has closed")]
pub struct OutletClosed;

/// A batch waits for more only if the one before it committed this many windows ago or less:
/// the relay is busy, more is likely on its way.
const BUSY_WINDOWS: u32 = 10;

/// How long a batch that is not full may wait for more messages before it commits (see the
/// module's doc), and what cuts that wait short.
#[derive(Debug, Clone, Default)]
pub struct CommitWindow {
    /// `Duration::ZERO`: never wait.
    pub length: Duration,
    /// Notified when a device's alarm is queued for the core: a batch waiting in its window
    /// commits at once, so a fault reaches the hosts without the window's delay. A notification
    /// that finds no batch waiting ends the next window early, which costs one small commit.
    pub urgent: Arc<Notify>,
}

impl CommitWindow {
    /// A window of `length` that only its own [`CommitWindow::urgent`] cuts short.
    pub fn new(length: Duration) -> CommitWindow {
        CommitWindow {
            length,
            urgent: Arc::default(),
        }
    }

    /// The deadline a batch whose first message arrived at `arrived` may wait until, if the
    /// previous batch (done at `last`) says the relay is busy.
    fn deadline(&self, arrived: Instant, last: Option<Instant>) -> Option<Instant> {
        let busy = last.is_some_and(|l| arrived.duration_since(l) <= self.length * BUSY_WINDOWS);
        (busy && !self.length.is_zero()).then(|| arrived + self.length)
    }

    /// Waits until `deadline` or an urgent message, whichever comes first.
    async fn wait(&self, deadline: Instant) {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            () = self.urgent.notified() => {}
        }
    }
}

/// A batch this large already shares its commit widely: it does not wait for more. Under
/// saturation batches are far larger and waiting would only slow the round trips that bring the
/// next messages (measured: a window on every batch cut closed-loop throughput by a fifth).
const WAIT_BELOW: usize = 32;

/// A channel the core takes batches from: both kinds of tokio receiver it reads.
trait Queue<T> {
    fn take_now(&mut self) -> Option<T>;
}

impl<T> Queue<T> for mpsc::Receiver<T> {
    fn take_now(&mut self) -> Option<T> {
        self.try_recv().ok()
    }
}

impl<T> Queue<T> for mpsc::UnboundedReceiver<T> {
    fn take_now(&mut self) -> Option<T> {
        self.try_recv().ok()
    }
}

/// Adds to `batch` what is queued, up to `max`; if that leaves it under [`WAIT_BELOW`] and there
/// is a `deadline`, waits until then (or an urgent message, see [`CommitWindow::urgent`]) and adds
/// what came meanwhile. One wait, not a wake-up per message that arrives: saving those wake-ups
/// is the point of the window.
async fn fill<T>(
    batch: &mut Vec<T>,
    queue: &mut impl Queue<T>,
    max: usize,
    deadline: Option<(Instant, &CommitWindow)>,
) {
    let drain = |batch: &mut Vec<T>, queue: &mut dyn Queue<T>| {
        while batch.len() < max {
            match queue.take_now() {
                Some(msg) => batch.push(msg),
                None => break,
            }
        }
    };
    drain(batch, queue);
    if let Some((deadline, window)) = deadline
        && batch.len() < max.min(WAIT_BELOW)
    {
        window.wait(deadline).await;
        drain(batch, queue);
    }
}

/// How often deadlines are checked.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// Starts [`run`] on a thread of its own (named `chukei-core`, with a single-threaded runtime
/// for its channels and timer). The receiver gets `run`'s result; an error on it means the thread
/// died.
pub fn spawn(
    core: Arc<Core>,
    inbound: mpsc::Receiver<Inbound>,
    outbound: impl Outlet + Send + 'static,
    presence: mpsc::UnboundedReceiver<SessionEvent>,
    window: CommitWindow,
    stop: CancellationToken,
) -> std::io::Result<oneshot::Receiver<Result<(), StoreError>>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("chukei-core".into())
        .spawn(move || {
            let result = runtime.block_on(run(core, inbound, outbound, presence, window, stop));
            let _ = done_tx.send(result);
        })?;
    Ok(done_rx)
}

/// Receives [`Inbound`] messages, handles whatever is queued as one batch, sends what it
/// publishes after the commit, and expires deadlines about once a second. Returns when `stop` is
/// cancelled, `inbound` closes or `outbound`'s router side is gone.
///
/// Batches are handled in line (redb blocks), so this future needs an executor of its own:
/// [`spawn`] gives it one. What a batch publishes goes to `outbound` right after the commit, from
/// this thread (what devices get, acks and orders, leaves from here at once).
///
/// Sessions opening and closing ([`SessionEvent`]s from the gateway) are recorded the same way,
/// in their own transactions, at most one per [`PRESENCE_WINDOW`] while they come in numbers; the
/// once-a-second tick also looks for overdue devices, queues the
/// alarm notifications whose coalescing window has closed, and sends the alarm views held back
/// by the one-view-a-second pace.
///
/// A busy relay's batches wait up to `window` for more messages (the module's doc says why).
///
/// A batch that fails to commit is logged and dropped: nothing was acked, so its senders resend.
/// A store that cannot write (disk full, an I/O error) does not stop the core: it refuses new
/// work, keeps answering reads and recovers by itself once it can write again (see `storage`).
pub async fn run(
    core: Arc<Core>,
    mut inbound: mpsc::Receiver<Inbound>,
    outbound: impl Outlet,
    mut presence: mpsc::UnboundedReceiver<SessionEvent>,
    window: CommitWindow,
    stop: CancellationToken,
) -> Result<(), StoreError> {
    let mut presence_open = true;
    let mut presence_held = HeldPresence::default();
    let mut last_batch: Option<Instant> = None;
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A batch read but handled after the presence commit made for it (below).
    let mut after_presence: Option<Vec<Inbound>> = None;
    loop {
        let work = if let Some(batch) = after_presence.take() {
            Work::Batch(batch)
        } else {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                msg = inbound.recv() => {
                    let Some(first) = msg else { return Ok(()) };
                    let mut batch = Vec::with_capacity(16);
                    batch.push(first);
                    let deadline = window.deadline(Instant::now(), last_batch);
                    let deadline = deadline.map(|d| (d, &window));
                    fill(&mut batch, &mut inbound, MAX_BATCH, deadline).await;
                    // A host's request sees every session that opened or closed before it
                    // came: a rollout made as a fleet comes up selects all of it, `devices
                    // list` lists all of it. So what presence is held or queued is committed
                    // first, and the batch handled next.
                    let mut events = Vec::new();
                    let pending = presence_held.is_holding() || !presence.is_empty();
                    if pending && carries_host_request(&batch) {
                        events = presence_held.release();
                        fill(&mut events, &mut presence, usize::MAX, None).await;
                    }
                    if events.is_empty() {
                        Work::Batch(batch)
                    } else {
                        after_presence = Some(batch);
                        Work::Presence(events)
                    }
                }
                // Not read while changes are held: each session's change would wake the core
                // for nothing; what queues meanwhile is taken with the held ones when due.
                event = presence.recv(), if presence_open && !presence_held.is_holding() => {
                    match event {
                        Some(first) => {
                            let mut events = vec![first];
                            fill(&mut events, &mut presence, usize::MAX, None).await;
                            match presence_held.take_or_hold(events, Instant::now()) {
                                Some(events) => Work::Presence(events),
                                None => continue,
                            }
                        }
                        None => {
                            presence_open = false;
                            continue;
                        }
                    }
                }
                () = presence_held.due(), if presence_held.is_holding() => {
                    let mut events = presence_held.release();
                    fill(&mut events, &mut presence, usize::MAX, None).await;
                    Work::Presence(events)
                }
                _ = expire.tick() => Work::Expire,
            }
        };
        let is_batch = matches!(work, Work::Batch(_));
        let is_presence = matches!(work, Work::Presence(_));
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let now = chrono::Utc::now();
            match work {
                Work::Batch(batch) => {
                    let len = batch.len();
                    let started = std::time::Instant::now();
                    let out = core.handle_batch(batch, now);
                    let took_us = started.elapsed().as_micros() as u64;
                    debug!(messages = len, took_us, "batch handled");
                    out
                }
                // The tick also records presence changes held back while the store could not write.
                // Deadlines, overdue check-ins and alarm digests happen once per store: in a
                // cluster, on the node that leads.
                Work::Expire => {
                    let started = std::time::Instant::now();
                    let lead = core.store().leads_cluster_work();
                    let mut out = Vec::new();
                    let result = (|| {
                        if lead {
                            out.extend(core.expire(now)?);
                            out.extend(core.overdue(now)?);
                            core.notify_due(now)?;
                            out.extend(core.sweep_gone_nodes(now)?);
                            out.extend(core.rollouts_tick(now)?);
                        }
                        out.extend(core.alarm_views_due(now)?);
                        out.extend(core.presence_events(Vec::new(), now)?);
                        Ok(std::mem::take(&mut out))
                    })();
                    let took_us = started.elapsed().as_micros() as u64;
                    debug!(lead, took_us, "tick handled");
                    result
                }
                Work::Presence(events) => {
                    let (len, started) = (events.len(), std::time::Instant::now());
                    let out = core.session_events(events, now);
                    let took_us = started.elapsed().as_micros() as u64;
                    debug!(events = len, took_us, "presence handled");
                    out
                }
            }
        }));
        if is_batch {
            last_batch = Some(Instant::now());
        }
        if is_presence {
            presence_held.committed(Instant::now());
        }
        let Some(out) = settle(&core, result) else {
            continue;
        };
        if outbound.publish(out).await.is_err() {
            debug!("outlet gone; core stopping");
            return Ok(());
        }
    }
}

/// What a batch publishes, or `None` if it did not commit (logged here; nothing was acked, so
/// what failed comes again: messages when their senders resend, deadlines and overdue checks on
/// the next tick).
fn settle(
    core: &Core,
    result: std::thread::Result<Result<Vec<Outbound>, StoreError>>,
) -> Option<Vec<Outbound>> {
    match result {
        Ok(Ok(out)) => Some(out),
        Ok(Err(e)) if e.is_storage() => {
            // Logged once per burst by the core.
            core.storage_failed(&e);
            None
        }
        Ok(Err(e)) => {
            error!(error = %e, "batch not committed; its senders will resend");
            None
        }
        Err(_) => {
            error!("batch handler panicked; its senders will resend");
            None
        }
    }
}

/// Starts the alarm lane on a thread of its own (`chukei-alarms`), for a store with a second
/// writer ([`crate::store::Store::has_alarm_writer`]; the hub then queues devices' alarms here
/// instead of on the core's queue).
///
/// On the core's thread an alarm waits for the batch in hand to commit and then shares a
/// commit with the reports queued meanwhile: on a busy cluster node, two batch times, most of
/// what the alarm took to reach a host on another node (bench/RESULTS.md). Here it waits for
/// neither: each batch of alarms (whatever is queued, no commit window) is committed on the
/// second writer beside the core's batch. The two transactions order what they both touch with
/// the database's row locks, as two nodes' do.
pub fn spawn_alarm_lane(
    core: Arc<Core>,
    alarms: mpsc::Receiver<Inbound>,
    outbound: impl Outlet + Send + 'static,
    stop: CancellationToken,
) -> std::io::Result<oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("chukei-alarms".into())
        .spawn(move || {
            runtime.block_on(run_alarm_lane(core, alarms, outbound, stop));
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}

/// The alarm lane's loop ([`spawn_alarm_lane`]): takes what is queued, handles it as one batch
/// on the second writer, publishes what it made. Returns when `stop` is cancelled, `alarms`
/// closes or the outlet is gone.
pub async fn run_alarm_lane(
    core: Arc<Core>,
    mut alarms: mpsc::Receiver<Inbound>,
    outbound: impl Outlet,
    stop: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            () = stop.cancelled() => return,
            msg = alarms.recv() => {
                let Some(first) = msg else { return };
                let mut batch = vec![first];
                fill(&mut batch, &mut alarms, MAX_BATCH, None).await;
                batch
            }
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let len = batch.len();
            let started = std::time::Instant::now();
            let out = core.handle_alarms(batch, chrono::Utc::now());
            let took_us = started.elapsed().as_micros() as u64;
            debug!(messages = len, took_us, "alarm batch handled");
            out
        }));
        let Some(out) = settle(&core, result) else {
            continue;
        };
        if outbound.publish(out).await.is_err() {
            debug!("outlet gone; alarm lane stopping");
            return;
        }
    }
}

/// Sessions opening and closing answer nobody, so while they come in numbers (a restarted
/// relay's whole fleet comes back at once) their changes wait for each other: at most one presence
/// commit per [`PRESENCE_WINDOW`]. A lone change on a quiet relay commits at once, and a host's
/// request commits what is held before it is handled ([`carries_host_request`]), so no answer
/// misses a session that opened before it was asked. Measured in a reconnect storm of 19,000
/// devices (bench/RESULTS.md): commits of ~27 changes became commits of hundreds, each with one
/// flush and its tree pages written once. Not longer: at 200 ms a storm's relay CPU was about
/// 1.5 % lower again, but a commit of a fifth of a second's sessions (their records, the tree
/// pages they dirty, their state views) left the relay's heap 0.2 KiB per idle device larger.
pub(super) const PRESENCE_WINDOW: Duration = Duration::from_millis(50);

/// Whether `batch` holds a host's request (its answer may read presence). Devices' messages, the
/// bulk of a busy relay's batches, are told apart by their first level without a parse.
fn carries_host_request(batch: &[Inbound]) -> bool {
    batch.iter().any(|m| {
        m.topic.starts_with("host/")
            && matches!(
                protocol::topic::Topic::parse(&m.topic),
                Ok(protocol::topic::Topic::HostReq { .. })
            )
    })
}

/// Presence changes held back until [`PRESENCE_WINDOW`] has passed since the last presence
/// commit.
#[derive(Default)]
struct HeldPresence {
    events: Vec<SessionEvent>,
    /// When the last presence commit finished.
    last: Option<Instant>,
}

impl HeldPresence {
    /// `events` to commit now (with any held before them, in order), or `None`: held until
    /// [`HeldPresence::due`].
    fn take_or_hold(
        &mut self,
        mut events: Vec<SessionEvent>,
        now: Instant,
    ) -> Option<Vec<SessionEvent>> {
        let quiet = self
            .last
            .is_none_or(|last| now.duration_since(last) >= PRESENCE_WINDOW);
        if quiet {
            if self.events.is_empty() {
                return Some(events);
            }
            self.events.append(&mut events);
            return Some(self.release());
        }
        self.events.append(&mut events);
        None
    }

    fn is_holding(&self) -> bool {
        !self.events.is_empty()
    }

    /// Resolves when the held changes are due (a window after the last presence commit).
    async fn due(&self) {
        if let Some(last) = self.last {
            tokio::time::sleep_until(last + PRESENCE_WINDOW).await;
        }
    }

    fn release(&mut self) -> Vec<SessionEvent> {
        std::mem::take(&mut self.events)
    }

    fn committed(&mut self, at: Instant) {
        self.last = Some(at);
    }
}

enum Work {
    Batch(Vec<Inbound>),
    Expire,
    Presence(Vec<SessionEvent>),
}
