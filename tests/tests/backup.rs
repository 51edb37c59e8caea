//! Online backup and restore with real processes: `broker backup` while a fleet reports and jobs
//! run, `broker restore` into a new data directory, and a relay started there serves every job,
//! report and alarm acked before the backup began.

mod emergency;

use std::collections::BTreeSet;
use std::path::Path;

use broker::store::{RedbStore, Store};
use emergency::fault;
use harness::chaos::ids_logged;
use harness::{TestEnv, broker_cmd, deadline, poll_until};
use serde_json::Value;

fn text(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
}

/// (job id, status) of every job in a store.
type Jobs = Vec<(String, String)>;

/// Every job in a stopped relay's store, and which of `acked` (serial, msg id) its journal lacks.
fn read_store(data_dir: &Path, acked: &BTreeSet<(String, u64)>) -> (Jobs, Vec<(String, u64)>) {
    let store =
        RedbStore::open(data_dir).unwrap_or_else(|e| panic!("opening {}: {e}", data_dir.display()));
    let txn = store.begin().unwrap_or_else(|e| panic!("{e}"));
    let missing = acked
        .iter()
        .filter(|(serial, id)| {
            txn.journal(&format!("device:{serial}"), *id)
                .unwrap_or_else(|e| panic!("{e}"))
                .is_none()
        })
        .cloned()
        .collect();
    let jobs = txn
        .jobs_newest_first(&mut |_| true)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|r| (r.view.id, r.view.status.to_string()))
        .collect();
    (jobs, missing)
}

/// `alarms list --json`, parsed.
async fn alarms_json(host: &harness::Host) -> Vec<Value> {
    let out = host.run_ok(["alarms", "list", "--json"]).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("`alarms list --json`: {e}\n{out}"))
}

fn has_alarm(alarms: &[Value]) -> bool {
    alarms
        .iter()
        .any(|a| a["serial"] == "D1" && a["code"] == "SC-541")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_under_load_restores_every_acked_report_job_and_alarm() {
    let env = TestEnv::new("a_backup_under_load_restores_every_acked_report_job_and_alarm");
    let data_dir = env.path("broker-data");
    let mut broker = env.broker().data_dir(&data_dir).start().await;
    // The load: 20 copiers reading their counters every second, each reading acked.
    let fleet_config = env.path("fleet.toml");
    std::fs::write(&fleet_config, "[report]\ncounters_every_secs = 1\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut fleet = env
        .fleet(20)
        .arg("--config")
        .arg(&fleet_config)
        .start(&broker)
        .await;
    let mut d1 = env.device("D1").start(&broker).await;
    let host = env.host("svc", &broker);

    // Before the backup: finished jobs, a raised alarm, acked meter reports.
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(host.submit_get_data(&fleet.serial(i)).await);
    }
    for job in &before {
        host.wait_for_status(job, "succeeded", deadline()).await;
    }
    fault(&d1, &["raise", "SC-541"]).await;
    poll_until("D1's alarm listed", deadline(), || async {
        let alarms = alarms_json(&host).await;
        if has_alarm(&alarms) {
            Ok(())
        } else {
            Err(format!("{alarms:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    fleet
        .wait_for_lines("40 acked reports", 40, deadline(), |l| {
            l.contains("ack received")
        })
        .await;

    // Everything the fleet saw acked up to now must be in the backup.
    let acked_before = ids_logged(&[fleet.log(), d1.log()], "ack received");
    assert!(acked_before.len() >= 40, "{acked_before:?}");
    let backup = env.path("relay.backup");
    let (ok, stdout, stderr) = broker_cmd(&[
        "backup",
        "--data-dir",
        text(&data_dir),
        "--out",
        text(&backup),
    ])
    .await;
    assert!(ok, "broker backup failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("written by the running relay"),
        "the running relay writes it: {stdout}"
    );
    broker.wait_for_log("backup written", deadline()).await;

    // After the backup: the relay goes on; this job is not in the backup.
    let after = host.submit_get_data(&fleet.serial(3)).await;
    host.wait_for_status(&after, "succeeded", deadline()).await;
    fleet.stop().await;
    d1.stop().await;
    assert!(broker.stop().await.success(), "the broker exits cleanly");

    // A restore never overwrites a store.
    let (ok, _, stderr) = broker_cmd(&[
        "restore",
        "--from",
        text(&backup),
        "--data-dir",
        text(&data_dir),
    ])
    .await;
    assert!(!ok, "restoring over a store must be refused");
    assert!(stderr.contains("empty data directory"), "{stderr}");

    let restored = env.path("restored");
    let (ok, stdout, stderr) = broker_cmd(&[
        "restore",
        "--from",
        text(&backup),
        "--data-dir",
        text(&restored),
    ])
    .await;
    assert!(ok, "broker restore failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("restored into"), "{stdout}");

    let (jobs, missing) = read_store(&restored, &acked_before);
    assert!(
        missing.is_empty(),
        "acked before the backup but not in it: {missing:?}"
    );
    for job in &before {
        assert!(
            jobs.contains(&(job.clone(), "succeeded".to_owned())),
            "{job} must be in the backup as succeeded: {jobs:?}"
        );
    }
    assert!(
        !jobs.iter().any(|(id, _)| id == &after),
        "{after} was submitted after the backup: {jobs:?}"
    );

    // A relay on the restored directory serves the jobs and the alarm.
    let broker = env.broker().data_dir(&restored).start().await;
    let host = env.host("svc", &broker);
    let listed = host.list_json(true).await;
    for job in &before {
        assert!(
            listed
                .iter()
                .any(|j| j["id"] == job.as_str() && j["status"] == "succeeded"),
            "jobs list on the restored relay lacks {job}: {listed:?}"
        );
    }
    let alarms = alarms_json(&host).await;
    assert!(
        has_alarm(&alarms),
        "the restored relay lacks D1's SC-541 alarm: {alarms:?}"
    );
}
