//! The core while its store cannot write, on a disk that fills up under redb: redb's own I/O
//! error path (tests/tests/disk_full.rs covers the free-space reserve on a real tmpfs).

use super::*;
use crate::store::test_disk::FillingDisk;

fn reply_to(out: &[Outbound], h: &str, id: MsgId) -> HostReply {
    replies(out, h)
        .into_iter()
        .find(|r| r.reply_to == id)
        .unwrap_or_else(|| panic!("no reply to {h} #{id} in {out:?}"))
        .reply
}

#[test]
fn a_failed_commit_acks_nothing_refuses_writes_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FillingDisk::default();
    let core = Core::with_store(Arc::new(disk.store(dir.path())), settings());

    let out = core
        .handle_batch(
            vec![submit("svc", 1, get_data("C1")), state("C1", 1, "Kobe")],
            t(9, 0),
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
    let HostReply::Submitted { job } = reply_to(&out, "svc", 1) else {
        panic!("not submitted: {out:?}")
    };
    assert_eq!(job.id, "J-000001");

    // The disk fills: the device's result, a new submission and a list arrive together.
    disk.set_full(true);
    let batch = || {
        vec![
            update(
                "C1",
                2,
                "J-000001",
                JobStatus::Succeeded,
                Some(counters(42)),
            ),
            submit("svc", 2, get_data("C1")),
            host_msg("svc", 3, HostRequest::List { all: true }),
        ]
    };
    let out = core.handle_batch(batch(), t(9, 1)).unwrap();
    assert!(
        acks(&out, "C1").is_empty(),
        "nothing was stored, so nothing is acked: {out:?}"
    );
    match reply_to(&out, "svc", 2) {
        HostReply::Error { reason } => {
            assert!(reason.starts_with("relay storage full"), "{reason}")
        }
        other => panic!("a submission must be refused while the disk is full: {other:?}"),
    }
    // The list is answered: from the store if it could be reopened, else with the reason.
    match reply_to(&out, "svc", 3) {
        HostReply::Jobs { jobs } => assert!(jobs.iter().any(|j| j.id == "J-000001")),
        HostReply::Error { reason } => assert!(reason.contains("relay storage"), "{reason}"),
        other => panic!("unexpected reply: {other:?}"),
    }
    // The once-a-second work does not fail the core either.
    assert!(core.expire(t(9, 2)).unwrap().is_empty());
    let still = core.handle_batch(batch(), t(9, 2)).unwrap();
    assert!(acks(&still, "C1").is_empty(), "still full: {still:?}");

    // Space returns: the resends are stored and acked, the submission goes through, and what was
    // acked before the disk filled is still there.
    disk.set_full(false);
    let out = core.handle_batch(batch(), t(9, 3)).unwrap();
    assert_eq!(
        acks(&out, "C1"),
        [Ack {
            inc: None,
            id: 2,
            outcome: AckOutcome::Stored
        }]
    );
    let HostReply::Submitted { job } = reply_to(&out, "svc", 2) else {
        panic!("not submitted after recovery: {out:?}")
    };
    assert_eq!(
        job.id, "J-000002",
        "the refused submission left no job behind"
    );
    let HostReply::Jobs { jobs } = reply_to(&out, "svc", 3) else {
        panic!("no list: {out:?}")
    };
    let first = jobs.iter().find(|j| j.id == "J-000001").expect("J-000001");
    assert_eq!(first.status, JobStatus::Succeeded);
    let again = core
        .handle_batch(vec![state("C1", 1, "Kobe")], t(9, 4))
        .unwrap();
    assert_eq!(
        acks(&again, "C1"),
        [Ack {
            inc: None,
            id: 1,
            outcome: AckOutcome::Duplicate
        }],
        "the journal from before the disk filled survived"
    );
}

#[test]
fn presence_changes_wait_in_memory_while_the_disk_is_full_and_are_recorded_after() {
    use crate::core::PresenceEvent;
    use protocol::presence::{Presence, StateView};

    let dir = tempfile::tempdir().unwrap();
    let disk = FillingDisk::default();
    let core = Core::with_store(Arc::new(disk.store(dir.path())), settings());
    let online = |s: &str| PresenceEvent {
        serial: serial(s),
        online: true,
    };

    disk.set_full(true);
    // A write that fails puts the core into refusing; the presence change is kept, not lost.
    assert!(
        acks(
            &core
                .handle_batch(vec![state("C1", 1, "Kobe")], t(9, 0))
                .unwrap(),
            "C1"
        )
        .is_empty()
    );
    assert!(
        core.presence_events(vec![online("C1")], t(9, 1))
            .unwrap()
            .is_empty(),
        "nothing can be recorded, so nothing is published"
    );

    disk.set_full(false);
    // The once-a-second tick records it.
    let out = core.presence_events(Vec::new(), t(9, 2)).unwrap();
    let view = find(&out, &topic::fleet_state(&serial("C1")))
        .map(|o| {
            Envelope::<StateView>::from_cbor(&o.payload, usize::MAX)
                .unwrap()
                .body
        })
        .unwrap_or_else(|| panic!("the deferred presence change is recorded: {out:?}"));
    assert_eq!(view.presence, Presence::Online);
    assert!(
        core.presence_events(Vec::new(), t(9, 3))
            .unwrap()
            .is_empty(),
        "recorded once"
    );
}
