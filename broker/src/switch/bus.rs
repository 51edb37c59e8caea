//! The bus between cluster nodes (`--cluster-bus nats://…`): NATS core pub/sub.
//!
//! Every node commits to the one PostgreSQL database; what its core publishes after a commit —
//! job orders and merged data for devices, the views of `fleet/…` and `json/fleet/…` — reaches
//! only its own sessions through its hub and router. The bus carries those publications to the
//! other nodes, which hand them to their own hub (a device connected there gets its order) and
//! router (hosts and integrators connected there see the view). Acks, firmware chunks and host
//! replies answer a message the node itself received, so they stay local.
//!
//! The bus carries no truth: a publication lost on it (a server down, a node reconnecting) is
//! made again from the database — every retained order and view — when the node's connection to
//! the bus comes back ([`run`]), as at a node's start.

use std::sync::Arc;

use async_nats::HeaderMap;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::router_link::CoreOutlet;
use crate::core::{Core, Outbound};

/// The one subject the nodes publish on.
const SUBJECT: &str = "chukei.out";
/// Headers: the node that published, the MQTT topic, whether it is retained.
const ORIGIN: &str = "Chukei-Origin";
const TOPIC: &str = "Chukei-Topic";
const RETAIN: &str = "Chukei-Retain";

/// Publications waiting for the bus. Full: dropped (the database has them).
pub const BUS_QUEUE: usize = 16 * 1024;

/// Whether another node may need what the core published on `topic`.
pub fn crosses_nodes(topic: &str) -> bool {
    let mut levels = topic.split('/');
    match (levels.next(), levels.next(), levels.next()) {
        // An order or merged data: the device may be connected to another node.
        (Some("dev"), Some(_), Some(kind)) => matches!(kind, "jobs" | "merged"),
        // A reply goes to the host's session, on the node that took its request.
        (Some("host"), _, _) => false,
        // A batch's ack goes to the child on the node that took the batch.
        (Some("relay"), Some(_), Some("ack")) => false,
        _ => true,
    }
}

/// How the node reaches the bus.
#[derive(Debug, Clone)]
pub struct BusSettings {
    pub node: String,
    pub servers: Vec<String>,
}

/// Connects (retrying until the servers answer), then runs until `stop`: publishes what the
/// core hands `outgoing`, and delivers what other nodes publish as this node's core would have
/// (`outlet`: devices here, and children relays here on their way to theirs, get theirs; the
/// router the rest).
pub async fn run(
    settings: BusSettings,
    core: Arc<Core>,
    outlet: CoreOutlet,
    mut outgoing: mpsc::Receiver<Outbound>,
    stop: CancellationToken,
) {
    let router = outlet.router_queue();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let options = async_nats::ConnectOptions::new()
        .name(format!("chukei node {}", settings.node))
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let events_tx = events_tx.clone();
            async move {
                let _ = events_tx.send(event);
            }
        });
    let servers: Vec<async_nats::ServerAddr> = settings
        .servers
        .iter()
        .filter_map(|s| match s.parse() {
            Ok(addr) => Some(addr),
            Err(e) => {
                warn!(server = %s, error = %e, "not a NATS server address; ignored");
                None
            }
        })
        .collect();
    let client = tokio::select! {
        () = stop.cancelled() => return,
        c = options.connect(servers) => match c {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "could not reach the cluster bus; this node serves its own sessions only");
                return;
            }
        },
    };
    let mut incoming = match client.subscribe(SUBJECT).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "could not subscribe on the cluster bus");
            return;
        }
    };
    info!(node = %settings.node, "cluster bus connected");
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            out = outgoing.recv() => {
                let Some(out) = out else { break };
                let mut headers = HeaderMap::new();
                headers.insert(ORIGIN, settings.node.as_str());
                headers.insert(TOPIC, out.topic.as_str());
                headers.insert(RETAIN, if out.retain { "1" } else { "0" });
                if let Err(e) = client.publish_with_headers(SUBJECT, headers, out.payload.into()).await {
                    debug!(error = %e, "a publication did not reach the cluster bus; the database has it");
                }
            }
            msg = incoming.next() => {
                let Some(msg) = msg else { break };
                let Some(out) = from_other_node(&settings.node, &msg) else { continue };
                if !deliver(&outlet, &router, vec![out]).await {
                    break;
                }
            }
            event = events.recv() => match event {
                Some(async_nats::Event::Connected) => {
                    // Whatever was published while this node was off the bus: again, from the
                    // database.
                    info!(node = %settings.node, "cluster bus reconnected; republishing the retained orders and views");
                    catch_up(&core, &outlet, &router).await;
                }
                Some(async_nats::Event::Disconnected) => {
                    warn!(node = %settings.node, "cluster bus lost; reconnecting (sessions here go on)");
                }
                Some(_) => {}
                None => {}
            }
        }
    }
    let _ = client.drain().await;
}

/// A publication of another node, as an [`Outbound`]; `None` for this node's own or a message
/// that is not one.
fn from_other_node(node: &str, msg: &async_nats::Message) -> Option<Outbound> {
    let headers = msg.headers.as_ref()?;
    let origin = headers.get(ORIGIN)?.as_str();
    if origin == node {
        return None;
    }
    let topic = headers.get(TOPIC)?.as_str().to_owned();
    let retain = headers.get(RETAIN).is_some_and(|v| v.as_str() == "1");
    Some(Outbound {
        topic,
        payload: msg.payload.to_vec(),
        retain,
    })
}

/// Hands publications to this node's sessions as its core's own; `false` once the router is gone.
async fn deliver(
    outlet: &CoreOutlet,
    router: &mpsc::Sender<Outbound>,
    batch: Vec<Outbound>,
) -> bool {
    for out in outlet.deliver_to_devices(batch) {
        if router.send(out).await.is_err() {
            return false;
        }
    }
    true
}

/// Republishes every retained order and view the database holds, to this node's sessions.
async fn catch_up(core: &Arc<Core>, outlet: &CoreOutlet, router: &mpsc::Sender<Outbound>) {
    let c = core.clone();
    let publications = match tokio::task::spawn_blocking(move || c.startup_publications()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            warn!(error = %e, "could not read the retained orders and views to catch up");
            return;
        }
        Err(_) => return,
    };
    deliver(outlet, router, publications).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_and_views_cross_nodes_replies_acks_and_chunks_do_not() {
        for topic in [
            "dev/C1/jobs/J-000001",
            "dev/C1/merged/J-000001",
            "fleet/C1/jobs/J-000001",
            "json/fleet/C1/state",
            "fleet/C1/alarm",
            "relay/R1/down/dev/C1/jobs/J-000001",
        ] {
            assert!(crosses_nodes(topic), "{topic}");
        }
        for topic in [
            "dev/C1/ack",
            "dev/C1/blob/abc",
            "host/svc/resp",
            "relay/R1/ack",
        ] {
            assert!(!crosses_nodes(topic), "{topic}");
        }
    }
}
