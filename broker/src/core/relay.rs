//! Both ends of a child relay, as far as the core goes.
//!
//! At a child: every device message it stores and forwards is also queued for the parent, in the
//! same transaction ([`forward`]); the uplink (`relays::uplink`) sends the queue.
//!
//! At a parent: `relay/{id}/up/batch` ([`handle_batch`]). Each item is what a device sent its
//! child, and goes through the device path ([`super::device::handle`]) as if the device had sent
//! it here: decoded, checked, deduplicated by the device's own message id, stored. The child's
//! ack names the last item after the commit; an item the parent will never take (a serial the
//! child is not assigned, a kind a child does not forward) is listed as refused, so the child
//! logs and drops it instead of resending it forever.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use protocol::relay::{BatchAck, RefusedItem, UplinkBatch};
use protocol::topic::{self, UpKind};
use protocol::{Envelope, RelayId, Serial, Timestamp};
use tracing::warn;

use super::device::{self, FromDevice};
use super::{CORE_LOG_PER_SECOND, Core, Outbound, Pending};
use crate::log_budget::LogBudget;
use crate::relays::Assignments;
use crate::store::{StoreError, Txn};

/// The largest batch a parent decodes; the gateway's `max_packet_bytes` bounds it first.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// What the core does as a child and as a parent.
#[derive(Debug, Default)]
pub struct RelaySettings {
    /// This relay is a child with a parent: queue what its devices send for the parent.
    pub forward_to_parent: bool,
    /// As a parent: which child may speak for which serial.
    pub assignments: Assignments,
}

/// What a parent knows of a child since it started: for `relays list`.
#[derive(Debug, Clone, Default)]
pub struct ChildStatus {
    pub last_batch: Option<Timestamp>,
    pub items: u64,
    /// Devices it has forwarded messages for.
    pub devices: BTreeSet<Serial>,
}

/// The kinds a child forwards. Job updates and merges name the child's own jobs; fetches are
/// answered by the child itself.
pub fn forwarded(kind: UpKind) -> bool {
    matches!(kind, UpKind::State | UpKind::Alarm | UpKind::Counters)
}

impl Core {
    /// Sets what the core does as a child and as a parent (at start, and on a reload).
    pub fn configure_relays(&self, settings: RelaySettings) {
        *self.relays.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
    }

    pub(super) fn relay_settings(&self) -> Arc<RelaySettings> {
        self.relays
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What a child's uplink waits on: notified after a commit that queued something for the
    /// parent.
    pub fn uplink_wake(&self) -> Arc<tokio::sync::Notify> {
        self.uplink_wake.clone()
    }

    /// Every child this parent has heard from since it started, by id.
    pub fn children(&self) -> HashMap<RelayId, ChildStatus> {
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// At a child: queues a message the core just stored for the parent, if it is one a child
/// forwards.
pub(super) fn forward(
    core: &Core,
    txn: &mut dyn Txn,
    kind: UpKind,
    msg: FromDevice<'_>,
) -> Result<(), StoreError> {
    if forwarded(kind) && core.relay_settings().forward_to_parent {
        txn.push_uplink(msg.serial, kind, msg.payload)?;
        core.uplink_queued.store(true, Ordering::Relaxed);
    }
    Ok(())
}

/// At a parent: one batch from child `relay`.
pub(super) fn handle_batch(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    relay: &RelayId,
    payload: &[u8],
    now: Timestamp,
) -> Result<(), StoreError> {
    static BUDGET: LogBudget = LogBudget::per_second(CORE_LOG_PER_SECOND);
    let settings = core.relay_settings();
    let env = match Envelope::<UplinkBatch>::from_cbor(payload, MAX_BATCH_BYTES) {
        Ok(env) => env,
        Err(e) => {
            if let Some(suppressed) = BUDGET.check() {
                warn!(relay = %relay, error = %e, suppressed, "refused a child relay's batch it cannot read; not acked");
            }
            return Ok(());
        }
    };
    if !settings.assignments.knows(relay) {
        // Not acked: the child keeps its messages until this parent's [[relays]] names it.
        core.telemetry()
            .relay_items_refused
            .fetch_add(env.body.items.len() as u64, Ordering::Relaxed);
        if let Some(suppressed) = BUDGET.check() {
            warn!(relay = %relay, items = env.body.items.len(), suppressed, "a relay not in this parent's [[relays]] sent a batch; not acked (add it to [[relays]] and reload)");
        }
        return Ok(());
    }
    let mut refused = Vec::new();
    let mut upto = 0;
    let mut served = BTreeSet::new();
    for item in &env.body.items {
        upto = upto.max(item.seq);
        let why = match item.up_kind() {
            _ if !settings.assignments.allows(relay, &item.serial) => Some(format!(
                "relay {relay} may not speak for device {} (not in its [[relays]] serials at the parent)",
                item.serial
            )),
            Some(kind) if forwarded(kind) => None,
            _ => Some(format!(
                "a child relay does not forward {:?} messages",
                protocol::Shown(&item.kind)
            )),
        };
        if let Some(reason) = why {
            core.telemetry()
                .relay_items_refused
                .fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = BUDGET.check() {
                warn!(relay = %relay, serial = %item.serial, kind = %protocol::Shown(&item.kind), reason, suppressed, "refused a message a child relay forwarded");
            }
            refused.push(RefusedItem {
                seq: item.seq,
                serial: item.serial.clone(),
                reason,
            });
            continue;
        }
        let Some(kind) = item.up_kind() else { continue };
        let topic = topic::dev_up(&item.serial, kind);
        device::handle(
            core,
            txn,
            p,
            kind,
            FromDevice {
                serial: &item.serial,
                topic: &topic,
                payload: &item.payload,
            },
            now,
        )?;
        served.insert(item.serial.clone());
        core.telemetry()
            .relay_items_stored
            .fetch_add(1, Ordering::Relaxed);
    }
    {
        let mut children = core.children.lock().unwrap_or_else(|p| p.into_inner());
        let child = children.entry(relay.clone()).or_default();
        child.last_batch = Some(now);
        child.items += env.body.items.len() as u64;
        child.devices.extend(served);
    }
    let ack = Envelope::new(env.id, now, BatchAck { upto, refused });
    match ack.to_cbor() {
        Ok(payload) => p.replies.push(Outbound {
            topic: topic::relay_ack(relay),
            payload,
            retain: false,
        }),
        Err(e) => {
            warn!(relay = %relay, error = %e, "could not encode a batch ack; the child resends")
        }
    }
    Ok(())
}
