//! The seed corpus in the repository: `fuzz/corpus/<target>/`, a few valid inputs per byte-input
//! target. bolero reads a target's corpus from `fuzz/tests/__fuzz__/<target>/corpus`, which is a
//! symbolic link to `fuzz/corpus/<target>`, so the stable runs in the suite replay every seed and
//! a libFuzzer run starts from them (and adds what it finds there).
//!
//! `CHUKEI_WRITE_CORPUS=1 cargo test -p chukei-fuzz corpus` rewrites the seeds from the protocol
//! types and the example configs, and the links; without it the test checks that each seed is
//! there and still valid, so a protocol change that makes them stale fails here.

use std::path::{Path, PathBuf};

use protocol::device::{Ack, AckBatch, AckOutcome, DeviceState, JobUpdate};
use protocol::host::{HostRequest, SubmitJob};
use protocol::job::JobStatus;
use protocol::meter::CounterReport;
use protocol::topic::Topic;
use protocol::{Envelope, JobId};
use rumqttd::protocol::Protocol;
use rumqttd::protocol::v4::V4;

/// Targets that take raw bytes and so can start from real inputs. The typed targets
/// (`mutated_mqtt_packets`, `acl_decisions`, `cbor_round_trips`) build their inputs from
/// generated values; their corpus is whatever a libFuzzer run leaves.
const TARGETS: [&str; 5] = [
    "mqtt_packet_decoding",
    "cbor_envelopes",
    "topic_parsing",
    "broker_config_parsing",
    "device_agent_config_parsing",
];

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn at() -> protocol::Timestamp {
    protocol::Timestamp::from_timestamp(1_790_000_000, 0).unwrap_or_default()
}

fn cbor<T: serde::Serialize>(id: u64, body: T) -> Vec<u8> {
    Envelope::new(id, at(), body)
        .to_cbor()
        .expect("a seed message encodes")
}

/// The seeds of `target`: (file name, bytes).
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let named = |v: Vec<(&str, Vec<u8>)>| {
        v.into_iter()
            .map(|(n, b)| (n.to_owned(), b))
            .collect::<Vec<_>>()
    };
    match target {
        "mqtt_packet_decoding" => {
            let mut out: Vec<(String, Vec<u8>)> = ["connect", "publish", "subscribe", "unsubscribe"]
                .iter()
                .zip(super::seed_packets())
                .map(|(n, b)| (format!("{n}.bin"), b))
                .collect();
            out.push(("pingreq.bin".into(), vec![0xC0, 0x00]));
            out.push(("disconnect.bin".into(), vec![0xE0, 0x00]));
            out
        }
        "cbor_envelopes" => {
            let job = JobId::parse("J-000001").expect("a valid job id");
            let mut counters = protocol::data::SectionData::new();
            counters.insert("total".into(), protocol::data::Value::Int(123_456));
            named(vec![
                (
                    "job-update.cbor",
                    cbor(
                        7,
                        JobUpdate {
                            job,
                            status: JobStatus::Succeeded,
                            note: Some("ok".into()),
                            data: Some(
                                [(protocol::data::Section::Counters, counters.clone())].into(),
                            ),
                            errors: Default::default(),
                        },
                    ),
                ),
                (
                    "device-state.cbor",
                    cbor(
                        1,
                        DeviceState {
                            site: "Osaka 3F".into(),
                            model: "MX-1".into(),
                            firmware: "1.0.0".into(),
                        },
                    ),
                ),
                (
                    "counters.cbor",
                    cbor(
                        9,
                        CounterReport {
                            read_at: at(),
                            counters,
                        },
                    ),
                ),
                (
                    "submit.cbor",
                    cbor(
                        2,
                        HostRequest::Submit(SubmitJob {
                            serial: "C1".into(),
                            kind: "get-data".into(),
                            sections: vec!["counters".into(), "jams".into()],
                            ..Default::default()
                        }),
                    ),
                ),
                ("list.cbor", cbor(3, HostRequest::List { all: true })),
                (
                    "acks.cbor",
                    cbor(
                        0,
                        AckBatch {
                            acks: vec![
                                Ack {
                                    id: 7,
                                    outcome: AckOutcome::Stored,
                                    inc: Some(0x1234),
                                },
                                Ack {
                                    id: 8,
                                    outcome: AckOutcome::Rejected {
                                        reason: "bad".into(),
                                    },
                                    inc: None,
                                },
                            ],
                        },
                    ),
                ),
            ])
        }
        "topic_parsing" => [
            "dev/C1/up/job",
            "dev/C1/up/counters",
            "dev/C1/jobs/J-000001",
            "dev/C1/ack",
            "host/svc/req",
            "host/svc/resp",
            "fleet/C1/state",
            "json/fleet/C1/jobs/J-000001",
        ]
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("topic-{i}.txt"), t.as_bytes().to_vec()))
        .collect(),
        "broker_config_parsing" => named(vec![
            (
                "example.toml",
                include_bytes!("../../../config/broker.toml").to_vec(),
            ),
            ("empty.toml", Vec::new()),
            (
                "limits.toml",
                b"listen = \"0.0.0.0:8883\"\nmax_packet_bytes = 1048576\nmax_payload_bytes = 65536\n"
                    .to_vec(),
            ),
        ]),
        "device_agent_config_parsing" => named(vec![
            (
                "example.toml",
                include_bytes!("../../../config/device-agent.toml").to_vec(),
            ),
            ("empty.toml", Vec::new()),
            (
                "report.toml",
                b"[report]\ncounters_every_secs = 60\n[session]\nresend_min_secs = 1\n".to_vec(),
            ),
        ]),
        other => panic!("no seeds for {other}"),
    }
}

/// Whether a seed is a valid input of its target: the point of a seed is to get past the first
/// checks, so each must be accepted.
fn valid(target: &str, bytes: &[u8]) -> Result<(), String> {
    let text = || std::str::from_utf8(bytes).map_err(|e| e.to_string());
    match target {
        "mqtt_packet_decoding" => {
            let mut buf = bytes::BytesMut::from(bytes);
            V4.read_mut(&mut buf, 64 * 1024)
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        }
        "cbor_envelopes" => match super::decode_all(bytes) {
            0 => Err("no decoder accepts it".into()),
            _ => Ok(()),
        },
        "topic_parsing" => Topic::parse(text()?).map(|_| ()).map_err(|e| e.to_string()),
        "broker_config_parsing" => toml::from_str::<broker::config::BrokerConfig>(text()?)
            .map_err(|e| e.to_string())
            .and_then(|c| c.validate().map_err(|e| e.to_string())),
        "device_agent_config_parsing" => {
            device_agent::config::FileConfig::parse(text()?, Path::new("seed.toml"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        other => Err(format!("unknown target {other}")),
    }
}

#[test]
fn corpus_seeds_are_in_the_repo_and_valid() {
    let write = std::env::var("CHUKEI_WRITE_CORPUS").is_ok_and(|v| v == "1");
    for target in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        let link = fuzz_dir()
            .join("tests/__fuzz__")
            .join(target)
            .join("corpus");
        if write {
            std::fs::create_dir_all(&dir).expect("create the corpus directory");
            for (name, bytes) in seeds(target) {
                std::fs::write(dir.join(name), bytes).expect("write a seed");
            }
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent).expect("create bolero's work directory");
            }
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("../../../corpus").join(target), &link)
                    .expect("link bolero's corpus directory to the repo's");
            }
        }
        // Only the seeds: a libFuzzer run adds inputs of its own here, valid or not.
        for (name, _) in seeds(target) {
            let file = dir.join(&name);
            let bytes = std::fs::read(&file).unwrap_or_else(|e| {
                panic!(
                    "seed {} of {target}: {e} (write the corpus with CHUKEI_WRITE_CORPUS=1 \
                     cargo test -p chukei-fuzz corpus)",
                    file.display()
                )
            });
            if let Err(e) = valid(target, &bytes) {
                panic!(
                    "{} is not a valid input of {target}: {e}\n(stale? rewrite with \
                     CHUKEI_WRITE_CORPUS=1 cargo test -p chukei-fuzz corpus)",
                    file.display()
                );
            }
        }
        let linked = std::fs::canonicalize(&link).ok();
        assert_eq!(
            linked,
            std::fs::canonicalize(&dir).ok(),
            "{} must link to {} so bolero replays the seeds",
            link.display(),
            dir.display()
        );
    }
}
