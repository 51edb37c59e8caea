//! The versioned CBOR envelope every message travels in (DESIGN D4).
//!
//! Unknown fields are ignored on decode so that old and new agents interoperate; a newer major
//! version is refused with a clear reason. The envelope's `id` is the sender's message number
//! (DESIGN D3): the receiver can read it with [`Envelope::peek_id`] even when the body is bad, so
//! a rejection can still be acknowledged and the sender can stop resending.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{MsgId, Timestamp};

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
}

impl<T> Envelope<T> {
    pub fn new(id: MsgId, at: Timestamp, body: T) -> Self {
        Self {
            v: VERSION,
            id,
            at,
            body,
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
    /// Decodes a payload, refusing anything over `max_bytes` before parsing it.
    pub fn from_cbor(bytes: &[u8], max_bytes: usize) -> Result<Self, EnvelopeError> {
        if bytes.len() > max_bytes {
            return Err(EnvelopeError::TooLarge {
                len: bytes.len(),
                max: max_bytes,
            });
        }
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
    /// rejected. `None` when even the envelope head is unreadable.
    pub fn peek_id(bytes: &[u8]) -> Option<MsgId> {
        ciborium::from_reader::<Head, _>(bytes).ok().map(|h| h.id)
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
    }
}
