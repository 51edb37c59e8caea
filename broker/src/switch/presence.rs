//! The presence route: how the gateway tells the core that a device's session opened or closed
//! (claim 42's display).
//!
//! Presence is the relay's own observation, never the device's word: the gateway knows when a
//! device's authenticated MQTT session starts and ends, whatever ended it (DISCONNECT, a reset, a
//! keepalive that ran out). Each such moment is one [`PresenceEvent`] on an unbounded channel to
//! the core's task, which records it in the store with the device's last-seen time and republishes the
//! retained `fleet/{serial}/state` view. Unbounded because a session must never wait on the core
//! to open or close; an event is a few dozen bytes and there are two per session.

use protocol::{Identity, Role, Serial};

use crate::core::PresenceEvent;
use tokio::sync::mpsc;
use tracing::debug;

/// The gateway's end. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PresenceTx(mpsc::UnboundedSender<PresenceEvent>);

/// A connected pair: the gateway sends, the core receives.
pub fn channel() -> (PresenceTx, mpsc::UnboundedReceiver<PresenceEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (PresenceTx(tx), rx)
}

impl PresenceTx {
    /// Reports a session of `who` opening or closing; only devices have a presence.
    pub fn session(&self, who: &Identity, online: bool) {
        if who.role() != Role::Device {
            return;
        }
        let Ok(serial) = Serial::parse(who.id()) else {
            return; // cannot happen: an identity's id follows the serial rules
        };
        if self.0.send(PresenceEvent { serial, online }).is_err() {
            debug!("core gone; presence event dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_devices_have_a_presence() {
        let (tx, mut rx) = channel();
        tx.session(&Identity::new(Role::Host, "svc").unwrap(), true);
        tx.session(&Identity::new(Role::Device, "C1").unwrap(), true);
        tx.session(&Identity::new(Role::Device, "C1").unwrap(), false);
        let first = rx.try_recv().unwrap();
        assert_eq!((first.serial.as_str(), first.online), ("C1", true));
        assert!(!rx.try_recv().unwrap().online);
        assert!(rx.try_recv().is_err());
    }
}
