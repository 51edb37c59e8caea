//! `device-agent`: parses flags, loads the configuration, starts logging and hands over to the
//! library. Everything else lives in `device_agent`.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use device_agent::cli::{Cli, Command};
use device_agent::config::{FleetSettings, RunSettings};
use protocol::log_format::LogFormat;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Exit status for a bad command line or configuration (EX_USAGE), as distinct from a failure
/// while running.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();

    enum Job {
        Run(RunSettings),
        Fleet(FleetSettings),
    }
    let job = match cli.command {
        Command::Run(args) => RunSettings::resolve(args).map(Job::Run),
        Command::Fleet(args) => FleetSettings::resolve(args).map(Job::Fleet),
        // Needs no runtime: it writes one file (and maybe sends one signal).
        Command::Fault(args) => {
            return match device_agent::faults::request_from_cli(&args) {
                Ok(path) => {
                    println!("{}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("device-agent: {e:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
            };
        }
    };
    let job = match job {
        Ok(job) => job,
        Err(e) => {
            eprintln!("device-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Once the settings are read: the log format may come from the config file.
    init_tracing(match &job {
        Job::Run(s) => s.log_format,
        Job::Fleet(s) => s.log_format,
    });

    let result = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|rt| {
            rt.block_on(async {
                let stop = CancellationToken::new();
                device_agent::signal::cancel_on_signal(stop.clone());
                match job {
                    Job::Run(s) => device_agent::run(s, stop)
                        .await
                        .context("running the device agent"),
                    Job::Fleet(s) => device_agent::run_fleet(s, stop)
                        .await
                        .context("running the fleet"),
                }
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, `info` and up unless RUST_LOG says otherwise.
fn init_tracing(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        );
    match format {
        // Colours only for a person at a terminal; logs captured to a file stay greppable.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
