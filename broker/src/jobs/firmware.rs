//! FIRMWARE (ISW, Fig. 6): replace a device's program with an artifact a host uploaded.
//!
//! The relay's part is small on purpose. At submission it resolves the artifact the host named
//! (an id, or a version: the newest complete artifact with it) into the [`ArtifactRef`] the order
//! carries; while the job is open it serves the chunks the device asks for on `up/fetch`, and
//! nothing else. It never checks the signature: it could not be trusted to (the device checks it
//! with the publisher key it was provisioned with), and it cannot forge one.

use std::collections::BTreeSet;

use protocol::artifact::{ArtifactId, ArtifactRef, Chunk, FetchRequest, MAX_CHUNKS_PER_FETCH};
use protocol::device::JobUpdate;
use protocol::job::JobSpec;
use protocol::validate::Rejected;
use protocol::{JobId, Serial};

use super::Staged;
use crate::store::{StoreError, Txn};

#[derive(Debug, Clone, PartialEq)]
pub struct Firmware {
    artifact: ArtifactRef,
}

impl Firmware {
    pub fn new(artifact: ArtifactRef) -> Firmware {
        Firmware { artifact }
    }

    pub fn artifact(&self) -> &ArtifactRef {
        &self.artifact
    }

    /// Downloads, writes and health checks happen on the device; the timeline and the result's
    /// note (new slot and version, or why it rolled back) are the whole record.
    pub(super) fn stage(&self, _update: &JobUpdate) -> Staged {
        Staged::default()
    }
}

/// Finds the artifact a firmware submission names: an id (64 hex digits) or a version, which
/// picks the newest complete upload with that version. `Err` is the reason the job is rejected.
pub fn resolve(txn: &dyn Txn, name: &str) -> Result<Result<ArtifactRef, Rejected>, StoreError> {
    let upload_hint =
        "upload it with `host-agent artifacts upload FILE --version V --signing-key KEY`";
    if let Ok(id) = ArtifactId::parse(name) {
        return Ok(match txn.artifact(&id)? {
            Some(info) if info.complete => Ok(info.artifact),
            Some(info) => Err(Rejected(format!(
                "artifact {id} is not completely uploaded ({} of {} chunks); resume the upload with `host-agent artifacts upload`",
                info.received,
                info.artifact.chunks()
            ))),
            None => Err(Rejected(format!(
                "artifact {id} is not on this relay; {upload_hint}"
            ))),
        });
    }
    let newest = txn
        .artifacts()?
        .into_iter()
        .filter(|a| a.complete && a.artifact.version == name)
        .max_by_key(|a| a.uploaded_at);
    Ok(match newest {
        Some(info) => Ok(info.artifact),
        None => Err(Rejected(format!(
            "no complete artifact with version {name:?} on this relay; {upload_hint} (`host-agent artifacts list` shows what is there)"
        ))),
    })
}

/// What a device's fetch gets.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchOutcome {
    /// Publish these chunks on `dev/{serial}/blob/{artifact}`. `skipped` are indices asked for
    /// that the artifact does not have (or that were over the per-fetch limit).
    Serve {
        job: JobId,
        chunks: Vec<Chunk>,
        skipped: Vec<u32>,
    },
    /// Nothing is served, for this reason.
    Refused(String),
}

/// Serves a fetch only for an open firmware job of `serial` whose artifact is the one asked for:
/// a device may download only what it was told to install.
pub fn fetch(
    txn: &dyn Txn,
    serial: &Serial,
    req: &FetchRequest,
) -> Result<FetchOutcome, StoreError> {
    let job = &req.job;
    let Some((_, record)) = super::lookup(txn, job.as_str())? else {
        return Ok(FetchOutcome::Refused(format!(
            "no job {job} on this broker"
        )));
    };
    let Some(order) = record.order.as_ref().filter(|o| &o.serial == serial) else {
        return Ok(FetchOutcome::Refused(format!(
            "job {job} is not addressed to {serial}"
        )));
    };
    if !record.is_open() {
        return Ok(FetchOutcome::Refused(format!(
            "job {job} already ended ({})",
            record.view.status
        )));
    }
    let JobSpec::Firmware { artifact } = &order.spec else {
        return Ok(FetchOutcome::Refused(format!(
            "job {job} is a {} job, not firmware",
            order.spec.kind_name()
        )));
    };
    if artifact.id != req.artifact {
        return Ok(FetchOutcome::Refused(format!(
            "job {job} installs artifact {}, not {}",
            artifact.id, req.artifact
        )));
    }
    let count = artifact.chunks();
    let mut skipped = Vec::new();
    let mut wanted = BTreeSet::new();
    for &index in &req.chunks {
        if index >= count || (wanted.len() >= MAX_CHUNKS_PER_FETCH && !wanted.contains(&index)) {
            skipped.push(index);
        } else {
            wanted.insert(index);
        }
    }
    let mut chunks = Vec::with_capacity(wanted.len());
    for index in wanted {
        match txn.chunk(&artifact.id, index)? {
            Some(data) => chunks.push(Chunk {
                artifact: artifact.id.clone(),
                index,
                data,
            }),
            // A complete artifact holds every chunk; a missing one is damage, not the device's fault.
            None => {
                return Err(StoreError::Corrupt {
                    table: "artifact_chunks",
                    key: format!("{} #{index}", artifact.id),
                    reason: "chunk of a complete artifact is missing".into(),
                });
            }
        }
    }
    Ok(FetchOutcome::Serve {
        job: job.clone(),
        chunks,
        skipped,
    })
}
