//! What the dashboard knows about the fleet, fed by the relay's retained views over MQTT
//! ([`super::feed`]) and read by the pages and the live stream.
//!
//! Only what is pushed lives here: each device's active alarms (`fleet/+/alarm`) and state
//! (`fleet/+/state`). The job list is *not* copied: the Jobs page asks the relay (`list`) on
//! every render, so which ended jobs it hides is decided exactly as `jobs list` decides it, by
//! the relay's `finished_visible_secs`; a job view on `fleet/+/jobs/+` only tells open pages to
//! fetch their table again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use protocol::alarm::{AlarmKind, AlarmState, AlarmView};
use protocol::presence::StateView;
use tokio::sync::broadcast;

/// What changed, for the live stream. Cheap to copy; pages re-read the model for the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Alarms,
    Devices,
    Jobs,
    /// A rollout's view changed (`json/fleet/rollouts/+`).
    Rollouts,
    /// The session to the relay went up or down.
    Link,
}

/// Changes kept for a slow page before it must catch up by re-reading everything (a lagged
/// receiver re-renders all three views, so nothing is lost but a few redundant events).
const CHANGE_BACKLOG: usize = 256;

pub struct Model {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
}

#[derive(Default)]
struct Inner {
    alarms: BTreeMap<String, Vec<AlarmView>>,
    /// Devices whose alarm view arrived since the feed's latest session began: the others are
    /// what the page showed before it, kept until the relay says whether they still hold.
    refreshed: BTreeSet<String>,
    devices: BTreeMap<String, StateView>,
    linked: bool,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    pub fn new() -> Model {
        Model {
            inner: Mutex::new(Inner::default()),
            changes: broadcast::channel(CHANGE_BACKLOG).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is a single insert or remove, so a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, change: Change) {
        // No page open is not an error.
        let _ = self.changes.send(change);
    }

    /// A rollout's retained view arrived: open Rollouts pages fetch their list again.
    pub fn rollout_changed(&self) {
        self.notify(Change::Rollouts);
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// A device's active alarms as retained on `fleet/{serial}/alarm`; `None`: its last one cleared.
    pub fn set_alarms(&self, serial: &str, state: Option<AlarmState>) {
        {
            let mut inner = self.lock();
            inner.refreshed.insert(serial.to_owned());
            match state {
                Some(s) if !s.alarms.is_empty() => {
                    inner.alarms.insert(serial.to_owned(), s.alarms);
                }
                _ => {
                    inner.alarms.remove(serial);
                }
            }
        }
        self.notify(Change::Alarms);
    }

    /// A new session to the relay began: the relay sends every retained alarm view again, but
    /// not the ones deleted meanwhile (a device's last alarm cleared while we were away). The
    /// list stays as it is (a page never shows "no alarms" only because the feed reconnected);
    /// [`Model::end_resync`] then drops what the relay no longer holds.
    pub fn begin_resync(&self) {
        self.lock().refreshed.clear();
    }

    /// The relay's own list of devices with an active alarm, asked for after the new session
    /// subscribed: a device kept from before the session, not refreshed since and not in it, has
    /// no alarm any more. A view that arrived during the session is newer than the list's
    /// absence and stays.
    pub fn end_resync(&self, active: &BTreeSet<String>) {
        let dropped = {
            let mut inner = self.lock();
            let Inner {
                alarms, refreshed, ..
            } = &mut *inner;
            let before = alarms.len();
            alarms.retain(|serial, _| refreshed.contains(serial) || active.contains(serial));
            alarms.len() != before
        };
        if dropped {
            self.notify(Change::Alarms);
        }
    }

    /// A device's state and presence as retained on `fleet/{serial}/state`.
    pub fn set_device(&self, serial: &str, state: StateView) {
        self.lock().devices.insert(serial.to_owned(), state);
        self.notify(Change::Devices);
    }

    /// A job view changed on `fleet/{serial}/jobs/{job}`.
    pub fn job_changed(&self) {
        self.notify(Change::Jobs);
    }

    pub fn set_linked(&self, up: bool) {
        let changed = {
            let mut inner = self.lock();
            std::mem::replace(&mut inner.linked, up) != up
        };
        if changed {
            self.notify(Change::Link);
        }
    }

    /// Whether the feed's session to the relay is up (and subscribed).
    pub fn linked(&self) -> bool {
        self.lock().linked
    }

    /// Every active alarm, the most urgent first: device faults (fatal by definition: transient
    /// ones never become alarms) before overdue check-ins, those nobody acknowledged before the
    /// acknowledged ones, and within each the newest first, so a new emergency lands on top.
    pub fn active_alarms(&self) -> Vec<AlarmView> {
        let mut all: Vec<AlarmView> = self
            .lock()
            .alarms
            .values()
            .flatten()
            .filter(|a| a.status.is_active())
            .cloned()
            .collect();
        all.sort_by(|a, b| {
            let rank = |a: &AlarmView| (a.kind != AlarmKind::Fault, a.acked_by.is_some());
            rank(a)
                .cmp(&rank(b))
                .then(b.raised_at.cmp(&a.raised_at))
                .then(a.id.cmp(&b.id))
        });
        all
    }

    /// Every device the relay has told us about, by serial.
    pub fn devices(&self) -> Vec<(String, StateView)> {
        self.lock()
            .devices
            .iter()
            .map(|(s, v)| (s.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::alarm::AlarmStatus;

    fn alarm(id: &str, serial: &str, kind: AlarmKind, minute: u32, acked: bool) -> AlarmView {
        use chrono::TimeZone;
        let at = chrono::Utc
            .with_ymd_and_hms(2026, 11, 26, 12, minute, 0)
            .unwrap();
        AlarmView {
            id: id.into(),
            serial: serial.into(),
            site: String::new(),
            kind,
            code: "SC-541".into(),
            detail: String::new(),
            status: AlarmStatus::Raised,
            raised_at: at,
            received_at: at,
            updated_at: at,
            cleared_at: None,
            acked_by: acked.then(|| "svc".into()),
            acked_at: None,
            total: None,
        }
    }

    #[test]
    fn faults_come_first_then_unacknowledged_then_newest() {
        let m = Model::new();
        let state = |serial: &str, alarms| AlarmState {
            serial: serial.into(),
            alarms,
        };
        m.set_alarms(
            "C1",
            Some(state(
                "C1",
                vec![
                    alarm("A-1", "C1", AlarmKind::Overdue, 9, false),
                    alarm("A-2", "C1", AlarmKind::Fault, 1, true),
                ],
            )),
        );
        m.set_alarms(
            "C2",
            Some(state(
                "C2",
                vec![
                    alarm("A-3", "C2", AlarmKind::Fault, 2, false),
                    alarm("A-4", "C2", AlarmKind::Fault, 3, false),
                ],
            )),
        );
        let ids: Vec<String> = m.active_alarms().into_iter().map(|a| a.id).collect();
        assert_eq!(ids, ["A-4", "A-3", "A-2", "A-1"]);

        let mut rx = m.subscribe();
        m.set_alarms("C2", None);
        assert_eq!(rx.try_recv().unwrap(), Change::Alarms);
        let ids: Vec<String> = m.active_alarms().into_iter().map(|a| a.id).collect();
        assert_eq!(ids, ["A-2", "A-1"], "C2's last alarm cleared");
    }

    #[test]
    fn a_reconnect_keeps_the_list_and_drops_only_what_the_relay_no_longer_holds() {
        let m = Model::new();
        let state = |serial: &str, id: &str| {
            Some(AlarmState {
                serial: serial.into(),
                alarms: vec![alarm(id, serial, AlarmKind::Fault, 1, false)],
            })
        };
        m.set_alarms("C1", state("C1", "A-1"));
        m.set_alarms("C2", state("C2", "A-2"));
        m.set_alarms("C3", state("C3", "A-3"));
        let mut rx = m.subscribe();
        m.begin_resync();
        assert_eq!(m.active_alarms().len(), 3, "nothing forgotten on reconnect");
        assert!(rx.try_recv().is_err(), "the page is not told of a change");
        // C1's view comes again; C3 raised a new one, and the relay's list (asked for before
        // C3's arrived) names C1 only. C2 cleared while the feed was away.
        m.set_alarms("C1", state("C1", "A-1"));
        m.set_alarms("C3", state("C3", "A-4"));
        m.end_resync(&BTreeSet::from(["C1".to_owned()]));
        let mut ids: Vec<String> = m.active_alarms().into_iter().map(|a| a.id).collect();
        ids.sort();
        assert_eq!(ids, ["A-1", "A-4"]);
        // A device the list still names keeps its old view until the relay sends a new one.
        m.set_alarms("C4", state("C4", "A-5"));
        m.begin_resync();
        m.end_resync(&BTreeSet::from(["C4".to_owned()]));
        assert_eq!(m.active_alarms().len(), 1);
    }
}
