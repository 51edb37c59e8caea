//! The relay on the cluster store, with a real PostgreSQL server started by the test: `broker db
//! migrate` creates the schema, `broker run --cluster-db` refuses a database it cannot use as it
//! is and keeps every job in PostgreSQL — a relay started again with an empty data directory
//! finds them all.

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
