//! Presence (claim 42's display): is a device reachable, and when was it last heard from.
//!
//! The relay decides this itself, from the device's MQTT sessions, never from the device's word:
//! `online` while a session of the device is open, `offline` after it closed, and `overdue` when a
//! device in periodic mode has missed its expected check-in by the relay's margin (which also
//! raises an alarm, [`crate::alarm::AlarmKind::Overdue`]). It is part of the retained
//! `fleet/{serial}/state` view ([`StateView`]).
//!
//! What the relay needs from the device is its schedule: it learns it from the device's state
//! message ([`StateReport`], an additive superset of [`DeviceState`]) and from every set-schedule
//! job that succeeded.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::device::DeviceState;
use crate::schedule::{Schedule, SessionMode};

/// `dev/{serial}/up/state` as agents of this version send it: the device's state and its
/// schedule. A relay that knows only [`DeviceState`] reads it as one (unknown fields are ignored).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StateReport {
    #[serde(flatten)]
    pub state: DeviceState,
    /// When the device reaches the relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Presence {
    /// A session of the device is open now.
    Online,
    /// No session is open; for a periodic device, it is not yet late.
    Offline,
    /// A periodic device missed its expected check-in by more than the relay's margin.
    Overdue,
    /// Last seen online through a child relay whose own connection is lost: the device may well
    /// be online there, but this relay cannot reach it now.
    Unreachable,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Offline => "offline",
            Presence::Overdue => "overdue",
            Presence::Unreachable => "unreachable",
        }
    }
}

impl fmt::Display for Presence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `fleet/{serial}/state` (CBOR, in an envelope whose `at` is the last-seen time) and, with the
/// serial added, `json/fleet/{serial}/state`. The device's state is flattened in, so a reader that
/// decodes a plain [`DeviceState`] still can.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateView {
    #[serde(flatten)]
    pub state: DeviceState,
    pub presence: Presence,
    /// When the relay last heard from the device (a message, a session opening or closing).
    pub last_seen: Timestamp,
    /// When the presence last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// The device's session mode, as the relay last learned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<SessionMode>,
    /// Periodic: the check-in interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<u64>,
    /// Periodic and offline: when the device becomes overdue if it has not checked in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_by: Option<Timestamp>,
    /// The child relay the device is on (online) or was last on (unreachable); none when it is
    /// connected to this relay itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// In a cluster: the node whose session the device is on (online), none when offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_report_reads_as_a_plain_device_state_and_back() {
        let report = StateReport {
            state: DeviceState {
                site: "Osaka".into(),
                model: "C-450".into(),
                firmware: "1.0".into(),
            },
            schedule: Some(Schedule {
                mode: SessionMode::Periodic,
                interval_secs: Some(900),
                ..Schedule::default()
            }),
        };
        let mut cbor = Vec::new();
        ciborium::into_writer(&report, &mut cbor).unwrap();
        let old: DeviceState = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(old, report.state);
        let back: StateReport = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(back, report);
        // And an old agent's plain state reads as a report without a schedule.
        let mut plain = Vec::new();
        ciborium::into_writer(&report.state, &mut plain).unwrap();
        let new: StateReport = ciborium::from_reader(plain.as_slice()).unwrap();
        assert_eq!(new.schedule, None);
    }

    #[test]
    fn the_state_view_flattens_the_device_state() {
        let at = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        let view = StateView {
            state: DeviceState {
                site: "Kobe".into(),
                model: "m".into(),
                firmware: "f".into(),
            },
            presence: Presence::Overdue,
            last_seen: at,
            since: Some(at),
            mode: Some(SessionMode::Periodic),
            interval_secs: Some(60),
            due_by: None,
            relay: None,
            node: None,
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["site"], "Kobe");
        assert_eq!(json["presence"], "overdue");
        assert_eq!(json["mode"], "periodic");
        let mut cbor = Vec::new();
        ciborium::into_writer(&view, &mut cbor).unwrap();
        let old: DeviceState = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(old, view.state);
        let back: StateView = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(back, view);
    }
}
