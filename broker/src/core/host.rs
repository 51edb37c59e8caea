//! `host/{host}/req`: submit, list, show, cancel, uploads and the artifact list. Each request is
//! answered on `host/{host}/resp` with `reply_to` = its msg id, after the batch has committed.
//!
//! A host resends until it has a reply (S222), so every request must give the same answer when
//! resent: submissions and cancels are deduplicated by (host, msg id) in the journal, and upload
//! steps are idempotent by themselves (a chunk already held is answered, not stored again).

use protocol::artifact::Chunk;
use protocol::host::{HostReply, HostRequest, SubmitJob};
use protocol::job::JobStatus;
use protocol::{Envelope, HostId, Identity, JobId, MsgId, Shown, Timestamp};
use tracing::{error, info, warn};

use super::{Core, Done, Pending, views};
use crate::jobs;
use crate::jobs::artifacts::{self, BeginOutcome, ChunkOutcome, UploadBegin};
use crate::jobs::cancel::{self, CancelOutcome};
use crate::store::{JobRecord, JournalEntry, JournalOutcome, StoreError, Txn, job_id};

pub(super) fn handle(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    host: &HostId,
    topic: &str,
    payload: &[u8],
    now: Timestamp,
) -> Result<(), StoreError> {
    let env = match super::decode::<HostRequest>(payload, core.settings.max_payload_bytes) {
        Ok(env) => env,
        Err(e) => {
            let reason = e.to_string();
            warn!(host = %host, topic, reason = %Shown(&reason), "refused host request");
            let reply_to = Envelope::peek_id(payload).unwrap_or(0);
            return p.reply(host, reply_to, HostReply::Error { reason }, now);
        }
    };
    let id = env.id;
    let reply = match answer(core, txn, p, host, id, env.body, now) {
        Ok(reply) => reply,
        Err(e) if e.is_corrupt_record() => {
            error!(host = %host, msg_id = id, error = %e, "cannot answer host request: a store record is corrupt");
            HostReply::Error {
                reason: format!("the broker could not read its store ({e}); tell its operator"),
            }
        }
        Err(e) => return Err(e),
    };
    p.reply(host, id, reply, now)
}

/// [`handle`] while the store cannot write: a read is answered if the store can still be read, a
/// request that would write is answered with `refusal`. Returns whether the request was served.
#[allow(clippy::too_many_arguments)] // one call site; mirrors `handle`
pub(super) fn handle_refusing(
    core: &Core,
    txn: Option<&mut dyn Txn>,
    p: &mut Pending,
    host: &HostId,
    topic: &str,
    payload: &[u8],
    refusal: &str,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let env = match super::decode::<HostRequest>(payload, core.settings.max_payload_bytes) {
        Ok(env) => env,
        Err(e) => {
            let reason = e.to_string();
            warn!(host = %host, topic, reason = %Shown(&reason), "refused host request");
            let reply_to = Envelope::peek_id(payload).unwrap_or(0);
            p.reply(host, reply_to, HostReply::Error { reason }, now)?;
            return Ok(true);
        }
    };
    let id = env.id;
    let (reply, served) = match txn {
        Some(txn) if only_reads(&env.body) => match answer(core, txn, p, host, id, env.body, now) {
            Ok(reply) => (reply, true),
            Err(e) if e.is_storage() || e.is_corrupt_record() => (
                HostReply::Error {
                    reason: format!("{refusal} (reading failed too: {e})"),
                },
                false,
            ),
            Err(e) => return Err(e),
        },
        _ => (
            HostReply::Error {
                reason: refusal.to_owned(),
            },
            false,
        ),
    };
    p.reply(host, id, reply, now)?;
    Ok(served)
}

/// Requests answered from the store without writing to it: still served while it cannot write.
fn only_reads(request: &HostRequest) -> bool {
    match request {
        HostRequest::List { .. }
        | HostRequest::Show { .. }
        | HostRequest::Artifacts
        | HostRequest::Alarms { .. }
        | HostRequest::Relays
        | HostRequest::ExportCounters { .. }
        | HostRequest::Rollouts
        | HostRequest::ShowRollout { .. }
        | HostRequest::Devices { .. } => true,
        HostRequest::Submit(_)
        | HostRequest::Cancel { .. }
        | HostRequest::UploadBegin { .. }
        | HostRequest::UploadChunk { .. }
        | HostRequest::AckAlarm { .. }
        | HostRequest::CreateRollout { .. }
        | HostRequest::ActOnRollout { .. }
        | HostRequest::TagDevices { .. } => false,
    }
}

fn answer(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    host: &HostId,
    id: MsgId,
    request: HostRequest,
    now: Timestamp,
) -> Result<HostReply, StoreError> {
    match request {
        HostRequest::Submit(req) => submit(core, txn, p, host, id, &req, now),
        HostRequest::List { all } => {
            let visible = core.settings.finished_visible;
            let jobs =
                txn.jobs_newest_first(&mut |r| all || jobs::listed_by_default(r, now, visible))?;
            Ok(HostReply::Jobs {
                jobs: jobs.into_iter().map(|r| r.view).collect(),
            })
        }
        HostRequest::Show { job } => Ok(match jobs::lookup(txn, &job)? {
            Some((n, record)) => HostReply::Job {
                job: Box::new(views::detail(txn, n, &record)?),
            },
            None => HostReply::Error {
                reason: format!("no job {job} (list them with `host-agent jobs list --all`)"),
            },
        }),
        HostRequest::Cancel { job } => cancel(txn, p, host, id, &job, now),
        HostRequest::UploadBegin {
            artifact,
            version,
            size,
            chunk_size,
            signature,
        } => {
            let req = UploadBegin {
                artifact: &artifact,
                version: &version,
                size,
                chunk_size,
                signature: &signature,
            };
            Ok(match artifacts::begin(txn, host, &req, now)? {
                Ok(outcome) => {
                    let info = outcome.info().clone();
                    if matches!(outcome, BeginOutcome::Started(_)) || !info.complete {
                        p.done.push(Done::UploadBegun {
                            host: host.clone(),
                            artifact: info.artifact.id.clone(),
                            version: info.artifact.version.clone(),
                            received: info.received,
                            chunks: info.artifact.chunks(),
                            complete: info.complete,
                        });
                    }
                    HostReply::Upload { artifact: info }
                }
                Err(rejected) => {
                    warn!(host = %host, artifact = %artifact, reason = %Shown(&rejected), "upload refused");
                    HostReply::Error { reason: rejected.0 }
                }
            })
        }
        HostRequest::UploadChunk { chunk } => upload_chunk(txn, p, host, &chunk, now),
        HostRequest::Artifacts => Ok(HostReply::Artifacts {
            artifacts: artifacts::list(txn)?,
        }),
        HostRequest::Alarms { all, serial } => super::alarm::list(txn, all, serial.as_deref()),
        HostRequest::Relays => Ok(HostReply::Relays {
            relays: core.relay_views(),
        }),
        HostRequest::AckAlarm { id } => super::alarm::ack(txn, p, host, &id, now),
        HostRequest::ExportCounters {
            from,
            to,
            after,
            serial,
        } => super::meter::export(txn, &from, &to, after.as_deref(), serial.as_deref()),
        HostRequest::CreateRollout { rollout } => {
            super::rollout::create(core, txn, p, host, id, &rollout, now)
        }
        HostRequest::Rollouts => super::rollout::list(txn),
        HostRequest::ShowRollout { rollout } => super::rollout::show(txn, &rollout),
        HostRequest::ActOnRollout { rollout, action } => {
            super::rollout::act(core, txn, p, host, &rollout, action, now)
        }
        HostRequest::Devices { targets } => super::rollout::devices(txn, &targets),
        HostRequest::TagDevices {
            serials,
            add,
            remove,
        } => super::rollout::tag(txn, host, &serials, &add, &remove),
    }
}

/// Withdraws a job (see [`cancel`]). Journaled like a submission, so a resend after the job was
/// canceled gets `Canceled` again rather than "already ended".
fn cancel(
    txn: &mut dyn Txn,
    p: &mut Pending,
    host: &HostId,
    id: MsgId,
    job: &str,
    now: Timestamp,
) -> Result<HostReply, StoreError> {
    let replayed = replay(txn, host, id, |outcome| match outcome {
        JournalOutcome::Cancel { job } => Some(job),
        _ => None,
    })?;
    if let Some(answer) = replayed {
        return Ok(answer.map_or_else(|e| e, |record| HostReply::Canceled { job: record.view }));
    }
    match cancel::cancel(txn, host, job, now)? {
        CancelOutcome::Canceled { n, record } => {
            remember(
                txn,
                host,
                id,
                JournalOutcome::Cancel { job: job_id(n) },
                now,
            )?;
            p.ended.insert(n);
            p.views.insert(n);
            p.done.push(Done::Canceled {
                host: host.clone(),
                serial: record.view.serial.clone(),
                job: record.view.id.clone(),
            });
            Ok(HostReply::Canceled { job: record.view })
        }
        CancelOutcome::Refused(reason) => {
            warn!(host = %host, job = %Shown(job), reason = %Shown(&reason), "cancel refused");
            Ok(HostReply::Error { reason })
        }
    }
}

fn upload_chunk(
    txn: &mut dyn Txn,
    p: &mut Pending,
    host: &HostId,
    chunk: &Chunk,
    now: Timestamp,
) -> Result<HostReply, StoreError> {
    Ok(match artifacts::chunk(txn, chunk, now)? {
        ChunkOutcome::Progress(info) => HostReply::Upload { artifact: info },
        ChunkOutcome::Completed(info) => {
            p.done.push(Done::UploadComplete {
                host: host.clone(),
                artifact: info.artifact.id.clone(),
                version: info.artifact.version.clone(),
                size: info.artifact.size,
            });
            HostReply::Upload { artifact: info }
        }
        ChunkOutcome::DigestMismatch { artifact, reason } => {
            p.done.push(Done::UploadDropped {
                host: host.clone(),
                artifact,
            });
            HostReply::Error { reason }
        }
        ChunkOutcome::Refused(reason) => {
            warn!(host = %host, artifact = %chunk.artifact, index = chunk.index, reason = %Shown(&reason), "upload chunk refused");
            HostReply::Error { reason }
        }
    })
}

fn submit(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    host: &HostId,
    id: MsgId,
    req: &SubmitJob,
    now: Timestamp,
) -> Result<HostReply, StoreError> {
    let replayed = replay(txn, host, id, |outcome| match outcome {
        JournalOutcome::Submission { job } => Some(job),
        _ => None,
    })?;
    if let Some(answer) = replayed {
        if let Ok(record) = &answer {
            info!(host = %host, job = %record.view.id, msg_id = id, "resent submission answered with its job");
        }
        return Ok(answer.map_or_else(|e| e, submission_reply));
    }
    let relays = core.relay_settings();
    let via_check = |via: &protocol::RelayId, serial: &protocol::Serial| {
        if relays.assignments.allows(via, serial) {
            Ok(())
        } else if relays.assignments.knows(via) {
            Err(format!(
                "child relay {via} may not serve {serial}: its [[relays]] serials do not match"
            ))
        } else {
            Err(format!(
                "no child relay {via} in this relay's [[relays]] (see `host-agent relays list`)"
            ))
        }
    };
    let (n, record) = jobs::submit(
        txn,
        host,
        req,
        &core.settings.server_name,
        &core.defaults(),
        &via_check,
        now,
    )?;
    if let (Some(via), Some(order)) = (&req.via, &record.order) {
        // Accepted, so `via` is a child that may serve the device: its orders go there now.
        if let Ok(via) = protocol::RelayId::parse(via) {
            core.route_through(&order.serial, &via);
        }
    }
    remember(
        txn,
        host,
        id,
        JournalOutcome::Submission { job: job_id(n) },
        now,
    )?;
    p.new_orders.insert(n);
    p.views.insert(n);
    p.done.push(Done::Submitted {
        host: host.clone(),
        serial: record.view.serial.clone(),
        job: record.view.id.clone(),
        rejected: record.view.reason.clone(),
    });
    Ok(submission_reply(record))
}

/// Journals what the host's request `id` did, so that its resend (the answer lost) gets the same
/// answer from [`replay`] instead of being done again.
fn remember(
    txn: &mut dyn Txn,
    host: &HostId,
    id: MsgId,
    outcome: JournalOutcome,
    now: Timestamp,
) -> Result<(), StoreError> {
    let sender = Identity::host(host).to_string();
    txn.put_journal(&sender, id, &JournalEntry { at: now, outcome })
}

/// The answer to a host's request the relay has handled before: the job record its first sending
/// made or touched (`job_of` reads it from the journal entry), so a resend gets the same job and
/// never does anything twice. `None` for a request not seen before; `Some(Err(reply))` when the id
/// was used for another kind of request, or the job is gone.
fn replay(
    txn: &dyn Txn,
    host: &HostId,
    id: MsgId,
    job_of: impl Fn(JournalOutcome) -> Option<JobId>,
) -> Result<Option<Result<JobRecord, HostReply>>, StoreError> {
    let sender = Identity::host(host).to_string();
    let Some(entry) = txn.journal(&sender, id)? else {
        return Ok(None);
    };
    let Some(job) = job_of(entry.outcome) else {
        return Ok(Some(Err(HostReply::Error {
            reason: format!("message {id} was already used for something else"),
        })));
    };
    Ok(Some(match jobs::lookup(txn, job.as_str())? {
        Some((_, record)) => Ok(record),
        None => Err(HostReply::Error {
            reason: format!("job {job} of this request is missing from the store"),
        }),
    }))
}

fn submission_reply(record: JobRecord) -> HostReply {
    match (record.view.status, record.view.reason.clone()) {
        (JobStatus::Rejected, reason) => HostReply::Rejected {
            reason: reason.unwrap_or_else(|| "rejected".into()),
            job: record.view,
        },
        _ => HostReply::Submitted { job: record.view },
    }
}
