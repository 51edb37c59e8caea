//! Periodic meter reads (Fig. 3 counters, for billing): every `[report] counters_every_secs` the
//! agent reads the counters and sends them on `dev/{serial}/up/counters` through the outbox, like
//! the seed's device calling the host with its counts. A device in periodic mode keeps them until
//! its next check-in; the relay keeps each as a reading that `host-agent export counters` lists.

use std::time::Duration;

use protocol::data::Section;
use protocol::meter::CounterReport;
use protocol::topic::UpKind;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::device::{self, SharedDevice};
use crate::report::Reporter;

/// Reads and sends the counters every `every` until `stop`; the first read comes one period
/// after the start.
pub async fn run(device: SharedDevice, report: Reporter, every: Duration, stop: CancellationToken) {
    let every = every.max(Duration::from_secs(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let serial = report.serial().clone();
        let counters = match device::read_sections(&device, vec![Section::Counters]).await {
            Ok(mut data) => data.remove(&Section::Counters).unwrap_or_default(),
            Err(e) => {
                warn!(serial = %serial, error = %e, "could not read the counters for a meter report");
                continue;
            }
        };
        let body = CounterReport {
            read_at: chrono::Utc::now(),
            counters,
        };
        match report.send(UpKind::Counters, body, None).await {
            Ok(id) => info!(serial = %serial, msg_id = id, "meter reading queued"),
            Err(e) => warn!(serial = %serial, error = %e, "could not store a meter reading"),
        }
    }
}
