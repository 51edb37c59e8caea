//! The JSON mirror is for integrators with ordinary MQTT tools (docs/decisions.md, D4): here, the
//! real `mosquitto_sub`, with an integrator certificate.

use std::process::Stdio;

use harness::{FIG9_KEYS, TestEnv, deadline};
use protocol::Role;
use serde::Deserialize;
use serde_json::Value;
use tokio::process::Command;

/// A job as the mirror shows it. Unknown fields are refused: this pins the format integrators
/// parse, so a change to it is a decision, not an accident (STYLE §6).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read through Debug and the assertions on the raw JSON
struct MirroredJob {
    id: String,
    serial: String,
    site: String,
    instruction: String,
    data_type: String,
    server: String,
    host: String,
    instruction_time: Option<String>,
    execution_time: Option<String>,
    status: String,
    submitted_at: String,
    updated_at: String,
    #[serde(default)]
    reason: Option<String>,
    timeline: Vec<Value>,
    #[serde(default)]
    data: Option<Value>,
}

/// `mosquitto_sub`, or a failure that says how to get it: a skipped test would hide that the
/// mirror went unchecked.
fn mosquitto_sub() -> &'static str {
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

#[tokio::test]
async fn json_mirror_is_readable_with_mosquitto_sub() {
    let sub = mosquitto_sub();
    let env = TestEnv::new("json_mirror_is_readable_with_mosquitto_sub");
    let broker = env.broker().start().await;
    let _c1 = env.device("C1").site("Kobe").start(&broker).await;
    let host = env.host("svc", &broker);
    let job = host.submit_get_data("C1").await;
    host.wait_for_status(&job, "succeeded", deadline()).await;

    let crm = env.certs(Role::Integrator, "crm");
    let mut cmd = Command::new(sub);
    cmd.args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .arg("--cafile")
        .arg(&crm.ca)
        .arg("--cert")
        .arg(&crm.cert)
        .arg("--key")
        .arg(&crm.key)
        // Only job views: the device's state view is retained under json/fleet/ too.
        .args([
            "-i",
            "crm",
            "-t",
            "json/fleet/+/jobs/+",
            "-C",
            "1",
            "-W",
            "20",
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let shown = format!("{:?}", cmd.as_std());
    let out = tokio::time::timeout(deadline(), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{shown} did not finish"))
        .unwrap_or_else(|e| panic!("could not run {shown}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "{shown}: {}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");

    let json: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the mirror is not JSON: {e}\n{report}"));
    for key in FIG9_KEYS {
        assert!(
            json.get(key).is_some(),
            "the mirror lacks the Fig. 9 column {key:?}:\n{json:#}"
        );
    }
    let mirrored: MirroredJob = serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("the mirror's format changed: {e}\n{json:#}"));
    assert_eq!(mirrored.id, job, "{mirrored:#?}");
    assert_eq!(mirrored.serial, "C1", "{mirrored:#?}");
    assert_eq!(mirrored.site, "Kobe", "{mirrored:#?}");
    assert_eq!(mirrored.status, "succeeded", "{mirrored:#?}");
    assert!(
        json["data"]["counters"]["total"]
            .as_i64()
            .is_some_and(|t| t > 0),
        "{json:#}"
    );
}
