//! The versioned CBOR envelope every message travels in (docs/decisions.md, D4).
//!
//! Unknown fields are ignored on decode so that old and new agents interoperate; a newer major
//! version is refused with a clear reason. The envelope's `id` is the sender's message number
//! (docs/decisions.md, D3): the receiver can read it with [`Envelope::peek_id`] even when the body
//! is bad, so a rejection can still be acknowledged and the sender can stop resending.
//!
//! A device's ids count up from 1 in its outbox, and a device can lose its outbox (a replaced
//! board, a reflash, a wiped disk) and start again from 1. So a device message also names its
//! outbox: `inc`, the outbox's **incarnation**, a random number the agent chose when the outbox
//! was created. The relay deduplicates by (serial, incarnation, id), so a device that starts over
//! is a new sender, not a replay of the old one.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Incarnation, MsgId, Timestamp, cbor_guard};

/// The envelope version this build writes and the newest it reads.
pub const VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Envelope version.
    pub v: u16,
    /// The sender's message number; 0 for broker-originated messages, which need no ack.
    pub id: MsgId,
    /// When the sender created the message (UTC).
    pub at: Timestamp,
    pub body: T,
    /// The incarnation of the device outbox that numbered this message; absent from hosts, the
    /// relay, and agents older than incarnations (their messages share incarnation 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inc: Option<Incarnation>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("payload is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("payload is not valid CBOR for this message: {0}")]
    Malformed(String),
    #[error(
        "envelope version {0} is newer than this build understands ({VERSION}); upgrade the receiver"
    )]
    Version(u16),
    #[error("could not encode message: {0}")]
    Encode(String),
}

#[derive(Deserialize)]
struct Head {
    id: MsgId,
    #[serde(default)]
    inc: Option<Incarnation>,
}

/// Where a message sits in its sender's numbering: which outbox numbered it, and its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq {
    /// 0 when the sender named no incarnation.
    pub inc: Incarnation,
    pub id: MsgId,
}

impl<T> Envelope<T> {
    pub fn new(id: MsgId, at: Timestamp, body: T) -> Self {
        Self {
            v: VERSION,
            id,
            at,
            body,
            inc: None,
        }
    }

    /// A message numbered `id` by the device outbox of incarnation `inc`.
    pub fn from_outbox(inc: Incarnation, id: MsgId, at: Timestamp, body: T) -> Self {
        Self {
            inc: Some(inc),
            ..Self::new(id, at, body)
        }
    }

    /// The message's place in its sender's numbering.
    pub fn seq(&self) -> Seq {
        Seq {
            inc: self.inc.unwrap_or(0),
            id: self.id,
        }
    }
}

impl<T: Serialize> Envelope<T> {
    pub fn to_cbor(&self) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::with_capacity(128);
        ciborium::into_writer(self, &mut out).map_err(|e| EnvelopeError::Encode(e.to_string()))?;
        Ok(out)
    }
}

impl<T: DeserializeOwned> Envelope<T> {
    /// Decodes a payload: refused over `max_bytes`, then checked by [`cbor_guard`] so that no
    /// payload can make serde allocate out of proportion to its length, then parsed. Every
    /// message any chukei binary takes from the network comes through here.
    pub fn from_cbor(bytes: &[u8], max_bytes: usize) -> Result<Self, EnvelopeError> {
        if bytes.len() > max_bytes {
            return Err(EnvelopeError::TooLarge {
                len: bytes.len(),
                max: max_bytes,
            });
        }
        cbor_guard::check(bytes).map_err(EnvelopeError::Malformed)?;
        let env: Envelope<T> =
            ciborium::from_reader(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if env.v > VERSION {
            return Err(EnvelopeError::Version(env.v));
        }
        Ok(env)
    }
}

impl Envelope<()> {
    /// Reads only the message id, so a message whose body is bad can still be acknowledged as
    /// rejected. `None` when even the envelope head is unreadable, or [`cbor_guard`] refuses the
    /// payload (such a payload is not CBOR any chukei sender writes; serde reads the whole map
    /// even for one field, so it must not see it either).
    pub fn peek_id(bytes: &[u8]) -> Option<MsgId> {
        Self::peek_seq(bytes).map(|seq| seq.id)
    }

    /// [`Envelope::peek_id`] with the incarnation: what a rejection's ack must name.
    pub fn peek_seq(bytes: &[u8]) -> Option<Seq> {
        cbor_guard::check(bytes).ok()?;
        ciborium::from_reader::<Head, _>(bytes).ok().map(|h| Seq {
            inc: h.inc.unwrap_or(0),
            id: h.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Body {
        a: u32,
        b: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct NewerBody {
        a: u32,
        b: String,
        c: Vec<u8>,
    }

    fn at() -> Timestamp {
        chrono::Utc.with_ymd_and_hms(2026, 11, 26, 9, 0, 0).unwrap()
    }

    #[test]
    fn cbor_round_trip() {
        let env = Envelope::new(
            7,
            at(),
            Body {
                a: 1,
                b: "x".into(),
            },
        );
        let bytes = env.to_cbor().unwrap();
        let back: Envelope<Body> = Envelope::from_cbor(&bytes, 1024).unwrap();
        assert_eq!(back, env);
        assert_eq!(Envelope::peek_id(&bytes), Some(7));
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let newer = Envelope::new(
            3,
            at(),
            NewerBody {
                a: 1,
                b: "x".into(),
                c: vec![1, 2],
            },
        );
        let bytes = newer.to_cbor().unwrap();
        let older: Envelope<Body> = Envelope::from_cbor(&bytes, 1024).unwrap();
        assert_eq!(
            older.body,
            Body {
                a: 1,
                b: "x".into()
            }
        );
    }

    #[test]
    fn malformed_oversized_and_future_payloads_are_refused() {
        assert!(matches!(
            Envelope::<Body>::from_cbor(&[0xff, 0x00, 0x13], 1024),
            Err(EnvelopeError::Malformed(_))
        ));
        let bytes = Envelope::new(
            1,
            at(),
            Body {
                a: 1,
                b: "x".repeat(100),
            },
        )
        .to_cbor()
        .unwrap();
        assert!(matches!(
            Envelope::<Body>::from_cbor(&bytes, 50),
            Err(EnvelopeError::TooLarge { max: 50, .. })
        ));
        let mut future = Envelope::new(
            1,
            at(),
            Body {
                a: 1,
                b: "x".into(),
            },
        );
        future.v = VERSION + 1;
        let bytes = future.to_cbor().unwrap();
        assert!(matches!(
            Envelope::<Body>::from_cbor(&bytes, 1024),
            Err(EnvelopeError::Version(_))
        ));
        assert_eq!(Envelope::peek_id(b"not cbor"), None);
    }

    #[test]
    fn payloads_the_guard_refuses_are_malformed_before_serde() {
        // The envelope head, then a body of maps nested as map keys, each declaring 65,535
        // entries: the shape the fuzzer found holding 250 MiB in one unguarded decode.
        let mut bytes = vec![0xa4, 0x61, b'v', 0x01, 0x62, b'i', b'd', 0x05];
        bytes.extend_from_slice(&[0x62, b'a', b't', 0x74]);
        bytes.extend_from_slice(b"2026-11-26T00:00:00Z");
        bytes.extend_from_slice(&[0x64, b'b', b'o', b'd', b'y']);
        bytes.extend(std::iter::repeat_n([0xb9, 0xff, 0xff], 40).flatten());
        match Envelope::<Body>::from_cbor(&bytes, 1024) {
            Err(EnvelopeError::Malformed(why)) => assert!(why.contains("declares 65535"), "{why}"),
            other => panic!("expected the guard's refusal, got {other:?}"),
        }
        assert_eq!(Envelope::peek_id(&bytes), None);
        // Nesting past the guard's depth, though every length is honest: serde never sees it.
        let mut deep = bytes[..bytes.len() - 40 * 3].to_vec();
        deep.extend(std::iter::repeat_n(0x81, cbor_guard::MAX_DEPTH + 1));
        deep.push(0x00);
        match Envelope::<Body>::from_cbor(&deep, 1024) {
            Err(EnvelopeError::Malformed(why)) => assert!(why.contains("deeper"), "{why}"),
            other => panic!("expected the guard's refusal, got {other:?}"),
        }
    }

    #[test]
    fn bad_body_still_yields_the_id() {
        #[derive(Serialize)]
        struct Wrong {
            zzz: bool,
        }
        let bytes = Envelope::new(42, at(), Wrong { zzz: true })
            .to_cbor()
            .unwrap();
        assert!(Envelope::<Body>::from_cbor(&bytes, 1024).is_err());
        assert_eq!(Envelope::peek_id(&bytes), Some(42));
        let from_outbox = Envelope::from_outbox(0xfeed, 43, at(), Wrong { zzz: true })
            .to_cbor()
            .unwrap();
        assert_eq!(
            Envelope::peek_seq(&from_outbox),
            Some(Seq {
                inc: 0xfeed,
                id: 43
            })
        );
    }

    #[test]
    fn the_incarnation_travels_and_an_envelope_without_one_reads_as_zero() {
        let body = Body {
            a: 1,
            b: "x".into(),
        };
        let with = Envelope::from_outbox(0xdead_beef, 9, at(), &body)
            .to_cbor()
            .unwrap();
        let back: Envelope<Body> = Envelope::from_cbor(&with, 1024).unwrap();
        assert_eq!(
            back.seq(),
            Seq {
                inc: 0xdead_beef,
                id: 9
            }
        );
        let without = Envelope::new(9, at(), &body).to_cbor().unwrap();
        assert!(
            without.len() < with.len(),
            "no field written when there is none"
        );
        let back: Envelope<Body> = Envelope::from_cbor(&without, 1024).unwrap();
        assert_eq!(back.seq(), Seq { inc: 0, id: 9 });
    }
}
