//! Emergencies, presence, notifications and meter readings in the core, driven through
//! `handle_batch`, `presence_events` and `overdue` against real redb files.

use protocol::alarm::{AlarmReport, AlarmState, AlarmStatus, FaultEvent};
use protocol::meter::CounterReport;
use protocol::presence::{Presence, StateReport, StateView};
use protocol::schedule::{Schedule, SessionMode};

use super::*;
use crate::core::PresenceEvent;
use crate::notify::NotifyConfig;

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
    let core = open(dir);
    let notify: NotifyConfig = toml::from_str(rules).unwrap();
    notify.check().unwrap();
    core.configure_alerts(AlertSettings {
        overdue_margin: Duration::from_secs(60),
        notify,
        ..AlertSettings::default()
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
    assert_eq!(
        queue_len(&core),
        0,
        "its webhook waits for the coalescing window"
    );
    let commits = core.commits();
    core.notify_due(t(9, 1)).unwrap();
    assert_eq!(queue_len(&core), 0);
    assert_eq!(
        core.commits(),
        commits,
        "no window closed, nothing committed"
    );
    core.notify_due(t(9, 1) + chrono::Duration::seconds(5))
        .unwrap();
    assert_eq!(
        queue_len(&core),
        1,
        "the webhook is queued once the window closes"
    );
    assert_eq!(
        core.commits(),
        commits + 1,
        "the digest's commit is counted"
    );

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

    // Cleared: the retained views are deleted; the raise resent afterwards revives nothing.
    let clear = alarm_msg("C1", 4, "SC-541", FaultEvent::Cleared, t(9, 5));
    let out = core.handle_batch(vec![clear], t(9, 5)).unwrap();
    assert_eq!(alarm_state(&out, "C1"), None);
    let out = core.handle_batch(vec![raise()], t(9, 6)).unwrap();
    assert_eq!(acks(&out, "C1")[0].outcome, AckOutcome::Duplicate);
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
    let commits = core.commits();
    let out = core.overdue(t(9, 13)).unwrap();
    assert_eq!(
        core.commits(),
        commits + 1,
        "the overdue alarm's commit is counted"
    );
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

/// A presence commit makes each device's view from the records it has just written rather than
/// reading them back: when a session opened and closed within one commit, the view is the last
/// of them, with the state the device announced, and the same bytes a fresh read publishes.
#[test]
fn a_session_opening_and_closing_within_one_commit_publishes_its_last_presence() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_rules(&dir, "");
    core.presence_events(vec![presence("P1", true)], t(9, 0))
        .unwrap();
    core.handle_batch(vec![periodic_state("P1", 1, 600)], t(9, 0))
        .unwrap();
    core.presence_events(vec![presence("P1", false)], t(9, 1))
        .unwrap();

    let out = core
        .presence_events(vec![presence("P1", true), presence("P1", false)], t(9, 2))
        .unwrap();
    let state_topic = topic::fleet_state(&serial("P1"));
    let views: Vec<&Outbound> = out.iter().filter(|o| o.topic == state_topic).collect();
    assert_eq!(views.len(), 1, "one view per device and commit");
    let view = state_view(&out, "P1");
    assert_eq!(view.presence, Presence::Offline);
    assert_eq!((view.since, view.last_seen), (Some(t(9, 2)), t(9, 2)));
    assert_eq!(
        view.due_by,
        Some(t(9, 13)),
        "closed at 9:02, every 10 min + 1"
    );
    assert_eq!(view.state.site, "Kobe");

    let fresh = core.startup_publications().unwrap();
    let read_back = find(&fresh, &state_topic).expect("the view read from the store");
    assert_eq!(read_back.payload, views[0].payload);
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
    let core = open(&dir);
    core.configure_alerts(AlertSettings {
        overdue_margin: Duration::from_secs(60),
        notify: NotifyConfig::default(),
        ..AlertSettings::default()
    });
    assert_eq!(core.presence_startup().unwrap(), 1);
    assert!(core.overdue(t(9, 1)).unwrap().is_empty());
    let out = core.overdue(t(9, 2)).unwrap();
    assert!(
        alarm_state(&out, "P1").is_some(),
        "last seen 9:00 + 60 s + 60 s"
    );
}

/// In a cluster every node runs the presence startup and the leader runs the overdue check for
/// all of them: a periodic device online at another node is neither given a deadline by a node
/// starting nor raised overdue while its session there lasts.
#[test]
fn a_periodic_device_online_at_another_node_is_not_expected_back_or_overdue() {
    let dir = tempfile::tempdir().unwrap();
    let node = |name: &str| {
        let core = open_node(&dir, name);
        core.configure_alerts(AlertSettings {
            overdue_margin: Duration::from_secs(60),
            notify: NotifyConfig::default(),
            ..AlertSettings::default()
        });
        core
    };
    {
        let n2 = node("N2");
        n2.presence_events(vec![presence("P1", true)], t(9, 0))
            .unwrap();
        n2.handle_batch(vec![periodic_state("P1", 1, 60)], t(9, 0))
            .unwrap();
    }
    let n1 = node("N1");
    assert_eq!(
        n1.presence_startup().unwrap(),
        0,
        "no deadline for a device online at N2"
    );
    assert!(n1.overdue(t(10, 0)).unwrap().is_empty());

    // A deadline left on it anyway (written before this rule) does not raise it either.
    let mut txn = n1.store().begin().unwrap();
    let mut record = txn.presence(&serial("P1")).unwrap().unwrap();
    assert_eq!(record.node.as_deref(), Some("N2"));
    record.due_by = Some(t(9, 2));
    txn.put_presence(&serial("P1"), &record).unwrap();
    txn.commit().unwrap();
    let out = n1.overdue(t(10, 0)).unwrap();
    assert!(
        alarm_state(&out, "P1").is_none(),
        "online at N2, not overdue"
    );
    let txn = n1.store().begin().unwrap();
    assert_eq!(txn.presence(&serial("P1")).unwrap().unwrap().due_by, None);
}

/// A node starting locks only the rows it may write: a device online at another node, whose
/// rows that node's batch holds, does not hold the start up. (PostgreSQL only: two nodes on one
/// store; a redb file has one writer.)
#[test]
fn a_starting_node_leaves_the_rows_of_devices_online_elsewhere_unlocked() {
    if !crate::store::testing::on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = |name: &str| open_node(&dir, name);
    let n1 = node("N1");
    n1.presence_events(vec![presence("P1", true)], t(9, 0))
        .unwrap();
    {
        let n2 = node("N2");
        n2.presence_events(vec![presence("P2", true)], t(9, 0))
            .unwrap();
        n2.handle_batch(vec![periodic_state("P2", 1, 60)], t(9, 0))
            .unwrap();
    }
    // N1 in the middle of a batch for P1: its rows are locked until that batch commits.
    let mut held = n1.store().begin().unwrap();
    held.warm_devices(&["P1"]).unwrap();
    let restarted = node("N2");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(restarted.presence_startup().map(|_| restarted));
    });
    let restarted = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("N2's start waited for N1's batch on a device online at N1")
        .unwrap();
    held.commit().unwrap();
    // It did its work all the same: P2's session at N2 is over (now), and P2 is due back.
    let txn = restarted.store().begin().unwrap();
    let p2 = txn.presence(&serial("P2")).unwrap().unwrap();
    assert_eq!(p2.node, None);
    assert!(p2.due_by.is_some_and(|d| d > chrono::Utc::now()), "{p2:?}");
    let p1 = txn.presence(&serial("P1")).unwrap().unwrap();
    assert_eq!(p1.node.as_deref(), Some("N1"));
}

/// On a store with a second writer, a device's alarm commits beside the batch the core's thread
/// has in hand, not after it; on the same device's rows it waits for that batch's commit, as two
/// nodes do. (PostgreSQL only: a redb file has one writer.)
#[test]
fn an_alarm_commits_beside_the_batch_in_hand_and_waits_only_for_its_own_devices_rows() {
    if !crate::store::testing::on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core = Arc::new(open(&dir));
    assert!(core.store().has_alarm_writer());
    core.handle_batch(vec![state("C2", 1, "Osaka")], t(9, 0))
        .unwrap();
    let lane = |msg: Inbound| {
        let (tx, rx) = std::sync::mpsc::channel();
        let core = core.clone();
        std::thread::spawn(move || {
            let _ = tx.send(core.handle_alarms(vec![msg], t(9, 1)));
        });
        rx
    };
    // The core's thread in the middle of a batch for C2: its rows and the writer are taken.
    let mut held = core.store().begin().unwrap();
    held.warm_devices(&["C2"]).unwrap();
    let out = lane(alarm_msg("C1", 1, "SC-541", FaultEvent::Raised, t(9, 0)))
        .recv_timeout(Duration::from_secs(20))
        .expect("C1's alarm waited for the core's batch for C2")
        .unwrap();
    assert_eq!(acks(&out, "C1")[0].outcome, AckOutcome::Stored);
    assert_eq!(alarm_state(&out, "C1").unwrap().alarms[0].id, "A-000001");

    // C2's alarm needs the rows the batch holds: it commits once the batch has.
    let c2 = lane(alarm_msg("C2", 2, "SC-320", FaultEvent::Raised, t(9, 0)));
    assert!(
        c2.recv_timeout(Duration::from_millis(300)).is_err(),
        "C2's alarm went past the batch holding C2's rows"
    );
    held.commit().unwrap();
    let out = c2
        .recv_timeout(Duration::from_secs(20))
        .expect("C2's alarm commits after the batch")
        .unwrap();
    assert_eq!(acks(&out, "C2")[0].outcome, AckOutcome::Stored);
    assert_eq!(alarm_state(&out, "C2").unwrap().alarms[0].id, "A-000002");
    let codes: Vec<String> = alarms(&core, true).into_iter().map(|a| a.code).collect();
    assert_eq!(codes.len(), 2, "{codes:?}");
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

fn acked_outcomes(out: &[Outbound], s: &str) -> (usize, Vec<String>) {
    let mut stored = 0;
    let mut rejected = Vec::new();
    for a in acks(out, s) {
        match a.outcome {
            AckOutcome::Stored => stored += 1,
            AckOutcome::Rejected { reason } => rejected.push(reason),
            AckOutcome::Duplicate => panic!("no duplicates here"),
        }
    }
    (stored, rejected)
}

fn view_bytes(out: &[Outbound], s: &str) -> usize {
    find(out, &topic::json_fleet_alarm(&serial(s)))
        .map(|o| o.payload.len())
        .unwrap_or(0)
        .max(
            find(out, &topic::fleet_alarm(&serial(s)))
                .map(|o| o.payload.len())
                .unwrap_or(0),
        )
}

#[test]
fn one_device_holds_at_most_its_cap_of_active_alarms_and_its_views_stay_small() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    // The largest site a state message can carry, and the longest detail an alarm keeps.
    let site = "S".repeat(60_000);
    core.handle_batch(vec![state("C1", 1, &site)], t(9, 0))
        .unwrap();
    let start = t(9, 0);
    let mut stored = 0;
    let mut rejected = Vec::new();
    let mut last = Vec::new();
    let mut largest_view = 0;
    for i in 0..100u32 {
        // Ten seconds apart: well within any rate, so only the cap can refuse them.
        let at = start + chrono::Duration::seconds(10 * i64::from(i));
        let mut msg = alarm_msg(
            "C1",
            100 + u64::from(i),
            &format!("SC-{i:03}"),
            FaultEvent::Raised,
            at,
        );
        let mut report: Envelope<AlarmReport> = Envelope::from_cbor(&msg.payload, LIMIT).unwrap();
        report.body.detail = "d".repeat(5_000);
        msg.payload = report.to_cbor().unwrap().into();
        let out = core.handle_batch(vec![msg], at).unwrap();
        let (s, r) = acked_outcomes(&out, "C1");
        stored += s;
        rejected.extend(r);
        largest_view = largest_view.max(view_bytes(&out, "C1"));
        if find(&out, "fleet/C1/alarm").is_some() {
            last = out;
        }
    }
    assert_eq!(stored, 64, "the default cap of active alarms per device");
    assert_eq!(rejected.len(), 36);
    assert!(
        rejected[0].contains("max_active_alarms_per_device") && rejected[0].contains("A-0000"),
        "the reason names the limit and the overflow alarm: {}",
        rejected[0]
    );
    let state = alarm_state(&last, "C1").expect("active alarms");
    assert_eq!(state.alarms.len(), 65, "64 alarms and one overflow alarm");
    let overflow = state
        .alarms
        .iter()
        .find(|a| a.code == "overflow")
        .expect("an overflow alarm");
    assert!(
        overflow.detail.contains("36") && overflow.detail.contains("SC-064"),
        "{}",
        overflow.detail
    );
    for a in &state.alarms {
        assert!(
            a.site.len() <= 128,
            "the site is cut in the view: {}",
            a.site.len()
        );
        assert!(a.detail.len() <= 512);
    }
    assert!(
        largest_view < 128 * 1024,
        "one device's alarm view is bounded, got {largest_view} bytes"
    );
    // `alarms list` answers within what a host accepts.
    let listed = alarms(&core, false);
    assert_eq!(listed.len(), 65);
    assert!(serde_json::to_vec(&listed).unwrap().len() < 128 * 1024);

    // Another device is not affected.
    let other = alarm_msg("C2", 1, "SC-541", FaultEvent::Raised, t(10, 0));
    let out = core.handle_batch(vec![other], t(10, 0)).unwrap();
    assert_eq!(acks(&out, "C2")[0].outcome, AckOutcome::Stored);

    // A refused code the device clears leaves the overflow list; once everything the device
    // raised has cleared, the overflow alarm clears too and the views are deleted.
    let clear = alarm_msg("C1", 500, "SC-064", FaultEvent::Cleared, t(11, 0));
    let out = core.handle_batch(vec![clear], t(11, 0)).unwrap();
    let state = alarm_state(&out, "C1").unwrap();
    let overflow = state.alarms.iter().find(|a| a.code == "overflow").unwrap();
    assert!(!overflow.detail.contains("SC-064"), "{}", overflow.detail);
    let clears: Vec<Inbound> = (0..100u32)
        .map(|i| {
            alarm_msg(
                "C1",
                600 + u64::from(i),
                &format!("SC-{i:03}"),
                FaultEvent::Cleared,
                t(11, 1),
            )
        })
        .collect();
    let out = core.handle_batch(clears, t(11, 1)).unwrap();
    assert_eq!(alarm_state(&out, "C1"), None, "{:?}", alarms(&core, false));
}

#[test]
fn a_burst_of_new_codes_is_rate_limited_and_notified_once_per_device() {
    let dir = tempfile::tempdir().unwrap();
    let core = with_rules(
        &dir,
        "[[rules]]\non = \"alarm\"\nwebhook = \"http://127.0.0.1:9/x\"\n",
    );
    let burst: Vec<Inbound> = (0..300u32)
        .map(|i| {
            alarm_msg(
                "C1",
                1 + u64::from(i),
                &format!("E-{i:03}"),
                FaultEvent::Raised,
                t(9, 0),
            )
        })
        .collect();
    let out = core.handle_batch(burst, t(9, 0)).unwrap();
    let (stored, rejected) = acked_outcomes(&out, "C1");
    assert_eq!(stored, 16, "the default burst of new alarms per device");
    assert_eq!(rejected.len(), 284, "every refused alarm is answered");
    assert!(
        rejected[0].contains("alarms_per_minute_per_device"),
        "{}",
        rejected[0]
    );
    let state = alarm_state(&out, "C1").unwrap();
    assert_eq!(state.alarms.len(), 17, "16 alarms and the overflow alarm");
    // Another device's alarm in the same second is taken at once.
    let other = alarm_msg("C2", 1, "SC-541", FaultEvent::Raised, t(9, 0));
    let out = core.handle_batch(vec![other], t(9, 0)).unwrap();
    assert_eq!(acks(&out, "C2")[0].outcome, AckOutcome::Stored);

    // The burst refills: a minute later the device may raise again.
    let later = alarm_msg("C1", 1000, "E-999", FaultEvent::Raised, t(9, 1));
    let out = core.handle_batch(vec![later], t(9, 1)).unwrap();
    assert_eq!(acks(&out, "C1")[0].outcome, AckOutcome::Stored);

    // One notification per device for the burst, listing its codes, once the window closes.
    core.notify_due(t(9, 2)).unwrap();
    let txn = core.store().begin().unwrap();
    let (queued, _) = txn.due_notifications(t(9, 2), 100).unwrap();
    assert_eq!(
        queued.len(),
        2,
        "one per device: {:#?}",
        queued.iter().map(|(_, q)| &q.subject).collect::<Vec<_>>()
    );
    let c1 = queued
        .iter()
        .find(|(_, q)| q.subject.contains("C1"))
        .expect("C1's notification");
    for code in ["E-000", "E-015", "overflow", "E-999"] {
        assert!(
            c1.1.text.contains(code),
            "{code} missing in:\n{}",
            c1.1.text
        );
    }
    let json: serde_json::Value = serde_json::from_str(&c1.1.json).unwrap();
    assert_eq!(
        json["alarms"].as_array().map(Vec::len),
        Some(18),
        "{json:#}"
    );
}

#[test]
fn a_clear_dated_far_in_the_future_does_not_hide_later_faults() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let far = chrono::Utc.with_ymd_and_hms(9999, 1, 1, 0, 0, 0).unwrap();
    let out = core
        .handle_batch(
            vec![alarm_msg("C1", 1, "SC-541", FaultEvent::Raised, t(9, 0))],
            t(9, 0),
        )
        .unwrap();
    assert!(alarm_state(&out, "C1").is_some());
    // A device whose clock is wrong clears it "in 9999".
    let out = core
        .handle_batch(
            vec![alarm_msg("C1", 2, "SC-541", FaultEvent::Cleared, far)],
            t(9, 1),
        )
        .unwrap();
    assert_eq!(alarm_state(&out, "C1"), None);
    // The fault comes back: it is an alarm again, whatever the device's clock said before.
    let out = core
        .handle_batch(
            vec![alarm_msg("C1", 3, "SC-541", FaultEvent::Raised, t(9, 2))],
            t(9, 2),
        )
        .unwrap();
    assert_eq!(acks(&out, "C1")[0].outcome, AckOutcome::Stored);
    let state = alarm_state(&out, "C1").expect("the fault is shown again");
    assert_eq!(state.alarms[0].received_at, t(9, 2));
    // And a clock stuck in the past does not hide a fault after a correct clear either.
    core.handle_batch(
        vec![alarm_msg("C1", 4, "SC-541", FaultEvent::Cleared, t(9, 3))],
        t(9, 3),
    )
    .unwrap();
    let epoch = chrono::Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap();
    let out = core
        .handle_batch(
            vec![alarm_msg("C1", 5, "SC-541", FaultEvent::Raised, epoch)],
            t(9, 4),
        )
        .unwrap();
    assert!(
        alarm_state(&out, "C1").is_some(),
        "a fault with a 1970 time is still a fault"
    );
    assert_eq!(alarms(&core, false).len(), 1);
}

#[test]
fn a_device_toggling_a_refused_code_gets_its_view_republished_at_most_once_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    core.configure_alerts(AlertSettings {
        alarm_limits: crate::core::AlarmLimits {
            max_active: 2,
            ..Default::default()
        },
        ..AlertSettings::default()
    });
    for (i, code) in ["A", "B", "C"].into_iter().enumerate() {
        let at = t(9, i as u32);
        core.handle_batch(
            vec![alarm_msg("C1", i as u64 + 1, code, FaultEvent::Raised, at)],
            at,
        )
        .unwrap();
    }
    // At the cap, C is refused; clearing and raising it again changes the overflow alarm's list
    // every time. Each message in a batch of its own, all within one second.
    let now = t(10, 0);
    let mut published = 0;
    for i in 0..20u64 {
        let event = if i % 2 == 0 {
            FaultEvent::Cleared
        } else {
            FaultEvent::Raised
        };
        let out = core
            .handle_batch(vec![alarm_msg("C1", 100 + i, "C", event, now)], now)
            .unwrap();
        published += usize::from(find(&out, "fleet/C1/alarm").is_some());
    }
    assert!(
        published <= 1,
        "the view went out {published} times within a second"
    );
    // The last change goes out at the next tick, as the device's alarms now stand.
    assert!(core.alarm_views_due(now).unwrap().is_empty(), "not yet");
    let out = core
        .alarm_views_due(now + chrono::Duration::seconds(1))
        .unwrap();
    let state = alarm_state(&out, "C1").expect("the deferred view");
    let overflow = state.alarms.iter().find(|a| a.code == "overflow").unwrap();
    assert!(overflow.detail.ends_with("Codes: C"), "{}", overflow.detail);
    assert!(
        core.alarm_views_due(now + chrono::Duration::seconds(5))
            .unwrap()
            .is_empty(),
        "sent once"
    );
}

#[test]
fn a_new_fault_right_after_a_paced_clear_is_published_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let now = t(10, 0);
    let batch = |id: u64, code: &str, event: FaultEvent| {
        core.handle_batch(vec![alarm_msg("C1", id, code, event, now)], now)
            .unwrap()
    };
    assert!(alarm_state(&batch(1, "A", FaultEvent::Raised), "C1").is_some());
    // The clear, a moment later in a batch of its own, waits for the tick (view pace)…
    let out = batch(2, "A", FaultEvent::Cleared);
    assert!(find(&out, "fleet/C1/alarm").is_none(), "the clear is paced");
    // …but a new fault is not held behind it: its view goes out now, the clear in it.
    let state = alarm_state(&batch(3, "B", FaultEvent::Raised), "C1").expect("B at once");
    let codes: Vec<&str> = state.alarms.iter().map(|a| a.code.as_str()).collect();
    assert_eq!(codes, ["B"]);
    assert!(
        core.alarm_views_due(now + chrono::Duration::seconds(1))
            .unwrap()
            .is_empty(),
        "nothing is owed: B's view carried the clear"
    );
}

/// What `devices list` says the device's `last_seen` is (read from the store).
fn listed_last_seen(core: &Core, s: &str, now: Timestamp) -> Timestamp {
    let request = host_msg(
        "svc",
        rand::random::<u32>().into(),
        HostRequest::Devices { targets: vec![] },
    );
    let out = core.handle_batch(vec![request], now).unwrap();
    match &replies(&out, "svc")[0].reply {
        HostReply::Devices { devices } => {
            devices
                .iter()
                .find(|d| d.serial == s)
                .expect("the device is listed")
                .last_seen
        }
        other => panic!("not a device list: {other:?}"),
    }
}

#[test]
fn a_chatty_device_moves_its_last_seen_once_a_resolution_and_its_sessions_always() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    assert_eq!(
        core.settings().last_seen_resolution,
        Duration::from_secs(60)
    );
    let at = |secs: i64| t(9, 0) + chrono::Duration::seconds(secs);
    let report = |id: MsgId, secs: i64| {
        let body = CounterReport {
            read_at: at(secs),
            counters: counters(4300 + secs)[&Section::Counters].clone(),
        };
        Inbound {
            topic: topic::dev_up(&serial("C1"), UpKind::Counters),
            payload: Envelope::new(id, at(secs), body).to_cbor().unwrap().into(),
        }
    };
    let out = core
        .presence_events(vec![presence("C1", true)], at(0))
        .unwrap();
    assert_eq!(state_view(&out, "C1").last_seen, at(0));

    // Reports every few seconds: each is stored and acked; last_seen and the state view move
    // only once the stored time is a minute old.
    let mut moved = Vec::new();
    for (id, secs) in [
        (1, 10),
        (2, 20),
        (3, 59),
        (4, 60),
        (5, 70),
        (6, 119),
        (7, 125),
    ] {
        let out = core.handle_batch(vec![report(id, secs)], at(secs)).unwrap();
        assert_eq!(
            acks(&out, "C1")[0].outcome,
            AckOutcome::Stored,
            "report at {secs} s"
        );
        if find(&out, "json/fleet/C1/state").is_some() {
            moved.push(state_view(&out, "C1").last_seen);
        }
        if secs == 70 {
            assert_eq!(
                listed_last_seen(&core, "C1", at(secs)),
                at(60),
                "the store agrees"
            );
        }
    }
    assert_eq!(moved, [at(60), at(125)]);

    // A session closing, or opening, sets it whatever its age.
    let out = core
        .presence_events(vec![presence("C1", false)], at(126))
        .unwrap();
    assert_eq!(state_view(&out, "C1").last_seen, at(126));
    let out = core
        .presence_events(vec![presence("C1", true)], at(127))
        .unwrap();
    assert_eq!(state_view(&out, "C1").last_seen, at(127));
    // A clock set back: the next message moves it at once rather than a minute later.
    let out = core.handle_batch(vec![report(8, 100)], at(100)).unwrap();
    assert_eq!(state_view(&out, "C1").last_seen, at(100));

    // 0: every message moves it (the behaviour before the setting).
    let dir = tempfile::tempdir().unwrap();
    let every = open_with(
        &dir,
        CoreSettings {
            last_seen_resolution: Duration::ZERO,
            ..settings()
        },
    );
    for (id, secs) in [(1, 10), (2, 11)] {
        let out = every
            .handle_batch(vec![report(id, secs)], at(secs))
            .unwrap();
        assert_eq!(state_view(&out, "C1").last_seen, at(secs));
    }
}

/// On PostgreSQL, a batch's reads are named before it is handled and sent together: a device's
/// new alarm reads its seen ids, record and presence, its active alarms with their records, its
/// overflow record and the alarm counter in the trip that begins the transaction; the writes
/// go with the commit. (Without the hints it took eight trips.)
#[test]
fn on_postgres_a_new_alarm_reads_its_device_and_alarm_rows_in_the_trip_that_begins() {
    use std::sync::atomic::Ordering;
    if !crate::store::testing::on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, trips) = crate::store::testing::postgres_store_counting_trips(dir.path());
    let core = Core::with_store(Arc::new(store), settings());
    // Each statement is prepared on the connection the first time it runs: a device of its
    // own raises and clears an alarm first, so the batch counted below prepares nothing.
    for (id, event) in [(1, FaultEvent::Raised), (2, FaultEvent::Cleared)] {
        core.handle_alarms(vec![alarm_msg("W1", id, "SC-541", event, t(9, 0))], t(9, 0))
            .unwrap();
    }
    core.handle_alarms(
        vec![alarm_msg("C1", 1, "SC-100", FaultEvent::Raised, t(9, 0))],
        t(9, 0),
    )
    .unwrap();

    let before = trips.load(Ordering::SeqCst);
    let out = core
        .handle_alarms(
            vec![alarm_msg("C1", 2, "SC-541", FaultEvent::Raised, t(9, 1))],
            t(9, 1),
        )
        .unwrap();
    let taken = trips.load(Ordering::SeqCst) - before;

    assert_eq!(acks(&out, "C1")[0].outcome, AckOutcome::Stored);
    let codes: Vec<String> = alarm_state(&out, "C1")
        .unwrap()
        .alarms
        .into_iter()
        .map(|a| a.code)
        .collect();
    assert_eq!(
        codes,
        ["SC-100", "SC-541"],
        "the view lists the alarm raised before too"
    );
    // BEGIN with every read the batch named, then the writes with COMMIT.
    assert_eq!(taken, 2, "trips the alarm's batch took");
}
