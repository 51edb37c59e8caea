//! Rollouts end to end, with real processes: a relay, simulated fleets and the `host-agent` CLI.
//! A rollout in waves reaches every matching copier and succeeds, each wave filed only after the
//! one before it succeeded; a firmware rollout to copiers set to fail aborts by itself and
//! cancels the jobs of copiers that never took theirs; bad input is refused at create.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use harness::{Host, TestEnv, deadline, poll_until, pseudo_random_bytes};
use serde_json::Value;

/// `rollouts show ID --json`, polled until its status is `status`.
async fn wait_for_rollout(host: &Host, id: &str, status: &str, within: Duration) -> Value {
    let what = format!("rollout {id} {status}");
    rollout_when(host, id, &what, within, |v| v["status"] == status).await
}

/// `rollouts show ID --json`, polled until `done` holds for it: the view that passed.
async fn rollout_when(
    host: &Host,
    id: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    poll_until(what, within, || async {
        let out = host.run(["rollouts", "show", id, "--json"]).await;
        if !out.success() {
            return Err(format!("`rollouts show` failed: {}", out.stderr.trim()));
        }
        let v: Value = serde_json::from_str(&out.stdout)
            .map_err(|e| format!("not JSON ({e}): {}", out.stdout))?;
        if done(&v) {
            Ok(v)
        } else {
            Err(format!("{}: {}", v["status"], v["counts"]))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

#[tokio::test]
async fn a_rollout_in_waves_reaches_every_matching_copier_and_each_wave_waits_for_the_last() {
    let env = TestEnv::new("a_rollout_in_waves_reaches_every_matching_copier");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);
    let _fleet = env.fleet(20).start(&broker).await;
    let listed = host.wait_for_devices(20).await;
    // The simulator draws each copier's model from its serial: roll out to the commonest.
    let mut models: BTreeMap<String, usize> = BTreeMap::new();
    for d in &listed {
        *models
            .entry(d["model"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let (model, n) = models
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(m, n)| (m.clone(), *n))
        .unwrap();
    let target = format!("model={model}");
    let selected = host
        .run_ok(["devices", "list", "--target", &target, "--json"])
        .await;
    let selected: Vec<Value> = serde_json::from_str(&selected).unwrap();
    assert_eq!(
        selected.len(),
        n,
        "devices list --target selects as counted"
    );

    let out = host
        .run_ok([
            "rollouts",
            "create",
            "--name",
            "counters",
            "--kind",
            "get-data",
            "--sections",
            "counters",
            "--target",
            &target,
            "--waves",
            "20%,60%,100%",
        ])
        .await;
    let id = out.trim().to_owned();
    assert!(
        id.starts_with("R-") && !id.contains(char::is_whitespace),
        "{out}"
    );

    let v = wait_for_rollout(&host, &id, "succeeded", deadline()).await;
    assert_eq!(v["devices"], n as u64);
    assert_eq!(v["counts"]["succeeded"], n as u64);
    let jobs: Vec<&str> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j.as_str().unwrap())
        .collect();
    assert_eq!(jobs.len(), n);
    // From the job records: no job of a wave was filed before every job of the wave before it
    // had succeeded (the threshold is 100%).
    let list = host.list_json(true).await;
    let by_id: BTreeMap<&str, &Value> = list
        .iter()
        .map(|j| (j["id"].as_str().unwrap(), j))
        .collect();
    let waves = v["waves"].as_array().unwrap();
    assert_eq!(waves.len(), 3);
    let jobs_of = |w: &Value| -> Vec<&Value> {
        let devices: Vec<&str> = w["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        jobs.iter()
            .map(|j| by_id[j])
            .filter(|j| devices.contains(&j["serial"].as_str().unwrap()))
            .collect()
    };
    for pair in waves.windows(2) {
        let (before, after) = (jobs_of(&pair[0]), jobs_of(&pair[1]));
        let last_success = before.iter().map(|j| time(&j["updated_at"])).max().unwrap();
        let first_filed = after.iter().map(|j| time(&j["submitted_at"])).min();
        if let Some(first_filed) = first_filed {
            assert!(
                first_filed >= last_success,
                "a wave's job was filed at {first_filed}, before the wave before it ended at {last_success}"
            );
        }
    }
    let listed = host.run_ok(["rollouts", "list"]).await;
    assert!(
        listed.contains(&id) && listed.contains("succeeded"),
        "{listed}"
    );
    // --watch on an ended rollout draws its bars once and prints where it ended.
    let watched = host.run_ok(["rollouts", "show", &id, "--watch"]).await;
    assert!(
        watched.contains("Status:    succeeded") && watched.contains("100%"),
        "{watched}"
    );
}

#[tokio::test]
async fn a_firmware_rollout_to_failing_copiers_aborts_and_cancels_undelivered_jobs() {
    let env = TestEnv::new("a_firmware_rollout_to_failing_copiers_aborts");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);
    let keys = host.keys_generate(&env.path("keys")).await;
    let image = env.path("fw.bin");
    std::fs::write(&image, pseudo_random_bytes(4096, 7)).unwrap();
    host.upload(&image, "2.0.0", &keys.secret).await;
    // Five copiers that announce themselves and go away: their jobs are never delivered.
    let mut away = env.fleet(5).prefix("AWAY").start(&broker).await;
    host.wait_for_devices(5).await;
    away.stop().await;
    // Ten that are online and fail every firmware write.
    let _failing = env
        .fleet(10)
        .prefix("FAIL")
        .arg("--publisher-key")
        .arg(&keys.public)
        .arg("--fail-firmware-percent")
        .arg("100")
        .start(&broker)
        .await;
    host.wait_for_devices(15).await;

    let id = host
        .run_ok([
            "rollouts",
            "create",
            "--name",
            "fw2",
            "--kind",
            "firmware",
            "--artifact",
            "2.0.0",
            "--max-attempts",
            "1",
            "--target",
            "serial=*",
            "--abort-failure-rate",
            "20%",
            "--abort-min-finished",
            "3",
        ])
        .await
        .trim()
        .to_owned();
    let v = wait_for_rollout(&host, &id, "aborted", deadline()).await;
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("passed --abort-failure-rate 20%"),
        "{reason}"
    );
    assert_eq!(
        v["counts"]["canceled"], 5,
        "the away copiers' jobs were canceled: {}",
        v["counts"]
    );
    // A failed job says why: the simulator's flash failure.
    let failed = host
        .list_json(true)
        .await
        .into_iter()
        .find(|j| j["status"] == "failed")
        .expect("a failed firmware job");
    let detail = host.show_json(failed["id"].as_str().unwrap()).await;
    assert!(
        detail.to_string().contains("simulated flash failure"),
        "{detail:#}"
    );
    let shown = host.run_ok(["rollouts", "show", &id]).await;
    assert!(
        shown.contains("aborted") && shown.contains("canceled 5"),
        "{shown}"
    );
}

#[tokio::test]
async fn bad_rollouts_are_refused_at_create_with_a_reason_the_user_can_act_on() {
    let env = TestEnv::new("bad_rollouts_are_refused_at_create");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);
    let _fleet = env.fleet(2).start(&broker).await;
    host.wait_for_devices(2).await;
    for (args, want) in [
        (vec!["--kind", "get-data"], "the target is empty"),
        (
            vec!["--kind", "get-data", "--target", "model=NOPE"],
            "select no device",
        ),
        (
            vec![
                "--kind", "get-data", "--target", "serial=*", "--waves", "10%,50%",
            ],
            "must end at 100%",
        ),
        (
            vec![
                "--kind",
                "get-data",
                "--target",
                "serial=*",
                "--success-threshold",
                "150%",
            ],
            "out of range",
        ),
        (
            vec![
                "--kind",
                "get-data",
                "--target",
                "serial=*",
                "--window",
                "daily 02:00-02:00 UTC",
            ],
            "never opens",
        ),
        (
            vec![
                "--kind",
                "firmware",
                "--artifact",
                "9.9.9",
                "--target",
                "serial=*",
            ],
            "9.9.9",
        ),
    ] {
        let mut full = vec!["rollouts", "create", "--name", "bad"];
        full.extend(args);
        let out = host.run(&full).await;
        assert!(!out.success(), "refused\n{out}");
        assert!(out.stderr.contains(want), "wanted {want:?}\n{out}");
    }
    let listed = host.run(["rollouts", "list", "--json"]).await;
    assert_eq!(listed.stdout.trim(), "[]", "nothing was created\n{listed}");
}

#[test]
fn the_rollout_demo_succeeds_in_three_waves_then_aborts_the_failing_model() {
    let out = harness::broker_command(["demo", "--rollout", "--once"]);
    assert!(out.success(), "{out}");
    let text = &out.stdout;
    for want in [
        "50 copiers announced themselves",
        "wave 1 reaches 10%: 3 devices, started at +0.0 s: succeeded 3",
        "wave 2 reaches 50%: 12 devices, started at +",
        "wave 3 reaches 100%: 15 devices, started at +",
        "R-000001 succeeded, wave 3/3: succeeded 30",
        "R-000002 aborted",
        "canceled 5",
        "passed --abort-failure-rate 20%",
    ] {
        assert!(
            text.contains(want),
            "{want:?} missing from the demo's output:\n{text}"
        );
    }
}

/// The jobs `ids` as `jobs list --all --json` has them, by id.
async fn jobs_by_id(host: &Host, ids: &[String]) -> Vec<Value> {
    host.list_json(true)
        .await
        .into_iter()
        .filter(|j| ids.iter().any(|id| j["id"] == id.as_str()))
        .collect()
}

fn job_ids(v: &Value) -> Vec<String> {
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_rate_spaces_jobs_and_a_relay_killed_mid_rollout_files_nothing_twice() {
    let env = TestEnv::new("the_rate_spaces_jobs_and_a_relay_killed_mid_rollout");
    let mut broker = env.broker().start().await;
    let addr = broker.addr();
    let host = env.host("svc", &broker);
    let _fleet = env.fleet(6).start(&broker).await;
    host.wait_for_devices(6).await;
    let id = host
        .run_ok([
            "rollouts",
            "create",
            "--name",
            "paced",
            "--kind",
            "get-data",
            "--target",
            "serial=SIM-*",
            "--rate-per-min",
            "60",
        ])
        .await
        .trim()
        .to_owned();
    // Two jobs filed (one a second), then the relay dies and comes back on the same data.
    rollout_when(&host, &id, "two jobs filed", deadline(), |v| {
        v["jobs"].as_array().map_or(0, Vec::len) >= 2
    })
    .await;
    broker.kill9().await;
    let _broker = env.broker().listen(addr).start().await;
    let v = wait_for_rollout(&host, &id, "succeeded", deadline() * 2).await;
    let ids = job_ids(&v);
    assert_eq!(ids.len(), 6, "one job per device, none filed twice: {v:#}");
    let jobs = jobs_by_id(&host, &ids).await;
    let mut serials: Vec<&str> = jobs.iter().map(|j| j["serial"].as_str().unwrap()).collect();
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 6, "six devices, one job each: {jobs:#?}");
    // 60 a minute: the first at once, then one a second at most, across the restart too.
    let mut filed: Vec<DateTime<Utc>> = jobs.iter().map(|j| time(&j["submitted_at"])).collect();
    filed.sort();
    for pair in filed.windows(2) {
        let gap = (pair[1] - pair[0]).num_milliseconds();
        assert!(
            gap >= 900,
            "two jobs filed {gap} ms apart under --rate-per-min 60: {filed:?}"
        );
    }
}

#[tokio::test]
async fn nothing_is_filed_before_the_window_opens_and_pause_resume_and_dynamic_targets_work() {
    let env = TestEnv::new("nothing_is_filed_before_the_window_opens");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);
    let _fleet = env.fleet(3).start(&broker).await;
    host.wait_for_devices(3).await;
    // A window that opens a few seconds from now and stays open a minute (UTC).
    let opens = Utc::now() + chrono::Duration::seconds(4);
    let closes = opens + chrono::Duration::seconds(60);
    let window = format!(
        "daily {}-{} UTC",
        opens.format("%H:%M:%S"),
        closes.format("%H:%M:%S")
    );
    let id = host
        .run_ok([
            "rollouts",
            "create",
            "--name",
            "tonight",
            "--kind",
            "get-data",
            "--target",
            "serial=*",
            "--window",
            &window,
            "--dynamic",
        ])
        .await
        .trim()
        .to_owned();
    // Paused and resumed before the window opens: still nothing filed.
    let paused = host.run_ok(["rollouts", "pause", &id]).await;
    assert!(paused.contains("paused"), "{paused}");
    let resumed = host.run_ok(["rollouts", "resume", &id]).await;
    assert!(resumed.contains("running"), "{resumed}");
    // Two more copiers appear; the dynamic rollout takes them too.
    let _late = env.fleet(2).prefix("LATE").start(&broker).await;
    let v = rollout_when(&host, &id, "five jobs succeeded", deadline() * 2, |v| {
        v["counts"]["succeeded"] == 5
    })
    .await;
    assert_eq!(v["status"], "running", "a dynamic rollout stays open");
    let jobs = jobs_by_id(&host, &job_ids(&v)).await;
    assert_eq!(jobs.len(), 5);
    for j in &jobs {
        let filed = time(&j["submitted_at"]);
        // Window times are whole seconds; the relay's clock is this machine's.
        assert!(
            filed >= opens - chrono::Duration::milliseconds(opens.timestamp_subsec_millis() as i64),
            "job {} filed at {filed}, before the window opened at {opens}",
            j["id"]
        );
    }
    assert!(
        jobs.iter()
            .any(|j| j["serial"].as_str().unwrap().starts_with("LATE")),
        "{jobs:#?}"
    );
}

#[tokio::test]
async fn a_fleet_on_mixed_firmware_is_selected_by_version() {
    let env = TestEnv::new("a_fleet_on_mixed_firmware_is_selected_by_version");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);
    let _fleet = env
        .fleet(12)
        .arg("--firmware-mix")
        .arg("1.0.0,2.0.0")
        .start(&broker)
        .await;
    let all = host.wait_for_devices(12).await;
    let old = all.iter().filter(|d| d["firmware"] == "1.0.0").count();
    assert!(0 < old && old < 12, "a mix: {all:#?}");
    let out = host
        .run_ok(["devices", "list", "--target", "firmware<2.0.0", "--json"])
        .await;
    let selected: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(selected.len(), old);
    assert!(selected.iter().all(|d| d["firmware"] == "1.0.0"), "{out}");
}
