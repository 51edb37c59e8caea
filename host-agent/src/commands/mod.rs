//! One command per file, as in mini-redis `src/cmd/`: each takes its parsed arguments and a
//! session, asks the broker, and prints the answer. Business rules stay in the broker; these
//! only ask and show. `keys` alone works offline.

pub mod alarms;
pub mod artifacts;
pub mod cancel;
pub mod dashboard;
pub mod devices;
pub mod export;
pub mod keys;
pub mod list;
pub mod relays;
pub mod rollouts;
pub mod show;
pub mod submit;
pub mod watch;

/// The broker answered and said no: a rejected job. `host-agent` exits 1 for it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// For a request whose refusal is the user's to act on: the relay's reason becomes a
/// [`Refusal`] (exit 1 with the reason alone); anything else gets `what` as context.
pub fn refused(what: &'static str) -> impl Fn(crate::client::HostError) -> anyhow::Error {
    move |e| match e {
        crate::client::HostError::Refused { reason } => Refusal(reason).into(),
        other => anyhow::Error::new(other).context(what),
    }
}
