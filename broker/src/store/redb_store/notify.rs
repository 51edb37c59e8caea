//! The notification queue (S116, S312): `notify_queue` maps a sequence number to a
//! [`QueuedNotification`]. The core adds to it in the same transaction as the event that caused
//! it (a job's end, an alarm), so a notification exists exactly when its event does; the
//! notification worker removes it once the mail or webhook has been delivered, or given up on.
//! Being in redb, the queue survives a broker restart.
//!
//! Alarm notifications are coalesced first: `alarm_digests` maps a serial to the [`AlarmDigest`]
//! of its alarms raised within the coalescing window, and `digest_due` ((due time in Unix ms,
//! serial)) finds the digests whose window has closed with a range scan. The core turns each into
//! one notification per rule and channel, listing every alarm of the burst.
//!
//! The worker takes what is due **device by device** ([`Txn::due_notifications`]): one device's
//! backlog never stands in front of another device's notification.

use std::collections::{HashMap, VecDeque};

use protocol::Timestamp;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{RedbTxn, backend};
use crate::store::{
    AlarmDigest, Due, NotificationTables, QueuedNotification, StoreError, decode, encode,
};

pub(super) const NOTIFY_QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("notify_queue");
pub(super) const ALARM_DIGESTS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("alarm_digests");
pub(super) const DIGEST_DUE: TableDefinition<(i64, &str), ()> = TableDefinition::new("digest_due");
const NEXT_NOTIFICATION: &str = "next_notification";

impl NotificationTables for RedbTxn {
    fn push_notification(&mut self, item: &QueuedNotification) -> Result<u64, StoreError> {
        let op = "queue a notification";
        let n = self.next_counter(NEXT_NOTIFICATION, op)?;
        let bytes = encode("notify_queue", n, item)?;
        self.txn
            .open_table(NOTIFY_QUEUE)
            .map_err(backend(op))?
            .insert(n, bytes.as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(n)
    }

    fn due_notifications(&self, now: Timestamp, limit: usize) -> Result<Due, StoreError> {
        let op = "read the notification queue";
        let table = self.txn.open_table(NOTIFY_QUEUE).map_err(backend(op))?;
        // Per device, in the order of each device's oldest due notification; at most `limit`
        // kept per device, so this holds at most devices × limit items.
        let mut order: Vec<String> = Vec::new();
        let mut per_device: HashMap<String, VecDeque<(u64, QueuedNotification)>> = HashMap::new();
        let mut later: Option<Timestamp> = None;
        let mut note_later = |at: Timestamp| {
            let at = at.max(now);
            later = Some(later.map_or(at, |l: Timestamp| l.min(at)));
        };
        for entry in table.iter().map_err(backend(op))? {
            let (k, v) = entry.map_err(backend(op))?;
            let item: QueuedNotification = decode("notify_queue", k.value(), v.value())?;
            if item.next_at > now {
                note_later(item.next_at);
                continue;
            }
            let queue = per_device.entry(item.serial.clone()).or_insert_with(|| {
                order.push(item.serial.clone());
                VecDeque::new()
            });
            if queue.len() < limit {
                queue.push_back((k.value(), item));
            } else {
                note_later(item.next_at);
            }
        }
        let mut due = Vec::with_capacity(limit.min(64));
        'rounds: loop {
            let mut took = false;
            for serial in &order {
                if due.len() == limit {
                    break 'rounds;
                }
                if let Some(item) = per_device.get_mut(serial).and_then(VecDeque::pop_front) {
                    due.push(item);
                    took = true;
                }
            }
            if !took {
                break;
            }
        }
        // Whatever was due and not taken is due still: the worker comes back at once.
        if per_device.values().any(|q| !q.is_empty()) {
            note_later(now);
        }
        Ok((due, later))
    }

    fn digest_alarm(
        &mut self,
        serial: &str,
        n: u64,
        due_at: Timestamp,
    ) -> Result<bool, StoreError> {
        let op = "coalesce an alarm notification";
        let mut table = self.txn.open_table(ALARM_DIGESTS).map_err(backend(op))?;
        let existing = table
            .get(serial)
            .map_err(backend(op))?
            .map(|g| decode::<AlarmDigest>("alarm_digests", serial, g.value()))
            .transpose()?;
        let (digest, opened) = AlarmDigest::with_alarm(existing, n, due_at);
        let bytes = encode("alarm_digests", serial, &digest)?;
        table
            .insert(serial, bytes.as_slice())
            .map_err(backend(op))?;
        if opened {
            self.txn
                .open_table(DIGEST_DUE)
                .map_err(backend(op))?
                .insert((digest.due_at.timestamp_millis(), serial), ())
                .map_err(backend(op))?;
        }
        self.dirty = true;
        Ok(opened)
    }

    fn take_due_digests(
        &mut self,
        now: Timestamp,
    ) -> Result<Vec<(String, AlarmDigest)>, StoreError> {
        let op = "read the alarm digests";
        let mut due_table = self.txn.open_table(DIGEST_DUE).map_err(backend(op))?;
        let end = (now.timestamp_millis(), "\u{7f}");
        let mut keys = Vec::new();
        for entry in due_table.range(..=end).map_err(backend(op))? {
            let (k, _) = entry.map_err(backend(op))?;
            let (at, serial) = k.value();
            keys.push((at, serial.to_owned()));
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        for (at, serial) in &keys {
            due_table
                .remove((*at, serial.as_str()))
                .map_err(backend(op))?;
        }
        drop(due_table);
        let mut table = self.txn.open_table(ALARM_DIGESTS).map_err(backend(op))?;
        let mut out = Vec::with_capacity(keys.len());
        for (_, serial) in keys {
            let removed = table.remove(serial.as_str()).map_err(backend(op))?;
            if let Some(g) = removed {
                out.push((
                    serial.clone(),
                    decode("alarm_digests", serial.as_str(), g.value())?,
                ));
            }
        }
        self.dirty = true;
        Ok(out)
    }

    fn put_notification(&mut self, n: u64, item: &QueuedNotification) -> Result<(), StoreError> {
        let op = "write a notification";
        let bytes = encode("notify_queue", n, item)?;
        self.txn
            .open_table(NOTIFY_QUEUE)
            .map_err(backend(op))?
            .insert(n, bytes.as_slice())
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    fn remove_notification(&mut self, n: u64) -> Result<(), StoreError> {
        let op = "remove a notification";
        self.txn
            .open_table(NOTIFY_QUEUE)
            .map_err(backend(op))?
            .remove(n)
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    fn notification_count(&self) -> Result<u64, StoreError> {
        let op = "count the notification queue";
        let table = self.txn.open_table(NOTIFY_QUEUE).map_err(backend(op))?;
        table.len().map_err(backend(op))
    }
}

#[cfg(test)]
mod tests {

    use crate::store::*;
    use chrono::TimeZone;

    fn item(minute: u32) -> QueuedNotification {
        QueuedNotification {
            created_at: chrono::Utc.with_ymd_and_hms(2026, 11, 26, 9, 0, 0).unwrap(),
            serial: "C1".into(),
            event: "alarm".into(),
            channel: NotifyChannel::Mail {
                to: vec!["a@example.com".into()],
            },
            subject: "s".into(),
            text: "t".into(),
            json: "{}".into(),
            attempts: 0,
            next_at: chrono::Utc
                .with_ymd_and_hms(2026, 11, 26, 9, minute, 0)
                .unwrap(),
            last_error: None,
        }
    }

    #[test]
    fn a_burst_of_alarms_is_one_digest_until_its_window_closes() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        let at = |m| item(m).next_at;
        assert!(txn.digest_alarm("C1", 1, at(5)).unwrap());
        assert!(
            !txn.digest_alarm("C1", 2, at(9)).unwrap(),
            "joins the open one"
        );
        assert!(txn.digest_alarm("C2", 3, at(7)).unwrap());
        for n in 0..200 {
            txn.digest_alarm("C1", 10 + n, at(5)).unwrap();
        }
        assert!(txn.take_due_digests(at(4)).unwrap().is_empty());
        let due = txn.take_due_digests(at(5)).unwrap();
        assert_eq!(due.len(), 1);
        let (serial, digest) = &due[0];
        assert_eq!(serial, "C1");
        assert_eq!(&digest.alarms[..3], &[1, 2, 10]);
        assert_eq!(digest.alarms.len(), MAX_DIGEST_ALARMS);
        assert_eq!(digest.more, 202 - MAX_DIGEST_ALARMS as u64);
        assert!(
            txn.take_due_digests(at(5)).unwrap().is_empty(),
            "taken once"
        );
        assert!(txn.digest_alarm("C1", 500, at(20)).unwrap(), "a new window");
        let due = txn.take_due_digests(at(30)).unwrap();
        let serials: Vec<&str> = due.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(serials, ["C2", "C1"]);
    }

    #[test]
    fn the_queue_survives_reopening_and_yields_what_is_due() {
        let dir = tempfile::tempdir().unwrap();
        let now = item(5).next_at;
        {
            let store = crate::store::testing::open(dir.path());
            let mut txn = store.begin().unwrap();
            txn.push_notification(&item(1)).unwrap();
            txn.push_notification(&item(9)).unwrap();
            txn.push_notification(&item(3)).unwrap();
            txn.commit().unwrap();
        }
        let store = crate::store::testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        assert_eq!(txn.notification_count().unwrap(), 3);
        let (due, later) = txn.due_notifications(now, 10).unwrap();
        assert_eq!(due.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(later, Some(item(9).next_at));
        let (one, later) = txn.due_notifications(now, 1).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(
            later,
            Some(now),
            "a due item left over makes the worker come back at once"
        );
        txn.remove_notification(1).unwrap();
        assert_eq!(txn.notification_count().unwrap(), 2);
    }

    #[test]
    fn a_device_with_a_long_queue_does_not_delay_another_devices_notification() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::testing::open(dir.path());
        let mut txn = store.begin().unwrap();
        for _ in 0..100 {
            txn.push_notification(&item(1)).unwrap();
        }
        let late = QueuedNotification {
            serial: "C2".into(),
            ..item(2)
        };
        let c2 = txn.push_notification(&late).unwrap();
        let (due, _) = txn.due_notifications(item(5).next_at, 16).unwrap();
        assert_eq!(due.len(), 16);
        assert_eq!(
            due.iter().position(|(n, _)| *n == c2),
            Some(1),
            "C2's only notification is served right after C1's oldest, not after all 100"
        );
    }
}
