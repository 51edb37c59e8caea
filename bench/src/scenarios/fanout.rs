//! Scenario 5, job-fanout: one host submits a get-data job to each of M connected devices; time
//! until all M have their order and until all M have reported `delivered` and been acked.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use protocol::host::{HostReply, HostRequest, HostResponse, SubmitJob};
use protocol::topic;
use protocol::{Envelope, HostId, MsgId, Role};
use serde_json::{Map, Value, json};

use super::{Env, chukei_only, report};
use crate::client::Conn;
use crate::fleet::Fleet;
use crate::mqtt::{self, Incoming};
use crate::procfs::{CpuMeter, r2};
use crate::servers::{Server, Target};
use crate::tls::Minter;
use crate::worker::{Work, now_us, serial_of};

pub async fn run(env: &Env, targets: &[Target], devices: u32) -> anyhow::Result<Value> {
    let targets = chukei_only(targets);
    let mut results = Map::new();
    for target in &targets {
        eprintln!("bench: job-fanout: {target}, {devices} devices");
        results.insert(target.name.clone(), one(env, target, devices).await?);
    }
    Ok(report(
        "job-fanout",
        json!({ "devices": devices, "job": "get-data counters" }),
        &targets,
        results,
        Value::Null,
        "fan-out to 10,000 devices ≤ 10 s (all have it and all have acked)",
        env,
    )
    .await)
}

/// Requests a host keeps unanswered before it waits for replies.
const HOST_WINDOW: usize = 2_000;

async fn one(env: &Env, target: &Target, devices: u32) -> anyhow::Result<Value> {
    let n = u64::from(devices);
    let work = Work::Jobs {
        resend_after_ms: super::reports::PACED_RESEND_MS,
        finish: false,
    };
    let (mut server, fleet, mut host, host_id) =
        relay_with_fleet(env, target, "job-fanout", devices, work).await?;

    let cpu = CpuMeter::start(server.pid());
    let t0 = now_us();
    let submitted = submit_all(&mut host, &host_id, devices, &|i| serial_of("F", i)).await?;
    let all = fleet
        .wait_until(
            "every device has its job and its ack",
            Duration::from_secs(600),
            |t, _| t.jobs_received >= n && t.jobs_acked >= n,
        )
        .await;
    let (cpu_secs, _, busy) = cpu.read();
    let total = fleet.total();
    host.close().await;
    let fin = fleet.exit().await?;
    server.stop().await?;
    all?;
    let secs = |t: u64| r2(t.saturating_sub(t0) as f64 / 1e6);
    Ok(json!({
        "devices": devices,
        "all_submitted_secs": secs(submitted.last_reply_us),
        "all_received_secs": secs(total.last_job_received_us),
        "all_acked_secs": secs(total.last_job_acked_us),
        "submitted": submitted.submitted,
        "rejected": submitted.rejected,
        "jobs_received": total.jobs_received,
        "jobs_acked": total.jobs_acked,
        "relay_cpu_secs": r2(cpu_secs),
        "machine_busy_pct": r2(busy),
        "delivered_ack_latency": fin.latency.summary_ms(),
        "errors": fin.status.errors,
    }))
}

/// A fresh relay (run files under `scenario`), `devices` bench devices connected to it doing
/// `work`, and a host session subscribed to its replies.
pub async fn relay_with_fleet(
    env: &Env,
    target: &Target,
    scenario: &str,
    devices: u32,
    work: Work,
) -> anyhow::Result<(Server, Fleet, Conn, HostId)> {
    let dir = env.run_dir(scenario, target)?;
    let n = u64::from(devices);
    let server = Server::start(target, &dir, &env.pki, devices as usize + 100).await?;
    let mut fleet = Fleet::start(
        server.endpoint,
        &env.pki,
        &dir,
        "F",
        devices,
        work,
        &env.shape,
    )
    .await?;
    fleet.command("connect").await?;
    fleet
        .wait_until("devices connected", Duration::from_secs(900), |t, _| {
            t.subscribed >= n
        })
        .await?;
    let host_id = HostId::parse("bench-host")?;
    let tls = Minter::load(&env.pki)?.client(Role::Host, host_id.as_str())?;
    let source = std::net::Ipv4Addr::new(127, 0, 0, 21);
    let client_id = format!("bench-host:{scenario}");
    let mut host = Conn::open(server.endpoint, source, Some(&tls), &client_id).await?;
    host.subscribe(&[topic::host_resp(&host_id)]).await?;
    Ok((server, fleet, host, host_id))
}

/// What [`submit_all`] got back.
pub struct Submitted {
    pub submitted: u64,
    pub rejected: u64,
    /// When the last reply came ([`now_us`]).
    pub last_reply_us: u64,
}

/// Submits a get-data job (counters) for each of `n` devices (`serial(i)`), keeping up to
/// [`HOST_WINDOW`] requests unanswered; resends one unanswered for a minute (the relay
/// deduplicates by msg id).
pub async fn submit_all(
    host: &mut Conn,
    host_id: &HostId,
    n: u32,
    serial: &dyn Fn(u32) -> String,
) -> anyhow::Result<Submitted> {
    let req_topic = topic::host_req(host_id);
    let started = Instant::now();
    let mut next: u32 = 0;
    // id → (serial index, last sent)
    let mut waiting: BTreeMap<MsgId, (u32, Instant)> = BTreeMap::new();
    let mut done = Submitted {
        submitted: 0,
        rejected: 0,
        last_reply_us: 0,
    };
    while done.submitted + done.rejected < u64::from(n) {
        while waiting.len() < HOST_WINDOW && next < n {
            let id = MsgId::from(next + 1);
            submit(host, &req_topic, id, &serial(next))?;
            waiting.insert(id, (next, Instant::now()));
            next += 1;
        }
        host.flush().await?;
        let packet = match tokio::time::timeout(Duration::from_secs(1), host.read()).await {
            Ok(p) => p?,
            Err(_) => {
                // Unanswered for a minute: resend. Not sooner: a slow relay would only get more
                // work.
                let stale: Vec<(MsgId, u32)> = waiting
                    .iter()
                    .filter(|(_, (_, at))| at.elapsed() > Duration::from_secs(60))
                    .map(|(id, (i, _))| (*id, *i))
                    .collect();
                for (id, i) in stale {
                    submit(host, &req_topic, id, &serial(i))?;
                    waiting.insert(id, (i, Instant::now()));
                }
                if started.elapsed() > Duration::from_secs(600) {
                    bail!(
                        "host replies: {} submitted of {n} after 10 minutes",
                        done.submitted
                    );
                }
                continue;
            }
        };
        let mut next_packet = packet;
        while let Some(p) = next_packet {
            if let Incoming::Publish(p) = p {
                if p.qos > 0 {
                    mqtt::puback(&mut host.wbuf, p.pkid);
                }
                if let Ok(env) = Envelope::<HostResponse>::from_cbor(&p.payload, 1 << 20)
                    && waiting.remove(&env.body.reply_to).is_some()
                {
                    done.last_reply_us = now_us();
                    match env.body.reply {
                        HostReply::Submitted { .. } => done.submitted += 1,
                        _ => done.rejected += 1,
                    }
                }
            }
            next_packet = host.buffered()?;
        }
    }
    Ok(done)
}

fn submit(host: &mut Conn, topic: &str, id: MsgId, serial: &str) -> anyhow::Result<()> {
    let req = HostRequest::Submit(SubmitJob {
        serial: serial.to_owned(),
        kind: "get-data".into(),
        sections: vec!["counters".into()],
        ..Default::default()
    });
    let payload = Envelope::new(id, chrono::Utc::now(), req).to_cbor()?;
    let pkid = host.next_pkid();
    mqtt::publish(&mut host.wbuf, topic.as_bytes(), 1, pkid, &payload);
    Ok(())
}
