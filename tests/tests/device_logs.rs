//! What a device chooses (its site, model, firmware, a broken payload) reaches the relay's log
//! escaped and cut short: a newline cannot forge a log line, 30 KB cannot fill the disk.

use harness::mqtt::envelope;
use harness::{TestEnv, deadline};
use protocol::device::DeviceState;
use protocol::presence::StateReport;
use protocol::topic::UpKind;
use protocol::{Role, Serial, topic};

const FORGED: &str = "2026-12-03T08:00:00.000000Z  INFO broker: FORGED-LINE admin logged in";

#[tokio::test]
async fn a_device_cannot_forge_or_flood_the_relays_log() {
    let env = TestEnv::new("a_device_cannot_forge_or_flood_the_relays_log");
    let broker = env
        .broker()
        .log_also("broker::core::device=debug")
        .start()
        .await;
    let c1 = Serial::parse("C1").unwrap_or_else(|e| panic!("{e}"));
    let mut device = env
        .mqtt(Role::Device, "C1")
        .connect(&broker)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    device.subscribe_and_wait(&topic::dev_ack(&c1)).await;

    let state = |id: u64, site: String, firmware: String| {
        envelope(
            id,
            StateReport {
                state: DeviceState {
                    site,
                    model: format!("M\r\n{FORGED}"),
                    firmware,
                },
                schedule: None,
            },
        )
    };
    let up = topic::dev_up(&c1, UpKind::State);
    let acks = topic::dev_ack(&c1);
    // Two sites, alternating: every message is a change, logged at info.
    for id in 1..=20 {
        let site = if id % 2 == 0 { "a" } else { "b" };
        let site = format!("{site}\n{FORGED}{}", "x".repeat(100));
        device.publish(&up, state(id, site, "1.0".into())).await;
        device.next_publish_on(&acks, deadline()).await;
    }
    // 30 KB of firmware version: refused (its length is in the reason, not its text).
    device
        .publish(&up, state(22, "a".into(), "x".repeat(30_000)))
        .await;
    device.next_publish_on(&acks, deadline()).await;
    // A payload that fails to decode: serde's error quotes what the device sent.
    device
        .publish(&up, envelope(21, format!("\n{FORGED}")))
        .await;
    device.next_publish_on(&acks, deadline()).await;

    let log = broker.log();
    let stored = log
        .lines()
        .filter(|l| l.contains("device state stored") && l.contains("serial=C1"))
        .count();
    assert_eq!(stored, 20, "every state was logged\n{}", broker.tail());
    assert!(
        log.contains("refused device message"),
        "the bad payload was logged\n{}",
        broker.tail()
    );
    for line in log.lines() {
        assert!(
            !line.contains("FORGED-LINE") || !line.starts_with("2026-12-03T08:00:00"),
            "a forged line: {line}"
        );
        assert!(
            line.len() < 2_000,
            "a {}-byte line: a peer's value was logged whole: {}…",
            line.len(),
            &line[..200]
        );
    }
    assert!(
        log.len() < 200_000,
        "{} bytes of log for 21 messages",
        log.len()
    );
}
