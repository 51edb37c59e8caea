//! Checks a host's submission before anything is stored (S103). The error text is the reason the
//! broker records for the rejected job (S104) and sends back to the host, so it names the field and
//! says what would be accepted.

use std::collections::BTreeSet;

use crate::Timestamp;
use crate::data::Section;
use crate::host::SubmitJob;
use crate::ids::Serial;
use crate::job::{JobSpec, KNOWN_KINDS};

/// A submission that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSubmission {
    pub serial: Serial,
    pub spec: JobSpec,
    pub instruction_time: Timestamp,
    pub execution_time: Option<Timestamp>,
    pub deadline: Option<Timestamp>,
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
            JobSpec::GetData {
                sections: sections(&req.sections)?,
            }
        }
        other => {
            return Err(Rejected(format!(
                "job kind {other:?} is not known: use one of {}",
                KNOWN_KINDS.join(", ")
            )));
        }
    };
    if let Some(deadline) = deadline
        && deadline <= instruction_time.max(now)
    {
        return Err(Rejected(format!(
            "deadline {} is not after the instruction time {}; give a later deadline",
            deadline.to_rfc3339(),
            instruction_time.max(now).to_rfc3339()
        )));
    }
    Ok(ValidSubmission {
        serial,
        spec,
        instruction_time,
        execution_time,
        deadline,
    })
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
            JobSpec::GetData {
                sections: Section::ALL.to_vec()
            }
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
            JobSpec::GetData {
                sections: vec![Section::Counters, Section::Jams]
            }
        );
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
