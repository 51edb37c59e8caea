//! Meter reads for billing (Fig. 3 counters): every get-data job that brought back the
//! `counters` section and every `dev/{serial}/up/counters` report becomes one reading, kept by
//! time; `host-agent export counters` pages through them ([`export`]).

use protocol::data::Section;
use protocol::device::{AckOutcome, JobUpdate};
use protocol::host::HostReply;
use protocol::meter::{self, CounterReading, CounterReport, MAX_READINGS_PER_PAGE};
use protocol::{JobId, Seq, Serial, Shown, Timestamp};
use tracing::{debug, warn};

use super::alarm::site_of;
use crate::store::{ReadingCursor, StoreError, Txn};

/// Stores one new `dev/{serial}/up/counters` report, already decoded, checked and found new by
/// [`super::device::handle`], as a reading.
pub(super) fn store(
    txn: &mut dyn Txn,
    serial: &Serial,
    seq: Seq,
    report: CounterReport,
) -> Result<AckOutcome, StoreError> {
    let reading = CounterReading {
        serial: serial.to_string(),
        site: site_of(txn, serial)?,
        read_at: report.read_at,
        source: "report".into(),
        counters: report.counters,
    };
    txn.put_reading(&reading)?;
    // Routine telemetry, a line per report and device: at debug, as a repeated state report.
    debug!(serial = %serial, msg_id = seq.id, "counters report stored");
    Ok(AckOutcome::Stored)
}

/// A get-data job's result that carries counters is a reading too (read when it was stored).
pub(super) fn job_reading(
    txn: &mut dyn Txn,
    serial: &Serial,
    job: &JobId,
    update: &JobUpdate,
    now: Timestamp,
) -> Result<(), StoreError> {
    let Some(counters) = update.data.as_ref().and_then(|d| d.get(&Section::Counters)) else {
        return Ok(());
    };
    // The job's result is the device's answer and is kept as it came; only billing must not
    // count what cannot be a meter reading.
    if let Err(reason) = meter::check_counters(counters) {
        warn!(serial = %serial, job = %job, reason = %Shown(&reason), "job result's counters are not a meter reading; none recorded");
        return Ok(());
    }
    let reading = CounterReading {
        serial: serial.to_string(),
        site: site_of(txn, serial)?,
        read_at: now,
        source: format!("job {job}"),
        counters: counters.clone(),
    };
    txn.put_reading(&reading)
}

fn parse_time(what: &str, text: &str) -> Result<Timestamp, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| {
            format!("{what} {text:?} is not an RFC 3339 time (e.g. 2026-11-01T00:00:00Z): {e}")
        })
}

/// `export counters`: one page of readings with `from <= read_at < to`, oldest first.
pub(super) fn export(
    txn: &dyn Txn,
    from: &str,
    to: &str,
    after: Option<&str>,
    serial: Option<&str>,
) -> Result<HostReply, StoreError> {
    let range = parse_time("from", from).and_then(|f| Ok((f, parse_time("to", to)?)));
    let (from, to) = match range {
        Ok((f, t)) if f <= t => (f, t),
        Ok(_) => {
            return Ok(HostReply::Error {
                reason: format!("--from {from} is after --to {to}"),
            });
        }
        Err(reason) => return Ok(HostReply::Error { reason }),
    };
    let after = match after.map(|a| (a, ReadingCursor::parse(a))) {
        Some((_, Some(c))) => Some(c),
        Some((text, None)) => {
            return Ok(HostReply::Error {
                reason: format!("{text:?} is not a page cursor this relay gave out"),
            });
        }
        None => None,
    };
    let (readings, next) = txn.readings(from, to, after.as_ref(), serial, MAX_READINGS_PER_PAGE)?;
    Ok(HostReply::Counters {
        readings,
        next: next.map(|c| c.to_text()),
    })
}
