//! The `device-agent` binary as an operator runs it: flags, config file, ready file, signals.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Env, FakeRelay, RelayEvent};
use tokio::process::{Child, Command};

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
