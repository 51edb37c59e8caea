//! The command line. Every flag is an `Option`: given, it wins over the config file (see
//! [`crate::config`]), so a fleet shares one file and a technician overrides one value for the moment.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use protocol::Serial;
use protocol::log_format::LogFormat;
use protocol::proxy::ProxyUrl;
use protocol::schedule::SessionMode;
use protocol::url::BrokerUrl;

const AFTER_HELP: &str = "\
Examples:
  device-agent run --broker mqtts://relay.example.com:8883 --serial C123 \\
      --ca pki/ca.pem --cert pki/device/C123.pem --key pki/device/C123.key --data-dir /var/lib/chukei
  device-agent fleet --count 1000 --pki-dir pki --broker mqtts://localhost:8883 --data-dir /tmp/fleet

Behind a firewall that lets only HTTPS out through a proxy:
  device-agent run --config agent.toml --broker wss://relay.example.com:443/mqtt \
      --proxy http://proxy.corp:3128
Two relays, the first preferred (failover, and back when it returns):
  device-agent run --config agent.toml --broker mqtts://relay-1:8883 --broker mqtts://relay-2:8883

Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=device_agent=debug) for more or less.
SIGUSR1 makes a device in a periodic session check in at once (an operator action).";

/// chukei's device agent: connects a copier to the relay through outbound connections only, takes
/// the jobs addressed to its serial, runs them and reports back; every report stays on disk until
/// the relay confirms it. `fleet` runs many simulated copiers in one process.
#[derive(Debug, Parser)]
#[command(name = "device-agent", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent of one device until SIGINT or SIGTERM; reconnects by itself when the relay is away.
    ///
    /// The device behind the agent is the simulated copier (tune it under [sim] in the config
    /// file), or a real machine driven by the commands of an [exec] table (see
    /// config/exec-hooks/example-device.sh).
    #[command(
        after_help = "Examples:\n  device-agent run --config /etc/chukei/device-agent.toml --site \"Osaka HQ 3F\"\n  device-agent run --config agent.toml --publisher-key keys/publisher.pub --session periodic --interval-secs 900"
    )]
    Run(RunArgs),
    /// Simulate COUNT copiers in one process, each with its own certificate minted from the CA in --pki-dir.
    #[command(
        after_help = "Example:\n  device-agent fleet --count 500 --pki-dir pki --broker mqtts://localhost:8883 --data-dir /tmp/fleet --ready-file /tmp/fleet/ready.json"
    )]
    Fleet(FleetArgs),
    /// Report a fault to the `device-agent run` that uses --data-dir, as if its device had
    /// detected it (Fig. 5): for tests, demos, and machines that judge their own faults.
    ///
    /// ACTION is raise CODE [DETAIL…] (fatal if CODE is in [faults] fatal), fatal CODE
    /// [DETAIL…], transient CODE [DETAIL…], jam [LOCATION…] or clear CODE. A fatal fault is sent
    /// to the relay at once as an alarm; a transient one is only counted in the JAM/SC data.
    /// The request is a file in DIR/faults/, which the agent reads within [faults] poll_ms
    /// (250 ms), or at once with --signal.
    #[command(
        after_help = "Examples:\n  device-agent fault --data-dir /var/lib/chukei raise SC-541\n  device-agent fault --data-dir /var/lib/chukei fatal SC-901 drum motor locked --signal $(pidof device-agent)\n  device-agent fault --data-dir /var/lib/chukei jam tray 2 feed\n  device-agent fault --data-dir /var/lib/chukei clear SC-541"
    )]
    Fault(FaultArgs),
}

/// Arguments of `device-agent fault`.
#[derive(Debug, Args, Default)]
pub struct FaultArgs {
    /// The data directory of the running agent. Overrides `data_dir` in --config.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The agent's config file, for its `data_dir`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also send SIGUSR2 to this process id (the agent), so it reads the request at once.
    #[arg(long, value_name = "PID")]
    pub signal: Option<u32>,
    /// raise, fatal, transient, jam or clear, then the code and an optional detail.
    #[arg(value_name = "ACTION", required = true, num_args = 1.., trailing_var_arg = true)]
    pub request: Vec<String>,
}

/// Flags of `device-agent run`.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// The relay: mqtts://HOST:PORT (MQTT over TLS) or wss://HOST:PORT/mqtt (over WebSocket,
    /// for networks that let only HTTPS out). Repeat it to list fallback relays, most preferred
    /// first: the agent uses the first it can reach and returns to a preferred one when it
    /// answers again. Overrides `broker` in the config file.
    #[arg(long, value_name = "URL")]
    pub broker: Vec<BrokerUrl>,
    /// The CA certificate (PEM) the relay's certificate must chain to. Overrides `ca`.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This device's certificate (PEM); its CN must be --serial. Overrides `cert`.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM). Overrides `key`.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// This device's serial: 1 to 64 ASCII letters, digits or -; must equal the certificate's CN.
    /// Overrides `serial`.
    #[arg(long, value_name = "SERIAL")]
    pub serial: Option<Serial>,
    /// Where the agent keeps its outbox (agent.redb): messages not yet confirmed by the relay and
    /// jobs already done. Keep it across restarts. Overrides `data_dir`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The installation site shown in the host's job list (Fig. 9), e.g. "Osaka HQ 3F". Overrides `site`.
    #[arg(long, value_name = "TEXT")]
    pub site: Option<String>,
    /// A TOML config file; see config/device-agent.toml for every key. Flags win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Written ({"serial":"…"}) once the agent is connected and subscribed, for scripts and tests
    /// that must wait for it.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Flags `run` and `fleet` share.
#[derive(Debug, Args, Default)]
pub struct CommonArgs {
    /// The firmware publisher's public key (publisher.pub of `host-agent keys generate`, 64 hex
    /// digits). Firmware must carry its signature; without a key every firmware job is refused.
    /// Overrides `publisher_key`.
    #[arg(long, value_name = "FILE")]
    pub publisher_key: Option<PathBuf>,
    /// persistent: stay connected, jobs arrive at once. periodic: connect on a schedule, run the
    /// jobs, empty the outbox, disconnect (metered links). Overrides `session.mode`; a schedule
    /// set by a set-schedule job wins over both.
    #[arg(long, value_name = "MODE", value_parser = ["persistent", "periodic"])]
    pub session: Option<String>,
    /// Periodic session: check in every N seconds. Overrides `session.interval_secs`.
    #[arg(long, value_name = "N")]
    pub interval_secs: Option<u64>,
    /// Reach the relays through this HTTP proxy (CONNECT tunnel; TLS stays end to end):
    /// http://HOST:PORT or http://USER:PASSWORD@HOST:PORT. Without it HTTPS_PROXY (or
    /// ALL_PROXY) is used, as curl does; NO_PROXY lists hosts reached directly either way.
    /// Overrides `proxy`.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<ProxyUrl>,
    /// With several --broker: while on a fallback relay, probe the preferred ones every N
    /// seconds and return to the first that answers, once no job is running (0: never).
    /// Overrides `session.failback_secs`; default 30.
    #[arg(long, value_name = "N")]
    pub failback_secs: Option<u64>,
    /// The --broker relays are one tree (child relays and their parent): a job taken through one
    /// child is finished through another, or the parent, after a failover. Sets
    /// `session.one_tree`.
    #[arg(long)]
    pub one_tree: bool,
    /// text, or json: one JSON object per line with the same fields, for log shippers.
    /// Overrides `log_format`; default text.
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<LogFormat>,
}

impl CommonArgs {
    pub fn session_mode(&self) -> Option<SessionMode> {
        // The parser admitted only the two names.
        self.session.as_deref().and_then(|s| s.parse().ok())
    }
}

/// Flags of `device-agent fleet`.
#[derive(Debug, Args, Default)]
pub struct FleetArgs {
    /// How many copiers to simulate. Overrides `fleet.count`.
    #[arg(long, value_name = "N")]
    pub count: Option<u32>,
    /// The PKI directory holding ca.pem and ca.key (made by `broker pki init`); each copier's
    /// certificate is minted from it in memory. Overrides `fleet.pki_dir`.
    #[arg(long, value_name = "DIR")]
    pub pki_dir: Option<PathBuf>,
    /// The relay (mqtts://HOST:PORT or wss://HOST:PORT/mqtt); repeat it for fallback relays,
    /// most preferred first. Overrides `broker`.
    #[arg(long, value_name = "URL")]
    pub broker: Vec<BrokerUrl>,
    /// Where the fleet keeps its one outbox file (agent.redb), keyed by serial. Overrides `data_dir`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serials are PREFIX-00000, PREFIX-00001, … (default SIM). Overrides `fleet.prefix`.
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// The installation site every simulated copier reports. Overrides `site`.
    #[arg(long, value_name = "TEXT")]
    pub site: Option<String>,
    /// Written ({"devices":N}) once every copier is connected and subscribed.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// This share of the copiers (chosen by serial, the same each run) fail every firmware job
    /// with a reason, to see a rollout abort. Overrides `sim.fail_firmware_percent`.
    #[arg(long, value_name = "N")]
    pub fail_firmware_percent: Option<u8>,
    /// Spread these factory firmware versions over the copiers (by serial, the same each run),
    /// e.g. 1.0.0,1.2.0,2.0.0, for rollout targets such as firmware<2.0.0. Overrides
    /// `sim.firmware_mix`.
    #[arg(long, value_name = "V,…", value_delimiter = ',')]
    pub firmware_mix: Vec<String>,
    /// A TOML config file; see config/device-agent.toml for every key. Flags win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_parser_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_parses_every_flag() {
        let cli = Cli::try_parse_from([
            "device-agent",
            "run",
            "--broker",
            "mqtts://relay:8883",
            "--ca",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "c.key",
            "--serial",
            "C1",
            "--data-dir",
            "d",
            "--site",
            "Osaka",
            "--config",
            "a.toml",
            "--ready-file",
            "r.json",
            "--publisher-key",
            "keys/publisher.pub",
            "--session",
            "periodic",
            "--interval-secs",
            "900",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.broker[0].port, 8883);
        assert_eq!(a.serial.unwrap().as_str(), "C1");
        assert_eq!(a.site.as_deref(), Some("Osaka"));
        assert_eq!(a.ready_file.unwrap(), PathBuf::from("r.json"));
        assert_eq!(
            a.common.publisher_key.as_deref(),
            Some(std::path::Path::new("keys/publisher.pub"))
        );
        assert_eq!(a.common.session_mode(), Some(SessionMode::Periodic));
        assert_eq!(a.common.interval_secs, Some(900));
    }

    #[test]
    fn several_relays_a_proxy_and_failback_parse() {
        let cli = Cli::try_parse_from([
            "device-agent",
            "run",
            "--broker",
            "mqtts://relay-1:8883",
            "--broker",
            "wss://relay-2:443/mqtt",
            "--proxy",
            "http://bob:pw@proxy:3128",
            "--failback-secs",
            "10",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        let urls: Vec<String> = a.broker.iter().map(ToString::to_string).collect();
        assert_eq!(urls, ["mqtts://relay-1:8883", "wss://relay-2:443/mqtt"]);
        assert_eq!(a.common.proxy.unwrap().port, 3128);
        assert_eq!(a.common.failback_secs, Some(10));
        let e =
            Cli::try_parse_from(["device-agent", "run", "--proxy", "socks5://p:1"]).unwrap_err();
        assert!(e.to_string().contains("http://HOST:PORT"), "{e}");
        let cli = Cli::try_parse_from([
            "device-agent",
            "fleet",
            "--broker",
            "wss://r/mqtt",
            "--proxy",
            "p:1",
        ])
        .unwrap();
        let Command::Fleet(a) = cli.command else {
            panic!("not fleet")
        };
        assert_eq!(a.broker.len(), 1);
        assert_eq!(a.common.proxy.unwrap().host, "p");
    }

    #[test]
    fn fleet_parses_every_flag() {
        let cli = Cli::try_parse_from([
            "device-agent",
            "fleet",
            "--count",
            "20",
            "--pki-dir",
            "pki",
            "--broker",
            "mqtts://localhost:1",
            "--data-dir",
            "d",
            "--prefix",
            "LAB",
            "--site",
            "lab",
            "--ready-file",
            "r",
            "--config",
            "c",
            "--publisher-key",
            "p.pub",
            "--session",
            "persistent",
        ])
        .unwrap();
        let Command::Fleet(a) = cli.command else {
            panic!("not fleet")
        };
        assert_eq!(a.count, Some(20));
        assert_eq!(a.prefix.as_deref(), Some("LAB"));
    }

    #[test]
    fn bad_values_are_refused_with_advice() {
        let e =
            Cli::try_parse_from(["device-agent", "run", "--broker", "localhost:8883"]).unwrap_err();
        assert!(e.to_string().contains("mqtts://HOST:PORT"), "{e}");
        let e = Cli::try_parse_from(["device-agent", "run", "--serial", "C/1"]).unwrap_err();
        assert!(e.to_string().contains("ASCII letters"), "{e}");
        assert!(Cli::try_parse_from(["device-agent", "fleet", "--count", "many"]).is_err());
        assert!(Cli::try_parse_from(["device-agent", "run", "--bogus"]).is_err());
        let e = Cli::try_parse_from(["device-agent", "run", "--session", "sometimes"]).unwrap_err();
        assert!(e.to_string().contains("periodic"), "{e}");
    }
}
