//! The link: the task that owns rumqttc's `EventLoop` for one device. It connects while the
//! session wants a connection and parks otherwise, reconnects with backoff, moves along the
//! relays when one cannot be reached, and hands the connection back to a preferred relay when a
//! [`failover::failback`] probe finds one again. It tells the session what happened as
//! [`LinkEvent`]s.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use protocol::Serial;
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, Publish, SubAck,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::SessionSettings;
use crate::failover::{self, NO_TARGET, Relays};
use crate::transport::Endpoint;

/// Requests the session may queue in rumqttc's channel before it has to wait for the link.
const REQUEST_CAPACITY: usize = 64;
/// QoS 1 publishes in flight per connection. rumqttc preallocates a slot per possible packet, so
/// this also sets memory per device; resends cover anything held back.
const INFLIGHT: u16 = 32;
/// How long a clean DISCONNECT may take at shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);
/// Events the link may queue before it waits for the session.
const EVENT_CAPACITY: usize = 64;

/// What the link tells the session.
#[derive(Debug)]
pub(super) enum LinkEvent {
    /// Connected to this relay; `resumed`: the relay still had the device's persistent session
    /// (CONNACK "session present"), subscriptions included.
    Connected {
        relay: Endpoint,
        resumed: bool,
    },
    Disconnected,
    /// Offline on purpose and not trying to connect.
    Parked,
    SubAck(SubAck),
    Publish(Publish),
}

/// The session's ends of the link.
pub(super) struct LinkEnds {
    /// rumqttc's client: what the session publishes, subscribes and disconnects with.
    pub(super) client: AsyncClient,
    pub(super) events: mpsc::Receiver<LinkEvent>,
    /// Whether the link should be connected.
    pub(super) want: watch::Sender<bool>,
    /// Whether the device is idle — no job queued or running, nothing unacked — so the link may
    /// move it back to a preferred relay without leaving work behind.
    pub(super) idle: watch::Sender<bool>,
}

/// Starts the link of `serial` at the preferred relay; it connects once `want` is true (it is
/// not while a firmware write holds relay access suspended). Runs until `stop`.
pub(super) fn spawn(
    serial: &Serial,
    relays: Relays,
    tls: Arc<rustls::ClientConfig>,
    settings: &SessionSettings,
    want: bool,
    stop: &CancellationToken,
) -> (LinkEnds, JoinHandle<()>) {
    let (client, eventloop) = mqtt_client(serial, relays.current(), tls.clone(), settings);
    let (idle_tx, idle_rx) = watch::channel(true);
    let (want_tx, want_rx) = watch::channel(want);
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let link = Link {
        eventloop,
        client: client.clone(),
        events: events_tx,
        want: want_rx,
        serial: serial.clone(),
        relays,
        tls,
        idle: idle_rx,
        settings: settings.clone(),
        stop: stop.clone(),
        target: Arc::new(AtomicUsize::new(NO_TARGET)),
        failback: None,
        backoff: settings.reconnect_min,
        failures: 0,
        connected: false,
    };
    let ends = LinkEnds {
        client,
        events: events_rx,
        want: want_tx,
        idle: idle_tx,
    };
    (ends, tokio::spawn(link.run()))
}

fn mqtt_client(
    serial: &Serial,
    relay: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    settings: &SessionSettings,
) -> (AsyncClient, EventLoop) {
    let opts = mqtt_options(serial, relay, tls, settings);
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let mut net = eventloop.network_options();
    net.set_connection_timeout(settings.connect_timeout.as_secs().max(1));
    // Without it a lone small publish can stall ~40 ms on Nagle and delayed ACK.
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// rumqttc's options for one relay; rebuilt when the link moves to another.
fn mqtt_options(
    serial: &Serial,
    relay: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    settings: &SessionSettings,
) -> MqttOptions {
    // MQTT 3.1.1, client id = serial (the relay checks it against the certificate). A persistent
    // session, for one thing only: a reconnect that resumes it need not subscribe again. What
    // the device sends is never left to it: the outbox, not a broker-side session, is what we
    // rely on (docs/decisions.md, D2, D3).
    let mut opts = relay.mqtt_options(serial.as_str(), tls);
    opts.set_keep_alive(settings.keepalive)
        .set_clean_session(false)
        .set_max_packet_size(settings.max_packet_bytes, settings.max_packet_bytes)
        .set_inflight(INFLIGHT)
        .set_request_channel_capacity(REQUEST_CAPACITY);
    opts
}

/// What a CONNACK refusal from a chukei relay asks of whoever runs this device; `None` for a
/// failure that is not a refusal. The relay sends "server unavailable" for load (it is full, or
/// this serial already holds its sessions: a second agent running with the same certificate),
/// and "not authorized" for a client id that is not the certificate's serial.
fn refusal_hint(e: &ConnectionError) -> Option<&'static str> {
    let ConnectionError::ConnectionRefused(code) = e else {
        return None;
    };
    Some(match code {
        ConnectReturnCode::ServiceUnavailable => {
            "the relay is full (max_clients) or this serial already holds \
             max_connections_per_identity sessions: stop any other agent running with this \
             certificate; the agent keeps retrying, and the relay's log says which"
        }
        ConnectReturnCode::NotAuthorized => {
            "the relay refused this serial for the certificate: the serial must be the \
             certificate's CN (`broker pki issue --role device --id SERIAL`)"
        }
        ConnectReturnCode::Success
        | ConnectReturnCode::RefusedProtocolVersion
        | ConnectReturnCode::BadClientId
        | ConnectReturnCode::BadUserNamePassword => {
            "a chukei relay never answers this; check that --broker is the chukei relay's address"
        }
    })
}

/// `base` scaled by a random factor in [0.5, 1.5), so a fleet that lost the relay together does
/// not come back in lockstep.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
}

/// Whether the link goes on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

/// What one poll of the event loop gave.
enum Polled {
    Event(Result<Event, ConnectionError>),
    /// The session changed its mind about wanting a connection while none was up.
    Reconsider,
    Stop,
}

/// The link's state. It polls the event loop until `stop`, while `want` says so, reconnecting
/// with backoff: reconnect_min doubling to reconnect_max, jittered. With several relays, a failed
/// attempt moves to the next one at once and the backoff applies only after every relay has
/// failed; a lost connection starts over from the preferred relay; and while connected to a
/// fallback relay a [`failover::failback`] task probes the preferred ones (see
/// [`crate::failover`]).
struct Link {
    eventloop: EventLoop,
    client: AsyncClient,
    events: mpsc::Sender<LinkEvent>,
    want: watch::Receiver<bool>,
    serial: Serial,
    relays: Relays,
    tls: Arc<rustls::ClientConfig>,
    /// The session is idle (no job, nothing unacked): a return to a preferred relay may start.
    idle: watch::Receiver<bool>,
    settings: SessionSettings,
    stop: CancellationToken,
    /// The preferred relay a failback task found again, to connect to after its DISCONNECT.
    target: Arc<AtomicUsize>,
    failback: Option<JoinHandle<()>>,
    backoff: Duration,
    /// Failed attempts in a row.
    failures: u32,
    connected: bool,
}

impl Link {
    async fn run(mut self) {
        while self.step().await == Flow::Go {}
        self.close().await;
    }

    /// Parks, or polls once and acts on what came.
    async fn step(&mut self) -> Flow {
        if !self.connected && !*self.want.borrow_and_update() {
            return self.park().await;
        }
        let polled = match self.poll().await {
            Polled::Event(polled) => polled,
            Polled::Reconsider => return Flow::Go,
            Polled::Stop => return Flow::Stop,
        };
        let event = match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => self.on_connack(ack.session_present),
            Ok(Event::Incoming(Packet::Publish(p))) => LinkEvent::Publish(p),
            Ok(Event::Incoming(Packet::SubAck(s))) => LinkEvent::SubAck(s),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => self.on_disconnect_sent(),
            Ok(_) => return Flow::Go,
            Err(e) => return self.on_error(&e).await,
        };
        self.tell(event).await
    }

    /// `&mut self`: a `&Link` held across the send would need `Link: Sync`, and rumqttc's
    /// event loop is not.
    async fn tell(&mut self, event: LinkEvent) -> Flow {
        match self.events.send(event).await {
            Ok(()) => Flow::Go,
            Err(_) => Flow::Stop,
        }
    }

    /// Offline and not wanted: says so, and waits until the session wants a connection again.
    async fn park(&mut self) -> Flow {
        if self.tell(LinkEvent::Parked).await == Flow::Stop {
            return Flow::Stop;
        }
        tokio::select! {
            () = self.stop.cancelled() => return Flow::Stop,
            r = self.want.wait_for(|w| *w) => if r.is_err() { return Flow::Stop },
        }
        self.backoff = self.settings.reconnect_min;
        self.failures = 0;
        // Every check-in starts with the preferred relay.
        if self.relays.rank() != 0 {
            self.relays.restart();
            self.aim();
        }
        Flow::Go
    }

    async fn poll(&mut self) -> Polled {
        if self.connected {
            // Never cancelled while connected: the session closes the connection with a
            // DISCONNECT, which comes back here as an outgoing event.
            tokio::select! {
                () = self.stop.cancelled() => Polled::Stop,
                polled = self.eventloop.poll() => Polled::Event(polled),
            }
        } else {
            tokio::select! {
                () = self.stop.cancelled() => Polled::Stop,
                _ = self.want.changed() => Polled::Reconsider,
                polled = self.eventloop.poll() => Polled::Event(polled),
            }
        }
    }

    /// Points rumqttc at the relay `relays` names now; used by the next connection attempt.
    fn aim(&mut self) {
        self.eventloop.mqtt_options = mqtt_options(
            &self.serial,
            self.relays.current(),
            self.tls.clone(),
            &self.settings,
        );
    }

    fn on_connack(&mut self, session_present: bool) -> LinkEvent {
        // rumqttc would send what it had unacked on the last connection again into a resumed
        // session; the outbox sends all of it again anyway (Session::requeue_all), so rumqttc's
        // copies would only be duplicates for the relay to drop.
        self.eventloop.pending.clear();
        self.connected = true;
        self.backoff = self.settings.reconnect_min;
        self.failures = 0;
        if self.relays.rank() > 0 && !self.settings.failback.is_zero() {
            self.start_failback();
        }
        LinkEvent::Connected {
            relay: self.relays.current().clone(),
            resumed: session_present,
        }
    }

    /// On a fallback relay: probes the preferred ones beside the connection.
    fn start_failback(&mut self) {
        self.target.store(NO_TARGET, Ordering::SeqCst);
        self.failback = Some(tokio::spawn(failover::failback(
            self.serial.clone(),
            self.relays.preferred().to_vec(),
            self.relays.rank(),
            self.tls.clone(),
            self.client.clone(),
            self.idle.clone(),
            self.target.clone(),
            self.settings.failback,
            self.settings.connect_timeout,
        )));
    }

    fn stop_failback(&mut self) {
        if let Some(task) = self.failback.take() {
            task.abort();
        }
    }

    /// The session (or a failback) closed the connection on purpose: drops the socket now rather
    /// than wait for the relay to close it, and aims at the relay a failback found, if any.
    fn on_disconnect_sent(&mut self) -> LinkEvent {
        self.eventloop.clean();
        self.connected = false;
        self.stop_failback();
        info!(serial = %self.serial, relay = %self.relays.current(), "disconnected from broker");
        let back = self.target.swap(NO_TARGET, Ordering::SeqCst);
        if back != NO_TARGET {
            self.relays.switch_to(back);
            self.aim();
        }
        LinkEvent::Disconnected
    }

    /// A connection was lost or an attempt failed: picks the relay to try next and waits first
    /// if every relay has failed this round.
    async fn on_error(&mut self, e: &ConnectionError) -> Flow {
        self.failures += 1;
        self.stop_failback();
        // A return the connection did not live to make is void.
        self.target.store(NO_TARGET, Ordering::SeqCst);
        let failed = self.relays.current().clone();
        self.log_failure(&failed, e);
        let back_off = self.next_relay(&failed);
        if self.connected {
            self.connected = false;
            if self.tell(LinkEvent::Disconnected).await == Flow::Stop {
                return Flow::Stop;
            }
        }
        if !back_off {
            return Flow::Go;
        }
        self.back_off().await
    }

    fn log_failure(&self, failed: &Endpoint, e: &ConnectionError) {
        let (serial, failures) = (&self.serial, self.failures);
        if self.connected {
            warn!(serial = %serial, relay = %failed, error = %e, "connection to broker lost; reconnecting");
        } else if failures == 1 || failures.is_multiple_of(10) {
            // A fleet of thousands facing a relay that is down would otherwise log thousands of
            // lines a minute.
            match refusal_hint(e) {
                Some(hint) => {
                    warn!(serial = %serial, broker = %failed, error = %e, attempts = failures, hint, "the broker refused the connection; retrying")
                }
                None => {
                    warn!(serial = %serial, broker = %failed, error = %e, attempts = failures, "could not connect to broker; retrying")
                }
            }
        } else {
            debug!(serial = %serial, broker = %failed, error = %e, attempts = failures, "could not connect to broker; retrying");
        }
    }

    /// Where to try after `failed`; true if the link should wait first.
    fn next_relay(&mut self, failed: &Endpoint) -> bool {
        let back_off = if self.connected {
            // A blip is the likeliest cause: after a pause, the preferred relay first.
            self.relays.restart();
            true
        } else {
            self.relays.failed()
        };
        if self.relays.current() != failed {
            self.aim();
            if !back_off {
                info!(serial = %self.serial, from = %failed, relay = %self.relays.current(), rank = self.relays.rank(), "relay unreachable; trying the next one");
            }
        }
        back_off
    }

    /// Waits the jittered backoff (and doubles it), or less if the session changes its mind.
    async fn back_off(&mut self) -> Flow {
        let max = self.settings.reconnect_max;
        let delay = jittered(self.backoff).min(max);
        self.backoff = (self.backoff * 2).min(max);
        tokio::select! {
            () = self.stop.cancelled() => Flow::Stop,
            _ = self.want.changed() => Flow::Go,
            () = sleep(delay) => Flow::Go,
        }
    }

    /// At `stop`: says goodbye to the relay if connected.
    async fn close(mut self) {
        self.stop_failback();
        if !self.connected {
            return;
        }
        // Polite, not essential: the relay would notice the closed socket anyway.
        let _ = self.client.try_disconnect();
        let _ = timeout(DISCONNECT_GRACE, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        info!(serial = %self.serial, "disconnected from broker");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connack_says_what_to_do_for_its_code() {
        let busy = refusal_hint(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::ServiceUnavailable,
        ))
        .expect("a refusal");
        assert!(
            busy.contains("max_connections_per_identity") && busy.contains("max_clients"),
            "{busy}"
        );
        let denied = refusal_hint(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized,
        ))
        .expect("a refusal");
        assert!(denied.contains("CN"), "{denied}");
        assert_eq!(refusal_hint(&ConnectionError::NetworkTimeout), None);
    }

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d < Duration::from_secs(3),
                "{d:?}"
            );
        }
    }
}
