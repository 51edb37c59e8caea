//! Resource limits, each against the real broker: exceeding one closes that client —
//! and only that client — with a logged reason naming the limit, and moves its metric
//! (`chukei_limit_exceeded_total{limit="KEY"}`). Misbehaving clients are played by the raw
//! MQTT-over-TLS client, which writes exactly the bytes a test wants in one go.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use harness::raw::{self, PUBACK, RawClient, SERVER_UNAVAILABLE};
use harness::{Broker, TestEnv, deadline, secs};
use protocol::{JobId, Role, Serial, topic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METRICS: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

/// Waits for the broker's "limit exceeded" line for `limit` and `identity`; returns it.
async fn limit_logged(broker: &Broker, limit: &str, identity: &str) -> String {
    let key = format!("limit=\"{limit}\"");
    broker
        .wait_for_line(
            &format!("limit exceeded: {limit} for {identity}"),
            deadline(),
            |l| l.contains("limit exceeded") && l.contains(&key) && l.contains(identity),
        )
        .await
}

async fn limit_count(broker: &Broker, limit: &str) -> u64 {
    let text = raw::scrape(broker.metrics_addr()).await;
    raw::sample(
        &text,
        &format!("chukei_limit_exceeded_total{{limit=\"{limit}\"}}"),
    )
}

#[tokio::test]
async fn an_oversized_packet_closes_only_that_client() {
    let env = TestEnv::new("an_oversized_packet_closes_only_that_client");
    let broker = env
        .broker()
        .args(["--max-packet-bytes", "4096", "--max-payload-bytes", "2048"])
        .args(METRICS)
        .start()
        .await;
    let svc = env.certs(Role::Host, "svc");
    let mut bystander = RawClient::connect(broker.addr(), &svc, "svc:ok").await;

    // A host and a device each send one packet over the limit, among packets under it.
    let mut host = RawClient::connect(broker.addr(), &svc, "svc:big").await;
    let mut burst = raw::publish("host/svc/req", &[1; 100], 1, 1);
    burst.extend(raw::publish("host/svc/req", &[2; 8000], 1, 2));
    host.send(&burst).await.unwrap_or_else(|e| panic!("{e}"));
    let seen = host.expect_closed().await;
    assert!(
        !seen
            .iter()
            .any(|p| p.kind == PUBACK && p.body == 2u16.to_be_bytes()),
        "the oversized publish was acknowledged: {seen:?}"
    );
    limit_logged(&broker, "max_packet_bytes", "host:svc").await;

    let c1 = env.certs(Role::Device, "C1");
    let mut device = RawClient::connect(broker.addr(), &c1, "C1").await;
    device
        .send(&raw::publish("dev/C1/up/state", &[3; 5000], 1, 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    device.expect_closed().await;
    limit_logged(&broker, "max_packet_bytes", "device:C1").await;
    assert_eq!(limit_count(&broker, "max_packet_bytes").await, 2);

    // The bystander's session, open all along, still works; so does a new one.
    bystander.ping().await;
    bystander.publish_acked("host/svc/req", b"{}", 9).await;
    let mut again = RawClient::connect(broker.addr(), &svc, "svc:big").await;
    again.ping().await;
}

#[tokio::test]
async fn a_client_flooding_qos1_publishes_is_closed_at_max_inflight() {
    let env = TestEnv::new("a_client_flooding_qos1_publishes_is_closed_at_max_inflight");
    let broker = env
        .broker()
        .args(["--max-inflight", "5"])
        .args(METRICS)
        .start()
        .await;
    let svc = env.certs(Role::Host, "svc");

    // Exactly the limit in one write is fine: every one is acknowledged, the session stays.
    let mut polite = RawClient::connect(broker.addr(), &svc, "svc:ok").await;
    let five: Vec<u8> = (1..=5u16)
        .flat_map(|id| raw::publish("host/svc/req", b"x", 1, id))
        .collect();
    polite.send(&five).await.unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..5 {
        polite.expect(PUBACK).await;
    }

    // Fifty in one write: the relay reads them together, long before their acks come back.
    let mut flood = RawClient::connect(broker.addr(), &svc, "svc:flood").await;
    let fifty: Vec<u8> = (1..=50u16)
        .flat_map(|id| raw::publish("host/svc/req", b"x", 1, id))
        .collect();
    flood.send(&fifty).await.unwrap_or_else(|e| panic!("{e}"));
    let seen = flood.expect_closed().await;
    let acked = seen.iter().filter(|p| p.kind == PUBACK).count();
    assert!(
        acked < 50,
        "all 50 were acknowledged: the limit never applied"
    );
    let line = limit_logged(&broker, "max_inflight", "host:svc").await;
    assert!(line.contains("peer"), "the line names the peer: {line}");
    assert_eq!(limit_count(&broker, "max_inflight").await, 1);

    // The polite session is untouched, and keeps publishing.
    polite.publish_acked("host/svc/req", b"x", 6).await;
    polite.ping().await;
}

#[tokio::test]
async fn qos2_publishes_are_refused_with_a_reason() {
    let env = TestEnv::new("qos2_publishes_are_refused_with_a_reason");
    let broker = env.broker().args(METRICS).start().await;
    let svc = env.certs(Role::Host, "svc");
    let mut bystander = RawClient::connect(broker.addr(), &svc, "svc:ok").await;

    let mut host = RawClient::connect(broker.addr(), &svc, "svc:q2").await;
    host.send(&raw::publish("host/svc/req", b"x", 2, 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = host.expect_closed().await;
    assert!(
        seen.iter().all(|p| p.kind != raw::PUBLISH && p.kind != 5),
        "no PUBREC for a refused QoS 2 publish: {seen:?}"
    );
    let line = limit_logged(&broker, "qos2", "host:svc").await;
    assert!(line.contains("QoS 1"), "the reason says what to do: {line}");
    assert_eq!(limit_count(&broker, "qos2").await, 1);

    // A device is refused the same way (on the devices' own session path).
    let c1 = env.certs(Role::Device, "C1");
    let mut device = RawClient::connect(broker.addr(), &c1, "C1").await;
    device
        .send(&raw::publish("dev/C1/up/state", b"x", 2, 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = device.expect_closed().await;
    assert!(
        seen.iter().all(|p| p.kind != 5),
        "no PUBREC for a device's QoS 2 publish: {seen:?}"
    );

    bystander.publish_acked("host/svc/req", b"x", 2).await;
}

#[tokio::test]
async fn subscribing_past_max_subscriptions_closes_that_client() {
    let env = TestEnv::new("subscribing_past_max_subscriptions_closes_that_client");
    let broker = env
        .broker()
        .args(["--max-subscriptions", "3"])
        .args(METRICS)
        .start()
        .await;
    let mut watch = env
        .mqtt(Role::Integrator, "crm")
        .client_id("crm:watch")
        .connect(&broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    watch.subscribe_and_wait("fleet/#").await;

    let crm = env.certs(Role::Integrator, "crm");
    let mut c = RawClient::connect(broker.addr(), &crm, "crm:subs").await;
    let granted = c
        .subscribe_acked(1, &["fleet/A/state", "fleet/B/state", "fleet/C/state"])
        .await;
    assert_eq!(granted, [1, 1, 1]);
    // The same filter again counts once; an unsubscribe frees a place.
    assert_eq!(c.subscribe_acked(2, &["fleet/A/state"]).await, [1]);
    c.send(&raw::unsubscribe(3, &["fleet/C/state"]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.expect(raw::UNSUBACK).await;
    assert_eq!(c.subscribe_acked(4, &["fleet/D/state"]).await, [1]);
    // A fourth distinct filter is one too many.
    c.send(&raw::subscribe(5, &["fleet/E/state"]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = c.expect_closed().await;
    assert!(
        seen.iter().all(|p| p.kind != raw::SUBACK),
        "the fourth filter was granted: {seen:?}"
    );
    limit_logged(&broker, "max_subscriptions", "integrator:crm").await;
    assert_eq!(limit_count(&broker, "max_subscriptions").await, 1);

    // A device (on the devices' own session path) is held to the same number.
    let c1 = env.certs(Role::Device, "C1");
    let mut device = RawClient::connect(broker.addr(), &c1, "C1").await;
    for (pkid, filter) in [
        (1, "dev/C1/jobs/+"),
        (2, "dev/C1/ack"),
        (3, "dev/C1/blob/+"),
    ] {
        assert_eq!(
            device.subscribe_acked(pkid, &[filter]).await,
            [1],
            "{filter}"
        );
    }
    device
        .send(&raw::subscribe(4, &["dev/C1/merged/+"]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = device.expect_closed().await;
    assert!(
        seen.iter().all(|p| p.kind != raw::SUBACK),
        "the device's fourth filter was granted: {seen:?}"
    );

    // The other session of the same integrator still gets the fleet's news.
    let host = env.host("svc", &broker);
    let job = host.submit_get_data("C9").await;
    let serial = Serial::parse("C9").expect("a valid serial");
    let job = JobId::parse(&job).expect("`jobs submit` prints a job id");
    watch
        .next_publish_on(&topic::fleet_job(&serial, &job), deadline())
        .await;
}

#[tokio::test]
async fn one_identity_holds_at_most_max_connections_on_either_listener() {
    let env = TestEnv::new("one_identity_holds_at_most_max_connections_on_either_listener");
    let broker = env
        .broker()
        .ws()
        .args(["--max-connections-per-identity", "2"])
        .args(METRICS)
        .start()
        .await;
    let svc = env.certs(Role::Host, "svc");
    let a = RawClient::connect(broker.addr(), &svc, "svc:a").await;
    let mut b = RawClient::connect(broker.addr(), &svc, "svc:b").await;

    let (mut c, code) = RawClient::connect_as(broker.addr(), &svc, "svc:c")
        .await
        .unwrap_or_else(|e| panic!("a third session gets a CONNACK that refuses it: {e}"));
    assert_eq!(code, SERVER_UNAVAILABLE, "CONNACK return code");
    c.expect_closed().await;
    limit_logged(&broker, "max_connections_per_identity", "host:svc").await;

    // The WebSocket listener counts the same sessions.
    let over_ws = env
        .host_at("svc", broker.ws_url())
        .run(["--timeout-secs", "3", "jobs", "list"])
        .await;
    assert!(
        !over_ws.success(),
        "a third session over WebSocket was let in:\n{over_ws}"
    );
    assert!(
        over_ws.stderr.contains("ServiceUnavailable"),
        "refused by the limit, not for another reason:\n{over_ws}"
    );
    // Counted once per attempt (the CLI retries until its timeout).
    assert!(limit_count(&broker, "max_connections_per_identity").await >= 2);

    // Another identity is not affected, nor are the two open sessions.
    let other = env.certs(Role::Host, "other");
    RawClient::connect(broker.addr(), &other, "other")
        .await
        .ping()
        .await;
    b.ping().await;

    // When a session ends its place is given back ("session ended" is logged after that).
    let ended = broker.lines_matching(|l| l.contains("session ended")).len();
    a.disconnect().await;
    broker
        .wait_for_lines("svc:a's session ending", ended + 1, deadline(), |l| {
            l.contains("session ended")
        })
        .await;
    let mut c = RawClient::connect(broker.addr(), &svc, "svc:c").await;
    c.ping().await;
    let over_ws = env
        .host_at("svc", broker.ws_url())
        .run(["--timeout-secs", "3", "jobs", "list"])
        .await;
    assert!(
        !over_ws.success(),
        "two sessions are open again; a third over WebSocket must be refused"
    );
}

#[tokio::test]
async fn a_connection_flood_from_one_source_is_cut_before_tls() {
    const ATTEMPTS: usize = 200;
    const BURST: usize = 3;
    let env = TestEnv::new("a_connection_flood_from_one_source_is_cut_before_tls");
    let broker = env
        .broker()
        .args([
            "--connect-rate-per-source",
            "1",
            "--connect-burst-per-source",
            "3",
            "--connect-rate-exempt-loopback",
            "false",
        ])
        .args(METRICS)
        .start()
        .await;
    let flooder = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let c1 = env.certs(Role::Device, "C1");
    let svc = env.certs(Role::Host, "svc");

    let start = Instant::now();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for _ in 0..ATTEMPTS {
        match RawClient::tls_from(broker.addr(), &c1, Some(flooder)).await {
            Ok(c) => admitted.push(c),
            Err(_) => refused += 1,
        }
    }
    let elapsed = start.elapsed();
    // Another source connects during the flood (the flood's admitted sockets are still open).
    let mut bystander = RawClient::connect(broker.addr(), &svc, "svc").await;
    bystander.ping().await;

    // The burst goes through at once; after it, one a second at most.
    let refill = elapsed.as_secs_f64().ceil() as usize + 1;
    println!(
        "{ATTEMPTS} connections from {flooder} in {elapsed:?}: {} admitted, {refused} refused",
        admitted.len()
    );
    assert!(admitted.len() >= BURST, "the burst was not admitted");
    assert!(
        admitted.len() <= BURST + refill,
        "{} admitted in {elapsed:?}: more than the burst and the rate allow",
        admitted.len()
    );
    assert_eq!(
        limit_count(&broker, "connect_rate_per_source").await,
        refused as u64,
        "every refused socket is counted"
    );
    broker
        .wait_for_line("the refusal", deadline(), |l| {
            l.contains("limit exceeded") && l.contains("connect_rate_per_source")
        })
        .await;
    // Refused sockets never reached TLS.
    let tls_failed = raw::sample(
        &raw::scrape(broker.metrics_addr()).await,
        "chukei_tls_failed_total",
    );
    assert_eq!(tls_failed, 0, "refused sockets were handshaken");

    // The log holds a few lines a second, not one per refused socket.
    drop(admitted);
    drop(bystander);
    let mut broker = broker;
    broker.stop().await;
    let lines = broker
        .lines_matching(|l| l.contains("limit exceeded") && l.contains("connect_rate_per_source"))
        .len();
    let seconds = elapsed.as_secs() as usize + 2;
    assert!(
        lines <= 10 * seconds,
        "{lines} log lines for {refused} refused sockets in {elapsed:?}"
    );
}

#[tokio::test]
async fn a_silent_socket_is_closed_at_the_handshake_deadline() {
    let env = TestEnv::new("a_silent_socket_is_closed_at_the_handshake_deadline");
    let broker = env
        .broker()
        .args(["--handshake-timeout-secs", "2"])
        .args(METRICS)
        .start()
        .await;
    let mut silent = raw::tcp(broker.addr(), None).await;
    // A valid client is served while the silent socket holds its handshake slot.
    let svc = env.certs(Role::Host, "svc");
    let mut valid = RawClient::connect(broker.addr(), &svc, "svc").await;
    valid.ping().await;

    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(secs(30), silent.read(&mut byte))
        .await
        .expect("the silent socket is still open long after the handshake deadline");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the broker sent something to a socket that never spoke: {read:?}"
    );
    broker
        .wait_for_line("the handshake timeout", deadline(), |l| {
            l.contains("limit exceeded") && l.contains("handshake_timeout_secs")
        })
        .await;
    let text = raw::scrape(broker.metrics_addr()).await;
    assert_eq!(raw::sample(&text, "chukei_tls_timed_out_total"), 1);
    // The valid session outlives the silent socket.
    valid.ping().await;
}

#[tokio::test]
async fn a_socket_silent_past_the_first_byte_deadline_is_closed_and_a_slow_handshake_is_not() {
    let env = TestEnv::new(
        "a_socket_silent_past_the_first_byte_deadline_is_closed_and_a_slow_handshake_is_not",
    );
    // The whole handshake may take an hour; its first byte must come within a second.
    let broker = env
        .broker()
        .args([
            "--first-byte-timeout-secs",
            "1",
            "--handshake-timeout-secs",
            "3600",
        ])
        .args(METRICS)
        .start()
        .await;
    let mut slow = raw::tcp(broker.addr(), None).await;
    slow.write_all(&raw::PARTIAL_CLIENT_HELLO)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut silent = raw::tcp(broker.addr(), None).await;

    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(deadline(), silent.read(&mut byte))
        .await
        .expect("the silent socket is still open long after the first-byte deadline");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the broker sent something to a socket that never spoke: {read:?}"
    );
    // The slow handshake, older than the silent socket, had sent its first byte: still open.
    match slow.try_read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the slow handshake was closed: {other:?}"),
    }
    broker
        .wait_for_line("the first-byte timeout", deadline(), |l| {
            l.contains("limit exceeded") && l.contains("first_byte_timeout_secs")
        })
        .await;
    let text = raw::scrape(broker.metrics_addr()).await;
    assert_eq!(raw::sample(&text, "chukei_tls_timed_out_total"), 1);
    let svc = env.certs(Role::Host, "svc");
    RawClient::connect(broker.addr(), &svc, "svc")
        .await
        .ping()
        .await;
}

/// A request to the metrics endpoint whose headers never end.
async fn half_sent_request(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut s = raw::tcp(addr, None).await;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\n")
        .await
        .unwrap_or_else(|e| panic!("writing to the metrics endpoint: {e}"));
    s
}

/// Waits until the metrics endpoint closes `s` (end of stream or reset); returns what it sent.
async fn closed_by_server(s: &mut tokio::net::TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    match tokio::time::timeout(deadline(), s.read_to_end(&mut got)).await {
        Ok(_) => got,
        Err(_) => panic!("{what}: still open after {:?}", deadline()),
    }
}

#[tokio::test]
async fn the_metrics_endpoint_closes_half_sent_requests_at_the_header_deadline() {
    let env = TestEnv::new("the_metrics_endpoint_closes_half_sent_requests_at_the_header_deadline");
    let broker = env
        .broker()
        .args(["--metrics-header-timeout-secs", "1"])
        .args(METRICS)
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(half_sent_request(broker.metrics_addr()).await);
    }
    for (i, s) in held.iter_mut().enumerate() {
        closed_by_server(s, &format!("half-sent request {i}")).await;
    }
    // A whole request is answered as before.
    let text = raw::scrape(broker.metrics_addr()).await;
    assert!(text.contains("chukei_tls_failed_total"), "{text}");
}

#[tokio::test]
async fn the_metrics_endpoint_holds_at_most_metrics_max_connections() {
    const MAX: usize = 4;
    let env = TestEnv::new("the_metrics_endpoint_holds_at_most_metrics_max_connections");
    let broker = env
        .broker()
        .args([
            "--metrics-max-connections",
            &MAX.to_string(),
            "--metrics-header-timeout-secs",
            "3600",
        ])
        .args(METRICS)
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..MAX {
        held.push(half_sent_request(broker.metrics_addr()).await);
    }
    // One more, even a whole request, is closed without an answer.
    let mut extra = half_sent_request(broker.metrics_addr()).await;
    let _ = extra.write_all(b"\r\n").await;
    let answer = closed_by_server(&mut extra, "a connection past the cap").await;
    assert!(
        answer.is_empty(),
        "a connection past the cap was answered: {}",
        String::from_utf8_lossy(&answer)
    );
    broker
        .wait_for_line("the refusal", deadline(), |l| {
            l.contains("limit exceeded") && l.contains("metrics_max_connections")
        })
        .await;
    // The held ones are still open; once one closes, a scrape gets its place.
    let mut probe = [0u8; 1];
    for (i, s) in held.iter().enumerate() {
        match s.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("held connection {i} was closed: {other:?}"),
        }
    }
    drop(held.pop());
    let addr = broker.metrics_addr();
    harness::poll_until("a scrape once a place is free", deadline(), || async move {
        let mut s = raw::tcp(addr, None).await;
        let _ = s
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
            .await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        if out.contains("chukei_tls_failed_total") {
            Ok(())
        } else {
            Err(format!("answered: {out:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}
