//! Scenario 1, idle-connections: ramp N mTLS devices that subscribe to their job and ack topics
//! and stay idle. Connected count, connect rate, relay memory per connection, CPU.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{Env, mib, ratios, report, settle};
use crate::fleet::Fleet;
use crate::procfs::{CpuMeter, r2};
use crate::servers::{Kind, Server, Target};
use crate::worker::Work;

pub async fn run(
    env: &Env,
    targets: &[Target],
    devices: u32,
    idle_secs: u64,
    announce: bool,
) -> anyhow::Result<Value> {
    let mut results = Map::new();
    for target in targets {
        eprintln!("bench: idle-connections: {target}, {devices} devices");
        let r = one(env, target, devices, idle_secs, announce).await?;
        results.insert(target.name.clone(), r);
    }
    let mut r = Map::new();
    r.insert(
        "rss_per_connection_kib".into(),
        ratios(&results, targets, "rss_per_connection_kib"),
    );
    r.insert(
        "connect_rate_per_s".into(),
        ratios(&results, targets, "connect_rate_per_s"),
    );
    Ok(report(
        "idle-connections",
        json!({ "devices": devices, "idle_secs": idle_secs, "announce_state_on_connect": announce }),
        targets,
        results,
        Value::Object(r),
        "≈19,000 idle mTLS devices per relay process, ≤ 16 KiB relay memory each; ≥ 1,700 TLS connects/s",
        env,
    )
    .await)
}

async fn one(
    env: &Env,
    target: &Target,
    devices: u32,
    idle_secs: u64,
    announce: bool,
) -> anyhow::Result<Value> {
    // Only chukei answers an announcement; elsewhere it is a publish nobody reads.
    let acked = announce && target.kind == Kind::Chukei;
    let dir = env.run_dir("idle-connections", target)?;
    let mut server = Server::start(target, &dir, &env.pki, devices as usize + 100).await?;
    let mut fleet = Fleet::start(
        server.endpoint,
        &env.pki,
        &dir,
        "B",
        devices,
        Work::Idle {
            announce,
            persistent: false,
        },
        &env.shape,
    )
    .await?;
    settle().await;
    let rss_before = server.rss_kib();
    let cpu = CpuMeter::start(server.pid());
    let t0 = crate::worker::now_us();
    fleet.command("connect").await?;
    let waited = fleet
        .wait_until("all devices connected", Duration::from_secs(900), |t, _| {
            t.subscribed >= u64::from(devices)
                && (!acked || t.stored + t.duplicate >= u64::from(devices))
        })
        .await;
    let (ramp_cpu, _, machine_busy) = cpu.read();
    let total = fleet.total();
    let ramp_secs = (total.last_subscribed_us.saturating_sub(t0)) as f64 / 1e6;
    let announced_secs = acked.then(|| r2(total.last_acked_us.saturating_sub(t0) as f64 / 1e6));
    settle().await;
    let idle = CpuMeter::start(server.pid());
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let (_, idle_pct, _) = idle.read();
    let rss_after = server.rss_kib();
    let connected = fleet.total().subscribed;
    let fin = fleet.exit().await?;
    server.stop().await?;
    waited?;
    let per_conn = (rss_after.saturating_sub(rss_before)) as f64 / connected.max(1) as f64;
    Ok(json!({
        "connected": connected,
        "ramp_secs": r2(ramp_secs),
        "connect_rate_per_s": r2(f64::from(devices) / ramp_secs.max(1e-6)),
        "all_announced_and_acked_secs": announced_secs,
        "connect_latency": fin.connect.summary_ms(),
        "rss_before_mib": mib(rss_before),
        "rss_after_mib": mib(rss_after),
        "rss_per_connection_kib": r2(per_conn),
        "ramp_cpu_secs": r2(ramp_cpu),
        "cpu_us_per_connect": r2(ramp_cpu * 1e6 / f64::from(devices)),
        "machine_busy_pct_during_ramp": r2(machine_busy),
        "idle_cpu_pct": r2(idle_pct),
        "connect_failures": fin.status.connect_failures,
        "disconnects": fin.status.disconnects,
        "errors": fin.status.errors,
    }))
}
