//! The relay on the cluster store, with a real PostgreSQL server started by the test: `broker db
//! migrate` creates the schema, `broker run --cluster-db` refuses a database it cannot use as it
//! is and keeps every job in PostgreSQL — a relay started again with an empty data directory
//! finds them all.

mod emergency;

use emergency::{fault, mosquitto_sub, payloads, watch_alarms};
use harness::nats::Nats;
use harness::postgres::Postgres;
use harness::{TestEnv, broker_cmd, deadline};

/// `broker run` as cluster node `id` on the database at `url` and the bus server `bus`, its
/// data directory named after it.
fn cluster_node<'a>(
    env: &'a TestEnv,
    id: &str,
    url: &str,
    bus: &str,
) -> harness::BrokerBuilder<'a> {
    env.broker()
        .data_dir(env.path(id))
        .args(["--node-id", id, "--cluster-db", url])
        .args(["--cluster-bus", bus])
}

/// A database with chukei's schema, one NATS server, and nodes N1 and N2 on both, each
/// connected to the bus. Fields in the order they are dropped: nodes before the servers.
struct TwoNodes {
    n1: harness::Broker,
    n2: harness::Broker,
    bus: Nats,
    pg: Postgres,
}

async fn two_nodes(env: &TestEnv) -> TwoNodes {
    two_nodes_on(env, Nats::start(env, "bus", None).await).await
}

/// [`two_nodes`] on the bus server `bus`.
async fn two_nodes_on(env: &TestEnv, bus: Nats) -> TwoNodes {
    let (pg, url) = Postgres::with_schema(env).await;
    let node = |id: &str| cluster_node(env, id, &url, &bus.url());
    let n1 = node("N1").start().await;
    let n2 = node("N2").start().await;
    for n in [&n1, &n2] {
        n.wait_for_log("cluster bus connected", deadline()).await;
    }
    TwoNodes { n1, n2, bus, pg }
}

/// Nodes N1 and N2 on two NATS servers kept apart ([`Nats::start_apart`]), each connected to
/// its own, with the order sweep every `sweep_secs` seconds ("0": off). Fields in the order
/// they are dropped.
struct NodesApart {
    n1: harness::Broker,
    n2: harness::Broker,
    bus1: Nats,
    _bus2: Nats,
    _pg: Postgres,
}

async fn nodes_apart(env: &TestEnv, sweep_secs: &str) -> NodesApart {
    let (pg, url) = Postgres::with_schema(env).await;
    let (bus1, bus2) = Nats::start_apart(env).await;
    let node = |id: &str, bus: &Nats| {
        cluster_node(env, id, &url, &bus.url()).args(["--cluster-order-sweep-secs", sweep_secs])
    };
    let n1 = node("N1", &bus1).start().await;
    let n2 = node("N2", &bus2).start().await;
    for n in [&n1, &n2] {
        n.wait_for_log("cluster bus connected", deadline()).await;
    }
    NodesApart {
        n1,
        n2,
        bus1,
        _bus2: bus2,
        _pg: pg,
    }
}

/// `broker run` as node N1 on `url`, expected to stop at once: its stderr.
async fn refused_run(env: &TestEnv, url: &str, data: &str) -> String {
    let pki = env.pki().dir().display().to_string();
    let data = env.path(data).display().to_string();
    let (ok, _, err) = broker_cmd(&[
        "run",
        "--node-id",
        "N1",
        "--cluster-db",
        url,
        "--pki-dir",
        &pki,
        "--data-dir",
        &data,
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    assert!(!ok, "the relay must refuse to run:\n{err}");
    err
}

#[tokio::test]
async fn a_relay_keeps_its_jobs_in_postgresql_after_broker_db_migrate() {
    let env = TestEnv::new("a_relay_keeps_its_jobs_in_postgresql_after_broker_db_migrate");
    let pg = Postgres::start(&env, "db");
    pg.create_db("chukei");
    let url = pg.url("chukei");

    // Without a schema the relay refuses, and says what to run.
    let err = refused_run(&env, &url, "n1-a").await;
    assert!(err.contains("broker db migrate"), "{err}");

    let (ok, out, err) = broker_cmd(&["db", "migrate", "--cluster-db", &url]).await;
    assert!(ok, "{err}");
    let version = broker::store::pg_store::SCHEMA_VERSION;
    assert!(
        out.contains(&format!("created the schema (version {version})")),
        "{out}"
    );
    let (ok, out, _) = broker_cmd(&["db", "migrate", "--cluster-db", &url]).await;
    assert!(ok && out.contains("nothing to do"), "{out}");

    let node = |data: &str| {
        env.broker()
            .data_dir(env.path(data))
            .args(["--node-id", "N1", "--cluster-db", &url])
    };
    let mut relay = node("n1-a").start().await;
    relay
        .wait_for_log("cluster store: PostgreSQL", deadline())
        .await;
    let host = env.host("svc", &relay);
    let device = env.device("C1").start(&relay).await;
    let job = host
        .submit(&[
            "--serial",
            "C1",
            "--kind",
            "get-data",
            "--sections",
            "counters",
        ])
        .await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    let number: u64 = job[2..].parse().expect("a job id is J-NUMBER");
    assert_eq!(
        pg.sql(
            "chukei",
            &format!("SELECT status FROM jobs WHERE number = {number}")
        ),
        "succeeded",
        "the job is a row in PostgreSQL"
    );

    // The node is listed, with its device, from its heartbeat.
    let listed = harness::poll_until("N1 listed with its device", deadline(), || async {
        let (ok, out, err) = broker_cmd(&["nodes", "list", "--cluster-db", &url, "--json"]).await;
        assert!(ok, "{err}");
        let nodes: serde_json::Value = serde_json::from_str(&out).expect("nodes list --json");
        let n1 = nodes
            .as_array()
            .and_then(|all| all.iter().find(|n| n["node_id"] == "N1"))
            .cloned();
        match n1 {
            Some(n1) if n1["alive"] == true && n1["devices"] == 1 => Ok(n1),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(listed["listen"], relay.addr().to_string(), "{listed:#}");
    let (_, table, _) = broker_cmd(&["nodes", "list", "--cluster-db", &url]).await;
    assert!(
        table.starts_with("NODE")
            && table
                .lines()
                .any(|l| l.starts_with("N1") && l.contains(" up ")),
        "{table}"
    );

    // The relay dies; another starts with an empty data directory and has everything.
    relay.kill9().await;
    drop(device);
    let relay = node("n1-b").start().await;
    let host = env.host("svc", &relay);
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert!(detail["data"]["counters"].is_object(), "{detail:#}");

    // A schema newer than this release knows is refused, untouched.
    drop(relay);
    pg.sql("chukei", "UPDATE chukei_schema SET version = 99");
    let (ok, _, err) = broker_cmd(&["db", "migrate", "--cluster-db", &url]).await;
    assert!(!ok && err.contains("newer than this release"), "{err}");
    let err = refused_run(&env, &url, "n1-c").await;
    assert!(err.contains("newer than this release"), "{err}");
    assert_eq!(pg.sql("chukei", "SELECT version FROM chukei_schema"), "99");
}

/// Waits for the JSON view of `job` with `status` on `client`'s node.
async fn job_view(client: &mut harness::MqttClient, serial: &str, job: &str, status: &str) {
    let topic = format!("json/fleet/{serial}/jobs/{job}");
    let within = deadline();
    tokio::time::timeout(within, async {
        loop {
            let p = client.next_publish_on(&topic, within).await;
            let json: serde_json::Value = serde_json::from_slice(&p.payload)
                .unwrap_or_else(|e| panic!("{topic} is not JSON: {e}"));
            if json["status"] == status {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{topic} never showed {status} within {within:?}"));
}

#[tokio::test]
async fn a_job_filed_at_one_node_reaches_a_device_on_another_even_after_the_bus_was_down() {
    let env = TestEnv::new(
        "a_job_filed_at_one_node_reaches_a_device_on_another_even_after_the_bus_was_down",
    );
    let TwoNodes {
        n1,
        n2,
        mut bus,
        pg: _pg,
    } = two_nodes(&env).await;
    // C1 is on N2; the service desk and an integrator are on N1.
    let _c1 = env.device("C1").start(&n2).await;
    let mut crm = env
        .mqtt(protocol::Role::Integrator, "crm")
        .connect(&n1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crm.subscribe_and_wait("json/fleet/+/jobs/+").await;
    let host = env.host("svc", &n1);
    let submit = || {
        host.submit(&[
            "--serial",
            "C1",
            "--kind",
            "get-data",
            "--sections",
            "counters",
        ])
    };

    let job = submit().await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    // The result was stored by N2, which holds C1; N1's integrator saw N2's view of it.
    job_view(&mut crm, "C1", &job, "succeeded").await;
    n2.wait_for_line("N2 stored C1's result", deadline(), |l| {
        l.contains("job update stored") && l.contains(&job) && l.contains("succeeded")
    })
    .await;

    // The bus dies. A job filed at N1 meanwhile is in the database only; once the bus is back,
    // N2 catches up from the database and C1 gets it.
    let port = bus.port();
    bus.kill9().await;
    n2.wait_for_log("cluster bus lost", deadline()).await;
    let job = submit().await;
    let _bus = Nats::start(&env, "bus-again", Some(port)).await;
    n2.wait_for_log("republishing the retained orders and views", deadline())
        .await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
}

#[tokio::test]
async fn one_node_does_the_periodic_work_and_another_takes_it_over_when_it_dies() {
    let env =
        TestEnv::new("one_node_does_the_periodic_work_and_another_takes_it_over_when_it_dies");
    let (_pg, url) = Postgres::with_schema(&env).await;
    let bus = Nats::start(&env, "bus", None).await;
    let node = |id: &str| cluster_node(&env, id, &url, &bus.url());
    let leads = "now does the cluster's periodic work";
    let mut first = node("N1").start().await;
    first.wait_for_log(leads, deadline()).await;
    let second = node("N2").start().await;
    second
        .wait_for_log("cluster bus connected", deadline())
        .await;
    let host = env.host("svc", &second);

    // A job for a device that never comes times out once, by the leader alone.
    let soon = || {
        (chrono::Utc::now() + chrono::Duration::seconds(2))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let job = host
        .submit(&[
            "--serial",
            "C9",
            "--kind",
            "get-data",
            "--deadline",
            &soon(),
        ])
        .await;
    host.wait_for_status(&job, "timed-out", deadline()).await;
    let expired = |n: &harness::Broker, job: &str| {
        n.lines_matching(|l| l.contains("job timed out") && l.contains(job))
            .len()
    };
    assert_eq!((expired(&first, &job), expired(&second, &job)), (1, 0));
    assert!(second.lines_matching(|l| l.contains(leads)).is_empty());

    // The leader dies: the other node takes the periodic work over.
    first.kill9().await;
    second.wait_for_log(leads, deadline()).await;
    let job = host
        .submit(&[
            "--serial",
            "C9",
            "--kind",
            "get-data",
            "--deadline",
            &soon(),
        ])
        .await;
    host.wait_for_status(&job, "timed-out", deadline()).await;
    assert_eq!(expired(&second, &job), 1);
}

#[tokio::test]
async fn a_child_relay_moves_to_the_parents_next_node_when_its_node_dies() {
    let env = TestEnv::new("a_child_relay_moves_to_the_parents_next_node_when_its_node_dies");
    let (_pg, url) = Postgres::with_schema(&env).await;
    let bus = Nats::start(&env, "bus", None).await;
    std::fs::write(
        env.path("parent.toml"),
        "[[relays]]\nid = \"R1\"\nserials = [\"C*\"]\n",
    )
    .unwrap();
    pki::issue_relay_to_dir(env.pki().dir(), "R1", &[]).unwrap();
    let node = |id: &str| {
        cluster_node(&env, id, &url, &bus.url())
            .arg("--config")
            .arg(env.path("parent.toml"))
    };
    let mut n1 = node("N1").start().await;
    let n2 = node("N2").start().await;
    for n in [&n1, &n2] {
        n.wait_for_log("cluster bus connected", deadline()).await;
    }
    // R1 knows both nodes of its parent; it is on N1. The service desk is on N2.
    let child = env
        .broker()
        .data_dir(env.path("child"))
        .args([
            "--relay-id",
            "R1",
            "--parent",
            &n1.url(),
            "--parent",
            &n2.url(),
        ])
        .args(["--server-name", "R1", "--uplink-batch-delay-ms", "20"])
        .start()
        .await;
    child
        .wait_for_line("R1 on N1", deadline(), |l| {
            l.contains("uplink connected to the parent relay") && l.contains(&n1.url())
        })
        .await;
    let _c1 = env.device("C1").start(&child).await;
    let host = env.host("svc", &n2);
    let submit = || {
        host.submit(&[
            "--serial",
            "C1",
            "--kind",
            "get-data",
            "--sections",
            "counters",
        ])
    };
    // Filed at N2, reaches C1 through N1 (over the bus) and R1.
    let job = submit().await;
    host.wait_for_status(&job, "succeeded", deadline()).await;

    // N1 dies: R1 moves to N2 (claim 26) and C1's jobs go on through it.
    n1.kill9().await;
    child
        .wait_for_line("R1 on N2", deadline(), |l| {
            l.contains("uplink connected to the parent relay") && l.contains(&n2.url())
        })
        .await;
    let job = submit().await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
}

/// The message ids of the meter readings a device's log says it queued, and of those the ones a
/// relay acked (`stored`, or `duplicate` of one stored before).
fn readings_queued_and_acked(
    device: &harness::Proc,
) -> (
    std::collections::BTreeSet<u64>,
    std::collections::BTreeSet<u64>,
) {
    let id_of = |l: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("msg_id="))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let queued: std::collections::BTreeSet<u64> = device
        .lines_matching(|l| l.contains("meter reading queued"))
        .iter()
        .filter_map(|l| id_of(l))
        .collect();
    let acked = device
        .lines_matching(|l| {
            l.contains("ack received")
                && (l.contains("outcome=stored") || l.contains("outcome=duplicate"))
        })
        .iter()
        .filter_map(|l| id_of(l))
        .filter(|id| queued.contains(id))
        .collect();
    (queued, acked)
}

/// The chunk indices of a node's "chunks served" lines for `job`, one list per request.
fn chunks_served(node: &harness::Proc, job: &str) -> Vec<Vec<u32>> {
    node.lines_matching(|l| l.contains("chunks served") && l.contains(job))
        .iter()
        .map(|l| {
            l.split_once("chunks=[")
                .and_then(|(_, rest)| rest.split_once(']'))
                .map(|(list, _)| {
                    list.split(',')
                        .filter_map(|s| s.trim().parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn a_firmware_download_goes_on_at_another_node_when_its_node_dies() {
    use protocol::artifact::{CHUNK_SIZE, MAX_CHUNKS_PER_FETCH};
    let env = TestEnv::new("a_firmware_download_goes_on_at_another_node_when_its_node_dies");
    let TwoNodes {
        mut n1,
        n2,
        bus: _bus,
        pg: _pg,
    } = two_nodes(&env).await;
    // The image is uploaded at N2: its chunks are in the database, for every node to serve.
    let host = env.host("svc", &n2);
    let keys = host.keys_generate(&env.path("keys")).await;
    let len = 8 * MAX_CHUNKS_PER_FETCH * CHUNK_SIZE as usize - 1000;
    let total = len.div_ceil(CHUNK_SIZE as usize);
    let file = env.path("fw-3.0.bin");
    std::fs::write(&file, harness::pseudo_random_bytes(len, 30)).expect("the image is written");
    let artifact = host.upload(&file, "3.0", &keys.secret).await;
    let c1 = env
        .device("C1")
        .brokers(&[n1.url(), n2.url()])
        .arg("--one-tree")
        .publisher_key(&keys.public)
        .start(&n1)
        .await;
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
    n1.wait_for_lines("two windows served by N1", 2, deadline(), |l| {
        l.contains("chunks served") && l.contains(&job)
    })
    .await;
    n1.kill9().await;
    let before = chunks_served(&n1, &job);
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    let after: Vec<u32> = chunks_served(&n2, &job).into_iter().flatten().collect();
    // Every window N1 served but its last had arrived before C1 asked for the next one.
    let held: std::collections::BTreeSet<u32> = before[..before.len() - 1]
        .iter()
        .flatten()
        .copied()
        .collect();
    let again: std::collections::BTreeSet<u32> = after.iter().copied().collect();
    eprintln!(
        "{total} chunks; N1 served {} ({} surely held), N2 {}",
        before.iter().map(Vec::len).sum::<usize>(),
        held.len(),
        after.len()
    );
    assert!(
        !held.is_empty() && held.len() < total,
        "N1 died mid-download: {} of {total} chunks held",
        held.len()
    );
    assert!(!after.is_empty(), "N2 served the rest: {detail:#}");
    assert_eq!(
        again.len(),
        after.len(),
        "a chunk was served twice by N2: {after:?}"
    );
    assert!(
        held.is_disjoint(&again),
        "chunks C1 held were fetched again at N2"
    );
    let all: std::collections::BTreeSet<u32> =
        before.iter().flatten().copied().chain(after).collect();
    assert_eq!(
        all.len(),
        total,
        "every chunk came from one node or the other"
    );
    c1.wait_for_log("firmware healthy", deadline()).await;
}

#[tokio::test]
async fn a_device_moves_to_another_node_mid_job_and_its_job_and_reports_finish_once() {
    let env =
        TestEnv::new("a_device_moves_to_another_node_mid_job_and_its_job_and_reports_finish_once");
    let TwoNodes {
        mut n1,
        n2,
        bus: _bus,
        pg,
    } = two_nodes(&env).await;
    // C1 knows both nodes and that they are one system; it prefers N1.
    let c1 = env
        .device("C1")
        .brokers(&[n1.url(), n2.url()])
        .arg("--one-tree")
        .config("[report]\ncounters_every_secs = 1\n")
        .start(&n1)
        .await;
    let host = env.host("svc", &n2);
    let at = (chrono::Utc::now() + chrono::Duration::seconds(3))
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
    // N1 dies while C1 holds the job: C1 goes on through N2, and the job ends there.
    n1.kill9().await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    let statuses: Vec<&str> = detail["timeline"]
        .as_array()
        .map(|t| t.iter().filter_map(|e| e["status"].as_str()).collect())
        .unwrap_or_default();
    let unique: std::collections::BTreeSet<&str> = statuses.iter().copied().collect();
    assert_eq!(unique.len(), statuses.len(), "a status twice: {detail:#}");
    // Every reading C1 queued and had acked (stored, or a duplicate of one stored before N1
    // died) is in the database once; one more is the job's own.
    let mut c1 = c1;
    c1.stop().await;
    let (queued, acked) = readings_queued_and_acked(&c1);
    let stored: usize = pg
        .sql(
            "chukei",
            "SELECT count(*) FROM readings WHERE serial = 'C1'",
        )
        .parse()
        .unwrap_or(0);
    let unacked = queued.len() - acked.len();
    assert!(
        stored > acked.len() && stored <= acked.len() + unacked + 1,
        "{stored} readings stored; {} acked, {unacked} never acked",
        acked.len()
    );
}

#[tokio::test]
async fn with_the_database_down_a_node_acks_nothing_new_says_why_and_resumes_by_itself() {
    let env = TestEnv::new(
        "with_the_database_down_a_node_acks_nothing_new_says_why_and_resumes_by_itself",
    );
    let (pg, url) = Postgres::with_schema(&env).await;
    let relay = env
        .broker()
        .data_dir(env.path("n1"))
        .args(["--node-id", "N1", "--cluster-db", &url])
        .start()
        .await;
    let host = env.host("svc", &relay);
    let c1 = env
        .device("C1")
        .config("[report]\ncounters_every_secs = 1\n")
        .start(&relay)
        .await;
    let args = [
        "--serial",
        "C1",
        "--kind",
        "get-data",
        "--sections",
        "counters",
    ];
    let job = host.submit(&args).await;
    host.wait_for_status(&job, "succeeded", deadline()).await;

    pg.stop();
    // A submission is refused with the reason; the device's readings wait in its outbox.
    let out = host
        .run(["jobs", "submit", "--serial", "C1", "--kind", "get-data"])
        .await;
    assert!(
        !out.success() && out.stderr.contains("cluster store unavailable"),
        "{out}"
    );
    let acked_before = c1.lines_matching(|l| l.contains("ack received")).len();
    c1.wait_for_lines("C1 queues readings meanwhile", 2, deadline(), |l| {
        l.contains("meter reading queued")
    })
    .await;

    // Back: the node resumes by itself, takes new work and the waiting readings.
    pg.start_again();
    relay
        .wait_for_log("relay storage writable again", deadline())
        .await;
    let job = host.submit(&args).await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    let later = c1.lines_matching(|l| l.contains("ack received")).len();
    assert!(
        later > acked_before,
        "C1's waiting messages are acked once the database is back"
    );
}

/// A device's alarm at N2 is committed on N2's alarm lane (the database's second writer, beside
/// the batches of reports) and reaches the service desk's `watch --alarms` and an integrator's
/// `mosquitto_sub` at N1; it is stored once and the device's outbox is acked.
#[tokio::test]
async fn an_alarm_raised_at_one_node_reaches_the_service_desk_and_integrators_at_another() {
    let env = TestEnv::new(
        "an_alarm_raised_at_one_node_reaches_the_service_desk_and_integrators_at_another",
    );
    let (_pg, url) = Postgres::with_schema(&env).await;
    let bus = Nats::start(&env, "bus", None).await;
    let n1 = cluster_node(&env, "N1", &url, &bus.url()).start().await;
    let n2 = cluster_node(&env, "N2", &url, &bus.url())
        .log_also("broker::core::run=debug")
        .start()
        .await;
    for n in [&n1, &n2] {
        n.wait_for_log("cluster bus connected", deadline()).await;
    }
    let c1 = env.device("C1").site("Kobe 2F").start(&n2).await;
    let watch = watch_alarms(&env, &n1, "watch-alarms", false).await;
    let sub = mosquitto_sub(&env, &n1, "mosquitto-alarms", "json/fleet/+/alarm").await;

    fault(&c1, &["raise", "SC-541"]).await;
    watch
        .wait_for_line("the raised SC-541 alarm at N1", deadline(), |l| {
            l.contains("raised") && l.contains("SC-541") && l.contains("C1 (Kobe 2F)")
        })
        .await;
    sub.wait_for_log("json/fleet/C1/alarm {", deadline()).await;
    let mirrored = payloads(&sub, "json/fleet/C1/alarm");
    assert_eq!(mirrored[0]["alarms"][0]["code"], "SC-541", "{mirrored:#?}");
    n2.wait_for_line("N2's alarm lane committed it", deadline(), |l| {
        l.contains("alarm batch handled") && l.contains("messages=1")
    })
    .await;
    let sent = c1
        .wait_for_line("C1 sent its alarm", deadline(), |l| {
            l.contains("fatal fault; alarm sent")
        })
        .await;
    let id = sent
        .split_whitespace()
        .find_map(|w| w.strip_prefix("msg_id="))
        .unwrap_or_else(|| panic!("no msg_id in {sent:?}"))
        .to_owned();
    c1.wait_for_line("C1's alarm acked as stored", deadline(), |l| {
        l.contains("ack received")
            && l.contains(&format!("msg_id={id} "))
            && l.contains("outcome=stored")
    })
    .await;
    let listed = env
        .host("svc", &n1)
        .run_ok(["alarms", "list", "--all", "--json"])
        .await;
    assert_eq!(
        listed.matches("\"SC-541\"").count(),
        1,
        "stored once:\n{listed}"
    );
}

#[tokio::test]
async fn the_bus_carries_on_through_the_nats_servers_left() {
    let env = TestEnv::new("the_bus_carries_on_through_the_nats_servers_left");
    let (_pg, url) = Postgres::with_schema(&env).await;
    let mut servers = Nats::start_cluster(&env, 3).await;
    let node = |id: &str| {
        let mut b =
            env.broker()
                .data_dir(env.path(id))
                .args(["--node-id", id, "--cluster-db", &url]);
        for s in &servers {
            b = b.args(["--cluster-bus", &s.url()]);
        }
        b
    };
    let n1 = node("N1").start().await;
    let n2 = node("N2").start().await;
    for n in [&n1, &n2] {
        n.wait_for_log("cluster bus connected", deadline()).await;
    }
    let _c1 = env.device("C1").start(&n2).await;
    let host = env.host("svc", &n1);
    let submit = || host.submit(&["--serial", "C1", "--kind", "get-data"]);
    let job = submit().await;
    host.wait_for_status(&job, "succeeded", deadline()).await;

    // Two of the three servers die: both nodes are on the third now, and jobs filed at N1 still
    // reach C1 on N2.
    for s in servers.iter_mut().take(2) {
        s.kill9().await;
    }
    for _ in 0..3 {
        let job = submit().await;
        host.wait_for_status(&job, "succeeded", deadline()).await;
    }
}

/// A publication can be lost for the other nodes while they never leave the bus: the node that
/// made it was off the bus, or its server died with the message on its way. When that node is
/// back on the bus it says so, and the others catch up from the database. Here N1's server is
/// apart from N2's (no route yet), so the order of a job filed at N1 is lost for C1 at N2 for
/// certain; once N1's server joins the cluster and N1 is back, C1 gets its order.
#[tokio::test]
async fn a_node_back_on_the_bus_has_the_others_catch_up_on_what_it_published() {
    let env = TestEnv::new("a_node_back_on_the_bus_has_the_others_catch_up_on_what_it_published");
    // The order sweep off: it would deliver the order too, a few seconds later.
    let mut nodes = nodes_apart(&env, "0").await;
    let (n1, n2) = (&nodes.n1, &nodes.n2);
    let _c1 = env.device("C1").start(n2).await;
    let host = env.host("svc", n1);
    let job = host.submit(&["--serial", "C1", "--kind", "get-data"]).await;

    nodes.bus1.join_cluster(&env).await;
    n1.wait_for_log("cluster bus reconnected", deadline()).await;
    n2.wait_for_line("N2 catching up for N1", deadline(), |l| {
        l.contains("a node is back on the cluster bus") && l.contains("rejoined=N1")
    })
    .await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
}

/// The bus delivers at most once, and a node hears of a loss only when one of them is back on
/// the bus; a publication lost on a route still forming, in a full queue or at a subscriber the
/// server finds too slow is not announced at all. Each node's order sweep compares the orders
/// it holds with the database's open jobs. Here the two nodes' servers never route to each
/// other: the order of a job filed at N1 never reaches N2 over the bus, yet C1 at N2 runs the
/// job, and N1 clears the order it still holds once the job has ended (the clear, published at
/// N2, never reached N1 either).
#[tokio::test]
async fn an_order_the_bus_never_carried_reaches_its_device_from_the_database() {
    let env = TestEnv::new("an_order_the_bus_never_carried_reaches_its_device_from_the_database");
    let nodes = nodes_apart(&env, "1").await;
    let (n1, n2) = (&nodes.n1, &nodes.n2);
    let _c1 = env.device("C1").start(n2).await;
    let host = env.host("svc", n1);
    let job = host.submit(&["--serial", "C1", "--kind", "get-data"]).await;
    let order = format!("topic=dev/C1/jobs/{job}");

    n2.wait_for_line("N2 delivers the order from the database", deadline(), |l| {
        l.contains("order sweep: delivered from the database") && l.contains(&order)
    })
    .await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    n1.wait_for_line("N1 clears the order of the ended job", deadline(), |l| {
        l.contains("order sweep: cleared") && l.contains(&order)
    })
    .await;
}

#[tokio::test]
async fn the_bus_delivers_each_node_the_other_nodes_publications_and_not_its_own() {
    let env =
        TestEnv::new("the_bus_delivers_each_node_the_other_nodes_publications_and_not_its_own");
    let TwoNodes {
        n1,
        n2,
        bus,
        pg: _pg,
    } = two_nodes_on(&env, Nats::start_monitored(&env, "bus").await).await;
    // A job filed at N1 for C1 on N2: N1 publishes the order and its views, N2 the result's.
    let _c1 = env.device("C1").start(&n2).await;
    let host = env.host("svc", &n1);
    let job = host.submit(&["--serial", "C1", "--kind", "get-data"]).await;
    host.wait_for_status(&job, "succeeded", deadline()).await;

    // What each node published reaches the other, and nothing comes back to the node that
    // published it: each node is sent exactly what the other published.
    let by_name = |all: &[harness::nats::Connection], name: &str| {
        all.iter()
            .find(|c| c.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no bus connection named {name:?} in {all:?}"))
    };
    harness::poll_until(
        "each node sent exactly the other's publications",
        deadline(),
        || async {
            let all = bus.connections().await;
            let (a, b) = (
                by_name(&all, "chukei node N1"),
                by_name(&all, "chukei node N2"),
            );
            let settled = a.in_msgs > 0
                && b.in_msgs > 0
                && a.out_msgs == b.in_msgs
                && b.out_msgs == a.in_msgs;
            if settled {
                Ok(())
            } else {
                Err(format!("{a:?}, {b:?}"))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_cluster_demo_files_jobs_at_one_node_for_copiers_on_every_node() {
    let out = harness::broker_command(["demo", "--cluster", "3", "--devices", "6", "--once"]);
    assert!(out.success(), "{out}");
    let text = &out.stdout;
    for want in [
        "PostgreSQL on 127.0.0.1 (TLS, the nodes log in by certificate)",
        "NATS servers (one cluster, TLS, the nodes' certificate checked)",
        "all 6 copiers connected, spread over 3 nodes",
        "N3C-00001",
        "FLEET",
        "broker nodes list:",
    ] {
        assert!(
            text.contains(want),
            "{want:?} missing from the demo's output:\n{text}"
        );
    }
    // Every node is up with its two copiers.
    let nodes: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("NODE"))
        .skip(1)
        .filter(|l| l.contains(" up ") && l.split_whitespace().nth(3) == Some("2"))
        .collect();
    assert_eq!(nodes.len(), 3, "{text}");
}

/// The JSON state views a client receives (`json/fleet/+/state`), in whatever order they come:
/// the latest of each device, and every one seen.
#[derive(Default)]
struct Views {
    latest: std::collections::BTreeMap<String, serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Views {
    /// Takes views from `client` until `done` holds for the latest ones.
    async fn until(
        &mut self,
        client: &mut harness::MqttClient,
        what: &str,
        done: impl Fn(&std::collections::BTreeMap<String, serde_json::Value>) -> bool,
    ) {
        let within = deadline();
        let ok = tokio::time::timeout(within, async {
            while !done(&self.latest) {
                let p = client.next_publish(within).await;
                let v: serde_json::Value = serde_json::from_slice(&p.payload)
                    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.topic));
                if let Some(serial) = v["serial"].as_str() {
                    self.latest.insert(serial.to_owned(), v.clone());
                    self.seen.push(v);
                }
            }
        })
        .await;
        assert!(
            ok.is_ok(),
            "{what}: not within {within:?}: {:#?}",
            self.latest
        );
    }
}

fn is(v: Option<&serde_json::Value>, presence: &str, node: Option<&str>) -> bool {
    v.is_some_and(|v| v["presence"] == presence && node.is_none_or(|n| v["node"] == n))
}

#[tokio::test]
async fn when_a_node_dies_its_devices_go_offline_unless_they_reconnect_elsewhere() {
    let env =
        TestEnv::new("when_a_node_dies_its_devices_go_offline_unless_they_reconnect_elsewhere");
    let TwoNodes {
        mut n1,
        mut n2,
        bus: _bus,
        pg,
    } = two_nodes(&env).await;
    let mut crm = env
        .mqtt(protocol::Role::Integrator, "crm")
        .connect(&n2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crm.subscribe_and_wait("json/fleet/+/state").await;
    // C1 can move to N2; C2 knows only N1.
    let _c1 = env
        .device("C1")
        .brokers(&[n1.url(), n2.url()])
        .arg("--one-tree")
        .arg("--failback-secs")
        .arg("0")
        .start(&n1)
        .await;
    let _c2 = env.device("C2").start(&n1).await;
    let mut views = Views::default();
    views
        .until(&mut crm, "C1 and C2 online at N1", |l| {
            is(l.get("C1"), "online", Some("N1")) && is(l.get("C2"), "online", Some("N1"))
        })
        .await;

    n1.kill9().await;
    let mark = views.seen.len();
    // C1 is online at N2 at once; C2 goes offline once N1's grace period is over.
    views
        .until(&mut crm, "C1 online at N2, C2 offline", |l| {
            is(l.get("C1"), "online", Some("N2")) && is(l.get("C2"), "offline", None)
        })
        .await;
    let since: Vec<&serde_json::Value> = views.seen[mark..].iter().collect();
    assert!(
        since
            .iter()
            .filter(|v| v["serial"] == "C1")
            .all(|v| v["presence"] == "online"),
        "C1 flapped: {since:#?}"
    );
    n2.wait_for_line("N2 declares N1 gone", deadline(), |l| {
        l.contains("cluster node gone") && l.contains("node=N1") && l.contains("devices=1")
    })
    .await;
    // After N1 was declared gone, a late subscriber at N2 gets C1 online at N2 (it did not
    // flap to offline with N1's devices) and C2 offline.
    let mut late = env
        .mqtt(protocol::Role::Integrator, "crm2")
        .connect(&n2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    late.subscribe_and_wait("json/fleet/+/state").await;
    // The retained views, in whatever order they come.
    let mut retained = Views::default();
    retained
        .until(&mut late, "the retained views of C1 and C2", |l| {
            l.contains_key("C1") && is(l.get("C2"), "offline", None)
        })
        .await;
    assert!(
        is(retained.latest.get("C1"), "online", Some("N2")),
        "{:#?}",
        retained.latest
    );

    // N1 is gone for good: `broker nodes forget` takes it off the list; N2, up, is refused.
    let url = pg.url("chukei");
    let forget = |node: &'static str| {
        let url = url.clone();
        async move { broker_cmd(&["nodes", "forget", "--cluster-db", &url, node]).await }
    };
    let (ok, _, err) = forget("N2").await;
    assert!(!ok && err.contains("node N2 is up"), "{err}");
    let (ok, out, err) = forget("N1").await;
    assert!(ok && out.contains("forgot node N1"), "{out}{err}");
    let (ok, _, err) = forget("N9").await;
    assert!(!ok && err.contains("no node N9"), "{err}");
    let (ok, out, _) = broker_cmd(&["nodes", "list", "--cluster-db", &url, "--json"]).await;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    let names: Vec<&str> = listed
        .iter()
        .filter_map(|n| n["node_id"].as_str())
        .collect();
    assert!(ok && names == ["N2"], "{out}");
    // A silent node that devices are still taken for online at is not forgotten: with no node
    // running (no leader to move them), N7 is silent and holds C2's twin Z9.
    n2.kill9().await;
    pg.sql(
        "chukei",
        "INSERT INTO nodes VALUES ('N7', '127.0.0.1:1', 0, 0, 1);
         INSERT INTO presence (serial, node, record) SELECT 'Z9', 'N7', record FROM presence WHERE serial = 'C2'",
    );
    let (ok, _, err) = forget("N7").await;
    assert!(
        !ok && err.contains("1 device(s) are still taken for online"),
        "{err}"
    );
}

#[tokio::test]
async fn a_device_resumes_its_tls_session_on_another_node_with_the_clusters_ticket_keys() {
    let env = TestEnv::new(
        "a_device_resumes_its_tls_session_on_another_node_with_the_clusters_ticket_keys",
    );
    let (pg, url) = Postgres::with_schema(&env).await;
    let node = |id: &str| {
        env.broker()
            .data_dir(env.path(id))
            .args(["--node-id", id, "--cluster-db", &url])
            .args(["--metrics-listen", "127.0.0.1:0"])
    };
    let mut n1 = node("N1").start().await;
    let n2 = node("N2").start().await;
    let c1 = env
        .device("C1")
        .brokers(&[n1.url(), n2.url()])
        .arg("--one-tree")
        .start(&n1)
        .await;
    // The ticket rides with the CONNACK; then N1 dies and C1 goes to N2.
    n1.kill9().await;
    c1.wait_for_line("C1 on N2", deadline(), |l| {
        l.contains("connected") && l.contains(&n2.port().to_string())
    })
    .await;
    let metrics = harness::raw::scrape(n2.metrics_addr()).await;
    assert_eq!(
        harness::raw::sample(&metrics, "chukei_tls_resumed_total"),
        1,
        "N2 opened the ticket N1 sealed:\n{metrics}"
    );
    assert_eq!(
        pg.sql("chukei", "SELECT count(*) FROM tls_ticket_keys"),
        "1"
    );
}

#[tokio::test]
async fn a_node_follows_a_promoted_synchronous_standby_and_loses_nothing_it_acked() {
    let env =
        TestEnv::new("a_node_follows_a_promoted_synchronous_standby_and_loses_nothing_it_acked");
    let primary = Postgres::start(&env, "primary");
    primary.create_db("chukei");
    let (ok, _, err) = broker_cmd(&["db", "migrate", "--cluster-db", &primary.url("chukei")]).await;
    assert!(ok, "{err}");
    let standby = primary.start_standby(&env, "standby");
    // Both servers in one URL: the node uses whichever takes writes.
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/chukei?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let relay = env
        .broker()
        .data_dir(env.path("n1"))
        .args(["--node-id", "N1", "--cluster-db", &url])
        .start()
        .await;
    let host = env.host("svc", &relay);
    let mut c1 = env
        .device("C1")
        .config("[report]\ncounters_every_secs = 1\n")
        .start(&relay)
        .await;
    let args = [
        "--serial",
        "C1",
        "--kind",
        "get-data",
        "--sections",
        "counters",
    ];
    let job = host.submit(&args).await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    c1.wait_for_lines("C1's readings acked", 3, deadline(), |l| {
        l.contains("ack received") && l.contains("outcome=stored")
    })
    .await;

    // The primary dies; the operator promotes the standby; the node finds it by itself.
    primary.stop();
    standby.promote();
    relay
        .wait_for_log("relay storage writable again", deadline())
        .await;
    let job = host.submit(&args).await;
    host.wait_for_status(&job, "succeeded", deadline()).await;

    // Every reading C1 had acked before and after is on the promoted server.
    c1.stop().await;
    let (queued, acked) = readings_queued_and_acked(&c1);
    let all: usize = standby
        .sql(
            "chukei",
            "SELECT count(*) FROM readings WHERE serial = 'C1'",
        )
        .parse()
        .unwrap_or(0);
    let unacked = queued.len() - acked.len();
    // Two job readings besides the reports.
    assert!(
        all >= acked.len() + 2 && all <= acked.len() + unacked + 2,
        "{all} readings on the promoted server; {} acked, {unacked} never acked",
        acked.len()
    );
}

#[tokio::test]
async fn a_rollout_created_at_one_node_moves_through_devices_on_both_and_files_each_job_once() {
    let env = TestEnv::new("a_rollout_created_at_one_node_moves_through_devices_on_both");
    let TwoNodes {
        n1,
        n2,
        bus: _bus,
        pg,
    } = two_nodes(&env).await;
    // Three copiers on each node; the service desk on N1, an integrator on N2.
    let _a = env.fleet(3).prefix("A").start(&n1).await;
    let _b = env.fleet(3).prefix("B").start(&n2).await;
    let host = env.host("svc", &n1);
    host.wait_for_devices(6).await;
    let mut crm = env
        .mqtt(protocol::Role::Integrator, "crm")
        .connect(&n2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crm.subscribe_and_wait("json/fleet/rollouts/+").await;
    let id = host
        .run_ok([
            "rollouts",
            "create",
            "--name",
            "both-nodes",
            "--kind",
            "get-data",
            "--target",
            "serial=*",
            "--waves",
            "50%,100%",
        ])
        .await
        .trim()
        .to_owned();
    let topic = format!("json/fleet/rollouts/{id}");
    let within = deadline() * 2;
    let view = tokio::time::timeout(within, async {
        loop {
            let p = crm.next_publish_on(&topic, within).await;
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            if v["status"] == "succeeded" {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{topic} never showed succeeded at N2"));
    assert_eq!(view["counts"]["succeeded"], 6, "{view:#}");
    let jobs = view["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 6, "one job per device: {view:#}");
    // Both nodes stepped it (N2 in the batches that ended its copiers' jobs, the leader on its
    // tick), and the database holds exactly one job per device.
    assert_eq!(
        pg.sql("chukei", "SELECT count(*) FROM jobs"),
        "6",
        "no device got two jobs of the rollout"
    );
}

#[tokio::test]
async fn nodes_reach_the_database_and_the_bus_over_tls_with_their_own_certificates() {
    let env =
        TestEnv::new("nodes_reach_the_database_and_the_bus_over_tls_with_their_own_certificates");
    let pki = env.pki().dir().to_owned();
    let pg = Postgres::start_tls(&env, "db", &pki);
    let url = pg.tls_url(&pki);
    let migrate =
        |url: String| async move { broker_cmd(&["db", "migrate", "--cluster-db", &url]).await };

    // In the clear, the server turns the node user away; with a CA that did not sign the
    // server's certificate, the node does.
    let (ok, _, err) = migrate(format!(
        "postgresql://chukei@127.0.0.1:{}/chukei",
        pg.port()
    ))
    .await;
    assert!(!ok && err.contains("no encryption"), "{err}");
    let stranger = env.path("stranger-pki");
    pki::init(&stranger, &[]).unwrap_or_else(|e| panic!("{e}"));
    let ca = pki.join(pki::CA_CERT).display().to_string();
    let wrong = url.replace(&ca, &stranger.join(pki::CA_CERT).display().to_string());
    let (ok, _, err) = migrate(wrong).await;
    assert!(!ok && err.contains("invalid peer certificate"), "{err}");
    let (ok, out, err) = migrate(url.clone()).await;
    assert!(ok, "{err}");
    assert!(out.contains("created the schema"), "{out}");

    let bus = Nats::start_tls(&env, "bus", &pki).await;
    let (cert, key) = pki::cluster::cluster_cert_paths(&pki, "chukei");
    let node = |id: &str| {
        cluster_node(&env, id, &url, &bus.url_with_credentials()).args([
            "--cluster-bus-ca",
            &ca,
            "--cluster-bus-cert",
            &cert.display().to_string(),
            "--cluster-bus-key",
            &key.display().to_string(),
        ])
    };
    let n1 = node("N1").start().await;
    let n2 = node("N2").start().await;
    for n in [&n1, &n2] {
        n.wait_for_line("connected to the bus over TLS", deadline(), |l| {
            l.contains("cluster bus connected") && l.contains("tls=true")
        })
        .await;
    }

    // A job filed at N1 reaches C1 on N2: through the database and the bus, both over TLS.
    let _c1 = env.device("C1").start(&n2).await;
    let host = env.host("svc", &n1);
    let job = host.submit_get_data("C1").await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    // The URL from the environment (a systemd EnvironmentFile), not the command line.
    let listed = tokio::process::Command::new(harness::bin("broker"))
        .args(["nodes", "list"])
        .env("CHUKEI_CLUSTER_DB", &url)
        .output()
        .await
        .unwrap_or_else(|e| panic!("broker nodes list: {e}"));
    let out = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && out.contains("N1") && out.contains("N2"),
        "{out}{}",
        String::from_utf8_lossy(&listed.stderr)
    );

    // The database saw every connection of the nodes encrypted, none in the clear.
    let by_ssl = pg.sql(
        "postgres",
        "SELECT s.ssl, count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.usename = 'chukei' GROUP BY s.ssl ORDER BY s.ssl",
    );
    let encrypted: usize = by_ssl
        .lines()
        .find_map(|l| l.strip_prefix("t|"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(encrypted >= 4 && !by_ssl.contains("f|"), "{by_ssl}");

    // A node without the bus's CA cannot join the bus, and says so; its password is never
    // logged.
    let n3 = cluster_node(&env, "N3", &url, &bus.url_with_credentials())
        .start()
        .await;
    n3.wait_for_log("cannot connect to the cluster bus", deadline())
        .await;
    assert!(
        !n3.log().contains("cluster bus connected"),
        "N3 joined a TLS bus without its CA"
    );
    for n in [&n1, &n2, &n3] {
        let leaks = n.lines_matching(|l| l.contains(Nats::PASSWORD) && !l.starts_with("[harness]"));
        assert!(
            leaks.is_empty(),
            "a node logged the bus's password: {leaks:?}"
        );
    }
}
