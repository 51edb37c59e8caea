//! Scenario: a cluster of relay nodes — N `broker run --node-id … --cluster-db … --cluster-bus …`
//! processes sharing one PostgreSQL (with a synchronous standby if asked) and a 3-server NATS
//! bus, all started here on loopback. Devices are spread over the nodes as a load balancer
//! would spread them. Phases, each with fresh devices:
//!
//! - **max**: a few devices per node in a closed loop (each keeps `window` reports unacked):
//!   the cluster's ceiling of acked reports/s, and the CPU of relays, PostgreSQL and NATS;
//! - **paced**: `per_node` devices on every node (19,000 each: a full node) sending counters
//!   reports at `rate` in all: acked/s and ack latency; meanwhile fatal alarms from devices on
//!   node 1 timed to a host and an integrator on node 0 (the bus between them);
//! - **fan-out**: a GET DATA to `fanout` devices spread over the nodes, submitted by one host at
//!   node 0, until every job is `succeeded` (node 0's metrics count the cluster's jobs).
//!
//! Beside it, in the same run, one relay on its embedded store with one node's share of each
//! phase (`{target}-single`).

use std::time::{Duration, Instant};

use protocol::{HostId, Role, topic};
use serde_json::{Map, Value, json};

use super::fanout::submit_all;
use super::tree::{sample, sample_f64, scrape, until, with_args};
use super::{Env, chukei_only, report};
use crate::client::Conn;
use crate::engines::{Nats, Postgres};
use crate::fleet::{Fleet, Hist};
use crate::procfs::{CpuMeter, r2};
use crate::servers::{CHUKEI_MAX_CLIENTS, Server, Target, free_port};
use crate::tls::Minter;
use crate::worker::{ReportKind, Work, serial_of};

#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: u32,
    pub per_node: u32,
    pub secs: u64,
    /// Total counters reports/s the paced devices offer.
    pub rate: f64,
    pub standby: bool,
    /// The nodes' links to PostgreSQL and NATS over TLS, certificates both ways.
    pub tls: bool,
    /// Added each way on the nodes' connections to PostgreSQL (not the standby's).
    pub db_delay: std::time::Duration,
    pub fanout: u32,
    /// Closed-loop devices per node in the max phase, and what each keeps unacked.
    pub max_devices_per_node: u32,
    pub window: usize,
    pub alarm_samples: u32,
    pub alarm_interval_ms: u64,
}

pub async fn run(env: &Env, targets: &[Target], p: Params) -> anyhow::Result<Value> {
    let targets = chukei_only(targets);
    // A relay admits at most CHUKEI_MAX_CLIENTS clients (its 20,000 files); keep room for the
    // host, the integrator and the timed alarm devices.
    let p = Params {
        per_node: p.per_node.min(u32::try_from(CHUKEI_MAX_CLIENTS - 100)?),
        ..p
    };
    let mut results = Map::new();
    for target in &targets {
        eprintln!(
            "bench: cluster: {target}, {} nodes × {} devices{}{}",
            p.nodes,
            p.per_node,
            if p.standby {
                ", synchronous standby"
            } else {
                ""
            },
            if p.tls {
                ", TLS to PostgreSQL and NATS"
            } else {
                ""
            }
        );
        // One node's share of the same workload on one relay with its embedded store, beside.
        let single = Params {
            nodes: 1,
            rate: p.rate / f64::from(p.nodes.max(1)),
            fanout: p.fanout / p.nodes.max(1),
            ..p.clone()
        };
        eprintln!("bench: cluster: {target}, single relay (embedded store) with one node's share");
        results.insert(
            format!("{}-single", target.name),
            one(env, target, &single, false).await?,
        );
        results.insert(
            format!("{}-cluster", target.name),
            one(env, target, &p, true).await?,
        );
    }
    Ok(report(
        "cluster",
        json!({
            "nodes": p.nodes, "devices_per_node": p.per_node, "secs": p.secs,
            "paced_rate_per_s": p.rate, "synchronous_standby": p.standby, "tls_to_engines": p.tls, "db_delay_us": p.db_delay.as_micros() as u64, "fanout": p.fanout,
            "max_devices_per_node": p.max_devices_per_node, "window": p.window,
            "alarm_samples": p.alarm_samples, "alarm_interval_ms": p.alarm_interval_ms,
            "engines": "PostgreSQL (fsync, synchronous_commit on) and 3 nats-server joined by routes, on this machine",
        }),
        &targets,
        results,
        Value::Null,
        "3 × 19,000 devices: ≥ 20,000 acked reports/s with p99 ≤ 100 ms (synchronous standby); GET DATA to 10,000 devices all succeeded ≤ 10 s; a device's alarm on one node to a host on another p99 ≤ 30 ms",
        env,
    )
    .await)
}

/// The engines and the nodes.
struct Cluster {
    nodes: Vec<Server>,
    metrics: Vec<std::net::SocketAddr>,
    /// None for the single relay on its embedded store.
    engines: Option<Engines>,
}

struct Engines {
    pg: Postgres,
    standby: Option<Postgres>,
    nats: Nats,
}

impl Cluster {
    /// The single relay (`engines` false: one `broker run` on its embedded store, the same
    /// build without cluster flags) or the cluster.
    async fn start(
        env: &Env,
        target: &Target,
        dir: &std::path::Path,
        p: &Params,
        engines: bool,
    ) -> anyhow::Result<Cluster> {
        let room = p.per_node.max(p.max_devices_per_node) as usize + 300;
        if !engines {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let t = with_args(target, &["--metrics-listen".to_owned(), addr.to_string()]);
            let node = Server::start(&t, &dir.join("single"), &env.pki, room).await?;
            return Ok(Cluster {
                nodes: vec![node],
                metrics: vec![addr],
                engines: None,
            });
        }
        let tls = p.tls.then_some(env.pki.as_path());
        let pg = Postgres::start(&dir.join("pg"), tls)?;
        let standby = if p.standby {
            Some(pg.start_standby(&dir.join("pg-standby"))?)
        } else {
            None
        };
        let nats = Nats::start(dir, 3, tls)?;
        let url = pg.url(tls)?;
        let out = tokio::process::Command::new(&target.binary)
            .args(["db", "migrate", "--cluster-db", &url])
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "broker db migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = if p.db_delay.is_zero() {
            url
        } else {
            let direct = format!("127.0.0.1:{}/", pg.port());
            let relay = crate::delay::start(([127, 0, 0, 1], pg.port()).into(), p.db_delay)?;
            url.replace(&direct, &format!("127.0.0.1:{}/", relay.port()))
        };
        let buses = nats.urls();
        let mut nodes = Vec::new();
        let mut metrics = Vec::new();
        for i in 0..p.nodes as usize {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let mut args = vec![
                "--node-id".to_owned(),
                format!("N{i}"),
                "--cluster-db".to_owned(),
                url.clone(),
                "--metrics-listen".to_owned(),
                addr.to_string(),
            ];
            if let Some(pki_dir) = tls {
                let (cert, key) =
                    pki::cluster::cluster_cert_paths(pki_dir, ::engines::postgres::NODE_USER);
                for (flag, path) in [
                    ("--cluster-bus-ca", pki_dir.join(pki::CA_CERT)),
                    ("--cluster-bus-cert", cert),
                    ("--cluster-bus-key", key),
                ] {
                    args.push(flag.to_owned());
                    args.push(path.display().to_string());
                }
            }
            // Each node starts on a bus server of its own, the others as its fallbacks.
            for b in 0..buses.len() {
                args.push("--cluster-bus".to_owned());
                args.push(buses[(i + b) % buses.len()].clone());
            }
            let t = with_args(target, &args);
            nodes.push(Server::start(&t, &dir.join(format!("node{i}")), &env.pki, room).await?);
            metrics.push(addr);
        }
        Ok(Cluster {
            nodes,
            metrics,
            engines: Some(Engines { pg, standby, nats }),
        })
    }

    /// Lets the database finish with the phase before (see [`Postgres::settle`]); nothing for
    /// the single relay.
    fn settle(&self) -> anyhow::Result<()> {
        match &self.engines {
            Some(e) => e.pg.settle(e.standby.as_ref()),
            None => Ok(()),
        }
    }

    /// CPU meters for the relay nodes, PostgreSQL (primary and standby, every process) and NATS.
    fn meters(&self) -> [CpuMeter; 3] {
        let (pg, nats) = match &self.engines {
            Some(e) => {
                let mut pg = e.pg.pids();
                if let Some(s) = &e.standby {
                    pg.extend(s.pids());
                }
                (pg, e.nats.pids())
            }
            None => (Vec::new(), Vec::new()),
        };
        [
            CpuMeter::of(self.nodes.iter().map(Server::pid).collect()),
            CpuMeter::of(pg),
            CpuMeter::of(nats),
        ]
    }

    /// One fleet per node, `per_node` devices each, serials `{prefix}{node}` and six digits,
    /// all connected and subscribed; the time that took.
    async fn fleets(
        &self,
        env: &Env,
        dir: &std::path::Path,
        prefix: &str,
        per_node: u32,
        work: &Work,
    ) -> anyhow::Result<(Vec<Fleet>, Duration)> {
        let mut fleets = Vec::new();
        let started = Instant::now();
        for (i, node) in self.nodes.iter().enumerate() {
            let fleet_dir = dir.join(format!("{prefix}{i}"));
            std::fs::create_dir_all(&fleet_dir)?;
            let mut fleet = Fleet::start(
                node.endpoint,
                &env.pki,
                &fleet_dir,
                &format!("{prefix}{i}"),
                per_node,
                work.clone(),
                &env.shape,
            )
            .await?;
            fleet.command("connect").await?;
            fleets.push(fleet);
        }
        for fleet in &fleets {
            fleet
                .wait_until("devices connected", Duration::from_secs(900), |t, _| {
                    t.subscribed >= u64::from(per_node)
                })
                .await?;
        }
        Ok((fleets, started.elapsed()))
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            node.stop().await?;
        }
        if let Some(e) = self.engines {
            drop(e.nats);
            drop(e.standby);
            drop(e.pg);
        }
        Ok(())
    }
}

/// Acked (stored or duplicate) reports so far, over fleets.
fn acked(fleets: &[Fleet]) -> u64 {
    fleets
        .iter()
        .map(|f| {
            let t = f.total();
            t.stored + t.duplicate
        })
        .sum()
}

/// Stops the fleets' reports, waits until each has nothing unacked, and merges their ack
/// latencies; with the number of reports the relays refused.
async fn drain(mut fleets: Vec<Fleet>) -> anyhow::Result<(Hist, u64)> {
    for fleet in &mut fleets {
        fleet.command("finish").await?;
    }
    for fleet in &fleets {
        fleet
            .wait_until("reports drained", Duration::from_secs(300), |t, _| {
                t.outstanding == 0
            })
            .await?;
    }
    let mut latency = Hist::default();
    let mut rejected = 0;
    for fleet in fleets {
        let f = fleet.exit().await?;
        latency.merge(&f.latency);
        rejected += f.status.rejected;
    }
    Ok((latency, rejected))
}

/// A meter over the load processes of `fleets`: the machine they share with the relays.
/// The nodes' commits over a phase, from their metrics: how many, the messages each carried and
/// how long each took, to tell whether a change made batches smaller or commits slower.
struct CommitMeter {
    metrics: Vec<std::net::SocketAddr>,
    start: Vec<[f64; 3]>,
}

impl CommitMeter {
    async fn start(metrics: &[std::net::SocketAddr]) -> anyhow::Result<Self> {
        let mut start = Vec::new();
        for &m in metrics {
            start.push(commit_counts(&scrape(m).await?));
        }
        Ok(Self {
            metrics: metrics.to_vec(),
            start,
        })
    }

    /// Commits per second, messages per commit and the mean commit time, summed over the nodes.
    async fn read(self, secs: u64) -> anyhow::Result<Value> {
        let mut total = [0.0; 3];
        for (m, before) in self.metrics.iter().zip(&self.start) {
            let now = commit_counts(&scrape(*m).await?);
            for i in 0..3 {
                total[i] += now[i] - before[i];
            }
        }
        let [commits, messages, commit_secs] = total;
        Ok(json!({
            "commits_per_s": r2(commits / secs.max(1) as f64),
            "messages_per_commit": r2(messages / commits.max(1.0)),
            "commit_ms_mean": r2(commit_secs * 1e3 / commits.max(1.0)),
        }))
    }
}

/// A node's commits, messages and seconds spent committing, so far.
fn commit_counts(metrics: &str) -> [f64; 3] {
    [
        sample_f64(metrics, "chukei_redb_commit_seconds_count"),
        sample_f64(metrics, "chukei_messages_total"),
        sample_f64(metrics, "chukei_redb_commit_seconds_sum"),
    ]
}

fn load_meter(fleets: &[Fleet]) -> CpuMeter {
    CpuMeter::of(fleets.iter().flat_map(Fleet::pids).collect())
}

fn cpu_json(meters: [CpuMeter; 3], load: CpuMeter, reports: f64) -> Value {
    let [relays, pg, nats] = meters.map(|m| m.read());
    let load = load.read();
    let per = |secs: f64| r2(secs * 1e6 / reports.max(1.0));
    json!({
        "relays_cpu_pct": r2(relays.1), "postgres_cpu_pct": r2(pg.1), "nats_cpu_pct": r2(nats.1),
        "load_cpu_pct": r2(load.1),
        "relays_us_per_report": per(relays.0), "postgres_us_per_report": per(pg.0),
        "nats_us_per_report": per(nats.0), "load_us_per_report": per(load.0),
        "machine_busy_pct": r2(relays.2),
    })
}

async fn one(env: &Env, target: &Target, p: &Params, engines: bool) -> anyhow::Result<Value> {
    let dir = env.run_dir(if engines { "cluster" } else { "cluster-single" }, target)?;
    let cluster = Cluster::start(env, target, &dir, p, engines).await?;

    // Max: closed loop on every node.
    eprintln!("bench: cluster: max phase");
    let work = Work::Reports {
        window: p.window,
        rate_per_device: 0.0,
        resend_after_ms: 5_000,
        report: ReportKind::Counters,
    };
    let (mut fleets, _) = cluster
        .fleets(env, &dir, "M", p.max_devices_per_node, &work)
        .await?;
    for f in &mut fleets {
        f.command("run").await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a0, meters, load) = (acked(&fleets), cluster.meters(), load_meter(&fleets));
    let commits = CommitMeter::start(&cluster.metrics).await?;
    tokio::time::sleep(Duration::from_secs(p.secs)).await;
    let max_reports = (acked(&fleets) - a0) as f64;
    let max_cpu = cpu_json(meters, load, max_reports);
    let max_commits = commits.read(p.secs).await?;
    let (max_latency, max_rejected) = drain(fleets).await?;
    cluster.settle()?;

    // Paced: every node full, reports at `rate` in all, alarms across nodes meanwhile.
    eprintln!("bench: cluster: paced phase");
    let total = u64::from(p.per_node) * u64::from(p.nodes);
    let work = Work::Reports {
        window: super::reports::PACED_WINDOW,
        rate_per_device: p.rate / total as f64,
        resend_after_ms: super::reports::PACED_RESEND_MS,
        report: ReportKind::Counters,
    };
    let (mut fleets, connected) = cluster.fleets(env, &dir, "P", p.per_node, &work).await?;
    for f in &mut fleets {
        f.command("run").await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a0, meters, load) = (acked(&fleets), cluster.meters(), load_meter(&fleets));
    let commits = CommitMeter::start(&cluster.metrics).await?;
    let alarm_at = cluster.nodes[1 % cluster.nodes.len()].endpoint;
    let host_at = cluster.nodes[0].endpoint;
    let (alarms, ()) = tokio::join!(
        super::alarm::time_alarms(
            &env.pki,
            alarm_at,
            host_at,
            (5_000 / p.alarm_interval_ms.max(1)).clamp(1, 50) as usize,
            p.alarm_samples,
            p.alarm_interval_ms,
        ),
        tokio::time::sleep(Duration::from_secs(p.secs)),
    );
    let paced_reports = (acked(&fleets) - a0) as f64;
    let paced_cpu = cpu_json(meters, load, paced_reports);
    let paced_commits = commits.read(p.secs).await?;
    let (host_alarms, integrator_alarms) = alarms?;
    let (paced_latency, paced_rejected) = drain(fleets).await?;

    // Fan-out: GET DATA to `fanout` devices over the nodes, from one host at node 0.
    eprintln!("bench: cluster: fan-out phase");
    let per = p.fanout.div_ceil(p.nodes);
    let (fleets, _) = cluster
        .fleets(
            env,
            &dir,
            "F",
            per,
            &Work::Jobs {
                resend_after_ms: super::reports::PACED_RESEND_MS,
                finish: true,
            },
        )
        .await?;
    let host_id = HostId::parse("bench-host")?;
    let tls = Minter::load(&env.pki)?.client(Role::Host, host_id.as_str())?;
    let source = std::net::Ipv4Addr::new(127, 0, 0, 22);
    let mut host = Conn::open(host_at, source, Some(&tls), "bench-host:cluster").await?;
    host.subscribe(&[topic::host_resp(&host_id)]).await?;
    let before = sample(
        &scrape(cluster.metrics[0]).await?,
        "chukei_jobs{status=\"succeeded\"}",
    );
    let n = per * p.nodes;
    let t0 = Instant::now();
    let submitted = submit_all(&mut host, &host_id, n, &|i| {
        serial_of(&format!("F{}", i / per), i % per)
    })
    .await?;
    let submit_secs = t0.elapsed();
    let done = until(
        cluster.metrics[0],
        "every job succeeded",
        Duration::from_secs(600),
        |m| sample(m, "chukei_jobs{status=\"succeeded\"}") >= before + u64::from(n),
    )
    .await;
    let fanout_secs = t0.elapsed();
    host.close().await;
    // Each job's order, from its commit at node 0 to its device: on node 0, and on the others.
    let (mut same_node, mut other_nodes) = (Hist::default(), Hist::default());
    for (i, fleet) in fleets.into_iter().enumerate() {
        let f = fleet.exit().await?;
        if i == 0 {
            same_node.merge(&f.order);
        } else {
            other_nodes.merge(&f.order);
        }
    }
    let cluster_nodes = cluster.nodes.len();
    cluster.stop().await?;
    done?;

    Ok(json!({
        "nodes": cluster_nodes,
        "max": {
            "devices": p.max_devices_per_node * p.nodes,
            "acked_per_s": r2(max_reports / p.secs as f64),
            "ack_latency": max_latency.summary_ms(),
            "rejected": max_rejected,
            "cpu": max_cpu,
            "commits": max_commits,
        },
        "paced": {
            "devices": total,
            "all_connected_secs": r2(connected.as_secs_f64()),
            "offered_per_s": p.rate,
            "acked_per_s": r2(paced_reports / p.secs as f64),
            "ack_latency": paced_latency.summary_ms(),
            "rejected": paced_rejected,
            "cpu": paced_cpu,
            "commits": paced_commits,
            "alarm_node1_to_host_node0": host_alarms.summary_ms(),
            "alarm_node1_to_integrator_node0": integrator_alarms.summary_ms(),
        },
        "fanout": {
            "devices": n,
            "submitted": submitted.submitted,
            "rejected": submitted.rejected,
            "all_submitted_secs": r2(submit_secs.as_secs_f64()),
            "all_succeeded_secs": r2(fanout_secs.as_secs_f64()),
            "order_to_device_on_node0": same_node.summary_ms(),
            "order_to_device_on_other_nodes": other_nodes.summary_ms(),
        },
    }))
}
