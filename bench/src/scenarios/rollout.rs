//! Scenario: a rollout to M connected devices in four waves (25%, 50%, 75%, 100%), no rate limit,
//! beside M single jobs on a fresh relay in the same run: time until every device's GET DATA
//! succeeded (and, for the rollout, until the relay says it `succeeded`), and relay CPU.

use std::time::Duration;

use protocol::host::{HostRequest, SubmitJob};
use protocol::rollout::{RolloutSpec, RolloutStatus, RolloutView};
use protocol::topic;
use protocol::{Envelope, HostId};
use serde_json::{Map, Value, json};

use super::fanout::{relay_with_fleet, submit_all};
use super::{Env, chukei_only, report};
use crate::client::Conn;
use crate::mqtt::{self, Incoming};
use crate::procfs::{CpuMeter, r2};
use crate::servers::Target;
use crate::worker::{Work, now_us, serial_of};

pub async fn run(env: &Env, targets: &[Target], devices: u32) -> anyhow::Result<Value> {
    let targets = chukei_only(targets);
    let mut results = Map::new();
    for target in &targets {
        eprintln!("bench: rollout: {target}, {devices} single jobs");
        let single = one(env, target, devices, false).await?;
        eprintln!("bench: rollout: {target}, a rollout to {devices} devices in 4 waves");
        let rollout = one(env, target, devices, true).await?;
        let ratio = match (
            rollout["rollout_succeeded_secs"].as_f64(),
            single["all_succeeded_secs"].as_f64(),
        ) {
            (Some(r), Some(s)) if s > 0.0 => Value::from(r2(r / s)),
            _ => Value::Null,
        };
        results.insert(
            target.name.clone(),
            json!({ "single_jobs": single, "rollout": rollout, "time_ratio": ratio }),
        );
    }
    Ok(report(
        "rollout",
        json!({ "devices": devices, "waves": "25%,50%,75%,100%", "job": "get-data counters, answered succeeded" }),
        &targets,
        results,
        Value::Null,
        "a rollout to 10,000 devices in 4 waves finishes within 1.2× the time of 10,000 single jobs",
        env,
    )
    .await)
}

async fn one(env: &Env, target: &Target, devices: u32, rollout: bool) -> anyhow::Result<Value> {
    let name = if rollout { "rollout" } else { "single-jobs" };
    let n = u64::from(devices);
    let work = Work::Jobs {
        resend_after_ms: super::reports::PACED_RESEND_MS,
        finish: true,
    };
    let (mut server, fleet, mut host, host_id) =
        relay_with_fleet(env, target, &format!("rollout-{name}"), devices, work).await?;

    let cpu = CpuMeter::start(server.pid());
    let t0 = now_us();
    let mut ended_us = None;
    if rollout {
        host.subscribe(&[topic::ALL_JSON_ROLLOUTS.to_owned()])
            .await?;
        create(&mut host, &host_id).await?;
        ended_us = Some(wait_for_end(&mut host).await?);
    } else {
        submit_all(&mut host, &host_id, devices, &|i| serial_of("F", i)).await?;
    }
    let all = fleet
        .wait_until(
            "every device's job succeeded and acked",
            Duration::from_secs(900),
            |t, _| t.jobs_acked >= n,
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
        "all_succeeded_secs": secs(total.last_job_acked_us),
        "rollout_succeeded_secs": ended_us.map(secs),
        "jobs_received": total.jobs_received,
        "jobs_acked": total.jobs_acked,
        "relay_cpu_secs": r2(cpu_secs),
        "machine_busy_pct": r2(busy),
        "errors": fin.status.errors,
    }))
}

/// Sends `create-rollout`: every `F…` device, four waves, the default 100% threshold.
async fn create(host: &mut Conn, host_id: &HostId) -> anyhow::Result<()> {
    let req = HostRequest::CreateRollout {
        rollout: RolloutSpec {
            name: "bench".into(),
            job: SubmitJob {
                kind: "get-data".into(),
                sections: vec!["counters".into()],
                ..Default::default()
            },
            targets: vec!["serial=F*".into()],
            waves: ["25%", "50%", "75%", "100%"].map(String::from).to_vec(),
            ..Default::default()
        },
    };
    let payload = Envelope::new(1, chrono::Utc::now(), req).to_cbor()?;
    let pkid = host.next_pkid();
    mqtt::publish(
        &mut host.wbuf,
        topic::host_req(host_id).as_bytes(),
        1,
        pkid,
        &payload,
    );
    host.flush().await?;
    Ok(())
}

/// Reads the retained rollout views until one says the rollout ended; when it arrived.
async fn wait_for_end(host: &mut Conn) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(900);
    loop {
        let packet = tokio::time::timeout_at(deadline, host.read())
            .await
            .map_err(|_| anyhow::anyhow!("the rollout did not end within 15 minutes"))??;
        let mut next = packet;
        while let Some(p) = next {
            if let Incoming::Publish(p) = p {
                if p.qos > 0 {
                    mqtt::puback(&mut host.wbuf, p.pkid);
                }
                if p.topic.starts_with(b"json/fleet/rollouts/")
                    && let Ok(view) = serde_json::from_slice::<RolloutView>(&p.payload)
                    && view.status.is_final()
                {
                    anyhow::ensure!(
                        view.status == RolloutStatus::Succeeded,
                        "the rollout ended {}: {:?}",
                        view.status,
                        view.reason
                    );
                    return Ok(now_us());
                }
            }
            next = host.buffered()?;
        }
        host.flush().await?;
    }
}
