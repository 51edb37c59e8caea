//! What the core and the notification worker need from storage, and nothing more: the
//! [`Store`] begins transactions, and a [`Txn`] reads and writes typed records, table by table
//! (one trait per kind of record below). Every change the core makes for one batch of messages
//! happens in one transaction, committed before any of those messages is acked
//! (docs/decisions.md, D14).
//!
//! The embedded implementation is redb ([`super::RedbStore`]). Another backend implements these
//! traits; the core's tests take the store through [`Store`] only, so the same suite runs on it.

use std::collections::BTreeMap;
use std::path::Path;

use protocol::alarm::AlarmView;
use protocol::artifact::{ArtifactId, ArtifactInfo};
use protocol::data::DeviceData;
use protocol::device::DeviceState;
use protocol::job::{JobEvent, JobSpec};
use protocol::meter::CounterReading;
use protocol::relay::UplinkItem;
use protocol::{MsgId, Seq, Serial, Timestamp};

use super::records::{
    AlarmDigest, DeviceRecord, Due, JobRecord, JournalEntry, OverflowRecord, PresenceRecord,
    QueuedNotification, ReadingCursor, RolloutRecord,
};
use super::{Space, StoreError, seen};

/// A durable store of the relay's state. Shared behind an `Arc` by the core, the notification
/// worker and the metrics endpoint.
pub trait Store: Send + Sync {
    /// Begins a transaction on the store's writer; blocks while another is open on it (a store
    /// with a second writer has [`Store::begin_alarms`] beside it). Reads go through it too:
    /// every reader in the core is part of a batch that may write. Dropped without
    /// [`Txn::commit`], a transaction aborts and leaves no trace.
    fn begin(&self) -> Result<Box<dyn Txn>, StoreError>;

    /// Whether the store has a second writer ([`Store::begin_alarms`]) whose transactions run
    /// beside [`Store::begin`]'s rather than after them. A database server takes many writers
    /// (its row locks order what two of them touch); a redb file has one.
    fn has_alarm_writer(&self) -> bool {
        false
    }

    /// A transaction on the second writer, which the core keeps for devices' alarms: a fault
    /// does not wait behind the batch of reports being committed on the first. Without one
    /// ([`Store::has_alarm_writer`]), the same as [`Store::begin`].
    fn begin_alarms(&self) -> Result<Box<dyn Txn>, StoreError> {
        self.begin()
    }

    /// Closes the store and opens it again after an I/O error ([`StoreError::needs_reopen`]).
    /// Fails while the storage still refuses; the caller tries again later.
    fn reopen(&self) -> Result<(), StoreError>;

    /// Whether the store is closed (a reopen failed or has not been tried).
    fn is_closed(&self) -> bool;

    /// The local file system the store writes to and the space kept free there, if the store
    /// writes to a local disk at all.
    fn space(&self) -> Option<&Space>;

    /// Counts for the metrics endpoint; read without holding up the core's writes.
    fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Where the store is, for logs: a file's path, a database's address.
    fn location(&self) -> String;

    /// Whether this relay does the work that must happen once per store, not once per relay
    /// sharing it: deadlines, overdue check-ins, alarm digests, sending notifications. A store
    /// of its own: always. A cluster's: the one node holding the database's leader lock.
    fn leads_cluster_work(&self) -> bool {
        true
    }

    /// In a cluster: the nodes not heard from for longer than the grace period (their devices
    /// are offline unless they reconnected elsewhere). A store of its own has none.
    fn gone_nodes(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    /// Writes a consistent copy of everything committed so far to `out` while the relay keeps
    /// running: every message acked before the call is in it, and no commit is half in it.
    /// Returns the bytes written. What a restore brings back (`broker restore`).
    fn backup(&self, out: &Path) -> Result<u64, StoreError>;

    /// Every open job's number and serial, and whether it has merged data, oldest first: what
    /// a cluster node's order sweep needs to name the retained messages its hub should hold. A
    /// snapshot a moment old is what it wants, so the PostgreSQL store reads it from its index
    /// in one statement on its reader connection, locking nothing and holding up no batch; this
    /// default reads each job in a transaction like any other. A job that cannot be read is an
    /// `Err` in its place.
    fn open_job_keys(&self) -> Result<Vec<Result<OpenJobKey, StoreError>>, StoreError> {
        let txn = self.begin()?;
        let mut out = Vec::new();
        for number in txn.open_jobs()? {
            let key = match txn.job(number) {
                Ok(Some(JobRecord {
                    order: Some(order), ..
                })) => {
                    let merged = match &order.spec {
                        JobSpec::UpdateData { .. } => txn.merged(number).map(|m| m.is_some()),
                        _ => Ok(false),
                    };
                    merged.map(|merged| OpenJobKey {
                        number,
                        serial: order.serial,
                        merged,
                    })
                }
                Ok(_) => continue,
                Err(e) => Err(e),
            };
            out.push(key);
        }
        txn.commit()?;
        Ok(out)
    }
}

/// One transaction: every table's reads and writes, then [`Txn::commit`].
pub trait Txn:
    JobTables
    + JournalTables
    + DeviceTables
    + PresenceTables
    + AlarmTables
    + ReadingTables
    + NotificationTables
    + ArtifactTables
    + UplinkTables
    + RolloutTables
    + Send
{
    /// Makes every write of the transaction durable if it wrote anything (else just ends it), and
    /// says whether a commit happened. Refused ([`StoreError::Full`], nothing written) while the
    /// disk is below its reserve.
    fn commit(self: Box<Self>) -> Result<bool, StoreError>;

    /// Whether the `warm_…` hints below are worth their making (a store across a network);
    /// the core skips them for a store that would ignore them.
    fn wants_hints(&self) -> bool {
        false
    }

    /// Says what a batch is about to read, so that a store across a network can read (and
    /// lock) it together rather than one row at a time. Only a hint: an embedded store has
    /// nothing to gain and ignores it.
    fn warm(&mut self, hints: &Hints) -> Result<(), StoreError> {
        let _ = hints;
        Ok(())
    }

    /// [`Txn::warm`] for devices only (their seen ids, records and presence).
    fn warm_devices(&mut self, serials: &[&str]) -> Result<(), StoreError> {
        let _ = serials;
        Ok(())
    }
}

/// What a batch is about to read ([`Txn::warm`]).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Hints {
    /// Devices whose messages the batch handles, or that a submission names: their seen ids,
    /// records and presence.
    pub devices: Vec<String>,
    /// Jobs devices report on: their records, events and reports.
    pub jobs: Vec<u64>,
    /// Journal entries by sender (a host's identity), by message id.
    pub journal: BTreeMap<String, Vec<MsgId>>,
    /// Devices that sent an alarm: their active alarms and overflow record.
    pub alarms: Vec<String>,
    /// Whether one of those alarms may be a new one (raised or in progress, not cleared): the
    /// store may take the alarm counter with the reads.
    pub raises_alarms: bool,
}

/// An open job as [`Store::open_job_keys`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenJobKey {
    pub number: u64,
    pub serial: Serial,
    /// Whether the relay has merged data for it (an update-data job).
    pub merged: bool,
}

/// Counts for the Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreStats {
    /// Jobs per status name; every status is present, zero or not.
    pub jobs: BTreeMap<&'static str, u64>,
    /// Job records that did not decode.
    pub corrupt_jobs: u64,
    pub alarms_active: u64,
    pub alarms_total: u64,
    pub notify_queue: u64,
    pub devices: u64,
    pub readings: u64,
    /// At a child relay: device messages queued for its parent and not yet acked by it.
    pub uplink_waiting: u64,
}

/// Jobs, their timelines (`jobs show`), what devices reported for them, and the indexes of open
/// jobs (by device, by deadline).
pub trait JobTables {
    /// Allocates the next job number (1, 2, …).
    fn next_job_number(&mut self) -> Result<u64, StoreError>;

    fn job(&self, n: u64) -> Result<Option<JobRecord>, StoreError>;

    /// Writes a job and keeps the open-job indexes in step with it.
    fn put_job(&mut self, n: u64, record: &JobRecord) -> Result<(), StoreError>;

    /// Every job `keep` accepts, newest first.
    fn jobs_newest_first(
        &self,
        keep: &mut dyn FnMut(&JobRecord) -> bool,
    ) -> Result<Vec<JobRecord>, StoreError>;

    /// Every job number, oldest first.
    fn job_numbers(&self) -> Result<Vec<u64>, StoreError>;

    /// Appends one step to a job's timeline.
    fn push_event(&mut self, n: u64, event: &JobEvent) -> Result<(), StoreError>;

    fn events(&self, n: u64) -> Result<Vec<JobEvent>, StoreError>;

    fn report(&self, n: u64) -> Result<Option<DeviceData>, StoreError>;

    fn put_report(&mut self, n: u64, data: &DeviceData) -> Result<(), StoreError>;

    /// Numbers of every job that has not ended, oldest first.
    fn open_jobs(&self) -> Result<Vec<u64>, StoreError>;

    /// Numbers of the open jobs addressed to `serial`, oldest first.
    fn open_jobs_of(&self, serial: &Serial) -> Result<Vec<u64>, StoreError>;

    /// Numbers of the open jobs whose deadline is at or before `now`.
    fn due_jobs(&self, now: Timestamp) -> Result<Vec<u64>, StoreError>;

    /// The merged data of update-data job `n`, once the relay has merged it.
    fn merged(&self, n: u64) -> Result<Option<DeviceData>, StoreError>;

    fn put_merged(&mut self, n: u64, data: &DeviceData) -> Result<(), StoreError>;

    /// Test hook: overwrites a job's record with `bytes` as the backend keeps them.
    #[cfg(test)]
    fn put_raw_job(&mut self, n: u64, bytes: &[u8]) -> Result<(), StoreError>;
}

/// The dedupe journal (docs/decisions.md, D3, D9): what the relay did with each message it handled,
/// so a resend gets the original answer and is never stored twice.
pub trait JournalTables {
    /// What the relay did with message `id` of `sender` (`host:H`, `device:S`), if it handled it.
    /// A host's messages have a row each, so a resend gets its original answer; a device's are
    /// looked up in every outbox of its that the relay knows ([`JournalTables::device_journal_any`]).
    fn journal(&self, sender: &str, id: MsgId) -> Result<Option<JournalEntry>, StoreError>;

    /// What the relay did with message `id` of `serial`, in whichever of the device's outboxes
    /// numbered it: for readers that know a device's message ids but not its incarnations (an
    /// operator's check, a test reading a stopped relay's store). The relay itself dedupes with
    /// [`JournalTables::device_journal`], which knows the incarnation.
    fn device_journal_any(
        &self,
        serial: &str,
        id: MsgId,
    ) -> Result<Option<JournalEntry>, StoreError>;

    /// Records what the relay did with host `sender`'s message `id`.
    fn put_journal(
        &mut self,
        sender: &str,
        id: MsgId,
        entry: &JournalEntry,
    ) -> Result<(), StoreError>;

    /// What the relay did with the device message at `seq` of `serial`, if it handled it: found
    /// in the window of the outbox that numbered it ([`seen`]), in a row of its own if the window
    /// says it has any, and for what a relay before windows stored, in the row-per-message
    /// journal. `Stored` only for a message the relay really stored.
    fn device_journal(&self, serial: &str, seq: Seq) -> Result<Option<JournalEntry>, StoreError>;

    /// Records that the device message at `seq` of `serial` was handled: stored, or refused for
    /// good (`entry` says which). The window of its outbox moves; what the window cannot say
    /// exactly (a refusal, whose resend must be refused again, not called a duplicate; an id too
    /// far ahead for the window) also gets a row of its own. Returns where the window put it.
    fn put_device_journal(
        &mut self,
        serial: &str,
        seq: Seq,
        entry: &JournalEntry,
    ) -> Result<seen::Placed, StoreError>;
}

/// The device registry: each device's last announced state and when it was last seen.
pub trait DeviceTables {
    fn device(&self, serial: &Serial) -> Result<Option<DeviceRecord>, StoreError>;

    /// The state the device last announced (site, model, firmware), without the rest of its
    /// record: every state report is compared with it, and its timestamp need not be parsed.
    fn device_state(&self, serial: &Serial) -> Result<Option<DeviceState>, StoreError>;

    fn put_device(&mut self, serial: &Serial, record: &DeviceRecord) -> Result<(), StoreError>;

    /// Every known serial, in order. A key that is not a valid serial is reported as corrupt.
    fn device_serials(&self) -> Result<Vec<Serial>, StoreError>;

    /// Test hook: overwrites a device's record with `bytes` as the backend keeps them, to
    /// exercise the handling of a damaged record.
    #[cfg(test)]
    fn put_raw_device(&mut self, serial: &Serial, bytes: &[u8]) -> Result<(), StoreError>;
}

/// Firmware artifacts: metadata by id (the SHA-256 of the bytes) and the bytes as chunks.
pub trait ArtifactTables {
    fn artifact(&self, id: &ArtifactId) -> Result<Option<ArtifactInfo>, StoreError>;

    fn put_artifact(&mut self, info: &ArtifactInfo) -> Result<(), StoreError>;

    /// Every artifact, in id order.
    fn artifacts(&self) -> Result<Vec<ArtifactInfo>, StoreError>;

    /// Forgets an artifact: its metadata and every chunk held of it.
    fn remove_artifact(&mut self, id: &ArtifactId) -> Result<(), StoreError>;

    /// Drops every chunk held of an artifact, keeping its metadata.
    fn remove_chunks(&mut self, id: &ArtifactId) -> Result<(), StoreError>;

    fn chunk(&self, id: &ArtifactId, index: u32) -> Result<Option<Vec<u8>>, StoreError>;

    fn put_chunk(&mut self, id: &ArtifactId, index: u32, data: &[u8]) -> Result<(), StoreError>;

    /// Calls `f` with each chunk held of an artifact, in index order, without holding more than
    /// one chunk in memory (an artifact may be 256 MiB). Returns how many chunks were visited.
    fn visit_chunks(
        &self,
        id: &ArtifactId,
        f: &mut dyn FnMut(u32, &[u8]),
    ) -> Result<u32, StoreError>;
}

/// Alarms (raised and cleared), the active ones per device, and the refused-alarm overflow.
pub trait AlarmTables {
    /// Allocates the next alarm number (1, 2, …).
    fn next_alarm_number(&mut self) -> Result<u64, StoreError>;

    fn alarm(&self, n: u64) -> Result<Option<AlarmView>, StoreError>;

    /// Writes an alarm and keeps the active index in step with its status.
    fn put_alarm(&mut self, n: u64, alarm: &AlarmView) -> Result<(), StoreError>;

    /// The active alarm of `serial` with `code`, if any.
    fn active_alarm(&self, serial: &Serial, code: &str) -> Result<Option<u64>, StoreError>;

    /// The numbers of `serial`'s active alarms, oldest first.
    fn active_alarms_of(&self, serial: &Serial) -> Result<Vec<u64>, StoreError>;

    /// How many active alarms `serial` has, not counting those with a code in `except`.
    fn active_alarm_count(&self, serial: &Serial, except: &[&str]) -> Result<usize, StoreError>;

    /// Every active alarm's number, oldest first.
    fn active_alarms(&self) -> Result<Vec<u64>, StoreError>;

    /// The newest `limit` alarms, newest first.
    fn alarms_newest_first(&self, limit: usize) -> Result<Vec<AlarmView>, StoreError>;

    /// The alarms the relay refused `serial`, if it has an overflow alarm.
    fn alarm_overflow(&self, serial: &Serial) -> Result<Option<OverflowRecord>, StoreError>;

    /// Writes (`Some`) or removes (`None`) the overflow record of `serial`.
    fn put_alarm_overflow(
        &mut self,
        serial: &Serial,
        record: Option<&OverflowRecord>,
    ) -> Result<(), StoreError>;
}

/// Reachability beyond last-seen: each device's schedule, and when a periodic device is overdue.
pub trait PresenceTables {
    fn presence(&self, serial: &Serial) -> Result<Option<PresenceRecord>, StoreError>;

    /// Writes a presence record and keeps `checkin_due` in step with its `due_by`.
    fn put_presence(&mut self, serial: &Serial, record: &PresenceRecord) -> Result<(), StoreError>;

    /// Serials whose check-in was due at or before `now`, earliest first.
    fn checkins_due(&self, now: Timestamp) -> Result<Vec<Serial>, StoreError>;

    /// In a cluster: the serials whose record says they are online at `node`.
    fn presence_on_node(&self, node: &str) -> Result<Vec<Serial>, StoreError>;

    /// The serials whose record names no node and has no check-in deadline, in serial order:
    /// the devices a starting relay may owe a deadline. Read without locking them (in a
    /// cluster the caller locks the ones it will write, then reads them again).
    fn presence_without_node_or_deadline(&self) -> Result<Vec<Serial>, StoreError>;
}

/// The notification outbox: mails and webhook calls queued in the transaction of their event,
/// removed once delivered; and the per-device digests that coalesce bursts of alarms.
pub trait NotificationTables {
    /// Queues a notification; returns its number.
    fn push_notification(&mut self, item: &QueuedNotification) -> Result<u64, StoreError>;

    /// Up to `limit` queued notifications due at `now`, and the earliest time one left out is
    /// due. Devices are served in turn: the oldest due notification of each device (the device
    /// whose oldest is oldest first), then the second of each, and so on, so a device with a
    /// long backlog delays another device's notification by one delivery at most.
    fn due_notifications(&self, now: Timestamp, limit: usize) -> Result<Due, StoreError>;

    /// Adds alarm `n` of `serial` to its open digest, or opens one that closes at `due_at`.
    /// Returns whether a digest was opened.
    fn digest_alarm(&mut self, serial: &str, n: u64, due_at: Timestamp)
    -> Result<bool, StoreError>;

    /// Removes and returns every digest whose window closed at or before `now`, earliest first.
    fn take_due_digests(
        &mut self,
        now: Timestamp,
    ) -> Result<Vec<(String, AlarmDigest)>, StoreError>;

    /// Rewrites a queued notification (after a failed attempt).
    fn put_notification(&mut self, n: u64, item: &QueuedNotification) -> Result<(), StoreError>;

    /// Removes a notification (delivered, or given up on).
    fn remove_notification(&mut self, n: u64) -> Result<(), StoreError>;

    /// How many notifications wait.
    fn notification_count(&self) -> Result<u64, StoreError>;
}

/// A child relay's outbox towards its parent: every device message it stored and forwards, in
/// the order it stored them, until the parent has committed them (`relays::uplink`).
pub trait UplinkTables {
    /// Queues what `serial` sent on `dev/{serial}/up/{kind}`, as it sent it; returns its number
    /// (increasing).
    fn push_uplink(
        &mut self,
        serial: &Serial,
        kind: &str,
        payload: &[u8],
    ) -> Result<u64, StoreError>;

    /// The queued messages numbered after `after`, oldest first: at most `max_items`, and no
    /// more than `max_bytes` of payload unless the first alone is larger (it comes alone).
    fn uplink_after(
        &self,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<UplinkItem>, StoreError>;

    /// Forgets every queued message numbered up to `upto` (the parent committed them); returns
    /// how many.
    fn remove_uplink_upto(&mut self, upto: u64) -> Result<u64, StoreError>;

    /// How many messages wait for the parent.
    fn uplink_count(&self) -> Result<u64, StoreError>;

    /// Keeps a retained message the parent sent a device here (`dev/{serial}/jobs/{job}`,
    /// `…/merged/{job}`), so a child restarted while its parent is away still has its devices'
    /// orders; returns whether it is new (or changed).
    fn put_mirrored(&mut self, topic: &str, payload: &[u8]) -> Result<bool, StoreError>;

    /// Forgets one (the parent emptied it), or all (the parent is about to send them again).
    fn remove_mirrored(&mut self, topic: &str) -> Result<(), StoreError>;
    fn clear_mirrored(&mut self) -> Result<(), StoreError>;

    /// Every retained message kept, by topic.
    fn mirrored(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// Meter readings (counters) for billing exports, by time.
pub trait ReadingTables {
    /// Stores one reading.
    fn put_reading(&mut self, reading: &CounterReading) -> Result<(), StoreError>;

    /// Readings with `from <= read_at < to`, oldest first, after `after` (exclusive), at most
    /// `limit` of them; `serial` keeps only one device's. Returns them and the cursor of the last
    /// one if the page is full (there may be more).
    fn readings(
        &self,
        from: Timestamp,
        to: Timestamp,
        after: Option<&ReadingCursor>,
        serial: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<CounterReading>, Option<ReadingCursor>), StoreError>;
}

/// Rollouts (`rollouts create`) and the tags operators set on devices (`devices tag`), which
/// rollout targets select by.
pub trait RolloutTables {
    /// The next rollout number (1, 2, …), never reused.
    fn next_rollout_number(&mut self) -> Result<u64, StoreError>;

    fn rollout(&self, n: u64) -> Result<Option<RolloutRecord>, StoreError>;

    /// [`RolloutTables::rollout`] for a transaction that will write it back: a shared store
    /// (PostgreSQL) locks the row until the transaction ends, so two nodes stepping the same
    /// rollout take turns instead of filing the same device's job twice. The embedded store has
    /// one writer already.
    fn rollout_for_update(&self, n: u64) -> Result<Option<RolloutRecord>, StoreError> {
        self.rollout(n)
    }

    /// Writes a rollout; one that has ended leaves the active set.
    fn put_rollout(&mut self, n: u64, record: &RolloutRecord) -> Result<(), StoreError>;

    /// Every rollout, newest first.
    fn rollouts_newest_first(&self) -> Result<Vec<(u64, RolloutRecord)>, StoreError>;

    /// The numbers of rollouts that have not ended: what the rollout tick looks at.
    fn active_rollouts(&self) -> Result<Vec<u64>, StoreError>;

    /// A device's tags, sorted; empty if it has none.
    fn device_tags(&self, serial: &str) -> Result<Vec<String>, StoreError>;

    /// Replaces a device's tags (none: the row goes).
    fn put_device_tags(&mut self, serial: &str, tags: &[String]) -> Result<(), StoreError>;

    /// Every device that has tags, with them.
    fn all_device_tags(&self) -> Result<Vec<(String, Vec<String>)>, StoreError>;
}
