//! The core driven through `handle_batch`, `expire` and `run` on the test store
//! (`crate::store::testing`: real redb files in temp directories by default, any backend of the
//! store's interface otherwise), with payloads built from the protocol types, as the router would
//! deliver them.

use std::sync::Arc;
use std::time::Duration;

use chrono::TimeZone;
use protocol::data::{DeviceData, Section, SectionData, Value};
use protocol::device::{Ack, AckBatch, AckOutcome, DeviceState, JobUpdate};
use protocol::host::{HostReply, HostRequest, HostResponse, SubmitJob};
use protocol::job::{JobDetail, JobOrder, JobSpec, JobStatus, JobView};
use protocol::topic::{self, UpKind};
use protocol::{Envelope, HostId, JobId, MsgId, Serial, Timestamp};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;

mod alarms;
mod kinds;
mod meter;
mod relays;
mod rollouts;
mod storage;

const LIMIT: usize = 65536;

fn t(h: u32, m: u32) -> Timestamp {
    chrono::Utc.with_ymd_and_hms(2026, 11, 26, h, m, 0).unwrap()
}

fn settings() -> CoreSettings {
    CoreSettings {
        server_name: "relay-test".into(),
        max_payload_bytes: LIMIT,
        finished_visible: Duration::from_secs(3600),
        default_deadline: Duration::from_secs(7 * 24 * 3600),
        default_max_attempts: 3,
        hold_acks: false,
        node: None,
        last_seen_resolution: Duration::from_secs(60),
    }
}

/// A core on the test store in `dir` (`crate::store::testing`: the backend the suite runs on).
fn open(dir: &tempfile::TempDir) -> Core {
    open_with(dir, settings())
}

fn open_with(dir: &tempfile::TempDir, settings: CoreSettings) -> Core {
    Core::with_store(crate::store::testing::open(dir.path()), settings)
}

/// The core of cluster node `name` on the store in `dir`.
fn open_node(dir: &tempfile::TempDir, name: &str) -> Core {
    open_with(
        dir,
        CoreSettings {
            node: Some(name.into()),
            ..settings()
        },
    )
}

fn serial(s: &str) -> Serial {
    Serial::parse(s).unwrap()
}

fn host(h: &str) -> HostId {
    HostId::parse(h).unwrap()
}

fn job(j: &str) -> JobId {
    JobId::parse(j).unwrap()
}

fn get_data(serial: &str) -> SubmitJob {
    SubmitJob {
        serial: serial.into(),
        kind: "get-data".into(),
        sections: vec!["counters".into()],
        ..Default::default()
    }
}

fn host_msg(h: &str, id: MsgId, req: HostRequest) -> Inbound {
    let payload = Envelope::new(id, t(9, 0), req).to_cbor().unwrap();
    Inbound {
        topic: topic::host_req(&host(h)),
        payload: payload.into(),
    }
}

fn submit(h: &str, id: MsgId, req: SubmitJob) -> Inbound {
    host_msg(h, id, HostRequest::Submit(req))
}

fn update(s: &str, id: MsgId, j: &str, status: JobStatus, data: Option<DeviceData>) -> Inbound {
    let body = JobUpdate {
        job: job(j),
        status,
        note: None,
        data,
        errors: Default::default(),
    };
    let payload = Envelope::new(id, t(9, 0), body).to_cbor().unwrap();
    Inbound {
        topic: topic::dev_up(&serial(s), UpKind::Job),
        payload: payload.into(),
    }
}

fn state(s: &str, id: MsgId, site: &str) -> Inbound {
    let body = DeviceState {
        site: site.into(),
        model: "MX-1".into(),
        firmware: "1.0".into(),
    };
    let payload = Envelope::new(id, t(9, 0), body).to_cbor().unwrap();
    Inbound {
        topic: topic::dev_up(&serial(s), UpKind::State),
        payload: payload.into(),
    }
}

fn counters(total: i64) -> DeviceData {
    let mut section = SectionData::new();
    section.insert("total".into(), Value::Int(total));
    DeviceData::from([(Section::Counters, section)])
}

fn find<'a>(out: &'a [Outbound], topic: &str) -> Option<&'a Outbound> {
    out.iter().find(|o| o.topic == topic)
}

fn replies(out: &[Outbound], h: &str) -> Vec<HostResponse> {
    let t = topic::host_resp(&host(h));
    out.iter()
        .filter(|o| o.topic == t)
        .map(|o| {
            assert!(!o.retain, "replies are not retained");
            Envelope::<HostResponse>::from_cbor(&o.payload, usize::MAX)
                .unwrap()
                .body
        })
        .collect()
}

fn acks(out: &[Outbound], s: &str) -> Vec<Ack> {
    let t = topic::dev_ack(&serial(s));
    let batches: Vec<_> = out.iter().filter(|o| o.topic == t).collect();
    assert!(
        batches.len() <= 1,
        "one ack batch per device per commit, got {}",
        batches.len()
    );
    batches
        .into_iter()
        .flat_map(|o| {
            Envelope::<AckBatch>::from_cbor(&o.payload, usize::MAX)
                .unwrap()
                .body
                .acks
        })
        .collect()
}

fn submitted_job(out: &[Outbound], h: &str) -> String {
    match &replies(out, h)[..] {
        [
            HostResponse {
                reply: HostReply::Submitted { job },
                ..
            },
        ] => job.id.clone(),
        other => panic!("expected one Submitted reply, got {other:?}"),
    }
}

fn view(out: &[Outbound], s: &str, j: &str) -> JobView {
    let o = find(out, &topic::fleet_job(&serial(s), &job(j))).expect("fleet view published");
    assert!(o.retain);
    Envelope::<JobView>::from_cbor(&o.payload, usize::MAX)
        .unwrap()
        .body
}

fn json_detail(out: &[Outbound], s: &str, j: &str) -> JobDetail {
    let o = find(out, &topic::json_fleet_job(&serial(s), &job(j))).expect("json view published");
    assert!(o.retain);
    serde_json::from_slice(&o.payload).unwrap()
}

fn list(core: &Core, all: bool, now: Timestamp) -> Vec<String> {
    let out = core
        .handle_batch(vec![host_msg("svc", 900, HostRequest::List { all })], now)
        .unwrap();
    match replies(&out, "svc").pop().map(|r| r.reply) {
        Some(HostReply::Jobs { jobs }) => jobs.into_iter().map(|j| j.id).collect(),
        other => panic!("expected Jobs, got {other:?}"),
    }
}

fn show(core: &Core, j: &str, now: Timestamp) -> HostReply {
    let out = core
        .handle_batch(
            vec![host_msg("svc", 901, HostRequest::Show { job: j.into() })],
            now,
        )
        .unwrap();
    replies(&out, "svc").pop().expect("a reply").reply
}

fn detail(core: &Core, j: &str) -> JobDetail {
    match show(core, j, t(23, 0)) {
        HostReply::Job { job } => *job,
        other => panic!("expected Job, got {other:?}"),
    }
}

#[test]
fn submission_publishes_order_and_views_then_replies() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let out = core
        .handle_batch(vec![submit("svc", 5, get_data("C1"))], t(9, 0))
        .unwrap();

    let order = find(&out, "dev/C1/jobs/J-000001").expect("order published");
    assert!(order.retain);
    let order: JobOrder = Envelope::from_cbor(&order.payload, LIMIT).unwrap().body;
    assert_eq!(
        order.spec,
        JobSpec::GetData {
            sections: vec![Section::Counters]
        }
    );
    assert_eq!(order.serial, serial("C1"));
    assert_eq!(order.instruction_time, t(9, 0));

    let v = view(&out, "C1", "J-000001");
    assert_eq!(
        (
            v.status,
            v.instruction.as_str(),
            v.data_type.as_str(),
            v.server.as_str(),
            v.host.as_str()
        ),
        (
            JobStatus::Queued,
            "GET DATA",
            "counters",
            "relay-test",
            "svc"
        )
    );
    let d = json_detail(&out, "C1", "J-000001");
    assert_eq!(d.view, v);
    assert_eq!(d.timeline.len(), 1);

    let r = replies(&out, "svc");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply_to, 5);
    assert_eq!(submitted_job(&out, "svc"), "J-000001");
    let reply_at = out.iter().position(|o| o.topic == "host/svc/resp").unwrap();
    let order_at = out
        .iter()
        .position(|o| o.topic == "dev/C1/jobs/J-000001")
        .unwrap();
    assert!(
        order_at < reply_at,
        "the order is in the router before the host hears of the job"
    );
    assert_eq!(core.commits(), 1);
}

#[test]
fn resent_submission_gets_the_same_job() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let first = core
        .handle_batch(vec![submit("svc", 5, get_data("C1"))], t(9, 0))
        .unwrap();
    // A resend in a later batch, and two copies in one batch.
    let again = core
        .handle_batch(vec![submit("svc", 5, get_data("C1"))], t(9, 1))
        .unwrap();
    let twice = core
        .handle_batch(
            vec![
                submit("svc", 6, get_data("C1")),
                submit("svc", 6, get_data("C1")),
            ],
            t(9, 2),
        )
        .unwrap();
    assert_eq!(submitted_job(&first, "svc"), "J-000001");
    assert_eq!(submitted_job(&again, "svc"), "J-000001");
    assert!(
        find(&again, "dev/C1/jobs/J-000001").is_none(),
        "a resend publishes nothing new"
    );
    let ids: Vec<_> = replies(&twice, "svc")
        .into_iter()
        .map(|r| match r.reply {
            HostReply::Submitted { job } => job.id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, ["J-000002", "J-000002"]);
    // The same msg id from another host is another submission.
    let other = core
        .handle_batch(vec![submit("svc2", 5, get_data("C1"))], t(9, 3))
        .unwrap();
    assert_eq!(submitted_job(&other, "svc2"), "J-000003");
    assert_eq!(
        list(&core, true, t(9, 4)),
        ["J-000003", "J-000002", "J-000001"]
    );
}

#[test]
fn device_update_flow_stores_status_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    core.handle_batch(vec![submit("svc", 1, get_data("C1"))], t(9, 0))
        .unwrap();

    let out = core
        .handle_batch(
            vec![update("C1", 1, "J-000001", JobStatus::Delivered, None)],
            t(9, 1),
        )
        .unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 1,
            outcome: AckOutcome::Stored
        }]
    );
    assert_eq!(view(&out, "C1", "J-000001").status, JobStatus::Delivered);
    assert!(
        find(&out, "dev/C1/jobs/J-000001").is_none(),
        "an open job keeps its order"
    );

    let out = core
        .handle_batch(
            vec![update("C1", 2, "J-000001", JobStatus::InProgress, None)],
            t(9, 2),
        )
        .unwrap();
    assert_eq!(view(&out, "C1", "J-000001").status, JobStatus::InProgress);

    let out = core
        .handle_batch(
            vec![update(
                "C1",
                3,
                "J-000001",
                JobStatus::Succeeded,
                Some(counters(1234)),
            )],
            t(9, 3),
        )
        .unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 3,
            outcome: AckOutcome::Stored
        }]
    );
    let cleared = find(&out, "dev/C1/jobs/J-000001").expect("order cleared");
    assert!(
        cleared.retain && cleared.payload.is_empty(),
        "an empty retained payload deletes the order"
    );
    let v = view(&out, "C1", "J-000001");
    assert_eq!((v.status, v.updated_at), (JobStatus::Succeeded, t(9, 3)));
    let d = json_detail(&out, "C1", "J-000001");
    assert_eq!(d.data, Some(counters(1234)));
    let json: serde_json::Value =
        serde_json::from_slice(&find(&out, "json/fleet/C1/jobs/J-000001").unwrap().payload)
            .unwrap();
    assert_eq!(json["status"], "succeeded");
    assert_eq!(json["data"]["counters"]["total"], 1234);

    let d = detail(&core, "J-000001");
    let statuses: Vec<_> = d.timeline.iter().map(|e| e.status).collect();
    assert_eq!(
        statuses,
        [
            JobStatus::Queued,
            JobStatus::Delivered,
            JobStatus::InProgress,
            JobStatus::Succeeded
        ]
    );
    assert_eq!(d.data, Some(counters(1234)));
    // The device was seen, so it has a state view even without a state message.
    let s = find(&out, "json/fleet/C1/state").expect("state view");
    let s: serde_json::Value = serde_json::from_slice(&s.payload).unwrap();
    assert_eq!(s["serial"], "C1");
}

#[test]
fn resent_update_is_acked_duplicate_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    core.handle_batch(vec![submit("svc", 1, get_data("C1"))], t(9, 0))
        .unwrap();
    core.handle_batch(
        vec![update(
            "C1",
            7,
            "J-000001",
            JobStatus::Succeeded,
            Some(counters(1)),
        )],
        t(9, 1),
    )
    .unwrap();

    let out = core
        .handle_batch(
            vec![update(
                "C1",
                7,
                "J-000001",
                JobStatus::Succeeded,
                Some(counters(999)),
            )],
            t(9, 2),
        )
        .unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 7,
            outcome: AckOutcome::Duplicate
        }]
    );
    assert!(
        find(&out, "fleet/C1/jobs/J-000001").is_none(),
        "nothing changed, nothing republished"
    );
    // A new message that does not move the job forward is harmless: stored, changes nothing.
    let out = core
        .handle_batch(
            vec![update("C1", 8, "J-000001", JobStatus::Delivered, None)],
            t(9, 3),
        )
        .unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 8,
            outcome: AckOutcome::Stored
        }]
    );

    let d = detail(&core, "J-000001");
    assert_eq!(d.timeline.len(), 2, "queued + succeeded: {:?}", d.timeline);
    assert_eq!(
        d.data,
        Some(counters(1)),
        "the resend's data was not stored"
    );
    assert_eq!(d.view.status, JobStatus::Succeeded);
}

#[test]
fn device_cannot_report_on_a_job_it_was_not_given() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    core.handle_batch(vec![submit("svc", 1, get_data("C1"))], t(9, 0))
        .unwrap();
    let out = core
        .handle_batch(
            vec![
                update("C2", 1, "J-000001", JobStatus::Succeeded, Some(counters(5))),
                update("C2", 2, "J-000099", JobStatus::Succeeded, None),
                update("C1", 3, "J-000001", JobStatus::Queued, None),
                update("C1", 4, "J-1", JobStatus::Delivered, None),
            ],
            t(9, 1),
        )
        .unwrap();
    let reasons = |s| reasons_in(&out, s);
    let c2 = reasons("C2");
    assert_eq!(c2[0], "job J-000001 is not addressed to C2");
    assert!(c2[1].contains("no job J-000099"), "{c2:?}");
    let c1 = reasons("C1");
    assert!(c1[0].contains("may not report status queued"), "{c1:?}");
    assert!(c1[1].contains("no job J-1"), "J-1 is not J-000001: {c1:?}");
    let d = detail(&core, "J-000001");
    assert_eq!(
        (d.view.status, d.timeline.len(), d.data),
        (JobStatus::Queued, 1, None)
    );
    // A refusal is remembered: the same message again (its ack lost) is refused again with the
    // same reason — never handled anew, never called a duplicate of something stored.
    let out = core
        .handle_batch(
            vec![update("C1", 3, "J-000001", JobStatus::Delivered, None)],
            t(9, 2),
        )
        .unwrap();
    assert_eq!(reasons_in(&out, "C1"), [c1[0].clone()]);
    assert_eq!(detail(&core, "J-000001").view.status, JobStatus::Queued);
    // And the refused ids do not hold the device's window back: the next ids are served.
    let out = core
        .handle_batch(
            vec![update("C1", 5, "J-000001", JobStatus::Delivered, None)],
            t(9, 3),
        )
        .unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 5,
            outcome: AckOutcome::Stored
        }]
    );
}

fn reasons_in(out: &[Outbound], serial: &str) -> Vec<String> {
    acks(out, serial)
        .into_iter()
        .map(|a| match a.outcome {
            AckOutcome::Rejected { reason } => reason,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn malformed_and_oversized_payloads_are_rejected_while_the_batch_goes_on() {
    #[derive(serde::Serialize)]
    struct Wrong {
        zzz: bool,
    }
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    core.handle_batch(vec![submit("svc", 1, get_data("C1"))], t(9, 0))
        .unwrap();
    let dev_job = topic::dev_up(&serial("C1"), UpKind::Job);
    let garbage = Inbound {
        topic: dev_job.clone(),
        payload: bytes::Bytes::from_static(&[0xff, 0x00, 0x13]),
    };
    let wrong_body = Inbound {
        topic: dev_job.clone(),
        payload: Envelope::new(7, t(9, 0), Wrong { zzz: true })
            .to_cbor()
            .unwrap()
            .into(),
    };
    let huge = JobUpdate {
        job: job("J-000001"),
        status: JobStatus::Failed,
        note: Some("x".repeat(70_000)),
        data: None,
        errors: Default::default(),
    };
    let huge = Inbound {
        topic: dev_job,
        payload: Envelope::new(8, t(9, 0), huge).to_cbor().unwrap().into(),
    };
    let huge_len = huge.payload.len();
    let good = update("C1", 9, "J-000001", JobStatus::Delivered, None);

    let out = core
        .handle_batch(vec![garbage, wrong_body, huge, good], t(9, 1))
        .unwrap();
    let a = acks(&out, "C1");
    assert_eq!(a.len(), 3, "the garbage has no id to ack: {a:?}");
    assert_eq!(a[0].id, 7);
    assert!(
        matches!(&a[0].outcome, AckOutcome::Rejected { reason } if reason.contains("not valid CBOR")),
        "{a:?}"
    );
    assert_eq!(a[1].id, 8);
    let want = format!("payload is {huge_len} bytes, over the limit of {LIMIT}");
    assert_eq!(a[1].outcome, AckOutcome::Rejected { reason: want });
    assert_eq!(
        a[2],
        Ack {
            inc: None,
            id: 9,
            outcome: AckOutcome::Stored
        }
    );
    let d = detail(&core, "J-000001");
    assert_eq!(
        d.view.status,
        JobStatus::Delivered,
        "the oversized 'failed' was not applied"
    );
    assert_eq!(d.timeline.len(), 2);
}

#[test]
fn bad_submission_is_recorded_as_rejected_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let out = core
        .handle_batch(vec![submit("svc", 1, get_data("C/1"))], t(9, 0))
        .unwrap();
    match &replies(&out, "svc")[..] {
        [
            HostResponse {
                reply_to: 1,
                reply: HostReply::Rejected { job, reason },
            },
        ] => {
            assert_eq!((job.id.as_str(), job.serial.as_str()), ("J-000001", "C/1"));
            assert_eq!(job.status, JobStatus::Rejected);
            assert!(reason.contains("contains '/'"), "{reason}");
            assert_eq!(job.reason.as_deref(), Some(reason.as_str()));
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(
        out.iter()
            .all(|o| !topic::is_device_topic(&o.topic) && !o.topic.contains("fleet/")),
        "{out:?}"
    );

    // A valid serial with a bad kind: no order, but views under the serial.
    let out = core.handle_batch(
        vec![submit(
            "svc",
            2,
            SubmitJob {
                kind: "reboot".into(),
                ..get_data("C1")
            },
        )],
        t(9, 1),
    );
    let out = out.unwrap();
    assert!(find(&out, "dev/C1/jobs/J-000002").is_none());
    let v = view(&out, "C1", "J-000002");
    assert_eq!(v.status, JobStatus::Rejected);
    assert!(
        v.reason
            .as_deref()
            .unwrap_or_default()
            .contains("job kind \"reboot\" is not known"),
        "{v:?}"
    );
    assert_eq!(v.instruction, "REBOOT");

    assert_eq!(
        list(&core, false, t(12, 0)),
        ["J-000002", "J-000001"],
        "rejections stay in the default list"
    );
    let d = detail(&core, "J-000001");
    assert_eq!(d.timeline[0].status, JobStatus::Rejected);
    assert!(d.timeline[0].note.is_some());
}

/// Republishing from the cluster's database (a node's start, and its catch-up after the bus
/// was lost) reads jobs and devices in chunks, a trip for many: it took three trips a job and
/// two a device, for every job the database has ever held, in one transaction that kept every
/// row it read locked. Counted with 12 and with 36 jobs and devices: 9 trips each (76 and 220
/// before).
#[test]
fn on_postgres_republishing_takes_the_same_trips_for_three_times_the_jobs_and_devices() {
    use std::sync::atomic::Ordering;
    if !crate::store::testing::on_postgres() {
        return;
    }
    let trips_for = |count: u32| {
        let dir = tempfile::tempdir().unwrap();
        let (store, trips) = crate::store::testing::postgres_store_counting_trips(dir.path());
        let core = Core::with_store(Arc::new(store), settings());
        for i in 0..count {
            let serial = format!("C{i}");
            core.handle_batch(
                vec![
                    state(&serial, 1, "Osaka"),
                    submit("svc", u64::from(i) * 2 + 1, get_data(&serial)),
                ],
                t(9, 0),
            )
            .unwrap();
        }
        let out = core.startup_publications().unwrap();
        // Again, counted: each statement is prepared on the connection the first time it runs.
        let before = trips.load(Ordering::SeqCst);
        let again = core.startup_publications().unwrap();
        let taken = trips.load(Ordering::SeqCst) - before;
        assert_eq!(again, out);
        assert_eq!(
            out.iter()
                .filter(|o| o.topic.starts_with("dev/") && o.topic.contains("/jobs/"))
                .count(),
            count as usize,
            "every open job's order"
        );
        assert_eq!(
            out.iter().filter(|o| o.topic.ends_with("/state")).count(),
            2 * count as usize,
            "every device's state and its JSON mirror"
        );
        taken
    };
    let (few, many) = (trips_for(12), trips_for(36));
    assert_eq!(few, many, "trips to republish 12 and 36 jobs and devices");
}

#[test]
fn reopened_store_republishes_open_orders_and_views_but_not_ended_orders() {
    let dir = tempfile::tempdir().unwrap();
    {
        let core = open(&dir);
        core.handle_batch(
            vec![
                state("C1", 1, "Osaka"),
                submit("svc", 1, get_data("C1")),
                submit("svc", 2, get_data("C1")),
            ],
            t(9, 0),
        )
        .unwrap();
        core.handle_batch(
            vec![update("C1", 2, "J-000002", JobStatus::Succeeded, None)],
            t(9, 1),
        )
        .unwrap();
        core.handle_batch(vec![submit("svc", 3, get_data("C/1"))], t(9, 2))
            .unwrap();
    }
    let core = open(&dir);
    let out = core.startup_publications().unwrap();
    assert!(
        out.iter().all(|o| o.retain),
        "startup publishes only retained messages"
    );
    let order = find(&out, "dev/C1/jobs/J-000001").expect("open job's order");
    let order: JobOrder = Envelope::from_cbor(&order.payload, LIMIT).unwrap().body;
    assert_eq!(order.job, job("J-000001"));
    assert!(
        find(&out, "dev/C1/jobs/J-000002").is_none(),
        "an ended job has no order"
    );
    assert_eq!(view(&out, "C1", "J-000001").status, JobStatus::Queued);
    assert_eq!(view(&out, "C1", "J-000001").site, "Osaka");
    assert_eq!(view(&out, "C1", "J-000002").status, JobStatus::Succeeded);
    assert!(find(&out, "fleet/C1/state").is_some() && find(&out, "json/fleet/C1/state").is_some());
    // Topics for the job with a bad serial cannot be built; nothing else names it.
    assert!(out.iter().all(|o| !o.topic.contains("J-000003")), "{out:?}");
    // The counter carries on.
    let out = core
        .handle_batch(vec![submit("svc", 4, get_data("C1"))], t(9, 3))
        .unwrap();
    assert_eq!(submitted_job(&out, "svc"), "J-000004");
}

#[test]
fn jobs_past_their_deadline_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let req = SubmitJob {
        deadline: Some("2026-11-26T10:00:00Z".into()),
        ..get_data("C1")
    };
    core.handle_batch(
        vec![submit("svc", 1, req), submit("svc", 2, get_data("C1"))],
        t(9, 0),
    )
    .unwrap();
    let commits = core.commits();

    assert!(core.expire(t(9, 59)).unwrap().is_empty());
    assert_eq!(core.commits(), commits, "nothing due, nothing committed");

    let out = core.expire(t(10, 0)).unwrap();
    let cleared = find(&out, "dev/C1/jobs/J-000001").expect("order cleared");
    assert!(cleared.retain && cleared.payload.is_empty());
    let v = view(&out, "C1", "J-000001");
    assert_eq!(v.status, JobStatus::TimedOut);
    assert!(
        v.reason
            .as_deref()
            .unwrap_or_default()
            .contains("deadline 2026-11-26T10:00:00"),
        "{v:?}"
    );
    assert!(
        find(&out, "fleet/C1/jobs/J-000002").is_none(),
        "the job without a deadline is untouched"
    );
    assert_eq!(core.commits(), commits + 1);
    assert!(
        core.expire(t(11, 0)).unwrap().is_empty(),
        "a job times out once"
    );

    // The device reporting late is harmless.
    let out = core
        .handle_batch(
            vec![update("C1", 1, "J-000001", JobStatus::Succeeded, None)],
            t(11, 1),
        )
        .unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 1,
            outcome: AckOutcome::Stored
        }]
    );
    assert_eq!(detail(&core, "J-000001").view.status, JobStatus::TimedOut);
    assert_eq!(
        list(&core, false, t(23, 0)),
        ["J-000002", "J-000001"],
        "timed-out jobs stay listed"
    );
}

#[test]
fn default_list_hides_old_successes_and_all_shows_everything() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    core.handle_batch(
        vec![
            submit("svc", 1, get_data("C1")),
            submit("svc", 2, get_data("C1")),
            submit("svc", 3, get_data("C1")),
            submit("svc", 4, get_data("bad serial")),
        ],
        t(9, 0),
    )
    .unwrap();
    core.handle_batch(
        vec![
            update("C1", 1, "J-000001", JobStatus::Succeeded, None),
            update("C1", 2, "J-000002", JobStatus::Failed, None),
        ],
        t(9, 0),
    )
    .unwrap();
    assert_eq!(
        list(&core, false, t(9, 30)),
        ["J-000004", "J-000003", "J-000002", "J-000001"]
    );
    assert_eq!(
        list(&core, false, t(10, 30)),
        ["J-000004", "J-000003", "J-000002"],
        "succeeded an hour ago"
    );
    assert_eq!(
        list(&core, true, t(10, 30)),
        ["J-000004", "J-000003", "J-000002", "J-000001"]
    );
    assert_eq!(
        detail(&core, "J-000002").view.reason.as_deref(),
        Some("the device reported a failure without a reason")
    );
}

#[test]
fn show_names_a_missing_job_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    assert_eq!(
        show(&core, "J-000042", t(9, 0)),
        HostReply::Error {
            reason: "no job J-000042 (list them with `host-agent jobs list --all`)".into()
        }
    );
    assert!(matches!(
        show(&core, "whatever", t(9, 0)),
        HostReply::Error { .. }
    ));
}

#[test]
fn undecodable_host_request_gets_an_error_reply() {
    #[derive(serde::Serialize)]
    struct Wrong {
        op: &'static str,
    }
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let bad_body = Envelope::new(
        33,
        t(9, 0),
        Wrong {
            op: "reboot-everything",
        },
    )
    .to_cbor()
    .unwrap();
    let msgs = vec![
        Inbound {
            topic: "host/svc/req".into(),
            payload: bad_body.into(),
        },
        Inbound {
            topic: "host/svc/req".into(),
            payload: bytes::Bytes::from_static(b"\xff"),
        },
    ];
    let out = core.handle_batch(msgs, t(9, 0)).unwrap();
    let r = replies(&out, "svc");
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].reply_to, 33);
    assert_eq!(r[1].reply_to, 0);
    assert!(
        r.iter()
            .all(|r| matches!(&r.reply, HostReply::Error { reason } if reason.contains("CBOR"))),
        "{r:?}"
    );
    assert_eq!(core.commits(), 0, "nothing stored, nothing committed");
}

#[test]
fn device_state_fills_in_the_site_of_earlier_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    core.handle_batch(vec![submit("svc", 1, get_data("C1"))], t(9, 0))
        .unwrap();
    assert_eq!(detail(&core, "J-000001").view.site, "");

    let out = core
        .handle_batch(vec![state("C1", 1, "Osaka 3F")], t(9, 5))
        .unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 1,
            outcome: AckOutcome::Stored
        }]
    );
    assert_eq!(view(&out, "C1", "J-000001").site, "Osaka 3F");
    let s = find(&out, "fleet/C1/state").expect("state view");
    let s: Envelope<DeviceState> = Envelope::from_cbor(&s.payload, LIMIT).unwrap();
    assert_eq!((s.body.site.as_str(), s.at), ("Osaka 3F", t(9, 5)));
    let j: serde_json::Value =
        serde_json::from_slice(&find(&out, "json/fleet/C1/state").unwrap().payload).unwrap();
    assert_eq!(j["site"], "Osaka 3F");
    assert_eq!(j["model"], "MX-1");
    assert_eq!(j["last_seen"], "2026-11-26T09:05:00Z");

    let out = core
        .handle_batch(vec![submit("svc", 2, get_data("C1"))], t(9, 6))
        .unwrap();
    assert_eq!(
        view(&out, "C1", "J-000002").site,
        "Osaka 3F",
        "later jobs take the reported site"
    );
    let out = core
        .handle_batch(vec![state("C1", 1, "Kobe")], t(9, 7))
        .unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 1,
            outcome: AckOutcome::Duplicate
        }]
    );
}

#[test]
fn a_repeated_site_skips_the_fill_but_a_damaged_device_record_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    core.handle_batch(vec![state("C1", 1, "Osaka 3F")], t(9, 0))
        .unwrap();
    // Submitted while the device's record cannot be read: the job has no site...
    {
        let mut txn = core.store.begin().unwrap();
        txn.put_raw_device(&serial("C1"), b"\xa1\x61x").unwrap();
        txn.commit().unwrap();
    }
    core.handle_batch(vec![submit("svc", 1, get_data("C1"))], t(9, 1))
        .unwrap();
    assert_eq!(detail(&core, "J-000001").view.site, "");
    // ...until the device repeats the site it had announced before the damage.
    let out = core
        .handle_batch(vec![state("C1", 2, "Osaka 3F")], t(9, 2))
        .unwrap();
    assert_eq!(view(&out, "C1", "J-000001").site, "Osaka 3F");

    // A job submitted now takes the site at once; repeating it changes no job.
    core.handle_batch(vec![submit("svc", 2, get_data("C1"))], t(9, 3))
        .unwrap();
    assert_eq!(detail(&core, "J-000002").view.site, "Osaka 3F");
    let out = core
        .handle_batch(vec![state("C1", 3, "Osaka 3F")], t(9, 4))
        .unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 3,
            outcome: AckOutcome::Stored
        }]
    );
    assert!(
        find(&out, &topic::fleet_job(&serial("C1"), &job("J-000002"))).is_none(),
        "no job view: nothing about the job changed"
    );
}

#[test]
fn held_acks_are_committed_and_a_restart_answers_the_resend_as_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    {
        let core = open_with(
            &dir,
            CoreSettings {
                hold_acks: true,
                ..settings()
            },
        );
        let out = core
            .handle_batch(vec![submit("svc", 1, get_data("C1"))], t(9, 0))
            .unwrap();
        assert!(
            find(&out, "dev/C1/jobs/J-000001").is_some(),
            "orders and views still go out"
        );
        assert!(
            replies(&out, "svc").is_empty(),
            "no reply while holding acks"
        );
        let out = core
            .handle_batch(
                vec![update(
                    "C1",
                    4,
                    "J-000001",
                    JobStatus::Succeeded,
                    Some(counters(7)),
                )],
                t(9, 1),
            )
            .unwrap();
        assert!(acks(&out, "C1").is_empty(), "no ack while holding acks");
        assert_eq!(view(&out, "C1", "J-000001").status, JobStatus::Succeeded);
    }
    let core = open(&dir);
    let out = core
        .handle_batch(
            vec![
                update("C1", 4, "J-000001", JobStatus::Succeeded, Some(counters(7))),
                submit("svc", 1, get_data("C1")),
            ],
            t(9, 2),
        )
        .unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 4,
            outcome: AckOutcome::Duplicate
        }]
    );
    assert_eq!(submitted_job(&out, "svc"), "J-000001");
    let d = detail(&core, "J-000001");
    assert_eq!((d.timeline.len(), d.data), (2, Some(counters(7))));
    assert_eq!(list(&core, true, t(9, 3)).len(), 1);
}

#[test]
fn a_corrupt_job_record_costs_only_its_own_messages() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    core.handle_batch(
        vec![
            submit("svc", 1, get_data("C1")),
            submit("svc", 2, get_data("C2")),
        ],
        t(9, 0),
    )
    .unwrap();
    {
        let mut txn = core.store.begin().unwrap();
        txn.put_raw_job(1, b"\xa1\x61x").unwrap();
        txn.commit().unwrap();
    }
    let out = core
        .handle_batch(
            vec![
                update("C1", 1, "J-000001", JobStatus::Delivered, None),
                update("C2", 1, "J-000002", JobStatus::Delivered, None),
                host_msg(
                    "svc",
                    3,
                    HostRequest::Show {
                        job: "J-000001".into(),
                    },
                ),
            ],
            t(9, 1),
        )
        .unwrap();
    assert!(
        acks(&out, "C1").is_empty(),
        "no ack: the device resends once the record is repaired"
    );
    assert_eq!(
        acks(&out, "C2"),
        [Ack {
            inc: None,
            id: 1,
            outcome: AckOutcome::Stored
        }]
    );
    match &replies(&out, "svc")[..] {
        [
            HostResponse {
                reply: HostReply::Error { reason },
                ..
            },
        ] => {
            assert!(reason.contains("table jobs, key J-000001"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Startup skips the bad record and republishes the rest.
    let out = core.startup_publications().unwrap();
    assert!(find(&out, "dev/C2/jobs/J-000002").is_some());
    assert!(find(&out, "dev/C1/jobs/J-000001").is_none());
}

#[test]
fn messages_on_other_topics_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let msgs = vec![
        Inbound {
            topic: "fleet/C1/state".into(),
            payload: bytes::Bytes::new(),
        },
        Inbound {
            topic: "nonsense".into(),
            payload: bytes::Bytes::new(),
        },
    ];
    assert!(core.handle_batch(msgs, t(9, 0)).unwrap().is_empty());
}

/// Everything the core publishes, into one channel, in order: the core's tests stand in for the
/// relay's switch.
struct ChannelOutlet(mpsc::Sender<Outbound>);

impl Outlet for ChannelOutlet {
    async fn publish(&self, batch: Vec<Outbound>) -> Result<(), OutletClosed> {
        for out in batch {
            self.0.send(out).await.map_err(|_| OutletClosed)?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_commits_many_messages_in_few_transactions() {
    const DEVICES: u64 = 10;
    const PER_DEVICE: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let core = Arc::new(open(&dir));
    let (in_tx, in_rx) = mpsc::channel(1024);
    let (out_tx, mut out_rx) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(
        Arc::clone(&core),
        in_rx,
        ChannelOutlet(out_tx),
        mpsc::unbounded_channel().1,
        CommitWindow::default(),
        stop.clone(),
    ));

    let producer = tokio::spawn(async move {
        for id in 1..=PER_DEVICE {
            for d in 0..DEVICES {
                in_tx
                    .send(state(&format!("C{d}"), id, "Osaka"))
                    .await
                    .unwrap();
            }
        }
    });
    let total = DEVICES * PER_DEVICE;
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked < total {
        let msg = tokio::time::timeout_at(deadline, out_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {acked} of {total} messages acked within 60 s"))
            .expect("core stopped early");
        if msg.topic.ends_with("/ack") {
            let batch: Envelope<AckBatch> = Envelope::from_cbor(&msg.payload, usize::MAX).unwrap();
            assert!(
                batch
                    .body
                    .acks
                    .iter()
                    .all(|a| a.outcome == AckOutcome::Stored)
            );
            acked += batch.body.acks.len() as u64;
        }
    }
    producer.await.unwrap();
    let commits = core.commits();
    assert!(
        commits >= 1 && commits < total,
        "{commits} commits for {total} messages"
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("run stops when cancelled")
        .unwrap()
        .unwrap();
}

/// Waits (deadline) until `n` devices' messages have been acked; returns the acked count.
async fn acked_within(out_rx: &mut mpsc::Receiver<Outbound>, n: usize, within: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    let mut acked = 0;
    while acked < n {
        let Ok(msg) = tokio::time::timeout_at(deadline, out_rx.recv()).await else {
            break;
        };
        let msg = msg.expect("core stopped early");
        if msg.topic.ends_with("/ack") {
            let batch: Envelope<AckBatch> = Envelope::from_cbor(&msg.payload, usize::MAX).unwrap();
            acked += batch.body.acks.len();
        }
    }
    acked
}

/// Starts [`run`] with `window` on a fresh store.
fn run_with_window(
    window: CommitWindow,
) -> (
    Arc<Core>,
    mpsc::Sender<Inbound>,
    mpsc::Receiver<Outbound>,
    CancellationToken,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let core = Arc::new(open(&dir));
    let (in_tx, in_rx) = mpsc::channel(1024);
    let (out_tx, out_rx) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    tokio::spawn(run(
        Arc::clone(&core),
        in_rx,
        ChannelOutlet(out_tx),
        mpsc::unbounded_channel().1,
        window,
        stop.clone(),
    ));
    (core, in_tx, out_rx, stop, dir)
}

#[tokio::test]
async fn an_idle_relays_lone_message_does_not_wait_for_the_commit_window() {
    // A window far longer than the deadline: an ack within the deadline shows nothing waited.
    let (core, in_tx, mut out_rx, stop, _dir) =
        run_with_window(CommitWindow::new(Duration::from_secs(60)));
    in_tx.send(state("C1", 1, "Osaka")).await.unwrap();
    assert_eq!(
        acked_within(&mut out_rx, 1, Duration::from_secs(20)).await,
        1
    );
    assert_eq!(core.commits(), 1);
    stop.cancel();
}

#[tokio::test]
async fn a_busy_relay_commits_paced_messages_together_within_its_window() {
    const PACED: u64 = 6;
    let (core, in_tx, mut out_rx, stop, _dir) =
        run_with_window(CommitWindow::new(Duration::from_millis(800)));
    in_tx.send(state("C0", 1, "Osaka")).await.unwrap();
    assert_eq!(
        acked_within(&mut out_rx, 1, Duration::from_secs(20)).await,
        1
    );
    let before = core.commits();
    // The relay has just committed, so it is busy: messages 20 ms apart, each of which would
    // otherwise be a commit of its own, wait for one another.
    for d in 1..=PACED {
        in_tx
            .send(state(&format!("C{d}"), 1, "Osaka"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        acked_within(&mut out_rx, PACED as usize, Duration::from_secs(20)).await,
        PACED as usize
    );
    let commits = core.commits() - before;
    assert!(
        commits < PACED / 2,
        "{commits} commits for {PACED} paced messages inside one window"
    );
    stop.cancel();
}

#[tokio::test]
async fn an_urgent_message_ends_a_busy_relays_commit_window_at_once() {
    // A window far longer than the deadline: a commit within the deadline shows it was cut short.
    let window = CommitWindow::new(Duration::from_secs(60));
    let urgent = window.urgent.clone();
    let (core, in_tx, mut out_rx, stop, _dir) = run_with_window(window);
    in_tx.send(state("C0", 1, "Osaka")).await.unwrap();
    assert_eq!(
        acked_within(&mut out_rx, 1, Duration::from_secs(20)).await,
        1
    );
    // Busy now: this batch waits in its window until the switch says an alarm is queued.
    in_tx.send(state("C1", 1, "Osaka")).await.unwrap();
    urgent.notify_one();
    assert_eq!(
        acked_within(&mut out_rx, 1, Duration::from_secs(20)).await,
        1
    );
    assert_eq!(core.commits(), 2);
    stop.cancel();
}

/// The core's loop on a store in `dir`: its core, the queue of messages into it, what it
/// publishes, the presence channel into it, and the token that stops it.
fn run_with_presence(
    dir: &tempfile::TempDir,
) -> (
    Arc<Core>,
    mpsc::Sender<Inbound>,
    mpsc::Receiver<Outbound>,
    mpsc::UnboundedSender<SessionEvent>,
    CancellationToken,
) {
    let core = Arc::new(open(dir));
    let (in_tx, in_rx) = mpsc::channel(8);
    let (out_tx, out_rx) = mpsc::channel(4096);
    let (presence_tx, presence_rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    tokio::spawn(run(
        Arc::clone(&core),
        in_rx,
        ChannelOutlet(out_tx),
        presence_rx,
        CommitWindow::default(),
        stop.clone(),
    ));
    (core, in_tx, out_rx, presence_tx, stop)
}

/// Device `C{d}`'s session opening.
fn online(d: usize) -> SessionEvent {
    SessionEvent::Device(PresenceEvent {
        serial: serial(&format!("C{d}")),
        online: true,
    })
}

/// Sessions opening in numbers (a restarted relay's fleet coming back) share presence commits —
/// at most one per presence window — and every device's state view still says online; a lone
/// session on a quiet relay is recorded at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_opening_in_numbers_share_presence_commits() {
    const DEVICES: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let (core, _in_tx, mut out_rx, presence_tx, stop) = run_with_presence(&dir);
    // Waits (deadline) until every device in `devices` has a state view saying online.
    async fn online_views(out_rx: &mut mpsc::Receiver<Outbound>, devices: std::ops::Range<usize>) {
        let mut waiting: std::collections::BTreeSet<String> = devices
            .map(|d| topic::fleet_state(&serial(&format!("C{d}"))))
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !waiting.is_empty() {
            let msg = tokio::time::timeout_at(deadline, out_rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no online view within 30 s for {waiting:?}"))
                .expect("core stopped early");
            if waiting.contains(&msg.topic) {
                let view =
                    Envelope::<protocol::presence::StateView>::from_cbor(&msg.payload, usize::MAX)
                        .unwrap()
                        .body;
                assert_eq!(
                    view.presence,
                    protocol::presence::Presence::Online,
                    "{}",
                    msg.topic
                );
                waiting.remove(&msg.topic);
            }
        }
    }

    presence_tx.send(online(0)).unwrap();
    online_views(&mut out_rx, 0..1).await;
    assert_eq!(core.commits(), 1, "a lone session is recorded at once");

    // One session every 2 ms, each of which would otherwise be a commit of its own.
    let started = std::time::Instant::now();
    for d in 1..DEVICES {
        presence_tx.send(online(d)).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    online_views(&mut out_rx, 1..DEVICES).await;
    let took = started.elapsed();
    let commits = core.commits() - 1;
    let most = took.as_micros() / super::run::PRESENCE_WINDOW.as_micros() + 2;
    assert!(
        commits as u128 <= most,
        "{commits} presence commits in {took:?} for {} sessions: more than one per window",
        DEVICES - 1
    );
    assert!(
        (commits as usize) < DEVICES - 1,
        "{commits} commits for {} sessions",
        DEVICES - 1
    );
    stop.cancel();
}

/// A host's request is answered after every session that opened before it came: what presence
/// the window holds is committed first, so `devices list` (and a rollout's selection) misses
/// none of a fleet that is coming up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_request_sees_every_session_opened_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_core, in_tx, mut out_rx, presence_tx, stop) = run_with_presence(&dir);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // A lone session is recorded at once; those right after it fall in its window.
    presence_tx.send(online(0)).unwrap();
    let c0 = topic::fleet_state(&serial("C0"));
    while tokio::time::timeout_at(deadline, out_rx.recv())
        .await
        .expect("C0's view within 30 s")
        .expect("core running")
        .topic
        != c0
    {}
    for d in 1..=5 {
        presence_tx.send(online(d)).unwrap();
    }
    in_tx
        .send(host_msg("svc", 1, HostRequest::Devices { targets: vec![] }))
        .await
        .unwrap();
    let reply = topic::host_resp(&host("svc"));
    let answer = loop {
        let msg = tokio::time::timeout_at(deadline, out_rx.recv())
            .await
            .expect("an answer within 30 s")
            .expect("core running");
        if msg.topic == reply {
            break msg;
        }
    };
    let listed: Vec<String> = match replies(&[answer], "svc").remove(0).reply {
        HostReply::Devices { devices } => {
            devices.into_iter().map(|d| d.serial.to_string()).collect()
        }
        other => panic!("not a device list: {other:?}"),
    };
    assert_eq!(listed, ["C0", "C1", "C2", "C3", "C4", "C5"]);
    stop.cancel();
}

#[tokio::test]
async fn run_returns_when_inbound_closes() {
    let dir = tempfile::tempdir().unwrap();
    let core = Arc::new(open(&dir));
    let (in_tx, in_rx) = mpsc::channel(8);
    let (out_tx, mut out_rx) = mpsc::channel(64);
    in_tx.send(submit("svc", 1, get_data("C1"))).await.unwrap();
    drop(in_tx);
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        run(
            core,
            in_rx,
            ChannelOutlet(out_tx),
            mpsc::unbounded_channel().1,
            CommitWindow::default(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("run returns once inbound is closed and drained");
    result.unwrap();
    let mut topics = Vec::new();
    while let Ok(msg) = out_rx.try_recv() {
        topics.push(msg.topic);
    }
    assert!(topics.contains(&"host/svc/resp".to_string()), "{topics:?}");
}

/// The relay sizes its per-session maps for the devices it expects back: every device of its
/// store, counted by the republish that runs before any session; on a cluster node, whose store
/// holds the whole cluster's fleet, only the devices whose sessions the node held.
#[test]
fn startup_counts_the_devices_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    {
        let core = open(&dir);
        let states = (0..7)
            .map(|i| state(&format!("K{i}"), 1, "Kyoto"))
            .collect();
        core.handle_batch(states, t(9, 0)).unwrap();
    }
    let core = open(&dir);
    assert_eq!(core.known_devices(), 0, "nothing read yet");
    core.startup_publications().unwrap();
    assert_eq!(core.known_devices(), 7);
    let online = core.alerts.online.lock().unwrap();
    assert!(
        online.capacity() >= 7,
        "room for each: {}",
        online.capacity()
    );
    assert!(online.is_empty(), "room, not sessions");
    drop(online);
    drop(core);

    // Two of the seven were online at node N1 when it stopped, one at N2.
    let node = |name: &str| open_node(&dir, name);
    let at = |name: &str, serials: &[&str]| {
        let events = serials
            .iter()
            .map(|s| PresenceEvent {
                serial: serial(s),
                online: true,
            })
            .collect();
        node(name).presence_events(events, t(9, 1)).unwrap();
    };
    at("N1", &["K0", "K1"]);
    at("N2", &["K2"]);
    let n1 = node("N1");
    n1.presence_startup().unwrap();
    n1.startup_publications().unwrap();
    assert_eq!(n1.known_devices(), 2, "N1's own, not the cluster's seven");
}

/// A device's persistent-session filters are recorded with its presence, the same filters again
/// cost no change, a clean session's empty list forgets them, and a restarted relay reads back
/// those that remain — on a cluster node, only those of the devices it held.
#[test]
fn persistent_session_filters_are_recorded_and_read_back_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let filters = |s: &str| vec![format!("dev/{s}/jobs/+"), format!("dev/{s}/ack")];
    let session = |s: &str, filters: Vec<String>| SessionEvent::SessionFilters {
        serial: serial(s),
        filters,
    };
    let on = |s: &str| {
        SessionEvent::Device(PresenceEvent {
            serial: serial(s),
            online: true,
        })
    };
    {
        let core = open(&dir);
        core.session_events(
            vec![
                on("P1"),
                session("P1", filters("P1")),
                on("P2"),
                session("P2", filters("P2")),
                on("P3"),
                session("P3", filters("P3")),
                session("P3", Vec::new()),
            ],
            t(9, 0),
        )
        .unwrap();
        let txn = core.store().begin().unwrap();
        assert_eq!(
            txn.presence(&serial("P1"))
                .unwrap()
                .unwrap()
                .session_filters,
            filters("P1")
        );
        assert!(
            txn.presence(&serial("P3"))
                .unwrap()
                .unwrap()
                .session_filters
                .is_empty(),
            "the last change wins: P3 ended clean"
        );
    }
    let core = open(&dir);
    core.startup_publications().unwrap();
    let mut kept = core.take_stored_sessions();
    kept.sort();
    assert_eq!(
        kept,
        [(serial("P1"), filters("P1")), (serial("P2"), filters("P2"))]
    );
    assert!(core.take_stored_sessions().is_empty(), "taken once");
    drop(core);

    // A cluster node resumes the sessions of the devices it held when it stopped.
    let n1 = open_node(&dir, "N1");
    n1.session_events(vec![on("P2"), session("P2", filters("P2"))], t(9, 1))
        .unwrap();
    drop(n1);
    let n1 = open_node(&dir, "N1");
    n1.presence_startup().unwrap();
    n1.startup_publications().unwrap();
    assert_eq!(
        n1.take_stored_sessions(),
        [(serial("P2"), filters("P2"))],
        "N1 held P2 only"
    );
}
