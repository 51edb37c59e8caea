//! Which of a device's messages the relay has already handled: one small row per device.
//!
//! A device's outbox numbers its messages 1, 2, 3, … and sends them in that order, resending what
//! is not acked. So "which ids are handled" is, for all but the newest few, "every id below some
//! floor". A [`SeenWindow`] keeps that floor and a bitmap of the [`SPAN`] ids above it; once every
//! id up to some point is handled (stored, or refused for good), the floor moves past them.
//!
//! Why not a row per message: with a row per (device, id) every stored report inserted one more
//! row into an ever-growing table, and a batch of reports from 512 different devices touched 512
//! different pages of it, each copied and written at the commit. Measured with 1,000 devices, the
//! journal writes were more than 40 % of the relay's CPU per report (bench/RESULTS.md). A window
//! per device is one fixed-size row that is rewritten in place, and the table holds one row per
//! device however long the relay runs.
//!
//! What a window never does is count an id as handled that was not: a duplicate must only ever be
//! a message the relay really stored, or its sender deletes a report the relay never kept.
//! - **An id far ahead** (at or past `floor + SPAN`) does not move the window: the window would
//!   have to give up on every id it slid past. Such an id is kept in a journal row of its own
//!   ([`Placed::Beyond`]), and the window remembers that it has rows to look in. A device that
//!   sends in order never gets there; a forged id 2^64-1 costs one row, not the device's reports.
//! - **A device that starts over** (a wiped or replaced outbox counts from 1 again) names a new
//!   incarnation in its envelopes, and gets a window of its own in the device's [`SeenSet`].
//!   A window begins [`SPAN`]`/2` below the first id it sees, so an upgraded agent whose outbox
//!   was already at id 5,000 starts cleanly, and messages of its that arrive out of order are
//!   still told apart.
use protocol::{Incarnation, MsgId, Timestamp};

/// How many ids above the floor a window tracks one by one.
pub const SPAN: u64 = 512;

const WORDS: usize = (SPAN / 64) as usize;

/// The encoded size of a window as relays before incarnations wrote it, alone in its row:
/// floor, bitmap, time of the last update.
const LEGACY_LEN: usize = 8 + WORDS * 8 + 8;

/// The encoded size of one entry of a [`SeenSet`]: incarnation, window, flags.
const ENTRY_LEN: usize = 8 + LEGACY_LEN + 8;

/// Flag: some ids of this window are journal rows of their own (far ahead, or refused).
const HAS_ROWS: u64 = 1;

/// Windows a device keeps: its current outbox, the one before (whose resends may still arrive,
/// an agent upgraded in place sends both) and a little slack. A device that keeps starting over
/// evicts its oldest; only an outbox that comes back after this many others forgets its past.
pub const MAX_INCARNATIONS: usize = 4;

/// Where [`SeenWindow::insert`] put an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// In the window (or below its floor: already handled).
    InWindow,
    /// Too far ahead for the window: the caller keeps it in a row of its own.
    Beyond,
}

/// One outbox's handled message ids: every id below `floor`, and `floor + i` where bit `i` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenWindow {
    floor: MsgId,
    bits: [u64; WORDS],
    /// When an id was last added, in Unix milliseconds.
    at_ms: i64,
    /// Whether some of its ids are journal rows of their own ([`Placed::Beyond`], refusals).
    has_rows: bool,
}

impl SeenWindow {
    /// An outbox that has sent nothing yet. Device ids start at 1 (0 is the relay's own).
    pub fn new() -> Self {
        SeenWindow {
            floor: 1,
            bits: [0; WORDS],
            at_ms: 0,
            has_rows: false,
        }
    }

    /// The window of an outbox first heard from with `first_id`: it starts half a span lower,
    /// so that the outbox's earlier messages, if they arrive later, are still told apart.
    pub fn starting_at(first_id: MsgId) -> Self {
        SeenWindow {
            floor: first_id.saturating_sub(SPAN / 2).max(1),
            ..SeenWindow::new()
        }
    }

    /// Whether `id` was handled. An id the window cannot hold ([`Placed::Beyond`]) is not in it:
    /// look in the rows ([`SeenWindow::has_rows`]).
    pub fn contains(&self, id: MsgId) -> bool {
        match id.checked_sub(self.floor) {
            None => true,
            Some(offset) if offset < SPAN => self.bit(offset),
            Some(_) => false,
        }
    }

    /// Whether some ids of this window were kept as journal rows: only then is a lookup there
    /// worth its cost.
    pub fn has_rows(&self) -> bool {
        self.has_rows
    }

    /// Notes that an id of this window was kept as a journal row.
    pub fn mark_rows(&mut self) {
        self.has_rows = true;
    }

    /// Records `id` as handled at `at`. An id at or past `floor + SPAN` is not recorded: the
    /// window never slides past ids it has not seen handled.
    pub fn insert(&mut self, id: MsgId, at: Timestamp) -> Placed {
        self.at_ms = at.timestamp_millis();
        let Some(offset) = id.checked_sub(self.floor) else {
            return Placed::InWindow;
        };
        if offset >= SPAN {
            return Placed::Beyond;
        }
        self.bits[(offset / 64) as usize] |= 1 << (offset % 64);
        let run = self.leading_run();
        self.slide(run);
        Placed::InWindow
    }

    /// When an id was last added.
    pub fn at(&self) -> Option<Timestamp> {
        chrono::DateTime::from_timestamp_millis(self.at_ms)
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.floor.to_le_bytes());
        for word in self.bits {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&self.at_ms.to_le_bytes());
    }

    /// `None` when `bytes` is not a window's [`LEGACY_LEN`] bytes.
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != LEGACY_LEN {
            return None;
        }
        let mut bits = [0u64; WORDS];
        for (i, slot) in bits.iter_mut().enumerate() {
            *slot = u64::from_le_bytes(word(bytes, 8 + i * 8)?);
        }
        Some(SeenWindow {
            floor: u64::from_le_bytes(word(bytes, 0)?),
            bits,
            at_ms: i64::from_le_bytes(word(bytes, LEGACY_LEN - 8)?),
            has_rows: false,
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

fn word(bytes: &[u8], at: usize) -> Option<[u8; 8]> {
    bytes.get(at..at + 8)?.try_into().ok()
}

/// A device's windows, one per outbox incarnation, the most recently used first; at most
/// [`MAX_INCARNATIONS`]. Incarnation 0 is the window of agents that name none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeenSet {
    windows: Vec<(Incarnation, SeenWindow)>,
}

impl SeenSet {
    /// The incarnations with a window, most recently used first.
    pub fn incarnations(&self) -> Vec<Incarnation> {
        self.windows.iter().map(|(inc, _)| *inc).collect()
    }

    pub fn get(&self, inc: Incarnation) -> Option<&SeenWindow> {
        self.windows.iter().find(|(i, _)| *i == inc).map(|(_, w)| w)
    }

    /// The window of `inc`, made the most recently used; a new one starting at `id` if the
    /// device had none (evicting its least recently used beyond [`MAX_INCARNATIONS`]).
    pub fn window_for(&mut self, inc: Incarnation, id: MsgId) -> &mut SeenWindow {
        let entry = match self.windows.iter().position(|(i, _)| *i == inc) {
            Some(at) => self.windows.remove(at),
            // Incarnation 0 is the numbering of agents older than incarnations, which always
            // counted from 1: its window starts there, as it did before.
            None if inc == 0 => (inc, SeenWindow::new()),
            None => (inc, SeenWindow::starting_at(id)),
        };
        self.windows.insert(0, entry);
        self.windows.truncate(MAX_INCARNATIONS);
        &mut self.windows[0].1
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.windows.len() * ENTRY_LEN);
        for (inc, window) in &self.windows {
            out.extend_from_slice(&inc.to_le_bytes());
            window.encode_into(&mut out);
            let flags = if window.has_rows { HAS_ROWS } else { 0 };
            out.extend_from_slice(&flags.to_le_bytes());
        }
        out
    }

    /// `None` when `bytes` is neither a set this version wrote nor a lone window of a relay
    /// before incarnations (read as incarnation 0).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() == LEGACY_LEN {
            return Some(SeenSet {
                windows: vec![(0, SeenWindow::decode(bytes)?)],
            });
        }
        if bytes.is_empty() || !bytes.len().is_multiple_of(ENTRY_LEN) {
            return None;
        }
        let mut windows = Vec::with_capacity(bytes.len() / ENTRY_LEN);
        for entry in bytes.chunks_exact(ENTRY_LEN) {
            let inc = u64::from_le_bytes(word(entry, 0)?);
            let mut window = SeenWindow::decode(entry.get(8..8 + LEGACY_LEN)?)?;
            window.has_rows = u64::from_le_bytes(word(entry, 8 + LEGACY_LEN)?) & HAS_ROWS != 0;
            windows.push((inc, window));
        }
        Some(SeenSet { windows })
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
    fn an_id_far_ahead_is_beyond_the_window_and_moves_nothing() {
        let mut w = SeenWindow::new();
        w.insert(1, now());
        w.insert(3, now());
        let before = w.clone();
        assert_eq!(w.insert(3 + SPAN + 10, now()), Placed::Beyond);
        assert_eq!(w.insert(u64::MAX, now()), Placed::Beyond);
        assert_eq!((w.floor, w.bits), (before.floor, before.bits));
        assert!(
            !w.contains(2),
            "an id never handled is never counted as handled"
        );
        assert!(!w.contains(u64::MAX));
        for id in 4..2 + SPAN {
            assert_eq!(w.insert(id, now()), Placed::InWindow, "{id}");
        }
        assert_eq!(
            w.insert(2 + SPAN, now()),
            Placed::Beyond,
            "the hole at 2 holds it"
        );
        assert!(!w.contains(2) && w.floor == 2);
    }

    #[test]
    fn slides_across_word_boundaries_keep_every_bit_in_place() {
        for start in [0u64, 1, 62, 63, 64, 65, 127, 300] {
            let mut w = SeenWindow::new();
            // A hole at 1 keeps the floor there; a run up to `start`, then a pattern above it.
            let run: Vec<u64> = (2..2 + start).collect();
            let ids: Vec<u64> = (0..15).map(|i| 3 + start + i * 11).collect();
            for &id in run.iter().chain(&ids) {
                assert_eq!(w.insert(id, now()), Placed::InWindow);
            }
            w.insert(1, now());
            assert_eq!(w.floor, 2 + start, "start {start}");
            for id in 1..(4 + start + 15 * 11) {
                let handled = id < 2 + start || ids.contains(&id);
                assert_eq!(w.contains(id), handled, "start {start}: {id}");
            }
        }
    }

    #[test]
    fn a_new_outbox_starts_its_window_half_a_span_below_its_first_id() {
        assert_eq!(SeenWindow::starting_at(1).floor, 1);
        assert_eq!(SeenWindow::starting_at(5000).floor, 5000 - SPAN / 2);
        let mut w = SeenWindow::starting_at(5000);
        w.insert(5000, now());
        assert!(w.contains(5000) && !w.contains(4999) && !w.contains(5001));
        assert_eq!(w.insert(4990, now()), Placed::InWindow);
        assert!(
            w.contains(4990),
            "an earlier message arriving later is still told apart"
        );
    }

    #[test]
    fn each_incarnation_has_its_own_window_and_the_oldest_is_evicted() {
        let mut set = SeenSet::default();
        for id in 1..=100 {
            set.window_for(7, id).insert(id, now());
        }
        assert!(set.get(7).unwrap().contains(50));
        // The device starts over: ids from 1 again, in a window of their own.
        set.window_for(8, 1);
        assert!(!set.get(8).unwrap().contains(1));
        set.window_for(8, 1).insert(1, now());
        assert!(set.get(8).unwrap().contains(1) && !set.get(8).unwrap().contains(2));
        assert!(
            set.get(7).unwrap().contains(100),
            "the old outbox's window is kept"
        );
        for inc in 9..=11 {
            set.window_for(inc, 1);
        }
        assert_eq!(set.windows.len(), MAX_INCARNATIONS);
        assert!(set.get(7).is_none(), "least recently used goes first");
        assert!(set.get(8).is_some());
    }
    #[test]
    fn encoding_round_trips_reads_a_lone_legacy_window_and_refuses_other_sizes() {
        let mut set = SeenSet::default();
        for id in [1, 2, 9, 77, 300] {
            set.window_for(0, id).insert(id, now());
        }
        set.window_for(0xabc, 40).insert(40, now());
        set.window_for(0xabc, 40).mark_rows();
        let bytes = set.encode();
        assert_eq!(bytes.len(), 2 * ENTRY_LEN);
        assert_eq!(SeenSet::decode(&bytes), Some(set.clone()));
        assert!(
            SeenSet::decode(&bytes)
                .unwrap()
                .get(0xabc)
                .unwrap()
                .has_rows()
        );
        assert_eq!(set.get(0).unwrap().at(), Some(now()));
        assert_eq!(SeenSet::decode(&bytes[1..]), None);
        assert_eq!(SeenSet::decode(&[]), None);

        // What a relay before incarnations wrote: one window alone, incarnation 0.
        let legacy = set.get(0).unwrap();
        let mut old = Vec::new();
        legacy.encode_into(&mut old);
        assert_eq!(old.len(), LEGACY_LEN);
        let read = SeenSet::decode(&old).unwrap();
        assert_eq!(read.get(0), Some(legacy));
        assert!(read.get(0xabc).is_none());
    }
}
