//! The rows a batch names before it is handled ([`Txn::warm`](crate::store::Txn::warm)), read
//! together: the devices' seen windows, records and presence, the jobs devices report on, the
//! hosts' journal entries and the active alarms of devices that sent one, in one trip. Each read
//! fills the transaction's [`Cache`](super::Cache), from which the tables' reads then answer.
//!
//! The statements run in this order, and so lock in it: devices, jobs, alarms, the alarm
//! counter (taken with the reads when the batch may raise an alarm). Every other path
//! that locks more than one of them does so in the same order (a batch's devices first), so two
//! nodes wait for each other instead of deadlocking.

use std::collections::{BTreeMap, HashMap};

use postgres::Row;
use protocol::MsgId;

use super::batch_reads::{
    READ_ACTIVE_ALARM_RECORDS, READ_ACTIVE_ALARMS, READ_ALARM_OVERFLOW, READ_DEVICES,
    READ_JOB_EVENTS, READ_JOBS, READ_JOURNAL, READ_PRESENCE, READ_REPORTS, READ_WINDOWS, by_keys,
};
use super::tables::{col, decode_seen_set, u};
use super::{Ask, P, PgTxn};
use crate::store::{Hints, StoreError};

/// Fills the cache with the answers of one read's statements.
type Fill<'a> = Box<dyn FnOnce(&PgTxn, Vec<Vec<Row>>) -> Result<(), StoreError> + 'a>;

/// One kind of row a warm reads: its statements, and what fills the cache with their answers.
struct Read<'a> {
    asks: Vec<Ask>,
    fill: Fill<'a>,
}

impl<'a> Read<'a> {
    fn some(
        asks: Vec<Ask>,
        fill: impl FnOnce(&PgTxn, Vec<Vec<Row>>) -> Result<(), StoreError> + 'a,
    ) -> Option<Self> {
        Some(Read {
            asks,
            fill: Box::new(fill),
        })
    }
}

/// `(key, bytes)` pairs of a read's rows.
fn pairs(rows: &[Row]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    rows.iter().map(|r| Ok((col(r, 0)?, col(r, 1)?))).collect()
}

/// `(number, bytes)` pairs of a read's rows, by number.
fn by_number(rows: &[Row]) -> Result<HashMap<u64, Vec<u8>>, StoreError> {
    rows.iter()
        .map(|r| Ok((u(r, 0)?, col::<Vec<u8>>(r, 1)?)))
        .collect()
}

/// `keys` sorted, without duplicates: each table is locked in key order.
fn sorted<T: Ord + Clone>(keys: impl Iterator<Item = T>) -> Vec<T> {
    let mut keys: Vec<T> = keys.collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

impl PgTxn {
    /// Reads and locks every row `hints` names that this transaction has not read yet, in one
    /// trip.
    pub(super) fn warm_rows(&self, hints: &Hints) -> Result<(), StoreError> {
        let mut reads: Vec<Read> = Vec::new();
        reads.extend(self.devices_read(&hints.devices));
        reads.extend(self.jobs_read(&hints.jobs));
        for (sender, ids) in &hints.journal {
            reads.extend(self.journal_read(sender, ids));
        }
        reads.extend(self.alarms_read(&hints.alarms));
        if hints.raises_alarms {
            reads.extend(self.counter_read("next_alarm"));
        }
        if reads.is_empty() {
            return Ok(());
        }
        let counts: Vec<usize> = reads.iter().map(|r| r.asks.len()).collect();
        let asks = reads
            .iter_mut()
            .flat_map(|r| std::mem::take(&mut r.asks))
            .collect();
        let mut answers = self.send("read a batch's rows", asks)?.into_iter();
        for (read, n) in reads.into_iter().zip(counts) {
            let mut rows: Vec<Vec<Row>> = answers.by_ref().take(n).collect();
            // None missing: each ask has its answer, or the trip failed.
            rows.resize_with(n, Vec::new);
            (read.fill)(self, rows)?;
        }
        Ok(())
    }

    /// The seen windows, records and presence of `serials`, each table in serial order.
    fn devices_read(&self, serials: &[String]) -> Option<Read<'static>> {
        let wanted: Vec<String> = {
            let cache = self.cache.borrow();
            sorted(
                serials
                    .iter()
                    .filter(|s| {
                        !cache.windows.contains_key(*s)
                            || !cache.devices.contains_key(*s)
                            || !cache.presence.contains_key(*s)
                    })
                    .cloned(),
            )
        };
        if wanted.is_empty() {
            return None;
        }
        let asks = [READ_WINDOWS, READ_DEVICES, READ_PRESENCE]
            .map(|sql| by_keys(sql, vec![P::TextList(wanted.clone())], wanted.len()))
            .into();
        let fill = move |txn: &PgTxn, answers: Vec<Vec<Row>>| {
            let [windows, records, presence] = three(answers);
            let mut found_windows = HashMap::new();
            for (serial, bytes) in pairs(&windows)? {
                let set = decode_seen_set(&serial, &bytes)?;
                found_windows.insert(serial, set);
            }
            let mut records: HashMap<String, Vec<u8>> = pairs(&records)?.into_iter().collect();
            let mut presence: HashMap<String, Vec<u8>> = pairs(&presence)?.into_iter().collect();
            let mut cache = txn.cache.borrow_mut();
            for serial in wanted {
                // What this transaction read or wrote before stays: it is the newer.
                let window = found_windows.remove(&serial);
                cache.windows.entry(serial.clone()).or_insert(window);
                let record = records.remove(&serial);
                cache.devices.entry(serial.clone()).or_insert(record);
                let here = presence.remove(&serial);
                cache.presence.entry(serial).or_insert(here);
            }
            Ok(())
        };
        Read::some(asks, fill)
    }

    /// The records of jobs `numbers` (locked, in number order), with their events and reports.
    fn jobs_read(&self, numbers: &[u64]) -> Option<Read<'static>> {
        let wanted: Vec<i64> = {
            let cache = self.cache.borrow();
            sorted(
                numbers
                    .iter()
                    .filter(|n| {
                        !cache.jobs.contains_key(n)
                            || !cache.events.contains_key(n)
                            || !cache.reports.contains_key(n)
                    })
                    .map(|n| *n as i64),
            )
        };
        if wanted.is_empty() {
            return None;
        }
        let asks = [READ_JOBS, READ_JOB_EVENTS, READ_REPORTS]
            .map(|sql| by_keys(sql, vec![P::I64List(wanted.clone())], wanted.len()))
            .into();
        let fill = move |txn: &PgTxn, answers: Vec<Vec<Row>>| {
            let [records, events, reports] = three(answers);
            let (mut records, mut reports) = (by_number(&records)?, by_number(&reports)?);
            let mut found_events: HashMap<u64, Vec<(i32, Vec<u8>)>> = HashMap::new();
            for r in &events {
                found_events
                    .entry(u(r, 0)?)
                    .or_default()
                    .push((col(r, 1)?, col(r, 2)?));
            }
            let mut cache = txn.cache.borrow_mut();
            for n in wanted {
                let n = n as u64;
                let record = records.remove(&n);
                cache.jobs.entry(n).or_insert(record);
                let events = found_events.remove(&n).unwrap_or_default();
                cache.events.entry(n).or_insert(events);
                let report = reports.remove(&n);
                cache.reports.entry(n).or_insert(report);
            }
            Ok(())
        };
        Read::some(asks, fill)
    }

    /// `sender`'s journal entries of `ids`.
    fn journal_read<'a>(&self, sender: &'a str, ids: &[MsgId]) -> Option<Read<'a>> {
        let wanted: Vec<i64> = {
            let cache = self.cache.borrow();
            ids.iter()
                .filter(|id| !cache.journal.contains_key(&(sender.to_owned(), **id)))
                .map(|id| *id as i64)
                .collect()
        };
        if wanted.is_empty() {
            return None;
        }
        let params = vec![P::Text(sender.to_owned()), P::I64List(wanted.clone())];
        let asks = vec![by_keys(READ_JOURNAL, params, wanted.len())];
        let fill = move |txn: &PgTxn, answers: Vec<Vec<Row>>| {
            let rows = answers.into_iter().next().unwrap_or_default();
            let mut found: HashMap<i64, Vec<u8>> = rows
                .iter()
                .map(|r| Ok((col::<i64>(r, 0)?, col::<Vec<u8>>(r, 1)?)))
                .collect::<Result<_, StoreError>>()?;
            let mut cache = txn.cache.borrow_mut();
            for id in wanted {
                let entry = found.remove(&id);
                cache
                    .journal
                    .entry((sender.to_owned(), id as u64))
                    .or_insert(entry);
            }
            Ok(())
        };
        Read::some(asks, fill)
    }

    /// The active alarms of `serials` (which code, which number), their records (locked, in
    /// number order) and the devices' overflow records (locked): what raising, clearing and
    /// publishing a device's alarms read.
    fn alarms_read(&self, serials: &[String]) -> Option<Read<'static>> {
        let wanted: Vec<String> = {
            let cache = self.cache.borrow();
            sorted(
                serials
                    .iter()
                    .filter(|s| {
                        !cache.active_alarms.contains_key(*s)
                            || !cache.alarm_overflow.contains_key(*s)
                    })
                    .cloned(),
            )
        };
        if wanted.is_empty() {
            return None;
        }
        let asks = [
            READ_ACTIVE_ALARMS,
            READ_ACTIVE_ALARM_RECORDS,
            READ_ALARM_OVERFLOW,
        ]
        .map(|sql| by_keys(sql, vec![P::TextList(wanted.clone())], wanted.len()))
        .into();
        let fill = move |txn: &PgTxn, answers: Vec<Vec<Row>>| {
            let [active, records, overflow] = three(answers);
            let mut codes: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
            for r in &active {
                codes
                    .entry(col(r, 0)?)
                    .or_default()
                    .insert(col(r, 1)?, u(r, 2)?);
            }
            let records = by_number(&records)?;
            let mut overflow: HashMap<String, Vec<u8>> = pairs(&overflow)?.into_iter().collect();
            let mut cache = txn.cache.borrow_mut();
            for (n, bytes) in records {
                cache.alarms.entry(n).or_insert(Some(bytes));
            }
            for serial in wanted {
                let active = codes.remove(&serial).unwrap_or_default();
                cache.active_alarms.entry(serial.clone()).or_insert(active);
                let record = overflow.remove(&serial);
                cache.alarm_overflow.entry(serial).or_insert(record);
            }
            Ok(())
        };
        Read::some(asks, fill)
    }

    /// The counter `name` in `meta`, locked: a number taken from it later in the transaction
    /// costs no trip of its own ([`PgTxn::next_counter`] counts on from what this read).
    fn counter_read(&self, name: &'static str) -> Option<Read<'static>> {
        if self.cache.borrow().counters.contains_key(name) {
            return None;
        }
        let asks = vec![Ask::Rows {
            sql: "SELECT value FROM meta WHERE name = $1 FOR UPDATE",
            params: vec![P::Text(name.to_owned())],
        }];
        let fill = move |txn: &PgTxn, answers: Vec<Vec<Row>>| {
            // No row yet: the first number is taken by inserting it, as without this read.
            if let Some(row) = answers.first().and_then(|rows| rows.first()) {
                let last = u(row, 0)?;
                txn.cache
                    .borrow_mut()
                    .counters
                    .entry(name)
                    .or_insert(super::Counter {
                        last,
                        unsent: false,
                    });
            }
            Ok(())
        };
        Read::some(asks, fill)
    }
}

/// The answers of a read that asked three statements, in their order.
fn three(answers: Vec<Vec<Row>>) -> [Vec<Row>; 3] {
    let mut answers = answers.into_iter();
    [(); 3].map(|()| answers.next().unwrap_or_default())
}
