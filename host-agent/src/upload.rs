//! Publishing a firmware artifact (Fig. 6): hash, sign, and upload it chunk by chunk.
//!
//! The relay keeps artifacts by content (the SHA-256 is the id) and answers every upload step
//! with how many chunks it holds as a contiguous prefix (`ArtifactInfo::received`). The client
//! simply sends the chunk at that index next, so an upload cut by a lost link or a killed
//! process resumes where the relay's copy ends, and one the relay already has sends nothing.
//! Each chunk is one request with its reply, resent until answered ([`HostClient::request`]).
//!
//! The pure steps ([`Prepared::new`], [`chunk_range`], [`next_step`]) are apart from the network
//! loop ([`upload`]) so they can be tested on their own; the broker's `demo` calls [`upload`].

use std::ops::Range;

use protocol::artifact::{self, ArtifactId, ArtifactInfo, CHUNK_SIZE, Chunk};
use sha2::{Digest as _, Sha256};

use crate::client::{HostClient, HostError};
use crate::keys::{self, SigningKey};

/// Consecutive replies that do not move past the chunk just sent before we give up: the relay
/// is not storing what we send, and resending forever would not change that.
const MAX_STALLS: u32 = 3;

/// An artifact ready to upload: its id, version, size and signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub id: ArtifactId,
    pub version: String,
    pub size: u64,
    pub chunk_size: u32,
    /// ed25519 over `artifact::signed_message(id, version)`, 128 hex digits.
    pub signature: String,
}

impl Prepared {
    /// Hashes `bytes` and signs (id, version) with the publisher's key.
    pub fn new(bytes: &[u8], version: &str, key: &SigningKey) -> Prepared {
        let id = digest(bytes);
        let signature = keys::sign_artifact(key, &id, version);
        Prepared {
            id,
            version: version.to_owned(),
            size: bytes.len() as u64,
            chunk_size: CHUNK_SIZE,
            signature,
        }
    }

    pub fn chunks(&self) -> u32 {
        artifact::chunk_count(self.size, self.chunk_size)
    }
}

/// The artifact id of `bytes`: their SHA-256.
pub fn digest(bytes: &[u8]) -> ArtifactId {
    ArtifactId::from_digest(&Sha256::digest(bytes).into())
}

/// The bytes of chunk `index` of an artifact of `size` bytes: `chunk_size` bytes each, the last
/// one shorter. `None` past the end.
pub fn chunk_range(index: u32, size: u64, chunk_size: u32) -> Option<Range<usize>> {
    let chunk = u64::from(chunk_size.max(1));
    let start = u64::from(index).checked_mul(chunk)?;
    if start >= size {
        return None;
    }
    let end = (start + chunk).min(size);
    Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
}

/// What to do after a reply from the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send this chunk next.
    Send(u32),
    /// The relay holds the whole artifact and checked its digest.
    Done,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The broker refused (e.g. "digest mismatch…"), did not answer, or the link failed.
    #[error("{0}")]
    Host(#[from] HostError),
    #[error(
        "the relay answered about artifact {got}, not {want} — are the broker and host-agent the same version?"
    )]
    OtherArtifact { want: ArtifactId, got: ArtifactId },
    #[error(
        "the relay holds artifact {id} as {relay_size} bytes, but this file is {size}; the same SHA-256 cannot have two sizes — the relay's copy is damaged"
    )]
    SizeMismatch {
        id: ArtifactId,
        size: u64,
        relay_size: u64,
    },
    #[error(
        "the relay holds all {chunks} chunks of {id} but does not call the upload complete — check the broker's log"
    )]
    NotCompleted { id: ArtifactId, chunks: u32 },
    #[error(
        "the relay did not store chunk {index} of {id} after {MAX_STALLS} tries — check the broker's log"
    )]
    Stalled { id: ArtifactId, index: u32 },
    #[error("the relay asked for chunk {index} of {id}, which has only {chunks} chunks")]
    PastTheEnd {
        id: ArtifactId,
        index: u32,
        chunks: u32,
    },
}

/// The next step after the relay said `info` about our artifact `prepared`. The relay's chunk
/// size is the one that counts: an earlier, partial upload may have used another.
pub fn next_step(prepared: &Prepared, info: &ArtifactInfo) -> Result<Step, UploadError> {
    let relay = &info.artifact;
    if relay.id != prepared.id {
        return Err(UploadError::OtherArtifact {
            want: prepared.id.clone(),
            got: relay.id.clone(),
        });
    }
    if relay.size != prepared.size {
        return Err(UploadError::SizeMismatch {
            id: prepared.id.clone(),
            size: prepared.size,
            relay_size: relay.size,
        });
    }
    if info.complete {
        return Ok(Step::Done);
    }
    let chunks = relay.chunks();
    if info.received >= chunks {
        return Err(UploadError::NotCompleted {
            id: prepared.id.clone(),
            chunks,
        });
    }
    Ok(Step::Send(info.received))
}

/// Bytes the relay holds according to `info`, for a progress bar.
pub fn bytes_held(info: &ArtifactInfo) -> u64 {
    if info.complete {
        return info.artifact.size;
    }
    (u64::from(info.received) * u64::from(info.artifact.chunk_size)).min(info.artifact.size)
}

/// How an upload went.
#[derive(Debug, Clone, PartialEq)]
pub struct Uploaded {
    /// The relay's record at the end (complete).
    pub info: ArtifactInfo,
    /// Chunks the relay already held when we began (nonzero: a resumed upload).
    pub resumed_at: u32,
    /// Chunks sent by this call.
    pub sent: u32,
}

/// Uploads `bytes` (which `prepared` describes) over `client`: UploadBegin, then each chunk the
/// relay asks for, until it reports the artifact complete. `progress` gets the bytes the relay
/// holds after each reply.
pub async fn upload(
    client: &HostClient,
    bytes: &[u8],
    prepared: &Prepared,
    mut progress: impl FnMut(u64),
) -> Result<Uploaded, UploadError> {
    let mut info = client
        .upload_begin(
            &prepared.id,
            &prepared.version,
            prepared.size,
            prepared.chunk_size,
            &prepared.signature,
        )
        .await?;
    let resumed_at = if info.complete { 0 } else { info.received };
    progress(bytes_held(&info));
    let mut sent = 0u32;
    let mut last: Option<(u32, u32)> = None;
    loop {
        let index = match next_step(prepared, &info)? {
            Step::Done => {
                return Ok(Uploaded {
                    info,
                    resumed_at,
                    sent,
                });
            }
            Step::Send(index) => index,
        };
        let stalls = match last {
            Some((prev, n)) if prev == index => n + 1,
            _ => 0,
        };
        if stalls >= MAX_STALLS {
            return Err(UploadError::Stalled {
                id: prepared.id.clone(),
                index,
            });
        }
        last = Some((index, stalls));
        let range = chunk_range(index, prepared.size, info.artifact.chunk_size).ok_or(
            UploadError::PastTheEnd {
                id: prepared.id.clone(),
                index,
                chunks: info.artifact.chunks(),
            },
        )?;
        let chunk = Chunk {
            artifact: prepared.id.clone(),
            index,
            data: bytes[range].to_vec(),
        };
        info = client.upload_chunk(chunk).await?;
        sent += 1;
        progress(bytes_held(&info));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::artifact::ArtifactRef;

    fn prepared(size: u64) -> Prepared {
        let bytes = vec![1u8; size as usize];
        Prepared::new(&bytes, "2.1", &keys::generate())
    }

    fn info(p: &Prepared, received: u32, complete: bool) -> ArtifactInfo {
        ArtifactInfo {
            artifact: ArtifactRef {
                id: p.id.clone(),
                version: p.version.clone(),
                size: p.size,
                chunk_size: p.chunk_size,
                signature: p.signature.clone(),
                publisher: "svc".into(),
            },
            received,
            complete,
            uploaded_at: chrono::Utc::now(),
        }
    }

    /// The broker's `demo` uploads from a task on a multi-threaded runtime.
    #[test]
    fn the_upload_future_can_cross_threads() {
        fn send<T: Send>(_: T) {}
        fn check(client: &HostClient, p: &Prepared) {
            send(upload(client, &[], p, |_| {}));
        }
        let _ = check;
    }

    #[test]
    fn prepared_is_the_sha256_and_a_signature_that_verifies() {
        let key = keys::generate();
        let bytes = b"firmware image".to_vec();
        let p = Prepared::new(&bytes, "2.1", &key);
        // sha256("firmware image"), computed independently.
        let want = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        assert_eq!(p.id.as_str(), want);
        assert_eq!((p.size, p.chunk_size, p.chunks()), (14, CHUNK_SIZE, 1));
        keys::verify_artifact(&key.verifying_key(), &p.id, "2.1", &p.signature).unwrap();
    }

    #[test]
    fn chunks_cover_the_file_exactly_once() {
        let cases: [(u32, u64, u32, Option<Range<usize>>); 8] = [
            (0, 10, 4, Some(0..4)),
            (1, 10, 4, Some(4..8)),
            (2, 10, 4, Some(8..10)), // the last one is short
            (3, 10, 4, None),
            (0, 8, 4, Some(0..4)),
            (2, 8, 4, None), // exact multiple: no empty last chunk
            (0, 0, 4, None),
            (u32::MAX, 10, u32::MAX, None),
        ];
        for (index, size, chunk, want) in cases {
            assert_eq!(
                chunk_range(index, size, chunk),
                want,
                "{index} {size} {chunk}"
            );
        }
        let size = 3 * u64::from(CHUNK_SIZE) + 17;
        let mut covered = 0;
        let n = artifact::chunk_count(size, CHUNK_SIZE);
        assert_eq!(n, 4);
        for i in 0..n {
            let r = chunk_range(i, size, CHUNK_SIZE).unwrap();
            assert_eq!(r.start, covered);
            covered = r.end;
        }
        assert_eq!(covered as u64, size);
    }

    #[test]
    fn the_next_chunk_is_the_relays_received_count() {
        let p = prepared(3 * u64::from(CHUNK_SIZE) + 1); // 4 chunks
        assert_eq!(next_step(&p, &info(&p, 0, false)).unwrap(), Step::Send(0));
        // A resumed upload: the relay holds chunks 0..2, so we start at 2.
        assert_eq!(next_step(&p, &info(&p, 2, false)).unwrap(), Step::Send(2));
        assert_eq!(next_step(&p, &info(&p, 3, false)).unwrap(), Step::Send(3));
        assert_eq!(next_step(&p, &info(&p, 4, true)).unwrap(), Step::Done);
        // Already complete at UploadBegin: nothing to send.
        assert_eq!(next_step(&p, &info(&p, 4, true)).unwrap(), Step::Done);
        assert!(matches!(
            next_step(&p, &info(&p, 4, false)),
            Err(UploadError::NotCompleted { chunks: 4, .. })
        ));
    }

    #[test]
    fn the_relays_chunk_size_wins_and_its_record_must_match_the_file() {
        let p = prepared(100);
        let mut other = info(&p, 1, false);
        other.artifact.chunk_size = 40; // an earlier partial upload used 40-byte chunks
        assert_eq!(next_step(&p, &other).unwrap(), Step::Send(1));
        assert_eq!(bytes_held(&other), 40);
        let mut wrong_size = info(&p, 0, false);
        wrong_size.artifact.size = 99;
        assert!(matches!(
            next_step(&p, &wrong_size),
            Err(UploadError::SizeMismatch { .. })
        ));
        let mut wrong_id = info(&p, 0, false);
        wrong_id.artifact.id = ArtifactId::from_digest(&[0; 32]);
        assert!(matches!(
            next_step(&p, &wrong_id),
            Err(UploadError::OtherArtifact { .. })
        ));
    }

    #[test]
    fn progress_counts_held_bytes() {
        let p = prepared(u64::from(CHUNK_SIZE) + 10);
        assert_eq!(bytes_held(&info(&p, 0, false)), 0);
        assert_eq!(bytes_held(&info(&p, 1, false)), u64::from(CHUNK_SIZE));
        assert_eq!(
            bytes_held(&info(&p, 2, false)),
            p.size,
            "capped at the size"
        );
        assert_eq!(bytes_held(&info(&p, 2, true)), p.size);
    }
}
