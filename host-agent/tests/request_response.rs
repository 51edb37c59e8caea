//! host-agent against a real MQTT router over real mutual TLS.
//!
//! The relay here is a stand-in for chukei's broker: rumqttd on a loopback port, fronted by a TLS
//! terminator that requires a client certificate from the test CA (as the gateway does), and a
//! "core" MQTT client that answers `host/+/req` the way each test tells it to. The real broker's
//! end-to-end tests live in /tests; these pin the host side: subscribe-before-publish, resend
//! with the same msg id, reply routing, the binary's stdout, stderr and exit codes, and `watch`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use host_agent::{ConnectOptions, HostClient};
use protocol::artifact::{ArtifactId, ArtifactInfo, ArtifactRef, CHUNK_SIZE};
use protocol::host::{HostReply, HostRequest, HostResponse};
use protocol::job::{JobDetail, JobEvent, JobStatus, JobView};
use protocol::topic::{self, Topic};
use protocol::url::BrokerUrl;
use protocol::{Envelope, HostId, MsgId, Role};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::timeout;

const PATIENCE: Duration = Duration::from_secs(20);

/// How the core answers: given the request and how many times this msg id has been seen
/// (1 for the first), a reply, or `None` to stay silent.
type Behaviour = Arc<dyn Fn(&HostRequest, u32) -> Option<HostReply> + Send + Sync>;

struct Relay {
    dir: tempfile::TempDir,
    url: BrokerUrl,
    mqtt: SocketAddr,
    /// Every request the core received: (host, msg id), in order.
    seen: Arc<Mutex<Vec<(String, MsgId)>>>,
}

impl Relay {
    async fn start(behaviour: Behaviour) -> Relay {
        let dir = tempfile::tempdir().expect("temp dir");
        pki::init(dir.path(), &[]).expect("pki init");
        pki::issue_to_dir(dir.path(), Role::Host, "svc").expect("issue host");
        pki::issue_to_dir(dir.path(), Role::Device, "C123").expect("issue device");

        let mqtt = start_rumqttd();
        let url = start_tls_terminator(dir.path(), mqtt).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        start_core(mqtt, behaviour, seen.clone()).await;
        Relay {
            dir,
            url,
            mqtt,
            seen,
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join(pki::CA_CERT)
    }

    fn cert(&self, role: &str, id: &str) -> (PathBuf, PathBuf) {
        let base = self.dir.path().join(role);
        (
            base.join(format!("{id}.pem")),
            base.join(format!("{id}.key")),
        )
    }

    fn tls(&self) -> host_agent::tls::HostTls {
        let (cert, key) = self.cert("host", "svc");
        host_agent::tls::load(&self.ca(), &cert, &key).expect("host TLS")
    }

    /// `host-agent --broker … --ca … --cert … --key … ARGS`, as host svc.
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let (cert, key) = self.cert("host", "svc");
        self.command_as(&self.url.to_string(), &self.ca(), &cert, &key, args)
    }

    fn command_as(
        &self,
        broker: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
        args: &[&str],
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_host-agent"));
        cmd.arg("--broker")
            .arg(broker)
            .arg("--ca")
            .arg(ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Output {
        run(self.command(args)).await
    }

    /// Publishes a job view the way the broker does, and returns once the router has it.
    ///
    /// A connection the stand-in rumqttd closes before its PUBACK is tried again, up to three
    /// times, on a new connection (a retained publish may be repeated): once in a full CI run
    /// rumqttd closed a fresh publisher's connection right after its CONNACK, for a reason not
    /// found, and these tests are about the host agent, not about rumqttd.
    async fn publish_view(&self, view: &JobView) {
        let serial = protocol::Serial::parse(&view.serial).expect("serial");
        let job = protocol::JobId::parse(&view.id).expect("job id");
        let bytes = Envelope::new(0, Utc::now(), view.clone())
            .to_cbor()
            .expect("cbor");
        let mut failures = Vec::new();
        for _ in 0..3 {
            match self
                .publish_retained(&topic::fleet_job(&serial, &job), &bytes)
                .await
            {
                Ok(()) => return,
                Err(e) => failures.push(e),
            }
        }
        panic!("publishing a view failed three times: {failures:?}");
    }

    /// One QoS 1 retained publish on a connection of its own, until its PUBACK.
    async fn publish_retained(&self, topic: &str, bytes: &[u8]) -> Result<(), String> {
        let opts = MqttOptions::new(
            format!("fleet-{}", rand::random::<u32>()),
            "127.0.0.1",
            self.mqtt.port(),
        );
        let (client, mut events) = AsyncClient::new(opts, 10);
        client
            .publish(topic, QoS::AtLeastOnce, true, bytes.to_vec())
            .await
            .expect("queue publish");
        let acked = async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let result = timeout(PATIENCE, acked)
            .await
            .unwrap_or_else(|_| Err("no PUBACK in time".into()));
        let _ = client.disconnect().await;
        result
    }

    fn seen(&self) -> Vec<(String, MsgId)> {
        self.seen.lock().unwrap().clone()
    }
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run(mut cmd: tokio::process::Command) -> Output {
    let out = timeout(PATIENCE, cmd.output())
        .await
        .expect("host-agent did not finish in time")
        .expect("could not run host-agent");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// rumqttd binds the address it is given and does not report it back, so we probe a free
/// loopback port first, below the kernel's ephemeral range (32768–60999 by default): every
/// other socket these tests open is bound on port 0, which takes its port from that range, so
/// none of them can take this one between the probe and rumqttd's bind. (Probed from that
/// range, the port can go to another test's socket first; rumqttd's bind then fails unseen,
/// the likeliest reading of a view publish here once closed abruptly in a full CI run.) The
/// terminator in front — the address host-agent is given — is bound on port 0 and read back.
fn start_rumqttd() -> SocketAddr {
    use rand::Rng;
    let addr = loop {
        let port = rand::thread_rng().gen_range(20_000..32_000);
        if let Ok(probe) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            break probe.local_addr().unwrap();
        }
    };
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 16 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 << 20,
            max_segment_count: 8,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    addr
}

/// Terminates mutual TLS with the test CA's server certificate and pipes the bytes to rumqttd.
async fn start_tls_terminator(pki_dir: &Path, mqtt: SocketAddr) -> BrokerUrl {
    let acceptor =
        tokio_rustls::TlsAcceptor::from(pki::server_config(pki_dir).expect("server TLS"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Ok(mut tls)) = timeout(PATIENCE, acceptor.accept(tcp)).await else {
                    return;
                };
                let Ok(mut up) = TcpStream::connect(mqtt).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    format!("mqtts://127.0.0.1:{port}").parse().expect("url")
}

/// The broker core's stand-in: answers `host/+/req` on `host/{host}/resp` per `behaviour`.
async fn start_core(
    mqtt: SocketAddr,
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<(String, MsgId)>>>,
) {
    let mut opts = MqttOptions::new("core", "127.0.0.1", mqtt.port());
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut events) = AsyncClient::new(opts, 100);
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        let mut counts: HashMap<MsgId, u32> = HashMap::new();
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(topic::ALL_HOST_REQ, QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(Topic::HostReq { host }) = Topic::parse(&p.topic) else {
                        continue;
                    };
                    let Ok(env) = Envelope::<HostRequest>::from_cbor(&p.payload, 1 << 20) else {
                        continue;
                    };
                    seen.lock().unwrap().push((host.to_string(), env.id));
                    let n = counts.entry(env.id).or_default();
                    *n += 1;
                    if let Some(reply) = behaviour(&env.body, *n) {
                        let resp = HostResponse {
                            reply_to: env.id,
                            reply,
                        };
                        let bytes = Envelope::new(0, Utc::now(), resp).to_cbor().unwrap();
                        let _ = client.try_publish(
                            topic::host_resp(&host),
                            QoS::AtLeastOnce,
                            false,
                            bytes,
                        );
                    }
                }
                Ok(_) => {}
                // rumqttd may still be starting: poll again after a short backoff.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    timeout(PATIENCE, ready_rx)
        .await
        .expect("core never subscribed")
        .expect("core task died");
}

fn view(id: &str, serial: &str, status: JobStatus) -> JobView {
    let now = Utc::now();
    JobView {
        id: id.into(),
        serial: serial.into(),
        site: "Osaka 3F".into(),
        instruction: "GET DATA".into(),
        data_type: "counters".into(),
        server: "relay-test".into(),
        host: "svc".into(),
        instruction_time: Some(now),
        execution_time: None,
        status,
        submitted_at: now,
        updated_at: now,
        reason: None,
    }
}

/// A plausible broker: accepts serial C123, rejects anything else, knows job J-000001.
fn plausible() -> Behaviour {
    Arc::new(|req, _| {
        Some(match req {
            HostRequest::Submit(s) if s.serial == "C123" => HostReply::Submitted {
                job: view("J-000001", &s.serial, JobStatus::Queued),
            },
            HostRequest::Submit(s) => HostReply::Rejected {
                job: view("J-000002", &s.serial, JobStatus::Rejected),
                reason: format!(
                    "serial {:?} is not valid: use only ASCII letters, digits or -",
                    s.serial
                ),
            },
            HostRequest::List { all } => {
                let mut jobs = vec![view("J-000001", "C123", JobStatus::InProgress)];
                if *all {
                    jobs.push(view("J-000002", "bad/serial", JobStatus::Rejected));
                }
                HostReply::Jobs { jobs }
            }
            HostRequest::Show { job } if job == "J-000001" => HostReply::Job {
                job: Box::new(JobDetail {
                    view: view("J-000001", "C123", JobStatus::Succeeded),
                    timeline: vec![JobEvent {
                        at: Utc::now(),
                        status: JobStatus::Queued,
                        note: None,
                    }],
                    data: None,
                }),
            },
            HostRequest::Show { job } => HostReply::Error {
                reason: format!("job {job} is not known"),
            },
            HostRequest::Cancel { job } if job == "J-000001" => HostReply::Canceled {
                job: view("J-000001", "C123", JobStatus::Canceled),
            },
            HostRequest::Cancel { job } if job == "J-000002" => HostReply::Error {
                reason: format!("{job} already ended (succeeded); nothing to cancel"),
            },
            HostRequest::Cancel { job } => HostReply::Error {
                reason: format!("{job} is in progress on the device and cannot be stopped safely"),
            },
            HostRequest::UploadBegin { .. }
            | HostRequest::UploadChunk { .. }
            | HostRequest::Artifacts => HostReply::Error {
                reason: "no artifact store in this stand-in".into(),
            },
            HostRequest::Alarms { .. }
            | HostRequest::AckAlarm { .. }
            | HostRequest::Relays
            | HostRequest::ExportCounters { .. } => HostReply::Error {
                reason: "no alarms or readings in this stand-in".into(),
            },
            HostRequest::CreateRollout { .. }
            | HostRequest::Rollouts
            | HostRequest::ShowRollout { .. }
            | HostRequest::ActOnRollout { .. }
            | HostRequest::Devices { .. }
            | HostRequest::TagDevices { .. } => HostReply::Error {
                reason: "no rollouts or devices in this stand-in".into(),
            },
        })
    })
}

#[tokio::test]
async fn an_unanswered_request_is_resent_with_the_same_id_until_answered() {
    // Silent the first time each msg id is seen, as if the reply had been lost.
    let relay = Relay::start(Arc::new(|req, n| match req {
        HostRequest::List { .. } if n >= 2 => Some(HostReply::Jobs { jobs: vec![] }),
        _ => None,
    }))
    .await;
    let tls = relay.tls();
    let client = HostClient::connect(&relay.url, tls.config, tls.host)
        .await
        .expect("connect");
    let jobs = client
        .list(false)
        .await
        .expect("list answered after a resend");
    assert!(jobs.is_empty());
    let seen = relay.seen();
    assert_eq!(seen.len(), 2, "one send and one resend: {seen:?}");
    assert_eq!(seen[0], seen[1], "the resend must carry the same msg id");
    assert_eq!(seen[0].0, "svc", "published on host/svc/req");
    assert_ne!(seen[0].1, 0);
    client.disconnect().await;
}

#[tokio::test]
async fn each_request_gets_its_own_reply() {
    let relay = Relay::start(plausible()).await;
    let tls = relay.tls();
    let client = HostClient::connect(&relay.url, tls.config, tls.host)
        .await
        .expect("connect");
    let (open, all, shown) = tokio::join!(
        client.list(false),
        client.list(true),
        client.show("J-000001")
    );
    assert_eq!(open.unwrap().len(), 1);
    assert_eq!(all.unwrap().len(), 2);
    assert_eq!(shown.unwrap().view.status, JobStatus::Succeeded);
    let e = client.show("J-9").await.unwrap_err();
    assert!(
        e.is_refusal() && e.to_string().contains("J-9 is not known"),
        "{e}"
    );
    let ids: Vec<MsgId> = relay.seen().iter().map(|s| s.1).collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids.len(), unique.len(), "fresh msg id per request: {ids:?}");
}

#[tokio::test]
async fn submit_prints_only_the_job_id() {
    let relay = Relay::start(plausible()).await;
    let out = relay
        .run(&[
            "jobs",
            "submit",
            "--serial",
            "C123",
            "--kind",
            "get-data",
            "--sections",
            "counters",
        ])
        .await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "J-000001\n");
}

#[tokio::test]
async fn a_rejected_submission_exits_1_with_the_reason() {
    let relay = Relay::start(plausible()).await;
    let out = relay
        .run(&[
            "jobs",
            "submit",
            "--serial",
            "bad/serial",
            "--kind",
            "get-data",
        ])
        .await;
    assert_eq!(out.code, Some(1), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr
            .starts_with("error: job J-000002 rejected: serial \"bad/serial\" is not valid"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn list_prints_the_table_or_json() {
    let relay = Relay::start(plausible()).await;
    let out = relay.run(&["jobs", "list", "--all"]).await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert!(
        lines[0].starts_with("ID") && lines[0].ends_with("STATUS"),
        "{}",
        out.stdout
    );
    assert!(
        lines[1].contains("J-000001") && lines[1].ends_with("in-progress"),
        "{}",
        out.stdout
    );
    assert!(
        lines[2].contains("bad/serial") && lines[2].ends_with("rejected"),
        "{}",
        out.stdout
    );

    let out = relay.run(&["jobs", "list", "--json"]).await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    assert_eq!(
        json.as_array().map(Vec::len),
        Some(1),
        "open jobs only: {json}"
    );
    assert_eq!(json[0]["status"], "in-progress");
}

#[tokio::test]
async fn show_prints_the_job_and_an_unknown_id_exits_1() {
    let relay = Relay::start(plausible()).await;
    let out = relay.run(&["jobs", "show", "J-000001", "--json"]).await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    assert_eq!(json["id"], "J-000001");
    assert_eq!(json["timeline"][0]["status"], "queued");

    let out = relay.run(&["jobs", "show", "J-000001"]).await;
    assert!(
        out.stdout.starts_with("job J-000001: succeeded\n"),
        "{}",
        out.stdout
    );

    let out = relay.run(&["jobs", "show", "J-404"]).await;
    assert_eq!(out.code, Some(1), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("job J-404 is not known"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn a_silent_broker_is_a_timeout_with_exit_2() {
    let relay = Relay::start(Arc::new(|_, _| None)).await;
    let out = relay.run(&["--timeout-secs", "3", "jobs", "list"]).await;
    assert_eq!(out.code, Some(2), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("no reply from") && out.stderr.contains("--timeout-secs"),
        "{}",
        out.stderr
    );
    let tries = relay.seen().len();
    assert!(tries >= 2, "resent every 2 s within 3 s, saw {tries}");
}

#[tokio::test]
async fn no_broker_exits_2_and_says_what_to_check() {
    let relay = Relay::start(plausible()).await;
    // A port nobody listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (cert, key) = relay.cert("host", "svc");
    let out = run(relay.command_as(
        &format!("mqtts://127.0.0.1:{closed}"),
        &relay.ca(),
        &cert,
        &key,
        &["jobs", "list"],
    ))
    .await;
    assert_eq!(out.code, Some(2), "stderr: {}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("could not connect to mqtts://127.0.0.1:{closed}"))
            && out.stderr.contains("check --broker"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn a_device_certificate_is_refused_with_the_fix() {
    let relay = Relay::start(plausible()).await;
    let (cert, key) = relay.cert("device", "C123");
    let out = run(relay.command_as(
        &relay.url.to_string(),
        &relay.ca(),
        &cert,
        &key,
        &["jobs", "list"],
    ))
    .await;
    assert_eq!(out.code, Some(2), "stderr: {}", out.stderr);
    assert!(
        out.stderr
            .contains("broker pki issue --role host --id NAME"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn watch_prints_retained_views_then_changes_beside_other_commands() {
    let relay = Relay::start(plausible()).await;
    relay
        .publish_view(&view("J-000001", "C123", JobStatus::Queued))
        .await;

    let mut cmd = relay.command(&["watch", "--json"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut watch = cmd.spawn().expect("spawn watch");
    let mut stdout = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(watch.stderr.take().unwrap()).lines();
    let next_json = async |lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>| {
        let line = timeout(PATIENCE, lines.next_line())
            .await
            .expect("no watch line in time");
        let line = line.expect("read stdout").expect("watch ended");
        serde_json::from_str::<serde_json::Value>(&line).expect("one JSON object per line")
    };

    let first = next_json(&mut stdout).await;
    assert_eq!(
        (first["id"].as_str(), first["status"].as_str()),
        (Some("J-000001"), Some("queued"))
    );
    let ready = timeout(PATIENCE, stderr.next_line())
        .await
        .expect("no stderr line")
        .unwrap()
        .unwrap();
    assert!(ready.contains("watching job changes"), "{ready}");

    // A command of the same host must not take watch's session over.
    let out = relay
        .run(&["jobs", "submit", "--serial", "C123", "--kind", "get-data"])
        .await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);

    relay
        .publish_view(&view("J-000001", "C123", JobStatus::Delivered))
        .await;
    let second = next_json(&mut stdout).await;
    assert_eq!(second["status"], "delivered", "{second}");

    // SIGTERM: a clean disconnect and exit 0.
    let pid = watch.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = timeout(PATIENCE, watch.wait())
        .await
        .expect("watch did not stop")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_session_opened_for_watch_also_carries_requests() {
    let relay = Relay::start(plausible()).await;
    let tls = relay.tls();
    let host = HostId::parse("svc").unwrap();
    let opts = ConnectOptions {
        client_id: Some("svc:test-1".into()),
        watch_jobs: true,
        ..Default::default()
    };
    let mut client = HostClient::connect_with(&relay.url, tls.config, host, opts)
        .await
        .expect("connect");
    let mut views = client.take_job_views().expect("views");
    assert!(client.take_job_views().is_none(), "taken once");
    relay
        .publish_view(&view("J-000003", "C123", JobStatus::InProgress))
        .await;
    let v = timeout(PATIENCE, views.recv())
        .await
        .expect("no view")
        .expect("closed");
    assert_eq!(v.id, "J-000003");
    assert_eq!(client.list(false).await.expect("list").len(), 1);
}

#[tokio::test]
async fn certificates_from_another_ca_fail_with_exit_2_and_name_the_tls_flags() {
    let relay = Relay::start(plausible()).await;
    let other = tempfile::tempdir().unwrap();
    pki::init(other.path(), &[]).unwrap();
    let (other_cert, other_key) = pki::issue_to_dir(other.path(), Role::Host, "svc").unwrap();
    let url = relay.url.to_string();

    // We do not trust the server: our --ca is not the one that signed it.
    let (cert, key) = relay.cert("host", "svc");
    let other_ca = other.path().join(pki::CA_CERT);
    let out = run(relay.command_as(&url, &other_ca, &cert, &key, &["jobs", "list"])).await;
    assert_eq!(out.code, Some(2), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("could not connect") && out.stderr.contains("--ca"),
        "{}",
        out.stderr
    );

    // The server does not trust us: our certificate is from another CA.
    let out = run(relay.command_as(
        &url,
        &relay.ca(),
        &other_cert,
        &other_key,
        &["jobs", "list"],
    ))
    .await;
    assert_eq!(out.code, Some(2), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("could not connect") && out.stderr.contains("--cert"),
        "{}",
        out.stderr
    );
}

// ---- cancel, keys and artifacts ----------------------------------------------------------

#[tokio::test]
async fn cancel_prints_canceled_and_a_refusal_exits_1_with_the_brokers_reason() {
    let relay = Relay::start(plausible()).await;
    let out = relay.run(&["jobs", "cancel", "J-000001"]).await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "canceled J-000001\n");

    let out = relay.run(&["jobs", "cancel", "J-000002"]).await;
    assert_eq!(out.code, Some(1), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr,
        "error: J-000002 already ended (succeeded); nothing to cancel\n"
    );

    let out = relay.run(&["jobs", "cancel", "J-000003"]).await;
    assert_eq!(out.code, Some(1), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("in progress on the device"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn every_submit_flag_reaches_the_broker() {
    let got: Arc<Mutex<Vec<protocol::host::SubmitJob>>> = Arc::default();
    let record = got.clone();
    let relay = Relay::start(Arc::new(move |req, _| match req {
        HostRequest::Submit(s) => {
            record.lock().unwrap().push(s.clone());
            Some(HostReply::Submitted {
                job: view("J-000009", &s.serial, JobStatus::Queued),
            })
        }
        _ => None,
    }))
    .await;
    let out = relay
        .run(&[
            "jobs",
            "submit",
            "--serial",
            "C123",
            "--kind",
            "update-data",
            "--set",
            "adjustment.density=6",
            "--set",
            "adjustment.toner_save=false",
            "--set",
            "settings.host_url=https://svc.example.com/a=b",
            "--merge",
            "device",
        ])
        .await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "J-000009\n");
    let out = relay
        .run(&[
            "jobs",
            "submit",
            "--serial",
            "C123",
            "--kind",
            "set-schedule",
            "--mode",
            "periodic",
            "--interval-secs",
            "900",
            "--calendar",
            "weekly:sun 02:00",
            "--calendar",
            "daily:22:00",
            "--moment",
            "power-on",
            "--condition",
            "count:total/1000",
        ])
        .await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);

    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    use protocol::data::Value;
    assert_eq!(
        got[0].values,
        std::collections::BTreeMap::from([
            ("adjustment.density".to_owned(), Value::Int(6)),
            ("adjustment.toner_save".to_owned(), Value::Bool(false)),
            (
                "settings.host_url".to_owned(),
                Value::Text("https://svc.example.com/a=b".into())
            ),
        ])
    );
    assert_eq!(got[0].merge.as_deref(), Some("device"));
    assert_eq!(got[1].mode.as_deref(), Some("periodic"));
    assert_eq!(got[1].interval_secs, Some(900));
    assert_eq!(got[1].calendar, ["weekly:sun 02:00", "daily:22:00"]);
    assert_eq!(got[1].moments, ["power-on"]);
    assert_eq!(got[1].conditions, ["count:total/1000"]);
    // The broker's own check accepts what the CLI sent.
    for job in &got {
        protocol::validate::submission(job, Utc::now()).expect("a valid submission");
    }
}

/// `host-agent keys generate` without any connection flag.
fn keys_generate(out: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .args(["keys", "generate", "--out"])
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .expect("run host-agent keys generate")
}

#[test]
fn keys_generate_works_offline_writes_0600_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("keys");
    let out = keys_generate(&out_dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = out_dir.join("publisher.key");
    let public = out_dir.join("publisher.pub");
    assert!(
        stdout.contains(&secret.display().to_string())
            && stdout.contains(&public.display().to_string())
            && stdout.contains(&format!(
                "device-agent … --publisher-key {}",
                public.display()
            )),
        "{stdout}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let public_text = std::fs::read_to_string(&public).unwrap();
    let key = host_agent::keys::load_signing_key(&secret).unwrap();
    assert_eq!(
        host_agent::keys::parse_public_key(&public_text).unwrap(),
        key.verifying_key()
    );

    let before = std::fs::read(&secret).unwrap();
    let again = keys_generate(&out_dir);
    assert_eq!(again.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("already exists"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&secret).unwrap(), before, "key unchanged");
}

/// A stand-in for the broker's artifact store, keeping to its contract: `received` is the
/// contiguous prefix held, the last chunk triggers the digest check, a mismatch drops the
/// chunks and is an Error.
#[derive(Default)]
struct Shelf {
    items: HashMap<String, (ArtifactInfo, Vec<Vec<u8>>)>,
    /// Every UploadBegin: (artifact, version, size, chunk size, signature).
    begins: Vec<(String, String, u64, u32, String)>,
    /// Every chunk index received, resends included.
    chunks: Vec<u32>,
    /// Stay silent about this chunk, as if the link were cut while it was on its way.
    lose: Option<u32>,
    /// Flip a byte of every stored chunk, as a damaged store would.
    corrupt: bool,
}

fn shelf(state: Arc<Mutex<Shelf>>) -> Behaviour {
    Arc::new(move |req, _| {
        let mut shelf = state.lock().unwrap();
        match req {
            HostRequest::UploadBegin {
                artifact,
                version,
                size,
                chunk_size,
                signature,
            } => {
                shelf.begins.push((
                    artifact.clone(),
                    version.clone(),
                    *size,
                    *chunk_size,
                    signature.clone(),
                ));
                let Ok(id) = ArtifactId::parse(artifact) else {
                    return Some(HostReply::Error {
                        reason: format!("artifact id {artifact:?} is not SHA-256 hex"),
                    });
                };
                let entry = shelf.items.entry(artifact.clone()).or_insert_with(|| {
                    let info = ArtifactInfo {
                        artifact: ArtifactRef {
                            id,
                            version: version.clone(),
                            size: *size,
                            chunk_size: *chunk_size,
                            signature: signature.clone(),
                            publisher: "svc".into(),
                        },
                        received: 0,
                        complete: false,
                        uploaded_at: Utc::now(),
                    };
                    (info, Vec::new())
                });
                Some(HostReply::Upload {
                    artifact: entry.0.clone(),
                })
            }
            HostRequest::UploadChunk { chunk } => {
                shelf.chunks.push(chunk.index);
                if shelf.lose == Some(chunk.index) {
                    return None;
                }
                let corrupt = shelf.corrupt;
                let key = chunk.artifact.to_string();
                let Some((info, held)) = shelf.items.get_mut(&key) else {
                    return Some(HostReply::Error {
                        reason: format!("no upload of {key} begun"),
                    });
                };
                if chunk.index == info.received && !info.complete {
                    let mut data = chunk.data.clone();
                    if corrupt {
                        data[0] ^= 0xff;
                    }
                    held.push(data);
                    info.received += 1;
                }
                if info.received == info.artifact.chunks() && !info.complete {
                    let digest = host_agent::upload::digest(&held.concat());
                    if digest != info.artifact.id {
                        shelf.items.remove(&key);
                        return Some(HostReply::Error {
                            reason: format!(
                                "digest mismatch: the uploaded bytes do not hash to {key}; upload again"
                            ),
                        });
                    }
                    info.complete = true;
                }
                Some(HostReply::Upload {
                    artifact: info.clone(),
                })
            }
            HostRequest::Artifacts => Some(HostReply::Artifacts {
                artifacts: shelf.items.values().map(|(i, _)| i.clone()).collect(),
            }),
            _ => None,
        }
    })
}

/// A keys directory and a firmware file of `chunks` full chunks plus a short last one.
fn firmware(dir: &Path, chunks: usize) -> (PathBuf, PathBuf, PathBuf, Vec<u8>) {
    let keys = dir.join("keys");
    assert!(keys_generate(&keys).status.success());
    let bytes: Vec<u8> = (0..chunks * CHUNK_SIZE as usize + 100)
        .map(|i| (i % 251) as u8)
        .collect();
    let file = dir.join("fw-2.1.bin");
    std::fs::write(&file, &bytes).unwrap();
    (
        file,
        keys.join("publisher.key"),
        keys.join("publisher.pub"),
        bytes,
    )
}

#[tokio::test]
async fn upload_sends_each_chunk_once_signed_and_prints_only_the_id() {
    let state = Arc::new(Mutex::new(Shelf::default()));
    let relay = Relay::start(shelf(state.clone())).await;
    let work = tempfile::tempdir().unwrap();
    let (file, secret, public, bytes) = firmware(work.path(), 3);
    let file_arg = file.display().to_string();
    let key_arg = secret.display().to_string();
    let upload = [
        "artifacts",
        "upload",
        file_arg.as_str(),
        "--version",
        "2.1",
        "--signing-key",
        key_arg.as_str(),
    ];

    let out = relay.run(&upload).await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let id = host_agent::upload::digest(&bytes);
    assert_eq!(out.stdout, format!("{id}\n"), "the id alone on stdout");
    {
        let shelf = state.lock().unwrap();
        assert_eq!(shelf.chunks, [0, 1, 2, 3], "each chunk once, in order");
        let (artifact, version, size, chunk_size, signature) = &shelf.begins[0];
        assert_eq!(
            (artifact.as_str(), version.as_str(), *size, *chunk_size),
            (id.as_str(), "2.1", bytes.len() as u64, CHUNK_SIZE)
        );
        // What a device provisioned with publisher.pub checks.
        let public =
            host_agent::keys::parse_public_key(&std::fs::read_to_string(&public).unwrap()).unwrap();
        host_agent::keys::verify_artifact(&public, &id, "2.1", signature)
            .expect("the signature verifies with the public key");
        assert!(shelf.items[id.as_str()].0.complete);
    }

    // Again: the relay has it all, so nothing is sent, and the id is printed all the same.
    let out = relay.run(&upload).await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, format!("{id}\n"));
    assert!(out.stderr.contains("nothing sent"), "{}", out.stderr);
    assert_eq!(state.lock().unwrap().chunks.len(), 4, "no chunk sent twice");

    let out = relay.run(&["artifacts", "list"]).await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(lines[0].starts_with("ID") && lines[0].ends_with("UPLOADED"));
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &cells[..6],
        [
            &id.as_str()[..12],
            "2.1",
            &bytes.len().to_string(),
            "4/4",
            "yes",
            "svc"
        ],
        "{}",
        out.stdout
    );
    let out = relay.run(&["artifacts", "list", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    assert_eq!(json[0]["id"], id.as_str());
    assert_eq!(json[0]["complete"], true);
}

#[tokio::test]
async fn an_interrupted_upload_resumes_where_the_relays_copy_ends() {
    let state = Arc::new(Mutex::new(Shelf {
        lose: Some(2),
        ..Shelf::default()
    }));
    let relay = Relay::start(shelf(state.clone())).await;
    let work = tempfile::tempdir().unwrap();
    let (file, secret, _, bytes) = firmware(work.path(), 4);
    let file_arg = file.display().to_string();
    let key_arg = secret.display().to_string();
    let upload = [
        "--timeout-secs",
        "2",
        "artifacts",
        "upload",
        file_arg.as_str(),
        "--version",
        "2.1",
        "--signing-key",
        key_arg.as_str(),
    ];

    // Chunk 2 never gets an answer: the upload gives up after the timeout.
    let out = relay.run(&upload).await;
    assert_eq!(out.code, Some(2), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("no reply"), "{}", out.stderr);
    let first_try = state.lock().unwrap().chunks.clone();
    assert_eq!(&first_try[..3], [0, 1, 2]);
    assert!(first_try[2..].iter().all(|i| *i == 2), "{first_try:?}");

    // The link is back: the next run starts at chunk 2, never sending 0 or 1 again.
    state.lock().unwrap().lose = None;
    let out = relay.run(&upload).await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_eq!(
        out.stdout,
        format!("{}\n", host_agent::upload::digest(&bytes))
    );
    assert!(out.stderr.contains("resumed"), "{}", out.stderr);
    let all = state.lock().unwrap().chunks.clone();
    assert_eq!(all[first_try.len()..], [2, 3, 4], "{all:?}");
}

#[tokio::test]
async fn a_digest_mismatch_exits_1_with_the_relays_reason() {
    let state = Arc::new(Mutex::new(Shelf {
        corrupt: true,
        ..Shelf::default()
    }));
    let relay = Relay::start(shelf(state)).await;
    let work = tempfile::tempdir().unwrap();
    let (file, secret, _, _) = firmware(work.path(), 1);
    let out = relay
        .run(&[
            "artifacts",
            "upload",
            &file.display().to_string(),
            "--version",
            "2.1",
            "--signing-key",
            &secret.display().to_string(),
        ])
        .await;
    assert_eq!(out.code, Some(1), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "", "no id for a refused upload");
    assert!(
        out.stderr
            .starts_with("error: digest mismatch: the uploaded bytes do not hash to")
            && out.stderr.contains("upload again"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn upload_checks_its_files_before_connecting() {
    // No broker at all: the missing key must be reported, not a connection failure.
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("fw.bin");
    std::fs::write(&file, b"image").unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = run({
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_host-agent"));
        cmd.args(["--broker", &format!("mqtts://127.0.0.1:{closed}")])
            .args(["--ca", "ca.pem", "--cert", "svc.pem", "--key", "svc.key"])
            .args(["artifacts", "upload"])
            .arg(&file)
            .args(["--version", "1", "--signing-key"])
            .arg(work.path().join("missing.key"))
            .stdin(Stdio::null());
        cmd
    })
    .await;
    assert_eq!(out.code, Some(2), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("missing.key") && out.stderr.contains("keys generate"),
        "{}",
        out.stderr
    );
}
