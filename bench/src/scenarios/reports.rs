//! Scenario 3, durable-reports: K devices send reports through the outbox/ack path (every message
//! keeps its id until the relay's end-to-end ack, resent until then). Two phases:
//!
//! - **max**: closed loop, each device keeps `window` reports unacked: acked reports per second.
//!   Many reports of one device share a commit and an ack batch here, so this is the relay's best
//!   case;
//! - **paced**: for each offered total rate, a fresh set of K devices sends at a steady pace (a
//!   real fleet: each device's reports arrive one at a time, each needs its own ack and view
//!   update): acked reports/s and ack latency p50/p99/max at that rate.
//!
//! Then the relay is restarted and every device resends every id it ever sent. Each must come
//! back `duplicate`: only an id the relay committed before the restart can be a duplicate after
//! it, so the store holds every report sent (no loss), and since each id was acked `stored` (or
//! `duplicate` for a resend) exactly once, none is held twice.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{Env, chukei_only, report};
use crate::fleet::Fleet;
use crate::procfs::{CpuMeter, r2};
use crate::servers::{Server, Target};
use crate::worker::{Final, ReportKind, Work};

#[derive(Debug, Clone)]
pub struct Params {
    pub devices: u32,
    pub window: usize,
    pub secs: u64,
    /// Total reports/s offered in each paced phase.
    pub rates: Vec<f64>,
    pub report: ReportKind,
}

pub async fn run(env: &Env, targets: &[Target], p: Params) -> anyhow::Result<Value> {
    let targets = chukei_only(targets);
    let mut results = Map::new();
    for target in &targets {
        eprintln!("bench: durable-reports: {target}, {} devices", p.devices);
        results.insert(target.name.clone(), one(env, target, &p).await?);
    }
    Ok(report(
        "durable-reports",
        json!({
            "devices": p.devices, "window": p.window, "secs": p.secs, "paced_rates": p.rates,
            "report": p.report,
            "message": match p.report {
                ReportKind::State => "Envelope<DeviceState> on dev/S/up/state, QoS 1, acked on dev/S/ack after the commit",
                ReportKind::Counters => "Envelope<CounterReport> (6 counters) on dev/S/up/counters, QoS 1, acked on dev/S/ack after the commit",
            },
        }),
        &targets,
        results,
        Value::Null,
        "≥ 50,000 durable acked reports/s with p99 ack ≤ 50 ms",
        env,
    )
    .await)
}

/// Unacked reports a paced device may have: past this it waits, as an outbox backlog would, so an
/// overloaded relay shows as a lower acked rate rather than an ever longer queue.
pub const PACED_WINDOW: usize = 64;

/// A paced device resends an unacked report after this long. Long, so that a slow relay is not
/// buried under resends (every report would otherwise be sent again every few seconds).
pub const PACED_RESEND_MS: u64 = 30_000;

async fn one(env: &Env, target: &Target, p: &Params) -> anyhow::Result<Value> {
    let dir = env.run_dir("durable-reports", target)?;
    let n = u64::from(p.devices);
    let fleets_needed = 1 + p.rates.len();
    let mut server = Server::start(
        target,
        &dir,
        &env.pki,
        fleets_needed * p.devices as usize + 100,
    )
    .await?;

    // Max: closed loop.
    let work = Work::Reports {
        window: p.window,
        rate_per_device: 0.0,
        resend_after_ms: 5_000,
        report: p.report,
    };
    let mut max_fleet = Fleet::start(
        server.endpoint,
        &env.pki,
        &dir,
        "R",
        p.devices,
        work,
        &env.shape,
    )
    .await?;
    max_fleet.command("connect").await?;
    max_fleet
        .wait_until(
            "reporting devices connected",
            Duration::from_secs(600),
            |t, _| t.subscribed >= n,
        )
        .await?;
    max_fleet.command("run").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s0 = max_fleet.total();
    let cpu = CpuMeter::start(server.pid());
    tokio::time::sleep(Duration::from_secs(p.secs)).await;
    let (cpu_secs, cpu_pct, busy) = cpu.read();
    let s1 = max_fleet.total();
    max_fleet.command("finish").await?;
    max_fleet
        .wait_until("max phase drained", Duration::from_secs(300), |t, _| {
            t.outstanding == 0
        })
        .await?;
    let max_rate = (s1.stored + s1.duplicate - s0.stored - s0.duplicate) as f64 / p.secs as f64;

    // Paced: open loop at each rate, for latency.
    let mut paced = Vec::new();
    let mut fleets = vec![max_fleet];
    for (i, rate) in p.rates.iter().enumerate() {
        let work = Work::Reports {
            window: PACED_WINDOW,
            rate_per_device: rate / f64::from(p.devices),
            resend_after_ms: PACED_RESEND_MS,
            report: p.report,
        };
        let prefix = format!("P{i}");
        let mut fleet = Fleet::start(
            server.endpoint,
            &env.pki,
            &dir,
            &prefix,
            p.devices,
            work,
            &env.shape,
        )
        .await?;
        fleet.command("connect").await?;
        fleet
            .wait_until(
                "paced devices connected",
                Duration::from_secs(600),
                |t, _| t.subscribed >= n,
            )
            .await?;
        fleet.command("run").await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let q0 = fleet.total();
        let cpu = CpuMeter::start(server.pid());
        tokio::time::sleep(Duration::from_secs(p.secs)).await;
        let (_, cpu_pct, _) = cpu.read();
        let q1 = fleet.total();
        fleet.command("finish").await?;
        fleet
            .wait_until("paced phase drained", Duration::from_secs(300), |t, _| {
                t.outstanding == 0
            })
            .await?;
        let acked = (q1.stored + q1.duplicate - q0.stored - q0.duplicate) as f64 / p.secs as f64;
        paced.push((*rate, acked, cpu_pct));
        fleets.push(fleet);
    }

    // Restart, then every id again: all must be duplicates.
    let (down, up) = server.restart().await?;
    for fleet in fleets.iter_mut() {
        fleet
            .wait_until(
                "devices back after restart",
                Duration::from_secs(600),
                |t, _| t.subscribed >= n,
            )
            .await?;
        fleet.command("verify").await?;
    }
    for fleet in &fleets {
        fleet
            .wait_until(
                "verify resends answered",
                Duration::from_secs(900),
                |t, _| t.verify_sent == t.sent && t.verify_outstanding == 0,
            )
            .await?;
    }
    let mut finals = Vec::new();
    for fleet in fleets {
        finals.push(fleet.exit().await?);
    }
    server.stop().await?;

    let check = |f: &Final| {
        let s = &f.status;
        json!({
            "sent": s.sent,
            "acked_stored": s.stored,
            "acked_duplicate_on_resend": s.duplicate,
            "rejected": s.rejected,
            "resent": s.resent,
            "held_after_restart": s.verify_duplicate,
            "missing_after_restart": s.verify_stored,
            "ok": s.stored + s.duplicate == s.sent && s.rejected == 0
                && s.verify_duplicate == s.sent && s.verify_stored == 0,
        })
    };
    let checks: Vec<Value> = finals.iter().map(check).collect();
    let ok = checks.iter().all(|c| c["ok"].as_bool() == Some(true));
    let (sent, held) = finals.iter().fold((0, 0), |(a, b), f| {
        (a + f.status.sent, b + f.status.verify_duplicate)
    });
    let paced_json: Vec<Value> = paced
        .iter()
        .zip(finals.iter().skip(1))
        .map(|((rate, acked, cpu), f)| {
            json!({
                "offered_per_s": r2(*rate),
                "acked_per_s": r2(*acked),
                "relay_cpu_pct": r2(*cpu),
                "ack_latency": f.latency.summary_ms(),
            })
        })
        .collect();
    // The highest offered rate the relay kept up with (≥ 95 % acked) at p99 ≤ 50 ms.
    let sustained = paced
        .iter()
        .zip(finals.iter().skip(1))
        .filter(|((rate, acked, _), f)| *acked >= 0.95 * rate && f.latency.quantile(0.99) <= 50_000)
        .map(|((_, acked, _), _)| *acked)
        .fold(0.0, f64::max);
    Ok(json!({
        "max_acked_per_s": r2(max_rate),
        "max_phase_ack_latency": finals[0].latency.summary_ms(),
        "max_phase_relay_cpu_pct": r2(cpu_pct),
        "max_phase_relay_cpu_us_per_report": r2(cpu_secs * 1e6 / (max_rate * p.secs as f64).max(1.0)),
        "max_phase_machine_busy_pct": r2(busy),
        "paced": paced_json,
        "paced_sustained_per_s_at_p99_50ms": r2(sustained),
        "restart_stop_secs": r2(down.as_secs_f64()),
        "restart_start_secs": r2(up.as_secs_f64()),
        "store_check": { "phases": checks, "sent": sent, "held_after_restart": held, "ok": ok },
        "errors": finals[0].status.errors,
    }))
}
