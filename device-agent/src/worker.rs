//! The job worker of one device: one job at a time (claim 37).
//!
//! Orders arrive from the session as they come off the relay. Each is gated ([`jobs::gate`]):
//! orders for another device, or already taken or finished, are dropped; an order whose
//! instruction time is still ahead is reported `delivered` and parked on a timer (S108–S109);
//! the rest queue. The worker runs the queue in order, and while it runs a job and commits the
//! result it takes no other: later orders wait in its channel.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use protocol::job::{JobOrder, JobStatus};
use protocol::{JobId, Serial, Timestamp};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::device::SharedDevice;
use crate::jobs::{self, Gate, Ignored, Job, JobCtx, Known};
use crate::outbox::{Outbox, OutboxError};
use crate::report::Reporter;

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
/// Pause between attempts when the outbox cannot commit (disk full, I/O error).
const STORE_RETRY: Duration = Duration::from_secs(5);

pub struct Worker {
    serial: Serial,
    device: SharedDevice,
    report: Reporter,
    outbox: Outbox,
    rx: mpsc::UnboundedReceiver<WorkerMsg>,
    stop: CancellationToken,
    /// Waiting, queued or running: a redelivered order for one of these is a duplicate.
    taken: HashSet<JobId>,
    /// Orders whose instruction time is ahead, by (time, arrival), so equal times keep their order.
    waiting: BTreeMap<(Timestamp, u64), JobOrder>,
    ready: VecDeque<JobOrder>,
    arrivals: u64,
}

impl Worker {
    pub fn new(
        device: SharedDevice,
        report: Reporter,
        outbox: Outbox,
        rx: mpsc::UnboundedReceiver<WorkerMsg>,
        stop: CancellationToken,
    ) -> Worker {
        Worker {
            serial: report.serial().clone(),
            device,
            report,
            outbox,
            rx,
            stop,
            taken: HashSet::new(),
            waiting: BTreeMap::new(),
            ready: VecDeque::new(),
            arrivals: 0,
        }
    }

    /// Runs until `stop` or until the session goes away.
    pub async fn run(mut self) {
        loop {
            if let Some(order) = self.ready.pop_front() {
                let stop = self.stop.clone();
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.execute(order) => {}
                }
                continue;
            }
            let wake = self.waiting.keys().next().map(|(at, _)| {
                let ahead = (*at - chrono::Utc::now()).to_std().unwrap_or_default();
                Instant::now() + ahead.min(MAX_NAP)
            });
            tokio::select! {
                () = self.stop.cancelled() => return,
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => return,
                },
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    self.release_due(chrono::Utc::now());
                }
            }
        }
    }

    async fn handle(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Order { order, in_topic } => self.arrive(order, in_topic).await,
            WorkerMsg::Ended(job) => self.ended(&job),
        }
    }

    async fn known(&self, job: &JobId) -> Known {
        if self.taken.contains(job) {
            return Known::Taken;
        }
        match self.outbox.is_finished(&self.serial, job).await {
            Ok(true) => Known::Finished,
            Ok(false) => Known::New,
            Err(e) => {
                // Running a job twice is the lesser harm: the relay ignores a second final report.
                warn!(serial = %self.serial, job = %job, error = %e, "could not check whether the job already ran");
                Known::New
            }
        }
    }

    async fn arrive(&mut self, order: JobOrder, in_topic: JobId) {
        let known = self.known(&in_topic).await;
        let now = chrono::Utc::now();
        match jobs::gate(&order, &self.serial, &in_topic, known, now) {
            Gate::Ignore(why @ (Ignored::ForeignSerial { .. } | Ignored::TopicMismatch { .. })) => {
                warn!(serial = %self.serial, job = %in_topic, reason = %why.describe(), "job order ignored");
            }
            Gate::Ignore(why) => {
                debug!(serial = %self.serial, job = %in_topic, reason = %why.describe(), "job order ignored");
            }
            Gate::RunNow => {
                info!(serial = %self.serial, job = %order.job, kind = %order.spec.kind_name(), "job received");
                self.taken.insert(order.job.clone());
                self.ready.push_back(order);
            }
            Gate::Wait { until } => {
                info!(
                    serial = %self.serial, job = %order.job, kind = %order.spec.kind_name(),
                    instruction_time = %until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "job received"
                );
                self.taken.insert(order.job.clone());
                let note = format!(
                    "waiting for its instruction time {}",
                    until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                self.report_until_stored(&order.job, JobStatus::Delivered, Some(note), None)
                    .await;
                self.arrivals += 1;
                self.waiting.insert((until, self.arrivals), order);
            }
        }
    }

    /// The relay ended a job we still hold (canceled or timed out while it waited): drop it.
    fn ended(&mut self, job: &JobId) {
        let before = self.waiting.len() + self.ready.len();
        self.waiting.retain(|_, o| &o.job != job);
        self.ready.retain(|o| &o.job != job);
        if self.waiting.len() + self.ready.len() < before {
            self.taken.remove(job);
            info!(serial = %self.serial, job = %job, "job ended by the relay before it ran; dropped");
        }
    }

    fn release_due(&mut self, now: Timestamp) {
        while let Some(entry) = self.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }

    /// Runs one job: `in-progress`, the work, then the final report, which also marks the job
    /// finished in the same commit.
    async fn execute(&mut self, order: JobOrder) {
        let job = Job::from_spec(&order.spec);
        info!(serial = %self.serial, job = %order.job, kind = %job.kind_name(), "job started");
        self.report_until_stored(&order.job, JobStatus::InProgress, None, None)
            .await;
        let ctx = JobCtx {
            job: &order.job,
            device: &self.device,
            report: &self.report,
        };
        let outcome = job.run(&ctx).await;
        let status = outcome.status;
        if let Some(note) = &outcome.note {
            warn!(serial = %self.serial, job = %order.job, note = %note, "job failed");
        }
        self.report_until_stored(&order.job, status, outcome.note, outcome.data)
            .await;
        self.taken.remove(&order.job);
        info!(serial = %self.serial, job = %order.job, status = %status, "job finished");
    }

    /// A report must not be lost: if the store cannot commit it, try again until it can or we
    /// are told to stop (then the job runs again after the restart, as it never finished).
    async fn report_until_stored(
        &self,
        job: &JobId,
        status: JobStatus,
        note: Option<String>,
        data: Option<protocol::data::DeviceData>,
    ) {
        loop {
            match self
                .report
                .job(job, status, note.clone(), data.clone())
                .await
            {
                Ok(_) => return,
                Err(OutboxError::Closed) => return,
                Err(e) => {
                    error!(serial = %self.serial, job = %job, status = %status, error = %e, "could not store a job report; retrying");
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = sleep(STORE_RETRY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Device, DeviceError, shared};
    use crate::outbox::Pending;
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
        _dir: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("agent.redb")).unwrap();
        let (to_session, sent) = mpsc::unbounded_channel();
        let report = Reporter::new(Serial::parse("C1").unwrap(), outbox.clone(), to_session);
        let probe = Probe::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let worker = Worker::new(
            shared(probe.clone()),
            report,
            outbox.clone(),
            rx,
            stop.clone(),
        );
        tokio::spawn(worker.run());
        Rig {
            tx,
            sent,
            probe,
            outbox,
            stop,
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
}
