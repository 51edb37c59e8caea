//! Rollouts by number (`rollouts`), the numbers of those still going (`active_rollouts`, what
//! the rollout tick reads), and operators' device tags (`device_tags`, serial → CBOR list).

use redb::{ReadableTable, TableDefinition};

use super::{RedbTxn, backend};
use crate::store::{RolloutRecord, RolloutTables, StoreError, decode, encode, rollout_id};

pub(super) const ROLLOUTS: TableDefinition<u64, &[u8]> = TableDefinition::new("rollouts");
pub(super) const ACTIVE_ROLLOUTS: TableDefinition<u64, ()> =
    TableDefinition::new("active_rollouts");
pub(super) const DEVICE_TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("device_tags");
const NEXT_ROLLOUT: &str = "next_rollout";

impl RolloutTables for RedbTxn {
    fn next_rollout_number(&mut self) -> Result<u64, StoreError> {
        self.next_counter(NEXT_ROLLOUT, "allocate a rollout number")
    }

    fn rollout(&self, n: u64) -> Result<Option<RolloutRecord>, StoreError> {
        let op = "read a rollout";
        let table = self.txn.open_table(ROLLOUTS).map_err(backend(op))?;
        let guard = table.get(n).map_err(backend(op))?;
        guard
            .map(|g| decode("rollouts", rollout_id(n), g.value()))
            .transpose()
    }

    fn put_rollout(&mut self, n: u64, record: &RolloutRecord) -> Result<(), StoreError> {
        let op = "write a rollout";
        let bytes = encode("rollouts", rollout_id(n), record)?;
        self.txn
            .open_table(ROLLOUTS)
            .map_err(backend(op))?
            .insert(n, bytes.as_slice())
            .map_err(backend(op))?;
        let mut active = self.txn.open_table(ACTIVE_ROLLOUTS).map_err(backend(op))?;
        if record.is_active() {
            active.insert(n, ()).map_err(backend(op))?;
        } else {
            active.remove(n).map_err(backend(op))?;
        }
        self.dirty = true;
        Ok(())
    }

    fn rollouts_newest_first(&self) -> Result<Vec<(u64, RolloutRecord)>, StoreError> {
        let op = "list rollouts";
        let table = self.txn.open_table(ROLLOUTS).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))?.rev() {
            let (k, v) = entry.map_err(backend(op))?;
            let n = k.value();
            out.push((n, decode("rollouts", rollout_id(n), v.value())?));
        }
        Ok(out)
    }

    fn active_rollouts(&self) -> Result<Vec<u64>, StoreError> {
        let op = "list active rollouts";
        let table = self.txn.open_table(ACTIVE_ROLLOUTS).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))? {
            out.push(entry.map_err(backend(op))?.0.value());
        }
        Ok(out)
    }

    fn device_tags(&self, serial: &str) -> Result<Vec<String>, StoreError> {
        let op = "read a device's tags";
        let table = self.txn.open_table(DEVICE_TAGS).map_err(backend(op))?;
        let guard = table.get(serial).map_err(backend(op))?;
        Ok(guard
            .map(|g| decode("device_tags", serial, g.value()))
            .transpose()?
            .unwrap_or_default())
    }

    fn put_device_tags(&mut self, serial: &str, tags: &[String]) -> Result<(), StoreError> {
        let op = "write a device's tags";
        let mut table = self.txn.open_table(DEVICE_TAGS).map_err(backend(op))?;
        if tags.is_empty() {
            table.remove(serial).map_err(backend(op))?;
        } else {
            let bytes = encode("device_tags", serial, &tags)?;
            table
                .insert(serial, bytes.as_slice())
                .map_err(backend(op))?;
        }
        self.dirty = true;
        Ok(())
    }

    fn all_device_tags(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let op = "read device tags";
        let table = self.txn.open_table(DEVICE_TAGS).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))? {
            let (k, v) = entry.map_err(backend(op))?;
            let serial = k.value().to_owned();
            let tags = decode("device_tags", &serial, v.value())?;
            out.push((serial, tags));
        }
        Ok(out)
    }
}
