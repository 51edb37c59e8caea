//! Rollouts in the core: waves that start when the one before succeeded enough, the abort that
//! cancels what was not delivered, approval, pause and resume, the rate, the window, dynamic
//! targets, refusals at create — each step through the core's real batches and ticks.

use protocol::rollout::{RolloutAction, RolloutSpec, RolloutStatus, RolloutView};

use super::*;

/// `s` announces itself with `model` and `firmware`.
fn announce(s: &str, id: MsgId, model: &str, firmware: &str) -> Inbound {
    let body = DeviceState {
        site: "Osaka North".into(),
        model: model.into(),
        firmware: firmware.into(),
    };
    let payload = Envelope::new(id, t(9, 0), body).to_cbor().unwrap();
    Inbound {
        topic: topic::dev_up(&serial(s), UpKind::State),
        payload: payload.into(),
    }
}

/// Ten devices: C0–C5 are C300s, C6–C9 C250s.
fn fleet(core: &Core) {
    let msgs = (0..10)
        .map(|i| {
            let model = if i < 6 { "C300" } else { "C250" };
            announce(&format!("C{i}"), 1, model, "1.0")
        })
        .collect();
    core.handle_batch(msgs, t(9, 0)).unwrap();
}

fn spec(targets: &[&str], waves: &[&str]) -> RolloutSpec {
    RolloutSpec {
        name: "c300-counters".into(),
        job: SubmitJob {
            kind: "get-data".into(),
            sections: vec!["counters".into()],
            ..Default::default()
        },
        targets: targets.iter().map(|s| s.to_string()).collect(),
        waves: waves.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Sends a host request and returns its one reply.
fn ask(core: &Core, id: MsgId, req: HostRequest, now: Timestamp) -> HostReply {
    let out = core
        .handle_batch(vec![host_msg("svc", id, req)], now)
        .unwrap();
    let mut r = replies(&out, "svc");
    assert_eq!(r.len(), 1, "one reply");
    r.remove(0).reply
}

fn created(reply: HostReply) -> RolloutView {
    match reply {
        HostReply::Rollout { rollout } => *rollout,
        other => panic!("expected a rollout, got {other:?}"),
    }
}

fn refused(reply: HostReply) -> String {
    match reply {
        HostReply::Error { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Creates a rollout at 09:00 and returns it; it must be accepted.
fn create(core: &Core, s: RolloutSpec) -> RolloutView {
    created(ask(
        core,
        1,
        HostRequest::CreateRollout { rollout: s },
        t(9, 0),
    ))
}

fn show(core: &Core, id: &str, now: Timestamp) -> RolloutView {
    created(ask(
        core,
        900,
        HostRequest::ShowRollout { rollout: id.into() },
        now,
    ))
}

fn act(core: &Core, msg: MsgId, id: &str, action: RolloutAction, now: Timestamp) -> HostReply {
    ask(
        core,
        msg,
        HostRequest::ActOnRollout {
            rollout: id.into(),
            action,
        },
        now,
    )
}

/// The serial each filed job of `v` is for, from the job records.
fn jobs_by_serial(core: &Core, v: &RolloutView) -> Vec<(String, String)> {
    v.jobs
        .iter()
        .map(|j| {
            let d = detail(core, j);
            (d.view.serial, j.clone())
        })
        .collect()
}

/// Every device with a job in `v` ends it with `status` (all of them, or those `which` picks);
/// returns what that batch published.
fn finish_jobs(
    core: &Core,
    v: &RolloutView,
    status: JobStatus,
    which: impl Fn(&str) -> bool,
) -> Vec<Outbound> {
    let mut msgs = Vec::new();
    for (s, j) in jobs_by_serial(core, v) {
        if which(&s) && !detail(core, &j).view.status.is_terminal() {
            msgs.push(update(&s, 100 + msgs.len() as u64, &j, status, None));
        }
    }
    core.handle_batch(msgs, t(9, 1)).unwrap()
}

fn count(v: &RolloutView, status: &str) -> u64 {
    v.counts.get(status).copied().unwrap_or(0)
}

#[test]
fn waves_start_when_the_one_before_succeeded_and_the_rollout_ends_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    fleet(&core);
    let v = create(&core, spec(&["model=C300"], &["50%", "100%"]));
    assert_eq!(v.id, "R-000001");
    assert_eq!(v.status, RolloutStatus::Running);
    assert_eq!(v.devices, 6, "the six C300s");
    assert_eq!(v.waves[0].devices, vec!["C0", "C1", "C2"]);
    assert_eq!(v.jobs.len(), 3, "only the first wave is filed");
    assert_eq!(count(&v, "queued"), 3);
    assert_eq!(count(&v, "pending"), 3);

    // A tick before anything finished files nothing more.
    core.rollouts_tick(t(9, 1)).unwrap();
    assert_eq!(show(&core, "R-000001", t(9, 1)).jobs.len(), 3);

    // The batch that ends the first wave's last job files the second wave and sends its orders:
    // no wait for the tick.
    let out = finish_jobs(&core, &v, JobStatus::Succeeded, |_| true);
    let v = show(&core, "R-000001", t(9, 2));
    assert_eq!(v.wave, 1);
    assert_eq!(v.jobs.len(), 6);
    assert_eq!(v.waves[1].counts.get("queued"), Some(&3));
    for (s, j) in jobs_by_serial(&core, &v).into_iter().skip(3) {
        assert!(
            find(&out, &format!("dev/{s}/jobs/{j}")).is_some(),
            "the order for {s} went out with the batch"
        );
    }

    let out = finish_jobs(&core, &v, JobStatus::Succeeded, |_| true);
    let v = show(&core, "R-000001", t(9, 3));
    assert_eq!(v.status, RolloutStatus::Succeeded);
    assert_eq!(count(&v, "succeeded"), 6);
    // The retained JSON view went out with the change.
    let published = find(&out, "json/fleet/rollouts/R-000001").expect("rollout view published");
    let json: RolloutView = serde_json::from_slice(&published.payload).unwrap();
    assert_eq!(json.status, RolloutStatus::Succeeded);
    // The tick after finds nothing to do.
    assert!(
        find(
            &core.rollouts_tick(t(9, 4)).unwrap(),
            "json/fleet/rollouts/R-000001"
        )
        .is_none()
    );
}

#[test]
fn too_many_failures_abort_the_rollout_and_cancel_what_was_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    fleet(&core);
    let mut s = spec(&["model=*"], &["100%"]);
    s.abort_failure_rate = Some("20%".into());
    s.abort_min_finished = Some(2);
    let v = create(&core, s);
    assert_eq!(v.jobs.len(), 10);
    // C2 has its job and is running it; C0 and C1 fail; the rest never took theirs. The batch
    // with the second failure aborts the rollout.
    let running = jobs_by_serial(&core, &v)
        .into_iter()
        .find(|(s, _)| s == "C2")
        .unwrap()
        .1;
    core.handle_batch(
        vec![update("C2", 200, &running, JobStatus::InProgress, None)],
        t(9, 1),
    )
    .unwrap();
    finish_jobs(&core, &v, JobStatus::Failed, |s| s == "C0" || s == "C1");
    let v = show(&core, "R-000001", t(9, 2));
    assert_eq!(v.status, RolloutStatus::Aborted);
    let reason = v.reason.clone().unwrap();
    assert!(reason.contains("failure rate 100.0%"), "{reason}");
    assert_eq!(count(&v, "failed"), 2);
    assert_eq!(count(&v, "canceled"), 7, "undelivered jobs canceled");
    assert_eq!(count(&v, "in-progress"), 1, "a running job finishes");
    assert_eq!(detail(&core, &running).view.status, JobStatus::InProgress);
    // Nothing more is filed for an aborted rollout; the job that was running ends and is counted.
    core.rollouts_tick(t(9, 3)).unwrap();
    assert_eq!(show(&core, "R-000001", t(9, 3)).counts, v.counts);
    core.handle_batch(
        vec![update("C2", 201, &running, JobStatus::Succeeded, None)],
        t(9, 4),
    )
    .unwrap();
    let v = show(&core, "R-000001", t(9, 4));
    assert_eq!(v.status, RolloutStatus::Aborted);
    assert_eq!(count(&v, "succeeded"), 1);
    assert_eq!(count(&v, "in-progress"), 0);
}

#[test]
fn a_wave_below_its_threshold_fails_the_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    fleet(&core);
    let mut s = spec(&["model=C300"], &["50%", "100%"]);
    s.success_threshold = Some("100%".into());
    let v = create(&core, s);
    finish_jobs(&core, &v, JobStatus::Succeeded, |s| s != "C1");
    finish_jobs(&core, &v, JobStatus::Failed, |s| s == "C1");
    core.rollouts_tick(t(9, 2)).unwrap();
    let v = show(&core, "R-000001", t(9, 2));
    assert_eq!(v.status, RolloutStatus::Failed);
    assert!(v.reason.unwrap().contains("2 of 3"));
    assert_eq!(v.jobs.len(), 3, "the second wave never started");
}

#[test]
fn approval_pause_resume_and_abort_by_a_person() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    fleet(&core);
    let mut s = spec(&["model=C300"], &["50%", "100%"]);
    s.approve_each_wave = true;
    let v = create(&core, s);
    finish_jobs(&core, &v, JobStatus::Succeeded, |_| true);
    core.rollouts_tick(t(9, 2)).unwrap();
    let v = show(&core, "R-000001", t(9, 2));
    assert_eq!(v.status, RolloutStatus::WaitingApproval);
    assert_eq!(v.jobs.len(), 3);

    // Paused while waiting; resuming brings it back to waiting, not past the approval.
    let paused = created(act(&core, 2, "R-000001", RolloutAction::Pause, t(9, 3)));
    assert_eq!(paused.status, RolloutStatus::Paused);
    let resumed = created(act(&core, 3, "R-000001", RolloutAction::Resume, t(9, 3)));
    assert_eq!(resumed.status, RolloutStatus::WaitingApproval);
    assert_eq!(resumed.jobs.len(), 3);

    let approved = created(act(&core, 4, "R-000001", RolloutAction::Approve, t(9, 4)));
    assert_eq!(approved.status, RolloutStatus::Running);
    assert_eq!(approved.wave, 1);
    assert_eq!(approved.jobs.len(), 6, "the second wave is filed at once");

    let aborted = created(act(&core, 5, "R-000001", RolloutAction::Abort, t(9, 5)));
    assert_eq!(aborted.status, RolloutStatus::Aborted);
    assert_eq!(aborted.reason.as_deref(), Some("aborted by host svc"));
    assert_eq!(count(&aborted, "canceled"), 3);
    // Repeating the abort answers with the rollout; resuming it is refused.
    assert_eq!(
        created(act(&core, 6, "R-000001", RolloutAction::Abort, t(9, 5))).status,
        RolloutStatus::Aborted
    );
    let e = refused(act(&core, 7, "R-000001", RolloutAction::Resume, t(9, 5)));
    assert!(e.contains("cannot resume R-000001: it is aborted"), "{e}");
}

#[test]
fn the_rate_files_no_more_jobs_per_minute_than_asked() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    fleet(&core);
    let mut s = spec(&["model=*"], &["100%"]);
    s.rate_per_min = Some(60);
    let v = create(&core, s);
    assert_eq!(v.jobs.len(), 1, "one a second: the first at once");
    let second = |s: u32| t(9, 0) + chrono::Duration::seconds(i64::from(s));
    for s in 1..=4 {
        core.rollouts_tick(second(s)).unwrap();
    }
    assert_eq!(show(&core, "R-000001", second(4)).jobs.len(), 5);
    // A pause of a minute does not let a burst through after it.
    core.rollouts_tick(second(64)).unwrap();
    let v = show(&core, "R-000001", second(64));
    assert!((6..=7).contains(&v.jobs.len()), "{} jobs", v.jobs.len());
}

#[test]
fn a_rate_above_one_a_second_files_a_seconds_worth_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    fleet(&core);
    let mut s = spec(&["model=*"], &["100%"]);
    s.rate_per_min = Some(180);
    let v = create(&core, s);
    assert_eq!(v.jobs.len(), 3, "three a second: three at once");
    let second = |s: u32| t(9, 0) + chrono::Duration::seconds(i64::from(s));
    let mut filed = Vec::new();
    for s in 1..=3 {
        core.rollouts_tick(second(s)).unwrap();
        filed.push(show(&core, "R-000001", second(s)).jobs.len());
    }
    assert_eq!(filed, vec![6, 9, 10]);
}

#[test]
fn nothing_is_filed_outside_the_window_and_undelivered_jobs_wait_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    fleet(&core);
    let mut s = spec(&["model=C300"], &["100%"]);
    // t(9, x) is 09:xx UTC: the window opens at 09:10 and closes at 09:20.
    s.window = Some("daily 09:10-09:20 UTC".into());
    let v = create(&core, s);
    assert_eq!(v.status, RolloutStatus::Running);
    assert!(v.jobs.is_empty(), "nothing before the window opens");
    core.rollouts_tick(t(9, 9)).unwrap();
    assert!(show(&core, "R-000001", t(9, 9)).jobs.is_empty());
    core.rollouts_tick(t(9, 10)).unwrap();
    let v = show(&core, "R-000001", t(9, 10));
    assert_eq!(v.jobs.len(), 6);
    // C0 takes its job; the others do not before the window closes.
    let (_, c0_job) = jobs_by_serial(&core, &v)
        .into_iter()
        .find(|(s, _)| s == "C0")
        .unwrap();
    core.handle_batch(
        vec![update("C0", 300, &c0_job, JobStatus::Delivered, None)],
        t(9, 11),
    )
    .unwrap();
    core.rollouts_tick(t(9, 20)).unwrap();
    let v = show(&core, "R-000001", t(9, 20));
    assert_eq!(count(&v, "pending"), 5, "withdrawn until the next window");
    assert_eq!(count(&v, "delivered"), 1);
    assert_eq!(v.jobs.len(), 6, "withdrawn jobs stay listed");
    let withdrawn = v
        .jobs
        .iter()
        .filter(|j| detail(&core, j).view.status == JobStatus::Canceled)
        .count();
    assert_eq!(withdrawn, 5);
    // The next day's window files new jobs for them.
    let next_day = t(9, 10) + chrono::Duration::days(1);
    core.rollouts_tick(next_day).unwrap();
    let v = show(&core, "R-000001", next_day);
    assert_eq!(count(&v, "queued"), 5);
    assert_eq!(v.jobs.len(), 11);
}

#[test]
fn a_dynamic_rollout_takes_devices_that_appear_later() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    fleet(&core);
    let mut s = spec(&["model=C250"], &["100%"]);
    s.dynamic = true;
    let v = create(&core, s);
    assert_eq!(v.devices, 4);
    core.handle_batch(vec![announce("C10", 1, "C250", "1.0")], t(9, 1))
        .unwrap();
    core.rollouts_tick(t(9, 1)).unwrap();
    let v = show(&core, "R-000001", t(9, 1));
    assert_eq!(v.devices, 5);
    assert_eq!(v.jobs.len(), 5);
    assert!(v.waves[0].devices.contains(&"C10".to_string()));
}

#[test]
fn devices_list_by_target_and_tags_select_as_a_rollout_would() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    fleet(&core);
    let listed = |targets: &[&str]| match ask(
        &core,
        50,
        HostRequest::Devices {
            targets: targets.iter().map(|s| s.to_string()).collect(),
        },
        t(9, 0),
    ) {
        HostReply::Devices { devices } => devices.into_iter().map(|d| d.serial).collect(),
        other => panic!("{other:?}"),
    };
    let all: Vec<String> = listed(&[]);
    assert_eq!(all.len(), 10);
    assert_eq!(listed(&["model=C250", "serial=C[67]"]), vec!["C6", "C7"]);
    let tagged = ask(
        &core,
        51,
        HostRequest::TagDevices {
            serials: vec!["C1".into(), "C7".into()],
            add: vec!["night-shift".into()],
            remove: vec![],
        },
        t(9, 0),
    );
    assert!(matches!(tagged, HostReply::Devices { ref devices } if devices.len() == 2));
    assert_eq!(listed(&["tag=night-*"]), vec!["C1", "C7"]);
    let e = refused(ask(
        &core,
        52,
        HostRequest::TagDevices {
            serials: vec!["NOPE".into()],
            add: vec!["x".into()],
            remove: vec![],
        },
        t(9, 0),
    ));
    assert!(e.contains("no device NOPE"), "{e}");
}

#[test]
fn bad_rollouts_are_refused_at_create_with_the_reason_and_use_no_number() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    fleet(&core);
    let firmware = RolloutSpec {
        job: SubmitJob {
            kind: "firmware".into(),
            artifact: Some("9.9.9".into()),
            ..Default::default()
        },
        ..spec(&["model=C300"], &[])
    };
    let cases: Vec<(RolloutSpec, &str)> = vec![
        (spec(&[], &[]), "the target is empty"),
        (spec(&["model=C999"], &[]), "select no device"),
        (spec(&["colour=red"], &[]), "unknown field"),
        (spec(&["model=C300"], &["10%", "50%"]), "must end at 100%"),
        (
            RolloutSpec {
                success_threshold: Some("120%".into()),
                ..spec(&["model=C300"], &[])
            },
            "out of range",
        ),
        (
            RolloutSpec {
                abort_failure_rate: Some("0%".into()),
                ..spec(&["model=C300"], &[])
            },
            "out of range",
        ),
        (
            RolloutSpec {
                window: Some("daily 02:00-02:00 UTC".into()),
                ..spec(&["model=C300"], &[])
            },
            "never opens",
        ),
        (firmware, "9.9.9"),
        (
            RolloutSpec {
                name: " ".into(),
                ..spec(&["model=C300"], &[])
            },
            "name",
        ),
    ];
    for (i, (s, want)) in cases.into_iter().enumerate() {
        let e = refused(ask(
            &core,
            10 + i as u64,
            HostRequest::CreateRollout { rollout: s },
            t(9, 0),
        ));
        assert!(e.contains(want), "case {i}: {e}");
    }
    // The next good one is still R-000001, and a resend of it gets it back.
    let good = || HostRequest::CreateRollout {
        rollout: spec(&["model=C300"], &[]),
    };
    assert_eq!(created(ask(&core, 99, good(), t(9, 0))).id, "R-000001");
    let again = created(ask(&core, 99, good(), t(9, 0)));
    assert_eq!(again.id, "R-000001");
    match ask(&core, 98, HostRequest::Rollouts, t(9, 0)) {
        HostReply::Rollouts { rollouts } => assert_eq!(rollouts.len(), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_rollout_survives_a_reopen_without_filing_twice() {
    let dir = tempfile::tempdir().unwrap();
    {
        let core = open(&dir);
        fleet(&core);
        let v = create(&core, spec(&["model=C300"], &["50%", "100%"]));
        assert_eq!(v.jobs.len(), 3);
    }
    let core = open(&dir);
    core.rollouts_tick(t(9, 1)).unwrap();
    let v = show(&core, "R-000001", t(9, 1));
    assert_eq!(v.jobs.len(), 3, "nothing filed twice after the reopen");
    finish_jobs(&core, &v, JobStatus::Succeeded, |_| true);
    core.rollouts_tick(t(9, 2)).unwrap();
    assert_eq!(show(&core, "R-000001", t(9, 2)).jobs.len(), 6);
}

#[test]
fn an_aborted_and_a_finished_rollout_queue_their_notifications_once() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let notify: crate::notify::NotifyConfig = toml::from_str(
        r#"
        [[rules]]
        on = ["rollout-aborted", "rollout-finished"]
        webhook = "https://ops.example.com/hook"
        "#,
    )
    .unwrap();
    notify.check().unwrap();
    core.configure_alerts(AlertSettings {
        notify,
        ..Default::default()
    });
    fleet(&core);
    let ok = create(&core, spec(&["model=C250"], &[]));
    finish_jobs(&core, &ok, JobStatus::Succeeded, |_| true);
    let mut bad = spec(&["model=C300"], &[]);
    bad.name = "c300-bad".into();
    bad.abort_failure_rate = Some("10%".into());
    let bad = created(ask(
        &core,
        2,
        HostRequest::CreateRollout { rollout: bad },
        t(9, 2),
    ));
    finish_jobs(&core, &bad, JobStatus::Failed, |s| s == "C0");
    core.rollouts_tick(t(9, 5)).unwrap();
    let txn = core.store().begin().unwrap();
    let (queued, _) = txn.due_notifications(t(9, 10), 100).unwrap();
    let events: Vec<(&str, &str)> = queued
        .iter()
        .map(|(_, q)| (q.event.as_str(), q.subject.as_str()))
        .collect();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert!(
        events[0].0 == "rollout-finished"
            && events[0].1.contains("R-000001 (c300-counters) succeeded"),
        "{events:#?}"
    );
    assert!(
        events[1].0 == "rollout-aborted" && events[1].1.contains("R-000002 (c300-bad) aborted"),
        "{events:#?}"
    );
    let body: serde_json::Value = serde_json::from_str(&queued[1].1.json).unwrap();
    assert_eq!(body["event"], "rollout-aborted");
    assert_eq!(body["rollout"]["counts"]["failed"], 1);
}
