//! `dev/{serial}/up/{kind}`: what devices send. Every message that carries a readable msg id is
//! answered on `dev/{serial}/ack` once the batch has committed (claims 13–14, DESIGN D3).

use protocol::device::{AckOutcome, DeviceState, JobUpdate};
use protocol::topic::UpKind;
use protocol::{Envelope, Identity, MsgId, Serial, Timestamp};
use tracing::{debug, error, info, warn};

use super::{Core, Pending};
use crate::jobs::{self, UpdateOutcome};
use crate::store::{DeviceRecord, JournalEntry, JournalOutcome, StoreError, Txn};

enum Message {
    Job(JobUpdate),
    State(DeviceState),
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
pub(super) fn handle(
    core: &Core,
    txn: &mut Txn,
    p: &mut Pending,
    serial: &Serial,
    kind: UpKind,
    topic: &str,
    payload: &[u8],
    now: Timestamp,
) -> Result<(), StoreError> {
    let max = core.settings.max_payload_bytes;
    let decoded = match kind {
        UpKind::Job => {
            Envelope::<JobUpdate>::from_cbor(payload, max).map(|e| (e.id, Message::Job(e.body)))
        }
        UpKind::State => {
            Envelope::<DeviceState>::from_cbor(payload, max).map(|e| (e.id, Message::State(e.body)))
        }
    };
    let (id, message) = match decoded {
        Ok(d) => d,
        Err(e) => {
            let reason = e.to_string();
            warn!(serial = %serial, topic, reason = %reason, "refused device message");
            // Acked as rejected so the device stops resending something that will never pass.
            if let Some(id) = Envelope::peek_id(payload) {
                p.ack(serial, id, AckOutcome::Rejected { reason });
            }
            return Ok(());
        }
    };
    match store(txn, p, serial, id, message, topic, now) {
        Ok(outcome) => {
            p.seen.insert(serial.clone());
            p.ack(serial, id, outcome);
            Ok(())
        }
        Err(e) if e.is_corrupt_record() => {
            // Nothing of this message was written (see `jobs`); no ack, so the device resends it
            // later, perhaps after the record has been repaired.
            error!(serial = %serial, topic, msg_id = id, error = %e, "cannot handle device message: a store record is corrupt");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Dedupes, applies and journals one decoded message; returns the ack's outcome.
fn store(
    txn: &mut Txn,
    p: &mut Pending,
    serial: &Serial,
    id: MsgId,
    message: Message,
    topic: &str,
    now: Timestamp,
) -> Result<AckOutcome, StoreError> {
    let sender = Identity::device(serial).to_string();
    if txn.journal(&sender, id)?.is_some() {
        debug!(serial = %serial, msg_id = id, "duplicate device message");
        return Ok(AckOutcome::Duplicate);
    }
    let outcome = match message {
        Message::Job(update) => job_update(txn, p, serial, &update, topic, now)?,
        Message::State(state) => state_update(txn, p, serial, state, now)?,
    };
    if outcome == AckOutcome::Stored {
        txn.put_journal(
            &sender,
            id,
            &JournalEntry {
                at: now,
                outcome: JournalOutcome::Stored,
            },
        )?;
    }
    Ok(outcome)
}

fn job_update(
    txn: &mut Txn,
    p: &mut Pending,
    serial: &Serial,
    update: &JobUpdate,
    topic: &str,
    now: Timestamp,
) -> Result<AckOutcome, StoreError> {
    match jobs::apply_update(txn, serial, update, now)? {
        UpdateOutcome::Applied {
            n,
            job,
            status,
            ended,
        } => {
            p.applied.push((serial.clone(), job, status));
            p.views.insert(n);
            if ended {
                p.ended.insert(n);
            }
            Ok(AckOutcome::Stored)
        }
        UpdateOutcome::Unchanged { .. } => {
            debug!(serial = %serial, job = %update.job, status = %update.status, "job update changes nothing");
            Ok(AckOutcome::Stored)
        }
        UpdateOutcome::Refused(reason) => {
            warn!(serial = %serial, topic, reason = %reason, "refused device message");
            Ok(AckOutcome::Rejected { reason })
        }
    }
}

fn state_update(
    txn: &mut Txn,
    p: &mut Pending,
    serial: &Serial,
    state: DeviceState,
    now: Timestamp,
) -> Result<AckOutcome, StoreError> {
    // fill_site reads before it writes, and put_device only writes: nothing half-done on a corrupt job.
    let filled = jobs::fill_site(txn, serial, &state.site, now)?;
    info!(serial = %serial, site = %state.site, model = %state.model, firmware = %state.firmware, "device state stored");
    txn.put_device(
        serial,
        &DeviceRecord {
            state,
            last_seen: now,
        },
    )?;
    p.views.extend(filled);
    p.states.insert(serial.clone());
    Ok(AckOutcome::Stored)
}
