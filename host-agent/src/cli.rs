//! The command line. Each command's doc comment is its `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use protocol::url::BrokerUrl;

const EXAMPLES: &str = "\
Examples:
  # Ask copier C123 for its counters; prints the new job id
  host-agent --broker mqtts://localhost:8883 --ca pki/ca.pem \\
      --cert pki/host/svc.pem --key pki/host/svc.key \\
      jobs submit --serial C123 --kind get-data --sections counters

  # The same, with the connection settings in a file
  host-agent --config config/host-agent.toml jobs list
  host-agent --config config/host-agent.toml jobs show J-000001
  host-agent --config config/host-agent.toml watch --json

Exit status: 0 done, 1 the broker said no (job rejected, unknown job), 2 usage, connection, TLS or timeout error.";

/// The service company's side of chukei: submit jobs for devices behind firewalls, list them
/// (the job list of Fig. 9), look at one, and watch them change.
///
/// The host id is the CN of the certificate given with --cert; issue one with
/// `broker pki issue --role host --id NAME`.
#[derive(Debug, Parser)]
#[command(name = "host-agent", version, after_help = EXAMPLES, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the relay. Every flag overrides the same key in --config.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectArgs {
    /// The relay, as mqtts://HOST:PORT (port 8883 if omitted). Overrides `broker` in --config.
    #[arg(long, value_name = "URL", global = true, help_heading = "Connection")]
    pub broker: Option<BrokerUrl>,
    /// The broker's CA certificate (PEM), e.g. pki/ca.pem. Overrides `ca` in --config.
    #[arg(long, value_name = "FILE", global = true, help_heading = "Connection")]
    pub ca: Option<PathBuf>,
    /// This host's certificate (PEM); its CN is the host id. Overrides `cert` in --config.
    #[arg(long, value_name = "FILE", global = true, help_heading = "Connection")]
    pub cert: Option<PathBuf>,
    /// This host's private key (PEM). Overrides `key` in --config.
    #[arg(long, value_name = "FILE", global = true, help_heading = "Connection")]
    pub key: Option<PathBuf>,
    /// A TOML file with broker, ca, cert, key and timeout_secs (see config/host-agent.toml).
    /// Relative paths in it are read from the file's own directory.
    #[arg(long, value_name = "FILE", global = true, help_heading = "Connection")]
    pub config: Option<PathBuf>,
    /// Give up on the connection or a reply after N seconds; requests are resent every 2 s
    /// until then. Default 15. Overrides `timeout_secs` in --config.
    #[arg(long, value_name = "N", global = true, help_heading = "Connection", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit, list and show jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Print one line per job change, across the fleet, until Ctrl-C.
    Watch(WatchArgs),
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    Submit(SubmitArgs),
    List(ListArgs),
    Show(ShowArgs),
}

/// Submit a job for one device. Prints the new job id alone on stdout; follow it with
/// `jobs show ID` or `watch`.
///
/// The broker checks the job (serial, kind, sections, times): if it refuses it, the job is
/// recorded as rejected with the reason, the reason is printed and host-agent exits 1.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  host-agent … jobs submit --serial C123 --kind get-data --sections counters,jams
  host-agent … jobs submit --serial C123 --kind get-data --at 2026-11-27T02:00:00+09:00")]
pub struct SubmitArgs {
    /// The target device's serial (the CN of its certificate).
    #[arg(long, value_name = "SERIAL")]
    pub serial: String,
    /// What to do: get-data (send the listed sections of the device's data).
    #[arg(long, value_name = "KIND")]
    pub kind: String,
    /// For get-data, the sections to send: counters, identification, calls, call-settings,
    /// jams, adjustment, comms, settings. Default: all of them.
    #[arg(long, value_name = "NAME,…", value_delimiter = ',')]
    pub sections: Vec<String>,
    /// Instruction time (RFC 3339): the device runs the job not before then. Default: now.
    #[arg(long, value_name = "RFC3339")]
    pub at: Option<String>,
    /// Execution time (RFC 3339): for updates, when to apply what was fetched.
    #[arg(long, value_name = "RFC3339")]
    pub execute_at: Option<String>,
    /// Deadline (RFC 3339): the job times out if it has not ended by then.
    #[arg(long, value_name = "RFC3339")]
    pub deadline: Option<String>,
}

/// List jobs as in Fig. 9: ID, serial, site, instruction, data type, server, host, instruction
/// and execution time (local time), status. Ended jobs only with --all.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Include ended jobs (succeeded, failed, rejected, canceled, timed out).
    #[arg(long)]
    pub all: bool,
    /// Print a JSON array of job objects instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Show one job: status, the Fig. 9 fields, its timeline and the data it collected.
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// The job id that `jobs submit` printed, e.g. J-000001.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Print the job as one JSON object (the Fig. 9 fields, `timeline` and `data`).
    #[arg(long)]
    pub json: bool,
}

/// Options of `watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    const CONN: [&str; 9] = [
        "host-agent",
        "--broker",
        "mqtts://localhost:8883",
        "--ca",
        "ca.pem",
        "--cert",
        "svc.pem",
        "--key",
        "svc.key",
    ];

    fn parse(rest: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(CONN.iter().chain(rest))
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_parses_every_flag_and_passes_sections_through() {
        let cli = parse(&[
            "jobs",
            "submit",
            "--serial",
            "C123",
            "--kind",
            "get-data",
            "--sections",
            "counters,toner",
            "--at",
            "2026-11-27T02:00:00Z",
            "--deadline",
            "2026-11-28T00:00:00Z",
        ])
        .unwrap();
        assert_eq!(
            cli.connect.broker.unwrap().to_string(),
            "mqtts://localhost:8883"
        );
        assert_eq!(cli.connect.cert.unwrap(), PathBuf::from("svc.pem"));
        let Command::Jobs(JobsCommand::Submit(s)) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(s.serial, "C123");
        assert_eq!(s.kind, "get-data");
        // Not checked here: the broker is the judge of section names (S103).
        assert_eq!(s.sections, ["counters", "toner"]);
        assert_eq!(s.at.as_deref(), Some("2026-11-27T02:00:00Z"));
        assert_eq!(s.deadline.as_deref(), Some("2026-11-28T00:00:00Z"));
        assert_eq!(s.execute_at, None);
    }

    #[test]
    fn submit_needs_serial_and_kind() {
        assert!(parse(&["jobs", "submit", "--kind", "get-data"]).is_err());
        assert!(parse(&["jobs", "submit", "--serial", "C1"]).is_err());
        let cli = parse(&["jobs", "submit", "--serial", "C1", "--kind", "get-data"]).unwrap();
        let Command::Jobs(JobsCommand::Submit(s)) = cli.command else {
            panic!("not submit")
        };
        assert!(
            s.sections.is_empty(),
            "no --sections means all, decided by the broker"
        );
    }

    #[test]
    fn list_show_and_watch_parse() {
        let cli = parse(&["jobs", "list", "--all", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Jobs(JobsCommand::List(ListArgs {
                all: true,
                json: true
            }))
        ));
        let cli = parse(&["jobs", "list"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Jobs(JobsCommand::List(ListArgs {
                all: false,
                json: false
            }))
        ));
        let cli = parse(&["jobs", "show", "J-000001", "--json"]).unwrap();
        let Command::Jobs(JobsCommand::Show(s)) = cli.command else {
            panic!("not show")
        };
        assert_eq!((s.id.as_str(), s.json), ("J-000001", true));
        let cli = parse(&["watch", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Watch(WatchArgs { json: true })
        ));
    }

    #[test]
    fn connection_flags_may_follow_the_command_and_are_optional() {
        let cli = Cli::try_parse_from([
            "host-agent",
            "jobs",
            "list",
            "--config",
            "h.toml",
            "--timeout-secs",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.connect.config.unwrap(), PathBuf::from("h.toml"));
        assert_eq!(cli.connect.timeout_secs, Some(3));
        assert!(cli.connect.broker.is_none());
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        let e = Cli::try_parse_from(["host-agent", "--broker", "localhost:8883", "jobs", "list"])
            .unwrap_err();
        assert!(e.to_string().contains("mqtts://HOST:PORT"), "{e}");
        assert_eq!(e.exit_code(), 2);
        assert!(parse(&["--timeout-secs", "0", "jobs", "list"]).is_err());
        assert!(parse(&["jobs", "show"]).is_err());
        assert!(parse(&["jobs", "frobnicate"]).is_err());
    }
}
