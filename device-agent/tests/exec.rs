//! The exec-hook backend against the worked example, config/exec-hooks/example-device.sh: the
//! agent's `ExecDevice` reads, applies (and is refused), writes a slot, switches and checks
//! health through the script, and a whole firmware job runs through it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{AgentOpts, Env, FakeRelay, PATIENCE, RelayEvent, open_outbox, order, start_with};
use device_agent::device::{self, ApplyError, Device, Slot};
use device_agent::exec::{ExecDevice, ExecSettings};
use device_agent::jobs::PublisherKey;
use ed25519_dalek::{Signer, SigningKey};
use protocol::Envelope;
use protocol::Serial;
use protocol::artifact::{ArtifactId, ArtifactRef, signed_message};
use protocol::data::{DeviceData, Section, Value};
use protocol::device::JobUpdate;
use protocol::job::{JobSpec, JobStatus, MergeAt};
use sha2::{Digest, Sha256};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/exec-hooks/example-device.sh")
}

fn hooks() -> ExecSettings {
    let hook = |name: &str| vec![script().to_string_lossy().into_owned(), name.to_owned()];
    ExecSettings {
        get_data: hook("get_data"),
        apply: Some(hook("apply")),
        write_image: Some(hook("write_image")),
        switch_slot: Some(hook("switch_slot")),
        health_check: Some(hook("health_check")),
        timeout: Duration::from_secs(20),
        write_timeout: Duration::from_secs(20),
    }
}

fn values(pairs: &[(Section, &str, Value)]) -> DeviceData {
    let mut data = DeviceData::new();
    for (s, k, v) in pairs {
        data.entry(*s)
            .or_default()
            .insert((*k).to_owned(), v.clone());
    }
    data
}

#[test]
fn exec_device_drives_the_example_script() {
    let home = tempfile::tempdir().unwrap();
    let mut d = ExecDevice::new(hooks(), &Serial::parse("C9").unwrap(), home.path());

    let state = d.state();
    assert_eq!(
        (state.model.as_str(), state.firmware.as_str()),
        ("Example Copier 100", "1.0.0")
    );
    let data = d
        .read(&[Section::Adjustment, Section::Identification])
        .unwrap();
    assert_eq!(data[&Section::Adjustment]["density"], Value::Int(5));
    assert_eq!(
        data[&Section::Identification]["serial"],
        Value::from("C9"),
        "CHUKEI_SERIAL is passed"
    );

    // One bad value: refused per key, nothing applied.
    let Err(ApplyError::Refused(refused)) = d.apply(&values(&[
        (Section::Adjustment, "toner_save", true.into()),
        (Section::Adjustment, "density", 12.into()),
    ])) else {
        panic!("12 must be refused")
    };
    assert_eq!(
        refused.get("adjustment.density").map(String::as_str),
        Some("12 is out of range 1..=9")
    );
    assert_eq!(refused.len(), 1);
    assert_eq!(
        d.read(&[Section::Adjustment]).unwrap(),
        values(&[
            (Section::Adjustment, "density", 5.into()),
            (Section::Adjustment, "toner_save", false.into()),
        ])
    );

    d.apply(&values(&[
        (Section::Adjustment, "density", 7.into()),
        (
            Section::Settings,
            "host_url",
            "mqtts://relay-2.example.com:8883".into(),
        ),
    ]))
    .unwrap();
    let data = d.read(&[Section::Adjustment, Section::Settings]).unwrap();
    assert_eq!(data[&Section::Adjustment]["density"], Value::Int(7));
    assert_eq!(
        data[&Section::Settings]["host_url"],
        Value::from("mqtts://relay-2.example.com:8883")
    );

    // A/B: write b, read back, switch, check; an unhealthy version fails its check.
    let img = home.path().join("fw.bin");
    std::fs::write(&img, b"example firmware 2.0").unwrap();
    d.write_image(Slot::B, &img, "2.0").unwrap();
    let want: [u8; 32] = Sha256::digest(b"example firmware 2.0").into();
    assert_eq!(d.image_digest(Slot::B).unwrap(), want);
    assert!(
        d.write_image(Slot::A, &img, "2.0")
            .unwrap_err()
            .to_string()
            .contains("slot a is running")
    );
    d.activate(Slot::B).unwrap();
    let slots = d.slots().unwrap();
    assert_eq!((slots.active, slots.active_version()), (Slot::B, "2.0"));
    assert_eq!(d.state().firmware, "2.0");
    d.health_check().unwrap();
    std::fs::write(home.path().join("example-device/unhealthy"), "2.0\n").unwrap();
    let e = d.health_check().unwrap_err().to_string();
    assert!(e.contains("engine did not come up on 2.0"), "{e}");
}

#[tokio::test]
async fn update_and_firmware_jobs_run_through_the_exec_backend() {
    let env = Env::new();
    let mut relay = FakeRelay::start(&env.pki_dir()).await;
    let outbox = open_outbox(&env);
    let key = SigningKey::from_bytes(&[5; 32]);
    let bytes = b"example firmware 3.1 ".repeat(500);
    let id = ArtifactId::from_digest(&Sha256::digest(&bytes).into());
    let a = ArtifactRef {
        signature: key
            .sign(&signed_message(&id, "3.1"))
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        id: id.clone(),
        version: "3.1".into(),
        size: bytes.len() as u64,
        chunk_size: 1024,
        publisher: "svc".into(),
    };
    relay.serve_artifact(&id, bytes.to_vec(), 1024);
    let serial = Serial::parse("C9").unwrap();
    let device = device::shared(ExecDevice::new(hooks(), &serial, &env.data_dir()));
    let opts = AgentOpts {
        device: Some(device),
        publisher: Some(PublisherKey::from_verifying_key(key.verifying_key())),
        ..AgentOpts::default()
    };
    let mut agent = start_with(&env, &relay, "C9", &outbox, opts);
    agent.ready().await;

    relay.publish_order(&order(
        "C9",
        "J1",
        JobSpec::UpdateData {
            values: values(&[(Section::CallSettings, "at", "03:30".into())]),
            merge: MergeAt::Device,
        },
    ));
    relay.publish_order(&order("C9", "J2", JobSpec::Firmware { artifact: a }));
    let mut ends = Vec::new();
    while ends.len() < 2 {
        let u = relay
            .expect("the jobs' ends", PATIENCE, |ev| match ev {
                RelayEvent::Published { topic, payload, .. } if topic == "dev/C9/up/job" => Some(
                    Envelope::<JobUpdate>::from_cbor(payload, 1 << 20)
                        .unwrap()
                        .body,
                ),
                _ => None,
            })
            .await;
        if u.status.is_terminal() {
            ends.push(u);
        }
    }
    assert_eq!(
        (ends[0].job.as_str(), ends[0].status),
        ("J1", JobStatus::Succeeded),
        "{:?}",
        ends[0].note
    );
    assert_eq!(
        ends[0].data.as_ref().unwrap()[&Section::CallSettings]["at"],
        Value::from("03:30")
    );
    assert_eq!(
        (ends[1].job.as_str(), ends[1].status),
        ("J2", JobStatus::Succeeded),
        "{:?}",
        ends[1].note
    );
    assert_eq!(ends[1].note.as_deref(), Some("slot b active, version 3.1"));
    let active =
        std::fs::read_to_string(env.data_dir().join("example-device/slots/active")).unwrap();
    assert_eq!(active.trim(), "b");
    agent.stop().await;
}
