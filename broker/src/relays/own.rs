//! Jobs the parent files for this child itself (`jobs submit --relay R1`): its own status
//! (get-data) and its own program (firmware, claim 22; the supervisor's side is
//! [`crate::program`]).
//!
//! A firmware job for the child runs like a device's: the publisher's signature is checked
//! first (the parent stores and forwards the artifact but cannot forge it), the image comes
//! through the uplink as a device's does (fetch requests up, chunks down on
//! `relay/{id}/down/dev/{id}/blob/…`), its SHA-256 must be the artifact's id, and at the job's
//! execution time the relay exits to be restarted into it. The new program confirms itself once
//! its uplink is subscribed at the parent, then reports the job succeeded with its own digest; a
//! program that fails its trial is replaced by the old one, which reports the job failed with the
//! supervisor's reason.
//!
//! Answers are queued like a device's messages, numbered `job number × 4 + step` (delivered,
//! staged, in progress, the result): the parent deduplicates each by that id, so an answer queued
//! again (a re-sent order, a restart halfway) is stored once.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pki::publisher::{PublisherKey, check_signature};
use protocol::artifact::{ArtifactId, ArtifactRef, Chunk, FetchRequest, MAX_CHUNKS_PER_FETCH};
use protocol::data::{DeviceData, Section, SectionData, Value};
use protocol::device::JobUpdate;
use protocol::job::{JobOrder, JobSpec, JobStatus};
use protocol::topic::UpKind;
use protocol::{Envelope, JobId, RelayId, Serial};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::uplink::Link;
use crate::program::{ProgramDir, UpdateRecord, UpdateState, sha256_file};
use crate::store::Store;
use crate::telemetry::CoreStats;

/// What the child needs to replace its own program.
#[derive(Clone, Default)]
pub struct OwnSettings {
    /// Set by `broker supervise` (through the environment): where the programs are.
    pub program: Option<ProgramDir>,
    /// The publisher key an artifact's signature must verify with.
    pub publisher: Option<PublisherKey>,
    /// Set before `stop_all` is cancelled to restart into a staged program.
    pub restart: Arc<AtomicBool>,
    /// The whole relay's stop.
    pub stop_all: CancellationToken,
}

/// What the uplink hands this task.
#[derive(Debug)]
pub(super) enum OwnMessage {
    /// A job order (`dev/{id}/jobs/{job}`); empty when the job ended or was canceled.
    Order { job: String, payload: Vec<u8> },
    /// A firmware chunk the parent answered a fetch with.
    Chunk(Vec<u8>),
}

/// A chunk fetch not answered within this is asked again.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest order or chunk decoded.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Why an update stopped before its restart.
enum Halt {
    Failed(String),
    Canceled,
    Shutdown,
}

/// The step of a job an answer is: its message id is `job number × 4 + step`.
#[derive(Clone, Copy)]
enum Step {
    Delivered = 0,
    Staged = 1,
    InProgress = 2,
    Result = 3,
}

pub(super) struct OwnJobs {
    pub(super) relay: RelayId,
    pub(super) store: Arc<dyn Store>,
    pub(super) stats: Arc<CoreStats>,
    pub(super) wake: Arc<Notify>,
    pub(super) settings: OwnSettings,
    pub(super) up: watch::Receiver<Link>,
    pub(super) rx: mpsc::Receiver<OwnMessage>,
}

impl OwnJobs {
    pub(super) async fn run(mut self, stop: CancellationToken) {
        let Ok(serial) = Serial::parse(self.relay.as_str()) else {
            warn!(relay = %self.relay, "this relay's id is not a serial a job can name; jobs for the relay itself are not taken");
            return;
        };
        let program = own_program().await;
        let version = self.installed_version(program.as_ref());
        let mut me = Me {
            serial,
            program,
            version,
        };
        match self.resume(&mut me, &stop).await {
            Ok(()) | Err(Halt::Canceled) => {}
            Err(Halt::Shutdown) => return,
            Err(Halt::Failed(reason)) => {
                warn!(relay = %self.relay, reason, "the update in hand could not be finished")
            }
        }
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => return,
                m = self.rx.recv() => m,
            };
            match msg {
                None => return,
                Some(OwnMessage::Order { payload, .. }) => {
                    if self.order(&mut me, &payload, &stop).await.is_err() {
                        return;
                    }
                }
                Some(OwnMessage::Chunk(_)) => {} // a late chunk of a finished download
            }
        }
    }

    /// The version label of the running program, if an update installed it.
    fn installed_version(&self, program: Option<&ArtifactId>) -> Option<String> {
        let record = self.settings.program.as_ref()?.read_update().ok()??;
        (Some(&record.artifact) == program).then_some(record.version)
    }

    /// Takes a job order. `Err` only when the relay is stopping.
    async fn order(
        &mut self,
        me: &mut Me,
        payload: &[u8],
        stop: &CancellationToken,
    ) -> Result<(), ()> {
        let Some(order) = self.decode(payload) else {
            return Ok(());
        };
        match &order.spec {
            JobSpec::GetData { .. } => self.answer_get_data(me, &order),
            JobSpec::Firmware { artifact } => match self.update(me, &order, artifact, stop).await {
                Ok(()) | Err(Halt::Canceled) => {}
                Err(Halt::Shutdown) => return Err(()),
                Err(Halt::Failed(reason)) => {
                    warn!(relay = %self.relay, job = %order.job, reason, "the update of this relay's program failed");
                    self.answer(
                        me,
                        &order.job,
                        Step::Result,
                        JobStatus::Failed,
                        Some(reason),
                        None,
                    );
                }
            },
            _ => self.answer(
                me,
                &order.job,
                Step::Result,
                JobStatus::Failed,
                Some(format!(
                    "a child relay runs get-data and firmware jobs for itself, not {}",
                    order.spec.kind_name()
                )),
                None,
            ),
        }
        Ok(())
    }

    fn decode(&self, payload: &[u8]) -> Option<JobOrder> {
        if payload.is_empty() {
            return None; // the job ended: its retained order was emptied
        }
        match Envelope::<JobOrder>::from_cbor(payload, MAX_MESSAGE_BYTES) {
            Ok(env) => Some(env.body),
            Err(e) => {
                warn!(relay = %self.relay, error = %e, "unreadable job order for this relay itself; ignored");
                None
            }
        }
    }

    /// A get-data job reads the child's own status: its program, version and devices.
    fn answer_get_data(&self, me: &Me, order: &JobOrder) {
        let get = |c: &std::sync::atomic::AtomicU64| {
            Value::Int(i64::try_from(c.load(Ordering::Relaxed)).unwrap_or(i64::MAX))
        };
        let comms = SectionData::from([
            ("devices_online".to_owned(), get(&self.stats.devices_online)),
            ("uplink_waiting".to_owned(), waiting(&*self.store)),
            ("uplink_acked".to_owned(), get(&self.stats.uplink_acked)),
        ]);
        let data = DeviceData::from([
            (Section::Identification, me.identification(&self.relay)),
            (Section::Comms, comms),
        ]);
        self.answer(
            me,
            &order.job,
            Step::Result,
            JobStatus::Succeeded,
            Some("the child relay's own status".into()),
            Some(data),
        );
    }

    /// Queues an answer for the parent as this relay's own device would send it (a failure is
    /// logged; the parent sends the order again on the next connection).
    fn answer(
        &self,
        me: &Me,
        job: &JobId,
        step: Step,
        status: JobStatus,
        note: Option<String>,
        data: Option<DeviceData>,
    ) {
        self.try_answer(me, job, step, status, note, data);
    }

    /// [`Self::answer`], saying whether the answer is queued.
    fn try_answer(
        &self,
        me: &Me,
        job: &JobId,
        step: Step,
        status: JobStatus,
        note: Option<String>,
        data: Option<DeviceData>,
    ) -> bool {
        let Some(n) = crate::store::job_number(job.as_str()) else {
            return false;
        };
        let update = JobUpdate {
            job: job.clone(),
            status,
            note,
            data,
            errors: Default::default(),
        };
        let id = n.saturating_mul(4).saturating_add(step as u64);
        let queued = Envelope::new(id, chrono::Utc::now(), update)
            .to_cbor()
            .map_err(|e| e.to_string())
            .and_then(|bytes| self.push(&me.serial, UpKind::Job, &bytes));
        match queued {
            Ok(()) => {
                info!(relay = %self.relay, job = %job, status = %status, "answered a job for this relay itself");
                true
            }
            Err(e) => {
                warn!(relay = %self.relay, job = %job, error = %e, "could not queue the answer to a job for this relay; the parent resends the order on the next connection");
                false
            }
        }
    }

    fn push(&self, serial: &Serial, kind: UpKind, bytes: &[u8]) -> Result<(), String> {
        self.store
            .begin()
            .and_then(|mut txn| {
                txn.push_uplink(serial, kind.as_str(), bytes)?;
                txn.commit()
            })
            .map_err(|e| e.to_string())?;
        self.wake.notify_one();
        Ok(())
    }

    /// A firmware job for this relay: check, download, stage, and restart at the execution time.
    async fn update(
        &mut self,
        me: &mut Me,
        order: &JobOrder,
        artifact: &ArtifactRef,
        stop: &CancellationToken,
    ) -> Result<(), Halt> {
        let Some(dir) = self.settings.program.clone() else {
            return Err(Halt::Failed("this relay was not started by `broker supervise`, which keeps the old program to go back to; run it as `broker supervise --program-dir DIR -- …` to replace its program remotely".into()));
        };
        let record = dir.read_update().map_err(|e| Halt::Failed(e.to_string()))?;
        if record.is_some_and(|r| r.job == order.job) {
            // A re-sent order for the update in hand (its answer, if any, is queued).
            return Ok(());
        }
        let Some(key) = self.settings.publisher.as_ref() else {
            return Err(Halt::Failed("no publisher key: start the relay with --publisher-key FILE (publisher.pub of `host-agent keys generate`) so that it can check the program it is sent".into()));
        };
        check_signature(Some(key), artifact).map_err(Halt::Failed)?;
        if me.program.as_ref() == Some(&artifact.id) {
            let note = format!(
                "this relay already runs {} ({})",
                artifact.version, artifact.id
            );
            self.answer(
                me,
                &order.job,
                Step::Result,
                JobStatus::Succeeded,
                Some(note),
                None,
            );
            return Ok(());
        }
        self.answer(
            me,
            &order.job,
            Step::Delivered,
            JobStatus::Delivered,
            Some(format!("downloading {}", artifact.version)),
            None,
        );
        info!(relay = %self.relay, job = %order.job, version = %artifact.version, size = artifact.size, "downloading a new program for this relay");
        self.download(me, &dir, order, artifact, stop).await?;
        let record = UpdateRecord {
            job: order.job.clone(),
            artifact: artifact.id.clone(),
            version: artifact.version.clone(),
            execute_at: order.execution_time,
            state: UpdateState::Staged,
        };
        dir.write_update(&record)
            .map_err(|e| Halt::Failed(e.to_string()))?;
        self.answer(
            me,
            &order.job,
            Step::Staged,
            JobStatus::Staged,
            Some(format!("{} checked and staged", artifact.version)),
            None,
        );
        self.restart_into(me, &dir, record, stop).await
    }

    /// Waits for the execution time, then exits to be restarted into the staged program.
    async fn restart_into(
        &mut self,
        me: &Me,
        dir: &ProgramDir,
        mut record: UpdateRecord,
        stop: &CancellationToken,
    ) -> Result<(), Halt> {
        if let Some(at) = record.execute_at {
            let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
            if !wait.is_zero() {
                info!(relay = %self.relay, job = %record.job, at = %at, "the new program is staged; restarting into it at the execution time");
                self.wait_handling_orders(me, &record.job, Some(wait), stop)
                    .await?;
            }
        }
        let note = format!("restarting into {}", record.version);
        self.answer(
            me,
            &record.job,
            Step::InProgress,
            JobStatus::InProgress,
            Some(note),
            None,
        );
        record.state = UpdateState::Switch;
        dir.write_update(&record)
            .map_err(|e| Halt::Failed(e.to_string()))?;
        info!(relay = %self.relay, job = %record.job, version = %record.version, "stopping to restart into the new program");
        self.settings.restart.store(true, Ordering::SeqCst);
        self.settings.stop_all.cancel();
        Err(Halt::Shutdown)
    }

    /// Downloads the artifact into `DIR/next.part`, window by window, and stages it once its
    /// digest is the artifact's id.
    async fn download(
        &mut self,
        me: &Me,
        dir: &ProgramDir,
        order: &JobOrder,
        artifact: &ArtifactRef,
        stop: &CancellationToken,
    ) -> Result<(), Halt> {
        let part = dir.next_part();
        let file = std::fs::File::create(&part)
            .and_then(|f| f.set_len(artifact.size).map(|()| f))
            .map_err(|e| Halt::Failed(format!("could not create {}: {e}", part.display())))?;
        let total = artifact.chunks();
        let mut held = vec![false; total as usize];
        let mut left = total;
        while left > 0 {
            let window: Vec<u32> = (0..total)
                .filter(|&i| !held[i as usize])
                .take(MAX_CHUNKS_PER_FETCH)
                .collect();
            let request = FetchRequest {
                job: order.job.clone(),
                artifact: artifact.id.clone(),
                chunks: window.clone(),
            };
            let bytes = Envelope::new(0, chrono::Utc::now(), request)
                .to_cbor()
                .map_err(|e| Halt::Failed(e.to_string()))?;
            self.push(&me.serial, UpKind::Fetch, &bytes)
                .map_err(Halt::Failed)?;
            let until = tokio::time::Instant::now() + FETCH_TIMEOUT;
            while window.iter().any(|&i| !held[i as usize]) {
                let msg = tokio::select! {
                    () = stop.cancelled() => return Err(Halt::Shutdown),
                    () = tokio::time::sleep_until(until) => break, // asked again
                    m = self.rx.recv() => m.ok_or(Halt::Shutdown)?,
                };
                match msg {
                    OwnMessage::Chunk(payload) => {
                        if let Some(index) = self.write_chunk(&file, artifact, &held, &payload) {
                            held[index as usize] = true;
                            left -= 1;
                        }
                    }
                    OwnMessage::Order { job, payload } => {
                        self.order_meanwhile(me, &order.job, &job, &payload)?
                    }
                }
            }
        }
        file.sync_all()
            .map_err(|e| Halt::Failed(format!("could not write {}: {e}", part.display())))?;
        drop(file);
        let digest = {
            let part = part.clone();
            tokio::task::spawn_blocking(move || sha256_file(&part))
                .await
                .map_err(|e| Halt::Failed(e.to_string()))?
                .map_err(|e| Halt::Failed(e.to_string()))?
        };
        if digest != artifact.id {
            let _ = std::fs::remove_file(&part);
            return Err(Halt::Failed(format!(
                "digest mismatch: the downloaded program does not hash to {}; the artifact at the parent is damaged or was tampered with",
                artifact.id
            )));
        }
        dir.stage(&part).map_err(|e| Halt::Failed(e.to_string()))
    }

    /// Writes a chunk in place; its index if it was one still wanted.
    fn write_chunk(
        &self,
        file: &std::fs::File,
        artifact: &ArtifactRef,
        held: &[bool],
        payload: &[u8],
    ) -> Option<u32> {
        let chunk = match Envelope::<Chunk>::from_cbor(payload, MAX_MESSAGE_BYTES) {
            Ok(env) => env.body,
            Err(e) => {
                warn!(relay = %self.relay, error = %e, "unreadable firmware chunk from the parent; asked again later");
                return None;
            }
        };
        let offset = u64::from(chunk.index) * u64::from(artifact.chunk_size);
        let expected = artifact
            .size
            .saturating_sub(offset)
            .min(u64::from(artifact.chunk_size));
        if chunk.artifact != artifact.id
            || chunk.index >= artifact.chunks()
            || held[chunk.index as usize]
            || chunk.data.len() as u64 != expected
        {
            return None;
        }
        match file.write_all_at(&chunk.data, offset) {
            Ok(()) => Some(chunk.index),
            Err(e) => {
                warn!(relay = %self.relay, error = %e, "could not write a firmware chunk; asked again later");
                None
            }
        }
    }

    /// An order that came while an update is in hand: the update's own order canceled stops it;
    /// a get-data is answered; another update must wait its turn.
    fn order_meanwhile(
        &self,
        me: &Me,
        in_hand: &JobId,
        job: &str,
        payload: &[u8],
    ) -> Result<(), Halt> {
        if payload.is_empty() {
            if job == in_hand.as_str() {
                info!(relay = %self.relay, job, "the update of this relay's program was canceled");
                if let Some(dir) = &self.settings.program {
                    let _ = std::fs::remove_file(dir.next_part());
                    let _ = std::fs::remove_file(dir.next());
                    let _ = dir.remove_update();
                }
                return Err(Halt::Canceled);
            }
            return Ok(());
        }
        let Some(order) = self.decode(payload) else {
            return Ok(());
        };
        match order.spec {
            JobSpec::GetData { .. } => self.answer_get_data(me, &order),
            _ if &order.job == in_hand => {}
            _ => self.answer(
                me,
                &order.job,
                Step::Result,
                JobStatus::Failed,
                Some(format!(
                    "this relay is busy with job {in_hand}, an update of its own program; submit again once it has ended"
                )),
                None,
            ),
        }
        Ok(())
    }

    /// Waits (`None`: until the uplink is up) while answering orders.
    async fn wait_handling_orders(
        &mut self,
        me: &Me,
        in_hand: &JobId,
        wait: Option<Duration>,
        stop: &CancellationToken,
    ) -> Result<(), Halt> {
        let sleep = tokio::time::sleep(wait.unwrap_or(Duration::MAX / 4));
        tokio::pin!(sleep);
        let mut up = self.up.clone();
        loop {
            if wait.is_none() && up.borrow_and_update().up {
                return Ok(());
            }
            tokio::select! {
                () = stop.cancelled() => return Err(Halt::Shutdown),
                () = &mut sleep => return Ok(()),
                changed = up.changed(), if wait.is_none() => {
                    if changed.is_err() {
                        return Err(Halt::Shutdown);
                    }
                }
                m = self.rx.recv() => match m.ok_or(Halt::Shutdown)? {
                    OwnMessage::Order { job, payload } => self.order_meanwhile(me, in_hand, &job, &payload)?,
                    OwnMessage::Chunk(_) => {}
                },
            }
        }
    }

    /// At start: carries on with the update the program directory records.
    async fn resume(&mut self, me: &mut Me, stop: &CancellationToken) -> Result<(), Halt> {
        let Some(dir) = self.settings.program.clone() else {
            return Ok(());
        };
        let Some(mut record) = dir.read_update().map_err(|e| Halt::Failed(e.to_string()))? else {
            return Ok(());
        };
        match record.state.clone() {
            UpdateState::Staged | UpdateState::Switch if dir.next().exists() => {
                self.restart_into(me, &dir, record, stop).await
            }
            UpdateState::Staged | UpdateState::Switch => {
                let reason = "the staged program is gone from the program directory".to_owned();
                self.finish(me, &dir, &record, false, Some(reason));
                Ok(())
            }
            UpdateState::Trial => {
                if me.program.as_ref() != Some(&record.artifact) {
                    let reason = format!(
                        "the program running after the restart is not {} ({})",
                        record.version, record.artifact
                    );
                    self.finish(me, &dir, &record, false, Some(reason));
                    return Ok(());
                }
                info!(relay = %self.relay, job = %record.job, version = %record.version, "running the new program on trial: it stays once it reaches the parent relay");
                self.wait_handling_orders(me, &record.job, None, stop)
                    .await?;
                record.state = UpdateState::Confirmed;
                dir.write_update(&record)
                    .map_err(|e| Halt::Failed(e.to_string()))?;
                info!(relay = %self.relay, job = %record.job, version = %record.version, "the new program reached the parent relay: confirmed");
                self.finish(me, &dir, &record, true, None);
                Ok(())
            }
            UpdateState::Confirmed => {
                self.finish(me, &dir, &record, true, None);
                Ok(())
            }
            UpdateState::RolledBack { reason } => {
                self.finish(me, &dir, &record, false, Some(reason));
                Ok(())
            }
            UpdateState::Done { .. } => Ok(()),
        }
    }

    /// Queues the update's result and records it done.
    fn finish(
        &self,
        me: &mut Me,
        dir: &ProgramDir,
        record: &UpdateRecord,
        succeeded: bool,
        reason: Option<String>,
    ) {
        let queued = if succeeded {
            let note = format!("running {} ({})", record.version, record.artifact);
            self.try_answer(
                me,
                &record.job,
                Step::Result,
                JobStatus::Succeeded,
                Some(note),
                None,
            )
        } else {
            self.try_answer(
                me,
                &record.job,
                Step::Result,
                JobStatus::Failed,
                reason.clone(),
                None,
            )
        };
        if !queued {
            return; // tried again at the next start
        }
        if succeeded {
            me.version = Some(record.version.clone());
        }
        let mut done = record.clone();
        done.state = UpdateState::Done { succeeded, reason };
        if let Err(e) = dir.write_update(&done) {
            warn!(relay = %self.relay, job = %record.job, error = %e, "could not record the update as done");
        }
    }
}

/// This relay as its own device.
struct Me {
    serial: Serial,
    /// The running program's SHA-256, if it could be read.
    program: Option<ArtifactId>,
    /// Its version label, when an update installed it.
    version: Option<String>,
}

impl Me {
    fn identification(&self, relay: &RelayId) -> SectionData {
        let mut s = SectionData::from([
            ("model".to_owned(), Value::Text("chukei child relay".into())),
            (
                "firmware".to_owned(),
                Value::Text(env!("CARGO_PKG_VERSION").into()),
            ),
            ("relay".to_owned(), Value::Text(relay.to_string())),
        ]);
        if let Some(p) = &self.program {
            s.insert("program_sha256".to_owned(), Value::Text(p.to_string()));
        }
        if let Some(v) = &self.version {
            s.insert("program_version".to_owned(), Value::Text(v.clone()));
        }
        s
    }
}

/// The running executable's SHA-256 (hashed off the runtime: a debug build is 160 MB).
async fn own_program() -> Option<ArtifactId> {
    let exe = std::env::current_exe().ok()?;
    match tokio::task::spawn_blocking(move || sha256_file(&exe)).await {
        Ok(Ok(id)) => Some(id),
        Ok(Err(e)) => {
            warn!(error = %e, "could not hash this relay's own program");
            None
        }
        Err(_) => None,
    }
}

/// Messages queued for the parent, as the store counts them (-1 if it cannot be read).
fn waiting(store: &dyn Store) -> Value {
    let n = store.begin().and_then(|txn| txn.uplink_count());
    Value::Int(n.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)))
}
