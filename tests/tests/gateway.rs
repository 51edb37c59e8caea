//! The gateway in front of the router: identity, ACL, limits and handshakes under load
//! (docs/decisions.md, D1 and D5). Hostile clients are played by the harness's in-process MQTT
//! client.

use std::time::Duration;

use harness::mqtt::{MqttClient, envelope, open};
use harness::{MqttBuilder, TestEnv, deadline, secs};
use protocol::device::{Ack, AckBatch, AckOutcome, JobUpdate};
use protocol::job::JobStatus;
use protocol::topic::{self, UpKind};
use protocol::{JobId, Role, Serial};
use serde::Serialize;
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
    // A handshake deadline far beyond the test's: success cannot come from idle sockets timing out.
    let broker = env
        .broker()
        .args(["--handshake-timeout-secs", "60"])
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
