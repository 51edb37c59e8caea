//! The `device-agent` binary as an operator runs it: flags, config file, ready file, signals.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Env, FakeRelay, RelayEvent};
use protocol::job::JobStatus;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_device-agent");
const PATIENCE: Duration = Duration::from_secs(20);

fn agent(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn wait_for_file(path: &Path, child: &mut Child) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text).unwrap();
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "agent exited with {status} before writing {}",
                path.display()
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("agent ignored SIGTERM")
        .unwrap()
}

#[tokio::test]
async fn run_connects_writes_its_ready_file_and_stops_on_sigterm() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let (cert, key) = env.device_cert("C1");
    let ready = env.dir.path().join("ready.json");
    let mut child = agent(&[
        "run",
        "--broker",
        &relay.url(),
        "--ca",
        s(&env.ca()),
        "--cert",
        s(&cert),
        "--key",
        s(&key),
        "--serial",
        "C1",
        "--data-dir",
        s(&env.data_dir()),
        "--site",
        "Osaka",
        "--ready-file",
        s(&ready),
    ])
    .spawn()
    .unwrap();
    let body = wait_for_file(&ready, &mut child).await;
    assert_eq!(body, serde_json::json!({ "serial": "C1" }));
    relay
        .expect("C1's state", PATIENCE, |ev| {
            matches!(ev, RelayEvent::Published { topic, .. } if topic == "dev/C1/up/state")
                .then_some(())
        })
        .await;
    assert!(env.data_dir().join("agent.redb").exists());
    let status = sigterm(&mut child).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn run_refuses_a_certificate_for_another_serial() {
    let env = Env::new();
    let (cert, key) = env.device_cert("C2");
    let out = agent(&[
        "run",
        "--broker",
        "mqtts://127.0.0.1:1",
        "--ca",
        s(&env.ca()),
        "--cert",
        s(&cert),
        "--key",
        s(&key),
        "--serial",
        "C1",
        "--data-dir",
        s(&env.data_dir()),
    ])
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is for device C2, not C1") && stderr.contains("--serial C2"),
        "{stderr}"
    );
}

#[tokio::test]
async fn config_file_values_are_used_and_unknown_keys_refused() {
    let env = Env::new();
    let bad = env.dir.path().join("bad.toml");
    std::fs::write(&bad, "brokr = \"mqtts://x:1\"\n").unwrap();
    let out = agent(&["run", "--config", s(&bad)]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("brokr"), "{stderr}");

    // Everything from the file; the site flag wins over the file's.
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let (cert, key) = env.device_cert("C5");
    let good = env.dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "broker = {:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\nserial = \"C5\"\ndata_dir = {:?}\nsite = \"from file\"\n",
            relay.url(), s(&env.ca()), s(&cert), s(&key), s(&env.data_dir())
        ),
    )
    .unwrap();
    let ready: PathBuf = env.dir.path().join("ready.json");
    let mut child = agent(&[
        "run",
        "--config",
        s(&good),
        "--site",
        "from flag",
        "--ready-file",
        s(&ready),
    ])
    .spawn()
    .unwrap();
    wait_for_file(&ready, &mut child).await;
    let site = relay
        .expect("C5's state", PATIENCE, |ev| match ev {
            RelayEvent::Published { topic, payload, .. } if topic == "dev/C5/up/state" => Some(
                protocol::Envelope::<protocol::device::DeviceState>::from_cbor(payload, 1 << 20)
                    .unwrap()
                    .body
                    .site,
            ),
            _ => None,
        })
        .await;
    assert_eq!(site, "from flag");
    sigterm(&mut child).await;
}

#[tokio::test]
async fn fleet_connects_every_copier_with_one_store_file() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let ready = env.dir.path().join("fleet-ready.json");
    let mut child = agent(&[
        "fleet",
        "--count",
        "5",
        "--pki-dir",
        s(&env.pki_dir()),
        "--broker",
        &relay.url(),
        "--data-dir",
        s(&env.data_dir()),
        "--prefix",
        "LAB",
        "--ready-file",
        s(&ready),
    ])
    .spawn()
    .unwrap();
    assert_eq!(
        wait_for_file(&ready, &mut child).await,
        serde_json::json!({ "devices": 5 })
    );
    let mut seen = HashSet::new();
    while seen.len() < 5 {
        let who = relay
            .expect("a copier's state", PATIENCE, |ev| match ev {
                RelayEvent::Published { client, topic, .. } if topic.ends_with("/up/state") => {
                    Some(client.clone())
                }
                _ => None,
            })
            .await;
        seen.insert(who);
    }
    let want: HashSet<String> = (0..5).map(|i| format!("LAB-{i:05}")).collect();
    assert_eq!(seen, want);
    let files: Vec<_> = std::fs::read_dir(env.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        files,
        vec![std::ffi::OsString::from("agent.redb")],
        "one store for the whole fleet"
    );
    assert!(sigterm(&mut child).await.success());
}

#[tokio::test]
async fn help_teaches_each_subcommand() {
    let out = agent(&["--help"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["run", "fleet", "Examples:", "RUST_LOG"] {
        assert!(text.contains(want), "--help lacks {want:?}:\n{text}");
    }
    let out = agent(&["fleet", "--help"]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--count",
        "--pki-dir",
        "--prefix",
        "--ready-file",
        "Example:",
    ] {
        assert!(text.contains(want), "fleet --help lacks {want:?}:\n{text}");
    }
}

/// Forwards the child's stderr lines (its log) to a channel, so a test can wait for one.
fn log_lines(child: &mut Child) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let stderr = child.stderr.take().unwrap();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn wait_log(log: &mut mpsc::UnboundedReceiver<String>, want: &str) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, log.recv()).await {
            Ok(Some(line)) if line.contains(want) => return line,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the agent exited before logging {want:?}"),
            Err(_) => panic!("never logged {want:?}"),
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test]
async fn bad_firmware_and_session_flags_are_refused_with_advice() {
    let env = Env::new();
    let (cert, key) = env.device_cert("C1");
    let base = |extra: &[&str]| {
        let mut args = vec![
            "run".to_owned(),
            "--broker".into(),
            "mqtts://127.0.0.1:1".into(),
            "--ca".into(),
            s(&env.ca()).into(),
            "--cert".into(),
            s(&cert).into(),
            "--key".into(),
            s(&key).into(),
            "--serial".into(),
            "C1".into(),
            "--data-dir".into(),
            s(&env.data_dir()).into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let bad_key = env.dir.path().join("publisher.pub");
    std::fs::write(&bad_key, "not a key\n").unwrap();
    let cases: [(Vec<String>, &[&str]); 4] = [
        (
            base(&["--publisher-key", "/nonexistent/publisher.pub"]),
            &["/nonexistent/publisher.pub"],
        ),
        (
            base(&["--publisher-key", s(&bad_key)]),
            &["expected 64 hex digits", "host-agent keys generate"],
        ),
        (base(&["--session", "periodic"]), &["--interval-secs"]),
        (base(&["--interval-secs", "60"]), &["--session periodic"]),
    ];
    for (args, wants) in cases {
        let out = agent(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        for want in wants {
            assert!(stderr.contains(want), "{args:?}: want {want:?} in {stderr}");
        }
    }
}

#[tokio::test]
async fn sigusr1_makes_a_periodic_device_check_in() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let (cert, key) = env.device_cert("C1");
    let mut child = agent(&[
        "run",
        "--broker",
        &relay.url(),
        "--ca",
        s(&env.ca()),
        "--cert",
        s(&cert),
        "--key",
        s(&key),
        "--serial",
        "C1",
        "--data-dir",
        s(&env.data_dir()),
        "--session",
        "periodic",
        "--interval-secs",
        "3600",
    ])
    .spawn()
    .unwrap();
    let mut log = log_lines(&mut child);
    wait_log(&mut log, "check-in drained; disconnecting").await;
    relay
        .expect("the power-on check-in to end", PATIENCE, |ev| {
            matches!(ev, RelayEvent::Closed(c) if c == "C1").then_some(())
        })
        .await;
    signal(&child, "-USR1");
    let line = wait_log(&mut log, "periodic check-in").await;
    assert!(line.contains("operator-action"), "{line}");
    relay
        .expect("a check-in on the operator's action", PATIENCE, |ev| {
            matches!(ev, RelayEvent::Connected(c) if c == "C1").then_some(())
        })
        .await;
    signal(&child, "-TERM");
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn sigkill_mid_write_leaves_the_old_slot_active_and_the_job_failed() {
    use ed25519_dalek::{Signer, SigningKey};
    use protocol::artifact::{ArtifactId, ArtifactRef, signed_message};
    use protocol::job::JobSpec;
    use sha2::{Digest, Sha256};

    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let (cert, key) = env.device_cert("C1");
    let signing = SigningKey::from_bytes(&[3; 32]);
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let pubkey = env.dir.path().join("publisher.pub");
    std::fs::write(
        &pubkey,
        format!("{}\n", hex(signing.verifying_key().as_bytes())),
    )
    .unwrap();
    let config = env.dir.path().join("agent.toml");
    std::fs::write(&config, "[sim]\nwrite_delay_ms = 20000\n").unwrap();
    let bytes = b"firmware 2.0 ".repeat(4000);
    let id = ArtifactId::from_digest(&Sha256::digest(&bytes).into());
    relay.serve_artifact(&id, bytes.clone(), 8192);
    let artifact = ArtifactRef {
        signature: hex(&signing.sign(&signed_message(&id, "2.0")).to_bytes()),
        id,
        version: "2.0".into(),
        size: bytes.len() as u64,
        chunk_size: 8192,
        publisher: "svc".into(),
    };
    let (ca, data_dir, url) = (env.ca(), env.data_dir(), relay.url());
    let args = [
        "run",
        "--config",
        s(&config),
        "--broker",
        &url,
        "--ca",
        s(&ca),
        "--cert",
        s(&cert),
        "--key",
        s(&key),
        "--serial",
        "C1",
        "--data-dir",
        s(&data_dir),
        "--publisher-key",
        s(&pubkey),
    ];
    let mut child = agent(&args).spawn().unwrap();
    let mut log = log_lines(&mut child);
    wait_log(&mut log, "subscribed; ready for jobs").await;
    relay.publish_order(&common::order("C1", "J1", JobSpec::Firmware { artifact }));
    wait_log(&mut log, "suspending relay access for firmware write").await;
    let line = wait_log(&mut log, "firmware write attempt").await;
    assert!(
        line.contains("attempt=1") && line.contains("slot=b"),
        "{line}"
    );
    // The log line comes just before the write: wait until bytes are in slot b, then cut power.
    let image = env.data_dir().join("slots/b.img");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while std::fs::metadata(&image).map_or(true, |m| m.len() == 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot b was never being written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "-KILL"); // a power cut, mid-write
    child.wait().await.unwrap();
    let written = std::fs::metadata(&image).unwrap().len();
    assert!(
        written > 0 && written < bytes.len() as u64,
        "slot b was cut mid-write ({written} of {} bytes)",
        bytes.len()
    );

    let mut child = agent(&args).spawn().unwrap();
    let mut log = log_lines(&mut child);
    let line = wait_log(&mut log, "interrupted firmware write found").await;
    assert!(line.contains("job=J1"), "{line}");
    let line = wait_log(&mut log, "resuming relay access").await;
    assert!(line.contains("job=J1"), "{line}");
    let failed = loop {
        let (_, u) = relay.expect_job_update(PATIENCE).await;
        if u.status == JobStatus::Failed {
            break u;
        }
    };
    assert_eq!(
        failed.note.as_deref(),
        Some("interrupted during write; slot a still active (version 1.0.0)")
    );
    let state = relay
        .expect("the state after the restart", PATIENCE, |ev| match ev {
            RelayEvent::Published { topic, payload, .. } if topic == "dev/C1/up/state" => Some(
                protocol::Envelope::<protocol::device::DeviceState>::from_cbor(payload, 1 << 20)
                    .unwrap()
                    .body,
            ),
            _ => None,
        })
        .await;
    assert_eq!(
        state.firmware, "1.0.0",
        "the old slot is still the one running"
    );
    signal(&child, "-TERM");
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
}
