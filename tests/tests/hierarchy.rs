//! Child and parent relays with real processes: a device connected to a child relay; what it
//! sends reaches the parent through the child's uplink (stored and acked at the child first),
//! keeps flowing into the child's disk while the parent is down, arrives exactly once when the
//! parent is back, and a serial the parent did not assign to the child is refused there.

mod emergency;

use emergency::fault;
use harness::raw;
use harness::{Broker, TestEnv, deadline};

const PARENT_CONFIG: &str = "[[relays]]\nid = \"R1\"\nserials = [\"C*\"]\n";

async fn parent(env: &TestEnv, addr: Option<std::net::SocketAddr>) -> Broker {
    let mut b = env
        .broker()
        .data_dir(env.path("parent"))
        .arg("--config")
        .arg(env.path("parent.toml"))
        .args(["--server-name", "parent", "--metrics-listen", "127.0.0.1:0"])
        .log_also("broker::core::meter=debug");
    if let Some(addr) = addr {
        b = b.listen(addr);
    }
    b.start().await
}

/// `broker run` as child R1 of the parent at `parent_url` (on `addr`, if given), its data in the
/// test's `child` directory.
fn child_relay<'a>(
    env: &'a TestEnv,
    parent_url: &str,
    addr: Option<std::net::SocketAddr>,
) -> harness::BrokerBuilder<'a> {
    let mut b = env
        .broker()
        .data_dir(env.path("child"))
        .args(["--relay-id", "R1", "--parent", parent_url])
        .args(["--server-name", "R1", "--uplink-batch-delay-ms", "20"]);
    if let Some(addr) = addr {
        b = b.listen(addr);
    }
    b
}

/// `jobs submit --serial C1 --kind get-data --sections counters`: the job id.
async fn submit_counters(host: &harness::Host) -> String {
    host.submit(&[
        "--serial",
        "C1",
        "--kind",
        "get-data",
        "--sections",
        "counters",
    ])
    .await
}

fn stored_counters(relay: &Broker, serial: &str) -> usize {
    relay
        .lines_matching(|l| {
            l.contains("counters report stored") && l.contains(&format!("serial={serial}"))
        })
        .len()
}

#[tokio::test]
async fn reports_climb_from_child_to_parent_exactly_once_across_a_parent_outage() {
    let env =
        TestEnv::new("reports_climb_from_child_to_parent_exactly_once_across_a_parent_outage");
    std::fs::write(env.path("parent.toml"), PARENT_CONFIG).unwrap();
    pki::issue_relay_to_dir(env.pki().dir(), "R1", &[]).unwrap();
    let mut parent_relay = parent(&env, None).await;
    let parent_addr = parent_relay.addr();
    let child = child_relay(&env, &parent_relay.url(), None)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .log_also("broker::core::meter=debug")
        .start()
        .await;
    child
        .wait_for_log("uplink connected to the parent relay", deadline())
        .await;

    // C1 reads its counters every second, through the child.
    let mut c1 = env
        .device("C1")
        .config("[report]\ncounters_every_secs = 1\n")
        .start(&child)
        .await;
    parent_relay
        .wait_for_lines("C1's counters at the parent", 2, deadline(), |l| {
            l.contains("counters report stored") && l.contains("serial=C1")
        })
        .await;
    // An alarm goes up too (and does not wait for a batch to fill).
    fault(&c1, &["raise", "SC-541"]).await;
    parent_relay
        .wait_for_line("C1's alarm at the parent", deadline(), |l| {
            l.contains("alarm raised") && l.contains("serial=C1") && l.contains("SC-541")
        })
        .await;

    // The parent goes away; the child keeps taking C1's reports onto its disk.
    parent_relay.stop().await;
    let before = stored_counters(&child, "C1");
    child
        .wait_for_lines(
            "C1's counters at the child while the parent is down",
            before + 3,
            deadline(),
            |l| l.contains("counters report stored") && l.contains("serial=C1"),
        )
        .await;
    let waiting = raw::scrape(child.metrics_addr()).await;
    assert_eq!(raw::sample(&waiting, "chukei_uplink_connected"), 0);

    // Back: everything the child stored arrives, each report once.
    let parent_relay = parent(&env, Some(parent_addr)).await;
    c1.stop().await;
    let at_child = env.host("svc", &child);
    let at_parent = env.host("svc", &parent_relay);
    let export = ["export", "counters", "--serial", "C1", "--format", "csv"];
    let until = tokio::time::Instant::now() + deadline();
    let (child_rows, parent_rows) = loop {
        let child_rows = readings(&at_child.run_ok(export).await);
        let parent_rows = readings(&at_parent.run_ok(export).await);
        if !child_rows.is_empty() && child_rows.len() == parent_rows.len() {
            break (child_rows, parent_rows);
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the parent has {} of the child's {} readings; child log:\n{}",
            parent_rows.len(),
            child_rows.len(),
            child.tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(
        child_rows.len() >= before + 3,
        "reports taken during the outage are in"
    );
    // Exactly once: the parent has the child's readings, each as many times as the child (two
    // readings can be the same row when the counters did not move within a second).
    assert_eq!(
        child_rows, parent_rows,
        "a reading lost or twice at the parent"
    );
    let metrics = raw::scrape(child.metrics_addr()).await;
    assert_eq!(raw::sample(&metrics, "chukei_uplink_connected"), 1);
    let alarms = at_parent.run_ok(["alarms", "list", "--json"]).await;
    assert!(alarms.contains("SC-541"), "{alarms}");
}

/// The data rows of a counters CSV export, sorted, without the header.
fn readings(csv: &str) -> Vec<String> {
    let mut rows: Vec<String> = csv.lines().skip(1).map(str::to_owned).collect();
    rows.sort();
    rows
}

/// Whether every row of `part` is in `whole` at least as many times as in `part`.
fn multiset_contains(whole: &[String], part: &[String]) -> bool {
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for row in whole {
        *counts.entry(row).or_default() += 1;
    }
    part.iter().all(|row| match counts.get_mut(row.as_str()) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    })
}

#[tokio::test]
async fn a_child_cannot_speak_for_a_device_it_is_not_assigned() {
    let env = TestEnv::new("a_child_cannot_speak_for_a_device_it_is_not_assigned");
    std::fs::write(env.path("parent.toml"), PARENT_CONFIG).unwrap();
    pki::issue_relay_to_dir(env.pki().dir(), "R1", &[]).unwrap();
    let parent_relay = parent(&env, None).await;
    let child = child_relay(&env, &parent_relay.url(), None).start().await;
    // X9 is served by the child (the child's own ACL lets any device in), but the parent's
    // [[relays]] gives R1 only C*.
    let _x9 = env.device("X9").start(&child).await;
    parent_relay
        .wait_for_line("X9 refused at the parent", deadline(), |l| {
            l.contains("refused a message a child relay forwarded")
                && l.contains("relay=R1")
                && l.contains("serial=X9")
        })
        .await;
    child
        .wait_for_line("the child told why", deadline(), |l| {
            l.contains("the parent relay refused a forwarded message") && l.contains("X9")
        })
        .await;
    let metrics = raw::scrape(parent_relay.metrics_addr()).await;
    assert!(raw::sample(&metrics, "chukei_relay_items_refused_total") >= 1);
    assert_eq!(raw::sample(&metrics, "chukei_relay_items_total"), 0);
}

/// The `json/fleet/{serial}/state` views `client` sees until one has `presence` = `want`.
async fn presence(client: &mut harness::MqttClient, serial: &str, want: &str) -> serde_json::Value {
    view_until(client, serial, want, |_| true).await
}

/// The first `json/fleet/{serial}/state` view `client` sees with `presence` = `want` that `ok`
/// also accepts (views published before a change may still be on their way).
async fn view_until(
    client: &mut harness::MqttClient,
    serial: &str,
    want: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let topic = format!("json/fleet/{serial}/state");
    let within = deadline();
    tokio::time::timeout(within, async {
        loop {
            let p = client.next_publish_on(&topic, within).await;
            let json: serde_json::Value = serde_json::from_slice(&p.payload)
                .unwrap_or_else(|e| panic!("{topic} is not JSON: {e}"));
            if json["presence"] == want && ok(&json) {
                return json;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{serial} never showed as {want} within {within:?}"))
}

/// `relays list --json` at `host`'s relay, R1's entry.
async fn r1(host: &harness::Host) -> serde_json::Value {
    let out = host.run_ok(["relays", "list", "--json"]).await;
    let all: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    all.as_array()
        .and_then(|a| a.iter().find(|r| r["id"] == "R1"))
        .cloned()
        .unwrap_or_else(|| panic!("no R1 in {out}"))
}

#[tokio::test]
async fn the_parent_shows_presence_through_the_child_and_unreachable_when_the_child_is_gone() {
    let env = TestEnv::new(
        "the_parent_shows_presence_through_the_child_and_unreachable_when_the_child_is_gone",
    );
    std::fs::write(env.path("parent.toml"), PARENT_CONFIG).unwrap();
    pki::issue_relay_to_dir(env.pki().dir(), "R1", &[]).unwrap();
    let parent_relay = parent(&env, None).await;
    let mut crm = env
        .mqtt(protocol::Role::Integrator, "crm")
        .connect(&parent_relay)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crm.subscribe_and_wait("json/fleet/+/state").await;
    let child_at = |addr| child_relay(&env, &parent_relay.url(), addr).start();
    let mut child = child_at(None).await;
    let child_addr = child.addr();
    let host = env.host("svc", &parent_relay);
    let listed = r1(&host).await;
    assert_eq!(listed["configured"], true, "{listed:#}");
    assert_eq!(listed["serials"], serde_json::json!(["C*"]), "{listed:#}");

    // C1 on the child: online at the parent, on R1.
    let c1 = env.device("C1").start(&child).await;
    let online = presence(&mut crm, "C1", "online").await;
    assert_eq!(online["relay"], "R1", "{online:#}");
    let listed = r1(&host).await;
    assert_eq!(
        (&listed["connected"], &listed["devices_online"]),
        (&serde_json::json!(true), &serde_json::json!(1)),
        "{listed:#}"
    );

    // The child dies: the parent cannot know whether C1 is still up there; it says so.
    child.kill9().await;
    let gone = presence(&mut crm, "C1", "unreachable").await;
    assert_eq!(gone["relay"], "R1", "{gone:#}");
    let listed = r1(&host).await;
    assert_eq!(
        (&listed["connected"], &listed["devices_unreachable"]),
        (&serde_json::json!(false), &serde_json::json!(1)),
        "{listed:#}"
    );

    // Back, with C1 reconnected there: online again, through R1.
    let _child = child_at(Some(child_addr)).await;
    let back = presence(&mut crm, "C1", "online").await;
    assert_eq!(back["relay"], "R1", "{back:#}");
    drop(c1);
}

/// A parent and a child R1 whose uplink is connected.
async fn tree(env: &TestEnv) -> (Broker, Broker) {
    std::fs::write(env.path("parent.toml"), PARENT_CONFIG).unwrap();
    pki::issue_relay_to_dir(env.pki().dir(), "R1", &[]).unwrap();
    let parent_relay = parent(env, None).await;
    let child = child_relay(env, &parent_relay.url(), None).start().await;
    child
        .wait_for_log("uplink connected to the parent relay", deadline())
        .await;
    (parent_relay, child)
}

#[tokio::test]
async fn every_kind_of_job_submitted_at_the_parent_runs_on_a_device_behind_the_child() {
    let env =
        TestEnv::new("every_kind_of_job_submitted_at_the_parent_runs_on_a_device_behind_the_child");
    let (parent_relay, child) = tree(&env).await;
    let host = env.host("svc", &parent_relay);
    let keys = host.keys_generate(&env.path("keys")).await;
    let c1 = env
        .device("C1")
        .publisher_key(&keys.public)
        .start(&child)
        .await;
    // Known at the parent through R1 before anything is filed for it.
    let mut crm = env
        .mqtt(protocol::Role::Integrator, "crm")
        .connect(&parent_relay)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crm.subscribe_and_wait("json/fleet/+/state").await;
    presence(&mut crm, "C1", "online").await;

    // get-data: the order goes down through R1 (forwarded: on R1's disk), the device runs it,
    // the result comes back up; the SERVER column shows the path.
    let job = submit_counters(&host).await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert!(detail["data"]["counters"].is_object(), "{detail:#}");
    let timeline: Vec<&str> = detail["timeline"]
        .as_array()
        .map(|t| t.iter().filter_map(|e| e["status"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        timeline,
        ["queued", "forwarded", "in-progress", "succeeded"],
        "{detail:#}"
    );
    assert_eq!(detail["server"], "parent › R1", "{detail:#}");
    let listed = host.run_ok(["jobs", "list"]).await;
    assert!(listed.contains("parent › R1"), "{listed}");

    // update-data merged at the relay that holds the job: the parent.
    let job = host
        .submit(&[
            "--serial",
            "C1",
            "--kind",
            "update-data",
            "--set",
            "adjustment.density=6",
        ])
        .await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert_eq!(detail["data"]["adjustment"]["density"], 6, "{detail:#}");
    assert_eq!(
        parent_relay
            .lines_matching(|l| l.contains("merged at the relay") && l.contains(&job))
            .len(),
        1,
        "the parent merged {job}"
    );

    // set-schedule.
    let job = host
        .submit(&[
            "--serial",
            "C1",
            "--kind",
            "set-schedule",
            "--mode",
            "persistent",
        ])
        .await;
    host.wait_for_status(&job, "succeeded", deadline()).await;

    // firmware: uploaded at the parent, chunks fetched through R1, checked and written on C1.
    let file = env.path("fw-2.0.0.bin");
    std::fs::write(&file, harness::pseudo_random_bytes(200_000, 7)).unwrap();
    let artifact = host.upload(&file, "2.0.0", &keys.secret).await;
    let job = host
        .submit(&[
            "--serial",
            "C1",
            "--kind",
            "firmware",
            "--artifact",
            &artifact,
        ])
        .await;
    host.wait_for_status(&job, "succeeded", harness::secs(60))
        .await;
    c1.wait_for_log("firmware written", deadline()).await;
    assert!(
        !parent_relay
            .lines_matching(|l| l.contains("chunks served") && l.contains("serial=C1"))
            .is_empty(),
        "the parent served C1's chunks"
    );
    // The child answered no job itself: it handed everything to its parent.
    assert!(
        child
            .lines_matching(|l| l.contains("merged at the relay") || l.contains("chunks served"))
            .is_empty(),
        "the child handled a job itself:\n{}",
        child.tail()
    );
}

/// C1 seen online at the parent through R1, then gone from R1: its jobs wait at R1.
async fn known_then_away(env: &TestEnv, parent_relay: &Broker, child: &Broker) {
    let mut crm = env
        .mqtt(protocol::Role::Integrator, "crm")
        .connect(parent_relay)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crm.subscribe_and_wait("json/fleet/+/state").await;
    let mut c1 = env.device("C1").start(child).await;
    presence(&mut crm, "C1", "online").await;
    c1.stop().await;
    presence(&mut crm, "C1", "offline").await;
}

#[tokio::test]
async fn a_job_canceled_while_it_waits_at_the_child_is_withdrawn_there() {
    let env = TestEnv::new("a_job_canceled_while_it_waits_at_the_child_is_withdrawn_there");
    let (parent_relay, child) = tree(&env).await;
    let host = env.host("svc", &parent_relay);
    known_then_away(&env, &parent_relay, &child).await;

    let job = host.submit(&["--serial", "C1", "--kind", "get-data"]).await;
    host.wait_for_status(&job, "forwarded", deadline()).await;
    let out = host.cancel(&job).await;
    assert!(out.success(), "{out}");
    host.wait_for_status(&job, "canceled", deadline()).await;

    // C1 comes back to R1: the canceled job is gone from there; a new one runs.
    let c1 = env.device("C1").start(&child).await;
    let second = host.submit(&["--serial", "C1", "--kind", "get-data"]).await;
    host.wait_for_status(&second, "succeeded", deadline()).await;
    assert!(
        c1.lines_matching(|l| l.contains(&job)).is_empty(),
        "C1 saw the canceled {job}:\n{}",
        c1.log()
    );
}

#[tokio::test]
async fn a_child_restarted_while_its_parent_is_down_still_runs_the_jobs_it_has() {
    let env = TestEnv::new("a_child_restarted_while_its_parent_is_down_still_runs_the_jobs_it_has");
    let (mut parent_relay, mut child) = tree(&env).await;
    let (parent_addr, child_addr) = (parent_relay.addr(), child.addr());
    let host = env.host("svc", &parent_relay);
    known_then_away(&env, &parent_relay, &child).await;
    let job = submit_counters(&host).await;
    host.wait_for_status(&job, "forwarded", deadline()).await;

    // The parent goes down; the child restarts; C1 comes back to the child and runs the job
    // the child kept on its disk. Its result waits there.
    parent_relay.stop().await;
    child.stop().await;
    let child = child_relay(&env, &format!("mqtts://{parent_addr}"), Some(child_addr))
        .start()
        .await;
    let c1 = env.device("C1").start(&child).await;
    c1.wait_for_line("C1 ran the kept job", deadline(), |l| {
        l.contains(&job) && l.contains("succeeded")
    })
    .await;

    // The parent is back: the result climbs, the job ends there.
    let parent_relay = parent(&env, Some(parent_addr)).await;
    let host = env.host("svc", &parent_relay);
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert!(detail["data"]["counters"].is_object(), "{detail:#}");
}

#[test]
fn the_tree_demo_shows_a_job_hop_by_hop_and_every_copiers_counters() {
    let out = harness::broker_command(["demo", "--children", "2", "--devices", "6", "--once"]);
    assert!(out.success(), "{out}");
    let text = &out.stdout;
    for want in [
        "all 6 copiers online at the parent",
        "forwarded    on child relay R1",
        "parent › R1",
        "parent › R2",
        "SITE2-00002",
        "FLEET",
    ] {
        assert!(
            text.contains(want),
            "{want:?} missing from the demo's output:\n{text}"
        );
    }
    let hops: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("timeline:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(
        hops,
        [
            "queued",
            "forwarded",
            "delivered",
            "staged",
            "in-progress",
            "succeeded"
        ],
        "{text}"
    );
}

#[tokio::test]
async fn a_job_pinned_with_via_waits_at_that_child_for_a_device_the_parent_never_saw() {
    let env =
        TestEnv::new("a_job_pinned_with_via_waits_at_that_child_for_a_device_the_parent_never_saw");
    let (parent_relay, child) = tree(&env).await;
    let host = env.host("svc", &parent_relay);

    // C1 has never connected anywhere: pinned to R1, the job waits on R1's disk.
    let job = host
        .submit(&["--serial", "C1", "--kind", "get-data", "--via", "R1"])
        .await;
    host.wait_for_status(&job, "forwarded", deadline()).await;
    let _c1 = env.device("C1").start(&child).await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert_eq!(detail["server"], "parent › R1", "{detail:#}");

    // A child the parent does not know, or one that may not serve the device: refused with why.
    for (via, serial, why) in [
        ("R9", "C1", "no child relay R9"),
        ("R1", "X9", "may not serve X9"),
    ] {
        let out = host
            .run([
                "jobs", "submit", "--serial", serial, "--kind", "get-data", "--via", via,
            ])
            .await;
        assert!(
            !out.success() && out.stderr.contains(why),
            "--via {via} for {serial}: {out}"
        );
    }
}

#[tokio::test]
async fn a_periodic_child_connects_on_schedule_and_at_once_for_an_alarm() {
    let env = TestEnv::new("a_periodic_child_connects_on_schedule_and_at_once_for_an_alarm");
    std::fs::write(env.path("parent.toml"), PARENT_CONFIG).unwrap();
    pki::issue_relay_to_dir(env.pki().dir(), "R1", &[]).unwrap();
    let parent_relay = parent(&env, None).await;
    // Every ten minutes: far longer than this test.
    let child = child_relay(&env, &parent_relay.url(), None)
        .args([
            "--parent-session",
            "periodic",
            "--parent-interval-secs",
            "600",
        ])
        .start()
        .await;
    // The first session at start exchanges what there is, then ends.
    child
        .wait_for_log("periodic session with the parent relay over", deadline())
        .await;

    // Between sessions: C1's alarm makes the child connect at once.
    let c1 = env.device("C1").start(&child).await;
    fault(&c1, &["raise", "SC-541"]).await;
    parent_relay
        .wait_for_line("C1's alarm at the parent", deadline(), |l| {
            l.contains("alarm raised") && l.contains("serial=C1")
        })
        .await;
    child
        .wait_for_lines("the alarm's session over too", 2, deadline(), |l| {
            l.contains("periodic session with the parent relay over")
        })
        .await;
}

#[tokio::test]
async fn a_device_fails_over_child_to_child_to_parent_and_its_job_and_reports_finish_once() {
    let env = TestEnv::new(
        "a_device_fails_over_child_to_child_to_parent_and_its_job_and_reports_finish_once",
    );
    std::fs::write(
        env.path("parent.toml"),
        "[[relays]]\nid = \"R1\"\nserials = [\"C*\"]\n\n[[relays]]\nid = \"R2\"\nserials = [\"C*\"]\n",
    )
    .unwrap();
    for id in ["R1", "R2"] {
        pki::issue_relay_to_dir(env.pki().dir(), id, &[]).unwrap();
    }
    let parent_relay = parent(&env, None).await;
    let start_child = |id: &'static str, addr| {
        let mut b = env
            .broker()
            .data_dir(env.path(format!("child-{id}")))
            .args(["--relay-id", id, "--parent", &parent_relay.url()])
            .args(["--server-name", id, "--uplink-batch-delay-ms", "20"]);
        if let Some(addr) = addr {
            b = b.listen(addr);
        }
        b.start()
    };
    let mut r1 = start_child("R1", None).await;
    let r1_addr = r1.addr();
    let mut r2 = start_child("R2", None).await;
    let host = env.host("svc", &parent_relay);
    let mut crm = env
        .mqtt(protocol::Role::Integrator, "crm")
        .connect(&parent_relay)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crm.subscribe_and_wait("json/fleet/+/state").await;

    // C1 prefers R1, then R2, then the parent; it reports its counters every second.
    let c1 = env
        .device("C1")
        .brokers(&[r1.url(), r2.url(), parent_relay.url()])
        .arg("--one-tree")
        .arg("--failback-secs")
        .arg("0")
        .config("[report]\ncounters_every_secs = 1\n")
        .start(&parent_relay)
        .await;
    let on = presence(&mut crm, "C1", "online").await;
    assert_eq!(on["relay"], "R1", "{on:#}");

    // A job C1 takes through R1 and runs a few seconds later: R1 dies meanwhile.
    let at = (chrono::Utc::now() + chrono::Duration::seconds(4))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let job = host
        .submit(&[
            "--serial",
            "C1",
            "--kind",
            "get-data",
            "--sections",
            "counters",
            "--at",
            &at,
        ])
        .await;
    c1.wait_for_line("C1 has the job", deadline(), |l| l.contains(&job))
        .await;
    r1.kill9().await;
    view_until(&mut crm, "C1", "online", |v| v["relay"] == "R2").await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    let statuses: Vec<&str> = detail["timeline"]
        .as_array()
        .map(|t| t.iter().filter_map(|e| e["status"].as_str()).collect())
        .unwrap_or_default();
    let unique: std::collections::BTreeSet<&str> = statuses.iter().copied().collect();
    assert_eq!(unique.len(), statuses.len(), "a status twice: {detail:#}");

    // R2 dies too: C1 goes to the parent itself.
    r2.kill9().await;
    view_until(&mut crm, "C1", "online", |v| v.get("relay").is_none()).await;
    let last = host.submit(&["--serial", "C1", "--kind", "get-data"]).await;
    host.wait_for_status(&last, "succeeded", deadline()).await;

    // R1 comes back and hands over what it had stored but not forwarded when it died. Every
    // reading the children and the parent took is at the parent once. Two readings a second
    // apart can be the same row (the counters did not move, read_at is in whole seconds), so
    // rows are compared as multisets and counted against the readings C1 queued.
    let r1 = start_child("R1", Some(r1_addr)).await;
    r1.wait_for_log("uplink connected to the parent relay", deadline())
        .await;
    let r1_host = env.host("svc", &r1);
    let export = ["export", "counters", "--serial", "C1", "--format", "csv"];
    let until = tokio::time::Instant::now() + deadline();
    loop {
        let at_r1 = readings(&r1_host.run_ok(export).await);
        let at_parent = readings(&host.run_ok(export).await);
        // Read after the export: every reading the parent has was queued before this count.
        let queued = c1
            .lines_matching(|l| l.contains("meter reading queued"))
            .len();
        let reports_at_parent = at_parent.iter().filter(|r| r.contains(",report,")).count();
        assert!(
            reports_at_parent <= queued,
            "a reading twice at the parent: {reports_at_parent} rows for {queued} readings\n{}",
            at_parent.join("\n")
        );
        if multiset_contains(&at_parent, &at_r1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "R1's readings never all reached the parent"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_job_for_the_child_itself_reads_its_own_status() {
    let env = TestEnv::new("a_job_for_the_child_itself_reads_its_own_status");
    let (parent_relay, child) = tree(&env).await;
    let host = env.host("svc", &parent_relay);
    let _c1 = env.device("C1").start(&child).await;

    let job = host.submit(&["--relay", "R1", "--kind", "get-data"]).await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    let data = &detail["data"];
    assert_eq!(
        data["identification"]["model"], "chukei child relay",
        "{detail:#}"
    );
    assert_eq!(data["identification"]["relay"], "R1", "{detail:#}");
    assert!(data["identification"]["firmware"].is_string(), "{detail:#}");
    assert!(data["comms"]["devices_online"].is_number(), "{detail:#}");
    assert_eq!(detail["serial"], "R1", "{detail:#}");

    // What a child cannot do for itself yet fails with the reason, rather than waiting forever.
    let job = host
        .submit(&[
            "--relay",
            "R1",
            "--kind",
            "set-schedule",
            "--mode",
            "persistent",
        ])
        .await;
    let failed = host.wait_for_status(&job, "failed", deadline()).await;
    assert!(
        failed["reason"].as_str().unwrap_or("").contains("get-data"),
        "{failed:#}"
    );
}
