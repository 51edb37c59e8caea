//! What the metrics endpoint reports about the store, read in a read transaction so a scrape never
//! holds up the core's writes; and the creation of the alarm, presence, meter-reading and
//! notification tables.

use protocol::job::JobStatus;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::alarms::{ACTIVE_ALARMS, ALARM_CLEARS, ALARM_OVERFLOW, ALARMS, CHECKIN_DUE, PRESENCE};
use super::notify::{ALARM_DIGESTS, DIGEST_DUE, NOTIFY_QUEUE};
use super::readings::READINGS;
use super::uplink::{MIRRORED, UPLINK};
use super::{DEVICES, JOBS, RedbStore, backend};
use crate::store::{JobRecord, StoreError, StoreStats};

/// Creates the tables of alarms, presence, readings and notifications (a write transaction
/// creates a table on first open; a read transaction does not).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    let op = "create the tables";
    txn.open_table(ALARMS).map_err(backend(op))?;
    txn.open_table(ACTIVE_ALARMS).map_err(backend(op))?;
    txn.open_table(ALARM_OVERFLOW).map_err(backend(op))?;
    // Alarm events are ordered by the relay's receipt now, never by a device's clock: the
    // device-clock clear times a store may still hold are dropped.
    txn.delete_table(ALARM_CLEARS).map_err(backend(op))?;
    txn.open_table(PRESENCE).map_err(backend(op))?;
    txn.open_table(CHECKIN_DUE).map_err(backend(op))?;
    txn.open_table(READINGS).map_err(backend(op))?;
    txn.open_table(NOTIFY_QUEUE).map_err(backend(op))?;
    txn.open_table(ALARM_DIGESTS).map_err(backend(op))?;
    txn.open_table(DIGEST_DUE).map_err(backend(op))?;
    txn.open_table(UPLINK).map_err(backend(op))?;
    txn.open_table(MIRRORED).map_err(backend(op))?;
    txn.open_table(super::rollouts::ROLLOUTS)
        .map_err(backend(op))?;
    txn.open_table(super::rollouts::ACTIVE_ROLLOUTS)
        .map_err(backend(op))?;
    txn.open_table(super::rollouts::DEVICE_TAGS)
        .map_err(backend(op))?;
    Ok(())
}

impl RedbStore {
    /// Counts jobs by status, alarms, the notification queue and devices. Reads every job record
    /// (to learn its status), so it is for a scrape every few seconds, not for a hot path.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let op = "read statistics";
        let txn = self.with_db(|db| db.begin_read().map_err(backend(op)))?;
        let mut stats = StoreStats {
            jobs: JobStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect(),
            ..StoreStats::default()
        };
        let jobs = txn.open_table(JOBS).map_err(backend(op))?;
        for entry in jobs.iter().map_err(backend(op))? {
            let (_, v) = entry.map_err(backend(op))?;
            match ciborium::from_reader::<JobRecord, _>(v.value()) {
                Ok(record) => *stats.jobs.entry(record.view.status.as_str()).or_default() += 1,
                Err(_) => stats.corrupt_jobs += 1,
            }
        }
        stats.alarms_active = txn
            .open_table(ACTIVE_ALARMS)
            .map_err(backend(op))?
            .len()
            .map_err(backend(op))?;
        stats.alarms_total = txn
            .open_table(ALARMS)
            .map_err(backend(op))?
            .len()
            .map_err(backend(op))?;
        stats.notify_queue = txn
            .open_table(NOTIFY_QUEUE)
            .map_err(backend(op))?
            .len()
            .map_err(backend(op))?;
        stats.devices = txn
            .open_table(DEVICES)
            .map_err(backend(op))?
            .len()
            .map_err(backend(op))?;
        stats.readings = txn
            .open_table(READINGS)
            .map_err(backend(op))?
            .len()
            .map_err(backend(op))?;
        stats.uplink_waiting = txn
            .open_table(UPLINK)
            .map_err(backend(op))?
            .len()
            .map_err(backend(op))?;
        Ok(stats)
    }
}
