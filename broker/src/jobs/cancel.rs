//! CANCEL: a host withdraws a job.
//!
//! A job may be withdrawn while the device cannot yet have started its risky step: `queued` and
//! `delivered` (it may have the order but has not begun), and `staged` (data acquired — e.g. a
//! firmware image downloaded and waiting for its execution time, nothing written yet). Once it is
//! `in-progress` the device may be writing firmware with its relay session closed; stopping it
//! halfway is not safe, so the request is refused with that reason. Withdrawing empties the
//! retained order (and any merged data), and a device that sees its waiting job's order emptied
//! drops it.

use protocol::HostId;
use protocol::Timestamp;
use protocol::job::{JobEvent, JobStatus};

use crate::store::{JobRecord, StoreError, Txn};

/// What became of a cancel request.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The job is now `canceled`.
    Canceled { n: u64, record: Box<JobRecord> },
    /// Nothing changed, for this reason.
    Refused(String),
}

/// Cancels job `id` on behalf of `host`.
pub fn cancel(
    txn: &mut dyn Txn,
    host: &HostId,
    id: &str,
    now: Timestamp,
) -> Result<CancelOutcome, StoreError> {
    let Some((n, mut record)) = super::lookup(txn, id)? else {
        return Ok(CancelOutcome::Refused(format!(
            "no job {id} (list them with `host-agent jobs list --all`)"
        )));
    };
    let status = record.view.status;
    match status {
        JobStatus::Queued | JobStatus::Forwarded | JobStatus::Delivered | JobStatus::Staged => {}
        JobStatus::InProgress => {
            return Ok(CancelOutcome::Refused(format!(
                "{id} is in progress on the device and cannot be stopped safely"
            )));
        }
        ended => {
            return Ok(CancelOutcome::Refused(format!(
                "{id} already ended ({ended}); nothing to cancel"
            )));
        }
    }
    let note = format!("canceled by host {host} while {status}");
    record.view.status = JobStatus::Canceled;
    record.view.updated_at = now;
    record.ended_at = Some(now);
    txn.put_job(n, &record)?;
    txn.push_event(
        n,
        &JobEvent {
            at: now,
            status: JobStatus::Canceled,
            note: Some(note),
        },
    )?;
    Ok(CancelOutcome::Canceled {
        n,
        record: Box::new(record),
    })
}
