//! `host/{host}/req`: submit, list, show. Each request is answered on `host/{host}/resp` with
//! `reply_to` = its msg id, after the batch has committed. A host resends until it has a reply
//! (S222), so submissions are deduplicated by (host, msg id): a resend gets the same job back.

use protocol::host::{HostReply, HostRequest, SubmitJob};
use protocol::job::JobStatus;
use protocol::{Envelope, HostId, Identity, MsgId, Timestamp};
use tracing::{error, info, warn};

use super::{Core, Pending, views};
use crate::jobs;
use crate::store::{JobRecord, JournalEntry, JournalOutcome, StoreError, Txn, job_id, job_number};

pub(super) fn handle(
    core: &Core,
    txn: &mut Txn,
    p: &mut Pending,
    host: &HostId,
    topic: &str,
    payload: &[u8],
    now: Timestamp,
) -> Result<(), StoreError> {
    let env = match Envelope::<HostRequest>::from_cbor(payload, core.settings.max_payload_bytes) {
        Ok(env) => env,
        Err(e) => {
            let reason = e.to_string();
            warn!(host = %host, topic, reason = %reason, "refused host request");
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

fn answer(
    core: &Core,
    txn: &mut Txn,
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
                txn.jobs_newest_first(|r| all || jobs::listed_by_default(r, now, visible))?;
            Ok(HostReply::Jobs {
                jobs: jobs.into_iter().map(|r| r.view).collect(),
            })
        }
        HostRequest::Show { job } => {
            let found = match job_number(&job) {
                Some(n) => txn.job(n)?.filter(|r| r.view.id == job).map(|r| (n, r)),
                None => None,
            };
            Ok(match found {
                Some((n, record)) => HostReply::Job {
                    job: Box::new(views::detail(txn, n, &record)?),
                },
                None => HostReply::Error {
                    reason: format!("no job {job} (list them with `host-agent jobs list --all`)"),
                },
            })
        }
    }
}

fn submit(
    core: &Core,
    txn: &mut Txn,
    p: &mut Pending,
    host: &HostId,
    id: MsgId,
    req: &SubmitJob,
    now: Timestamp,
) -> Result<HostReply, StoreError> {
    let sender = Identity::host(host).to_string();
    if let Some(entry) = txn.journal(&sender, id)? {
        let JournalOutcome::Submission { job } = entry.outcome else {
            return Ok(HostReply::Error {
                reason: format!("message {id} was already used for something else"),
            });
        };
        let record = match job_number(job.as_str()) {
            Some(n) => txn.job(n)?,
            None => None,
        };
        info!(host = %host, job = %job, msg_id = id, "resent submission answered with its job");
        return Ok(match record {
            Some(record) => submission_reply(record),
            None => HostReply::Error {
                reason: format!("job {job} of this submission is missing from the store"),
            },
        });
    }
    let (n, record) = jobs::submit(txn, host, req, &core.settings.server_name, now)?;
    txn.put_journal(
        &sender,
        id,
        &JournalEntry {
            at: now,
            outcome: JournalOutcome::Submission { job: job_id(n) },
        },
    )?;
    p.new_orders.insert(n);
    p.views.insert(n);
    let view = &record.view;
    match &view.reason {
        None => info!(host = %host, job = %view.id, serial = %view.serial, "job submitted"),
        Some(reason) => {
            warn!(host = %host, job = %view.id, serial = %view.serial, reason = %reason, "submission rejected")
        }
    }
    Ok(submission_reply(record))
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
