//! Attaches the job core to the router as one more local link (docs/decisions.md, D1): the core
//! hears what hosts publish, and its replies and retained views go out through the router like
//! anyone else's messages. Devices use the hub instead, both ways (see [`attach`]; D7). The core
//! itself never sees a socket, so an uplink to a parent relay can later be one more source of
//! `Inbound`.

use std::sync::Arc;

use rumqttd::Broker;
use rumqttd::local::{LinkRx, LinkTx};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use super::hub::Hub;
use crate::core::relay::ChildRoutes;
use crate::core::{Inbound, Outbound, Outlet, OutletClosed};
use crate::router;

/// The core's client id in the router. A space is not allowed in any certificate id, so no
/// client can take this session over.
const CORE_CLIENT_ID: &str = "chukei core";

#[derive(Debug, thiserror::Error)]
pub enum CoreLinkError {
    /// Boxed: rumqttd's error carries a whole router event (over 800 bytes).
    #[error("could not attach the core to the router: {0}")]
    Link(Box<rumqttd::local::LinkError>),
    #[error("the router thread is gone")]
    RouterGone,
}

impl From<rumqttd::local::LinkError> for CoreLinkError {
    fn from(e: rumqttd::local::LinkError) -> Self {
        CoreLinkError::Link(Box::new(e))
    }
}

impl From<Box<rumqttd::local::LinkError>> for CoreLinkError {
    fn from(e: Box<rumqttd::local::LinkError>) -> Self {
        CoreLinkError::Link(e)
    }
}

/// Messages waiting for the core, from the hub and the router together. Its group commit takes
/// up to `core::run::MAX_BATCH` at once; a full queue makes the senders wait.
pub const INBOUND_QUEUE: usize = 4096;

/// Attaches the core, subscribes it, and publishes `retained` (rebuilt from the store) before
/// returning. The router handles events in order, so these retained messages are in place before
/// any client the gateway admits later can subscribe. What the router forwards the core goes
/// into `inbound`.
///
/// Devices never reach the core through the router (the hub hands their
/// publishes to `inbound` itself), and what the core sends devices (`dev/…`) goes to the hub
/// directly: no one but the device itself may subscribe there (the ACL), and skipping the router
/// saves two thread hand-offs each way (bench/RESULTS.md).
#[allow(clippy::too_many_arguments)] // each is one route of the switch
pub async fn attach(
    broker: Arc<Broker>,
    hub: Arc<Hub>,
    routes: Arc<ChildRoutes>,
    retained: Vec<Outbound>,
    inbound: mpsc::Sender<Inbound>,
    bus: Option<mpsc::Sender<Outbound>>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Result<CoreOutlet, CoreLinkError> {
    let (mut tx, rx) =
        tokio::task::spawn_blocking(move || broker.link(CORE_CLIENT_ID).map_err(Box::new))
            .await
            .map_err(|_| CoreLinkError::RouterGone)??;
    tx.subscribe(protocol::topic::ALL_HOST_REQ)?;
    tx.subscribe(protocol::topic::ALL_RELAY_UP)?;
    let (out_tx, out_rx) = mpsc::channel(4096);
    let outlet = CoreOutlet {
        hub,
        router: out_tx,
        routes,
        bus,
    };
    let mut out = RouterOut {
        tx,
        retained: RetainedDigests::default(),
    };
    out.send(outlet.deliver_to_devices(retained)).await?;
    tracker.spawn(outlet.clone().follow_routes(stop.clone()));
    tracker.spawn(pump_in(rx, inbound, stop.clone()));
    tracker.spawn(pump_out(out, out_rx, stop));
    Ok(outlet)
}

/// Where the core sends what it publishes after a commit.
#[derive(Clone)]
pub struct CoreOutlet {
    hub: Arc<Hub>,
    router: mpsc::Sender<Outbound>,
    /// Devices reached through a child relay: what they get is copied to the child.
    routes: Arc<ChildRoutes>,
    /// In a cluster: what other nodes' sessions may need goes to the bus too.
    bus: Option<mpsc::Sender<Outbound>>,
}

impl CoreOutlet {
    /// Hands what devices get (`dev/…`) to the hub at once, from whatever thread commits, and
    /// returns the rest, in order, for the router: with a copy on `relay/{child}/down/…` of
    /// what a device reached through a child gets (not its acks: the child acked it already).
    pub fn deliver_to_devices(&self, batch: Vec<Outbound>) -> Vec<Outbound> {
        let hub = &self.hub;
        let mut rest = Vec::new();
        for out in batch {
            if protocol::topic::is_device_topic(&out.topic) {
                if let Some((relay, retain)) = self.child_of(&out.topic) {
                    rest.push(Outbound {
                        topic: protocol::topic::relay_down(&relay, &out.topic),
                        payload: out.payload.clone(),
                        retain,
                    });
                }
                hub.deliver(&out.topic, out.payload);
            } else {
                rest.push(out);
            }
        }
        rest
    }

    /// Every retained device topic the hub holds (job orders and merged data).
    pub fn retained_device_topics(&self) -> std::collections::HashSet<String> {
        self.hub.retained_topics()
    }

    /// Where what the router should publish is queued (in order with the core's own).
    pub fn router_queue(&self) -> mpsc::Sender<Outbound> {
        self.router.clone()
    }

    /// The child a device topic goes through, and whether the copy is retained (job orders
    /// and merged data, as in the hub).
    fn child_of(&self, topic: &str) -> Option<(protocol::RelayId, bool)> {
        let mut levels = topic.split('/');
        let (Some("dev"), Some(serial), Some(kind)) = (levels.next(), levels.next(), levels.next())
        else {
            return None;
        };
        if kind == "ack" {
            return None;
        }
        let relay = self.routes.get(serial)?;
        Some((relay, matches!(kind, "jobs" | "merged")))
    }

    /// When a device's route moves to a child, its retained orders and merged data follow it.
    async fn follow_routes(self, stop: CancellationToken) {
        loop {
            let changed = tokio::select! {
                () = stop.cancelled() => return,
                c = self.routes.changed() => c,
            };
            for (serial, relay) in changed {
                for (topic, payload) in self.hub.retained_of(serial.as_str()) {
                    let out = Outbound {
                        topic: protocol::topic::relay_down(&relay, &topic),
                        payload: payload.to_vec(),
                        retain: true,
                    };
                    if self.router.send(out).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

impl Outlet for CoreOutlet {
    /// What devices get goes to the hub at once; the rest queues for the router, in order.
    async fn publish(&self, batch: Vec<Outbound>) -> Result<(), OutletClosed> {
        if let Some(bus) = &self.bus {
            for out in batch.iter().filter(|o| super::bus::crosses_nodes(&o.topic)) {
                if bus.try_send(out.clone()).is_err() {
                    // The database has it; the other nodes catch up when they reconnect.
                    tracing::debug!(topic = %protocol::Shown(&out.topic), "cluster bus queue full; a publication skipped it");
                }
            }
        }
        for out in self.deliver_to_devices(batch) {
            self.router.send(out).await.map_err(|_| OutletClosed)?;
        }
        Ok(())
    }
}

/// The core's router link: what is left once [`CoreOutlet::deliver_to_devices`] has taken what
/// devices get.
struct RouterOut {
    tx: LinkTx,
    retained: RetainedDigests,
}

impl RouterOut {
    /// Sends a batch in order, with one router notification for all of it.
    async fn send(&mut self, batch: Vec<Outbound>) -> Result<(), rumqttd::local::LinkError> {
        let mut last = None;
        for out in batch {
            if out.retain && self.retained.is_repeat(&out.topic, &out.payload) {
                continue;
            }
            let publish = router::publish(&out.topic, out.payload, out.retain);
            if let Some(previous) = last.replace(publish) {
                self.tx.buffer().push_back(previous);
            }
        }
        if let Some(last) = last {
            self.tx.send(last).await?;
        }
        Ok(())
    }
}

/// A digest of each retained message the core has put in the router, by topic, so that one
/// published again unchanged is not: the router would keep the same message and send it to
/// every subscriber once more. A cluster node catching up from the database republishes every
/// view, nearly all of them unchanged; integrators then get only what changed. The core is the
/// only publisher of retained messages in the router (the ACL lets no client retain there), so
/// what is recorded here is what the router holds. 16 bytes a topic the router retains, not
/// the payloads; the digests are keyed at random per process, so no one can pick a serial or a
/// payload whose digest matches another's.
#[derive(Default)]
struct RetainedDigests {
    by_topic: std::collections::HashMap<u64, u64>,
    keys: std::hash::RandomState,
}

impl RetainedDigests {
    /// Whether `payload` is what `topic` already holds; records it otherwise. An empty payload
    /// (which deletes the retained message) always goes on.
    fn is_repeat(&mut self, topic: &str, payload: &[u8]) -> bool {
        use std::hash::BuildHasher;
        let topic = self.keys.hash_one(topic.as_bytes());
        if payload.is_empty() {
            self.by_topic.remove(&topic);
            return false;
        }
        let payload = self.keys.hash_one(payload);
        self.by_topic.insert(topic, payload) == Some(payload)
    }
}

/// Most messages the core's outlet takes at once.
const OUT_BATCH: usize = 512;

/// Router → core: every publish the core is subscribed to.
async fn pump_in(mut rx: LinkRx, inbound: mpsc::Sender<Inbound>, stop: CancellationToken) {
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            n = router::next_forward(&mut rx) => n,
        };
        match next {
            Ok(publish) => {
                let msg = Inbound {
                    topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                    payload: publish.payload,
                };
                if inbound.send(msg).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if !stop.is_cancelled() {
                    error!(error = %e, "core link closed by the router");
                }
                return;
            }
        }
    }
}

/// Core → router: host replies, fleet views and their mirrors, in the order the core
/// produced them.
async fn pump_out(
    mut out: RouterOut,
    mut outbound: mpsc::Receiver<Outbound>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(OUT_BATCH);
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return,
            n = outbound.recv_many(&mut batch, OUT_BATCH) => n,
        };
        if received == 0 {
            return;
        }
        if let Err(e) = out.send(std::mem::take(&mut batch)).await {
            warn!(error = %e, "could not publish into the router");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Outlet;

    fn view(topic: &str, payload: &[u8]) -> Outbound {
        Outbound {
            topic: topic.into(),
            payload: payload.to_vec(),
            retain: true,
        }
    }

    /// Through a real router: an integrator subscribed to `fleet/#` gets a view once however
    /// often the core publishes it unchanged, then each change.
    #[tokio::test]
    async fn an_integrator_gets_a_view_published_again_unchanged_once() {
        let broker = crate::router::start(16);
        let (inbound, _keep) = mpsc::channel(16);
        let hub = Arc::new(Hub::new(inbound.clone(), 16));
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let outlet = attach(
            broker.clone(),
            hub,
            Arc::default(),
            Vec::new(),
            inbound,
            None,
            &tasks,
            stop.clone(),
        )
        .await
        .unwrap();
        let (mut tx, mut rx) =
            tokio::task::spawn_blocking(move || broker.link("integrator").map_err(Box::new))
                .await
                .unwrap()
                .unwrap();
        tx.subscribe("fleet/#").unwrap();
        // The subscription in place before the first view: a view published while the router
        // is still taking the subscription reached it twice in one CI run, once routed and once
        // as the new subscription's retained message (rumqttd's own race, not the digests').
        tokio::time::timeout(std::time::Duration::from_secs(20), async {
            loop {
                match rx.next().await.unwrap() {
                    // The link publishes nothing, so its one ack is the subscription's.
                    Some(rumqttd::Notification::DeviceAck(_)) => break,
                    Some(rumqttd::Notification::Unschedule) => rx.wake().await.unwrap(),
                    _ => {}
                }
            }
        })
        .await
        .expect("the subscription acked in time");
        let next = async |rx: &mut LinkRx| {
            let p =
                tokio::time::timeout(std::time::Duration::from_secs(20), router::next_forward(rx))
                    .await
                    .expect("a message in time")
                    .unwrap();
            (
                String::from_utf8_lossy(&p.topic).into_owned(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )
        };
        outlet
            .publish(vec![view("fleet/C1/state", b"a")])
            .await
            .unwrap();
        assert_eq!(next(&mut rx).await, ("fleet/C1/state".into(), "a".into()));

        outlet
            .publish(vec![
                view("fleet/C1/state", b"a"),
                view("fleet/C1/state", b"b"),
                view("fleet/C1/state", b"b"),
                view("fleet/C2/state", b"a"),
            ])
            .await
            .unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(next(&mut rx).await);
        }
        assert_eq!(
            got,
            [
                ("fleet/C1/state".into(), "b".into()),
                ("fleet/C2/state".into(), "a".into())
            ]
        );
        stop.cancel();
    }

    #[test]
    fn a_retained_message_published_again_unchanged_is_a_repeat_until_it_changes_or_is_deleted() {
        let mut digests = RetainedDigests::default();
        let topic = "fleet/C1/state";
        assert!(!digests.is_repeat(topic, b"online"));
        assert!(digests.is_repeat(topic, b"online"));
        assert!(
            !digests.is_repeat("fleet/C2/state", b"online"),
            "another topic"
        );
        assert!(!digests.is_repeat(topic, b"offline"));
        assert!(!digests.is_repeat(topic, b""), "a deletion always goes on");
        assert!(!digests.is_repeat(topic, b""));
        assert!(
            !digests.is_repeat(topic, b"offline"),
            "after a deletion the message is new again"
        );
    }
}
