//! A load process (`bench load`): many devices in one process, driven by the orchestrator.
//!
//! The orchestrator starts several of these (each process may hold at most 20,000 open files)
//! and steers them with one word per line on stdin: `connect`, `run`, `finish`, `verify`, `exit`.
//! Each prints a [`Status`] line every 200 ms on stdout and, after `exit`, one [`Final`] line.
//!
//! Devices are futures, not tasks: each of a few tasks drives a group of them through a
//! `FuturesUnordered`, so a process of thousands of connections has a handful of tasks.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use protocol::data::{SectionData, Value};
use protocol::device::{AckBatch, AckOutcome, DeviceState, JobUpdate};
use protocol::job::JobStatus;
use protocol::meter::CounterReport;
use protocol::topic::{self, Topic, UpKind};
use protocol::{Envelope, JobId, MsgId, Role, Serial};
use rand::Rng;
use rustls::ClientConfig;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Semaphore, watch};
use tokio::time::{MissedTickBehavior, sleep, timeout};

use crate::client::{Conn, Endpoint};
use crate::hist::Histogram;
use crate::mqtt::{self, Incoming, Publish};

/// Everything a load process needs, passed as one JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub index: usize,
    pub endpoint: Endpoint,
    pub pki_dir: PathBuf,
    /// Serials are `{prefix}{i:06}`.
    pub prefix: String,
    pub first: u32,
    pub count: u32,
    /// Loopback source addresses, used in turn: one address has only ~28,000 ephemeral ports.
    pub sources: Vec<Ipv4Addr>,
    /// Connection attempts in flight at once in this process.
    pub concurrency: usize,
    /// Tasks; each drives `count / groups` devices.
    pub groups: usize,
    pub work: Work,
}

/// What each device does once connected.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Work {
    /// Subscribe to its job and ack topics and stay silent; with `announce`, first publish the
    /// device's state once per session, as the real agent does (`up/state`, acked by chukei).
    /// With `persistent`, connect as the agent does (`clean_session` 0) and subscribe only when
    /// the broker did not resume the session.
    Idle {
        announce: bool,
        #[serde(default)]
        persistent: bool,
    },
    /// Send reports (`up/state` or `up/counters` envelopes) through the outbox/ack path: each message keeps its id
    /// until the relay acks it and is resent (same id) after `resend_after_ms` or a reconnect.
    /// `rate_per_device` 0 means closed loop: keep `window` unacked at all times.
    Reports {
        window: usize,
        rate_per_device: f64,
        resend_after_ms: u64,
        /// What each report is; a state announcement unless asked otherwise.
        #[serde(default)]
        report: ReportKind,
    },
    /// Take job orders: on each new order, report `delivered` through the outbox/ack path; with
    /// `finish`, report it `succeeded` with a counters section instead (a GET DATA answered).
    Jobs {
        resend_after_ms: u64,
        #[serde(default)]
        finish: bool,
    },
    /// Publish QoS 1 to its own topic and receive it back (subscribed to it), with `window`
    /// messages in flight end to end: a new one goes out when one comes back, so the rate is what
    /// the relay delivers, not what it buffers.
    PubSub { window: usize, payload_bytes: usize },
}

/// The message a durable report is: both go through the device's outbox and the relay's dedupe
/// and ack, but they are stored differently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ReportKind {
    /// `up/state`, a new firmware string each time: the device record is rewritten and its
    /// state view published (what the real agent sends when its state changes).
    #[default]
    State,
    /// `up/counters`, a meter reading: a row appended to the readings table (what a real fleet
    /// sends most, on each device's schedule).
    Counters,
}

impl ReportKind {
    fn up_kind(self) -> UpKind {
        match self {
            ReportKind::State => UpKind::State,
            ReportKind::Counters => UpKind::Counters,
        }
    }
}

pub fn serial_of(prefix: &str, i: u32) -> String {
    format!("{prefix}{i:06}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Wait,
    Connect,
    Run,
    Finish,
    Verify,
    Exit,
}

impl Phase {
    fn parse(word: &str) -> Option<Phase> {
        Some(match word {
            "connect" => Phase::Connect,
            "run" => Phase::Run,
            "finish" => Phase::Finish,
            "verify" => Phase::Verify,
            "exit" => Phase::Exit,
            _ => return None,
        })
    }
}

/// Counters every device adds to; snapshotted into [`Status`].
#[derive(Default)]
struct Stats {
    subscribed: AtomicU64,
    connects: AtomicU64,
    resumed: AtomicU64,
    session_present: AtomicU64,
    connect_failures: AtomicU64,
    disconnects: AtomicU64,
    last_subscribed_us: AtomicU64,
    sent: AtomicU64,
    resent: AtomicU64,
    stored: AtomicU64,
    duplicate: AtomicU64,
    rejected: AtomicU64,
    unknown_acks: AtomicU64,
    outstanding: AtomicU64,
    verify_sent: AtomicU64,
    verify_stored: AtomicU64,
    verify_duplicate: AtomicU64,
    verify_outstanding: AtomicU64,
    received: AtomicU64,
    jobs_received: AtomicU64,
    jobs_acked: AtomicU64,
    last_job_received_us: AtomicU64,
    last_job_acked_us: AtomicU64,
    last_acked_us: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// What a load process reports every 200 ms.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub index: usize,
    pub ready: bool,
    pub subscribed: u64,
    pub connects: u64,
    /// Connections whose TLS handshake resumed a session (a ticket from an earlier one).
    #[serde(default)]
    pub resumed: u64,
    /// Connections whose CONNACK said the broker resumed the MQTT session (no SUBSCRIBE sent).
    #[serde(default)]
    pub session_present: u64,
    pub connect_failures: u64,
    pub disconnects: u64,
    pub last_subscribed_us: u64,
    pub sent: u64,
    pub resent: u64,
    pub stored: u64,
    pub duplicate: u64,
    pub rejected: u64,
    pub unknown_acks: u64,
    pub outstanding: u64,
    pub verify_sent: u64,
    pub verify_stored: u64,
    pub verify_duplicate: u64,
    pub verify_outstanding: u64,
    pub received: u64,
    pub jobs_received: u64,
    pub jobs_acked: u64,
    pub last_job_received_us: u64,
    pub last_job_acked_us: u64,
    /// When the latest ack (stored or duplicate) arrived.
    pub last_acked_us: u64,
    pub errors: Vec<String>,
}

/// The last line a load process prints: its counters and latency histograms.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Final {
    pub status: Status,
    /// TCP connect to SUBACK, per successful connection.
    pub connect: Histogram,
    /// Reports: first send to the relay's ack. Pub/sub: publish to receipt.
    pub latency: Histogram,
    /// Jobs: the order's time (the relay made it when the host's submission committed) to its
    /// arrival at the device.
    #[serde(default)]
    pub order: Histogram,
}

/// A line on a load process's stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Line {
    Status(Box<Status>),
    Final(Box<Final>),
}

impl Stats {
    fn snapshot(&self, index: usize, ready: bool) -> Status {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Status {
            index,
            ready,
            subscribed: g(&self.subscribed),
            connects: g(&self.connects),
            resumed: g(&self.resumed),
            session_present: g(&self.session_present),
            connect_failures: g(&self.connect_failures),
            disconnects: g(&self.disconnects),
            last_subscribed_us: g(&self.last_subscribed_us),
            sent: g(&self.sent),
            resent: g(&self.resent),
            stored: g(&self.stored),
            duplicate: g(&self.duplicate),
            rejected: g(&self.rejected),
            unknown_acks: g(&self.unknown_acks),
            outstanding: g(&self.outstanding),
            verify_sent: g(&self.verify_sent),
            verify_stored: g(&self.verify_stored),
            verify_duplicate: g(&self.verify_duplicate),
            verify_outstanding: g(&self.verify_outstanding),
            received: g(&self.received),
            jobs_received: g(&self.jobs_received),
            jobs_acked: g(&self.jobs_acked),
            last_job_received_us: g(&self.last_job_received_us),
            last_job_acked_us: g(&self.last_job_acked_us),
            last_acked_us: g(&self.last_acked_us),
            errors: self.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        }
    }

    fn note_error(&self, e: &anyhow::Error) {
        if let Ok(mut errors) = self.errors.lock() {
            let text = format!("{e:#}");
            if errors.len() < 5 && !errors.contains(&text) {
                errors.push(text);
            }
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

fn dec(a: &AtomicU64) {
    a.fetch_sub(1, Ordering::Relaxed);
}

/// Wall-clock microseconds: comparable across the orchestrator and every load process.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

struct Ctx {
    spec: WorkerSpec,
    stats: Stats,
    phase: watch::Receiver<Phase>,
    limit: Semaphore,
    /// Connect, latency, and (jobs) order to device.
    hists: Mutex<(Histogram, Histogram, Histogram)>,
}

/// Runs a load process until `exit` (or stdin closes).
pub async fn run(spec: WorkerSpec) -> anyhow::Result<()> {
    for i in [spec.first, spec.first + spec.count.saturating_sub(1)] {
        Serial::parse(&serial_of(&spec.prefix, i))
            .with_context(|| format!("prefix {:?} makes no valid serial", spec.prefix))?;
    }
    let (phase_tx, phase) = watch::channel(Phase::Wait);
    let ctx = Arc::new(Ctx {
        limit: Semaphore::new(spec.concurrency.max(1)),
        spec,
        stats: Stats::default(),
        phase,
        hists: Mutex::new(Default::default()),
    });

    // Certificates first: minting them is CPU the timed phases must not share.
    let configs = if ctx.spec.endpoint.tls {
        let minter = crate::tls::Minter::load(&ctx.spec.pki_dir)?;
        let mut configs = Vec::with_capacity(ctx.spec.count as usize);
        for i in 0..ctx.spec.count {
            let serial = serial_of(&ctx.spec.prefix, ctx.spec.first + i);
            configs.push(Some(minter.client(Role::Device, &serial)?));
        }
        configs
    } else {
        vec![None; ctx.spec.count as usize]
    };

    let printer = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                print_line(&Line::Status(Box::new(
                    ctx.stats.snapshot(ctx.spec.index, true),
                )));
            }
        })
    };

    // Commands from the orchestrator; end of input means exit.
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(p) = Phase::parse(line.trim()) {
                let _ = phase_tx.send(p);
                if p == Phase::Exit {
                    break;
                }
            }
        }
        let _ = phase_tx.send(Phase::Exit);
        // Keep the sender alive so receivers see Exit, not a closed channel.
        std::future::pending::<()>().await;
    });

    let groups = ctx.spec.groups.clamp(1, ctx.spec.count.max(1) as usize);
    let mut per_group: Vec<Vec<(u32, Option<Arc<ClientConfig>>)>> = vec![Vec::new(); groups];
    for (i, config) in configs.into_iter().enumerate() {
        per_group[i % groups].push((ctx.spec.first + i as u32, config));
    }
    let mut tasks = Vec::new();
    for members in per_group {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut set = FuturesUnordered::new();
            for (i, config) in members {
                set.push(device(ctx.clone(), i, config));
            }
            while set.next().await.is_some() {}
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    printer.abort();
    let (connect, latency, order) = ctx.hists.lock().map(|h| h.clone()).unwrap_or_default();
    print_line(&Line::Final(Box::new(Final {
        status: ctx.stats.snapshot(ctx.spec.index, true),
        connect,
        latency,
        order,
    })));
    Ok(())
}

fn print_line(line: &Line) {
    if let Ok(text) = serde_json::to_string(line) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

/// Waits for `d`, or returns false early if the phase becomes `Exit`.
async fn sleep_unless_exit(d: Duration, phase: &mut watch::Receiver<Phase>) -> bool {
    tokio::select! {
        () = sleep(d) => true,
        _ = phase.wait_for(|p| *p == Phase::Exit) => false,
    }
}

/// A device's messages waiting for the relay's ack: its outbox, kept in memory here so the load
/// process measures the relay, not its own disk.
#[derive(Default)]
struct Outbox {
    next_id: MsgId,
    /// id → (first sent, last sent, what it carries)
    out: BTreeMap<MsgId, (u64, u64, Pending)>,
    /// Verify phase: ids resent to prove they are held, and the next id to resend.
    vout: BTreeMap<MsgId, (u64, Pending)>,
    vnext: MsgId,
    jobs_seen: HashSet<String>,
    seq: u64,
    inflight: usize,
}

#[derive(Clone)]
enum Pending {
    Report,
    Job(JobId),
}

enum End {
    Exit,
    Lost(anyhow::Error),
}

async fn device(ctx: Arc<Ctx>, i: u32, tls: Option<Arc<ClientConfig>>) {
    let serial = match Serial::parse(&serial_of(&ctx.spec.prefix, i)) {
        Ok(s) => s,
        Err(_) => return, // checked at startup
    };
    let source = ctx.spec.sources[i as usize % ctx.spec.sources.len()];
    let filters: Vec<String> = match ctx.spec.work {
        Work::Idle { .. } | Work::Jobs { .. } => {
            vec![topic::dev_jobs_filter(&serial), topic::dev_ack(&serial)]
        }
        Work::Reports { .. } => vec![topic::dev_ack(&serial)],
        Work::PubSub { .. } => vec![topic::dev_up(&serial, UpKind::State)],
    };
    let persistent = matches!(
        ctx.spec.work,
        Work::Idle {
            persistent: true,
            ..
        }
    );
    let mut phase = ctx.phase.clone();
    if phase.wait_for(|p| *p >= Phase::Connect).await.is_err() {
        return;
    }
    let mut outbox = Outbox {
        next_id: 1,
        vnext: 1,
        ..Default::default()
    };
    let mut failures = 0u32;
    loop {
        if *phase.borrow() == Phase::Exit {
            return;
        }
        let Ok(permit) = ctx.limit.acquire().await else {
            return;
        };
        let started = Instant::now();
        let attempt = timeout(Duration::from_secs(30), async {
            let mut conn = Conn::open_session(
                ctx.spec.endpoint,
                source,
                tls.as_ref(),
                serial.as_str(),
                !persistent,
            )
            .await?;
            if !conn.session_present {
                conn.subscribe(&filters).await?;
            }
            anyhow::Ok(conn)
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("connect timed out after 30 s")));
        drop(permit);
        match attempt {
            Ok(conn) => {
                failures = 0;
                if let Ok(mut h) = ctx.hists.lock() {
                    h.0.record(started.elapsed().as_micros() as u64);
                }
                inc(&ctx.stats.connects);
                if conn.resumed {
                    inc(&ctx.stats.resumed);
                }
                if conn.session_present {
                    inc(&ctx.stats.session_present);
                }
                inc(&ctx.stats.subscribed);
                ctx.stats
                    .last_subscribed_us
                    .fetch_max(now_us(), Ordering::Relaxed);
                let end = session(&ctx, &serial, conn, &mut phase, &mut outbox).await;
                dec(&ctx.stats.subscribed);
                match end {
                    End::Exit => return,
                    End::Lost(e) => {
                        inc(&ctx.stats.disconnects);
                        ctx.stats.note_error(&e.context("session lost"));
                    }
                }
                // Like an agent: come back soon, spread out.
                let wait = Duration::from_millis(rand::thread_rng().gen_range(0..250));
                if !sleep_unless_exit(wait, &mut phase).await {
                    return;
                }
            }
            Err(e) => {
                inc(&ctx.stats.connect_failures);
                ctx.stats.note_error(&e);
                failures += 1;
                let base = 250u64 << failures.min(3);
                let wait = Duration::from_millis(base + rand::thread_rng().gen_range(0..250));
                if !sleep_unless_exit(wait, &mut phase).await {
                    return;
                }
            }
        }
    }
}

/// One connected session: runs the device's work until the phase says exit or the link is lost.
async fn session(
    ctx: &Ctx,
    serial: &Serial,
    mut conn: Conn,
    phase: &mut watch::Receiver<Phase>,
    ob: &mut Outbox,
) -> End {
    let up_topic = match ctx.spec.work {
        Work::Jobs { .. } => topic::dev_up(serial, UpKind::Job),
        Work::Reports { report, .. } => topic::dev_up(serial, report.up_kind()),
        _ => topic::dev_up(serial, UpKind::State),
    };
    let ack_topic = topic::dev_ack(serial);
    // Outbox semantics: whatever was unacked when the link dropped goes out again now.
    let resend: Vec<MsgId> = ob.out.keys().copied().collect();
    for id in resend {
        resend_one(ctx, &mut conn, &up_topic, ob, id);
    }
    let vresend: Vec<(MsgId, Pending)> = ob.vout.iter().map(|(k, v)| (*k, v.1.clone())).collect();
    for (id, p) in vresend {
        publish_envelope(ctx, &mut conn, &up_topic, id, &p);
    }
    ob.inflight = 0;
    if let Work::Idle { announce: true, .. } = ctx.spec.work
        && ob.out.is_empty()
    {
        send_new(ctx, &mut conn, &up_topic, ob, Pending::Report);
    }
    for p in conn.take_early() {
        on_publish(ctx, &mut conn, &up_topic, &ack_topic, ob, p);
    }
    let (paced, resend_after) = match ctx.spec.work {
        Work::Reports {
            rate_per_device,
            resend_after_ms,
            ..
        } => (
            (rate_per_device > 0.0).then(|| Duration::from_secs_f64(1.0 / rate_per_device)),
            Duration::from_millis(resend_after_ms),
        ),
        Work::Jobs {
            resend_after_ms, ..
        } => (None, Duration::from_millis(resend_after_ms)),
        _ => (None, Duration::from_secs(3600)),
    };
    let mut send_tick = tokio::time::interval(paced.unwrap_or(Duration::from_secs(3600)));
    send_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    spread(&mut send_tick, paced);
    // Checked only while a message is unacked: a timer per device that fired twice a second
    // whatever it had to do cost the load processes more than the reports they sent (56,700
    // devices: 113,400 wake-ups a second against 3,000 reports).
    let mut resend_tick = tokio::time::interval(resend_check(resend_after));
    resend_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut current = *phase.borrow();
    on_phase(ctx, &mut conn, &up_topic, ob, current, paced.is_some());
    loop {
        if !conn.wbuf.is_empty()
            && let Err(e) = conn.flush().await
        {
            return End::Lost(e);
        }
        tokio::select! {
            changed = phase.changed() => {
                let next = *phase.borrow_and_update();
                if changed.is_err() || next == Phase::Exit {
                    conn.close().await;
                    return End::Exit;
                }
                if next != current {
                    current = next;
                    if current == Phase::Run {
                        // The tick was not polled before Run: with `Delay` every device's next
                        // tick would fire at once now and keep that phase, one burst per period.
                        spread(&mut send_tick, paced);
                    }
                    on_phase(ctx, &mut conn, &up_topic, ob, current, paced.is_some());
                }
            }
            packet = conn.read() => {
                let packet = match packet {
                    Ok(Some(p)) => p,
                    Ok(None) => return End::Lost(anyhow::anyhow!("closed by the relay")),
                    Err(e) => return End::Lost(e),
                };
                // Handle everything already buffered before writing, so one write carries many acks.
                let mut next = Some(packet);
                while let Some(p) = next {
                    on_packet(ctx, &mut conn, &up_topic, &ack_topic, ob, p, current, paced.is_some());
                    next = match conn.buffered() {
                        Ok(n) => n,
                        Err(e) => return End::Lost(e),
                    };
                }
            }
            _ = send_tick.tick(), if paced.is_some() && current == Phase::Run => {
                if let Work::Reports { window, .. } = ctx.spec.work
                    && ob.out.len() < window
                {
                    send_new(ctx, &mut conn, &up_topic, ob, Pending::Report);
                }
            }
            _ = resend_tick.tick(), if !ob.out.is_empty() => {
                let cutoff = now_us().saturating_sub(resend_after.as_micros() as u64);
                let due: Vec<MsgId> = ob.out.iter().filter(|(_, v)| v.1 < cutoff).map(|(k, _)| *k).collect();
                for id in due {
                    resend_one(ctx, &mut conn, &up_topic, ob, id);
                }
            }
        }
    }
}

/// How often a device looks for messages due to be resent: a quarter of the resend time, so a
/// resend is at most a quarter late, and between 100 ms and 5 s.
fn resend_check(resend_after: Duration) -> Duration {
    (resend_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Spreads paced senders over the period instead of all at once: the next tick comes after a
/// random part of it.
fn spread(tick: &mut tokio::time::Interval, paced: Option<Duration>) {
    if let Some(p) = paced {
        let offset = rand::thread_rng().gen_range(0..p.as_micros().max(1) as u64);
        tick.reset_after(Duration::from_micros(offset));
    }
}

/// What a device does when the orchestrator moves to `phase`.
fn on_phase(ctx: &Ctx, conn: &mut Conn, up: &str, ob: &mut Outbox, phase: Phase, paced: bool) {
    match (&ctx.spec.work, phase) {
        (Work::Reports { window, .. }, Phase::Run) if !paced => {
            while ob.out.len() < *window {
                send_new(ctx, conn, up, ob, Pending::Report);
            }
        }
        (Work::Reports { .. }, Phase::Verify) => verify_more(ctx, conn, up, ob),
        (
            Work::PubSub {
                window,
                payload_bytes,
            },
            Phase::Run,
        ) => {
            while ob.inflight < *window {
                pubsub_send(conn, up, ob, *payload_bytes);
            }
        }
        _ => {}
    }
}

/// How many messages a device resends at once in the verify phase.
const VERIFY_WINDOW: usize = 32;

fn verify_more(ctx: &Ctx, conn: &mut Conn, up: &str, ob: &mut Outbox) {
    while ob.vout.len() < VERIFY_WINDOW && ob.vnext < ob.next_id {
        let id = ob.vnext;
        ob.vnext += 1;
        publish_envelope(ctx, conn, up, id, &Pending::Report);
        ob.vout.insert(id, (now_us(), Pending::Report));
        inc(&ctx.stats.verify_sent);
        inc(&ctx.stats.verify_outstanding);
    }
}

fn send_new(ctx: &Ctx, conn: &mut Conn, up: &str, ob: &mut Outbox, p: Pending) {
    let id = ob.next_id;
    ob.next_id += 1;
    publish_envelope(ctx, conn, up, id, &p);
    let now = now_us();
    ob.out.insert(id, (now, now, p));
    inc(&ctx.stats.sent);
    inc(&ctx.stats.outstanding);
}

fn resend_one(ctx: &Ctx, conn: &mut Conn, up: &str, ob: &mut Outbox, id: MsgId) {
    if let Some(entry) = ob.out.get_mut(&id) {
        entry.1 = now_us();
        let p = entry.2.clone();
        publish_envelope(ctx, conn, up, id, &p);
        inc(&ctx.stats.resent);
    }
}

/// The same bytes for the same id every time (but the send time), like the agent's outbox.
fn publish_envelope(ctx: &Ctx, conn: &mut Conn, up: &str, id: MsgId, p: &Pending) {
    let now = chrono::Utc::now();
    let report = match ctx.spec.work {
        Work::Reports { report, .. } => report,
        _ => ReportKind::State,
    };
    let payload = match p {
        Pending::Report if report == ReportKind::Counters => {
            Envelope::new(id, now, counter_report(id, now)).to_cbor()
        }
        Pending::Report => Envelope::new(
            id,
            now,
            DeviceState {
                site: "bench".into(),
                model: "bench-report".into(),
                firmware: format!("r{id}"),
            },
        )
        .to_cbor(),
        Pending::Job(job) => {
            let finish = matches!(ctx.spec.work, Work::Jobs { finish: true, .. });
            let (status, data) = if finish {
                let counters = protocol::data::SectionData::from([(
                    "total".to_owned(),
                    protocol::data::Value::Int(i64::try_from(id).unwrap_or(i64::MAX)),
                )]);
                (
                    JobStatus::Succeeded,
                    Some(protocol::data::DeviceData::from([(
                        protocol::data::Section::Counters,
                        counters,
                    )])),
                )
            } else {
                (JobStatus::Delivered, None)
            };
            Envelope::new(
                id,
                now,
                JobUpdate {
                    job: job.clone(),
                    status,
                    note: None,
                    data,
                    errors: Default::default(),
                },
            )
            .to_cbor()
        }
    };
    // Encoding our own plain structs cannot fail; skip the message if it somehow does.
    if let Ok(payload) = payload {
        let pkid = conn.next_pkid();
        mqtt::publish(&mut conn.wbuf, up.as_bytes(), 1, pkid, &payload);
    }
}

/// A copier's meter read as the agent sends it: a total and a few counters by paper size and
/// function, derived from the id so that a resend carries the same counters.
fn counter_report(id: MsgId, read_at: chrono::DateTime<chrono::Utc>) -> CounterReport {
    let total = i64::try_from(id).unwrap_or(i64::MAX);
    let counters: SectionData = [
        ("total", total),
        ("a4", total / 2),
        ("a3", total / 4),
        ("copy", total / 3),
        ("print", total - total / 3),
        ("color", total / 5),
    ]
    .into_iter()
    .map(|(name, n)| (name.to_owned(), Value::Int(n)))
    .collect();
    CounterReport { read_at, counters }
}

fn pubsub_send(conn: &mut Conn, up: &str, ob: &mut Outbox, payload_bytes: usize) {
    let mut payload = vec![0x5a; payload_bytes.max(16)];
    payload[..8].copy_from_slice(&now_us().to_be_bytes());
    ob.seq += 1;
    payload[8..16].copy_from_slice(&ob.seq.to_be_bytes());
    let pkid = conn.next_pkid();
    mqtt::publish(&mut conn.wbuf, up.as_bytes(), 1, pkid, &payload);
    ob.inflight += 1;
}

#[allow(clippy::too_many_arguments)] // one call site, in the session loop
fn on_packet(
    ctx: &Ctx,
    conn: &mut Conn,
    up: &str,
    ack: &str,
    ob: &mut Outbox,
    packet: Incoming,
    phase: Phase,
    paced: bool,
) {
    if let Incoming::Publish(p) = packet {
        on_publish(ctx, conn, up, ack, ob, p);
    }
    if let Work::PubSub {
        window,
        payload_bytes,
    } = ctx.spec.work
        && phase == Phase::Run
    {
        while ob.inflight < window {
            pubsub_send(conn, up, ob, payload_bytes);
        }
    }
    if let Work::Reports { window, .. } = ctx.spec.work {
        if phase == Phase::Run && !paced {
            while ob.out.len() < window {
                send_new(ctx, conn, up, ob, Pending::Report);
            }
        }
        if phase == Phase::Verify {
            verify_more(ctx, conn, up, ob);
        }
    }
}

fn on_publish(ctx: &Ctx, conn: &mut Conn, up: &str, ack: &str, ob: &mut Outbox, p: Publish) {
    if p.qos > 0 {
        mqtt::puback(&mut conn.wbuf, p.pkid);
    }
    let now = now_us();
    if matches!(ctx.spec.work, Work::PubSub { .. }) {
        if p.payload.len() >= 8 {
            let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap_or_default());
            if let Ok(mut h) = ctx.hists.lock() {
                h.1.record(now.saturating_sub(sent));
            }
        }
        inc(&ctx.stats.received);
        ob.inflight = ob.inflight.saturating_sub(1);
        return;
    }
    if p.topic == ack.as_bytes() {
        on_acks(ctx, ob, &p.payload, now);
        return;
    }
    if let Work::Jobs { .. } = ctx.spec.work
        && !p.payload.is_empty()
        && let Ok(Topic::DevJob { job, .. }) = Topic::parse(&String::from_utf8_lossy(&p.topic))
        && ob.jobs_seen.insert(job.to_string())
    {
        inc(&ctx.stats.jobs_received);
        ctx.stats
            .last_job_received_us
            .fetch_max(now, Ordering::Relaxed);
        if let Ok(order) = Envelope::<protocol::job::JobOrder>::from_cbor(&p.payload, 1 << 20)
            && let Ok(made) = u64::try_from(order.at.timestamp_micros())
            && let Ok(mut h) = ctx.hists.lock()
        {
            h.2.record(now.saturating_sub(made));
        }
        send_new(ctx, conn, up, ob, Pending::Job(job));
    }
}

fn on_acks(ctx: &Ctx, ob: &mut Outbox, payload: &Bytes, now: u64) {
    let Ok(batch) = Envelope::<AckBatch>::from_cbor(payload, 1 << 20) else {
        inc(&ctx.stats.unknown_acks);
        return;
    };
    for ack in batch.body.acks {
        if let Some((first, _, pending)) = ob.out.remove(&ack.id) {
            dec(&ctx.stats.outstanding);
            ctx.stats.last_acked_us.fetch_max(now, Ordering::Relaxed);
            match ack.outcome {
                AckOutcome::Stored => inc(&ctx.stats.stored),
                AckOutcome::Duplicate => inc(&ctx.stats.duplicate),
                AckOutcome::Rejected { .. } => inc(&ctx.stats.rejected),
            }
            if let Ok(mut h) = ctx.hists.lock() {
                h.1.record(now.saturating_sub(first));
            }
            if let Pending::Job(_) = pending {
                inc(&ctx.stats.jobs_acked);
                ctx.stats
                    .last_job_acked_us
                    .fetch_max(now, Ordering::Relaxed);
            }
        } else if ob.vout.remove(&ack.id).is_some() {
            dec(&ctx.stats.verify_outstanding);
            match ack.outcome {
                AckOutcome::Duplicate => inc(&ctx.stats.verify_duplicate),
                AckOutcome::Stored => inc(&ctx.stats.verify_stored),
                AckOutcome::Rejected { .. } => inc(&ctx.stats.rejected),
            }
        } else {
            // An ack for a resend whose first ack already came: the relay answered twice.
            inc(&ctx.stats.unknown_acks);
        }
    }
}
