//! One agent's session against a stand-in relay over real mTLS sockets: it announces itself, runs
//! the jobs addressed to it, keeps what it sends until the relay acks it, and comes back after a
//! lost connection or its own restart.

mod common;

use std::time::Duration;

use common::{
    AgentOpts, Env, FakeRelay, RelayEvent, Running, get_data_order, is_topic, open_outbox,
    start_with,
};
use device_agent::outbox::Outbox;
use protocol::device::{AckOutcome, DeviceState};
use protocol::job::JobStatus;
use protocol::{Envelope, Serial};

const PATIENCE: Duration = Duration::from_secs(10);

fn start(env: &Env, relay: &FakeRelay, serial: &str, outbox: &Outbox) -> Running {
    start_with(env, relay, serial, outbox, AgentOpts::default())
}

async fn wait_until_outbox_empty(outbox: &Outbox, serial: &Serial) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left = outbox.pending(serial).await.unwrap();
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still pending after {PATIENCE:?}: {:?}",
            left.iter().map(|p| p.id).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn agent_announces_itself_then_runs_a_get_data_job() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let mut agent = start(&env, &relay, "C1", &outbox);
    agent.ready().await;

    let filters = relay
        .expect("subscriptions", PATIENCE, |ev| match ev {
            RelayEvent::Subscribed(c, f) if c == "C1" => Some(f.clone()),
            _ => None,
        })
        .await;
    assert!(
        filters.contains(&"dev/C1/jobs/+".to_owned()) && filters.contains(&"dev/C1/ack".to_owned()),
        "{filters:?}"
    );

    let state = relay
        .expect("the device state", PATIENCE, |ev| match ev {
            RelayEvent::Published { topic, payload, .. } if topic == "dev/C1/up/state" => Some(
                Envelope::<DeviceState>::from_cbor(payload, 1 << 20)
                    .unwrap()
                    .body,
            ),
            _ => None,
        })
        .await;
    assert_eq!(state.site, "Osaka HQ");
    assert!(state.model.starts_with("SimCopier"), "{state:?}");

    relay.publish_order(&get_data_order("C1", "J1", chrono::Utc::now()));
    let (_, started) = relay.expect_job_update(PATIENCE).await;
    assert_eq!(
        (started.job.as_str(), started.status),
        ("J1", JobStatus::InProgress)
    );
    let (_, done) = relay.expect_job_update(PATIENCE).await;
    assert_eq!(
        (done.job.as_str(), done.status),
        ("J1", JobStatus::Succeeded)
    );
    let data = done.data.expect("get-data sends its data");
    assert!(
        data[&protocol::data::Section::Counters]["total"]
            .as_int()
            .unwrap()
            > 0
    );

    wait_until_outbox_empty(&outbox, &Serial::parse("C1").unwrap()).await;
    agent.stop().await;
}

#[tokio::test]
async fn unacked_messages_are_resent_until_acked_even_across_a_restart() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    relay.set_auto_ack(false);
    let c1 = Serial::parse("C1").unwrap();
    let outbox = open_outbox(&env);
    let mut agent = start(&env, &relay, "C1", &outbox);
    agent.ready().await;

    // The state message comes, then again (same id, same bytes) because nobody acked it.
    let first = relay
        .expect("the state", PATIENCE, |ev| match ev {
            RelayEvent::Published { topic, payload, .. } if topic == "dev/C1/up/state" => {
                Some(payload.clone())
            }
            _ => None,
        })
        .await;
    let again = relay
        .expect("a resend of the state", PATIENCE, |ev| match ev {
            RelayEvent::Published { topic, payload, .. } if topic == "dev/C1/up/state" => {
                Some(payload.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(first, again, "a resend is the same message");
    let id = Envelope::peek_id(&first).unwrap();

    // The agent stops with the message still unacked: it stays on disk.
    agent.stop().await;
    assert_eq!(
        outbox
            .pending(&c1)
            .await
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect::<Vec<_>>(),
        vec![id]
    );
    drop(outbox);

    // Restarted, with the relay acking again: the old message goes out at once and is acked.
    relay.set_auto_ack(true);
    let outbox = open_outbox(&env);
    let mut agent = start(&env, &relay, "C1", &outbox);
    agent.ready().await;
    relay
        .expect(
            "the old message resent after the restart",
            PATIENCE,
            |ev| match ev {
                RelayEvent::Published { payload, .. } if *payload == first => Some(()),
                _ => None,
            },
        )
        .await;
    wait_until_outbox_empty(&outbox, &c1).await;
    let next = outbox.enqueue(&c1, "t".into(), 0u8, None).await.unwrap();
    assert!(
        next.id > id + 1,
        "ids keep increasing across restarts ({} after {id})",
        next.id
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_rejected_message_is_dropped_not_resent() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    relay.set_auto_ack(false);
    let c1 = Serial::parse("C1").unwrap();
    let outbox = open_outbox(&env);
    let mut agent = start(&env, &relay, "C1", &outbox);
    agent.ready().await;
    let id = relay
        .expect("the state", PATIENCE, |ev| match ev {
            RelayEvent::Published { topic, payload, .. } if topic == "dev/C1/up/state" => {
                Envelope::peek_id(payload)
            }
            _ => None,
        })
        .await;
    relay.ack(
        &c1,
        &[id],
        AckOutcome::Rejected {
            reason: "test says no".into(),
        },
    );
    wait_until_outbox_empty(&outbox, &c1).await;
    relay
        .expect_none(
            "a resend after the rejection",
            Duration::from_millis(1500),
            |ev| is_topic(ev, "dev/C1/up/state"),
        )
        .await;
    agent.stop().await;
}

#[tokio::test]
async fn an_ack_meant_for_another_outbox_deletes_nothing() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    relay.set_auto_ack(false);
    let c1 = Serial::parse("C1").unwrap();
    let outbox = open_outbox(&env);
    let mut agent = start(&env, &relay, "C1", &outbox);
    agent.ready().await;
    let state = |ev: &RelayEvent| match ev {
        RelayEvent::Published { topic, payload, .. } if topic == "dev/C1/up/state" => {
            Envelope::peek_seq(payload)
        }
        _ => None,
    };
    let seq = relay.expect("the state", PATIENCE, state).await;
    assert_ne!(seq.inc, 0, "the agent names its outbox's incarnation");
    // An ack for the same id of an earlier outbox of this device (one that was wiped).
    relay.ack_for_outbox(&c1, seq.inc ^ 1, seq.id, AckOutcome::Stored);
    let again = relay.expect("the state resent", PATIENCE, state).await;
    assert_eq!(again, seq, "still pending, so resent as it was");
    assert_eq!(outbox.pending(&c1).await.unwrap().len(), 1);
    relay.ack_for_outbox(&c1, seq.inc, seq.id, AckOutcome::Stored);
    wait_until_outbox_empty(&outbox, &c1).await;
    agent.stop().await;
}

#[tokio::test]
async fn after_a_lost_connection_the_agent_reconnects_and_does_not_rerun_finished_jobs() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let mut agent = start(&env, &relay, "C1", &outbox);
    agent.ready().await;

    // J1 runs; the relay keeps its retained order (as if it had not cleared it yet).
    relay.publish_order(&get_data_order("C1", "J1", chrono::Utc::now()));
    assert_eq!(
        relay.expect_job_update(PATIENCE).await.1.status,
        JobStatus::InProgress
    );
    assert_eq!(
        relay.expect_job_update(PATIENCE).await.1.status,
        JobStatus::Succeeded
    );

    relay.kill_connections();
    relay
        .expect("a reconnect", PATIENCE, |ev| {
            matches!(ev, RelayEvent::Connected(c) if c == "C1").then_some(())
        })
        .await;
    relay
        .expect("subscriptions again", PATIENCE, |ev| {
            matches!(ev, RelayEvent::Subscribed(c, _) if c == "C1").then_some(())
        })
        .await;

    // The retained J1 came again on subscribe; a new J2 proves the worker has moved past it.
    relay.publish_order(&get_data_order("C1", "J2", chrono::Utc::now()));
    let (_, u) = relay.expect_job_update(PATIENCE).await;
    assert_eq!(
        (u.job.as_str(), u.status),
        ("J2", JobStatus::InProgress),
        "J1 must not run twice"
    );
    agent.stop().await;
}

#[tokio::test]
async fn malformed_and_foreign_orders_are_ignored_and_the_agent_keeps_going() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let mut agent = start(&env, &relay, "C1", &outbox);
    agent.ready().await;

    relay.publish("dev/C1/jobs/J1", b"not cbor".to_vec(), true);
    // Claims 8–9: an order naming C2, delivered on C1's topic.
    let foreign = get_data_order("C2", "J2", chrono::Utc::now());
    let payload = Envelope::new(0, chrono::Utc::now(), &foreign)
        .to_cbor()
        .unwrap();
    relay.publish("dev/C1/jobs/J2", payload, true);
    relay.publish("dev/C1/jobs/J9", Vec::new(), true); // an ended job: nothing to do

    relay.publish_order(&get_data_order("C1", "J3", chrono::Utc::now()));
    let (_, u) = relay.expect_job_update(PATIENCE).await;
    assert_eq!(
        (u.job.as_str(), u.status),
        ("J3", JobStatus::InProgress),
        "only J3 may run"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_job_for_later_is_delivered_now_and_run_at_its_time() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let mut agent = start(&env, &relay, "C1", &outbox);
    agent.ready().await;

    let at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    relay.publish_order(&get_data_order("C1", "J1", at));
    let (_, u) = relay.expect_job_update(PATIENCE).await;
    assert_eq!(u.status, JobStatus::Delivered);
    let (_, u) = relay.expect_job_update(PATIENCE).await;
    assert_eq!(u.status, JobStatus::InProgress);
    assert!(
        chrono::Utc::now() >= at,
        "started before its instruction time"
    );
    agent.stop().await;
}
