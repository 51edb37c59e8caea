//! Scenario 6, pubsub-throughput: plain QoS 1 publish → subscribe through each relay, same
//! payloads, same TLS. Each of P devices publishes to its own topic and is subscribed to it
//! (chukei's ACL lets a device read only its own tree), keeping `window` messages in flight end
//! to end. In chukei the router also hands every message to the core, which refuses it (a bare
//! payload is not an envelope): that is part of chukei's cost and is measured with it.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{Env, ratios, report};
use crate::fleet::Fleet;
use crate::procfs::{CpuMeter, r2};
use crate::servers::{Server, Target};
use crate::worker::Work;

#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub devices: u32,
    pub window: usize,
    pub payload: usize,
    pub secs: u64,
}

pub async fn run(env: &Env, targets: &[Target], p: Params) -> anyhow::Result<Value> {
    let mut results = Map::new();
    for target in targets {
        eprintln!("bench: pubsub-throughput: {target}");
        results.insert(target.name.clone(), one(env, target, p).await?);
    }
    let r = ratios(&results, targets, "msgs_per_s");
    Ok(report(
        "pubsub-throughput",
        json!({
            "devices": p.devices, "window": p.window, "payload_bytes": p.payload, "secs": p.secs,
            "qos": 1, "topology": "each device publishes to dev/S/up/state and is subscribed to it",
        }),
        targets,
        results,
        json!({ "msgs_per_s": r }),
        "chukei ≥ 0.8 × rumqttd's TLS listener and ≥ 1.0 × Mosquitto",
        env,
    )
    .await)
}

async fn one(env: &Env, target: &Target, p: Params) -> anyhow::Result<Value> {
    let dir = env.run_dir("pubsub-throughput", target)?;
    let n = u64::from(p.devices);
    let mut server = Server::start(target, &dir, &env.pki, p.devices as usize + 100).await?;
    let work = Work::PubSub {
        window: p.window,
        payload_bytes: p.payload,
    };
    let mut fleet = Fleet::start(
        server.endpoint,
        &env.pki,
        &dir,
        "T",
        p.devices,
        work,
        &env.shape,
    )
    .await?;
    fleet.command("connect").await?;
    fleet
        .wait_until("devices connected", Duration::from_secs(300), |t, _| {
            t.subscribed >= n
        })
        .await?;
    fleet.command("run").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r0 = fleet.total().received;
    let cpu = CpuMeter::start(server.pid());
    tokio::time::sleep(Duration::from_secs(p.secs)).await;
    let (cpu_secs, cpu_pct, busy) = cpu.read();
    let r1 = fleet.total().received;
    fleet.command("finish").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fin = fleet.exit().await?;
    server.stop().await?;
    let rate = (r1 - r0) as f64 / p.secs as f64;
    Ok(json!({
        "msgs_per_s": r2(rate),
        "latency": fin.latency.summary_ms(),
        "relay_cpu_pct": r2(cpu_pct),
        "relay_cpu_us_per_msg": r2(cpu_secs * 1e6 / (rate * p.secs as f64).max(1.0)),
        "machine_busy_pct": r2(busy),
        "disconnects": fin.status.disconnects,
        "errors": fin.status.errors,
    }))
}
