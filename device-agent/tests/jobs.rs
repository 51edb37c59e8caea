//! Every job kind through a real session (mTLS sockets, the stand-in relay): update-data merged at
//! the relay, firmware with its suspended session, a download that survives a cut link, a staged
//! job withdrawn before its execution time, and a schedule that changes how the device connects.

mod common;

use std::time::Duration;

use common::{AgentOpts, Env, FakeRelay, PATIENCE, RelayEvent, open_outbox, order, start_with};
use device_agent::jobs::PublisherKey;
use device_agent::sim::SimSettings;
use ed25519_dalek::{Signer, SigningKey};
use protocol::artifact::{ArtifactId, ArtifactRef, signed_message};
use protocol::data::{DeviceData, Section, Value};
use protocol::device::{DeviceState, JobUpdate};
use protocol::job::{JobSpec, JobStatus, MergeAt};
use protocol::schedule::{Schedule, SessionMode};
use protocol::{Envelope, Serial};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

const CHUNK: u32 = 4096;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn publisher() -> PublisherKey {
    PublisherKey::from_verifying_key(key().verifying_key())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn image(version: &str, len: usize) -> Vec<u8> {
    format!("<firmware {version}>")
        .bytes()
        .cycle()
        .take(len)
        .collect()
}

fn artifact(bytes: &[u8], version: &str) -> ArtifactRef {
    let id = ArtifactId::from_digest(&Sha256::digest(bytes).into());
    ArtifactRef {
        signature: hex(&key().sign(&signed_message(&id, version)).to_bytes()),
        id,
        version: version.into(),
        size: bytes.len() as u64,
        chunk_size: CHUNK,
        publisher: "svc".into(),
    }
}

/// The next job update of `job`, skipping the rest.
async fn update_of(relay: &mut FakeRelay, job: &str) -> JobUpdate {
    relay
        .expect(&format!("an update of {job}"), PATIENCE, |ev| match ev {
            RelayEvent::Published { topic, payload, .. } if topic.ends_with("/up/job") => {
                let u = Envelope::<JobUpdate>::from_cbor(payload, 1 << 20)
                    .unwrap()
                    .body;
                (u.job.as_str() == job).then_some(u)
            }
            _ => None,
        })
        .await
}

/// Waits for `job` to reach `status`, returning every update of it on the way.
async fn until_status(relay: &mut FakeRelay, job: &str, status: JobStatus) -> Vec<JobUpdate> {
    let mut seen = Vec::new();
    loop {
        let u = update_of(relay, job).await;
        let done = u.status == status;
        seen.push(u);
        if done {
            return seen;
        }
    }
}

fn values(pairs: &[(Section, &str, Value)]) -> DeviceData {
    let mut data = DeviceData::new();
    for (s, k, v) in pairs {
        data.entry(*s)
            .or_default()
            .insert((*k).to_owned(), v.clone());
    }
    data
}

#[tokio::test]
async fn update_data_merged_at_the_relay_is_applied_and_reported() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let mut agent = start_with(&env, &relay, "C1", &outbox, AgentOpts::default());
    agent.ready().await;

    let want = values(&[(Section::Adjustment, "density", 8.into())]);
    relay.merge_for("J1", want.clone());
    relay.publish_order(&order(
        "C1",
        "J1",
        JobSpec::UpdateData {
            values: want,
            merge: MergeAt::Broker,
        },
    ));
    let current = relay
        .expect("the merge request", PATIENCE, |ev| match ev {
            RelayEvent::Published { topic, payload, .. } if topic == "dev/C1/up/merge" => Some(
                Envelope::<protocol::device::MergeRequest>::from_cbor(payload, 1 << 20)
                    .unwrap()
                    .body
                    .current,
            ),
            _ => None,
        })
        .await;
    assert!(
        current[&Section::Adjustment].contains_key("density"),
        "S212: the device sends its current values of the section"
    );
    let done = until_status(&mut relay, "J1", JobStatus::Succeeded).await;
    let last = done.last().unwrap();
    assert_eq!(
        last.data.as_ref().unwrap()[&Section::Adjustment]["density"],
        Value::Int(8),
        "S218: the applied section comes back"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_refused_update_fails_with_the_reason_per_key() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let mut agent = start_with(&env, &relay, "C1", &outbox, AgentOpts::default());
    agent.ready().await;
    relay.publish_order(&order(
        "C1",
        "J1",
        JobSpec::UpdateData {
            values: values(&[
                (Section::Adjustment, "density", 12.into()),
                (Section::Adjustment, "toner_save", true.into()),
            ]),
            merge: MergeAt::Device,
        },
    ));
    let done = until_status(&mut relay, "J1", JobStatus::Failed).await;
    let last = done.last().unwrap();
    assert_eq!(
        last.errors.get("adjustment.density").map(String::as_str),
        Some("12 is out of range 1..=9")
    );
    assert_eq!(last.errors.len(), 1, "{:?}", last.errors);
    assert!(
        last.note
            .as_deref()
            .unwrap()
            .contains("refused: adjustment.density: 12 is out of range 1..=9")
    );
    agent.stop().await;
}

#[tokio::test]
async fn firmware_is_written_with_the_session_closed_then_reported_after_reconnecting() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let bytes = image("2.0", 10 * CHUNK as usize + 17);
    let a = artifact(&bytes, "2.0");
    relay.serve_artifact(&a.id, bytes, CHUNK);
    let opts = AgentOpts {
        publisher: Some(publisher()),
        sim: SimSettings {
            write_delay: Duration::from_millis(800),
            ..SimSettings::default()
        },
        ..AgentOpts::default()
    };
    let mut agent = start_with(&env, &relay, "C1", &outbox, opts);
    agent.ready().await;
    relay.publish_order(&order(
        "C1",
        "J1",
        JobSpec::Firmware {
            artifact: a.clone(),
        },
    ));

    // Staged after the download; then in-progress, which the relay acks before the device leaves.
    let steps = until_status(&mut relay, "J1", JobStatus::InProgress).await;
    let statuses: Vec<_> = steps.iter().map(|u| u.status).collect();
    assert_eq!(
        statuses,
        [
            JobStatus::Delivered,
            JobStatus::Staged,
            JobStatus::InProgress
        ]
    );
    relay
        .expect("the session closed for the write", PATIENCE, |ev| {
            matches!(ev, RelayEvent::Closed(c) if c == "C1").then_some(())
        })
        .await;
    let closed_at = Instant::now();
    // Nothing from the device while it writes; it comes back, announces the new firmware and
    // reports.
    let mut reconnected = None;
    let mut state = None;
    let mut result = None;
    while result.is_none() || state.is_none() {
        let ev = relay
            .expect("the result and the new state", PATIENCE, |ev| {
                Some(ev.clone())
            })
            .await;
        match ev {
            RelayEvent::Connected(c) if c == "C1" => reconnected = Some(Instant::now()),
            RelayEvent::Published { topic, payload, .. } => {
                assert!(reconnected.is_some(), "published {topic} while suspended");
                if topic == "dev/C1/up/state" {
                    state = Some(
                        Envelope::<DeviceState>::from_cbor(&payload, 1 << 20)
                            .unwrap()
                            .body,
                    );
                }
                if topic == "dev/C1/up/job" {
                    let u = Envelope::<JobUpdate>::from_cbor(&payload, 1 << 20)
                        .unwrap()
                        .body;
                    if u.status.is_terminal() {
                        result = Some(u);
                    }
                }
            }
            _ => {}
        }
    }
    let offline = reconnected.unwrap() - closed_at;
    assert!(
        offline >= Duration::from_millis(700),
        "the write takes 800 ms and the device was back after {offline:?}"
    );
    let result = result.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{:?}", result.note);
    assert_eq!(result.note.as_deref(), Some("slot b active, version 2.0"));
    assert_eq!(state.unwrap().firmware, "2.0");
    agent.stop().await;
}

#[tokio::test]
async fn a_cut_link_mid_download_resumes_without_fetching_a_chunk_twice() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let bytes = image("3.0", 100 * CHUNK as usize);
    let a = artifact(&bytes, "3.0");
    relay.serve_artifact(&a.id, bytes, CHUNK);
    relay.cut_after_chunks(30);
    let opts = AgentOpts {
        publisher: Some(publisher()),
        ..AgentOpts::default()
    };
    let mut agent = start_with(&env, &relay, "C1", &outbox, opts);
    agent.ready().await;
    relay.publish_order(&order(
        "C1",
        "J1",
        JobSpec::Firmware {
            artifact: a.clone(),
        },
    ));

    let mut served: Vec<u32> = Vec::new();
    let mut cut = false;
    let mut done = None;
    while done.is_none() {
        match relay
            .expect("the download", PATIENCE, |ev| Some(ev.clone()))
            .await
        {
            RelayEvent::Served(c, chunks) if c == "C1" => served.extend(chunks),
            RelayEvent::Closed(c) if c == "C1" && done.is_none() => cut = true,
            RelayEvent::Published { topic, payload, .. } if topic == "dev/C1/up/job" => {
                let u = Envelope::<JobUpdate>::from_cbor(&payload, 1 << 20)
                    .unwrap()
                    .body;
                if u.status == JobStatus::Staged {
                    done = Some(u);
                }
            }
            _ => {}
        }
    }
    assert!(cut, "the link was cut mid-download");
    let mut sorted = served.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 100, "every chunk arrived");
    assert_eq!(
        served.len(),
        100,
        "no chunk fetched twice: {} served for 100 chunks",
        served.len()
    );
    until_status(&mut relay, "J1", JobStatus::Succeeded).await;
    agent.stop().await;
}

#[tokio::test]
async fn a_staged_job_whose_order_is_withdrawn_is_never_written() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let bytes = image("2.0", 3 * CHUNK as usize);
    let a = artifact(&bytes, "2.0");
    relay.serve_artifact(&a.id, bytes, CHUNK);
    let opts = AgentOpts {
        publisher: Some(publisher()),
        ..AgentOpts::default()
    };
    let mut agent = start_with(&env, &relay, "C1", &outbox, opts);
    agent.ready().await;
    let mut o = order(
        "C1",
        "J1",
        JobSpec::Firmware {
            artifact: a.clone(),
        },
    );
    o.execution_time = Some(chrono::Utc::now() + chrono::Duration::seconds(2));
    relay.publish_order(&o);
    until_status(&mut relay, "J1", JobStatus::Staged).await;
    let part = env.data_dir().join(format!("downloads/{}.part", a.id));
    assert!(part.exists(), "the image waits on disk");

    relay.withdraw("C1", "J1"); // canceled while staged
    // A sentinel job after the execution time shows the worker went on without J1.
    let mut sentinel = common::get_data_order("C1", "J2", chrono::Utc::now());
    sentinel.instruction_time = chrono::Utc::now() + chrono::Duration::seconds(3);
    relay.publish_order(&sentinel);
    let u = relay.expect_job_update(PATIENCE).await.1;
    assert_eq!((u.job.as_str(), u.status), ("J2", JobStatus::Delivered));
    let u = relay.expect_job_update(PATIENCE).await.1;
    assert_eq!(
        (u.job.as_str(), u.status),
        ("J2", JobStatus::InProgress),
        "J1 must never start its write"
    );
    assert!(!part.exists(), "the withdrawn job's download is removed");
    agent.stop().await;
}

/// Times at which C1 connected, until `n` are seen.
async fn connects(relay: &mut FakeRelay, n: usize) -> Vec<Instant> {
    let mut at = Vec::new();
    while at.len() < n {
        relay
            .expect("a connect", PATIENCE, |ev| {
                matches!(ev, RelayEvent::Connected(c) if c == "C1").then_some(())
            })
            .await;
        at.push(Instant::now());
    }
    at
}

fn periodic(secs: u64) -> Schedule {
    Schedule {
        mode: SessionMode::Periodic,
        interval_secs: Some(secs),
        ..Schedule::default()
    }
}

#[tokio::test]
async fn a_periodic_session_connects_drains_and_disconnects_on_its_interval() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let opts = AgentOpts {
        schedule: periodic(2),
        ..AgentOpts::default()
    };
    let mut agent = start_with(&env, &relay, "C1", &outbox, opts);
    agent.ready().await;
    // A job waiting at the relay is run at the next check-in, and the report sent before leaving.
    relay.publish_order(&common::get_data_order("C1", "J1", chrono::Utc::now()));
    let mut closes = 0;
    let mut starts = Vec::new();
    let mut reported = false;
    while starts.len() < 3 {
        match relay
            .expect("check-ins", PATIENCE, |ev| Some(ev.clone()))
            .await
        {
            RelayEvent::Connected(c) if c == "C1" => {
                assert_eq!(closes, starts.len(), "each check-in ends before the next");
                starts.push(Instant::now());
            }
            RelayEvent::Closed(c) if c == "C1" => closes += 1,
            RelayEvent::Published { topic, payload, .. } if topic == "dev/C1/up/job" => {
                let u = Envelope::<JobUpdate>::from_cbor(&payload, 1 << 20)
                    .unwrap()
                    .body;
                if u.status == JobStatus::Succeeded {
                    reported = true;
                }
            }
            _ => {}
        }
    }
    assert!(reported, "the job ran during a check-in");
    for pair in starts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(1800) && gap <= Duration::from_millis(3500),
            "check-ins every 2 s, saw {gap:?}"
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn set_schedule_changes_the_interval_and_is_kept_across_a_restart() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let mut agent = start_with(&env, &relay, "C1", &outbox, AgentOpts::default());
    agent.ready().await;
    relay.publish_order(&order(
        "C1",
        "J1",
        JobSpec::SetSchedule {
            schedule: periodic(1),
        },
    ));
    let done = until_status(&mut relay, "J1", JobStatus::Succeeded).await;
    assert_eq!(
        done.last().unwrap().note.as_deref(),
        Some("schedule set: periodic, every 1 s")
    );
    relay.withdraw("C1", "J1"); // the relay clears an ended job's order
    // The persistent session ends; the device now comes and goes every second.
    let at = connects(&mut relay, 3).await;
    for pair in at.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap <= Duration::from_millis(2500), "every 1 s, saw {gap:?}");
    }
    agent.stop().await;
    drop(outbox);

    // Restarted with a persistent schedule from its flags: the job's schedule wins.
    let outbox = open_outbox(&env);
    let mut agent = start_with(&env, &relay, "C1", &outbox, AgentOpts::default());
    agent.ready().await;
    relay
        .expect("a periodic disconnect after the restart", PATIENCE, |ev| {
            matches!(ev, RelayEvent::Closed(c) if c == "C1").then_some(())
        })
        .await;
    connects(&mut relay, 2).await;
    let stored = outbox
        .store()
        .schedule(&Serial::parse("C1").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.schedule, periodic(1));
    agent.stop().await;
}

#[tokio::test]
async fn a_periodic_device_comes_back_at_the_execution_time_to_write_and_report() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let bytes = image("2.0", 5 * CHUNK as usize);
    let a = artifact(&bytes, "2.0");
    relay.serve_artifact(&a.id, bytes, CHUNK);
    let opts = AgentOpts {
        schedule: periodic(3600),
        publisher: Some(publisher()),
        ..AgentOpts::default()
    };
    let mut agent = start_with(&env, &relay, "C1", &outbox, opts);
    agent.ready().await;
    let mut o = order("C1", "J1", JobSpec::Firmware { artifact: a });
    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    o.execution_time = Some(at);
    relay.publish_order(&o);
    until_status(&mut relay, "J1", JobStatus::Staged).await;
    relay
        .expect("the check-in to end after staging", PATIENCE, |ev| {
            matches!(ev, RelayEvent::Closed(c) if c == "C1").then_some(())
        })
        .await;
    // Offline until the execution time (the interval is an hour away), then back to write.
    relay
        .expect("a check-in for the write", PATIENCE, |ev| {
            matches!(ev, RelayEvent::Connected(c) if c == "C1").then_some(())
        })
        .await;
    assert!(
        chrono::Utc::now() >= at,
        "came back before the execution time"
    );
    let done = until_status(&mut relay, "J1", JobStatus::Succeeded).await;
    assert_eq!(
        done.iter().map(|u| u.status).collect::<Vec<_>>(),
        [JobStatus::InProgress, JobStatus::Succeeded]
    );
    relay
        .expect("the device to leave again", PATIENCE, |ev| {
            matches!(ev, RelayEvent::Closed(c) if c == "C1").then_some(())
        })
        .await;
    agent.stop().await;
}
