//! Host ↔ broker requests on `host/{host}/req` and replies on `host/{host}/resp`.
//!
//! A host resends a request until a reply with its msg id arrives (S222). Submissions are
//! deduplicated by (host, msg id): a resent submission gets the same job back, never a second job.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::MsgId;
use crate::alarm::AlarmView;
use crate::artifact::{ArtifactInfo, Chunk};
use crate::data::Value;
use crate::job::{JobDetail, JobView};
use crate::meter::CounterReading;
use crate::rollout::{DeviceListing, RolloutAction, RolloutSpec, RolloutView};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
// A request is decoded once and handled at once; boxing the submission would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum HostRequest {
    Submit(SubmitJob),
    List {
        /// Include ended jobs.
        #[serde(default)]
        all: bool,
    },
    Show {
        job: String,
    },
    /// Withdraw a job: a queued one always; a started one only where the device can still stop
    /// safely (a firmware job that is downloaded but not yet being written); else refused.
    Cancel {
        job: String,
    },
    /// Start (or resume) an artifact upload. The reply says which chunks the relay already holds.
    UploadBegin {
        /// SHA-256 of the whole artifact, 64 lowercase hex digits.
        artifact: String,
        version: String,
        size: u64,
        chunk_size: u32,
        /// The publisher's ed25519 signature over `artifact::signed_message`, hex.
        signature: String,
    },
    /// One chunk of an upload; the last one completes it once the digest checks out.
    UploadChunk {
        chunk: Chunk,
    },
    /// The artifacts the relay holds.
    Artifacts,
    /// The alarms (Fig. 5): the active ones, or all of them with `all`; of one device with `serial`.
    Alarms {
        #[serde(default)]
        all: bool,
        #[serde(default)]
        serial: Option<String>,
    },
    /// Acknowledge an alarm (the service desk has seen it); it stays active until it clears.
    AckAlarm {
        id: String,
    },
    /// The child relays: configured ones and any that connected, with their presence.
    Relays,
    /// Meter readings (Fig. 3 counters) read between `from` and `to` (RFC 3339, `to` excluded),
    /// oldest first, a page at a time: pass the previous reply's `next` as `after`.
    ExportCounters {
        from: String,
        to: String,
        #[serde(default)]
        after: Option<String>,
        #[serde(default)]
        serial: Option<String>,
    },
    /// Create a rollout: checked whole, then filed; the reply is its view. Deduplicated by msg
    /// id like a submission (a resend gets the same rollout).
    CreateRollout {
        rollout: RolloutSpec,
    },
    /// Every rollout, newest first (views without their device and job lists).
    Rollouts,
    /// One rollout with its waves' devices and its jobs.
    ShowRollout {
        rollout: String,
    },
    /// Pause, resume, abort or approve a rollout.
    ActOnRollout {
        rollout: String,
        action: RolloutAction,
    },
    /// The devices the relay knows, narrowed by targets (all must match), as a rollout would
    /// select them.
    Devices {
        #[serde(default)]
        targets: Vec<String>,
    },
    /// Add and remove tags on devices (targets select by `tag=`).
    TagDevices {
        serials: Vec<String>,
        #[serde(default)]
        add: Vec<String>,
        #[serde(default)]
        remove: Vec<String>,
    },
}

/// A job as the host typed it. Deliberately loose (strings): the broker validates every field
/// (S103) and records a bad submission as rejected with the reason (S104).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SubmitJob {
    pub serial: String,
    pub kind: String,
    /// For get-data: section names; empty means all of them.
    #[serde(default)]
    pub sections: Vec<String>,
    /// Instruction time (RFC 3339); absent means now.
    #[serde(default)]
    pub at: Option<String>,
    /// Execution time (RFC 3339), for updates.
    #[serde(default)]
    pub execute_at: Option<String>,
    /// Deadline (RFC 3339); absent means the broker's default.
    #[serde(default)]
    pub deadline: Option<String>,
    /// Attempts at the risky step (firmware write); absent means the broker's default.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// update-data: "section.name" → new value, e.g. "adjustment.density" → 5.
    #[serde(default)]
    pub values: BTreeMap<String, Value>,
    /// update-data: "broker" (default) or "device": where the values are merged.
    #[serde(default)]
    pub merge: Option<String>,
    /// firmware: the artifact's id (SHA-256 hex) or its version.
    #[serde(default)]
    pub artifact: Option<String>,
    /// set-schedule: "persistent" or "periodic".
    #[serde(default)]
    pub mode: Option<String>,
    /// set-schedule: periodic check-in interval.
    #[serde(default)]
    pub interval_secs: Option<u64>,
    /// set-schedule: calendar times, e.g. "daily:22:00" (see `schedule::Calendar`).
    #[serde(default)]
    pub calendar: Vec<String>,
    /// set-schedule: "power-on", "operator-action".
    #[serde(default)]
    pub moments: Vec<String>,
    /// set-schedule: "count:total/1000", "fault:SC-541".
    #[serde(default)]
    pub conditions: Vec<String>,
    /// At a parent relay: send the job through this child relay (claim 20), whichever child the
    /// device was last seen on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostResponse {
    /// The msg id of the request this answers.
    pub reply_to: MsgId,
    pub reply: HostReply,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum HostReply {
    /// The job was accepted and filed under the device's serial.
    Submitted {
        job: JobView,
    },
    /// The submission was refused; it is recorded with this reason.
    Rejected {
        job: JobView,
        reason: String,
    },
    Jobs {
        jobs: Vec<JobView>,
    },
    Job {
        job: Box<JobDetail>,
    },
    /// The job was withdrawn.
    Canceled {
        job: JobView,
    },
    /// Where an upload stands (after UploadBegin and each UploadChunk).
    Upload {
        artifact: ArtifactInfo,
    },
    Artifacts {
        artifacts: Vec<ArtifactInfo>,
    },
    Alarms {
        alarms: Vec<AlarmView>,
    },
    /// The alarm as it is after an `ack-alarm`.
    Alarm {
        alarm: AlarmView,
    },
    /// One page of meter readings; `next` is where the following page starts, `None` at the end.
    Counters {
        readings: Vec<CounterReading>,
        #[serde(default)]
        next: Option<String>,
    },
    Relays {
        relays: Vec<crate::relay::RelayView>,
    },
    Rollout {
        rollout: Box<RolloutView>,
    },
    Rollouts {
        rollouts: Vec<RolloutView>,
    },
    Devices {
        devices: Vec<DeviceListing>,
    },
    /// The request itself could not be served (unknown job, undecodable request…).
    Error {
        reason: String,
    },
}
