//! `rollouts create`: every field checked before anything is written, the devices selected from
//! the registry, and the waves cut from them. A bad field is refused with what to write instead.

use protocol::host::SubmitJob;
use protocol::rollout::{DeviceFacts, DeviceListing, RolloutSpec, RolloutStatus, Target};
use protocol::validate::SpecDraft;
use protocol::{HostId, Timestamp};

use super::window::Window;
use crate::jobs::{JobKind, firmware};
use crate::store::{Member, RolloutRecord, StoreError, Txn, WaveRecord};

/// Most devices one rollout may hold: its record is rewritten as its jobs move, so it stays a
/// few megabytes at most.
pub const MAX_DEVICES: usize = 100_000;

/// Longest rollout name.
const MAX_NAME: usize = 64;

/// Checks `spec` and selects its devices, or says why not. Reads only: the caller numbers the
/// record (its `id` is empty here) and writes it, so a refused spec uses no number.
pub fn plan(
    txn: &dyn Txn,
    host: &HostId,
    spec: &RolloutSpec,
    now: Timestamp,
) -> Result<Result<RolloutRecord, String>, StoreError> {
    let checked = match check(txn, spec, now)? {
        Ok(c) => c,
        Err(reason) => return Ok(Err(reason)),
    };
    let devices = select(txn, &checked.targets, &spec.serials)?;
    if devices.is_empty() && !spec.dynamic {
        return Ok(Err(
            "the targets select no device: see what they select with `host-agent devices list --target …`"
                .into(),
        ));
    }
    if devices.len() > MAX_DEVICES {
        return Ok(Err(format!(
            "the targets select {} devices, more than {MAX_DEVICES} in one rollout: narrow them or split the rollout",
            devices.len()
        )));
    }
    let serials: Vec<String> = devices.into_iter().map(|d| d.serial).collect();
    let waves = cut(&serials, &checked.waves);
    let started = checked.start_at.is_none_or(|t| t <= now);
    let mut record = RolloutRecord {
        id: String::new(),
        name: spec.name.trim().to_owned(),
        host: host.to_string(),
        job: spec.job.clone(),
        targets: spec.targets.clone(),
        serials: spec.serials.clone(),
        status: if started {
            RolloutStatus::Running
        } else {
            RolloutStatus::Scheduled
        },
        reason: None,
        created_at: now,
        updated_at: now,
        start_at: checked.start_at,
        success_threshold_pct: checked.success_threshold,
        abort_failure_rate_pct: checked.abort_failure_rate,
        abort_min_finished: spec.abort_min_finished.unwrap_or(1).max(1),
        rate_per_min: spec.rate_per_min,
        window: spec.window.clone(),
        approve_each_wave: spec.approve_each_wave,
        dynamic: spec.dynamic,
        wave: 0,
        approved: 0,
        waves,
        next_release: None,
        withdrawn: Vec::new(),
        scanned_at: Some(now),
    };
    if started && let Some(first) = record.waves.first_mut() {
        first.started_at = Some(now);
    }
    Ok(Ok(record))
}

/// The fields of a spec, parsed.
struct Checked {
    targets: Vec<Target>,
    waves: Vec<f64>,
    success_threshold: f64,
    abort_failure_rate: Option<f64>,
    start_at: Option<Timestamp>,
}

fn check(
    txn: &dyn Txn,
    spec: &RolloutSpec,
    now: Timestamp,
) -> Result<Result<Checked, String>, StoreError> {
    macro_rules! refuse {
        ($($arg:tt)*) => { return Ok(Err(format!($($arg)*))) };
    }
    let name = spec.name.trim();
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        refuse!("give the rollout a name of 1 to {MAX_NAME} characters (--name c300-fw2)");
    }
    if spec.targets.is_empty() && spec.serials.is_empty() {
        refuse!(
            "the target is empty: select devices with --target (model=C300, firmware<2.0.0, site=Osaka*, serial=C3-*, tag=…) or --serials-file"
        );
    }
    let targets = match spec
        .targets
        .iter()
        .map(|t| Target::parse(t))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(t) => t,
        Err(e) => refuse!("{e}"),
    };
    if let Err(e) = job_template(txn, &spec.job, now)? {
        refuse!("the job each device would get is refused: {e}");
    }
    let waves = match waves(&spec.waves) {
        Ok(w) => w,
        Err(e) => refuse!("{e}"),
    };
    let success_threshold = match &spec.success_threshold {
        None => 100.0,
        Some(t) => match percent(t, "--success-threshold", true) {
            Ok(p) => p,
            Err(e) => refuse!("{e}"),
        },
    };
    let abort_failure_rate = match &spec.abort_failure_rate {
        None => None,
        Some(t) => match percent(t, "--abort-failure-rate", false) {
            Ok(p) => Some(p),
            Err(e) => refuse!("{e}"),
        },
    };
    if spec.rate_per_min == Some(0) {
        refuse!(
            "--rate-per-min 0 would file nothing: use at least 1, or leave it out for no limit"
        );
    }
    if spec.abort_min_finished == Some(0) {
        refuse!("--abort-min-finished must be at least 1");
    }
    if let Some(w) = &spec.window
        && let Err(e) = Window::parse(w)
    {
        refuse!("{e}");
    }
    let start_at = match &spec.start_at {
        None => None,
        Some(t) => match chrono::DateTime::parse_from_rfc3339(t) {
            Ok(t) => Some(t.with_timezone(&chrono::Utc)),
            Err(e) => refuse!(
                "--start-at {t:?} is not an RFC 3339 time ({e}), e.g. 2026-12-24T01:00:00+09:00"
            ),
        },
    };
    Ok(Ok(Checked {
        targets,
        waves,
        success_threshold,
        abort_failure_rate,
        start_at,
    }))
}

/// Checks the job template as `jobs submit` would check it for one device (and, for firmware,
/// that the artifact is held whole).
fn job_template(
    txn: &dyn Txn,
    job: &SubmitJob,
    now: Timestamp,
) -> Result<Result<(), String>, StoreError> {
    if !job.serial.is_empty() {
        return Ok(Err(
            "a rollout's job names no serial: the targets choose the devices".into(),
        ));
    }
    if job.via.is_some() {
        return Ok(Err(
            "a rollout's job names no child relay: each job goes where its device is".into(),
        ));
    }
    let probe = SubmitJob {
        serial: "ROLLOUT-CHECK".into(),
        ..job.clone()
    };
    let valid = match JobKind::validate(&probe, now) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e.0)),
    };
    if let SpecDraft::Firmware { artifact } = &valid.spec
        && let Err(e) = firmware::resolve(txn, artifact)?
    {
        return Ok(Err(e.0));
    }
    Ok(Ok(()))
}

/// `1%,10%,50%,100%` → [1, 10, 50, 100]; rising, ending at 100. Empty: one wave.
fn waves(list: &[String]) -> Result<Vec<f64>, String> {
    if list.is_empty() {
        return Ok(vec![100.0]);
    }
    let mut out = Vec::with_capacity(list.len());
    for w in list {
        let p = percent(w, "--waves", false)?;
        if out.last().is_some_and(|&last| p <= last) {
            return Err(format!(
                "--waves must rise: {w} comes after {}%",
                out.last().copied().unwrap_or(0.0)
            ));
        }
        out.push(p);
    }
    if out.last() != Some(&100.0) {
        return Err(format!(
            "--waves must end at 100% (each is the share reached by the end of that wave), not {}",
            list.last().map(String::as_str).unwrap_or("")
        ));
    }
    Ok(out)
}

/// `95%` (or `95`) → 95.0; within 0..=100 (`zero_ok`) or above 0.
fn percent(text: &str, flag: &str, zero_ok: bool) -> Result<f64, String> {
    let p: f64 = text
        .trim()
        .trim_end_matches('%')
        .trim()
        .parse()
        .map_err(|_| format!("{flag} {text:?} is not a percentage such as 95%"))?;
    let low_ok = if zero_ok { p >= 0.0 } else { p > 0.0 };
    if !p.is_finite() || !low_ok || p > 100.0 {
        return Err(format!(
            "{flag} {text} is out of range: use {} to 100%",
            if zero_ok { "0" } else { "more than 0" }
        ));
    }
    Ok(p)
}

/// Cuts the devices (in serial order) into waves, each reaching its cumulative share rounded up.
fn cut(serials: &[String], shares: &[f64]) -> Vec<WaveRecord> {
    let total = serials.len();
    let mut from = 0;
    shares
        .iter()
        .map(|&p| {
            let to = ((total as f64 * p / 100.0).ceil() as usize).clamp(from, total);
            let members = serials[from..to]
                .iter()
                .map(|s| Member {
                    serial: s.clone(),
                    job: None,
                    status: None,
                })
                .collect();
            from = to;
            WaveRecord {
                percent: p,
                started_at: None,
                members,
            }
        })
        .collect()
}

/// The devices of the registry that pass every target (and, if any serials are named, are among
/// them), in serial order.
pub fn select(
    txn: &dyn Txn,
    targets: &[Target],
    serials: &[String],
) -> Result<Vec<DeviceListing>, StoreError> {
    let named: std::collections::BTreeSet<&str> = serials.iter().map(String::as_str).collect();
    let tags: std::collections::BTreeMap<String, Vec<String>> =
        txn.all_device_tags()?.into_iter().collect();
    let mut out = Vec::new();
    for serial in txn.device_serials()? {
        if !named.is_empty() && !named.contains(serial.as_str()) {
            continue;
        }
        let record = match txn.device(&serial) {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(e) if e.is_corrupt_record() => {
                tracing::warn!(serial = %serial, error = %e, "device record is corrupt; left out of the selection");
                continue;
            }
            Err(e) => return Err(e),
        };
        let no_tags = Vec::new();
        let device_tags = tags.get(serial.as_str()).unwrap_or(&no_tags);
        let facts = DeviceFacts {
            serial: serial.as_str(),
            model: &record.state.model,
            site: &record.state.site,
            firmware: &record.state.firmware,
            tags: device_tags,
        };
        if targets.iter().all(|t| t.matches(&facts)) {
            out.push(DeviceListing {
                serial: serial.to_string(),
                model: record.state.model.clone(),
                site: record.state.site.clone(),
                firmware: record.state.firmware.clone(),
                tags: device_tags.clone(),
                last_seen: record.last_seen,
            });
        }
    }
    Ok(out)
}

/// Parses targets for `devices list` (the error names the bad one).
pub fn parse_targets(targets: &[String]) -> Result<Vec<Target>, String> {
    targets.iter().map(|t| Target::parse(t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_must_rise_and_end_at_one_hundred() {
        assert_eq!(
            waves(&["1%".into(), "10%".into(), "100%".into()]).unwrap(),
            vec![1.0, 10.0, 100.0]
        );
        assert_eq!(waves(&[]).unwrap(), vec![100.0]);
        let e = waves(&["10%".into(), "50%".into()]).unwrap_err();
        assert!(e.contains("must end at 100%"), "{e}");
        let e = waves(&["50%".into(), "10%".into(), "100%".into()]).unwrap_err();
        assert!(e.contains("must rise"), "{e}");
        let e = waves(&["0%".into(), "100%".into()]).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn percentages_are_checked_against_their_range() {
        assert_eq!(percent("95%", "x", true).unwrap(), 95.0);
        assert_eq!(percent("0", "x", true).unwrap(), 0.0);
        assert!(percent("0%", "x", false).is_err());
        assert!(
            percent("101%", "x", true)
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            percent("lots", "x", true)
                .unwrap_err()
                .contains("not a percentage")
        );
    }

    #[test]
    fn waves_are_cut_by_cumulative_share_rounded_up() {
        let serials: Vec<String> = (0..50).map(|i| format!("C{i:02}")).collect();
        let waves = cut(&serials, &[1.0, 10.0, 50.0, 100.0]);
        let sizes: Vec<usize> = waves.iter().map(|w| w.members.len()).collect();
        assert_eq!(sizes, vec![1, 4, 20, 25]);
        assert_eq!(waves[1].members[0].serial, "C01");
        let all: usize = sizes.iter().sum();
        assert_eq!(all, 50);
    }
}
