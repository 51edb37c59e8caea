//! The store's tables ([`crate::store::interface`]) in SQL: the same records and the same
//! answers as the embedded store, the indexes kept by PostgreSQL.

use protocol::alarm::AlarmView;
use protocol::artifact::{ArtifactId, ArtifactInfo};
use protocol::data::DeviceData;
use protocol::device::DeviceState;
use protocol::job::{JobEvent, JobStatus};
use protocol::meter::CounterReading;
use protocol::relay::UplinkItem;
use protocol::{MsgId, Seq, Serial, Timestamp};

use super::{Conn, P, PgTxn};
use crate::store::records::StoredState;
use crate::store::{
    AlarmDigest, AlarmTables, ArtifactTables, DeviceRecord, DeviceTables, Due, JobRecord,
    JobTables, JournalEntry, JournalTables, NotificationTables, OpenJobKey, OverflowRecord,
    PresenceRecord, PresenceTables, QueuedNotification, ReadingCursor, ReadingTables,
    RolloutRecord, RolloutTables, StoreError, StoreStats, UplinkTables, alarm_id, decode,
    device_journal, encode, job_id, rollout_id, seen, within_bytes,
};

fn n64(n: u64) -> P {
    P::I64(n as i64)
}

fn text(s: &str) -> P {
    P::Text(s.to_owned())
}

/// A chunk index (an `integer` column: chunks number far fewer than 2^31).
fn index_p(index: u32) -> P {
    P::I32(i32::try_from(index).unwrap_or(i32::MAX))
}

fn ms(t: Timestamp) -> P {
    P::I64(t.timestamp_millis())
}

/// Column `i` of a row, or why it cannot be read as a `T` (a schema someone changed by hand).
pub(super) fn col<'a, T: postgres::types::FromSql<'a>>(
    row: &'a postgres::Row,
    i: usize,
) -> Result<T, StoreError> {
    row.try_get(i).map_err(|e| StoreError::Corrupt {
        table: "(a query's row)",
        key: format!("column {i}"),
        reason: e.to_string(),
    })
}

/// A `bigint` key column back as the u64 it was written from.
pub(super) fn u(row: &postgres::Row, i: usize) -> Result<u64, StoreError> {
    col::<i64>(row, i).map(|v| v as u64)
}

/// Every open job's number and serial and whether it has merged data, in one statement on
/// `conn` (the reader) that reads no record: nothing locked, no transaction
/// (`Store::open_job_keys`).
pub(super) fn open_job_keys(
    conn: &Conn,
    location: &str,
) -> Result<Vec<Result<OpenJobKey, StoreError>>, StoreError> {
    let rows = conn
        .query(
            "SELECT o.number, o.serial, EXISTS (SELECT 1 FROM merged m WHERE m.number = o.number) \
             FROM open_jobs o ORDER BY o.number",
            Vec::new(),
        )
        .ok_or_else(|| StoreError::Unavailable {
            location: location.to_owned(),
            reason: "the connection was lost while reading the open jobs".into(),
        })?
        .map_err(|e| StoreError::Database {
            op: "list open jobs",
            reason: super::reason(&e),
        })?;
    Ok(rows.iter().map(open_job_key).collect())
}

/// A row of [`open_job_keys`]: number, serial, whether merged data exists.
fn open_job_key(row: &postgres::Row) -> Result<OpenJobKey, StoreError> {
    Ok(OpenJobKey {
        number: u(row, 0)?,
        serial: serial_of("open_jobs", col::<&str>(row, 1)?.to_owned())?,
        merged: col(row, 2)?,
    })
}

fn serial_of(table: &'static str, key: String) -> Result<Serial, StoreError> {
    Serial::parse(&key).map_err(|e| StoreError::Corrupt {
        table,
        key: format!("{key:?}"),
        reason: e.to_string(),
    })
}

pub(super) fn decode_seen_set(serial: &str, bytes: &[u8]) -> Result<seen::SeenSet, StoreError> {
    seen::SeenSet::decode(bytes).ok_or_else(|| StoreError::Corrupt {
        table: "seen_by_device",
        key: serial.to_owned(),
        reason: format!("{} bytes, not a set of seen-ids windows", bytes.len()),
    })
}

/// A device's journal row: written again as its window moves (a batch's devices are locked
/// first, so nodes take their messages in turn).
const JOURNAL_UPSERT: &str = "INSERT INTO journal (sender, msg_id, entry) VALUES ($1, $2, $3)
     ON CONFLICT (sender, msg_id) DO UPDATE SET entry = EXCLUDED.entry";
/// A host's request, journaled once by the transaction that did it. Its row is not locked
/// before it exists, so two nodes given the same request at once (a host that resent it through
/// another node while the first was slow) would both do it; a plain INSERT makes the second
/// commit fail on the key instead, and its batch is resent and answered from the first's entry.
const JOURNAL_INSERT: &str = "INSERT INTO journal (sender, msg_id, entry) VALUES ($1, $2, $3)";

impl PgTxn {
    /// Bumps a counter in `meta` and returns its new value. The row stays locked until the
    /// transaction ends, so two nodes allocating at once take turns, and a rolled-back
    /// transaction leaves no gap; the transaction's next numbers are counted here and the last
    /// written back with its other writes.
    fn next_counter(&mut self, name: &'static str, op: &'static str) -> Result<u64, StoreError> {
        let taken = self.cache.borrow().counters.get(name).map(|c| c.last);
        let n = match taken {
            Some(last) => last + 1,
            None => {
                let rows = self.write_rows(
                    op,
                    "INSERT INTO meta (name, value) VALUES ($1, 1)
                     ON CONFLICT (name) DO UPDATE SET value = meta.value + 1 RETURNING value",
                    vec![text(name)],
                )?;
                rows.first().map_or(Ok(1), |r| u(r, 0))?
            }
        };
        self.cache.borrow_mut().counters.insert(
            name,
            super::Counter {
                last: n,
                unsent: taken.is_some(),
            },
        );
        Ok(n)
    }

    /// The one `bytea` column of the row `sql` selects, if there is one.
    fn blob(
        &self,
        op: &'static str,
        sql: &'static str,
        params: Vec<P>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.rows(op, sql, params)?
            .first()
            .map(|r| col::<Vec<u8>>(r, 0))
            .transpose()
    }

    /// The one `bytea` column of the row `sql` selects, read once per transaction: after the
    /// first read (the row locked `FOR UPDATE`, or written by this transaction) the answer comes
    /// from the transaction's cache, the map `table` picks, under `key`.
    fn cached_blob<K, Q>(
        &self,
        table: fn(&mut super::Cache) -> &mut std::collections::HashMap<K, Option<Vec<u8>>>,
        key: &Q,
        op: &'static str,
        sql: &'static str,
        params: impl FnOnce() -> Vec<P>,
    ) -> Result<Option<Vec<u8>>, StoreError>
    where
        K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
        Q: ToOwned<Owned = K> + std::hash::Hash + Eq + ?Sized,
    {
        if let Some(bytes) = table(&mut self.cache.borrow_mut()).get(key) {
            return Ok(bytes.clone());
        }
        let bytes = self.blob(op, sql, params())?;
        table(&mut self.cache.borrow_mut()).insert(key.to_owned(), bytes.clone());
        Ok(bytes)
    }

    fn journal_row(&self, sender: &str, id: MsgId) -> Result<Option<JournalEntry>, StoreError> {
        self.cached_blob(
            |c| &mut c.journal,
            &(sender.to_owned(), id),
            "read the journal",
            "SELECT entry FROM journal WHERE sender = $1 AND msg_id = $2",
            || vec![text(sender), n64(id)],
        )?
        .map(|b| decode("journal", format_args!("{sender} #{id}"), &b))
        .transpose()
    }

    /// Writes a journal row with `sql` ([`JOURNAL_UPSERT`] or [`JOURNAL_INSERT`]).
    fn put_journal_row(
        &mut self,
        sql: &'static str,
        sender: &str,
        id: MsgId,
        entry: &JournalEntry,
    ) -> Result<(), StoreError> {
        let bytes = encode("journal", format_args!("{sender} #{id}"), entry)?;
        self.write(
            "write the journal",
            sql,
            vec![text(sender), n64(id), P::Bytes(bytes.clone())],
        )?;
        self.cache
            .borrow_mut()
            .journal
            .insert((sender.to_owned(), id), Some(bytes));
        Ok(())
    }

    fn seen_set(&self, serial: &str) -> Result<Option<seen::SeenSet>, StoreError> {
        if let Some(set) = self.cache.borrow().windows.get(serial) {
            return Ok(set.clone());
        }
        let set = self.read_seen_set(serial)?;
        self.cache
            .borrow_mut()
            .windows
            .insert(serial.to_owned(), set.clone());
        Ok(set)
    }

    fn read_seen_set(&self, serial: &str) -> Result<Option<seen::SeenSet>, StoreError> {
        self.blob(
            "read a device's seen ids",
            "SELECT windows FROM seen_by_device WHERE serial = $1 FOR UPDATE",
            vec![text(serial)],
        )?
        .map(|bytes| decode_seen_set(serial, &bytes))
        .transpose()
    }

    /// A device's record as stored, read once per transaction (locked `FOR UPDATE`).
    fn device_bytes(&self, serial: &Serial) -> Result<Option<Vec<u8>>, StoreError> {
        self.cached_blob(
            |c| &mut c.devices,
            serial.as_str(),
            "read a device",
            "SELECT record FROM devices WHERE serial = $1 FOR UPDATE",
            || vec![text(serial.as_str())],
        )
    }

    /// A job's events as stored (sequence number, record), in order; read once per
    /// transaction (the job's row is locked by whoever adds to them).
    fn event_rows(&self, n: u64) -> Result<Vec<(i32, Vec<u8>)>, StoreError> {
        if let Some(rows) = self.cache.borrow().events.get(&n) {
            return Ok(rows.clone());
        }
        let rows = self
            .rows(
                "read job events",
                "SELECT seq, event FROM job_events WHERE number = $1 ORDER BY seq",
                vec![n64(n)],
            )?
            .iter()
            .map(|r| Ok((col::<i32>(r, 0)?, col::<Vec<u8>>(r, 1)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.cache.borrow_mut().events.insert(n, rows.clone());
        Ok(rows)
    }

    fn serials(
        &self,
        op: &'static str,
        table: &'static str,
        sql: &'static str,
        params: Vec<P>,
    ) -> Result<Vec<Serial>, StoreError> {
        self.rows(op, sql, params)?
            .iter()
            .map(|r| serial_of(table, col(r, 0)?))
            .collect()
    }

    fn numbers(
        &self,
        op: &'static str,
        sql: &'static str,
        params: Vec<P>,
    ) -> Result<Vec<u64>, StoreError> {
        self.rows(op, sql, params)?
            .iter()
            .map(|r| u(r, 0))
            .collect()
    }
}

impl JobTables for PgTxn {
    fn next_job_number(&mut self) -> Result<u64, StoreError> {
        let n = self.next_counter("next_job", "allocate a job number")?;
        // A new number: nothing of it can be stored yet.
        let mut cache = self.cache.borrow_mut();
        cache.jobs.insert(n, None);
        cache.events.insert(n, Vec::new());
        cache.reports.insert(n, None);
        Ok(n)
    }

    fn job(&self, n: u64) -> Result<Option<JobRecord>, StoreError> {
        self.cached_blob(
            |c| &mut c.jobs,
            &n,
            "read a job",
            "SELECT record FROM jobs WHERE number = $1 FOR UPDATE",
            || vec![n64(n)],
        )?
        .map(|b| decode("jobs", job_id(n), &b))
        .transpose()
    }

    fn put_job(&mut self, n: u64, record: &JobRecord) -> Result<(), StoreError> {
        let op = "write a job";
        let bytes = encode("jobs", job_id(n), record)?;
        self.write(
            op,
            "INSERT INTO jobs (number, status, record) VALUES ($1, $2, $3)
             ON CONFLICT (number) DO UPDATE SET status = EXCLUDED.status, record = EXCLUDED.record",
            vec![
                n64(n),
                text(record.view.status.as_str()),
                P::Bytes(bytes.clone()),
            ],
        )?;
        self.cache.borrow_mut().jobs.insert(n, Some(bytes));
        if let Some(order) = &record.order {
            if record.is_open() {
                self.write(
                    op,
                    "INSERT INTO open_jobs (number, serial, deadline_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (number) DO UPDATE
                     SET serial = EXCLUDED.serial, deadline_ms = EXCLUDED.deadline_ms",
                    vec![
                        n64(n),
                        text(order.serial.as_str()),
                        P::OptI64(order.deadline.map(|d| d.timestamp_millis())),
                    ],
                )?;
            } else {
                self.write(op, "DELETE FROM open_jobs WHERE number = $1", vec![n64(n)])?;
            }
        }
        Ok(())
    }

    fn jobs_newest_first(
        &self,
        keep: &mut dyn FnMut(&JobRecord) -> bool,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let rows = self.rows(
            "list jobs",
            "SELECT number, record FROM jobs ORDER BY number DESC",
            Vec::new(),
        )?;
        let mut out = Vec::new();
        for r in rows {
            let record: JobRecord = decode("jobs", job_id(u(&r, 0)?), col::<&[u8]>(&r, 1)?)?;
            if keep(&record) {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn job_numbers(&self) -> Result<Vec<u64>, StoreError> {
        self.numbers(
            "list jobs",
            "SELECT number FROM jobs ORDER BY number",
            Vec::new(),
        )
    }

    fn push_event(&mut self, n: u64, event: &JobEvent) -> Result<(), StoreError> {
        let op = "write a job event";
        let seq = match self.event_rows(n)?.last() {
            Some((last, _)) => last.saturating_add(1),
            None => 0,
        };
        let bytes = encode("job_events", format_args!("{} #{seq}", job_id(n)), event)?;
        self.write(
            op,
            "INSERT INTO job_events (number, seq, event) VALUES ($1, $2, $3)",
            vec![n64(n), P::I32(seq), P::Bytes(bytes.clone())],
        )?;
        self.cache
            .borrow_mut()
            .events
            .entry(n)
            .or_default()
            .push((seq, bytes));
        Ok(())
    }

    fn events(&self, n: u64) -> Result<Vec<JobEvent>, StoreError> {
        self.event_rows(n)?
            .iter()
            .map(|(seq, bytes)| decode("job_events", format_args!("{} #{seq}", job_id(n)), bytes))
            .collect()
    }

    fn report(&self, n: u64) -> Result<Option<DeviceData>, StoreError> {
        self.cached_blob(
            |c| &mut c.reports,
            &n,
            "read a report",
            "SELECT data FROM reports WHERE number = $1",
            || vec![n64(n)],
        )?
        .map(|b| decode("reports", job_id(n), &b))
        .transpose()
    }

    fn put_report(&mut self, n: u64, data: &DeviceData) -> Result<(), StoreError> {
        let bytes = encode("reports", job_id(n), data)?;
        self.write(
            "write a report",
            "INSERT INTO reports (number, data) VALUES ($1, $2)
             ON CONFLICT (number) DO UPDATE SET data = EXCLUDED.data",
            vec![n64(n), P::Bytes(bytes.clone())],
        )?;
        self.cache.borrow_mut().reports.insert(n, Some(bytes));
        Ok(())
    }

    fn open_jobs(&self) -> Result<Vec<u64>, StoreError> {
        self.numbers(
            "list open jobs",
            "SELECT number FROM open_jobs ORDER BY number",
            Vec::new(),
        )
    }

    fn open_jobs_of(&self, serial: &Serial) -> Result<Vec<u64>, StoreError> {
        self.numbers(
            "list a device's open jobs",
            "SELECT number FROM open_jobs WHERE serial = $1 ORDER BY number",
            vec![text(serial.as_str())],
        )
    }

    fn due_jobs(&self, now: Timestamp) -> Result<Vec<u64>, StoreError> {
        self.numbers(
            "list due jobs",
            "SELECT number FROM open_jobs WHERE deadline_ms <= $1 ORDER BY deadline_ms, number",
            vec![ms(now)],
        )
    }

    fn merged(&self, n: u64) -> Result<Option<DeviceData>, StoreError> {
        self.blob(
            "read merged data",
            "SELECT data FROM merged WHERE number = $1",
            vec![n64(n)],
        )?
        .map(|b| decode("merged", job_id(n), &b))
        .transpose()
    }

    fn put_merged(&mut self, n: u64, data: &DeviceData) -> Result<(), StoreError> {
        let bytes = encode("merged", job_id(n), data)?;
        self.write(
            "write merged data",
            "INSERT INTO merged (number, data) VALUES ($1, $2)
             ON CONFLICT (number) DO UPDATE SET data = EXCLUDED.data",
            vec![n64(n), P::Bytes(bytes)],
        )?;
        Ok(())
    }

    #[cfg(test)]
    fn put_raw_job(&mut self, n: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.write(
            "write",
            "INSERT INTO jobs (number, status, record) VALUES ($1, 'queued', $2)
             ON CONFLICT (number) DO UPDATE SET record = EXCLUDED.record",
            vec![n64(n), P::Bytes(bytes.to_vec())],
        )?;
        self.cache.borrow_mut().jobs.insert(n, Some(bytes.to_vec()));
        Ok(())
    }
}

impl JournalTables for PgTxn {
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
        self.put_journal_row(JOURNAL_INSERT, sender, id, entry)
    }

    fn device_journal(&self, serial: &str, seq: Seq) -> Result<Option<JournalEntry>, StoreError> {
        let set = self.seen_set(serial)?;
        device_journal::lookup(set.as_ref(), serial, seq, |k, id| self.journal_row(k, id))
    }

    fn put_device_journal(
        &mut self,
        serial: &str,
        seq: Seq,
        entry: &JournalEntry,
    ) -> Result<seen::Placed, StoreError> {
        let mut set = self.seen_set(serial)?.unwrap_or_default();
        let (placed, row) = device_journal::record(&mut set, seq, entry);
        self.write(
            "write a device's seen ids",
            "INSERT INTO seen_by_device (serial, windows) VALUES ($1, $2)
             ON CONFLICT (serial) DO UPDATE SET windows = EXCLUDED.windows",
            vec![text(serial), P::Bytes(set.encode())],
        )?;
        if row {
            self.put_journal_row(
                JOURNAL_UPSERT,
                &device_journal::row_key(serial, seq.inc),
                seq.id,
                entry,
            )?;
        }
        // The row now holds the new set.
        self.cache
            .borrow_mut()
            .windows
            .insert(serial.to_owned(), Some(set));
        Ok(placed)
    }
}

impl DeviceTables for PgTxn {
    fn device(&self, serial: &Serial) -> Result<Option<DeviceRecord>, StoreError> {
        self.device_bytes(serial)?
            .map(|b| decode("devices", serial, &b))
            .transpose()
    }

    fn device_state(&self, serial: &Serial) -> Result<Option<DeviceState>, StoreError> {
        self.device_bytes(serial)?
            .map(|b| decode::<StoredState>("devices", serial, &b).map(|s| s.state))
            .transpose()
    }

    fn put_device(&mut self, serial: &Serial, record: &DeviceRecord) -> Result<(), StoreError> {
        let bytes = encode("devices", serial, record)?;
        self.write(
            "write a device",
            "INSERT INTO devices (serial, record) VALUES ($1, $2)
             ON CONFLICT (serial) DO UPDATE SET record = EXCLUDED.record",
            vec![text(serial.as_str()), P::Bytes(bytes.clone())],
        )?;
        self.cache
            .borrow_mut()
            .devices
            .insert(serial.as_str().to_owned(), Some(bytes));
        Ok(())
    }

    fn device_serials(&self) -> Result<Vec<Serial>, StoreError> {
        self.serials(
            "list devices",
            "devices",
            "SELECT serial FROM devices ORDER BY serial",
            Vec::new(),
        )
    }

    #[cfg(test)]
    fn put_raw_device(&mut self, serial: &Serial, bytes: &[u8]) -> Result<(), StoreError> {
        self.write(
            "write",
            "INSERT INTO devices (serial, record) VALUES ($1, $2)
             ON CONFLICT (serial) DO UPDATE SET record = EXCLUDED.record",
            vec![text(serial.as_str()), P::Bytes(bytes.to_vec())],
        )?;
        self.cache
            .borrow_mut()
            .devices
            .insert(serial.as_str().to_owned(), Some(bytes.to_vec()));
        Ok(())
    }
}

impl ArtifactTables for PgTxn {
    fn artifact(&self, id: &ArtifactId) -> Result<Option<ArtifactInfo>, StoreError> {
        self.blob(
            "read an artifact",
            "SELECT info FROM artifacts WHERE id = $1 FOR UPDATE",
            vec![text(id.as_str())],
        )?
        .map(|b| decode("artifacts", id, &b))
        .transpose()
    }

    fn put_artifact(&mut self, info: &ArtifactInfo) -> Result<(), StoreError> {
        let id = &info.artifact.id;
        let bytes = encode("artifacts", id, info)?;
        self.write(
            "write an artifact",
            "INSERT INTO artifacts (id, info) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET info = EXCLUDED.info",
            vec![text(id.as_str()), P::Bytes(bytes)],
        )?;
        Ok(())
    }

    fn artifacts(&self) -> Result<Vec<ArtifactInfo>, StoreError> {
        self.rows(
            "list artifacts",
            "SELECT id, info FROM artifacts ORDER BY id",
            Vec::new(),
        )?
        .iter()
        .map(|r| decode("artifacts", col::<&str>(r, 0)?, col::<&[u8]>(r, 1)?))
        .collect()
    }

    fn remove_artifact(&mut self, id: &ArtifactId) -> Result<(), StoreError> {
        self.write(
            "remove an artifact",
            "DELETE FROM artifacts WHERE id = $1",
            vec![text(id.as_str())],
        )?;
        self.remove_chunks(id)
    }

    fn remove_chunks(&mut self, id: &ArtifactId) -> Result<(), StoreError> {
        self.write(
            "remove artifact chunks",
            "DELETE FROM artifact_chunks WHERE id = $1",
            vec![text(id.as_str())],
        )?;
        Ok(())
    }

    fn chunk(&self, id: &ArtifactId, index: u32) -> Result<Option<Vec<u8>>, StoreError> {
        self.blob(
            "read an artifact chunk",
            "SELECT data FROM artifact_chunks WHERE id = $1 AND index = $2",
            vec![text(id.as_str()), index_p(index)],
        )
    }

    fn put_chunk(&mut self, id: &ArtifactId, index: u32, data: &[u8]) -> Result<(), StoreError> {
        self.write(
            "write an artifact chunk",
            "INSERT INTO artifact_chunks (id, index, data) VALUES ($1, $2, $3)
             ON CONFLICT (id, index) DO UPDATE SET data = EXCLUDED.data",
            vec![text(id.as_str()), index_p(index), P::Bytes(data.to_vec())],
        )?;
        Ok(())
    }

    fn visit_chunks(
        &self,
        id: &ArtifactId,
        f: &mut dyn FnMut(u32, &[u8]),
    ) -> Result<u32, StoreError> {
        // One chunk a statement: an artifact may be 256 MiB, and a visit holds one at a time.
        let indexes = self.rows(
            "read artifact chunks",
            "SELECT index FROM artifact_chunks WHERE id = $1 ORDER BY index",
            vec![text(id.as_str())],
        )?;
        let mut count = 0u32;
        for r in indexes {
            let index = col::<i32>(&r, 0)? as u32;
            if let Some(data) = self.chunk(id, index)? {
                f(index, &data);
                count = count.saturating_add(1);
            }
        }
        Ok(count)
    }
}

impl AlarmTables for PgTxn {
    fn next_alarm_number(&mut self) -> Result<u64, StoreError> {
        self.next_counter("next_alarm", "allocate an alarm number")
    }

    fn alarm(&self, n: u64) -> Result<Option<AlarmView>, StoreError> {
        self.cached_blob(
            |c| &mut c.alarms,
            &n,
            "read an alarm",
            "SELECT alarm FROM alarms WHERE number = $1 FOR UPDATE",
            || vec![n64(n)],
        )?
        .map(|b| decode("alarms", alarm_id(n), &b))
        .transpose()
    }

    fn put_alarm(&mut self, n: u64, alarm: &AlarmView) -> Result<(), StoreError> {
        let op = "write an alarm";
        let bytes = encode("alarms", alarm_id(n), alarm)?;
        self.write(
            op,
            "INSERT INTO alarms (number, alarm) VALUES ($1, $2)
             ON CONFLICT (number) DO UPDATE SET alarm = EXCLUDED.alarm",
            vec![n64(n), P::Bytes(bytes.clone())],
        )?;
        {
            let mut cache = self.cache.borrow_mut();
            cache.alarms.insert(n, Some(bytes));
            if let Some(codes) = cache.active_alarms.get_mut(&alarm.serial) {
                if alarm.status.is_active() {
                    codes.insert(alarm.code.clone(), n);
                } else if codes.get(&alarm.code) == Some(&n) {
                    codes.remove(&alarm.code);
                }
            }
        }
        let key = vec![text(&alarm.serial), text(&alarm.code), n64(n)];
        if alarm.status.is_active() {
            self.write(
                op,
                "INSERT INTO active_alarms (serial, code, number) VALUES ($1, $2, $3)
                 ON CONFLICT (serial, code) DO UPDATE SET number = EXCLUDED.number",
                key,
            )?;
        } else {
            self.write(
                op,
                "DELETE FROM active_alarms WHERE serial = $1 AND code = $2 AND number = $3",
                key,
            )?;
        }
        Ok(())
    }

    fn active_alarm(&self, serial: &Serial, code: &str) -> Result<Option<u64>, StoreError> {
        if let Some(codes) = self.cache.borrow().active_alarms.get(serial.as_str()) {
            return Ok(codes.get(code).copied());
        }
        Ok(self
            .numbers(
                "read the active alarms",
                "SELECT number FROM active_alarms WHERE serial = $1 AND code = $2",
                vec![text(serial.as_str()), text(code)],
            )?
            .first()
            .copied())
    }

    fn active_alarms_of(&self, serial: &Serial) -> Result<Vec<u64>, StoreError> {
        if let Some(codes) = self.cache.borrow().active_alarms.get(serial.as_str()) {
            let mut numbers: Vec<u64> = codes.values().copied().collect();
            numbers.sort_unstable();
            return Ok(numbers);
        }
        self.numbers(
            "read the active alarms",
            "SELECT number FROM active_alarms WHERE serial = $1 ORDER BY number",
            vec![text(serial.as_str())],
        )
    }

    fn active_alarm_count(&self, serial: &Serial, except: &[&str]) -> Result<usize, StoreError> {
        if let Some(codes) = self.cache.borrow().active_alarms.get(serial.as_str()) {
            return Ok(codes
                .keys()
                .filter(|c| !except.contains(&c.as_str()))
                .count());
        }
        let codes = self.rows(
            "count the active alarms",
            "SELECT code FROM active_alarms WHERE serial = $1",
            vec![text(serial.as_str())],
        )?;
        let mut n = 0;
        for r in &codes {
            if !except.contains(&col::<&str>(r, 0)?) {
                n += 1;
            }
        }
        Ok(n)
    }

    fn active_alarms(&self) -> Result<Vec<u64>, StoreError> {
        self.numbers(
            "read the active alarms",
            "SELECT number FROM active_alarms ORDER BY number",
            Vec::new(),
        )
    }

    fn alarms_newest_first(&self, limit: usize) -> Result<Vec<AlarmView>, StoreError> {
        self.rows(
            "list alarms",
            "SELECT number, alarm FROM alarms ORDER BY number DESC LIMIT $1",
            vec![P::I64(i64::try_from(limit).unwrap_or(i64::MAX))],
        )?
        .iter()
        .map(|r| decode("alarms", alarm_id(u(r, 0)?), col::<&[u8]>(r, 1)?))
        .collect()
    }

    fn alarm_overflow(&self, serial: &Serial) -> Result<Option<OverflowRecord>, StoreError> {
        self.cached_blob(
            |c| &mut c.alarm_overflow,
            serial.as_str(),
            "read alarm overflow",
            "SELECT record FROM alarm_overflow WHERE serial = $1 FOR UPDATE",
            || vec![text(serial.as_str())],
        )?
        .map(|b| decode("alarm_overflow", serial, &b))
        .transpose()
    }

    fn put_alarm_overflow(
        &mut self,
        serial: &Serial,
        record: Option<&OverflowRecord>,
    ) -> Result<(), StoreError> {
        let op = "write alarm overflow";
        let bytes = match record {
            Some(r) => {
                let bytes = encode("alarm_overflow", serial, r)?;
                self.write(
                    op,
                    "INSERT INTO alarm_overflow (serial, record) VALUES ($1, $2)
                     ON CONFLICT (serial) DO UPDATE SET record = EXCLUDED.record",
                    vec![text(serial.as_str()), P::Bytes(bytes.clone())],
                )?;
                Some(bytes)
            }
            None => {
                self.write(
                    op,
                    "DELETE FROM alarm_overflow WHERE serial = $1",
                    vec![text(serial.as_str())],
                )?;
                None
            }
        };
        self.cache
            .borrow_mut()
            .alarm_overflow
            .insert(serial.as_str().to_owned(), bytes);
        Ok(())
    }
}

impl PresenceTables for PgTxn {
    fn presence(&self, serial: &Serial) -> Result<Option<PresenceRecord>, StoreError> {
        self.cached_blob(
            |c| &mut c.presence,
            serial.as_str(),
            "read presence",
            "SELECT record FROM presence WHERE serial = $1 FOR UPDATE",
            || vec![text(serial.as_str())],
        )?
        .map(|b| decode("presence", serial, &b))
        .transpose()
    }

    fn put_presence(&mut self, serial: &Serial, record: &PresenceRecord) -> Result<(), StoreError> {
        let bytes = encode("presence", serial, record)?;
        self.write(
            "write presence",
            "INSERT INTO presence (serial, due_by_ms, node, record) VALUES ($1, $2, $3, $4)
             ON CONFLICT (serial) DO UPDATE
             SET due_by_ms = EXCLUDED.due_by_ms, node = EXCLUDED.node, record = EXCLUDED.record",
            vec![
                text(serial.as_str()),
                P::OptI64(record.due_by.map(|d| d.timestamp_millis())),
                P::OptText(record.node.clone()),
                P::Bytes(bytes.clone()),
            ],
        )?;
        self.cache
            .borrow_mut()
            .presence
            .insert(serial.as_str().to_owned(), Some(bytes));
        Ok(())
    }

    fn presence_on_node(&self, node: &str) -> Result<Vec<Serial>, StoreError> {
        self.serials(
            "list the devices online at a node",
            "presence",
            "SELECT serial FROM presence WHERE node = $1 ORDER BY serial",
            vec![text(node)],
        )
    }

    fn presence_without_node_or_deadline(&self) -> Result<Vec<Serial>, StoreError> {
        self.serials(
            "list the offline devices without a check-in deadline",
            "presence",
            "SELECT serial FROM presence WHERE node IS NULL AND due_by_ms IS NULL ORDER BY serial",
            Vec::new(),
        )
    }

    fn checkins_due(&self, now: Timestamp) -> Result<Vec<Serial>, StoreError> {
        self.serials(
            "list due check-ins",
            "checkin_due",
            "SELECT serial FROM presence WHERE due_by_ms <= $1 ORDER BY due_by_ms, serial",
            vec![ms(now)],
        )
    }
}

impl NotificationTables for PgTxn {
    fn push_notification(&mut self, item: &QueuedNotification) -> Result<u64, StoreError> {
        let op = "queue a notification";
        let n = self.next_counter("next_notification", op)?;
        self.put_notification(n, item)?;
        Ok(n)
    }

    fn due_notifications(&self, now: Timestamp, limit: usize) -> Result<Due, StoreError> {
        let op = "read the notification queue";
        let limit_p = P::I64(i64::try_from(limit).unwrap_or(i64::MAX));
        // Devices in turn: each due notification's rank within its device, then rounds of
        // ranks, devices in the order of their oldest due notification.
        let rows = self.rows(
            op,
            "WITH due AS (
                 SELECT number, item, serial,
                        row_number() OVER (PARTITION BY serial ORDER BY number) AS round,
                        min(number) OVER (PARTITION BY serial) AS first
                 FROM notify_queue WHERE next_at_ms <= $1
             )
             SELECT number, item FROM due ORDER BY round, first LIMIT $2",
            vec![ms(now), limit_p],
        )?;
        let mut due = Vec::with_capacity(rows.len());
        for r in &rows {
            let n = u(r, 0)?;
            due.push((n, decode("notify_queue", n, col::<&[u8]>(r, 1)?)?));
        }
        let counts = self.rows(
            op,
            "SELECT count(*) FILTER (WHERE next_at_ms <= $1),
                    min(next_at_ms) FILTER (WHERE next_at_ms > $1)
             FROM notify_queue",
            vec![ms(now)],
        )?;
        let (due_total, next_ms) = match counts.first() {
            Some(r) => (col::<i64>(r, 0)?, col::<Option<i64>>(r, 1)?),
            None => (0, None),
        };
        // Whatever was due and not taken is due still: the worker comes back at once.
        let later = if due_total as usize > due.len() {
            Some(now)
        } else {
            next_ms
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|at| at.max(now))
        };
        Ok((due, later))
    }

    fn digest_alarm(
        &mut self,
        serial: &str,
        n: u64,
        due_at: Timestamp,
    ) -> Result<bool, StoreError> {
        let op = "coalesce an alarm notification";
        let existing = self
            .blob(
                op,
                "SELECT digest FROM alarm_digests WHERE serial = $1 FOR UPDATE",
                vec![text(serial)],
            )?
            .map(|b| decode::<AlarmDigest>("alarm_digests", serial, &b))
            .transpose()?;
        let (digest, opened) = AlarmDigest::with_alarm(existing, n, due_at);
        let bytes = encode("alarm_digests", serial, &digest)?;
        self.write(
            op,
            "INSERT INTO alarm_digests (serial, due_at_ms, digest) VALUES ($1, $2, $3)
             ON CONFLICT (serial) DO UPDATE SET digest = EXCLUDED.digest",
            vec![text(serial), ms(digest.due_at), P::Bytes(bytes)],
        )?;
        Ok(opened)
    }

    fn take_due_digests(
        &mut self,
        now: Timestamp,
    ) -> Result<Vec<(String, AlarmDigest)>, StoreError> {
        let rows = self.write_rows(
            "read the alarm digests",
            "DELETE FROM alarm_digests WHERE due_at_ms <= $1 RETURNING serial, due_at_ms, digest",
            vec![ms(now)],
        )?;
        let mut out: Vec<(i64, String, AlarmDigest)> = Vec::with_capacity(rows.len());
        for r in &rows {
            let serial: String = col(r, 0)?;
            let digest = decode("alarm_digests", serial.as_str(), col::<&[u8]>(r, 2)?)?;
            out.push((col(r, 1)?, serial, digest));
        }
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(out.into_iter().map(|(_, s, d)| (s, d)).collect())
    }

    fn put_notification(&mut self, n: u64, item: &QueuedNotification) -> Result<(), StoreError> {
        let bytes = encode("notify_queue", n, item)?;
        self.write(
            "write a notification",
            "INSERT INTO notify_queue (number, serial, next_at_ms, item) VALUES ($1, $2, $3, $4)
             ON CONFLICT (number) DO UPDATE
             SET serial = EXCLUDED.serial, next_at_ms = EXCLUDED.next_at_ms, item = EXCLUDED.item",
            vec![
                n64(n),
                text(&item.serial),
                ms(item.next_at),
                P::Bytes(bytes),
            ],
        )?;
        Ok(())
    }

    fn remove_notification(&mut self, n: u64) -> Result<(), StoreError> {
        self.write(
            "remove a notification",
            "DELETE FROM notify_queue WHERE number = $1",
            vec![n64(n)],
        )?;
        Ok(())
    }

    fn notification_count(&self) -> Result<u64, StoreError> {
        count(
            self,
            "count the notification queue",
            "SELECT count(*) FROM notify_queue",
        )
    }
}

fn count(txn: &PgTxn, op: &'static str, sql: &'static str) -> Result<u64, StoreError> {
    Ok(txn
        .numbers(op, sql, Vec::new())?
        .first()
        .copied()
        .unwrap_or(0))
}

impl UplinkTables for PgTxn {
    fn push_uplink(
        &mut self,
        serial: &Serial,
        kind: &str,
        payload: &[u8],
    ) -> Result<u64, StoreError> {
        let op = "queue a message for the parent relay";
        let seq = self.next_counter("next_uplink", op)?;
        let item = UplinkItem {
            seq,
            serial: serial.clone(),
            kind: kind.to_owned(),
            payload: payload.to_vec(),
        };
        let bytes = encode("uplink", seq, &item)?;
        self.write(
            op,
            "INSERT INTO uplink (number, item) VALUES ($1, $2)",
            vec![n64(seq), P::Bytes(bytes)],
        )?;
        Ok(seq)
    }

    fn uplink_after(
        &self,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<UplinkItem>, StoreError> {
        let rows = self.rows(
            "read the queue for the parent relay",
            "SELECT number, item FROM uplink WHERE number > $1 ORDER BY number LIMIT $2",
            vec![
                n64(after),
                P::I64(i64::try_from(max_items).unwrap_or(i64::MAX)),
            ],
        )?;
        let items = rows
            .iter()
            .map(|r| decode::<UplinkItem>("uplink", u(r, 0)?, col::<&[u8]>(r, 1)?));
        within_bytes(items, max_items, max_bytes)
    }

    fn remove_uplink_upto(&mut self, upto: u64) -> Result<u64, StoreError> {
        let removed = self.rows(
            "forget messages the parent relay committed",
            "DELETE FROM uplink WHERE number <= $1 RETURNING number",
            vec![n64(upto)],
        )?;
        if !removed.is_empty() {
            self.dirty = true;
        }
        Ok(removed.len() as u64)
    }

    fn uplink_count(&self) -> Result<u64, StoreError> {
        count(
            self,
            "count the queue for the parent relay",
            "SELECT count(*) FROM uplink",
        )
    }

    fn put_mirrored(&mut self, topic: &str, payload: &[u8]) -> Result<bool, StoreError> {
        let op = "keep an order from the parent relay";
        let same = self
            .blob(
                op,
                "SELECT payload FROM mirrored WHERE topic = $1",
                vec![text(topic)],
            )?
            .is_some_and(|p| p == payload);
        if same {
            return Ok(false);
        }
        self.write(
            op,
            "INSERT INTO mirrored (topic, payload) VALUES ($1, $2)
             ON CONFLICT (topic) DO UPDATE SET payload = EXCLUDED.payload",
            vec![text(topic), P::Bytes(payload.to_vec())],
        )?;
        Ok(true)
    }

    fn remove_mirrored(&mut self, topic: &str) -> Result<(), StoreError> {
        self.write(
            "forget an order from the parent relay",
            "DELETE FROM mirrored WHERE topic = $1",
            vec![text(topic)],
        )?;
        Ok(())
    }

    fn clear_mirrored(&mut self) -> Result<(), StoreError> {
        self.write(
            "forget the orders from the parent relay",
            "DELETE FROM mirrored",
            Vec::new(),
        )?;
        Ok(())
    }

    fn mirrored(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.rows(
            "read the orders from the parent relay",
            "SELECT topic, payload FROM mirrored ORDER BY topic",
            Vec::new(),
        )?
        .iter()
        .map(|r| Ok((col(r, 0)?, col(r, 1)?)))
        .collect()
    }
}

impl ReadingTables for PgTxn {
    /// The reading's number comes from the `reading_numbers` sequence (the column's default):
    /// no row is locked, so the nodes store counter reports side by side, and the insert waits
    /// with the transaction's other writes for its commit.
    fn put_reading(&mut self, reading: &CounterReading) -> Result<(), StoreError> {
        let at = reading.read_at.timestamp_millis();
        let bytes = encode("readings", format_args!("{}@{at}", reading.serial), reading)?;
        self.write(
            "write a reading",
            "INSERT INTO readings (read_at_ms, serial, reading) VALUES ($1, $2, $3)",
            vec![P::I64(at), text(&reading.serial), P::Bytes(bytes)],
        )?;
        Ok(())
    }

    fn readings(
        &self,
        from: Timestamp,
        to: Timestamp,
        after: Option<&ReadingCursor>,
        serial: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<CounterReading>, Option<ReadingCursor>), StoreError> {
        let (a_ms, a_serial, a_n) = match after {
            Some(a) => (a.at_ms, a.serial.clone(), a.n as i64),
            None => (i64::MIN, String::new(), i64::MIN),
        };
        // One more than a page: whether there is more.
        let rows = self.rows(
            "read readings",
            "SELECT read_at_ms, serial, number, reading FROM readings
             WHERE read_at_ms >= $1 AND read_at_ms < $2
               AND (read_at_ms, serial, number) > ($3, $4, $5)
               AND ($6::text IS NULL OR serial = $6)
             ORDER BY read_at_ms, serial, number LIMIT $7",
            vec![
                ms(from),
                ms(to),
                P::I64(a_ms),
                P::Text(a_serial),
                P::I64(a_n),
                match serial {
                    Some(s) => text(s),
                    None => P::OptText(None),
                },
                P::I64(i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1),
            ],
        )?;
        let mut out = Vec::new();
        let mut last = None;
        for r in &rows {
            if out.len() == limit {
                return Ok((out, last));
            }
            let (at_ms, s, n): (i64, String, i64) = (col(r, 0)?, col(r, 1)?, col(r, 2)?);
            out.push(decode(
                "readings",
                format_args!("{s}@{at_ms}"),
                col::<&[u8]>(r, 3)?,
            )?);
            last = Some(ReadingCursor {
                at_ms,
                serial: s,
                n: n as u64,
            });
        }
        Ok((out, None))
    }
}

/// Counts for the metrics endpoint, on the reader connection.
pub(super) fn stats(conn: &Conn, location: &str) -> Result<StoreStats, StoreError> {
    let lost = || StoreError::Unavailable {
        location: location.to_owned(),
        reason: "the connection was lost while reading statistics".into(),
    };
    let failed = |e: postgres::Error| StoreError::Database {
        op: "read statistics",
        reason: e.to_string(),
    };
    let mut stats = StoreStats {
        jobs: JobStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect(),
        ..StoreStats::default()
    };
    let by_status = conn
        .query(
            "SELECT status, count(*) FROM jobs GROUP BY status",
            Vec::new(),
        )
        .ok_or_else(lost)?
        .map_err(failed)?;
    for r in &by_status {
        let status: &str = col(r, 0)?;
        let n = col::<i64>(r, 1)? as u64;
        match JobStatus::ALL.iter().find(|s| s.as_str() == status) {
            Some(s) => *stats.jobs.entry(s.as_str()).or_default() += n,
            None => stats.corrupt_jobs += n,
        }
    }
    let counts = conn
        .query(
            "SELECT (SELECT count(*) FROM active_alarms), (SELECT count(*) FROM alarms),
                    (SELECT count(*) FROM notify_queue), (SELECT count(*) FROM devices),
                    (SELECT count(*) FROM readings), (SELECT count(*) FROM uplink)",
            Vec::new(),
        )
        .ok_or_else(lost)?
        .map_err(failed)?;
    if let Some(r) = counts.first() {
        let get = |i| col::<i64>(r, i).map(|v| v as u64);
        stats.alarms_active = get(0)?;
        stats.alarms_total = get(1)?;
        stats.notify_queue = get(2)?;
        stats.devices = get(3)?;
        stats.readings = get(4)?;
        stats.uplink_waiting = get(5)?;
    }
    Ok(stats)
}

impl RolloutTables for PgTxn {
    fn next_rollout_number(&mut self) -> Result<u64, StoreError> {
        self.next_counter("next_rollout", "allocate a rollout number")
    }

    fn rollout(&self, n: u64) -> Result<Option<RolloutRecord>, StoreError> {
        self.blob(
            "read a rollout",
            "SELECT record FROM rollouts WHERE number = $1",
            vec![n64(n)],
        )?
        .map(|b| decode("rollouts", rollout_id(n), &b))
        .transpose()
    }

    fn rollout_for_update(&self, n: u64) -> Result<Option<RolloutRecord>, StoreError> {
        self.blob(
            "read a rollout to change it",
            "SELECT record FROM rollouts WHERE number = $1 FOR UPDATE",
            vec![n64(n)],
        )?
        .map(|b| decode("rollouts", rollout_id(n), &b))
        .transpose()
    }

    fn put_rollout(&mut self, n: u64, record: &RolloutRecord) -> Result<(), StoreError> {
        let op = "write a rollout";
        let bytes = encode("rollouts", rollout_id(n), record)?;
        self.write(
            op,
            "INSERT INTO rollouts (number, record) VALUES ($1, $2)
             ON CONFLICT (number) DO UPDATE SET record = EXCLUDED.record",
            vec![n64(n), P::Bytes(bytes)],
        )?;
        if record.is_active() {
            self.write(
                op,
                "INSERT INTO active_rollouts (number) VALUES ($1) ON CONFLICT DO NOTHING",
                vec![n64(n)],
            )
        } else {
            self.write(
                op,
                "DELETE FROM active_rollouts WHERE number = $1",
                vec![n64(n)],
            )
        }
    }

    fn rollouts_newest_first(&self) -> Result<Vec<(u64, RolloutRecord)>, StoreError> {
        let rows = self.rows(
            "list rollouts",
            "SELECT number, record FROM rollouts ORDER BY number DESC",
            Vec::new(),
        )?;
        rows.iter()
            .map(|r| {
                let n = u(r, 0)?;
                Ok((n, decode("rollouts", rollout_id(n), col::<&[u8]>(r, 1)?)?))
            })
            .collect()
    }

    fn active_rollouts(&self) -> Result<Vec<u64>, StoreError> {
        let rows = self.rows(
            "list active rollouts",
            "SELECT number FROM active_rollouts ORDER BY number",
            Vec::new(),
        )?;
        rows.iter().map(|r| u(r, 0)).collect()
    }

    fn device_tags(&self, serial: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .blob(
                "read a device's tags",
                "SELECT tags FROM device_tags WHERE serial = $1",
                vec![text(serial)],
            )?
            .map(|b| decode("device_tags", serial, &b))
            .transpose()?
            .unwrap_or_default())
    }

    fn put_device_tags(&mut self, serial: &str, tags: &[String]) -> Result<(), StoreError> {
        let op = "write a device's tags";
        if tags.is_empty() {
            return self.write(
                op,
                "DELETE FROM device_tags WHERE serial = $1",
                vec![text(serial)],
            );
        }
        let bytes = encode("device_tags", serial, &tags)?;
        self.write(
            op,
            "INSERT INTO device_tags (serial, tags) VALUES ($1, $2)
             ON CONFLICT (serial) DO UPDATE SET tags = EXCLUDED.tags",
            vec![text(serial), P::Bytes(bytes)],
        )
    }

    fn all_device_tags(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let rows = self.rows(
            "read device tags",
            "SELECT serial, tags FROM device_tags ORDER BY serial",
            Vec::new(),
        )?;
        rows.iter()
            .map(|r| {
                let serial: String = col(r, 0)?;
                let tags = decode("device_tags", &serial, col::<&[u8]>(r, 1)?)?;
                Ok((serial, tags))
            })
            .collect()
    }
}
