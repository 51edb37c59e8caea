//! Checks a host's submission before anything is stored (S103). The error text is the reason the
//! broker records for the rejected job (S104) and sends back to the host, so it names the field and
//! says what would be accepted.

use std::collections::BTreeSet;

use crate::Timestamp;
use crate::data::{DeviceData, Section};
use crate::host::SubmitJob;
use crate::ids::Serial;
use crate::job::{JobSpec, KNOWN_KINDS, MergeAt};
use crate::schedule::{Schedule, SessionMode};

/// Most attempts a job may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
/// Most values one update-data job may set.
pub const MAX_VALUES: usize = 256;

/// A submission that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSubmission {
    pub serial: Serial,
    pub spec: SpecDraft,
    pub instruction_time: Timestamp,
    pub execution_time: Option<Timestamp>,
    /// `None`: the broker applies its default.
    pub deadline: Option<Timestamp>,
    /// `None`: the broker applies its default.
    pub max_attempts: Option<u32>,
    /// The child relay to send it through (checked against the relay's `[[relays]]` by it).
    pub via: Option<crate::RelayId>,
}

/// A valid job spec, or a firmware job whose artifact the broker still has to look up (only it
/// knows which artifacts it holds).
#[derive(Debug, Clone, PartialEq)]
pub enum SpecDraft {
    Ready(JobSpec),
    /// `artifact` is an artifact id (SHA-256 hex) or a version.
    Firmware {
        artifact: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

fn time_field(name: &str, value: &Option<String>) -> Result<Option<Timestamp>, Rejected> {
    match value {
        None => Ok(None),
        Some(text) => chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| Some(t.with_timezone(&chrono::Utc)))
            .map_err(|e| {
                Rejected(format!(
                    "{name} {text:?} is not an RFC 3339 time ({e}); write e.g. 2026-11-26T22:00:00Z"
                ))
            }),
    }
}

/// Validates `req` as of `now`.
pub fn submission(req: &SubmitJob, now: Timestamp) -> Result<ValidSubmission, Rejected> {
    let serial = Serial::parse(&req.serial).map_err(|e| Rejected(e.to_string()))?;
    let instruction_time = time_field("at", &req.at)?.unwrap_or(now);
    let execution_time = time_field("execute_at", &req.execute_at)?;
    let deadline = time_field("deadline", &req.deadline)?;
    let spec = match req.kind.as_str() {
        "get-data" => {
            if execution_time.is_some() {
                return Err(Rejected(
                    "execute_at applies to update and firmware jobs, not get-data; drop it".into(),
                ));
            }
            SpecDraft::Ready(JobSpec::GetData {
                sections: sections(&req.sections)?,
            })
        }
        "update-data" => SpecDraft::Ready(update_data(req)?),
        "firmware" => match req.artifact.as_deref() {
            Some(a) if !a.trim().is_empty() => SpecDraft::Firmware {
                artifact: a.trim().to_owned(),
            },
            _ => {
                return Err(Rejected(
                    "a firmware job needs an artifact (its id or version); upload one with `host-agent artifacts upload`".into(),
                ));
            }
        },
        "set-schedule" => SpecDraft::Ready(JobSpec::SetSchedule {
            schedule: schedule(req)?,
        }),
        other => {
            return Err(Rejected(format!(
                "job kind {other:?} is not known: use one of {}",
                KNOWN_KINDS.join(", ")
            )));
        }
    };
    if let Some(exec) = execution_time
        && exec < instruction_time
    {
        return Err(Rejected(format!(
            "execute_at {} is before the instruction time {}; the device must fetch before it applies",
            exec.to_rfc3339(),
            instruction_time.to_rfc3339()
        )));
    }
    if let Some(n) = req.max_attempts
        && !(1..=MAX_ATTEMPTS).contains(&n)
    {
        return Err(Rejected(format!(
            "max_attempts {n} is out of range: use 1 to {MAX_ATTEMPTS}"
        )));
    }
    // The deadline must leave room for the work: a job that waits for its execution time
    // (a firmware write in a maintenance window) could otherwise only time out.
    let (earliest, which) = match execution_time {
        Some(exec) if exec > instruction_time.max(now) => (exec, "execution time"),
        _ => (instruction_time.max(now), "instruction time"),
    };
    if let Some(deadline) = deadline
        && deadline <= earliest
    {
        return Err(Rejected(format!(
            "deadline {} is not after the {which} {}; give a later deadline",
            deadline.to_rfc3339(),
            earliest.to_rfc3339()
        )));
    }
    let via = req
        .via
        .as_deref()
        .map(crate::RelayId::parse)
        .transpose()
        .map_err(|e| Rejected(format!("--via: {e}")))?;
    Ok(ValidSubmission {
        serial,
        spec,
        instruction_time,
        execution_time,
        deadline,
        max_attempts: req.max_attempts,
        via,
    })
}

/// Values are named `section.name`; the section must be known, the name non-empty.
fn update_data(req: &SubmitJob) -> Result<JobSpec, Rejected> {
    if req.values.is_empty() {
        return Err(Rejected(
            "an update-data job needs at least one value: give --set SECTION.NAME=VALUE".into(),
        ));
    }
    if req.values.len() > MAX_VALUES {
        return Err(Rejected(format!(
            "{} values in one job; split it into jobs of at most {MAX_VALUES}",
            req.values.len()
        )));
    }
    let mut values = DeviceData::new();
    for (key, value) in &req.values {
        let (section, name) = key
            .split_once('.')
            .filter(|(_, n)| !n.is_empty())
            .ok_or_else(|| {
                Rejected(format!(
                    "value name {key:?} is not SECTION.NAME (e.g. adjustment.density)"
                ))
            })?;
        let section: Section = section
            .parse()
            .map_err(|e: crate::data::UnknownSection| Rejected(format!("value {key:?}: {e}")))?;
        values
            .entry(section)
            .or_default()
            .insert(name.to_owned(), value.clone());
    }
    let merge = match req.merge.as_deref() {
        None | Some("broker") => MergeAt::Broker,
        Some("device") => MergeAt::Device,
        Some(other) => {
            return Err(Rejected(format!(
                "merge {other:?} is not known: use broker or device"
            )));
        }
    };
    Ok(JobSpec::UpdateData { values, merge })
}

fn schedule(req: &SubmitJob) -> Result<Schedule, Rejected> {
    let mode = match req.mode.as_deref() {
        None => {
            if req.interval_secs.is_some() || !req.calendar.is_empty() {
                SessionMode::Periodic
            } else {
                SessionMode::Persistent
            }
        }
        Some(m) => m.parse().map_err(Rejected)?,
    };
    let schedule = Schedule {
        mode,
        interval_secs: req.interval_secs,
        calendar: req
            .calendar
            .iter()
            .map(|c| c.parse())
            .collect::<Result<_, _>>()
            .map_err(Rejected)?,
        moments: req
            .moments
            .iter()
            .map(|m| m.parse())
            .collect::<Result<_, _>>()
            .map_err(Rejected)?,
        conditions: req
            .conditions
            .iter()
            .map(|c| c.parse())
            .collect::<Result<_, _>>()
            .map_err(Rejected)?,
    };
    schedule.check().map_err(Rejected)?;
    Ok(schedule)
}

/// Section names, deduplicated in the order of Fig. 3; none means all of them.
fn sections(names: &[String]) -> Result<Vec<Section>, Rejected> {
    if names.is_empty() {
        return Ok(Section::ALL.to_vec());
    }
    let mut set = BTreeSet::new();
    for name in names {
        set.insert(
            name.parse::<Section>()
                .map_err(|e| Rejected(e.to_string()))?,
        );
    }
    Ok(set.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Value;
    use chrono::TimeZone;

    fn now() -> Timestamp {
        chrono::Utc.with_ymd_and_hms(2026, 11, 26, 9, 0, 0).unwrap()
    }

    fn ok() -> SubmitJob {
        SubmitJob {
            serial: "C1".into(),
            kind: "get-data".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_plain_get_data_reads_every_section_now() {
        let v = submission(&ok(), now()).unwrap();
        assert_eq!(v.serial.as_str(), "C1");
        assert_eq!(
            v.spec,
            SpecDraft::Ready(JobSpec::GetData {
                sections: Section::ALL.to_vec()
            })
        );
        assert_eq!(v.instruction_time, now());
        assert_eq!(v.deadline, None);
    }

    #[test]
    fn sections_are_parsed_and_deduplicated() {
        let req = SubmitJob {
            sections: vec!["jams".into(), "counters".into(), "jams".into()],
            ..ok()
        };
        let v = submission(&req, now()).unwrap();
        assert_eq!(
            v.spec,
            SpecDraft::Ready(JobSpec::GetData {
                sections: vec![Section::Counters, Section::Jams]
            })
        );
    }

    #[test]
    fn update_data_values_are_grouped_by_section() {
        let mut req = SubmitJob {
            kind: "update-data".into(),
            ..ok()
        };
        req.values
            .insert("adjustment.density".into(), Value::Int(5));
        req.values
            .insert("call-settings.every_counts".into(), Value::Int(1000));
        let v = submission(&req, now()).unwrap();
        let SpecDraft::Ready(JobSpec::UpdateData { values, merge }) = v.spec else {
            panic!("{:?}", v.spec)
        };
        assert_eq!(merge, MergeAt::Broker);
        assert_eq!(values[&Section::Adjustment]["density"], Value::Int(5));
        assert_eq!(
            values[&Section::CallSettings]["every_counts"],
            Value::Int(1000)
        );
        req.merge = Some("device".into());
        let v = submission(&req, now()).unwrap();
        assert!(matches!(
            v.spec,
            SpecDraft::Ready(JobSpec::UpdateData {
                merge: MergeAt::Device,
                ..
            })
        ));
    }

    #[test]
    fn firmware_and_schedule_submissions() {
        let req = SubmitJob {
            kind: "firmware".into(),
            artifact: Some("2.0.0".into()),
            execute_at: Some("2026-11-26T22:00:00Z".into()),
            max_attempts: Some(3),
            ..ok()
        };
        let v = submission(&req, now()).unwrap();
        assert_eq!(
            v.spec,
            SpecDraft::Firmware {
                artifact: "2.0.0".into()
            }
        );
        assert_eq!(v.max_attempts, Some(3));
        let req = SubmitJob {
            kind: "set-schedule".into(),
            interval_secs: Some(900),
            calendar: vec!["daily:22:00".into()],
            ..ok()
        };
        let v = submission(&req, now()).unwrap();
        let SpecDraft::Ready(JobSpec::SetSchedule { schedule }) = v.spec else {
            panic!()
        };
        assert_eq!(schedule.mode, crate::schedule::SessionMode::Periodic);
        assert_eq!(schedule.interval_secs, Some(900));
    }

    #[test]
    fn times_are_parsed_as_utc() {
        let req = SubmitJob {
            at: Some("2026-11-26T19:00:00+09:00".into()),
            deadline: Some("2026-11-27T00:00:00Z".into()),
            ..ok()
        };
        let v = submission(&req, now()).unwrap();
        assert_eq!(
            v.instruction_time,
            chrono::Utc
                .with_ymd_and_hms(2026, 11, 26, 10, 0, 0)
                .unwrap()
        );
        assert!(v.deadline.is_some());
    }

    fn with_value(kind: &str, key: &str) -> SubmitJob {
        let mut req = SubmitJob {
            kind: kind.into(),
            ..ok()
        };
        req.values.insert(key.into(), Value::Int(1));
        req
    }

    #[test]
    fn every_field_is_checked() {
        let cases: Vec<(SubmitJob, &str)> = vec![
            (
                SubmitJob {
                    serial: "".into(),
                    ..ok()
                },
                "serial is empty",
            ),
            (
                SubmitJob {
                    serial: "C/1".into(),
                    ..ok()
                },
                "contains '/'",
            ),
            (
                SubmitJob {
                    serial: "x".repeat(65),
                    ..ok()
                },
                "at most 64",
            ),
            (
                SubmitJob {
                    kind: "reboot".into(),
                    ..ok()
                },
                "job kind \"reboot\" is not known",
            ),
            (
                SubmitJob {
                    kind: "".into(),
                    ..ok()
                },
                "is not known",
            ),
            (
                SubmitJob {
                    sections: vec!["toner".into()],
                    ..ok()
                },
                "section \"toner\"",
            ),
            (
                SubmitJob {
                    at: Some("tomorrow".into()),
                    ..ok()
                },
                "at \"tomorrow\" is not an RFC 3339",
            ),
            (
                SubmitJob {
                    deadline: Some("x".into()),
                    ..ok()
                },
                "deadline \"x\"",
            ),
            (
                SubmitJob {
                    execute_at: Some("2026-11-27T00:00:00Z".into()),
                    ..ok()
                },
                "execute_at applies",
            ),
            (
                SubmitJob {
                    deadline: Some("2026-11-26T08:00:00Z".into()),
                    ..ok()
                },
                "is not after the instruction time",
            ),
            (
                SubmitJob {
                    at: Some("2026-11-26T12:00:00Z".into()),
                    deadline: Some("2026-11-26T11:00:00Z".into()),
                    ..ok()
                },
                "is not after the instruction time",
            ),
            (
                SubmitJob {
                    kind: "update-data".into(),
                    ..ok()
                },
                "needs at least one value",
            ),
            (with_value("update-data", "density"), "is not SECTION.NAME"),
            (
                with_value("update-data", "toner.level"),
                "section \"toner\"",
            ),
            (
                SubmitJob {
                    merge: Some("cloud".into()),
                    ..with_value("update-data", "adjustment.x")
                },
                "merge \"cloud\"",
            ),
            (
                SubmitJob {
                    kind: "firmware".into(),
                    ..ok()
                },
                "needs an artifact",
            ),
            (
                SubmitJob {
                    kind: "firmware".into(),
                    artifact: Some("1.0".into()),
                    at: Some("2026-11-26T12:00:00Z".into()),
                    execute_at: Some("2026-11-26T11:00:00Z".into()),
                    ..ok()
                },
                "is before the instruction time",
            ),
            (
                SubmitJob {
                    kind: "firmware".into(),
                    artifact: Some("1.0".into()),
                    execute_at: Some("2026-11-26T12:00:00Z".into()),
                    deadline: Some("2026-11-26T11:00:00Z".into()),
                    ..ok()
                },
                "is not after the execution time 2026-11-26T12:00:00+00:00",
            ),
            (
                SubmitJob {
                    max_attempts: Some(0),
                    ..ok()
                },
                "max_attempts 0",
            ),
            (
                SubmitJob {
                    kind: "set-schedule".into(),
                    mode: Some("periodic".into()),
                    ..ok()
                },
                "never connect",
            ),
            (
                SubmitJob {
                    kind: "set-schedule".into(),
                    interval_secs: Some(0),
                    ..ok()
                },
                "out of range",
            ),
            (
                SubmitJob {
                    kind: "set-schedule".into(),
                    calendar: vec!["yearly:1".into()],
                    ..ok()
                },
                "calendar time",
            ),
            (
                SubmitJob {
                    kind: "set-schedule".into(),
                    moments: vec!["reboot".into()],
                    ..ok()
                },
                "moment \"reboot\"",
            ),
        ];
        for (req, want) in cases {
            let err = submission(&req, now()).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{req:?}: {err:?} should contain {want:?}"
            );
        }
    }
}
