//! Every topic name chukei uses, built and parsed in one place. No other code formats a topic.
//!
//! ```text
//! dev/{serial}/jobs/{job}          broker → device   retained job order, emptied when the job ends
//! dev/{serial}/ack                 broker → device   end-to-end acks of what the device sent
//! dev/{serial}/up/{kind}           device → broker   job updates, device state, merge, fetch
//! dev/{serial}/merged/{job}        broker → device   retained merged data of an update-data job
//! dev/{serial}/blob/{artifact}     broker → device   firmware chunks the device asked for
//! host/{host}/req                  host → broker     submit, list, show
//! host/{host}/resp                 broker → host     replies, keyed by the request's msg id
//! fleet/{serial}/jobs/{job}        broker → hosts    retained job view (CBOR)
//! fleet/{serial}/state             broker → hosts    retained device state and presence (CBOR)
//! fleet/{serial}/alarm             broker → hosts    retained active alarms (CBOR); emptied when none
//! relay/{relay}/up/batch           child → parent    what the child's devices sent, many at once
//! relay/{relay}/up/presence        child → parent    which of its devices are online there
//! relay/{relay}/ack                parent → child    a batch is committed at the parent
//! relay/{relay}/down/dev/{serial}/…  parent → child  what the parent sends a device the child serves
//! json/fleet/{serial}/jobs/{job}   broker → hosts    the same views in JSON, for integrators
//! json/fleet/{serial}/state
//! json/fleet/{serial}/alarm
//! json/fleet/rollouts/{rollout}    broker → hosts    retained rollout view (JSON), as `rollouts show`
//! ```

use std::fmt;

use crate::artifact::ArtifactId;
use crate::ids::{HostId, IdError, JobId, RelayId, Serial};

/// What a device publishes under `dev/{serial}/up/{kind}`. Unknown kinds are refused by the ACL,
/// so a topic typo in an agent is a clear error rather than a message nobody reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpKind {
    /// A job's progress or result ([`crate::device::JobUpdate`]).
    Job,
    /// The device announces itself: site, model, firmware ([`crate::device::DeviceState`]).
    State,
    /// Update-data merged at the broker: the device's current values ([`crate::device::MergeRequest`]).
    Merge,
    /// Firmware download: chunks the device still needs ([`crate::artifact::FetchRequest`]).
    Fetch,
    /// A fatal fault raised, in progress or cleared ([`crate::alarm::AlarmReport`], Fig. 5).
    Alarm,
    /// A periodic meter read ([`crate::meter::CounterReport`]).
    Counters,
}

impl UpKind {
    pub const ALL: [UpKind; 6] = [
        UpKind::Job,
        UpKind::State,
        UpKind::Merge,
        UpKind::Fetch,
        UpKind::Alarm,
        UpKind::Counters,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpKind::Job => "job",
            UpKind::State => "state",
            UpKind::Merge => "merge",
            UpKind::Fetch => "fetch",
            UpKind::Alarm => "alarm",
            UpKind::Counters => "counters",
        }
    }

    pub fn parse(s: &str) -> Option<UpKind> {
        UpKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A concrete topic (no wildcards), parsed into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    DevJob {
        serial: Serial,
        job: JobId,
    },
    DevAck {
        serial: Serial,
    },
    DevUp {
        serial: Serial,
        kind: UpKind,
    },
    DevMerged {
        serial: Serial,
        job: JobId,
    },
    DevBlob {
        serial: Serial,
        artifact: ArtifactId,
    },
    HostReq {
        host: HostId,
    },
    HostResp {
        host: HostId,
    },
    FleetJob {
        serial: Serial,
        job: JobId,
    },
    FleetState {
        serial: Serial,
    },
    FleetAlarm {
        serial: Serial,
    },
    JsonFleetJob {
        serial: Serial,
        job: JobId,
    },
    JsonFleetState {
        serial: Serial,
    },
    JsonFleetAlarm {
        serial: Serial,
    },
    RelayUp {
        relay: RelayId,
    },
    RelayPresence {
        relay: RelayId,
    },
    RelayAck {
        relay: RelayId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {0:?} is not part of chukei's topic tree (see topics.md)")]
    Unknown(String),
    #[error("topic {topic:?}: {source}")]
    BadId { topic: String, source: IdError },
}

impl Topic {
    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        let levels: Vec<&str> = topic.split('/').collect();
        let bad = |source| TopicError::BadId {
            topic: topic.to_owned(),
            source,
        };
        let serial = |s: &str| Serial::parse(s).map_err(bad);
        let job = |s: &str| JobId::parse(s).map_err(bad);
        let host = |s: &str| HostId::parse(s).map_err(bad);
        let relay = |s: &str| RelayId::parse(s).map_err(bad);
        let parsed = match levels.as_slice() {
            ["dev", s, "jobs", j] => Topic::DevJob {
                serial: serial(s)?,
                job: job(j)?,
            },
            ["dev", s, "ack"] => Topic::DevAck { serial: serial(s)? },
            ["dev", s, "up", k] => match UpKind::parse(k) {
                Some(kind) => Topic::DevUp {
                    serial: serial(s)?,
                    kind,
                },
                None => return Err(TopicError::Unknown(topic.to_owned())),
            },
            ["dev", s, "merged", j] => Topic::DevMerged {
                serial: serial(s)?,
                job: job(j)?,
            },
            ["dev", s, "blob", a] => Topic::DevBlob {
                serial: serial(s)?,
                artifact: ArtifactId::parse(a).map_err(bad)?,
            },
            ["host", h, "req"] => Topic::HostReq { host: host(h)? },
            ["host", h, "resp"] => Topic::HostResp { host: host(h)? },
            ["fleet", s, "jobs", j] => Topic::FleetJob {
                serial: serial(s)?,
                job: job(j)?,
            },
            ["fleet", s, "state"] => Topic::FleetState { serial: serial(s)? },
            ["fleet", s, "alarm"] => Topic::FleetAlarm { serial: serial(s)? },
            ["json", "fleet", s, "jobs", j] => Topic::JsonFleetJob {
                serial: serial(s)?,
                job: job(j)?,
            },
            ["json", "fleet", s, "state"] => Topic::JsonFleetState { serial: serial(s)? },
            ["json", "fleet", s, "alarm"] => Topic::JsonFleetAlarm { serial: serial(s)? },
            ["relay", r, "up", "batch"] => Topic::RelayUp { relay: relay(r)? },
            ["relay", r, "up", "presence"] => Topic::RelayPresence { relay: relay(r)? },
            ["relay", r, "ack"] => Topic::RelayAck { relay: relay(r)? },
            _ => return Err(TopicError::Unknown(topic.to_owned())),
        };
        Ok(parsed)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::DevJob { serial, job } => write!(f, "dev/{serial}/jobs/{job}"),
            Topic::DevAck { serial } => write!(f, "dev/{serial}/ack"),
            Topic::DevUp { serial, kind } => write!(f, "dev/{serial}/up/{}", kind.as_str()),
            Topic::DevMerged { serial, job } => write!(f, "dev/{serial}/merged/{job}"),
            Topic::DevBlob { serial, artifact } => write!(f, "dev/{serial}/blob/{artifact}"),
            Topic::HostReq { host } => write!(f, "host/{host}/req"),
            Topic::HostResp { host } => write!(f, "host/{host}/resp"),
            Topic::FleetJob { serial, job } => write!(f, "fleet/{serial}/jobs/{job}"),
            Topic::FleetState { serial } => write!(f, "fleet/{serial}/state"),
            Topic::FleetAlarm { serial } => write!(f, "fleet/{serial}/alarm"),
            Topic::JsonFleetJob { serial, job } => write!(f, "json/fleet/{serial}/jobs/{job}"),
            Topic::JsonFleetState { serial } => write!(f, "json/fleet/{serial}/state"),
            Topic::JsonFleetAlarm { serial } => write!(f, "json/fleet/{serial}/alarm"),
            Topic::RelayUp { relay } => write!(f, "relay/{relay}/up/batch"),
            Topic::RelayPresence { relay } => write!(f, "relay/{relay}/up/presence"),
            Topic::RelayAck { relay } => write!(f, "relay/{relay}/ack"),
        }
    }
}

/// Builders for the topics and filters the agents and broker use, so call sites read as intent.
pub fn dev_job(serial: &Serial, job: &JobId) -> String {
    Topic::DevJob {
        serial: serial.clone(),
        job: job.clone(),
    }
    .to_string()
}
pub fn dev_ack(serial: &Serial) -> String {
    Topic::DevAck {
        serial: serial.clone(),
    }
    .to_string()
}
pub fn dev_up(serial: &Serial, kind: UpKind) -> String {
    Topic::DevUp {
        serial: serial.clone(),
        kind,
    }
    .to_string()
}
pub fn dev_merged(serial: &Serial, job: &JobId) -> String {
    Topic::DevMerged {
        serial: serial.clone(),
        job: job.clone(),
    }
    .to_string()
}
pub fn dev_blob(serial: &Serial, artifact: &ArtifactId) -> String {
    Topic::DevBlob {
        serial: serial.clone(),
        artifact: artifact.clone(),
    }
    .to_string()
}
pub fn host_req(host: &HostId) -> String {
    Topic::HostReq { host: host.clone() }.to_string()
}
pub fn host_resp(host: &HostId) -> String {
    Topic::HostResp { host: host.clone() }.to_string()
}
pub fn fleet_job(serial: &Serial, job: &JobId) -> String {
    Topic::FleetJob {
        serial: serial.clone(),
        job: job.clone(),
    }
    .to_string()
}
pub fn fleet_state(serial: &Serial) -> String {
    Topic::FleetState {
        serial: serial.clone(),
    }
    .to_string()
}
pub fn json_fleet_job(serial: &Serial, job: &JobId) -> String {
    Topic::JsonFleetJob {
        serial: serial.clone(),
        job: job.clone(),
    }
    .to_string()
}
pub fn json_fleet_state(serial: &Serial) -> String {
    Topic::JsonFleetState {
        serial: serial.clone(),
    }
    .to_string()
}
/// The retained JSON view of a rollout (`R-000001`).
pub fn json_fleet_rollout(rollout: &str) -> String {
    format!("json/fleet/rollouts/{rollout}")
}

pub fn fleet_alarm(serial: &Serial) -> String {
    Topic::FleetAlarm {
        serial: serial.clone(),
    }
    .to_string()
}
pub fn json_fleet_alarm(serial: &Serial) -> String {
    Topic::JsonFleetAlarm {
        serial: serial.clone(),
    }
    .to_string()
}

pub fn relay_up(relay: &RelayId) -> String {
    Topic::RelayUp {
        relay: relay.clone(),
    }
    .to_string()
}
pub fn relay_ack(relay: &RelayId) -> String {
    Topic::RelayAck {
        relay: relay.clone(),
    }
    .to_string()
}
pub fn relay_presence(relay: &RelayId) -> String {
    Topic::RelayPresence {
        relay: relay.clone(),
    }
    .to_string()
}
/// What the parent sends device topic `dev_topic` (`dev/{serial}/…`) through child `relay`.
pub fn relay_down(relay: &RelayId, dev_topic: &str) -> String {
    format!("relay/{relay}/down/{dev_topic}")
}
/// The filter a child subscribes to at its parent for its devices' messages.
pub fn relay_down_filter(relay: &RelayId) -> String {
    format!("relay/{relay}/down/dev/#")
}
/// The device topic a `relay/{relay}/down/…` message carries, if it carries one.
pub fn strip_relay_down<'a>(relay: &RelayId, topic: &'a str) -> Option<&'a str> {
    topic
        .strip_prefix("relay/")?
        .strip_prefix(relay.as_str())?
        .strip_prefix("/down/")
        .filter(|rest| rest.starts_with("dev/") && is_valid_topic_name(rest))
}
/// The parent's filter for everything child relays send (batches, presence).
pub const ALL_RELAY_UP: &str = "relay/+/up/+";

/// The filter a device subscribes to for its own jobs.
pub fn dev_jobs_filter(serial: &Serial) -> String {
    format!("dev/{serial}/jobs/+")
}
/// The filter a device subscribes to for the merged data of its update-data jobs.
pub fn dev_merged_filter(serial: &Serial) -> String {
    format!("dev/{serial}/merged/+")
}
/// The filter a device subscribes to for the firmware chunks it asked for.
pub fn dev_blob_filter(serial: &Serial) -> String {
    format!("dev/{serial}/blob/+")
}
/// The broker core's filter for everything devices send.
/// Whether `topic` is one of the topics only a device's own session reads (`dev/…`): its jobs,
/// acks, merged data and firmware chunks.
pub fn is_device_topic(topic: &str) -> bool {
    topic.starts_with("dev/")
}

pub const ALL_DEVICE_UP: &str = "dev/+/up/+";
/// The broker core's filter for every host's requests.
pub const ALL_HOST_REQ: &str = "host/+/req";
/// Every job view, for `host-agent watch` and dashboards.
pub const ALL_FLEET_JOBS: &str = "fleet/+/jobs/+";
/// Everything in the JSON mirror, for integrators.
pub const ALL_JSON: &str = "json/fleet/#";
/// Every device's active alarms, for `host-agent watch --alarms` and dashboards.
pub const ALL_FLEET_ALARMS: &str = "fleet/+/alarm";
/// The same in JSON: what an integrator's `mosquitto_sub` watches for emergencies.
pub const ALL_JSON_ALARMS: &str = "json/fleet/+/alarm";
/// Every rollout's JSON view.
pub const ALL_JSON_ROLLOUTS: &str = "json/fleet/rollouts/+";

/// Checks the MQTT rules for a topic filter: `+` and `#` fill a whole level, `#` only last.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains('+') && !l.contains('#'),
    })
}

/// Checks the MQTT rules for a topic name in a PUBLISH: no wildcards, not empty.
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Serial {
        Serial::parse(v).unwrap()
    }
    fn j(v: &str) -> JobId {
        JobId::parse(v).unwrap()
    }

    #[test]
    fn topics_round_trip() {
        let cases = [
            Topic::DevJob {
                serial: s("C1"),
                job: j("J-1"),
            },
            Topic::DevAck { serial: s("C1") },
            Topic::DevUp {
                serial: s("C1"),
                kind: UpKind::Job,
            },
            Topic::DevUp {
                serial: s("C1"),
                kind: UpKind::State,
            },
            Topic::HostReq {
                host: HostId::parse("svc").unwrap(),
            },
            Topic::HostResp {
                host: HostId::parse("svc").unwrap(),
            },
            Topic::FleetJob {
                serial: s("C1"),
                job: j("J-1"),
            },
            Topic::FleetState { serial: s("C1") },
            Topic::JsonFleetJob {
                serial: s("C1"),
                job: j("J-1"),
            },
            Topic::JsonFleetState { serial: s("C1") },
            Topic::DevUp {
                serial: s("C1"),
                kind: UpKind::Alarm,
            },
            Topic::DevUp {
                serial: s("C1"),
                kind: UpKind::Counters,
            },
            Topic::FleetAlarm { serial: s("C1") },
            Topic::JsonFleetAlarm { serial: s("C1") },
        ];
        for t in cases {
            let text = t.to_string();
            assert_eq!(Topic::parse(&text).unwrap(), t, "{text}");
        }
    }

    #[test]
    fn builders_match_the_tree() {
        assert_eq!(dev_job(&s("C1"), &j("J1")), "dev/C1/jobs/J1");
        assert_eq!(dev_ack(&s("C1")), "dev/C1/ack");
        assert_eq!(dev_up(&s("C1"), UpKind::Job), "dev/C1/up/job");
        assert_eq!(json_fleet_job(&s("C1"), &j("J1")), "json/fleet/C1/jobs/J1");
        assert_eq!(dev_jobs_filter(&s("C1")), "dev/C1/jobs/+");
        assert_eq!(dev_merged_filter(&s("C1")), "dev/C1/merged/+");
        assert_eq!(dev_blob_filter(&s("C1")), "dev/C1/blob/+");
        assert_eq!(dev_up(&s("C1"), UpKind::Alarm), "dev/C1/up/alarm");
        assert_eq!(dev_up(&s("C1"), UpKind::Counters), "dev/C1/up/counters");
        assert_eq!(fleet_alarm(&s("C1")), "fleet/C1/alarm");
        assert_eq!(json_fleet_alarm(&s("C1")), "json/fleet/C1/alarm");
    }

    #[test]
    fn unknown_and_bad_topics_are_refused() {
        for bad in [
            "dev/C1/up/bogus",
            "dev/C1",
            "dev//ack",
            "dev/C+1/ack",
            "x/y",
            "",
            "dev/C1/ack/x",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn filter_rules() {
        let cases = [
            ("a/+/c", true),
            ("#", true),
            ("a/#", true),
            ("a/#/c", false),
            ("a/b+", false),
            ("a/#b", false),
            ("", false),
        ];
        for (f, ok) in cases {
            assert_eq!(is_valid_filter(f), ok, "{f:?}");
        }
        assert!(is_valid_topic_name("a/b"));
        assert!(!is_valid_topic_name("a/+"));
    }
}
