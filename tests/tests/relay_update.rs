//! A child relay's own program replaced through its parent (claim 22), with real processes: the
//! child runs under `broker supervise`, the host uploads a signed program at the parent and
//! submits `jobs submit --relay R1 --kind firmware`. The new program is honest (the same broker
//! with bytes appended, so a new SHA-256) or broken (a program that exits at start): the first
//! must report its digest from the new process, the second must be rolled back with the reason.

use std::path::{Path, PathBuf};

use broker::program::{ProgramDir, sha256_file};
use harness::{Broker, Host, PublisherKeys, TestEnv, deadline};
use serde_json::Value;

const PARENT_CONFIG: &str =
    "[[relays]]\nid = \"R1\"\nserials = [\"C*\"]\n\n[[relays]]\nid = \"R2\"\nserials = [\"D*\"]\n";

/// The program a child starts with: the broker built for the tests, without its debug
/// information when `strip` is installed (a fifth of the bytes to send through the tree).
fn base_program(env: &TestEnv) -> PathBuf {
    let path = env.path("broker-base");
    std::fs::copy(harness::bin("broker"), &path).expect("copy the broker binary");
    let _ = std::process::Command::new("strip").arg(&path).status();
    path
}

/// The same program with bytes appended: it runs the same, and hashes differently.
fn new_program(env: &TestEnv, base: &Path) -> PathBuf {
    let path = env.path("broker-new");
    let mut bytes = std::fs::read(base).expect("read the base program");
    bytes.extend_from_slice(b"\nchukei test build: a new program\n");
    std::fs::write(&path, bytes).expect("write the new program");
    path
}

fn sha(path: &Path) -> String {
    sha256_file(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .to_string()
}

async fn parent(env: &TestEnv) -> Broker {
    std::fs::write(env.path("parent.toml"), PARENT_CONFIG).unwrap();
    for id in ["R1", "R2"] {
        pki::issue_relay_to_dir(env.pki().dir(), id, &[]).unwrap();
    }
    env.broker()
        .data_dir(env.path("parent"))
        .arg("--config")
        .arg(env.path("parent.toml"))
        .args(["--server-name", "parent"])
        .start()
        .await
}

/// Child R1 under `broker supervise`, trusting `publisher`, starting from `program`; a new
/// program must reach the parent within `confirm_secs`.
async fn supervised_child(
    env: &TestEnv,
    parent: &Broker,
    publisher: &Path,
    program: &Path,
    confirm_secs: &str,
) -> Broker {
    let child = env
        .broker()
        .supervised(
            env.path("program"),
            [
                "--confirm-secs".as_ref(),
                confirm_secs.as_ref(),
                "--program".as_ref(),
                program.as_os_str(),
            ],
        )
        .data_dir(env.path("child"))
        .args(["--relay-id", "R1", "--parent", &parent.url()])
        .args(["--server-name", "R1", "--uplink-batch-delay-ms", "20"])
        .arg("--publisher-key")
        .arg(publisher)
        .start()
        .await;
    child
        .wait_for_log("uplink connected to the parent relay", deadline())
        .await;
    child
}

fn statuses(detail: &Value) -> Vec<String> {
    detail["timeline"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|e| e["status"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `jobs submit --relay R1 --kind get-data` until succeeded: the identification it reports.
async fn own_status(host: &Host) -> Value {
    let job = host.submit(&["--relay", "R1", "--kind", "get-data"]).await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    detail["data"]["identification"].clone()
}

/// The program digest R1 reports for itself.
async fn own_digest(host: &Host) -> String {
    let status = own_status(host).await;
    status["program_sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("no program_sha256 in {status:#}"))
        .to_owned()
}

/// A parent, its host and publisher key, and child R1 under `broker supervise`.
struct Tree {
    env: TestEnv,
    /// The parent relay R1 and R2 connect to.
    parent: Broker,
    host: Host,
    keys: PublisherKeys,
    /// The program the child was installed with.
    base: PathBuf,
    child: Broker,
}

impl Tree {
    /// `confirm_secs`: how long a new program has to reach the parent.
    async fn new(name: &str, confirm_secs: &str) -> Tree {
        let env = TestEnv::new(name);
        let parent = parent(&env).await;
        let host = env.host("svc", &parent);
        let keys = host.keys_generate(&env.path("keys")).await;
        let base = base_program(&env);
        let child = supervised_child(&env, &parent, &keys.public, &base, confirm_secs).await;
        Tree {
            env,
            parent,
            host,
            keys,
            base,
            child,
        }
    }

    fn program_dir(&self) -> ProgramDir {
        ProgramDir::new(self.env.path("program"))
    }

    /// Uploads `program` as `version` and submits it for R1: the job id.
    async fn update(&self, program: &Path, version: &str) -> String {
        self.host.upload(program, version, &self.keys.secret).await;
        self.host
            .submit(&["--relay", "R1", "--kind", "firmware", "--artifact", version])
            .await
    }

    /// A program that fails its trial: the job fails with a reason holding `why`, the old
    /// program is current again and serves.
    async fn rolls_back(&self, program: &Path, version: &str, why: &str) {
        let job = self.update(program, version).await;
        let detail = self
            .host
            .wait_for_status(&job, "failed", deadline() * 2)
            .await;
        let reason = detail["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(why), "{detail:#}");
        self.child
            .wait_for_log("the new relay program failed its trial", deadline())
            .await;
        let dir = self.program_dir();
        assert_eq!(
            sha(&dir.current()),
            sha(&self.base),
            "the old program is current again"
        );
        assert_eq!(
            sha(&dir.rejected()),
            sha(program),
            "the failed one is kept aside"
        );
        assert_eq!(
            own_digest(&self.host).await,
            sha(&self.base),
            "the old program serves"
        );
    }
}

#[tokio::test]
async fn a_child_relay_replaces_its_own_program_through_its_parent_and_reports_the_new_digest() {
    let t = Tree::new(
        "a_child_relay_replaces_its_own_program_through_its_parent_and_reports_the_new_digest",
        "20",
    )
    .await;
    assert_eq!(
        own_digest(&t.host).await,
        sha(&t.base),
        "the child runs the installed program"
    );

    let new = new_program(&t.env, &t.base);
    let job = t.update(&new, "relay-0.3.0").await;
    let detail = t
        .host
        .wait_for_status(&job, "succeeded", deadline() * 3)
        .await;
    // Reported by the new process itself, once it reached the parent.
    let result = detail["timeline"]
        .as_array()
        .and_then(|t| t.iter().find(|e| e["status"] == "succeeded"))
        .unwrap_or_else(|| panic!("no succeeded event: {detail:#}"));
    let note = result["note"].as_str().unwrap_or_default();
    assert!(
        note.contains(&sha(&new)) && note.contains("relay-0.3.0"),
        "{detail:#}"
    );
    let seen = statuses(&detail);
    for status in ["delivered", "staged", "in-progress", "succeeded"] {
        assert!(
            seen.iter().any(|s| s == status),
            "{status} missing: {detail:#}"
        );
    }
    let dir = t.program_dir();
    assert_eq!(sha(&dir.current()), sha(&new), "the new program is current");
    assert_eq!(
        sha(&dir.fallback()),
        sha(&t.base),
        "the old one is the fallback"
    );
    // The new program serves: its own status names it, and the job was not run twice.
    let status = own_status(&t.host).await;
    assert_eq!(status["program_sha256"], sha(&new), "{status:#}");
    assert_eq!(status["program_version"], "relay-0.3.0", "{status:#}");
    let restarts = t
        .child
        .lines_matching(|l| l.contains("restarting into the new relay program"));
    assert_eq!(restarts.len(), 1, "{restarts:#?}");
}

#[tokio::test]
async fn a_new_program_that_exits_at_start_is_rolled_back_and_the_job_fails_with_the_reason() {
    let t = Tree::new(
        "a_new_program_that_exits_at_start_is_rolled_back_and_the_job_fails_with_the_reason",
        "20",
    )
    .await;
    let broken = t.env.path("broken");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'this program is broken' >&2\nexit 3\n",
    )
    .unwrap();
    t.rolls_back(
        &broken,
        "relay-broken",
        "exited (exit status: 3) before it reached its parent relay",
    )
    .await;
    t.child
        .wait_for_log("this program is broken", deadline())
        .await;
}

#[tokio::test]
async fn a_new_program_that_never_reaches_the_parent_is_stopped_at_the_deadline_and_rolled_back() {
    let t = Tree::new(
        "a_new_program_that_never_reaches_the_parent_is_stopped_at_the_deadline_and_rolled_back",
        "2",
    )
    .await;
    // Starts and stays up, but never connects anywhere.
    let hanging = t.env.path("hanging");
    std::fs::write(&hanging, "#!/bin/sh\nexec sleep 600\n").unwrap();
    t.rolls_back(
        &hanging,
        "relay-hangs",
        "did not reach its parent relay within 2 s",
    )
    .await;
}

#[tokio::test]
async fn a_child_refuses_a_program_it_cannot_trust_or_could_not_go_back_from() {
    let t = Tree::new(
        "a_child_refuses_a_program_it_cannot_trust_or_could_not_go_back_from",
        "20",
    )
    .await;
    // R2 trusts the publisher but runs without a supervisor: nothing could bring its old
    // program back.
    let r2 = t
        .env
        .broker()
        .data_dir(t.env.path("child-R2"))
        .args([
            "--relay-id",
            "R2",
            "--parent",
            &t.parent.url(),
            "--server-name",
            "R2",
        ])
        .arg("--publisher-key")
        .arg(&t.keys.public)
        .start()
        .await;
    r2.wait_for_log("uplink connected to the parent relay", deadline())
        .await;
    // Signed by another publisher than the one R1 trusts.
    let other = t.host.keys_generate(&t.env.path("other-keys")).await;
    let new = new_program(&t.env, &t.base);
    t.host.upload(&new, "relay-0.3.0", &other.secret).await;
    let untrusted = t
        .host
        .submit(&[
            "--relay",
            "R1",
            "--kind",
            "firmware",
            "--artifact",
            "relay-0.3.0",
        ])
        .await;
    let unsupervised = t
        .host
        .submit(&[
            "--relay",
            "R2",
            "--kind",
            "firmware",
            "--artifact",
            "relay-0.3.0",
        ])
        .await;
    let d1 = t
        .host
        .wait_for_status(&untrusted, "failed", deadline())
        .await;
    let why = d1["reason"].as_str().unwrap_or_default();
    assert!(why.contains("signature does not verify"), "{d1:#}");
    let d2 = t
        .host
        .wait_for_status(&unsupervised, "failed", deadline())
        .await;
    let why = d2["reason"].as_str().unwrap_or_default();
    assert!(why.contains("broker supervise"), "{d2:#}");
    // Nothing was downloaded or restarted.
    assert!(!t.program_dir().next().exists());
    assert!(
        t.child
            .lines_matching(|l| l.contains("restarting into"))
            .is_empty()
    );
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).contains(needle))
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_supervised_relay_stops_when_its_supervisor_is_killed() {
    let mut tree = Tree::new(
        "a_supervised_relay_stops_when_its_supervisor_is_killed",
        "30",
    )
    .await;
    let child_data = tree.env.path("child").display().to_string();
    let running = processes_with(&child_data);
    assert!(
        running.len() >= 2,
        "the supervisor and its relay run: {running:?}"
    );
    tree.child.kill9().await;
    let left = harness::poll_until("the orphaned relay stops", deadline(), || async {
        let left = processes_with(&child_data);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still running: {left:?}"))
        }
    })
    .await;
    assert!(left.is_ok(), "{left:?}");
}
