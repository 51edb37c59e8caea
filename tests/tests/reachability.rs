//! Devices and hosts behind real firewalls (network namespaces with nftables rules that drop
//! every inbound connection), reaching the relay only by connecting out: directly, through a
//! real HTTP proxy (tinyproxy, CONNECT only) over TLS and over WebSocket, across a link cut for
//! 30 s in the middle of a job and of a firmware download, and across relay failover. Needs
//! root: these tests skip with a message elsewhere (CI runs as root).
//!
//! The figures they measure (time to fail over, to return, to reconnect after a cut) are
//! printed as `figure: …` lines; run with `--nocapture` to see them.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use chrono::{DateTime, Utc};
use harness::netns::{NetBed, command_in};
use harness::tinyproxy::TinyproxyBuilder;
use harness::{Proc, TestEnv, deadline, log_time, pseudo_random_bytes, secs};
use serde_json::Value;

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

/// Session timing for the agents in these tests: a dead link is noticed within seconds and the
/// reconnect backoff stays short (1 s doubling to 4 s), so the bounds below stay tight.
const FAST_SESSION: &str = "[session]\nkeepalive_secs = 5\nconnect_timeout_secs = 3\nreconnect_min_secs = 1\nreconnect_max_secs = 4\nresend_min_secs = 1\nresend_max_secs = 4\nfetch_timeout_secs = 2\n";
/// The longest wait between two reconnect attempts with [`FAST_SESSION`]: 4 s, jittered by up to
/// half again.
const BACKOFF_BOUND: Duration = Duration::from_secs(6);

/// The statuses the broker stored for `job`, in order, one per "job update stored" line: a
/// report that arrived twice would be stored (and listed) twice.
fn stored_statuses(broker: &Proc, job: &str) -> Vec<String> {
    let tag = format!("job={job} ");
    broker
        .lines_matching(|l| l.contains("job update stored") && l.contains(&tag))
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("status="))
                .map(str::to_owned)
        })
        .collect()
}

fn assert_each_status_once(broker: &Proc, job: &str, detail: &Value) {
    let stored = stored_statuses(broker, job);
    let mut seen = stored.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        stored.len(),
        "every report of {job} must be stored exactly once; stored: {stored:?}"
    );
    let timeline: Vec<&str> = detail["timeline"]
        .as_array()
        .map(|t| t.iter().filter_map(|e| e["status"].as_str()).collect())
        .unwrap_or_default();
    let mut unique = timeline.clone();
    unique.dedup();
    assert_eq!(
        unique, timeline,
        "the timeline of {job} repeats a step: {detail:#}"
    );
}

/// The first line after `after` that satisfies `pred`, waited for; returns its time.
async fn line_after(
    proc: &Proc,
    what: &str,
    after: DateTime<Utc>,
    within: Duration,
    pred: impl Fn(&str) -> bool,
) -> DateTime<Utc> {
    let line = proc
        .wait_for_line(what, within, |l| {
            pred(l) && log_time(l).is_some_and(|t| t >= after)
        })
        .await;
    log_time(&line).unwrap_or(after)
}

fn millis(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    (to - from).num_milliseconds()
}

/// A device whose `get_data` of counters blocks until the file `go` exists: an exec-hook device
/// (the backend real machines use), so a test can cut the link while the job is running.
/// Returns the agent's config: [`FAST_SESSION`] and the hook.
fn held_device_config(env: &TestEnv, go: &std::path::Path) -> String {
    let hook = env.path("held-device.sh");
    let script = format!(
        r#"#!/bin/sh
if [ "$1" = identification ]; then
    echo 'identification.model="LAB-1"'
    echo 'identification.rom_version="1.0"'
    exit 0
fi
while [ ! -f '{go}' ]; do sleep 0.1; done
echo counters.total=4242
"#,
        go = go.display()
    );
    std::fs::write(&hook, script).expect("write the hook");
    let chmod = std::process::Command::new("chmod")
        .arg("+x")
        .arg(&hook)
        .status()
        .expect("chmod");
    assert!(chmod.success());
    format!(
        "{FAST_SESSION}[exec]\nget_data = [\"{}\"]\n",
        hook.display()
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
    let device = env
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

    // A fatal fault (Fig. 5): the device's alarm crosses its firewall, the host's crosses its own.
    let raised = std::process::Command::new(harness::bin("device-agent"))
        .arg("fault")
        .arg("--data-dir")
        .arg(device.data_dir())
        .args(["fatal", "SC-541", "main motor failure"])
        .output()
        .expect("run device-agent fault");
    assert!(
        raised.status.success(),
        "device-agent fault: {}",
        String::from_utf8_lossy(&raised.stderr)
    );
    let alarm = harness::poll_until("the fatal alarm at the host", deadline(), || async {
        let out = host.run(["alarms", "list", "--json"]).await;
        let alarms: Value = serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {out}"))?;
        alarms
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|v| v["serial"] == "FW1" && v["code"] == "SC-541")
                    .cloned()
            })
            .ok_or_else(|| alarms.to_string())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(alarm["status"], "cleared", "{alarm:#}");
    assert_eq!(alarm["detail"], "main motor failure", "{alarm:#}");
}

#[tokio::test]
async fn a_device_allowed_out_only_through_an_http_proxy_reaches_the_relay_over_tls_and_websocket()
{
    let test = "a_device_allowed_out_only_through_an_http_proxy";
    let Some(mut bed) = bed_or_skip(test) else {
        return;
    };
    let net = bed.add_proxy().expect("proxy namespace");
    let env = env_for(test, &bed);
    let broker = env.broker().netns(&bed.relay).ws().start().await;
    let (tls_port, ws_port) = (broker.port(), broker.ws_port());

    // The customer's proxy: CONNECT to the relay's two ports only, with credentials.
    let proxy_port = 3128;
    let proxy = TinyproxyBuilder::new(
        &env,
        net.addr_for_device,
        proxy_port,
        bed.relay.addr,
        &[tls_port, ws_port],
    )
    .netns(&net.ns.name)
    .allow(net.device_addr)
    .basic_auth("copier", "s3cret")
    .start()
    .await;

    // The customer's firewall: nothing in, and out only to the proxy.
    bed.drop_inbound(&bed.device).expect("device firewall");
    bed.only_out_to(&bed.device, net.addr_for_device, proxy_port)
        .expect("device egress rule");
    bed.drop_inbound(&bed.host).expect("host firewall");
    assert!(
        bed.probe_tcp(&bed.device, bed.relay.addr, tls_port)
            .is_err(),
        "the device must not reach the relay directly"
    );
    assert!(
        bed.probe_tcp(&bed.device, net.addr_for_device, proxy_port)
            .is_ok(),
        "the device reaches its proxy"
    );
    // The proxy itself tunnels nothing but CONNECT to the relay's ports.
    let relay = bed.relay.addr;
    let auth = "Proxy-Authorization: Basic Y29waWVyOnMzY3JldA==\r\n";
    for (request, want) in [
        (format!("CONNECT {relay}:22 HTTP/1.1\r\n{auth}\r\n"), "403"),
        (
            format!("GET http://{relay}:{tls_port}/ HTTP/1.1\r\n{auth}\r\n"),
            "403",
        ),
        (
            format!("CONNECT {relay}:{tls_port} HTTP/1.1\r\n\r\n"),
            "407",
        ),
    ] {
        let status = proxy.ask(&bed.device.name, &request);
        assert!(
            status.contains(want),
            "{request:?} through the proxy must get {want}, got {status:?}"
        );
    }

    // One device over TLS with --proxy, one over WebSocket with HTTPS_PROXY (curl's way).
    let tls_device = env
        .device("PX1")
        .netns(&bed.device, broker.url_at(relay))
        .arg("--proxy")
        .arg(proxy.url())
        .start(&broker)
        .await;
    let ws_device = env
        .device("PX2")
        .netns(&bed.device, broker.ws_url_at(relay))
        .env("HTTPS_PROXY", proxy.url())
        .start(&broker)
        .await;
    let host = env.host_in("svc", broker.url_at(bed.relay_for_host), &bed.host);
    for device in [&tls_device, &ws_device] {
        let job = host.submit_get_data(device.serial()).await;
        let shown = host.wait_for_status(&job, "succeeded", deadline()).await;
        assert!(
            shown["data"]["counters"]["total"]
                .as_i64()
                .is_some_and(|t| t > 0),
            "{} answered through the proxy: {shown}",
            device.serial()
        );
    }
    let connects = proxy.connects();
    for port in [tls_port, ws_port] {
        let want = format!("CONNECT {relay}:{port} ");
        assert!(
            connects.iter().any(|c| c.starts_with(&want)),
            "tinyproxy must have tunnelled {want:?}; it logged {connects:#?}"
        );
    }

    // The host agent goes through the same proxy from the customer's network, over WebSocket.
    let host_in_customer_net = env
        .host_in("svc2", broker.ws_url_at(relay), &bed.device)
        .with_args(&["--proxy", &proxy.url()]);
    let jobs = host_in_customer_net.list_json(true).await;
    assert!(jobs.len() >= 2, "jobs listed through the proxy: {jobs:?}");
}

#[tokio::test]
async fn a_job_survives_a_30_s_link_cut_and_each_report_arrives_once() {
    let test = "a_job_survives_a_30_s_link_cut";
    let Some(bed) = bed_or_skip(test) else { return };
    let env = env_for(test, &bed);
    bed.drop_inbound(&bed.device).expect("device firewall");
    bed.drop_inbound(&bed.host).expect("host firewall");
    let broker = env.broker().netns(&bed.relay).start().await;
    let go = env.path("go");
    let device = env
        .device("CUT1")
        .netns(&bed.device, broker.url_at(bed.relay.addr))
        .config(&held_device_config(&env, &go))
        .start(&broker)
        .await;
    let host = env.host_in("svc", broker.url_at(bed.relay_for_host), &bed.host);
    let job = host
        .submit(&[
            "--serial",
            "CUT1",
            "--kind",
            "get-data",
            "--sections",
            "counters",
        ])
        .await;

    // The job is running on the device (its data read waits for `go`): cut the link now.
    broker
        .wait_for_line("the job in progress", deadline(), |l| {
            l.contains("job update stored")
                && l.contains(&format!("job={job} "))
                && l.contains("status=in-progress")
        })
        .await;
    bed.cut(&bed.device).expect("cut");
    let cut_at = Utc::now();
    // The read finishes during the cut: the report waits in the outbox.
    std::fs::write(&go, "").expect("release the data read");
    device
        .wait_for_line("the lost connection", secs(20), |l| {
            l.contains("connection to broker lost") && log_time(l).is_some_and(|t| t >= cut_at)
        })
        .await;
    tokio::time::sleep(
        Duration::from_secs(30).saturating_sub((Utc::now() - cut_at).to_std().unwrap_or_default()),
    )
    .await;
    let status = host.show_json(&job).await;
    assert_eq!(
        status["status"], "in-progress",
        "no report can cross a cut link: {status:#}"
    );
    // Before the restore: the device may be back before the command that restores returns.
    let restored = Utc::now();
    bed.restore(&bed.device).expect("restore");

    let back = line_after(
        &device,
        "a reconnect after the cut",
        restored,
        deadline(),
        |l| l.contains("connected to broker"),
    )
    .await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert_eq!(detail["data"]["counters"]["total"], 4242, "{detail:#}");
    assert_each_status_once(&broker, &job, &detail);
    let reconnect = millis(restored, back);
    println!("figure: reconnect after a 30 s cut in the middle of a job: {reconnect} ms");
    assert!(
        reconnect <= (BACKOFF_BOUND + secs(4)).as_millis() as i64,
        "the device must be back within the backoff bound: {reconnect} ms"
    );
}

#[tokio::test]
async fn a_firmware_download_resumes_after_a_30_s_link_cut_and_each_report_arrives_once() {
    let test = "a_firmware_download_resumes_after_a_30_s_link_cut";
    let Some(bed) = bed_or_skip(test) else { return };
    let env = env_for(test, &bed);
    bed.drop_inbound(&bed.device).expect("device firewall");
    bed.drop_inbound(&bed.host).expect("host firewall");
    let broker = env.broker().netns(&bed.relay).start().await;
    let host = env.host_in("svc", broker.url_at(bed.relay_for_host), &bed.host);
    let keys = host.keys_generate(&env.path("keys")).await;
    // Large enough that the download takes a while on the first fetch windows (1,024 chunks of
    // 32 KiB), so the cut lands in the middle of it.
    let image = env.path("fw-3.0.bin");
    std::fs::write(&image, pseudo_random_bytes(32 << 20, 5)).expect("write the image");
    host.upload(&image, "3.0", &keys.secret).await;

    let device = env
        .device("CUT2")
        .netns(&bed.device, broker.url_at(bed.relay.addr))
        .config(FAST_SESSION)
        .publisher_key(&keys.public)
        .start(&broker)
        .await;
    let job = host
        .submit(&[
            "--serial",
            "CUT2",
            "--kind",
            "firmware",
            "--artifact",
            "3.0",
        ])
        .await;
    let served = |l: &str| l.contains("chunks served") && l.contains(&format!("job={job} "));
    broker
        .wait_for_line("the first chunks", deadline(), served)
        .await;
    bed.cut(&bed.device).expect("cut");
    let cut_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let before = device.lines_matching(|l| l.contains("download complete"));
    assert!(
        before.is_empty(),
        "the cut must land in the middle of the download: {before:?}"
    );
    // Before the restore: the device may be back before the command that restores returns.
    let restored = Utc::now();
    bed.restore(&bed.device).expect("restore");

    let back = line_after(
        &device,
        "a reconnect after the cut",
        restored,
        deadline(),
        |l| l.contains("connected to broker"),
    )
    .await;
    device.wait_for_log("download complete", secs(120)).await;
    let detail = host.wait_for_status(&job, "succeeded", secs(120)).await;
    assert_each_status_once(&broker, &job, &detail);

    // Resumed, not restarted: the relay served each chunk about once in all.
    let chunks: usize = broker
        .lines_matching(served)
        .iter()
        .filter_map(|l| l.split("chunks=[").nth(1))
        .filter_map(|rest| rest.split(']').next())
        .map(|list| list.split(',').filter(|c| !c.trim().is_empty()).count())
        .sum();
    let before_cut = broker
        .lines_matching(served)
        .iter()
        .filter(|l| log_time(l).is_some_and(|t| t < cut_at))
        .count();
    assert!(
        (1024..=1024 + 4 * 64).contains(&chunks),
        "1,024 chunks, served about once each across the cut (resumed, not restarted): {chunks}"
    );
    let reconnect = millis(restored, back);
    println!(
        "figure: reconnect after a 30 s cut in the middle of a firmware download: {reconnect} ms \
         ({before_cut} fetch windows served before the cut, {chunks} chunks served in all)"
    );
    assert!(
        reconnect <= (BACKOFF_BOUND + secs(4)).as_millis() as i64,
        "the device must be back within the backoff bound: {reconnect} ms"
    );
}

#[tokio::test]
async fn with_two_relays_the_device_fails_over_to_the_second_and_returns_to_the_first() {
    let test = "with_two_relays_the_device_fails_over";
    let Some(bed) = bed_or_skip(test) else { return };
    let env = env_for(test, &bed);
    bed.drop_inbound(&bed.device).expect("device firewall");
    bed.drop_inbound(&bed.host).expect("host firewall");
    let relay = bed.relay.addr;
    let mut first = env.broker().netns(&bed.relay).start().await;
    let second = env
        .broker()
        .netns(&bed.relay)
        .data_dir(env.path("relay-2-data"))
        .args(["--server-name", "relay-2"])
        .start()
        .await;
    let (url1, url2) = (first.url_at(relay), second.url_at(relay));
    let failback_secs = 3;
    let device = env
        .device("FO1")
        .netns(&bed.device, url1.clone())
        .brokers(&[url1.clone(), url2.clone()])
        .config(FAST_SESSION)
        .arg("--failback-secs")
        .arg(failback_secs.to_string())
        .start(&first)
        .await;
    let on = |url: &str| {
        let field = format!("broker={url} ");
        move |l: &str| l.contains("connected to broker") && l.contains(&field)
    };
    device
        .wait_for_line("a session with the first relay", deadline(), on(&url1))
        .await;

    // The device's home relay holds a job due in a few seconds; the device has taken it.
    let host1 = env.host_in("svc", first.url_at(bed.relay_for_host), &bed.host);
    let at = (Utc::now() + chrono::Duration::seconds(8))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let job = host1
        .submit(&["--serial", "FO1", "--kind", "get-data", "--at", &at])
        .await;
    first
        .wait_for_line("the job delivered", deadline(), |l| {
            l.contains("job update stored")
                && l.contains(&format!("job={job} "))
                && l.contains("status=delivered")
        })
        .await;

    // The home relay dies: the device moves to the second within the backoff bound…
    let first_addr = first.addr();
    first.kill9().await;
    let stopped = Utc::now();
    let moved = line_after(
        &device,
        "a session with the second relay",
        stopped,
        deadline(),
        on(&url2),
    )
    .await;
    let failover = millis(stopped, moved);
    second
        .wait_for_line(
            "the device announced at the second relay",
            deadline(),
            |l| l.contains("device state stored") && l.contains("serial=FO1"),
        )
        .await;
    // …runs the job there when it is due, and keeps its reports for the relay that issued it.
    line_after(&device, "the job finished", stopped, deadline(), |l| {
        l.contains("job finished") && l.contains(&format!("job={job} "))
    })
    .await;

    // The home relay comes back (same port, same store): the device returns and reports.
    // The time is taken before the start: the device's probe may find the relay in the moment
    // between its ready file and the start's return (it did, 6 ms after ready, in one CI run).
    let restarted = Utc::now();
    let first = env
        .broker()
        .netns(&bed.relay)
        .listen(SocketAddr::new(
            Ipv4Addr::UNSPECIFIED.into(),
            first_addr.port(),
        ))
        .start()
        .await;
    let returned = line_after(
        &device,
        "a session with the first relay again",
        restarted,
        deadline(),
        on(&url1),
    )
    .await;
    device
        .wait_for_log("preferred relay reachable again", deadline())
        .await;
    let failback = millis(restarted, returned);
    let detail = host1.wait_for_status(&job, "succeeded", deadline()).await;
    assert_eq!(detail["server"], "relay-1", "{detail:#}");
    assert!(
        detail["data"]["counters"]["total"]
            .as_i64()
            .is_some_and(|t| t > 0),
        "{detail:#}"
    );
    assert_each_status_once(&first, &job, &detail);
    let misdelivered = second.lines_matching(|l| l.contains("job update stored"));
    assert!(
        misdelivered.is_empty(),
        "no report of the first relay's job may reach the second: {misdelivered:#?}"
    );

    println!("figure: fail over to the second relay after the first was killed: {failover} ms");
    println!(
        "figure: return to the first relay after it came back: {failback} ms (failback probe \
         every {failback_secs} s, jittered ±25 %)"
    );
    assert!(
        failover <= (BACKOFF_BOUND + secs(2)).as_millis() as i64,
        "failover took {failover} ms; the backoff bound is {BACKOFF_BOUND:?}"
    );
    let failback_bound = Duration::from_secs_f64(failback_secs as f64 * 1.25) + secs(5);
    assert!(
        failback <= failback_bound.as_millis() as i64,
        "return took {failback} ms; bound {failback_bound:?}"
    );
}
