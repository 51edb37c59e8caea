//! One shutdown signal for the whole process (SIGINT or SIGTERM), as a `CancellationToken` that
//! every loop selects on. Pending messages stay in the outbox for the next start.
//!
//! SIGUSR1 is an operator action (claim 15: a moment that makes a device reach the relay): a
//! device in a periodic session checks in at once.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Counts SIGUSR1s; every device of the process watches the same counter. Call from a runtime.
pub fn operator_actions() -> watch::Receiver<u64> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = watch::channel(0u64);
    match signal(SignalKind::user_defined1()) {
        Ok(mut usr1) => {
            tokio::spawn(async move {
                while usr1.recv().await.is_some() {
                    info!("operator action (SIGUSR1)");
                    tx.send_modify(|n| *n += 1);
                    if tx.is_closed() {
                        break;
                    }
                }
            });
        }
        Err(e) => warn!(error = %e, "cannot listen for SIGUSR1; operator actions are ignored"),
    }
    rx
}

/// Cancels `stop` on the first SIGINT or SIGTERM.
pub fn cancel_on_signal(stop: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown requested; pending messages stay in the outbox");
        stop.cancel();
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
