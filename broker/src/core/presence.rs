//! Presence at the relay (claim 42's display): online and offline from the gateway's sessions,
//! last seen, and `overdue` for a device in periodic mode that misses its check-in.
//!
//! When a device's last session closes, a device known to be periodic gets a due time: the
//! close, plus its interval, plus the relay's margin. Once a second the core looks for due times
//! that passed ([`Core::overdue`], a range scan) and raises an overdue alarm for each; the next
//! session of the device clears it. The schedule comes from the device's state message and from
//! each set-schedule job that succeeded. Due times are in redb, so a restarted relay still
//! notices a device that stayed away; a periodic device that was connected when the relay
//! stopped is given one from its last-seen time ([`Core::presence_startup`]).

use std::collections::BTreeSet;

use protocol::device::DeviceState;
use protocol::job::JobSpec;
use protocol::presence::{Presence, StateView};
use protocol::schedule::Schedule;
use protocol::{Envelope, Serial, Timestamp, topic};
use serde::Serialize;
use tracing::{debug, error, info, warn};

use super::{Core, Outbound, Pending, alarm, skip_corrupt};
use crate::store::{DeviceRecord, StoreError, Txn};

/// A device's session opened (`online`) or closed: the relay's own observation, from the
/// gateway, never the device's word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    pub serial: Serial,
    pub online: bool,
}

/// The most presence changes kept while the store cannot write: two per session, so room for a
/// large fleet reconnecting several times. Beyond it the oldest are dropped (a device's state
/// then catches up with its next session).
const MAX_DEFERRED_PRESENCE: usize = 200_000;

fn bounded(mut changes: Vec<(Serial, bool)>) -> Vec<(Serial, bool)> {
    if changes.len() > MAX_DEFERRED_PRESENCE {
        let drop = changes.len() - MAX_DEFERRED_PRESENCE;
        warn!(
            dropped = drop,
            "too many presence changes waiting for the store; oldest dropped"
        );
        changes.drain(..drop);
    }
    changes
}

/// The JSON mirror of `fleet/{serial}/state`: the serial, then the view's fields.
#[derive(Serialize)]
struct StateJson<'a> {
    serial: &'a str,
    #[serde(flatten)]
    view: &'a StateView,
}

/// How often the leading node looks for nodes that are gone.
const GONE_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

fn margin(core: &Core) -> chrono::Duration {
    chrono::Duration::from_std(core.alerts.settings().overdue_margin).unwrap_or_default()
}

impl Core {
    /// Records sessions opening and closing, in one transaction; returns the views to publish.
    /// While the store cannot write, the changes are kept in memory and recorded, in order, by
    /// the first call after it can again (the core's once-a-second tick calls with no events).
    pub fn presence_events(
        &self,
        events: Vec<PresenceEvent>,
        now: Timestamp,
    ) -> Result<Vec<Outbound>, StoreError> {
        self.presence_and_sessions(events, Vec::new(), now)
    }

    /// [`Core::presence_events`], and the topic filters of devices' persistent sessions that
    /// changed (`sessions`, in the order they changed), in the same transaction. While the store
    /// cannot write, the last filters of each device are kept, and recorded with the presence
    /// changes held back.
    pub(super) fn presence_and_sessions(
        &self,
        events: Vec<PresenceEvent>,
        mut sessions: Vec<(Serial, Vec<String>)>,
        now: Timestamp,
    ) -> Result<Vec<Outbound>, StoreError> {
        let mut changed: Vec<(Serial, bool)> = Vec::new();
        if let Ok(mut online) = self.alerts.online.lock() {
            for e in events {
                let count = online.entry(e.serial.clone()).or_insert(0);
                let was = *count > 0;
                if e.online {
                    *count += 1;
                } else {
                    *count = count.saturating_sub(1);
                }
                let is = *count > 0;
                if *count == 0 {
                    online.remove(&e.serial);
                }
                if was != is {
                    changed.push((e.serial, is));
                }
            }
            if !changed.is_empty() && self.relay_settings().forward_to_parent {
                self.presence_deltas
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend(changed.iter().cloned());
            }
            self.alerts
                .stats
                .devices_online
                .store(online.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let mut deferred = self
            .deferred_presence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !deferred.is_empty() {
            deferred.append(&mut changed);
            changed = std::mem::take(&mut *deferred);
        }
        let mut held_sessions = self
            .deferred_sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !held_sessions.is_empty() {
            // Held ones are older than these: a device's newer filters replace them below.
            let newer = std::mem::take(&mut sessions);
            sessions = held_sessions.drain().collect();
            sessions.extend(newer);
        }
        if changed.is_empty() && sessions.is_empty() {
            return Ok(Vec::new());
        }
        if !self.storage_writable() {
            *deferred = bounded(changed);
            held_sessions.extend(sessions);
            return Ok(Vec::new());
        }
        match self.record_presence(&changed, &sessions, now) {
            Err(e) if e.is_storage() => {
                self.storage_failed(&e);
                *deferred = bounded(changed);
                held_sessions.extend(sessions);
                Ok(Vec::new())
            }
            other => other,
        }
    }

    /// Records presence changes in one transaction; returns the views to publish.
    pub(super) fn record_presence(
        &self,
        changed: &[(Serial, bool)],
        sessions: &[(Serial, Vec<String>)],
        now: Timestamp,
    ) -> Result<Vec<Outbound>, StoreError> {
        let mut txn = self.store.begin()?;
        let mut serials: Vec<&str> = changed.iter().map(|(s, _)| s.as_str()).collect();
        serials.extend(sessions.iter().map(|(s, _)| s.as_str()));
        txn.warm_devices(&serials)?;
        let mut p = Pending::default();
        for (serial, online) in changed.iter().cloned() {
            match self.presence_edge(&mut *txn, &mut p, &serial, online, now) {
                Ok(()) => {}
                Err(e) if e.is_corrupt_record() => {
                    error!(serial = %serial, error = %e, "cannot record presence: a store record is corrupt");
                }
                Err(e) => return Err(e),
            }
        }
        for (serial, filters) in sessions {
            match record_session_filters(&mut *txn, serial, filters) {
                Ok(()) => {}
                Err(e) if e.is_corrupt_record() => {
                    error!(serial = %serial, error = %e, "cannot record session filters: a store record is corrupt");
                }
                Err(e) => return Err(e),
            }
        }
        let done = std::mem::take(&mut p.done);
        let (out, _) = self.finish(&mut *txn, p, now)?;
        self.commit_counted(txn, 0)?;
        for d in done {
            d.log(self);
        }
        Ok(out)
    }

    /// One device went online or offline.
    fn presence_edge(
        &self,
        txn: &mut dyn Txn,
        p: &mut Pending,
        serial: &Serial,
        online: bool,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let record = txn.presence(serial)?.unwrap_or_default();
        if !online
            && let (Some(here), Some(there)) = (&self.settings.node, &record.node)
            && here != there
        {
            // The device moved: this is the end of its old session, not of the device's.
            info!(serial = %serial, node = %there, "device session ended here; it is online at another node");
            return Ok(());
        }
        self.apply_edge(txn, p, serial, record, online, now)
    }

    /// Records an edge on the device's presence record and its registry entry.
    fn apply_edge(
        &self,
        txn: &mut dyn Txn,
        p: &mut Pending,
        serial: &Serial,
        mut record: crate::store::PresenceRecord,
        online: bool,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let device = txn.device(serial)?;
        record.since = Some(now);
        record.node = if online {
            self.settings.node.clone()
        } else {
            None
        };
        if online {
            record.due_by = None;
            if let Some(n) = record.overdue_alarm.take() {
                alarm::clear_by_number(txn, p, n, now)?;
            }
            // Debug: the gateway's "session started" says it already, with the identity, at
            // info; in a reconnect storm a second line per device was 1 % of the relay's CPU.
            debug!(serial = %serial, "device online");
        } else {
            record.due_by = record
                .expected_interval()
                .map(|secs| now + chrono::Duration::seconds(secs as i64) + margin(self));
            match self.alerts.offline_log.check() {
                Some(0) => info!(serial = %serial, due_by = ?record.due_by, "device offline"),
                Some(suppressed) => {
                    info!(serial = %serial, due_by = ?record.due_by, suppressed, "device offline")
                }
                None => {}
            }
        }
        txn.put_presence(serial, &record)?;
        let device = match device {
            Some(d) => DeviceRecord {
                last_seen: now,
                ..d
            },
            None => DeviceRecord {
                state: DeviceState::default(),
                last_seen: now,
            },
        };
        txn.put_device(serial, &device)?;
        p.state_written(serial, device, record);
        Ok(())
    }

    /// Raises an overdue alarm for every periodic device whose check-in is past due; costs no
    /// commit when none is. Skipped while the store cannot write.
    pub fn overdue(&self, now: Timestamp) -> Result<Vec<Outbound>, StoreError> {
        if !self.storage_writable() {
            return Ok(Vec::new());
        }
        let mut txn = self.store.begin()?;
        let due = txn.checkins_due(now)?;
        if due.is_empty() {
            txn.commit()?;
            return Ok(Vec::new());
        }
        let mut p = Pending::default();
        for serial in due {
            if let Err(e) = self.mark_overdue(&mut *txn, &mut p, &serial, now) {
                if !e.is_corrupt_record() {
                    return Err(e);
                }
                error!(serial = %serial, error = %e, "cannot mark a device overdue: a store record is corrupt");
            }
        }
        let done = std::mem::take(&mut p.done);
        let (out, _) = self.finish(&mut *txn, p, now)?;
        self.commit_counted(txn, 0)?;
        for d in done {
            d.log(self);
        }
        Ok(out)
    }

    fn mark_overdue(
        &self,
        txn: &mut dyn Txn,
        p: &mut Pending,
        serial: &Serial,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let mut record = txn.presence(serial)?.unwrap_or_default();
        let due = record.due_by.unwrap_or(now);
        record.due_by = None;
        // In a cluster the leader checks every node's devices: one online at another node
        // checked in there.
        if self.is_online_anywhere(serial, &record) {
            txn.put_presence(serial, &record)?;
            return Ok(());
        }
        let last_seen = txn.device(serial)?.map(|d| d.last_seen);
        let detail = format!(
            "no check-in since {}; expected every {} s (margin {} s)",
            last_seen.map_or_else(
                || "the relay started".to_owned(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            record.interval_secs.unwrap_or(0),
            self.alerts.settings().overdue_margin.as_secs()
        );
        warn!(serial = %serial, due_by = %due, "device overdue");
        let n = alarm::raise_overdue(self, txn, p, serial, detail, due, now)?;
        record.overdue_alarm = Some(n);
        record.since = Some(now);
        txn.put_presence(serial, &record)?;
        p.state_changed(serial);
        Ok(())
    }

    /// In a cluster, on the node that leads, every few seconds: the devices a node that is gone
    /// held (its heartbeat older than the grace period) are offline — unless they reconnected
    /// elsewhere within it, and their record names that node.
    pub fn sweep_gone_nodes(&self, now: Timestamp) -> Result<Vec<Outbound>, StoreError> {
        let Some(me) = &self.settings.node else {
            return Ok(Vec::new());
        };
        {
            let mut last = self
                .gone_sweep
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < GONE_SWEEP_EVERY) {
                return Ok(Vec::new());
            }
            *last = Some(std::time::Instant::now());
        }
        let gone: Vec<String> = self
            .store
            .gone_nodes()?
            .into_iter()
            .filter(|n| n != me)
            .collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let mut txn = self.store.begin()?;
        let mut p = Pending::default();
        for node in &gone {
            let mut lost = 0usize;
            let serials = txn.presence_on_node(node)?;
            lock_in_batch_order(&mut *txn, &serials)?;
            for serial in serials {
                let Some(Some(mut record)) = skip_corrupt(txn.presence(&serial))? else {
                    continue;
                };
                if record.node.as_deref() != Some(node.as_str()) {
                    continue;
                }
                record.node = None;
                self.apply_edge(&mut *txn, &mut p, &serial, record, false, now)?;
                lost += 1;
            }
            if lost > 0 {
                tracing::warn!(node = %node, devices = lost, "cluster node gone: its devices are offline unless they reconnected to another node");
            }
        }
        let (out, _) = self.finish(&mut *txn, p, now)?;
        if txn.commit()? {
            self.storage_committed();
        }
        Ok(out)
    }

    /// At startup, before any session: a periodic device without a due time (it was connected
    /// when the relay stopped) gets one counted from when it was last seen; in a cluster, the
    /// sessions this node held before it stopped are over.
    pub fn presence_startup(&self) -> Result<usize, StoreError> {
        let mut txn = self.store.begin()?;
        // Only the rows this may write: this node's own sessions, and devices that no node
        // holds and that have no deadline. Read without locks, then locked at once in the order a batch locks (two
        // rounds could meet a batch holding a row of the second while it waits for one of the
        // first), then read again: a device online at another node is never locked, so a node
        // starting does not hold up the others' reports.
        let mine = match &self.settings.node {
            Some(me) => txn.presence_on_node(me)?,
            None => Vec::new(),
        };
        if self.settings.node.is_some() {
            self.expect_devices(mine.len());
        }
        let mut candidates: Vec<Serial> = mine
            .iter()
            .cloned()
            .chain(txn.presence_without_node_or_deadline()?)
            .collect();
        candidates.sort();
        candidates.dedup();
        lock_in_batch_order(&mut *txn, &candidates)?;
        if let Some(me) = self.settings.node.clone() {
            let mut p = Pending::default();
            let now = chrono::Utc::now();
            for serial in mine {
                let Some(Some(mut record)) = skip_corrupt(txn.presence(&serial))? else {
                    continue;
                };
                // Reconnected at another node between the list and the lock: its session.
                if record.node.as_ref() != Some(&me) {
                    continue;
                }
                self.keep_stored_session(&serial, &record.session_filters);
                record.node = None;
                self.apply_edge(&mut *txn, &mut p, &serial, record, false, now)?;
            }
        }
        let mut set = 0;
        for serial in candidates {
            let Some(Some(mut record)) = skip_corrupt(txn.presence(&serial))? else {
                continue;
            };
            let Some(secs) = record.expected_interval() else {
                continue;
            };
            // Online at another node (or at one that is gone, whose sweep ends its session):
            // the end of that session sets the deadline. This node's own were ended above.
            if record.due_by.is_some() || record.overdue_alarm.is_some() || record.node.is_some() {
                continue;
            }
            let Some(Some(device)) = skip_corrupt(txn.device(&serial))? else {
                continue;
            };
            record.due_by =
                Some(device.last_seen + chrono::Duration::seconds(secs as i64) + margin(self));
            txn.put_presence(&serial, &record)?;
            set += 1;
        }
        txn.commit()?;
        Ok(set)
    }

    /// Online here, or (in a cluster) at the other node its presence record names.
    fn is_online_anywhere(&self, serial: &Serial, record: &crate::store::PresenceRecord) -> bool {
        self.is_online(serial)
            || record
                .node
                .as_ref()
                .is_some_and(|n| Some(n) != self.settings.node.as_ref())
    }

    /// `fleet/{serial}/state` and its JSON mirror: the device's state with its presence.
    pub(super) fn state_views(
        &self,
        txn: &dyn Txn,
        serial: &Serial,
        record: &DeviceRecord,
    ) -> Result<Vec<Outbound>, StoreError> {
        let presence = skip_corrupt(txn.presence(serial))?
            .flatten()
            .unwrap_or_default();
        self.state_views_of(serial, record, &presence)
    }

    /// The views of a device whose records are at hand.
    pub(super) fn state_views_of(
        &self,
        serial: &Serial,
        record: &DeviceRecord,
        presence: &crate::store::PresenceRecord,
    ) -> Result<Vec<Outbound>, StoreError> {
        let now_online = self.is_online_anywhere(serial, presence);
        let child = self.child_of(serial);
        let view = StateView {
            state: record.state.clone(),
            presence: if now_online {
                Presence::Online
            } else if matches!(child, Some((_, false))) {
                Presence::Unreachable
            } else if presence.overdue_alarm.is_some() {
                Presence::Overdue
            } else {
                Presence::Offline
            },
            // Online: the child it is online at, none if only here; else the child it was lost with.
            relay: child
                .filter(|(_, at_child)| *at_child || !now_online)
                .map(|(relay, _)| relay.to_string()),
            last_seen: record.last_seen,
            since: presence.since,
            mode: presence.mode,
            interval_secs: presence.interval_secs,
            due_by: if now_online { None } else { presence.due_by },
            node: if now_online {
                presence.node.clone()
            } else {
                None
            },
        };
        let err = |e: String| StoreError::Encode {
            table: "(published view)",
            key: format!("device state {serial}"),
            reason: e,
        };
        let cbor = Envelope::new(0, record.last_seen, &view)
            .to_cbor()
            .map_err(|e| err(e.to_string()))?;
        let json = serde_json::to_vec(&StateJson {
            serial: serial.as_str(),
            view: &view,
        })
        .map_err(|e| err(e.to_string()))?;
        Ok(vec![
            Outbound {
                topic: topic::fleet_state(serial),
                payload: cbor,
                retain: true,
            },
            Outbound {
                topic: topic::json_fleet_state(serial),
                payload: json,
                retain: true,
            },
        ])
    }
}

/// Writes the filters of `serial`'s persistent session on its presence record, unless they are
/// already there (a device that resumes and subscribes again to the same filters costs no write).
fn record_session_filters(
    txn: &mut dyn Txn,
    serial: &Serial,
    filters: &[String],
) -> Result<(), StoreError> {
    let mut record = txn.presence(serial)?.unwrap_or_default();
    if record.session_filters != filters {
        record.session_filters = filters.to_vec();
        txn.put_presence(serial, &record)?;
    }
    Ok(())
}

/// Reads (and in a cluster locks) the rows of `serials` the way a batch does before it touches
/// them one by one: each device's seen window, record and presence, each table in serial order.
/// A node starting, or the leader sweeping a node that is gone, while another node serves those
/// devices then waits for that node's batch instead of deadlocking with it (row by row, presence
/// first, a restarted node's startup once failed that way in the chaos test).
fn lock_in_batch_order(txn: &mut dyn Txn, serials: &[Serial]) -> Result<(), StoreError> {
    let keys: Vec<&str> = serials.iter().map(Serial::as_str).collect();
    txn.warm_devices(&keys)
}

/// Learns a device's schedule (from its state message, or a set-schedule job that succeeded).
pub(super) fn learn(
    txn: &mut dyn Txn,
    serial: &Serial,
    schedule: &Schedule,
) -> Result<(), StoreError> {
    let mut record = txn.presence(serial)?.unwrap_or_default();
    let (mode, interval) = (Some(schedule.mode), schedule.interval_secs);
    if record.mode == mode && record.interval_secs == interval {
        return Ok(());
    }
    record.mode = mode;
    record.interval_secs = interval;
    if record.expected_interval().is_none() {
        record.due_by = None;
    }
    info!(serial = %serial, mode = %schedule.mode, interval_secs = ?interval, "device schedule learned");
    txn.put_presence(serial, &record)
}

/// After a job's update was applied: a set-schedule job that succeeded changes what the relay
/// expects of the device.
pub(super) fn learn_from_job(
    txn: &mut dyn Txn,
    serial: &Serial,
    n: u64,
    p: &mut Pending,
) -> Result<(), StoreError> {
    let Some(Some(record)) = skip_corrupt(txn.job(n))? else {
        return Ok(());
    };
    if let Some(JobSpec::SetSchedule { schedule }) = record.order.as_ref().map(|o| &o.spec) {
        let schedule = schedule.clone();
        learn(txn, serial, &schedule)?;
        p.state_changed(serial);
    }
    Ok(())
}

/// Every serial whose view changed in a batch, for [`Core::finish`].
pub(super) fn parse_serials(names: BTreeSet<String>) -> Vec<Serial> {
    names
        .into_iter()
        .filter_map(|s| Serial::parse(&s).ok())
        .collect()
}
