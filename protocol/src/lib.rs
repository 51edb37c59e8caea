//! The contract every chukei part shares: who may speak ([`ids`]), where ([`topic`], [`acl`]) and
//! what ([`envelope`], [`job`], [`device`], [`host`], [`data`]). `topics.md` at the top of the
//! repository is the same contract written for integrators; keep the two in step.
//!
//! This crate does no I/O: the broker, the agents and the tests all build on it, and anything here
//! can be tested as a pure function.

pub mod acl;
pub mod alarm;
pub mod artifact;
pub mod cbor_guard;
pub mod data;
pub mod device;
pub mod envelope;
pub mod host;
pub mod ids;
pub mod job;
pub mod log_format;
pub mod meter;
pub mod presence;
pub mod proxy;
pub mod relay;
pub mod rollout;
pub mod schedule;
pub mod shown;
pub mod topic;
pub mod url;
pub mod validate;

pub use envelope::{Envelope, EnvelopeError, Seq};
pub use ids::{HostId, IdError, Identity, Incarnation, JobId, MsgId, RelayId, Role, Serial};
pub use shown::{Shown, ShownBytes};

/// Wall-clock time on the wire: always UTC (docs/decisions.md, D6). Serialized as RFC 3339.
pub type Timestamp = chrono::DateTime<chrono::Utc>;
