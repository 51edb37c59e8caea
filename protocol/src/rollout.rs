//! Rollouts: one job template sent to every device a target selects, in waves, at a rate, inside
//! a maintenance window, stopped by itself when too many fail. Each device still gets an ordinary
//! job (its own id, status, timeline and retries); a rollout only decides when each is filed.
//!
//! What a host sends ([`RolloutSpec`]) is loose text, as a job submission is: the relay checks
//! every field and refuses a bad one with the reason. What everyone reads ([`RolloutView`]) is the
//! reply to `rollouts show` and the retained JSON view on `json/fleet/rollouts/{id}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::host::SubmitJob;
use crate::job::JobStatus;

/// A rollout as the host typed it (`host-agent rollouts create`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// A name people recognise it by (`c300-fw2`); ids are the relay's (`R-000001`).
    pub name: String,
    /// The job each device gets: a submission without a serial (the rollout fills it in).
    pub job: SubmitJob,
    /// Filters a device must all pass: `model=C300`, `firmware<2.0.0`, `site=Osaka*`,
    /// `serial=C3-*`, `tag=night-shift` (see [`Target`]).
    #[serde(default)]
    pub targets: Vec<String>,
    /// Serials named one by one (a serials file); with `targets` too, a device must be in both.
    #[serde(default)]
    pub serials: Vec<String>,
    /// Cumulative shares of the selected devices, each wave's end: `1%`, `10%`, `100%`. The last
    /// must be `100%`. Empty: one wave of everything.
    #[serde(default)]
    pub waves: Vec<String>,
    /// A wave's share of succeeded jobs that starts the next wave (`95%`); default 100%.
    #[serde(default)]
    pub success_threshold: Option<String>,
    /// The share of failed jobs among the finished ones that aborts the rollout (`5%`); unset:
    /// never aborts by itself.
    #[serde(default)]
    pub abort_failure_rate: Option<String>,
    /// Finished jobs needed before the failure rate is judged; default 1.
    #[serde(default)]
    pub abort_min_finished: Option<u32>,
    /// Jobs filed per minute at most; unset: as fast as the waves allow.
    #[serde(default)]
    pub rate_per_min: Option<u32>,
    /// When jobs may be filed: `daily 01:00-05:00 Asia/Tokyo`, `mon-fri 22:00-06:00 UTC`; unset:
    /// any time.
    #[serde(default)]
    pub window: Option<String>,
    /// Not before this time (RFC 3339); until then the rollout is `scheduled`.
    #[serde(default)]
    pub start_at: Option<String>,
    /// Each wave after the first waits in `waiting-approval` for `rollouts approve`.
    #[serde(default)]
    pub approve_each_wave: bool,
    /// Keep the rollout open: a device that appears later and matches the targets gets the job in
    /// the last wave.
    #[serde(default)]
    pub dynamic: bool,
}

/// One filter of a target, parsed: `FIELD=GLOB` or, for firmware, a version comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `model=`, `site=`, `serial=`, `firmware=`, `tag=` with a glob (`*`, `?`).
    Matches { field: Field, pattern: String },
    /// `firmware<2.0.0`, `firmware<=`, `firmware>`, `firmware>=`: compared as dotted numbers.
    Firmware { op: Compare, version: String },
}

/// What a target filter looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Model,
    Site,
    Serial,
    Firmware,
    Tag,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
}

/// What a target is matched against: one device as it last reported itself, and its tags.
#[derive(Debug, Clone, Copy)]
pub struct DeviceFacts<'a> {
    pub serial: &'a str,
    pub model: &'a str,
    pub site: &'a str,
    pub firmware: &'a str,
    pub tags: &'a [String],
}

impl Target {
    /// Parses one `--target`. The error says what forms there are.
    pub fn parse(text: &str) -> Result<Target, String> {
        let text = text.trim();
        // What comes first decides the form: `site=Osaka <3F>` is a pattern with a `<` in it,
        // `firmware<=2.0` a comparison.
        let first = text.find(['=', '<', '>']);
        let compares = first.is_some_and(|i| text[i..].starts_with(['<', '>']));
        for (op_text, op) in [
            ("<=", Compare::LessOrEqual),
            (">=", Compare::GreaterOrEqual),
            ("<", Compare::Less),
            (">", Compare::Greater),
        ] {
            if !compares {
                break;
            }
            if let Some((field, version)) = text.split_once(op_text) {
                if field.trim() != "firmware" {
                    return Err(format!(
                        "target {text:?}: only firmware compares with {op_text} (e.g. firmware<2.0.0)"
                    ));
                }
                let version = version.trim();
                if version.is_empty() || version_parts(version).is_none() {
                    return Err(format!(
                        "target {text:?}: compare firmware with a dotted version such as 2.0.0"
                    ));
                }
                return Ok(Target::Firmware {
                    op,
                    version: version.to_owned(),
                });
            }
        }
        let Some((field, pattern)) = text.split_once('=') else {
            return Err(format!(
                "target {text:?}: use FIELD=PATTERN (model, site, serial, firmware, tag) or firmware<VERSION"
            ));
        };
        let field = match field.trim() {
            "model" => Field::Model,
            "site" => Field::Site,
            "serial" => Field::Serial,
            "firmware" => Field::Firmware,
            "tag" => Field::Tag,
            other => {
                return Err(format!(
                    "target {text:?}: unknown field {other:?}; use model, site, serial, firmware or tag"
                ));
            }
        };
        let pattern = pattern.trim();
        if pattern.is_empty() {
            return Err(format!(
                "target {text:?}: the pattern is empty (use * for any value)"
            ));
        }
        Ok(Target::Matches {
            field,
            pattern: pattern.to_owned(),
        })
    }

    pub fn matches(&self, d: &DeviceFacts<'_>) -> bool {
        match self {
            Target::Matches { field, pattern } => match field {
                Field::Model => glob(pattern, d.model),
                Field::Site => glob(pattern, d.site),
                Field::Serial => glob(pattern, d.serial),
                Field::Firmware => glob(pattern, d.firmware),
                Field::Tag => d.tags.iter().any(|t| glob(pattern, t)),
            },
            Target::Firmware { op, version } => {
                let (Some(have), Some(want)) = (version_parts(d.firmware), version_parts(version))
                else {
                    // A device whose firmware is not a dotted version cannot be compared: it is
                    // left out rather than guessed at.
                    return false;
                };
                let order = have.cmp(&want);
                match op {
                    Compare::Less => order.is_lt(),
                    Compare::LessOrEqual => order.is_le(),
                    Compare::Greater => order.is_gt(),
                    Compare::GreaterOrEqual => order.is_ge(),
                }
            }
        }
    }
}

/// `2.0.10` → [2, 0, 10] (so 2.0.10 > 2.0.9); a trailing `-rc1` or `+build` is ignored. Shorter
/// versions are padded with zeros (2 = 2.0.0).
pub fn version_parts(version: &str) -> Option<Vec<u64>> {
    let core = version
        .trim()
        .trim_start_matches(['v', 'V'])
        .split(['-', '+'])
        .next()?;
    let mut parts: Vec<u64> = core
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    while parts.len() > 1 && parts.last() == Some(&0) {
        parts.pop();
    }
    Some(parts)
}

/// Shell-style glob (`*`, `?`, `[..]`), as `[[relays]]` serials are matched; a pattern that is
/// not a valid glob matches only itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    match glob::Pattern::new(pattern) {
        Ok(p) => p.matches(text),
        Err(_) => pattern == text,
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutStatus {
    /// Waiting for its start time.
    Scheduled,
    Running,
    /// A wave reached its threshold; the next waits for `rollouts approve`.
    WaitingApproval,
    /// Stopped by `rollouts pause`: nothing more is filed until `rollouts resume`.
    Paused,
    Succeeded,
    /// Every job ended, and a wave's succeeded share stayed below the threshold.
    Failed,
    /// Stopped for good, by `rollouts abort` or by the failure rate; jobs not yet delivered were
    /// canceled.
    Aborted,
}

impl RolloutStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Scheduled => "scheduled",
            RolloutStatus::Running => "running",
            RolloutStatus::WaitingApproval => "waiting-approval",
            RolloutStatus::Paused => "paused",
            RolloutStatus::Succeeded => "succeeded",
            RolloutStatus::Failed => "failed",
            RolloutStatus::Aborted => "aborted",
        }
    }

    /// Whether the rollout has ended (nothing will change any more but its jobs' own statuses).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutStatus::Succeeded | RolloutStatus::Failed | RolloutStatus::Aborted
        )
    }
}

impl std::fmt::Display for RolloutStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a person does to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutAction {
    Pause,
    Resume,
    Abort,
    Approve,
}

impl RolloutAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Abort => "abort",
            RolloutAction::Approve => "approve",
        }
    }
}

/// A rollout as everyone reads it: `rollouts show --json` and `json/fleet/rollouts/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub id: String,
    pub name: String,
    /// The kind of job it files (firmware, update-data, set-schedule, get-data).
    pub kind: String,
    pub status: RolloutStatus,
    /// Why it ended as it did (aborted, failed), or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The host that created it.
    pub host: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub targets: Vec<String>,
    /// The wave now being filed or awaited (0-based).
    pub wave: usize,
    pub waves: Vec<WaveView>,
    /// Every job the rollout filed, in the order filed.
    pub jobs: Vec<String>,
    /// Jobs per status over all waves; devices not yet given a job are counted as `pending`.
    pub counts: BTreeMap<String, u64>,
    pub devices: u64,
    pub success_threshold_pct: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_failure_rate_pct: Option<f64>,
    pub abort_min_finished: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<Timestamp>,
    pub approve_each_wave: bool,
    pub dynamic: bool,
}

/// One wave of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveView {
    /// The cumulative share of the devices this wave reaches (its end), e.g. 10.
    pub percent: f64,
    /// Its devices' serials.
    pub devices: Vec<String>,
    /// Its jobs per status; `pending` for devices not yet given one.
    pub counts: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
}

impl RolloutView {
    /// Jobs that ended, of all waves.
    pub fn finished(&self) -> u64 {
        finished_in(&self.counts)
    }
}

/// How many of `counts` are jobs that ended (succeeded, failed, timed-out, canceled, rejected).
pub fn finished_in(counts: &BTreeMap<String, u64>) -> u64 {
    JobStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| counts.get(s.as_str()).copied().unwrap_or(0))
        .sum()
}

/// `succeeded 3 · queued 2 · pending 5`: the non-zero counts, the largest first, joined by `sep`.
pub fn counts_summary(counts: &BTreeMap<String, u64>, sep: &str) -> String {
    let mut parts: Vec<(&String, &u64)> = counts.iter().filter(|(_, n)| **n > 0).collect();
    parts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    parts
        .into_iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(sep)
}

/// A device a target selects: `devices list --target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceListing {
    pub serial: String,
    pub model: String,
    pub site: String,
    pub firmware: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub last_seen: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device<'a>(firmware: &'a str, tags: &'a [String]) -> DeviceFacts<'a> {
        DeviceFacts {
            serial: "C3-0001",
            model: "bizhub C300",
            site: "Osaka North",
            firmware,
            tags,
        }
    }

    #[test]
    fn targets_parse_and_match_by_field_glob_and_version() {
        let tags = vec!["night-shift".to_string()];
        let d = device("1.9.10", &tags);
        for (text, want) in [
            ("model=bizhub C300", true),
            ("model=*C300", true),
            ("model=C300", false),
            ("site=Osaka*", true),
            ("site=Tokyo*", false),
            ("serial=C3-00??", true),
            ("firmware<2.0.0", true),
            ("firmware<1.9.9", false),
            ("firmware>=1.9.10", true),
            ("firmware<=1.9", false),
            ("firmware>1.9", true),
            ("firmware=1.9.*", true),
            ("tag=night-*", true),
            ("tag=vip", false),
            ("site=Osaka <3F>", false),
        ] {
            let t = Target::parse(text).unwrap();
            assert_eq!(t.matches(&d), want, "{text}");
        }
    }

    #[test]
    fn a_pattern_may_hold_comparison_characters() {
        let tags = Vec::new();
        let d = DeviceFacts {
            site: "Osaka <3F>",
            ..device("1.0", &tags)
        };
        assert!(Target::parse("site=Osaka <3F>").unwrap().matches(&d));
        assert!(Target::parse("site=*<3F>").unwrap().matches(&d));
        assert_eq!(
            Target::parse("firmware>=1.0").unwrap(),
            Target::Firmware {
                op: Compare::GreaterOrEqual,
                version: "1.0".into()
            }
        );
    }

    #[test]
    fn bad_targets_say_what_to_write() {
        for (text, want) in [
            ("model", "FIELD=PATTERN"),
            ("colour=red", "unknown field"),
            ("model<3", "only firmware compares"),
            ("firmware<two", "dotted version"),
            ("site=", "pattern is empty"),
        ] {
            let e = Target::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_device_without_a_dotted_firmware_is_not_compared() {
        let d = device("unknown", &[]);
        assert!(!Target::parse("firmware<2").unwrap().matches(&d));
        assert!(!Target::parse("firmware>=0").unwrap().matches(&d));
    }

    #[test]
    fn versions_compare_numerically_with_padding() {
        assert!(version_parts("2.0.10") > version_parts("2.0.9"));
        assert_eq!(version_parts("2"), version_parts("2.0.0"));
        assert_eq!(version_parts("v1.2.3-rc1"), version_parts("1.2.3"));
        assert_eq!(version_parts("1.x"), None);
    }

    #[test]
    fn glob_handles_stars_and_question_marks() {
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbbc"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("??", "ab"));
        assert!(!glob("??", "abc"));
    }
}
