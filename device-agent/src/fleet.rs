//! `device-agent fleet`: many simulated copiers in one process, for the demo, the end-to-end tests
//! and load runs.
//!
//! Each copier is a full agent ([`run_device`]) with its own certificate, minted in memory from the
//! CA, and its own connection. They share one outbox file, keyed by serial, because a process may
//! hold at most 20,000 open files: one socket per copier is the budget. They connect at random
//! moments within a short window, so a thousand TLS handshakes do not land on the relay in the
//! same millisecond.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use protocol::{Role, Serial};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::agent::{DeviceAgent, run_device};
use crate::config::FleetSettings;
use crate::outbox::Outbox;
use crate::sim::SimCopier;
use crate::{AgentError, create_data_dir, device, write_ready_file};

/// A progress bar on stderr; indicatif hides it by itself when stderr is not a terminal.
fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg:>22} [{bar:40}] {pos}/{len} ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

type Credentials = Vec<(Serial, Arc<rustls::ClientConfig>)>;

/// Mints every copier's certificate and TLS configuration. CPU-bound, so it runs on a blocking
/// thread; it stops early if the fleet is stopped meanwhile.
async fn mint(
    settings: &FleetSettings,
    bar: &ProgressBar,
    stop: &CancellationToken,
) -> Result<Credentials, AgentError> {
    let serials = settings.serials()?;
    let pki_dir = settings.pki_dir.clone();
    let (bar, stop) = (bar.clone(), stop.clone());
    tokio::task::spawn_blocking(move || -> Result<Credentials, AgentError> {
        let ca = pki::Ca::load(&pki_dir)?;
        let mut out = Vec::with_capacity(serials.len());
        for serial in serials {
            if stop.is_cancelled() {
                break;
            }
            let issued = ca.issue(Role::Device, serial.as_str())?;
            let tls = pki::client_config(ca.ca_pem(), &issued.cert_pem, &issued.key_pem)?;
            out.push((serial, tls));
            bar.inc(1);
        }
        Ok(out)
    })
    .await
    .map_err(|e| AgentError::Task(e.to_string()))?
}

/// Runs the fleet until `stop`. Writes the ready file (`{"devices":N}`) once every copier is
/// connected and subscribed.
pub async fn run_fleet(settings: FleetSettings, stop: CancellationToken) -> Result<(), AgentError> {
    create_data_dir(&settings.data_dir)?;
    let outbox = Outbox::open(&settings.store_path())?;
    let count = settings.count;
    let relays: Vec<String> = settings.relays.iter().map(ToString::to_string).collect();
    info!(devices = count, relays = ?relays, data_dir = %settings.data_dir.display(), "fleet starting");

    let bar = progress_bar(u64::from(count));
    bar.set_message("minting certificates");
    let credentials = mint(&settings, &bar, &stop).await?;
    bar.reset();
    bar.set_message("connecting copiers");

    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let operator = crate::signal::operator_actions();
    let tasks = TaskTracker::new();
    for (serial, tls) in credentials {
        let agent = DeviceAgent {
            serial: serial.clone(),
            site: settings.site.clone(),
            relays: settings.relays.clone(),
            tls,
            device: device::shared(SimCopier::with_home(
                &serial,
                &settings.sim,
                &settings.home_of(&serial),
            )),
            outbox: outbox.clone(),
            settings: settings.session.clone(),
            home: settings.home_of(&serial),
            schedule: settings.schedule.clone(),
            publisher: settings.publisher_key.clone(),
            operator: Some(operator.clone()),
            monitor: settings.monitor.clone(),
        };
        let delay = settings
            .connect_spread
            .mul_f64(rand::thread_rng().r#gen::<f64>());
        let (stop, ready) = (stop.clone(), ready_tx.clone());
        tasks.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => return,
                () = sleep(delay) => {}
            }
            let result = run_device(agent, stop, Some(ready)).await;
            crate::log_device_end(&serial, Ok(result));
        });
    }
    drop(ready_tx);
    tasks.close();

    let mut ready = 0u32;
    let mut all_reported = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tasks.wait() => break, // every copier has stopped on its own
            got = ready_rx.recv(), if !all_reported => match got {
                Some(_) => {
                    ready += 1;
                    bar.inc(1);
                    if ready == count {
                        bar.finish_with_message("copiers connected");
                        info!(devices = count, "fleet connected and subscribed");
                        if let Some(path) = &settings.ready_file {
                            write_ready_file(path, &serde_json::json!({ "devices": count }))?;
                        }
                    }
                }
                None => all_reported = true,
            },
        }
    }
    bar.finish_and_clear();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some copiers did not stop within 10 s");
    }
    Ok(())
}
