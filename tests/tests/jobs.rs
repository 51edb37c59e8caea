//! Jobs end to end: a host submits, a device runs, the host reads the result (the seed's Fig. 2).

use chrono::{DateTime, SecondsFormat, Utc};
use harness::{FIG9_KEYS, TestEnv, deadline, secs};
use serde_json::Value;

/// The statuses of a job's timeline, in order.
fn statuses(detail: &Value) -> Vec<String> {
    detail["timeline"]
        .as_array()
        .unwrap_or_else(|| panic!("no timeline array in {detail:#}"))
        .iter()
        .map(|e| e["status"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// When the timeline's first event with `status` happened.
fn event_time(detail: &Value, status: &str) -> DateTime<Utc> {
    let event = detail["timeline"]
        .as_array()
        .and_then(|t| t.iter().find(|e| e["status"] == status))
        .unwrap_or_else(|| panic!("no {status:?} event in the timeline of {detail:#}"));
    let at = event["at"]
        .as_str()
        .unwrap_or_else(|| panic!("event without a time: {event}"));
    DateTime::parse_from_rfc3339(at)
        .unwrap_or_else(|e| panic!("event time {at:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

fn total_count(detail: &Value) -> i64 {
    detail["data"]["counters"]["total"]
        .as_i64()
        .unwrap_or_else(|| panic!("no data.counters.total number in {detail:#}"))
}

#[tokio::test]
async fn get_data_round_trip() {
    let env = TestEnv::new("get_data_round_trip");
    let broker = env.broker().start().await;
    let _c1 = env.device("C1").site("Osaka-3F").start(&broker).await;
    let host = env.host("svc", &broker);

    let job = host.submit_get_data("C1").await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    for key in FIG9_KEYS {
        assert!(
            detail.get(key).is_some(),
            "`jobs show --json` lacks the Fig. 9 column {key:?}:\n{detail:#}"
        );
    }
    assert_eq!(detail["id"], job.as_str(), "{detail:#}");
    assert_eq!(detail["serial"], "C1", "{detail:#}");
    assert_eq!(
        detail["host"], "svc",
        "the instructing host is the certificate's id:\n{detail:#}"
    );
    assert_eq!(detail["instruction"], "GET DATA", "{detail:#}");
    assert_eq!(
        detail["site"], "Osaka-3F",
        "the site is what the device reported:\n{detail:#}"
    );
    assert!(
        total_count(&detail) > 0,
        "a copier that has printed has a total count:\n{detail:#}"
    );
    let timeline = statuses(&detail);
    assert_eq!(
        timeline.first().map(String::as_str),
        Some("queued"),
        "{timeline:?}"
    );
    assert_eq!(
        timeline.last().map(String::as_str),
        Some("succeeded"),
        "{timeline:?}"
    );

    let listed = host.list_json(true).await;
    let row = listed
        .iter()
        .find(|j| j["id"] == job.as_str())
        .unwrap_or_else(|| panic!("`jobs list --json --all` lacks job {job}: {listed:#?}"));
    assert_eq!(row["status"], "succeeded", "{row:#}");
    for key in FIG9_KEYS {
        assert!(
            row.get(key).is_some(),
            "`jobs list --json` lacks the Fig. 9 column {key:?}:\n{row:#}"
        );
    }

    // S108–S109: a job whose instruction time has not come waits for it.
    let at_text =
        (Utc::now() + chrono::Duration::seconds(3)).to_rfc3339_opts(SecondsFormat::Millis, true);
    let at = DateTime::parse_from_rfc3339(&at_text)
        .expect("chrono reads what it wrote")
        .with_timezone(&Utc);
    let later = host
        .submit(&[
            "--serial",
            "C1",
            "--kind",
            "get-data",
            "--sections",
            "counters",
            "--at",
            &at_text,
        ])
        .await;
    let detail = host
        .wait_for_status(&later, "succeeded", deadline() + secs(3))
        .await;
    let started = event_time(&detail, "in-progress");
    assert!(
        started >= at,
        "job {later} started at {started}, before its instruction time {at}:\n{detail:#}"
    );
    assert!(event_time(&detail, "succeeded") >= at, "{detail:#}");
    let instruction_time = detail["instruction_time"]
        .as_str()
        .map(DateTime::parse_from_rfc3339);
    assert!(
        matches!(instruction_time, Some(Ok(t)) if t == at),
        "instruction_time must be the --at given ({at_text}):\n{detail:#}"
    );
    assert_eq!(detail["data_type"], "counters", "{detail:#}");
    let sections: Vec<&String> = detail["data"]
        .as_object()
        .map(|d| d.keys().collect())
        .unwrap_or_default();
    assert_eq!(
        sections,
        ["counters"],
        "only the sections asked for are collected:\n{detail:#}"
    );
}

#[tokio::test]
async fn bad_submission_is_refused_with_its_reason() {
    let env = TestEnv::new("bad_submission_is_refused_with_its_reason");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);

    let out = host
        .run([
            "jobs",
            "submit",
            "--serial",
            "C1",
            "--kind",
            "get-data",
            "--sections",
            "toner",
        ])
        .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refused submission exits 1\n{out}"
    );
    assert!(
        out.stderr.contains("toner"),
        "the reason names the bad section\n{out}"
    );
    assert!(
        out.stdout.trim().is_empty(),
        "no job id is printed for a refused submission\n{out}"
    );

    // S104: the refusal is recorded, with its reason, for the host's display.
    let listed = host.list_json(true).await;
    let rejected = listed
        .iter()
        .find(|j| j["status"] == "rejected")
        .unwrap_or_else(|| panic!("the refused submission is not listed with --all: {listed:#?}"));
    let reason = rejected["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("toner"),
        "the recorded reason names the bad section:\n{rejected:#}"
    );
}

#[tokio::test]
async fn simulated_fleet_runs_jobs_for_its_devices() {
    let env = TestEnv::new("simulated_fleet_runs_jobs_for_its_devices");
    let broker = env.broker().start().await;
    let fleet = env.fleet(20).start(&broker).await;
    let host = env.host("svc", &broker);

    let first = host.submit_get_data(&fleet.serial(3)).await;
    let second = host.submit_get_data(&fleet.serial(17)).await;
    for (job, serial) in [(first, fleet.serial(3)), (second, fleet.serial(17))] {
        let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
        assert_eq!(detail["serial"], serial.as_str(), "{detail:#}");
        assert!(total_count(&detail) > 0, "{detail:#}");
    }
}
