//! Fuzz targets for everything chukei decodes from untrusted peers, and its config files. Each is
//! a `#[test]`: on stable, `cargo test -p chukei-fuzz` runs it over its corpus and a few thousand
//! random inputs; on nightly, `cargo bolero test` drives the same closure with libFuzzer for as
//! long as you like (see fuzz/README.md). The property everywhere: no panic, no unbounded
//! allocation (measured: see [`alloc`]), and where the input is accepted, the answer is consistent.

#[path = "support/alloc.rs"]
mod alloc;
#[path = "support/corpus.rs"]
mod corpus;

use alloc::assert_bounded;
use bolero::check;
use bytes::BytesMut;
use protocol::acl::{self, Action};
use protocol::alarm::{AlarmReport, AlarmState};
use protocol::artifact::{Chunk, FetchRequest};
use protocol::device::{AckBatch, DeviceState, JobUpdate, MergeRequest, Merged};
use protocol::host::{HostRequest, HostResponse};
use protocol::job::{JobOrder, JobView};
use protocol::meter::CounterReport;
use protocol::presence::{StateReport, StateView};
use protocol::topic::Topic;
use protocol::{Envelope, Identity, Role};
use rumqttd::protocol::Protocol;
use rumqttd::protocol::v4::V4;

/// The gateway's decoder: whatever bytes a client sends, decoding ends in packets or an error.
#[test]
fn mqtt_packet_decoding() {
    check!().for_each(|bytes: &[u8]| {
        assert_bounded(bytes.len(), || {
            let mut buf = BytesMut::from(bytes);
            // Decode packets until the buffer is short or broken, as ClientConn does.
            for _ in 0..64 {
                match V4.read_mut(&mut buf, 64 * 1024) {
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        });
    });
}

/// Valid packets a real client sends, to mutate: random bytes alone rarely get past the fixed
/// header, and the interesting bugs sit in the variable header and payload.
pub(crate) fn seed_packets() -> Vec<Vec<u8>> {
    use rumqttd::protocol::{
        Connect, Filter, Packet, Publish, QoS, RetainForwardRule, Subscribe, Unsubscribe,
    };
    let packets = vec![
        Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: "C1".into(),
                clean_session: true,
            },
            None,
            None,
            None,
            None,
        ),
        Packet::Publish(Publish::new("dev/C1/up/job", "payload", false), None),
        Packet::Subscribe(
            Subscribe {
                pkid: 1,
                filters: vec![Filter {
                    path: "dev/C1/jobs/+".into(),
                    qos: QoS::AtLeastOnce,
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                }],
            },
            None,
        ),
        Packet::Unsubscribe(
            Unsubscribe {
                pkid: 2,
                filters: vec!["dev/C1/ack".into()],
            },
            None,
        ),
    ];
    packets
        .into_iter()
        .filter_map(|p| {
            let mut out = BytesMut::new();
            V4.write(p, &mut out).ok().map(|_| out.to_vec())
        })
        .collect()
}

/// Valid packets with bytes overwritten, cut short or grown: lengths that lie, strings that are
/// not UTF-8, QoS 3, flags that MQTT forbids.
#[test]
fn mutated_mqtt_packets() {
    let seeds = seed_packets();
    assert!(seeds.len() >= 4, "the seeds encode");
    check!()
        .with_type::<(u8, Vec<(u16, u8)>, u16)>()
        .for_each(|(which, edits, cut)| {
            let mut bytes = seeds[usize::from(*which) % seeds.len()].clone();
            for (pos, byte) in edits {
                if !bytes.is_empty() {
                    let at = usize::from(*pos) % bytes.len();
                    bytes[at] = *byte;
                }
            }
            bytes.truncate(usize::from(*cut).max(1));
            let mut buf = BytesMut::from(bytes.as_slice());
            for _ in 0..8 {
                if V4.read_mut(&mut buf, 64 * 1024).is_err() {
                    break;
                }
            }
        });
}

fn identity(role: u8, id: &str) -> Option<Identity> {
    Identity::new(Role::ALL[usize::from(role) % 3], id).ok()
}

/// The ACL never panics, and never allows anything outside the identity's own subtree.
#[test]
fn acl_decisions() {
    check!()
        .with_type::<(u8, u8, String, String)>()
        .for_each(|(role, action, id, topic)| {
            let Some(who) = identity(*role, id) else {
                return;
            };
            let action =
                [Action::Subscribe, Action::Unsubscribe, Action::Publish][usize::from(*action) % 3];
            let allowed = acl::check(&who, action, topic).is_allowed();
            if !allowed {
                return;
            }
            let levels: Vec<&str> = topic.split('/').collect();
            match (who.role(), action) {
                (Role::Integrator, Action::Publish) => {
                    panic!("integrator allowed to publish {topic:?}")
                }
                (Role::Device, _) => assert!(
                    levels[0] == "dev" && levels.get(1) == Some(&who.id()),
                    "{who} {action:?} {topic:?}"
                ),
                (Role::Host, Action::Publish) => {
                    assert_eq!(topic, &format!("host/{}/req", who.id()))
                }
                (_, _) => assert!(
                    levels[0] == "fleet"
                        || (levels[0] == "json" && levels.get(1) == Some(&"fleet"))
                        || (levels[0] == "host" && levels.get(1) == Some(&who.id())),
                    "{who} {action:?} {topic:?}"
                ),
            }
            assert!(
                !levels.iter().take(2).any(|l| *l == "+" || *l == "#"),
                "wildcard in an owner level: {topic:?}"
            );
        });
    check!()
        .with_type::<(u8, String, String)>()
        .for_each(|(role, id, client_id)| {
            let Some(who) = identity(*role, id) else {
                return;
            };
            if acl::check_client_id(&who, client_id).is_allowed() {
                assert!(
                    client_id.starts_with(who.id()),
                    "{who} connected as {client_id:?}"
                );
            }
        });
}

/// Topic names parse only when they print back the same. Raw bytes, as a PUBLISH carries them,
/// so that the corpus can hold real topic names.
#[test]
fn topic_parsing() {
    check!().for_each(|bytes: &[u8]| {
        let Ok(topic) = std::str::from_utf8(bytes) else {
            return;
        };
        if let Ok(parsed) = Topic::parse(topic) {
            assert_eq!(parsed.to_string(), topic);
        }
    });
}

/// `broker.toml`: whatever an operator writes, parsing and validating end in a config or an
/// error that names the problem, never a panic.
#[test]
fn broker_config_parsing() {
    check!().for_each(|bytes: &[u8]| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        assert_bounded(bytes.len(), || {
            if let Ok(cfg) = toml::from_str::<broker::config::BrokerConfig>(text) {
                let _ = cfg.validate();
            }
        });
    });
}

/// `device-agent.toml` (every table: session, sim, faults, report, exec, fleet), parsed and
/// merged into run settings the way `device-agent run --config` does.
#[test]
fn device_agent_config_parsing() {
    check!().for_each(|bytes: &[u8]| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        assert_bounded(bytes.len(), || {
            let _ =
                device_agent::config::FileConfig::parse(text, std::path::Path::new("fuzz.toml"));
        });
    });
}

/// Every message decoder on every payload: errors, never panics, and stays within the allocation
/// bound. What the relay decodes from clients goes through `broker::core::decode`; what the agents
/// decode from the relay (device-agent: orders, merged data, chunks, acks, its own outbox's job
/// reports; host-agent: replies, job views, alarm and state views) goes through
/// `Envelope::from_cbor`. Both apply `protocol::cbor_guard` (size cap, then the structural check)
/// before serde.
#[test]
fn cbor_envelopes() {
    check!().for_each(|bytes: &[u8]| {
        assert_bounded(bytes.len(), || decode_all(bytes));
        assert_bounded(bytes.len(), || decode_as_agents(bytes));
    });
}

const MAX: usize = 64 * 1024;

/// The relay's decoding of a client payload, for every message type: how many accepted it.
pub(crate) fn decode_all(bytes: &[u8]) -> usize {
    use broker::core::decode;
    let mut accepted = 0;
    let mut ok = |decoded: bool| accepted += usize::from(decoded);
    let _ = Envelope::peek_id(bytes);
    ok(decode::<JobUpdate>(bytes, MAX).is_ok());
    ok(decode::<DeviceState>(bytes, MAX).is_ok());
    ok(decode::<StateReport>(bytes, MAX).is_ok());
    ok(decode::<AlarmReport>(bytes, MAX).is_ok());
    ok(decode::<CounterReport>(bytes, MAX).is_ok());
    ok(decode::<MergeRequest>(bytes, MAX).is_ok());
    ok(decode::<FetchRequest>(bytes, MAX).is_ok());
    ok(decode::<HostRequest>(bytes, MAX).is_ok());
    ok(decode::<HostResponse>(bytes, MAX).is_ok());
    ok(decode::<AckBatch>(bytes, MAX).is_ok());
    ok(decode::<JobOrder>(bytes, MAX).is_ok());
    ok(decode::<JobView>(bytes, MAX).is_ok());
    ok(decode::<Merged>(bytes, MAX).is_ok());
    ok(decode::<Chunk>(bytes, MAX).is_ok());
    ok(decode::<AlarmState>(bytes, MAX).is_ok());
    ok(decode::<StateView>(bytes, MAX).is_ok());
    accepted
}

/// The agents' decoding of what the relay sends them, each type the way the agent calls it
/// (`Envelope::from_cbor` with its packet cap): how many accepted it.
fn decode_as_agents(bytes: &[u8]) -> usize {
    [
        // host-agent (client.rs, dashboard/feed.rs)
        Envelope::<HostResponse>::from_cbor(bytes, MAX).is_ok(),
        Envelope::<JobView>::from_cbor(bytes, MAX).is_ok(),
        Envelope::<AlarmState>::from_cbor(bytes, MAX).is_ok(),
        Envelope::<StateView>::from_cbor(bytes, MAX).is_ok(),
        // device-agent (agent.rs)
        Envelope::<AckBatch>::from_cbor(bytes, MAX).is_ok(),
        Envelope::<JobOrder>::from_cbor(bytes, MAX).is_ok(),
        Envelope::<Merged>::from_cbor(bytes, MAX).is_ok(),
        Envelope::<Chunk>::from_cbor(bytes, MAX).is_ok(),
        Envelope::<JobUpdate>::from_cbor(bytes, MAX).is_ok(),
    ]
    .into_iter()
    .filter(|ok| *ok)
    .count()
}

/// The input the libFuzzer run found (2026-11-26): maps nested as map keys, each declaring 65,535
/// entries, held 4 MiB from 19 bytes and 250 MiB from 787. The relay's and the agents' decoders
/// refuse it before serde preallocates anything.
#[test]
fn nested_maps_that_declare_more_than_they_hold_stay_small() {
    let mut bytes = vec![
        0xa4, 0x61, b'v', 0x01, 0x62, b'i', b'd', 0x01, 0x62, b'a', b't',
    ];
    let at = b"2026-11-26T00:00:00Z";
    bytes.push(0x60 + at.len() as u8);
    bytes.extend_from_slice(at);
    bytes.extend_from_slice(&[0x64, b'b', b'o', b'd', b'y']);
    for _ in 0..250 {
        bytes.extend_from_slice(&[0xb9, 0xff, 0xff]);
    }
    let accepted = assert_bounded(bytes.len(), || decode_all(&bytes));
    assert_eq!(accepted, 0);
    assert_eq!(assert_bounded(bytes.len(), || decode_as_agents(&bytes)), 0);
    let crash = [
        0xa1, 0x44, 0x62, 0x6f, 0x64, 0x79, 0xb4, 0x99, 0xb9, 0xb9, 0xb9, 0xb9, 0xb9, 0xb9, 0xb9,
        0xb9, 0xb9, 0xb9, 0xb9,
    ];
    assert_eq!(assert_bounded(crash.len(), || decode_all(&crash)), 0);
    assert_eq!(assert_bounded(crash.len(), || decode_as_agents(&crash)), 0);
}

/// Valid messages survive a CBOR round trip whatever their text fields hold.
#[test]
fn cbor_round_trips() {
    check!()
        .with_type::<(u64, String, Vec<String>)>()
        .for_each(|(id, serial, sections)| {
            let req = HostRequest::Submit(protocol::host::SubmitJob {
                serial: serial.clone(),
                kind: "get-data".into(),
                sections: sections.clone(),
                ..Default::default()
            });
            let env = Envelope::new(*id, chrono_now(), req);
            let bytes = env.to_cbor().expect("encodes");
            let back: Envelope<HostRequest> =
                Envelope::from_cbor(&bytes, usize::MAX).expect("decodes");
            assert_eq!(back, env);
        });
}

fn chrono_now() -> protocol::Timestamp {
    // A fixed instant keeps runs reproducible.
    protocol::Timestamp::from_timestamp(1_790_000_000, 0).unwrap_or_default()
}
