//! Emergencies (the seed's Fig. 5, claims 10–11): what a device says about a fault, and the alarms
//! the relay keeps and shows.
//!
//! A device judges each fault itself (S303): a transient one (a paper jam) is counted in its JAM/SC
//! data and reported to nobody (S304); a fatal one (a motor failure) is sent at once as an
//! [`AlarmReport`] `raised` on `dev/{serial}/up/alarm` through the durable outbox (S306–S308),
//! then `in-progress` once the relay has acknowledged it (S309), and `cleared` when a technician
//! has fixed it.
//!
//! The relay stores every report first, then keeps the device's *current* alarms retained on
//! `fleet/{serial}/alarm` ([`AlarmState`], CBOR) and `json/fleet/{serial}/alarm` (JSON), so a
//! dashboard that connects later sees every active emergency at once. When the last alarm of a
//! device clears, the retained message is deleted (a zero-length payload). The relay raises
//! alarms of its own too: [`AlarmKind::Overdue`] when a device in periodic mode misses its
//! check-in.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Longest fault code accepted (`SC-541`, `J-12`…).
pub const MAX_CODE_LEN: usize = 32;
/// Longest free-text detail accepted; longer ones are cut, not refused.
pub const MAX_DETAIL_LEN: usize = 512;
/// Longest installation site an alarm carries (bytes). A device's state may name a longer one;
/// every alarm view, list and notification repeats the site, so it is cut there.
pub const MAX_SITE_LEN: usize = 128;

/// The code of the alarm the relay raises for a device that missed its check-in.
pub const OVERDUE_CODE: &str = "overdue";
/// The code of the alarm the relay raises for a device whose alarms it refused (too many active
/// at once, or raised too fast); its detail lists the refused codes.
pub const OVERFLOW_CODE: &str = "overflow";

/// What happened to a fault, as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultEvent {
    /// A fatal fault was detected (S301–S306).
    Raised,
    /// The relay has the fault; the device confirms it persists and resumes polling (S309, S311).
    InProgress,
    /// The fault is gone (a technician fixed it).
    Cleared,
}

impl FaultEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultEvent::Raised => "raised",
            FaultEvent::InProgress => "in-progress",
            FaultEvent::Cleared => "cleared",
        }
    }
}

impl fmt::Display for FaultEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `dev/{serial}/up/alarm`: one step of a fatal fault's life. The device id is the topic's serial
/// (the gateway checked it against the certificate), so it is not repeated here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmReport {
    /// The fault code, e.g. `SC-541`: 1 to 32 ASCII letters, digits, `-`, `_` or `.`.
    pub code: String,
    pub event: FaultEvent,
    /// What the device says about it ("main motor failure"), shown to the service desk.
    #[serde(default)]
    pub detail: String,
    /// When the device detected (or cleared) it, by the device's clock.
    pub at: Timestamp,
    /// The total counter when it happened (Fig. 3, call info: "total count at the call").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
}

/// Checks a fault code: 1 to 32 ASCII letters, digits, `-`, `_` or `.`.
pub fn check_code(code: &str) -> Result<(), String> {
    if code.is_empty() || code.len() > MAX_CODE_LEN {
        return Err(format!(
            "fault code {code:?} must be 1 to {MAX_CODE_LEN} characters long"
        ));
    }
    if let Some(bad) = code
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "fault code {code:?} contains {bad:?}: use ASCII letters, digits, -, _ or ."
        ));
    }
    Ok(())
}

/// Checks a fault code a device reports: [`check_code`], and not one of the codes the relay
/// raises itself ([`OVERDUE_CODE`], [`OVERFLOW_CODE`]), which a device must not mix with.
pub fn check_device_code(code: &str) -> Result<(), String> {
    check_code(code)?;
    if code == OVERDUE_CODE || code == OVERFLOW_CODE {
        return Err(format!(
            "fault code {code:?} is the relay's own; use another code"
        ));
    }
    Ok(())
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
pub fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Cuts a detail text to [`MAX_DETAIL_LEN`] bytes, on a character boundary.
pub fn clip_detail(detail: &str) -> String {
    clip(detail, MAX_DETAIL_LEN).to_owned()
}

/// Cuts a site to [`MAX_SITE_LEN`] bytes, on a character boundary.
pub fn clip_site(site: &str) -> String {
    clip(site, MAX_SITE_LEN).to_owned()
}

/// Where an alarm came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlarmKind {
    /// A fatal fault the device reported.
    Fault,
    /// The relay's own: a device in periodic mode missed its expected check-in.
    Overdue,
}

impl AlarmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmKind::Fault => "fault",
            AlarmKind::Overdue => "overdue",
        }
    }
}

impl fmt::Display for AlarmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an alarm stands. `raised` and `in-progress` are active; `cleared` is history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlarmStatus {
    Raised,
    InProgress,
    Cleared,
}

impl AlarmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmStatus::Raised => "raised",
            AlarmStatus::InProgress => "in-progress",
            AlarmStatus::Cleared => "cleared",
        }
    }

    pub fn is_active(self) -> bool {
        !matches!(self, AlarmStatus::Cleared)
    }
}

impl fmt::Display for AlarmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One alarm as the relay keeps and shows it (`alarms list`, the retained alarm views, mail and
/// webhooks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmView {
    /// Given by the relay: `A-000001`, `A-000002`, …
    pub id: String,
    pub serial: String,
    /// Installation site, as the device last reported it.
    #[serde(default)]
    pub site: String,
    pub kind: AlarmKind,
    /// The device's fault code, or `overdue`.
    pub code: String,
    #[serde(default)]
    pub detail: String,
    pub status: AlarmStatus,
    /// When the fault was detected (device clock), or when the check-in was due.
    pub raised_at: Timestamp,
    /// When the relay stored it.
    pub received_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_at: Option<Timestamp>,
    /// The host that acknowledged it (`alarms ack`), and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_at: Option<Timestamp>,
    /// The total counter when it happened, if the device said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
}

/// `fleet/{serial}/alarm` (CBOR, in an envelope) and `json/fleet/{serial}/alarm` (plain JSON),
/// retained: the device's active alarms, oldest first. Deleted when none is left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmState {
    pub serial: String,
    pub alarms: Vec<AlarmView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_checked() {
        for ok in ["SC-541", "J-12", "overdue", "E_1.2", &"x".repeat(32)] {
            assert!(check_code(ok).is_ok(), "{ok}");
        }
        for bad in ["", "SC 541", "SC/541", "ü", &"x".repeat(33)] {
            assert!(check_code(bad).is_err(), "{bad:?}");
        }
        assert!(check_device_code("SC-541").is_ok());
        for own in [OVERDUE_CODE, OVERFLOW_CODE] {
            assert!(check_device_code(own).unwrap_err().contains("relay's own"));
        }
    }

    #[test]
    fn sites_are_clipped_on_a_char_boundary() {
        assert_eq!(clip_site("Osaka 3F"), "Osaka 3F");
        let clipped = clip_site(&"大阪".repeat(100));
        assert!(clipped.len() <= MAX_SITE_LEN && clipped.chars().all(|c| c == '大' || c == '阪'));
    }

    #[test]
    fn details_are_clipped_on_a_char_boundary() {
        assert_eq!(clip_detail("motor"), "motor");
        let long = "é".repeat(400);
        let clipped = clip_detail(&long);
        assert!(clipped.len() <= MAX_DETAIL_LEN);
        assert!(clipped.chars().all(|c| c == 'é'));
    }

    #[test]
    fn reports_and_views_use_the_documented_names() {
        let at = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        let report = AlarmReport {
            code: "SC-541".into(),
            event: FaultEvent::InProgress,
            detail: "main motor".into(),
            at,
            total: Some(1234),
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["event"], "in-progress");
        assert_eq!(json["total"], 1234);
        let mut cbor = Vec::new();
        ciborium::into_writer(&report, &mut cbor).unwrap();
        let back: AlarmReport = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(back, report);

        let view = AlarmView {
            id: "A-000001".into(),
            serial: "C1".into(),
            site: "Osaka".into(),
            kind: AlarmKind::Overdue,
            code: OVERDUE_CODE.into(),
            detail: String::new(),
            status: AlarmStatus::Raised,
            raised_at: at,
            received_at: at,
            updated_at: at,
            cleared_at: None,
            acked_by: None,
            acked_at: None,
            total: None,
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["kind"], "overdue");
        assert_eq!(json["status"], "raised");
        assert!(json.get("cleared_at").is_none());
        assert!(AlarmStatus::InProgress.is_active() && !AlarmStatus::Cleared.is_active());
    }
}
