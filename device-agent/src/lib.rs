//! chukei's device agent: the program that runs beside a copier, connects out to the
//! relay, takes the jobs addressed to its serial, runs them one at a time and reports back through
//! a durable outbox. The same library runs a whole simulated fleet in one process.
//!
//! - [`cli`], [`config`]: flags and the TOML file; flags win.
//! - [`agent`]: one device's session with the relay (connect, subscribe, publish, resend;
//!   persistent or periodic, suspended during a firmware write); [`checkin`] plans periodic ones.
//! - [`worker`], [`jobs`]: which orders to run and when; one file per job kind; [`relay`] is what
//!   a running job may ask of the session.
//! - [`outbox`], [`report`], [`store`]: every message is committed before it is sent and kept
//!   until acked; downloads, write-intents and schedules survive a restart.
//! - [`device`], [`sim`], [`exec`], [`settings`]: the `Device` trait, the simulated copier, the
//!   command-driven backend for real machines, and typed settings.
//! - [`fleet`]: many simulated copiers in one process.
//! - [`transport`], [`failover`]: the way to each relay (TLS or WebSocket, direct or through an
//!   HTTP proxy) and the ordered list of relays with failover and failback.
//! - [`tls`], [`signal`]: the device's certificate check; shutdown and operator actions.

pub mod agent;
pub mod checkin;
pub mod cli;
pub mod config;
pub mod device;
pub mod exec;
pub mod failover;
pub mod faults;
pub mod fleet;
pub mod format;
pub mod jobs;
pub mod meter;
pub mod outbox;
pub mod relay;
pub mod report;
pub mod settings;
pub mod signal;
pub mod sim;
pub mod store;
pub mod tls;
pub mod transport;
pub mod worker;

use std::path::{Path, PathBuf};

use protocol::{Role, Serial};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::agent::{DeviceAgent, run_device};
use crate::config::RunSettings;
use crate::exec::ExecDevice;
use crate::outbox::{Outbox, OutboxError};
use crate::sim::SimCopier;

pub use crate::fleet::run_fleet;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("the certificate in {} is for device {found}, not {serial}: pass --serial {found} or the right --cert", .cert.display())]
    WrongSerial {
        cert: PathBuf,
        found: String,
        serial: Serial,
    },
    #[error("the certificate in {} is a {role} certificate, not a device's: issue a device certificate for {serial} with `broker pki issue`", .cert.display())]
    NotADeviceCert {
        cert: PathBuf,
        role: Role,
        serial: Serial,
    },
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("could not create the data directory {}: {source}", .path.display())]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not write the ready file {}: {source}", .path.display())]
    ReadyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a background task failed: {0}")]
    Task(String),
}

/// `device-agent run`: one device until `stop`.
pub async fn run(settings: RunSettings, stop: CancellationToken) -> Result<(), AgentError> {
    let tls = tls::device_tls(
        &settings.ca,
        &settings.cert,
        &settings.key,
        &settings.serial,
    )?;
    create_data_dir(&settings.data_dir)?;
    let outbox = Outbox::open(&settings.store_path())?;
    let serial = settings.serial.clone();
    let relays: Vec<String> = settings.relays.iter().map(ToString::to_string).collect();
    info!(
        serial = %serial, relays = ?relays, data_dir = %settings.data_dir.display(),
        "device agent starting"
    );
    if settings.publisher_key.is_none() {
        info!(serial = %serial, "no publisher key given (--publisher-key): firmware jobs will be refused");
    }
    let home = settings.data_dir.clone();
    let device = match &settings.exec {
        Some(hooks) => {
            info!(serial = %serial, "device driven by exec hooks");
            device::shared(ExecDevice::new(hooks.clone(), &serial, &home))
        }
        None => device::shared(SimCopier::with_home(&serial, &settings.sim, &home)),
    };
    let agent = DeviceAgent {
        serial: serial.clone(),
        site: settings.site.clone(),
        relays: settings.relays.clone(),
        tls,
        device,
        outbox,
        settings: settings.session.clone(),
        home,
        schedule: settings.schedule.clone(),
        publisher: settings.publisher_key.clone(),
        operator: Some(signal::operator_actions()),
        monitor: settings.monitor.clone(),
    };
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut device = tokio::spawn(run_device(agent, stop.clone(), Some(ready_tx)));
    tokio::select! {
        r = &mut device => return finished(r),
        Some(_) = ready_rx.recv() => {
            if let Some(path) = &settings.ready_file {
                write_ready_file(path, &serde_json::json!({ "serial": serial.as_str() }))?;
            }
        }
    }
    finished(device.await)
}

fn finished(r: Result<Result<(), OutboxError>, tokio::task::JoinError>) -> Result<(), AgentError> {
    match r {
        Ok(result) => Ok(result?),
        Err(e) => Err(AgentError::Task(e.to_string())),
    }
}

fn create_data_dir(path: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(path).map_err(|source| AgentError::DataDir {
        path: path.to_owned(),
        source,
    })
}

/// Writes the ready file atomically (a temporary file renamed into place), so a test polling for
/// it never reads half of it.
pub fn write_ready_file(path: &Path, body: &serde_json::Value) -> Result<(), AgentError> {
    let err = |source| AgentError::ReadyFile {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{body}\n")).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    info!(path = %path.display(), "ready file written");
    Ok(())
}

/// Logs a device task that ended with an error; used where many run side by side.
pub(crate) fn log_device_end(
    serial: &Serial,
    r: Result<Result<(), OutboxError>, tokio::task::JoinError>,
) {
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(serial = %serial, error = %e, "device stopped"),
        Err(e) => error!(serial = %serial, error = %e, "device task failed"),
    }
}
