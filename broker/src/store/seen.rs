//! Which of a device's messages the relay has already stored: one small row per device.
//!
//! A device numbers its messages 1, 2, 3, … (its outbox's counter) and sends them in that order,
//! resending what is not acked. So "which ids are stored" is, for all but the newest few, "every
//! id below some floor". A [`SeenWindow`] keeps that floor and a bitmap of the [`SPAN`] ids above
//! it; once every id up to some point is stored, the floor moves past them.
//!
//! Why not a row per message: with a row per (device, id) every stored report inserted one more
//! row into an ever-growing table, and a batch of reports from 512 different devices touched 512
//! different pages of it, each copied and written at the commit. Measured with 1,000 devices, the
//! journal writes were more than 40 % of the relay's CPU per report (bench/RESULTS.md). A window
//! per device is one fixed-size row that is rewritten in place, and the table holds one row per
//! device however long the relay runs.
//!
//! What the window gives up: an id that falls more than [`SPAN`] behind the newest stored id of
//! its device without having been stored counts as stored. A device sends in order and keeps far
//! fewer than that in flight, so such an id would have to be lost while hundreds of later ones
//! got through; hosts, whose resends must get their original answer, keep a journal row per
//! message.

use protocol::{MsgId, Timestamp};

/// How many ids above the floor a window tracks one by one.
pub const SPAN: u64 = 512;

const WORDS: usize = (SPAN / 64) as usize;

/// The encoded size: floor, bitmap, time of the last update.
const ENCODED_LEN: usize = 8 + WORDS * 8 + 8;

/// A device's stored message ids: every id below `floor`, and `floor + i` where bit `i` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenWindow {
    floor: MsgId,
    bits: [u64; WORDS],
    /// When an id was last added, in Unix milliseconds.
    at_ms: i64,
}

impl SeenWindow {
    /// A device that has sent nothing yet. Device ids start at 1 (0 is the relay's own).
    pub fn new() -> Self {
        SeenWindow {
            floor: 1,
            bits: [0; WORDS],
            at_ms: 0,
        }
    }

    pub fn contains(&self, id: MsgId) -> bool {
        match id.checked_sub(self.floor) {
            None => true,
            Some(offset) if offset < SPAN => self.bit(offset),
            Some(_) => false,
        }
    }

    /// Records `id` as stored at `at`.
    pub fn insert(&mut self, id: MsgId, at: Timestamp) {
        self.at_ms = at.timestamp_millis();
        let Some(offset) = id.checked_sub(self.floor) else {
            return;
        };
        let offset = if offset >= SPAN {
            // The window slides so `id` is its last slot; what it slides past counts as stored.
            let slide = offset - SPAN + 1;
            self.slide(slide);
            SPAN - 1
        } else {
            offset
        };
        self.bits[(offset / 64) as usize] |= 1 << (offset % 64);
        let run = self.leading_run();
        self.slide(run);
    }

    /// When an id was last added.
    pub fn at(&self) -> Option<Timestamp> {
        chrono::DateTime::from_timestamp_millis(self.at_ms)
    }

    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut out = [0u8; ENCODED_LEN];
        out[..8].copy_from_slice(&self.floor.to_le_bytes());
        for (i, word) in self.bits.iter().enumerate() {
            out[8 + i * 8..16 + i * 8].copy_from_slice(&word.to_le_bytes());
        }
        out[ENCODED_LEN - 8..].copy_from_slice(&self.at_ms.to_le_bytes());
        out
    }

    /// `None` when `bytes` is not a window this version wrote.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != ENCODED_LEN {
            return None;
        }
        let word = |at: usize| -> Option<[u8; 8]> { bytes.get(at..at + 8)?.try_into().ok() };
        let mut bits = [0u64; WORDS];
        for (i, slot) in bits.iter_mut().enumerate() {
            *slot = u64::from_le_bytes(word(8 + i * 8)?);
        }
        Some(SeenWindow {
            floor: u64::from_le_bytes(word(0)?),
            bits,
            at_ms: i64::from_le_bytes(word(ENCODED_LEN - 8)?),
        })
    }

    fn bit(&self, offset: u64) -> bool {
        self.bits[(offset / 64) as usize] & (1 << (offset % 64)) != 0
    }

    /// How many ids from the floor up are stored without a gap.
    fn leading_run(&self) -> u64 {
        let mut run = 0;
        for word in self.bits {
            let ones = u64::from(word.trailing_ones());
            run += ones;
            if ones < 64 {
                break;
            }
        }
        run
    }

    /// Moves the floor up by `n`, dropping the bits it passes.
    fn slide(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.floor = self.floor.saturating_add(n);
        if n >= SPAN {
            self.bits = [0; WORDS];
            return;
        }
        let words = (n / 64) as usize;
        let shift = (n % 64) as u32;
        let mut shifted = [0u64; WORDS];
        for (i, slot) in shifted.iter_mut().enumerate() {
            let low = self.bits.get(i + words).copied().unwrap_or(0);
            let high = self.bits.get(i + words + 1).copied().unwrap_or(0);
            *slot = if shift == 0 {
                low
            } else {
                (low >> shift) | (high << (64 - shift))
            };
        }
        self.bits = shifted;
    }
}

impl Default for SeenWindow {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        chrono::DateTime::from_timestamp_millis(1_700_000_000_123).unwrap()
    }

    #[test]
    fn ids_in_order_move_the_floor_and_keep_no_bits() {
        let mut w = SeenWindow::new();
        assert!(!w.contains(1));
        for id in 1..=1000 {
            w.insert(id, now());
        }
        assert_eq!(w.floor, 1001);
        assert_eq!(w.bits, [0; WORDS]);
        assert!(w.contains(1) && w.contains(1000));
        assert!(!w.contains(1001));
        assert!(
            w.contains(0),
            "0 is not a device id; it never needs storing"
        );
    }

    #[test]
    fn out_of_order_ids_are_remembered_one_by_one_until_the_gap_fills() {
        let mut w = SeenWindow::new();
        for id in [1, 2, 4, 5, 70, 200] {
            w.insert(id, now());
        }
        assert_eq!(w.floor, 3);
        for id in [1, 2, 4, 5, 70, 200] {
            assert!(w.contains(id), "{id}");
        }
        for id in [3, 6, 69, 71, 199, 201] {
            assert!(!w.contains(id), "{id}");
        }
        w.insert(3, now());
        assert_eq!(w.floor, 6);
        assert!(w.contains(70) && w.contains(200) && !w.contains(6));
    }

    #[test]
    fn an_id_far_ahead_slides_the_window_and_what_it_passes_counts_as_stored() {
        let mut w = SeenWindow::new();
        w.insert(1, now());
        w.insert(3, now());
        w.insert(3 + SPAN + 10, now());
        let newest = 3 + SPAN + 10;
        assert_eq!(w.floor, newest - SPAN + 1);
        assert!(
            w.contains(2),
            "given up on: more than SPAN behind the newest"
        );
        assert!(w.contains(newest));
        assert!(!w.contains(newest - 1) && !w.contains(newest + 1));
    }

    #[test]
    fn slides_across_word_boundaries_keep_every_bit_in_place() {
        for start in [0u64, 1, 63, 64, 65, 127, 300] {
            let mut w = SeenWindow::new();
            // A hole at 1 keeps the floor there; set a pattern above it.
            let ids: Vec<u64> = (0..40).map(|i| 2 + start + i * 11).collect();
            for &id in &ids {
                w.insert(id, now());
            }
            let far = 1 + SPAN + start + 5;
            w.insert(far, now());
            for &id in &ids {
                assert!(w.contains(id), "start {start}: {id} lost in the slide");
            }
            for id in w.floor..far {
                assert_eq!(w.contains(id), ids.contains(&id), "start {start}: {id}");
            }
            assert!(w.contains(far));
        }
    }

    #[test]
    fn encoding_round_trips_and_refuses_other_sizes() {
        let mut w = SeenWindow::new();
        for id in [1, 2, 9, 77, 300] {
            w.insert(id, now());
        }
        let bytes = w.encode();
        assert_eq!(SeenWindow::decode(&bytes), Some(w.clone()));
        assert_eq!(w.at(), Some(now()));
        assert_eq!(SeenWindow::decode(&bytes[1..]), None);
        assert_eq!(SeenWindow::decode(&[]), None);
    }
}
