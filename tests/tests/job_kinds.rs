//! Every job kind but firmware, end to end: update-data merged at the relay (the seed's
//! Fig. 4) or on the device, refused values, set-schedule changing how often a periodic device
//! checks in, cancel, deadlines and the retention of the job list (Fig. 9).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use harness::{Host, TestEnv, deadline, log_time, secs};
use protocol::{JobId, Role, Serial, topic};
use serde_json::Value;

/// The statuses of a job's timeline, in order.
fn statuses(detail: &Value) -> Vec<String> {
    detail["timeline"]
        .as_array()
        .unwrap_or_else(|| panic!("no timeline array in {detail:#}"))
        .iter()
        .map(|e| e["status"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// Every note of a job's timeline.
fn notes(detail: &Value) -> Vec<String> {
    detail["timeline"]
        .as_array()
        .unwrap_or_else(|| panic!("no timeline array in {detail:#}"))
        .iter()
        .filter_map(|e| e["note"].as_str().map(str::to_owned))
        .collect()
}

/// `data[section][name]` of a job detail or a get-data result.
fn value<'a>(data: &'a Value, section: &str, name: &str) -> &'a Value {
    data.get(section)
        .and_then(|s| s.get(name))
        .unwrap_or_else(|| panic!("no {section}.{name} in {data:#}"))
}

fn rfc3339_in(d: Duration) -> String {
    let at = Utc::now() + chrono::Duration::from_std(d).expect("a small duration");
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `jobs submit --kind update-data --set …` (plus `extra` flags): the job id.
async fn submit_update(host: &Host, serial: &str, sets: &[&str], extra: &[&str]) -> String {
    let mut args = vec!["--serial", serial, "--kind", "update-data"];
    for set in sets {
        args.extend(["--set", set]);
    }
    args.extend_from_slice(extra);
    host.submit(&args).await
}

#[tokio::test]
async fn update_data_is_merged_at_the_relay_or_on_the_device_and_refusals_apply_nothing() {
    let env = TestEnv::new("update_data_merge");
    let broker = env.broker().start().await;
    let mut c1 = env.device("C1").start(&broker).await;
    let host = env.host("svc", &broker);

    let before = host.get_data("C1", "adjustment,call-settings").await;
    let density = value(&before, "adjustment", "density")
        .as_i64()
        .unwrap_or_else(|| panic!("adjustment.density is a number: {before:#}"));
    let toner_save = value(&before, "adjustment", "toner_save")
        .as_bool()
        .unwrap_or_else(|| panic!("adjustment.toner_save is a truth value: {before:#}"));
    let new_density = if density == 7 { 3 } else { 7 };

    // merge=broker (the default): the device sends its current values, the relay merges the
    // host's over them (S213) and returns the merged set, the device applies and verifies it.
    let set_density = format!("adjustment.density={new_density}");
    let set_toner = format!("adjustment.toner_save={}", !toner_save);
    let job = submit_update(&host, "C1", &[&set_density, &set_toner], &[]).await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert_eq!(detail["instruction"], "UPDATE DATA", "{detail:#}");
    let data = &detail["data"];
    assert_eq!(
        value(data, "adjustment", "density"),
        new_density,
        "the applied values are the job's data:\n{detail:#}"
    );
    assert_eq!(
        value(data, "adjustment", "toner_save"),
        !toner_save,
        "{detail:#}"
    );
    assert!(
        notes(&detail)
            .iter()
            .any(|n| n.contains("merged at the relay")),
        "the timeline records the relay's merge:\n{detail:#}"
    );
    assert_eq!(
        broker
            .lines_matching(|l| l.contains("merged at the relay") && l.contains(&job))
            .len(),
        1,
        "the broker merged {job} once"
    );
    assert!(
        !c1.lines_matching(
            |l| l.contains("current values sent for merging at the relay") && l.contains(&job)
        )
        .is_empty(),
        "the device sent its current values for {job}:\n{}",
        c1.log()
    );
    let after = host.get_data("C1", "adjustment").await;
    assert_eq!(
        value(&after, "adjustment", "density"),
        new_density,
        "a later get-data reads the applied value:\n{after:#}"
    );
    assert_eq!(value(&after, "adjustment", "toner_save"), !toner_save);

    // merge=device: the device merges by itself; the relay does not take part.
    let job = submit_update(
        &host,
        "C1",
        &["call-settings.at=22:30"],
        &["--merge", "device"],
    )
    .await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert_eq!(
        value(&detail["data"], "call-settings", "at"),
        "22:30",
        "{detail:#}"
    );
    assert!(
        broker
            .lines_matching(|l| l.contains("merged at the relay") && l.contains(&job))
            .is_empty(),
        "a device-merged job is not merged at the relay"
    );
    assert!(
        !notes(&detail)
            .iter()
            .any(|n| n.contains("merged at the relay")),
        "{detail:#}"
    );
    let after = host.get_data("C1", "call-settings").await;
    assert_eq!(value(&after, "call-settings", "at"), "22:30", "{after:#}");

    // A refused value fails the job with the reason per key, and nothing is applied — not
    // even the valid value sent along with it. Both merges refuse the same way.
    for merge in ["broker", "device"] {
        let job = submit_update(
            &host,
            "C1",
            &[
                "adjustment.density=12",
                "adjustment.toner_save=true",
                "call-settings.at=05:15",
            ],
            &["--merge", merge],
        )
        .await;
        let detail = host.wait_for_status(&job, "failed", deadline()).await;
        let reason = detail["reason"]
            .as_str()
            .unwrap_or_else(|| panic!("a failed job has a reason:\n{detail:#}"));
        assert!(
            reason.contains("adjustment.density") && reason.contains("12 is out of range 1..=9"),
            "the reason names the refused key and why (merge={merge}): {reason:?}"
        );
        assert!(
            !reason.contains("toner_save") && !reason.contains("call-settings.at"),
            "only the refused key is named (merge={merge}): {reason:?}"
        );
        let after = host.get_data("C1", "adjustment,call-settings").await;
        assert_eq!(
            value(&after, "adjustment", "density"),
            new_density,
            "a refused job applies nothing (merge={merge}):\n{after:#}"
        );
        assert_eq!(value(&after, "adjustment", "toner_save"), !toner_save);
        assert_eq!(value(&after, "call-settings", "at"), "22:30");
    }

    // Every job has ended, so the relay has emptied their retained merged sets and orders: a
    // device connecting now is handed only the one job still queued.
    assert!(c1.stop().await.success(), "the agent stops cleanly");
    let probe = host.submit_get_data("C1").await;
    let serial = Serial::parse("C1").expect("a valid serial");
    let probe_topic = topic::dev_job(&serial, &JobId::parse(&probe).expect("a job id"));
    let mut raw = env
        .mqtt(Role::Device, "C1")
        .connect(&broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    raw.subscribe_and_wait(&topic::dev_merged_filter(&serial))
        .await;
    raw.subscribe(&topic::dev_jobs_filter(&serial)).await;
    let seen = raw.publishes_until(&probe_topic, deadline()).await;
    let stale: Vec<&str> = seen
        .iter()
        .filter(|p| p.topic != probe_topic)
        .map(|p| p.topic.as_str())
        .collect();
    assert!(
        stale.is_empty(),
        "retained messages of ended jobs are still there: {stale:?}"
    );
    raw.disconnect().await;
}

/// The times of the broker's "session started" lines for `client_id`.
fn session_starts(broker: &harness::Broker, client_id: &str) -> Vec<DateTime<Utc>> {
    let needle = format!("client_id={client_id} ");
    broker
        .lines_matching(|l| l.contains("session started") && l.contains(&needle))
        .iter()
        .map(|l| log_time(l).unwrap_or_else(|| panic!("a broker line without a time: {l}")))
        .collect()
}

fn mean_gap(times: &[DateTime<Utc>]) -> f64 {
    assert!(times.len() >= 2, "a gap needs two times: {times:?}");
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).num_milliseconds() as f64 / 1000.0)
        .collect();
    gaps.iter().sum::<f64>() / gaps.len() as f64
}

#[tokio::test]
async fn set_schedule_changes_how_often_a_periodic_device_checks_in() {
    let env = TestEnv::new("set_schedule_interval");
    let broker = env.broker().start().await;
    // A short quiet spell, so a check-in is over quickly and the interval dominates the gaps.
    let c1 = env
        .device("C1")
        .config("[session]\ndrain_quiet_ms = 200\n")
        .arg("--session")
        .arg("periodic")
        .arg("--interval-secs")
        .arg("1")
        .start(&broker)
        .await;
    let host = env.host("svc", &broker);

    // Four check-ins at the start-up interval: three gaps.
    let needle = "client_id=C1 ";
    broker
        .wait_for_lines("four sessions of C1", 4, deadline(), |l| {
            l.contains("session started") && l.contains(needle)
        })
        .await;
    let before = session_starts(&broker, "C1");
    let mean_before = mean_gap(&before);

    let job = host
        .submit(&[
            "--serial",
            "C1",
            "--kind",
            "set-schedule",
            "--mode",
            "periodic",
            "--interval-secs",
            "3",
        ])
        .await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    let applied = c1
        .wait_for_line("\"schedule applied\" with interval 3", deadline(), |l| {
            l.contains("schedule applied") && l.contains("interval_secs=3")
        })
        .await;
    let applied_at = log_time(&applied).unwrap_or_else(|| panic!("no time in {applied}"));

    // Three check-ins after the new schedule took effect: two gaps at the new interval.
    let after = loop {
        let all = session_starts(&broker, "C1");
        let after: Vec<_> = all.iter().copied().filter(|t| *t > applied_at).collect();
        if after.len() >= 3 {
            break after;
        }
        // Waits for the next session (each wait under its own deadline).
        broker
            .wait_for_lines("another session of C1", all.len() + 1, deadline(), |l| {
                l.contains("session started") && l.contains(needle)
            })
            .await;
    };
    let mean_after = mean_gap(&after);
    eprintln!(
        "check-in gaps: {mean_before:.2} s at --interval-secs 1 ({} sessions), {mean_after:.2} s after set-schedule --interval-secs 3 ({} sessions)",
        before.len(),
        after.len()
    );
    assert!(
        mean_after >= 1.5 * mean_before,
        "after set-schedule the device checks in every {mean_after:.2} s on average, before every {mean_before:.2} s: the new interval is not in use"
    );
    // The device disconnects between check-ins (it is not merely reconnecting more slowly).
    assert!(
        !c1.lines_matching(|l| l.contains("check-in drained; disconnecting"))
            .is_empty(),
        "{}",
        c1.log()
    );
}

#[tokio::test]
async fn cancel_withdraws_waiting_jobs_and_refuses_ended_ones() {
    let env = TestEnv::new("cancel");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);

    // A job queued for a device that is not running: canceled before the device ever sees it.
    let queued = host.submit_get_data("C2").await;
    let out = host.cancel(&queued).await;
    assert!(out.success(), "canceling a queued job succeeds\n{out}");
    assert_eq!(out.stdout.trim(), format!("canceled {queued}"), "{out}");
    let detail = host.show_json(&queued).await;
    assert_eq!(detail["status"], "canceled", "{detail:#}");

    let c2 = env.device("C2").start(&broker).await;
    // A job submitted after it runs; by then the canceled one would have run too.
    let later = host.submit_get_data("C2").await;
    host.wait_for_status(&later, "succeeded", deadline()).await;
    assert!(
        c2.lines_matching(|l| l.contains(&queued)).is_empty(),
        "the device saw the canceled job {queued}:\n{}",
        c2.log()
    );
    assert_eq!(host.show_json(&queued).await["status"], "canceled");

    // A job the device holds, waiting for its instruction time: withdrawn, never run.
    let waiting = host
        .submit(&[
            "--serial",
            "C2",
            "--kind",
            "get-data",
            "--at",
            &rfc3339_in(Duration::from_secs(3600)),
        ])
        .await;
    host.wait_for_status(&waiting, "delivered", deadline())
        .await;
    let out = host.cancel(&waiting).await;
    assert!(out.success(), "canceling a delivered job succeeds\n{out}");
    c2.wait_for_line(
        "\"job dropped: order withdrawn\" for the waiting job",
        deadline(),
        |l| l.contains("job dropped: order withdrawn") && l.contains(&waiting),
    )
    .await;
    let detail = host.show_json(&waiting).await;
    assert_eq!(detail["status"], "canceled", "{detail:#}");
    assert!(
        !statuses(&detail).iter().any(|s| s == "in-progress"),
        "{detail:#}"
    );
    assert!(
        c2.lines_matching(|l| l.contains("job started") && l.contains(&waiting))
            .is_empty(),
        "{}",
        c2.log()
    );

    // Ended jobs have nothing to cancel: refused, exit 1, and the reason says why.
    let out = host.cancel(&later).await;
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains(&later)
            && out.stderr.contains("already ended (succeeded)")
            && out.stderr.contains("nothing to cancel"),
        "the refusal names the job and its end\n{out}"
    );
    assert_eq!(host.show_json(&later).await["status"], "succeeded");
    let out = host.cancel(&queued).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "canceling twice is refused\n{out}"
    );
    assert!(out.stderr.contains("already ended (canceled)"), "{out}");
    let out = host.cancel("J-999999").await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unknown job is refused\n{out}"
    );
    assert!(out.stderr.contains("J-999999"), "{out}");
}

#[tokio::test]
async fn deadline_times_out_and_retention_hides_old_successes_but_keeps_failures() {
    let env = TestEnv::new("deadline_retention");
    let broker = env
        .broker()
        .args(["--finished-visible-secs", "1"])
        .start()
        .await;
    let host = env.host("svc", &broker);

    // C9 never connects: its job's deadline passes.
    let doomed = host
        .submit(&[
            "--serial",
            "C9",
            "--kind",
            "get-data",
            "--deadline",
            &rfc3339_in(Duration::from_secs(2)),
        ])
        .await;

    let _c1 = env.device("C1").start(&broker).await;
    let ok = host.submit_get_data("C1").await;
    host.wait_for_status(&ok, "succeeded", deadline()).await;
    let failed = submit_update(&host, "C1", &["adjustment.density=12"], &[]).await;
    host.wait_for_status(&failed, "failed", deadline()).await;

    let detail = host
        .wait_for_status(&doomed, "timed-out", deadline() + secs(2))
        .await;
    assert_eq!(
        statuses(&detail).last().map(String::as_str),
        Some("timed-out"),
        "{detail:#}"
    );

    // The default list drops the success after a second; --all keeps it; failures stay.
    let ids = |jobs: &[Value]| -> Vec<String> {
        jobs.iter()
            .filter_map(|j| j["id"].as_str().map(str::to_owned))
            .collect()
    };
    harness::poll_until(
        "the succeeded job leaving the default list",
        deadline(),
        || async {
            let listed = ids(&host.list_json(false).await);
            if listed.contains(&ok) {
                Err(format!("still listed: {listed:?}"))
            } else {
                Ok(())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let listed = ids(&host.list_json(false).await);
    assert!(
        listed.contains(&failed),
        "a failed job stays in the default list: {listed:?}"
    );
    let all = ids(&host.list_json(true).await);
    for job in [&ok, &failed, &doomed] {
        assert!(all.contains(job), "`jobs list --all` shows {job}: {all:?}");
    }
}
