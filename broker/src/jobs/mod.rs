//! Jobs: submitting them (S102–S105), applying what devices report about them (S112–S116), timing
//! them out, and which of them the default list shows (Fig. 9).
//!
//! The life cycle common to every job lives here; what differs between kinds (what a device's
//! result means, what is stored for it) lives in one file per kind, reached through [`JobKind`].
//! Every function works inside the caller's [`Txn`], so a batch of messages commits as one.
//!
//! Each function that writes does all its reading (and so meets any corrupt record) before its
//! first write: a caller that skips a message on [`StoreError::is_corrupt_record`] never leaves
//! half of that message in the transaction.

pub mod artifacts;
pub mod cancel;
pub mod firmware;
pub mod get_data;
pub mod set_schedule;
pub mod update_data;

use std::time::Duration;

use protocol::device::JobUpdate;
use protocol::host::SubmitJob;
use protocol::job::{JobEvent, JobOrder, JobSpec, JobStatus, JobView};
use protocol::validate::{self, Rejected, SpecDraft, ValidSubmission};
use protocol::{HostId, JobId, Serial, Timestamp};
use tracing::warn;

use crate::store::{JobRecord, StoreError, Txn, job_id, job_number};

/// One job kind's behaviour: a variant per kind, a file per kind.
#[derive(Debug, Clone, PartialEq)]
pub enum JobKind {
    GetData(get_data::GetData),
    UpdateData(update_data::UpdateData),
    Firmware(firmware::Firmware),
    SetSchedule(set_schedule::SetSchedule),
}

impl JobKind {
    pub fn of(spec: &JobSpec) -> JobKind {
        match spec {
            JobSpec::GetData { sections } => {
                JobKind::GetData(get_data::GetData::new(sections.clone()))
            }
            JobSpec::UpdateData { values, .. } => {
                JobKind::UpdateData(update_data::UpdateData::new(values.clone()))
            }
            JobSpec::Firmware { artifact } => {
                JobKind::Firmware(firmware::Firmware::new(artifact.clone()))
            }
            JobSpec::SetSchedule { schedule } => {
                JobKind::SetSchedule(set_schedule::SetSchedule::new(schedule.clone()))
            }
        }
    }

    /// Checks a host's submission before anything is stored (S103). The error text is the reason
    /// recorded with the rejected job (S104) and sent back to the host. A firmware job still has
    /// to name an artifact the relay holds: see [`firmware::resolve`].
    pub fn validate(req: &SubmitJob, now: Timestamp) -> Result<ValidSubmission, Rejected> {
        validate::submission(req, now)
    }

    /// Reads what this kind needs to store `update` (and nothing else). Split from
    /// [`Staged::write`] so that every read, and so every corrupt record, comes before a write.
    fn stage(&self, txn: &dyn Txn, n: u64, update: &JobUpdate) -> Result<Staged, StoreError> {
        match self {
            JobKind::GetData(k) => k.stage(txn, n, update),
            JobKind::UpdateData(k) => k.stage(txn, n, update),
            JobKind::Firmware(k) => Ok(k.stage(update)),
            JobKind::SetSchedule(k) => Ok(k.stage(update)),
        }
    }
}

/// What a job kind will write for one update, prepared by [`JobKind::stage`].
#[derive(Debug, Default)]
pub(crate) struct Staged {
    /// The job's report after this update, if it changed.
    report: Option<protocol::data::DeviceData>,
}

impl Staged {
    fn write(self, txn: &mut dyn Txn, n: u64) -> Result<(), StoreError> {
        if let Some(report) = &self.report {
            txn.put_report(n, report)?;
        }
        Ok(())
    }
}

/// Merges the sections a device sent into job `n`'s report; a section sent again replaces the
/// earlier copy. Shared by the kinds whose result is data (get-data, update-data).
fn stage_report(txn: &dyn Txn, n: u64, update: &JobUpdate) -> Result<Staged, StoreError> {
    let Some(data) = &update.data else {
        return Ok(Staged::default());
    };
    let mut report = txn.report(n)?.unwrap_or_default();
    for (section, values) in data {
        report.insert(*section, values.clone());
    }
    Ok(Staged {
        report: Some(report),
    })
}

/// What the broker fills in when a submission leaves it out (config `default_deadline_secs`,
/// `default_max_attempts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    /// A job without a deadline gets this long after the later of now, its instruction time and
    /// its execution time: counting from submission would time out a job scheduled for next month.
    pub deadline: Duration,
    pub max_attempts: u32,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            deadline: Duration::from_secs(7 * 24 * 3600),
            max_attempts: 3,
        }
    }
}

/// Finds a job by the id the broker gave it. `J-1` is not `J-000001`: the stored id must match.
pub fn lookup(txn: &dyn Txn, id: &str) -> Result<Option<(u64, JobRecord)>, StoreError> {
    let Some(n) = job_number(id) else {
        return Ok(None);
    };
    Ok(txn.job(n)?.filter(|r| r.view.id == id).map(|r| (n, r)))
}

/// Records a host's submission as a new job: queued if it is valid, rejected with the reason if
/// not (S104). Either way the job gets an id, so the host can look it up.
/// Whether a submission may go through child relay `via` (`Err`: why not, for the rejection).
pub type ViaCheck<'a> = &'a dyn Fn(&protocol::RelayId, &Serial) -> Result<(), String>;

pub fn submit(
    txn: &mut dyn Txn,
    host: &HostId,
    req: &SubmitJob,
    server: &str,
    defaults: &Defaults,
    via_check: ViaCheck<'_>,
    now: Timestamp,
) -> Result<(u64, JobRecord), StoreError> {
    // Validation, then the artifact lookup a firmware job needs: both only read.
    let valid = JobKind::validate(req, now).and_then(|v| match &v.via {
        Some(via) => via_check(via, &v.serial).map(|()| v).map_err(Rejected),
        None => Ok(v),
    });
    let valid = match valid {
        Ok(v) => {
            let spec = match &v.spec {
                SpecDraft::Ready(spec) => Ok(spec.clone()),
                SpecDraft::Firmware { artifact } => {
                    firmware::resolve(txn, artifact)?.map(|artifact| JobSpec::Firmware { artifact })
                }
            };
            spec.map(|spec| (v, spec))
        }
        Err(e) => Err(e),
    };
    // The site column is the device's as it last reported it. A damaged device record only costs
    // the site (filled in again by the device's next state), not the job.
    let site = match &valid {
        Ok((v, _)) => match txn.device(&v.serial) {
            Ok(device) => device.map(|d| d.state.site).unwrap_or_default(),
            Err(e) if e.is_corrupt_record() => {
                warn!(serial = %v.serial, error = %e, "device record is corrupt; submitting without a site");
                String::new()
            }
            Err(e) => return Err(e),
        },
        Err(_) => String::new(),
    };
    let n = txn.next_job_number()?;
    let id = job_id(n);
    let record = match valid {
        Ok((v, spec)) => accepted(id, v, spec, site, host, server, defaults, now),
        Err(Rejected(reason)) => rejected(id, req, host, server, reason, now),
    };
    txn.put_job(n, &record)?;
    let note = record.view.reason.clone();
    txn.push_event(
        n,
        &JobEvent {
            at: now,
            status: record.view.status,
            note,
        },
    )?;
    Ok((n, record))
}

#[allow(clippy::too_many_arguments)] // one call site; each argument is a column of the record
fn accepted(
    id: JobId,
    v: ValidSubmission,
    spec: JobSpec,
    site: String,
    host: &HostId,
    server: &str,
    defaults: &Defaults,
    now: Timestamp,
) -> JobRecord {
    let deadline = v.deadline.or_else(|| {
        let from = now
            .max(v.instruction_time)
            .max(v.execution_time.unwrap_or(now));
        chrono::Duration::from_std(defaults.deadline)
            .ok()
            .and_then(|d| from.checked_add_signed(d))
    });
    JobRecord {
        view: JobView {
            id: id.to_string(),
            serial: v.serial.to_string(),
            site,
            instruction: spec.instruction().to_owned(),
            data_type: spec.data_type(),
            server: server.to_owned(),
            host: host.to_string(),
            instruction_time: Some(v.instruction_time),
            execution_time: v.execution_time,
            status: JobStatus::Queued,
            submitted_at: now,
            updated_at: now,
            reason: None,
        },
        order: Some(JobOrder {
            job: id,
            serial: v.serial,
            spec,
            instruction_time: v.instruction_time,
            execution_time: v.execution_time,
            deadline,
            max_attempts: v.max_attempts.unwrap_or(defaults.max_attempts),
        }),
        ended_at: None,
        rollout: None,
    }
}

/// A refused submission, kept as the host typed it so the list shows what was wrong.
fn rejected(
    id: JobId,
    req: &SubmitJob,
    host: &HostId,
    server: &str,
    reason: String,
    now: Timestamp,
) -> JobRecord {
    let time = |t: &Option<String>| {
        t.as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
    };
    // The data-type column as JobSpec::data_type would have shown it.
    let data_type = match req.kind.as_str() {
        "update-data" => req.values.keys().cloned().collect::<Vec<_>>().join(","),
        "firmware" => format!("ISW {}", req.artifact.as_deref().unwrap_or("?")),
        "set-schedule" => format!("schedule ({})", req.mode.as_deref().unwrap_or("?")),
        _ => req.sections.join(","),
    };
    JobRecord {
        view: JobView {
            id: id.to_string(),
            serial: req.serial.clone(),
            site: String::new(),
            // "get-data" → "GET DATA", the way JobSpec::instruction names the known kinds.
            instruction: match req.kind.as_str() {
                "firmware" => "UPDATE ISW".to_owned(),
                kind => kind.to_uppercase().replace('-', " "),
            },
            data_type,
            server: server.to_owned(),
            host: host.to_string(),
            instruction_time: time(&req.at),
            execution_time: time(&req.execute_at),
            status: JobStatus::Rejected,
            submitted_at: now,
            updated_at: now,
            reason: Some(reason),
        },
        order: None,
        ended_at: Some(now),
        rollout: None,
    }
}

/// The reason recorded for a failed job: the device's note, with its per-key refusals
/// ("adjustment.density: 12 is out of range 1..=9") added unless the note already says them.
pub fn failure_reason(update: &JobUpdate) -> String {
    let errors: Vec<String> = update
        .errors
        .iter()
        .map(|(key, why)| format!("{key}: {why}"))
        .collect();
    match (&update.note, errors.is_empty()) {
        (Some(note), true) => note.clone(),
        (None, true) => "the device reported a failure without a reason".into(),
        (None, false) => format!("refused: {}", errors.join("; ")),
        (Some(note), false) => {
            if errors.iter().all(|e| note.contains(e.as_str())) {
                note.clone()
            } else {
                format!("{note} ({})", errors.join("; "))
            }
        }
    }
}

/// What became of a device's job update.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateOutcome {
    /// The job moved to `status`; `ended` when that is an end state.
    Applied {
        n: u64,
        job: JobId,
        status: JobStatus,
        ended: bool,
    },
    /// Not a forward move (a repeat, or the job already ended): harmless, nothing changed.
    Unchanged { n: u64 },
    /// Refused for good, with the reason sent back to the device.
    Refused(String),
}

/// Applies a device's report about one of its jobs.
pub fn apply_update(
    txn: &mut dyn Txn,
    serial: &Serial,
    update: &JobUpdate,
    now: Timestamp,
) -> Result<UpdateOutcome, StoreError> {
    let job = &update.job;
    let Some((n, mut record)) = lookup(txn, job.as_str())? else {
        return Ok(UpdateOutcome::Refused(format!(
            "no job {job} on this broker"
        )));
    };
    let Some(order) = record.order.as_ref().filter(|o| &o.serial == serial) else {
        return Ok(UpdateOutcome::Refused(format!(
            "job {job} is not addressed to {serial}"
        )));
    };
    if !JobUpdate::device_may_report(update.status) {
        return Ok(UpdateOutcome::Refused(format!(
            "a device may not report status {}: report delivered, staged, in-progress, succeeded or failed",
            update.status
        )));
    }
    if !record.view.status.can_move_to(update.status) {
        return Ok(UpdateOutcome::Unchanged { n });
    }
    let staged = JobKind::of(&order.spec).stage(txn, n, update)?;

    // Reads are done; from here on only writes.
    let status = update.status;
    record.view.status = status;
    record.view.updated_at = now;
    let mut note = update.note.clone();
    if status == JobStatus::Failed {
        let reason = failure_reason(update);
        note = Some(reason.clone());
        record.view.reason = Some(reason);
    }
    if status.is_terminal() {
        record.ended_at = Some(now);
    }
    staged.write(txn, n)?;
    txn.put_job(n, &record)?;
    txn.push_event(
        n,
        &JobEvent {
            at: now,
            status,
            note,
        },
    )?;
    Ok(UpdateOutcome::Applied {
        n,
        job: job.clone(),
        status,
        ended: status.is_terminal(),
    })
}

/// Job `job` of `serial` is on the disk of child relay `relay` (Fig. 8, S508): `forwarded`, if it
/// was still waiting, and the SERVER column shows the path (`parent › R1`). Returns the job's
/// number if it changed.
pub fn mark_forwarded(
    txn: &mut dyn Txn,
    job: &str,
    serial: &Serial,
    relay: &str,
    now: Timestamp,
) -> Result<Option<u64>, StoreError> {
    let Some((n, mut record)) = lookup(txn, job)? else {
        return Ok(None);
    };
    if record.order.as_ref().is_none_or(|o| &o.serial != serial)
        || !record.view.status.can_move_to(JobStatus::Forwarded)
    {
        return Ok(None);
    }
    record.view.status = JobStatus::Forwarded;
    record.view.updated_at = now;
    let server = record
        .view
        .server
        .split(" › ")
        .next()
        .unwrap_or_default()
        .to_owned();
    record.view.server = format!("{server} › {relay}");
    txn.put_job(n, &record)?;
    txn.push_event(
        n,
        &JobEvent {
            at: now,
            status: JobStatus::Forwarded,
            note: Some(format!("on child relay {relay}")),
        },
    )?;
    Ok(Some(n))
}

/// Marks job `n` timed out if it is still open. Returns the record as it now is, or `None` if the
/// job had already ended (or does not exist).
pub fn time_out(
    txn: &mut dyn Txn,
    n: u64,
    now: Timestamp,
) -> Result<Option<JobRecord>, StoreError> {
    let Some(mut record) = txn.job(n)? else {
        return Ok(None);
    };
    if !record.is_open() {
        return Ok(None);
    }
    let deadline = record.order.as_ref().and_then(|o| o.deadline);
    let reason = match deadline {
        Some(d) => format!(
            "the deadline {} passed before the device finished the job",
            d.to_rfc3339()
        ),
        None => "timed out".to_owned(),
    };
    record.view.status = JobStatus::TimedOut;
    record.view.updated_at = now;
    record.view.reason = Some(reason.clone());
    record.ended_at = Some(now);
    txn.put_job(n, &record)?;
    txn.push_event(
        n,
        &JobEvent {
            at: now,
            status: JobStatus::TimedOut,
            note: Some(reason),
        },
    )?;
    Ok(Some(record))
}

/// Fills in the site of `serial`'s open jobs that were submitted before the device ever said where
/// it is. Returns the numbers of the jobs changed.
pub fn fill_site(
    txn: &mut dyn Txn,
    serial: &Serial,
    site: &str,
    now: Timestamp,
) -> Result<Vec<u64>, StoreError> {
    if site.is_empty() {
        return Ok(Vec::new());
    }
    let mut to_fill = Vec::new();
    for n in txn.open_jobs_of(serial)? {
        if let Some(record) = txn.job(n)?.filter(|r| r.view.site.is_empty()) {
            to_fill.push((n, record));
        }
    }
    let mut changed = Vec::with_capacity(to_fill.len());
    for (n, mut record) in to_fill {
        record.view.site = site.to_owned();
        record.view.updated_at = now;
        txn.put_job(n, &record)?;
        changed.push(n);
    }
    Ok(changed)
}

/// Whether the default job list shows this job (Fig. 9): open jobs and abnormal ends (failed,
/// timed-out, rejected) always; normal ends (succeeded, canceled) only for `finished_visible`
/// after they ended.
pub fn listed_by_default(
    record: &JobRecord,
    now: Timestamp,
    finished_visible: std::time::Duration,
) -> bool {
    match record.view.status {
        JobStatus::Succeeded | JobStatus::Canceled => {
            let ended = record.ended_at.unwrap_or(record.view.updated_at);
            let visible =
                chrono::Duration::from_std(finished_visible).unwrap_or(chrono::Duration::MAX);
            now.signed_duration_since(ended) < visible
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::Duration;

    fn at(h: u32, m: u32) -> Timestamp {
        chrono::Utc.with_ymd_and_hms(2026, 11, 26, h, m, 0).unwrap()
    }

    fn with_status(status: JobStatus, ended_at: Option<Timestamp>) -> JobRecord {
        let req = SubmitJob {
            serial: "C1".into(),
            kind: "get-data".into(),
            ..Default::default()
        };
        let v = JobKind::validate(&req, at(9, 0)).unwrap();
        let SpecDraft::Ready(spec) = v.spec.clone() else {
            panic!("get-data needs no lookup")
        };
        let mut r = accepted(
            job_id(1),
            v,
            spec,
            String::new(),
            &HostId::parse("svc").unwrap(),
            "relay",
            &Defaults::default(),
            at(9, 0),
        );
        r.view.status = status;
        r.ended_at = ended_at;
        r
    }

    #[test]
    fn default_list_keeps_abnormal_ends_and_hides_old_normal_ends() {
        let keep = Duration::from_secs(3600);
        let now = at(12, 0);
        let cases = [
            (JobStatus::Queued, None, true),
            (JobStatus::InProgress, None, true),
            (JobStatus::Failed, Some(at(9, 0)), true),
            (JobStatus::TimedOut, Some(at(9, 0)), true),
            (JobStatus::Rejected, Some(at(9, 0)), true),
            (JobStatus::Succeeded, Some(at(11, 30)), true),
            (JobStatus::Succeeded, Some(at(10, 59)), false),
            (JobStatus::Canceled, Some(at(11, 1)), true),
            (JobStatus::Canceled, Some(at(9, 0)), false),
        ];
        for (status, ended, want) in cases {
            assert_eq!(
                listed_by_default(&with_status(status, ended), now, keep),
                want,
                "{status} {ended:?}"
            );
        }
    }

    #[test]
    fn a_rejected_submission_is_kept_as_typed() {
        let req = SubmitJob {
            serial: "C/1".into(),
            kind: "get-data".into(),
            sections: vec!["toner".into()],
            at: Some("2026-11-26T10:00:00Z".into()),
            ..Default::default()
        };
        let r = rejected(
            job_id(4),
            &req,
            &HostId::parse("svc").unwrap(),
            "relay",
            "bad".into(),
            at(9, 0),
        );
        assert_eq!(r.view.serial, "C/1");
        assert_eq!(r.view.instruction, "GET DATA");
        assert_eq!(r.view.data_type, "toner");
        assert_eq!(r.view.instruction_time, Some(at(10, 0)));
        assert_eq!(r.view.status, JobStatus::Rejected);
        assert!(!r.is_open());
    }
}
