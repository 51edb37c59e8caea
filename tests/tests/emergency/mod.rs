//! Helpers shared by the emergency scenarios (`alarms.rs`, `notify.rs`): injecting a fault into a
//! running device, and the long-running watchers a service desk and an integrator would run.

#![allow(dead_code)] // each test file uses its own subset

use std::process::Stdio;
use std::time::Duration;

use harness::{Broker, Device, Proc, TestEnv, bin, deadline};
use protocol::Role;
use tokio::process::Command;

/// `device-agent fault --data-dir DIR WORDS…`, then SIGUSR2 so the agent reads it at once.
pub async fn fault(device: &Device, words: &[&str]) {
    let out = Command::new(bin("device-agent"))
        .arg("fault")
        .arg("--data-dir")
        .arg(device.data_dir())
        .args(words)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("could not run `device-agent fault`: {e}"));
    assert!(
        out.status.success(),
        "`device-agent fault {}` failed: {}\n{}",
        words.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    device.signal("USR2");
}

/// The connection flags of `host-agent` as host `id`.
fn host_command(env: &TestEnv, broker: &Broker, id: &str) -> Command {
    let certs = env.certs(Role::Host, id);
    let mut cmd = Command::new(bin("host-agent"));
    cmd.current_dir(env.root())
        .arg("--broker")
        .arg(broker.url())
        .arg("--ca")
        .arg(&certs.ca)
        .arg("--cert")
        .arg(&certs.cert)
        .arg("--key")
        .arg(&certs.key);
    cmd
}

/// `host-agent watch --alarms [--json]`, started and subscribed (its "watching alarms" line).
pub async fn watch_alarms(env: &TestEnv, broker: &Broker, name: &str, json: bool) -> Proc {
    let mut cmd = host_command(env, broker, "svc");
    cmd.args(["watch", "--alarms"]);
    if json {
        cmd.arg("--json");
    }
    let proc = Proc::spawn(name.to_owned(), cmd, env.path(format!("{name}.log")));
    proc.wait_for_log("watching alarms on", deadline()).await;
    proc
}

/// The real `mosquitto_sub` as integrator `crm` on `filter`, verbose (`topic payload` lines)
/// and in debug mode, so the test can wait for its SUBACK before anything happens.
pub async fn mosquitto_sub(env: &TestEnv, broker: &Broker, name: &str, filter: &str) -> Proc {
    let crm = env.certs(Role::Integrator, "crm");
    // Line-buffered: into a pipe, mosquitto_sub's stdio would hold its debug lines back.
    let mut cmd = Command::new("stdbuf");
    cmd.arg("-oL")
        .arg(mosquitto_sub_bin())
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .arg("--cafile")
        .arg(&crm.ca)
        .arg("--cert")
        .arg(&crm.cert)
        .arg("--key")
        .arg(&crm.key)
        .args(["-i", &format!("crm:{name}"), "-t", filter, "-v", "-d"]);
    let proc = Proc::spawn(name.to_owned(), cmd, env.path(format!("{name}.log")));
    proc.wait_for_log("received SUBACK", deadline()).await;
    proc
}

/// `mosquitto_sub`, or a failure that says how to get it: a skipped test would hide that the
/// mirror went unchecked.
pub fn mosquitto_sub_bin() -> &'static str {
    let found = std::process::Command::new("mosquitto_sub")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "mosquitto_sub is not installed: run `scripts/test`, which installs it \
         (or `apt-get install -y mosquitto-clients`)"
    );
    "mosquitto_sub"
}

/// The retained messages on `topic` right now, read by a fresh `mosquitto_sub` that waits
/// `wait` for them: a dashboard connecting later. Empty when nothing is retained.
pub async fn retained_now(env: &TestEnv, broker: &Broker, topic: &str, wait: Duration) -> String {
    let crm = env.certs(Role::Integrator, "crm");
    let secs = wait.as_secs().max(1).to_string();
    let mut cmd = Command::new(mosquitto_sub_bin());
    cmd.args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .arg("--cafile")
        .arg(&crm.ca)
        .arg("--cert")
        .arg(&crm.cert)
        .arg("--key")
        .arg(&crm.key)
        // The first message is the retained one if there is one; -W bounds the wait when
        // nothing is retained (exit 27, nothing printed).
        .args(["-i", "crm:later", "-t", topic, "-C", "1", "-W", &secs])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(deadline(), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("mosquitto_sub on {topic} did not finish"))
        .unwrap_or_else(|e| panic!("could not run mosquitto_sub: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The payload lines `mosquitto_sub -v` printed for `topic` (`topic payload`), payload only.
pub fn payloads(proc: &Proc, topic: &str) -> Vec<serde_json::Value> {
    let prefix = format!("{topic} ");
    proc.lines_matching(|l| l.starts_with(&prefix))
        .iter()
        .filter_map(|l| serde_json::from_str(&l[prefix.len()..]).ok())
        .collect()
}

/// What a flood of alarm reports from one device got back.
pub struct FloodAcks {
    pub stored: usize,
    pub rejected: Vec<String>,
}

/// A device (its own certificate, raw MQTT, no agent) that announces a `site` of the given length
/// and then raises `codes` distinct fault codes as fast as it can; returns once every report has
/// been answered on `dev/{serial}/ack`.
pub async fn flood_alarms(
    env: &TestEnv,
    broker: &Broker,
    serial: &str,
    site_len: usize,
    codes: usize,
) -> FloodAcks {
    use harness::mqtt::{envelope, open};
    use protocol::alarm::{AlarmReport, FaultEvent};
    use protocol::device::{AckBatch, AckOutcome, DeviceState};
    use protocol::topic::UpKind;

    let s = protocol::Serial::parse(serial).expect("a test serial");
    let mut dev = env
        .mqtt(Role::Device, serial)
        .connect(broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ack_topic = protocol::topic::dev_ack(&s);
    dev.subscribe_and_wait(&ack_topic).await;
    let state = DeviceState {
        site: "S".repeat(site_len),
        model: "MX-1".into(),
        firmware: "1.0".into(),
    };
    dev.publish(
        &protocol::topic::dev_up(&s, UpKind::State),
        envelope(1, &state),
    )
    .await;
    let up = protocol::topic::dev_up(&s, UpKind::Alarm);
    for i in 0..codes {
        let report = AlarmReport {
            code: format!("F-{i:04}"),
            event: FaultEvent::Raised,
            detail: "flood".into(),
            at: chrono::Utc::now(),
            total: None,
        };
        dev.publish(&up, envelope(2 + i as u64, &report)).await;
    }
    let mut answered = std::collections::BTreeSet::new();
    let mut acks = FloodAcks {
        stored: 0,
        rejected: Vec::new(),
    };
    while answered.len() < codes + 1 {
        let p = dev.next_publish_on(&ack_topic, harness::secs(60)).await;
        for ack in open::<AckBatch>(&p).body.acks {
            if !answered.insert(ack.id) || ack.id == 1 {
                continue;
            }
            match ack.outcome {
                AckOutcome::Stored | AckOutcome::Duplicate => acks.stored += 1,
                AckOutcome::Rejected { reason } => acks.rejected.push(reason),
            }
        }
    }
    dev.disconnect().await;
    acks
}
