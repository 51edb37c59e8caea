//! The overflow alarm: what the service desk sees of the alarms the relay refused a device.
//!
//! A new alarm past the device's limits (`max_active_alarms_per_device`, or its burst and rate;
//! see [`super::alarm_limit`]) is acked `rejected`, so the device's outbox stops resending it.
//! It is not lost silently: the device gets one active alarm of the relay's own, code
//! [`OVERFLOW_CODE`] (kind `fault`, so it sorts with the faults), whose detail counts the refused
//! reports and names the refused codes. It is raised (and notified) once per episode; its detail
//! is rewritten when a code joins or leaves the list and when the count reaches a power of two,
//! so a flood republishes the device's view a few dozen times, not once per report.
//!
//! A code leaves the list when the device clears it or raises it again and it is taken. The
//! overflow alarm clears once the list is empty and either every refused code was named or the
//! device has no other active alarm left.

use protocol::alarm::{self, AlarmKind, OVERDUE_CODE, OVERFLOW_CODE};
use protocol::{Serial, Shown, Timestamp};
use tracing::warn;

use super::CORE_LOG_PER_SECOND;
use super::alarm_limit::Limit;
use super::{Core, Pending};
use crate::log_budget::LogBudget;
use crate::store::{MAX_OVERFLOW_CODES, OverflowRecord, StoreError, Txn};

/// Records a refused new alarm of `serial` with `code` in its overflow alarm (raising that alarm
/// if it is not active); returns the reason the device is told.
pub(super) fn fold(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    serial: &Serial,
    code: &str,
    limit: Limit,
    now: Timestamp,
) -> Result<String, StoreError> {
    let existing = txn
        .alarm_overflow(serial)?
        .and_then(|r| match txn.alarm(r.alarm) {
            Ok(Some(a)) if a.status.is_active() => Some(Ok((r, a))),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .transpose()?;
    let (mut record, mut view, new) = match existing {
        Some((r, a)) => (r, a, false),
        None => {
            let n = txn.next_alarm_number()?;
            let view =
                super::alarm::new_alarm(txn, n, serial, AlarmKind::Fault, OVERFLOW_CODE, now, now)?;
            let record = OverflowRecord {
                alarm: n,
                codes: Vec::new(),
                untracked: 0,
                refused: 0,
                since: now,
            };
            (record, view, true)
        }
    };
    record.refused += 1;
    let mut listed = false;
    if !record.codes.iter().any(|c| c == code) {
        if record.codes.len() < MAX_OVERFLOW_CODES {
            record.codes.push(code.to_owned());
            listed = true;
        } else {
            record.untracked += 1;
        }
    }
    if new || listed || record.refused.is_power_of_two() {
        view.detail = detail(&record);
        view.updated_at = now;
        txn.put_alarm(record.alarm, &view)?;
        p.alarms.insert(serial.to_string());
    }
    txn.put_alarm_overflow(serial, Some(&record))?;
    if new {
        core.notify_alarm(txn, record.alarm, &view, now)?;
        super::alarm::logged_raised(p, &view);
    }

    let settings = core.alerts.settings();
    let limits = &settings.alarm_limits;
    let stats = &core.alerts.stats;
    match limit {
        Limit::MaxActive => &stats.alarms_refused_max_active,
        Limit::Rate => &stats.alarms_refused_rate,
    }
    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if core.alerts.limiter.refused(limits, serial, now) {
        log_burst_start(serial, code, limit, &view.id);
    }
    let why = match limit {
        Limit::MaxActive => format!(
            "{serial} already has {} active alarms, the most max_active_alarms_per_device \
             allows; clear some first",
            limits.max_active
        ),
        Limit::Rate => format!(
            "{serial} raised more than {} new alarms at once or {} a minute \
             (alarm_burst_per_device, alarms_per_minute_per_device)",
            limits.burst, limits.per_minute
        ),
    };
    Ok(format!(
        "alarm {code} not raised: {why}. It is listed in the overflow alarm {}",
        view.id
    ))
}

/// `code` of `serial` was cleared, or raised and taken: it leaves the overflow list; the overflow
/// alarm clears once nothing it stands for is left.
pub(super) fn forget(
    txn: &mut dyn Txn,
    p: &mut Pending,
    serial: &Serial,
    code: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    let Some(mut record) = txn.alarm_overflow(serial)? else {
        return Ok(());
    };
    let before = record.codes.len();
    record.codes.retain(|c| c != code);
    let listed_left = !record.codes.is_empty();
    let done = !listed_left
        && (record.untracked == 0
            || txn.active_alarm_count(serial, &[OVERDUE_CODE, OVERFLOW_CODE])? == 0);
    let view = txn.alarm(record.alarm)?.filter(|a| a.status.is_active());
    match view {
        Some(a) if done => {
            let a = super::alarm::clear(txn, record.alarm, a, now)?;
            super::alarm::logged_cleared(p, &a);
            txn.put_alarm_overflow(serial, None)?;
        }
        None => txn.put_alarm_overflow(serial, None)?,
        Some(mut a) if record.codes.len() != before => {
            a.detail = detail(&record);
            a.updated_at = now;
            txn.put_alarm(record.alarm, &a)?;
            p.alarms.insert(serial.to_string());
            txn.put_alarm_overflow(serial, Some(&record))?;
        }
        Some(_) => {}
    }
    Ok(())
}

/// "N alarm reports refused since …", then as many refused codes as fit in a detail.
fn detail(r: &OverflowRecord) -> String {
    let since = r.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut text = format!(
        "{} alarm report{} refused since {since} (over max_active_alarms_per_device or \
         alarms_per_minute_per_device; see the relay's log)",
        r.refused,
        if r.refused == 1 { "" } else { "s" }
    );
    // Room for the longest " (+N more)".
    let room = alarm::MAX_DETAIL_LEN - 24;
    let mut shown = 0;
    for code in &r.codes {
        let sep = if shown == 0 { ". Codes: " } else { ", " };
        if text.len() + sep.len() + code.len() > room {
            break;
        }
        text.push_str(sep);
        text.push_str(code);
        shown += 1;
    }
    let more = (r.codes.len() - shown) as u64 + r.untracked;
    if more > 0 {
        text.push_str(&format!(" (+{more} more)"));
    }
    alarm::clip_detail(&text)
}

/// The start of a burst of refusals, once per burst and within a log budget (many devices may
/// start one at once).
fn log_burst_start(serial: &Serial, code: &str, limit: Limit, overflow: &str) {
    static BUDGET: LogBudget = LogBudget::per_second(CORE_LOG_PER_SECOND);
    if let Some(suppressed) = BUDGET.check() {
        warn!(serial = %serial, code = %Shown(code), limit = limit.key(), overflow, suppressed, "alarm limit reached: this device's new alarms are refused and listed in its overflow alarm");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detail_names_what_fits_and_counts_the_rest() {
        let since = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        let mut r = OverflowRecord {
            alarm: 7,
            codes: vec!["SC-1".into(), "SC-2".into()],
            untracked: 0,
            refused: 2,
            since,
        };
        let d = detail(&r);
        assert!(d.starts_with("2 alarm reports refused since 2026-"), "{d}");
        assert!(d.ends_with("Codes: SC-1, SC-2"), "{d}");
        r.codes = (0..64)
            .map(|i| format!("{}-{i:02}", "X".repeat(29)))
            .collect();
        r.untracked = 10;
        let d = detail(&r);
        assert!(d.len() <= alarm::MAX_DETAIL_LEN, "{}", d.len());
        assert!(d.contains("more)"), "{d}");
    }
}
