//! Host ↔ broker requests on `host/{host}/req` and replies on `host/{host}/resp`.
//!
//! A host resends a request until a reply with its msg id arrives (S222). Submissions are
//! deduplicated by (host, msg id): a resent submission gets the same job back, never a second job.

use serde::{Deserialize, Serialize};

use crate::MsgId;
use crate::job::{JobDetail, JobView};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
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
    /// Deadline (RFC 3339).
    #[serde(default)]
    pub deadline: Option<String>,
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
    /// The request itself could not be served (unknown job, undecodable request…).
    Error {
        reason: String,
    },
}
