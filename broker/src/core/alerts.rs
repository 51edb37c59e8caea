//! The core's part in emergencies, presence and notifications (issue 4): its settings, the live
//! state that is not in redb (which devices have a session open now), the wake-up of the
//! notification worker, and its counters.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::job::JobStatus;
use protocol::{Serial, Timestamp};
use tokio::sync::Notify;

use super::Core;
use crate::notify::{self, NotifyConfig, NotifyEvent};
use crate::store::{JobRecord, Store, StoreError, Txn};
use crate::telemetry::CoreStats;

/// What `broker run` configures besides jobs.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// A device in periodic mode is overdue once it is this late for its check-in.
    pub overdue_margin: Duration,
    /// Mail and webhook rules.
    pub notify: NotifyConfig,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            overdue_margin: Duration::from_secs(300),
            notify: NotifyConfig::default(),
        }
    }
}

#[derive(Default)]
pub(super) struct Alerts {
    pub(super) settings: AlertSettings,
    /// Open sessions per device. A count, not a flag: a reconnecting device's new session may
    /// start before the router has ended its old one.
    pub(super) online: Mutex<HashMap<Serial, u32>>,
    /// Wakes the notification worker when something was queued.
    pub(super) wake: Arc<Notify>,
    pub(super) stats: CoreStats,
}

impl Core {
    /// Sets the overdue margin and the notification rules; call before the core runs.
    pub fn configure_alerts(&mut self, settings: AlertSettings) {
        self.alerts.settings = settings;
    }

    pub fn alert_settings(&self) -> &AlertSettings {
        &self.alerts.settings
    }

    /// The store, for the notification worker and the metrics endpoint.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The core's counters, for the metrics endpoint.
    pub fn telemetry(&self) -> &CoreStats {
        &self.alerts.stats
    }

    /// What the notification worker waits on.
    pub fn notify_wake(&self) -> Arc<Notify> {
        self.alerts.wake.clone()
    }

    /// Whether a session of `serial` is open now.
    pub fn is_online(&self, serial: &Serial) -> bool {
        self.alerts
            .online
            .lock()
            .map(|m| m.get(serial).copied().unwrap_or(0) > 0)
            .unwrap_or(false)
    }

    /// Queues the notifications of `event` for `serial` in `txn` and wakes the worker (which
    /// will find them once the transaction has committed).
    pub(super) fn notify(
        &self,
        txn: &mut Txn,
        event: NotifyEvent,
        serial: &str,
        message: impl FnOnce() -> notify::Message,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let rules = &self.alerts.settings.notify;
        if !rules.rules.iter().any(|r| r.on.contains(&event)) {
            return Ok(());
        }
        let queued = rules.enqueue(txn, event, serial, &message(), now)?;
        if queued > 0 {
            self.alerts.wake.notify_one();
        }
        Ok(())
    }

    /// Queues the alarm notifications whose coalescing window has closed (stub).
    pub fn notify_due(&self, _now: Timestamp) -> Result<(), StoreError> {
        Ok(())
    }

    /// S116: the end notice of a job, OK or NG, to whoever asked for it.
    pub(super) fn notify_job_end(
        &self,
        txn: &mut Txn,
        record: &JobRecord,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let event = match record.view.status {
            JobStatus::Succeeded => NotifyEvent::JobSucceeded,
            JobStatus::Failed | JobStatus::TimedOut => NotifyEvent::JobFailed,
            _ => return Ok(()),
        };
        let server = self.settings.server_name.clone();
        self.notify(
            txn,
            event,
            &record.view.serial,
            || notify::compose::job(&record.view, event, &server),
            now,
        )
    }

    /// Records a commit's latency and the messages it carried.
    pub(super) fn count_commit(&self, took: Duration, messages: usize) {
        self.alerts.stats.commit(took);
        self.alerts
            .stats
            .messages
            .fetch_add(messages as u64, Ordering::Relaxed);
    }
}
