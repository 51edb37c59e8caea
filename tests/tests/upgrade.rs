//! Upgrades keep data: today's relay opens a store written by the release before the format
//! version was recorded (`tests/fixtures/store-v1/`), upgrades it and serves its jobs; a store of
//! a newer format is refused with a message that says what to do, and left untouched.

use std::path::{Path, PathBuf};
use std::process::Command;

use broker::store::{FORMAT_VERSION, force_version};
use harness::{TestEnv, bin, deadline};
use protocol::Role;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/store-v1/chukei.redb")
}

/// A data directory holding a copy of the version 1 fixture.
fn data_dir_with_fixture(env: &TestEnv, name: &str) -> PathBuf {
    let dir = env.path(name);
    std::fs::create_dir_all(&dir).expect("create the data dir");
    std::fs::copy(fixture(), dir.join(broker::store::FILE_NAME)).expect("copy the fixture");
    dir
}

#[tokio::test]
async fn a_store_of_the_previous_release_is_upgraded_and_its_jobs_served() {
    let env = TestEnv::new("a_store_of_the_previous_release_is_upgraded_and_its_jobs_served");
    let data = data_dir_with_fixture(&env, "data-v1");
    let broker = env.broker().data_dir(&data).start().await;
    broker
        .wait_for_line("the upgrade from format 1", deadline(), |l| {
            l.contains("store upgraded to this release's format")
                && l.contains("from=1")
                && l.contains(&format!("to={FORMAT_VERSION}"))
        })
        .await;
    let host = env.host("svc", &broker);
    let job = host.show_json("J-000001").await;
    assert_eq!(job["serial"], "C1", "{job}");
    assert_eq!(job["status"], "succeeded", "{job}");
    // New work goes on after the old: the job numbers continue.
    let next = host.submit_get_data("C2").await;
    assert_eq!(next, "J-000002");
}

#[tokio::test]
async fn a_store_of_a_newer_format_is_refused_with_what_to_do() {
    let env = TestEnv::new("a_store_of_a_newer_format_is_refused_with_what_to_do");
    let data = data_dir_with_fixture(&env, "data-newer");
    force_version(&data, FORMAT_VERSION + 1).expect("mark the store newer");
    // Twice: the first refusal left the store's version as it was, not upgraded or rewritten.
    for attempt in 1..=2 {
        let out = env.broker_refused_start(&data, &[]);
        let stderr = &out.stderr;
        assert!(
            !out.success(),
            "attempt {attempt} opened a newer store:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("format version {}", FORMAT_VERSION + 1))
                && stderr.contains("broker restore"),
            "attempt {attempt}: the error names the version and the way out:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn an_agent_store_of_a_newer_format_is_refused_with_what_to_do() {
    let env = TestEnv::new("an_agent_store_of_a_newer_format_is_refused_with_what_to_do");
    let certs = env.certs(Role::Device, "C1");
    let data = env.path("agent-newer");
    std::fs::create_dir_all(&data).expect("create the data dir");
    let newer = device_agent::format::FORMAT_VERSION + 1;
    device_agent::format::force_version(&data.join("agent.redb"), newer)
        .expect("mark the agent's store newer");
    let out = Command::new(bin("device-agent"))
        .args([
            "run",
            "--broker",
            "mqtts://127.0.0.1:9",
            "--serial",
            "C1",
            "--ca",
        ])
        .arg(env.pki().dir().join("ca.pem"))
        .arg("--cert")
        .arg(&certs.cert)
        .arg("--key")
        .arg(&certs.key)
        .arg("--data-dir")
        .arg(&data)
        .env("NO_COLOR", "1")
        .output()
        .expect("run the device agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "opened a newer store:\n{stderr}");
    assert!(
        stderr.contains(&format!("format version {newer}"))
            && stderr.contains("newer device-agent"),
        "the error names the version and the way out:\n{stderr}"
    );
}
