//! An in-process MQTT client over mutual TLS, built from the PEM files `broker pki issue` wrote.
//!
//! The real agents are what scenarios use to do things right; this client is how a scenario does
//! things wrong on purpose (another device's topics, garbage payloads, oversized packets, a client
//! id that is not the certificate's) and how it reads topics directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, Publish, QoS, TlsConfiguration, Transport,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use protocol::Envelope;

use crate::{Broker, CertPaths, deadline};

/// Big enough for any message chukei sends, and for the oversized packets tests send on purpose:
/// rumqttc's default (10 KiB) would refuse those on our side before the broker ever saw them.
const MAX_PACKET: usize = 4 << 20;

/// How to connect: whose certificate, which CA to trust, which client id.
pub struct MqttBuilder {
    certs: CertPaths,
    trust: PathBuf,
    client_id: String,
}

impl MqttBuilder {
    pub(crate) fn new(certs: CertPaths, client_id: &str) -> Self {
        MqttBuilder {
            trust: certs.ca.clone(),
            certs,
            client_id: client_id.to_owned(),
        }
    }

    /// A client id other than the certificate's CN.
    pub fn client_id(mut self, id: &str) -> Self {
        self.client_id = id.to_owned();
        self
    }

    /// Present this certificate instead (e.g. one from a foreign CA), still trusting the
    /// broker's CA so that only the client side of the handshake is wrong.
    pub fn with_cert(mut self, certs: &CertPaths) -> Self {
        self.certs.cert = certs.cert.clone();
        self.certs.key = certs.key.clone();
        self
    }

    /// Connects and waits for the CONNACK under the default deadline. `Err` says why the broker
    /// would not have us (a refused CONNACK, a TLS alert, a closed connection).
    pub async fn connect(self, broker: &Broker) -> Result<MqttClient, String> {
        self.connect_to(broker.addr(), deadline()).await
    }

    /// Connects to `addr`, waiting at most `within` for the CONNACK.
    pub async fn connect_to(
        self,
        addr: SocketAddr,
        within: Duration,
    ) -> Result<MqttClient, String> {
        let read = |p: &PathBuf| {
            pki::read_pem_file(p).unwrap_or_else(|e| panic!("reading test certificate: {e}"))
        };
        let config = pki::client_config(
            &read(&self.trust),
            &read(&self.certs.cert),
            &read(&self.certs.key),
        )
        .unwrap_or_else(|e| panic!("building a TLS client config from {:?}: {e}", self.certs));
        let mut opts = MqttOptions::new(self.client_id.clone(), addr.ip().to_string(), addr.port());
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)))
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_keep_alive(Duration::from_secs(60))
            .set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        // rumqttc's own connect timeout (5 s) would end a slow connect before our deadline does.
        eventloop
            .network_options
            .set_connection_timeout(within.as_secs().max(1));
        let name = format!("mqtt client {:?}", self.client_id);
        let start = Instant::now();
        let connack = tokio::time::timeout(within, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) => return Ok(ack),
                    Ok(_) => {}
                    Err(e) => return Err(format!("{e}")),
                }
            }
        })
        .await;
        match connack {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("{name}: connection failed: {e}")),
            Err(_) => return Err(format!("{name}: no CONNACK within {within:?}")),
        }
        let connect_time = start.elapsed();
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(eventloop, tx));
        Ok(MqttClient {
            name,
            client,
            events,
            task,
            connect_time,
        })
    }
}

/// Polls the event loop and forwards what arrives, until the first error. It does not poll again
/// after an error: rumqttc would reconnect, and a closed connection is what the tests look for.
async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Result<Incoming, String>>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(incoming)) => {
                if tx.send(Ok(incoming)).is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(_)) => {}
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        }
    }
}

/// A connected client. Dropping it drops the connection.
pub struct MqttClient {
    name: String,
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Incoming, String>>,
    task: JoinHandle<()>,
    connect_time: Duration,
}

impl MqttClient {
    /// From the start of the TCP connect to the CONNACK.
    pub fn connect_time(&self) -> Duration {
        self.connect_time
    }

    /// Sends a SUBSCRIBE (QoS 1); does not wait for the SUBACK.
    pub async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap_or_else(|e| panic!("{}: could not queue SUBSCRIBE {filter}: {e}", self.name));
    }

    /// Sends a SUBSCRIBE and waits for its SUBACK, so that what is published afterwards is seen.
    pub async fn subscribe_and_wait(&mut self, filter: &str) {
        self.subscribe(filter).await;
        let what = format!("a SUBACK for {filter}");
        self.wait_for(&what, deadline(), |i| matches!(i, Incoming::SubAck(_)))
            .await;
    }

    /// Sends a PUBLISH (QoS 1, not retained); does not wait for the PUBACK.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap_or_else(|e| panic!("{}: could not queue PUBLISH {topic}: {e}", self.name));
    }

    /// Waits for the next PUBLISH from the broker; panics if the connection closes first.
    pub async fn next_publish(&mut self, within: Duration) -> Publish {
        let incoming = self
            .wait_for("a PUBLISH", within, |i| matches!(i, Incoming::Publish(_)))
            .await;
        match incoming {
            Incoming::Publish(p) => p,
            _ => unreachable!("wait_for returned what the predicate accepted"),
        }
    }

    /// Waits for the next PUBLISH whose topic is `topic`, skipping others.
    pub async fn next_publish_on(&mut self, topic: &str, within: Duration) -> Publish {
        let what = format!("a PUBLISH on {topic}");
        match self
            .wait_for(
                &what,
                within,
                |i| matches!(i, Incoming::Publish(p) if p.topic == topic),
            )
            .await
        {
            Incoming::Publish(p) => p,
            _ => unreachable!("wait_for returned what the predicate accepted"),
        }
    }

    /// Waits for a PUBLISH on `topic`; returns every PUBLISH received until then, that one
    /// last. A broker delivers the retained messages of one subscription before those of a
    /// later one, so subscribing to `A` and then to a topic known to hold a retained message
    /// shows whether `A` holds any: how a test proves a retained message was cleared.
    pub async fn publishes_until(&mut self, topic: &str, within: Duration) -> Vec<Publish> {
        let mut seen = Vec::new();
        let what = format!("a PUBLISH on {topic}");
        loop {
            let incoming = self
                .wait_for(&what, within, |i| matches!(i, Incoming::Publish(_)))
                .await;
            if let Incoming::Publish(p) = incoming {
                let last = p.topic == topic;
                seen.push(p);
                if last {
                    return seen;
                }
            }
        }
    }

    /// Waits for a packet satisfying `pred`, skipping the rest.
    async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Incoming) -> bool,
    ) -> Incoming {
        let name = &self.name;
        let found = tokio::time::timeout(within, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(incoming)) if pred(&incoming) => return Ok(incoming),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("the connection closed: {e}")),
                    None => return Err("the connection is gone".to_owned()),
                }
            }
        })
        .await;
        match found {
            Ok(Ok(incoming)) => incoming,
            Ok(Err(why)) => panic!("{name}: waiting for {what}, {why}"),
            Err(_) => panic!("{name}: no {what} within {within:?}"),
        }
    }

    /// Waits for the broker to close the connection; returns rumqttc's error. Panics if a PUBLISH
    /// arrives first (the broker delivered something it should have refused), or if the
    /// connection is still open at the deadline.
    pub async fn expect_closed(&mut self, within: Duration) -> String {
        let name = &self.name;
        let closed = tokio::time::timeout(within, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(Incoming::Publish(p))) => {
                        return Err(format!(
                            "received a PUBLISH on {} ({} bytes) before the connection closed",
                            p.topic,
                            p.payload.len()
                        ));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ok(e),
                    None => return Ok("event loop gone".to_owned()),
                }
            }
        })
        .await;
        match closed {
            Ok(Ok(e)) => e,
            Ok(Err(why)) => panic!("{name}: {why}"),
            Err(_) => panic!("{name}: the broker did not close the connection within {within:?}"),
        }
    }

    /// Sends DISCONNECT and waits (briefly) for the event loop to end.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for MqttClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Encodes `body` in a CBOR envelope with message id `id`, stamped now.
pub fn envelope<T: Serialize>(id: protocol::MsgId, body: T) -> Vec<u8> {
    Envelope::new(id, chrono::Utc::now(), body)
        .to_cbor()
        .unwrap_or_else(|e| panic!("encoding a test message: {e}"))
}

/// Decodes an envelope the broker sent; panics with the payload's size if it is not one.
pub fn open<T: DeserializeOwned>(publish: &Publish) -> Envelope<T> {
    Envelope::from_cbor(&publish.payload, MAX_PACKET).unwrap_or_else(|e| {
        panic!(
            "the {}-byte payload on {} is not a valid {}: {e}",
            publish.payload.len(),
            publish.topic,
            std::any::type_name::<Envelope<T>>()
        )
    })
}
