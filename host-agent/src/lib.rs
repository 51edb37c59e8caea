//! The service company's side of chukei (the seed's host computer, 21): submit jobs for devices
//! behind firewalls, list them as in Fig. 9, show one, cancel one, watch them change, and
//! publish signed firmware. All business rules live in the broker; this crate only asks and
//! shows.
//!
//! - [`cli`]: the command line (clap); each command's doc comment is its help.
//! - [`config`]: `--config` TOML merged with the flags (flags win).
//! - [`tls`]: the host's certificate; its CN is the host id.
//! - [`client`]: [`HostClient`], one MQTT session and the request/response exchange (S222),
//!   reaching the relay as the device agent does ([`link::mqtt_options`]).
//!   The broker's `demo` uses it directly.
//! - [`table`]: the human forms: the Fig. 9 table, a job's detail, a `watch` line, artifacts.
//! - [`keys`]: the publisher's ed25519 key pair, which signs firmware (Fig. 6).
//! - [`upload`]: hashing, signing and the resumable chunked upload of an artifact.
//! - [`commands`]: one file per command.
//! - [`dashboard`]: `host-agent dashboard`, the service desk's web page (axum, SSE); the
//!   broker's `demo` serves it too.

pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod dashboard;
pub mod keys;
pub mod table;
pub mod tls;
pub mod upload;

pub use client::{ConnectOptions, HostClient, HostError};
pub use table::render_table;

use anyhow::Context as _;

use crate::cli::{
    AlarmsCommand, ArtifactsCommand, Command, DevicesCommand, ExportCommand, JobsCommand,
    KeysCommand, RelaysCommand, RolloutsCommand,
};
use crate::config::Settings;

/// Runs one command. stdout carries only the command's output; errors are returned, for `main`
/// to print and turn into an exit status with [`exit_code`].
pub async fn run(settings: Settings, command: Command) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    match command {
        Command::Jobs(cmd) => {
            let client = connect_cli(&settings).await?;
            let result = match cmd {
                JobsCommand::Submit(args) => {
                    commands::submit::run(&client, *args, &mut stdout).await
                }
                JobsCommand::List(args) => commands::list::run(&client, args, &mut stdout).await,
                JobsCommand::Show(args) => commands::show::run(&client, args, &mut stdout).await,
                JobsCommand::Cancel(args) => {
                    commands::cancel::run(&client, args, &mut stdout).await
                }
            };
            client.disconnect().await;
            result
        }
        Command::Artifacts(ArtifactsCommand::Upload(args)) => {
            // The file and the key first: a wrong path fails at once, not after connecting.
            let (bytes, prepared) = commands::artifacts::prepare(&args)?;
            let client = connect_cli(&settings).await?;
            let result = commands::artifacts::upload(&client, &bytes, &prepared, &mut stdout).await;
            client.disconnect().await;
            result
        }
        Command::Relays(RelaysCommand::List(args)) => {
            let client = connect_cli(&settings).await?;
            let result = commands::relays::list(&client, args, &mut stdout).await;
            client.disconnect().await;
            result
        }
        Command::Artifacts(ArtifactsCommand::List(args)) => {
            let client = connect_cli(&settings).await?;
            let result = commands::artifacts::list(&client, args, &mut stdout).await;
            client.disconnect().await;
            result
        }
        Command::Watch(args) => {
            let tls = load_tls(&settings)?;
            commands::watch::run(&settings, tls, args, &mut stdout).await
        }
        Command::Dashboard(args) => {
            let tls = load_tls(&settings)?;
            commands::dashboard::run(&settings, tls, args, &mut stdout).await
        }
        Command::Keys(cmd) => run_keys(cmd),
        Command::Rollouts(cmd) => {
            let client = connect_cli(&settings).await?;
            use protocol::rollout::RolloutAction as A;
            let result = match cmd {
                RolloutsCommand::Create(args) => {
                    commands::rollouts::create(&client, *args, &mut stdout).await
                }
                RolloutsCommand::List(args) => {
                    commands::rollouts::list(&client, args, &mut stdout).await
                }
                RolloutsCommand::Show(args) => {
                    commands::rollouts::show(&client, args, &mut stdout).await
                }
                RolloutsCommand::Pause(r) => {
                    commands::rollouts::act(&client, &r.id, A::Pause, &mut stdout).await
                }
                RolloutsCommand::Resume(r) => {
                    commands::rollouts::act(&client, &r.id, A::Resume, &mut stdout).await
                }
                RolloutsCommand::Abort(r) => {
                    commands::rollouts::act(&client, &r.id, A::Abort, &mut stdout).await
                }
                RolloutsCommand::Approve(r) => {
                    commands::rollouts::act(&client, &r.id, A::Approve, &mut stdout).await
                }
            };
            client.disconnect().await;
            result
        }
        Command::Devices(cmd) => {
            let client = connect_cli(&settings).await?;
            let result = match cmd {
                DevicesCommand::List(args) => {
                    commands::devices::list(&client, args, &mut stdout).await
                }
                DevicesCommand::Tag(args) => {
                    commands::devices::tag(&client, args, &mut stdout).await
                }
            };
            client.disconnect().await;
            result
        }
        Command::Alarms(cmd) => {
            let client = connect_cli(&settings).await?;
            let result = match cmd {
                AlarmsCommand::List(args) => {
                    commands::alarms::list(&client, args, &mut stdout).await
                }
                AlarmsCommand::Ack(args) => commands::alarms::ack(&client, args, &mut stdout).await,
            };
            client.disconnect().await;
            result
        }
        Command::Export(ExportCommand::Counters(args)) => {
            let client = connect_cli(&settings).await?;
            let result = commands::export::counters(&client, args, &mut stdout).await;
            client.disconnect().await;
            result
        }
    }
}

/// Runs `keys …`, which needs no relay and so no connection settings.
pub fn run_keys(cmd: KeysCommand) -> anyhow::Result<()> {
    commands::keys::run(cmd, &mut std::io::stdout())
}

fn load_tls(settings: &Settings) -> anyhow::Result<tls::HostTls> {
    tls::load(&settings.ca, &settings.cert, &settings.key).context("loading the host's TLS files")
}

/// A command-line session: its own `CN:cli-…` client id, so it never takes over a `watch` or
/// another command of the same host.
async fn connect_cli(settings: &Settings) -> anyhow::Result<HostClient> {
    let tls = load_tls(settings)?;
    let opts = ConnectOptions {
        client_id: Some(commands::watch::client_id(&tls.host, "cli")),
        timeout: settings.timeout,
        proxy: settings.proxy.clone(),
        ..ConnectOptions::default()
    };
    Ok(HostClient::connect_with(&settings.broker, tls.config, tls.host, opts).await?)
}

/// The error as one line: the anyhow chain, as `{:#}` prints it, minus any cause whose text the
/// line already holds. Many errors here and in `pki` quote their source in their own message
/// ("could not read x.pem: No such file…") and also return it as `source()`, so a plain `{:#}`
/// would say the same thing two or three times.
pub fn error_text(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The exit status for an error from [`run`]: 1 when the broker answered and said no (a job
/// rejected, an unknown job), 2 for everything else (usage, connection, TLS, timeout).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    // Walk the whole chain: a refusal may sit under a wrapper such as `upload::UploadError`.
    let refused = err.chain().any(|cause| {
        cause.downcast_ref::<commands::Refusal>().is_some()
            || cause
                .downcast_ref::<HostError>()
                .is_some_and(HostError::is_refusal)
    });
    if refused { 1 } else { 2 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_exit_1_and_everything_else_2() {
        let rejected = anyhow::Error::new(commands::Refusal("job J-1 rejected: bad serial".into()));
        assert_eq!(exit_code(&rejected), 1);
        let unknown = anyhow::Error::new(HostError::Refused {
            reason: "no job J-9".into(),
        })
        .context("showing job J-9");
        assert_eq!(exit_code(&unknown), 1, "context must not hide the refusal");
        let mismatch = anyhow::Error::new(upload::UploadError::Host(HostError::Refused {
            reason: "digest mismatch: the uploaded bytes do not hash to X; upload again".into(),
        }));
        assert_eq!(exit_code(&mismatch), 1, "a wrapped refusal is still one");
        assert_eq!(
            error_text(&mismatch),
            "digest mismatch: the uploaded bytes do not hash to X; upload again"
        );
        let timeout = anyhow::Error::new(HostError::Timeout {
            broker: "mqtts://localhost:1".parse().unwrap(),
            what: "list",
            secs: 1,
            tries: 1,
            down: String::new(),
        });
        assert_eq!(exit_code(&timeout), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("could not read x.pem")), 2);
    }

    #[test]
    fn error_text_keeps_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("could not read x.pem: {source}")]
        struct Read {
            source: std::io::Error,
        }
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::new(Read { source: io }).context("loading the host's TLS files");
        assert_eq!(
            error_text(&err),
            "loading the host's TLS files: could not read x.pem: no such file"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_text(&plain), "outer: inner");
    }
}
