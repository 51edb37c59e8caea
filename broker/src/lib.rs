//! chukei's relay, in layers, each using only the ones after it:
//!
//! - [`gateway`]: TCP accept, TLS under a deadline, WebSocket, identity from the client
//!   certificate, the ACL check of every packet ([`protocol::acl`]) and per-client limits;
//! - [`switch`]: every route a message can take — a device's session is a place in the hub
//!   ([`switch::hub`]), a host's or integrator's a local link into the [`router`] (the embedded
//!   rumqttd router, which routes and keeps retained messages in memory), the core's queue, its
//!   outlet ([`switch::router_link`]) and presence ([`switch::presence`]);
//! - [`core`]: the broker's own logic, which commits what devices and hosts send to the store
//!   ([`store`]) before acknowledging it, and returns the orders, views, acks and replies to
//!   publish; job kinds live in [`jobs`].
//!
//! Emergencies, presence and notifications (Fig. 5, claim 42, S116/S312) are parts of the core
//! too; [`notify`] drains its mail and webhook queue from the store, [`metrics_http`] serves
//! [`telemetry`] to Prometheus and answers health checks ([`health`]), [`control`] answers
//! `broker backup` on a Unix socket, [`systemd`] tells a `Type=notify` unit when the relay is ready.
//!
//! The `broker` command (crate `chukei-broker-cli`) only parses flags; [`run`] is the broker. This
//! library links neither agent: the command's `demo` does.

pub mod config;
pub mod control;
pub mod core;
pub mod gateway;
pub mod health;
pub mod jobs;
pub mod log_budget;
pub mod metrics;
pub mod metrics_http;
pub mod notify;
pub mod program;
pub mod relays;
pub mod reload;
pub mod rollouts;
pub mod router;
pub mod store;
pub mod switch;
pub mod systemd;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::BrokerConfig;
use crate::core::{Core, CoreSettings};
use crate::gateway::Gateway;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("loading the TLS identity: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("opening the store: {0}")]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    TicketKeys(#[from] gateway::tickets::TicketKeyError),
    #[error(transparent)]
    CoreLink(#[from] switch::router_link::CoreLinkError),
    #[error("{0}")]
    PublisherKey(String),
    #[error("could not start the core's thread: {0}")]
    CoreThread(std::io::Error),
    #[error(
        "could not listen on {addr}: {source} (is another broker running there? pick another --listen)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "could not listen on {addr} for WebSocket clients: {source} (pick another --ws-listen)"
    )]
    BindWs {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not listen on {addr} for metrics: {source} (pick another --metrics-listen)")]
    BindMetrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not write the pid file {}: {source}", .path.display())]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not write the ready file {}: {source}", .path.display())]
    ReadyFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Test-only faults, switched on by the environment so no production flag exposes them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// `CHUKEI_TEST_HOLD_ACKS=1`: commit what clients send but never acknowledge it.
    pub hold_acks: bool,
}

impl Faults {
    pub fn from_env() -> Faults {
        Faults {
            hold_acks: std::env::var("CHUKEI_TEST_HOLD_ACKS").is_ok_and(|v| v == "1"),
        }
    }
}

/// Binds the configured address; separate from [`run`] so callers can bind port 0 and learn it.
pub async fn bind(cfg: &BrokerConfig) -> Result<TcpListener, BrokerError> {
    listen(cfg.listen, cfg.listen_backlog).map_err(|source| BrokerError::Bind {
        addr: cfg.listen,
        source,
    })
}

/// A listener on `addr` with room for `backlog` connections not yet accepted (tokio's own bind
/// asks for 1024, and a restarted relay's fleet overflows that at once).
fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As std's own bind does: a restarted relay can listen again at once on its port.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Messages the relay holds for one device before closing its session as too slow. A device
/// asks for firmware chunks a window at a time and has a few job orders at most, so only a device
/// that stopped reading gets near it.
const DEVICE_QUEUE: usize = 1024;

/// Runs the broker on a bound listener until `stop` is cancelled; `reload`, if given, asks it
/// to read its configuration again ([`reload`]).
///
/// Order matters: the store is opened and every retained job and view is republished into the
/// router before the gateway accepts anyone (docs/decisions.md, D2); only then are `ready_file`
/// and the pid file written.
pub async fn run(
    cfg: BrokerConfig,
    listener: TcpListener,
    ready_file: Option<&Path>,
    faults: Faults,
    stop: CancellationToken,
    reload: Option<reload::Reload>,
) -> Result<Ended, BrokerError> {
    cfg.validate()?;
    let publisher = cfg
        .publisher_key
        .as_deref()
        .map(pki::publisher::PublisherKey::load)
        .transpose()
        .map_err(BrokerError::PublisherKey)?;
    let restart = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let crl = pki::load_crl(&cfg.pki_dir, cfg.crl_file.as_deref())?;
    let relay_id = cfg.relay_id.as_ref().map(|r| r.as_str());
    let tls = pki::server_config_as(&cfg.pki_dir, crl.as_ref(), relay_id)?;
    match &crl {
        Some(crl) => {
            info!(path = %crl.path.display(), revoked = crl.revoked, "certificate revocation list loaded")
        }
        None => info!("no certificate revocation list (broker pki revoke writes one)"),
    }
    let OpenedStore { store, cluster } = open_store(&cfg)?;
    // In a cluster every node seals and opens tickets with the same keys, from the database,
    // so a device resumes on whichever node it reconnects to.
    let tickets = match (cfg.ticket_settings(), &cluster) {
        (Some(settings), Some(db)) => Some(gateway::tickets::Ticketer::open_shared(
            db.clone(),
            settings,
        )?),
        (Some(settings), None) => Some(gateway::tickets::Ticketer::open(&cfg.data_dir, settings)?),
        (None, _) => None,
    };
    let core = Core::with_store(
        store,
        CoreSettings {
            server_name: cfg.server_name.clone(),
            max_payload_bytes: cfg.max_payload_bytes,
            finished_visible: std::time::Duration::from_secs(cfg.finished_visible_secs),
            default_deadline: std::time::Duration::from_secs(cfg.default_deadline_secs),
            default_max_attempts: cfg.default_max_attempts,
            hold_acks: faults.hold_acks,
            node: cfg.node_id.clone(),
            last_seen_resolution: cfg.last_seen_resolution(),
        },
    );
    core.configure_alerts(cfg.alert_settings());
    core.configure_relays(cfg.relay_settings()?);
    // Before any session: a periodic device that was connected when the relay stopped is
    // expected back within its interval, like one that disconnected.
    core.presence_startup()?;
    let core = Arc::new(core);
    // Built before anything is bound: a wrong password or CA file is a startup error.
    let senders = notify::Senders::new(&cfg.notify, &cfg.server_name)
        .map_err(|e| BrokerError::Config(config::ConfigError::Notify(e)))?;
    let (notify_settings, notify_settings_rx) =
        tokio::sync::watch::channel(notify::WorkerSettings {
            cfg: cfg.notify.clone(),
            senders: Arc::new(senders),
        });
    notify::log_backlog(core.store());
    let metrics_listener = match cfg.metrics_listen {
        Some(m) => {
            let bind_err = |source| BrokerError::BindMetrics { addr: m, source };
            let l = TcpListener::bind(m).await.map_err(bind_err)?;
            let bound = l.local_addr().map_err(bind_err)?;
            Some((l, bound))
        }
        None => None,
    };
    let retained = core.startup_publications()?;
    let republished = retained.len();
    let router = router::start(cfg.max_clients);
    let tasks = TaskTracker::new();
    let (inbound_tx, inbound) = tokio::sync::mpsc::channel(switch::router_link::INBOUND_QUEUE);
    // Before the core republishes: the hub keeps its own copy of the devices' retained orders.
    let hub = switch::hub::Hub::new(inbound_tx.clone(), DEVICE_QUEUE);
    // A store with a second writer (a cluster's database) takes devices' alarms beside the
    // core's batches, on a lane of their own (core/run.rs, `spawn_alarm_lane`).
    let (hub, alarm_lane) = if core.store().has_alarm_writer() {
        let (tx, rx) = tokio::sync::mpsc::channel(switch::router_link::INBOUND_QUEUE);
        (hub.with_alarm_lane(tx), Some(rx))
    } else {
        (hub, None)
    };
    hub.expect_devices(core.known_devices());
    hub.restore_sessions(core.take_stored_sessions());
    let hub = Arc::new(hub);
    let bus_tls = switch::bus::tls_config(
        cfg.cluster_bus_ca.as_deref(),
        cfg.cluster_bus_cert.as_deref(),
        cfg.cluster_bus_key.as_deref(),
    )?;
    let (bus_tx, bus_rx) = match cfg.cluster_bus.is_empty() {
        true => (None, None),
        false => {
            let (tx, rx) = tokio::sync::mpsc::channel(switch::bus::BUS_QUEUE);
            (Some(tx), Some(rx))
        }
    };
    let outbound = switch::router_link::attach(
        router.clone(),
        hub.clone(),
        core.child_routes(),
        retained,
        inbound_tx,
        bus_tx,
        &tasks,
        stop.clone(),
    )
    .await?;
    if let (Some(rx), Some(node)) = (bus_rx, &cfg.node_id) {
        // A child relay's orders come from its parent, not from this database.
        if cfg.cluster_order_sweep_secs > 0 && cfg.parent.is_empty() {
            tasks.spawn(switch::sweep::run(
                core.clone(),
                outbound.clone(),
                node.clone(),
                std::time::Duration::from_secs(cfg.cluster_order_sweep_secs),
                stop.clone(),
            ));
        }
        tasks.spawn(switch::bus::run(
            switch::bus::BusSettings {
                node: node.clone(),
                servers: cfg.cluster_bus.clone(),
                tls: bus_tls,
            },
            core.clone(),
            outbound.clone(),
            rx,
            stop.clone(),
        ));
    }
    let (presence_tx, presence_rx) = switch::presence::channel();
    let window = core::CommitWindow {
        length: cfg.commit_window(),
        urgent: hub.urgent(),
    };
    let alarm_lane_task = match alarm_lane {
        Some(rx) => Some(
            core::spawn_alarm_lane(core.clone(), rx, outbound.clone(), stop.clone())
                .map_err(BrokerError::CoreThread)?,
        ),
        None => None,
    };
    let core_task = core::spawn(
        core.clone(),
        inbound,
        outbound,
        presence_rx,
        window,
        stop.clone(),
    )
    .map_err(BrokerError::CoreThread)?;
    tasks.spawn(notify::run_worker(
        core.shared_store(),
        core.shared_stats(),
        notify_settings_rx,
        core.notify_wake(),
        stop.clone(),
    ));
    if let Some(t) = &tickets {
        tasks.spawn(t.clone().rotate_until(stop.clone()));
    }
    if cfg.relay_id.is_some() {
        // A child's devices get the orders it kept from its parent, parent reachable or not.
        let txn = core.shared_store().begin()?;
        for (topic, payload) in txn.mirrored()? {
            hub.deliver(&topic, payload);
        }
    }
    if let (Some(relay), false) = (&cfg.relay_id, cfg.parent.is_empty()) {
        let (cert, key) = pki::relay_cert_paths(&cfg.pki_dir, relay.as_str());
        let tls = pki::client_config(
            &pki::read_pem_file(&cfg.pki_dir.join(pki::CA_CERT))?,
            &pki::read_pem_file(&cert)?,
            &pki::read_pem_file(&key)?,
        )?;
        let settings = relays::uplink::UplinkSettings {
            relay: relay.clone(),
            parents: cfg.parent.clone(),
            tls,
            max_items: cfg.uplink_batch_max_items,
            max_bytes: cfg.uplink_batch_max_bytes,
            delay: std::time::Duration::from_millis(cfg.uplink_batch_delay_ms),
            ack_timeout: std::time::Duration::from_secs(30),
            periodic: (cfg.parent_session == protocol::schedule::SessionMode::Periodic)
                .then(|| std::time::Duration::from_secs(cfg.parent_interval_secs)),
            own: relays::own::OwnSettings {
                program: program::ProgramDir::from_env(),
                publisher: publisher.clone(),
                restart: restart.clone(),
                stop_all: stop.clone(),
            },
        };
        tasks.spawn(relays::uplink::run(
            settings,
            core.clone(),
            hub.clone(),
            stop.clone(),
        ));
    }
    tasks.spawn(control::serve(
        control::socket_path(&cfg.data_dir),
        core.shared_store(),
        stop.clone(),
    ));

    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(crate::health::Health::default());
    let revoked = crl
        .as_ref()
        .map(|c| c.revoked_serials())
        .unwrap_or_default();
    let gateway = Arc::new(
        Gateway::new(
            cfg.gateway_settings(),
            tls,
            revoked,
            tickets.clone(),
            router,
            hub.clone(),
            metrics.clone(),
        )
        .with_presence(presence_tx),
    );
    gateway.expect_devices(core.known_devices());
    let metrics_addr = metrics_listener.as_ref().map(|(_, a)| *a);
    if let Some((l, _)) = metrics_listener {
        let limits = metrics_http::HttpLimits {
            header_timeout: cfg.metrics_header_timeout(),
            max_connections: cfg.metrics_max_connections,
        };
        tasks.spawn(metrics_http::serve(
            l,
            limits,
            metrics.clone(),
            core.clone(),
            health.clone(),
            stop.clone(),
        ));
    }
    let addr = listener.local_addr().map_err(|source| BrokerError::Bind {
        addr: cfg.listen,
        source,
    })?;
    if let (Some(db), Some(node)) = (cluster, &cfg.node_id) {
        tasks.spawn(heartbeat(
            db,
            node.clone(),
            addr.to_string(),
            core.shared_stats(),
            stop.clone(),
        ));
    }
    let ws = match cfg.ws_listen {
        Some(ws_addr) => {
            let bind_err = |source| BrokerError::BindWs {
                addr: ws_addr,
                source,
            };
            let ws = listen(ws_addr, cfg.listen_backlog).map_err(bind_err)?;
            let bound = ws.local_addr().map_err(bind_err)?;
            Some((ws, bound))
        }
        None => None,
    };
    let ws_addr = ws.as_ref().map(|(_, a)| *a);
    if let Some(reload) = reload {
        let reloader = reload::Reloader::new(
            cfg.clone(),
            gateway.clone(),
            core.clone(),
            notify_settings,
            metrics.clone(),
        );
        tasks.spawn(reloader.serve(reload, stop.clone()));
    }
    if let Some(path) = ready_file {
        write_ready_file(path, addr, ws_addr, metrics_addr)?;
    }
    let pid_file = cfg.pid_file.as_deref().map(PidFile::write).transpose()?;
    if let Some(ws_addr) = ws_addr {
        info!(addr = %ws_addr, path = protocol::url::DEFAULT_WS_PATH, "websocket listener ready");
    }
    info!(%addr, republished, data_dir = %cfg.data_dir.display(), "broker ready");
    health.set_accepting();
    if program::ProgramDir::from_env().is_some() {
        tasks.spawn(program::stop_when_orphaned(stop.clone()));
    }
    if cfg.systemd_notify {
        systemd::check_socket();
        systemd::ready(republished);
        tasks.spawn(systemd::watchdog(stop.clone()));
    }
    let ws_task = ws.map(|(ws, _)| tasks.spawn(gateway.clone().run_ws(ws, stop.clone())));
    gateway.run(listener, stop.clone()).await;
    health.set_stopping();
    if cfg.systemd_notify {
        systemd::stopping();
    }
    if let Some(task) = ws_task {
        let _ = task.await;
    }
    stop.cancel();
    tasks.close();
    match core_task.await {
        Ok(Err(e)) => error!(error = %e, "core stopped with an error"),
        Err(_) => error!("core thread panicked"),
        Ok(Ok(())) => {}
    }
    if let Some(task) = alarm_lane_task
        && task.await.is_err()
    {
        error!("alarm lane's thread panicked");
    }
    tasks.wait().await;
    drop(pid_file);
    if restart.load(std::sync::atomic::Ordering::SeqCst) {
        info!("broker stopped to restart into its new program");
        return Ok(Ended::RestartIntoNewProgram);
    }
    info!("broker stopped");
    Ok(Ended::Stopped)
}

/// The relay's store: the embedded redb file in the data directory, or with `cluster_db` the
/// cluster's PostgreSQL database (its schema checked: `broker db migrate` creates it).
fn open_store(cfg: &BrokerConfig) -> Result<OpenedStore, BrokerError> {
    if let Some(url) = &cfg.cluster_db {
        // The data directory still holds what is this node's own: its TLS ticket keys and its
        // control socket.
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| store::StoreError::Dir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let store = store::PgStore::open(url)?;
        info!(
            node = cfg.node_id.as_deref().unwrap_or(""),
            database = %store::Store::location(&store),
            "cluster store: PostgreSQL"
        );
        let store = Arc::new(store);
        return Ok(OpenedStore {
            store: store.clone(),
            cluster: Some(store),
        });
    }
    let mut store = store::RedbStore::open(&cfg.data_dir)?;
    if let Some(bytes) = cfg.min_free_bytes {
        store = store.keep_free(bytes);
    }
    info!(
        data_dir = %cfg.data_dir.display(),
        min_free_bytes = store.space().reserve(),
        automatic = cfg.min_free_bytes.is_none(),
        "disk reserve: new work is refused while less than min_free_bytes is free"
    );
    Ok(OpenedStore {
        store: Arc::new(store),
        cluster: None,
    })
}

/// The store the relay runs on, and the cluster database if it is one.
struct OpenedStore {
    store: Arc<dyn store::Store>,
    cluster: Option<Arc<store::PgStore>>,
}

/// Writes this node's row in the cluster database every few seconds, until `stop`.
async fn heartbeat(
    db: Arc<store::PgStore>,
    node: String,
    listen: String,
    stats: Arc<telemetry::CoreStats>,
    stop: CancellationToken,
) {
    let started = chrono::Utc::now();
    let mut tick = tokio::time::interval(store::pg_store::nodes::HEARTBEAT);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let devices = stats
            .devices_online
            .load(std::sync::atomic::Ordering::Relaxed);
        let (db, node, listen) = (db.clone(), node.clone(), listen.clone());
        let written =
            tokio::task::spawn_blocking(move || db.heartbeat(&node, &listen, started, devices))
                .await;
        if let Ok(Err(e)) = written {
            warn!(error = %e, "could not write this node's heartbeat; nodes list shows it late");
        }
    }
}

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Told to stop.
    Stopped,
    /// A child relay staged a new program of its own and wants its supervisor to restart it
    /// into it (exit status [`program::RESTART_INTO_NEW_PROGRAM`]).
    RestartIntoNewProgram,
}

/// `pid_file`: the relay's process id, written once it is ready, removed when it stops (if it
/// still holds ours).
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: &Path) -> Result<PidFile, BrokerError> {
        let err = |source| BrokerError::PidFile {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|s| s.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Written atomically (temp file + rename) so a reader never sees half of it:
/// `{"listen":"ADDR"}`, plus `"ws_listen":"ADDR"` when the WebSocket listener is on and
/// `"metrics_listen":"ADDR"` when the metrics endpoint is.
fn write_ready_file(
    path: &Path,
    addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
) -> Result<(), BrokerError> {
    let err = |source| BrokerError::ReadyFile {
        path: path.to_owned(),
        source,
    };
    let mut body = serde_json::json!({ "listen": addr.to_string() });
    if let Some(ws) = ws_addr {
        body["ws_listen"] = serde_json::Value::String(ws.to_string());
    }
    if let Some(m) = metrics_addr {
        body["metrics_listen"] = serde_json::Value::String(m.to_string());
    }
    let body = body.to_string();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More connections than tokio's own backlog (1024) complete their TCP handshake while the
    /// relay accepts none: the kernel holds them for the relay instead of dropping their SYNs
    /// (which would cost each one a retransmission a second or more later). Needs the kernel's
    /// `net.core.somaxconn` at 1,200 or more (4096 by default since Linux 5.4).
    #[tokio::test]
    async fn the_listener_holds_more_connections_than_tokios_default_backlog() {
        const CONNECTIONS: usize = 1_200;
        let listener = listen("127.0.0.1:0".parse().unwrap(), 2_048).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::with_capacity(CONNECTIONS);
        for i in 0..CONNECTIONS {
            let connect = tokio::net::TcpStream::connect(addr);
            let stream = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
                .await
                .unwrap_or_else(|_| panic!("connection {i} not completed within 10 s"))
                .unwrap();
            held.push(stream);
        }
        assert_eq!(held.len(), CONNECTIONS);
        drop(listener);
    }
}
