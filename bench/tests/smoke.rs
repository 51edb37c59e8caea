//! Every scenario, tiny, against the real binaries: the harness keeps working. Nothing here says
//! anything about performance and no timing is asserted; the counts are.
//!
//! Needs `cargo build --workspace --bins` first (scripts/test does it): the broker binary is found
//! next to bench's. Mosquitto is included when its Debian package is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn bench() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bench"))
}

fn targets(all_plain: bool) -> String {
    let mut t = vec!["chukei"];
    if all_plain {
        t.extend(["rumqttd-tls", "rumqttd-plain"]);
        if Path::new("/usr/sbin/mosquitto").exists() || Path::new("/usr/bin/mosquitto").exists() {
            t.push("mosquitto");
        } else {
            eprintln!("smoke: mosquitto is not installed; scripts/test installs it");
        }
    }
    t.join(",")
}

/// Runs `bench SCENARIO ARGS…` and returns its JSON object, failing with its stderr.
fn run(scenario: &str, all_plain: bool, args: &[&str]) -> Value {
    let broker = bench().with_file_name("broker");
    assert!(
        broker.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        broker.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bench())
        .arg(scenario)
        .args(args)
        .arg("--targets")
        .arg(targets(all_plain))
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench {scenario} failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("bench {scenario} printed no JSON ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(v["scenario"], scenario);
    for key in [
        "params", "machine", "versions", "results", "goal", "command",
    ] {
        assert!(!v[key].is_null(), "{scenario}: no {key:?} in {v}");
    }
    assert!(v["machine"]["cores"].as_u64().unwrap_or(0) >= 1);
    v
}

fn each_result(v: &Value) -> Vec<(&String, &Value)> {
    let results = v["results"].as_object().expect("results is an object");
    assert!(!results.is_empty());
    results.iter().collect()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

#[test]
fn idle_connections_connects_every_device_on_every_relay() {
    let v = run(
        "idle-connections",
        true,
        &["--devices", "30", "--idle-secs", "1"],
    );
    assert!(v["results"].as_object().unwrap().len() >= 3);
    for (name, r) in each_result(&v) {
        assert_eq!(r["connected"], 30, "{name}: {r}");
        assert!(num(r, "connect_rate_per_s") > 0.0, "{name}");
        assert!(num(r, "rss_after_mib") > 0.0, "{name}");
        assert_eq!(r["connect_latency"]["count"], 30, "{name}");
    }
    assert!(v["ratios"]["rss_per_connection_kib"]["chukei/rumqttd-tls"].is_number());
}

#[test]
fn reconnect_storm_brings_every_device_back() {
    let v = run("reconnect-storm", true, &["--devices", "30"]);
    for (name, r) in each_result(&v) {
        assert!(num(r, "all_back_after_kill_secs") > 0.0, "{name}: {r}");
        assert!(num(r, "reconnect_rate_per_s") > 0.0, "{name}");
        // The two CPU figures' ratio, to compare runs by. Thirty devices may cost either side
        // less than one clock tick (0 s): a relay's 0 is a ratio of 0, the load's none at all.
        let load = num(r, "load_cpu_us_per_reconnect");
        if load > 0.0 {
            let ratio = num(r, "relay_to_load_cpu");
            let by_hand = num(r, "relay_cpu_us_per_reconnect") / load;
            assert!(
                (ratio - by_hand).abs() <= 0.05 * by_hand + 0.001,
                "{name}: {r}"
            );
        } else {
            assert!(r["relay_to_load_cpu"].is_null(), "{name}: {r}");
        }
    }
}

#[test]
fn durable_reports_are_all_acked_and_held_after_a_restart() {
    durable_reports("state");
}

#[test]
fn durable_counters_reports_are_all_acked_and_held_after_a_restart() {
    durable_reports("counters");
}

/// Every report of the kind is acked `stored` (a rejected one fails the check) and after the
/// restart every id comes back `duplicate`.
fn durable_reports(report: &str) {
    let v = run(
        "durable-reports",
        false,
        &[
            "--devices",
            "8",
            "--window",
            "4",
            "--secs",
            "1",
            "--rates",
            "40,80",
            "--report",
            report,
        ],
    );
    assert_eq!(v["params"]["report"], report, "{}", v["params"]);
    let r = &v["results"]["chukei"];
    assert!(num(r, "max_acked_per_s") > 0.0, "{r}");
    let paced = r["paced"].as_array().unwrap();
    assert_eq!(paced.len(), 2);
    assert!(num(&paced[1], "acked_per_s") > 0.0, "{r}");
    let check = &r["store_check"];
    assert_eq!(check["ok"], true, "{check}");
    let sent = check["sent"].as_u64().unwrap();
    assert!(sent > 0);
    assert_eq!(check["held_after_restart"].as_u64(), Some(sent));
    for phase in check["phases"].as_array().unwrap() {
        assert_eq!(phase["missing_after_restart"], 0, "{phase}");
        assert_eq!(phase["rejected"], 0, "{phase}");
    }
}

#[test]
fn alarm_latency_reaches_host_and_integrator() {
    let v = run(
        "alarm-latency",
        false,
        &[
            "--idle",
            "10",
            "--reporters",
            "5",
            "--report-rate",
            "50",
            "--samples",
            "10",
            "--interval-ms",
            "20",
        ],
    );
    let r = &v["results"]["chukei"];
    assert_eq!(r["host_cbor"]["count"], 10, "{r}");
    assert_eq!(r["integrator_json"]["count"], 10, "{r}");
    assert!(num(&r["host_cbor"], "p99_ms") > 0.0);
}

#[test]
fn job_fanout_delivers_and_acks_every_job() {
    let v = run("job-fanout", false, &["--devices", "20"]);
    let r = &v["results"]["chukei"];
    assert_eq!(r["submitted"], 20, "{r}");
    assert_eq!(r["jobs_received"], 20, "{r}");
    assert_eq!(r["jobs_acked"], 20, "{r}");
    assert!(num(r, "all_acked_secs") >= num(r, "all_received_secs"));
}

#[test]
fn rollout_finishes_every_wave_beside_single_jobs() {
    let v = run("rollout", false, &["--devices", "20"]);
    let r = &v["results"]["chukei"];
    for side in ["single_jobs", "rollout"] {
        assert_eq!(r[side]["jobs_acked"], 20, "{side}: {r}");
        assert!(num(&r[side], "all_succeeded_secs") > 0.0, "{side}: {r}");
    }
    assert!(num(&r["rollout"], "rollout_succeeded_secs") > 0.0, "{r}");
    assert!(r["time_ratio"].is_number(), "{r}");
}

#[test]
fn pubsub_throughput_moves_messages_through_every_relay() {
    let v = run(
        "pubsub-throughput",
        true,
        &["--devices", "2", "--window", "5", "--secs", "1"],
    );
    for (name, r) in each_result(&v) {
        assert!(num(r, "msgs_per_s") > 0.0, "{name}: {r}");
        assert!(r["latency"]["count"].as_u64().unwrap_or(0) > 0, "{name}");
    }
    assert!(v["ratios"]["msgs_per_s"]["chukei/rumqttd-tls"].is_number());
}
