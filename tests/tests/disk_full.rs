//! The relay's disk fills up: it refuses new work with an error that names the cause, acks
//! nothing it could not store, keeps serving reads and recovers by itself once space returns,
//! without losing anything it acked before.
//!
//! The broker's data directory is a small tmpfs the test mounts (root only; skipped otherwise).

use std::collections::BTreeSet;
use std::path::Path;

use broker::store::{RedbStore, Store};
use harness::chaos::{Tmpfs, field, ids_logged};
use harness::{TestEnv, deadline, poll_until, raw};
use protocol::{JobId, Role, Serial, topic};
use serde_json::Value;

/// What the store holds, read from the redb file once the broker has stopped.
struct Stored {
    /// Job id → status.
    jobs: Vec<(String, String)>,
    /// (serial, read_at) of every reading a device reported on its own.
    reports: Vec<(String, String)>,
    /// The filters of D2's persistent session, as its presence record holds them.
    d2_session_filters: Vec<String>,
}

fn read_store(data_dir: &Path, acked: &BTreeSet<(String, u64)>) -> Stored {
    let store = RedbStore::open(data_dir)
        .unwrap_or_else(|e| panic!("opening the stopped broker's store: {e}"));
    let txn = store.begin().unwrap_or_else(|e| panic!("{e}"));
    for (serial, id) in acked {
        let entry = txn
            .journal(&format!("device:{serial}"), *id)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            entry.is_some(),
            "message {id} of {serial} was acked but is not in the store's journal"
        );
    }
    let jobs = txn
        .jobs_newest_first(&mut |_| true)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|r| (r.view.id, r.view.status.to_string()))
        .collect();
    let from = chrono::Utc::now() - chrono::Duration::days(1);
    let to = chrono::Utc::now() + chrono::Duration::days(1);
    let (readings, next) = txn
        .readings(from, to, None, None, 1_000_000)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(next.is_none(), "more readings than one page");
    let reports = readings
        .into_iter()
        .filter(|r| r.source == "report")
        .map(|r| (r.serial, r.read_at.to_rfc3339()))
        .collect();
    let d2 = Serial::parse("D2").unwrap_or_else(|e| panic!("{e}"));
    let d2_session_filters = txn
        .presence(&d2)
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|p| p.session_filters)
        .unwrap_or_default();
    Stored {
        jobs,
        reports,
        d2_session_filters,
    }
}

/// (serial, read_at) of every meter report `host-agent export counters --format json` lists: a read
/// the relay must keep serving while its disk is full.
async fn exported_reports(host: &harness::Host) -> BTreeSet<(String, String)> {
    let from = (chrono::Utc::now() - chrono::Duration::days(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = (chrono::Utc::now() + chrono::Duration::days(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let json = host
        .run_ok([
            "export", "counters", "--from", &from, "--to", &to, "--format", "json",
        ])
        .await;
    let rows: Vec<Value> =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("export is not JSON: {e}\n{json}"));
    rows.iter()
        .filter(|r| r["source"] == "report")
        .map(|r| {
            let at = r["read_at"].as_str().unwrap_or_default();
            let at = chrono::DateTime::parse_from_rfc3339(at)
                .unwrap_or_else(|e| panic!("read_at {at:?}: {e}"))
                .with_timezone(&chrono::Utc);
            (
                r["serial"].as_str().unwrap_or_default().to_owned(),
                at.to_rfc3339(),
            )
        })
        .collect()
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[tokio::test]
async fn a_full_disk_refuses_new_work_keeps_reads_and_recovers() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let env = TestEnv::new("a_full_disk_refuses_new_work_keeps_reads_and_recovers");
    let tmpfs = Tmpfs::mount(env.path("small-disk"), "8m").unwrap_or_else(|e| panic!("{e}"));
    let data_dir = tmpfs.dir().join("broker");
    let mut broker = env
        .broker()
        .data_dir(&data_dir)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start()
        .await;
    // D1 reads its counters every second and resends anything queued within two.
    let mut d1 = env
        .device("D1")
        .config(
            "[report]\ncounters_every_secs = 1\n\
             [session]\nresend_min_secs = 1\nresend_max_secs = 2\n",
        )
        .start(&broker)
        .await;
    let host = env.host("svc", &broker);

    // Work done while there is space: a job, and some meter reports acked.
    let before_job = host.submit_get_data("D1").await;
    host.wait_for_status(&before_job, "succeeded", deadline())
        .await;
    d1.wait_for_lines("3 acks", 3, deadline(), |l| l.contains("ack received"))
        .await;

    let reports_before = poll_until("a meter report stored", deadline(), || async {
        let reports = exported_reports(&host).await;
        if reports.len() >= 2 {
            Ok(reports)
        } else {
            Err(format!("{} stored", reports.len()))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // Fill the disk, leaving less than the relay's reserve (at least 256 KiB).
    let free_before = tmpfs.available();
    let filler = tmpfs.fill("filler", 64 * 1024);
    eprintln!(
        "filled: {free_before} bytes were free, {} are now",
        tmpfs.available()
    );
    let full_line = broker
        .wait_for_log("relay storage full: refusing new work", deadline())
        .await;
    eprintln!("broker: {full_line}");

    // A load balancer polling /readyz takes the relay out, with the reason; it is still alive.
    let (status, body) = raw::http_get(broker.metrics_addr(), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let readyz: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(readyz["ready"], false, "{body}");
    assert!(
        readyz["reason"]
            .as_str()
            .is_some_and(|r| r.contains("relay storage full") || r.contains("disk reserve")),
        "{body}"
    );
    let (status, _) = raw::http_get(broker.metrics_addr(), "/healthz").await;
    assert_eq!(status, 200);

    // A submission is refused with the cause, and the CLI says so.
    let refused = host
        .run(["jobs", "submit", "--serial", "D1", "--kind", "get-data"])
        .await;
    assert!(
        !refused.success(),
        "a submission must fail while the disk is full\n{refused}"
    );
    assert!(
        refused.stderr.contains("relay storage full"),
        "the error must name the cause\n{refused}"
    );

    // Device reports are not acked: two more readings queued, then no ack for any of them.
    let queued_now = |d: &harness::Device| {
        d.lines_matching(|l| l.contains("meter reading queued"))
            .len()
    };
    let acks_now = |d: &harness::Device| d.lines_matching(|l| l.contains("ack received")).len();
    let q0 = queued_now(&d1);
    d1.wait_for_lines("two more meter readings", q0 + 2, deadline(), |l| {
        l.contains("meter reading queued")
    })
    .await;
    let acks_while_full = acks_now(&d1);
    let q1 = queued_now(&d1);
    d1.wait_for_lines("three more meter readings", q1 + 3, deadline(), |l| {
        l.contains("meter reading queued")
    })
    .await;
    assert_eq!(
        acks_now(&d1),
        acks_while_full,
        "the relay acked a report while it could not store it:\n{}",
        d1.log()
    );

    // Reads still work: the job list, a job's detail, the retained JSON view.
    let listed = host.list_json(true).await;
    assert!(
        listed.iter().any(|j| j["id"] == before_job.as_str()),
        "jobs list --all must still show {before_job}: {listed:?}"
    );
    let detail = host.show_json(&before_job).await;
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    let reports_while_full = exported_reports(&host).await;
    assert!(
        reports_while_full.is_superset(&reports_before),
        "the export while full lost readings"
    );
    let view = topic::json_fleet_job(
        &Serial::parse("D1").unwrap_or_else(|e| panic!("{e}")),
        &JobId::parse(&before_job).unwrap_or_else(|e| panic!("{e}")),
    );
    let mut crm = env
        .mqtt(Role::Integrator, "crm")
        .connect(&broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crm.subscribe(&view).await;
    let retained = crm.next_publish_on(&view, deadline()).await;
    let json: Value = serde_json::from_slice(&retained.payload)
        .unwrap_or_else(|e| panic!("{view} is not JSON: {e}"));
    assert_eq!(json["status"], "succeeded", "{json:#}");
    crm.disconnect().await;
    assert!(
        d1.lines_matching(|l| l.contains("disconnected from broker"))
            .is_empty(),
        "the device's connection must stay up:\n{}",
        d1.log()
    );
    // A device's persistent session subscribed while full: its filters wait for the disk too.
    let d2 = env.certs(Role::Device, "D2");
    let (mut session, code, present) = raw::RawClient::tls_from(broker.addr(), &d2, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .mqtt_connect_session("D2", false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((code, present), (raw::ACCEPTED, false));
    assert_eq!(session.subscribe_acked(1, &["dev/D2/ack"]).await, [1]);
    session.disconnect().await;

    // One line for the whole burst, however many messages were refused.
    let burst_lines = broker.lines_matching(|l| l.contains("relay storage full: refusing"));
    assert_eq!(burst_lines.len(), 1, "{burst_lines:#?}");

    // Space returns: the relay resumes by itself, stores and acks what it refused.
    let queued: BTreeSet<(String, u64)> = ids_logged(&[d1.log()], "meter reading queued");
    std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("removing the filler: {e}"));
    let resumed = broker
        .wait_for_log("relay storage writable again", deadline())
        .await;
    assert!(
        field(&resumed, "refused").is_some_and(|n| n.parse::<u64>().is_ok_and(|n| n > 0)),
        "the recovery line counts what was refused: {resumed}"
    );
    poll_until("every queued meter reading acked", deadline(), || async {
        let acked = ids_logged(&[d1.log()], "ack received");
        let missing: Vec<_> = queued.difference(&acked).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not acked yet: {missing:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (status, body) = raw::http_get(broker.metrics_addr(), "/readyz").await;
    assert_eq!(
        (status, body.trim()),
        (200, r#"{"ready":true}"#),
        "ready again"
    );
    let after_job = host.submit_get_data("D1").await;
    host.wait_for_status(&after_job, "succeeded", deadline())
        .await;

    // Nothing acked is lost, nothing is stored twice.
    d1.stop().await;
    assert!(broker.stop().await.success(), "the broker exits cleanly");
    let acked: BTreeSet<(String, u64)> = ids_logged(&[d1.log()], "ack received");
    let stored = read_store(&data_dir, &acked);
    for job in [&before_job, &after_job] {
        assert!(
            stored
                .jobs
                .iter()
                .any(|(id, status)| id == job && status == "succeeded"),
            "{job} must be stored as succeeded: {:?}",
            stored.jobs
        );
    }
    assert_eq!(
        stored.d2_session_filters,
        ["dev/D2/ack"],
        "the filters subscribed while the disk was full are recorded once it is not"
    );
    let distinct: BTreeSet<(String, String)> = stored.reports.iter().cloned().collect();
    let lost: Vec<_> = reports_before.difference(&distinct).collect();
    assert!(
        lost.is_empty(),
        "reports stored before the disk filled are gone: {lost:?}"
    );
    assert_eq!(
        distinct.len(),
        stored.reports.len(),
        "a report was stored twice"
    );
    let acked_reports = queued.iter().filter(|m| acked.contains(m)).count();
    assert!(
        stored.reports.len() >= acked_reports,
        "{} reports acked, only {} stored",
        acked_reports,
        stored.reports.len()
    );
}
