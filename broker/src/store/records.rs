//! What the store keeps, one type per table value. Every record is CBOR and every field added later
//! gets `#[serde(default)]`, so a newer broker reads an older file.

use protocol::device::DeviceState;
use protocol::job::{JobOrder, JobView};
use protocol::{JobId, Timestamp};
use serde::{Deserialize, Serialize};

/// A job as the broker keeps it: the Fig. 9 row, plus the order the device runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub view: JobView,
    /// What the device is told to do. `None` for a rejected submission: there is nothing to run,
    /// and its serial may not even be valid.
    #[serde(default)]
    pub order: Option<JobOrder>,
    /// When the job reached an end state; what "hidden from the default list after a while" counts from.
    #[serde(default)]
    pub ended_at: Option<Timestamp>,
}

impl JobRecord {
    /// An open job has a retained order on its device's topic and may still time out.
    pub fn is_open(&self) -> bool {
        self.order.is_some() && !self.view.status.is_terminal()
    }
}

/// A device as it last announced itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    #[serde(default)]
    pub state: DeviceState,
    /// When the broker last received anything from it.
    pub last_seen: Timestamp,
}

/// The state of a device record alone (`Txn::device_state`): the rest is skipped, not parsed.
#[derive(Deserialize)]
pub(super) struct StoredState {
    #[serde(default)]
    pub state: DeviceState,
}

/// What the broker did with a message it handled, keyed by (sender, msg id): the dedupe journal
/// that gives a resend its original answer (docs/decisions.md, D3). Hosts get a row per request;
/// a device message gets a row only where its outbox's window ([`super::seen`]) cannot say it
/// exactly: an id far ahead of the window, or a refusal (D9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub at: Timestamp,
    pub outcome: JournalOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum JournalOutcome {
    /// A device message was committed (or was a harmless repeat).
    Stored,
    /// A device message was refused for good; a resend is refused again with the same reason.
    Refused { reason: String },
    /// A host's submission became this job (accepted or recorded as rejected); a resend gets the
    /// same job back.
    Submission { job: JobId },
    /// A host's cancel request withdrew this job; a resend gets the same answer rather than
    /// "already ended".
    Cancel { job: JobId },
}
