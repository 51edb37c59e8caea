//! The relay on the cluster store, with a real PostgreSQL server started by the test: `broker db
//! migrate` creates the schema, `broker run --cluster-db` refuses a database it cannot use as it
//! is and keeps every job in PostgreSQL — a relay started again with an empty data directory
//! finds them all.

use harness::nats::Nats;
use harness::postgres::Postgres;
use harness::{TestEnv, broker_cmd, deadline};

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
    assert!(out.contains("created the schema (version 1)"), "{out}");
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
    let pg = Postgres::start(&env, "db");
    pg.create_db("chukei");
    let url = pg.url("chukei");
    let (ok, _, err) = broker_cmd(&["db", "migrate", "--cluster-db", &url]).await;
    assert!(ok, "{err}");
    let mut bus = Nats::start(&env, "bus", None).await;
    let node = |id: &str| {
        env.broker()
            .data_dir(env.path(id))
            .args(["--node-id", id, "--cluster-db", &url])
            .args(["--cluster-bus", &bus.url()])
    };
    let n1 = node("N1").start().await;
    let n2 = node("N2").start().await;
    for n in [&n1, &n2] {
        n.wait_for_log("cluster bus connected", deadline()).await;
    }
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
    let pg = Postgres::start(&env, "db");
    pg.create_db("chukei");
    let url = pg.url("chukei");
    let (ok, _, err) = broker_cmd(&["db", "migrate", "--cluster-db", &url]).await;
    assert!(ok, "{err}");
    let bus = Nats::start(&env, "bus", None).await;
    let node = |id: &str| {
        env.broker()
            .data_dir(env.path(id))
            .args(["--node-id", id, "--cluster-db", &url])
            .args(["--cluster-bus", &bus.url()])
    };
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
