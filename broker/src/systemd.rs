//! systemd's notify protocol for `Type=notify` units (`systemd_notify = true`, flag
//! `--systemd-notify`): `READY=1` once the relay accepts clients, which is after the store is open
//! and every retained order is republished, so units ordered after the relay (and `systemctl
//! start`) wait for a relay that devices can really use; `STOPPING=1` when it stops; and, when the
//! unit sets `WatchdogSec=`, `WATCHDOG=1` at half the interval systemd gives in `WATCHDOG_USEC`.
//!
//! The datagrams are sent by the `sd-notify` crate; without `NOTIFY_SOCKET` (not started by
//! systemd) each call does nothing (docs/decisions.md, D18).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Says so once at start if the relay was asked to notify but has nowhere to.
pub fn check_socket() {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        warn!(
            "systemd_notify is on but NOTIFY_SOCKET is not set (not started by systemd with \
             Type=notify?): nothing will be sent"
        );
    }
}

/// `READY=1`, with a status line `systemctl status` shows.
pub fn ready(republished: usize) {
    let status = format!("accepting clients; {republished} retained messages republished");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// `WATCHDOG=1` every half of `WATCHDOG_USEC` until `stop`; returns at once when the unit has
/// no watchdog. The pings come from the relay's async runtime, so a runtime that hangs stops
/// them and systemd restarts the relay.
pub async fn watchdog(stop: CancellationToken) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (timeout / 2).max(Duration::from_millis(1));
    info!(
        every_ms = every.as_millis() as u64,
        "systemd watchdog: pinging"
    );
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => send(&[NotifyState::Watchdog]),
        }
    }
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "could not notify systemd");
    }
}
