//! The embedded backend: every table of the store in one redb file, `DATA_DIR/chukei.redb`
//! (docs/decisions.md, D2). [`RedbStore`] opens the file and begins transactions; [`RedbTxn`]
//! implements the store's table traits on one redb write transaction.
//!
//! Records are CBOR. Anything read back from disk is decoded without `unwrap`: a record that does
//! not decode is a [`StoreError::Corrupt`] naming its table and key.

mod alarms;
mod backup;
pub mod format;
mod notify;
mod readings;
mod rollouts;
mod stats;
/// A table's key read back as a serial; a key that is not one is a corrupt record of `table`.
pub(super) fn serial_key(table: &'static str, key: &str) -> Result<Serial, StoreError> {
    Serial::parse(key).map_err(|e| StoreError::Corrupt {
        table,
        key: format!("{key:?}"),
        reason: e.to_string(),
    })
}

#[cfg(test)]
pub(crate) mod test_disk;
mod uplink;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use protocol::artifact::{ArtifactId, ArtifactInfo};
use protocol::data::DeviceData;
use protocol::device::DeviceState;
use protocol::job::JobEvent;
use protocol::{MsgId, Seq, Serial, Timestamp};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::records::StoredState;
use super::{
    ArtifactTables, DeviceRecord, DeviceTables, JobRecord, JobTables, JournalEntry, JournalTables,
    Space, Store, StoreError, StoreStats, Txn, decode, device_journal, encode, job_id, seen,
};

/// The store's file inside the data directory.
pub const FILE_NAME: &str = "chukei.redb";

/// Job number → [`JobRecord`]. Keyed by number rather than id so that "newest first" is a reverse scan.
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// (job number, sequence) → [`JobEvent`]: the timeline of `jobs show`.
const JOB_EVENTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("job_events");
/// Job number → [`DeviceData`]: what the device collected for the job.
const REPORTS: TableDefinition<u64, &[u8]> = TableDefinition::new("reports");
/// (sender, msg id) → [`JournalEntry`]. The sender is an identity's text, `host:svc`; devices'
/// messages have rows here only from relays before [`SEEN`].
const JOURNAL: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("journal");
/// Serial → the [`seen::SeenWindow`] of the device's stored message ids.
const SEEN: TableDefinition<&str, &[u8]> = TableDefinition::new("seen_by_device");
/// Serial → [`DeviceRecord`].
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// Counters (`next_job`).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (serial, job number) of every open job: the orders to republish at startup, the jobs whose
/// site a device's first state fills in.
const OPEN_BY_SERIAL: TableDefinition<(&str, u64), ()> = TableDefinition::new("open_by_serial");
/// (deadline in Unix milliseconds, job number) of every open job with a deadline, so expiry is a
/// range scan rather than a walk over every job once a second.
const OPEN_DEADLINES: TableDefinition<(i64, u64), ()> = TableDefinition::new("open_deadlines");
/// Job number → [`DeviceData`]: an update-data job's values merged into the device's current data
/// at the relay (S213), what `dev/{serial}/merged/{job}` carries while the job is open.
const MERGED: TableDefinition<u64, &[u8]> = TableDefinition::new("merged");
/// Artifact id → [`ArtifactInfo`]: what was announced by `UploadBegin` and how far the upload got.
const ARTIFACTS: TableDefinition<&str, &[u8]> = TableDefinition::new("artifacts");
/// (artifact id, chunk index) → the chunk's bytes, raw.
const ARTIFACT_CHUNKS: TableDefinition<(&str, u32), &[u8]> =
    TableDefinition::new("artifact_chunks");

const NEXT_JOB: &str = "next_job";

fn backend<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Backend {
        op,
        source: e.into(),
    }
}

/// Opens the database file; a test swaps in one whose writes fail on demand.
pub(crate) type Opener = dyn Fn(&Path) -> Result<Database, redb::DatabaseError> + Send + Sync;

/// The redb file. Cheap to share behind an `Arc`; redb serializes writers itself.
///
/// The database sits behind a lock so that it can be closed and opened again after an I/O error
/// ([`RedbStore::reopen`]); every transaction begins under the read side, only a reopen takes the
/// write side.
pub struct RedbStore {
    db: RwLock<Option<Database>>,
    path: PathBuf,
    space: Space,
    opener: Arc<Opener>,
    /// Whether the journal holds rows of device messages (written by a relay before
    /// [`SEEN`]): only then is a device message not in its window looked up there too.
    legacy_device_journal: bool,
}

impl RedbStore {
    /// Opens `data_dir/chukei.redb`, creating the directory, the file and every table if needed.
    pub fn open(data_dir: &Path) -> Result<RedbStore, StoreError> {
        RedbStore::open_with(data_dir, Arc::new(|path: &Path| Database::create(path)))
    }

    /// [`RedbStore::open`] with another way to open the database file (a test's failing disk).
    pub(crate) fn open_with(data_dir: &Path, opener: Arc<Opener>) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(FILE_NAME);
        let db = opener(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        // Read before anything is created: a newer release's file is refused untouched.
        let found = format::found(&db)?;
        format::refuse_newer(&path, found)?;
        RedbStore::create_tables(&db)?;
        format::upgrade(&db, &path, found)?;
        let legacy_device_journal = RedbStore::has_device_journal_rows(&db)?;
        Ok(RedbStore {
            db: RwLock::new(Some(db)),
            path,
            space: Space::for_dir(data_dir),
            opener,
            legacy_device_journal,
        })
    }

    /// Closes the database and opens it again: after an I/O error, redb refuses every
    /// transaction until this is done (opening repairs the file if the failed commit left it
    /// half-written). Fails while another transaction is still open (the file is still held), or
    /// if the disk still refuses; the caller tries again later.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Dropping closes it; with a latched I/O error redb writes nothing more to the file.
        drop(slot.take());
        let db = (self.opener)(&self.path).map_err(|source| StoreError::Open {
            path: self.path.clone(),
            source,
        })?;
        RedbStore::create_tables(&db)?;
        *slot = Some(db);
        Ok(())
    }

    /// Whether the database is closed (a reopen failed or has not been tried).
    pub fn is_closed(&self) -> bool {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
    }

    /// Keeps `bytes` free on the data directory's file system instead of the automatic reserve
    /// (`min_free_bytes`; see [`Space::with_reserve`]).
    pub fn keep_free(mut self, bytes: u64) -> RedbStore {
        self.space = Space::with_reserve(self.space.dir(), bytes);
        self
    }

    /// The data directory's free space and reserve.
    pub fn space(&self) -> &Space {
        &self.space
    }

    /// Runs `f` with the open database, or fails with [`StoreError::Closed`].
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let slot = self
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match slot.as_ref() {
            Some(db) => f(db),
            None => Err(StoreError::Closed {
                path: self.path.clone(),
            }),
        }
    }

    fn has_device_journal_rows(db: &Database) -> Result<bool, StoreError> {
        let op = "read the journal";
        let txn = db.begin_read().map_err(backend(op))?;
        let table = txn.open_table(JOURNAL).map_err(backend(op))?;
        let mut rows = table
            .range(("device:", 0)..("device;", 0))
            .map_err(backend(op))?;
        Ok(rows.next().is_some())
    }

    /// Creates every table up front so that reads never meet a missing table.
    fn create_tables(db: &Database) -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(backend("begin a transaction"))?;
        {
            let op = "create the tables";
            txn.open_table(JOBS).map_err(backend(op))?;
            txn.open_table(JOB_EVENTS).map_err(backend(op))?;
            txn.open_table(REPORTS).map_err(backend(op))?;
            txn.open_table(JOURNAL).map_err(backend(op))?;
            txn.open_table(SEEN).map_err(backend(op))?;
            txn.open_table(DEVICES).map_err(backend(op))?;
            txn.open_table(META).map_err(backend(op))?;
            txn.open_table(OPEN_BY_SERIAL).map_err(backend(op))?;
            txn.open_table(OPEN_DEADLINES).map_err(backend(op))?;
            txn.open_table(MERGED).map_err(backend(op))?;
            txn.open_table(ARTIFACTS).map_err(backend(op))?;
            txn.open_table(ARTIFACT_CHUNKS).map_err(backend(op))?;
            stats::create_tables(&txn)?;
        }
        txn.commit().map_err(backend("commit"))?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Begins the one write transaction; blocks while another is open. Reads go through it too:
    /// every reader in the broker is part of a batch that may write.
    pub fn begin_redb(&self) -> Result<RedbTxn, StoreError> {
        let txn = self.with_db(|db| db.begin_write().map_err(backend("begin a transaction")))?;
        Ok(RedbTxn {
            txn,
            dirty: false,
            space: Some(self.space.clone()),
            legacy_device_journal: self.legacy_device_journal,
            last_window: RefCell::new(None),
        })
    }
}

impl Store for RedbStore {
    fn begin(&self) -> Result<Box<dyn Txn>, StoreError> {
        Ok(Box::new(self.begin_redb()?))
    }

    fn reopen(&self) -> Result<(), StoreError> {
        RedbStore::reopen(self)
    }

    fn is_closed(&self) -> bool {
        RedbStore::is_closed(self)
    }

    fn space(&self) -> Option<&Space> {
        Some(RedbStore::space(self))
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        RedbStore::stats(self)
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn backup(&self, out: &Path) -> Result<u64, StoreError> {
        RedbStore::backup(self, out)
    }
}

/// A write transaction with typed access to every table. Dropped without [`Txn::commit`], it
/// aborts and leaves no trace.
pub struct RedbTxn {
    txn: WriteTransaction,
    dirty: bool,
    /// Checked before committing; `None` in tests that exercise redb's own I/O errors.
    space: Option<Space>,
    legacy_device_journal: bool,
    /// The seen-ids windows last read or written in this transaction, by serial: a stored
    /// message's dedupe check ([`Txn::device_journal`]) and its record
    /// ([`Txn::put_device_journal`]) need the same row one after the other.
    /// `put_device_journal` is the only writer of that table, and keeps this current.
    last_window: RefCell<Option<(String, Option<seen::SeenSet>)>>,
}

impl Txn for RedbTxn {
    fn commit(self: Box<Self>) -> Result<bool, StoreError> {
        (*self).commit_redb()
    }
}

impl RedbTxn {
    /// Commits (fsync, redb's default durability) if anything was written, else just aborts. A
    /// commit is refused ([`StoreError::Full`], the transaction aborted) while the data
    /// directory's free space is below its reserve.
    pub fn commit_redb(self) -> Result<bool, StoreError> {
        if !self.dirty {
            self.txn.abort().map_err(backend("abort"))?;
            return Ok(false);
        }
        if let Some(r) = self.space.as_ref().and_then(|s| s.read().map(|r| (s, r)))
            && r.1.is_low()
        {
            let (space, reading) = r;
            let err = StoreError::Full {
                dir: space.dir().to_owned(),
                free: reading.free,
                reserve: reading.reserve,
            };
            self.txn.abort().map_err(backend("abort"))?;
            return Err(err);
        }
        self.txn.commit().map_err(backend("commit"))?;
        Ok(true)
    }

    fn journal_row(&self, sender: &str, id: MsgId) -> Result<Option<JournalEntry>, StoreError> {
        let table = self
            .txn
            .open_table(JOURNAL)
            .map_err(backend("read the journal"))?;
        let guard = table
            .get((sender, id))
            .map_err(backend("read the journal"))?;
        guard
            .map(|g| decode("journal", format_args!("{sender} #{id}"), g.value()))
            .transpose()
    }

    fn put_journal_row(
        &mut self,
        sender: &str,
        id: MsgId,
        entry: &JournalEntry,
    ) -> Result<(), StoreError> {
        let op = "write the journal";
        let bytes = encode("journal", format_args!("{sender} #{id}"), entry)?;
        self.txn
            .open_table(JOURNAL)
            .map_err(backend(op))?
            .insert((sender, id), bytes.as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    fn seen_set(&self, serial: &str) -> Result<Option<seen::SeenSet>, StoreError> {
        if let Some((last, set)) = &*self.last_window.borrow()
            && last == serial
        {
            return Ok(set.clone());
        }
        let set = self.read_seen_set(serial)?;
        *self.last_window.borrow_mut() = Some((serial.to_owned(), set.clone()));
        Ok(set)
    }

    fn read_seen_set(&self, serial: &str) -> Result<Option<seen::SeenSet>, StoreError> {
        let op = "read a device's seen ids";
        let table = self.txn.open_table(SEEN).map_err(backend(op))?;
        let Some(guard) = table.get(serial).map_err(backend(op))? else {
            return Ok(None);
        };
        seen::SeenSet::decode(guard.value())
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt {
                table: "seen_by_device",
                key: serial.to_owned(),
                reason: format!(
                    "{} bytes, not a set of seen-ids windows",
                    guard.value().len()
                ),
            })
    }
}

impl JobTables for RedbTxn {
    fn next_job_number(&mut self) -> Result<u64, StoreError> {
        let op = "allocate a job number";
        let mut meta = self.txn.open_table(META).map_err(backend(op))?;
        let last = meta
            .get(NEXT_JOB)
            .map_err(backend(op))?
            .map(|g| g.value())
            .unwrap_or(0);
        let n = last + 1;
        meta.insert(NEXT_JOB, n).map_err(backend(op))?;
        self.dirty = true;
        Ok(n)
    }

    fn job(&self, n: u64) -> Result<Option<JobRecord>, StoreError> {
        let table = self.txn.open_table(JOBS).map_err(backend("read a job"))?;
        let guard = table.get(n).map_err(backend("read a job"))?;
        guard
            .map(|g| decode("jobs", job_id(n), g.value()))
            .transpose()
    }

    fn put_job(&mut self, n: u64, record: &JobRecord) -> Result<(), StoreError> {
        let op = "write a job";
        let bytes = encode("jobs", job_id(n), record)?;
        self.txn
            .open_table(JOBS)
            .map_err(backend(op))?
            .insert(n, bytes.as_slice())
            .map_err(backend(op))?;
        if let Some(order) = &record.order {
            let serial_key = (order.serial.as_str(), n);
            let deadline_key = order.deadline.map(|d| (d.timestamp_millis(), n));
            let mut by_serial = self.txn.open_table(OPEN_BY_SERIAL).map_err(backend(op))?;
            let mut deadlines = self.txn.open_table(OPEN_DEADLINES).map_err(backend(op))?;
            if record.is_open() {
                by_serial.insert(serial_key, ()).map_err(backend(op))?;
                if let Some(key) = deadline_key {
                    deadlines.insert(key, ()).map_err(backend(op))?;
                }
            } else {
                by_serial.remove(serial_key).map_err(backend(op))?;
                if let Some(key) = deadline_key {
                    deadlines.remove(key).map_err(backend(op))?;
                }
            }
        }
        self.dirty = true;
        Ok(())
    }

    fn jobs_newest_first(
        &self,
        keep: &mut dyn FnMut(&JobRecord) -> bool,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let op = "list jobs";
        let table = self.txn.open_table(JOBS).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))?.rev() {
            let (k, v) = entry.map_err(backend(op))?;
            let record: JobRecord = decode("jobs", job_id(k.value()), v.value())?;
            if keep(&record) {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn job_numbers(&self) -> Result<Vec<u64>, StoreError> {
        let op = "list jobs";
        let table = self.txn.open_table(JOBS).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))? {
            out.push(entry.map_err(backend(op))?.0.value());
        }
        Ok(out)
    }

    fn push_event(&mut self, n: u64, event: &JobEvent) -> Result<(), StoreError> {
        let op = "write a job event";
        let mut table = self.txn.open_table(JOB_EVENTS).map_err(backend(op))?;
        let last = match table
            .range((n, 0)..=(n, u32::MAX))
            .map_err(backend(op))?
            .next_back()
        {
            Some(entry) => Some(entry.map_err(backend(op))?.0.value().1),
            None => None,
        };
        let seq = last.map_or(0, |s| s.saturating_add(1));
        let bytes = encode("job_events", format_args!("{} #{seq}", job_id(n)), event)?;
        table
            .insert((n, seq), bytes.as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    fn events(&self, n: u64) -> Result<Vec<JobEvent>, StoreError> {
        let op = "read job events";
        let table = self.txn.open_table(JOB_EVENTS).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.range((n, 0)..=(n, u32::MAX)).map_err(backend(op))? {
            let (k, v) = entry.map_err(backend(op))?;
            let seq = k.value().1;
            out.push(decode(
                "job_events",
                format_args!("{} #{seq}", job_id(n)),
                v.value(),
            )?);
        }
        Ok(out)
    }

    fn report(&self, n: u64) -> Result<Option<DeviceData>, StoreError> {
        let table = self
            .txn
            .open_table(REPORTS)
            .map_err(backend("read a report"))?;
        let guard = table.get(n).map_err(backend("read a report"))?;
        guard
            .map(|g| decode("reports", job_id(n), g.value()))
            .transpose()
    }

    fn put_report(&mut self, n: u64, data: &DeviceData) -> Result<(), StoreError> {
        let op = "write a report";
        let bytes = encode("reports", job_id(n), data)?;
        self.txn
            .open_table(REPORTS)
            .map_err(backend(op))?
            .insert(n, bytes.as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    fn open_jobs(&self) -> Result<Vec<u64>, StoreError> {
        let op = "list open jobs";
        let table = self.txn.open_table(OPEN_BY_SERIAL).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))? {
            out.push(entry.map_err(backend(op))?.0.value().1);
        }
        out.sort_unstable();
        Ok(out)
    }

    fn open_jobs_of(&self, serial: &Serial) -> Result<Vec<u64>, StoreError> {
        let op = "list a device's open jobs";
        let table = self.txn.open_table(OPEN_BY_SERIAL).map_err(backend(op))?;
        let s = serial.as_str();
        let mut out = Vec::new();
        for entry in table.range((s, 0)..=(s, u64::MAX)).map_err(backend(op))? {
            out.push(entry.map_err(backend(op))?.0.value().1);
        }
        Ok(out)
    }

    fn due_jobs(&self, now: Timestamp) -> Result<Vec<u64>, StoreError> {
        let op = "list due jobs";
        let table = self.txn.open_table(OPEN_DEADLINES).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table
            .range(..=(now.timestamp_millis(), u64::MAX))
            .map_err(backend(op))?
        {
            out.push(entry.map_err(backend(op))?.0.value().1);
        }
        Ok(out)
    }

    fn merged(&self, n: u64) -> Result<Option<DeviceData>, StoreError> {
        let op = "read merged data";
        let table = self.txn.open_table(MERGED).map_err(backend(op))?;
        let guard = table.get(n).map_err(backend(op))?;
        guard
            .map(|g| decode("merged", job_id(n), g.value()))
            .transpose()
    }

    fn put_merged(&mut self, n: u64, data: &DeviceData) -> Result<(), StoreError> {
        let op = "write merged data";
        let bytes = encode("merged", job_id(n), data)?;
        self.txn
            .open_table(MERGED)
            .map_err(backend(op))?
            .insert(n, bytes.as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    #[cfg(test)]
    fn put_raw_job(&mut self, n: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.txn
            .open_table(JOBS)
            .map_err(backend("write"))?
            .insert(n, bytes)
            .map_err(backend("write"))?;
        self.dirty = true;
        Ok(())
    }
}

impl JournalTables for RedbTxn {
    fn journal(&self, sender: &str, id: MsgId) -> Result<Option<JournalEntry>, StoreError> {
        match sender.strip_prefix("device:") {
            Some(serial) => self.device_journal_any(serial, id),
            None => self.journal_row(sender, id),
        }
    }

    fn device_journal_any(
        &self,
        serial: &str,
        id: MsgId,
    ) -> Result<Option<JournalEntry>, StoreError> {
        let set = self.seen_set(serial)?;
        for inc in device_journal::incarnations(set.as_ref()) {
            if let Some(entry) = self.device_journal(serial, Seq { inc, id })? {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    fn put_journal(
        &mut self,
        sender: &str,
        id: MsgId,
        entry: &JournalEntry,
    ) -> Result<(), StoreError> {
        self.put_journal_row(sender, id, entry)
    }

    fn device_journal(&self, serial: &str, seq: Seq) -> Result<Option<JournalEntry>, StoreError> {
        let set = self.seen_set(serial)?;
        let found =
            device_journal::lookup(set.as_ref(), serial, seq, |k, id| self.journal_row(k, id))?;
        if found.is_none() && seq.inc == 0 && self.legacy_device_journal {
            return self.journal_row(&format!("device:{serial}"), seq.id);
        }
        Ok(found)
    }

    fn put_device_journal(
        &mut self,
        serial: &str,
        seq: Seq,
        entry: &JournalEntry,
    ) -> Result<seen::Placed, StoreError> {
        let op = "write a device's seen ids";
        let mut set = self.seen_set(serial)?.unwrap_or_default();
        let (placed, row) = device_journal::record(&mut set, seq, entry);
        self.txn
            .open_table(SEEN)
            .map_err(backend(op))?
            .insert(serial, set.encode().as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        if row {
            self.put_journal_row(&device_journal::row_key(serial, seq.inc), seq.id, entry)?;
        }
        // `seen_set` above left this serial's entry; it now holds the new set.
        match self.last_window.get_mut() {
            Some((last, cached)) if last == serial => *cached = Some(set),
            slot => *slot = Some((serial.to_owned(), Some(set))),
        }
        Ok(placed)
    }
}

impl DeviceTables for RedbTxn {
    fn device(&self, serial: &Serial) -> Result<Option<DeviceRecord>, StoreError> {
        let table = self
            .txn
            .open_table(DEVICES)
            .map_err(backend("read a device"))?;
        let guard = table
            .get(serial.as_str())
            .map_err(backend("read a device"))?;
        guard
            .map(|g| decode("devices", serial, g.value()))
            .transpose()
    }

    fn device_state(&self, serial: &Serial) -> Result<Option<DeviceState>, StoreError> {
        let op = "read a device's state";
        let table = self.txn.open_table(DEVICES).map_err(backend(op))?;
        let guard = table.get(serial.as_str()).map_err(backend(op))?;
        guard
            .map(|g| decode::<StoredState>("devices", serial, g.value()).map(|s| s.state))
            .transpose()
    }

    fn put_device(&mut self, serial: &Serial, record: &DeviceRecord) -> Result<(), StoreError> {
        let op = "write a device";
        let bytes = encode("devices", serial, record)?;
        self.txn
            .open_table(DEVICES)
            .map_err(backend(op))?
            .insert(serial.as_str(), bytes.as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    fn device_serials(&self) -> Result<Vec<Serial>, StoreError> {
        let op = "list devices";
        let table = self.txn.open_table(DEVICES).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))? {
            let (k, _) = entry.map_err(backend(op))?;
            let key = k.value();
            out.push(serial_key("devices", key)?);
        }
        Ok(out)
    }

    #[cfg(test)]
    fn put_raw_device(&mut self, serial: &Serial, bytes: &[u8]) -> Result<(), StoreError> {
        self.txn
            .open_table(DEVICES)
            .map_err(backend("write"))?
            .insert(serial.as_str(), bytes)
            .map_err(backend("write"))?;
        self.dirty = true;
        Ok(())
    }
}

impl ArtifactTables for RedbTxn {
    fn artifact(&self, id: &ArtifactId) -> Result<Option<ArtifactInfo>, StoreError> {
        let op = "read an artifact";
        let table = self.txn.open_table(ARTIFACTS).map_err(backend(op))?;
        let guard = table.get(id.as_str()).map_err(backend(op))?;
        guard
            .map(|g| decode("artifacts", id, g.value()))
            .transpose()
    }

    fn put_artifact(&mut self, info: &ArtifactInfo) -> Result<(), StoreError> {
        let op = "write an artifact";
        let id = &info.artifact.id;
        let bytes = encode("artifacts", id, info)?;
        self.txn
            .open_table(ARTIFACTS)
            .map_err(backend(op))?
            .insert(id.as_str(), bytes.as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    fn artifacts(&self) -> Result<Vec<ArtifactInfo>, StoreError> {
        let op = "list artifacts";
        let table = self.txn.open_table(ARTIFACTS).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))? {
            let (k, v) = entry.map_err(backend(op))?;
            out.push(decode("artifacts", k.value(), v.value())?);
        }
        Ok(out)
    }

    fn remove_artifact(&mut self, id: &ArtifactId) -> Result<(), StoreError> {
        let op = "remove an artifact";
        self.txn
            .open_table(ARTIFACTS)
            .map_err(backend(op))?
            .remove(id.as_str())
            .map_err(backend(op))?;
        self.remove_chunks(id)
    }

    fn remove_chunks(&mut self, id: &ArtifactId) -> Result<(), StoreError> {
        let op = "remove artifact chunks";
        let a = id.as_str();
        self.txn
            .open_table(ARTIFACT_CHUNKS)
            .map_err(backend(op))?
            .retain_in((a, 0)..=(a, u32::MAX), |_, _| false)
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    fn chunk(&self, id: &ArtifactId, index: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let op = "read an artifact chunk";
        let table = self.txn.open_table(ARTIFACT_CHUNKS).map_err(backend(op))?;
        let guard = table.get((id.as_str(), index)).map_err(backend(op))?;
        Ok(guard.map(|g| g.value().to_vec()))
    }

    fn put_chunk(&mut self, id: &ArtifactId, index: u32, data: &[u8]) -> Result<(), StoreError> {
        let op = "write an artifact chunk";
        self.txn
            .open_table(ARTIFACT_CHUNKS)
            .map_err(backend(op))?
            .insert((id.as_str(), index), data)
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    fn visit_chunks(
        &self,
        id: &ArtifactId,
        f: &mut dyn FnMut(u32, &[u8]),
    ) -> Result<u32, StoreError> {
        let op = "read artifact chunks";
        let table = self.txn.open_table(ARTIFACT_CHUNKS).map_err(backend(op))?;
        let a = id.as_str();
        let mut count = 0u32;
        for entry in table.range((a, 0)..=(a, u32::MAX)).map_err(backend(op))? {
            let (k, v) = entry.map_err(backend(op))?;
            f(k.value().1, v.value());
            count = count.saturating_add(1);
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::*;
    use chrono::TimeZone;
    use protocol::job::{JobOrder, JobSpec, JobStatus, JobView};

    fn at(h: u32) -> Timestamp {
        chrono::Utc.with_ymd_and_hms(2026, 11, 26, h, 0, 0).unwrap()
    }

    pub(super) fn record(
        n: u64,
        serial: &str,
        status: JobStatus,
        deadline: Option<Timestamp>,
    ) -> JobRecord {
        let id = job_id(n);
        let serial = Serial::parse(serial).unwrap();
        JobRecord {
            view: JobView {
                id: id.to_string(),
                serial: serial.to_string(),
                site: String::new(),
                instruction: "GET DATA".into(),
                data_type: "counters".into(),
                server: "relay".into(),
                host: "svc".into(),
                instruction_time: Some(at(9)),
                execution_time: None,
                status,
                submitted_at: at(9),
                updated_at: at(9),
                reason: None,
            },
            order: Some(JobOrder {
                job: id,
                serial,
                spec: JobSpec::GetData { sections: vec![] },
                instruction_time: at(9),
                execution_time: None,
                deadline,
                max_attempts: 1,
            }),
            ended_at: None,
            rollout: None,
        }
    }

    #[test]
    fn job_ids_and_numbers() {
        assert_eq!(job_id(1).as_str(), "J-000001");
        assert_eq!(job_id(1234567).as_str(), "J-1234567");
        assert_eq!(job_number("J-000042"), Some(42));
        assert_eq!(job_number("J-1234567"), Some(1234567));
        for bad in ["J-", "J-1x", "K-1", "J--1", "", "J-+1"] {
            assert_eq!(job_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn records_survive_reopening_and_counter_continues() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::store::testing::open(dir.path());
            let mut txn = store.begin().unwrap();
            assert_eq!(txn.next_job_number().unwrap(), 1);
            assert_eq!(txn.next_job_number().unwrap(), 2);
            txn.put_job(2, &record(2, "C1", JobStatus::Queued, None))
                .unwrap();
            txn.push_event(
                2,
                &JobEvent {
                    at: at(9),
                    status: JobStatus::Queued,
                    note: None,
                },
            )
            .unwrap();
            txn.push_event(
                2,
                &JobEvent {
                    at: at(10),
                    status: JobStatus::Delivered,
                    note: None,
                },
            )
            .unwrap();
            assert!(txn.commit().unwrap());
        }
        let store = crate::store::testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        assert_eq!(txn.next_job_number().unwrap(), 3);
        assert_eq!(
            txn.job(2).unwrap().unwrap(),
            record(2, "C1", JobStatus::Queued, None)
        );
        assert_eq!(txn.job(1).unwrap(), None);
        let statuses: Vec<_> = txn
            .events(2)
            .unwrap()
            .into_iter()
            .map(|e| e.status)
            .collect();
        assert_eq!(statuses, [JobStatus::Queued, JobStatus::Delivered]);
        assert!(txn.events(1).unwrap().is_empty());
    }

    #[test]
    fn open_job_indexes_follow_the_status() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        txn.put_job(1, &record(1, "C1", JobStatus::Queued, Some(at(10))))
            .unwrap();
        txn.put_job(2, &record(2, "C2", JobStatus::Queued, Some(at(12))))
            .unwrap();
        txn.put_job(3, &record(3, "C1", JobStatus::InProgress, None))
            .unwrap();
        let c1 = Serial::parse("C1").unwrap();
        assert_eq!(txn.open_jobs().unwrap(), [1, 2, 3]);
        assert_eq!(txn.open_jobs_of(&c1).unwrap(), [1, 3]);
        assert_eq!(txn.due_jobs(at(11)).unwrap(), [1]);
        assert_eq!(txn.due_jobs(at(12)).unwrap(), [1, 2]);

        txn.put_job(1, &record(1, "C1", JobStatus::Succeeded, Some(at(10))))
            .unwrap();
        assert_eq!(txn.open_jobs().unwrap(), [2, 3]);
        assert_eq!(txn.open_jobs_of(&c1).unwrap(), [3]);
        assert!(txn.due_jobs(at(11)).unwrap().is_empty());
        let newest: Vec<_> = txn
            .jobs_newest_first(&mut |_| true)
            .unwrap()
            .into_iter()
            .map(|r| r.view.id)
            .collect();
        assert_eq!(newest, ["J-000003", "J-000002", "J-000001"]);
    }

    #[test]
    fn a_corrupt_record_names_its_table_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        txn.put_raw_job(7, &[0xff, 0x00]).unwrap();
        let err = txn.job(7).unwrap_err();
        assert!(err.is_corrupt_record());
        let text = err.to_string();
        assert!(
            text.contains("table jobs") && text.contains("J-000007"),
            "{text}"
        );
        assert!(txn.jobs_newest_first(&mut |_| true).is_err());
    }

    #[test]
    fn artifact_chunks_are_kept_per_artifact_and_dropped_with_it() {
        use protocol::artifact::{ArtifactId, ArtifactInfo, ArtifactRef};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let (a, b) = (
            ArtifactId::from_digest(&[1; 32]),
            ArtifactId::from_digest(&[2; 32]),
        );
        let info = |id: &ArtifactId| ArtifactInfo {
            artifact: ArtifactRef {
                id: id.clone(),
                version: "1.0".into(),
                size: 6,
                chunk_size: 2,
                signature: "00".repeat(64),
                publisher: "svc".into(),
            },
            received: 3,
            complete: true,
            uploaded_at: at(9),
        };
        let mut txn = store.begin().unwrap();
        for id in [&a, &b] {
            txn.put_artifact(&info(id)).unwrap();
            // Out of order on purpose: visits come back in index order.
            for i in [2u32, 0, 1] {
                txn.put_chunk(id, i, &[i as u8; 2]).unwrap();
            }
        }
        txn.commit().unwrap();

        let mut txn = store.begin().unwrap();
        let mut seen = Vec::new();
        assert_eq!(
            txn.visit_chunks(&a, &mut |i, d| seen.push((i, d[0])))
                .unwrap(),
            3
        );
        assert_eq!(seen, [(0, 0), (1, 1), (2, 2)]);
        assert_eq!(txn.chunk(&b, 1).unwrap(), Some(vec![1, 1]));
        assert_eq!(txn.artifacts().unwrap(), [info(&a), info(&b)]);
        txn.remove_artifact(&a).unwrap();
        txn.commit().unwrap();

        let txn = store.begin().unwrap();
        assert_eq!(txn.artifact(&a).unwrap(), None);
        assert_eq!(txn.visit_chunks(&a, &mut |_, _| {}).unwrap(), 0);
        assert_eq!(
            txn.visit_chunks(&b, &mut |_, _| {}).unwrap(),
            3,
            "b is untouched"
        );
        assert_eq!(txn.artifact(&b).unwrap(), Some(info(&b)));
    }

    #[test]
    fn a_transaction_that_wrote_nothing_does_not_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let txn = store.begin().unwrap();
        assert!(txn.job(1).unwrap().is_none());
        assert!(!txn.commit().unwrap());
    }

    #[test]
    fn a_write_that_fails_for_space_is_not_stored_and_a_reopen_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let disk = test_disk::FillingDisk::default();
        let store = disk.store(dir.path());
        let mut txn = store.begin().unwrap();
        txn.put_job(1, &record(1, "C1", JobStatus::Queued, None))
            .unwrap();
        assert!(txn.commit().unwrap());

        disk.set_full(true);
        let mut txn = store.begin().unwrap();
        txn.put_job(2, &record(2, "C1", JobStatus::Queued, None))
            .unwrap();
        let err = txn.commit().expect_err("the disk is full");
        assert!(
            err.is_storage() && err.needs_reopen() && err.is_disk_full(),
            "{err:?}"
        );
        // redb latched the error: even a read fails until the database is opened again.
        let later = store.begin().and_then(|t| t.job(1));
        assert!(
            later.as_ref().is_err_and(StoreError::needs_reopen),
            "{later:?}"
        );

        disk.set_full(false);
        store.reopen().unwrap();
        assert!(!store.is_closed());
        let mut txn = store.begin().unwrap();
        assert_eq!(
            txn.job(1).unwrap(),
            Some(record(1, "C1", JobStatus::Queued, None)),
            "what was committed before survives"
        );
        assert_eq!(txn.job(2).unwrap(), None, "the failed commit left nothing");
        txn.put_job(2, &record(2, "C1", JobStatus::Queued, None))
            .unwrap();
        assert!(txn.commit().unwrap(), "writes work again");
    }

    #[test]
    fn a_commit_below_the_reserve_is_refused_before_redb_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let mut txn = store.begin_redb().unwrap();
        txn.put_job(1, &record(1, "C1", JobStatus::Queued, None))
            .unwrap();
        // A reserve no file system has: every commit is refused, and the store stays usable.
        txn.space = Some(Space::with_reserve(dir.path(), u64::MAX));
        let err = txn.commit_redb().expect_err("below the reserve");
        assert!(err.is_storage() && err.is_disk_full() && !err.needs_reopen());
        let text = err.to_string();
        assert!(text.starts_with("relay storage full"), "{text}");
        let txn = store.begin().unwrap();
        assert_eq!(txn.job(1).unwrap(), None, "refused, so not stored");
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RedbStore::open(dir.path()).unwrap();
        let err = RedbStore::open(dir.path())
            .err()
            .expect("second open must fail")
            .to_string();
        assert!(
            err.contains("chukei.redb") && err.contains("another broker"),
            "{err}"
        );
    }

    fn seq(id: MsgId) -> Seq {
        Seq { inc: 0, id }
    }

    fn stored_at(t: Timestamp) -> JournalEntry {
        JournalEntry {
            at: t,
            outcome: JournalOutcome::Stored,
        }
    }

    #[test]
    fn devices_interleaved_in_one_transaction_each_see_their_own_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        // As a batch does: check, then record, for messages of devices taking turns.
        for (serial, id) in [("A1", 1), ("B1", 1), ("A1", 2), ("B1", 7)] {
            assert_eq!(
                txn.device_journal(serial, seq(id)).unwrap(),
                None,
                "{serial} #{id}"
            );
            txn.put_device_journal(serial, seq(id), &stored_at(at(9)))
                .unwrap();
            assert!(
                txn.device_journal(serial, seq(id)).unwrap().is_some(),
                "{serial} #{id}"
            );
        }
        assert_eq!(
            txn.device_journal("A1", seq(7)).unwrap(),
            None,
            "B1's id is not A1's"
        );
        assert_eq!(
            txn.device_journal("B1", seq(2)).unwrap(),
            None,
            "A1's id is not B1's"
        );
        assert!(txn.commit().unwrap());

        // What the transaction wrote is what the next one reads from the table.
        let txn = store.begin().unwrap();
        for (serial, id, stored) in [
            ("A1", 1, true),
            ("A1", 2, true),
            ("A1", 7, false),
            ("B1", 1, true),
            ("B1", 7, true),
            ("B1", 2, false),
        ] {
            assert_eq!(
                txn.device_journal(serial, seq(id)).unwrap().is_some(),
                stored,
                "{serial} #{id}"
            );
        }
    }

    #[test]
    fn a_device_state_is_read_without_its_record_and_a_damaged_row_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let serial = Serial::parse("S1").unwrap();
        let state = DeviceState {
            site: "Osaka".into(),
            model: "MX-1".into(),
            firmware: "1.0".into(),
        };
        let mut txn = store.begin().unwrap();
        assert_eq!(txn.device_state(&serial).unwrap(), None);
        txn.put_device(
            &serial,
            &DeviceRecord {
                state: state.clone(),
                last_seen: at(9),
            },
        )
        .unwrap();
        assert!(txn.commit().unwrap());

        let mut txn = store.begin().unwrap();
        assert_eq!(txn.device_state(&serial).unwrap(), Some(state));
        txn.put_raw_device(&serial, &[0xff, 0x00]).unwrap();
        let err = txn.device_state(&serial).unwrap_err();
        assert!(err.is_corrupt_record(), "{err}");
    }

    #[test]
    fn device_messages_are_deduplicated_by_window_and_hosts_keep_a_row_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let mut txn = store.begin().unwrap();
        for id in [1, 2, 3, 5] {
            txn.put_device_journal("C1", seq(id), &stored_at(at(9)))
                .unwrap();
        }
        let submission = JournalEntry {
            at: at(9),
            outcome: JournalOutcome::Submission { job: job_id(7) },
        };
        txn.put_journal("host:svc", 1, &submission).unwrap();
        assert!(txn.commit().unwrap());

        let txn = store.begin_redb().unwrap();
        for id in [1, 2, 3, 5] {
            assert_eq!(
                txn.device_journal("C1", seq(id)).unwrap(),
                Some(stored_at(at(9)))
            );
        }
        assert_eq!(txn.device_journal("C1", seq(4)).unwrap(), None);
        assert_eq!(
            txn.device_journal("C2", seq(1)).unwrap(),
            None,
            "windows are per device"
        );
        assert_eq!(txn.journal("host:svc", 1).unwrap(), Some(submission));
        assert_eq!(txn.journal("host:svc", 2).unwrap(), None);
        let journal = txn.txn.open_table(JOURNAL).unwrap();
        assert_eq!(
            journal.iter().unwrap().count(),
            1,
            "only the host's message has a row"
        );
    }

    #[test]
    fn device_rows_written_before_windows_still_count_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The journal as a relay before windows left it: a row per device message.
            let store = RedbStore::open(dir.path()).unwrap();
            let txn = store.begin_redb().unwrap();
            let bytes = encode("journal", "device:C1 #7", &stored_at(at(8))).unwrap();
            txn.txn
                .open_table(JOURNAL)
                .unwrap()
                .insert(("device:C1", 7), bytes.as_slice())
                .unwrap();
            txn.txn.commit().unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(store.legacy_device_journal);
        let txn = store.begin().unwrap();
        assert_eq!(
            txn.device_journal("C1", seq(7)).unwrap(),
            Some(stored_at(at(8)))
        );
        assert_eq!(txn.device_journal("C1", seq(8)).unwrap(), None);
    }

    #[test]
    fn a_forged_id_far_ahead_makes_no_real_report_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let inc = 0x5eed;
        let at_inc = |id| Seq { inc, id };
        let mut txn = store.begin().unwrap();
        txn.put_device_journal("C1", at_inc(1), &stored_at(at(9)))
            .unwrap();
        let placed = txn
            .put_device_journal("C1", at_inc(u64::MAX), &stored_at(at(9)))
            .unwrap();
        assert_eq!(placed, seen::Placed::Beyond);
        assert!(txn.commit().unwrap());

        let mut txn = store.begin().unwrap();
        assert_eq!(
            txn.device_journal("C1", at_inc(u64::MAX)).unwrap(),
            Some(stored_at(at(9))),
            "the forged id itself was stored, in a row: its resend is a duplicate"
        );
        for id in 2..2000 {
            assert_eq!(
                txn.device_journal("C1", at_inc(id)).unwrap(),
                None,
                "#{id} was never stored"
            );
            txn.put_device_journal("C1", at_inc(id), &stored_at(at(10)))
                .unwrap();
        }
        assert_eq!(
            txn.device_journal("C1", at_inc(1999)).unwrap(),
            Some(stored_at(at(10)))
        );
    }

    #[test]
    fn a_device_that_starts_over_with_a_new_outbox_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let (old, new) = (0x1, 0x2);
        let mut txn = store.begin().unwrap();
        for id in 1..=700 {
            txn.put_device_journal("C1", Seq { inc: old, id }, &stored_at(at(9)))
                .unwrap();
        }
        assert!(txn.commit().unwrap());
        let mut txn = store.begin().unwrap();
        // A wiped agent: a new outbox, ids from 1 again.
        for id in 1..=3 {
            assert_eq!(
                txn.device_journal("C1", Seq { inc: new, id }).unwrap(),
                None
            );
            txn.put_device_journal("C1", Seq { inc: new, id }, &stored_at(at(10)))
                .unwrap();
        }
        assert!(
            txn.device_journal("C1", Seq { inc: old, id: 700 })
                .unwrap()
                .is_some(),
            "the old outbox's late resend is still a duplicate"
        );
        // A reader that knows ids, not incarnations, finds each in the outbox that stored it.
        assert!(txn.journal("device:C1", 700).unwrap().is_some());
        assert!(txn.journal("device:C1", 3).unwrap().is_some());
        assert_eq!(txn.journal("device:C1", 701).unwrap(), None);
    }

    #[test]
    fn a_refused_message_is_refused_again_never_called_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let refused = JournalEntry {
            at: at(9),
            outcome: JournalOutcome::Refused {
                reason: "counter total is -999".into(),
            },
        };
        let mut txn = store.begin().unwrap();
        txn.put_device_journal("C1", seq(1), &refused).unwrap();
        txn.put_device_journal("C1", seq(2), &stored_at(at(9)))
            .unwrap();
        assert!(txn.commit().unwrap());
        let txn = store.begin().unwrap();
        assert_eq!(txn.device_journal("C1", seq(1)).unwrap(), Some(refused));
        assert_eq!(
            txn.device_journal("C1", seq(2)).unwrap(),
            Some(stored_at(at(9))),
            "the refusal moved the window on: the next id is deduplicated as before"
        );
        assert!(!store.legacy_device_journal);
        drop(txn);
        let path = dir.path().to_owned();
        drop(store);
        assert!(
            !RedbStore::open(&path).unwrap().legacy_device_journal,
            "a refusal's row is not a row of a relay before windows"
        );
    }
}
