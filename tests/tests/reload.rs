//! Reload without restart against the real relay: `broker pki revoke` then `broker reload
//! --pid-file` (SIGHUP) closes the revoked certificate's open session and refuses it from then
//! on, while every other session stays; a configuration with an error is refused and the running
//! one kept.

use std::path::Path;

use harness::raw::{self, RawClient};
use harness::{TestEnv, broker_ok, deadline};
use protocol::Role;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test]
async fn a_reload_closes_the_revoked_session_and_keeps_every_other() {
    let env = TestEnv::new("a_reload_closes_the_revoked_session_and_keeps_every_other");
    let c1 = env.certs(Role::Device, "C1");
    let c2 = env.certs(Role::Device, "C2");
    let pid_file = env.path("broker.pid");
    let broker = env
        .broker()
        .arg("--pid-file")
        .arg(&pid_file)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start()
        .await;
    let mut one = RawClient::connect(broker.addr(), &c1, "C1").await;
    let mut two = RawClient::connect(broker.addr(), &c2, "C2").await;
    one.ping().await;
    two.ping().await;

    broker_ok([
        "pki",
        "revoke",
        "--dir",
        path_str(env.pki().dir()),
        "--id",
        "C1",
    ]);
    // Revoked on disk only: the running relay has not read the list yet.
    one.ping().await;
    let out = broker_ok(["reload", "--pid-file", path_str(&pid_file)]);
    assert!(out.contains("asked the relay"), "{out}");

    // C1's open session is closed by the relay; C2's goes on.
    one.expect_closed().await;
    broker
        .wait_for_line("C1's session closed as revoked", deadline(), |l| {
            l.contains("certificate was revoked")
        })
        .await;
    broker
        .wait_for_log("configuration reloaded", deadline())
        .await;
    two.ping().await;
    let metrics = raw::scrape(broker.metrics_addr()).await;
    assert_eq!(raw::sample(&metrics, "chukei_sessions_revoked_total"), 1);
    assert_eq!(raw::sample(&metrics, "chukei_config_reloads_total"), 1);

    // C1 cannot come back; C2 can open another session.
    let again = RawClient::connect_as(broker.addr(), &c1, "C1").await;
    assert!(
        again.is_err(),
        "revoked C1 got a CONNACK after the reload: {:?}",
        again.map(|(_, code)| code)
    );
    drop(two);
    RawClient::connect(broker.addr(), &c2, "C2")
        .await
        .ping()
        .await;
}

#[tokio::test]
async fn a_configuration_with_an_error_is_refused_and_the_running_one_kept() {
    let env = TestEnv::new("a_configuration_with_an_error_is_refused_and_the_running_one_kept");
    let c2 = env.certs(Role::Device, "C2");
    let config = env.path("broker.toml");
    std::fs::write(&config, "max_inflight = 64\n").expect("write the config");
    let pid_file = env.path("broker.pid");
    let broker = env
        .broker()
        .arg("--config")
        .arg(&config)
        .arg("--pid-file")
        .arg(&pid_file)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start()
        .await;
    let mut two = RawClient::connect(broker.addr(), &c2, "C2").await;

    std::fs::write(&config, "max_inflight = \"many\"\n").expect("break the config");
    broker_ok(["reload", "--pid-file", path_str(&pid_file)]);
    broker
        .wait_for_log(
            "reload refused; the running configuration is kept",
            deadline(),
        )
        .await;
    let metrics = raw::scrape(broker.metrics_addr()).await;
    assert_eq!(
        raw::sample(&metrics, "chukei_config_reload_failures_total"),
        1
    );

    // Still serving: the open session and a new one.
    two.ping().await;
    drop(two);
    RawClient::connect(broker.addr(), &c2, "C2")
        .await
        .ping()
        .await;
}
