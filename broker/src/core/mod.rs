//! The broker's own logic: one more client of the router (docs/decisions.md, D1–D3).
//!
//! The device hub and the router feed the core every message on `dev/+/up/+` and `host/+/req` as an
//! [`Inbound`]; the gateway's ACL guarantees that the topic names the real sender, so the topic is
//! the sender's identity. The core handles a whole batch in one redb transaction (group commit),
//! and only after that commit returns the [`Outbound`] messages to publish: retained orders and
//! views first, then the acks and replies that tell senders their messages are durable.
//!
//! Besides acks and replies, a batch may publish an update-data job's merged data (retained on
//! `dev/{serial}/merged/{job}` until the job ends) and the firmware chunks a device fetched (on
//! `dev/{serial}/blob/{artifact}`, not retained).
//!
//! Modules: `device` handles `dev/{serial}/up/{kind}`, `host` handles `host/{host}/req`,
//! [`views`] builds the retained messages, and `run` is the task that batches.

mod alarm;
mod alarm_limit;
mod alerts;
mod device;
mod hints;
mod host;
mod meter;
mod overflow;
mod presence;
pub mod relay;
mod rollout;
mod run;
mod storage;
mod view_pace;
pub mod views;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use protocol::artifact::ArtifactId;
use protocol::device::{Ack, AckBatch, AckOutcome, DeviceState};
use protocol::host::{HostReply, HostResponse};
use protocol::job::JobStatus;
use protocol::topic::{Topic, UpKind};
use protocol::{Envelope, HostId, JobId, MsgId, Seq, Serial, Shown, Timestamp, topic};
use tracing::{error, info, warn};

use crate::jobs;
use crate::store::{DeviceRecord, Hints, JobRecord, PresenceRecord, Store, StoreError, Txn};

pub use alarm_limit::AlarmLimits;
pub use alerts::AlertSettings;
pub use presence::PresenceEvent;
pub use relay::SessionEvent;

/// Lines a second each kind of device refusal the core logs (see [`crate::log_budget`]).
const CORE_LOG_PER_SECOND: u64 = 20;
pub use run::{CommitWindow, Outlet, OutletClosed, run, run_alarm_lane, spawn, spawn_alarm_lane};

/// A message for the core: a device's from the hub, a host's from the router.
pub struct Inbound {
    pub topic: String,
    pub payload: bytes::Bytes,
}

/// Jobs (or devices) [`Core::startup_publications`] reads in one trip, in one transaction.
pub const REPUBLISH_CHUNK: usize = 1000;

/// The retained topics of every open job, each with its job's number
/// ([`Core::open_order_topics`]).
#[derive(Debug, Clone, PartialEq)]
pub struct OpenOrders {
    pub topics: Vec<(String, u64)>,
    /// False when some open job could not be read (skipped, and logged).
    pub complete: bool,
}

/// A message the core wants published. An empty retained payload deletes the retained message.
#[derive(Debug, Clone, PartialEq)]
pub struct Outbound {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

#[derive(Debug, Clone)]
pub struct CoreSettings {
    /// The "managing server" column of Fig. 9.
    pub server_name: String,
    /// The largest CBOR payload the core decodes; larger ones are refused before parsing.
    pub max_payload_bytes: usize,
    /// How long succeeded and canceled jobs stay in the default list.
    pub finished_visible: std::time::Duration,
    /// The deadline of a job submitted without one, counted from the later of now, its
    /// instruction time and its execution time.
    pub default_deadline: std::time::Duration,
    /// The attempt limit of a job submitted without one.
    pub default_max_attempts: u32,
    /// Test fault: commit, but never publish acks or replies, to simulate a crash between commit
    /// and ack.
    pub hold_acks: bool,
    /// In a cluster: this node's name (presence records say which node holds a session).
    pub node: Option<String>,
    /// A device's message moves its `last_seen`, and so republishes its state view, only once
    /// the stored time is this old (`last_seen_resolution_secs`).
    pub last_seen_resolution: std::time::Duration,
}

/// The core's state: the store, its settings, and counters.
pub struct Core {
    store: Arc<dyn Store>,
    settings: CoreSettings,
    commits: AtomicU64,
    held_acks_logged: AtomicBool,
    /// Jobs whose record was found corrupt by `expire`, so the error is logged once, not every second.
    corrupt_logged: Mutex<HashSet<u64>>,
    /// Alarms, presence and notifications: settings, who is online, counters.
    alerts: alerts::Alerts,
    /// Whether the store takes writes (disk full, I/O errors): see [`storage`].
    storage: storage::StorageHealth,
    /// Presence changes not yet recorded because the store could not write; recorded, in order,
    /// once it can.
    deferred_presence: Mutex<Vec<(Serial, bool)>>,
    /// Persistent-session filters not yet recorded for the same reason: the last of each device,
    /// so at most one entry per device.
    deferred_sessions: Mutex<std::collections::HashMap<Serial, Vec<String>>>,
    /// In a cluster: when this node, leading, last looked for nodes that are gone.
    gone_sweep: Mutex<Option<std::time::Instant>>,
    /// What the core does as a child relay and as a parent ([`relay`]).
    relays: std::sync::RwLock<Arc<relay::RelaySettings>>,
    /// At a child: presence changes of its devices not yet told to the parent.
    presence_deltas: Mutex<Vec<(Serial, bool)>>,
    /// Set when a batch queued something for the parent; the uplink is woken after the commit.
    uplink_queued: AtomicBool,
    /// An alarm was queued for the parent: a periodic child connects at once.
    uplink_alarm: Arc<AtomicBool>,
    uplink_wake: Arc<tokio::sync::Notify>,
    /// At a parent: which child each device is reached through.
    routes: Arc<relay::ChildRoutes>,
    /// Children this parent has heard from since it started.
    children: Mutex<std::collections::HashMap<protocol::RelayId, relay::ChildStatus>>,
    /// Devices expected back at startup ([`Core::known_devices`]).
    known_devices: AtomicUsize,
    /// The persistent MQTT sessions read at startup ([`Core::take_stored_sessions`]).
    stored_sessions: Mutex<Vec<(Serial, Vec<String>)>>,
}

/// Which of the store's writers a batch is committed on.
#[derive(Debug, Clone, Copy)]
enum Writer {
    /// [`Store::begin`]: everything, on the core's thread.
    Main,
    /// [`Store::begin_alarms`]: devices' alarms, on the alarm lane's thread.
    Alarms,
}

/// What one batch will publish once its transaction has committed.
#[derive(Default)]
struct Pending {
    /// Acks per device, in the order the messages arrived.
    acks: BTreeMap<Serial, Vec<Ack>>,
    /// Replies to hosts, already encoded.
    replies: Vec<Outbound>,
    /// Jobs created in this batch: their orders go out if they are open.
    new_orders: BTreeSet<u64>,
    /// Jobs that ended in this batch: their retained orders are cleared.
    ended: BTreeSet<u64>,
    /// Jobs whose views changed.
    views: BTreeSet<u64>,
    /// Devices whose record was written in this batch (state message): their views go out.
    /// Written through [`Pending::state_changed`] or [`Pending::state_written`].
    states: BTreeSet<Serial>,
    /// Among them, the devices whose records this batch wrote last and holds as written: their
    /// view is made from these, not read back (a reconnect storm's presence commits read each
    /// record once instead of twice).
    written: BTreeMap<Serial, (DeviceRecord, PresenceRecord)>,
    /// Devices heard from in this batch: their last-seen time moves.
    seen: BTreeSet<Serial>,
    /// Devices whose alarms changed: their retained alarm views are republished.
    alarms: BTreeSet<String>,
    /// Devices among them that raised a new alarm: their view goes out at once, whatever the
    /// view pace.
    raised: BTreeSet<String>,
    /// Update-data jobs whose merged data is (re)published.
    merged: BTreeSet<u64>,
    /// Firmware chunks devices fetched, already encoded.
    blobs: Vec<Outbound>,
    /// Rollouts whose views changed.
    rollouts: BTreeSet<u64>,
    /// What the batch did, logged once the commit has made it true.
    done: Vec<Done>,
}

/// One thing a batch did, for the log. Logged only after the commit, so each line means
/// "durable" (or, for served chunks, "published"): tests and operators wait on these lines.
enum Done {
    JobUpdate {
        serial: Serial,
        job: JobId,
        status: JobStatus,
    },
    Merged {
        serial: Serial,
        job: JobId,
    },
    ChunksServed {
        serial: Serial,
        job: JobId,
        artifact: ArtifactId,
        chunks: Vec<u32>,
    },
    Canceled {
        host: HostId,
        serial: String,
        job: String,
    },
    /// A submission became a job: queued, or recorded as rejected with its reason.
    Submitted {
        host: HostId,
        serial: String,
        job: String,
        rejected: Option<String>,
    },
    UploadBegun {
        host: HostId,
        artifact: ArtifactId,
        version: String,
        received: u32,
        chunks: u32,
        complete: bool,
    },
    UploadComplete {
        host: HostId,
        artifact: ArtifactId,
        version: String,
        size: u64,
    },
    UploadDropped {
        host: HostId,
        artifact: ArtifactId,
    },
    Alarm(alarm::Logged),
}

impl Done {
    fn log(self, core: &Core) {
        match self {
            Done::Alarm(a) => a.log(core),
            Done::JobUpdate {
                serial,
                job,
                status,
            } => info!(serial = %serial, job = %job, status = %status, "job update stored"),
            Done::Merged { serial, job } => {
                info!(serial = %serial, job = %job, "merged at the relay")
            }
            Done::ChunksServed {
                serial,
                job,
                artifact,
                chunks,
            } => {
                info!(serial = %serial, job = %job, artifact = %artifact, chunks = ?chunks, "chunks served")
            }
            Done::Canceled { host, serial, job } => {
                info!(host = %host, serial = %serial, job = %job, "job canceled")
            }
            Done::Submitted {
                host,
                serial,
                job,
                rejected: None,
            } => info!(host = %host, job = %job, serial = %Shown(&serial), "job submitted"),
            Done::Submitted {
                host,
                serial,
                job,
                rejected: Some(reason),
            } => {
                warn!(host = %host, job = %job, serial = %Shown(&serial), reason = %Shown(&reason), "submission rejected")
            }
            Done::UploadBegun {
                host,
                artifact,
                version,
                received,
                chunks,
                complete,
            } => {
                info!(host = %host, artifact = %artifact, version = %Shown(&version), received, chunks, complete, "upload begun")
            }
            Done::UploadComplete {
                host,
                artifact,
                version,
                size,
            } => {
                info!(host = %host, artifact = %artifact, version = %Shown(&version), size, "artifact stored")
            }
            Done::UploadDropped { host, artifact } => {
                warn!(host = %host, artifact = %artifact, "digest mismatch; upload dropped")
            }
        }
    }
}

impl Pending {
    /// A device's record or presence changed in the transaction: its view goes out, read from
    /// the transaction.
    fn state_changed(&mut self, serial: &Serial) {
        self.written.remove(serial);
        self.states.insert(serial.clone());
    }

    /// Like [`Pending::state_changed`], with the records just written, which are then the
    /// device's view unless another change follows in the same batch.
    fn state_written(&mut self, serial: &Serial, device: DeviceRecord, presence: PresenceRecord) {
        self.states.insert(serial.clone());
        self.written.insert(serial.clone(), (device, presence));
    }

    /// Answers the device message at `seq`. A refusal is also journaled when the batch finishes
    /// ([`Core::finish`]), so every refusal is remembered, whichever handler made it.
    fn ack(&mut self, serial: &Serial, seq: Seq, outcome: AckOutcome) {
        self.acks
            .entry(serial.clone())
            .or_default()
            .push(Ack::of(seq, outcome));
    }

    fn reply(
        &mut self,
        host: &HostId,
        reply_to: MsgId,
        reply: HostReply,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let payload = Envelope::new(0, now, HostResponse { reply_to, reply })
            .to_cbor()
            .map_err(|e| StoreError::Encode {
                table: "(reply)",
                key: format!("host:{host} #{reply_to}"),
                reason: e.to_string(),
            })?;
        self.replies.push(Outbound {
            topic: topic::host_resp(host),
            payload,
            retain: false,
        });
        Ok(())
    }
}

impl Core {
    /// A core on an open store: the embedded redb file, or any other backend of
    /// [`crate::store::interface`].
    pub fn with_store(store: Arc<dyn Store>, settings: CoreSettings) -> Core {
        Core {
            store,
            settings,
            commits: AtomicU64::new(0),
            held_acks_logged: AtomicBool::new(false),
            corrupt_logged: Mutex::new(HashSet::new()),
            alerts: alerts::Alerts::default(),
            storage: storage::StorageHealth::default(),
            deferred_presence: Mutex::new(Vec::new()),
            deferred_sessions: Mutex::default(),
            gone_sweep: Mutex::new(None),
            relays: Default::default(),
            presence_deltas: Mutex::new(Vec::new()),
            uplink_queued: AtomicBool::new(false),
            uplink_alarm: Default::default(),
            uplink_wake: Default::default(),
            children: Default::default(),
            routes: Default::default(),
            known_devices: AtomicUsize::new(0),
            stored_sessions: Mutex::default(),
        }
    }

    /// How many devices the relay expects back at startup: every device in its store
    /// ([`Core::startup_publications`]), or on a cluster node those whose sessions it held when
    /// it stopped ([`Core::presence_startup`]; the store holds the whole cluster's fleet). What
    /// the relay's per-session maps are sized for, so that a reconnect storm after a restart
    /// does not grow each of them a dozen times over (about 1 % of the relay's CPU in one).
    pub fn known_devices(&self) -> usize {
        self.known_devices.load(Ordering::Relaxed)
    }

    fn expect_devices(&self, devices: usize) {
        self.known_devices.store(devices, Ordering::Relaxed);
        self.alerts.expect_devices(devices);
    }

    /// The persistent MQTT sessions of the devices the relay expects back (the same devices as
    /// [`Core::known_devices`]), with their topic filters, read from the store at startup: what
    /// the hub resumes when such a device reconnects with `clean_session` 0 (`switch::hub`).
    /// Taken once; later calls answer nothing.
    pub fn take_stored_sessions(&self) -> Vec<(Serial, Vec<String>)> {
        std::mem::take(
            &mut *self
                .stored_sessions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn keep_stored_session(&self, serial: &Serial, filters: &[String]) {
        if !filters.is_empty() {
            self.stored_sessions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((serial.clone(), filters.to_vec()));
        }
    }

    pub fn settings(&self) -> &CoreSettings {
        &self.settings
    }

    /// What a submission without a deadline or attempt limit gets.
    pub fn defaults(&self) -> jobs::Defaults {
        jobs::Defaults {
            deadline: self.settings.default_deadline,
            max_attempts: self.settings.default_max_attempts,
        }
    }

    /// How many transactions have committed since [`Core::with_store`]; with group commit, fewer than
    /// the messages handled.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Commits `txn` and, if it wrote anything, counts the commit ([`Core::commits`], its latency
    /// and the `messages` it carried) and notes that the store writes again.
    fn commit_counted(&self, txn: Box<dyn Txn>, messages: usize) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        if txn.commit()? {
            self.commits.fetch_add(1, Ordering::Relaxed);
            self.count_commit(started.elapsed(), messages);
            self.storage_committed();
        }
        Ok(())
    }

    /// Everything that must be retained in the router, rebuilt from the store: rumqttd keeps
    /// retained messages only in memory, so this runs before any client is accepted (and a
    /// cluster node runs it again to catch up after losing the bus). The orders of open jobs and
    /// their merged data, the views of every job with a valid serial, and every device's state.
    ///
    /// On a store that takes hints (the cluster's database) jobs and devices are read
    /// [`REPUBLISH_CHUNK`] at a time, each chunk in a transaction of its own that reads them in
    /// one trip: a job took three trips and a device two, and one transaction held every row
    /// it had read locked, and the node's writer, until the last.
    pub fn startup_publications(&self) -> Result<Vec<Outbound>, StoreError> {
        let txn = self.store.begin()?;
        let hints = txn.wants_hints();
        let chunk = if hints { REPUBLISH_CHUNK } else { usize::MAX };
        let numbers = txn.job_numbers()?;
        let serials = txn.device_serials()?;
        txn.commit()?;
        if self.settings.node.is_none() {
            self.expect_devices(serials.len());
        }
        let mut out = Vec::new();
        for numbers in numbers.chunks(chunk) {
            let mut txn = self.store.begin()?;
            if hints {
                txn.warm(&Hints {
                    jobs: numbers.to_vec(),
                    ..Hints::default()
                })?;
            }
            for &n in numbers {
                let record = match skip_corrupt(txn.job(n))? {
                    Some(Some(record)) => record,
                    _ => continue,
                };
                if record.is_open() {
                    out.extend(order_and_merged(&*txn, n, &record)?);
                }
                if let Some(v) = skip_corrupt(views::job_views(&*txn, n, &record))? {
                    out.extend(v);
                }
            }
            txn.commit()?;
        }
        for serials in serials.chunks(chunk) {
            let mut txn = self.store.begin()?;
            if hints {
                txn.warm(&Hints {
                    devices: serials.iter().map(|s| s.as_str().to_owned()).collect(),
                    ..Hints::default()
                })?;
            }
            // A cluster node reads the sessions it held in `presence_startup`.
            let sessions_here = self.settings.node.is_none();
            for serial in serials {
                let device = skip_corrupt(txn.device(serial))?.flatten();
                if device.is_none() && !sessions_here {
                    continue;
                }
                // Read once: for the views, and for the session to resume.
                let presence = skip_corrupt(txn.presence(serial))?
                    .flatten()
                    .unwrap_or_default();
                if let Some(record) = device {
                    out.extend(self.state_views_of(serial, &record, &presence)?);
                }
                if sessions_here {
                    self.keep_stored_session(serial, &presence.session_filters);
                }
            }
            txn.commit()?;
        }
        let txn = self.store.begin()?;
        out.extend(alarm::startup_views(&*txn, chrono::Utc::now())?);
        txn.commit()?;
        Ok(out)
    }

    /// The retained topics a cluster node's hub must hold for the open jobs: each one's order,
    /// and its merged data if it has some, with the job's number (`switch::sweep`). On
    /// PostgreSQL read from the open-jobs index alone, locking nothing.
    pub fn open_order_topics(&self) -> Result<OpenOrders, StoreError> {
        let mut open = OpenOrders {
            topics: Vec::new(),
            complete: true,
        };
        for key in self.store.open_job_keys()? {
            let Some(key) = skip_corrupt(key)? else {
                open.complete = false;
                continue;
            };
            let job = crate::store::job_id(key.number);
            open.topics
                .push((topic::dev_job(&key.serial, &job), key.number));
            if key.merged {
                open.topics
                    .push((topic::dev_merged(&key.serial, &job), key.number));
            }
        }
        Ok(open)
    }

    /// The retained order and merged data of those of jobs `numbers` still open, read as a
    /// batch reads them: what the order sweep delivers.
    pub fn orders_of(&self, numbers: &[u64]) -> Result<Vec<Outbound>, StoreError> {
        let txn = self.store.begin()?;
        let mut out = Vec::new();
        for &n in numbers {
            if let Some(Some(record)) = skip_corrupt(txn.job(n))?
                && record.is_open()
            {
                out.extend(order_and_merged(&*txn, n, &record)?);
            }
        }
        txn.commit()?;
        Ok(out)
    }

    /// Handles a batch of inbound messages in one redb write transaction (group commit), then
    /// returns the messages to publish. Nothing is returned, so no ack is sent, unless the commit
    /// succeeded. A message that cannot be decoded or is refused is answered and skipped; the rest
    /// of the batch proceeds.
    ///
    /// While the store cannot write (disk full, an I/O error; see [`storage`]), or when this
    /// batch's commit fails for that reason, the batch is handled again without writing: reads
    /// are answered, requests that would write get an error naming the cause, device reports get
    /// no ack (their agents resend them).
    pub fn handle_batch(
        &self,
        batch: Vec<Inbound>,
        now: Timestamp,
    ) -> Result<Vec<Outbound>, StoreError> {
        self.handle_batch_on(Writer::Main, batch, now)
    }

    /// [`Core::handle_batch`] for devices' alarms, on the store's second writer where it has one
    /// ([`Store::begin_alarms`]): called from the alarm lane's thread ([`run::spawn_alarm_lane`])
    /// while the core's thread commits reports, so a fault does not wait behind them.
    pub fn handle_alarms(
        &self,
        batch: Vec<Inbound>,
        now: Timestamp,
    ) -> Result<Vec<Outbound>, StoreError> {
        self.handle_batch_on(Writer::Alarms, batch, now)
    }

    fn handle_batch_on(
        &self,
        writer: Writer,
        batch: Vec<Inbound>,
        now: Timestamp,
    ) -> Result<Vec<Outbound>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if self.storage_writable() {
            match self.handle_batch_stored(writer, &batch, now) {
                Err(e) if e.is_storage() => self.storage_failed(&e),
                other => return other,
            }
        }
        self.handle_batch_refusing(&batch, now)
    }

    /// The normal path of [`Core::handle_batch`]: everything in one transaction, answers after
    /// the commit.
    fn handle_batch_stored(
        &self,
        writer: Writer,
        batch: &[Inbound],
        now: Timestamp,
    ) -> Result<Vec<Outbound>, StoreError> {
        let mut txn = match writer {
            Writer::Main => self.store.begin()?,
            Writer::Alarms => self.store.begin_alarms()?,
        };
        hints::warm(&mut *txn, batch, self.settings.max_payload_bytes)?;
        let mut pending = Pending::default();
        let mut children = Vec::new();
        for msg in batch {
            match Topic::parse(&msg.topic) {
                Ok(Topic::DevUp { serial, kind }) => device::handle(
                    self,
                    &mut *txn,
                    &mut pending,
                    kind,
                    device::FromDevice {
                        serial: &serial,
                        topic: &msg.topic,
                        payload: &msg.payload,
                    },
                    now,
                )?,
                Ok(Topic::HostReq { host }) => host::handle(
                    self,
                    &mut *txn,
                    &mut pending,
                    &host,
                    &msg.topic,
                    &msg.payload,
                    now,
                )?,
                Ok(Topic::RelayUp { relay }) => {
                    relay::handle_batch(self, &mut *txn, &mut pending, &relay, &msg.payload, now)?
                }
                // After this batch's commit: presence has transactions of its own.
                Ok(Topic::RelayPresence { relay }) => children.push((relay, &msg.payload)),
                Ok(_) | Err(_) => {
                    warn!(topic = %Shown(&msg.topic), "core ignores a message on a topic it does not serve")
                }
            }
        }
        let done = std::mem::take(&mut pending.done);
        let (mut out, answers) = self.finish(&mut *txn, pending, now)?;
        self.commit_counted(txn, batch.len())?;
        if self.uplink_queued.swap(false, Ordering::Relaxed) {
            self.uplink_wake.notify_one();
        }
        for (relay, payload) in children {
            out.extend(self.child_presence_recorded(&relay, payload, now)?);
        }
        // Logged after the commit, so each line means "durable": tests and operators rely on it.
        for d in done {
            d.log(self);
        }
        if self.settings.hold_acks {
            if !answers.is_empty() && !self.held_acks_logged.swap(true, Ordering::Relaxed) {
                warn!("holding acks (test fault injection)");
            }
        } else {
            out.extend(answers);
        }
        Ok(out)
    }

    /// [`Core::handle_batch`] while the store cannot write: nothing is committed, so nothing is
    /// acked. Reads and firmware chunk fetches (which write nothing) are served from the store if
    /// it can still be read; everything else is refused, device reports silently (their agents
    /// resend), host requests with the reason.
    fn handle_batch_refusing(
        &self,
        batch: &[Inbound],
        now: Timestamp,
    ) -> Result<Vec<Outbound>, StoreError> {
        let refusal = self.storage_refusal();
        self.storage_reopen();
        let mut txn = match self.store.begin() {
            Ok(txn) => Some(txn),
            Err(e) if e.is_storage() => None,
            Err(e) => return Err(e),
        };
        let mut p = Pending::default();
        let mut refused = 0u64;
        let mut children = Vec::new();
        for msg in batch {
            match (
                Topic::parse(&msg.topic),
                txn.as_mut().map(|t| &mut **t as &mut dyn Txn),
            ) {
                (
                    Ok(Topic::DevUp {
                        serial,
                        kind: UpKind::Fetch,
                    }),
                    Some(txn),
                ) => {
                    match device::handle(
                        self,
                        txn,
                        &mut p,
                        UpKind::Fetch,
                        device::FromDevice {
                            serial: &serial,
                            topic: &msg.topic,
                            payload: &msg.payload,
                        },
                        now,
                    ) {
                        Err(e) if e.is_storage() => refused += 1,
                        other => other?,
                    }
                }
                // Not acked: devices and children resend.
                (Ok(Topic::DevUp { .. } | Topic::RelayUp { .. }), _) => refused += 1,
                (Ok(Topic::HostReq { host }), txn) => {
                    if !host::handle_refusing(
                        self,
                        txn,
                        &mut p,
                        &host,
                        &msg.topic,
                        &msg.payload,
                        &refusal,
                        now,
                    )? {
                        refused += 1;
                    }
                }
                // Presence is kept in memory while the store cannot write (`presence_events`).
                (Ok(Topic::RelayPresence { relay }), _) => children.push((relay, &msg.payload)),
                (Ok(_) | Err(_), _) => {
                    warn!(topic = %Shown(&msg.topic), "core ignores a message on a topic it does not serve")
                }
            }
        }
        // Dropped without a commit: aborted, so nothing a read may have touched is kept.
        drop(txn);
        for (relay, payload) in children {
            p.blobs
                .extend(self.child_presence_recorded(&relay, payload, now)?);
        }
        self.storage_refused(refused);
        for d in std::mem::take(&mut p.done) {
            d.log(self);
        }
        let mut out = p.blobs;
        if !self.settings.hold_acks {
            out.extend(p.replies);
        }
        Ok(out)
    }

    /// Marks jobs whose deadline has passed as timed out and clears their retained orders, in one
    /// transaction. Costs no commit when nothing is due. Skipped while the store cannot write: a
    /// job that passes its deadline meanwhile times out once it can.
    pub fn expire(&self, now: Timestamp) -> Result<Vec<Outbound>, StoreError> {
        if !self.storage_writable() {
            return Ok(Vec::new());
        }
        let mut txn = self.store.begin()?;
        let due = txn.due_jobs(now)?;
        if due.is_empty() {
            txn.commit()?;
            return Ok(Vec::new());
        }
        let mut pending = Pending::default();
        for n in due {
            match jobs::time_out(&mut *txn, n, now) {
                Ok(Some(record)) => {
                    info!(serial = %record.view.serial, job = %record.view.id, status = %record.view.status, "job timed out");
                    pending.views.insert(n);
                    pending.ended.insert(n);
                }
                Ok(None) => {}
                Err(e) if e.is_corrupt_record() => {
                    let first = self
                        .corrupt_logged
                        .lock()
                        .map(|mut s| s.insert(n))
                        .unwrap_or(true);
                    if first {
                        error!(job = %crate::store::job_id(n), error = %e, "cannot time out a job whose record is corrupt");
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let done = std::mem::take(&mut pending.done);
        let (out, _) = self.finish(&mut *txn, pending, now)?;
        self.commit_counted(txn, 0)?;
        for d in done {
            d.log(self);
        }
        Ok(out)
    }

    /// Whether a message at `now` moves a `last_seen` of `stored`: once it is
    /// `last_seen_resolution` old, or when the clock went back past it.
    fn last_seen_moves(&self, stored: Timestamp, now: Timestamp) -> bool {
        let resolution =
            chrono::Duration::from_std(self.settings.last_seen_resolution).unwrap_or_default();
        now < stored || now - stored >= resolution
    }

    /// Moves last-seen times, then builds what the batch publishes: (retained orders and views,
    /// acks and replies). Runs inside the transaction, before the commit, so it sees the batch's
    /// writes; the caller returns nothing if the commit fails.
    fn finish(
        &self,
        txn: &mut dyn Txn,
        mut p: Pending,
        now: Timestamp,
    ) -> Result<(Vec<Outbound>, Vec<Outbound>), StoreError> {
        if !p.ended.is_empty() {
            rollout::follow_ended_jobs(self, txn, &mut p, now)?;
        }
        for serial in std::mem::take(&mut p.seen) {
            if p.states.contains(&serial) {
                continue;
            }
            let Some(existing) = skip_corrupt(txn.device(&serial))? else {
                continue;
            };
            let record = match existing {
                Some(record) if !self.last_seen_moves(record.last_seen, now) => continue,
                Some(record) => DeviceRecord {
                    last_seen: now,
                    ..record
                },
                None => DeviceRecord {
                    state: DeviceState::default(),
                    last_seen: now,
                },
            };
            txn.put_device(&serial, &record)?;
            p.state_changed(&serial);
        }

        let mut out = Vec::new();
        let jobs: BTreeSet<u64> = p
            .new_orders
            .iter()
            .chain(&p.ended)
            .chain(&p.views)
            .chain(&p.merged)
            .copied()
            .collect();
        for n in jobs {
            let Some(Some(record)) = skip_corrupt(txn.job(n))? else {
                continue;
            };
            if p.new_orders.contains(&n) && record.is_open() {
                out.extend(views::order(&record)?);
            }
            if p.merged.contains(&n)
                && record.is_open()
                && let Some(Some(data)) = skip_corrupt(txn.merged(n))?
            {
                out.extend(views::merged(&record, data)?);
            }
            if p.ended.contains(&n) {
                self.notify_job_end(txn, &record, now)?;
                out.extend(views::cleared_order(&record));
                // Only jobs that were merged have a retained message there to delete.
                if let Some(Some(_)) = skip_corrupt(txn.merged(n))? {
                    out.extend(views::cleared_merged(&record));
                }
            }
            if p.views.contains(&n)
                && let Some(v) = skip_corrupt(views::job_views(txn, n, &record))?
            {
                out.extend(v);
            }
        }
        for serial in &p.states {
            if let Some((device, presence)) = p.written.get(serial) {
                out.extend(self.state_views_of(serial, device, presence)?);
            } else if let Some(Some(record)) = skip_corrupt(txn.device(serial))? {
                out.extend(self.state_views(txn, serial, &record)?);
            }
        }
        for serial in presence::parse_serials(std::mem::take(&mut p.alarms)) {
            let raised = p.raised.contains(serial.as_str());
            if self
                .alerts
                .view_pace
                .now_or_later(serial.as_str(), now, raised)
            {
                out.extend(alarm::views(txn, &serial, now)?);
            }
        }
        out.extend(p.blobs);
        for n in std::mem::take(&mut p.rollouts) {
            if let Some(Some(v)) = skip_corrupt(rollout::rollout_view(txn, n))? {
                out.push(v);
            }
        }

        for (serial, acks) in &p.acks {
            for ack in acks {
                if let AckOutcome::Rejected { reason } = &ack.outcome {
                    let seq = Seq {
                        inc: ack.inc.unwrap_or(0),
                        id: ack.id,
                    };
                    device::record_refused(txn, serial, seq, reason, now)?;
                }
            }
        }

        let mut answers = Vec::with_capacity(p.acks.len() + p.replies.len());
        for (serial, acks) in p.acks {
            let payload = Envelope::new(0, now, AckBatch { acks })
                .to_cbor()
                .map_err(|e| StoreError::Encode {
                    table: "(ack)",
                    key: serial.to_string(),
                    reason: e.to_string(),
                })?;
            answers.push(Outbound {
                topic: topic::dev_ack(&serial),
                payload,
                retain: false,
            });
        }
        answers.extend(p.replies);
        Ok((out, answers))
    }
}

/// Decodes a client's payload: refused over `max` bytes, then checked by
/// [`protocol::cbor_guard`] so that no payload can make serde allocate out of proportion to its
/// length, then decoded ([`Envelope::from_cbor`] does all three, for the agents too). Every
/// message the core takes from a device or a host goes through here.
pub fn decode<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    max: usize,
) -> Result<Envelope<T>, protocol::EnvelopeError> {
    Envelope::from_cbor(payload, max)
}

/// An open job's retained order, and its merged data if it has some (only an update-data job
/// may: no other costs a read).
fn order_and_merged(
    txn: &dyn Txn,
    n: u64,
    record: &JobRecord,
) -> Result<Vec<Outbound>, StoreError> {
    let mut out: Vec<Outbound> = views::order(record)?.into_iter().collect();
    let may_have_merged = record
        .order
        .as_ref()
        .is_some_and(|o| matches!(o.spec, protocol::job::JobSpec::UpdateData { .. }));
    if may_have_merged && let Some(Some(data)) = skip_corrupt(txn.merged(n))? {
        out.extend(views::merged(record, data)?);
    }
    Ok(out)
}

/// Views are a cache: a record that no longer decodes is logged and left out rather than stopping
/// the batch (or the broker's startup). `Ok(None)` means it was skipped.
fn skip_corrupt<T>(result: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_corrupt_record() => {
            error!(error = %e, "skipping a corrupt record");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
