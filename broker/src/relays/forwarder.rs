//! A child's forwarder: sends the queue of device messages to the parent in batches, one in
//! flight, from the head, and forgets what the parent acked (see [`super::uplink`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::Envelope;
use protocol::relay::{BatchAck, UplinkBatch};
use protocol::topic::{self, UpKind};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::uplink::{Link, UplinkSettings};
use crate::store::{Store, StoreError};
use crate::telemetry::CoreStats;

pub(super) struct Forwarder {
    pub(super) settings: UplinkSettings,
    pub(super) store: Arc<dyn Store>,
    pub(super) stats: Arc<CoreStats>,
    pub(super) client: AsyncClient,
    /// Whether it has nothing to send and nothing in flight (a periodic session may end).
    pub(super) idle: watch::Sender<bool>,
}

/// What the forwarder waits for next.
enum Woken {
    Stop,
    Ack(BatchAck),
    /// The connection was made again: what was in flight is sent again.
    Reconnected,
    TimedOut,
}

impl Forwarder {
    pub(super) async fn run(
        self,
        mut acks: mpsc::Receiver<BatchAck>,
        mut up: watch::Receiver<Link>,
        wake: Arc<Notify>,
        stop: CancellationToken,
    ) {
        loop {
            // Connected and subscribed before anything is sent.
            let link = *up.borrow_and_update();
            if !link.up {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = up.changed() => if r.is_err() { return },
                }
                continue;
            }
            let Some(batch) = self.next_batch(&wake, &stop).await else {
                return;
            };
            let Some(last) = batch.items.last().map(|i| i.seq) else {
                continue;
            };
            let first = batch.items[0].seq;
            let count = batch.items.len();
            let payload = match Envelope::new(first, chrono::Utc::now(), batch).to_cbor() {
                Ok(p) => p,
                Err(e) => {
                    error!(relay = %self.settings.relay, error = %e, "could not encode a batch for the parent relay");
                    return;
                }
            };
            let topic = topic::relay_up(&self.settings.relay);
            if let Err(e) = self
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
            {
                warn!(relay = %self.settings.relay, error = %e, "could not queue a batch for the parent relay");
                return;
            }
            debug!(relay = %self.settings.relay, first, last, count, "batch sent to the parent relay");
            let deadline = tokio::time::Instant::now() + self.settings.ack_timeout;
            loop {
                let woken = tokio::select! {
                    _ = stop.cancelled() => Woken::Stop,
                    ack = acks.recv() => ack.map_or(Woken::Stop, Woken::Ack),
                    r = up.changed() => match r {
                        Err(_) => Woken::Stop,
                        // Down, or up again on a new connection: sent again from the head once up.
                        Ok(()) if *up.borrow() != link => Woken::Reconnected,
                        Ok(()) => continue,
                    },
                    _ = tokio::time::sleep_until(deadline) => Woken::TimedOut,
                };
                match woken {
                    Woken::Stop => return,
                    Woken::Ack(ack) => {
                        let done = ack.upto >= last;
                        if !self.acked(ack, &stop).await {
                            return;
                        }
                        if done {
                            break;
                        }
                    }
                    Woken::Reconnected => break,
                    Woken::TimedOut => {
                        warn!(relay = %self.settings.relay, first, last, timeout = ?self.settings.ack_timeout, "the parent relay did not ack a batch in time; sending it again");
                        break;
                    }
                }
            }
        }
    }

    /// The next batch from the head of the queue, once it is full, holds an alarm, or has
    /// waited `delay`; `None` when the uplink stops.
    async fn next_batch(&self, wake: &Notify, stop: &CancellationToken) -> Option<UplinkBatch> {
        let mut deadline = None;
        loop {
            let items = match self.read_head() {
                Ok(items) => items,
                Err(e) => {
                    warn!(relay = %self.settings.relay, error = %e, "could not read the queue for the parent relay; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            let now = tokio::time::Instant::now();
            self.idle
                .send_if_modified(|i| std::mem::replace(i, items.is_empty()) != items.is_empty());
            if !items.is_empty() {
                let full = items.len() >= self.settings.max_items
                    || items.iter().map(|i| i.payload.len()).sum::<usize>() * 10
                        >= self.settings.max_bytes * 9;
                let alarm = items.iter().any(|i| i.up_kind() == Some(UpKind::Alarm));
                let due = *deadline.get_or_insert(now + self.settings.delay);
                if full || alarm || now >= due {
                    return Some(UplinkBatch { items });
                }
            }
            let until = deadline.unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = wake.notified() => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    fn read_head(&self) -> Result<Vec<protocol::relay::UplinkItem>, StoreError> {
        self.store
            .begin()?
            .uplink_after(0, self.settings.max_items, self.settings.max_bytes)
    }

    /// Forgets what the parent committed; `false` when the uplink stops first.
    async fn acked(&self, ack: BatchAck, stop: &CancellationToken) -> bool {
        for r in &ack.refused {
            warn!(relay = %self.settings.relay, serial = %r.serial, seq = r.seq, reason = %r.reason, "the parent relay refused a forwarded message; dropped");
        }
        loop {
            let removed = self.store.begin().and_then(|mut txn| {
                let n = txn.remove_uplink_upto(ack.upto)?;
                txn.commit()?;
                Ok(n)
            });
            match removed {
                Ok(n) => {
                    self.stats.uplink_acked.fetch_add(n, Ordering::Relaxed);
                    debug!(relay = %self.settings.relay, upto = ack.upto, removed = n, "parent relay acked");
                    return true;
                }
                Err(e) => {
                    warn!(relay = %self.settings.relay, error = %e, "could not forget what the parent acked; trying again (a resend would be a duplicate there)");
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}
