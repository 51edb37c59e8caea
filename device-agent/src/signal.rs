//! One shutdown signal for the whole process (SIGINT or SIGTERM), as a `CancellationToken` that
//! every loop selects on. Pending messages stay in the outbox for the next start.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
