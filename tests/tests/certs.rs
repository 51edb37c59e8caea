//! Certificates against the real broker: a revoked certificate is refused at the TLS
//! handshake, and each role stays in its lane — a host certificate cannot act as a device, a
//! device certificate cannot act as a host, an integrator certificate is read-only.
//! Expired and foreign-CA certificates are tested in `gateway.rs`.

use std::ffi::OsStr;
use std::path::Path;

use harness::raw::{self, NOT_AUTHORIZED, RawClient};
use harness::{Broker, TestEnv, broker_ok, deadline};
use protocol::Role;

/// `broker pki revoke --dir DIR ARGS…`; panics with its output if it fails. Returns stdout.
fn revoke(pki: &Path, args: &[&str]) -> String {
    let mut all = vec![
        OsStr::new("pki"),
        OsStr::new("revoke"),
        OsStr::new("--dir"),
        pki.as_os_str(),
    ];
    all.extend(args.iter().map(OsStr::new));
    broker_ok(all)
}

/// Waits for the broker to log an ACL violation by `identity` on `topic`.
async fn violation_logged(broker: &Broker, identity: &str, topic: &str) {
    broker
        .wait_for_line(
            &format!("an acl violation by {identity} on {topic}"),
            deadline(),
            |l| l.contains("acl violation") && l.contains(identity) && l.contains(topic),
        )
        .await;
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_at_the_handshake() {
    let env = TestEnv::new("a_revoked_certificate_is_refused_at_the_handshake");
    let c1 = env.certs(Role::Device, "C1");
    let c2 = env.certs(Role::Device, "C2");
    let old_host = env.certs(Role::Host, "old");
    let out = revoke(env.pki().dir(), &["--id", "C1"]);
    assert!(out.contains("revoked serial"), "{out}");
    // The same certificate again changes nothing; a host certificate by its file.
    let again = revoke(env.pki().dir(), &["--id", "C1", "--role", "device"]);
    assert!(again.contains("already revoked"), "{again}");
    let copy = env.path("old-host.pem");
    std::fs::copy(&old_host.cert, &copy).expect("copy the host certificate");
    revoke(
        env.pki().dir(),
        &["--cert", copy.to_str().expect("utf-8 path")],
    );

    let broker = env.broker().start().await;
    broker
        .wait_for_log("certificate revocation list loaded", deadline())
        .await;

    for (certs, id) in [(&c1, "C1"), (&old_host, "old")] {
        let refused = RawClient::connect_as(broker.addr(), certs, id).await;
        assert!(
            refused.is_err(),
            "revoked certificate {id} got a CONNACK: {:?}",
            refused.map(|(_, code)| code)
        );
    }
    // rustls names the reason in the gateway's log line.
    broker
        .wait_for_line("a handshake refused as revoked", deadline(), |l| {
            l.contains("TLS handshake failed") && l.contains("Revoked")
        })
        .await;

    // Every other certificate is served: a device agent does a whole job.
    let host = env.host("svc", &broker);
    let _c2 = env.device("C2").start(&broker).await;
    let job = host.submit_get_data("C2").await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    RawClient::connect(broker.addr(), &c2, "C2")
        .await
        .ping()
        .await;
}

#[tokio::test]
async fn a_list_given_by_crl_file_is_used_and_a_missing_one_stops_the_start() {
    let env = TestEnv::new("a_list_given_by_crl_file_is_used_and_a_missing_one_stops_the_start");
    let c1 = env.certs(Role::Device, "C1");
    let serial = pki::serial_of_pem(&pki::read_pem_file(&c1.cert).expect("read C1"))
        .expect("C1 has a serial");
    let hex: Vec<String> = serial.iter().map(|b| format!("{b:02X}")).collect();
    revoke(env.pki().dir(), &["--serial", &hex.join(":")]);
    // Moved out of the PKI folder: only --crl-file finds it now.
    let list = env.path("revoked.pem");
    std::fs::rename(env.pki().dir().join("crl.pem"), &list).expect("move the list");

    let missing = env.path("no-such-crl.pem");
    let out = env.broker_refused_start(
        &env.path("data-missing"),
        &[OsStr::new("--crl-file"), missing.as_os_str()],
    );
    let stderr = &out.stderr;
    assert!(!out.success(), "started without its CRL:\n{stderr}");
    assert!(
        stderr.contains("no-such-crl.pem"),
        "the error names the file:\n{stderr}"
    );

    let broker = env.broker().arg("--crl-file").arg(&list).start().await;
    let refused = RawClient::connect_as(broker.addr(), &c1, "C1").await;
    assert!(refused.is_err(), "C1 is revoked by --crl-file");
    let c2 = env.certs(Role::Device, "C2");
    RawClient::connect(broker.addr(), &c2, "C2")
        .await
        .ping()
        .await;
}

#[tokio::test]
async fn a_host_certificate_cannot_act_as_a_device() {
    let env = TestEnv::new("a_host_certificate_cannot_act_as_a_device");
    let broker = env.broker().start().await;
    let svc = env.certs(Role::Host, "svc");
    let mut bystander = RawClient::connect(broker.addr(), &svc, "svc:ok").await;

    // Connecting under a device's serial.
    let (mut c, code) = RawClient::connect_as(broker.addr(), &svc, "C1")
        .await
        .unwrap_or_else(|e| panic!("a refusing CONNACK expected: {e}"));
    assert_eq!(code, NOT_AUTHORIZED);
    c.expect_closed().await;
    broker.wait_for_log("connect refused", deadline()).await;

    // Publishing a device's report, and reading a device's job orders.
    let mut c = RawClient::connect(broker.addr(), &svc, "svc:x").await;
    c.send(&raw::publish("dev/C1/up/job", b"forged", 1, 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = c.expect_closed().await;
    assert!(seen.iter().all(|p| p.kind != raw::PUBACK), "{seen:?}");
    violation_logged(&broker, "host:svc", "dev/C1/up/job").await;

    let mut c = RawClient::connect(broker.addr(), &svc, "svc:y").await;
    c.send(&raw::subscribe(1, &["dev/C1/jobs/+"]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = c.expect_closed().await;
    assert!(seen.iter().all(|p| p.kind != raw::SUBACK), "{seen:?}");
    violation_logged(&broker, "host:svc", "dev/C1/jobs/+").await;

    bystander.ping().await;
}

#[tokio::test]
async fn a_device_certificate_cannot_act_as_a_host() {
    let env = TestEnv::new("a_device_certificate_cannot_act_as_a_host");
    let broker = env.broker().start().await;
    let c1 = env.certs(Role::Device, "C1");

    // Connecting under a host's name.
    let (mut c, code) = RawClient::connect_as(broker.addr(), &c1, "svc")
        .await
        .unwrap_or_else(|e| panic!("a refusing CONNACK expected: {e}"));
    assert_eq!(code, NOT_AUTHORIZED);
    c.expect_closed().await;

    // Submitting a request as a host, and reading the fleet's views.
    for (packet, topic) in [
        (
            raw::publish("host/svc/req", b"forged", 1, 1),
            "host/svc/req",
        ),
        (raw::subscribe(1, &["fleet/#"]), "fleet/#"),
        (raw::subscribe(2, &["host/svc/resp"]), "host/svc/resp"),
    ] {
        let mut c = RawClient::connect(broker.addr(), &c1, "C1").await;
        c.send(&packet).await.unwrap_or_else(|e| panic!("{e}"));
        let seen = c.expect_closed().await;
        assert!(
            seen.iter()
                .all(|p| p.kind != raw::PUBACK && p.kind != raw::SUBACK),
            "{topic}: {seen:?}"
        );
        violation_logged(&broker, "device:C1", topic).await;
    }

    // The device itself is still served on its own topics.
    let mut c = RawClient::connect(broker.addr(), &c1, "C1").await;
    assert_eq!(c.subscribe_acked(1, &["dev/C1/jobs/+"]).await, [1]);
    c.ping().await;
}

#[tokio::test]
async fn an_integrator_certificate_is_read_only() {
    let env = TestEnv::new("an_integrator_certificate_is_read_only");
    let broker = env.broker().start().await;
    let crm = env.certs(Role::Integrator, "crm");

    // Reading the views works, and what they carry arrives.
    let mut reader = RawClient::connect(broker.addr(), &crm, "crm").await;
    assert_eq!(reader.subscribe_acked(1, &["fleet/#"]).await, [1]);
    let host = env.host("svc", &broker);
    let job = host.submit_get_data("C7").await;
    let p = reader.expect(raw::PUBLISH).await;
    let topic_len = usize::from(u16::from_be_bytes([p.body[0], p.body[1]]));
    let topic = String::from_utf8_lossy(&p.body[2..2 + topic_len]).into_owned();
    assert!(
        topic.starts_with("fleet/C7/") && topic.contains(&job),
        "{topic}"
    );

    // Writing anything closes the connection: its own requests, the views, a device's topic.
    for topic in [
        "host/crm/req",
        "json/fleet/C7/state",
        "fleet/C7/alarm",
        "dev/C7/up/state",
    ] {
        let mut c = RawClient::connect(broker.addr(), &crm, "crm:w").await;
        c.send(&raw::publish(topic, b"x", 1, 1))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let seen = c.expect_closed().await;
        assert!(
            seen.iter().all(|p| p.kind != raw::PUBACK),
            "{topic}: {seen:?}"
        );
        violation_logged(&broker, "integrator:crm", topic).await;
    }
    // Not even at QoS 0, where no ack would tell.
    let mut c = RawClient::connect(broker.addr(), &crm, "crm:w").await;
    c.send(&raw::publish("host/crm/req", b"x", 0, 0))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.expect_closed().await;

    reader.ping().await;
}

/// Client ids are checked per role, so one name may be a host's and an integrator's id at once;
/// in the router they must not meet: an integrator whose certificate is named like a host, using
/// that name as its client id, neither evicts the host's session nor is evicted by it.
#[tokio::test]
async fn an_integrator_named_like_a_host_cannot_take_the_hosts_session() {
    let env = TestEnv::new("an_integrator_named_like_a_host_cannot_take_the_hosts_session");
    let broker = env.broker().start().await;
    let host_cert = env.certs(Role::Host, "svc");
    let integrator_cert = env.certs(Role::Integrator, "svc");
    let mut host = RawClient::connect(broker.addr(), &host_cert, "svc").await;
    host.publish_acked("host/svc/req", b"x", 1).await;

    let mut integrator = RawClient::connect(broker.addr(), &integrator_cert, "svc").await;
    integrator.ping().await;
    // The host's session still reaches the router: its publish is acknowledged.
    host.publish_acked("host/svc/req", b"x", 2).await;
    host.ping().await;
    // And the other way round: a host session opened later leaves the integrator's alone.
    let mut again = RawClient::connect(broker.addr(), &host_cert, "svc:two").await;
    again.ping().await;
    assert_eq!(integrator.subscribe_acked(1, &["fleet/#"]).await, [1]);
    integrator.ping().await;
}
