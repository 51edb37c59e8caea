//! A child relay's outbox towards its parent: `uplink` maps an increasing number to an
//! [`UplinkItem`] (the device's own payload, as it sent it). The core adds to it in the same
//! transaction that stores the device's message, so a message the child acked is either in its
//! own tables and the outbox or nowhere; the uplink removes items once the parent has acked them.

use protocol::Serial;
use protocol::relay::UplinkItem;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{RedbTxn, backend};
use crate::store::{StoreError, UplinkTables, decode, encode, within_bytes};

pub(super) const UPLINK: TableDefinition<u64, &[u8]> = TableDefinition::new("uplink");
const NEXT_UPLINK: &str = "next_uplink";
/// What the parent relay sent this child's devices to keep (orders, merged data), by topic.
pub(super) const MIRRORED: TableDefinition<&str, &[u8]> = TableDefinition::new("mirrored");

impl UplinkTables for RedbTxn {
    fn push_uplink(
        &mut self,
        serial: &Serial,
        kind: &str,
        payload: &[u8],
    ) -> Result<u64, StoreError> {
        let op = "queue a message for the parent relay";
        let seq = self.next_counter(NEXT_UPLINK, op)?;
        let item = UplinkItem {
            seq,
            serial: serial.clone(),
            kind: kind.to_owned(),
            payload: payload.to_vec(),
        };
        let bytes = encode("uplink", seq, &item)?;
        self.txn
            .open_table(UPLINK)
            .map_err(backend(op))?
            .insert(seq, bytes.as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(seq)
    }

    fn uplink_after(
        &self,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<UplinkItem>, StoreError> {
        let op = "read the queue for the parent relay";
        let table = self.txn.open_table(UPLINK).map_err(backend(op))?;
        let entries = table
            .range(after.saturating_add(1)..)
            .map_err(backend(op))?
            .map(|entry| {
                let (k, v) = entry.map_err(backend(op))?;
                decode::<UplinkItem>("uplink", k.value(), v.value())
            });
        within_bytes(entries, max_items, max_bytes)
    }

    fn remove_uplink_upto(&mut self, upto: u64) -> Result<u64, StoreError> {
        let op = "forget messages the parent relay committed";
        let mut table = self.txn.open_table(UPLINK).map_err(backend(op))?;
        let mut removed = 0;
        // `extract_from_if` would do, but a plain range delete keeps this readable.
        let keys: Vec<u64> = table
            .range(..=upto)
            .map_err(backend(op))?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()
            .map_err(backend(op))?;
        for k in keys {
            table.remove(k).map_err(backend(op))?;
            removed += 1;
        }
        if removed > 0 {
            self.dirty = true;
        }
        Ok(removed)
    }

    fn uplink_count(&self) -> Result<u64, StoreError> {
        let op = "count the queue for the parent relay";
        let table = self.txn.open_table(UPLINK).map_err(backend(op))?;
        table.len().map_err(backend(op))
    }

    fn put_mirrored(&mut self, topic: &str, payload: &[u8]) -> Result<bool, StoreError> {
        let op = "keep an order from the parent relay";
        let mut table = self.txn.open_table(MIRRORED).map_err(backend(op))?;
        let same = table
            .get(topic)
            .map_err(backend(op))?
            .is_some_and(|v| v.value() == payload);
        if same {
            return Ok(false);
        }
        table.insert(topic, payload).map_err(backend(op))?;
        self.dirty = true;
        Ok(true)
    }

    fn remove_mirrored(&mut self, topic: &str) -> Result<(), StoreError> {
        let op = "forget an order from the parent relay";
        let mut table = self.txn.open_table(MIRRORED).map_err(backend(op))?;
        if table.remove(topic).map_err(backend(op))?.is_some() {
            self.dirty = true;
        }
        Ok(())
    }

    fn clear_mirrored(&mut self) -> Result<(), StoreError> {
        let op = "forget the orders from the parent relay";
        let mut table = self.txn.open_table(MIRRORED).map_err(backend(op))?;
        if table.len().map_err(backend(op))? > 0 {
            table.retain(|_, _| false).map_err(backend(op))?;
            self.dirty = true;
        }
        Ok(())
    }

    fn mirrored(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let op = "read the orders from the parent relay";
        let table = self.txn.open_table(MIRRORED).map_err(backend(op))?;
        table
            .iter()
            .map_err(backend(op))?
            .map(|e| {
                e.map(|(k, v)| (k.value().to_owned(), v.value().to_vec()))
                    .map_err(backend(op))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use protocol::Serial;

    #[test]
    fn the_queue_keeps_order_bounds_batches_and_forgets_what_was_acked() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let c1 = Serial::parse("C1").unwrap();
        let mut txn = store.begin().unwrap();
        for i in 0..5u8 {
            let seq = txn.push_uplink(&c1, "counters", &[i; 100]).unwrap();
            assert_eq!(seq, u64::from(i) + 1);
        }
        txn.commit().unwrap();

        let txn = store.begin().unwrap();
        let by_count = txn.uplink_after(0, 2, 1 << 20).unwrap();
        assert_eq!(by_count.iter().map(|i| i.seq).collect::<Vec<_>>(), [1, 2]);
        let by_bytes = txn.uplink_after(1, 10, 250).unwrap();
        assert_eq!(by_bytes.iter().map(|i| i.seq).collect::<Vec<_>>(), [2, 3]);
        let alone = txn.uplink_after(0, 10, 10).unwrap();
        assert_eq!(
            alone.len(),
            1,
            "one item larger than the byte bound still goes"
        );
        assert_eq!(alone[0].payload, [0u8; 100]);
        drop(txn);

        let mut txn = store.begin().unwrap();
        assert_eq!(txn.remove_uplink_upto(3).unwrap(), 3);
        txn.commit().unwrap();
        let mut txn = store.begin().unwrap();
        assert_eq!(txn.uplink_count().unwrap(), 2);
        let next = txn.push_uplink(&c1, "alarm", b"x").unwrap();
        assert_eq!(next, 6, "numbers keep increasing after removals");
    }
}
