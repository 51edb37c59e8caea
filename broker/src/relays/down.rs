//! What the parent sends down to a child (`relay/{id}/down/dev/…`) for the child's devices:
//! orders and merged data, kept on its disk before they go to its hub. What it sends for the
//! child itself goes to [`super::own`].

use protocol::RelayId;
use tokio::sync::Notify;
use tracing::warn;

use super::own::OwnMessage;
use crate::store::Store;

/// What the parent sent for this child itself (`dev/{id}/…`): its job orders and the chunks of
/// a program it fetches. `None` for a device's topic.
pub(super) fn for_this_relay(
    relay: &RelayId,
    dev_topic: &str,
    payload: &[u8],
) -> Option<Option<OwnMessage>> {
    let mut levels = dev_topic.split('/');
    if levels.next() != Some("dev") || levels.next() != Some(relay.as_str()) {
        return None;
    }
    Some(match (levels.next(), levels.next()) {
        (Some("jobs"), Some(job)) => Some(OwnMessage::Order {
            job: job.to_owned(),
            payload: payload.to_vec(),
        }),
        (Some("blob"), Some(_)) => Some(OwnMessage::Chunk(payload.to_vec())),
        _ => None,
    })
}

/// Keeps an order or merged data the parent sent a device on this child's disk, and tells the
/// parent (through the queue) that a new job order is here: the job is `forwarded` (Fig. 8,
/// S508). Failing to keep it is logged; the device gets it anyway.
pub(super) fn keep(
    store: &dyn Store,
    relay: &RelayId,
    dev_topic: &str,
    payload: &[u8],
    wake: &Notify,
) {
    let mut levels = dev_topic.split('/');
    let (Some("dev"), Some(serial), Some(kind)) = (levels.next(), levels.next(), levels.next())
    else {
        return;
    };
    if !matches!(kind, "jobs" | "merged") {
        return;
    }
    let job = levels.next().unwrap_or_default();
    let kept = store.begin().and_then(|mut txn| {
        if payload.is_empty() {
            txn.remove_mirrored(dev_topic)?;
        } else if txn.put_mirrored(dev_topic, payload)?
            && kind == "jobs"
            && let Ok(serial) = protocol::Serial::parse(serial)
        {
            txn.push_uplink(&serial, crate::core::relay::FORWARDED, job.as_bytes())?;
        }
        txn.commit()
    });
    match kept {
        Ok(_) => wake.notify_one(),
        Err(e) => {
            warn!(relay = %relay, topic = %protocol::Shown(dev_topic), error = %e, "could not keep an order from the parent relay on disk")
        }
    }
}
