//! Running a relay as an operator does: the health endpoints a load balancer polls, systemd's
//! notify protocol (a real datagram socket, as systemd would hold), logs as JSON for a log
//! shipper, and the unit files in deploy/systemd checked by `systemd-analyze verify`.

use std::path::{Path, PathBuf};

use harness::{TestEnv, bin, deadline, raw};
use serde_json::Value;
use tokio::net::UnixDatagram;

/// `GET path` on the broker's metrics listener: status and body as JSON.
async fn get_json(broker: &harness::Broker, path: &str) -> (u16, Value) {
    let (status, body) = raw::http_get(broker.metrics_addr(), path).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| {
        panic!("{path} answered {status} with a body that is not JSON ({e}): {body}")
    });
    (status, json)
}

#[tokio::test]
async fn a_started_relay_is_healthy_and_ready() {
    let env = TestEnv::new("a_started_relay_is_healthy_and_ready");
    let broker = env
        .broker()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start()
        .await;
    let (status, body) = get_json(&broker, "/healthz").await;
    assert_eq!(
        (status, &body["healthy"]),
        (200, &Value::Bool(true)),
        "{body}"
    );
    let (status, body) = get_json(&broker, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, serde_json::json!({ "ready": true }));
}

#[tokio::test]
async fn over_the_disk_reserve_the_relay_is_alive_but_not_ready() {
    let env = TestEnv::new("over_the_disk_reserve_the_relay_is_alive_but_not_ready");
    // A reserve no disk has: every commit would be refused.
    let broker = env
        .broker()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--min-free-bytes", &u64::MAX.to_string()])
        .start()
        .await;
    let (status, body) = get_json(&broker, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("min_free_bytes") && reason.contains("disk reserve"),
        "the reason names the reserve: {body}"
    );
    let (status, body) = get_json(&broker, "/healthz").await;
    assert_eq!(status, 200, "the process still serves: {body}");
}

/// Every datagram on `socket` until `pred` holds for the text received so far.
async fn receive_until(socket: &UnixDatagram, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let mut seen = String::new();
    let mut buf = vec![0u8; 4096];
    let wait = async {
        while !pred(&seen) {
            let n = socket
                .recv(&mut buf)
                .await
                .unwrap_or_else(|e| panic!("reading the notify socket: {e}"));
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    };
    if tokio::time::timeout(deadline(), wait).await.is_err() {
        panic!("no {what} on the notify socket; received:\n{seen}");
    }
    seen
}

#[tokio::test]
async fn systemd_hears_ready_watchdog_pings_and_stopping() {
    let env = TestEnv::new("systemd_hears_ready_watchdog_pings_and_stopping");
    let path = env.path("notify.sock");
    let socket =
        UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
    // A job for a device that is offline: its order is retained, and republished at start.
    let mut first = env.broker().start().await;
    env.host("svc", &first).submit_get_data("D9").await;
    assert!(first.stop().await.success());

    let mut broker = env
        .broker()
        .arg("--systemd-notify")
        .env("NOTIFY_SOCKET", &path)
        // As systemd sets it for WatchdogSec=0.4: pings every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .start()
        .await;
    let seen = receive_until(&socket, "READY=1", |s| s.contains("READY=1")).await;
    let status = seen
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("a STATUS line with READY=1: {seen}"));
    assert!(
        status.contains("accepting clients") && !status.contains("; 0 retained"),
        "ready only after the retained order was republished: {status}"
    );
    let seen = receive_until(&socket, "two watchdog pings", |s| {
        s.matches("WATCHDOG=1").count() >= 2
    })
    .await;
    assert!(!seen.contains("READY=1"), "READY=1 once: {seen}");
    assert!(broker.stop().await.success());
    receive_until(&socket, "STOPPING=1", |s| s.contains("STOPPING=1")).await;
}

/// The lines of a process's log it wrote itself (not the harness's own).
fn own_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| !l.starts_with("[harness]"))
        .collect()
}

/// Each line one JSON object with the fields every log line has; returns them.
fn json_lines(name: &str, log: &str) -> Vec<Value> {
    let lines = own_lines(log);
    assert!(!lines.is_empty(), "{name} logged nothing");
    lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{name}: a log line that is not JSON ({e}): {l}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(v.get(key).is_some(), "{name}: no {key:?} in {l}");
            }
            v
        })
        .collect()
}

#[tokio::test]
async fn logs_are_one_json_object_per_line_when_asked() {
    let env = TestEnv::new("logs_are_one_json_object_per_line_when_asked");
    let broker = env.broker().args(["--log-format", "json"]).start().await;
    broker.wait_for_log("broker ready", deadline()).await;
    // The device agent reads it from its config file.
    let device = env
        .device("C1")
        .config("log_format = \"json\"\n")
        .start(&broker)
        .await;

    let lines = json_lines("broker", &broker.log());
    let ready = lines
        .iter()
        .find(|v| v["message"] == "broker ready")
        .unwrap_or_else(|| panic!("no \"broker ready\" line: {lines:?}"));
    // The text line's fields, each its own key.
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["addr"], broker.addr().to_string(), "{ready}");
    assert!(ready["republished"].is_u64(), "{ready}");
    assert!(ready["data_dir"].is_string(), "{ready}");
    json_lines("device-agent", &device.log());
}

/// deploy/systemd/NAME with its binaries' paths pointed at the ones this test suite built.
fn unit_with_built_binaries(dir: &Path, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/systemd")
        .join(name);
    let text =
        std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
    let mut text = text;
    for b in ["broker", "device-agent"] {
        text = text.replace(
            &format!("/usr/local/bin/{b} "),
            &format!("{} ", bin(b).display()),
        );
    }
    let out = dir.join(name);
    std::fs::write(&out, text).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    out
}

#[tokio::test]
async fn the_unit_files_pass_systemd_analyze_verify_and_their_flags_exist() {
    let env = TestEnv::new("the_unit_files_pass_systemd_analyze_verify");
    let units = [
        "chukei-broker.service",
        "chukei-device-agent.service",
        "chukei-child-relay.service",
    ];
    let dir = env.path("units");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let paths: Vec<PathBuf> = units
        .iter()
        .map(|u| unit_with_built_binaries(&dir, u))
        .collect();

    // Each ExecStart= is a command line the binary accepts (its --help parses every flag).
    for path in &paths {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{e}"));
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("no ExecStart= in {}", path.display()));
        let mut words = line.split_whitespace();
        let program = words.next().unwrap_or_default();
        let words: Vec<&str> = words.collect();
        // `broker supervise … -- FLAGS`: its own flags, and FLAGS as `broker run` takes them.
        let checks = match words.iter().position(|w| *w == "--") {
            Some(at) => vec![
                words[..at].to_vec(),
                [&["run"][..], &words[at + 1..]].concat(),
            ],
            None => vec![words],
        };
        for args in checks {
            let out = tokio::process::Command::new(program)
                .args(&args)
                .arg("--help")
                .output()
                .await
                .unwrap_or_else(|e| panic!("running {line}: {e}"));
            assert!(
                out.status.success(),
                "{program} {} --help: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    let Ok(found) = tokio::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .await
    else {
        eprintln!(
            "skipped systemd-analyze verify: systemd-analyze is not installed (Debian package systemd)"
        );
        return;
    };
    assert!(found.status.success());
    let out = tokio::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running systemd-analyze verify: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It exits 0 on an unknown key or a bad value, warning only: any word about a unit fails.
    let about_units: Vec<&str> = stderr
        .lines()
        .filter(|l| units.iter().any(|u| l.contains(u)))
        .collect();
    assert!(
        out.status.success() && about_units.is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
}
