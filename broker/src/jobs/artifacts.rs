//! Firmware artifacts on the relay: a host uploads one in chunks (`UploadBegin`, then
//! `UploadChunk` per chunk), firmware jobs name it, devices fetch it (see [`super::firmware`]).
//!
//! Uploads resume: chunks are accepted strictly in order, so what the relay holds is always a
//! contiguous prefix and `received` tells the host where to go on after a cut link. A resent chunk
//! (the host resends until it has a reply) is answered again without being stored twice. On the
//! last chunk the whole artifact is hashed: if it does not hash to its id the upload is dropped,
//! so a damaged upload can never become an artifact a job installs.

use protocol::artifact::{
    ArtifactId, ArtifactInfo, ArtifactRef, CHUNK_SIZE, Chunk, MAX_ARTIFACT_BYTES, chunk_count,
};
use protocol::validate::Rejected;
use protocol::{HostId, Timestamp};
use sha2::{Digest, Sha256};

use crate::store::{StoreError, Txn};

/// Most chunks one artifact may have: the largest artifact in full-size chunks. Bounds the rows an
/// upload with a tiny chunk size could create.
pub const MAX_CHUNKS: u32 = (MAX_ARTIFACT_BYTES / CHUNK_SIZE as u64) as u32;
/// Longest version text.
pub const MAX_VERSION_LEN: usize = 64;

/// A host's `UploadBegin`, as sent.
#[derive(Debug, Clone, Copy)]
pub struct UploadBegin<'a> {
    pub artifact: &'a str,
    pub version: &'a str,
    pub size: u64,
    pub chunk_size: u32,
    pub signature: &'a str,
}

/// What `UploadBegin` did.
#[derive(Debug, Clone, PartialEq)]
pub enum BeginOutcome {
    /// A new upload (or one restarted because the host announced other metadata).
    Started(ArtifactInfo),
    /// The relay already has (part of) it: `received` chunks, or all of them if `complete`.
    Resumed(ArtifactInfo),
}

impl BeginOutcome {
    pub fn info(&self) -> &ArtifactInfo {
        match self {
            BeginOutcome::Started(i) | BeginOutcome::Resumed(i) => i,
        }
    }
}

/// Starts or resumes an upload. `Err` is the reason for the host's error reply.
pub fn begin(
    txn: &mut dyn Txn,
    host: &HostId,
    req: &UploadBegin<'_>,
    now: Timestamp,
) -> Result<Result<BeginOutcome, Rejected>, StoreError> {
    let announced = match check_begin(host, req) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    let id = announced.id.clone();
    match txn.artifact(&id)? {
        Some(info) if info.complete => {
            let a = &info.artifact;
            if a.version == announced.version
                && a.signature == announced.signature
                && a.size == announced.size
            {
                Ok(Ok(BeginOutcome::Resumed(info)))
            } else {
                Ok(Err(Rejected(format!(
                    "artifact {id} is already on this relay as version {:?} with another signature or size; the same bytes cannot be published twice",
                    a.version
                ))))
            }
        }
        Some(info) if same_upload(&info.artifact, &announced) => {
            Ok(Ok(BeginOutcome::Resumed(info)))
        }
        existing => {
            // New, or begun before with other metadata: start over, so the chunks held always
            // match the chunk size announced.
            if existing.is_some() {
                txn.remove_chunks(&id)?;
            }
            let info = ArtifactInfo {
                artifact: announced,
                received: 0,
                complete: false,
                uploaded_at: now,
            };
            txn.put_artifact(&info)?;
            Ok(Ok(BeginOutcome::Started(info)))
        }
    }
}

fn same_upload(a: &ArtifactRef, b: &ArtifactRef) -> bool {
    a.version == b.version
        && a.signature == b.signature
        && a.size == b.size
        && a.chunk_size == b.chunk_size
}

/// Checks every field of an `UploadBegin`; the error names the field and what would do.
fn check_begin(host: &HostId, req: &UploadBegin<'_>) -> Result<ArtifactRef, Rejected> {
    let id = ArtifactId::parse(req.artifact).map_err(|_| {
        Rejected(format!(
            "artifact {:?} is not an artifact id: give the SHA-256 of the file as 64 lowercase hex digits",
            req.artifact
        ))
    })?;
    let version = req.version;
    if version.is_empty()
        || version.len() > MAX_VERSION_LEN
        || !version.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Rejected(format!(
            "version {version:?} is not valid: use 1 to {MAX_VERSION_LEN} printable ASCII characters without spaces, e.g. 2.1.0"
        )));
    }
    if req.size == 0 || req.size > MAX_ARTIFACT_BYTES {
        return Err(Rejected(format!(
            "size {} is out of range: an artifact has 1 to {MAX_ARTIFACT_BYTES} bytes",
            req.size
        )));
    }
    if req.chunk_size == 0 || req.chunk_size > CHUNK_SIZE {
        return Err(Rejected(format!(
            "chunk_size {} is out of range: use 1 to {CHUNK_SIZE}",
            req.chunk_size
        )));
    }
    let chunks = chunk_count(req.size, req.chunk_size);
    if chunks > MAX_CHUNKS {
        return Err(Rejected(format!(
            "{chunks} chunks of {} bytes is too many: use a chunk_size of at least {}",
            req.chunk_size,
            req.size.div_ceil(u64::from(MAX_CHUNKS))
        )));
    }
    let sig = req.signature;
    if sig.len() != 128 || !sig.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Rejected(format!(
            "signature is not an ed25519 signature in hex (128 hex digits, got {} characters); sign with `host-agent artifacts upload --signing-key`",
            sig.len()
        )));
    }
    Ok(ArtifactRef {
        id,
        version: version.to_owned(),
        size: req.size,
        chunk_size: req.chunk_size,
        signature: sig.to_ascii_lowercase(),
        publisher: host.to_string(),
    })
}

/// The size chunk `index` of `a` must have: `chunk_size`, except the last, which has the rest.
pub fn expected_len(a: &ArtifactRef, index: u32) -> u64 {
    let chunk = u64::from(a.chunk_size);
    let start = u64::from(index) * chunk;
    a.size.saturating_sub(start).min(chunk)
}

/// What `UploadChunk` did.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkOutcome {
    /// Stored, or already held (a resend): where the upload stands.
    Progress(ArtifactInfo),
    /// This chunk was the last and the artifact hashes to its id: it may be installed now.
    Completed(ArtifactInfo),
    /// The last chunk arrived but the bytes do not hash to the id: every chunk was dropped.
    DigestMismatch {
        artifact: ArtifactId,
        reason: String,
    },
    /// The chunk was not stored, for this reason (the upload stays as it was).
    Refused(String),
}

/// Stores one chunk of an upload that was begun. Chunks are taken in order only.
pub fn chunk(txn: &mut dyn Txn, chunk: &Chunk, now: Timestamp) -> Result<ChunkOutcome, StoreError> {
    let id = &chunk.artifact;
    let index = chunk.index;
    let Some(mut info) = txn.artifact(id)? else {
        return Ok(ChunkOutcome::Refused(format!(
            "no upload of artifact {id} was begun: send UploadBegin first (`host-agent artifacts upload` does)"
        )));
    };
    let count = info.artifact.chunks();
    if info.complete || index < info.received {
        // A resend of something already held; its reply may have been lost.
        return Ok(ChunkOutcome::Progress(info));
    }
    if index >= count {
        return Ok(ChunkOutcome::Refused(format!(
            "chunk {index} of artifact {id} does not exist: it has {count} chunks (0 to {})",
            count.saturating_sub(1)
        )));
    }
    if index > info.received {
        return Ok(ChunkOutcome::Refused(format!(
            "chunk {index} of artifact {id} is out of order: the relay holds chunks 0 to {} and takes chunk {} next",
            i64::from(info.received) - 1,
            info.received
        )));
    }
    let want = expected_len(&info.artifact, index);
    if chunk.data.len() as u64 != want {
        return Ok(ChunkOutcome::Refused(format!(
            "chunk {index} of artifact {id} has {} bytes; it must have {want} (chunk_size {}, size {})",
            chunk.data.len(),
            info.artifact.chunk_size,
            info.artifact.size
        )));
    }

    txn.put_chunk(id, index, &chunk.data)?;
    info.received += 1;
    if info.received < count {
        txn.put_artifact(&info)?;
        return Ok(ChunkOutcome::Progress(info));
    }
    // The last chunk: hash everything held, in order (this transaction sees its own writes).
    let mut hasher = Sha256::new();
    let held = txn.visit_chunks(id, &mut |_, data| hasher.update(data))?;
    let digest: [u8; 32] = hasher.finalize().into();
    if held != count || digest != id.digest() {
        txn.remove_artifact(id)?;
        return Ok(ChunkOutcome::DigestMismatch {
            artifact: id.clone(),
            reason: format!(
                "digest mismatch: the uploaded bytes do not hash to {id}; upload again"
            ),
        });
    }
    info.complete = true;
    info.uploaded_at = now;
    txn.put_artifact(&info)?;
    Ok(ChunkOutcome::Completed(info))
}

/// Every artifact, newest first.
pub fn list(txn: &dyn Txn) -> Result<Vec<ArtifactInfo>, StoreError> {
    let mut all = txn.artifacts()?;
    all.sort_by_key(|a| std::cmp::Reverse(a.uploaded_at));
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostId {
        HostId::parse("svc").unwrap()
    }

    fn begin_req(size: u64, chunk_size: u32) -> UploadBegin<'static> {
        UploadBegin {
            artifact: "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12",
            version: "2.0.0",
            size,
            chunk_size,
            signature: "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        }
    }

    #[test]
    fn every_field_of_upload_begin_is_checked() {
        let cases: Vec<(UploadBegin<'static>, &str)> = vec![
            (
                UploadBegin {
                    artifact: "abc",
                    ..begin_req(10, 10)
                },
                "not an artifact id",
            ),
            (
                UploadBegin {
                    version: "",
                    ..begin_req(10, 10)
                },
                "version \"\" is not valid",
            ),
            (
                UploadBegin {
                    version: "1 0",
                    ..begin_req(10, 10)
                },
                "without spaces",
            ),
            (begin_req(0, 10), "size 0 is out of range"),
            (begin_req(MAX_ARTIFACT_BYTES + 1, 10), "is out of range"),
            (begin_req(10, 0), "chunk_size 0"),
            (begin_req(10, CHUNK_SIZE + 1), "chunk_size 32769"),
            (begin_req(MAX_ARTIFACT_BYTES, 1), "too many"),
            (
                UploadBegin {
                    signature: "abcd",
                    ..begin_req(10, 10)
                },
                "128 hex digits",
            ),
        ];
        for (req, want) in cases {
            let err = check_begin(&host(), &req).unwrap_err().0;
            assert!(
                err.contains(want),
                "{req:?}: {err:?} should contain {want:?}"
            );
        }
        let ok = check_begin(&host(), &begin_req(10, 4)).unwrap();
        assert_eq!((ok.chunks(), ok.publisher.as_str()), (3, "svc"));
    }

    #[test]
    fn chunk_lengths_are_full_except_the_last() {
        let a = check_begin(&host(), &begin_req(10, 4)).unwrap();
        let lens: Vec<_> = (0..4).map(|i| expected_len(&a, i)).collect();
        assert_eq!(lens, [4, 4, 2, 0]);
        let a = check_begin(&host(), &begin_req(8, 4)).unwrap();
        assert_eq!(expected_len(&a, 1), 4);
    }
}
