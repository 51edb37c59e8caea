//! The engines a cluster of relay nodes runs on, started on this machine: a PostgreSQL server
//! made by Debian's `initdb` in a directory of the caller's (with a synchronous standby and TLS
//! when asked), and the arguments that make `nats-server` a member of a routed bus or a TLS-only
//! server. One copy for `broker demo --cluster`, the cluster benches and the e2e tests.
//!
//! Everything listens on 127.0.0.1 only, on ports the system picked.

pub mod nats;
pub mod postgres;

use std::path::PathBuf;
use std::process::{Command, ExitStatus};

pub use nats::NatsCluster;
pub use postgres::Postgres;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what} is not installed: {install}")]
    NotInstalled {
        what: &'static str,
        install: &'static str,
    },
    #[error("could not run {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {output}")]
    Failed {
        what: String,
        status: ExitStatus,
        output: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Pki(#[from] pki::PkiError),
    #[error("{0}")]
    NotReady(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// A port on 127.0.0.1 free a moment ago.
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| EngineError::Io {
            what: "finding a free port".into(),
            source,
        })
}

/// Whether this process runs as root: PostgreSQL's programs then run as Debian's `postgres`
/// user (the server refuses root).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                == Some("0")
        })
        .unwrap_or(false)
}

/// Runs `cmd` to its end; its output in the error when it fails.
fn run(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd.output().map_err(|source| EngineError::Spawn {
        what: what.to_owned(),
        source,
    })?;
    if !out.status.success() {
        return Err(EngineError::Failed {
            what: what.to_owned(),
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let what = what.into();
    move |source| EngineError::Io { what, source }
}

/// The first of `candidates` that is a file.
fn find_program(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// A port picker for the tests of the port race: its first pick is a port a listener holds
/// (returned too, to keep it held and to compare), the next ones free ports.
#[cfg(test)]
fn taken_first() -> (std::net::TcpListener, u16, impl FnMut() -> Result<u16>) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let port = taken.local_addr().expect("a bound address").port();
    let mut first = Some(port);
    (taken, port, move || match first.take() {
        Some(port) => Ok(port),
        None => free_port(),
    })
}
