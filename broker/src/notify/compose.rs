//! What a notification says: a mail's subject and text for people, a JSON body for machines.
//! Pure functions, so the wording is tested without a mail server.

use std::fmt::Write as _;

use protocol::alarm::{AlarmKind, AlarmView};
use protocol::job::JobView;
use serde_json::json;

use super::NotifyEvent;

/// One notification's content.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub subject: String,
    pub text: String,
    pub json: String,
}

fn rfc3339(t: protocol::Timestamp) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn at_site(site: &str) -> String {
    if site.is_empty() {
        String::new()
    } else {
        format!(" ({site})")
    }
}

/// A subject line: a device's site or code must not start a header of its own.
fn one_line(text: String) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    } else {
        text
    }
}

/// Codes a digest's subject names before "…".
const SUBJECT_CODES: usize = 8;

/// A device's alarms raised within one coalescing window (more than one): one mail listing them,
/// and a webhook body `{"event": "alarm", "server", "serial", "alarms": […], "more": N}`, where
/// `more` counts alarms of the burst not listed.
pub fn alarms(serial: &str, alarms: &[AlarmView], more: u64, server: &str) -> Message {
    let total = alarms.len() as u64 + more;
    let site = alarms.first().map(|a| a.site.as_str()).unwrap_or("");
    let mut codes: Vec<&str> = alarms
        .iter()
        .take(SUBJECT_CODES)
        .map(|a| a.code.as_str())
        .collect();
    if total > codes.len() as u64 {
        codes.push("…");
    }
    let subject = one_line(format!(
        "[chukei] EMERGENCY {total} alarms on {serial}{}: {}",
        at_site(site),
        codes.join(", ")
    ));
    let mut text = String::new();
    let _ = writeln!(text, "{subject}");
    let _ = writeln!(text);
    let _ = writeln!(text, "Device:    {serial}");
    if !site.is_empty() {
        let _ = writeln!(text, "Site:      {site}");
    }
    let _ = writeln!(text, "Relay:     {server}");
    let _ = writeln!(text);
    for a in alarms {
        let _ = write!(
            text,
            "{}  {}  {}  raised {}",
            a.id,
            a.code,
            a.status,
            rfc3339(a.raised_at)
        );
        if !a.detail.is_empty() {
            let _ = write!(text, "  {}", a.detail);
        }
        let _ = writeln!(text);
    }
    if more > 0 {
        let _ = writeln!(text, "… and {more} more");
    }
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "See them with: host-agent alarms list --serial {serial}"
    );
    let body = json!({
        "event": NotifyEvent::Alarm.as_str(),
        "server": server,
        "serial": serial,
        "alarms": alarms,
        "more": more,
    });
    Message {
        subject,
        text,
        json: body.to_string(),
    }
}

/// A fatal alarm or an overdue device (S312): the device, its site, the code and what it means.
pub fn alarm(alarm: &AlarmView, server: &str) -> Message {
    let event = match alarm.kind {
        AlarmKind::Fault => NotifyEvent::Alarm,
        AlarmKind::Overdue => NotifyEvent::Overdue,
    };
    let subject = one_line(match alarm.kind {
        AlarmKind::Fault => format!(
            "[chukei] EMERGENCY {} on {}{}",
            alarm.code,
            alarm.serial,
            at_site(&alarm.site)
        ),
        AlarmKind::Overdue => format!(
            "[chukei] {} missed its check-in{}",
            alarm.serial,
            at_site(&alarm.site)
        ),
    });
    let mut text = String::new();
    let _ = writeln!(text, "{subject}");
    let _ = writeln!(text);
    let _ = writeln!(text, "Alarm:     {}", alarm.id);
    let _ = writeln!(text, "Device:    {}", alarm.serial);
    if !alarm.site.is_empty() {
        let _ = writeln!(text, "Site:      {}", alarm.site);
    }
    let _ = writeln!(text, "Kind:      {}", alarm.kind);
    let _ = writeln!(text, "Code:      {}", alarm.code);
    if !alarm.detail.is_empty() {
        let _ = writeln!(text, "Detail:    {}", alarm.detail);
    }
    let _ = writeln!(text, "Raised at: {}", rfc3339(alarm.raised_at));
    let _ = writeln!(text, "Stored at: {}", rfc3339(alarm.received_at));
    if let Some(total) = alarm.total {
        let _ = writeln!(text, "Total count at the fault: {total}");
    }
    let _ = writeln!(text, "Relay:     {server}");
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "Acknowledge it with: host-agent alarms ack {}",
        alarm.id
    );
    let body = json!({ "event": event.as_str(), "server": server, "alarm": alarm });
    Message {
        subject,
        text,
        json: body.to_string(),
    }
}

/// A job's end notice (S116): OK or NG, with the reason of an abnormal end.
/// A rollout that ended: aborted, succeeded or failed, with its counts.
pub fn rollout(view: &protocol::rollout::RolloutView, event: NotifyEvent, server: &str) -> Message {
    let subject = one_line(format!(
        "[chukei] rollout {} ({}) {}{}",
        view.id,
        view.name,
        view.status,
        view.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    ));
    let mut text = String::new();
    let _ = writeln!(text, "{subject}");
    let _ = writeln!(text);
    let _ = writeln!(text, "Rollout:  {} ({})", view.id, view.name);
    let _ = writeln!(text, "Kind:     {}", view.kind);
    let _ = writeln!(text, "Status:   {}", view.status);
    if let Some(reason) = &view.reason {
        let _ = writeln!(text, "Reason:   {reason}");
    }
    let _ = writeln!(text, "Targets:  {}", view.targets.join(" "));
    let _ = writeln!(text, "Devices:  {}", view.devices);
    for (status, n) in &view.counts {
        let _ = writeln!(text, "  {status:<12} {n}");
    }
    let _ = writeln!(text, "Host:     {}", view.host);
    let _ = writeln!(text, "Relay:    {server}");
    let _ = writeln!(text);
    let _ = writeln!(text, "Details: host-agent rollouts show {}", view.id);
    let body = json!({ "event": event.as_str(), "server": server, "rollout": view });
    Message {
        subject,
        text,
        json: body.to_string(),
    }
}

pub fn job(view: &JobView, event: NotifyEvent, server: &str) -> Message {
    let outcome = match event {
        NotifyEvent::JobSucceeded => "ended OK",
        _ => "ended NG",
    };
    let subject = one_line(format!(
        "[chukei] job {} {} on {}{}: {} {}",
        view.id,
        view.instruction,
        view.serial,
        at_site(&view.site),
        outcome,
        view.status
    ));
    let mut text = String::new();
    let _ = writeln!(text, "{subject}");
    let _ = writeln!(text);
    let _ = writeln!(text, "Job:         {}", view.id);
    let _ = writeln!(text, "Device:      {}", view.serial);
    if !view.site.is_empty() {
        let _ = writeln!(text, "Site:        {}", view.site);
    }
    let _ = writeln!(text, "Instruction: {}", view.instruction);
    let _ = writeln!(text, "Data type:   {}", view.data_type);
    let _ = writeln!(text, "Status:      {}", view.status);
    if let Some(reason) = &view.reason {
        let _ = writeln!(text, "Reason:      {reason}");
    }
    let _ = writeln!(text, "Host:        {}", view.host);
    let _ = writeln!(text, "Ended at:    {}", rfc3339(view.updated_at));
    let _ = writeln!(text, "Relay:       {server}");
    let _ = writeln!(text);
    let _ = writeln!(text, "Details: host-agent jobs show {}", view.id);
    let body = json!({ "event": event.as_str(), "server": server, "job": view });
    Message {
        subject,
        text,
        json: body.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::alarm::AlarmStatus;
    use protocol::job::JobStatus;

    fn at() -> protocol::Timestamp {
        chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap()
    }

    #[test]
    fn an_alarm_mail_names_the_device_site_and_code() {
        let a = AlarmView {
            id: "A-000003".into(),
            serial: "C123".into(),
            site: "Osaka HQ".into(),
            kind: AlarmKind::Fault,
            code: "SC-541".into(),
            detail: "main motor failure".into(),
            status: AlarmStatus::Raised,
            raised_at: at(),
            received_at: at(),
            updated_at: at(),
            cleared_at: None,
            acked_by: None,
            acked_at: None,
            total: Some(4242),
        };
        let m = alarm(&a, "relay-1");
        assert_eq!(m.subject, "[chukei] EMERGENCY SC-541 on C123 (Osaka HQ)");
        for want in [
            "main motor failure",
            "A-000003",
            "4242",
            "alarms ack A-000003",
        ] {
            assert!(m.text.contains(want), "{want}: {}", m.text);
        }
        let json: serde_json::Value = serde_json::from_str(&m.json).unwrap();
        assert_eq!(json["event"], "alarm");
        assert_eq!(json["alarm"]["serial"], "C123");
    }

    #[test]
    fn a_burst_is_one_message_listing_its_alarms() {
        let a = |n: u32, code: &str| AlarmView {
            id: format!("A-{n:06}"),
            serial: "C123".into(),
            site: "Osaka\r\nBcc: x@example.com".into(),
            kind: AlarmKind::Fault,
            code: code.into(),
            detail: "motor".into(),
            status: AlarmStatus::Raised,
            raised_at: at(),
            received_at: at(),
            updated_at: at(),
            cleared_at: None,
            acked_by: None,
            acked_at: None,
            total: None,
        };
        let list: Vec<AlarmView> = (0..10).map(|i| a(i, &format!("SC-{i}"))).collect();
        let m = alarms("C123", &list, 5, "relay-1");
        assert!(
            m.subject
                .starts_with("[chukei] EMERGENCY 15 alarms on C123 (Osaka  Bcc"),
            "{}",
            m.subject
        );
        assert!(
            m.subject.ends_with("SC-7, …") && !m.subject.contains('\n'),
            "{}",
            m.subject
        );
        for want in ["A-000000  SC-0  raised", "A-000009  SC-9", "… and 5 more"] {
            assert!(m.text.contains(want), "{want}: {}", m.text);
        }
        let json: serde_json::Value = serde_json::from_str(&m.json).unwrap();
        assert_eq!(json["event"], "alarm");
        assert_eq!(json["serial"], "C123");
        assert_eq!(json["alarms"].as_array().map(Vec::len), Some(10));
        assert_eq!(json["more"], 5);
    }

    #[test]
    fn a_job_mail_says_ok_or_ng_and_why() {
        let view = JobView {
            id: "J-000007".into(),
            serial: "C1".into(),
            site: String::new(),
            instruction: "GET DATA".into(),
            data_type: "counters".into(),
            server: "relay-1".into(),
            host: "svc".into(),
            instruction_time: None,
            execution_time: None,
            status: JobStatus::Failed,
            submitted_at: at(),
            updated_at: at(),
            reason: Some("paper path blocked".into()),
        };
        let m = job(&view, NotifyEvent::JobFailed, "relay-1");
        assert!(m.subject.contains("ended NG failed"), "{}", m.subject);
        assert!(m.text.contains("paper path blocked"));
        let json: serde_json::Value = serde_json::from_str(&m.json).unwrap();
        assert_eq!(json["event"], "job-failed");
        assert_eq!(json["job"]["id"], "J-000007");
    }
}
