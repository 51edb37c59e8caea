//! A small stand-in for the relay, enough to exercise one agent's session from the outside: mTLS
//! with the project's PKI, CONNECT/SUBSCRIBE/PUBLISH/PING over MQTT 3.1.1, retained job orders,
//! and the end-to-end acks of DESIGN D3 (with dedupe by message id). The test steers it: it can
//! stop acking, publish orders, drop every connection. The real broker's end-to-end tests live
//! in /tests; these pin the agent's own behaviour.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use protocol::device::{Ack, AckBatch, AckOutcome, JobUpdate};
use protocol::job::{JobOrder, JobSpec};
use protocol::topic::{self, Topic};
use protocol::{Envelope, JobId, MsgId, Serial, Timestamp};
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const MAX: usize = 1 << 20;

#[derive(Debug, Clone)]
pub enum RelayEvent {
    Connected(String),
    Subscribed(String, Vec<String>),
    Published {
        client: String,
        topic: String,
        payload: Vec<u8>,
    },
}

enum Cmd {
    Send(Publish),
    Kill,
}

#[derive(Default)]
struct State {
    auto_ack: bool,
    retained: BTreeMap<String, Vec<u8>>,
    seen: HashSet<(String, MsgId)>,
    conns: Vec<(String, mpsc::UnboundedSender<Cmd>)>,
}

pub struct FakeRelay {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: mpsc::UnboundedReceiver<RelayEvent>,
}

impl FakeRelay {
    /// Listens on 127.0.0.1:0 with the server certificate in `pki_dir`; acks what it stores.
    pub async fn start(pki_dir: &Path) -> FakeRelay {
        let tls = tokio_rustls::TlsAcceptor::from(pki::server_config(pki_dir).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            auto_ack: true,
            ..State::default()
        }));
        let (events_tx, events) = mpsc::unbounded_channel();
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tls, st, ev) = (tls.clone(), st.clone(), events_tx.clone());
                tokio::spawn(async move {
                    if let Ok(stream) = tls.accept(tcp).await {
                        serve(stream, st, ev).await;
                    }
                });
            }
        });
        FakeRelay {
            addr,
            state,
            events,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.addr.port())
    }

    pub fn set_auto_ack(&self, on: bool) {
        self.state.lock().unwrap().auto_ack = on;
    }

    /// Publishes to the connected client the topic belongs to; a retained message is also kept
    /// for the next subscriber (an empty retained payload clears it, as MQTT says).
    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        let mut st = self.state.lock().unwrap();
        if retain {
            if payload.is_empty() {
                st.retained.remove(topic);
            } else {
                st.retained.insert(topic.to_owned(), payload.clone());
            }
        }
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
        p.retain = retain;
        for (client, tx) in &st.conns {
            if topic.starts_with(&format!("dev/{client}/")) {
                let _ = tx.send(Cmd::Send(p.clone()));
            }
        }
    }

    pub fn publish_order(&self, order: &JobOrder) {
        let payload = Envelope::new(0, chrono::Utc::now(), order)
            .to_cbor()
            .unwrap();
        self.publish(&topic::dev_job(&order.serial, &order.job), payload, true);
    }

    pub fn ack(&self, serial: &Serial, ids: &[MsgId], outcome: AckOutcome) {
        let acks = ids
            .iter()
            .map(|&id| Ack {
                id,
                outcome: outcome.clone(),
            })
            .collect();
        let payload = Envelope::new(0, chrono::Utc::now(), AckBatch { acks })
            .to_cbor()
            .unwrap();
        self.publish(&topic::dev_ack(serial), payload, false);
    }

    /// Drops every connection, as a crashing relay would.
    pub fn kill_connections(&self) {
        let mut st = self.state.lock().unwrap();
        for (_, tx) in st.conns.drain(..) {
            let _ = tx.send(Cmd::Kill);
        }
    }

    /// The next event that `pick` accepts, within `within`; others are skipped.
    pub async fn expect<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut pick: impl FnMut(&RelayEvent) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => {
                    if let Some(t) = pick(&ev) {
                        return t;
                    }
                }
                Ok(None) => panic!("relay stopped while waiting for {what}"),
                Err(_) => panic!("never saw {what} within {within:?}"),
            }
        }
    }

    /// Nothing `pick` accepts happens within `within`.
    pub async fn expect_none(
        &mut self,
        what: &str,
        within: Duration,
        mut pick: impl FnMut(&RelayEvent) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            assert!(!pick(&ev), "saw {what}: {ev:?}");
        }
    }

    /// The next job update, as (msg id, update).
    pub async fn expect_job_update(&mut self, within: Duration) -> (MsgId, JobUpdate) {
        self.expect("a job update", within, |ev| match ev {
            RelayEvent::Published { topic, payload, .. } if topic.ends_with("/up/job") => {
                let env: Envelope<JobUpdate> = Envelope::from_cbor(payload, MAX).unwrap();
                Some((env.id, env.body))
            }
            _ => None,
        })
        .await
    }
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: S,
    state: Arc<Mutex<State>>,
    events: mpsc::UnboundedSender<RelayEvent>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
    let mut buf = BytesMut::with_capacity(4096);
    let mut client = String::new();
    let mut pkid: u16 = 0;
    let mut next_pkid = move || {
        pkid = pkid.wrapping_add(1).max(1);
        pkid
    };
    loop {
        let mut out = Vec::new();
        tokio::select! {
            n = rd.read_buf(&mut buf) => {
                if !matches!(n, Ok(n) if n > 0) {
                    return;
                }
                loop {
                    let packet = match Packet::read(&mut buf, MAX) {
                        Ok(p) => p,
                        Err(rumqttc::Error::InsufficientBytes(_)) => break,
                        Err(_) => return,
                    };
                    match packet {
                        Packet::Connect(c) => {
                            client = c.client_id.clone();
                            state.lock().unwrap().conns.push((client.clone(), cmd_tx.clone()));
                            out.push(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)));
                            let _ = events.send(RelayEvent::Connected(client.clone()));
                        }
                        Packet::Subscribe(s) => {
                            let codes = s.filters.iter().map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce)).collect();
                            out.push(Packet::SubAck(SubAck::new(s.pkid, codes)));
                            let prefix = format!("dev/{client}/jobs/");
                            let st = state.lock().unwrap();
                            for (topic, payload) in st.retained.range(prefix.clone()..) {
                                if !topic.starts_with(&prefix) {
                                    break;
                                }
                                let mut p = Publish::new(topic.clone(), QoS::AtLeastOnce, payload.clone());
                                p.retain = true;
                                p.pkid = next_pkid();
                                out.push(Packet::Publish(p));
                            }
                            let filters = s.filters.iter().map(|f| f.path.clone()).collect();
                            let _ = events.send(RelayEvent::Subscribed(client.clone(), filters));
                        }
                        Packet::Publish(p) => {
                            if p.qos == QoS::AtLeastOnce {
                                out.push(Packet::PubAck(PubAck::new(p.pkid)));
                            }
                            let payload = p.payload.to_vec();
                            let mut st = state.lock().unwrap();
                            if st.auto_ack
                                && let Some(id) = Envelope::peek_id(&payload)
                            {
                                let outcome = if st.seen.insert((client.clone(), id)) {
                                    AckOutcome::Stored
                                } else {
                                    AckOutcome::Duplicate
                                };
                                let batch = AckBatch { acks: vec![Ack { id, outcome }] };
                                let body = Envelope::new(0, chrono::Utc::now(), batch).to_cbor().unwrap();
                                let serial = Serial::parse(&client).unwrap();
                                let mut ack = Publish::new(topic::dev_ack(&serial), QoS::AtLeastOnce, body);
                                ack.pkid = next_pkid();
                                out.push(Packet::Publish(ack));
                            }
                            drop(st);
                            let _ = events.send(RelayEvent::Published { client: client.clone(), topic: p.topic.clone(), payload });
                        }
                        Packet::PingReq => out.push(Packet::PingResp),
                        Packet::Disconnect => return,
                        _ => {}
                    }
                }
            }
            cmd = cmd_rx.recv() => match cmd {
                Some(Cmd::Send(mut p)) => {
                    p.pkid = next_pkid();
                    out.push(Packet::Publish(p));
                }
                Some(Cmd::Kill) | None => return,
            },
        }
        let mut bytes = BytesMut::new();
        for p in out {
            p.write(&mut bytes, MAX).unwrap();
        }
        if !bytes.is_empty() && wr.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

/// A temp dir with a CA (SANs localhost and 127.0.0.1) and certificates.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        pki::init(&dir.path().join("pki"), &[]).unwrap();
        Env { dir }
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    pub fn ca(&self) -> PathBuf {
        self.pki_dir().join("ca.pem")
    }

    /// (cert, key) for a device.
    pub fn device_cert(&self, serial: &str) -> (PathBuf, PathBuf) {
        pki::issue_to_dir(&self.pki_dir(), protocol::Role::Device, serial).unwrap()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

pub fn get_data_order(serial: &str, job: &str, at: Timestamp) -> JobOrder {
    JobOrder {
        job: JobId::parse(job).unwrap(),
        serial: Serial::parse(serial).unwrap(),
        spec: JobSpec::GetData {
            sections: vec![protocol::data::Section::Counters],
        },
        instruction_time: at,
        execution_time: None,
        deadline: None,
    }
}

pub fn is_topic(ev: &RelayEvent, want: &str) -> bool {
    matches!(ev, RelayEvent::Published { topic, .. } if topic == want)
}

pub fn parsed(topic: &str) -> Topic {
    Topic::parse(topic).unwrap()
}
