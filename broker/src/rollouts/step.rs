//! One step of a rollout, taken in the batch that ends one of its jobs ([`Refresh::Ended`]), by
//! the relay's once-a-second tick ([`Refresh::All`]: time decides start, rate and window), and at
//! once after a person acts on it: start it when its time comes, read its jobs' statuses, abort it when too many failed,
//! withdraw what a closing window left undelivered, move to the next wave once this one
//! succeeded enough, end it, and file the jobs its wave, rate and window allow now.
//!
//! Everything here happens in the tick's transaction: a job filed and the rollout's record that
//! says so commit together, so a relay killed between ticks files nothing twice and forgets
//! nothing.

use protocol::host::SubmitJob;
use protocol::job::JobStatus;
use protocol::rollout::{RolloutStatus, Target};
use protocol::{HostId, Timestamp};
use tracing::warn;

use super::plan;
use super::window::Window;
use crate::jobs::{self, Defaults, cancel};
use crate::store::{JobRecord, Member, RolloutRecord, StoreError, Txn, job_id};

/// A dynamic rollout looks for newly matching devices this often.
const RESCAN_SECS: i64 = 10;

/// What the relay needs to file jobs in a rollout's name.
pub struct Filing<'a> {
    pub server: &'a str,
    pub defaults: &'a Defaults,
}

/// Where a step learns its jobs' statuses.
pub enum Refresh<'a> {
    /// From the store: every job not known to have ended (the tick).
    All,
    /// These jobs ended in the batch being handled (their rollout moves on at once).
    Ended(&'a [(u64, JobStatus)]),
}

/// What one step did besides changing the record.
#[derive(Default)]
pub struct Effects {
    /// Jobs filed (their orders go out).
    pub filed: Vec<(u64, JobRecord)>,
    /// Jobs canceled: by an abort, or withdrawn as a window closed.
    pub canceled: Vec<(u64, JobRecord)>,
    /// The rollout ended in this step.
    pub ended: bool,
    /// The record changed and must be written (and its view published).
    pub changed: bool,
}

/// Takes one step of `r`. The caller writes `r` back when `changed`.
pub fn advance(
    txn: &mut dyn Txn,
    r: &mut RolloutRecord,
    filing: &Filing<'_>,
    refresh: Refresh<'_>,
    now: Timestamp,
) -> Result<Effects, StoreError> {
    let mut fx = Effects::default();
    if r.status.is_final() {
        return Ok(fx);
    }
    if r.status == RolloutStatus::Scheduled {
        if r.start_at.is_some_and(|t| t > now) {
            return Ok(fx);
        }
        r.status = RolloutStatus::Running;
        if let Some(first) = r.waves.first_mut() {
            first.started_at = Some(now);
        }
        fx.changed = true;
    }
    match refresh {
        Refresh::All => read_statuses(txn, r, &mut fx)?,
        Refresh::Ended(ended) => take_statuses(r, ended, &mut fx),
    }
    if let Some(reason) = too_many_failed(r) {
        abort(txn, r, reason, now, &mut fx)?;
        return Ok(finish(r, now, fx));
    }
    let window = r.window.as_deref().and_then(|w| Window::parse(w).ok());
    let open = window.as_ref().is_none_or(|w| w.is_open(now));
    if !open {
        withdraw_undelivered(txn, r, now, &mut fx)?;
    }
    if r.dynamic && matches!(refresh, Refresh::All) {
        rescan(txn, r, now, &mut fx)?;
    }
    progress(r, now, &mut fx);
    if r.status == RolloutStatus::Running && open {
        release(txn, r, filing, now, &mut fx)?;
    }
    Ok(finish(r, now, fx))
}

fn finish(r: &mut RolloutRecord, now: Timestamp, fx: Effects) -> Effects {
    if fx.changed {
        r.updated_at = now;
    }
    fx
}

/// Records the end of jobs of a rollout that has itself ended (its jobs that were running go on
/// to their own end): returns whether anything changed.
pub fn record_ended(r: &mut RolloutRecord, ended: &[(u64, JobStatus)], now: Timestamp) -> bool {
    let mut fx = Effects::default();
    take_statuses(r, ended, &mut fx);
    if fx.changed {
        r.updated_at = now;
    }
    fx.changed
}

/// Sets the statuses of jobs the batch ended.
fn take_statuses(r: &mut RolloutRecord, ended: &[(u64, JobStatus)], fx: &mut Effects) {
    let ended: std::collections::HashMap<u64, JobStatus> = ended.iter().copied().collect();
    for m in r.waves.iter_mut().flat_map(|w| w.members.iter_mut()) {
        if let Some(status) = m.job.and_then(|n| ended.get(&n))
            && m.status != Some(*status)
        {
            m.status = Some(*status);
            fx.changed = true;
        }
    }
}

/// Reads the status of every job not known to have ended.
fn read_statuses(txn: &dyn Txn, r: &mut RolloutRecord, fx: &mut Effects) -> Result<(), StoreError> {
    for m in r.waves.iter_mut().flat_map(|w| w.members.iter_mut()) {
        let Some(n) = m.job else { continue };
        if m.status.is_some_and(JobStatus::is_terminal) {
            continue;
        }
        let status = match txn.job(n) {
            Ok(Some(job)) => job.view.status,
            Ok(None) => continue,
            Err(e) if e.is_corrupt_record() => {
                warn!(rollout = %r.id, job = %job_id(n), error = %e, "rollout job record is corrupt; counted as failed");
                JobStatus::Failed
            }
            Err(e) => return Err(e),
        };
        if m.status != Some(status) {
            m.status = Some(status);
            fx.changed = true;
        }
    }
    Ok(())
}

/// Cancels `m`'s job if, as the store has it now, its status is one of `undelivered`, and
/// records the status it has now either way: a step's cached status may be a step old. The
/// canceled job, if it was (cancel itself still refuses a job in progress).
fn cancel_if_still(
    txn: &mut dyn Txn,
    host: &HostId,
    m: &mut Member,
    undelivered: &[JobStatus],
    now: Timestamp,
) -> Result<Option<(u64, JobRecord)>, StoreError> {
    let Some(n) = m.job else { return Ok(None) };
    let Some(status) = current_status(txn, n)? else {
        return Ok(None);
    };
    m.status = Some(status);
    if !undelivered.contains(&status) {
        return Ok(None);
    }
    Ok(match cancel::cancel(txn, host, job_id(n).as_str(), now)? {
        cancel::CancelOutcome::Canceled { n, record } => {
            m.status = Some(JobStatus::Canceled);
            Some((n, *record))
        }
        cancel::CancelOutcome::Refused(_) => None,
    })
}

/// A job's status as the store has it now (`None`: gone or unreadable).
fn current_status(txn: &dyn Txn, n: u64) -> Result<Option<JobStatus>, StoreError> {
    match txn.job(n) {
        Ok(job) => Ok(job.map(|j| j.view.status)),
        Err(e) if e.is_corrupt_record() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Statuses that count as a device's failure: the job ran (or could not) and did not succeed.
fn is_failure(s: JobStatus) -> bool {
    matches!(
        s,
        JobStatus::Failed | JobStatus::TimedOut | JobStatus::Rejected
    )
}

/// Why the rollout must stop, if its failure rate passed the limit.
fn too_many_failed(r: &RolloutRecord) -> Option<String> {
    let limit = r.abort_failure_rate_pct?;
    let statuses = r
        .waves
        .iter()
        .flat_map(|w| &w.members)
        .filter_map(|m| m.status);
    let (mut finished, mut failed) = (0u64, 0u64);
    for s in statuses {
        if s == JobStatus::Succeeded {
            finished += 1;
        } else if is_failure(s) {
            finished += 1;
            failed += 1;
        }
    }
    let rate = failed as f64 * 100.0 / finished.max(1) as f64;
    (finished >= u64::from(r.abort_min_finished) && rate > limit).then(|| {
        format!(
            "failure rate {rate:.1}% ({failed} of {finished} finished jobs) passed --abort-failure-rate {limit}%"
        )
    })
}

/// Stops the rollout for good: jobs not yet delivered are canceled, jobs already running finish.
pub fn abort(
    txn: &mut dyn Txn,
    r: &mut RolloutRecord,
    reason: String,
    now: Timestamp,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let host = rollout_host(r);
    let undelivered = [JobStatus::Queued, JobStatus::Forwarded];
    for m in r.waves.iter_mut().flat_map(|w| w.members.iter_mut()) {
        if m.status.is_some_and(JobStatus::is_terminal) {
            continue;
        }
        if let Some(canceled) = cancel_if_still(txn, &host, m, &undelivered, now)? {
            fx.canceled.push(canceled);
        }
    }
    r.status = RolloutStatus::Aborted;
    r.reason = Some(reason);
    fx.ended = true;
    fx.changed = true;
    Ok(())
}

/// The window closed: jobs filed in it that no device has taken yet are withdrawn, and their
/// devices wait for the next window (where they get a new job).
fn withdraw_undelivered(
    txn: &mut dyn Txn,
    r: &mut RolloutRecord,
    now: Timestamp,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let host = rollout_host(r);
    let mut withdrawn = Vec::new();
    for m in r.waves.iter_mut().flat_map(|w| w.members.iter_mut()) {
        if m.job.is_none() || m.status != Some(JobStatus::Queued) {
            continue;
        }
        // A job its device took since the last step stays.
        match cancel_if_still(txn, &host, m, &[JobStatus::Queued], now)? {
            Some((n, record)) => {
                withdrawn.push(n);
                m.job = None;
                m.status = None;
                fx.canceled.push((n, record));
            }
            None if m.status != Some(JobStatus::Queued) => fx.changed = true,
            None => {}
        }
    }
    if !withdrawn.is_empty() {
        r.withdrawn.extend(withdrawn);
        fx.changed = true;
    }
    Ok(())
}

/// A dynamic rollout takes devices that appeared (or came to match) since it began, into its
/// last wave.
fn rescan(
    txn: &dyn Txn,
    r: &mut RolloutRecord,
    now: Timestamp,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    if r.scanned_at
        .is_some_and(|t| t > now - chrono::Duration::seconds(RESCAN_SECS))
    {
        return Ok(());
    }
    r.scanned_at = Some(now);
    fx.changed = true;
    let Ok(targets) = r
        .targets
        .iter()
        .map(|t| Target::parse(t))
        .collect::<Result<Vec<_>, _>>()
    else {
        return Ok(());
    };
    let known: std::collections::BTreeSet<String> = r
        .waves
        .iter()
        .flat_map(|w| w.members.iter().map(|m| m.serial.clone()))
        .collect();
    let fresh: Vec<Member> = plan::select(txn, &targets, &r.serials)?
        .into_iter()
        .filter(|d| !known.contains(&d.serial))
        .map(|d| Member {
            serial: d.serial,
            job: None,
            status: None,
        })
        .collect();
    if let Some(last) = r.waves.last_mut() {
        last.members.extend(fresh);
    }
    Ok(())
}

/// Moves to the next wave once this one succeeded enough, or ends the rollout.
fn progress(r: &mut RolloutRecord, now: Timestamp, fx: &mut Effects) {
    if !matches!(
        r.status,
        RolloutStatus::Running | RolloutStatus::WaitingApproval
    ) {
        return;
    }
    let w = r.wave;
    let Some(wave) = r.waves.get(w) else { return };
    let size = wave.members.len();
    let all_filed = wave.members.iter().all(|m| m.job.is_some());
    let succeeded = wave
        .members
        .iter()
        .filter(|m| m.status == Some(JobStatus::Succeeded))
        .count();
    let all_ended = wave
        .members
        .iter()
        .all(|m| m.status.is_some_and(JobStatus::is_terminal));
    let needed = (size as f64 * r.success_threshold_pct / 100.0).ceil() as usize;
    let last = w + 1 == r.waves.len();
    if all_filed && succeeded >= needed {
        if !last {
            if r.approve_each_wave && r.approved <= w {
                if r.status != RolloutStatus::WaitingApproval {
                    r.status = RolloutStatus::WaitingApproval;
                    r.reason = Some(format!(
                        "wave {} reached its threshold ({succeeded} of {size} succeeded); `rollouts approve {}` starts wave {}",
                        w + 1,
                        r.id,
                        w + 2
                    ));
                    fx.changed = true;
                }
                return;
            }
            r.wave += 1;
            r.status = RolloutStatus::Running;
            r.reason = None;
            if let Some(next) = r.waves.get_mut(r.wave) {
                next.started_at = Some(now);
            }
            fx.changed = true;
            return;
        }
        let everything_ended = r
            .waves
            .iter()
            .flat_map(|w| &w.members)
            .all(|m| m.status.is_some_and(JobStatus::is_terminal));
        if everything_ended && !r.dynamic {
            r.status = RolloutStatus::Succeeded;
            r.reason = None;
            fx.ended = true;
            fx.changed = true;
        }
    } else if all_filed && all_ended {
        r.status = RolloutStatus::Failed;
        r.reason = Some(format!(
            "wave {}: {succeeded} of {size} jobs succeeded, below the success threshold of {}%",
            w + 1,
            r.success_threshold_pct
        ));
        fx.ended = true;
        fx.changed = true;
    }
}

/// Files the jobs the current and earlier waves still owe, as fast as the rate allows.
fn release(
    txn: &mut dyn Txn,
    r: &mut RolloutRecord,
    filing: &Filing<'_>,
    now: Timestamp,
    fx: &mut Effects,
) -> Result<(), StoreError> {
    let host = rollout_host(r);
    let interval = r
        .rate_per_min
        .map(|rate| chrono::Duration::microseconds(60_000_000 / i64::from(rate.max(1))));
    // The generic cell rate algorithm: one job per interval on average, and at most a second's
    // worth (at least one) at once, after a pause or a restart too. `next` is when the next job
    // is due; a burst may run `slack` ahead of it.
    let burst = r.rate_per_min.map_or(1, |rate| rate.div_ceil(60).max(1));
    let slack = interval.map_or(chrono::Duration::zero(), |i| i * (burst as i32 - 1));
    let mut next = r.next_release.map_or(now, |t| t.max(now));
    let refuse_via = |_: &protocol::RelayId, _: &protocol::Serial| {
        Err("a rollout's job names no child relay".to_owned())
    };
    let this = crate::store::rollout_number(&r.id);
    let mut filed_any = false;
    'waves: for wave in r.waves.iter_mut().take(r.wave + 1) {
        for m in wave.members.iter_mut().filter(|m| m.job.is_none()) {
            if interval.is_some() && next > now + slack {
                break 'waves;
            }
            let req = SubmitJob {
                serial: m.serial.clone(),
                ..r.job.clone()
            };
            let (n, mut record) = jobs::submit(
                txn,
                &host,
                &req,
                filing.server,
                filing.defaults,
                &refuse_via,
                now,
            )?;
            if this.is_some() {
                // So that its end moves the rollout on in the batch that ends it.
                record.rollout = this;
                txn.put_job(n, &record)?;
            }
            m.job = Some(n);
            m.status = Some(record.view.status);
            fx.filed.push((n, record));
            filed_any = true;
            if let Some(step) = interval {
                next += step;
            }
        }
    }
    if filed_any {
        if interval.is_some() {
            r.next_release = Some(next);
        }
        fx.changed = true;
    }
    Ok(())
}

/// The host a rollout files and cancels in the name of.
fn rollout_host(r: &RolloutRecord) -> HostId {
    HostId::parse(&r.host).unwrap_or_else(|_| {
        // Written by the relay from a host's identity; cannot fail unless edited by hand.
        HostId::parse("rollouts").expect("a valid host id")
    })
}
