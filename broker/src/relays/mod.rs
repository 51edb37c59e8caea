//! Child and parent relays (claims 18–26): a child relay serves devices near them and connects
//! out to its parent, as a device does; the parent is where hosts connect.
//!
//! - [`uplink`]: the child's side, forwarding every device message it stored to its parent in
//!   batches, until the parent has committed them.
//! - [`Assignments`]: the parent's side of trust: which devices each child may speak for.
//!
//! The parent's handling of a batch is the core's (`core/relay.rs`): each item goes through the
//! same path as a device's own message.

mod down;
mod forwarder;
pub mod own;
mod presence;
pub mod uplink;

use protocol::{RelayId, Serial};
use serde::Deserialize;

/// One `[[relays]]` entry of a parent's configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelayAssignment {
    /// The child's relay id (its certificate's CN).
    pub id: RelayId,
    /// Serials it may speak for: exact serials or glob patterns (`OSAKA-*`, `C1??`). Several
    /// relays may list the same serial (a device failing over between children).
    pub serials: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "[[relays]] id = {id:?}: serial pattern {pattern:?} is not valid ({why}); use serials and * ? [..] globs, e.g. \"OSAKA-*\""
)]
pub struct AssignmentError {
    pub id: String,
    pub pattern: String,
    pub why: String,
}

/// The parent's `[[relays]]`, compiled: which child may speak for which serial.
#[derive(Debug, Default)]
pub struct Assignments {
    relays: Vec<(RelayId, Vec<glob::Pattern>)>,
}

impl Assignments {
    pub fn new(entries: &[RelayAssignment]) -> Result<Assignments, AssignmentError> {
        let mut relays = Vec::with_capacity(entries.len());
        for e in entries {
            let mut patterns = Vec::with_capacity(e.serials.len());
            for p in &e.serials {
                let pattern = glob::Pattern::new(p).map_err(|err| AssignmentError {
                    id: e.id.to_string(),
                    pattern: p.clone(),
                    why: err.msg.to_owned(),
                })?;
                patterns.push(pattern);
            }
            relays.push((e.id.clone(), patterns));
        }
        Ok(Assignments { relays })
    }

    /// Whether `relay` may forward what `serial` sends: the serials its entry matches, and its
    /// own id (the answers to jobs for the child itself, `jobs submit --relay`).
    pub fn allows(&self, relay: &RelayId, serial: &Serial) -> bool {
        self.relays
            .iter()
            .filter(|(id, _)| id == relay)
            .any(|(_, patterns)| {
                relay.as_str() == serial.as_str()
                    || patterns.iter().any(|p| p.matches(serial.as_str()))
            })
    }

    /// Whether `relay` has an entry at all (a child unknown to this parent).
    pub fn knows(&self, relay: &RelayId) -> bool {
        self.relays.iter().any(|(id, _)| id == relay)
    }

    /// Every configured child and its patterns, in the file's order.
    pub fn entries(&self) -> impl Iterator<Item = (&RelayId, Vec<String>)> {
        self.relays
            .iter()
            .map(|(id, patterns)| (id, patterns.iter().map(|p| p.as_str().to_owned()).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, serials: &[&str]) -> RelayAssignment {
        RelayAssignment {
            id: RelayId::parse(id).unwrap(),
            serials: serials.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_child_speaks_only_for_the_serials_it_is_assigned() {
        let a = Assignments::new(&[entry("R1", &["OSAKA-*", "C123"]), entry("R2", &["OSAKA-*"])])
            .unwrap();
        let (r1, r2, r9) = (
            RelayId::parse("R1").unwrap(),
            RelayId::parse("R2").unwrap(),
            RelayId::parse("R9").unwrap(),
        );
        let s = |v| Serial::parse(v).unwrap();
        assert!(a.allows(&r1, &s("OSAKA-7")));
        assert!(a.allows(&r1, &s("C123")));
        assert!(!a.allows(&r1, &s("C1234")));
        assert!(
            a.allows(&r2, &s("OSAKA-7")),
            "two children may share serials"
        );
        assert!(!a.allows(&r2, &s("C123")));
        assert!(!a.allows(&r9, &s("OSAKA-7")));
        assert!(a.allows(&r1, &s("R1")), "a child answers for itself");
        assert!(!a.allows(&r1, &s("R2")));
        assert!(a.knows(&r1) && !a.knows(&r9));
    }

    #[test]
    fn a_bad_pattern_is_refused_with_its_entry() {
        let e = Assignments::new(&[entry("R1", &["OSAKA-[*"])]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("R1") && text.contains("OSAKA-[*"), "{text}");
    }
}
