//! The dashboard's subscription to the relay's fleet views: `fleet/+/jobs/+`, `fleet/+/state`,
//! `fleet/+/alarm` and `json/fleet/rollouts/+` (topics.md), decoded into the [`Model`].
//!
//! A session of its own (client id `HOST:dashboard-feed-…`), apart from the [`HostClient`] that
//! carries requests, because `HostClient` routes job views and alarms but not device state; the
//! loop is the same shape as its driver: subscribe after every CONNACK, back off after a failure.
//! The relay retains every view, so each (re)connection brings the whole picture again, except
//! the alarm views deleted meanwhile (a device's last alarm cleared): after each subscription the
//! relay's list of active alarms (through the [`HostClient`]) says which kept ones to drop, so
//! the page keeps its list across a reconnect instead of emptying it (docs/decisions.md, D19).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use protocol::alarm::AlarmState;
use protocol::host::{HostReply, HostRequest};
use protocol::presence::StateView;
use protocol::proxy::ProxyUrl;
use protocol::topic::{self, Topic};
use protocol::url::BrokerUrl;
use protocol::{Envelope, HostId};
use rumqttc::{AsyncClient, Event, Packet, QoS, SubscribeFilter, SubscribeReasonCode};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::model::Model;
use crate::client::{HostClient, MAX_INCOMING_BYTES, unexpected};

/// Every device's state view. `protocol::topic` has constants for the job and alarm filters
/// only; this is the same tree (`fleet/{serial}/state`, topics.md), with the serial wildcarded.
const ALL_FLEET_STATES: &str = "fleet/+/state";
const KEEP_ALIVE: Duration = Duration::from_secs(20);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where and as whom the feed connects.
#[derive(Clone)]
pub struct FeedConfig {
    pub broker: BrokerUrl,
    pub proxy: Option<ProxyUrl>,
    pub tls: Arc<rustls::ClientConfig>,
    pub host: HostId,
}

/// Runs until `stop`: keeps the session up and the model current. `client` asks the relay for
/// its active alarms after each subscription.
pub async fn run(
    cfg: FeedConfig,
    model: Arc<Model>,
    client: Arc<HostClient>,
    stop: CancellationToken,
) {
    let client_id = crate::commands::watch::client_id(&cfg.host, "dashboard-feed");
    let mut opts = link::mqtt_options(&client_id, &cfg.broker, cfg.proxy.as_ref(), cfg.tls.clone());
    opts.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_BYTES, 64 * 1024);
    let (mqtt, mut eventloop) = AsyncClient::new(opts, 16);
    let filters = [
        topic::ALL_FLEET_JOBS,
        ALL_FLEET_STATES,
        topic::ALL_FLEET_ALARMS,
        topic::ALL_JSON_ROLLOUTS,
    ];
    let mut backoff = BACKOFF_MIN;
    let mut resync: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_MIN;
                // A list asked for in an earlier session must not judge this one's views.
                if let Some(old) = resync.take() {
                    old.abort();
                }
                model.begin_resync();
                let subs = filters
                    .iter()
                    .map(|f| SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce));
                if let Err(e) = mqtt.try_subscribe_many(subs) {
                    warn!(host = %cfg.host, error = %e, "could not queue the dashboard's subscription");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    warn!(host = %cfg.host, "the relay refused the dashboard's subscription to the fleet views");
                } else {
                    info!(host = %cfg.host, broker = %cfg.broker, "dashboard subscribed to the fleet views");
                    model.set_linked(true);
                    resync = Some(tokio::spawn(end_resync(model.clone(), client.clone())));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => apply(&model, &p.topic, &p.payload),
            Ok(_) => {}
            Err(e) => {
                model.set_linked(false);
                debug!(host = %cfg.host, error = %e, "dashboard feed: connection failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    if let Some(task) = resync {
        task.abort();
    }
    let _ = mqtt.try_disconnect();
    model.set_linked(false);
}

/// Asks the relay which devices have an active alarm and drops the kept views of the others
/// ([`Model::end_resync`]). On failure the kept views stay until the next session.
async fn end_resync(model: Arc<Model>, client: Arc<HostClient>) {
    let req = HostRequest::Alarms {
        all: false,
        serial: None,
    };
    match client.request(req).await {
        Ok(HostReply::Alarms { alarms }) => {
            let active: BTreeSet<String> = alarms
                .into_iter()
                .filter(|a| a.status.is_active())
                .map(|a| a.serial)
                .collect();
            model.end_resync(&active);
        }
        Ok(other) => warn!(error = %unexpected("alarms", &other), "dashboard: no alarm list"),
        Err(e) => {
            warn!(error = %e, "dashboard: could not ask the relay for its active alarms; alarms kept from before the reconnect stay until the next one")
        }
    }
}

/// Decodes one view into the model. Undecodable payloads are logged and skipped: one bad
/// message must not blank the page.
pub fn apply(model: &Model, topic: &str, payload: &[u8]) {
    if topic.starts_with("json/fleet/rollouts/") {
        model.rollout_changed();
        return;
    }
    match Topic::parse(topic) {
        Ok(Topic::FleetAlarm { serial }) => {
            if payload.is_empty() {
                model.set_alarms(serial.as_str(), None);
                return;
            }
            match Envelope::<AlarmState>::from_cbor(payload, MAX_INCOMING_BYTES) {
                Ok(env) => model.set_alarms(serial.as_str(), Some(env.body)),
                Err(e) => warn!(%topic, error = %e, "undecodable alarm view"),
            }
        }
        Ok(Topic::FleetState { serial }) => {
            if payload.is_empty() {
                return;
            }
            match Envelope::<StateView>::from_cbor(payload, MAX_INCOMING_BYTES) {
                Ok(env) => model.set_device(serial.as_str(), env.body),
                Err(e) => warn!(%topic, error = %e, "undecodable state view"),
            }
        }
        Ok(Topic::FleetJob { .. }) => model.job_changed(),
        _ => debug!(%topic, "message on an unexpected topic"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::device::DeviceState;
    use protocol::presence::Presence;

    #[test]
    fn views_land_in_the_model_and_garbage_does_not() {
        let model = Model::new();
        let now = chrono::Utc::now();
        let view = StateView {
            state: DeviceState {
                site: "Kobe".into(),
                model: "C-450".into(),
                firmware: "1.0".into(),
            },
            presence: Presence::Online,
            last_seen: now,
            since: None,
            mode: None,
            interval_secs: None,
            due_by: None,
            relay: None,
            node: None,
        };
        let bytes = Envelope::new(0, now, view.clone()).to_cbor().unwrap();
        apply(&model, "fleet/C1/state", &bytes);
        apply(&model, "fleet/C2/state", b"\xff");
        apply(&model, "fleet/C3/alarm", b"\xff");
        assert_eq!(model.devices(), [("C1".to_owned(), view)]);
        assert!(model.active_alarms().is_empty());
        let mut rx = model.subscribe();
        apply(&model, "fleet/C1/jobs/J-000001", b"");
        assert_eq!(rx.try_recv().unwrap(), super::super::model::Change::Jobs);
    }
}
