//! `broker run` configuration: a TOML file for the fleet, flags for the moment (flags win).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Every key of `broker.toml`. Unknown keys are an error, so a typo is not a silent default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where the gateway listens for MQTT over TLS.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Where the gateway also listens for MQTT over WebSocket over TLS (path `/mqtt`,
    /// subprotocol `mqtt`), for agents behind proxies that let only HTTPS out. Same
    /// certificates, identity and ACL as `listen`. Unset: no WebSocket listener.
    #[serde(default)]
    pub ws_listen: Option<SocketAddr>,
    /// Holds `chukei.redb`.
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    /// Holds ca.pem, server.pem and server.key (`broker pki init`).
    #[serde(default = "defaults::pki_dir")]
    pub pki_dir: PathBuf,
    /// The "managing server" column of the job list.
    #[serde(default = "defaults::server_name")]
    pub server_name: String,
    /// A TLS handshake that takes longer is dropped; it never holds up anyone else.
    #[serde(default = "defaults::handshake_timeout_secs")]
    pub handshake_timeout_secs: u64,
    /// A new connection must send the first byte of its TLS ClientHello within this time; a
    /// real client sends it at once. Silent sockets then free their handshake slot long before
    /// `handshake_timeout_secs` (which alone applies when it is the shorter).
    #[serde(default = "defaults::first_byte_timeout_secs")]
    pub first_byte_timeout_secs: u64,
    /// A client that finished TLS must send CONNECT within this time.
    #[serde(default = "defaults::connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// A device's PUBACK waits up to this long for the message's ack (sent once committed), so
    /// that both leave in one write: one send for the relay and one wake-up for the device per
    /// message. 0: every PUBACK at once, before the commit.
    #[serde(default = "defaults::puback_hold_ms")]
    pub puback_hold_ms: u64,
    /// Largest MQTT packet a client may send; a bigger one closes its connection.
    #[serde(default = "defaults::max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// Largest CBOR payload the core decodes; a bigger one is refused with a reason.
    #[serde(default = "defaults::max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Clients admitted at once; the rest get CONNACK "server unavailable". Kept below rumqttd's
    /// own limit, which panics when exceeded (rumqtt #991), and below the process's 20,000 files.
    #[serde(default = "defaults::max_clients")]
    pub max_clients: usize,
    /// TLS handshakes in flight at once; more connections wait in the kernel's backlog.
    #[serde(default = "defaults::max_handshakes")]
    pub max_handshakes: usize,
    /// Connections the kernel may hold for the relay's listeners before the relay accepts them
    /// (listen(2)'s backlog; Linux caps it at `net.core.somaxconn`). A restarted relay's whole
    /// fleet connects at once: past the backlog, connection attempts are dropped and each client
    /// waits for its SYN to be sent again, a second or more.
    #[serde(default = "defaults::listen_backlog")]
    pub listen_backlog: u32,
    /// QoS 1 PUBLISHes from one client the relay may hold not yet acknowledged to it; one more
    /// closes that client. An agent waits for each ack (a few in flight at most); only a client
    /// that never reads its acks reaches this.
    #[serde(default = "defaults::max_inflight")]
    pub max_inflight: usize,
    /// Distinct topic filters one client may hold at once (the same filter twice counts once);
    /// a SUBSCRIBE past it closes that client. Agents hold a handful.
    #[serde(default = "defaults::max_subscriptions")]
    pub max_subscriptions: usize,
    /// Sessions one certificate identity may hold at once (a host may open several with client
    /// ids `NAME:suffix`); one more gets CONNACK "server unavailable" (a load condition, not a
    /// certificate problem) and is closed.
    #[serde(default = "defaults::max_connections_per_identity")]
    pub max_connections_per_identity: usize,
    /// New connections per second one source address may open, after a burst of
    /// `connect_burst_per_source`; past it, a connection is closed before its TLS handshake.
    /// 0: no limit.
    #[serde(default = "defaults::connect_rate_per_source")]
    pub connect_rate_per_source: u32,
    /// New connections one source address may open at once: a site of hundreds of devices
    /// behind one NAT address all reconnecting after an outage.
    #[serde(default = "defaults::connect_burst_per_source")]
    pub connect_burst_per_source: u32,
    /// Loopback sources (127.0.0.0/8, ::1) skip the per-source rate: a TLS terminator on the
    /// same host would make every client one source, and benchmarks and tests connect thousands
    /// of clients from loopback.
    #[serde(default = "defaults::yes")]
    pub connect_rate_exempt_loopback: bool,
    /// "session started", "session ended" and "device offline" lines logged in full per second,
    /// each; past it (a restarted relay's fleet coming back at once, a site's outage) the next
    /// line logged says how many were left out. The metrics and each device's presence count
    /// every session. 0: every line.
    #[serde(default = "defaults::session_log_lines_per_second")]
    pub session_log_lines_per_second: u64,
    /// A certificate revocation list (PEM, signed by the CA) the relay checks every client
    /// certificate against; read at start. Unset: PKI_DIR/crl.pem if it exists
    /// (`broker pki revoke` writes it there).
    #[serde(default)]
    pub crl_file: Option<PathBuf>,
    /// Send TLS 1.3 session tickets, so that a client reconnecting (after a relay restart too)
    /// resumes instead of doing a full handshake. The keys that seal them are kept in
    /// DATA_DIR/tls-ticket-keys (mode 0600). A resumed session keeps the identity of the
    /// certificate it began with, which is checked against the revocation list and its expiry
    /// like any other. Read at start.
    #[serde(default = "defaults::yes")]
    pub tls_tickets: bool,
    /// A ticket opens this long after its key stopped sealing new ones (at most 604800, TLS
    /// 1.3's limit); also the lifetime clients are told. A device away longer does one full
    /// handshake.
    #[serde(default = "defaults::tls_ticket_lifetime_secs")]
    pub tls_ticket_lifetime_secs: u64,
    /// A new ticket key takes over this often; a key and what it sealed are erased
    /// `tls_ticket_lifetime_secs` after it stopped sealing, which bounds what a stolen key file
    /// can open.
    #[serde(default = "defaults::tls_ticket_rotation_secs")]
    pub tls_ticket_rotation_secs: u64,
    /// Succeeded and canceled jobs stay in the default job list this long.
    #[serde(default = "defaults::finished_visible_secs")]
    pub finished_visible_secs: u64,
    /// A job submitted without a deadline gets one this long after the later of its submission,
    /// instruction and execution times; past it, the job ends `timed-out`.
    #[serde(default = "defaults::default_deadline_secs")]
    pub default_deadline_secs: u64,
    /// How many times a device may try a job's risky step (a firmware write) when the submission
    /// does not say.
    #[serde(default = "defaults::default_max_attempts")]
    pub default_max_attempts: u32,
    /// Serve Prometheus metrics over plain HTTP on `GET /metrics` here. Unset: no endpoint.
    /// Put it on loopback or a management network, never on the internet-facing address.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// A metrics request whose headers have not all arrived this long after the connection
    /// opened (or after the previous response) is closed.
    #[serde(default = "defaults::metrics_header_timeout_secs")]
    pub metrics_header_timeout_secs: u64,
    /// Connections the metrics endpoint holds at once; one more is closed at once. Its files
    /// come out of the same process limit as the clients'.
    #[serde(default = "defaults::metrics_max_connections")]
    pub metrics_max_connections: usize,
    /// A device in periodic mode is `overdue` (and raises an alarm) once it is this many
    /// seconds late for its expected check-in (its interval after its last session ended).
    #[serde(default = "defaults::overdue_margin_secs")]
    pub overdue_margin_secs: u64,
    /// A device's `last_seen` (its state view, `devices list`) moves with one of its messages
    /// only once the stored time is this many seconds old; a session opening or closing always
    /// sets it. Each move republishes the device's state view to every subscriber and, in a
    /// cluster, to every node: without it a device reporting every few seconds, or fetching a
    /// firmware image chunk by chunk, sends its view again for every message. 0: every message.
    #[serde(default = "defaults::last_seen_resolution_secs")]
    pub last_seen_resolution_secs: u64,
    /// Active alarms one device may hold (the relay's own overdue and overflow alarms aside).
    /// A new fault code past it is refused (acked `rejected`) and listed in the device's
    /// overflow alarm, so every view, list and notification of one device stays bounded.
    #[serde(default = "defaults::max_active_alarms_per_device")]
    pub max_active_alarms_per_device: usize,
    /// New alarms one device may raise at once; past it, `alarms_per_minute_per_device`.
    #[serde(default = "defaults::alarm_burst_per_device")]
    pub alarm_burst_per_device: u32,
    /// New alarms one device may raise per minute after its burst; more are refused and listed
    /// in its overflow alarm. 0: no rate limit (the cap still holds).
    #[serde(default = "defaults::alarms_per_minute_per_device")]
    pub alarms_per_minute_per_device: u32,
    /// Bytes the data directory's file system must keep free: below it the relay refuses new
    /// work (reads go on) and resumes by itself at twice it. Unset: 1% of the file system, at
    /// least 256 KiB and at most 64 MiB. 0: no reserve (a full disk then fails writes, and reads
    /// stop until the relay has reopened its store).
    #[serde(default)]
    pub min_free_bytes: Option<u64>,
    /// Tell systemd when the relay is ready (`READY=1`, after the retained orders are
    /// republished), when it stops, and ping its watchdog (`WatchdogSec=`): for `Type=notify`
    /// units (deploy/systemd/chukei-broker.service).
    #[serde(default)]
    pub systemd_notify: bool,
    /// `text` (the default) or `json`: one JSON object per line, for log shippers. Read by the
    /// `broker` command, which sets up logging.
    #[serde(default)]
    pub log_format: protocol::log_format::LogFormat,
    /// Write the relay's process id here once it is ready (removed when it stops), for
    /// `broker reload --pid-file FILE` and scripts that send it SIGHUP. Unset: no file.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// Mail and webhook notifications (`[notify]`, `[notify.mail]`, `[[notify.rules]]`).
    #[serde(default)]
    pub notify: crate::notify::NotifyConfig,
    /// This relay is a child relay with this id: it serves its devices with PKI_DIR/relay/ID.pem
    /// (`broker pki issue --role relay`) and, with `parent`, forwards what they send. Unset: a
    /// relay of its own (or a parent).
    #[serde(default)]
    pub relay_id: Option<protocol::RelayId>,
    /// The parent relay this child connects out to (`mqtts://HOST:PORT` or `wss://HOST/mqtt`),
    /// with its relay certificate; a list for a parent that is a cluster of nodes (claim 26): the
    /// child connects to the first it can reach and moves to the next when that one is lost.
    /// Needs `relay_id`.
    #[serde(default, deserialize_with = "parent_urls")]
    pub parent: Vec<protocol::url::BrokerUrl>,
    /// `persistent` (the default): the child stays connected to its parent. `periodic` (claim
    /// 21): it connects every `parent_interval_secs`, exchanges everything (its queue, presence,
    /// the orders waiting for its devices), then disconnects; a queued alarm starts a session at
    /// once. Its devices show as unreachable at the parent between sessions.
    #[serde(default)]
    pub parent_session: protocol::schedule::SessionMode,
    #[serde(default = "defaults::parent_interval_secs")]
    pub parent_interval_secs: u64,
    /// A child forwards at most this many device messages in one upstream message. One batch is
    /// in flight at a time, so an alarm may wait for the parent to commit the batch before it:
    /// 100 kept an alarm's p99 at 21.5 ms under 10,000 reports/s through a child (500: 46.6 ms).
    #[serde(default = "defaults::uplink_batch_max_items")]
    pub uplink_batch_max_items: usize,
    /// ... and at most this many bytes of them (keep it under the parent's max_packet_bytes).
    #[serde(default = "defaults::uplink_batch_max_bytes")]
    pub uplink_batch_max_bytes: usize,
    /// A child waits this long for more messages before it sends a batch that is not full.
    /// Alarms never wait: a batch holding one goes at once.
    #[serde(default = "defaults::uplink_batch_delay_ms")]
    pub uplink_batch_delay_ms: u64,
    /// While the relay is busy (a commit within the last ten windows), a batch of fewer than 32
    /// messages waits this many microseconds for more before it commits: fewer commits for paced
    /// traffic. 1000 cut the relay's CPU by a quarter at 1,000 and 4,000 paced reports/s for
    /// about 2.5 ms more ack latency; an idle relay's lone message commits at once, and a
    /// device's alarm ends the wait. 0: never wait. At most 100000. Unset: 1000, or 5000 on a
    /// cluster node, whose commits are round trips to PostgreSQL and its standby
    /// ([`BrokerConfig::commit_window`]).
    #[serde(default)]
    pub commit_window_us: Option<u64>,
    /// This relay is a node of a cluster: its name among the nodes (`broker nodes list`).
    /// Letters, digits, `-` and `_`.
    #[serde(default)]
    pub node_id: Option<String>,
    /// The cluster's PostgreSQL database (a libpq URL; several hosts with
    /// `target_session_attrs=read-write` follow a promoted standby), instead of the embedded
    /// store in `data_dir`. `broker db migrate` creates its schema. Needs `node_id`.
    #[serde(default)]
    pub cluster_db: Option<String>,
    /// The NATS servers of the cluster's bus (`nats://HOST:4222`, several for a cluster of
    /// servers): what this node publishes that sessions on other nodes need, and theirs. Needs
    /// `cluster_db` (the bus carries no truth).
    #[serde(default)]
    pub cluster_bus: Vec<String>,
    /// The CA certificate (PEM) that signed the bus servers' certificates: the node speaks TLS
    /// to every bus server and checks its certificate against this CA and the URL's host name.
    /// Credentials go in the URL (`nats://USER:PASSWORD@bus1:4222`, or `nats://TOKEN@…`).
    #[serde(default)]
    pub cluster_bus_ca: Option<PathBuf>,
    /// The node's client certificate towards the bus (PEM; for a server whose `tls` block says
    /// `verify: true`). Needs `cluster_bus_key` and `cluster_bus_ca`.
    #[serde(default)]
    pub cluster_bus_cert: Option<PathBuf>,
    /// The private key of `cluster_bus_cert` (PEM).
    #[serde(default)]
    pub cluster_bus_key: Option<PathBuf>,
    /// How often a cluster node compares the job orders it holds with the database's open jobs
    /// and repairs what the bus lost (an order missing, or not cleared, in two sweeps in a row).
    /// 0 turns the sweep off. Not on a node that is also a child relay.
    #[serde(default = "defaults::cluster_order_sweep_secs")]
    pub cluster_order_sweep_secs: u64,
    /// A child relay checks a firmware job for its own program against this key (publisher.pub
    /// of `host-agent keys generate`) before it downloads a byte, as devices do. Unset: it
    /// refuses to replace its program.
    #[serde(default)]
    pub publisher_key: Option<PathBuf>,
    /// At a parent: the child relays and the devices each may speak for (`[[relays]]`, `id` and
    /// `serials`, glob patterns such as "OSAKA-*"). A message a child forwards for any other
    /// serial is refused and counted.
    #[serde(default)]
    pub relays: Vec<crate::relays::RelayAssignment>,
}

/// `parent = "mqtts://…"`, checked as the agents check their `--broker`.
/// `parent = "mqtts://…"` or `parent = ["mqtts://n1…", "mqtts://n2…"]`.
fn parent_urls<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<protocol::url::BrokerUrl>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let urls = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    urls.iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

/// Files the gateway may spend on clients and handshakes together (of the 20,000 a process may
/// hold on the machines we run on; see `ulimit -Hn`).
const MAX_FILES_FOR_CLIENTS: usize = 19_800;

/// listen(2) takes the backlog as an int, and the kernel caps it at `net.core.somaxconn`
/// (at most 4096 by default, 65535 at most before Linux 5.4's wider field).
const MAX_LISTEN_BACKLOG: u32 = 65_535;

/// A PUBACK held longer than this would hold up a device that waits for it: past a second the
/// commit has failed or stalled, and the PUBACK should go alone.
const MAX_PUBACK_HOLD_MS: u64 = 1000;

mod defaults {
    use super::*;
    pub fn listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8883))
    }
    pub fn data_dir() -> PathBuf {
        PathBuf::from("data")
    }
    pub fn pki_dir() -> PathBuf {
        PathBuf::from("pki")
    }
    pub fn server_name() -> String {
        "relay-1".into()
    }
    pub fn parent_interval_secs() -> u64 {
        300
    }
    pub fn uplink_batch_max_items() -> usize {
        100
    }
    pub fn uplink_batch_max_bytes() -> usize {
        128 * 1024
    }
    pub fn uplink_batch_delay_ms() -> u64 {
        200
    }
    pub fn commit_window_us() -> u64 {
        1000
    }
    pub fn cluster_commit_window_us() -> u64 {
        5000
    }
    pub fn cluster_order_sweep_secs() -> u64 {
        5
    }
    pub fn tls_ticket_lifetime_secs() -> u64 {
        24 * 3600
    }
    pub fn tls_ticket_rotation_secs() -> u64 {
        3600
    }
    pub fn handshake_timeout_secs() -> u64 {
        10
    }
    pub fn connect_timeout_secs() -> u64 {
        10
    }
    pub fn first_byte_timeout_secs() -> u64 {
        5
    }
    pub fn puback_hold_ms() -> u64 {
        50
    }
    pub fn metrics_header_timeout_secs() -> u64 {
        10
    }
    pub fn metrics_max_connections() -> usize {
        16
    }
    pub fn max_packet_bytes() -> usize {
        256 * 1024
    }
    pub fn max_payload_bytes() -> usize {
        64 * 1024
    }
    pub fn max_clients() -> usize {
        15_000
    }
    pub fn max_handshakes() -> usize {
        1_024
    }
    pub fn listen_backlog() -> u32 {
        4_096
    }
    pub fn max_inflight() -> usize {
        100
    }
    pub fn max_subscriptions() -> usize {
        32
    }
    pub fn max_connections_per_identity() -> usize {
        8
    }
    pub fn session_log_lines_per_second() -> u64 {
        crate::gateway::limits::SessionLogs::PER_SECOND
    }
    pub fn connect_rate_per_source() -> u32 {
        50
    }
    pub fn connect_burst_per_source() -> u32 {
        1_000
    }
    pub fn yes() -> bool {
        true
    }
    pub fn finished_visible_secs() -> u64 {
        600
    }
    pub fn default_deadline_secs() -> u64 {
        7 * 24 * 3600
    }
    pub fn default_max_attempts() -> u32 {
        3
    }
    pub fn last_seen_resolution_secs() -> u64 {
        60
    }
    pub fn overdue_margin_secs() -> u64 {
        300
    }
    pub fn max_active_alarms_per_device() -> usize {
        64
    }
    pub fn alarm_burst_per_device() -> u32 {
        16
    }
    pub fn alarms_per_minute_per_device() -> u32 {
        12
    }
}

/// The highest `max_active_alarms_per_device`: a thousand alarms of at most ~1.2 KiB each keep a
/// device's view near a megabyte, far below what hosts accept (16 MiB).
pub const MAX_ACTIVE_ALARMS_PER_DEVICE: usize = 1000;

/// The coarsest `last_seen_resolution_secs`: an hour, past which "last seen" no longer tells
/// an operator whether a device is still reporting.
pub const MAX_LAST_SEEN_RESOLUTION_SECS: u64 = 3600;

/// The longest default deadline: ten years, far beyond any job, well inside what time arithmetic holds.
pub const MAX_DEFAULT_DEADLINE_SECS: u64 = 10 * 366 * 24 * 3600;

impl Default for BrokerConfig {
    fn default() -> Self {
        // An empty TOML document yields every default; this keeps the two in one place.
        toml::from_str("").expect("every field has a default")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {source}", .path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Notify(String),
    #[error(transparent)]
    Relays(#[from] crate::relays::AssignmentError),
    #[error("{key} = {value} is not valid: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

impl BrokerConfig {
    /// How long a busy relay's small batch waits for more ([`BrokerConfig::commit_window_us`]).
    /// A cluster node waits longer by default: each commit it saves is a round trip to
    /// PostgreSQL and its standby and a flush on both, and the node's commit already takes
    /// milliseconds (bench/RESULTS.md, "A cluster's commit window").
    pub fn commit_window(&self) -> Duration {
        let default = if self.cluster_db.is_some() {
            defaults::cluster_commit_window_us()
        } else {
            defaults::commit_window_us()
        };
        Duration::from_micros(self.commit_window_us.unwrap_or(default))
    }

    pub fn load(path: &Path) -> Result<BrokerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks what serde cannot, before any port is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, value: &dyn ToString, why| ConfigError::Invalid {
            key,
            value: value.to_string(),
            why,
        };
        if self.max_payload_bytes > self.max_packet_bytes {
            return Err(invalid(
                "max_payload_bytes",
                &self.max_payload_bytes,
                "it must not exceed max_packet_bytes",
            ));
        }
        // Every admitted client and every handshake in flight holds a file; the store, the
        // listeners and the notifier need a few more. A process may hold 20,000 here.
        if self.max_clients == 0 || self.max_clients + self.max_handshakes > MAX_FILES_FOR_CLIENTS {
            return Err(invalid(
                "max_clients",
                &self.max_clients,
                "max_clients + max_handshakes must be at most 19800 (a process may hold 20,000 \
                 files; the store and listeners need the rest): lower one of them",
            ));
        }
        if self.handshake_timeout_secs == 0 {
            return Err(invalid("handshake_timeout_secs", &0, "use at least 1"));
        }
        if !self.parent.is_empty() && self.relay_id.is_none() {
            return Err(invalid(
                "parent",
                &"set",
                "a child relay needs its relay_id (--relay-id), the id of its relay certificate",
            ));
        }
        if self.cluster_db.is_some() && self.node_id.is_none() {
            return Err(invalid(
                "cluster_db",
                &"set",
                "a cluster node needs its node_id (--node-id N1), its name among the nodes",
            ));
        }
        if !self.cluster_bus.is_empty() && self.cluster_db.is_none() {
            return Err(invalid(
                "cluster_bus",
                &self.cluster_bus.join(","),
                "the bus joins nodes that share a cluster database: set cluster_db (--cluster-db) too",
            ));
        }
        let bus_tls = [
            ("cluster_bus_ca", &self.cluster_bus_ca),
            ("cluster_bus_cert", &self.cluster_bus_cert),
            ("cluster_bus_key", &self.cluster_bus_key),
        ];
        if let Some((key, Some(path))) = bus_tls.iter().find(|(_, p)| p.is_some())
            && self.cluster_bus.is_empty()
        {
            return Err(invalid(
                key,
                &path.display(),
                "TLS settings for the cluster bus need the bus: set cluster_bus (--cluster-bus) too",
            ));
        }
        if self.cluster_bus_cert.is_some() != self.cluster_bus_key.is_some() {
            return Err(invalid(
                "cluster_bus_cert",
                &self
                    .cluster_bus_cert
                    .as_deref()
                    .unwrap_or(Path::new("(unset)"))
                    .display(),
                "cluster_bus_cert and cluster_bus_key go together: give both, or neither",
            ));
        }
        if let Some(cert) = &self.cluster_bus_cert
            && self.cluster_bus_ca.is_none()
        {
            return Err(invalid(
                "cluster_bus_cert",
                &cert.display(),
                "a client certificate is sent over TLS only: set cluster_bus_ca (--cluster-bus-ca), the CA of the bus servers",
            ));
        }
        if let Some(node) = &self.node_id
            && (node.is_empty()
                || node.len() > 64
                || !node
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(invalid(
                "node_id",
                node,
                "use 1 to 64 letters, digits, - and _ (N1, relay-tokyo-2)",
            ));
        }
        if self.parent_interval_secs == 0 {
            return Err(invalid(
                "parent_interval_secs",
                &0,
                "use at least 1; the default is 300",
            ));
        }
        if let Some(us) = self.commit_window_us
            && us > 100_000
        {
            return Err(invalid(
                "commit_window_us",
                &us,
                "use 0 (never wait) to 100000 (100 ms); the default is 1000, or 5000 on a cluster node",
            ));
        }
        if self.uplink_batch_max_items == 0 {
            return Err(invalid(
                "uplink_batch_max_items",
                &0,
                "use at least 1; the default is 100",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.uplink_batch_max_bytes) {
            return Err(invalid(
                "uplink_batch_max_bytes",
                &self.uplink_batch_max_bytes,
                "use 1024 to 16777216, under the parent's max_packet_bytes; the default is 131072",
            ));
        }
        crate::relays::Assignments::new(&self.relays).map_err(ConfigError::Relays)?;
        let max_lifetime = crate::gateway::tickets::MAX_LIFETIME_SECS;
        if !(1..=max_lifetime).contains(&self.tls_ticket_lifetime_secs) {
            return Err(invalid(
                "tls_ticket_lifetime_secs",
                &self.tls_ticket_lifetime_secs,
                "use 1 to 604800 (7 days, TLS 1.3's limit); the default is 86400",
            ));
        }
        if self.tls_ticket_rotation_secs == 0 {
            return Err(invalid(
                "tls_ticket_rotation_secs",
                &0,
                "use at least 1; the default is 3600",
            ));
        }
        if self.puback_hold_ms > MAX_PUBACK_HOLD_MS {
            return Err(invalid(
                "puback_hold_ms",
                &self.puback_hold_ms,
                "use at most 1000 (0 sends every PUBACK at once); the default is 50",
            ));
        }
        if self.first_byte_timeout_secs == 0 {
            return Err(invalid(
                "first_byte_timeout_secs",
                &0,
                "use at least 1; the default is 5",
            ));
        }
        if self.metrics_header_timeout_secs == 0 {
            return Err(invalid(
                "metrics_header_timeout_secs",
                &0,
                "use at least 1; the default is 10",
            ));
        }
        if self.metrics_max_connections == 0 {
            return Err(invalid(
                "metrics_max_connections",
                &0,
                "use at least 1; the default is 16",
            ));
        }
        if self.max_handshakes == 0 {
            return Err(invalid("max_handshakes", &0, "use at least 1"));
        }
        if self.listen_backlog == 0 || self.listen_backlog > MAX_LISTEN_BACKLOG {
            return Err(invalid(
                "listen_backlog",
                &self.listen_backlog,
                "use 1 to 65535; the default is 4096",
            ));
        }
        if self.max_inflight == 0 {
            return Err(invalid(
                "max_inflight",
                &0,
                "use at least 1; the default is 100",
            ));
        }
        if self.max_subscriptions == 0 {
            return Err(invalid(
                "max_subscriptions",
                &0,
                "use at least 1; the default is 32",
            ));
        }
        if self.max_connections_per_identity == 0 {
            return Err(invalid(
                "max_connections_per_identity",
                &0,
                "use at least 1; the default is 8",
            ));
        }
        if self.connect_rate_per_source > 0 && self.connect_burst_per_source == 0 {
            return Err(invalid(
                "connect_burst_per_source",
                &0,
                "use at least 1 (or connect_rate_per_source = 0 for no limit); the default is 1000",
            ));
        }
        if !(1..=MAX_DEFAULT_DEADLINE_SECS).contains(&self.default_deadline_secs) {
            return Err(invalid(
                "default_deadline_secs",
                &self.default_deadline_secs,
                "use 1 to 316224000 (ten years); the default is 604800 (7 days)",
            ));
        }
        if self.overdue_margin_secs > MAX_DEFAULT_DEADLINE_SECS {
            return Err(invalid(
                "overdue_margin_secs",
                &self.overdue_margin_secs,
                "use 0 to 316224000 (ten years); the default is 300",
            ));
        }
        if self.last_seen_resolution_secs > MAX_LAST_SEEN_RESOLUTION_SECS {
            return Err(invalid(
                "last_seen_resolution_secs",
                &self.last_seen_resolution_secs,
                "use 0 (every message) to 3600; the default is 60",
            ));
        }
        if !(1..=MAX_ACTIVE_ALARMS_PER_DEVICE).contains(&self.max_active_alarms_per_device) {
            return Err(invalid(
                "max_active_alarms_per_device",
                &self.max_active_alarms_per_device,
                "use 1 to 1000; the default is 64",
            ));
        }
        if self.alarm_burst_per_device == 0 {
            return Err(invalid(
                "alarm_burst_per_device",
                &0,
                "use at least 1; the default is 16",
            ));
        }
        self.notify.check().map_err(ConfigError::Notify)?;
        if !(1..=protocol::validate::MAX_ATTEMPTS).contains(&self.default_max_attempts) {
            return Err(invalid(
                "default_max_attempts",
                &self.default_max_attempts,
                "use 1 to 10, the range a submission may ask for",
            ));
        }
        Ok(())
    }

    pub fn last_seen_resolution(&self) -> Duration {
        Duration::from_secs(self.last_seen_resolution_secs)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_secs(self.first_byte_timeout_secs)
    }
    pub fn metrics_header_timeout(&self) -> Duration {
        Duration::from_secs(self.metrics_header_timeout_secs)
    }

    /// The gateway's part of the configuration.
    /// What the core does as a child relay and as a parent.
    pub fn relay_settings(&self) -> Result<crate::core::relay::RelaySettings, ConfigError> {
        Ok(crate::core::relay::RelaySettings {
            forward_to_parent: !self.parent.is_empty(),
            assignments: crate::relays::Assignments::new(&self.relays)?,
        })
    }

    /// How ticket keys seal and open; `None`: no tickets (`tls_tickets = false`).
    pub fn ticket_settings(&self) -> Option<crate::gateway::tickets::TicketSettings> {
        self.tls_tickets
            .then(|| crate::gateway::tickets::TicketSettings {
                lifetime: Duration::from_secs(self.tls_ticket_lifetime_secs),
                rotation: Duration::from_secs(self.tls_ticket_rotation_secs),
            })
    }

    pub fn gateway_settings(&self) -> crate::gateway::GatewaySettings {
        crate::gateway::GatewaySettings {
            handshake_timeout: self.handshake_timeout(),
            first_byte_timeout: self.first_byte_timeout(),
            connect_timeout: self.connect_timeout(),
            puback_hold: Duration::from_millis(self.puback_hold_ms),
            max_packet_bytes: self.max_packet_bytes,
            max_clients: self.max_clients,
            max_handshakes: self.max_handshakes,
            max_inflight: self.max_inflight,
            max_subscriptions: self.max_subscriptions,
            max_connections_per_identity: self.max_connections_per_identity,
            connect_rate_per_source: self.connect_rate_per_source,
            connect_burst_per_source: self.connect_burst_per_source,
            connect_rate_exempt_loopback: self.connect_rate_exempt_loopback,
            session_log_lines_per_second: self.session_log_lines_per_second,
        }
    }

    /// The core's alarm, presence and notification settings.
    pub fn alert_settings(&self) -> crate::core::AlertSettings {
        crate::core::AlertSettings {
            overdue_margin: Duration::from_secs(self.overdue_margin_secs),
            notify: self.notify.clone(),
            alarm_limits: self.alarm_limits(),
            offline_log_lines_per_second: self.session_log_lines_per_second,
        }
    }

    /// What one device may make the relay hold and send in alarms.
    pub fn alarm_limits(&self) -> crate::core::AlarmLimits {
        crate::core::AlarmLimits {
            max_active: self.max_active_alarms_per_device,
            burst: self.alarm_burst_per_device,
            per_minute: self.alarms_per_minute_per_device,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults_and_unknown_keys_are_refused() {
        let cfg: BrokerConfig = toml::from_str("").unwrap();
        assert_eq!(cfg.listen.port(), 8883);
        assert_eq!(cfg.ws_listen, None);
        let cfg: BrokerConfig = toml::from_str("ws_listen = \"0.0.0.0:8443\"").unwrap();
        assert_eq!(cfg.ws_listen.map(|a| a.port()), Some(8443));
        cfg.validate().unwrap();
        let err = toml::from_str::<BrokerConfig>("listn = \"127.0.0.1:1\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/broker.toml");
        let cfg = BrokerConfig::load(&path).unwrap();
        cfg.validate().unwrap();
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let cfg = BrokerConfig {
            max_payload_bytes: 10,
            max_packet_bytes: 5,
            ..Default::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("max_packet_bytes"), "{e}");
    }

    #[test]
    fn handshake_and_metrics_deadlines_are_checked() {
        let cfg = BrokerConfig::default();
        assert_eq!(
            (
                cfg.first_byte_timeout_secs,
                cfg.metrics_header_timeout_secs,
                cfg.metrics_max_connections
            ),
            (5, 10, 16)
        );
        let cases = [
            (
                "first_byte_timeout_secs = 0",
                Some("first_byte_timeout_secs = 0"),
            ),
            ("first_byte_timeout_secs = 11", None),
            (
                "handshake_timeout_secs = 60\nfirst_byte_timeout_secs = 60",
                None,
            ),
            (
                "metrics_header_timeout_secs = 0",
                Some("metrics_header_timeout_secs = 0"),
            ),
            (
                "metrics_max_connections = 0",
                Some("metrics_max_connections = 0"),
            ),
            ("metrics_max_connections = 1", None),
        ];
        for (text, want) in cases {
            let cfg: BrokerConfig = toml::from_str(text).unwrap();
            match (cfg.validate(), want) {
                (Ok(()), None) => {}
                (Err(e), Some(want)) => assert!(e.to_string().contains(want), "{e}"),
                (got, want) => panic!("{text}: {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn the_listen_backlog_is_one_listen_accepts() {
        assert_eq!(BrokerConfig::default().listen_backlog, 4096);
        for (text, want) in [
            ("listen_backlog = 0", Some("listen_backlog = 0")),
            ("listen_backlog = 65536", Some("listen_backlog = 65536")),
            ("listen_backlog = 1", None),
            ("listen_backlog = 65535", None),
        ] {
            let cfg: BrokerConfig = toml::from_str(text).unwrap();
            match (cfg.validate(), want) {
                (Ok(()), None) => {}
                (Err(e), Some(want)) => assert!(e.to_string().contains(want), "{e}"),
                (got, want) => panic!("{text}: {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn job_defaults_have_documented_values_and_ranges() {
        let cfg = BrokerConfig::default();
        assert_eq!(
            (cfg.default_deadline_secs, cfg.default_max_attempts),
            (604_800, 3)
        );
        let cases = [
            (0, 3, Some("default_deadline_secs = 0")),
            (
                MAX_DEFAULT_DEADLINE_SECS + 1,
                3,
                Some("default_deadline_secs"),
            ),
            (60, 0, Some("default_max_attempts = 0")),
            (60, 11, Some("default_max_attempts = 11")),
            (1, 1, None),
            (MAX_DEFAULT_DEADLINE_SECS, 10, None),
        ];
        for (deadline, attempts, want) in cases {
            let cfg = BrokerConfig {
                default_deadline_secs: deadline,
                default_max_attempts: attempts,
                ..Default::default()
            };
            match (cfg.validate(), want) {
                (Ok(()), None) => {}
                (Err(e), Some(want)) => assert!(e.to_string().contains(want), "{e}"),
                (got, want) => panic!("{deadline} {attempts}: {got:?}, wanted {want:?}"),
            }
        }
        let cfg: BrokerConfig =
            toml::from_str("default_deadline_secs = 3600\ndefault_max_attempts = 5").unwrap();
        assert_eq!(
            (cfg.default_deadline_secs, cfg.default_max_attempts),
            (3600, 5)
        );
    }

    #[test]
    fn last_seen_moves_once_a_minute_by_default_and_at_most_once_an_hour() {
        assert_eq!(
            BrokerConfig::default().last_seen_resolution(),
            Duration::from_secs(60)
        );
        for (value, ok) in [(0, true), (3600, true), (3601, false)] {
            let cfg: BrokerConfig =
                toml::from_str(&format!("last_seen_resolution_secs = {value}")).unwrap();
            assert_eq!(cfg.last_seen_resolution(), Duration::from_secs(value));
            match cfg.validate() {
                Ok(()) => assert!(ok, "{value} accepted"),
                Err(e) => {
                    assert!(!ok, "{value}: {e}");
                    assert!(e.to_string().contains("last_seen_resolution_secs"), "{e}");
                }
            }
        }
    }

    #[test]
    fn the_commit_window_has_its_documented_default_and_range() {
        let one = BrokerConfig::default();
        assert_eq!(one.commit_window(), Duration::from_millis(1));
        let node = BrokerConfig {
            cluster_db: Some("postgresql://chukei@db/chukei".into()),
            ..BrokerConfig::default()
        };
        assert_eq!(node.commit_window(), Duration::from_millis(5));
        let set = BrokerConfig {
            commit_window_us: Some(0),
            ..node
        };
        assert_eq!(set.commit_window(), Duration::ZERO);
        for (value, ok) in [(0, true), (100_000, true), (100_001, false)] {
            let cfg: BrokerConfig = toml::from_str(&format!("commit_window_us = {value}")).unwrap();
            match cfg.validate() {
                Ok(()) => assert!(ok, "{value} accepted"),
                Err(e) => {
                    assert!(!ok, "{value}: {e}");
                    assert!(e.to_string().contains("commit_window_us"), "{e}");
                }
            }
        }
    }

    #[test]
    fn alarm_limits_have_documented_defaults_and_ranges() {
        let cfg = BrokerConfig::default();
        assert_eq!(
            (
                cfg.max_active_alarms_per_device,
                cfg.alarm_burst_per_device,
                cfg.alarms_per_minute_per_device,
                cfg.notify.coalesce_secs
            ),
            (64, 16, 12, 5)
        );
        for (text, want) in [
            (
                "max_active_alarms_per_device = 0",
                "max_active_alarms_per_device = 0",
            ),
            (
                "max_active_alarms_per_device = 1001",
                "max_active_alarms_per_device",
            ),
            ("alarm_burst_per_device = 0", "alarm_burst_per_device = 0"),
            ("[notify]\ncoalesce_secs = 3601", "coalesce_secs"),
        ] {
            let cfg: BrokerConfig = toml::from_str(text).unwrap();
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let cfg: BrokerConfig =
            toml::from_str("alarms_per_minute_per_device = 0\n[notify]\ncoalesce_secs = 0")
                .unwrap();
        cfg.validate().unwrap();
    }
}
