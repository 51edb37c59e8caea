//! The session's side of each connection: on every CONNACK it subscribes to the device's topics
//! (unless the relay resumed a session this process subscribed in), queues everything pending
//! and announces the device's state; on a lost or closed connection it forgets what was queued
//! for it; and it tells the worker and the running job whether the relay can be reached.

use protocol::presence::StateReport;
use protocol::topic::{self, UpKind};
use rumqttc::{QoS, SubAck, SubscribeFilter, SubscribeReasonCode};
use tokio::time::Instant;
use tracing::{error, info};

use super::Session;
use super::link::LinkEvent;
use crate::device;

impl Session {
    pub(super) async fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected { relay, resumed } => {
                self.relay = Some(relay);
                self.on_connected(resumed).await
            }
            LinkEvent::Disconnected => self.on_disconnected(),
            LinkEvent::Parked => {
                // Answered in settle(), which also covers a link that had parked already.
                self.plan.parked = !*self.link.want.borrow();
            }
            LinkEvent::SubAck(ack) => self.on_suback(&ack),
            LinkEvent::Publish(p) => {
                self.plan.last_activity = Instant::now();
                self.on_publish(p).await;
            }
        }
    }

    /// Tells the worker and jobs whether the relay can be reached, and whether waiting jobs may start.
    pub(super) fn publish_online(&self) {
        let online = self.online();
        self.ends.online.send_if_modified(|v| {
            let changed = *v != online;
            *v = online;
            changed
        });
        let release = !self.is_periodic() || online;
        self.ends.release.send_if_modified(|v| {
            let changed = *v != release;
            *v = release;
            changed
        });
    }

    async fn on_connected(&mut self, resumed: bool) {
        self.connected = true;
        self.subscribed_at = None;
        self.disconnect_requested = false;
        let relay = self
            .relay
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        info!(serial = %self.serial, broker = %relay, pending = self.out.pending.len(), session_present = resumed, "connected to broker");
        // A session resumed at a relay this process has subscribed at holds our filters; one
        // from before this process (an older agent may have subscribed to fewer) is topped up.
        if resumed && self.subscribed_at_relays.contains(&relay) {
            self.subscribed();
        } else {
            self.subscribe();
        }
        let now = Instant::now();
        self.requeue_all(now);
        self.plan.last_activity = now;
        self.announce_state().await;
    }

    /// Subscribes first: requests leave in order, so the subscriptions are in place before the
    /// relay can ack anything we send next.
    fn subscribe(&mut self) {
        let filters = [
            SubscribeFilter::new(topic::dev_jobs_filter(&self.serial), QoS::AtLeastOnce),
            SubscribeFilter::new(topic::dev_ack(&self.serial), QoS::AtLeastOnce),
            SubscribeFilter::new(topic::dev_merged_filter(&self.serial), QoS::AtLeastOnce),
            SubscribeFilter::new(topic::dev_blob_filter(&self.serial), QoS::AtLeastOnce),
        ];
        if let Err(e) = self.link.client.try_subscribe_many(filters) {
            // Only a full request channel can cause this, and a fresh connection has an empty one.
            error!(serial = %self.serial, error = %e, "could not subscribe");
        }
    }

    fn on_disconnected(&mut self) {
        self.connected = false;
        self.subscribed_at = None;
        self.disconnect_requested = false;
        self.out.unqueue_all();
        self.publish_online();
    }

    /// Tells the relay the device's site, model and firmware.
    async fn announce_state(&mut self) {
        let mut state = device::state_of(&self.device).await;
        state.site = self.site.clone();
        if let Some((id, sent)) = &self.state_sent
            && self.out.pending.contains_key(id)
            && *sent == state
        {
            return; // the same announcement is still pending and was just queued again
        }
        // With the schedule, so the relay knows when to expect a periodic device back.
        let report = StateReport {
            state: state.clone(),
            schedule: Some(self.plan.planner.schedule().clone()),
        };
        match self.report.send(UpKind::State, report, None).await {
            Ok(id) => self.state_sent = Some((id, state)),
            Err(e) => error!(serial = %self.serial, error = %e, "could not store the device state"),
        }
    }

    fn on_suback(&mut self, ack: &SubAck) {
        if ack
            .return_codes
            .iter()
            .any(|c| matches!(c, SubscribeReasonCode::Failure))
        {
            error!(
                serial = %self.serial,
                "broker refused our subscriptions; check that the certificate's CN is this serial"
            );
            return;
        }
        if let Some(relay) = &self.relay {
            self.subscribed_at_relays.insert(relay.to_string());
        }
        self.subscribed();
    }

    /// The relay sends this connection the device's topics.
    fn subscribed(&mut self) {
        self.subscribed_at = Some(Instant::now());
        self.publish_online();
        if let Some(ready) = self.ready.take() {
            info!(serial = %self.serial, "subscribed; ready for jobs");
            let _ = ready.send(self.serial.clone());
        }
    }
}
