//! `broker`: the chukei relay. Flags and config here; everything else in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use broker::config::BrokerConfig;
use clap::{Args, Parser, Subcommand};
use protocol::Role;
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
        after_help = "Examples:\n  broker pki issue --dir pki --role device --id C123\n  broker pki issue --dir pki --role host --id svc\n  broker pki issue --dir pki --role integrator --id crm"
    )]
    Issue {
        /// The folder `pki init` created.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// device (a copier: its own topics only), host (submits jobs, reads the views) or
        /// integrator (reads the views only).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The serial (device) or name (host, integrator): 1 to 64 ASCII letters, digits or -.
        #[arg(long, value_name = "ID")]
        id: String,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse::<Role>().map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
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
    /// Drop a client that does not send CONNECT in time. Default: 10
    #[arg(long, value_name = "SECS")]
    connect_timeout_secs: Option<u64>,
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
    /// notification queue, redb commit latency) over plain HTTP at http://ADDR/metrics. Use a
    /// loopback or management address. Default: none
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// A device in periodic mode becomes overdue, and raises an alarm, once it is this many
    /// seconds late for its check-in. Default: 300
    #[arg(long, value_name = "SECS")]
    overdue_margin_secs: Option<u64>,
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
            connect_timeout_secs,
            max_packet_bytes,
            max_payload_bytes,
            max_clients,
            max_handshakes,
            finished_visible_secs,
            default_deadline_secs,
            default_max_attempts,
            overdue_margin_secs
        );
        if let Some(addr) = self.metrics_listen {
            cfg.metrics_listen = Some(addr);
        }
        if let Some(addr) = self.ws_listen {
            cfg.ws_listen = Some(addr);
        }
        cfg.validate()?;
        Ok((cfg, self.ready_file))
    }
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// How many simulated copiers to run.
    #[arg(long, default_value_t = 5, value_name = "N")]
    devices: usize,
    /// Exit when every job has ended: 0 if all ended normally, 1 otherwise.
    #[arg(long)]
    once: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Demo(_)));
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", host_agent::error_text(&e));
            ExitCode::from(2)
        }
    }
}

fn init_tracing(quiet: bool) {
    // rumqttd logs every subscription at info and rustls warns about IP addresses sent as SNI by
    // common clients; neither helps an operator.
    let default = if quiet {
        "warn,rumqttd=error,rustls=error"
    } else {
        "info,rumqttd=warn,rustls=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
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
        Command::Pki(PkiCommand::Issue { dir, role, id }) => {
            let (cert, key) = pki::issue_to_dir(&dir, role, &id)
                .with_context(|| format!("issuing a {role} certificate for {id:?}"))?;
            println!("{}\n{}", cert.display(), key.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let (cfg, ready_file) = args.into_config().context("reading the configuration")?;
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async move {
                let stop = shutdown_on_signal();
                let listener = broker::bind(&cfg).await?;
                broker::run(
                    cfg,
                    listener,
                    ready_file.as_deref(),
                    broker::Faults::from_env(),
                    stop,
                )
                .await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Demo(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async move {
                broker::demo::run(args.devices, args.once, shutdown_on_signal()).await
            })
        }
    }
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
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let (cfg, _) = args.into_config().unwrap();
        assert_eq!(cfg.listen.port(), 0);
        assert_eq!(cfg.max_payload_bytes, 4096);
        assert_eq!(cfg.ws_listen.map(|a| a.port()), Some(0));
    }

    #[test]
    fn job_default_flags_override_the_config_and_are_validated() {
        let run = |extra: &[&str]| {
            let mut argv = vec!["broker", "run"];
            argv.extend_from_slice(extra);
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not run")
            };
            args.into_config()
        };
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
