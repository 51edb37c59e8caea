//! Jobs: what the broker tells a device to do (the seed's "first transmission info"), their
//! states, and the Fig. 9 view hosts and integrators read.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::artifact::ArtifactRef;
use crate::data::{DeviceData, Section};
use crate::ids::{JobId, Serial};
use crate::schedule::Schedule;

/// What a job asks the device to do. Tagged by `kind` on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JobSpec {
    /// Fig. 2: send the listed sections of the device's data.
    GetData { sections: Vec<Section> },
    /// Fig. 4: set named values. With `merge: broker` the device sends its current data of these
    /// sections (S212), the broker merges the new values into it (S213) and returns the merged set
    /// (S215); with `merge: device` the device merges itself (【0083】).
    UpdateData { values: DeviceData, merge: MergeAt },
    /// Fig. 6 (ISW): download the artifact at the instruction time, write it at the execution
    /// time with the relay session suspended, verify, switch A/B slots, health-check.
    Firmware { artifact: ArtifactRef },
    /// Claims 15, 38: change when the device reaches the relay.
    SetSchedule { schedule: Schedule },
}

/// Where an update-data job's values are merged into the device's current data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MergeAt {
    #[default]
    Broker,
    Device,
}

impl JobSpec {
    /// The kind's name on the command line and the wire.
    pub fn kind_name(&self) -> &'static str {
        match self {
            JobSpec::GetData { .. } => "get-data",
            JobSpec::UpdateData { .. } => "update-data",
            JobSpec::Firmware { .. } => "firmware",
            JobSpec::SetSchedule { .. } => "set-schedule",
        }
    }

    /// The "instruction" column of Fig. 9.
    pub fn instruction(&self) -> &'static str {
        match self {
            JobSpec::GetData { .. } => "GET DATA",
            JobSpec::UpdateData { .. } => "UPDATE DATA",
            JobSpec::Firmware { .. } => "UPDATE ISW",
            JobSpec::SetSchedule { .. } => "SET SCHEDULE",
        }
    }

    /// The "data type" column of Fig. 9.
    pub fn data_type(&self) -> String {
        match self {
            JobSpec::GetData { sections } => sections
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(","),
            JobSpec::UpdateData { values, .. } => values
                .keys()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(","),
            JobSpec::Firmware { artifact } => format!("ISW {}", artifact.version),
            JobSpec::SetSchedule { schedule } => format!("schedule ({})", schedule.mode),
        }
    }
}

/// The job kinds this build knows, for error messages and `--help`.
pub const KNOWN_KINDS: &[&str] = &["get-data", "update-data", "firmware", "set-schedule"];

/// The retained message on `dev/{serial}/jobs/{job}`: everything the device needs to run the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOrder {
    pub job: JobId,
    pub serial: Serial,
    pub spec: JobSpec,
    /// Not before this time (S108–S109).
    pub instruction_time: Timestamp,
    /// For updates: when to apply. Unused by get-data.
    pub execution_time: Option<Timestamp>,
    /// After this the broker marks the job timed out if it has not ended.
    pub deadline: Option<Timestamp>,
    /// How many times the device may try the job's risky step (a firmware write) before it fails.
    #[serde(default = "one")]
    pub max_attempts: u32,
}

fn one() -> u32 {
    1
}

/// A job's state. Moves only forward (see [`JobStatus::can_move_to`]); a repeated event is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    /// Waiting: the device has not taken it yet, or its instruction time has not come.
    Queued,
    /// On the disk of the child relay that serves the device (Fig. 8, S508), not yet taken by
    /// the device.
    Forwarded,
    /// The device has the job.
    Delivered,
    /// Data acquired: an update's payload is on the device, waiting for the execution time.
    Staged,
    /// The device is running it.
    InProgress,
    /// Normal end.
    Succeeded,
    /// Abnormal end: kept in the list.
    Failed,
    /// The broker refused the submission (S104).
    Rejected,
    Canceled,
    TimedOut,
}

impl JobStatus {
    pub const ALL: [JobStatus; 10] = [
        JobStatus::Queued,
        JobStatus::Forwarded,
        JobStatus::Delivered,
        JobStatus::Staged,
        JobStatus::InProgress,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Rejected,
        JobStatus::Canceled,
        JobStatus::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Forwarded => "forwarded",
            JobStatus::Delivered => "delivered",
            JobStatus::Staged => "staged",
            JobStatus::InProgress => "in-progress",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Rejected => "rejected",
            JobStatus::Canceled => "canceled",
            JobStatus::TimedOut => "timed-out",
        }
    }

    /// Ended jobs no longer hold a retained order on the device's topic.
    pub fn is_terminal(self) -> bool {
        self.rank() == 5
    }

    fn rank(self) -> u8 {
        match self {
            JobStatus::Queued => 0,
            JobStatus::Forwarded => 1,
            JobStatus::Delivered => 2,
            JobStatus::Staged => 3,
            JobStatus::InProgress => 4,
            _ => 5,
        }
    }

    /// Transitions only move forward, and nothing leaves an end state.
    pub fn can_move_to(self, next: JobStatus) -> bool {
        !self.is_terminal() && next.rank() > self.rank()
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("status {s:?} is not known"))
    }
}

/// One row of the job list (Fig. 9). Strings rather than newtypes because a rejected submission is
/// shown as it was sent, bad serial included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub serial: String,
    /// Installation site, as the device last reported it; empty if it has not yet.
    pub site: String,
    /// GET DATA, UPDATE…
    pub instruction: String,
    pub data_type: String,
    /// The managing server (the relay's name).
    pub server: String,
    /// The instructing host.
    pub host: String,
    pub instruction_time: Option<Timestamp>,
    pub execution_time: Option<Timestamp>,
    pub status: JobStatus,
    pub submitted_at: Timestamp,
    pub updated_at: Timestamp,
    /// Why it was rejected or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One step of a job's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub at: Timestamp,
    pub status: JobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A job with its history and what it collected: `jobs show` and the JSON mirror.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub view: JobView,
    pub timeline: Vec<JobEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DeviceData>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobStatus::*;

    #[test]
    fn transitions_only_move_forward() {
        let cases = [
            (Queued, Delivered, true),
            (Queued, InProgress, true),
            (Queued, Succeeded, true),
            (Delivered, InProgress, true),
            (InProgress, Succeeded, true),
            (InProgress, Failed, true),
            (Queued, Rejected, true),
            (InProgress, Delivered, false),
            (Delivered, Delivered, false),
            (Succeeded, Failed, false),
            (Failed, Succeeded, false),
            (TimedOut, Succeeded, false),
            (Canceled, InProgress, false),
        ];
        for (from, to, ok) in cases {
            assert_eq!(from.can_move_to(to), ok, "{from} -> {to}");
        }
    }

    #[test]
    fn status_names_are_the_documented_ones() {
        let names: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "queued",
                "forwarded",
                "delivered",
                "staged",
                "in-progress",
                "succeeded",
                "failed",
                "rejected",
                "canceled",
                "timed-out"
            ]
        );
        for s in JobStatus::ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
        }
    }

    #[test]
    fn job_spec_is_tagged_by_kind() {
        let spec = JobSpec::GetData {
            sections: vec![Section::Counters, Section::Jams],
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"get-data","sections":["counters","jams"]}"#
        );
        assert_eq!(spec.data_type(), "counters,jams");
        assert_eq!(spec.instruction(), "GET DATA");
    }

    #[test]
    fn detail_flattens_the_view_in_json_and_cbor() {
        let now = chrono::Utc::now();
        let detail = JobDetail {
            view: JobView {
                id: "J1".into(),
                serial: "C1".into(),
                site: "Osaka".into(),
                instruction: "GET DATA".into(),
                data_type: "counters".into(),
                server: "relay-1".into(),
                host: "svc".into(),
                instruction_time: Some(now),
                execution_time: None,
                status: Succeeded,
                submitted_at: now,
                updated_at: now,
                reason: None,
            },
            timeline: vec![JobEvent {
                at: now,
                status: Queued,
                note: None,
            }],
            data: None,
        };
        let json: serde_json::Value = serde_json::to_value(&detail).unwrap();
        for key in [
            "id",
            "serial",
            "site",
            "instruction",
            "data_type",
            "server",
            "host",
            "status",
        ] {
            assert!(json.get(key).is_some(), "missing {key}: {json}");
        }
        let mut cbor = Vec::new();
        ciborium::into_writer(&detail, &mut cbor).unwrap();
        let back: JobDetail = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(back, detail);
    }
}
