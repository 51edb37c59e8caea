//! What a device sends (under `dev/{serial}/up/{kind}`) and what the broker answers on
//! `dev/{serial}/ack`. Each device message is wrapped in an [`crate::Envelope`] whose id the
//! broker acknowledges once it is durable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::DeviceData;
use crate::ids::JobId;
use crate::job::JobStatus;
use crate::{Incarnation, MsgId, Seq};

/// A job's progress as the device reports it (`up/job`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobUpdate {
    pub job: JobId,
    /// One of `delivered`, `staged`, `in-progress`, `succeeded`, `failed`; anything else is refused.
    pub status: JobStatus,
    /// Why it failed, or what the device noticed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The collected data, with `succeeded` of a get-data job; the applied values of an update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DeviceData>,
    /// Per-key reasons a device refused values of an update-data job ("adjustment.density" →
    /// "12 is out of range 1..=9"); with `failed`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, String>,
}

impl JobUpdate {
    /// The statuses a device may report; the rest belong to the broker.
    pub fn device_may_report(status: JobStatus) -> bool {
        matches!(
            status,
            JobStatus::Delivered
                | JobStatus::Staged
                | JobStatus::InProgress
                | JobStatus::Succeeded
                | JobStatus::Failed
        )
    }
}

/// Update-data with `merge: broker`, S212: the device's current values of the job's sections
/// (`up/merge`, through the outbox). The broker answers with [`Merged`] on
/// `dev/{serial}/merged/{job}`, retained until the job ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeRequest {
    pub job: JobId,
    pub current: DeviceData,
}

/// S213–S215: the device's current data with the host's values merged in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Merged {
    pub job: JobId,
    pub data: DeviceData,
}

/// The device announces itself (`up/state`) when its session starts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceState {
    /// Installation site (Fig. 9), as configured on the agent.
    #[serde(default)]
    pub site: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub firmware: String,
}

/// Longest installation site a device may announce, in bytes: the site is repeated in every job
/// and alarm of the device, in lists hosts read whole, so one device must not be able to make
/// them huge. Real sites ("Osaka HQ, 3F, copy room B") are a few dozen.
pub const MAX_SITE_BYTES: usize = 256;
/// Longest model name or firmware version a device may announce, in bytes.
pub const MAX_MODEL_BYTES: usize = 128;

impl DeviceState {
    /// Checks what a device announces before the relay stores it (and the agent before it
    /// starts): each field within its length. The error names the field and its limit.
    pub fn check(&self) -> Result<(), String> {
        for (field, value, max) in [
            ("site", &self.site, MAX_SITE_BYTES),
            ("model", &self.model, MAX_MODEL_BYTES),
            ("firmware", &self.firmware, MAX_MODEL_BYTES),
        ] {
            if value.len() > max {
                return Err(format!(
                    "{field} is {} bytes, over the limit of {max}; shorten it in the agent's configuration",
                    value.len()
                ));
            }
        }
        Ok(())
    }
}

/// The broker's end-to-end acknowledgement of one message (claims 13–14; docs/decisions.md, D3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub id: MsgId,
    pub outcome: AckOutcome,
    /// The incarnation the acked message named, so an agent that started a new outbox ignores
    /// an ack meant for its old one. Absent when the message named none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inc: Option<Incarnation>,
}

impl Ack {
    /// The ack of the message at `seq`.
    pub fn of(seq: Seq, outcome: AckOutcome) -> Ack {
        Ack {
            id: seq.id,
            outcome,
            inc: (seq.inc != 0).then_some(seq.inc),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum AckOutcome {
    /// Committed to the broker's store.
    Stored,
    /// Already committed earlier; nothing was stored twice.
    Duplicate,
    /// Refused for good: resending will not help. The sender drops it and logs the reason.
    Rejected { reason: String },
}

/// What travels on `dev/{serial}/ack`: the acks of one group commit for this device.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AckBatch {
    pub acks: Vec<Ack>,
}
