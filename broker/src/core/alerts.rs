//! The core's part in emergencies, presence and notifications (Fig. 5, claim 42, S116/S312): its
//! settings, the live state that is not in redb (which devices have a session open now), the
//! wake-up of the notification worker, and its counters.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use protocol::alarm::{AlarmKind, AlarmView};
use protocol::job::JobStatus;
use protocol::{Serial, Shown, Timestamp};
use tokio::sync::Notify;
use tracing::info;

use super::Core;
use super::alarm_limit::{AlarmLimiter, AlarmLimits};
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
    /// What one device may make the relay hold and send in alarms.
    pub alarm_limits: AlarmLimits,
    /// "device offline" lines logged in full per second (`session_log_lines_per_second`);
    /// 0: every line. A site's outage or a stopping fleet takes many devices offline at once.
    pub offline_log_lines_per_second: u64,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            overdue_margin: Duration::from_secs(300),
            notify: NotifyConfig::default(),
            alarm_limits: AlarmLimits::default(),
            offline_log_lines_per_second: crate::gateway::limits::SessionLogs::PER_SECOND,
        }
    }
}

#[derive(Default)]
pub(super) struct Alerts {
    /// Read where needed, never held across a batch's steps: a reload replaces it.
    settings: RwLock<Arc<AlertSettings>>,
    /// Open sessions per device. A count, not a flag: a reconnecting device's new session may
    /// start before the router has ended its old one.
    pub(super) online: Mutex<HashMap<Serial, u32>>,
    /// Wakes the notification worker when something was queued.
    pub(super) wake: Arc<Notify>,
    pub(super) stats: Arc<CoreStats>,
    /// Each device's burst and rate of new alarms.
    pub(super) limiter: AlarmLimiter,
    /// When each device's alarm view last went out.
    pub(super) view_pace: super::view_pace::ViewPace,
    /// "device offline" lines, within `offline_log_lines_per_second`.
    pub(super) offline_log: crate::log_budget::LogBudget,
}

impl Alerts {
    /// Makes room in the map of who is online for `devices` at once ([`super::Core::known_devices`]).
    pub(super) fn expect_devices(&self, devices: usize) {
        let mut online = self.online.lock().unwrap_or_else(|p| p.into_inner());
        let more = devices.saturating_sub(online.len());
        online.reserve(more);
    }

    /// The settings in force now.
    pub(super) fn settings(&self) -> Arc<AlertSettings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Core {
    /// Sets the overdue margin, the notification rules and the alarm limits. Called at start,
    /// and by a reload while the core runs: what the next message or tick checks uses the new
    /// settings; notifications already queued keep where they were going.
    pub fn configure_alerts(&self, settings: AlertSettings) {
        self.alerts
            .offline_log
            .set_per_second(crate::gateway::limits::SessionLogs::budget(
                settings.offline_log_lines_per_second,
            ));
        *self
            .alerts
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
    }

    /// The store, for the metrics endpoint.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The store, shared: the notification worker reads its queue there, without the core.
    pub fn shared_store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The core's counters, shared with the notification worker.
    pub fn shared_stats(&self) -> Arc<CoreStats> {
        self.alerts.stats.clone()
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
        txn: &mut dyn Txn,
        event: NotifyEvent,
        serial: &str,
        message: impl FnOnce() -> notify::Message,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let settings = self.alerts.settings();
        let rules = &settings.notify;
        if !rules.rules.iter().any(|r| r.on.contains(&event)) {
            return Ok(());
        }
        let queued = rules.enqueue(txn, event, serial, &message(), now)?;
        if queued > 0 {
            self.alerts.wake.notify_one();
        }
        Ok(())
    }

    /// The notifications of a new alarm `n`. A device's faults are coalesced: the first opens a
    /// digest that closes `notify.coalesce_secs` later, and every fault until then joins it, so a
    /// burst is one mail and one webhook call per rule ([`Core::notify_due`] sends it). An
    /// overdue device is notified at once (the relay raises that alarm once per missed check-in).
    pub(super) fn notify_alarm(
        &self,
        txn: &mut dyn Txn,
        n: u64,
        alarm: &AlarmView,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let event = match alarm.kind {
            AlarmKind::Fault => NotifyEvent::Alarm,
            AlarmKind::Overdue => NotifyEvent::Overdue,
        };
        let settings = self.alerts.settings();
        let rules = &settings.notify;
        if !rules.rules.iter().any(|r| r.on.contains(&event)) {
            return Ok(());
        }
        if event == NotifyEvent::Overdue || rules.coalesce_secs == 0 {
            let server = self.settings.server_name.clone();
            return self.notify(
                txn,
                event,
                &alarm.serial,
                || notify::compose::alarm(alarm, &server),
                now,
            );
        }
        let window = chrono::Duration::seconds(rules.coalesce_secs as i64);
        txn.digest_alarm(&alarm.serial, n, now + window)?;
        Ok(())
    }

    /// Queues one notification per rule and channel for each device whose coalescing window has
    /// closed, listing the alarms it raised in it, and wakes the worker. The core's tick calls it
    /// every second; costs no commit when no window has closed. Skipped while the store cannot
    /// write: the digests wait in redb.
    pub fn notify_due(&self, now: Timestamp) -> Result<(), StoreError> {
        if !self.storage_writable() {
            return Ok(());
        }
        let mut txn = self.store.begin()?;
        let due = txn.take_due_digests(now)?;
        if due.is_empty() {
            txn.commit()?;
            return Ok(());
        }
        let server = self.settings.server_name.clone();
        let settings = self.alerts.settings();
        let rules = &settings.notify;
        let mut queued = 0;
        let mut logs = Vec::new();
        for (serial, digest) in due {
            let mut alarms = Vec::with_capacity(digest.alarms.len());
            for n in digest.alarms {
                if let Some(Some(a)) = super::skip_corrupt(txn.alarm(n))? {
                    alarms.push(super::alarm::shown(a));
                }
            }
            let message = match (alarms.as_slice(), digest.more) {
                ([], 0) => continue,
                ([one], 0) => notify::compose::alarm(one, &server),
                (many, more) => notify::compose::alarms(&serial, many, more, &server),
            };
            let n = rules.enqueue(&mut *txn, NotifyEvent::Alarm, &serial, &message, now)?;
            logs.push((serial, alarms.len() as u64 + digest.more, n));
            queued += n;
        }
        self.commit_counted(txn, 0)?;
        // One line per device per coalescing window at most.
        for (serial, alarms, notifications) in logs {
            info!(serial = %Shown(&serial), alarms, notifications, "alarm notifications queued");
        }
        if queued > 0 {
            self.alerts.wake.notify_one();
        }
        Ok(())
    }

    /// The alarm views owed to devices whose changes came faster than one view a second
    /// ([`super::view_pace`]), built from the store as it stands now. The core's tick calls it.
    pub fn alarm_views_due(&self, now: Timestamp) -> Result<Vec<super::Outbound>, StoreError> {
        let due = self.alerts.view_pace.due(now);
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.store.begin()?;
        let mut out = Vec::new();
        for serial in super::presence::parse_serials(due.into_iter().collect()) {
            out.extend(super::alarm::views(&*txn, &serial, now)?);
        }
        txn.commit()?;
        Ok(out)
    }

    /// S116: the end notice of a job, OK or NG, to whoever asked for it.
    pub(super) fn notify_job_end(
        &self,
        txn: &mut dyn Txn,
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
