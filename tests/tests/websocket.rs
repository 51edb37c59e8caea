//! MQTT over WebSocket over TLS (`broker run --ws-listen`): the agents use it with `wss://`, and
//! so does a standard client — Python's paho-mqtt with `transport="websockets"` and a client
//! certificate, installed by `scripts/test` — with the same identity and ACL as over TLS.

use std::process::Stdio;

use harness::{TestEnv, deadline};
use protocol::Role;
use serde_json::Value;
use tokio::process::Command;

/// A paho-mqtt client over WebSocket: connects with a client certificate, subscribes to TOPIC,
/// prints what happens, one line per event, and exits 0 after the first message, 2 when it
/// could not connect, 3 when the broker closed the connection, 4 on timeout.
const PAHO: &str = r#"
import sys, threading
import paho.mqtt.client as mqtt
host, port, ca, cert, key, client_id, topic, path = sys.argv[1:9]
done = threading.Event()
result = {"code": 4}
def on_connect(c, userdata, flags, reason, props):
    print("connected", reason, flush=True)
    if reason.is_failure:
        result["code"] = 2; done.set(); return
    c.subscribe(topic, qos=1)
def on_subscribe(c, userdata, mid, reasons, props):
    print("subscribed", [str(r) for r in reasons], flush=True)
def on_message(c, userdata, msg):
    print("message", msg.topic, msg.payload.decode(), flush=True)
    result["code"] = 0; done.set()
def on_disconnect(c, userdata, flags, reason, props):
    print("disconnected", reason, flush=True)
    if not done.is_set():
        result["code"] = 3; done.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                transport="websockets", protocol=mqtt.MQTTv311)
c.ws_set_options(path=path)
c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
c.on_connect, c.on_subscribe, c.on_message, c.on_disconnect = on_connect, on_subscribe, on_message, on_disconnect
try:
    c.connect(host, int(port), keepalive=30)
except Exception as e:
    print("connect failed:", e, flush=True); sys.exit(2)
c.loop_start()
done.wait(20)
c.loop_stop()
sys.exit(result["code"])
"#;

struct PahoRun {
    code: Option<i32>,
    stdout: String,
    report: String,
}

/// Runs [`PAHO`] as `role`/`id` against the broker's WebSocket port.
async fn paho(env: &TestEnv, port: u16, role: Role, id: &str, topic: &str, path: &str) -> PahoRun {
    let certs = env.certs(role, id);
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(PAHO)
        .args(["127.0.0.1", &port.to_string()])
        .arg(&certs.ca)
        .arg(&certs.cert)
        .arg(&certs.key)
        .args([id, topic, path])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let shown = format!("paho as {role}/{id} on {path} subscribing to {topic}");
    let out = tokio::time::timeout(deadline(), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{shown} did not finish"))
        .unwrap_or_else(|e| panic!("could not run python3 for {shown}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("No module named 'paho'"),
        "paho-mqtt is not installed: run `scripts/test`, which installs it (or \
         `python3 -m pip install paho-mqtt`)\n{stderr}"
    );
    PahoRun {
        code: out.status.code(),
        report: format!(
            "{shown}: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        ),
        stdout,
    }
}

#[tokio::test]
async fn agents_and_a_standard_client_speak_mqtt_over_websocket_with_the_same_identity_and_acl() {
    let env = TestEnv::new("agents_and_a_standard_client_speak_mqtt_over_websocket");
    let broker = env.broker().ws().start().await;
    broker
        .wait_for_log("websocket listener ready", deadline())
        .await;
    // A client that connects and says nothing holds only its own task: the handshake (TLS, then
    // the HTTP upgrade) runs off the accept loop, so everyone below still gets in.
    let _silent = std::net::TcpStream::connect(("127.0.0.1", broker.ws_port()))
        .expect("a silent TCP connection to the WebSocket port");

    // Both agents over wss:// only.
    let _c1 = env
        .device("C1")
        .site("Nagoya")
        .brokers(&[broker.ws_url()])
        .start(&broker)
        .await;
    let host = env.host_at("svc", broker.ws_url());
    let job = host.submit_get_data("C1").await;
    let shown = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert!(
        shown["data"]["counters"]["total"]
            .as_i64()
            .is_some_and(|t| t > 0),
        "counters over WebSocket: {shown}"
    );
    let sessions = broker.lines_matching(|l| l.contains("session started"));
    assert!(
        sessions.iter().any(|l| l.contains("client_id=C1")),
        "the device's session over WebSocket:\n{sessions:#?}"
    );

    // A standard client: paho-mqtt over WebSocket with an integrator certificate reads the
    // JSON mirror of that job.
    let run = paho(
        &env,
        broker.ws_port(),
        Role::Integrator,
        "crm",
        "json/fleet/+/jobs/+",
        "/mqtt",
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.report);
    let json = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("message "))
        .and_then(|l| l.split_once(' '))
        .map(|(_, payload)| payload)
        .unwrap_or_else(|| panic!("no message\n{}", run.report));
    let view: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}\n{}", run.report));
    assert_eq!(view["id"], job.as_str(), "{view:#}");
    assert_eq!(view["status"], "succeeded", "{view:#}");

    // The same ACL: a device certificate may not read another device's jobs over WebSocket.
    let run = paho(
        &env,
        broker.ws_port(),
        Role::Device,
        "C9",
        "dev/C1/jobs/+",
        "/mqtt",
    )
    .await;
    assert_eq!(
        run.code,
        Some(3),
        "the broker must close the connection\n{}",
        run.report
    );
    broker
        .wait_for_line("the ACL violation over WebSocket", deadline(), |l| {
            l.contains("acl violation") && l.contains("device:C9")
        })
        .await;

    // Only /mqtt is served.
    let run = paho(
        &env,
        broker.ws_port(),
        Role::Integrator,
        "crm",
        "json/#",
        "/other",
    )
    .await;
    assert!(
        matches!(run.code, Some(2) | Some(3)),
        "an upgrade at another path must be refused\n{}",
        run.report
    );
    broker
        .wait_for_log("websocket upgrade refused", deadline())
        .await;
}
