//! Scenario 4, alarm-latency: a device's alarm to a host subscriber (CBOR view) and to an
//! integrator on the JSON mirror, while the relay carries background load (idle devices and
//! devices sending durable reports).
//!
//! Each sample is a fatal fault raised on `dev/S/up/alarm` (an `AlarmReport`, through the relay's
//! commit like any report), timed until it shows in the retained view of active alarms
//! `fleet/S/alarm` (the host, CBOR) and its mirror `json/fleet/S/alarm` (the integrator, JSON). The
//! fault code carries a marker (`alarm-N-`) that reads the same in CBOR and in JSON.
//!
//! Faults come from many devices in turn, as they do in a fleet: the relay limits what one device
//! may raise (a burst, then `alarms_per_minute_per_device`) and sends one device's view at most once
//! a second, so one device raising a fault every few milliseconds would measure those limits, not
//! the path. Each device raises its next fault only after `DEVICE_REST_MS`, and clears its previous
//! one as it does, so every view stays small.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::alarm::{AlarmReport, FaultEvent};
use protocol::topic::{self, UpKind};
use protocol::{Envelope, Role, Serial};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::{Env, chukei_only, report};
use crate::client::{Conn, Endpoint};
use crate::fleet::{Fleet, Hist};
use crate::mqtt::{self, Incoming};
use crate::procfs::{CpuMeter, r2};
use crate::servers::{Server, Target};
use crate::tls::Minter;
use crate::worker::{ReportKind, Work, now_us};

#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub idle: u32,
    pub reporters: u32,
    /// Total background reports/s.
    pub report_rate: f64,
    pub samples: u32,
    pub interval_ms: u64,
    /// The devices (timed and background) connect to a child relay, the host and integrator to
    /// its parent: the path is device → child → parent → host.
    pub through_child: bool,
}

pub async fn run(env: &Env, targets: &[Target], p: Params) -> anyhow::Result<Value> {
    let targets = chukei_only(targets);
    let mut results = Map::new();
    for target in &targets {
        eprintln!("bench: alarm-latency: {target}");
        results.insert(target.name.clone(), one(env, target, p).await?);
    }
    Ok(report(
        "alarm-latency",
        json!({
            "idle_devices": p.idle, "reporting_devices": p.reporters,
            "background_reports_per_s": p.report_rate, "samples": p.samples, "interval_ms": p.interval_ms,
            "alarm_devices": alarm_devices(&p), "device_rest_ms": DEVICE_REST_MS,
            "path": if p.through_child {
                "dev/S/up/alarm at a child relay (raised) → child's commit → relay/R0/up/batch → parent's commit → fleet/S/alarm at the parent (host, CBOR) and json/fleet/S/alarm (integrator, JSON)"
            } else {
                "dev/S/up/alarm (raised) → commit → fleet/S/alarm (host, CBOR) and json/fleet/S/alarm (integrator, JSON)"
            },
        }),
        &targets,
        results,
        Value::Null,
        "fatal alarm p99 ≤ 20 ms under background load",
        env,
    )
    .await)
}

type Sends = Arc<Mutex<Vec<u64>>>;

/// How long a device rests between two of its faults: beyond the default rate of 12 new alarms a
/// minute per device, and beyond its view's once-a-second pace.
const DEVICE_REST_MS: u64 = 5_500;

/// Devices the faults rotate over, so that each rests [`DEVICE_REST_MS`] between two of them.
fn alarm_devices(p: &Params) -> usize {
    let needed = DEVICE_REST_MS.div_ceil(p.interval_ms.max(1)) as usize;
    needed.clamp(1, p.samples.max(1) as usize)
}

/// Reads views until `stop`, timing each marker against its send time.
async fn watch(mut conn: Conn, sends: Sends, hist: Arc<Mutex<Hist>>, stop: CancellationToken) {
    let mut seen = std::collections::HashSet::new();
    loop {
        let packet = tokio::select! {
            () = stop.cancelled() => return,
            p = conn.read() => p,
        };
        let Ok(Some(packet)) = packet else { return };
        if let Incoming::Publish(p) = packet {
            if p.qos > 0 {
                mqtt::puback(&mut conn.wbuf, p.pkid);
                let _ = conn.flush().await;
            }
            let now = now_us();
            for n in markers(&p.payload) {
                if !seen.insert(n) {
                    continue;
                }
                let sent = sends.lock().ok().and_then(|s| s.get(n).copied());
                if let (Some(sent), Ok(mut h)) = (sent, hist.lock()) {
                    h.record(now.saturating_sub(sent));
                }
            }
        }
    }
}

/// Every sample number `N` in `…alarm-N-…` (a view lists each active alarm).
fn markers(payload: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = payload;
    while let Some(at) = rest.windows(6).position(|w| w == b"alarm-") {
        rest = &rest[at + 6..];
        let digits: Vec<u8> = rest
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .copied()
            .collect();
        if let Some(n) = std::str::from_utf8(&digits)
            .ok()
            .and_then(|d| d.parse().ok())
        {
            out.push(n);
        }
    }
    out
}

/// A fatal fault, raised or cleared, with the sample's marker as its code, numbered `id` by its
/// device.
fn fault(n: usize, id: u64, event: FaultEvent) -> anyhow::Result<Vec<u8>> {
    let now = chrono::Utc::now();
    let report = AlarmReport {
        code: format!("alarm-{n}-fatal"),
        event,
        detail: "bench".into(),
        at: now,
        total: None,
    };
    Ok(Envelope::new(id, now, report).to_cbor()?)
}

async fn one(env: &Env, target: &Target, p: Params) -> anyhow::Result<Value> {
    let dir = env.run_dir("alarm-latency", target)?;
    // The devices whose faults are timed connect too, one after another.
    let room = (p.idle + p.reporters) as usize + alarm_devices(&p) + 100;
    let (mut server, mut child) = if p.through_child {
        let config = dir.join("parent.toml");
        std::fs::write(&config, "[[relays]]\nid = \"R0\"\nserials = [\"*\"]\n")?;
        let mut top = target.clone();
        top.args
            .extend(["--config".into(), config.display().to_string()]);
        let parent = Server::start(&top, &dir.join("parent"), &env.pki, 100).await?;
        pki::issue_relay_to_dir(&env.pki, "R0", &[])?;
        let mut t = target.clone();
        t.args.extend([
            "--relay-id".into(),
            "R0".into(),
            "--parent".into(),
            format!("mqtts://{}", parent.endpoint.addr),
        ]);
        let child = Server::start(&t, &dir.join("child"), &env.pki, room).await?;
        (parent, Some(child))
    } else {
        (Server::start(target, &dir, &env.pki, room).await?, None)
    };
    let devices_at = child.as_ref().map_or(server.endpoint, |c| c.endpoint);
    let mut idle = Fleet::start(
        devices_at,
        &env.pki,
        &dir,
        "I",
        p.idle,
        Work::Idle {
            announce: false,
            persistent: false,
        },
        &env.shape,
    )
    .await?;
    let mut reporters = Fleet::start(
        devices_at,
        &env.pki,
        &dir,
        "R",
        p.reporters,
        Work::Reports {
            window: super::reports::PACED_WINDOW,
            rate_per_device: p.report_rate / f64::from(p.reporters.max(1)),
            resend_after_ms: super::reports::PACED_RESEND_MS,
            report: ReportKind::State,
        },
        &env.shape,
    )
    .await?;
    idle.command("connect").await?;
    reporters.command("connect").await?;
    idle.wait_until(
        "idle devices connected",
        Duration::from_secs(900),
        |t, _| t.subscribed >= u64::from(p.idle),
    )
    .await?;
    reporters
        .wait_until(
            "reporting devices connected",
            Duration::from_secs(600),
            |t, _| t.subscribed >= u64::from(p.reporters),
        )
        .await?;
    reporters.command("run").await?;

    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = CpuMeter::start(server.pid());
    let r0 = reporters.total();
    let (host_h, crm_h) = time_alarms(
        &env.pki,
        devices_at,
        server.endpoint,
        alarm_devices(&p),
        p.samples,
        p.interval_ms,
    )
    .await?;
    let r1 = reporters.total();
    let secs = (p.samples as u64 * p.interval_ms) as f64 / 1000.0;
    let (_, cpu_pct, busy) = cpu.read();
    reporters.command("finish").await?;
    let rep = reporters.exit().await?;
    let _ = idle.exit().await?;
    if let Some(child) = child.as_mut() {
        child.stop().await?;
    }
    server.stop().await?;
    Ok(json!({
        "host_cbor": host_h.summary_ms(),
        "integrator_json": crm_h.summary_ms(),
        "p99_ms": host_h.summary_ms()["p99_ms"],
        "background_acked_per_s": r2((r1.stored + r1.duplicate - r0.stored - r0.duplicate) as f64 / secs),
        "background_ack_latency": rep.latency.summary_ms(),
        "relay_cpu_pct": r2(cpu_pct),
        "machine_busy_pct": r2(busy),
    }))
}

/// Raises `samples` fatal faults, one every `interval_ms`, from `alarm_devices` devices (in
/// turn) connected at `devices_at`, and times each until a host (CBOR view) and an integrator
/// (JSON mirror) connected at `host_at` see it: (host, integrator).
pub async fn time_alarms(
    pki: &std::path::Path,
    devices_at: Endpoint,
    host_at: Endpoint,
    alarm_devices: usize,
    samples: u32,
    interval_ms: u64,
) -> anyhow::Result<(Hist, Hist)> {
    let minter = Minter::load(pki)?;
    let source = std::net::Ipv4Addr::new(127, 0, 0, 20);
    let host_tls = minter.client(Role::Host, "bench-host")?;
    let crm_tls = minter.client(Role::Integrator, "bench-crm")?;
    let mut host = Conn::open(host_at, source, Some(&host_tls), "bench-host:alarm").await?;
    host.subscribe(&[topic::ALL_FLEET_ALARMS.to_owned()])
        .await?;
    let mut crm = Conn::open(host_at, source, Some(&crm_tls), "bench-crm").await?;
    crm.subscribe(&[topic::ALL_JSON_ALARMS.to_owned()]).await?;
    // Each alarm device numbers its own messages, 1, 2, 3, … as an agent's outbox does.
    let mut devices = Vec::new();
    for d in 0..alarm_devices {
        let serial = Serial::parse(&format!("AL{d:06}"))?;
        let tls = minter.client(Role::Device, serial.as_str())?;
        let conn = Conn::open(devices_at, source, Some(&tls), serial.as_str()).await?;
        devices.push((serial, conn, 0u64));
    }
    let sends: Sends = Arc::new(Mutex::new(Vec::new()));
    let (host_h, crm_h) = (
        Arc::new(Mutex::new(Hist::default())),
        Arc::new(Mutex::new(Hist::default())),
    );
    let stop = CancellationToken::new();
    let tasks = [
        tokio::spawn(watch(host, sends.clone(), host_h.clone(), stop.clone())),
        tokio::spawn(watch(crm, sends.clone(), crm_h.clone(), stop.clone())),
    ];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
    let rotation = devices.len();
    for n in 0..samples as usize {
        tick.tick().await;
        let (serial, device, last_id) = &mut devices[n % rotation];
        let up = topic::dev_up(serial, UpKind::Alarm);
        *last_id += 1;
        let raise = fault(n, *last_id, FaultEvent::Raised)?;
        if let Ok(mut s) = sends.lock() {
            s.push(now_us());
        }
        let pkid = device.next_pkid();
        mqtt::publish(&mut device.wbuf, up.as_bytes(), 1, pkid, &raise);
        device.flush().await?;
        if n >= rotation {
            *last_id += 1;
            let clear = fault(n - rotation, *last_id, FaultEvent::Cleared)?;
            let pkid = device.next_pkid();
            mqtt::publish(&mut device.wbuf, up.as_bytes(), 1, pkid, &clear);
            device.flush().await?;
        }
        // Drain PUBACKs and acks already here, without waiting.
        while let Ok(Some(_)) = device.buffered() {}
        let _ = tokio::time::timeout(Duration::from_millis(1), device.read()).await;
    }
    // Give the last samples time to arrive.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let done = |h: &Arc<Mutex<Hist>>| {
            h.lock()
                .map(|h| h.count() >= u64::from(samples))
                .unwrap_or(true)
        };
        if done(&host_h) && done(&crm_h) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    for (_, device, _) in devices {
        device.close().await;
    }
    let host_h = host_h.lock().map(|h| h.clone()).unwrap_or_default();
    let crm_h = crm_h.lock().map(|h| h.clone()).unwrap_or_default();
    Ok((host_h, crm_h))
}

#[cfg(test)]
mod tests {
    #[test]
    fn markers_read_the_same_in_cbor_and_json() {
        assert_eq!(super::markers(b"\xa3dcodenalarm-17-fatal"), vec![17]);
        assert_eq!(
            super::markers(br#"[{"code":"alarm-3-fatal"},{"code":"alarm-4-fatal"}]"#),
            vec![3, 4]
        );
        assert!(super::markers(b"nothing").is_empty());
    }
}
