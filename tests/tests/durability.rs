//! What survives a crash: redb is the truth, retained messages and acks are rebuilt from it
//! (docs/decisions.md, D2 and D3; the seed's claims 13–14).

use harness::mqtt::open;
use harness::{TestEnv, deadline};
use protocol::job::{JobOrder, JobSpec};
use protocol::{Envelope, JobId, Role, Serial, topic};
use serde_json::Value;

fn serial(s: &str) -> Serial {
    Serial::parse(s).unwrap_or_else(|e| panic!("test serial: {e}"))
}

/// A broker log line saying that `job`'s update to `status` was applied (in the transaction; the
/// commit follows).
fn stored(line: &str, job: &str, status: &str) -> bool {
    line.contains("job update stored")
        && line.contains(job)
        && line.contains(&format!("status={status}"))
}

fn count_status(detail: &Value, status: &str) -> usize {
    detail["timeline"]
        .as_array()
        .unwrap_or_else(|| panic!("no timeline array in {detail:#}"))
        .iter()
        .filter(|e| e["status"] == status)
        .count()
}

#[tokio::test]
async fn resent_result_after_broker_sigkill_is_stored_once() {
    let env = TestEnv::new("resent_result_after_broker_sigkill_is_stored_once");
    // The job is queued while C1 is away, so that the fault below touches only what C1 sends.
    let mut setup = env.broker().start().await;
    let addr = setup.addr();
    let host = env.host("svc", &setup);
    let job = host.submit_get_data("C1").await;
    assert!(
        setup.stop().await.success(),
        "the broker exits cleanly on SIGTERM"
    );

    // The fault: everything is committed, no ack ever leaves, as if the broker died just after
    // each commit. The device must keep its messages and resend them.
    let mut first = env
        .broker()
        .listen(addr)
        .env("CHUKEI_TEST_HOLD_ACKS", "1")
        // Every state report C1 sends is committed, a repeat too (logged at debug).
        .log_also("broker::core::device=debug")
        .start()
        .await;
    // Views are published after the commit (docs/decisions.md, D2) and the fault holds back only
    // acks and replies, so a succeeded view is the sign that the result is durable. (The "job
    // update stored" log line is written inside the transaction, before the commit: not enough
    // alone.)
    let (c1_serial, job_id) = (serial("C1"), JobId::parse(&job).expect("a valid job id"));
    let view = topic::json_fleet_job(&c1_serial, &job_id);
    let mut watch = env
        .mqtt(Role::Host, "svc")
        .client_id("svc:watch")
        .connect(&first)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    watch.subscribe(&view).await;

    let c1 = env.device("C1").start(&first).await;
    let what = format!("\"job update stored\" for {job} with status=succeeded");
    first
        .wait_for_line(&what, deadline(), |l| stored(l, &job, "succeeded"))
        .await;
    let durable = tokio::time::timeout(deadline(), async {
        loop {
            let p = watch.next_publish_on(&view, deadline()).await;
            let json: Value = serde_json::from_slice(&p.payload)
                .unwrap_or_else(|e| panic!("{view} is not JSON: {e}"));
            if json["status"] == "succeeded" {
                return;
            }
        }
    })
    .await;
    assert!(
        durable.is_ok(),
        "no succeeded view on {view} within {:?}",
        deadline()
    );
    drop(watch);
    // Everything the broker committed from C1 is in its outbox, unacknowledged.
    let committed = first
        .lines_matching(|l| {
            (l.contains("job update stored") || l.contains("device state stored"))
                && l.contains("serial=C1")
        })
        .len();
    assert!(
        c1.lines_matching(|l| l.contains("ack received")).is_empty(),
        "the broker held its acks, yet the device logged one:\n{}",
        c1.log()
    );
    first.kill9().await;

    let second = env.broker().listen(addr).start().await;
    // Each message the first broker committed comes back, and is answered "duplicate".
    let duplicate = |l: &str| l.contains("ack received") && l.to_lowercase().contains("duplicate");
    let what =
        "\"ack received\" with outcome duplicate, once per message the first broker committed";
    let acks = c1
        .wait_for_lines(what, committed, deadline(), duplicate)
        .await;
    eprintln!(
        "{committed} messages committed before the crash, acked after it:\n{}",
        acks.join("\n")
    );

    let detail = host.show_json(&job).await;
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    assert_eq!(
        count_status(&detail, "succeeded"),
        1,
        "the resent result was stored twice:\n{detail:#}"
    );
    assert!(
        detail["data"]["counters"]["total"]
            .as_i64()
            .is_some_and(|t| t > 0),
        "the data was kept:\n{detail:#}"
    );
    assert!(
        second
            .lines_matching(|l| l.contains("job update stored") && l.contains(&job))
            .is_empty(),
        "the restarted broker applied a resent update again:\n{}",
        second.log()
    );
}

#[tokio::test]
async fn retained_job_survives_broker_restart_while_device_offline() {
    let env = TestEnv::new("retained_job_survives_broker_restart_while_device_offline");
    let mut first = env.broker().start().await;
    let addr = first.addr();
    let host = env.host("svc", &first);

    let job = host.submit_get_data("C9").await;
    assert_eq!(
        host.show_json(&job).await["status"],
        "queued",
        "C9 has never connected"
    );
    first.kill9().await;

    let broker = env.broker().listen(addr).start().await;
    let serial = serial("C9");
    let job_id =
        JobId::parse(&job).unwrap_or_else(|e| panic!("`jobs submit` printed a bad job id: {e}"));
    let mut c9 = env
        .mqtt(Role::Device, "C9")
        .connect(&broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c9.subscribe(&topic::dev_jobs_filter(&serial)).await;
    let publish = c9
        .next_publish_on(&topic::dev_job(&serial, &job_id), deadline())
        .await;
    let order: Envelope<JobOrder> = open(&publish);
    assert_eq!(order.body.job, job_id, "{order:?}");
    assert_eq!(order.body.serial, serial, "{order:?}");
    assert!(
        matches!(order.body.spec, JobSpec::GetData { .. }),
        "{order:?}"
    );
    c9.disconnect().await;

    let _c9 = env.device("C9").start(&broker).await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
}
