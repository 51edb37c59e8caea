//! The presence route: how the gateway tells the core that a device's session opened or closed
//! (claim 42's display).
//!
//! Presence is the relay's own observation, never the device's word: the gateway knows when a
//! device's authenticated MQTT session starts and ends, whatever ended it (DISCONNECT, a reset, a
//! keepalive that ran out). Each such moment is one [`PresenceEvent`] on an unbounded channel to
//! the core's task, which records it in the store with the device's last-seen time and republishes the
//! retained `fleet/{serial}/state` view. Unbounded because a session must never wait on the core
//! to open or close; an event is a few dozen bytes and there are two per session.

use protocol::{Identity, RelayId, Role, Serial};

use crate::core::{PresenceEvent, SessionEvent};
use tokio::sync::mpsc;
use tracing::debug;

/// The gateway's end. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PresenceTx(mpsc::UnboundedSender<SessionEvent>);

/// A connected pair: the gateway sends, the core receives.
pub fn channel() -> (PresenceTx, mpsc::UnboundedReceiver<SessionEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (PresenceTx(tx), rx)
}

impl PresenceTx {
    /// Reports a session of `who` opening or closing: a device's presence, or a child relay's
    /// (whose devices a parent cannot reach while it is away); hosts and integrators have none.
    pub fn session(&self, who: &Identity, online: bool) {
        // An identity's id follows the id rules, so these parses cannot fail.
        let event = match who.role() {
            Role::Device => match Serial::parse(who.id()) {
                Ok(serial) => SessionEvent::Device(PresenceEvent { serial, online }),
                Err(_) => return,
            },
            Role::Relay => match RelayId::parse(who.id()) {
                Ok(relay) => SessionEvent::Relay { relay, online },
                Err(_) => return,
            },
            Role::Host | Role::Integrator => return,
        };
        if self.0.send(event).is_err() {
            debug!("core gone; presence event dropped");
        }
    }

    /// Reports the topic filters a device's persistent session keeps, after they changed (empty:
    /// it has none now), for the core to record (`crate::switch::hub`).
    pub fn session_filters(&self, who: &Identity, filters: Vec<String>) {
        let Ok(serial) = Serial::parse(who.id()) else {
            return;
        };
        if who.role() != Role::Device {
            return;
        }
        if self
            .0
            .send(SessionEvent::SessionFilters { serial, filters })
            .is_err()
        {
            debug!("core gone; session filters dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_relays_have_a_presence_hosts_none() {
        let (tx, mut rx) = channel();
        tx.session(&Identity::new(Role::Host, "svc").unwrap(), true);
        tx.session(&Identity::new(Role::Device, "C1").unwrap(), true);
        tx.session(&Identity::new(Role::Device, "C1").unwrap(), false);
        tx.session(&Identity::new(Role::Relay, "R1").unwrap(), true);
        let device = |e| match e {
            SessionEvent::Device(d) => d,
            other => panic!("{other:?}"),
        };
        let first = device(rx.try_recv().unwrap());
        assert_eq!((first.serial.as_str(), first.online), ("C1", true));
        assert!(!device(rx.try_recv().unwrap()).online);
        assert!(matches!(
            rx.try_recv().unwrap(),
            SessionEvent::Relay { online: true, .. }
        ));
        assert!(rx.try_recv().is_err());
    }
}
