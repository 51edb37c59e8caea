//! The job kinds beyond get-data through the core: update-data with the relay-side merge, artifact
//! uploads, firmware submissions and fetches, cancel, defaults and retention. Same harness as the
//! parent module: real redb in a temp dir, payloads built from the protocol types.

use std::collections::BTreeMap;

use protocol::artifact::{ArtifactId, ArtifactInfo, ArtifactRef, Chunk, FetchRequest};
use protocol::device::{MergeRequest, Merged};
use protocol::job::MergeAt;
use sha2::{Digest, Sha256};

use super::*;

const SIGNATURE: &str = "5151515151515151515151515151515151515151515151515151515151515151\
                         5151515151515151515151515151515151515151515151515151515151515151";

fn section(pairs: &[(&str, Value)]) -> SectionData {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn update_data(s: &str, merge: &str, values: &[(&str, Value)]) -> SubmitJob {
    SubmitJob {
        serial: s.into(),
        kind: "update-data".into(),
        values: values
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        merge: Some(merge.into()),
        ..Default::default()
    }
}

fn firmware(s: &str, artifact: &str) -> SubmitJob {
    SubmitJob {
        serial: s.into(),
        kind: "firmware".into(),
        artifact: Some(artifact.into()),
        ..Default::default()
    }
}

fn report(
    s: &str,
    id: MsgId,
    j: &str,
    status: JobStatus,
    note: Option<&str>,
    data: Option<DeviceData>,
    errors: &[(&str, &str)],
) -> Inbound {
    let body = JobUpdate {
        job: job(j),
        status,
        note: note.map(str::to_owned),
        data,
        errors: errors
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    };
    let payload = Envelope::new(id, t(9, 0), body).to_cbor().unwrap();
    Inbound {
        topic: topic::dev_up(&serial(s), UpKind::Job),
        payload: payload.into(),
    }
}

fn merge_request(s: &str, id: MsgId, j: &str, current: DeviceData) -> Inbound {
    let body = MergeRequest {
        job: job(j),
        current,
    };
    let payload = Envelope::new(id, t(9, 0), body).to_cbor().unwrap();
    Inbound {
        topic: topic::dev_up(&serial(s), UpKind::Merge),
        payload: payload.into(),
    }
}

fn fetch(s: &str, j: &str, artifact: &ArtifactId, chunks: &[u32]) -> Inbound {
    let body = FetchRequest {
        job: job(j),
        artifact: artifact.clone(),
        chunks: chunks.to_vec(),
    };
    let payload = Envelope::new(0, t(9, 0), body).to_cbor().unwrap();
    Inbound {
        topic: topic::dev_up(&serial(s), UpKind::Fetch),
        payload: payload.into(),
    }
}

/// The one reply to host `h` in `out`.
fn reply(out: &[Outbound], h: &str) -> HostReply {
    match &replies(out, h)[..] {
        [r] => r.reply.clone(),
        other => panic!("expected one reply, got {other:?}"),
    }
}

fn ask(core: &Core, id: MsgId, req: HostRequest, now: Timestamp) -> HostReply {
    let out = core
        .handle_batch(vec![host_msg("svc", id, req)], now)
        .unwrap();
    reply(&out, "svc")
}

fn error_text(r: HostReply) -> String {
    match r {
        HostReply::Error { reason } => reason,
        other => panic!("expected Error, got {other:?}"),
    }
}

fn upload_info(r: HostReply) -> ArtifactInfo {
    match r {
        HostReply::Upload { artifact } => artifact,
        other => panic!("expected Upload, got {other:?}"),
    }
}

fn rejected_reason(out: &[Outbound], h: &str) -> String {
    match reply(out, h) {
        HostReply::Rejected { reason, job } => {
            assert_eq!(job.status, JobStatus::Rejected);
            reason
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

fn order_of(out: &[Outbound], s: &str, j: &str) -> JobOrder {
    let o = find(out, &topic::dev_job(&serial(s), &job(j))).expect("order published");
    assert!(o.retain && !o.payload.is_empty());
    Envelope::from_cbor(&o.payload, LIMIT).unwrap().body
}

fn merged_of(out: &[Outbound], s: &str, j: &str) -> Option<Merged> {
    let o = find(out, &topic::dev_merged(&serial(s), &job(j)))?;
    assert!(o.retain, "merged data is retained");
    if o.payload.is_empty() {
        return None;
    }
    Some(Envelope::from_cbor(&o.payload, LIMIT).unwrap().body)
}

fn is_cleared(out: &[Outbound], topic: &str) -> bool {
    find(out, topic).is_some_and(|o| o.retain && o.payload.is_empty())
}

fn ack_outcomes(out: &[Outbound], s: &str) -> Vec<AckOutcome> {
    acks(out, s).into_iter().map(|a| a.outcome).collect()
}

fn blobs(out: &[Outbound], s: &str, artifact: &ArtifactId) -> Vec<Chunk> {
    let t = topic::dev_blob(&serial(s), artifact);
    out.iter()
        .filter(|o| o.topic == t)
        .map(|o| {
            assert!(!o.retain, "chunks are not retained");
            let env: Envelope<Chunk> = Envelope::from_cbor(&o.payload, LIMIT).unwrap();
            assert_eq!(env.id, 0);
            env.body
        })
        .collect()
}

/// An artifact as a host would upload it.
struct Image {
    bytes: Vec<u8>,
    id: ArtifactId,
    version: String,
    chunk_size: u32,
}

impl Image {
    fn new(len: usize, seed: u8, version: &str, chunk_size: u32) -> Image {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        Image {
            id: ArtifactId::from_digest(&digest),
            bytes,
            version: version.into(),
            chunk_size,
        }
    }

    fn chunks(&self) -> u32 {
        self.bytes.len().div_ceil(self.chunk_size as usize) as u32
    }

    fn begin(&self) -> HostRequest {
        HostRequest::UploadBegin {
            artifact: self.id.to_string(),
            version: self.version.clone(),
            size: self.bytes.len() as u64,
            chunk_size: self.chunk_size,
            signature: SIGNATURE.into(),
        }
    }

    fn data(&self, index: u32) -> Vec<u8> {
        self.bytes
            .chunks(self.chunk_size as usize)
            .nth(index as usize)
            .unwrap()
            .to_vec()
    }

    fn chunk(&self, index: u32) -> HostRequest {
        self.chunk_with(index, self.data(index))
    }

    fn chunk_with(&self, index: u32, data: Vec<u8>) -> HostRequest {
        HostRequest::UploadChunk {
            chunk: Chunk {
                artifact: self.id.clone(),
                index,
                data,
            },
        }
    }

    /// Uploads the whole image in one go; returns the final info.
    fn upload(&self, core: &Core, first_id: MsgId, now: Timestamp) -> ArtifactInfo {
        upload_info(ask(core, first_id, self.begin(), now));
        let mut info = None;
        for i in 0..self.chunks() {
            info = Some(upload_info(ask(
                core,
                first_id + 1 + MsgId::from(i),
                self.chunk(i),
                now,
            )));
        }
        let info = info.expect("at least one chunk");
        assert!(info.complete, "{info:?}");
        info
    }
}

#[test]
fn broker_merge_publishes_retained_merged_data_and_clears_it_when_the_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let req = update_data(
        "C1",
        "broker",
        &[
            ("adjustment.density", Value::Int(7)),
            ("call-settings.every_counts", Value::Int(500)),
        ],
    );
    let out = core
        .handle_batch(vec![submit("svc", 1, req)], t(9, 0))
        .unwrap();
    assert_eq!(submitted_job(&out, "svc"), "J-000001");
    let order = order_of(&out, "C1", "J-000001");
    assert!(matches!(
        order.spec,
        JobSpec::UpdateData {
            merge: MergeAt::Broker,
            ..
        }
    ));
    let v = view(&out, "C1", "J-000001");
    assert_eq!(
        (v.instruction.as_str(), v.data_type.as_str()),
        ("UPDATE DATA", "call-settings,adjustment")
    );

    // S211–S213: in-progress, then the current values of the job's sections.
    let current = DeviceData::from([
        (
            Section::Adjustment,
            section(&[
                ("density", Value::Int(5)),
                ("toner_save", Value::Bool(false)),
            ]),
        ),
        (
            Section::CallSettings,
            section(&[("every_counts", Value::Int(1000)), ("at", "22:00".into())]),
        ),
    ]);
    let out = core
        .handle_batch(
            vec![
                update("C1", 1, "J-000001", JobStatus::InProgress, None),
                merge_request("C1", 2, "J-000001", current.clone()),
            ],
            t(9, 1),
        )
        .unwrap();
    assert_eq!(
        ack_outcomes(&out, "C1"),
        [AckOutcome::Stored, AckOutcome::Stored]
    );
    let merged = merged_of(&out, "C1", "J-000001").expect("merged data published");
    let want = DeviceData::from([
        (
            Section::Adjustment,
            section(&[
                ("density", Value::Int(7)),
                ("toner_save", Value::Bool(false)),
            ]),
        ),
        (
            Section::CallSettings,
            section(&[("every_counts", Value::Int(500)), ("at", "22:00".into())]),
        ),
    ]);
    assert_eq!(
        merged,
        Merged {
            job: job("J-000001"),
            data: want.clone()
        }
    );
    let merged_at = out
        .iter()
        .position(|o| o.topic == "dev/C1/merged/J-000001")
        .unwrap();
    let ack_at = out.iter().position(|o| o.topic == "dev/C1/ack").unwrap();
    assert!(
        merged_at < ack_at,
        "the merged data is retained before the device hears its ack"
    );
    let d = json_detail(&out, "C1", "J-000001");
    let last = d.timeline.last().unwrap();
    assert_eq!(
        (last.status, last.note.as_deref()),
        (JobStatus::InProgress, Some("merged at the relay"))
    );

    // A resend of the same request is a duplicate and leaves the retained data alone.
    let out = core
        .handle_batch(
            vec![merge_request("C1", 2, "J-000001", current.clone())],
            t(9, 2),
        )
        .unwrap();
    assert_eq!(ack_outcomes(&out, "C1"), [AckOutcome::Duplicate]);
    assert!(
        find(&out, "dev/C1/merged/J-000001").is_none(),
        "no new merged message, and no clearing"
    );
    // A new request for a job already merged gets the stored result again, not a second merge.
    let mut other_current = current;
    other_current.insert(Section::Adjustment, section(&[("density", Value::Int(1))]));
    let out = core
        .handle_batch(
            vec![merge_request("C1", 3, "J-000001", other_current)],
            t(9, 3),
        )
        .unwrap();
    assert_eq!(ack_outcomes(&out, "C1"), [AckOutcome::Stored]);
    assert_eq!(merged_of(&out, "C1", "J-000001").unwrap().data, want);
    let events = detail(&core, "J-000001").timeline;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.note.as_deref() == Some("merged at the relay"))
            .count(),
        1
    );

    // S218: succeeded with the applied sections; the order and the merged data are cleared.
    let out = core
        .handle_batch(
            vec![report(
                "C1",
                4,
                "J-000001",
                JobStatus::Succeeded,
                Some("applied and verified"),
                Some(want.clone()),
                &[],
            )],
            t(9, 4),
        )
        .unwrap();
    assert!(is_cleared(&out, "dev/C1/jobs/J-000001"));
    assert!(is_cleared(&out, "dev/C1/merged/J-000001"));
    let d = detail(&core, "J-000001");
    assert_eq!((d.view.status, d.data), (JobStatus::Succeeded, Some(want)));
}

#[test]
fn merge_requests_for_jobs_that_are_not_open_broker_merges_of_that_device_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let values = [("adjustment.density", Value::Int(7))];
    core.handle_batch(
        vec![
            submit("svc", 1, update_data("C1", "broker", &values)),
            submit("svc", 2, update_data("C1", "device", &values)),
            submit("svc", 3, get_data("C1")),
            submit("svc", 4, update_data("C1", "broker", &values)),
        ],
        t(9, 0),
    )
    .unwrap();
    core.handle_batch(
        vec![update("C1", 1, "J-000004", JobStatus::Failed, None)],
        t(9, 1),
    )
    .unwrap();
    let cur = DeviceData::new;
    let out = core
        .handle_batch(
            vec![
                merge_request("C2", 1, "J-000001", cur()),
                merge_request("C1", 2, "J-000002", cur()),
                merge_request("C1", 3, "J-000003", cur()),
                merge_request("C1", 4, "J-000004", cur()),
                merge_request("C1", 5, "J-000099", cur()),
            ],
            t(9, 2),
        )
        .unwrap();
    let reasons = |s| -> Vec<String> {
        ack_outcomes(&out, s)
            .into_iter()
            .map(|o| match o {
                AckOutcome::Rejected { reason } => reason,
                other => panic!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(reasons("C2"), ["job J-000001 is not addressed to C2"]);
    let c1 = reasons("C1");
    assert!(c1[0].contains("merged on the device"), "{c1:?}");
    assert!(c1[1].contains("is a get-data job"), "{c1:?}");
    assert!(c1[2].contains("already ended (failed)"), "{c1:?}");
    assert!(c1[3].contains("no job J-000099"), "{c1:?}");
    assert!(
        out.iter().all(|o| !o.topic.contains("/merged/")),
        "nothing merged: {out:?}"
    );
}

#[test]
fn a_refused_update_fails_with_the_per_key_reasons_and_stays_listed() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let values = [("adjustment.density", Value::Int(12))];
    core.handle_batch(
        vec![
            submit("svc", 1, update_data("C1", "device", &values)),
            submit("svc", 2, update_data("C1", "device", &values)),
            submit("svc", 3, update_data("C1", "device", &values)),
        ],
        t(9, 0),
    )
    .unwrap();
    let errors = [
        ("adjustment.density", "12 is out of range 1..=9"),
        ("adjustment.nope", "unknown key"),
    ];
    core.handle_batch(
        vec![
            // The note already lists the refusals: it is the reason as it stands.
            report(
                "C1",
                1,
                "J-000001",
                JobStatus::Failed,
                Some("refused: adjustment.density: 12 is out of range 1..=9; adjustment.nope: unknown key"),
                None,
                &errors,
            ),
            // A note that does not: the refusals are added.
            report("C1", 2, "J-000002", JobStatus::Failed, Some("refused 2 values"), None, &errors),
            // No note at all.
            report("C1", 3, "J-000003", JobStatus::Failed, None, None, &errors[..1]),
        ],
        t(9, 1),
    )
    .unwrap();
    let reason = |j| detail(&core, j).view.reason.unwrap();
    assert_eq!(
        reason("J-000001"),
        "refused: adjustment.density: 12 is out of range 1..=9; adjustment.nope: unknown key"
    );
    assert_eq!(
        reason("J-000002"),
        "refused 2 values (adjustment.density: 12 is out of range 1..=9; adjustment.nope: unknown key)"
    );
    assert_eq!(
        reason("J-000003"),
        "refused: adjustment.density: 12 is out of range 1..=9"
    );
    let d = detail(&core, "J-000002");
    assert_eq!(d.timeline.last().unwrap().note, d.view.reason);
    // Retention: failed jobs stay in the default list long after.
    assert_eq!(
        list(&core, false, t(23, 0)),
        ["J-000003", "J-000002", "J-000001"]
    );
}

#[test]
fn retention_hides_old_succeeded_jobs_of_every_kind_but_keeps_failed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let set_schedule = SubmitJob {
        serial: "C1".into(),
        kind: "set-schedule".into(),
        mode: Some("periodic".into()),
        interval_secs: Some(900),
        ..Default::default()
    };
    let values = [("adjustment.density", Value::Int(3))];
    core.handle_batch(
        vec![
            submit("svc", 1, set_schedule),
            submit("svc", 2, update_data("C1", "device", &values)),
            submit("svc", 3, update_data("C1", "device", &values)),
        ],
        t(9, 0),
    )
    .unwrap();
    core.handle_batch(
        vec![
            update("C1", 1, "J-000001", JobStatus::Succeeded, None),
            update("C1", 2, "J-000002", JobStatus::Succeeded, None),
            update("C1", 3, "J-000003", JobStatus::Failed, None),
        ],
        t(10, 0),
    )
    .unwrap();
    // finished_visible is an hour in these settings.
    assert_eq!(
        list(&core, false, t(10, 59)),
        ["J-000003", "J-000002", "J-000001"]
    );
    assert_eq!(list(&core, false, t(11, 0)), ["J-000003"]);
    assert_eq!(list(&core, true, t(11, 0)).len(), 3);
    let d = detail(&core, "J-000001");
    assert_eq!(
        (d.view.instruction.as_str(), d.view.data_type.as_str()),
        ("SET SCHEDULE", "schedule (periodic)")
    );
}

#[test]
fn an_upload_resumes_from_what_the_relay_holds_and_completes_on_a_good_digest() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let img = Image::new(10_000, 1, "2.0.0", 4096); // chunks of 4096, 4096, 1808
    let info = upload_info(ask(&core, 1, img.begin(), t(9, 0)));
    assert_eq!(
        (info.received, info.complete, info.artifact.chunks()),
        (0, false, 3)
    );
    assert_eq!(info.artifact.publisher, "svc");
    assert_eq!(info.artifact.signature, SIGNATURE);
    assert_eq!(
        upload_info(ask(&core, 2, img.chunk(0), t(9, 0))).received,
        1
    );

    // Out of order, wrong size, beyond the end: refused, naming the chunk; nothing changes.
    let e = error_text(ask(&core, 3, img.chunk(2), t(9, 0)));
    assert!(
        e.contains("chunk 2 of artifact")
            && e.contains("out of order")
            && e.contains("takes chunk 1 next"),
        "{e}"
    );
    let e = error_text(ask(&core, 4, img.chunk_with(1, vec![0; 100]), t(9, 0)));
    assert!(
        e.contains("chunk 1 of artifact") && e.contains("has 100 bytes; it must have 4096"),
        "{e}"
    );
    let e = error_text(ask(&core, 5, img.chunk_with(3, vec![0; 10]), t(9, 0)));
    assert!(
        e.contains("chunk 3 of artifact") && e.contains("does not exist"),
        "{e}"
    );
    // A resent chunk is answered without being stored twice.
    assert_eq!(
        upload_info(ask(&core, 6, img.chunk(0), t(9, 0))).received,
        1
    );
    assert_eq!(
        upload_info(ask(&core, 7, img.chunk(1), t(9, 0))).received,
        2
    );

    // The link is cut; a new UploadBegin learns where to go on.
    let info = upload_info(ask(&core, 8, img.begin(), t(9, 5)));
    assert_eq!((info.received, info.complete), (2, false));
    let listed = match ask(&core, 9, HostRequest::Artifacts, t(9, 5)) {
        HostReply::Artifacts { artifacts } => artifacts,
        other => panic!("{other:?}"),
    };
    assert_eq!(listed, std::slice::from_ref(&info));
    // A firmware job cannot name an incomplete artifact.
    let out = core
        .handle_batch(
            vec![submit("svc", 10, firmware("C1", img.id.as_str()))],
            t(9, 5),
        )
        .unwrap();
    let r = rejected_reason(&out, "svc");
    assert!(r.contains("not completely uploaded (2 of 3 chunks)"), "{r}");

    let info = upload_info(ask(&core, 11, img.chunk(2), t(9, 6)));
    assert_eq!((info.received, info.complete), (3, true));
    assert_eq!(info.uploaded_at, t(9, 6));
    // Once complete, a begin (or a late resend of the last chunk) answers at once.
    let again = upload_info(ask(&core, 12, img.begin(), t(9, 7)));
    assert_eq!(again, info);
    assert_eq!(upload_info(ask(&core, 13, img.chunk(2), t(9, 7))), info);
    // The same bytes under another version cannot be published again.
    let mut other = img.begin();
    if let HostRequest::UploadBegin { version, .. } = &mut other {
        *version = "9.9".into();
    }
    let e = error_text(ask(&core, 14, other, t(9, 7)));
    assert!(
        e.contains("already on this relay as version \"2.0.0\""),
        "{e}"
    );
}

#[test]
fn an_upload_whose_bytes_do_not_hash_to_its_id_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let img = Image::new(5000, 2, "1.0", 4096);
    upload_info(ask(&core, 1, img.begin(), t(9, 0)));
    upload_info(ask(&core, 2, img.chunk(0), t(9, 0)));
    let mut tampered = img.data(1);
    tampered[0] ^= 0xff;
    let e = error_text(ask(&core, 3, img.chunk_with(1, tampered), t(9, 0)));
    assert_eq!(
        e,
        format!(
            "digest mismatch: the uploaded bytes do not hash to {}; upload again",
            img.id
        )
    );
    match ask(&core, 4, HostRequest::Artifacts, t(9, 0)) {
        HostReply::Artifacts { artifacts } => assert!(artifacts.is_empty(), "{artifacts:?}"),
        other => panic!("{other:?}"),
    }
    let e = error_text(ask(&core, 5, img.chunk(1), t(9, 0)));
    assert!(e.contains("no upload of artifact"), "{e}");
    // Uploading again starts from nothing and completes.
    assert_eq!(upload_info(ask(&core, 6, img.begin(), t(9, 1))).received, 0);
    img.upload(&core, 10, t(9, 2));
}

#[test]
fn bad_upload_announcements_are_refused_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let img = Image::new(100, 3, "1.0", 4096);
    let HostRequest::UploadBegin {
        artifact, version, ..
    } = img.begin()
    else {
        unreachable!()
    };
    let e = error_text(ask(
        &core,
        1,
        HostRequest::UploadBegin {
            artifact: artifact.clone(),
            version: version.clone(),
            size: 100,
            chunk_size: 4096,
            signature: "xyz".into(),
        },
        t(9, 0),
    ));
    assert!(e.contains("signature"), "{e}");
    let e = error_text(ask(
        &core,
        2,
        HostRequest::UploadBegin {
            artifact: "not-a-digest".into(),
            version,
            size: 100,
            chunk_size: 4096,
            signature: SIGNATURE.into(),
        },
        t(9, 0),
    ));
    assert!(e.contains("\"not-a-digest\" is not an artifact id"), "{e}");
    assert_eq!(core.commits(), 0, "nothing stored");
}

#[test]
fn firmware_jobs_name_their_artifact_by_id_or_by_newest_version() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let old = Image::new(3000, 4, "2.0", 1024);
    let new = Image::new(3000, 5, "2.0", 1024);
    let other = Image::new(3000, 6, "1.0", 1024);
    old.upload(&core, 100, t(8, 0));
    new.upload(&core, 200, t(8, 30));
    other.upload(&core, 300, t(8, 45));

    let by_version = SubmitJob {
        execute_at: Some("2026-11-26T22:00:00Z".into()),
        ..firmware("C1", "2.0")
    };
    let by_id = SubmitJob {
        max_attempts: Some(5),
        ..firmware("C2", old.id.as_str())
    };
    let out = core
        .handle_batch(
            vec![submit("svc", 1, by_version), submit("svc", 2, by_id)],
            t(9, 0),
        )
        .unwrap();
    let o1 = order_of(&out, "C1", "J-000001");
    let JobSpec::Firmware { artifact } = &o1.spec else {
        panic!("{o1:?}")
    };
    assert_eq!(
        artifact,
        &ArtifactRef {
            id: new.id.clone(),
            version: "2.0".into(),
            size: 3000,
            chunk_size: 1024,
            signature: SIGNATURE.into(),
            publisher: "svc".into(),
        },
        "the newest complete upload of version 2.0"
    );
    assert_eq!(o1.execution_time, Some(t(22, 0)));
    assert_eq!(o1.max_attempts, 3, "the broker's default");
    let o2 = order_of(&out, "C2", "J-000002");
    assert!(matches!(&o2.spec, JobSpec::Firmware { artifact } if artifact.id == old.id));
    assert_eq!(o2.max_attempts, 5);
    let v = view(&out, "C1", "J-000001");
    assert_eq!(
        (v.instruction.as_str(), v.data_type.as_str()),
        ("UPDATE ISW", "ISW 2.0")
    );

    // Unknown versions and ids are rejected with what to do.
    let unknown_id = Image::new(10, 7, "x", 1024).id;
    let out = core
        .handle_batch(vec![submit("svc", 3, firmware("C1", "3.0"))], t(9, 1))
        .unwrap();
    let r = rejected_reason(&out, "svc");
    assert!(
        r.contains("no complete artifact with version \"3.0\"")
            && r.contains("host-agent artifacts upload"),
        "{r}"
    );
    assert!(
        find(&out, "dev/C1/jobs/J-000003").is_none(),
        "no order for a rejected job"
    );
    let out = core
        .handle_batch(
            vec![submit("svc", 4, firmware("C1", unknown_id.as_str()))],
            t(9, 1),
        )
        .unwrap();
    let r = rejected_reason(&out, "svc");
    assert!(r.contains("is not on this relay"), "{r}");
    let d = detail(&core, "J-000004");
    assert_eq!(
        (d.view.instruction.as_str(), d.view.status),
        ("UPDATE ISW", JobStatus::Rejected)
    );
}

#[test]
fn fetch_serves_only_the_requested_chunks_of_an_open_firmware_job() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let img = Image::new(5000, 8, "2.0", 1024); // 5 chunks
    let other = Image::new(2000, 9, "1.0", 1024);
    img.upload(&core, 100, t(8, 0));
    other.upload(&core, 200, t(8, 0));
    core.handle_batch(
        vec![
            submit("svc", 1, firmware("C1", "2.0")),
            submit("svc", 2, get_data("C1")),
            submit("svc", 3, firmware("C2", "2.0")),
        ],
        t(9, 0),
    )
    .unwrap();
    let commits = core.commits();

    let out = core
        .handle_batch(vec![fetch("C1", "J-000001", &img.id, &[3, 1, 1])], t(9, 1))
        .unwrap();
    let served = blobs(&out, "C1", &img.id);
    let indices: Vec<u32> = served.iter().map(|c| c.index).collect();
    assert_eq!(indices, [1, 3], "each requested chunk once, nothing else");
    for c in &served {
        assert_eq!(c.data, img.data(c.index));
        assert_eq!(c.artifact, img.id);
    }
    assert!(
        acks(&out, "C1").is_empty(),
        "a fetch is answered by chunks, not acked"
    );
    assert_eq!(core.commits(), commits, "a fetch writes nothing");
    // The last, short chunk; indices past the end are skipped.
    let out = core
        .handle_batch(vec![fetch("C1", "J-000001", &img.id, &[4, 5, 99])], t(9, 1))
        .unwrap();
    let served = blobs(&out, "C1", &img.id);
    assert_eq!(served.len(), 1);
    assert_eq!(
        (served[0].index, served[0].data.len()),
        (4, 5000 - 4 * 1024)
    );

    // Nothing for: another artifact, another device's job, a job that is not firmware, an
    // unknown job, a job that ended.
    let refused = vec![
        fetch("C1", "J-000001", &other.id, &[0]),
        fetch("C1", "J-000003", &img.id, &[0]),
        fetch("C1", "J-000002", &img.id, &[0]),
        fetch("C1", "J-000042", &img.id, &[0]),
    ];
    let out = core.handle_batch(refused, t(9, 2)).unwrap();
    assert!(
        out.iter().all(|o| !o.topic.contains("/blob/")),
        "nothing served: {out:?}"
    );
    core.handle_batch(
        vec![update("C1", 1, "J-000001", JobStatus::Failed, None)],
        t(9, 3),
    )
    .unwrap();
    let out = core
        .handle_batch(vec![fetch("C1", "J-000001", &img.id, &[0])], t(9, 4))
        .unwrap();
    assert!(
        out.is_empty(),
        "an ended job's artifact is not served: {out:?}"
    );
    // A fetch that does not decode is ignored too.
    let garbage = Inbound {
        topic: topic::dev_up(&serial("C1"), UpKind::Fetch),
        payload: bytes::Bytes::from_static(b"\xff\x00"),
    };
    assert!(
        core.handle_batch(vec![garbage], t(9, 4))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn cancel_withdraws_waiting_jobs_and_refuses_started_or_ended_ones() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let img = Image::new(2000, 10, "2.0", 1024);
    img.upload(&core, 100, t(8, 0));
    let values = [("adjustment.density", Value::Int(7))];
    core.handle_batch(
        vec![
            submit("svc", 1, get_data("C1")),                       // 1: queued
            submit("svc", 2, update_data("C1", "broker", &values)), // 2: delivered + merged
            submit("svc", 3, firmware("C1", "2.0")),                // 3: staged
            submit("svc", 4, get_data("C1")),                       // 4: in progress
            submit("svc", 5, get_data("C1")),                       // 5: succeeded
        ],
        t(9, 0),
    )
    .unwrap();
    core.handle_batch(
        vec![
            update("C1", 1, "J-000002", JobStatus::Delivered, None),
            merge_request("C1", 2, "J-000002", DeviceData::new()),
            update("C1", 3, "J-000003", JobStatus::Staged, None),
            update("C1", 4, "J-000004", JobStatus::InProgress, None),
            update("C1", 5, "J-000005", JobStatus::Succeeded, None),
        ],
        t(9, 1),
    )
    .unwrap();
    let cancel = |id: MsgId, j: &str| {
        core.handle_batch(
            vec![host_msg("svc", id, HostRequest::Cancel { job: j.into() })],
            t(9, 2),
        )
        .unwrap()
    };

    let out = cancel(11, "J-000001");
    match reply(&out, "svc") {
        HostReply::Canceled { job } => {
            assert_eq!(
                (job.id.as_str(), job.status),
                ("J-000001", JobStatus::Canceled)
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(
        is_cleared(&out, "dev/C1/jobs/J-000001"),
        "the device never runs it"
    );
    assert_eq!(view(&out, "C1", "J-000001").status, JobStatus::Canceled);
    let last = detail(&core, "J-000001").timeline.pop().unwrap();
    assert_eq!(
        (last.status, last.note.as_deref()),
        (
            JobStatus::Canceled,
            Some("canceled by host svc while queued")
        )
    );
    // A resent cancel gets the same answer, not "already ended".
    assert!(matches!(
        reply(&cancel(11, "J-000001"), "svc"),
        HostReply::Canceled { .. }
    ));

    let out = cancel(12, "J-000002");
    assert!(matches!(reply(&out, "svc"), HostReply::Canceled { .. }));
    assert!(is_cleared(&out, "dev/C1/jobs/J-000002"));
    assert!(
        is_cleared(&out, "dev/C1/merged/J-000002"),
        "merged data emptied too"
    );

    let out = cancel(13, "J-000003");
    assert!(
        matches!(reply(&out, "svc"), HostReply::Canceled { .. }),
        "staged firmware"
    );
    assert!(is_cleared(&out, "dev/C1/jobs/J-000003"));

    let out = cancel(14, "J-000004");
    assert_eq!(
        error_text(reply(&out, "svc")),
        "J-000004 is in progress on the device and cannot be stopped safely"
    );
    assert!(
        find(&out, "dev/C1/jobs/J-000004").is_none(),
        "its order stays"
    );
    let out = cancel(15, "J-000005");
    assert_eq!(
        error_text(reply(&out, "svc")),
        "J-000005 already ended (succeeded); nothing to cancel"
    );
    let out = cancel(16, "J-000001");
    assert_eq!(
        error_text(reply(&out, "svc")),
        "J-000001 already ended (canceled); nothing to cancel"
    );
    let out = cancel(17, "J-000077");
    assert!(error_text(reply(&out, "svc")).contains("no job J-000077"));
    assert_eq!(detail(&core, "J-000004").view.status, JobStatus::InProgress);
    // Canceled jobs count as normal ends: hidden from the default list after a while.
    assert_eq!(list(&core, false, t(23, 0)), ["J-000004"]);
}

#[test]
fn submissions_without_deadline_or_attempts_get_the_configured_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let core = open_with(
        &dir,
        CoreSettings {
            default_deadline: Duration::from_secs(3600),
            default_max_attempts: 4,
            ..settings()
        },
    );
    let img = Image::new(100, 11, "2.0", 1024);
    img.upload(&core, 100, t(8, 0));
    let later = SubmitJob {
        at: Some("2026-11-26T12:00:00Z".into()),
        ..get_data("C1")
    };
    let windowed = SubmitJob {
        execute_at: Some("2026-11-26T20:00:00Z".into()),
        ..firmware("C1", "2.0")
    };
    let explicit = SubmitJob {
        deadline: Some("2026-11-27T00:00:00Z".into()),
        max_attempts: Some(2),
        ..firmware("C1", "2.0")
    };
    let out = core
        .handle_batch(
            vec![
                submit("svc", 1, get_data("C1")),
                submit("svc", 2, later),
                submit("svc", 3, windowed),
                submit("svc", 4, explicit),
            ],
            t(9, 0),
        )
        .unwrap();
    let o = |j| order_of(&out, "C1", j);
    assert_eq!(
        (o("J-000001").deadline, o("J-000001").max_attempts),
        (Some(t(10, 0)), 4),
        "an hour after submission"
    );
    assert_eq!(
        o("J-000002").deadline,
        Some(t(13, 0)),
        "an hour after the instruction time"
    );
    assert_eq!(
        o("J-000003").deadline,
        Some(t(21, 0)),
        "an hour after the execution time"
    );
    assert_eq!(
        (o("J-000004").deadline, o("J-000004").max_attempts),
        (
            Some(chrono::Utc.with_ymd_and_hms(2026, 11, 27, 0, 0, 0).unwrap()),
            2
        )
    );
    // The default deadline is enforced like any other.
    let out = core.expire(t(10, 0)).unwrap();
    assert_eq!(view(&out, "C1", "J-000001").status, JobStatus::TimedOut);
    assert!(find(&out, "fleet/C1/jobs/J-000002").is_none());
}

#[test]
fn a_job_that_times_out_after_its_merge_clears_the_merged_data() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir);
    let req = SubmitJob {
        deadline: Some("2026-11-26T10:00:00Z".into()),
        ..update_data("C1", "broker", &[("adjustment.density", Value::Int(4))])
    };
    core.handle_batch(vec![submit("svc", 1, req)], t(9, 0))
        .unwrap();
    core.handle_batch(
        vec![merge_request("C1", 1, "J-000001", DeviceData::new())],
        t(9, 1),
    )
    .unwrap();
    let out = core.expire(t(10, 0)).unwrap();
    assert!(is_cleared(&out, "dev/C1/jobs/J-000001"));
    assert!(is_cleared(&out, "dev/C1/merged/J-000001"));
}

#[test]
fn startup_republishes_the_merged_data_of_open_jobs_only() {
    let dir = tempfile::tempdir().unwrap();
    let values = [("adjustment.density", Value::Int(6))];
    {
        let core = open(&dir);
        core.handle_batch(
            vec![
                submit("svc", 1, update_data("C1", "broker", &values)),
                submit("svc", 2, update_data("C1", "broker", &values)),
                submit("svc", 3, update_data("C1", "broker", &values)),
            ],
            t(9, 0),
        )
        .unwrap();
        let current = DeviceData::from([(
            Section::Adjustment,
            section(&[
                ("density", Value::Int(2)),
                ("toner_save", Value::Bool(true)),
            ]),
        )]);
        core.handle_batch(
            vec![
                merge_request("C1", 1, "J-000001", current.clone()),
                merge_request("C1", 2, "J-000002", current),
            ],
            t(9, 1),
        )
        .unwrap();
        core.handle_batch(
            vec![update("C1", 3, "J-000002", JobStatus::Succeeded, None)],
            t(9, 2),
        )
        .unwrap();
    }
    let core = open(&dir);
    let out = core.startup_publications().unwrap();
    let merged = merged_of(&out, "C1", "J-000001").expect("open job's merged data");
    assert_eq!(
        merged.data[&Section::Adjustment],
        section(&[
            ("density", Value::Int(6)),
            ("toner_save", Value::Bool(true))
        ])
    );
    assert!(
        find(&out, "dev/C1/merged/J-000002").is_none(),
        "ended job: nothing"
    );
    assert!(
        find(&out, "dev/C1/merged/J-000003").is_none(),
        "not merged yet: nothing"
    );
    assert!(out.iter().all(|o| o.retain && !o.payload.is_empty()));

    // A cluster node's order sweep names the same topics, from the open jobs' index, and reads
    // the same publications for the jobs it repairs (an ended one has none).
    let devices: Vec<&Outbound> = out.iter().filter(|o| o.topic.starts_with("dev/")).collect();
    let open = core.open_order_topics().unwrap();
    assert!(open.complete);
    assert_eq!(
        open.topics,
        [
            ("dev/C1/jobs/J-000001".to_owned(), 1),
            ("dev/C1/merged/J-000001".to_owned(), 1),
            ("dev/C1/jobs/J-000003".to_owned(), 3)
        ]
    );
    assert_eq!(
        open.topics
            .iter()
            .map(|(t, _)| t.as_str())
            .collect::<Vec<_>>(),
        devices.iter().map(|o| o.topic.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(
        core.orders_of(&[1, 2, 3])
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        devices
    );
}

#[test]
fn on_postgres_the_order_sweep_reads_the_open_jobs_while_a_batch_holds_their_rows() {
    if !crate::store::testing::on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core = std::sync::Arc::new(open(&dir));
    core.handle_batch(vec![submit("svc", 1, get_data("C1"))], t(9, 0))
        .unwrap();
    // A batch in progress: the job's row is locked until it ends, and the writer is taken.
    let batch = core.store.begin().unwrap();
    assert!(batch.job(1).unwrap().is_some());

    let (tx, rx) = std::sync::mpsc::channel();
    let sweeper = core.clone();
    std::thread::spawn(move || {
        let _ = tx.send(sweeper.open_order_topics().map(|o| o.topics));
    });
    let topics = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the sweep's read waited for the batch")
        .unwrap();
    assert_eq!(topics, [("dev/C1/jobs/J-000001".to_owned(), 1)]);
    drop(batch);
}
