//! A duplicate is only ever a message the relay really stored: a device that starts over with an
//! empty outbox is served, and no message a device (or a thief of its certificate) sends can make
//! the relay answer "duplicate" to reports it never kept.

use harness::mqtt::open;
use harness::{TestEnv, deadline};
use protocol::device::{AckBatch, AckOutcome, DeviceState};
use protocol::presence::StateReport;
use protocol::topic::UpKind;
use protocol::{Envelope, Role, Serial, topic};

fn serial(s: &str) -> Serial {
    Serial::parse(s).unwrap_or_else(|e| panic!("test serial: {e}"))
}

/// The agent's lines saying the relay answered "duplicate".
fn duplicates(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("ack received") && l.contains("outcome=duplicate"))
        .count()
}

#[tokio::test]
async fn a_device_that_starts_over_with_an_empty_data_dir_is_served() {
    let env = TestEnv::new("a_device_that_starts_over_with_an_empty_data_dir_is_served");
    let broker = env.broker().start().await;
    let host = env.host("svc", &broker);

    let mut first = env.device("C1").start(&broker).await;
    let job = host.submit_get_data("C1").await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    let data_dir = first.data_dir().to_owned();
    assert!(first.stop().await.success());

    // A replaced board: the same serial and certificate, an empty data directory, so its outbox
    // numbers its messages from 1 again.
    std::fs::remove_dir_all(&data_dir)
        .unwrap_or_else(|e| panic!("removing {}: {e}", data_dir.display()));
    let second = env.device("C1").start(&broker).await;
    let job = host.submit_get_data("C1").await;
    let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
    assert!(
        detail["data"]["counters"].is_object(),
        "the new board's counters reached the relay: {detail:#}"
    );
    assert_eq!(
        duplicates(&second.log()),
        0,
        "nothing the new board sent was taken for a resend of the old one's\n{}",
        second.tail()
    );
}

#[tokio::test]
async fn a_forged_id_far_ahead_does_not_poison_the_device() {
    let env = TestEnv::new("a_forged_id_far_ahead_does_not_poison_the_device");
    let mut broker = env.broker().start().await;
    let addr = broker.addr();
    let c1 = serial("C1");

    // Someone holding C1's certificate sends one state report numbered 2^64-1.
    let mut thief = env
        .mqtt(Role::Device, "C1")
        .connect(&broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    thief.subscribe_and_wait(&topic::dev_ack(&c1)).await;
    let forged = Envelope::new(
        u64::MAX,
        chrono::Utc::now(),
        StateReport {
            state: DeviceState {
                site: "forged".into(),
                model: "X".into(),
                firmware: "0".into(),
            },
            schedule: None,
        },
    )
    .to_cbor()
    .unwrap_or_else(|e| panic!("{e}"));
    thief
        .publish(&topic::dev_up(&c1, UpKind::State), forged)
        .await;
    let ack = thief
        .next_publish_on(&topic::dev_ack(&c1), deadline())
        .await;
    let acks = open::<AckBatch>(&ack).body.acks;
    assert_eq!(
        (acks[0].id, &acks[0].outcome),
        (u64::MAX, &AckOutcome::Stored),
        "the forged message itself is stored"
    );
    thief.disconnect().await;

    // Across a restart of the relay too: what it keeps on disk must not be poisoned either.
    assert!(broker.stop().await.success());
    let broker = env.broker().listen(addr).start().await;
    let host = env.host("svc", &broker);
    let device = env.device("C1").start(&broker).await;
    let job = host.submit_get_data("C1").await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    assert_eq!(
        duplicates(&device.log()),
        0,
        "the real device's reports are stored, not called duplicates\n{}",
        device.tail()
    );
}
