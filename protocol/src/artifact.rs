//! Firmware artifacts (the seed's ISW data, Fig. 6): content-addressed by SHA-256, uploaded by a
//! host in chunks, served to devices chunk by chunk, and signed by the publisher (a host's
//! ed25519 key) so that the relay, which stores and forwards them, cannot forge one.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::ids::{IdError, JobId};

/// Bytes per chunk: well under the broker's default payload limit (64 KiB) with room for the envelope.
pub const CHUNK_SIZE: u32 = 32 * 1024;
/// The largest artifact the relay accepts (the limit of a real copier's firmware is far below).
pub const MAX_ARTIFACT_BYTES: u64 = 256 * 1024 * 1024;
/// Most chunks a device may ask for in one fetch.
pub const MAX_CHUNKS_PER_FETCH: usize = 64;

/// An artifact's id: its SHA-256 digest as 64 lowercase hex digits (also a valid topic level).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ArtifactId(String);

impl ArtifactId {
    pub fn parse(s: &str) -> Result<ArtifactId, IdError> {
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(IdError::BadArtifact(s.to_owned()));
        }
        Ok(ArtifactId(s.to_owned()))
    }

    /// From the raw 32-byte digest.
    pub fn from_digest(digest: &[u8; 32]) -> ArtifactId {
        ArtifactId(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The raw digest.
    pub fn digest(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            // parse() admitted only hex digits, so this cannot fail.
            *byte = u8::from_str_radix(&self.0[i * 2..i * 2 + 2], 16).unwrap_or(0);
        }
        out
    }
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ArtifactId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ArtifactId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The bytes a publisher signs: a domain tag, the digest and the version, so a signature for one
/// version can never be replayed for another image or another purpose.
pub fn signed_message(artifact: &ArtifactId, version: &str) -> Vec<u8> {
    let mut msg = b"chukei firmware v1\0".to_vec();
    msg.extend_from_slice(&artifact.digest());
    msg.extend_from_slice(version.as_bytes());
    msg
}

/// Everything a device needs to fetch and check an artifact; carried in a firmware job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub id: ArtifactId,
    pub version: String,
    pub size: u64,
    pub chunk_size: u32,
    /// ed25519 signature over [`signed_message`], 128 hex digits.
    pub signature: String,
    /// The host that published (signed) it.
    pub publisher: String,
}

impl ArtifactRef {
    pub fn chunks(&self) -> u32 {
        chunk_count(self.size, self.chunk_size)
    }
}

pub fn chunk_count(size: u64, chunk_size: u32) -> u32 {
    let chunk = u64::from(chunk_size.max(1));
    u32::try_from(size.div_ceil(chunk)).unwrap_or(u32::MAX)
}

/// An artifact as the relay lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    #[serde(flatten)]
    pub artifact: ArtifactRef,
    /// Chunks the relay holds; equal to the chunk count once the upload is complete.
    pub received: u32,
    pub complete: bool,
    pub uploaded_at: Timestamp,
}

/// A device asks for chunks of an artifact on `dev/{serial}/up/fetch`. Not kept in the outbox: a
/// lost fetch is simply asked again, and the device asks only for chunks it does not hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub job: JobId,
    pub artifact: ArtifactId,
    pub chunks: Vec<u32>,
}

/// One chunk, on `dev/{serial}/blob/{artifact}` (broker → device) and in a host's upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub artifact: ArtifactId,
    pub index: u32,
    #[serde(with = "serde_bytes_compat")]
    pub data: Vec<u8>,
}

/// CBOR byte strings rather than arrays of integers: half the size on the wire.
pub(crate) mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_ids_are_lowercase_sha256_hex() {
        let digest = [0xabu8; 32];
        let id = ArtifactId::from_digest(&digest);
        assert_eq!(id.as_str().len(), 64);
        assert_eq!(id.digest(), digest);
        assert_eq!(ArtifactId::parse(id.as_str()).unwrap(), id);
        assert!(ArtifactId::parse("AB").is_err());
        assert!(ArtifactId::parse(&"A".repeat(64)).is_err());
        assert!(ArtifactId::parse(&"g".repeat(64)).is_err());
    }

    #[test]
    fn chunks_use_cbor_byte_strings() {
        let c = Chunk {
            artifact: ArtifactId::from_digest(&[1; 32]),
            index: 3,
            data: vec![7; 1000],
        };
        let mut cbor = Vec::new();
        ciborium::into_writer(&c, &mut cbor).unwrap();
        assert!(cbor.len() < 1200, "{} bytes", cbor.len());
        let back: Chunk = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn signed_message_binds_digest_and_version() {
        let a = ArtifactId::from_digest(&[1; 32]);
        let b = ArtifactId::from_digest(&[2; 32]);
        assert_ne!(signed_message(&a, "1.0"), signed_message(&a, "1.1"));
        assert_ne!(signed_message(&a, "1.0"), signed_message(&b, "1.0"));
    }

    #[test]
    fn chunk_counts() {
        assert_eq!(chunk_count(0, 10), 0);
        assert_eq!(chunk_count(10, 10), 1);
        assert_eq!(chunk_count(11, 10), 2);
    }
}
