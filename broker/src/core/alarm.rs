//! Emergencies (Fig. 5) at the relay: `dev/{serial}/up/alarm` from devices, the alarm requests of
//! hosts, and the retained alarm views.
//!
//! Every report is deduplicated by (device, msg id) like any device message and acknowledged only
//! after the commit (S307–S308). A device has at most one active alarm per fault code: a second
//! `raised` for a code that is active is the same emergency (a resend after the device restarted,
//! say), not a new one — so an alarm reaches the dashboards exactly once. `in-progress` moves it
//! on (S309), `cleared` ends it.
//!
//! Events are ordered by the relay's receipt, never by the device's clock: the agent sends a
//! fault's reports in order and the relay answers each in order, so the last one received is the
//! device's latest word. (Comparing device times let one `cleared` dated 9999 hide every later
//! fault of that code.) The device's `at` is kept as `raised_at`, for people to read.
//!
//! One device cannot make the relay hold or send without bound ([`super::alarm_limit`]): at most
//! `max_active_alarms_per_device` active alarms, new ones at most a burst and then a rate. A new
//! alarm past either is acked `rejected` with the reason and listed in the device's overflow
//! alarm ([`super::overflow`]), so the service desk still sees it; sites are cut to
//! [`alarm::MAX_SITE_LEN`] and details to [`alarm::MAX_DETAIL_LEN`], so a device's view stays
//! well under 128 KiB.
//!
//! The device's active alarms are retained on `fleet/{serial}/alarm` and its JSON mirror, rebuilt
//! from redb at startup; when the last one clears, both are deleted (a zero-length payload).

use protocol::alarm::{
    self, AlarmKind, AlarmReport, AlarmState, AlarmStatus, AlarmView, FaultEvent, OVERDUE_CODE,
    OVERFLOW_CODE,
};
use protocol::device::AckOutcome;
use protocol::host::HostReply;
use protocol::{Envelope, HostId, Serial, Shown, Timestamp, topic};
use tracing::{debug, info, warn};

use super::alarm_limit::Limit;
use super::{Core, Done, Outbound, Pending, skip_corrupt};
use crate::store::{StoreError, Txn, alarm_id, alarm_number};

/// Most alarms `alarms list --all` returns.
pub const MAX_LISTED: usize = 1000;

/// What an alarm step did, logged once the commit has made it durable. Tests and operators wait
/// on these lines: `alarm raised`, `alarm in progress`, `alarm cleared`, `alarm acknowledged`.
pub(super) struct Logged {
    alarm: AlarmView,
    step: Step,
}

enum Step {
    Raised,
    InProgress,
    Cleared,
    Acked,
}

impl Logged {
    pub(super) fn log(self, core: &Core) {
        let a = &self.alarm;
        match self.step {
            Step::Raised => {
                core.alerts
                    .stats
                    .alarms_raised
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(serial = %a.serial, alarm = %a.id, code = %Shown(&a.code), kind = %a.kind, detail = %Shown(&a.detail), "alarm raised")
            }
            Step::InProgress => {
                info!(serial = %a.serial, alarm = %a.id, code = %Shown(&a.code), "alarm in progress")
            }
            Step::Cleared => {
                info!(serial = %a.serial, alarm = %a.id, code = %Shown(&a.code), kind = %a.kind, "alarm cleared")
            }
            Step::Acked => {
                info!(serial = %a.serial, alarm = %a.id, code = %Shown(&a.code), host = a.acked_by.as_deref().unwrap_or(""), "alarm acknowledged")
            }
        }
    }
}

pub(super) fn logged_raised(p: &mut Pending, alarm: &AlarmView) {
    logged(p, alarm, Step::Raised);
}

pub(super) fn logged_cleared(p: &mut Pending, alarm: &AlarmView) {
    logged(p, alarm, Step::Cleared);
}

fn logged(p: &mut Pending, alarm: &AlarmView, step: Step) {
    p.alarms.insert(alarm.serial.clone());
    p.done.push(Done::Alarm(Logged {
        alarm: alarm.clone(),
        step,
    }));
}

/// The installation site the device last reported, cut to [`alarm::MAX_SITE_LEN`]; empty if
/// unknown or unreadable (a corrupt device record must not stop an alarm).
pub(super) fn site_of(txn: &dyn Txn, serial: &Serial) -> Result<String, StoreError> {
    Ok(skip_corrupt(txn.device_state(serial))?
        .flatten()
        .map(|state| alarm::clip_site(&state.site))
        .unwrap_or_default())
}

/// An alarm as views, lists and notifications show it: site and detail within their limits,
/// whatever an older relay stored.
pub(super) fn shown(mut a: AlarmView) -> AlarmView {
    if a.site.len() > alarm::MAX_SITE_LEN {
        a.site = alarm::clip_site(&a.site);
    }
    if a.detail.len() > alarm::MAX_DETAIL_LEN {
        a.detail = alarm::clip_detail(&a.detail);
    }
    a
}

/// Alarm number `n` of `serial`, just raised, as every kind of alarm starts: the device's site,
/// no detail, nobody's acknowledgement yet.
pub(super) fn new_alarm(
    txn: &dyn Txn,
    n: u64,
    serial: &Serial,
    kind: AlarmKind,
    code: &str,
    raised_at: Timestamp,
    now: Timestamp,
) -> Result<AlarmView, StoreError> {
    Ok(AlarmView {
        id: alarm_id(n),
        serial: serial.to_string(),
        site: site_of(txn, serial)?,
        kind,
        code: code.to_owned(),
        detail: String::new(),
        status: AlarmStatus::Raised,
        raised_at,
        received_at: now,
        updated_at: now,
        cleared_at: None,
        acked_by: None,
        acked_at: None,
        total: None,
    })
}

/// Stores one new `dev/{serial}/up/alarm` report, already decoded, checked and found new by
/// [`super::device::handle`]; returns the ack's outcome.
pub(super) fn store(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    serial: &Serial,
    report: &AlarmReport,
    now: Timestamp,
) -> Result<AckOutcome, StoreError> {
    Ok(match apply(core, txn, p, serial, report, now)? {
        Applied::Stored => AckOutcome::Stored,
        // Journaled like every refusal (`Core::finish`): a resend of this message, its ack lost,
        // is refused again; a new report of the code is judged anew.
        Applied::Refused(reason) => AckOutcome::Rejected { reason },
    })
}

/// What became of an alarm report.
enum Applied {
    Stored,
    /// Refused by a limit, with the reason for the device; listed in its overflow alarm.
    Refused(String),
}

fn apply(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    serial: &Serial,
    report: &AlarmReport,
    now: Timestamp,
) -> Result<Applied, StoreError> {
    let code = report.code.as_str();
    let active = match txn.active_alarm(serial, code)? {
        Some(n) => txn.alarm(n)?.map(|a| (n, a)),
        None => None,
    };
    match report.event {
        FaultEvent::Raised | FaultEvent::InProgress => match active {
            Some((n, mut a)) => {
                if report.event == FaultEvent::InProgress && a.status == AlarmStatus::Raised {
                    a.status = AlarmStatus::InProgress;
                    a.updated_at = now;
                    txn.put_alarm(n, &a)?;
                    logged(p, &a, Step::InProgress);
                } else {
                    debug!(serial = %serial, alarm = %a.id, code = %Shown(code), event = %report.event, "alarm already active");
                }
            }
            None => {
                if let Some(limit) = over_limit(core, txn, serial, now)? {
                    let reason = super::overflow::fold(core, txn, p, serial, code, limit, now)?;
                    return Ok(Applied::Refused(reason));
                }
                raise(core, txn, p, serial, report, now)?;
            }
        },
        FaultEvent::Cleared => {
            match active {
                Some((n, a)) => {
                    let a = clear(txn, n, a, now)?;
                    logged(p, &a, Step::Cleared);
                }
                None => {
                    debug!(serial = %serial, code = %Shown(code), "clear of a fault with no active alarm")
                }
            }
            super::overflow::forget(txn, p, serial, code, now)?;
        }
    }
    Ok(Applied::Stored)
}

/// Which limit a new alarm of `serial` would break, if any: its active alarms first (which costs
/// no token), then its rate.
fn over_limit(
    core: &Core,
    txn: &dyn Txn,
    serial: &Serial,
    now: Timestamp,
) -> Result<Option<Limit>, StoreError> {
    let settings = core.alerts.settings();
    let limits = &settings.alarm_limits;
    let active = txn.active_alarm_count(serial, &[OVERDUE_CODE, OVERFLOW_CODE])?;
    if active >= limits.max_active {
        return Ok(Some(Limit::MaxActive));
    }
    if !core.alerts.limiter.take(limits, serial, now) {
        return Ok(Some(Limit::Rate));
    }
    Ok(None)
}

/// A new alarm for a fault the device reported.
fn raise(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    serial: &Serial,
    report: &AlarmReport,
    now: Timestamp,
) -> Result<(), StoreError> {
    let n = txn.next_alarm_number()?;
    let a = AlarmView {
        detail: alarm::clip_detail(&report.detail),
        status: match report.event {
            FaultEvent::InProgress => AlarmStatus::InProgress,
            _ => AlarmStatus::Raised,
        },
        total: report.total,
        ..new_alarm(
            txn,
            n,
            serial,
            AlarmKind::Fault,
            &report.code,
            report.at,
            now,
        )?
    };
    txn.put_alarm(n, &a)?;
    core.notify_alarm(txn, n, &a, now)?;
    logged(p, &a, Step::Raised);
    // Past the alarm limit, so bounded: its view goes out at once (view_pace.rs). Not the
    // overflow alarm's raises, which a device can cause at will.
    p.raised.insert(a.serial.clone());
    // A code that was refused before and is raised now is no longer the overflow alarm's.
    super::overflow::forget(txn, p, serial, &a.code, now)?;
    if let Some(refused) = core.alerts.limiter.accepted(serial) {
        info!(serial = %serial, refused, "alarm limit: this device's new alarms are taken again");
    }
    Ok(())
}

pub(super) fn clear(
    txn: &mut dyn Txn,
    n: u64,
    mut a: AlarmView,
    now: Timestamp,
) -> Result<AlarmView, StoreError> {
    a.status = AlarmStatus::Cleared;
    a.cleared_at = Some(now);
    a.updated_at = now;
    txn.put_alarm(n, &a)?;
    Ok(a)
}

/// Raises the relay's own alarm for a device that missed its check-in; returns its number.
pub(super) fn raise_overdue(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    serial: &Serial,
    detail: String,
    due: Timestamp,
    now: Timestamp,
) -> Result<u64, StoreError> {
    if let Some(n) = txn.active_alarm(serial, OVERDUE_CODE)? {
        return Ok(n);
    }
    let n = txn.next_alarm_number()?;
    let a = AlarmView {
        detail,
        ..new_alarm(txn, n, serial, AlarmKind::Overdue, OVERDUE_CODE, due, now)?
    };
    txn.put_alarm(n, &a)?;
    core.notify_alarm(txn, n, &a, now)?;
    logged(p, &a, Step::Raised);
    Ok(n)
}

/// Clears alarm `n` (a device that checked in again clears its overdue alarm).
pub(super) fn clear_by_number(
    txn: &mut dyn Txn,
    p: &mut Pending,
    n: u64,
    now: Timestamp,
) -> Result<(), StoreError> {
    if let Some(a) = txn.alarm(n)?.filter(|a| a.status.is_active()) {
        let a = clear(txn, n, a, now)?;
        logged(p, &a, Step::Cleared);
    }
    Ok(())
}

/// `alarms list`: the active alarms (oldest first), or the newest [`MAX_LISTED`] of all.
pub(super) fn list(
    txn: &dyn Txn,
    all: bool,
    serial: Option<&str>,
) -> Result<HostReply, StoreError> {
    let keep = |a: &AlarmView| serial.is_none_or(|s| a.serial == s);
    let alarms = if all {
        txn.alarms_newest_first(MAX_LISTED)?
            .into_iter()
            .filter(keep)
            .collect()
    } else {
        let numbers = match serial.map(Serial::parse) {
            Some(Ok(s)) => txn.active_alarms_of(&s)?,
            Some(Err(e)) => {
                return Ok(HostReply::Error {
                    reason: e.to_string(),
                });
            }
            None => txn.active_alarms()?,
        };
        let mut out = Vec::with_capacity(numbers.len());
        for n in numbers {
            if let Some(Some(a)) = skip_corrupt(txn.alarm(n))? {
                out.push(a);
            }
        }
        out
    };
    let alarms = alarms.into_iter().map(shown).collect();
    Ok(HostReply::Alarms { alarms })
}

/// `alarms ack ID`: the service desk has seen it. Idempotent: the first host to ack is kept.
pub(super) fn ack(
    txn: &mut dyn Txn,
    p: &mut Pending,
    host: &HostId,
    id: &str,
    now: Timestamp,
) -> Result<HostReply, StoreError> {
    let found = match alarm_number(id) {
        Some(n) => txn.alarm(n)?.filter(|a| a.id == id).map(|a| (n, a)),
        None => None,
    };
    let Some((n, mut a)) = found else {
        return Ok(HostReply::Error {
            reason: format!("no alarm {id} (list them with `host-agent alarms list --all`)"),
        });
    };
    if a.acked_by.is_none() {
        a.acked_by = Some(host.to_string());
        a.acked_at = Some(now);
        a.updated_at = now;
        txn.put_alarm(n, &a)?;
        logged(p, &a, Step::Acked);
    }
    Ok(HostReply::Alarm { alarm: a })
}

/// The retained views of `serial`'s active alarms, or the deletion of both when it has none.
pub(super) fn views(
    txn: &dyn Txn,
    serial: &Serial,
    now: Timestamp,
) -> Result<Vec<Outbound>, StoreError> {
    let mut alarms = Vec::new();
    for n in txn.active_alarms_of(serial)? {
        if let Some(Some(a)) = skip_corrupt(txn.alarm(n))? {
            alarms.push(shown(a));
        }
    }
    let retained = |topic: String, payload: Vec<u8>| Outbound {
        topic,
        payload,
        retain: true,
    };
    if alarms.is_empty() {
        return Ok(vec![
            retained(topic::fleet_alarm(serial), Vec::new()),
            retained(topic::json_fleet_alarm(serial), Vec::new()),
        ]);
    }
    let at = alarms.iter().map(|a| a.updated_at).max().unwrap_or(now);
    let state = AlarmState {
        serial: serial.to_string(),
        alarms,
    };
    let encode_err = |e: String| StoreError::Encode {
        table: "(published view)",
        key: format!("alarms of {serial}"),
        reason: e,
    };
    let cbor = Envelope::new(0, at, &state)
        .to_cbor()
        .map_err(|e| encode_err(e.to_string()))?;
    let json = serde_json::to_vec(&state).map_err(|e| encode_err(e.to_string()))?;
    Ok(vec![
        retained(topic::fleet_alarm(serial), cbor),
        retained(topic::json_fleet_alarm(serial), json),
    ])
}

/// Every device's active alarms, for the retained views republished at startup.
pub(super) fn startup_views(txn: &dyn Txn, now: Timestamp) -> Result<Vec<Outbound>, StoreError> {
    let mut serials = std::collections::BTreeSet::new();
    for n in txn.active_alarms()? {
        if let Some(Some(a)) = skip_corrupt(txn.alarm(n))?
            && let Ok(s) = Serial::parse(&a.serial)
        {
            serials.insert(s);
        }
    }
    let mut out = Vec::new();
    for s in serials {
        out.extend(views(txn, &s, now)?);
    }
    Ok(out)
}
