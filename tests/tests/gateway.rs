//! The gateway in front of the router: identity, ACL, limits and handshakes under load
//! (docs/decisions.md, D1 and D5). Hostile clients are played by the harness's in-process MQTT
//! client.

use std::time::{Duration, Instant};

use harness::mqtt::{MqttClient, envelope, open};
use harness::raw::{self, NOT_AUTHORIZED, RawClient};
use harness::{MqttBuilder, TestEnv, deadline, secs};
use protocol::device::{Ack, AckBatch, AckOutcome, JobUpdate};
use protocol::job::JobStatus;
use protocol::topic::{self, UpKind};
use protocol::{JobId, Role, Serial};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn serial(s: &str) -> Serial {
    Serial::parse(s).unwrap_or_else(|e| panic!("test serial: {e}"))
}

fn job_id(s: &str) -> JobId {
    JobId::parse(s).unwrap_or_else(|e| panic!("`jobs submit` printed a bad job id: {e}"))
}

/// Reads `dev/{serial}/ack` until an ack for message `id` arrives.
async fn ack_for(client: &mut MqttClient, serial: &Serial, id: u64) -> Ack {
    let topic = topic::dev_ack(serial);
    tokio::time::timeout(deadline(), async {
        loop {
            let publish = client.next_publish_on(&topic, deadline()).await;
            let batch = open::<AckBatch>(&publish);
            if let Some(ack) = batch.body.acks.into_iter().find(|a| a.id == id) {
                return ack;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no ack for message {id} on {topic} within {:?}", deadline()))
}

fn rejection(ack: &Ack) -> &str {
    match &ack.outcome {
        AckOutcome::Rejected { reason } => reason,
        other => panic!(
            "message {} should have been rejected, was acked {other:?}",
            ack.id
        ),
    }
}

#[tokio::test]
async fn device_cannot_reach_other_devices_topics() {
    let env = TestEnv::new("device_cannot_reach_other_devices_topics");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);
    let (a1, b2) = (serial("A1"), serial("B2"));
    let job = host.submit_get_data("B2").await;
    let b2_job = job_id(&job);

    // A service desk's dashboard: it must see no change to B2's job while A1 attacks it.
    let mut watch = env
        .mqtt(Role::Host, "svc")
        .client_id("svc:watch")
        .connect(&broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    watch.subscribe("fleet/#").await;
    watch
        .next_publish_on(&topic::fleet_job(&b2, &b2_job), deadline())
        .await;

    let attacker = || env.mqtt(Role::Device, "A1");
    let connect = |who: MqttBuilder| {
        let broker = &broker;
        async move {
            who.connect(broker)
                .await
                .unwrap_or_else(|e| panic!("A1 may connect as itself: {e}"))
        }
    };

    // Reading B2's jobs, then everything.
    for filter in ["dev/B2/#", "#", "dev/+/jobs/+"] {
        let mut c = connect(attacker()).await;
        c.subscribe(filter).await;
        let why = c.expect_closed(deadline()).await;
        eprintln!("SUBSCRIBE {filter} as A1: closed ({why})");
    }

    // Writing B2's result on B2's topic.
    let forged = JobUpdate {
        errors: Default::default(),
        job: b2_job.clone(),
        status: JobStatus::Succeeded,
        note: None,
        data: None,
    };
    let mut c = connect(attacker()).await;
    c.publish(&topic::dev_up(&b2, UpKind::Job), envelope(1, &forged))
        .await;
    c.expect_closed(deadline()).await;

    // Claiming B2's job on A1's own topic passes the ACL, and is refused by the core.
    let mut c = connect(attacker()).await;
    c.subscribe(&topic::dev_ack(&a1)).await;
    c.publish(&topic::dev_up(&a1, UpKind::Job), envelope(2, &forged))
        .await;
    let ack = ack_for(&mut c, &a1, 2).await;
    assert!(rejection(&ack).contains("not addressed"), "{ack:?}");

    // Connecting under another device's client id.
    let refused = attacker().client_id("B2").connect(&broker).await;
    assert!(
        refused.is_err(),
        "A1's certificate must not connect as client id B2"
    );

    // Nothing changed: a fresh job for B2 is the first change the dashboard sees.
    let sentinel = job_id(&host.submit_get_data("B2").await);
    loop {
        let p = watch.next_publish(deadline()).await;
        assert_ne!(
            p.topic,
            topic::fleet_job(&b2, &b2_job),
            "B2's job changed under A1's attack: {p:?}"
        );
        if p.topic == topic::fleet_job(&b2, &sentinel) {
            break;
        }
    }
    let detail = host.show_json(&job).await;
    assert_eq!(detail["status"], "queued", "{detail:#}");
    assert_eq!(
        detail["timeline"].as_array().map(Vec::len),
        Some(1),
        "only the queued event:\n{detail:#}"
    );
    assert!(
        broker
            .lines_matching(|l| l.contains("job update stored"))
            .is_empty(),
        "the broker stored a job update:\n{}",
        broker.log()
    );
    let violations = broker.lines_matching(|l| l.contains("acl violation") && l.contains("A1"));
    assert!(
        violations.len() >= 4,
        "each violation is logged with the identity:\n{}",
        broker.log()
    );
    for filter in ["dev/B2/#", "dev/B2/up/job"] {
        assert!(
            violations.iter().any(|l| l.contains(filter)),
            "no acl violation logged for {filter}:\n{violations:#?}"
        );
    }
    broker.wait_for_log("connect refused", deadline()).await;
}

#[tokio::test]
async fn idle_sockets_do_not_delay_a_valid_client() {
    const IDLE: usize = 200;
    let env = TestEnv::new("idle_sockets_do_not_delay_a_valid_client");
    // Deadlines far beyond the test's: success cannot come from idle sockets timing out.
    let broker = env
        .broker()
        .args([
            "--handshake-timeout-secs",
            "60",
            "--first-byte-timeout-secs",
            "60",
        ])
        .start()
        .await;
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let tcp = TcpStream::connect(broker.addr())
            .await
            .unwrap_or_else(|e| panic!("idle connection {i} to {}: {e}", broker.addr()));
        idle.push(tcp);
    }
    let within = secs(30).min(Duration::from_secs(50));
    let client = env
        .mqtt(Role::Device, "C1")
        .connect_to(broker.addr(), within)
        .await
        .unwrap_or_else(|e| panic!("with {IDLE} silent TCP connections open: {e}"));
    println!(
        "CONNACK after {:?} with {IDLE} silent TCP connections open",
        client.connect_time()
    );
    // The silent sockets are still open (nothing timed out) when the valid client got in.
    let mut probe = [0u8; 1];
    for (i, tcp) in idle.iter().enumerate().take(5) {
        match tcp.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("idle connection {i} was closed by the broker already: {other:?}"),
        }
    }
    client.disconnect().await;
}

#[derive(Serialize)]
struct NotAJobUpdate {
    colour: &'static str,
}

#[tokio::test]
async fn malformed_and_oversized_payloads_are_refused() {
    let env = TestEnv::new("malformed_and_oversized_payloads_are_refused");
    let broker = env
        .broker()
        .args(["--max-payload-bytes", "4096", "--max-packet-bytes", "65536"])
        .start()
        .await;
    let a1 = serial("A1");
    let up = topic::dev_up(&a1, UpKind::Job);
    let mut c = env
        .mqtt(Role::Device, "A1")
        .connect(&broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.subscribe_and_wait(&topic::dev_ack(&a1)).await;

    // Not CBOR at all: no id to answer, so no ack; the session survives (the next ack proves it).
    c.publish(&up, b"\xff\x00 this is not CBOR \x13".to_vec())
        .await;

    // An envelope around something that is not a job update.
    c.publish(&up, envelope(7, NotAJobUpdate { colour: "blue" }))
        .await;
    let ack = ack_for(&mut c, &a1, 7).await;
    eprintln!("wrong body: {}", rejection(&ack));

    // Over --max-payload-bytes, under the packet limit.
    let unknown = JobId::parse("J-0").expect("a valid job id");
    let big = JobUpdate {
        errors: Default::default(),
        job: unknown.clone(),
        status: JobStatus::Failed,
        note: Some("x".repeat(8000)),
        data: None,
    };
    c.publish(&up, envelope(8, &big)).await;
    let ack = ack_for(&mut c, &a1, 8).await;
    assert!(
        rejection(&ack).contains("4096"),
        "the reason names the limit: {ack:?}"
    );

    // Over --max-packet-bytes: the gateway does not read it, it hangs up.
    let huge = JobUpdate {
        note: Some("x".repeat(100_000)),
        ..big
    };
    c.publish(&up, envelope(9, &huge)).await;
    let why = c.expect_closed(deadline()).await;
    eprintln!("oversized packet: closed ({why})");

    // Another device is served as before.
    let host = env.host("svc", &broker);
    let _c2 = env.device("C2").start(&broker).await;
    let job = host.submit_get_data("C2").await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
}

#[tokio::test]
async fn foreign_certificate_is_refused() {
    let env = TestEnv::new("foreign_certificate_is_refused");
    let broker = env.broker().start().await;
    let foreign = env.other_ca("foreign-pki").issue(Role::Device, "C1");

    let refused = env
        .mqtt(Role::Device, "C1")
        .with_cert(&foreign)
        .connect(&broker)
        .await;
    match refused {
        Ok(_) => panic!("a certificate from another CA got a CONNACK"),
        Err(e) => eprintln!("foreign certificate: {e}"),
    }
    broker
        .wait_for_log("TLS handshake failed", deadline())
        .await;

    let host = env.host("svc", &broker);
    let _c1 = env.device("C1").start(&broker).await;
    let job = host.submit_get_data("C1").await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let env = TestEnv::new("expired_certificate_is_refused");
    let broker = env.broker().start().await;
    // Issued by the broker's own CA, so only its dates are wrong.
    let now = pki::OffsetDateTime::now_utc();
    let day = pki::ValidityDuration::days(1);
    let ca = pki::Ca::load(env.pki().dir()).expect("the test CA loads");
    let expired = ca
        .issue_valid(Role::Device, "C1", now - day * 10, now - day)
        .expect("an expired certificate can be minted");
    let certs = harness::CertPaths {
        ca: env.pki().ca(),
        cert: env.path("expired-C1.pem"),
        key: env.path("expired-C1.key"),
    };
    std::fs::write(&certs.cert, &expired.cert_pem).expect("write cert");
    std::fs::write(&certs.key, &expired.key_pem).expect("write key");

    let refused = env
        .mqtt(Role::Device, "C1")
        .with_cert(&certs)
        .connect(&broker)
        .await;
    assert!(refused.is_err(), "an expired certificate got a CONNACK");
    // rustls names the reason ("certificate expired …") in the gateway's log line.
    broker.wait_for_log("expired", deadline()).await;

    // The same identity with a valid certificate is still served.
    let valid = env.mqtt(Role::Device, "C1").connect(&broker).await;
    assert!(
        valid.is_ok(),
        "a valid certificate was refused: {:?}",
        valid.err()
    );
}

/// Lines a log budget lets through each second, for each kind of refusal (the gateway's
/// `limits::LogBudget`).
const LOG_LINES_PER_SECOND: usize = 10;

/// Every value a peer sent that the gateway logs is cut short, and each kind of refusal a peer can
/// repeat at will is logged within a per-second budget: a flood of refused connections carrying
/// 60 KB topics, filters and client ids grows the log by a bounded amount, not by the values.
#[tokio::test]
async fn refusals_of_huge_peer_values_are_logged_cut_and_within_a_budget() {
    const EACH: usize = 40;
    let env = TestEnv::new("refusals_of_huge_peer_values_are_logged_cut_and_within_a_budget");
    let broker = env.broker().start().await;
    let c1 = env.certs(Role::Device, "C1");
    let svc = env.certs(Role::Host, "svc");
    let foreign = env.other_ca("foreign-pki").issue(Role::Device, "C1");
    let huge = "x".repeat(60_000);
    let before = broker.log().len();
    let start = Instant::now();
    for i in 0..EACH {
        // An ACL violation on a device's session, with a 60 KB topic.
        let mut device = RawClient::connect(broker.addr(), &c1, "C1").await;
        device
            .send(&raw::publish(&format!("dev/B2/{huge}"), b"x", 0, 0))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        device.expect_closed().await;
        // An ACL violation on a host's session, with a 60 KB filter.
        let mut host = RawClient::connect(broker.addr(), &svc, "svc").await;
        host.send(&raw::subscribe(1, &[&format!("dev/{huge}/#")]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        host.expect_closed().await;
        // A wrong client id of 60 KB.
        let (mut refused, code) = RawClient::connect_as(broker.addr(), &c1, &huge)
            .await
            .unwrap_or_else(|e| panic!("connect {i}: {e}"));
        assert_eq!(code, NOT_AUTHORIZED);
        refused.expect_closed().await;
        // A failed TLS handshake (a certificate from another CA).
        let _ = RawClient::tls_from(broker.addr(), &foreign, None).await;
    }
    let elapsed = start.elapsed();
    // Seen through to the end: a session that ends normally is logged after all of the above.
    let ended = broker.lines_matching(|l| l.contains("session ended")).len();
    RawClient::connect(broker.addr(), &svc, "svc")
        .await
        .disconnect()
        .await;
    broker
        .wait_for_lines("the last session's end", ended + 1, deadline(), |l| {
            l.contains("session ended")
        })
        .await;

    let log = broker.log();
    let grown = log.len() - before;
    let connections = 4 * EACH + 1;
    println!("{connections} connections in {elapsed:?}: the log grew by {grown} bytes");
    let cut = "x".repeat(500);
    let whole: Vec<&str> = log.lines().filter(|l| l.contains(&cut)).collect();
    assert!(
        whole.is_empty(),
        "{} log lines hold 500 characters or more of a peer's value; the first starts: {}",
        whole.len(),
        whole.first().map_or("", |l| &l[..l.len().min(300)])
    );
    assert!(
        grown <= connections * 1024,
        "the log grew by {grown} bytes for {connections} refused connections"
    );
    let seconds = elapsed.as_secs() as usize + 2;
    for kind in ["acl violation", "connect refused", "TLS handshake failed"] {
        let lines = broker.lines_matching(|l| l.contains(kind)).len();
        assert!(
            lines <= LOG_LINES_PER_SECOND * seconds,
            "{lines} \"{kind}\" lines in {elapsed:?}: not within the log budget"
        );
        assert!(lines >= 1, "no \"{kind}\" line at all");
    }
}

/// A newline in a client id, a topic or a filter cannot forge a log line of its own: control
/// characters in every value a peer chose are escaped.
#[tokio::test]
async fn a_newline_in_a_peer_value_cannot_forge_a_log_line() {
    let env = TestEnv::new("a_newline_in_a_peer_value_cannot_forge_a_log_line");
    let broker = env.broker().start().await;
    let forged = |what: &str| {
        format!("\n2026-12-03T08:00:00.000000Z  INFO broker: FORGED-{what} admin logged in")
    };
    let c1 = env.certs(Role::Device, "C1");
    let svc = env.certs(Role::Host, "svc");

    let (mut refused, code) =
        RawClient::connect_as(broker.addr(), &c1, &format!("C1{}", forged("ID")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, NOT_AUTHORIZED);
    refused.expect_closed().await;

    let mut device = RawClient::connect(broker.addr(), &c1, "C1").await;
    device
        .send(&raw::publish(
            &format!("dev/B2/up/job{}", forged("TOPIC")),
            b"x",
            0,
            0,
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    device.expect_closed().await;

    let mut host = RawClient::connect(broker.addr(), &svc, "svc").await;
    host.send(&raw::subscribe(
        1,
        &[&format!("dev/B2{}/#", forged("FILTER"))],
    ))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    host.expect_closed().await;

    for what in ["ID", "TOPIC", "FILTER"] {
        let marker = format!("FORGED-{what}");
        broker
            .wait_for_line(&marker, deadline(), |l| l.contains(&marker))
            .await;
    }
    let forged_lines = broker.lines_matching(|l| l.starts_with("2026-12-03T08:00:00"));
    assert!(
        forged_lines.is_empty(),
        "a peer's value made log lines of its own:\n{}",
        forged_lines.join("\n")
    );
    for l in broker.lines_matching(|l| l.contains("FORGED-")) {
        assert!(
            l.contains("\\n2026-12-03T08:00:00"),
            "the newline before a forged line is not escaped: {l}"
        );
    }
}

/// Nothing on `host/…` is retained (topics.md): a retain flag on a host's request is cleared, so
/// the request is not kept by the router and replayed to the host's later sessions.
#[tokio::test]
async fn a_hosts_retained_request_is_not_kept() {
    let env = TestEnv::new("a_hosts_retained_request_is_not_kept");
    let broker = env.broker().start().await;
    let svc = env.certs(Role::Host, "svc");
    let mut sender = RawClient::connect(broker.addr(), &svc, "svc:a").await;
    sender
        .send(&raw::publish_retained("host/svc/req", b"kept?", 1, 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sender.expect(raw::PUBACK).await;
    // Something that is retained, to know when retained messages have been replayed.
    let host = env.host("svc", &broker);
    host.submit_get_data("C9").await;

    // Every packet is looked at (a helper that waits for SUBACK would skip a replayed PUBLISH).
    // The router replays retained messages filter by filter, in the order subscribed: once the
    // job's view has come, the request's would have come before it.
    let mut later = RawClient::connect(broker.addr(), &svc, "svc:b").await;
    later
        .send(&raw::subscribe(1, &["host/svc/req"]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    later
        .send(&raw::subscribe(2, &["fleet/+/jobs/+"]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    loop {
        let p = match later.next(deadline()).await {
            Ok(Some(p)) => p,
            other => panic!("no retained job view: {other:?}"),
        };
        let topic = p.topic().unwrap_or_default();
        assert_ne!(
            topic, "host/svc/req",
            "the host's own request was kept retained and replayed: {p:?}"
        );
        if topic.starts_with("fleet/C9/jobs/") {
            break;
        }
    }
}

/// MQTT 3.1.1 §3.10.4: every UNSUBSCRIBE is answered by one UNSUBACK, whether or not the client
/// held the filters, on the hosts' path and the devices'.
/// A device's QoS 1 message is answered twice: PUBACK once the relay has it, its ack once it is
/// committed. The PUBACK waits for the ack and both reach the device in one write, PUBACK first
/// (one send for the relay, one wake-up for the device); a message whose ack does not come
/// still has its PUBACK, alone, within the hold.
#[tokio::test]
async fn a_devices_puback_leaves_with_the_messages_ack_in_one_write() {
    let env = TestEnv::new("a_devices_puback_leaves_with_the_messages_ack_in_one_write");
    let c1 = serial("C1");
    let up = topic::dev_up(&c1, UpKind::Job);
    let update = |id: u64| {
        let unknown = JobId::parse("J-0").expect("a valid job id");
        let body = JobUpdate {
            errors: Default::default(),
            job: unknown,
            status: JobStatus::Failed,
            note: None,
            data: None,
        };
        raw::publish(&up, &envelope(id, &body), 1, 42)
    };
    let certs = env.certs(Role::Device, "C1");

    // The longest hold: a commit slowed by a busy machine still makes it.
    let broker = env
        .broker()
        .args(["--puback-hold-ms", "1000"])
        .start()
        .await;
    let mut device = RawClient::connect(broker.addr(), &certs, "C1").await;
    assert_eq!(device.subscribe_acked(1, &["dev/C1/ack"]).await, [1]);
    for id in 1..=3 {
        device
            .send(&update(id))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let read = device
            .next_read(deadline())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<u8> = read.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            [raw::PUBACK, raw::PUBLISH],
            "message {id}: the PUBACK and then the ack, in one read: {read:?}"
        );
        assert_eq!(read[0].body, 42u16.to_be_bytes(), "PUBACK for another id");
        assert_eq!(read[1].topic().as_deref(), Some("dev/C1/ack"));
    }

    // Acks held back (a test fault: committed, never answered): the PUBACK comes alone, after
    // the default hold.
    let held = env
        .broker()
        .data_dir(env.path("held"))
        .env("CHUKEI_TEST_HOLD_ACKS", "1")
        .start()
        .await;
    let mut device = RawClient::connect(held.addr(), &certs, "C1").await;
    assert_eq!(device.subscribe_acked(1, &["dev/C1/ack"]).await, [1]);
    device
        .send(&update(4))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let puback = device.expect(raw::PUBACK).await;
    assert_eq!(puback.body, 42u16.to_be_bytes(), "PUBACK for another id");
}

#[tokio::test]
async fn every_unsubscribe_gets_exactly_one_unsuback() {
    let env = TestEnv::new("every_unsubscribe_gets_exactly_one_unsuback");
    let broker = env.broker().start().await;
    let svc = env.certs(Role::Host, "svc");
    let mut host = RawClient::connect(broker.addr(), &svc, "svc").await;
    assert_eq!(
        host.subscribe_acked(1, &["host/svc/resp", "fleet/+/state"])
            .await,
        [1, 1]
    );
    // Filters it never held.
    host.send(&raw::unsubscribe(2, &["host/svc/never", "fleet/+/alarm"]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ack = host.expect(raw::UNSUBACK).await;
    assert_eq!(ack.body, 2u16.to_be_bytes(), "UNSUBACK for another packet");
    // Two filters it held, in one UNSUBSCRIBE: one UNSUBACK, not one per filter.
    host.send(&raw::unsubscribe(3, &["host/svc/resp", "fleet/+/state"]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    host.expect(raw::UNSUBACK).await;
    host.send(&[0xc0, 0])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    loop {
        match host.next(deadline()).await {
            Ok(Some(p)) if p.kind == raw::PINGRESP => break,
            Ok(Some(p)) => assert_ne!(p.kind, raw::UNSUBACK, "a second UNSUBACK: {p:?}"),
            other => panic!("no PINGRESP: {other:?}"),
        }
    }
    host.ping().await;

    let c1 = env.certs(Role::Device, "C1");
    let mut device = RawClient::connect(broker.addr(), &c1, "C1").await;
    device
        .send(&raw::unsubscribe(1, &["dev/C1/never"]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    device.expect(raw::UNSUBACK).await;
}

/// MQTT 3.1.1 §3.1.2.9 and §3.1.2.3: a CONNECT with a password but no user name, or with the
/// reserved flag set, is malformed; the relay closes the connection without a CONNACK.
#[tokio::test]
async fn a_connect_with_malformed_flags_is_closed_without_connack() {
    let env = TestEnv::new("a_connect_with_malformed_flags_is_closed_without_connack");
    let broker = env
        .broker()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start()
        .await;
    let c1 = env.certs(Role::Device, "C1");
    let cases: [(&str, u8, &[&str]); 3] = [
        ("a password without a user name", 0x42, &["secret"]),
        ("the reserved flag", 0x03, &[]),
        ("a will QoS without a will", 0x0a, &[]),
    ];
    for (what, flags, fields) in cases {
        let mut c = RawClient::tls_from(broker.addr(), &c1, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        c.send(&raw::connect_with_flags("C1", flags, fields))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let seen = c.expect_closed().await;
        assert!(
            seen.iter().all(|p| p.kind != raw::CONNACK),
            "a CONNECT with {what} was answered: {seen:?}"
        );
    }
    // A user name with a password is well formed (the relay ignores both).
    let mut c = RawClient::tls_from(broker.addr(), &c1, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.send(&raw::connect_with_flags("C1", 0xc2, &["user", "secret"]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ack = c.expect(raw::CONNACK).await;
    assert_eq!(ack.body, [0, raw::ACCEPTED]);
    let text = raw::scrape(broker.metrics_addr()).await;
    assert_eq!(raw::sample(&text, "chukei_bad_packets_total"), 3);
}

/// When every handshake slot is held, the oldest socket that has not sent a byte gives its slot
/// to the new connection: silent sockets past `max_handshakes` cannot make a real client queue,
/// even with the handshake and first-byte deadlines far beyond the test's. A slow handshake that
/// has started is not shed.
#[tokio::test]
async fn silent_sockets_past_max_handshakes_do_not_delay_a_valid_client() {
    const SLOTS: usize = 16;
    const SILENT: usize = 4 * SLOTS;
    const SLOW: usize = 4;
    let env = TestEnv::new("silent_sockets_past_max_handshakes_do_not_delay_a_valid_client");
    let broker = env
        .broker()
        .args([
            "--max-handshakes",
            &SLOTS.to_string(),
            "--handshake-timeout-secs",
            "3600",
            "--first-byte-timeout-secs",
            "3600",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .start()
        .await;
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut tcp = raw::tcp(broker.addr(), None).await;
        tcp.write_all(&raw::PARTIAL_CLIENT_HELLO)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        slow.push(tcp);
    }
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(raw::tcp(broker.addr(), None).await);
    }
    let client = env
        .mqtt(Role::Device, "C1")
        .connect_to(broker.addr(), deadline())
        .await
        .unwrap_or_else(|e| {
            panic!("with {SILENT} silent sockets and {SLOW} slow handshakes open: {e}")
        });
    println!(
        "CONNACK after {:?} with {SILENT} silent sockets and {SLOW} slow handshakes in {SLOTS} slots",
        client.connect_time()
    );
    let mut probe = [0u8; 1];
    for (i, tcp) in slow.iter().enumerate() {
        match tcp.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("slow handshake {i} was closed: {other:?}"),
        }
    }
    // The oldest silent socket was shed: the relay closed it without a word.
    let read = tokio::time::timeout(deadline(), silent[0].read(&mut probe)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the oldest silent socket is still open: {read:?}"
    );
    let text = raw::scrape(broker.metrics_addr()).await;
    let shed = raw::sample(&text, "chukei_handshakes_shed_total");
    assert!(shed >= 1, "no handshake was shed:\n{text}");
    broker
        .wait_for_line("the shedding", deadline(), |l| {
            l.contains("max_handshakes") && l.contains("shed")
        })
        .await;
    client.disconnect().await;
}

/// A measurement, not a check (run by hand: `cargo nextest run -p chukei-tests --run-ignored
/// only -E 'test(measure_connack)'`): the relay with its default limits, loopback exempt from
/// the per-source rate, while 1,500 silent sockets and 200 half-done handshakes are held open and
/// reopened as the relay closes them; prints how long a valid device waits for its CONNACK.
#[tokio::test]
#[ignore = "a measurement to run by hand; it opens 1,700 sockets"]
async fn measure_connack_under_silent_and_slow_handshakes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const SILENT: usize = 1_500;
    const SLOW: usize = 200;
    let env = TestEnv::new("measure_connack_under_silent_and_slow_handshakes");
    let broker = env.broker().start().await;
    let addr = broker.addr();
    let opened = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..SILENT + SLOW {
        let opened = opened.clone();
        flood.push(tokio::spawn(async move {
            loop {
                let Ok(mut tcp) = TcpStream::connect(addr).await else {
                    continue;
                };
                if i >= SILENT {
                    let _ = tcp.write_all(&raw::PARTIAL_CLIENT_HELLO).await;
                }
                opened.fetch_add(1, Ordering::Relaxed);
                // Until the relay closes it; then again.
                let mut byte = [0u8; 1];
                let _ = tcp.read(&mut byte).await;
            }
        }));
    }
    harness::poll_until("the flood to open", deadline(), || {
        let opened = opened.clone();
        async move {
            let n = opened.load(Ordering::Relaxed);
            if n >= SILENT + SLOW {
                Ok(())
            } else {
                Err(format!("{n} open"))
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut times = Vec::new();
    for _ in 0..5 {
        let client = env
            .mqtt(Role::Device, "C1")
            .connect_to(addr, Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        times.push(client.connect_time());
        client.disconnect().await;
    }
    flood.iter().for_each(|t| t.abort());
    println!(
        "CONNACK times with {SILENT} silent sockets and {SLOW} slow handshakes reopened as closed \
         ({} connections opened in all): {times:?}",
        opened.load(Ordering::Relaxed)
    );
}

/// A fleet coming back at once is not a line per device: past `session_log_lines_per_second`,
/// "session started" lines are left out, each session is still counted, and the next line
/// logged says how many were left out. The same for a fleet going offline at once.
#[tokio::test]
async fn sessions_past_the_log_budget_are_counted_and_summed_up() {
    const DEVICES: usize = 40;
    let env = TestEnv::new("sessions_past_the_log_budget_are_counted_and_summed_up");
    let broker = env
        .broker()
        .args(["--session-log-lines-per-second", "2"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start()
        .await;
    let mut fleet = env.fleet(DEVICES).start(&broker).await;
    let started = |broker: &harness::Broker| {
        broker.lines_matching(|l| l.contains("session started") && l.contains("client_id=SIM-"))
    };
    let logged = started(&broker).len();
    let counted = raw::sample(
        &raw::scrape(broker.metrics_addr()).await,
        "chukei_sessions_started_total",
    );
    assert!(
        counted >= DEVICES as u64,
        "every session is counted: {counted}"
    );
    // All 40 logged would take the fleet 20 s to connect at 2 lines a second.
    assert!(
        logged < DEVICES,
        "{logged} of {DEVICES} sessions logged one by one at a budget of 2 a second"
    );

    // The next session logged (in a later second) says how many were left out: each connect
    // is a "session started" and a "device offline" of its own, logged once the budget allows.
    let d1 = env.certs(Role::Device, "D1");
    let suppressed = summing_line(&broker, &d1, "session started", 0).await;
    assert!(suppressed >= 1, "left out: {suppressed}");

    // The fleet gone at once (a site's outage): "device offline" lines within the same budget.
    let before = broker.log().lines().count();
    fleet.kill9().await;
    let suppressed = summing_line(&broker, &d1, "device offline", before).await;
    assert!(suppressed >= 1, "left out: {suppressed}");
    let offline =
        broker.lines_matching(|l| l.contains("device offline") && l.contains("serial=SIM-"));
    assert!(
        offline.len() < DEVICES,
        "{} of {DEVICES} devices' offline lines logged one by one",
        offline.len()
    );
}

/// Connects and drops a session of device `certs` until a `message` line logged after the
/// broker's first `after` lines says how many lines were left out before it; returns that count.
async fn summing_line(
    broker: &harness::Broker,
    certs: &harness::CertPaths,
    message: &str,
    after: usize,
) -> u64 {
    let what = format!("a {message:?} line with suppressed=");
    let line = harness::poll_until(&what, deadline(), || async {
        drop(RawClient::connect(broker.addr(), certs, "D1").await);
        let log = broker.log();
        let line = log
            .lines()
            .skip(after)
            .find(|l| l.contains(message) && l.contains("suppressed="));
        line.map(str::to_owned).ok_or_else(|| "none yet".to_owned())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    line.split("suppressed=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"))
}
