//! Fig. 5 on the device, against a stand-in relay that acks only when told to: a fatal fault's
//! alarm goes out at once and holds every other job back until the relay has it (S305–S308),
//! then "in progress" follows (S309) and jobs run again (S311); a jam is never reported (S304).

mod common;

use std::time::Duration;

use common::{AgentOpts, Env, FakeRelay, RelayEvent, get_data_order, open_outbox, start_with};
use device_agent::faults::{self, FaultRequest};
use protocol::alarm::{AlarmReport, FaultEvent};
use protocol::device::AckOutcome;
use protocol::job::JobStatus;
use protocol::{Envelope, MsgId, Serial};

const PATIENCE: Duration = Duration::from_secs(10);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(700);

fn alarm_of(ev: &RelayEvent) -> Option<(MsgId, AlarmReport)> {
    match ev {
        RelayEvent::Published { topic, payload, .. } if topic.ends_with("/up/alarm") => {
            let env: Envelope<AlarmReport> = Envelope::from_cbor(payload, 1 << 20).unwrap();
            Some((env.id, env.body))
        }
        _ => None,
    }
}

#[tokio::test]
async fn a_fatal_fault_holds_jobs_back_until_its_alarm_is_acked_then_reports_in_progress() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    relay.set_auto_ack(false);
    let outbox = open_outbox(&env);
    let mut agent = start_with(&env, &relay, "F1", &outbox, AgentOpts::default());
    agent.ready().await;
    let f1 = Serial::parse("F1").unwrap();

    // A jam: counted on the device, never sent.
    faults::inject(&f1, FaultRequest::jam("tray 1 feed")).unwrap();
    relay
        .expect_none("an alarm for a jam", QUIET, |ev| alarm_of(ev).is_some())
        .await;

    // A motor failure: the alarm goes out at once, with the total count.
    faults::inject(&f1, FaultRequest::raise("SC-541")).unwrap();
    let (id, raised) = relay.expect("the raised alarm", PATIENCE, alarm_of).await;
    assert_eq!(raised.event, FaultEvent::Raised);
    assert_eq!(raised.code, "SC-541");
    assert_eq!(raised.detail, "main motor failure");
    assert!(raised.total.is_some_and(|t| t > 0), "{raised:?}");

    // While the relay has not acked it, a job that arrives waits (S305), and the alarm is resent.
    relay.publish_order(&get_data_order("F1", "J-000001", chrono::Utc::now()));
    relay
        .expect_none(
            "a job running before the alarm is acked",
            QUIET,
            |ev| matches!(ev, RelayEvent::Published { topic, .. } if topic.ends_with("/up/job")),
        )
        .await;
    relay
        .expect("the alarm resent", PATIENCE, |ev| {
            alarm_of(ev).filter(|(again, _)| *again == id)
        })
        .await;

    // Acked (S308): "in progress" follows (S309) and the job runs (S311).
    relay.ack(&f1, &[id], AckOutcome::Stored);
    let (_, progress) = relay
        .expect("fault in progress", PATIENCE, |ev| {
            alarm_of(ev).filter(|(_, a)| a.event == FaultEvent::InProgress)
        })
        .await;
    assert_eq!(progress.code, "SC-541");
    relay.set_auto_ack(true);
    let (_, update) = relay.expect_job_update(PATIENCE).await;
    assert_eq!(update.job.as_str(), "J-000001");
    let done = loop {
        let (_, u) = relay.expect_job_update(PATIENCE).await;
        if u.status == JobStatus::Succeeded {
            break u;
        }
    };
    let jams = &done.data.expect("the job's data")[&protocol::data::Section::Counters];
    assert!(jams.contains_key("total"));

    // The same fault again is not a new alarm; clearing it is reported.
    faults::inject(&f1, FaultRequest::raise("SC-541")).unwrap();
    faults::inject(&f1, FaultRequest::clear("SC-541")).unwrap();
    let (_, cleared) = relay
        .expect("the clear", PATIENCE, |ev| {
            alarm_of(ev).filter(|(_, a)| a.event != FaultEvent::InProgress)
        })
        .await;
    assert_eq!(cleared.event, FaultEvent::Cleared, "{cleared:?}");
    agent.stop().await;
    assert!(
        faults::inject(&f1, FaultRequest::raise("SC-541")).is_err(),
        "a stopped device is gone from the registry"
    );
}
