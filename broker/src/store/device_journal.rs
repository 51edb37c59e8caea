//! How a device message's dedupe answer is read from and recorded in its outbox's seen-ids
//! window ([`super::seen`]) — the same for every backend; a backend only says where the window
//! and the journal rows are kept.

use protocol::{Incarnation, MsgId, Seq};

use super::seen::{Placed, SeenSet};
use super::{JournalEntry, JournalOutcome, StoreError};

/// The journal's sender key for the rows of a device outbox's window (refusals, ids too far
/// ahead). Not `device:…`, the key of the rows relays before windows wrote, so these never make
/// every lookup fall back to rows.
pub(crate) fn row_key(serial: &str, inc: Incarnation) -> String {
    format!("devseq:{serial}#{inc:016x}")
}

/// Every outbox of a device the relay knows, and 0 (the outbox of agents before incarnations).
pub(crate) fn incarnations(set: Option<&SeenSet>) -> Vec<Incarnation> {
    let mut all = set.map(SeenSet::incarnations).unwrap_or_default();
    if !all.contains(&0) {
        all.push(0);
    }
    all
}

/// What the window of `seq`'s outbox says of it: a row of its own if the window has any and
/// one is there (`row` reads it by sender and id), else `Stored` if the window holds the id.
pub(crate) fn lookup(
    set: Option<&SeenSet>,
    serial: &str,
    seq: Seq,
    row: impl FnOnce(&str, MsgId) -> Result<Option<JournalEntry>, StoreError>,
) -> Result<Option<JournalEntry>, StoreError> {
    let Some(window) = set.and_then(|set| set.get(seq.inc)) else {
        return Ok(None);
    };
    if window.has_rows()
        && let Some(entry) = row(&row_key(serial, seq.inc), seq.id)?
    {
        return Ok(Some(entry));
    }
    Ok(window.contains(seq.id).then(|| JournalEntry {
        at: window.at().unwrap_or_default(),
        outcome: JournalOutcome::Stored,
    }))
}

/// Records `seq` in its outbox's window; returns where it went and whether it needs a row of
/// its own too (a refusal, whose resend must be refused again; an id too far ahead).
pub(crate) fn record(set: &mut SeenSet, seq: Seq, entry: &JournalEntry) -> (Placed, bool) {
    let window = set.window_for(seq.inc, seq.id);
    let placed = window.insert(seq.id, entry.at);
    let row = placed == Placed::Beyond || entry.outcome != JournalOutcome::Stored;
    if row {
        window.mark_rows();
    }
    (placed, row)
}
