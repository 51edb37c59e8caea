//! `host-agent`: parses flags, loads config, starts tracing and hands over to the library.

use std::process::ExitCode;

use clap::Parser as _;
use host_agent::cli::{Cli, Command};
use host_agent::config::Settings;
use protocol::log_format::LogFormat;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `keys` works offline: no connection settings are needed or read.
    let command = match cli.command {
        Command::Keys(cmd) => {
            init_tracing(cli.connect.log_format.unwrap_or_default());
            return finish(host_agent::run_keys(cmd));
        }
        other => other,
    };
    let settings = match Settings::resolve(&cli.connect) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    finish(runtime.block_on(host_agent::run(settings, command)))
}

/// The error, if any, on stderr as one line, and the exit status for it.
fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", host_agent::error_text(&e));
            ExitCode::from(host_agent::exit_code(&e))
        }
    }
}

/// Logs go to stderr, warnings only unless RUST_LOG says otherwise, so stdout carries nothing
/// but the command's output (a job id, a table, JSON).
fn init_tracing(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        );
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
