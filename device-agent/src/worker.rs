//! The job worker of one device: one job at a time (claim 37).
//!
//! Orders arrive from the session as they come off the relay. Each is gated ([`jobs::gate`]):
//! orders for another device, or already taken or finished, are dropped; an order whose
//! instruction time is still ahead is reported `delivered` and parked on a timer (S108–S109);
//! the rest queue. The worker runs the queue in order, and while it runs a job and commits the
//! result it takes no other: later orders wait in its channel.
//!
//! A firmware job parks a second time once `staged`, until its execution time; meanwhile other
//! jobs run. An order the relay empties (canceled, timed out) is dropped if it is still waiting,
//! and signalled to the job if it is running. In a periodic session, jobs waiting for their
//! instruction time start only during a check-in. At start, a firmware write that a power cut
//! interrupted is taken up first, before the session connects.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use protocol::job::{JobOrder, JobSpec, JobStatus};
use protocol::{JobId, Serial, Timestamp};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::jobs::{self, Gate, Ignored, Job, JobCtx, JobEnv, Known, Phase, Step, download};
use crate::relay::Inbox;
use crate::store::WriteIntent;

/// What the session hands the worker.
#[derive(Debug)]
pub enum WorkerMsg {
    /// A retained order arrived on `dev/{serial}/jobs/{in_topic}`.
    Order { order: JobOrder, in_topic: JobId },
    /// The relay emptied the job's retained order: it ended there (done, canceled or timed out).
    Ended(JobId),
}

/// The longest the worker sleeps before looking at the wall clock again, so a clock that is set
/// while a job waits does not leave it waiting on a stale timer.
const MAX_NAP: Duration = Duration::from_secs(60);

/// A job waiting for a time.
struct Parked {
    order: JobOrder,
    /// `Instruction`: not started yet; `Execution`: a staged firmware job.
    phase: Phase,
}

pub struct Worker {
    env: JobEnv,
    inbox: Inbox,
    rx: mpsc::UnboundedReceiver<WorkerMsg>,
    /// How many jobs are queued or running, for the session: a periodic check-in lasts until 0.
    busy: watch::Sender<usize>,
    /// Whether jobs waiting for their instruction time may start (see [`crate::relay::SessionEnds`]).
    release: watch::Receiver<bool>,
    /// Waiting, queued or running: a redelivered order for one of these is a duplicate.
    taken: HashSet<JobId>,
    /// Jobs waiting for a time, by (time, arrival), so equal times keep their order.
    waiting: BTreeMap<(Timestamp, u64), Parked>,
    ready: VecDeque<(JobOrder, Phase)>,
    arrivals: u64,
    recover: Option<WriteIntent>,
}

impl Worker {
    /// `recover`: the write-intent found at start, if any (the session then starts suspended).
    pub fn new(
        env: JobEnv,
        inbox: Inbox,
        rx: mpsc::UnboundedReceiver<WorkerMsg>,
        busy: watch::Sender<usize>,
        recover: Option<WriteIntent>,
    ) -> Worker {
        let release = env.relay.release();
        Worker {
            env,
            inbox,
            rx,
            busy,
            release,
            taken: HashSet::new(),
            waiting: BTreeMap::new(),
            ready: VecDeque::new(),
            arrivals: 0,
            recover,
        }
    }

    fn serial(&self) -> &Serial {
        self.env.serial()
    }

    fn set_busy(&self, running: bool) {
        self.busy
            .send_replace(self.ready.len() + usize::from(running));
    }

    /// Runs until `stop` or until the session goes away.
    pub async fn run(mut self) {
        if let Some(intent) = self.recover.take() {
            self.take_up(intent).await;
        }
        let stop = self.env.stop.clone();
        let mut release_alive = true;
        loop {
            if !self.ready.is_empty() && self.env.relay.jobs_held() {
                // A fatal fault's alarm goes to the relay first (Fig. 5, S305).
                self.set_busy(true);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.env.relay.jobs_released() => {}
                }
            }
            if let Some((order, phase)) = self.ready.pop_front() {
                self.set_busy(true);
                if !self.execute(order, phase).await {
                    return;
                }
                continue;
            }
            self.set_busy(false);
            let wake = self.next_release().map(|at| {
                let ahead = (at - chrono::Utc::now()).to_std().unwrap_or_default();
                Instant::now() + ahead.min(MAX_NAP)
            });
            tokio::select! {
                () = stop.cancelled() => return,
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => return,
                },
                Some(msg) = self.inbox.recv() => self.inbox.stash(msg),
                changed = self.release.changed(), if release_alive => {
                    if changed.is_err() {
                        release_alive = false;
                    }
                    self.release_due(chrono::Utc::now());
                }
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    self.release_due(chrono::Utc::now());
                }
            }
        }
    }

    /// A write-intent was found at start: finish that job before anything else.
    async fn take_up(&mut self, intent: WriteIntent) {
        let job = intent.order.job.clone();
        match self.env.outbox.is_finished(self.serial(), &job).await {
            Ok(true) => {
                // The power cut came after the result was committed: only the intent is left.
                info!(serial = %self.serial(), job = %job, "write-intent of a finished job cleared");
                if let Err(e) = self.env.store.clear_write_intent(self.serial()).await {
                    warn!(serial = %self.serial(), error = %e, "could not clear the write-intent");
                }
                self.env.relay.resume();
            }
            _ => {
                self.taken.insert(job);
                self.ready
                    .push_front((intent.order.clone(), Phase::Recover(Box::new(intent))));
            }
        }
    }

    async fn handle(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Order { order, in_topic } => self.arrive(order, in_topic).await,
            WorkerMsg::Ended(job) => self.ended(&job).await,
        }
    }

    async fn known(&self, job: &JobId) -> Known {
        if self.taken.contains(job) {
            return Known::Taken;
        }
        match self.env.outbox.is_finished(self.serial(), job).await {
            Ok(true) => Known::Finished,
            Ok(false) => Known::New,
            Err(e) => {
                // Running a job twice is the lesser harm: the relay ignores a second final report.
                warn!(serial = %self.serial(), job = %job, error = %e, "could not check whether the job already ran");
                Known::New
            }
        }
    }

    async fn arrive(&mut self, order: JobOrder, in_topic: JobId) {
        let known = self.known(&in_topic).await;
        let now = chrono::Utc::now();
        let serial = self.serial().clone();
        match jobs::gate(&order, &serial, &in_topic, known, now) {
            Gate::Ignore(why @ (Ignored::ForeignSerial { .. } | Ignored::TopicMismatch { .. })) => {
                warn!(serial = %serial, job = %in_topic, reason = %why.describe(), "job order ignored");
            }
            Gate::Ignore(why) => {
                debug!(serial = %serial, job = %in_topic, reason = %why.describe(), "job order ignored");
            }
            Gate::RunNow => {
                info!(serial = %serial, job = %order.job, kind = %order.spec.kind_name(), "job received");
                self.taken.insert(order.job.clone());
                self.ready.push_back((order, Phase::Instruction));
            }
            Gate::Wait { until } => {
                info!(
                    serial = %serial, job = %order.job, kind = %order.spec.kind_name(),
                    instruction_time = %until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "job received"
                );
                self.taken.insert(order.job.clone());
                let note = format!(
                    "waiting for its instruction time {}",
                    until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                self.env
                    .report
                    .status_until_stored(
                        &order.job,
                        JobStatus::Delivered,
                        Some(note),
                        &self.env.stop,
                    )
                    .await;
                self.park(until, order, Phase::Instruction);
            }
        }
    }

    fn park(&mut self, until: Timestamp, order: JobOrder, phase: Phase) {
        self.arrivals += 1;
        self.waiting
            .insert((until, self.arrivals), Parked { order, phase });
    }

    /// The relay ended a job we still hold (canceled or timed out while it waited): drop it.
    async fn ended(&mut self, job: &JobId) {
        let mut dropped: Vec<JobOrder> = Vec::new();
        let keys: Vec<_> = self
            .waiting
            .iter()
            .filter(|(_, p)| &p.order.job == job)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(p) = self.waiting.remove(&k) {
                dropped.push(p.order);
            }
        }
        let (gone, kept): (VecDeque<_>, VecDeque<_>) =
            self.ready.drain(..).partition(|(o, _)| &o.job == job);
        self.ready = kept;
        dropped.extend(gone.into_iter().map(|(o, _)| o));
        let Some(order) = dropped.pop() else {
            return;
        };
        self.taken.remove(job);
        self.inbox.forget(job);
        info!(serial = %self.serial(), job = %job, "job dropped: order withdrawn");
        if let JobSpec::Firmware { artifact } = &order.spec {
            download::forget(&self.env, &artifact.id).await;
        }
    }

    /// When the next waiting job may start, given whether instruction times are honoured now.
    fn next_release(&self) -> Option<Timestamp> {
        let open = *self.release.borrow();
        self.waiting
            .iter()
            .find(|(_, p)| open || p.phase == Phase::Execution)
            .map(|(k, _)| k.0)
    }

    fn release_due(&mut self, now: Timestamp) {
        let open = *self.release.borrow();
        let due: Vec<_> = self
            .waiting
            .iter()
            .take_while(|(k, _)| k.0 <= now)
            .filter(|(_, p)| open || p.phase == Phase::Execution)
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            if let Some(p) = self.waiting.remove(&k) {
                self.ready.push_back((p.order, p.phase));
            }
        }
    }

    /// Runs one job (or phase of one) to where it ends or parks. While it runs, an emptied order
    /// for it is passed to it; other messages wait until it is done. False: the agent is stopping.
    async fn execute(&mut self, order: JobOrder, phase: Phase) -> bool {
        let job = Job::from_spec(&order.spec);
        let serial = self.serial().clone();
        info!(serial = %serial, job = %order.job, kind = %job.kind_name(), phase = ?PhaseName(&phase), "job started");
        if job.worker_reports_start(&phase) {
            self.env
                .report
                .status_until_stored(&order.job, JobStatus::InProgress, None, &self.env.stop)
                .await;
        }
        let withdrawn = CancellationToken::new();
        let mut deferred = Vec::new();
        let step = {
            let Worker { env, inbox, rx, .. } = self;
            let env: &JobEnv = env;
            let mut ctx = JobCtx {
                order: &order,
                env,
                inbox,
                withdrawn: &withdrawn,
            };
            let run = job.run(&mut ctx, phase);
            tokio::pin!(run);
            let mut session_alive = true;
            loop {
                tokio::select! {
                    step = &mut run => break Some(step),
                    () = env.stop.cancelled() => break None,
                    msg = rx.recv(), if session_alive => match msg {
                        Some(WorkerMsg::Ended(j)) if j == order.job => withdrawn.cancel(),
                        Some(other) => deferred.push(other),
                        None => session_alive = false,
                    },
                }
            }
        };
        let Some(step) = step else {
            return false;
        };
        let mut parked = false;
        match step {
            Step::Done(outcome) => {
                let status = outcome.status;
                if let Some(note) = &outcome.note
                    && status == JobStatus::Failed
                {
                    warn!(serial = %serial, job = %order.job, note = %note, "job failed");
                }
                self.env
                    .report
                    .update_until_stored(outcome.into_update(&order.job), &self.env.stop)
                    .await;
                info!(serial = %serial, job = %order.job, status = %status, "job finished");
            }
            Step::Reported(status) => {
                info!(serial = %serial, job = %order.job, status = %status, "job finished");
            }
            Step::Park { until } => {
                info!(
                    serial = %serial, job = %order.job,
                    execution_time = %until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "job waits for its execution time"
                );
                self.park(until, order.clone(), Phase::Execution);
                parked = true;
            }
            Step::Dropped if self.env.stop.is_cancelled() => return false,
            Step::Dropped => {
                info!(serial = %serial, job = %order.job, "job dropped: order withdrawn");
            }
        }
        if !parked {
            self.taken.remove(&order.job);
            self.inbox.forget(&order.job);
        }
        for msg in deferred {
            self.handle(msg).await;
        }
        true
    }
}

/// The phase, briefly, for logs.
struct PhaseName<'a>(&'a Phase);

impl std::fmt::Debug for PhaseName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Phase::Instruction => "instruction",
            Phase::Execution => "execution",
            Phase::Recover(_) => "recover",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Device, DeviceError, shared};
    use crate::outbox::{Outbox, Pending};
    use crate::report::Reporter;
    use protocol::Envelope;
    use protocol::data::{DeviceData, Section};
    use protocol::device::{DeviceState, JobUpdate};
    use protocol::job::JobSpec;
    use std::sync::{Arc, Mutex};

    /// A device that counts its reads and can be held busy, to see what runs when.
    #[derive(Clone, Default)]
    struct Probe {
        reads: Arc<Mutex<Vec<Vec<Section>>>>,
    }
    impl Device for Probe {
        fn state(&self) -> DeviceState {
            DeviceState::default()
        }
        fn read(&mut self, sections: &[Section]) -> Result<DeviceData, DeviceError> {
            self.reads.lock().unwrap().push(sections.to_vec());
            Ok(DeviceData::new())
        }
    }

    struct Rig {
        tx: mpsc::UnboundedSender<WorkerMsg>,
        sent: mpsc::UnboundedReceiver<Pending>,
        probe: Probe,
        outbox: Outbox,
        stop: CancellationToken,
        session: crate::relay::SessionEnds,
        busy: watch::Receiver<usize>,
        _dir: tempfile::TempDir,
    }

    /// A worker in a persistent session (instruction times honoured at once).
    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("agent.redb")).unwrap();
        let (to_session, sent) = mpsc::unbounded_channel();
        let report = Reporter::new(Serial::parse("C1").unwrap(), outbox.clone(), to_session);
        let probe = Probe::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let (relay, session) = crate::relay::pair();
        session.release.send_replace(true);
        let (_, inbox) = crate::relay::inbox();
        let (busy_tx, busy) = watch::channel(0);
        let env = JobEnv {
            device: shared(probe.clone()),
            report,
            relay,
            store: outbox.store(),
            outbox: outbox.clone(),
            home: dir.path().to_owned(),
            publisher: None,
            fetch_timeout: Duration::from_secs(1),
            stop: stop.clone(),
        };
        let worker = Worker::new(env, inbox, rx, busy_tx, None);
        tokio::spawn(worker.run());
        Rig {
            tx,
            sent,
            probe,
            outbox,
            stop,
            session,
            busy,
            _dir: dir,
        }
    }

    fn order(serial: &str, job: &str, at: Timestamp) -> WorkerMsg {
        let job = JobId::parse(job).unwrap();
        WorkerMsg::Order {
            order: JobOrder {
                job: job.clone(),
                serial: Serial::parse(serial).unwrap(),
                spec: JobSpec::GetData {
                    sections: vec![Section::Counters],
                },
                instruction_time: at,
                execution_time: None,
                deadline: None,
                max_attempts: 1,
            },
            in_topic: job,
        }
    }

    async fn next_update(rig: &mut Rig) -> (JobUpdate, Timestamp) {
        let p = tokio::time::timeout(Duration::from_secs(10), rig.sent.recv())
            .await
            .expect("no report within 10 s")
            .expect("reporter gone");
        let env: Envelope<JobUpdate> = Envelope::from_cbor(&p.payload, 1 << 20).unwrap();
        (env.body, chrono::Utc::now())
    }

    fn statuses(updates: &[(JobUpdate, Timestamp)]) -> Vec<(String, JobStatus)> {
        updates
            .iter()
            .map(|(u, _)| (u.job.to_string(), u.status))
            .collect()
    }

    #[tokio::test]
    async fn a_due_job_runs_and_reports_in_progress_then_succeeded() {
        let mut rig = rig();
        rig.tx.send(order("C1", "J1", chrono::Utc::now())).unwrap();
        let a = next_update(&mut rig).await;
        let b = next_update(&mut rig).await;
        assert_eq!(
            statuses(&[a, b.clone()]),
            [
                ("J1".into(), JobStatus::InProgress),
                ("J1".into(), JobStatus::Succeeded)
            ]
        );
        assert!(
            b.0.data.is_some(),
            "get-data sends its data with the final report"
        );
        assert!(
            rig.outbox
                .is_finished(&Serial::parse("C1").unwrap(), &JobId::parse("J1").unwrap())
                .await
                .unwrap()
        );
        rig.stop.cancel();
    }

    #[tokio::test]
    async fn a_future_job_is_delivered_then_waits_for_its_time() {
        let mut rig = rig();
        let at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
        rig.tx.send(order("C1", "J1", at)).unwrap();
        let (delivered, _) = next_update(&mut rig).await;
        assert_eq!(delivered.status, JobStatus::Delivered);
        assert!(
            rig.probe.reads.lock().unwrap().is_empty(),
            "must not read the device before its time"
        );
        let (started, when) = next_update(&mut rig).await;
        assert_eq!(started.status, JobStatus::InProgress);
        assert!(
            when >= at,
            "ran at {when}, before its instruction time {at}"
        );
        assert_eq!(next_update(&mut rig).await.0.status, JobStatus::Succeeded);
        rig.stop.cancel();
    }

    #[tokio::test]
    async fn foreign_finished_and_duplicate_orders_do_not_run() {
        let mut rig = rig();
        let now = chrono::Utc::now();
        rig.tx.send(order("C2", "J0", now)).unwrap(); // claims 8–9: not ours
        rig.tx.send(order("C1", "J1", now)).unwrap();
        rig.tx.send(order("C1", "J1", now)).unwrap(); // redelivered while taken
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(next_update(&mut rig).await);
        }
        // J1 finished; its retained copy comes again, then a sentinel proves the worker moved on.
        rig.tx.send(order("C1", "J1", now)).unwrap();
        rig.tx.send(order("C1", "J9", now)).unwrap();
        for _ in 0..2 {
            seen.push(next_update(&mut rig).await);
        }
        assert_eq!(
            statuses(&seen),
            [
                ("J1".into(), JobStatus::InProgress),
                ("J1".into(), JobStatus::Succeeded),
                ("J9".into(), JobStatus::InProgress),
                ("J9".into(), JobStatus::Succeeded),
            ]
        );
        assert_eq!(
            rig.probe.reads.lock().unwrap().len(),
            2,
            "the device was read once for J1 and once for J9"
        );
        rig.stop.cancel();
    }

    #[tokio::test]
    async fn jobs_run_one_at_a_time_in_order() {
        let mut rig = rig();
        let now = chrono::Utc::now();
        for j in ["J1", "J2", "J3"] {
            rig.tx.send(order("C1", j, now)).unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(next_update(&mut rig).await);
        }
        let want: Vec<(String, JobStatus)> = ["J1", "J2", "J3"]
            .iter()
            .flat_map(|j| {
                [
                    (j.to_string(), JobStatus::InProgress),
                    (j.to_string(), JobStatus::Succeeded),
                ]
            })
            .collect();
        assert_eq!(
            statuses(&seen),
            want,
            "a job starts only after the previous one reported its end"
        );
        rig.stop.cancel();
    }

    #[tokio::test]
    async fn a_waiting_job_ended_by_the_relay_is_dropped() {
        let mut rig = rig();
        let at = chrono::Utc::now() + chrono::Duration::milliseconds(800);
        rig.tx.send(order("C1", "J1", at)).unwrap();
        assert_eq!(next_update(&mut rig).await.0.status, JobStatus::Delivered);
        rig.tx
            .send(WorkerMsg::Ended(JobId::parse("J1").unwrap()))
            .unwrap();
        // A sentinel due after J1's time: if J1 still ran, its reports would come first.
        let sentinel_at = at + chrono::Duration::milliseconds(400);
        rig.tx.send(order("C1", "J2", sentinel_at)).unwrap();
        assert_eq!(
            statuses(&[next_update(&mut rig).await]),
            [("J2".into(), JobStatus::Delivered)]
        );
        assert_eq!(
            statuses(&[next_update(&mut rig).await]),
            [("J2".into(), JobStatus::InProgress)]
        );
        assert_eq!(
            statuses(&[next_update(&mut rig).await]),
            [("J2".into(), JobStatus::Succeeded)]
        );
        let reads = rig.probe.reads.lock().unwrap().len();
        assert_eq!(reads, 1, "only J2 read the device");
        rig.stop.cancel();
    }

    #[tokio::test]
    async fn in_a_periodic_session_a_waiting_job_starts_at_the_next_check_in() {
        let mut rig = rig();
        rig.session.release.send_replace(false); // between check-ins
        let at = chrono::Utc::now() + chrono::Duration::milliseconds(300);
        rig.tx.send(order("C1", "J1", at)).unwrap();
        assert_eq!(next_update(&mut rig).await.0.status, JobStatus::Delivered);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            rig.sent.try_recv().is_err() && rig.probe.reads.lock().unwrap().is_empty(),
            "due, but no check-in yet: it must wait"
        );
        assert_eq!(
            *rig.busy.borrow(),
            0,
            "a waiting job does not hold a check-in open"
        );
        rig.session.release.send_replace(true); // the check-in
        assert_eq!(next_update(&mut rig).await.0.status, JobStatus::InProgress);
        assert_eq!(next_update(&mut rig).await.0.status, JobStatus::Succeeded);
        rig.busy
            .wait_for(|n| *n == 0)
            .await
            .expect("the worker reports itself idle");
        rig.stop.cancel();
    }
}
