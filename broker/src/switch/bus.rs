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
//! the bus comes back ([`run`]), as at a node's start. What the node itself published meanwhile,
//! or had on its way out as its server died, was lost for the others, which may never have left
//! the bus: so a node back on the bus also says so ([`REJOINED`]), and every other node catches
//! up the same way.

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
/// Header of the message a node publishes when it is back on the bus after losing it: the
/// others republish every retained order and view from the database to their own sessions.
const REJOINED: &str = "Chukei-Rejoined";
/// The rejoin is said again this long after the first time: a server that was restarted may
/// take a moment to route to the others, and a message published before it does reaches only
/// its own clients.
const REJOIN_AGAIN: std::time::Duration = std::time::Duration::from_secs(2);

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
#[derive(Clone)]
pub struct BusSettings {
    pub node: String,
    pub servers: Vec<String>,
    /// TLS to every server ([`tls_config`]); `None`: as each URL's scheme says.
    pub tls: Option<rustls::ClientConfig>,
}

/// The node's TLS towards the bus from `cluster_bus_ca` (and its client certificate): the
/// servers' certificates checked against that CA and the URL's host name. Read at start, so
/// a missing file stops the node with its name.
pub fn tls_config(
    ca: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<Option<rustls::ClientConfig>, pki::PkiError> {
    let Some(ca) = ca else { return Ok(None) };
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some(pki::cluster::ClientIdentity {
            cert: cert.to_owned(),
            key: key.to_owned(),
        }),
        _ => None,
    };
    pki::cluster::cluster_client_config(
        &pki::cluster::ServerCheck::ChainAndName(ca.to_owned()),
        identity.as_ref(),
    )
    .map(Some)
}

/// A server's URL for logs: no user, password or token.
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://…@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Who the node is on the bus, from the servers' URLs.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    UserAndPassword(String, String),
    Token(String),
}

/// The credentials in the servers' URLs (the first that has some): `USER:PASSWORD@` or
/// `TOKEN@`, as the NATS tools read them. The client library parses them but does not send
/// them by itself.
fn url_credentials(servers: &[async_nats::ServerAddr]) -> Option<Credentials> {
    let addr = servers.iter().find(|a| a.username().is_some())?;
    match (addr.username(), addr.password()) {
        (Some(user), Some(password)) => Some(Credentials::UserAndPassword(
            user.to_owned(),
            password.to_owned(),
        )),
        (Some(token), None) => Some(Credentials::Token(token.to_owned())),
        _ => None,
    }
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
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("chukei node {}", settings.node))
        // Every node publishes and subscribes on the one subject; without this the servers send
        // each node its own publications back, a third of the bus's deliveries on three nodes,
        // only for the node to drop them ([`from_other_node`]).
        .no_echo()
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
                warn!(server = %without_credentials(s), error = %e, "not a NATS server address; ignored");
                None
            }
        })
        .collect();
    options = match url_credentials(&servers) {
        Some(Credentials::UserAndPassword(user, password)) => {
            options.user_and_password(user, password)
        }
        Some(Credentials::Token(token)) => options.token(token),
        None => options,
    };
    if let Some(tls) = settings.tls.clone() {
        options = options.require_tls(true).tls_client_config(tls);
    }
    let encrypted = settings.tls.is_some() || servers.iter().all(|s| s.tls_required());
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
    // The client connects in the background (and retries): "connected" is said when it is.
    info!(node = %settings.node, servers = settings.servers.len(), tls = encrypted, "cluster bus: connecting");
    if !encrypted {
        let remote: Vec<String> = settings
            .servers
            .iter()
            .filter(|s| !on_this_machine(s))
            .map(|s| without_credentials(s))
            .collect();
        if !remote.is_empty() {
            warn!(servers = %remote.join(","), "the cluster bus is not encrypted: give --cluster-bus-ca (README, \"TLS to the database and the bus\")");
        }
    }
    // One warning per outage for a server that cannot be reached or refuses the node (a TLS or
    // authorization failure says why), not one per retry.
    let mut failing = false;
    let mut joined = false;
    // Other nodes' rejoins: however many come while a catch-up runs, one more runs after it.
    let rejoined = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(catch_up_on_rejoins(
        rejoined.clone(),
        core.clone(),
        outlet.clone(),
        stop.clone(),
    ));
    let mut say_rejoined_again: Option<tokio::time::Instant> = None;
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
            () = at_or_never(say_rejoined_again) => {
                say_rejoined_again = None;
                announce_rejoin(&client, &settings.node).await;
            }
            msg = incoming.next() => {
                let Some(msg) = msg else { break };
                if let Some(node) = rejoin_of_other_node(&settings.node, &msg) {
                    info!(node = %settings.node, rejoined = %node, "a node is back on the cluster bus; republishing the retained orders and views here");
                    rejoined.notify_one();
                    continue;
                }
                let Some(out) = from_other_node(&settings.node, &msg) else { continue };
                if !deliver(&outlet, &router, vec![out]).await {
                    break;
                }
            }
            event = events.recv() => match event {
                Some(async_nats::Event::Connected) => {
                    failing = false;
                    let joined_before = std::mem::replace(&mut joined, true);
                    if joined_before {
                        info!(node = %settings.node, "cluster bus reconnected; republishing the retained orders and views");
                    } else {
                        info!(node = %settings.node, tls = encrypted, "cluster bus connected");
                    }
                    // Whatever was published while this node was off the bus: again, from the
                    // database. And the others catch up on what this node published.
                    catch_up(&core, &outlet, &router).await;
                    if joined_before {
                        announce_rejoin(&client, &settings.node).await;
                        say_rejoined_again = Some(tokio::time::Instant::now() + REJOIN_AGAIN);
                    }
                }
                Some(async_nats::Event::Disconnected) => {
                    warn!(node = %settings.node, "cluster bus lost; reconnecting (sessions here go on)");
                }
                Some(async_nats::Event::ClientError(e)) if !std::mem::replace(&mut failing, true) => {
                    warn!(node = %settings.node, error = %e, "cannot connect to the cluster bus; retrying (a TLS error: check --cluster-bus-ca and the servers' certificates; an authorization error: the credentials in the URL)");
                }
                Some(async_nats::Event::ServerError(e)) if !std::mem::replace(&mut failing, true) => {
                    warn!(node = %settings.node, error = %e, "the cluster bus refused this node");
                }
                Some(_) => {}
                None => {}
            }
        }
    }
    let _ = client.drain().await;
}

/// Whether a server URL names this machine (`localhost`, a loopback address).
fn on_this_machine(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = match host_port.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => host_port,
    };
    crate::store::pg_store::is_loopback(host)
}

/// A publication of another node, as an [`Outbound`]; `None` for this node's own (the servers
/// do not echo them; a second node started with the same id would) or a message that is not one.
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

/// Waits until `at`; forever without one.
async fn at_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Tells the other nodes that this one is back on the bus ([`REJOINED`]).
async fn announce_rejoin(client: &async_nats::Client, node: &str) {
    let mut headers = HeaderMap::new();
    headers.insert(ORIGIN, node);
    headers.insert(REJOINED, "1");
    if let Err(e) = client
        .publish_with_headers(SUBJECT, headers, Vec::new().into())
        .await
    {
        debug!(error = %e, "could not tell the other nodes that this one is back on the bus");
    }
}

/// The node that said it is back on the bus, if `msg` says so and is not this node's own.
fn rejoin_of_other_node(node: &str, msg: &async_nats::Message) -> Option<String> {
    let headers = msg.headers.as_ref()?;
    headers.get(REJOINED)?;
    let origin = headers.get(ORIGIN)?.as_str();
    (origin != node).then(|| origin.to_owned())
}

/// Catches up each time another node says it is back on the bus ([`REJOINED`]), off the bus's
/// loop so that publications keep flowing meanwhile.
async fn catch_up_on_rejoins(
    rejoined: Arc<tokio::sync::Notify>,
    core: Arc<Core>,
    outlet: CoreOutlet,
    stop: CancellationToken,
) {
    let router = outlet.router_queue();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = rejoined.notified() => catch_up(&core, &outlet, &router).await,
        }
    }
}

/// Hands publications to this node's sessions as its core's own; `false` once the router is gone.
pub(super) async fn deliver(
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
    let began = std::time::Instant::now();
    let c = core.clone();
    let publications = match tokio::task::spawn_blocking(move || c.startup_publications()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            warn!(error = %e, "could not read the retained orders and views to catch up");
            return;
        }
        Err(_) => return,
    };
    let count = publications.len();
    let read_ms = began.elapsed().as_millis();
    if deliver(outlet, router, publications).await {
        info!(
            republished = count,
            read_ms, "caught up from the database: retained orders and views republished here"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_are_logged_without_credentials_and_loopback_is_told_apart() {
        assert_eq!(
            without_credentials("nats://chukei:s3cret@bus1:4222"),
            "nats://…@bus1:4222"
        );
        assert_eq!(without_credentials("tls://bus1:4222"), "tls://bus1:4222");
        for local in [
            "nats://127.0.0.1:4222",
            "nats://u:p@localhost:4222",
            "nats://[::1]:4222",
        ] {
            assert!(on_this_machine(local), "{local}");
        }
        for remote in ["nats://bus1:4222", "nats://tok@10.0.0.5:4222", "bus1"] {
            assert!(!on_this_machine(remote), "{remote}");
        }
    }

    #[test]
    fn credentials_come_from_the_first_server_url_that_has_them() {
        let parse = |urls: &[&str]| -> Vec<async_nats::ServerAddr> {
            urls.iter().map(|s| s.parse().unwrap()).collect()
        };
        assert_eq!(
            url_credentials(&parse(&[
                "nats://bus1:4222",
                "nats://chukei:s3cret@bus2:4222"
            ])),
            Some(Credentials::UserAndPassword(
                "chukei".into(),
                "s3cret".into()
            ))
        );
        assert_eq!(
            url_credentials(&parse(&["nats://t0ken@bus1:4222"])),
            Some(Credentials::Token("t0ken".into()))
        );
        assert_eq!(url_credentials(&parse(&["nats://bus1:4222"])), None);
    }

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
