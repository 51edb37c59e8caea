//! Meter readings refuse what cannot be a count of pages: a negative counter never reaches the
//! billing export.

use protocol::meter::CounterReport;

use super::*;

fn counters_report(s: &str, id: MsgId, total: i64) -> Inbound {
    let report = CounterReport {
        read_at: t(9, 2),
        counters: counters(total)[&Section::Counters].clone(),
    };
    Inbound {
        topic: topic::dev_up(&serial(s), UpKind::Counters),
        payload: Envelope::new(id, t(9, 2), report).to_cbor().unwrap().into(),
    }
}

fn exported(core: &Core) -> Vec<protocol::meter::CounterReading> {
    let request = host_msg(
        "svc",
        rand::random::<u32>().into(),
        HostRequest::ExportCounters {
            from: "2026-11-26T00:00:00Z".into(),
            to: "2026-11-27T00:00:00Z".into(),
            after: None,
            serial: None,
        },
    );
    let out = core.handle_batch(vec![request], t(10, 0)).unwrap();
    let HostReply::Counters { readings, .. } = replies(&out, "svc").remove(0).reply else {
        panic!("not counters")
    };
    readings
}

#[test]
fn a_negative_counter_is_refused_with_its_name_and_never_exported() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let out = core
        .handle_batch(
            vec![counters_report("C1", 1, -999), counters_report("C1", 2, 12)],
            t(9, 2),
        )
        .unwrap();
    let acks = acks(&out, "C1");
    match &acks[0].outcome {
        AckOutcome::Rejected { reason } => {
            assert!(reason.contains("\"total\" is -999"), "{reason}")
        }
        other => panic!("a negative counter must be refused, got {other:?}"),
    }
    assert_eq!(acks[1].outcome, AckOutcome::Stored);

    // A get-data job whose result carries one: the job keeps the device's answer, billing does not.
    let out = core
        .handle_batch(vec![submit("svc", 1, get_data("C1"))], t(9, 3))
        .unwrap();
    let job = submitted_job(&out, "svc");
    core.handle_batch(
        vec![update(
            "C1",
            3,
            &job,
            JobStatus::Succeeded,
            Some(counters(-5)),
        )],
        t(9, 4),
    )
    .unwrap();
    assert_eq!(detail(&core, &job).view.status, JobStatus::Succeeded);

    let totals: Vec<_> = exported(&core)
        .iter()
        .map(|r| r.counters["total"].clone())
        .collect();
    assert_eq!(totals, [Value::Int(12)], "only the real reading is billed");
}

#[test]
fn a_state_whose_site_is_too_long_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let out = core
        .handle_batch(
            vec![
                state("C1", 1, &"x".repeat(60_000)),
                state("C1", 2, "Osaka HQ"),
            ],
            t(9, 0),
        )
        .unwrap();
    let acks = acks(&out, "C1");
    match &acks[0].outcome {
        AckOutcome::Rejected { reason } => {
            assert!(reason.starts_with("site is 60000 bytes"), "{reason}")
        }
        other => panic!("a 60 KB site must be refused, got {other:?}"),
    }
    assert_eq!(acks[1].outcome, AckOutcome::Stored);
    let txn = core.store().begin().unwrap();
    let stored = txn.device_state(&serial("C1")).unwrap().unwrap();
    assert_eq!(stored.site, "Osaka HQ", "only the valid state was stored");
}
