//! A small stand-in for the relay, enough to exercise one agent's session from the outside: mTLS
//! with the project's PKI, CONNECT/SUBSCRIBE/PUBLISH/PING over MQTT 3.1.1, retained job orders, and
//! the end-to-end acks of docs/decisions.md, D3 (with dedupe by message id). The test steers it: it
//! can stop acking, publish orders, drop every connection. The real broker's end-to-end tests live
//! in /tests; these pin the agent's own behaviour.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use device_agent::agent::{DeviceAgent, run_device};
use device_agent::config::SessionSettings;
use device_agent::device::{self, SharedDevice};
use device_agent::jobs::PublisherKey;
use device_agent::outbox::Outbox;
use device_agent::sim::{SimCopier, SimSettings};
use protocol::artifact::{ArtifactId, Chunk, FetchRequest};
use protocol::data::DeviceData;
use protocol::device::{Ack, AckBatch, AckOutcome, JobUpdate, MergeRequest, Merged};
use protocol::job::{JobOrder, JobSpec};
use protocol::schedule::Schedule;
use protocol::topic::{self, Topic};
use protocol::{Envelope, JobId, MsgId, Serial, Timestamp};
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const MAX: usize = 1 << 20;

#[derive(Debug, Clone)]
pub enum RelayEvent {
    Connected(String),
    /// The client's connection ended (a DISCONNECT or a closed socket).
    Closed(String),
    Subscribed(String, Vec<String>),
    Published {
        client: String,
        topic: String,
        payload: Vec<u8>,
    },
    /// Chunks of an artifact sent to a client, in answer to a fetch.
    Served(String, Vec<u32>),
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
    /// Artifacts served on fetch: id → (bytes, chunk size).
    artifacts: BTreeMap<String, (Vec<u8>, u32)>,
    /// Serve this many more chunks, then drop every connection (a cut link); `None`: no limit.
    serve_budget: Option<usize>,
    /// Host values to merge into a device's current values, by job (S213).
    merges: BTreeMap<String, DeviceData>,
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

    /// Serves fetches for this artifact from now on.
    pub fn serve_artifact(&self, id: &ArtifactId, bytes: Vec<u8>, chunk_size: u32) {
        self.state
            .lock()
            .unwrap()
            .artifacts
            .insert(id.to_string(), (bytes, chunk_size));
    }

    /// Serves `n` more chunks, then stops answering and cuts the connection shortly after.
    pub fn cut_after_chunks(&self, n: usize) {
        self.state.lock().unwrap().serve_budget = Some(n);
    }

    /// Answers the merge request of `job` with `values` merged over the device's current ones.
    pub fn merge_for(&self, job: &str, values: DeviceData) {
        self.state
            .lock()
            .unwrap()
            .merges
            .insert(job.to_owned(), values);
    }

    /// Empties a retained order, as the relay does when a job is canceled or ends.
    pub fn withdraw(&self, serial: &str, job: &str) {
        let topic = topic::dev_job(&Serial::parse(serial).unwrap(), &JobId::parse(job).unwrap());
        self.publish(&topic, Vec::new(), true);
    }

    pub fn publish_order(&self, order: &JobOrder) {
        let payload = Envelope::new(0, chrono::Utc::now(), order)
            .to_cbor()
            .unwrap();
        self.publish(&topic::dev_job(&order.serial, &order.job), payload, true);
    }

    /// Acks message `id` as meant for the outbox of incarnation `inc`.
    pub fn ack_for_outbox(&self, serial: &Serial, inc: u64, id: MsgId, outcome: AckOutcome) {
        let acks = vec![Ack {
            id,
            outcome,
            inc: Some(inc),
        }];
        let payload = Envelope::new(0, chrono::Utc::now(), AckBatch { acks })
            .to_cbor()
            .unwrap();
        self.publish(&topic::dev_ack(serial), payload, false);
    }

    pub fn ack(&self, serial: &Serial, ids: &[MsgId], outcome: AckOutcome) {
        let acks = ids
            .iter()
            .map(|&id| Ack {
                id,
                outcome: outcome.clone(),
                inc: None,
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
                    let _ = events.send(RelayEvent::Closed(client.clone()));
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
                            let prefix = format!("dev/{client}/");
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
                            let cut = {
                            let mut st = state.lock().unwrap();
                            if st.auto_ack
                                && let Some(id) = Envelope::peek_id(&payload)
                            {
                                let outcome = if st.seen.insert((client.clone(), id)) {
                                    AckOutcome::Stored
                                } else {
                                    AckOutcome::Duplicate
                                };
                                let batch = AckBatch { acks: vec![Ack { id, outcome, inc: None }] };
                                let body = Envelope::new(0, chrono::Utc::now(), batch).to_cbor().unwrap();
                                let serial = Serial::parse(&client).unwrap();
                                let mut ack = Publish::new(topic::dev_ack(&serial), QoS::AtLeastOnce, body);
                                ack.pkid = next_pkid();
                                out.push(Packet::Publish(ack));
                            }
                            let mut cut = false;
                            if p.topic.ends_with("/up/fetch")
                                && let Ok(env) = Envelope::<FetchRequest>::from_cbor(&payload, MAX)
                                && let Some((bytes, size)) = st.artifacts.get(env.body.artifact.as_str()).cloned()
                            {
                                let mut served = Vec::new();
                                for i in env.body.chunks {
                                    if let Some(budget) = st.serve_budget.as_mut() {
                                        if *budget == 0 {
                                            st.serve_budget = None;
                                            cut = true;
                                            break;
                                        }
                                        *budget -= 1;
                                    }
                                    let start = i as usize * size as usize;
                                    let end = (start + size as usize).min(bytes.len());
                                    let chunk = Chunk { artifact: env.body.artifact.clone(), index: i, data: bytes[start..end].to_vec() };
                                    let body = Envelope::new(0, chrono::Utc::now(), chunk).to_cbor().unwrap();
                                    let serial = Serial::parse(&client).unwrap();
                                    let mut c = Publish::new(topic::dev_blob(&serial, &env.body.artifact), QoS::AtLeastOnce, body);
                                    c.pkid = next_pkid();
                                    out.push(Packet::Publish(c));
                                    served.push(i);
                                }
                                let _ = events.send(RelayEvent::Served(client.clone(), served));
                            }
                            if p.topic.ends_with("/up/merge")
                                && let Ok(env) = Envelope::<MergeRequest>::from_cbor(&payload, MAX)
                                && let Some(values) = st.merges.get(env.body.job.as_str()).cloned()
                            {
                                let mut data = env.body.current.clone();
                                for (section, kv) in values {
                                    data.entry(section).or_default().extend(kv);
                                }
                                let merged = Merged { job: env.body.job.clone(), data };
                                let body = Envelope::new(0, chrono::Utc::now(), merged).to_cbor().unwrap();
                                let serial = Serial::parse(&client).unwrap();
                                let t = topic::dev_merged(&serial, &env.body.job);
                                st.retained.insert(t.clone(), body.clone());
                                let mut m = Publish::new(t, QoS::AtLeastOnce, body);
                                m.retain = true;
                                m.pkid = next_pkid();
                                out.push(Packet::Publish(m));
                            }
                            cut
                            };
                            let _ = events.send(RelayEvent::Published { client: client.clone(), topic: p.topic.clone(), payload });
                            if cut {
                                // The link dies a moment after the last chunk it carried.
                                let tx = cmd_tx.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(Duration::from_millis(300)).await;
                                    let _ = tx.send(Cmd::Kill);
                                });
                            }
                        }
                        Packet::PingReq => out.push(Packet::PingResp),
                        Packet::Disconnect => {
                            let _ = events.send(RelayEvent::Closed(client.clone()));
                            return;
                        }
                        _ => {}
                    }
                }
            }
            cmd = cmd_rx.recv() => match cmd {
                Some(Cmd::Send(mut p)) => {
                    p.pkid = next_pkid();
                    out.push(Packet::Publish(p));
                }
                Some(Cmd::Kill) | None => {
                    let _ = events.send(RelayEvent::Closed(client.clone()));
                    return;
                }
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
        max_attempts: 1,
    }
}

/// An order for `spec`, due now.
pub fn order(serial: &str, job: &str, spec: JobSpec) -> JobOrder {
    JobOrder {
        job: JobId::parse(job).unwrap(),
        serial: Serial::parse(serial).unwrap(),
        spec,
        instruction_time: chrono::Utc::now(),
        execution_time: None,
        deadline: None,
        max_attempts: 1,
    }
}

pub fn is_topic(ev: &RelayEvent, want: &str) -> bool {
    matches!(ev, RelayEvent::Published { topic, .. } if topic == want)
}

pub fn parsed(topic: &str) -> Topic {
    Topic::parse(topic).unwrap()
}

pub const PATIENCE: Duration = Duration::from_secs(10);

/// Fast timings so reconnects and resends happen within a test's patience.
pub fn fast() -> SessionSettings {
    SessionSettings {
        reconnect_min: Duration::from_millis(200),
        reconnect_max: Duration::from_millis(800),
        resend_min: Duration::from_millis(300),
        resend_max: Duration::from_secs(1),
        fetch_timeout: Duration::from_secs(1),
        drain_quiet: Duration::from_millis(300),
        ..SessionSettings::default()
    }
}

/// An agent running in this process.
pub struct Running {
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
    pub ready: mpsc::UnboundedReceiver<Serial>,
}

impl Running {
    pub async fn ready(&mut self) {
        tokio::time::timeout(PATIENCE, self.ready.recv())
            .await
            .expect("agent never became ready");
    }

    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("agent did not stop")
            .unwrap();
    }
}

/// How to run an agent; the default is a persistent simulated copier without a publisher key.
pub struct AgentOpts {
    pub schedule: Schedule,
    pub publisher: Option<PublisherKey>,
    pub sim: SimSettings,
    /// Instead of a simulated copier.
    pub device: Option<SharedDevice>,
    pub settings: SessionSettings,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            schedule: Schedule::default(),
            publisher: None,
            sim: SimSettings::default(),
            device: None,
            settings: fast(),
        }
    }
}

/// Starts an agent for `serial` whose home is the env's data dir.
pub fn start_with(
    env: &Env,
    relay: &FakeRelay,
    serial: &str,
    outbox: &Outbox,
    opts: AgentOpts,
) -> Running {
    let (cert, key) = (
        env.pki_dir().join(format!("device/{serial}.pem")),
        env.pki_dir().join(format!("device/{serial}.key")),
    );
    if !cert.exists() {
        env.device_cert(serial);
    }
    let serial = Serial::parse(serial).unwrap();
    let tls = device_agent::tls::device_tls(&env.ca(), &cert, &key, &serial).unwrap();
    let home = env.data_dir();
    let device = opts
        .device
        .unwrap_or_else(|| device::shared(SimCopier::with_home(&serial, &opts.sim, &home)));
    let agent = DeviceAgent {
        serial: serial.clone(),
        site: "Osaka HQ".into(),
        relays: vec![device_agent::transport::Endpoint::direct(
            relay.url().parse().unwrap(),
        )],
        tls,
        device,
        outbox: outbox.clone(),
        settings: opts.settings,
        home,
        schedule: opts.schedule,
        publisher: opts.publisher,
        operator: None,
        monitor: Default::default(),
    };
    let stop = CancellationToken::new();
    let (ready_tx, ready) = mpsc::unbounded_channel();
    let s = stop.clone();
    let task = tokio::spawn(async move { run_device(agent, s, Some(ready_tx)).await.unwrap() });
    Running { stop, task, ready }
}

pub fn open_outbox(env: &Env) -> Outbox {
    std::fs::create_dir_all(env.data_dir()).unwrap();
    Outbox::open(&env.data_dir().join("agent.redb")).unwrap()
}
