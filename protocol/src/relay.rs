//! What a child relay and its parent say to each other on `relay/{id}/up/batch` and
//! `relay/{id}/ack`.
//!
//! A child stores what its devices send, acks them itself, and forwards each stored message to
//! its parent as it came from the device (the device's own payload, message id and all), many in
//! one batch. The parent runs every item through the same path as a device's own message, so it
//! deduplicates by the device's id: a batch resent after a lost ack, or a message that also
//! reached the parent directly (a device failing over), is stored once.

use serde::{Deserialize, Serialize};

use crate::ids::Serial;
use crate::topic::UpKind;

/// Many devices' messages in one upstream message, in the child's order (its outbox's sequence).
/// Carried in an [`crate::Envelope`] whose msg id is the child's sequence number of the first item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UplinkBatch {
    pub items: Vec<UplinkItem>,
}

/// One device message as the device sent it to the child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UplinkItem {
    /// The child's sequence number for it: the ack names the last one committed.
    pub seq: u64,
    pub serial: Serial,
    /// `dev/{serial}/up/{kind}` at the child: `state`, `alarm`, `counters`, …
    pub kind: String,
    #[serde(with = "crate::artifact::serde_bytes_compat")]
    pub payload: Vec<u8>,
}

impl UplinkItem {
    /// The kind, if this version knows it.
    pub fn up_kind(&self) -> Option<UpKind> {
        UpKind::parse(&self.kind)
    }
}

/// The parent's answer, after its commit: every item up to `upto` is stored (or refused for
/// good, listed in `refused`), so the child may forget them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchAck {
    pub upto: u64,
    #[serde(default)]
    pub refused: Vec<RefusedItem>,
}

/// An item the parent will never store, and why (the child logs it and drops it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusedItem {
    pub seq: u64,
    pub serial: Serial,
    pub reason: String,
}

/// Which of a child's devices have a session open there, on `relay/{id}/up/presence`: the whole
/// set (`full`) each time the child connects, then what changed. Not queued on the child's disk:
/// a set sent on every connection supersedes whatever was lost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChildPresence {
    pub full: bool,
    #[serde(default)]
    pub online: Vec<Serial>,
    #[serde(default)]
    pub offline: Vec<Serial>,
}

/// A child relay as its parent sees it (`relays list`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayView {
    pub id: String,
    /// Named in the parent's `[[relays]]` (a child that is not is refused).
    pub configured: bool,
    /// The serial patterns it may speak for.
    #[serde(default)]
    pub serials: Vec<String>,
    /// Its own session with the parent is open.
    pub connected: bool,
    /// When it last connected or disconnected (since the parent started).
    #[serde(default)]
    pub since: Option<crate::Timestamp>,
    /// Devices with a session open at it now (as it last said).
    pub devices_online: u64,
    /// Devices that were online at it when its session was lost.
    #[serde(default)]
    pub devices_unreachable: u64,
    /// Devices it has forwarded messages for since the parent started.
    pub devices_served: u64,
    /// Messages it has forwarded since the parent started, and when the last batch came.
    pub forwarded: u64,
    #[serde(default)]
    pub last_batch: Option<crate::Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, Timestamp};

    #[test]
    fn a_batch_round_trips_with_payloads_as_byte_strings() {
        let batch = UplinkBatch {
            items: vec![UplinkItem {
                seq: 7,
                serial: Serial::parse("C1").unwrap(),
                kind: UpKind::Counters.as_str().to_owned(),
                payload: vec![0xa1, 1, 2],
            }],
        };
        let bytes = Envelope::new(7, Timestamp::UNIX_EPOCH, batch.clone())
            .to_cbor()
            .unwrap();
        // The payload is one byte string (0x43 = 3 bytes), not an array of integers.
        assert!(bytes.windows(4).any(|w| w == [0x43, 0xa1, 1, 2]));
        let back = Envelope::<UplinkBatch>::from_cbor(&bytes, 1024).unwrap();
        assert_eq!(back.body, batch);
        assert_eq!(back.body.items[0].up_kind(), Some(UpKind::Counters));
    }
}
