//! Scenario 2, reconnect-storm: N devices connected, the relay restarts (SIGTERM, start again on
//! the same port and data), and every device comes back at once: resuming its TLS session from a
//! ticket and, unless `--clean-sessions`, its MQTT session (no SUBSCRIBE) where the relay
//! resumes it, or subscribing again where it does not.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{Env, ratios, report, settle};
use crate::fleet::Fleet;
use crate::procfs::{CpuMeter, r2, r3};
use crate::servers::{Kind, Server, Target};
use crate::worker::{Work, now_us};

pub async fn run(
    env: &Env,
    targets: &[Target],
    devices: u32,
    announce: bool,
    persistent: bool,
) -> anyhow::Result<Value> {
    let mut results = Map::new();
    for target in targets {
        eprintln!("bench: reconnect-storm: {target}, {devices} devices");
        let r = one(env, target, devices, announce, persistent).await?;
        results.insert(target.name.clone(), r);
    }
    let r = ratios(&results, targets, "reconnect_rate_per_s");
    Ok(report(
        "reconnect-storm",
        json!({
            "devices": devices,
            "announce_state_on_connect": announce,
            "persistent_sessions": persistent,
        }),
        targets,
        results,
        json!({ "reconnect_rate_per_s": r }),
        "100,000 devices back within 60 s, i.e. ≥ 1,700 TLS reconnects/s per relay",
        env,
    )
    .await)
}

async fn one(
    env: &Env,
    target: &Target,
    devices: u32,
    announce: bool,
    persistent: bool,
) -> anyhow::Result<Value> {
    // Only chukei answers an announcement; elsewhere it is a publish nobody reads.
    let acked = announce && target.kind == Kind::Chukei;
    let dir = env.run_dir("reconnect-storm", target)?;
    let n = u64::from(devices);
    let mut server = Server::start(target, &dir, &env.pki, devices as usize + 100).await?;
    let mut fleet = Fleet::start(
        server.endpoint,
        &env.pki,
        &dir,
        "S",
        devices,
        Work::Idle {
            announce,
            persistent,
        },
        &env.shape,
    )
    .await?;
    fleet.command("connect").await?;
    let first = fleet
        .wait_until("all devices connected", Duration::from_secs(900), |t, _| {
            t.subscribed >= n && (!acked || t.stored + t.duplicate >= n)
        })
        .await;
    if let Err(e) = first {
        let _ = fleet.exit().await;
        return Err(e);
    }
    settle().await;
    let killed = now_us();
    let (down, up) = server.restart().await?;
    let ready = now_us();
    let cpu = CpuMeter::start(server.pid());
    let load_cpu = CpuMeter::of(fleet.pids());
    let back = fleet
        .wait_until("all devices back", Duration::from_secs(900), |t, _| {
            t.subscribed >= n && t.connects >= 2 * n && (!acked || t.stored + t.duplicate >= 2 * n)
        })
        .await;
    let (cpu_secs, _, machine_busy) = cpu.read();
    let (load_cpu_secs, _, _) = load_cpu.read();
    let total = fleet.total();
    let fin = fleet.exit().await?;
    server.stop().await?;
    back?;
    let last = total.last_subscribed_us;
    let from_ready = last.saturating_sub(ready) as f64 / 1e6;
    let per_reconnect = |secs: f64| r2(secs * 1e6 / devices.max(1) as f64);
    let announced = acked.then(|| r2(total.last_acked_us.saturating_sub(ready) as f64 / 1e6));
    Ok(json!({
        "devices": devices,
        "stop_secs": r2(down.as_secs_f64()),
        "start_secs": r2(up.as_secs_f64()),
        "all_back_after_kill_secs": r2(last.saturating_sub(killed) as f64 / 1e6),
        "all_back_after_ready_secs": r2(from_ready),
        "reconnect_rate_per_s": r2(devices as f64 / from_ready.max(1e-6)),
        "all_announced_and_acked_after_ready_secs": announced,
        "cpu_secs": r2(cpu_secs),
        "relay_cpu_us_per_reconnect": per_reconnect(cpu_secs),
        "load_cpu_us_per_reconnect": per_reconnect(load_cpu_secs),
        // The relay's CPU against the clients' for the same reconnects: on a shared machine
        // whose speed drifts within the hour, this moves far less than either figure alone.
        "relay_to_load_cpu": (load_cpu_secs > 0.0).then(|| r3(cpu_secs / load_cpu_secs)),
        "reconnects_resumed": total.resumed,
        "mqtt_sessions_resumed": total.session_present,
        "machine_busy_pct": r2(machine_busy),
        "connect_failures": fin.status.connect_failures,
        "connect_latency": fin.connect.summary_ms(),
        "errors": fin.status.errors,
    }))
}
