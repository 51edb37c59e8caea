//! Alarms (Fig. 5) and presence: what the relay keeps about emergencies and about when each
//! device was last reachable.
//!
//! - `alarms`: alarm number → [`AlarmView`], every alarm ever raised, cleared ones included;
//! - `active_alarms`: (serial, code) → alarm number, the alarms not yet cleared: a device's
//!   current alarm state is a range scan, and a resent or repeated raise finds its alarm;
//! - `alarm_overflow`: serial → [`OverflowRecord`], the alarms the relay refused a device (over
//!   its cap or its rate) and the overflow alarm that lists them;
//! - `presence`: serial → [`PresenceRecord`], the device's schedule as the relay knows it and its
//!   overdue alarm;
//! - `checkin_due`: (due time in Unix ms, serial) for every offline device in periodic mode, so
//!   finding overdue devices is a range scan, not a walk over the fleet every second.

use protocol::alarm::AlarmView;
use protocol::{Serial, Timestamp};
use redb::{ReadableTable, TableDefinition};

use super::{META, RedbTxn, backend, serial_key};
use crate::store::{
    AlarmTables, OverflowRecord, PresenceRecord, PresenceTables, StoreError, alarm_id, decode,
    encode,
};

pub(super) const ALARMS: TableDefinition<u64, &[u8]> = TableDefinition::new("alarms");
pub(super) const ACTIVE_ALARMS: TableDefinition<(&str, &str), u64> =
    TableDefinition::new("active_alarms");
/// Once the device's clock decided whether a raise was older than a clear; no longer read
/// (alarm events are ordered by the relay's receipt), and deleted when the store opens.
pub(super) const ALARM_CLEARS: TableDefinition<(&str, &str), i64> =
    TableDefinition::new("alarm_clears");
pub(super) const ALARM_OVERFLOW: TableDefinition<&str, &[u8]> =
    TableDefinition::new("alarm_overflow");
pub(super) const PRESENCE: TableDefinition<&str, &[u8]> = TableDefinition::new("presence");
pub(super) const CHECKIN_DUE: TableDefinition<(i64, &str), ()> =
    TableDefinition::new("checkin_due");

const NEXT_ALARM: &str = "next_alarm";

/// Every key of `serial` in a (serial, code) table. Codes are ASCII
/// (`protocol::alarm::check_code`), so "\u{7f}" sorts after every one of them.
fn range_of(serial: &str) -> std::ops::RangeInclusive<(&str, &str)> {
    (serial, "")..=(serial, "\u{7f}")
}

impl AlarmTables for RedbTxn {
    fn next_alarm_number(&mut self) -> Result<u64, StoreError> {
        self.next_counter(NEXT_ALARM, "allocate an alarm number")
    }

    fn alarm(&self, n: u64) -> Result<Option<AlarmView>, StoreError> {
        let op = "read an alarm";
        let table = self.txn.open_table(ALARMS).map_err(backend(op))?;
        let guard = table.get(n).map_err(backend(op))?;
        guard
            .map(|g| decode("alarms", alarm_id(n), g.value()))
            .transpose()
    }

    fn put_alarm(&mut self, n: u64, alarm: &AlarmView) -> Result<(), StoreError> {
        let op = "write an alarm";
        let bytes = encode("alarms", alarm_id(n), alarm)?;
        self.txn
            .open_table(ALARMS)
            .map_err(backend(op))?
            .insert(n, bytes.as_slice())
            .map_err(backend(op))?;
        let mut active = self.txn.open_table(ACTIVE_ALARMS).map_err(backend(op))?;
        let key = (alarm.serial.as_str(), alarm.code.as_str());
        if alarm.status.is_active() {
            active.insert(key, n).map_err(backend(op))?;
        } else if active.get(key).map_err(backend(op))?.map(|g| g.value()) == Some(n) {
            active.remove(key).map_err(backend(op))?;
        }
        self.dirty = true;
        Ok(())
    }

    fn active_alarm(&self, serial: &Serial, code: &str) -> Result<Option<u64>, StoreError> {
        let op = "read the active alarms";
        let table = self.txn.open_table(ACTIVE_ALARMS).map_err(backend(op))?;
        let guard = table.get((serial.as_str(), code)).map_err(backend(op))?;
        Ok(guard.map(|g| g.value()))
    }

    fn active_alarms_of(&self, serial: &Serial) -> Result<Vec<u64>, StoreError> {
        let op = "read the active alarms";
        let table = self.txn.open_table(ACTIVE_ALARMS).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table
            .range(range_of(serial.as_str()))
            .map_err(backend(op))?
        {
            out.push(entry.map_err(backend(op))?.1.value());
        }
        out.sort_unstable();
        Ok(out)
    }

    fn active_alarm_count(&self, serial: &Serial, except: &[&str]) -> Result<usize, StoreError> {
        let op = "count the active alarms";
        let table = self.txn.open_table(ACTIVE_ALARMS).map_err(backend(op))?;
        let mut n = 0;
        for entry in table
            .range(range_of(serial.as_str()))
            .map_err(backend(op))?
        {
            let (k, _) = entry.map_err(backend(op))?;
            if !except.contains(&k.value().1) {
                n += 1;
            }
        }
        Ok(n)
    }

    fn active_alarms(&self) -> Result<Vec<u64>, StoreError> {
        let op = "read the active alarms";
        let table = self.txn.open_table(ACTIVE_ALARMS).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))? {
            out.push(entry.map_err(backend(op))?.1.value());
        }
        out.sort_unstable();
        Ok(out)
    }

    fn alarms_newest_first(&self, limit: usize) -> Result<Vec<AlarmView>, StoreError> {
        let op = "list alarms";
        let table = self.txn.open_table(ALARMS).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))?.rev().take(limit) {
            let (k, v) = entry.map_err(backend(op))?;
            out.push(decode("alarms", alarm_id(k.value()), v.value())?);
        }
        Ok(out)
    }

    fn alarm_overflow(&self, serial: &Serial) -> Result<Option<OverflowRecord>, StoreError> {
        let op = "read alarm overflow";
        let table = self.txn.open_table(ALARM_OVERFLOW).map_err(backend(op))?;
        let guard = table.get(serial.as_str()).map_err(backend(op))?;
        guard
            .map(|g| decode("alarm_overflow", serial, g.value()))
            .transpose()
    }

    fn put_alarm_overflow(
        &mut self,
        serial: &Serial,
        record: Option<&OverflowRecord>,
    ) -> Result<(), StoreError> {
        let op = "write alarm overflow";
        let mut table = self.txn.open_table(ALARM_OVERFLOW).map_err(backend(op))?;
        match record {
            Some(r) => {
                let bytes = encode("alarm_overflow", serial, r)?;
                table
                    .insert(serial.as_str(), bytes.as_slice())
                    .map_err(backend(op))?;
            }
            None => {
                table.remove(serial.as_str()).map_err(backend(op))?;
            }
        }
        self.dirty = true;
        Ok(())
    }
}

impl RedbTxn {
    /// Every serial with a presence record.
    fn presence_serials(&self) -> Result<Vec<Serial>, StoreError> {
        let op = "list presence";
        let table = self.txn.open_table(PRESENCE).map_err(backend(op))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend(op))? {
            let (k, _) = entry.map_err(backend(op))?;
            let key = k.value();
            out.push(serial_key("presence", key)?);
        }
        Ok(out)
    }

    /// Bumps the named counter in `meta` and returns its new value.
    pub(super) fn next_counter(&mut self, key: &str, op: &'static str) -> Result<u64, StoreError> {
        let mut meta = self.txn.open_table(META).map_err(backend(op))?;
        let last = meta
            .get(key)
            .map_err(backend(op))?
            .map(|g| g.value())
            .unwrap_or(0);
        let n = last + 1;
        meta.insert(key, n).map_err(backend(op))?;
        self.dirty = true;
        Ok(n)
    }
}

impl PresenceTables for RedbTxn {
    fn presence(&self, serial: &Serial) -> Result<Option<PresenceRecord>, StoreError> {
        let op = "read presence";
        let table = self.txn.open_table(PRESENCE).map_err(backend(op))?;
        let guard = table.get(serial.as_str()).map_err(backend(op))?;
        guard
            .map(|g| decode("presence", serial, g.value()))
            .transpose()
    }

    fn put_presence(&mut self, serial: &Serial, record: &PresenceRecord) -> Result<(), StoreError> {
        let op = "write presence";
        let bytes = encode("presence", serial, record)?;
        // The record it replaces comes back from the insert: its due time is the index entry
        // to move, without a second lookup. A corrupt one is put back as it was, and refused as
        // a read of it would be.
        let mut table = self.txn.open_table(PRESENCE).map_err(backend(op))?;
        let old = table
            .insert(serial.as_str(), bytes.as_slice())
            .map_err(backend(op))?;
        let before = match old
            .as_ref()
            .map(|g| decode::<PresenceRecord>("presence", serial, g.value()))
        {
            Some(Err(e)) => {
                let raw = old.map(|g| g.value().to_vec()).unwrap_or_default();
                table
                    .insert(serial.as_str(), raw.as_slice())
                    .map_err(backend(op))?;
                return Err(e);
            }
            replaced => replaced.and_then(Result::ok).and_then(|r| r.due_by),
        };
        drop(old);
        drop(table);
        if before != record.due_by {
            let mut due = self.txn.open_table(CHECKIN_DUE).map_err(backend(op))?;
            if let Some(old) = before {
                due.remove((old.timestamp_millis(), serial.as_str()))
                    .map_err(backend(op))?;
            }
            if let Some(new) = record.due_by {
                due.insert((new.timestamp_millis(), serial.as_str()), ())
                    .map_err(backend(op))?;
            }
        }
        self.dirty = true;
        Ok(())
    }

    fn presence_on_node(&self, node: &str) -> Result<Vec<Serial>, StoreError> {
        let mut out = Vec::new();
        for serial in self.presence_serials()? {
            if self.presence(&serial)?.and_then(|r| r.node).as_deref() == Some(node) {
                out.push(serial);
            }
        }
        Ok(out)
    }

    fn presence_without_node_or_deadline(&self) -> Result<Vec<Serial>, StoreError> {
        let mut out = Vec::new();
        for serial in self.presence_serials()? {
            match self.presence(&serial) {
                Ok(Some(r)) if r.node.is_none() && r.due_by.is_none() => out.push(serial),
                Ok(_) => {}
                // Listed all the same: the caller reads it again, and says it is corrupt.
                Err(e) if e.is_corrupt_record() => out.push(serial),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn checkins_due(&self, now: Timestamp) -> Result<Vec<Serial>, StoreError> {
        let op = "list due check-ins";
        let table = self.txn.open_table(CHECKIN_DUE).map_err(backend(op))?;
        let mut out = Vec::new();
        let end = (now.timestamp_millis(), "\u{7f}");
        for entry in table.range(..=end).map_err(backend(op))? {
            let (k, _) = entry.map_err(backend(op))?;
            let (_, key) = k.value();
            out.push(serial_key("checkin_due", key)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::*;
    use chrono::TimeZone;
    use protocol::alarm::{AlarmKind, AlarmStatus};
    use protocol::schedule::SessionMode;

    fn at(m: u32) -> Timestamp {
        chrono::Utc.with_ymd_and_hms(2026, 11, 26, 9, m, 0).unwrap()
    }

    fn alarm(serial: &str, code: &str, status: AlarmStatus) -> AlarmView {
        AlarmView {
            id: String::new(),
            serial: serial.into(),
            site: String::new(),
            kind: AlarmKind::Fault,
            code: code.into(),
            detail: String::new(),
            status,
            raised_at: at(0),
            received_at: at(0),
            updated_at: at(0),
            cleared_at: None,
            acked_by: None,
            acked_at: None,
            total: None,
        }
    }

    #[test]
    fn alarm_ids_and_numbers() {
        assert_eq!(alarm_id(7), "A-000007");
        assert_eq!(alarm_number("A-000007"), Some(7));
        for bad in ["A-", "J-1", "A-x", ""] {
            assert_eq!(alarm_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_active_index_follows_the_status() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        let c1 = Serial::parse("C1").unwrap();
        let c10 = Serial::parse("C10").unwrap();
        let a = txn.next_alarm_number().unwrap();
        let b = txn.next_alarm_number().unwrap();
        let c = txn.next_alarm_number().unwrap();
        txn.put_alarm(a, &alarm("C1", "SC-541", AlarmStatus::Raised))
            .unwrap();
        txn.put_alarm(b, &alarm("C1", "SC-321", AlarmStatus::InProgress))
            .unwrap();
        txn.put_alarm(c, &alarm("C10", "SC-541", AlarmStatus::Raised))
            .unwrap();
        assert_eq!(txn.active_alarms_of(&c1).unwrap(), [a, b]);
        assert_eq!(txn.active_alarms_of(&c10).unwrap(), [c]);
        assert_eq!(txn.active_alarm(&c1, "SC-541").unwrap(), Some(a));
        txn.put_alarm(a, &alarm("C1", "SC-541", AlarmStatus::Cleared))
            .unwrap();
        assert_eq!(txn.active_alarms_of(&c1).unwrap(), [b]);
        assert_eq!(txn.active_alarms().unwrap(), [b, c]);
        assert_eq!(txn.alarms_newest_first(2).unwrap().len(), 2);
        assert!(txn.commit().unwrap());
    }

    #[test]
    fn due_checkins_follow_the_presence_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        let c1 = Serial::parse("C1").unwrap();
        let mut record = PresenceRecord {
            mode: Some(SessionMode::Periodic),
            interval_secs: Some(60),
            due_by: Some(at(10)),
            ..PresenceRecord::default()
        };
        txn.put_presence(&c1, &record).unwrap();
        assert!(txn.checkins_due(at(9)).unwrap().is_empty());
        assert_eq!(txn.checkins_due(at(10)).unwrap(), std::slice::from_ref(&c1));
        assert!(txn.presence_without_node_or_deadline().unwrap().is_empty());
        record.due_by = Some(at(20));
        txn.put_presence(&c1, &record).unwrap();
        assert!(txn.checkins_due(at(15)).unwrap().is_empty());
        record.due_by = None;
        txn.put_presence(&c1, &record).unwrap();
        assert!(txn.checkins_due(at(30)).unwrap().is_empty());
        assert_eq!(
            txn.presence_without_node_or_deadline().unwrap(),
            std::slice::from_ref(&c1)
        );
        record.node = Some("N1".into());
        txn.put_presence(&c1, &record).unwrap();
        assert!(txn.presence_without_node_or_deadline().unwrap().is_empty());
    }

    /// A presence record that cannot be read is not silently replaced: the write is refused
    /// as a read would be, and the record and its due time stay as they were.
    #[test]
    fn writing_over_a_corrupt_presence_record_is_refused_and_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::RedbStore::open(dir.path()).unwrap();
        let mut txn = store.begin_redb().unwrap();
        let c1 = Serial::parse("C1").unwrap();
        let due = PresenceRecord {
            mode: Some(SessionMode::Periodic),
            interval_secs: Some(60),
            due_by: Some(at(10)),
            ..PresenceRecord::default()
        };
        txn.put_presence(&c1, &due).unwrap();
        txn.txn
            .open_table(PRESENCE)
            .unwrap()
            .insert("C1", [0xffu8, 0x00].as_slice())
            .unwrap();

        let err = txn
            .put_presence(&c1, &PresenceRecord::default())
            .unwrap_err();
        assert!(err.is_corrupt_record(), "{err}");
        assert!(txn.presence(&c1).unwrap_err().is_corrupt_record());
        assert_eq!(txn.checkins_due(at(10)).unwrap(), std::slice::from_ref(&c1));
    }
}
