//! `broker`: the chukei relay. Flags and config here; everything else in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

mod demo;
mod demo_cluster;
mod demo_rollout;
mod demo_tree;

use anyhow::Context;
use broker::config::BrokerConfig;
use clap::{Args, Parser, Subcommand};
use protocol::Role;
use protocol::log_format::LogFormat;
use tokio_util::sync::CancellationToken;

/// The chukei relay: devices and hosts behind firewalls both connect OUT to it.
///
/// Start with `broker demo` to see a whole fleet at work, or set one up by hand:
/// `broker pki init --dir pki`, then `broker pki issue` a certificate per device and host,
/// then `broker run --pki-dir pki --data-dir data --listen 0.0.0.0:8883`.
#[derive(Debug, Parser)]
#[command(name = "broker", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and issue certificates: every device, host and integrator needs one.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Run the relay.
    Run(Box<RunArgs>),
    /// Run a complete demo in a temporary folder: a broker, N simulated copiers and a host that
    /// asks every copier for its counters.
    Demo(DemoArgs),
    /// Write a consistent copy of a relay's store to a file, while it runs (through its control
    /// socket, DATA_DIR/control.sock) or while it is stopped. Everything acked before the backup
    /// began is in it. Certificates (--pki-dir) are not: keep those safe separately.
    #[command(
        after_help = "Example:\n  broker backup --data-dir data --out /var/backups/chukei-$(date +%F).redb"
    )]
    Backup {
        /// The relay's data directory (its --data-dir).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The file to write; replaced only once the copy is complete.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Ask a running relay to read its configuration again (the same as `kill -HUP PID`): the
    /// revocation list, limits and notification rules apply at once, and open sessions of a
    /// certificate revoked since are closed. A configuration with an error is refused with its
    /// reason in the relay's log, and the running one kept.
    #[command(
        after_help = "Example:\n  broker pki revoke --dir pki --id C123\n  broker reload --pid-file /run/chukei/broker.pid"
    )]
    Reload {
        /// The file the relay wrote its process id to (its --pid-file, or pid_file in its config).
        #[arg(long, value_name = "FILE")]
        pid_file: PathBuf,
    },
    /// Run a child relay so that its own program can be replaced by a firmware job (`host-agent
    /// jobs submit --relay ID --kind firmware --artifact VERSION`). The supervisor runs
    /// PROGRAM_DIR/current with `run` and the arguments after `--` (installing this broker there
    /// the first time). When the relay has downloaded and checked a new program it exits; the
    /// supervisor keeps the old one as PROGRAM_DIR/fallback and starts the new one, which must
    /// reach its parent within --confirm-secs. If it exits first or is late, the old program
    /// comes back and the job fails with the reason. Signals (TERM, INT, HUP) go to the relay.
    #[command(
        after_help = "Example:\n  broker supervise --program-dir /var/lib/chukei/program -- \\\n      --pki-dir child-pki --relay-id R1 --data-dir child --parent mqtts://parent.example.com:8883 \\\n      --publisher-key publisher.pub"
    )]
    Supervise {
        /// Where the programs are kept: current, fallback, and a new one while it is staged.
        #[arg(long, value_name = "DIR")]
        program_dir: PathBuf,
        /// A new program must reach its parent within this many seconds, or the old one is
        /// started again.
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        confirm_secs: u64,
        /// The program to install at the first start. Default: this broker executable.
        #[arg(long, value_name = "FILE")]
        program: Option<PathBuf>,
        /// The relay's `broker run` flags.
        #[arg(last = true, value_name = "RUN FLAGS")]
        run_args: Vec<std::ffi::OsString>,
    },
    /// The cluster's PostgreSQL database.
    #[command(subcommand)]
    Db(DbCommand),
    /// The nodes of a cluster, as its database knows them.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Make an empty data directory hold the store saved by `broker backup`, then start a relay
    /// on it with `broker run --data-dir DIR`. Refused if DIR already has a store.
    #[command(
        after_help = "Example:\n  broker restore --from /var/backups/chukei-2026-12-03.redb --data-dir data2"
    )]
    Restore {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The data directory to restore into (created if missing; must hold no store).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Create the relay's schema in an empty database, or upgrade an older one. A relay refuses
    /// to run on a database whose schema it does not know; a newer schema is left untouched.
    #[command(
        after_help = "Example:\n  createdb -O chukei chukei\n  broker db migrate --cluster-db 'postgresql://chukei@db1/chukei'"
    )]
    Migrate {
        #[command(flatten)]
        db: ClusterDb,
    },
}

/// `--cluster-db`, as `db migrate` and `nodes list|forget` take it.
#[derive(Debug, clap::Args)]
struct ClusterDb {
    /// The cluster's database, as a libpq URL or key=value string (or $CHUKEI_CLUSTER_DB, which
    /// keeps a password off the command line).
    #[arg(
        long,
        value_name = "URL",
        env = "CHUKEI_CLUSTER_DB",
        hide_env_values = true
    )]
    cluster_db: String,
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// Every node that has run on the cluster database: its address, when it started, its last
    /// heartbeat (every 5 s; a node silent for 15 s is shown as gone) and its devices.
    #[command(
        after_help = "Example:\n  broker nodes list --cluster-db 'postgresql://chukei@db1/chukei'"
    )]
    List {
        #[command(flatten)]
        db: ClusterDb,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node that is gone for good (decommissioned, renamed) from `nodes list`. Refused
    /// while it is up, or while the leading node still counts devices as online at it (it marks
    /// them offline, or finds them on another node, within seconds of the 15 s grace period).
    #[command(
        after_help = "Example:\n  broker nodes forget --cluster-db 'postgresql://chukei@db1/chukei' N3\n\nA node started again under the same name simply appears again."
    )]
    Forget {
        #[command(flatten)]
        db: ClusterDb,
        /// The node's name (its --node-id).
        #[arg(value_name = "NODE")]
        node: String,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create a CA and the relay's server certificate: DIR/ca.pem, ca.key, server.pem, server.key.
    #[command(after_help = "Example:\n  broker pki init --dir pki --san relay.example.com")]
    Init {
        /// Folder to create the files in.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Another name (DNS or IP) the relay is reached by; localhost and 127.0.0.1 are always in.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
    /// Issue a client certificate: DIR/{role}/{id}.pem and .key. The id is the certificate's CN
    /// and the only MQTT client id it may connect with; the role decides what it may touch.
    #[command(
        after_help = "Examples:\n  broker pki issue --dir pki --role device --id C123\n  broker pki issue --dir pki --role host --id svc\n  broker pki issue --dir pki --role integrator --id crm\n  broker pki issue --dir pki --role relay --id R1 --san child1.customer.example\n\nA child relay needs only ca.pem, relay/R1.pem and relay/R1.key (and crl.pem if any) in its\nown PKI folder, never ca.key."
    )]
    Issue {
        /// The folder `pki init` created.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// device (a copier: its own topics only), host (submits jobs, reads the views),
        /// integrator (reads the views only) or relay (a child relay: its certificate towards its
        /// parent and towards its devices).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The serial (device) or name (host, integrator, relay): 1 to 64 ASCII letters, digits
        /// or -.
        #[arg(long, value_name = "ID")]
        id: String,
        /// For a relay: a DNS name or IP address its devices reach it by (repeatable); localhost
        /// and 127.0.0.1 are always included.
        #[arg(long, value_name = "NAME")]
        san: Vec<String>,
    },
    /// Issue a certificate for the cluster's own connections: a PostgreSQL or NATS server's
    /// (under its names), or a node's towards them (its CN is the database user PostgreSQL's
    /// `cert` authentication logs it in as). DIR/cluster/NAME.pem and .key. It has no role, so
    /// the relay never takes it from an MQTT client.
    #[command(
        after_help = "Examples:\n  broker pki cluster-cert --dir pki --name db1 --san db1.internal --san 10.0.0.5\n  broker pki cluster-cert --dir pki --name bus1 --san bus1.internal\n  broker pki cluster-cert --dir pki --name chukei     # the nodes' client certificate (database user chukei)\n\nThen: broker run … --cluster-db 'postgresql://chukei@db1.internal/chukei?sslmode=verify-full&sslrootcert=pki/ca.pem&sslcert=pki/cluster/chukei.pem&sslkey=pki/cluster/chukei.key'\n  --cluster-bus nats://bus1.internal:4222 --cluster-bus-ca pki/ca.pem --cluster-bus-cert pki/cluster/chukei.pem --cluster-bus-key pki/cluster/chukei.key"
    )]
    ClusterCert {
        /// The folder `pki init` created.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The certificate's CN: a server's name, or the database user a node logs in as.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// A DNS name or IP address the server is reached by (repeatable); none: NAME itself.
        #[arg(long, value_name = "NAME")]
        san: Vec<String>,
    },
    /// Revoke a client certificate: add it to DIR/crl.pem, the revocation list signed by the CA.
    /// The relay reads the list at start and on a reload (`broker reload`, or SIGHUP), then
    /// closes the certificate's open sessions and refuses it at every handshake.
    #[command(
        after_help = "Examples:\n  broker pki revoke --dir pki --id C123\n  broker pki revoke --dir pki --role host --id svc\n  broker pki revoke --dir pki --serial 3A:0F:9C:...\n  broker pki revoke --dir pki --cert lost-laptop.pem\n\nThen reload the relay: broker reload --pid-file FILE (or kill -HUP its pid)."
    )]
    Revoke {
        /// The folder `pki init` created.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The id whose certificate `pki issue` wrote to DIR/ROLE/ID.pem.
        #[arg(long, value_name = "ID", required_unless_present_any = ["serial", "cert"], conflicts_with_all = ["serial", "cert"])]
        id: Option<String>,
        /// With --id, when the same id has certificates in more than one role.
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
        /// The certificate's serial number in hex, as `openssl x509 -noout -serial` prints it.
        #[arg(long, value_name = "HEX", conflicts_with = "cert")]
        serial: Option<String>,
        /// The certificate itself (PEM).
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse::<Role>().map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Example:\n  broker run --pki-dir pki --data-dir data --listen 0.0.0.0:8883\n\nEvery flag overrides the same key of --config; see config/broker.toml."
)]
struct RunArgs {
    /// TOML config file (see config/broker.toml); flags override its keys.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where to keep chukei.redb (jobs, results, the ack journal). Default: data
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The folder `broker pki init` created. Default: pki
    #[arg(long, value_name = "DIR")]
    pki_dir: Option<PathBuf>,
    /// Address for MQTT over TLS. Port 0 picks a free port (see --ready-file). Default: 127.0.0.1:8883
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Also accept MQTT over WebSocket over TLS here (wss://HOST:PORT/mqtt), for agents whose
    /// network lets only HTTPS out. Port 0 picks a free port. Default: none
    #[arg(long, value_name = "ADDR")]
    ws_listen: Option<SocketAddr>,
    /// The "managing server" name shown in the job list. Default: relay-1
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Drop a TLS handshake that takes longer. Default: 10
    #[arg(long, value_name = "SECS")]
    handshake_timeout_secs: Option<u64>,
    /// Drop a new connection that sends nothing of its TLS ClientHello in this time (the
    /// handshake timeout applies alone when it is shorter). Default: 5
    #[arg(long, value_name = "SECS")]
    first_byte_timeout_secs: Option<u64>,
    /// Drop a client that does not send CONNECT in time. Default: 10
    #[arg(long, value_name = "SECS")]
    connect_timeout_secs: Option<u64>,
    /// Hold a device's PUBACK up to this long for the message's ack, so both leave in one write
    /// (0: every PUBACK at once, before the commit; at most 1000). Default: 50
    #[arg(long, value_name = "MS")]
    puback_hold_ms: Option<u64>,
    /// Largest MQTT packet a client may send. Default: 262144
    #[arg(long, value_name = "BYTES")]
    max_packet_bytes: Option<usize>,
    /// Largest message payload decoded; bigger ones are refused with a reason. Default: 65536
    #[arg(long, value_name = "BYTES")]
    max_payload_bytes: Option<usize>,
    /// Clients admitted at once. Default: 15000
    #[arg(long, value_name = "N")]
    max_clients: Option<usize>,
    /// TLS handshakes in flight at once. Default: 1024
    #[arg(long, value_name = "N")]
    max_handshakes: Option<usize>,
    /// Connections the kernel holds for the listeners until the relay accepts them (capped by
    /// the kernel's net.core.somaxconn): room for a whole fleet reconnecting at once. Default: 4096
    #[arg(long, value_name = "N")]
    listen_backlog: Option<u32>,
    /// QoS 1 messages from one client the relay may hold not yet acknowledged to it; one more
    /// closes that client. Default: 100
    #[arg(long, value_name = "N")]
    max_inflight: Option<usize>,
    /// Distinct topic filters one client may subscribe to; more closes that client. Default: 32
    #[arg(long, value_name = "N")]
    max_subscriptions: Option<usize>,
    /// Sessions one certificate may hold at once (hosts use client ids NAME:suffix for more
    /// than one); one more is refused at CONNECT. Default: 8
    #[arg(long, value_name = "N")]
    max_connections_per_identity: Option<usize>,
    /// New connections per second one source address may open after its burst; more are
    /// closed before the TLS handshake. 0: no limit. Default: 50
    #[arg(long, value_name = "N")]
    connect_rate_per_source: Option<u32>,
    /// New connections one source address may open at once (a NATed site reconnecting after
    /// an outage). Default: 1000
    #[arg(long, value_name = "N")]
    connect_burst_per_source: Option<u32>,
    /// Whether loopback sources (a TLS terminator on this host, benchmarks) skip the
    /// per-source rate. Default: true
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    connect_rate_exempt_loopback: Option<bool>,
    /// "session started", "session ended" and "device offline" lines logged in full per second,
    /// each; past it (a whole fleet reconnecting after a restart) the next line says how many
    /// were left out. 0: every line. Default: 100
    #[arg(long, value_name = "N")]
    session_log_lines_per_second: Option<u64>,
    /// Run as the child relay with this id: serve devices with PKI_DIR/relay/ID.pem (`broker pki
    /// issue --role relay --id ID`) and, with --parent, forward what they send to the parent
    #[arg(long, value_name = "ID")]
    relay_id: Option<protocol::RelayId>,
    /// The parent relay this child connects out to, e.g. mqtts://parent.example.com:8883; repeat
    /// for each node of a clustered parent (the child moves to the next when one is lost)
    #[arg(long, value_name = "URL")]
    parent: Vec<protocol::url::BrokerUrl>,
    /// persistent: stay connected to the parent; periodic: connect every --parent-interval-secs,
    /// exchange everything, disconnect (a queued alarm connects at once). Default: persistent
    #[arg(long, value_name = "MODE")]
    parent_session: Option<protocol::schedule::SessionMode>,
    /// How often a periodic child connects to its parent. Default: 300
    #[arg(long, value_name = "SECS")]
    parent_interval_secs: Option<u64>,
    /// A child forwards at most this many device messages in one upstream message. Default: 100
    #[arg(long, value_name = "N")]
    uplink_batch_max_items: Option<usize>,
    /// ... and at most this many bytes of them. Default: 131072
    #[arg(long, value_name = "BYTES")]
    uplink_batch_max_bytes: Option<usize>,
    /// A child waits this long for more before it sends a batch that is not full; alarms never
    /// wait. Default: 200
    #[arg(long, value_name = "MS")]
    uplink_batch_delay_ms: Option<u64>,
    /// While the relay is busy, a batch of fewer than 32 messages waits this long for more
    /// before it commits (fewer commits, less CPU for paced traffic; an idle relay's lone
    /// message commits at once, and a device's alarm ends the wait). 0: never wait. Default:
    /// 1000, or 5000 on a cluster node
    #[arg(long, value_name = "MICROS")]
    commit_window_us: Option<u64>,
    /// Run as a node of a cluster, with this name among the nodes (needs --cluster-db)
    #[arg(long, value_name = "NAME")]
    node_id: Option<String>,
    /// Keep the relay's state in the cluster's PostgreSQL database instead of DATA_DIR, e.g.
    /// 'postgresql://chukei@db1,db2/chukei?target_session_attrs=read-write' (create its schema
    /// with `broker db migrate --cluster-db URL`). TLS as with libpq:
    /// '…&sslmode=verify-full&sslrootcert=CA.pem&sslcert=NODE.pem&sslkey=NODE.key'.
    /// Or $CHUKEI_CLUSTER_DB (a systemd EnvironmentFile): a password stays off the command line
    #[arg(
        long,
        value_name = "URL",
        env = "CHUKEI_CLUSTER_DB",
        hide_env_values = true
    )]
    cluster_db: Option<String>,
    /// A NATS server of the cluster's bus, e.g. nats://bus1:4222; repeat for each server of a
    /// NATS cluster (needs --cluster-db). Or $CHUKEI_CLUSTER_BUS, the URLs separated by commas
    #[arg(
        long = "cluster-bus",
        value_name = "URL",
        env = "CHUKEI_CLUSTER_BUS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    cluster_bus: Vec<String>,
    /// Speak TLS to the bus servers and check their certificates against this CA (PEM);
    /// credentials go in the URL: nats://USER:PASSWORD@bus1:4222
    #[arg(long, value_name = "FILE")]
    cluster_bus_ca: Option<PathBuf>,
    /// This node's client certificate towards the bus (PEM), for servers that verify clients
    /// (needs --cluster-bus-key and --cluster-bus-ca)
    #[arg(long, value_name = "FILE")]
    cluster_bus_cert: Option<PathBuf>,
    /// The private key of --cluster-bus-cert (PEM)
    #[arg(long, value_name = "FILE")]
    cluster_bus_key: Option<PathBuf>,
    /// How often this cluster node compares the job orders it holds with the database's open
    /// jobs and repairs what the bus lost; 0 turns it off. Default: 5
    #[arg(long, value_name = "SECS")]
    cluster_order_sweep_secs: Option<u64>,
    /// The firmware publisher's public key (publisher.pub of `host-agent keys generate`): a child
    /// relay run by `broker supervise` checks an update of its own program against it
    #[arg(long, value_name = "FILE")]
    publisher_key: Option<PathBuf>,
    /// Send TLS session tickets, so that a reconnecting client (after a relay restart too)
    /// resumes instead of doing a full handshake; keys in DATA_DIR/tls-ticket-keys. Default: true
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    tls_tickets: Option<bool>,
    /// A ticket opens this long after its key stopped sealing (at most 604800). Default: 86400
    #[arg(long, value_name = "SECS")]
    tls_ticket_lifetime_secs: Option<u64>,
    /// A new ticket key takes over this often. Default: 3600
    #[arg(long, value_name = "SECS")]
    tls_ticket_rotation_secs: Option<u64>,
    /// Certificate revocation list (PEM, signed by the CA) checked at every handshake; read at
    /// start. Default: PKI_DIR/crl.pem if it exists (written by `broker pki revoke`)
    #[arg(long, value_name = "FILE")]
    crl_file: Option<PathBuf>,
    /// Succeeded and canceled jobs stay in the default `jobs list` this long; failed ones always
    /// stay. Default: 600
    #[arg(long, value_name = "SECS")]
    finished_visible_secs: Option<u64>,
    /// Deadline of a job submitted without one, after the later of its submission, instruction
    /// and execution times; then it ends timed-out. Default: 604800 (7 days)
    #[arg(long, value_name = "SECS")]
    default_deadline_secs: Option<u64>,
    /// Attempts at a job's risky step (a firmware write) when the submission does not say; 1 to
    /// 10. Default: 3
    #[arg(long, value_name = "N")]
    default_max_attempts: Option<u32>,
    /// Serve Prometheus metrics (connections, messages, ACL violations, jobs by status, alarms,
    /// notification queue, redb commit latency) over plain HTTP at http://ADDR/metrics, and
    /// health checks at /healthz (alive) and /readyz (200 when ready for clients, else 503 with
    /// the reason). Use a loopback or management address. Default: none
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Close a metrics connection whose request headers have not all arrived in this time.
    /// Default: 10
    #[arg(long, value_name = "SECS")]
    metrics_header_timeout_secs: Option<u64>,
    /// Connections the metrics endpoint holds at once; more are closed at once. Default: 16
    #[arg(long, value_name = "N")]
    metrics_max_connections: Option<usize>,
    /// A device in periodic mode becomes overdue, and raises an alarm, once it is this many
    /// seconds late for its check-in. Default: 300
    #[arg(long, value_name = "SECS")]
    overdue_margin_secs: Option<u64>,
    /// A device's last_seen moves with its messages at most this often (each move republishes
    /// its state view everywhere); a session opening or closing always sets it. 0 to 3600;
    /// 0: every message. Default: 60
    #[arg(long, value_name = "SECS")]
    last_seen_resolution_secs: Option<u64>,
    /// Active alarms one device may hold; a new code past it is refused and listed in the
    /// device's overflow alarm. 1 to 1000. Default: 64
    #[arg(long, value_name = "N")]
    max_active_alarms_per_device: Option<usize>,
    /// New alarms one device may raise at once, before alarms_per_minute_per_device applies.
    /// Default: 16
    #[arg(long, value_name = "N")]
    alarm_burst_per_device: Option<u32>,
    /// New alarms one device may raise per minute after its burst; more are refused and listed
    /// in its overflow alarm. 0: no rate limit. Default: 12
    #[arg(long, value_name = "N")]
    alarms_per_minute_per_device: Option<u32>,
    /// Bytes the data directory's file system must keep free: below it the relay refuses new
    /// work (reads go on) until space returns. 0: no reserve. Default: 1% of the file system,
    /// 256 KiB to 64 MiB
    #[arg(long, value_name = "BYTES")]
    min_free_bytes: Option<u64>,
    /// Tell systemd when the relay is ready (after the retained orders are republished) and
    /// ping its watchdog: for a Type=notify unit (deploy/systemd/chukei-broker.service).
    /// Default: off
    #[arg(long)]
    systemd_notify: bool,
    /// text, or json: one JSON object per line with the same fields, for log shippers.
    /// Default: text
    #[arg(long, value_name = "text|json")]
    log_format: Option<LogFormat>,
    /// Write the relay's process id here once it is ready, for `broker reload --pid-file FILE`.
    /// Default: none
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Write {"listen":"ADDR"} here once the broker accepts clients.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
}

impl RunArgs {
    /// The config file first, then each flag that was given.
    fn into_config(self) -> anyhow::Result<(BrokerConfig, Option<PathBuf>)> {
        let mut cfg = match &self.config {
            Some(path) => BrokerConfig::load(path)?,
            None => BrokerConfig::default(),
        };
        macro_rules! flag {
            ($($name:ident),*) => { $( if let Some(v) = self.$name { cfg.$name = v; } )* };
        }
        flag!(
            data_dir,
            pki_dir,
            listen,
            server_name,
            handshake_timeout_secs,
            first_byte_timeout_secs,
            connect_timeout_secs,
            puback_hold_ms,
            max_packet_bytes,
            max_payload_bytes,
            max_clients,
            max_handshakes,
            listen_backlog,
            max_inflight,
            max_subscriptions,
            max_connections_per_identity,
            connect_rate_per_source,
            connect_burst_per_source,
            connect_rate_exempt_loopback,
            session_log_lines_per_second,
            finished_visible_secs,
            default_deadline_secs,
            default_max_attempts,
            metrics_header_timeout_secs,
            metrics_max_connections,
            overdue_margin_secs,
            last_seen_resolution_secs,
            max_active_alarms_per_device,
            alarm_burst_per_device,
            alarms_per_minute_per_device,
            tls_tickets,
            tls_ticket_lifetime_secs,
            tls_ticket_rotation_secs,
            uplink_batch_max_items,
            uplink_batch_max_bytes,
            uplink_batch_delay_ms,
            parent_session,
            parent_interval_secs,
            cluster_order_sweep_secs,
            log_format
        );
        // A config key that may be unset: the flag sets it.
        macro_rules! optional_flag {
            ($($name:ident),*) => { $( if let Some(v) = self.$name { cfg.$name = Some(v); } )* };
        }
        optional_flag!(
            commit_window_us,
            relay_id,
            publisher_key,
            node_id,
            cluster_db,
            cluster_bus_ca,
            cluster_bus_cert,
            cluster_bus_key,
            metrics_listen,
            ws_listen,
            crl_file,
            min_free_bytes,
            pid_file
        );
        if !self.parent.is_empty() {
            cfg.parent = self.parent;
        }
        if !self.cluster_bus.is_empty() {
            cfg.cluster_bus = self.cluster_bus;
        }
        cfg.systemd_notify |= self.systemd_notify;
        cfg.validate()?;
        Ok((cfg, self.ready_file))
    }
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// How many simulated copiers to run.
    #[arg(long, default_value_t = 5, value_name = "N")]
    devices: usize,
    /// Run N child relays between the copiers and a parent relay where the service desk
    /// connects (claims 18–26): a firmware job passes queued → forwarded → delivered → … → succeeded
    /// through the tree, and every copier's counters come back up.
    #[arg(long, value_name = "N", conflicts_with = "cluster")]
    children: Option<usize>,
    /// Run a cluster of N relay nodes: a PostgreSQL server and three NATS servers of the demo's
    /// own (Debian's postgresql and nats-server must be installed), copiers spread over the nodes,
    /// the service desk on the first; a GET DATA to every copier crosses the nodes.
    #[arg(long, value_name = "N", conflicts_with = "rollout")]
    cluster: Option<usize>,
    /// Rollouts: 50 simulated copiers of two models; a firmware rollout to one model in three
    /// waves ends succeeded, a second to copiers set to fail (some switched off) aborts by itself
    /// and cancels the jobs never delivered.
    #[arg(long, conflicts_with_all = ["children", "devices"])]
    rollout: bool,
    /// Exit when every job has ended: 0 if all ended normally, 1 otherwise.
    #[arg(long)]
    once: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` starts logging once its flags and config file have said in which format.
    if !matches!(cli.command, Command::Run(_)) {
        init_tracing(matches!(cli.command, Command::Demo(_)), LogFormat::Text);
    }
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", host_agent::error_text(&e));
            ExitCode::from(2)
        }
    }
}

fn init_tracing(quiet: bool, format: LogFormat) {
    use tracing_subscriber::prelude::*;

    // rumqttd logs every subscription at info and rustls warns about IP addresses sent as SNI by
    // common clients; neither helps an operator. The rollout demo's copiers fail firmware writes
    // on purpose: its own lines say so, once.
    let default = if quiet {
        "warn,rumqttd=error,rustls=error,device_agent::jobs::firmware=error"
    } else {
        "info,rumqttd=warn,rustls=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // rumqttd opens an error-level span for every publish it routes, formatting the topic each
    // time; its events still get through, only without that context. The core's views are
    // publishes, so this was a measurable part of every report's cost (bench/RESULTS.md).
    // Filtered for the whole subscriber, not for the log layer alone: a span one layer filters
    // out is still made and stored by the registry.
    let no_router_spans = tracing_subscriber::filter::filter_fn(|meta| {
        !(meta.is_span() && meta.target().starts_with("rumqttd"))
    });
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(no_router_spans)
        .with(layer)
        .init();
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Pki(PkiCommand::Init { dir, sans }) => {
            pki::init(&dir, &sans)
                .with_context(|| format!("creating a CA in {}", dir.display()))?;
            println!(
                "created {}/{{ca.pem,ca.key,server.pem,server.key}}",
                dir.display()
            );
            println!(
                "next: broker pki issue --dir {} --role device --id SERIAL",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(PkiCommand::Issue { dir, role, id, san }) => {
            if !san.is_empty() && role != Role::Relay {
                anyhow::bail!(
                    "--san names a relay's addresses; a {role} certificate names no address (use --role relay)"
                );
            }
            let issued = match role {
                Role::Relay => pki::issue_relay_to_dir(&dir, &id, &san),
                _ => pki::issue_to_dir(&dir, role, &id),
            };
            let (cert, key) =
                issued.with_context(|| format!("issuing a {role} certificate for {id:?}"))?;
            println!("{}\n{}", cert.display(), key.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(PkiCommand::ClusterCert { dir, name, san }) => {
            let (cert, key) = pki::cluster::issue_cluster_to_dir(&dir, &name, &san)
                .with_context(|| format!("issuing a cluster certificate for {name:?}"))?;
            println!("{}\n{}", cert.display(), key.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(PkiCommand::Revoke {
            dir,
            id,
            role,
            serial,
            cert,
        }) => {
            if role.is_some() && id.is_none() {
                anyhow::bail!("--role goes with --id; a --serial or --cert names one certificate");
            }
            let serial = match (id, serial, cert) {
                (Some(id), _, _) => {
                    let path = pki::issued_cert(&dir, role, &id)?;
                    pki::serial_of_pem(&pki::read_pem_file(&path)?)
                        .with_context(|| format!("reading {}", path.display()))?
                }
                (None, Some(hex), _) => pki::parse_serial(&hex)?,
                (None, None, Some(path)) => pki::serial_of_pem(&pki::read_pem_file(&path)?)
                    .with_context(|| format!("reading {}", path.display()))?,
                (None, None, None) => {
                    anyhow::bail!("say which certificate: --id, --serial or --cert")
                }
            };
            let done = pki::revoke(&dir, &serial).with_context(|| {
                format!("revoking a certificate with the CA in {}", dir.display())
            })?;
            if done.already {
                println!(
                    "serial {} was already revoked in {}",
                    done.serial,
                    done.path.display()
                );
            } else {
                println!(
                    "revoked serial {} ({} now lists {} certificate(s))",
                    done.serial,
                    done.path.display(),
                    done.revoked
                );
            }
            println!(
                "reload the relay to apply it: broker reload --pid-file FILE (or kill -HUP its pid)"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let (cfg, ready_file) = args
                .clone()
                .into_config()
                .context("reading the configuration")?;
            init_tracing(false, cfg.log_format);
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async move {
                let stop = shutdown_on_signal();
                // Before anything else: SIGHUP's default action ends the process.
                let reload = reload_on_signal(*args)?;
                let listener = broker::bind(&cfg).await?;
                let ended = broker::run(
                    cfg,
                    listener,
                    ready_file.as_deref(),
                    broker::Faults::from_env(),
                    stop,
                    Some(reload),
                )
                .await?;
                Ok(match ended {
                    broker::Ended::Stopped => ExitCode::SUCCESS,
                    broker::Ended::RestartIntoNewProgram => {
                        ExitCode::from(broker::program::RESTART_INTO_NEW_PROGRAM)
                    }
                })
            })
        }
        Command::Supervise {
            program_dir,
            confirm_secs,
            program,
            run_args,
        } => {
            let install_from = match program {
                Some(p) => p,
                None => std::env::current_exe().context("finding this program's own path")?,
            };
            let settings = broker::program::supervisor::SupervisorSettings {
                dir: broker::program::ProgramDir::new(program_dir),
                install_from,
                run_args,
                confirm_within: std::time::Duration::from_secs(confirm_secs.max(1)),
            };
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let code = rt
                .block_on(broker::program::supervisor::supervise(settings))
                .context("supervising the relay")?;
            Ok(ExitCode::from(code))
        }
        Command::Db(DbCommand::Migrate { db }) => {
            let (before, after) = broker::store::pg_store::migrate(&db.cluster_db)
                .context("migrating the cluster database")?;
            if before == after {
                println!("the schema is at version {after} already; nothing to do");
            } else if before == 0 {
                println!("created the schema (version {after})");
            } else {
                println!("upgraded the schema from version {before} to {after}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Nodes(NodesCommand::List { db, json }) => {
            let nodes = broker::store::pg_store::nodes::list(&db.cluster_db)
                .context("listing the cluster's nodes")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print!("{}", nodes_table(&nodes));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Nodes(NodesCommand::Forget { db, node }) => {
            use broker::store::pg_store::nodes::Forgot;
            let done = broker::store::pg_store::nodes::forget(&db.cluster_db, &node)
                .with_context(|| format!("forgetting node {node}"))?;
            match done {
                Forgot::Forgotten => {
                    println!("forgot node {node}");
                    Ok(ExitCode::SUCCESS)
                }
                Forgot::Unknown => {
                    anyhow::bail!(
                        "no node {node} in the cluster database (see `broker nodes list`)"
                    )
                }
                Forgot::Alive => anyhow::bail!(
                    "node {node} is up (heard from within 15 s): stop it first, then forget it"
                ),
                Forgot::HoldsDevices(n) => anyhow::bail!(
                    "node {node} is gone but {n} device(s) are still taken for online at it: the leading node marks them offline within seconds; try again then (no node running? start one: the leader does it)"
                ),
            }
        }
        Command::Reload { pid_file } => {
            let pid = send_hangup(&pid_file)?;
            println!(
                "asked the relay (pid {pid}) to reload its configuration; its log says what it applied or why it refused"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { data_dir, out } => {
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let (bytes, by_relay) = rt
                .block_on(broker::control::backup_store(&data_dir, &out))
                .with_context(|| format!("backing up the store in {}", data_dir.display()))?;
            let how = if by_relay {
                "written by the running relay"
            } else {
                "no relay running; read from the file"
            };
            println!("{} ({bytes} bytes, {how})", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore { from, data_dir } => {
            let stats = broker::store::RedbStore::restore(&from, &data_dir).with_context(|| {
                format!("restoring {} into {}", from.display(), data_dir.display())
            })?;
            let jobs: u64 = stats.jobs.values().sum();
            println!(
                "restored into {}: {jobs} jobs, {} alarms ({} active), {} devices, {} readings, {} notifications queued",
                data_dir.display(),
                stats.alarms_total,
                stats.alarms_active,
                stats.devices,
                stats.readings,
                stats.notify_queue
            );
            println!(
                "start it with: broker run --data-dir {} …",
                data_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async move {
                if args.rollout {
                    return demo_rollout::run(args.once, shutdown_on_signal()).await;
                }
                match (args.children, args.cluster) {
                    (Some(children), _) => {
                        demo_tree::run(children, args.devices, args.once, shutdown_on_signal())
                            .await
                    }
                    (None, Some(nodes)) => {
                        demo_cluster::run(nodes, args.devices, args.once, shutdown_on_signal())
                            .await
                    }
                    (None, None) => demo::run(args.devices, args.once, shutdown_on_signal()).await,
                }
            })
        }
    }
}

/// `broker nodes list` as a table, times local.
fn nodes_table(nodes: &[broker::store::pg_store::nodes::NodeView]) -> String {
    let time = |t: &chrono::DateTime<chrono::Utc>| {
        t.with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.node_id.clone(),
                if n.alive { "up" } else { "gone" }.to_owned(),
                n.listen.clone(),
                n.devices.to_string(),
                time(&n.started_at),
                time(&n.heartbeat_at),
            ]
        })
        .collect();
    host_agent::table::render_grid(
        &[
            "NODE",
            "STATE",
            "LISTEN",
            "DEVICES",
            "STARTED",
            "LAST HEARTBEAT",
        ],
        &rows,
    )
}

/// Reload requests from SIGHUP; each reads the config file again and applies the same flags.
fn reload_on_signal(args: RunArgs) -> anyhow::Result<broker::reload::Reload> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    let (tx, requests) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            // Full: a reload is already due, and it will read the file as it is now.
            let _ = tx.try_send(());
        }
    });
    let load = move || {
        args.clone()
            .into_config()
            .map(|(cfg, _)| cfg)
            .map_err(|e| format!("{e:#}"))
    };
    Ok(broker::reload::Reload {
        load: Box::new(load),
        requests,
    })
}

/// Sends SIGHUP to the process whose id `pid_file` holds; returns the id.
fn send_hangup(pid_file: &std::path::Path) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(pid_file).with_context(|| {
        format!(
            "reading {} (is the relay running with --pid-file?)",
            pid_file.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .with_context(|| format!("{} does not hold a process id", pid_file.display()))?;
    let target = rustix::process::Pid::from_raw(pid)
        .with_context(|| format!("{} does not hold a process id", pid_file.display()))?;
    rustix::process::kill_process(target, rustix::process::Signal::HUP)
        .with_context(|| format!("signalling the relay (pid {pid}); is it still running?"))?;
    Ok(pid)
}

/// One token for the whole process, cancelled by SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        token.cancel();
    });
    stop
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_override_the_config_file() {
        let cli = Cli::try_parse_from([
            "broker",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--max-payload-bytes",
            "4096",
            "--ws-listen",
            "127.0.0.1:0",
            "--min-free-bytes",
            "1048576",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let (cfg, _) = args.into_config().unwrap();
        assert_eq!(cfg.listen.port(), 0);
        assert_eq!(cfg.max_payload_bytes, 4096);
        assert_eq!(cfg.ws_listen.map(|a| a.port()), Some(0));
        assert_eq!(cfg.min_free_bytes, Some(1 << 20));
        assert_eq!(BrokerConfig::default().min_free_bytes, None, "automatic");
    }

    /// `broker run EXTRA…` parsed into the configuration it would run with.
    fn run(extra: &[&str]) -> anyhow::Result<(BrokerConfig, Option<PathBuf>)> {
        let mut argv = vec!["broker", "run"];
        argv.extend_from_slice(extra);
        let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not run")
        };
        args.into_config()
    }

    #[test]
    fn systemd_notify_and_the_log_format_come_from_the_file_or_a_flag() {
        let (cfg, _) = run(&[]).unwrap();
        assert_eq!(
            (cfg.systemd_notify, cfg.log_format),
            (false, LogFormat::Text)
        );
        let (cfg, _) = run(&["--systemd-notify", "--log-format", "json"]).unwrap();
        assert_eq!(
            (cfg.systemd_notify, cfg.log_format),
            (true, LogFormat::Json)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "systemd_notify = true\nlog_format = \"json\"\n").unwrap();
        let (cfg, _) = run(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(
            (cfg.systemd_notify, cfg.log_format),
            (true, LogFormat::Json)
        );
        let e = Cli::try_parse_from(["broker", "run", "--log-format", "xml"]).unwrap_err();
        assert!(e.to_string().contains("use text or json"), "{e}");
    }

    #[test]
    fn job_default_flags_override_the_config_and_are_validated() {
        let (cfg, _) = run(&[
            "--default-deadline-secs",
            "120",
            "--default-max-attempts",
            "5",
        ])
        .unwrap();
        assert_eq!(
            (cfg.default_deadline_secs, cfg.default_max_attempts),
            (120, 5)
        );
        let e = run(&["--default-max-attempts", "0"]).unwrap_err();
        assert!(
            format!("{e:#}").contains("default_max_attempts = 0"),
            "{e:#}"
        );
    }

    #[test]
    fn limit_flags_override_the_config_and_are_validated() {
        let (cfg, _) = run(&[]).unwrap();
        assert_eq!(
            (
                cfg.max_inflight,
                cfg.max_subscriptions,
                cfg.max_connections_per_identity,
                cfg.connect_rate_per_source,
                cfg.connect_burst_per_source,
                cfg.connect_rate_exempt_loopback,
                cfg.crl_file.clone(),
            ),
            (100, 32, 8, 50, 1000, true, None)
        );
        let (cfg, _) = run(&[
            "--max-inflight",
            "5",
            "--max-subscriptions",
            "2",
            "--max-connections-per-identity",
            "1",
            "--connect-rate-per-source",
            "3",
            "--connect-burst-per-source",
            "4",
            "--connect-rate-exempt-loopback",
            "false",
            "--crl-file",
            "/etc/chukei/crl.pem",
        ])
        .unwrap();
        assert_eq!(
            (
                cfg.max_inflight,
                cfg.max_subscriptions,
                cfg.max_connections_per_identity,
                cfg.connect_rate_per_source,
                cfg.connect_burst_per_source,
                cfg.connect_rate_exempt_loopback,
            ),
            (5, 2, 1, 3, 4, false)
        );
        assert_eq!(cfg.crl_file, Some(PathBuf::from("/etc/chukei/crl.pem")));
        for bad in [
            "--max-inflight",
            "--max-subscriptions",
            "--max-connections-per-identity",
        ] {
            let e = run(&[bad, "0"]).unwrap_err();
            assert!(format!("{e:#}").contains("use at least 1"), "{bad}: {e:#}");
        }
    }

    #[test]
    fn alarm_limit_flags_override_the_config_and_are_validated() {
        let (cfg, _) = run(&[]).unwrap();
        assert_eq!(cfg.alarm_limits(), broker::core::AlarmLimits::default());
        let (cfg, _) = run(&[
            "--max-active-alarms-per-device",
            "8",
            "--alarm-burst-per-device",
            "2",
            "--alarms-per-minute-per-device",
            "0",
        ])
        .unwrap();
        assert_eq!(
            cfg.alarm_limits(),
            broker::core::AlarmLimits {
                max_active: 8,
                burst: 2,
                per_minute: 0
            }
        );
        for bad in ["--max-active-alarms-per-device", "--alarm-burst-per-device"] {
            let e = run(&[bad, "0"]).unwrap_err();
            assert!(format!("{e:#}").contains("use "), "{bad}: {e:#}");
        }
    }

    #[test]
    fn revoke_takes_exactly_one_certificate() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["broker", "pki", "revoke", "--dir", "pki"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        assert!(parse(&["--id", "C1"]).is_ok());
        assert!(parse(&["--id", "svc", "--role", "host"]).is_ok());
        assert!(parse(&["--serial", "3A:0F"]).is_ok());
        assert!(parse(&["--cert", "x.pem"]).is_ok());
        assert!(parse(&[]).is_err(), "nothing to revoke");
        assert!(parse(&["--id", "C1", "--serial", "3A"]).is_err());
    }

    #[test]
    fn roles_are_checked_by_the_parser() {
        assert!(
            Cli::try_parse_from([
                "broker", "pki", "issue", "--dir", "x", "--role", "admin", "--id", "a"
            ])
            .is_err()
        );
        assert!(
            Cli::try_parse_from([
                "broker", "pki", "issue", "--dir", "x", "--role", "host", "--id", "a"
            ])
            .is_ok()
        );
    }
}
