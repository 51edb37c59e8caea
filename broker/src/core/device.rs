//! `dev/{serial}/up/{kind}`: what devices send. Every message that carries a readable msg id is
//! answered on `dev/{serial}/ack` once the batch has committed (claims 13–14; docs/decisions.md,
//! D3).
//!
//! The exception is `up/fetch`: a firmware download's request for chunks is not kept in the
//! device's outbox (a lost one is simply asked again), so it carries no id and gets no ack — the
//! chunks are the answer. It writes nothing either, so a batch of fetches costs no commit.

use protocol::alarm::AlarmReport;
use protocol::artifact::FetchRequest;
use protocol::device::{AckOutcome, DeviceState, JobUpdate, MergeRequest};
use protocol::job::JobStatus;
use protocol::meter::CounterReport;
use protocol::presence::StateReport;
use protocol::topic::UpKind;
use protocol::{Envelope, Seq, Serial, Shown, Timestamp};
use tracing::{debug, error, info, warn};

use super::CORE_LOG_PER_SECOND;
use super::{Core, Done, Pending, views};
use crate::jobs::firmware::{self, FetchOutcome};
use crate::jobs::update_data::{self, MergeOutcome};
use crate::jobs::{self, UpdateOutcome};
use crate::log_budget::LogBudget;
use crate::store::seen::Placed;
use crate::store::{DeviceRecord, JournalEntry, JournalOutcome, StoreError, Txn};

enum Message {
    Job(JobUpdate),
    State(StateReport),
    Merge(MergeRequest),
    Alarm(AlarmReport),
    Counters(CounterReport),
}

/// One message a device sent on `dev/{serial}/up/{kind}`, as every handler of the core reads it.
#[derive(Clone, Copy)]
pub(super) struct FromDevice<'a> {
    pub serial: &'a Serial,
    pub topic: &'a str,
    pub payload: &'a [u8],
}

pub(super) fn handle(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    kind: UpKind,
    msg: FromDevice<'_>,
    now: Timestamp,
) -> Result<(), StoreError> {
    if super::relay::parent_answers(core, kind) {
        return super::relay::forward_only(core, txn, p, kind, msg, now);
    }
    let FromDevice { serial, topic, .. } = msg;
    let decoded = match kind {
        UpKind::Job => {
            decode_new::<JobUpdate>(core, txn, p, msg)?.map(|e| (e.seq(), Message::Job(e.body)))
        }
        // Read as the superset this version's agents send: the state plus the schedule.
        UpKind::State => {
            decode_new::<StateReport>(core, txn, p, msg)?.map(|e| (e.seq(), Message::State(e.body)))
        }
        UpKind::Merge => decode_new::<MergeRequest>(core, txn, p, msg)?
            .map(|e| (e.seq(), Message::Merge(e.body))),
        UpKind::Alarm => decode_checked::<AlarmReport>(core, txn, p, msg, |report| {
            protocol::alarm::check_device_code(&report.code)
        })?
        .map(|e| (e.seq(), Message::Alarm(e.body))),
        UpKind::Counters => decode_checked::<CounterReport>(core, txn, p, msg, |report| {
            protocol::meter::check_counters(&report.counters)
        })?
        .map(|e| (e.seq(), Message::Counters(e.body))),
        UpKind::Fetch => return fetch(core, txn, p, msg, now),
    };
    let Some((seq, message)) = decoded else {
        return Ok(());
    };
    match store(core, txn, p, serial, seq, message, topic, now) {
        Ok(outcome) => {
            if outcome == AckOutcome::Stored {
                super::relay::forward(core, txn, kind, msg)?;
            }
            p.seen.insert(serial.clone());
            p.ack(serial, seq, outcome);
            Ok(())
        }
        Err(e) if e.is_corrupt_record() => {
            // Nothing of this message was written (see `jobs`); no ack, so the device resends it
            // later, perhaps after the record has been repaired.
            error!(serial = %serial, topic, msg_id = seq.id, error = %e, "cannot handle device message: a store record is corrupt");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Applies and journals one decoded, new message; returns the ack's outcome.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
fn store(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    serial: &Serial,
    seq: Seq,
    message: Message,
    topic: &str,
    now: Timestamp,
) -> Result<AckOutcome, StoreError> {
    let outcome = match message {
        Message::Job(update) => job_update(txn, p, serial, &update, topic, now)?,
        Message::State(state) => state_update(txn, p, serial, state, now)?,
        Message::Merge(req) => merge_request(txn, p, serial, &req, topic, now)?,
        Message::Alarm(report) => super::alarm::store(core, txn, p, serial, &report, now)?,
        Message::Counters(report) => super::meter::store(txn, serial, seq, report)?,
    };
    if outcome == AckOutcome::Stored {
        record_stored(txn, serial, seq, now)?;
    }
    Ok(outcome)
}

/// The answer to a device message the relay handled before: `duplicate` if it stored it, the
/// same refusal if it refused it. `None` for a message it has not handled.
fn handled_before(
    txn: &dyn Txn,
    serial: &Serial,
    seq: Seq,
    topic: &str,
) -> Result<Option<AckOutcome>, StoreError> {
    let Some(entry) = txn.device_journal(serial.as_str(), seq)? else {
        return Ok(None);
    };
    debug!(serial = %serial, topic, msg_id = seq.id, inc = seq.inc, "device message handled before");
    Ok(Some(match entry.outcome {
        JournalOutcome::Refused { reason } => AckOutcome::Rejected { reason },
        _ => AckOutcome::Duplicate,
    }))
}

/// Records that the device message at `seq` was stored, in its outbox's window.
pub(super) fn record_stored(
    txn: &mut dyn Txn,
    serial: &Serial,
    seq: Seq,
    now: Timestamp,
) -> Result<(), StoreError> {
    let entry = JournalEntry {
        at: now,
        outcome: JournalOutcome::Stored,
    };
    if txn.put_device_journal(serial.as_str(), seq, &entry)? == Placed::Beyond {
        log_far_ahead(serial, seq);
    }
    Ok(())
}

/// Records that the device message at `seq` was refused for good, so that its resend (its ack
/// lost) is refused again rather than handled anew or called a duplicate, and so that its
/// outbox's window moves past it.
pub(super) fn record_refused(
    txn: &mut dyn Txn,
    serial: &Serial,
    seq: Seq,
    reason: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    let entry = JournalEntry {
        at: now,
        outcome: JournalOutcome::Refused {
            reason: reason.to_owned(),
        },
    };
    if txn.put_device_journal(serial.as_str(), seq, &entry)? == Placed::Beyond {
        log_far_ahead(serial, seq);
    }
    Ok(())
}

/// An id far ahead of what its outbox sent before: stored exactly, but worth a line, since a
/// device that sends in order never does this (a forged id, or an agent that lost count).
fn log_far_ahead(serial: &Serial, seq: Seq) {
    static BUDGET: LogBudget = LogBudget::per_second(CORE_LOG_PER_SECOND);
    if let Some(suppressed) = BUDGET.check() {
        warn!(serial = %serial, msg_id = seq.id, inc = seq.inc, suppressed, "device message id far ahead of its outbox's earlier ids; kept in a journal row of its own");
    }
}

fn job_update(
    txn: &mut dyn Txn,
    p: &mut Pending,
    serial: &Serial,
    update: &JobUpdate,
    topic: &str,
    now: Timestamp,
) -> Result<AckOutcome, StoreError> {
    match jobs::apply_update(txn, serial, update, now)? {
        UpdateOutcome::Applied {
            n,
            job,
            status,
            ended,
        } => {
            if status == JobStatus::Succeeded {
                // A meter reading for billing; a schedule the relay now expects.
                super::meter::job_reading(txn, serial, &job, update, now)?;
                super::presence::learn_from_job(txn, serial, n, p)?;
            }
            p.done.push(Done::JobUpdate {
                serial: serial.clone(),
                job,
                status,
            });
            p.views.insert(n);
            if ended {
                p.ended.insert(n);
            }
            Ok(AckOutcome::Stored)
        }
        UpdateOutcome::Unchanged { .. } => {
            debug!(serial = %serial, job = %update.job, status = %update.status, "job update changes nothing");
            Ok(AckOutcome::Stored)
        }
        UpdateOutcome::Refused(reason) => {
            log_refusal(serial, topic, &reason);
            Ok(AckOutcome::Rejected { reason })
        }
    }
}

fn state_update(
    txn: &mut dyn Txn,
    p: &mut Pending,
    serial: &Serial,
    report: StateReport,
    now: Timestamp,
) -> Result<AckOutcome, StoreError> {
    let StateReport { state, schedule } = report;
    if let Err(reason) = state.check() {
        log_refusal(
            serial,
            &protocol::topic::dev_up(serial, UpKind::State),
            &reason,
        );
        return Ok(AckOutcome::Rejected { reason });
    }
    // What the device announced last. A repeat is not news in the log, and a site it had already
    // announced is on every job submitted since (an unreadable record is overwritten below).
    let before = super::skip_corrupt(txn.device_state(serial))?.flatten();
    let changed = before.as_ref() != Some(&state);
    // fill_site reads before it writes, and put_device only writes: nothing half-done on a corrupt job.
    let filled = if before.is_some_and(|b| b.site == state.site) {
        Vec::new()
    } else {
        jobs::fill_site(txn, serial, &state.site, now)?
    };
    let DeviceState {
        site,
        model,
        firmware,
    } = &state;
    if changed {
        info!(serial = %serial, site = %Shown(site), model = %Shown(model), firmware = %Shown(firmware), "device state stored");
    } else {
        debug!(serial = %serial, site = %Shown(site), model = %Shown(model), firmware = %Shown(firmware), "device state stored (unchanged)");
    }
    txn.put_device(
        serial,
        &DeviceRecord {
            state,
            last_seen: now,
        },
    )?;
    p.views.extend(filled);
    p.state_changed(serial);
    if let Some(schedule) = &schedule {
        super::presence::learn(txn, serial, schedule)?;
    }
    Ok(AckOutcome::Stored)
}

/// S212–S213: merges the job's values into the device's current data and has the result
/// published retained. A new request for a job merged before gets the stored result again.
fn merge_request(
    txn: &mut dyn Txn,
    p: &mut Pending,
    serial: &Serial,
    req: &MergeRequest,
    topic: &str,
    now: Timestamp,
) -> Result<AckOutcome, StoreError> {
    match update_data::merge(txn, serial, req, now)? {
        MergeOutcome::Merged { n, job } => {
            p.merged.insert(n);
            p.views.insert(n);
            p.done.push(Done::Merged {
                serial: serial.clone(),
                job,
            });
            Ok(AckOutcome::Stored)
        }
        MergeOutcome::AlreadyMerged { n, job } => {
            debug!(serial = %serial, job = %job, "job was merged before; publishing the stored result again");
            p.merged.insert(n);
            Ok(AckOutcome::Stored)
        }
        MergeOutcome::Refused(reason) => {
            warn!(serial = %serial, job = %req.job, topic, reason = %Shown(&reason), "refused merge request");
            Ok(AckOutcome::Rejected { reason })
        }
    }
}

/// Serves the chunks a device asked for, if it has an open firmware job for that artifact.
/// Anything else is ignored with a warning: no chunk goes out and nothing is written.
fn fetch(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    msg: FromDevice<'_>,
    now: Timestamp,
) -> Result<(), StoreError> {
    let FromDevice {
        serial,
        topic,
        payload,
    } = msg;
    let req = match super::decode::<FetchRequest>(payload, core.settings.max_payload_bytes) {
        Ok(env) => env.body,
        Err(e) => {
            warn!(serial = %serial, topic, reason = %Shown(&e), "refused fetch request");
            return Ok(());
        }
    };
    let outcome = match firmware::fetch(txn, serial, &req) {
        Ok(o) => o,
        Err(e) if e.is_corrupt_record() => {
            error!(serial = %serial, job = %req.job, artifact = %req.artifact, error = %e, "cannot serve a fetch: a store record is corrupt");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    match outcome {
        FetchOutcome::Serve {
            job,
            chunks,
            skipped,
        } => {
            if !skipped.is_empty() {
                warn!(serial = %serial, job = %job, artifact = %req.artifact, skipped = ?skipped, "fetch asked for chunks that do not exist or over the per-fetch limit; not served");
            }
            if chunks.is_empty() {
                return Ok(());
            }
            let indices: Vec<u32> = chunks.iter().map(|c| c.index).collect();
            for chunk in chunks {
                p.blobs.push(views::chunk(serial, chunk, now)?);
            }
            p.done.push(Done::ChunksServed {
                serial: serial.clone(),
                job,
                artifact: req.artifact,
                chunks: indices,
            });
        }
        FetchOutcome::Refused(reason) => {
            warn!(serial = %serial, job = %req.job, artifact = %req.artifact, reason = %Shown(&reason), "fetch refused; nothing served");
        }
    }
    Ok(())
}

/// The common start of every device message handler: decode the envelope (a refusal is logged
/// and acked `rejected`) and answer a message handled before (`duplicate`, or the same refusal).
/// `None`: the message is answered; the caller does nothing more.
pub(super) fn decode_new<T: serde::de::DeserializeOwned>(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    msg: FromDevice<'_>,
) -> Result<Option<Envelope<T>>, StoreError> {
    let FromDevice {
        serial,
        topic,
        payload,
    } = msg;
    let env = match super::decode::<T>(payload, core.settings.max_payload_bytes) {
        Ok(env) => env,
        Err(e) => {
            let reason = e.to_string();
            log_refusal(serial, topic, &reason);
            if let Some(seq) = Envelope::peek_seq(payload) {
                p.ack(serial, seq, AckOutcome::Rejected { reason });
            }
            return Ok(None);
        }
    };
    if let Some(answer) = handled_before(txn, serial, env.seq(), topic)? {
        // A resend still says the device is there.
        p.seen.insert(serial.clone());
        p.ack(serial, env.seq(), answer);
        return Ok(None);
    }
    Ok(Some(env))
}

/// [`decode_new`], then `check` on the body: a message that fails it is refused for good (logged
/// within the budget, acked `rejected` with the reason), as a broken one is.
fn decode_checked<T: serde::de::DeserializeOwned>(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    msg: FromDevice<'_>,
    check: impl FnOnce(&T) -> Result<(), String>,
) -> Result<Option<Envelope<T>>, StoreError> {
    let Some(env) = decode_new::<T>(core, txn, p, msg)? else {
        return Ok(None);
    };
    if let Err(reason) = check(&env.body) {
        log_refusal(msg.serial, msg.topic, &reason);
        p.ack(msg.serial, env.seq(), AckOutcome::Rejected { reason });
        return Ok(None);
    }
    Ok(Some(env))
}

/// Refusals are logged within a budget: a device can send broken messages as fast as it likes.
pub(super) fn log_refusal(serial: &Serial, topic: &str, reason: &str) {
    static BUDGET: LogBudget = LogBudget::per_second(CORE_LOG_PER_SECOND);
    if let Some(suppressed) = BUDGET.check() {
        warn!(serial = %serial, topic, reason = %Shown(reason), suppressed, "refused device message");
    }
}
