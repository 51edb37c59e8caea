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

use protocol::relay::{BatchAck, ChildPresence, RefusedItem, UplinkBatch};
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

/// What a parent knows of a child since it started: for `relays list` and device presence.
#[derive(Debug, Clone, Default)]
pub struct ChildStatus {
    /// Its sessions open now: a reconnect's new session may open before the old one's end is
    /// seen, and that end must not take the new session's devices away.
    sessions: u32,
    /// When its session last opened or closed.
    pub since: Option<Timestamp>,
    pub last_batch: Option<Timestamp>,
    pub items: u64,
    /// Devices it has forwarded messages for.
    pub devices: BTreeSet<Serial>,
    /// Devices with a session open at the child (what it last said), each counted here as one
    /// session of the device.
    pub online: BTreeSet<Serial>,
    /// Devices that were online at the child when its own session was lost.
    pub unreachable: BTreeSet<Serial>,
    /// A whole set arriving in parts, until its last.
    incoming: BTreeSet<Serial>,
}

/// At a parent: which child each device is reached through, for what the parent sends devices
/// (`switch::router_link` copies each `dev/{serial}/…` message to `relay/{child}/down/…`). A
/// device is routed to the child that last said it is online there; a route that changes is
/// reported, so that the device's retained orders follow it to the new child.
#[derive(Debug, Default)]
pub struct ChildRoutes {
    routes: std::sync::RwLock<HashMap<Serial, RelayId>>,
    changed: std::sync::Mutex<Vec<(Serial, RelayId)>>,
    wake: tokio::sync::Notify,
}

impl ChildRoutes {
    /// The child `serial` is reached through, if any.
    pub fn get(&self, serial: &str) -> Option<RelayId> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        // `Serial` borrows as nothing cheaper; a parse is the price of a typed key.
        Serial::parse(serial)
            .ok()
            .and_then(|s| routes.get(&s).cloned())
    }

    fn set(&self, serial: &Serial, relay: &RelayId) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if routes.get(serial) != Some(relay) {
            routes.insert(serial.clone(), relay.clone());
            self.changed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((serial.clone(), relay.clone()));
            self.wake.notify_one();
        }
    }

    /// Routes that changed since the last call (taken), once there is one.
    pub async fn changed(&self) -> Vec<(Serial, RelayId)> {
        loop {
            let taken =
                std::mem::take(&mut *self.changed.lock().unwrap_or_else(|p| p.into_inner()));
            if !taken.is_empty() {
                return taken;
            }
            self.wake.notified().await;
        }
    }
}

impl ChildStatus {
    /// Its own session with this parent is open.
    pub fn connected(&self) -> bool {
        self.sessions > 0
    }
}

/// A session opening or closing at the gateway: a device's, or a child relay's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Device(super::PresenceEvent),
    Relay {
        relay: RelayId,
        online: bool,
    },
    /// The topic filters of a device's persistent MQTT session after they changed (empty: the
    /// device connected with a clean session, and what it had is gone). Recorded on its presence
    /// record, so that a restarted relay can resume the session (`crate::switch::hub`).
    SessionFilters {
        serial: Serial,
        filters: Vec<String>,
    },
}

/// Whether a child hands this kind to its parent without handling it itself.
pub(super) fn parent_answers(core: &Core, kind: UpKind) -> bool {
    matches!(kind, UpKind::Job | UpKind::Merge | UpKind::Fetch)
        && core.relay_settings().forward_to_parent
}

/// At a child: a job update, merge request or firmware fetch, for the parent. A job update or
/// merge is deduplicated and journaled here and acked once it is on the child's disk, as every
/// device message is; a fetch carries no id and gets its chunks from the parent.
pub(super) fn forward_only(
    core: &Core,
    txn: &mut dyn Txn,
    p: &mut Pending,
    kind: UpKind,
    msg: FromDevice<'_>,
    now: Timestamp,
) -> Result<(), StoreError> {
    use protocol::device::{AckOutcome, JobUpdate, MergeRequest};
    let seq = match kind {
        UpKind::Fetch => None,
        UpKind::Job => match device::decode_new::<JobUpdate>(core, txn, p, msg)? {
            Some(env) => Some(env.seq()),
            None => return Ok(()),
        },
        _ => match device::decode_new::<MergeRequest>(core, txn, p, msg)? {
            Some(env) => Some(env.seq()),
            None => return Ok(()),
        },
    };
    txn.push_uplink(msg.serial, kind.as_str(), msg.payload)?;
    core.uplink_queued.store(true, Ordering::Relaxed);
    if let Some(seq) = seq {
        device::record_stored(txn, msg.serial, seq, now)?;
        p.seen.insert(msg.serial.clone());
        p.ack(msg.serial, seq, AckOutcome::Stored);
    }
    Ok(())
}

impl Core {
    /// Records sessions opening and closing: a device's as its presence; a child relay's
    /// closing as the loss of every device it had online (they become `unreachable`).
    pub fn session_events(
        &self,
        events: Vec<SessionEvent>,
        now: Timestamp,
    ) -> Result<Vec<Outbound>, StoreError> {
        let mut devices = Vec::with_capacity(events.len());
        let mut sessions = Vec::new();
        for e in events {
            match e {
                SessionEvent::Device(d) => devices.push(d),
                SessionEvent::Relay { relay, online } => {
                    devices.extend(self.child_session(&relay, online, now))
                }
                SessionEvent::SessionFilters { serial, filters } => {
                    sessions.push((serial, filters))
                }
            }
        }
        self.presence_and_sessions(devices, sessions, now)
    }

    /// A child's own session opened or closed; the device sessions it takes away with it.
    fn child_session(
        &self,
        relay: &RelayId,
        online: bool,
        now: Timestamp,
    ) -> Vec<super::PresenceEvent> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let child = children.entry(relay.clone()).or_default();
        let was = child.connected();
        if online {
            child.sessions += 1;
        } else {
            child.sessions = child.sessions.saturating_sub(1);
        }
        let connected = child.connected();
        if connected == was {
            return Vec::new(); // an older session's end after a newer one began
        }
        child.since = Some(now);
        if connected {
            tracing::info!(relay = %relay, "child relay connected");
            // What the parent sends the child as a device (its own jobs, the chunks of its new
            // program) goes down its own session.
            if let Ok(own) = Serial::parse(relay.as_str()) {
                self.routes.set(&own, relay);
            }
            return Vec::new();
        }
        let lost = std::mem::take(&mut child.online);
        warn!(relay = %relay, devices = lost.len(), "child relay disconnected; its devices are unreachable until it is back");
        child.unreachable.extend(lost.iter().cloned());
        lost.into_iter()
            .map(|serial| super::PresenceEvent {
                serial,
                online: false,
            })
            .collect()
    }

    /// A child's word on which of its devices are online; returns the presence events it makes
    /// (each device online at a child counts as one session of it) and the devices whose view
    /// changes without one (unreachable before, offline now).
    pub(super) fn child_presence(
        &self,
        relay: &RelayId,
        payload: &[u8],
    ) -> (Vec<super::PresenceEvent>, Vec<Serial>) {
        let settings = self.relay_settings();
        let msg = match Envelope::<ChildPresence>::from_cbor(payload, MAX_BATCH_BYTES) {
            Ok(env) => env.body,
            Err(e) => {
                warn!(relay = %relay, error = %e, "unreadable presence from a child relay");
                return (Vec::new(), Vec::new());
            }
        };
        let allowed = |s: &Serial| settings.assignments.allows(relay, s);
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let child = children.entry(relay.clone()).or_default();
        let mut events = Vec::new();
        let mut refresh = Vec::new();
        let went = |serial: &Serial, online| super::PresenceEvent {
            serial: serial.clone(),
            online,
        };
        if msg.full {
            if msg.first {
                child.incoming.clear();
            }
            child
                .incoming
                .extend(msg.online.into_iter().filter(allowed));
            if !msg.last {
                return (events, refresh);
            }
            let now_online = std::mem::take(&mut child.incoming);
            for s in &now_online {
                self.routes.set(s, relay);
            }
            events.extend(child.online.difference(&now_online).map(|s| went(s, false)));
            events.extend(now_online.difference(&child.online).map(|s| went(s, true)));
            refresh.extend(child.unreachable.difference(&now_online).cloned());
            child.unreachable.clear();
            child.online = now_online;
        } else {
            for s in msg.online.iter().filter(|s| allowed(s)) {
                child.unreachable.remove(s);
                self.routes.set(s, relay);
                if child.online.insert(s.clone()) {
                    events.push(went(s, true));
                }
            }
            for s in &msg.offline {
                if child.online.remove(s) {
                    events.push(went(s, false));
                }
            }
        }
        (events, refresh)
    }

    /// [`Core::child_presence`], recorded: the presence events, and the views of devices that
    /// went from unreachable to offline.
    pub(super) fn child_presence_recorded(
        &self,
        relay: &RelayId,
        payload: &[u8],
        now: Timestamp,
    ) -> Result<Vec<Outbound>, StoreError> {
        let (events, refresh) = self.child_presence(relay, payload);
        let mut out = self.presence_events(events, now)?;
        if !refresh.is_empty() && self.storage_writable() {
            let changed: Vec<(Serial, bool)> = refresh.into_iter().map(|s| (s, false)).collect();
            out.extend(self.record_presence(&changed, &[], now)?);
        }
        Ok(out)
    }

    /// At a child: its devices' presence changes not yet told to the parent (taken).
    pub fn take_presence_deltas(&self) -> Vec<(Serial, bool)> {
        std::mem::take(
            &mut *self
                .presence_deltas
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Devices with a session open here now.
    pub fn online_devices(&self) -> Vec<Serial> {
        self.alerts
            .online
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every configured child, then any other that connected, for `relays list`.
    pub fn relay_views(&self) -> Vec<protocol::relay::RelayView> {
        let settings = self.relay_settings();
        let children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let view = |id: &RelayId, configured: bool, serials: Vec<String>| {
            let c = children.get(id).cloned().unwrap_or_default();
            protocol::relay::RelayView {
                id: id.to_string(),
                configured,
                serials,
                connected: c.connected(),
                since: c.since,
                devices_online: c.online.len() as u64,
                devices_unreachable: c.unreachable.len() as u64,
                devices_served: c.devices.len() as u64,
                forwarded: c.items,
                last_batch: c.last_batch,
            }
        };
        let mut out: Vec<_> = settings
            .assignments
            .entries()
            .map(|(id, serials)| view(id, true, serials))
            .collect();
        let mut others: Vec<&RelayId> = children
            .keys()
            .filter(|id| !settings.assignments.knows(id))
            .collect();
        others.sort();
        out.extend(others.into_iter().map(|id| view(id, false, Vec::new())));
        out
    }

    /// The child relay `serial` is online at (`true`) or was when that child's own session was
    /// lost (`false`).
    pub(super) fn child_of(&self, serial: &Serial) -> Option<(RelayId, bool)> {
        let children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        // Online at one child wins over unreachable at another (a device that failed over).
        let online = children
            .iter()
            .find(|(_, c)| c.online.contains(serial))
            .map(|(id, _)| (id.clone(), true));
        online.or_else(|| {
            children
                .iter()
                .find(|(_, c)| c.unreachable.contains(serial))
                .map(|(id, _)| (id.clone(), false))
        })
    }

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

    /// Sends what `serial` gets through child `via` from now on (a job pinned with `--via`).
    pub(super) fn route_through(&self, serial: &Serial, via: &RelayId) {
        self.routes.set(serial, via);
    }

    /// Set when an alarm is queued for the parent (taken by a periodic child's uplink).
    pub fn uplink_alarm(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.uplink_alarm.clone()
    }

    /// Which child each device is reached through (at a parent).
    pub fn child_routes(&self) -> Arc<ChildRoutes> {
        self.routes.clone()
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

/// The kind of uplink item that says a job's order is on the child's disk (its payload: the job
/// id).
pub const FORWARDED: &str = "forwarded";

/// At a parent: child `relay` has job `payload` (its id) of `serial` on its disk.
fn job_forwarded(
    txn: &mut dyn Txn,
    p: &mut Pending,
    relay: &RelayId,
    serial: &Serial,
    payload: &[u8],
    now: Timestamp,
) -> Result<(), StoreError> {
    let Some(job) = std::str::from_utf8(payload)
        .ok()
        .and_then(|j| protocol::JobId::parse(j).ok())
    else {
        warn!(relay = %relay, serial = %serial, "a child relay said it has a job whose id is not one; ignored");
        return Ok(());
    };
    if let Some(n) = crate::jobs::mark_forwarded(txn, job.as_str(), serial, relay.as_str(), now)? {
        p.views.insert(n);
        p.done.push(super::Done::JobUpdate {
            serial: serial.clone(),
            job,
            status: protocol::job::JobStatus::Forwarded,
        });
    }
    Ok(())
}

/// At a child: queues a message the core just stored for the parent, if it is one a child
/// forwards.
pub(super) fn forward(
    core: &Core,
    txn: &mut dyn Txn,
    kind: UpKind,
    msg: FromDevice<'_>,
) -> Result<(), StoreError> {
    // Every kind is forwarded; job updates, merges and fetches never get here at a child (the
    // parent answers them: `forward_only`).
    if core.relay_settings().forward_to_parent {
        txn.push_uplink(msg.serial, kind.as_str(), msg.payload)?;
        core.uplink_queued.store(true, Ordering::Relaxed);
        if kind == UpKind::Alarm {
            core.uplink_alarm.store(true, Ordering::Relaxed);
        }
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
    core.telemetry()
        .relay_batches
        .fetch_add(1, Ordering::Relaxed);
    let serials: Vec<&str> = env.body.items.iter().map(|i| i.serial.as_str()).collect();
    txn.warm_devices(&serials)?;
    let mut refused = Vec::new();
    let mut upto = 0;
    let mut served = BTreeSet::new();
    for item in &env.body.items {
        upto = upto.max(item.seq);
        // `Ok(None)`: the child has a job's order on its disk; `Ok(Some(kind))`: a device message.
        let what = if !settings.assignments.allows(relay, &item.serial) {
            Err(format!(
                "relay {relay} may not speak for device {} (not in its [[relays]] serials at the parent)",
                item.serial
            ))
        } else if item.kind == FORWARDED {
            Ok(None)
        } else {
            item.up_kind().map(Some).ok_or_else(|| {
                format!(
                    "a child relay does not forward {:?} messages",
                    protocol::Shown(&item.kind)
                )
            })
        };
        let kind = match what {
            Ok(Some(kind)) => kind,
            Ok(None) => {
                job_forwarded(txn, p, relay, &item.serial, &item.payload, now)?;
                continue;
            }
            Err(reason) => {
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
        };
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
