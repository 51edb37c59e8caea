//! The notification queue (S116, S312): `notify_queue` maps a sequence number to a
//! [`QueuedNotification`]. The core adds to it in the same transaction as the event that caused
//! it (a job's end, an alarm), so a notification exists exactly when its event does; the
//! notification worker removes it once the mail or webhook has been delivered, or given up on.
//! Being in redb, the queue survives a broker restart.

use protocol::Timestamp;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{StoreError, Txn, backend, decode, encode};

pub(super) const NOTIFY_QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("notify_queue");
const NEXT_NOTIFICATION: &str = "next_notification";

/// What is due now (with its number), and when the next one is due.
pub type Due = (Vec<(u64, QueuedNotification)>, Option<Timestamp>);

/// Where a notification goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "kebab-case")]
pub enum NotifyChannel {
    /// One mail to all of these addresses.
    Mail { to: Vec<String> },
    /// An HTTP POST of the JSON body.
    Webhook { url: String },
}

/// One mail or webhook call waiting to be delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedNotification {
    pub created_at: Timestamp,
    /// The device the event concerns, so the worker can serve devices in turn.
    #[serde(default)]
    pub serial: String,
    /// What happened: `job-succeeded`, `job-failed`, `alarm`, `overdue`.
    pub event: String,
    pub channel: NotifyChannel,
    /// The mail's subject line.
    pub subject: String,
    /// The mail's text.
    pub text: String,
    /// The webhook's JSON body.
    pub json: String,
    /// Attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// Not before this time (backoff after a failure).
    pub next_at: Timestamp,
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Txn {
    /// Queues a notification; returns its number.
    pub fn push_notification(&mut self, item: &QueuedNotification) -> Result<u64, StoreError> {
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

    /// Up to `limit` queued notifications due at `now`, oldest first, and the earliest time a
    /// later one is due.
    pub fn due_notifications(&self, now: Timestamp, limit: usize) -> Result<Due, StoreError> {
        let op = "read the notification queue";
        let table = self.txn.open_table(NOTIFY_QUEUE).map_err(backend(op))?;
        let mut due = Vec::new();
        let mut later: Option<Timestamp> = None;
        for entry in table.iter().map_err(backend(op))? {
            let (k, v) = entry.map_err(backend(op))?;
            let item: QueuedNotification = decode("notify_queue", k.value(), v.value())?;
            if item.next_at <= now && due.len() < limit {
                due.push((k.value(), item));
            } else {
                let at = item.next_at.max(now);
                later = Some(later.map_or(at, |l| l.min(at)));
            }
        }
        Ok((due, later))
    }

    /// Rewrites a queued notification (after a failed attempt).
    pub fn put_notification(
        &mut self,
        n: u64,
        item: &QueuedNotification,
    ) -> Result<(), StoreError> {
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

    /// Removes a notification (delivered, or given up on).
    pub fn remove_notification(&mut self, n: u64) -> Result<(), StoreError> {
        let op = "remove a notification";
        self.txn
            .open_table(NOTIFY_QUEUE)
            .map_err(backend(op))?
            .remove(n)
            .map_err(backend(op))?;
        self.dirty = true;
        Ok(())
    }

    /// How many notifications wait.
    pub fn notification_count(&self) -> Result<u64, StoreError> {
        let op = "count the notification queue";
        let table = self.txn.open_table(NOTIFY_QUEUE).map_err(backend(op))?;
        table.len().map_err(backend(op))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
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
    fn the_queue_survives_reopening_and_yields_what_is_due() {
        let dir = tempfile::tempdir().unwrap();
        let now = item(5).next_at;
        {
            let store = Store::open(dir.path()).unwrap();
            let mut txn = store.begin().unwrap();
            txn.push_notification(&item(1)).unwrap();
            txn.push_notification(&item(9)).unwrap();
            txn.push_notification(&item(3)).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
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
        let store = Store::open(dir.path()).unwrap();
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
