//! Notifications (the seed's S116 and S312): mail through a real SMTP server (Python's aiosmtpd,
//! with STARTTLS) and webhooks to a real HTTP listener, queued in redb so they survive a broker
//! restart; a dead SMTP server never slows an alarm down. Also the Prometheus endpoint.

mod emergency;

use std::net::SocketAddr;
use std::time::Instant;

use emergency::{fault, watch_alarms};
use harness::{Proc, TestEnv, deadline, secs};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::mpsc;

/// `N` distinct free ports on loopback: bound together, read, released. The brief window in
/// which another process could take one is the price of starting a server later than the broker
/// that calls it.
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("local address").port())
}

/// An SMTP server that prints every mail it accepts as one JSON line
/// (`{"from":…,"to":[…],"data":"…"}`), with STARTTLS required when given a certificate.
const SMTP_SINK: &str = r#"
import json, sys, ssl, threading
from aiosmtpd.controller import Controller

port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]

class Sink:
    async def handle_DATA(self, server, session, envelope):
        print(json.dumps({
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "tls": session.ssl is not None,
            "data": envelope.content.decode("utf-8", "replace"),
        }), flush=True)
        return "250 OK"

context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
controller = Controller(Sink(), hostname="127.0.0.1", port=port,
                        tls_context=context, require_starttls=True)
controller.start()
print("smtp sink listening", flush=True)
threading.Event().wait()
"#;

/// Starts the SMTP sink on `port` with the relay's own server certificate (its SANs include
/// 127.0.0.1), so the broker's STARTTLS is checked against the test CA.
async fn smtp_sink(env: &TestEnv, port: u16) -> Proc {
    let script = env.path("smtp_sink.py");
    std::fs::write(&script, SMTP_SINK).expect("write the SMTP sink");
    let pki = env.pki().dir();
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .arg(port.to_string())
        .arg(pki.join("server.pem"))
        .arg(pki.join("server.key"));
    let proc = Proc::spawn("smtp-sink".into(), cmd, env.path("smtp-sink.log"));
    proc.wait_for_log("smtp sink listening", deadline()).await;
    proc
}

/// A webhook receiver on `addr`: answers 200 to every request and hands over its body.
async fn webhook_sink(addr: SocketAddr) -> mpsc::UnboundedReceiver<(String, String)> {
    let listener = TcpListener::bind(addr)
        .await
        .expect("bind the webhook sink");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (head, body) = loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            let l = l.to_ascii_lowercase();
                            l.strip_prefix("content-length:")
                                .and_then(|v| v.trim().parse::<usize>().ok())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break (
                            text[..end].to_owned(),
                            String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned(),
                        );
                    }
                };
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = tx.send((head, body));
            });
        }
    });
    rx
}

/// The next webhook body whose `event` is `event`.
async fn next_hook(rx: &mut mpsc::UnboundedReceiver<(String, String)>, event: &str) -> Value {
    let within = secs(30);
    tokio::time::timeout(within, async {
        loop {
            let (head, body) = rx.recv().await.expect("the webhook sink stopped");
            assert!(head.starts_with("POST /chukei HTTP/1.1"), "{head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-type: application/json"),
                "{head}"
            );
            let json: Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("the webhook body is not JSON ({e}): {body}"));
            if json["event"] == event {
                return json;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {event} webhook within {within:?}"))
}

#[tokio::test]
async fn mail_to_two_addresses_and_a_webhook_are_delivered_after_a_restart() {
    let env = TestEnv::new("mail_to_two_addresses_and_a_webhook_are_delivered_after_a_restart");
    let [smtp_port, hook_port] = free_ports::<2>();
    let config = env.path("broker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[notify]
retry_min_secs = 1
retry_max_secs = 1
timeout_secs = 10

[notify.mail]
server = "127.0.0.1"
port = {smtp_port}
security = "starttls"
from = "chukei relay <relay@example.com>"
ca_file = "{ca}"

[[notify.rules]]
on = "alarm"
mail = ["ops@example.com", "Oncall <oncall@example.com>"]

[[notify.rules]]
on = ["alarm", "job-succeeded"]
webhook = "http://127.0.0.1:{hook_port}/chukei"
"#,
            ca = env.pki().ca().display()
        ),
    )
    .expect("write the broker config");

    // Neither the SMTP server nor the webhook receiver is up yet: the notifications wait.
    let mut first = env.broker().arg("--config").arg(&config).start().await;
    let addr = first.addr();
    let c1 = env.device("C1").site("Kobe").start(&first).await;
    fault(&c1, &["raise", "SC-541"]).await;
    first.wait_for_log("alarm raised", deadline()).await;
    first
        .wait_for_lines(
            "two failed deliveries (mail and webhook)",
            2,
            deadline(),
            |l| l.contains("notification failed; will retry"),
        )
        .await;
    assert!(first.stop().await.success());

    // Now they are; the restarted broker finds the queue in redb and delivers.
    let smtp = smtp_sink(&env, smtp_port).await;
    let mut hooks = webhook_sink(SocketAddr::from(([127, 0, 0, 1], hook_port))).await;
    let broker = env
        .broker()
        .arg("--config")
        .arg(&config)
        .listen(addr)
        .start()
        .await;
    broker
        .wait_for_log("notifications waiting from before the restart", deadline())
        .await;

    let line = smtp
        .wait_for_line("a mail", secs(30), |l| l.starts_with("{\"from\""))
        .await;
    let mail: Value = serde_json::from_str(&line).expect("the sink prints JSON");
    assert_eq!(mail["from"], "relay@example.com", "{mail:#}");
    let mut to: Vec<&str> = mail["to"]
        .as_array()
        .expect("recipients")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    to.sort_unstable();
    assert_eq!(to, ["oncall@example.com", "ops@example.com"], "{mail:#}");
    assert_eq!(mail["tls"], true, "STARTTLS is required: {mail:#}");
    let data = mail["data"].as_str().expect("the message");
    for want in [
        "Subject: [chukei] EMERGENCY SC-541 on C1 (Kobe)",
        "main motor failure",
        "alarms ack A-000001",
    ] {
        assert!(data.contains(want), "the mail lacks {want:?}:\n{data}");
    }

    let hook = next_hook(&mut hooks, "alarm").await;
    assert_eq!(hook["alarm"]["serial"], "C1", "{hook:#}");
    assert_eq!(hook["alarm"]["code"], "SC-541", "{hook:#}");
    assert_eq!(hook["alarm"]["site"], "Kobe", "{hook:#}");

    // S116: a job's end notice.
    let host = env.host("svc", &broker);
    let job = host.submit_get_data("C1").await;
    let hook = next_hook(&mut hooks, "job-succeeded").await;
    assert_eq!(hook["job"]["id"], job.as_str(), "{hook:#}");
    assert_eq!(hook["job"]["status"], "succeeded", "{hook:#}");

    broker
        .wait_for_lines("three deliveries", 3, deadline(), |l| {
            l.contains("notification sent")
        })
        .await;
    let mails = smtp.lines_matching(|l| l.starts_with("{\"from\""));
    assert_eq!(mails.len(), 1, "one mail for one alarm: {mails:#?}");
}

/// `GET /metrics` over a plain TCP connection.
async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .expect("send the request");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read the answer");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

#[tokio::test]
async fn a_dead_smtp_server_does_not_slow_an_alarm_and_metrics_show_the_queue() {
    let env = TestEnv::new("a_dead_smtp_server_does_not_slow_an_alarm_and_metrics_show_the_queue");
    // A "mail server" that accepts connections and never says a word.
    let tarpit = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the tarpit");
    let smtp_port = tarpit.local_addr().expect("tarpit address").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = tarpit.accept().await {
            held.push(s);
        }
    });
    let config = env.path("broker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[notify]
timeout_secs = 30

[notify.mail]
server = "127.0.0.1"
port = {smtp_port}
security = "plain"
from = "relay@example.com"

[[notify.rules]]
on = ["alarm", "job-failed"]
mail = ["ops@example.com", "oncall@example.com"]
"#
        ),
    )
    .expect("write the broker config");
    let [metrics_port] = free_ports::<1>();
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let broker = env
        .broker()
        .arg("--config")
        .arg(&config)
        .arg("--metrics-listen")
        .arg(metrics_addr.to_string())
        .start()
        .await;
    let c1 = env.device("C1").start(&broker).await;
    let watch = watch_alarms(&env, &broker, "watch-alarms", false).await;

    let injected = Instant::now();
    fault(&c1, &["raise", "SC-541"]).await;
    watch.wait_for_log("SC-541", deadline()).await;
    let took = injected.elapsed();
    assert!(
        took < secs(3),
        "the alarm took {took:?} to reach the desk with a dead mail server"
    );
    // The mail is stuck in the tarpit, not lost and not in the way (queued once the alarm's
    // coalescing window closed).
    broker
        .wait_for_log("alarm notifications queued", deadline())
        .await;
    let delivered = broker.lines_matching(|l| l.contains("notification sent"));
    assert!(delivered.is_empty(), "{delivered:#?}");
    eprintln!(
        "alarm reached watch {} ms after injection, with the SMTP server dead",
        took.as_millis()
    );

    let text = scrape(metrics_addr).await;
    assert_eq!(metric(&text, "chukei_alarms_active"), 1.0, "{text}");
    assert_eq!(metric(&text, "chukei_notification_queue"), 1.0, "{text}");
    assert!(metric(&text, "chukei_connections_active") >= 2.0, "{text}");
    assert!(
        metric(&text, "chukei_redb_commit_seconds_count") >= 1.0,
        "{text}"
    );
    assert!(metric(&text, "chukei_messages_total") >= 2.0, "{text}");
    assert_eq!(metric(&text, "chukei_alarms_raised_total"), 1.0, "{text}");
    assert_eq!(metric(&text, "chukei_acl_violations_total"), 0.0, "{text}");
    assert!(text.contains("chukei_jobs{status=\"queued\"} 0"), "{text}");
    assert!(
        text.contains("# TYPE chukei_redb_commit_seconds histogram"),
        "{text}"
    );

    // A second scrape sees an ACL violation counted.
    let mut rogue = env
        .mqtt(protocol::Role::Device, "C9")
        .connect(&broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rogue.subscribe("dev/C2/jobs/+").await;
    rogue.expect_closed(deadline()).await;
    let text = scrape(metrics_addr).await;
    assert_eq!(metric(&text, "chukei_acl_violations_total"), 1.0, "{text}");
}

#[tokio::test]
async fn a_flooding_device_gets_one_webhook_per_burst_and_does_not_delay_another_devices_alarm() {
    let env = TestEnv::new(
        "a_flooding_device_gets_one_webhook_per_burst_and_does_not_delay_another_devices_alarm",
    );
    let [hook_port] = free_ports::<1>();
    let mut hooks = webhook_sink(SocketAddr::from(([127, 0, 0, 1], hook_port))).await;
    let config = env.path("broker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[notify]
retry_min_secs = 1
retry_max_secs = 1

[[notify.rules]]
on = "alarm"
webhook = "http://127.0.0.1:{hook_port}/chukei"
"#
        ),
    )
    .expect("write the broker config");
    let broker = env.broker().arg("--config").arg(&config).start().await;

    // One device raises 300 distinct codes at once; then a real copier has a real fault.
    let acks = emergency::flood_alarms(&env, &broker, "C9", 100, 300).await;
    assert_eq!(acks.stored + acks.rejected.len(), 300);
    let c2 = env.device("C2").site("Kobe").start(&broker).await;
    fault(&c2, &["raise", "SC-541"]).await;

    // C2's webhook arrives with at most one of C9's before it, and C9's lists its codes.
    let mut flood_hooks = Vec::new();
    let c2_hook = tokio::time::timeout(secs(60), async {
        loop {
            let (_, body) = hooks.recv().await.expect("the webhook sink stopped");
            let json: Value = serde_json::from_str(&body).expect("JSON");
            if json["alarm"]["serial"] == "C2" {
                return json;
            }
            flood_hooks.push(json);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no webhook for C2 within 60 s ({} for C9)",
            flood_hooks.len()
        )
    });
    assert_eq!(c2_hook["alarm"]["code"], "SC-541", "{c2_hook:#}");
    assert!(
        flood_hooks.len() <= 1,
        "{} webhooks for the flooding device went first",
        flood_hooks.len()
    );
    let flood = match flood_hooks.pop() {
        Some(h) => h,
        None => next_hook(&mut hooks, "alarm").await,
    };
    assert_eq!(flood["serial"], "C9", "{flood:#}");
    let codes = flood["alarms"].as_array().map(Vec::len).unwrap_or(0);
    assert!(
        (2..=65).contains(&codes),
        "one webhook lists the burst's alarms: {flood:#}"
    );
}
