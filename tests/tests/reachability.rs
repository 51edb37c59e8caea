//! Devices and hosts behind real firewalls (network namespaces with nftables rules that drop
//! every inbound connection), reaching the relay only by connecting out. Needs root: these tests
//! skip with a message elsewhere (CI runs as root).

use harness::netns::{NetBed, command_in};
use harness::{Proc, TestEnv, deadline};

/// Builds the bed or explains why this machine cannot.
fn bed_or_skip(test: &str) -> Option<NetBed> {
    match NetBed::create() {
        Ok(bed) => Some(bed),
        Err(why) => {
            eprintln!("skipping {test}: {why}");
            None
        }
    }
}

fn env_for(name: &str, bed: &NetBed) -> TestEnv {
    TestEnv::with_sans(
        name,
        &[bed.relay.addr.to_string(), bed.relay_for_host.to_string()],
    )
}

#[tokio::test]
async fn get_data_works_with_device_and_host_behind_drop_inbound_firewalls() {
    let test = "get_data_works_with_device_and_host_behind_drop_inbound_firewalls";
    let Some(bed) = bed_or_skip(test) else { return };
    let env = env_for(test, &bed);

    // A listener inside the device's network, so the probe below has something to reach.
    let port = 18080;
    let mut cmd = command_in(Some(&bed.device.name), std::path::Path::new("python3"));
    cmd.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        &bed.device.addr.to_string(),
    ]);
    let listener = Proc::spawn(
        "listener in device net".into(),
        cmd,
        env.path("listener.log"),
    );
    listener.wait_for_log("Serving HTTP", deadline()).await;
    bed.probe_tcp(&bed.device, bed.device.addr, port)
        .expect("the device's own network reaches its listener");
    bed.probe_tcp(&bed.relay, bed.device.addr, port)
        .expect("before the firewall, the relay's network reaches the listener");

    bed.drop_inbound(&bed.device).expect("device firewall");
    bed.drop_inbound(&bed.host).expect("host firewall");
    let probe = bed.probe_tcp(&bed.relay, bed.device.addr, port);
    assert!(
        probe.is_err(),
        "the firewall must stop a connection from the relay into the device's network"
    );
    let probe = bed.probe_tcp(&bed.relay, bed.host.addr, 22);
    assert!(
        probe.is_err(),
        "nothing may connect into the host's network"
    );

    let broker = env.broker().netns(&bed.relay).start().await;
    let _device = env
        .device("FW1")
        .netns(&bed.device, broker.url_at(bed.relay.addr))
        .start(&broker)
        .await;
    let host = env.host_in("svc", broker.url_at(bed.relay_for_host), &bed.host);
    let job = host.submit_get_data("FW1").await;
    let shown = host.wait_for_status(&job, "succeeded", deadline()).await;
    let total = shown["data"]["counters"]["total"].as_i64().unwrap_or(0);
    assert!(
        total > 0,
        "counters came back through the firewalls: {shown}"
    );
}
