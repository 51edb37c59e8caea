//! Emergencies, presence, notifications and meter readings in the core (issue 4), driven through
//! `handle_batch`, `presence_events` and `overdue` against real redb files.

use protocol::alarm::{AlarmReport, AlarmState, AlarmStatus, FaultEvent};
use protocol::meter::CounterReport;
use protocol::presence::{Presence, StateReport, StateView};
use protocol::schedule::{Schedule, SessionMode};

use super::*;
use crate::notify::NotifyConfig;
use crate::presence::PresenceEvent;

fn alarm_msg(s: &str, id: MsgId, code: &str, event: FaultEvent, at: Timestamp) -> Inbound {
    let body = AlarmReport {
        code: code.into(),
        event,
        detail: "main motor failure".into(),
        at,
        total: Some(1234),
    };
    let payload = Envelope::new(id, at, body).to_cbor().unwrap();
    Inbound {
        topic: topic::dev_up(&serial(s), UpKind::Alarm),
        payload: payload.into(),
    }
}

fn alarm_state(out: &[Outbound], s: &str) -> Option<AlarmState> {
    let cbor = find(out, &topic::fleet_alarm(&serial(s)))?;
    let json = find(out, &topic::json_fleet_alarm(&serial(s))).expect("a JSON mirror too");
    assert!(cbor.retain && json.retain, "alarm views are retained");
    if cbor.payload.is_empty() {
        assert!(json.payload.is_empty(), "both deleted together");
        return None;
    }
    let state = Envelope::<AlarmState>::from_cbor(&cbor.payload, usize::MAX)
        .unwrap()
        .body;
    let mirrored: AlarmState = serde_json::from_slice(&json.payload).unwrap();
    assert_eq!(mirrored, state);
    Some(state)
}

fn alarms(core: &Core, all: bool) -> Vec<protocol::alarm::AlarmView> {
    let out = core
        .handle_batch(
            vec![host_msg(
                "svc",
                rand::random::<u32>().into(),
                HostRequest::Alarms { all, serial: None },
            )],
            t(12, 0),
        )
        .unwrap();
    match replies(&out, "svc").remove(0).reply {
        HostReply::Alarms { alarms } => alarms,
        other => panic!("not alarms: {other:?}"),
    }
}

fn with_rules(dir: &tempfile::TempDir, rules: &str) -> Core {
    let mut core = open(dir);
    let notify: NotifyConfig = toml::from_str(rules).unwrap();
    notify.check().unwrap();
    core.configure_alerts(AlertSettings {
        overdue_margin: Duration::from_secs(60),
        notify,
    });
    core
}

fn queue_len(core: &Core) -> u64 {
    let txn = core.store().begin().unwrap();
    txn.notification_count().unwrap()
}

#[test]
fn a_fatal_alarm_is_stored_once_retained_progressed_and_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_rules(
        &dir,
        "[[rules]]\non = \"alarm\"\nwebhook = \"http://127.0.0.1:9/x\"\n",
    );
    let raise = || alarm_msg("C1", 1, "SC-541", FaultEvent::Raised, t(9, 0));
    let out = core.handle_batch(vec![raise()], t(9, 1)).unwrap();
    assert_eq!(acks(&out, "C1")[0].outcome, AckOutcome::Stored);
    let state = alarm_state(&out, "C1").expect("an active alarm");
    assert_eq!(state.alarms.len(), 1);
    let a = &state.alarms[0];
    assert_eq!((a.id.as_str(), a.code.as_str()), ("A-000001", "SC-541"));
    assert_eq!((a.status, a.total), (AlarmStatus::Raised, Some(1234)));
    assert_eq!((a.raised_at, a.received_at), (t(9, 0), t(9, 1)));
    assert_eq!(queue_len(&core), 1, "the webhook is queued with the alarm");

    // A resend is a duplicate; a new report of the same active code is the same emergency.
    let out = core.handle_batch(vec![raise()], t(9, 2)).unwrap();
    assert_eq!(acks(&out, "C1")[0].outcome, AckOutcome::Duplicate);
    let again = alarm_msg("C1", 2, "SC-541", FaultEvent::Raised, t(9, 2));
    let out = core.handle_batch(vec![again], t(9, 2)).unwrap();
    assert_eq!(acks(&out, "C1")[0].outcome, AckOutcome::Stored);
    assert_eq!(alarms(&core, true).len(), 1);
    assert_eq!(queue_len(&core), 1, "no second notification");

    // S309: in progress.
    let progress = alarm_msg("C1", 3, "SC-541", FaultEvent::InProgress, t(9, 3));
    let out = core.handle_batch(vec![progress], t(9, 3)).unwrap();
    let state = alarm_state(&out, "C1").unwrap();
    assert_eq!(state.alarms[0].status, AlarmStatus::InProgress);

    // Cleared: the retained views are deleted; a raise older than the clear revives nothing.
    let clear = alarm_msg("C1", 4, "SC-541", FaultEvent::Cleared, t(9, 5));
    let out = core.handle_batch(vec![clear], t(9, 5)).unwrap();
    assert_eq!(alarm_state(&out, "C1"), None);
    let stale = alarm_msg("C1", 5, "SC-541", FaultEvent::Raised, t(9, 4));
    let out = core.handle_batch(vec![stale], t(9, 6)).unwrap();
    assert_eq!(acks(&out, "C1")[0].outcome, AckOutcome::Stored);
    assert!(find(&out, "fleet/C1/alarm").is_none(), "nothing changed");
    assert!(alarms(&core, false).is_empty());
    let all = alarms(&core, true);
    assert_eq!(all[0].status, AlarmStatus::Cleared);
    assert_eq!(all[0].cleared_at, Some(t(9, 5)));

    // A new fault after the clear is a new alarm.
    let later = alarm_msg("C1", 6, "SC-541", FaultEvent::Raised, t(10, 0));
    let out = core.handle_batch(vec![later], t(10, 0)).unwrap();
    assert_eq!(alarm_state(&out, "C1").unwrap().alarms[0].id, "A-000002");
}

#[test]
fn bad_alarm_reports_are_rejected_and_active_alarms_are_republished_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    {
        let core = open(&dir);
        let bad = alarm_msg("C1", 1, "SC 541", FaultEvent::Raised, t(9, 0));
        let out = core.handle_batch(vec![bad], t(9, 0)).unwrap();
        assert!(matches!(
            acks(&out, "C1")[0].outcome,
            AckOutcome::Rejected { .. }
        ));
        let good = alarm_msg("C2", 1, "SC-321", FaultEvent::Raised, t(9, 0));
        core.handle_batch(vec![good], t(9, 0)).unwrap();
    }
    let core = open(&dir);
    let out = core.startup_publications().unwrap();
    let state = alarm_state(&out, "C2").expect("republished from redb");
    assert_eq!(state.alarms[0].code, "SC-321");
    assert!(find(&out, "fleet/C1/alarm").is_none());

    // A host acknowledges it; the view is republished with who did.
    let ack = host_msg(
        "svc",
        7,
        HostRequest::AckAlarm {
            id: "A-000001".into(),
        },
    );
    let out = core.handle_batch(vec![ack], t(9, 1)).unwrap();
    match &replies(&out, "svc")[0].reply {
        HostReply::Alarm { alarm } => assert_eq!(alarm.acked_by.as_deref(), Some("svc")),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        alarm_state(&out, "C2").unwrap().alarms[0].acked_at,
        Some(t(9, 1))
    );
    let unknown = host_msg(
        "svc",
        8,
        HostRequest::AckAlarm {
            id: "A-000042".into(),
        },
    );
    let out = core.handle_batch(vec![unknown], t(9, 1)).unwrap();
    assert!(matches!(
        replies(&out, "svc")[0].reply,
        HostReply::Error { .. }
    ));
}

fn state_view(out: &[Outbound], s: &str) -> StateView {
    let o = find(out, &topic::fleet_state(&serial(s))).expect("a state view");
    Envelope::<StateView>::from_cbor(&o.payload, usize::MAX)
        .unwrap()
        .body
}

fn periodic_state(s: &str, id: MsgId, every: u64) -> Inbound {
    let body = StateReport {
        state: DeviceState {
            site: "Kobe".into(),
            model: "MX-1".into(),
            firmware: "1.0".into(),
        },
        schedule: Some(Schedule {
            mode: SessionMode::Periodic,
            interval_secs: Some(every),
            ..Schedule::default()
        }),
    };
    let payload = Envelope::new(id, t(9, 0), body).to_cbor().unwrap();
    Inbound {
        topic: topic::dev_up(&serial(s), UpKind::State),
        payload: payload.into(),
    }
}

fn presence(s: &str, online: bool) -> PresenceEvent {
    PresenceEvent {
        serial: serial(s),
        online,
    }
}

#[test]
fn presence_follows_sessions_and_a_late_periodic_device_is_overdue_until_it_checks_in() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_rules(
        &dir,
        "[[rules]]\non = \"overdue\"\nwebhook = \"http://127.0.0.1:9/x\"\n",
    );
    let out = core
        .presence_events(vec![presence("P1", true)], t(9, 0))
        .unwrap();
    assert_eq!(state_view(&out, "P1").presence, Presence::Online);
    core.handle_batch(vec![periodic_state("P1", 1, 600)], t(9, 0))
        .unwrap();
    // A second session opening and the first closing (a reconnect) keep it online.
    let out = core
        .presence_events(vec![presence("P1", true), presence("P1", false)], t(9, 1))
        .unwrap();
    assert!(out.is_empty(), "no change to show");
    let out = core
        .presence_events(vec![presence("P1", false)], t(9, 2))
        .unwrap();
    let view = state_view(&out, "P1");
    assert_eq!(view.presence, Presence::Offline);
    assert_eq!(
        (view.mode, view.interval_secs),
        (Some(SessionMode::Periodic), Some(600))
    );
    // Due: closed at 9:02, every 10 minutes, 1 minute of margin.
    assert_eq!(view.due_by, Some(t(9, 13)));

    assert!(core.overdue(t(9, 12)).unwrap().is_empty(), "not yet");
    let out = core.overdue(t(9, 13)).unwrap();
    assert_eq!(state_view(&out, "P1").presence, Presence::Overdue);
    let a = &alarm_state(&out, "P1").unwrap().alarms[0];
    assert_eq!((a.code.as_str(), a.raised_at), ("overdue", t(9, 13)));
    assert!(a.detail.contains("every 600 s"), "{}", a.detail);
    assert_eq!(queue_len(&core), 1, "the overdue webhook is queued");
    assert!(core.overdue(t(9, 30)).unwrap().is_empty(), "raised once");

    let out = core
        .presence_events(vec![presence("P1", true)], t(9, 31))
        .unwrap();
    assert_eq!(state_view(&out, "P1").presence, Presence::Online);
    assert_eq!(alarm_state(&out, "P1"), None, "the overdue alarm clears");

    // A persistent device is shown offline, never overdue.
    core.presence_events(vec![presence("C1", true)], t(9, 0))
        .unwrap();
    core.handle_batch(vec![state("C1", 1, "Osaka")], t(9, 0))
        .unwrap();
    let out = core
        .presence_events(vec![presence("C1", false)], t(9, 1))
        .unwrap();
    assert_eq!(state_view(&out, "C1").due_by, None);
    assert!(core.overdue(t(23, 0)).unwrap().is_empty());
}

#[test]
fn a_periodic_device_connected_at_shutdown_is_expected_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let core = open(&dir);
        core.presence_events(vec![presence("P1", true)], t(9, 0))
            .unwrap();
        core.handle_batch(vec![periodic_state("P1", 1, 60)], t(9, 0))
            .unwrap();
    }
    let mut core = open(&dir);
    core.configure_alerts(AlertSettings {
        overdue_margin: Duration::from_secs(60),
        notify: NotifyConfig::default(),
    });
    assert_eq!(core.presence_startup().unwrap(), 1);
    assert!(core.overdue(t(9, 1)).unwrap().is_empty());
    let out = core.overdue(t(9, 2)).unwrap();
    assert!(
        alarm_state(&out, "P1").is_some(),
        "last seen 9:00 + 60 s + 60 s"
    );
}

#[test]
fn job_ends_queue_their_notices_and_counters_become_readings() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_rules(
        &dir,
        "[[rules]]\non = [\"job-succeeded\", \"job-failed\"]\nwebhook = \"http://127.0.0.1:9/x\"\n",
    );
    let out = core
        .handle_batch(vec![submit("svc", 1, get_data("C1"))], t(9, 0))
        .unwrap();
    let j = submitted_job(&out, "svc");
    core.handle_batch(
        vec![update(
            "C1",
            1,
            &j,
            JobStatus::Succeeded,
            Some(counters(4242)),
        )],
        t(9, 1),
    )
    .unwrap();
    assert_eq!(queue_len(&core), 1, "the end notice");

    let report = CounterReport {
        read_at: t(9, 2),
        counters: counters(4300)[&Section::Counters].clone(),
    };
    let payload = Envelope::new(2, t(9, 2), report).to_cbor().unwrap();
    let out = core
        .handle_batch(
            vec![Inbound {
                topic: topic::dev_up(&serial("C1"), UpKind::Counters),
                payload: payload.into(),
            }],
            t(9, 2),
        )
        .unwrap();
    assert_eq!(acks(&out, "C1")[0].outcome, AckOutcome::Stored);

    let export = |after: Option<String>, from: &str| {
        host_msg(
            "svc",
            rand::random::<u32>().into(),
            HostRequest::ExportCounters {
                from: from.into(),
                to: "2026-11-27T00:00:00Z".into(),
                after,
                serial: None,
            },
        )
    };
    let out = core
        .handle_batch(vec![export(None, "2026-11-26T00:00:00Z")], t(10, 0))
        .unwrap();
    let HostReply::Counters { readings, next } = replies(&out, "svc").remove(0).reply else {
        panic!("not counters")
    };
    assert_eq!(next, None);
    let sources: Vec<_> = readings.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(sources, [format!("job {j}").as_str(), "report"]);
    assert_eq!(readings[0].counters["total"], Value::Int(4242));
    assert_eq!(readings[1].read_at, t(9, 2));

    let out = core
        .handle_batch(vec![export(None, "not a time")], t(10, 0))
        .unwrap();
    assert!(matches!(
        replies(&out, "svc")[0].reply,
        HostReply::Error { .. }
    ));
    let out = core
        .handle_batch(
            vec![export(Some("x".into()), "2026-11-26T00:00:00Z")],
            t(10, 0),
        )
        .unwrap();
    assert!(matches!(
        replies(&out, "svc")[0].reply,
        HostReply::Error { .. }
    ));
}
