//! Resumption across a relay restart, with the real relay and the real device agent: the agent
//! comes back to the restarted relay with a session ticket (no full handshake), and a certificate
//! revoked while it was away is refused even though its handshake resumed; and a device's
//! persistent MQTT session comes back too (no SUBSCRIBE), its orders with it.

use harness::raw::{self, RawClient};
use harness::{TestEnv, broker_ok, deadline};
use protocol::Role;

#[tokio::test]
async fn an_agent_resumes_after_a_relay_restart_and_a_revoked_certificate_is_refused_on_resumption()
{
    let env = TestEnv::new(
        "an_agent_resumes_after_a_relay_restart_and_a_revoked_certificate_is_refused_on_resumption",
    );
    let data_dir = env.path("relay");
    let mut broker = relay_on(&env, &data_dir, None).await;
    let addr = broker.addr();
    let device = env.device("C1").start(&broker).await;
    device.wait_for_log("connected to broker", deadline()).await;
    let first = raw::scrape(broker.metrics_addr()).await;
    assert_eq!(raw::sample(&first, "chukei_tls_resumed_total"), 0);
    assert!(raw::sample(&first, "chukei_tls_full_handshakes_total") >= 1);
    let key_file = data_dir.join("tls-ticket-keys");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the ticket keys are the relay's alone");
    }

    // Restart: the agent comes back with the ticket the first relay sealed.
    broker.stop().await;
    let mut broker = relay_on(&env, &data_dir, Some(addr)).await;
    device
        .wait_for_lines("connected twice", 2, deadline(), |l| {
            l.contains("connected to broker")
        })
        .await;
    let metrics = raw::scrape(broker.metrics_addr()).await;
    assert_eq!(
        (
            raw::sample(&metrics, "chukei_tls_resumed_total"),
            raw::sample(&metrics, "chukei_tls_full_handshakes_total")
        ),
        (1, 0),
        "the agent resumed instead of a full handshake"
    );

    // Revoked while the relay is down: the agent's ticket still resumes a handshake, and the
    // certificate inside it is refused.
    broker.stop().await;
    let pki_dir = env.pki().dir().to_str().expect("utf-8 path").to_owned();
    broker_ok(["pki", "revoke", "--dir", &pki_dir, "--id", "C1"]);
    let broker = relay_on(&env, &data_dir, Some(addr)).await;
    broker
        .wait_for_line("refused as revoked", deadline(), |l| {
            l.contains("certificate refused after the handshake") && l.contains("revoked")
        })
        .await;
    let metrics = raw::scrape(broker.metrics_addr()).await;
    assert!(raw::sample(&metrics, "chukei_cert_refused_total") >= 1);
    assert!(
        raw::sample(&metrics, "chukei_tls_resumed_total") >= 1,
        "the refused handshake was a resumed one:\n{metrics}"
    );
    assert_eq!(raw::sample(&metrics, "chukei_sessions_started_total"), 0);
}

#[tokio::test]
async fn a_certificate_that_expired_since_its_ticket_was_sealed_is_refused_on_resumption() {
    use harness::raw::RawClient;
    let env = TestEnv::new(
        "a_certificate_that_expired_since_its_ticket_was_sealed_is_refused_on_resumption",
    );
    let broker = env
        .broker()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start()
        .await;
    // Valid for a few seconds from now.
    let now = pki::OffsetDateTime::now_utc();
    let not_after = now + pki::ValidityDuration::seconds(3);
    let ca = pki::Ca::load(env.pki().dir()).expect("the test CA loads");
    let issued = ca
        .issue_valid(
            protocol::Role::Device,
            "C1",
            now - pki::ValidityDuration::days(1),
            not_after,
        )
        .expect("a short-lived certificate can be minted");
    let certs = harness::CertPaths {
        ca: env.pki().ca(),
        cert: env.path("short-C1.pem"),
        key: env.path("short-C1.key"),
    };
    std::fs::write(&certs.cert, &issued.cert_pem).expect("write cert");
    std::fs::write(&certs.key, &issued.key_pem).expect("write key");
    let config = raw::client_config(&certs);

    let tls = RawClient::tls_with(broker.addr(), &config, None)
        .await
        .unwrap();
    let (mut first, code) = tls.mqtt_connect("C1").await.unwrap();
    assert_eq!(code, 0, "accepted while valid");
    first.ping().await; // the ticket that followed the handshake is read on the way
    drop(first);

    // The certificate's expiry is a time on the wall clock: wait for it to pass.
    let expired_at = std::time::SystemTime::UNIX_EPOCH
        + std::time::Duration::from_secs(u64::try_from(not_after.unix_timestamp()).unwrap() + 1);
    if let Ok(left) = expired_at.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }

    let tls = RawClient::tls_with(broker.addr(), &config, None)
        .await
        .unwrap();
    let refused = tls.mqtt_connect("C1").await;
    assert!(
        refused.is_err(),
        "an expired certificate got a CONNACK on resumption"
    );
    broker
        .wait_for_line("refused as expired", deadline(), |l| {
            l.contains("certificate refused after the handshake") && l.contains("expired")
        })
        .await;
    let metrics = raw::scrape(broker.metrics_addr()).await;
    assert_eq!(
        raw::sample(&metrics, "chukei_tls_resumed_total"),
        1,
        "the expired certificate came back in a resumed handshake"
    );
}

/// A stopping relay closes its listening socket before its open connections wind down. While it
/// listened, the kernel completed handshakes nobody would accept: a device reconnecting in that
/// time sent its ClientHello — spending its session ticket — and was then reset, and paid a
/// full handshake at the relay that came back. Here a silent connection keeps the stop waiting
/// (up to its grace period), and a connection attempt in that time is refused.
#[tokio::test]
async fn a_stopping_relay_refuses_new_connections_at_once() {
    let env = TestEnv::new("a_stopping_relay_refuses_new_connections_at_once");
    let mut broker = env
        .broker()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--first-byte-timeout-secs", "60"])
        .args(["--handshake-timeout-secs", "60"])
        .start()
        .await;
    let addr = broker.addr();
    let _silent = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the relay accepts TCP");
    let until = tokio::time::Instant::now() + deadline();
    while raw::sample(
        &raw::scrape(broker.metrics_addr()).await,
        "chukei_tcp_accepted_total",
    ) < 1
    {
        assert!(
            tokio::time::Instant::now() < until,
            "the silent connection was never accepted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    broker.signal("TERM");
    broker
        .wait_for_log("gateway stopped accepting", deadline())
        .await;
    let attempt = tokio::net::TcpStream::connect(addr).await;
    assert!(
        matches!(&attempt, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a connection attempt during the stop was not refused: {attempt:?}"
    );
    assert!(
        broker.try_exit().is_none(),
        "the relay was still winding down its open connection when the attempt was refused"
    );
    broker.stop().await;
}

/// A relay on `data_dir` at `addr` (a fresh port if `None`), with its metrics listener: started
/// again on both, it is the same relay restarted.
async fn relay_on(
    env: &TestEnv,
    data_dir: &std::path::Path,
    addr: Option<std::net::SocketAddr>,
) -> harness::Broker {
    let mut b = env
        .broker()
        .data_dir(data_dir)
        .args(["--metrics-listen", "127.0.0.1:0"]);
    if let Some(addr) = addr {
        b = b.listen(addr);
    }
    b.start().await
}

/// Connects C1 by hand with `clean_session` as given: the client and CONNACK's "session present".
async fn connect_c1(
    broker: &harness::Broker,
    certs: &harness::CertPaths,
    clean: bool,
) -> (RawClient, bool) {
    let c = RawClient::tls_from(broker.addr(), certs, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (c, code, present) = c
        .mqtt_connect_session("C1", clean)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, raw::ACCEPTED);
    (c, present)
}

#[tokio::test]
async fn a_devices_persistent_mqtt_session_survives_a_relay_restart_and_a_clean_session_ends_it() {
    let env = TestEnv::new(
        "a_devices_persistent_mqtt_session_survives_a_relay_restart_and_a_clean_session_ends_it",
    );
    let data_dir = env.path("relay");
    let c1 = env.certs(Role::Device, "C1");
    let mut broker = relay_on(&env, &data_dir, None).await;
    let addr = broker.addr();
    let host = env.host("svc", &broker);

    let (mut first, present) = connect_c1(&broker, &c1, false).await;
    assert!(!present, "nothing to resume the first time");
    assert_eq!(
        first
            .subscribe_acked(1, &["dev/C1/jobs/+", "dev/C1/ack"])
            .await,
        [1, 1]
    );
    // A host's request is answered only after the sessions opened before it are recorded.
    host.list_json(true).await;
    first.disconnect().await;

    // A hard kill: what the session keeps must already be on disk.
    broker.kill9().await;
    let mut broker = relay_on(&env, &data_dir, Some(addr)).await;
    let job = host.submit_get_data("C1").await;
    let (mut back, present) = connect_c1(&broker, &c1, false).await;
    assert!(present, "the restarted relay resumed the session");
    let order = back.expect(raw::PUBLISH).await;
    assert_eq!(
        order.topic().as_deref(),
        Some(format!("dev/C1/jobs/{job}").as_str()),
        "the order reached the device without a SUBSCRIBE"
    );
    let metrics = raw::scrape(broker.metrics_addr()).await;
    assert_eq!(raw::sample(&metrics, "chukei_sessions_resumed_total"), 1);
    back.disconnect().await;

    // A clean session ends the persistent one, at the relay and in its store.
    let (mut clean, present) = connect_c1(&broker, &c1, true).await;
    assert!(!present, "a clean session never resumes");
    clean
        .send(&[0xc0, 0])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Up to the PINGRESP, nothing: a clean session subscribed to nothing.
    loop {
        let p = clean
            .next(deadline())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .expect("open");
        if p.kind == raw::PINGRESP {
            break;
        }
        assert_ne!(
            p.kind,
            raw::PUBLISH,
            "a clean session subscribed to nothing: {p:?}"
        );
    }
    host.list_json(true).await;
    clean.disconnect().await;
    let (again, present) = connect_c1(&broker, &c1, false).await;
    assert!(!present, "the clean session discarded it");
    again.disconnect().await;
    broker.kill9().await;
    let broker = relay_on(&env, &data_dir, Some(addr)).await;
    let (_after, present) = connect_c1(&broker, &c1, false).await;
    assert!(!present, "and the restarted relay does not bring it back");
}

#[tokio::test]
async fn an_agent_resumes_its_mqtt_session_after_a_relay_restart_and_still_gets_its_jobs() {
    let env = TestEnv::new(
        "an_agent_resumes_its_mqtt_session_after_a_relay_restart_and_still_gets_its_jobs",
    );
    let data_dir = env.path("relay");
    let mut broker = relay_on(&env, &data_dir, None).await;
    let addr = broker.addr();
    let host = env.host("svc", &broker);
    let device = env.device("C1").start(&broker).await;
    device
        .wait_for_log("subscribed; ready for jobs", deadline())
        .await;
    host.list_json(true).await;

    broker.stop().await;
    let broker = relay_on(&env, &data_dir, Some(addr)).await;
    device
        .wait_for_line("resumed its session", deadline(), |l| {
            l.contains("connected to broker") && l.contains("session_present=true")
        })
        .await;
    let metrics = raw::scrape(broker.metrics_addr()).await;
    assert_eq!(raw::sample(&metrics, "chukei_sessions_resumed_total"), 1);
    let job = host.submit_get_data("C1").await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
}
