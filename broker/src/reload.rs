//! Reload without restart (`kill -HUP`, `broker reload`): the configuration is read again and
//! what can change while the relay runs is applied at once — the revocation list (and the
//! server certificate with it), the per-client limits and timeouts, the alarm limits, and the
//! notification rules and mail settings. Every open session of a certificate the new list
//! revokes is closed; every other session goes on.
//!
//! A reload is all or nothing: a file that does not parse or validate, a revocation list that
//! is missing or signed by another CA, a mail server that cannot be set up — any of these is
//! logged with its reason and the running configuration is kept whole. Keys that size what was
//! built at start (listen addresses, directories, `max_clients`, ...) keep their running value;
//! a reload that changes them says so in the log.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{BrokerConfig, ConfigError};
use crate::core::Core;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::notify::{Senders, WorkerSettings};

/// How a running relay is asked to reload, given to [`crate::run`] by its caller (the `broker`
/// command turns SIGHUP into a request).
pub struct Reload {
    /// Reads the configuration again, as at start (the file, then the flags). `Err`: why not,
    /// for the log.
    pub load: Box<dyn Fn() -> Result<BrokerConfig, String> + Send + Sync>,
    /// One message per request; requests that arrive during a reload may be merged.
    pub requests: mpsc::Receiver<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Load(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("revocation list: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("notifications: {0}")]
    Notify(String),
}

/// What one reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Certificates the revocation list now in force revokes.
    pub revoked: usize,
    /// Open sessions closed because their certificate is among them.
    pub sessions_closed: usize,
    /// Keys the file changed that apply only at a restart (their running value is kept).
    pub restart_only: Vec<&'static str>,
}

/// The parts a reload reaches, and the configuration in force.
pub struct Reloader {
    running: BrokerConfig,
    gateway: Arc<Gateway>,
    core: Arc<Core>,
    notify: watch::Sender<WorkerSettings>,
    metrics: Arc<Metrics>,
}

impl Reloader {
    pub fn new(
        running: BrokerConfig,
        gateway: Arc<Gateway>,
        core: Arc<Core>,
        notify: watch::Sender<WorkerSettings>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reloader {
            running,
            gateway,
            core,
            notify,
            metrics,
        }
    }

    /// Answers reload requests until `stop`.
    pub async fn serve(mut self, mut reload: Reload, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = reload.requests.recv() => if r.is_none() { return },
            }
            info!("reloading the configuration");
            let result = (reload.load)()
                .map_err(ReloadError::Load)
                .and_then(|cfg| self.apply(cfg));
            self.report(result);
        }
    }

    fn report(&self, result: Result<Applied, ReloadError>) {
        match result {
            Ok(done) => {
                Metrics::inc(&self.metrics.reloads);
                if !done.restart_only.is_empty() {
                    warn!(
                        keys = %done.restart_only.join(", "),
                        "configuration reloaded, but these keys apply only at a restart; their running values are kept"
                    );
                }
                info!(
                    revoked = done.revoked,
                    sessions_closed = done.sessions_closed,
                    "configuration reloaded: revocation list, limits and notification rules in force"
                );
            }
            Err(e) => {
                Metrics::inc(&self.metrics.reloads_failed);
                warn!(error = %e, "reload refused; the running configuration is kept");
            }
        }
    }

    /// Checks everything first and changes nothing unless all of it is good.
    pub fn apply(&mut self, new: BrokerConfig) -> Result<Applied, ReloadError> {
        new.validate()?;
        let restart_only = restart_only_changes(&self.running, &new);
        let old = &self.running;
        // The PKI folder is one of the restart-only keys; the list in it is read again.
        let crl = pki::load_crl(&old.pki_dir, new.crl_file.as_deref())?;
        let tls = pki::server_config_as(
            &old.pki_dir,
            crl.as_ref(),
            old.relay_id.as_ref().map(|r| r.as_str()),
        )?;
        let senders = Senders::new(&new.notify, &old.server_name).map_err(ReloadError::Notify)?;

        let revoked = crl
            .as_ref()
            .map(|c| c.revoked_serials())
            .unwrap_or_default();
        let count = revoked.len();
        self.gateway.set_settings(new.gateway_settings());
        let sessions_closed = self.gateway.set_tls(tls, revoked);
        self.core.configure_alerts(new.alert_settings());
        self.core.configure_relays(new.relay_settings()?);
        self.notify.send_replace(WorkerSettings {
            cfg: new.notify.clone(),
            senders: Arc::new(senders),
        });
        self.running = keep_restart_only(&self.running, new);
        Ok(Applied {
            revoked: count,
            sessions_closed,
            restart_only,
        })
    }
}

/// Applies `$body` to each key that takes effect only at a restart.
macro_rules! restart_only_keys {
    ($m:ident) => {
        $m!(
            listen,
            ws_listen,
            data_dir,
            pki_dir,
            server_name,
            max_clients,
            max_handshakes,
            listen_backlog,
            max_payload_bytes,
            finished_visible_secs,
            default_deadline_secs,
            default_max_attempts,
            metrics_listen,
            metrics_header_timeout_secs,
            metrics_max_connections,
            min_free_bytes,
            pid_file,
            tls_tickets,
            tls_ticket_lifetime_secs,
            tls_ticket_rotation_secs,
            relay_id,
            publisher_key,
            node_id,
            cluster_db,
            cluster_bus,
            cluster_bus_ca,
            cluster_bus_cert,
            cluster_bus_key,
            cluster_order_sweep_secs,
            parent,
            uplink_batch_max_items,
            uplink_batch_max_bytes,
            uplink_batch_delay_ms,
            commit_window_us,
            parent_session,
            parent_interval_secs
        )
    };
}

fn restart_only_changes(old: &BrokerConfig, new: &BrokerConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! compare {
        ($($key:ident),*) => { $( if old.$key != new.$key { changed.push(stringify!($key)); } )* };
    }
    restart_only_keys!(compare);
    changed
}

fn keep_restart_only(old: &BrokerConfig, mut new: BrokerConfig) -> BrokerConfig {
    macro_rules! keep {
        ($($key:ident),*) => { $( new.$key = old.$key.clone(); )* };
    }
    restart_only_keys!(keep);
    new
}
