//! The core's part in rollouts: the host requests (create, list, show, pause/resume/abort/approve,
//! devices list and tag) and the tick that moves every rollout that has not ended
//! ([`crate::rollouts::step`]). Jobs a rollout files or cancels go through the same paths as a
//! host's own, so their orders, views, notifications and log lines are the same.

use protocol::host::HostReply;
use protocol::rollout::{RolloutAction, RolloutSpec, RolloutStatus};
use protocol::{HostId, MsgId, Shown, Timestamp};
use tracing::{info, warn};

use super::{Core, Done, Pending, views};
use crate::notify::{self, NotifyEvent};
use crate::rollouts::{plan, step, view};
use crate::store::{
    JournalEntry, JournalOutcome, RolloutRecord, StoreError, Txn, rollout_id, rollout_number,
};

/// Most tags a device may carry, and the longest tag.
const MAX_TAGS: usize = 32;
const MAX_TAG_BYTES: usize = 64;

/// `rollouts create`: checked, planned, written and given its first step in this batch. A resent
/// request gets the rollout its first sending made.
pub(super) fn create(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    host: &HostId,
    id: MsgId,
    spec: &RolloutSpec,
    now: Timestamp,
) -> Result<HostReply, StoreError> {
    let sender = protocol::Identity::host(host).to_string();
    if let Some(entry) = txn.journal(&sender, id)? {
        return Ok(match entry.outcome {
            JournalOutcome::Rollout { rollout } => match shown(txn, &rollout)? {
                Some(reply) => reply,
                None => error(format!("rollout {rollout} of this request is missing")),
            },
            _ => error(format!("message {id} was already used for something else")),
        });
    }
    let mut record = match plan::plan(&*txn, host, spec, now)? {
        Ok(r) => r,
        Err(reason) => {
            warn!(host = %host, rollout = %Shown(&spec.name), reason = %Shown(&reason), "rollout refused");
            return Ok(error(reason));
        }
    };
    let n = txn.next_rollout_number()?;
    record.id = rollout_id(n);
    info!(host = %host, rollout = %record.id, name = %Shown(&record.name), devices = record.waves.iter().map(|w| w.members.len()).sum::<usize>(), waves = record.waves.len(), "rollout created");
    txn.put_journal(
        &sender,
        id,
        &JournalEntry {
            at: now,
            outcome: JournalOutcome::Rollout {
                rollout: record.id.clone(),
            },
        },
    )?;
    take_step(core, txn, p, n, &mut record, step::Refresh::All, now)?;
    txn.put_rollout(n, &record)?;
    p.rollouts.insert(n);
    Ok(HostReply::Rollout {
        rollout: Box::new(view::view(&record, true)),
    })
}

pub(super) fn list(txn: &dyn Txn) -> Result<HostReply, StoreError> {
    Ok(HostReply::Rollouts {
        rollouts: txn
            .rollouts_newest_first()?
            .iter()
            .map(|(_, r)| view::view(r, false))
            .collect(),
    })
}

pub(super) fn show(txn: &dyn Txn, rollout: &str) -> Result<HostReply, StoreError> {
    Ok(shown(txn, rollout)?.unwrap_or_else(|| not_found(rollout)))
}

fn shown(txn: &dyn Txn, rollout: &str) -> Result<Option<HostReply>, StoreError> {
    Ok(load(txn, rollout)?.map(|(_, r)| HostReply::Rollout {
        rollout: Box::new(view::view(&r, true)),
    }))
}

fn load(txn: &dyn Txn, rollout: &str) -> Result<Option<(u64, RolloutRecord)>, StoreError> {
    load_with(rollout, |n| txn.rollout(n))
}

/// [`load`] to change it (see `RolloutTables::rollout_for_update`).
fn load_for_update(
    txn: &dyn Txn,
    rollout: &str,
) -> Result<Option<(u64, RolloutRecord)>, StoreError> {
    load_with(rollout, |n| txn.rollout_for_update(n))
}

fn load_with(
    rollout: &str,
    read: impl FnOnce(u64) -> Result<Option<RolloutRecord>, StoreError>,
) -> Result<Option<(u64, RolloutRecord)>, StoreError> {
    let Some(n) = rollout_number(rollout) else {
        return Ok(None);
    };
    Ok(read(n)?.filter(|r| r.id == rollout).map(|r| (n, r)))
}

fn not_found(rollout: &str) -> HostReply {
    error(format!(
        "no rollout {rollout} (list them with `host-agent rollouts list`)"
    ))
}

fn error(reason: String) -> HostReply {
    HostReply::Error { reason }
}

/// Pause, resume, abort or approve. Repeating an action that already holds answers with the
/// rollout as it is (a resent request), not an error.
pub(super) fn act(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    host: &HostId,
    rollout: &str,
    action: RolloutAction,
    now: Timestamp,
) -> Result<HostReply, StoreError> {
    let Some((n, mut r)) = load_for_update(txn, rollout)? else {
        return Ok(not_found(rollout));
    };
    use RolloutStatus as S;
    let status = r.status;
    let refused = |why: &str| {
        Ok(error(format!(
            "cannot {} {rollout}: it is {status}{why}",
            action.as_str()
        )))
    };
    let mut fx = step::Effects::default();
    match (action, status) {
        (RolloutAction::Pause, S::Paused) | (RolloutAction::Abort, S::Aborted) => {}
        (RolloutAction::Pause, S::Scheduled | S::Running | S::WaitingApproval) => {
            r.status = S::Paused;
            r.reason = Some(format!("paused by host {host}"));
        }
        (RolloutAction::Resume, S::Paused) => {
            r.status = S::Running;
            r.reason = None;
        }
        (RolloutAction::Resume, S::Running | S::Scheduled | S::WaitingApproval) => {}
        (RolloutAction::Approve, S::WaitingApproval) => {
            r.approved = r.wave + 1;
            r.status = S::Running;
            r.reason = None;
        }
        (RolloutAction::Approve, S::Running) if r.approved > r.wave => {}
        (RolloutAction::Approve, _) => {
            return refused(", not waiting for approval");
        }
        (RolloutAction::Abort, s) if !s.is_final() => {
            step::abort(txn, &mut r, format!("aborted by host {host}"), now, &mut fx)?;
        }
        (_, s) if s.is_final() => return refused(" (ended)"),
        _ => return refused(""),
    }
    info!(host = %host, rollout = %r.id, action = action.as_str(), status = %r.status, "rollout changed");
    r.updated_at = now;
    apply(core, txn, p, &r, fx, now)?;
    take_step(core, txn, p, n, &mut r, step::Refresh::All, now)?;
    txn.put_rollout(n, &r)?;
    p.rollouts.insert(n);
    Ok(HostReply::Rollout {
        rollout: Box::new(view::view(&r, true)),
    })
}

/// `devices list --target …`: what a rollout with these targets would select now.
pub(super) fn devices(txn: &dyn Txn, targets: &[String]) -> Result<HostReply, StoreError> {
    let targets = match plan::parse_targets(targets) {
        Ok(t) => t,
        Err(e) => return Ok(error(e)),
    };
    Ok(HostReply::Devices {
        devices: plan::select(txn, &targets, &[])?,
    })
}

/// `devices tag`: adds and removes tags; the reply lists the devices as they are now.
pub(super) fn tag(
    txn: &mut dyn Txn,
    host: &HostId,
    serials: &[String],
    add: &[String],
    remove: &[String],
) -> Result<HostReply, StoreError> {
    if serials.is_empty() {
        return Ok(error("name the devices to tag".into()));
    }
    if add.is_empty() && remove.is_empty() {
        return Ok(error("give tags to --add or --remove".into()));
    }
    for t in add {
        if t.is_empty()
            || t.len() > MAX_TAG_BYTES
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Ok(error(format!(
                "tag {t:?}: use 1 to {MAX_TAG_BYTES} letters, digits, - _ . :"
            )));
        }
    }
    let mut out = Vec::new();
    for serial in serials {
        let Ok(parsed) = protocol::Serial::parse(serial) else {
            return Ok(error(format!("{serial:?} is not a serial")));
        };
        if txn.device(&parsed)?.is_none() {
            return Ok(error(format!(
                "no device {serial} has connected to this relay (see `host-agent devices list`)"
            )));
        }
        let mut tags = txn.device_tags(serial)?;
        tags.retain(|t| !remove.contains(t));
        for t in add {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
        tags.sort();
        if tags.len() > MAX_TAGS {
            return Ok(error(format!(
                "{serial} would carry {} tags, more than {MAX_TAGS}",
                tags.len()
            )));
        }
        txn.put_device_tags(serial, &tags)?;
        info!(host = %host, serial = %parsed, tags = ?tags, "device tags set");
        out.push(serial.clone());
    }
    let devices = plan::select(&*txn, &[], &out)?;
    Ok(HostReply::Devices { devices })
}

/// One step of rollout `n`, its effects recorded in the batch.
fn take_step(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    n: u64,
    r: &mut RolloutRecord,
    refresh: step::Refresh<'_>,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let defaults = core.defaults();
    let filing = step::Filing {
        server: &core.settings.server_name,
        defaults: &defaults,
    };
    let fx = step::advance(txn, r, &filing, refresh, now)?;
    let changed = fx.changed;
    apply(core, txn, p, r, fx, now)?;
    if changed {
        p.rollouts.insert(n);
    }
    Ok(changed)
}

/// Puts what a step did into the batch: orders and views of filed jobs, cleared orders of
/// canceled ones, the notification of a rollout that ended.
fn apply(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    r: &RolloutRecord,
    fx: step::Effects,
    now: Timestamp,
) -> Result<(), StoreError> {
    let host = HostId::parse(&r.host).ok();
    for (n, job) in fx.filed {
        p.new_orders.insert(n);
        p.views.insert(n);
        if let Some(host) = &host {
            p.done.push(Done::Submitted {
                host: host.clone(),
                serial: job.view.serial.clone(),
                job: job.view.id.clone(),
                rejected: job.view.reason.clone(),
            });
        }
    }
    for (n, job) in fx.canceled {
        p.ended.insert(n);
        p.views.insert(n);
        if let Some(host) = &host {
            p.done.push(Done::Canceled {
                host: host.clone(),
                serial: job.view.serial.clone(),
                job: job.view.id.clone(),
            });
        }
    }
    if fx.ended {
        let event = match r.status {
            RolloutStatus::Aborted => NotifyEvent::RolloutAborted,
            _ => NotifyEvent::RolloutFinished,
        };
        info!(rollout = %r.id, status = %r.status, reason = r.reason.as_deref().unwrap_or(""), "rollout ended");
        let v = view::view(r, false);
        let server = core.settings.server_name.clone();
        core.notify(
            txn,
            event,
            "",
            || notify::compose::rollout(&v, event, &server),
            now,
        )?;
    }
    Ok(())
}

impl Core {
    /// The tick's turn for rollouts: one step of each that has not ended, in one transaction.
    /// Runs on the node that leads cluster work, like deadlines: once per store.
    pub fn rollouts_tick(&self, now: Timestamp) -> Result<Vec<super::Outbound>, StoreError> {
        if !self.storage_writable() {
            return Ok(Vec::new());
        }
        let mut txn = self.store.begin()?;
        let active = txn.active_rollouts()?;
        if active.is_empty() {
            txn.commit()?;
            return Ok(Vec::new());
        }
        let mut p = Pending::default();
        for n in active {
            let mut r = match txn.rollout_for_update(n) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) if e.is_corrupt_record() => {
                    warn!(rollout = %rollout_id(n), error = %e, "rollout record is corrupt; skipped");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if take_step(self, &mut *txn, &mut p, n, &mut r, step::Refresh::All, now)? {
                txn.put_rollout(n, &r)?;
            }
        }
        let done = std::mem::take(&mut p.done);
        let (out, _) = self.finish(&mut *txn, p, now)?;
        self.commit_counted(txn, 0)?;
        for d in done {
            d.log(self);
        }
        Ok(out)
    }
}

/// Jobs of rollouts that ended in this batch move their rollouts on in it: the next wave is
/// filed, or the rollout ends, without waiting for the tick. Called by [`Core::finish`] before
/// it builds what the batch publishes, so the orders of jobs filed here go out with it.
pub(super) fn follow_ended_jobs(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    now: Timestamp,
) -> Result<(), StoreError> {
    let mut by_rollout: std::collections::BTreeMap<u64, Vec<(u64, protocol::job::JobStatus)>> =
        std::collections::BTreeMap::new();
    for &n in &p.ended {
        if let Ok(Some(job)) = txn.job(n)
            && let Some(r) = job.rollout
        {
            by_rollout.entry(r).or_default().push((n, job.view.status));
        }
    }
    for (n, ended) in by_rollout {
        let mut r = match txn.rollout_for_update(n) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) if e.is_corrupt_record() => continue,
            Err(e) => return Err(e),
        };
        let changed = if r.is_active() {
            take_step(core, txn, p, n, &mut r, step::Refresh::Ended(&ended), now)?
        } else {
            step::record_ended(&mut r, &ended, now)
        };
        if changed {
            txn.put_rollout(n, &r)?;
            p.rollouts.insert(n);
        }
    }
    Ok(())
}

/// The retained JSON view of rollout `n` as the batch left it.
pub(super) fn rollout_view(txn: &dyn Txn, n: u64) -> Result<Option<super::Outbound>, StoreError> {
    let Some(r) = txn.rollout(n)? else {
        return Ok(None);
    };
    let json = serde_json::to_vec(&view::view(&r, true)).map_err(|e| StoreError::Encode {
        table: "(published view)",
        key: format!("rollout view {}", r.id),
        reason: e.to_string(),
    })?;
    Ok(Some(views::retained_view(
        protocol::topic::json_fleet_rollout(&r.id),
        json,
    )))
}
