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
///
/// A whole set of thousands of serials is sent in parts of at most [`PRESENCE_PART`] (a message
/// must stay under the parent's packet limit): `full` on each, `last` on the final one; the
/// parent replaces the set once it has them all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChildPresence {
    pub full: bool,
    /// For a whole set: this is its final part (a set in one message has it too).
    #[serde(default = "yes")]
    pub last: bool,
    /// For a whole set: this is its first part.
    #[serde(default = "yes")]
    pub first: bool,
    #[serde(default)]
    pub online: Vec<Serial>,
    #[serde(default)]
    pub offline: Vec<Serial>,
}

fn yes() -> bool {
    true
}

/// Serials in one part of a whole presence set: with ids of up to 64 bytes, well under the
/// parent's default packet limit (256 KiB).
pub const PRESENCE_PART: usize = 2000;

impl ChildPresence {
    /// A whole set, in parts of at most [`PRESENCE_PART`] serials (one empty part for none).
    pub fn whole(online: Vec<Serial>) -> Vec<ChildPresence> {
        let chunks: Vec<Vec<Serial>> = if online.is_empty() {
            vec![Vec::new()]
        } else {
            online
                .chunks(PRESENCE_PART)
                .map(<[Serial]>::to_vec)
                .collect()
        };
        let n = chunks.len();
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, online)| ChildPresence {
                full: true,
                first: i == 0,
                last: i + 1 == n,
                online,
                offline: Vec::new(),
            })
            .collect()
    }
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
    fn a_whole_presence_set_goes_in_parts_each_under_the_limit() {
        let serials: Vec<Serial> = (0..4500)
            .map(|i| Serial::parse(&format!("{:0>64}", i)).unwrap())
            .collect();
        let parts = ChildPresence::whole(serials.clone());
        assert_eq!(parts.len(), 3);
        assert!(parts[0].first && !parts[0].last && parts[2].last && !parts[2].first);
        let back: Vec<Serial> = parts.iter().flat_map(|p| p.online.clone()).collect();
        assert_eq!(back, serials);
        for p in &parts {
            let bytes = Envelope::new(0, Timestamp::UNIX_EPOCH, p)
                .to_cbor()
                .unwrap();
            assert!(bytes.len() < 200 * 1024, "{} bytes", bytes.len());
        }
        let none = ChildPresence::whole(Vec::new());
        assert_eq!(none.len(), 1);
        assert!(none[0].first && none[0].last && none[0].online.is_empty());
    }

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
