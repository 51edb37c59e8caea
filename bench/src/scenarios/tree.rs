//! Scenario: child and parent relays. A parent relay, C child relays (each its own process, under
//! the 20,000-file cap) and D devices behind each child in load processes; a host at the parent.
//! Measures: time until every device is connected and the parent sees it online, the children's
//! memory per device, a GET DATA to every device submitted at the parent until the parent has
//! every job `succeeded`, and how many upstream messages (batches) carried the devices' answers.
//! Beside it, in the same run, a flat relay with D devices on the same workload.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use protocol::{HostId, Role, topic};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fanout::submit_all;
use super::{Env, chukei_only, report};
use crate::client::Conn;
use crate::fleet::Fleet;
use crate::procfs::r2;
use crate::servers::{CHUKEI_MAX_CLIENTS, Server, Target, free_port};
use crate::tls::Minter;
use crate::worker::{Work, serial_of};

pub async fn run(
    env: &Env,
    targets: &[Target],
    children: u32,
    per_child: u32,
) -> anyhow::Result<Value> {
    let targets = chukei_only(targets);
    let mut results = Map::new();
    for target in &targets {
        eprintln!("bench: tree: {target}, flat relay with {per_child} devices");
        results.insert(
            format!("{}-flat", target.name),
            one(env, target, 0, per_child).await?,
        );
        eprintln!(
            "bench: tree: {target}, {children} children × {per_child} devices behind one parent"
        );
        results.insert(
            format!("{}-tree", target.name),
            one(env, target, children, per_child).await?,
        );
    }
    Ok(report(
        "tree",
        json!({ "children": children, "devices_per_child": per_child, "job": "get-data counters, answered succeeded" }),
        &targets,
        results,
        Value::Null,
        "95,000 devices behind 5 children: GET DATA to all succeeded at the parent ≤ 120 s; memory per device at a child ≤ 12 KiB; ≤ 0.05 upstream messages per device message",
        env,
    )
    .await)
}

/// `GET /metrics` on `addr`, as text.
pub(super) async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tcp.read_to_string(&mut body).await?;
    Ok(body)
}

/// The value of the first sample named `name` (labels included, e.g. `chukei_jobs{status="succeeded"}`).
pub(super) fn sample(text: &str, name: &str) -> u64 {
    sample_f64(text, name) as u64
}

/// [`sample`] for a value that is not a count (a sum of seconds); 0 when absent.
pub(super) fn sample_f64(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Polls the relay's metrics at `addr` until `ok`, at most `within`; the time it took.
pub(super) async fn until(
    addr: SocketAddr,
    what: &str,
    within: Duration,
    ok: impl Fn(&str) -> bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let m = scrape(addr).await?;
        if ok(&m) {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(super) fn with_args(target: &Target, args: &[String]) -> Target {
    let mut t = target.clone();
    t.args.extend(args.iter().cloned());
    t
}

/// A parent (or one flat relay, `children` = 0) with `children` child relays `R0…`, each taking
/// `per_child` devices whose serials are `T{c}` and six digits.
struct Relays {
    top: Server,
    top_metrics: SocketAddr,
    childs: Vec<Server>,
}

fn prefix(c: u32) -> String {
    format!("T{c}")
}

impl Relays {
    async fn start(
        env: &Env,
        target: &Target,
        dir: &std::path::Path,
        children: u32,
        per_child: u32,
    ) -> anyhow::Result<Relays> {
        let config = dir.join("parent.toml");
        let entries: String = (0..children)
            .map(|c| {
                format!(
                    "[[relays]]\nid = \"R{c}\"\nserials = [\"{}??????\"]\n",
                    prefix(c)
                )
            })
            .collect();
        std::fs::write(&config, entries)?;
        let top_metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let top_target = with_args(
            target,
            &[
                "--config".into(),
                config.display().to_string(),
                "--metrics-listen".into(),
                top_metrics.to_string(),
            ],
        );
        let top_capacity = if children == 0 {
            per_child as usize + 100
        } else {
            100
        };
        let top = Server::start(&top_target, &dir.join("parent"), &env.pki, top_capacity).await?;
        let mut childs = Vec::new();
        for c in 0..children {
            pki::issue_relay_to_dir(&env.pki, &format!("R{c}"), &[])?;
            let t = with_args(
                target,
                &[
                    "--relay-id".into(),
                    format!("R{c}"),
                    "--parent".into(),
                    format!("mqtts://{}", top.endpoint.addr),
                    "--metrics-listen".into(),
                    format!("127.0.0.1:{}", free_port()?),
                ],
            );
            let child_dir = dir.join(format!("child{c}"));
            childs.push(Server::start(&t, &child_dir, &env.pki, per_child as usize + 100).await?);
        }
        Ok(Relays {
            top,
            top_metrics,
            childs,
        })
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        for c in &mut self.childs {
            c.stop().await?;
        }
        self.top.stop().await?;
        Ok(())
    }
}

/// Steady reports through the tree (`bench tree-reports`): `per_child` devices behind each child
/// each sending a counters report a second, for `secs`; how many upstream messages (batches)
/// carried them.
pub async fn reports(
    env: &Env,
    targets: &[Target],
    children: u32,
    per_child: u32,
    secs: u64,
) -> anyhow::Result<Value> {
    let targets = chukei_only(targets);
    let mut results = Map::new();
    for target in &targets {
        eprintln!("bench: tree-reports: {target}, {children} children × {per_child} devices");
        results.insert(
            target.name.clone(),
            steady(env, target, children, per_child, secs).await?,
        );
    }
    Ok(report(
        "tree-reports",
        json!({ "children": children, "devices_per_child": per_child, "report": "counters, once a second per device", "secs": secs }),
        &targets,
        results,
        Value::Null,
        "≤ 0.05 upstream messages per device report at 1,000 devices × 1 report/s",
        env,
    )
    .await)
}

async fn steady(
    env: &Env,
    target: &Target,
    children: u32,
    per_child: u32,
    secs: u64,
) -> anyhow::Result<Value> {
    let dir = env.run_dir("tree-reports", target)?;
    let relays = Relays::start(env, target, &dir, children, per_child).await?;
    let mut fleets = Vec::new();
    for (c, child) in relays.childs.iter().enumerate() {
        let fleet_dir = dir.join(format!("fleet{c}"));
        std::fs::create_dir_all(&fleet_dir)?;
        let mut fleet = Fleet::start(
            child.endpoint,
            &env.pki,
            &fleet_dir,
            &prefix(c as u32),
            per_child,
            Work::Reports {
                window: super::reports::PACED_WINDOW,
                rate_per_device: 1.0,
                resend_after_ms: super::reports::PACED_RESEND_MS,
                report: crate::worker::ReportKind::Counters,
            },
            &env.shape,
        )
        .await?;
        fleet.command("connect").await?;
        fleet
            .wait_until(
                "reporting devices connected",
                Duration::from_secs(600),
                |t, _| t.subscribed >= u64::from(per_child),
            )
            .await?;
        fleets.push(fleet);
    }
    for fleet in &mut fleets {
        fleet.command("run").await?;
    }
    // Past the first seconds (every device's first report at once), then the window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = scrape(relays.top_metrics).await?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let after = scrape(relays.top_metrics).await?;
    for fleet in &mut fleets {
        fleet.command("finish").await?;
    }
    for fleet in fleets {
        fleet.exit().await?;
    }
    relays.stop().await?;
    let delta = |name: &str| sample(&after, name).saturating_sub(sample(&before, name));
    let (batches, items) = (
        delta("chukei_relay_batches_total"),
        delta("chukei_relay_items_total"),
    );
    Ok(json!({
        "children": children,
        "reporting_devices": u64::from(per_child) * u64::from(children),
        "reports_per_s": r2(items as f64 / secs as f64),
        "upstream_batches": batches,
        "upstream_items": items,
        "upstream_messages_per_report": if items > 0 { (batches as f64 / items as f64 * 1e4).round() / 1e4 } else { 0.0 },
    }))
}

/// `children` = 0: one flat relay with `per_child` devices (fewer if the relay must keep room for
/// the host: it admits at most [`CHUKEI_MAX_CLIENTS`] clients).
async fn one(env: &Env, target: &Target, children: u32, per_child: u32) -> anyhow::Result<Value> {
    let per_child = if children == 0 {
        per_child.min(u32::try_from(CHUKEI_MAX_CLIENTS - 100)?)
    } else {
        per_child
    };
    let dir = env.run_dir(if children == 0 { "tree-flat" } else { "tree" }, target)?;
    let total = u64::from(per_child) * u64::from(children.max(1));
    let Relays {
        top,
        top_metrics,
        childs,
    } = Relays::start(env, target, &dir, children, per_child).await?;
    // Memory before any device: what each device adds is measured against it.
    let relays_rss = |top: &Server, childs: &[Server]| -> Vec<u64> {
        if childs.is_empty() {
            vec![top.rss_kib()]
        } else {
            childs.iter().map(Server::rss_kib).collect()
        }
    };
    let rss_before = relays_rss(&top, &childs);
    // The devices: behind each child, or on the flat relay.
    let mut fleets = Vec::new();
    let started = Instant::now();
    for c in 0..children.max(1) {
        let endpoint = childs.get(c as usize).map_or(top.endpoint, |s| s.endpoint);
        let fleet_dir = dir.join(format!("fleet{c}"));
        std::fs::create_dir_all(&fleet_dir)?;
        let mut fleet = Fleet::start(
            endpoint,
            &env.pki,
            &fleet_dir,
            &prefix(c),
            per_child,
            Work::Jobs {
                resend_after_ms: super::reports::PACED_RESEND_MS,
                finish: true,
            },
            &env.shape,
        )
        .await?;
        fleet.command("connect").await?;
        fleets.push(fleet);
    }
    let n = u64::from(per_child);
    for fleet in &fleets {
        fleet
            .wait_until("devices connected", Duration::from_secs(900), |t, _| {
                t.subscribed >= n
            })
            .await?;
    }
    let connected = started.elapsed();
    let online = until(
        top_metrics,
        "every device online at the top",
        Duration::from_secs(300),
        |m| sample(m, "chukei_devices_online") >= total,
    )
    .await?;
    let rss_after = relays_rss(&top, &childs);
    let grown: u64 = rss_after
        .iter()
        .zip(&rss_before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    let kib_per_device = grown as f64 / rss_after.len() as f64 / f64::from(per_child);

    // A GET DATA to every device, submitted at the top, until all succeeded there.
    let before = scrape(top_metrics).await?;
    let host_id = HostId::parse("bench-host")?;
    let tls = Minter::load(&env.pki)?.client(Role::Host, host_id.as_str())?;
    let source = std::net::Ipv4Addr::new(127, 0, 0, 21);
    let mut host = Conn::open(top.endpoint, source, Some(&tls), "bench-host:tree").await?;
    host.subscribe(&[topic::host_resp(&host_id)]).await?;
    let t0 = Instant::now();
    let per = per_child;
    let submitted = submit_all(&mut host, &host_id, u32::try_from(total)?, &|i| {
        serial_of(&prefix(i / per), i % per)
    })
    .await?;
    let submit_secs = t0.elapsed();
    let done = until(
        top_metrics,
        "every job succeeded at the top",
        Duration::from_secs(900),
        |m| sample(m, "chukei_jobs{status=\"succeeded\"}") >= total,
    )
    .await;
    let all_succeeded = t0.elapsed();
    let after = scrape(top_metrics).await?;
    host.close().await;
    for fleet in fleets {
        fleet.exit().await?;
    }
    Relays {
        top,
        top_metrics,
        childs,
    }
    .stop()
    .await?;
    done?;
    let delta = |name: &str| sample(&after, name).saturating_sub(sample(&before, name));
    let (batches, items) = (
        delta("chukei_relay_batches_total"),
        delta("chukei_relay_items_total"),
    );
    Ok(json!({
        "children": children,
        "devices": total,
        "all_connected_secs": r2(connected.as_secs_f64()),
        "all_online_at_top_secs": r2((connected + online).as_secs_f64()),
        "relay_kib_per_device": r2(kib_per_device),
        "get_data_all_submitted_secs": r2(submit_secs.as_secs_f64()),
        "get_data_all_succeeded_secs": r2(all_succeeded.as_secs_f64()),
        "submitted": submitted.submitted,
        "rejected": submitted.rejected,
        "upstream_batches": batches,
        "upstream_items": items,
        "upstream_messages_per_item": if items > 0 { (batches as f64 / items as f64 * 1e4).round() / 1e4 } else { 0.0 },
    }))
}
