//! One command per file, as in mini-redis `src/cmd/`: each takes its parsed arguments and a
//! session, asks the broker, and prints the answer. Business rules stay in the broker; these
//! only ask and show. `keys` alone works offline.

pub mod alarms;
pub mod artifacts;
pub mod cancel;
pub mod dashboard;
pub mod export;
pub mod keys;
pub mod list;
pub mod relays;
pub mod show;
pub mod submit;
pub mod watch;

/// The broker answered and said no: a rejected job. `host-agent` exits 1 for it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);
