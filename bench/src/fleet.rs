//! The orchestrator's side of the load processes: start them, steer them, add up what they say.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Mutex, watch};

use crate::client::Endpoint;
use crate::hist::Histogram;
use crate::worker::{Final, Line, Status, Work, WorkerSpec};

/// Devices per load process unless `--per-process` says otherwise: a socket each, and room left
/// for the process's own files under the 20,000 it may hold.
pub const DEFAULT_PER_PROCESS: u32 = 19_000;

/// How the load is spread.
#[derive(Debug, Clone)]
pub struct LoadShape {
    /// Devices per load process: under the 20,000 open files a process may have. As many as fit:
    /// each process costs CPU of its own (its runtime, its timers), and with three times as many
    /// processes the load took two fifths more CPU per report from the machine it shares with the
    /// relays (bench/RESULTS.md, "Fewer load processes").
    pub per_process: u32,
    /// Connection attempts in flight, over all load processes.
    pub concurrency: usize,
    /// Loopback source addresses.
    pub sources: u8,
}

impl Default for LoadShape {
    fn default() -> Self {
        LoadShape {
            per_process: DEFAULT_PER_PROCESS,
            concurrency: 600,
            sources: 8,
        }
    }
}

pub struct Fleet {
    procs: Vec<(Child, ChildStdin)>,
    statuses: watch::Receiver<Vec<Status>>,
    finals: Arc<Mutex<Vec<Final>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Starts enough load processes for `count` devices named `{prefix}{i:06}` from 0, and
    /// waits until each has minted its certificates.
    pub async fn start(
        endpoint: Endpoint,
        pki_dir: &Path,
        log_dir: &Path,
        prefix: &str,
        count: u32,
        work: Work,
        shape: &LoadShape,
    ) -> anyhow::Result<Fleet> {
        let nproc = count.div_ceil(shape.per_process.max(1)).max(1);
        let per = count.div_ceil(nproc);
        let sources: Vec<Ipv4Addr> = (0..shape.sources.max(1))
            .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i))
            .collect();
        let (tx, statuses) = watch::channel(vec![Status::default(); nproc as usize]);
        let tx = Arc::new(tx);
        let finals = Arc::new(Mutex::new(Vec::new()));
        let mut procs = Vec::new();
        let mut readers = Vec::new();
        let exe = std::env::current_exe().context("finding the bench binary")?;
        for index in 0..nproc {
            let first = index * per;
            let n = per.min(count.saturating_sub(first));
            let spec = WorkerSpec {
                index: index as usize,
                endpoint,
                pki_dir: pki_dir.to_owned(),
                prefix: prefix.to_owned(),
                first,
                count: n,
                sources: sources.clone(),
                concurrency: (shape.concurrency / nproc as usize).max(1),
                groups: 16,
                work: work.clone(),
            };
            let log = std::fs::File::create(log_dir.join(format!("load-{prefix}-{index}.log")))?;
            let mut child = Command::new(&exe)
                .arg("load")
                .arg("--spec")
                .arg(serde_json::to_string(&spec)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("starting a load process")?;
            let stdin = child.stdin.take().context("load process stdin")?;
            let stdout = child.stdout.take().context("load process stdout")?;
            let (tx, finals) = (tx.clone(), finals.clone());
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Line>(&line) {
                        Ok(Line::Status(s)) => {
                            let i = s.index;
                            tx.send_modify(|v| {
                                if let Some(slot) = v.get_mut(i) {
                                    *slot = *s;
                                }
                            });
                        }
                        Ok(Line::Final(f)) => finals.lock().await.push(*f),
                        Err(_) => {}
                    }
                }
            }));
            procs.push((child, stdin));
        }
        let fleet = Fleet {
            procs,
            statuses,
            finals,
            readers,
        };
        fleet
            .wait_until(
                "load processes ready",
                Duration::from_secs(300),
                |_, all| all.iter().all(|s| s.ready),
            )
            .await?;
        Ok(fleet)
    }

    /// The load processes' pids, to meter what the load itself costs the machine.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(|(c, _)| c.id()).collect()
    }

    /// Sends a word (`connect`, `run`, `finish`, `verify`, `exit`) to every load process.
    pub async fn command(&mut self, word: &str) -> anyhow::Result<()> {
        for (_, stdin) in &mut self.procs {
            stdin.write_all(format!("{word}\n").as_bytes()).await?;
            stdin.flush().await?;
        }
        Ok(())
    }

    /// The sum over all load processes (latest report of each).
    pub fn total(&self) -> Status {
        sum(&self.statuses.borrow())
    }

    /// Waits until `pred(total, each)` holds; errors after `limit` with the last totals.
    pub async fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Status, &[Status]) -> bool,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut rx = self.statuses.clone();
        loop {
            {
                let all = rx.borrow_and_update();
                if pred(&sum(&all), &all) {
                    return Ok(started.elapsed());
                }
            }
            let left = limit.saturating_sub(started.elapsed());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                bail!(
                    "{what}: not reached within {limit:?}; load totals: {:?}",
                    self.total()
                );
            }
        }
    }

    /// Tells every load process to exit; returns their merged final counters and histograms.
    pub async fn exit(mut self) -> anyhow::Result<Final> {
        self.command("exit").await?;
        for (child, _) in &mut self.procs {
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.await;
        }
        let finals = self.finals.lock().await;
        let mut merged = Final::default();
        let statuses: Vec<Status> = finals.iter().map(|f| f.status.clone()).collect();
        merged.status = sum(&statuses);
        for f in finals.iter() {
            merged.connect.merge(&f.connect);
            merged.latency.merge(&f.latency);
            merged.order.merge(&f.order);
        }
        Ok(merged)
    }
}

/// Adds up statuses: counters add, timestamps take the latest, errors are pooled.
pub fn sum(all: &[Status]) -> Status {
    let mut t = Status {
        ready: !all.is_empty(),
        ..Status::default()
    };
    for s in all {
        t.ready &= s.ready;
        t.subscribed += s.subscribed;
        t.connects += s.connects;
        t.resumed += s.resumed;
        t.session_present += s.session_present;
        t.connect_failures += s.connect_failures;
        t.disconnects += s.disconnects;
        t.last_subscribed_us = t.last_subscribed_us.max(s.last_subscribed_us);
        t.sent += s.sent;
        t.resent += s.resent;
        t.stored += s.stored;
        t.duplicate += s.duplicate;
        t.rejected += s.rejected;
        t.unknown_acks += s.unknown_acks;
        t.outstanding += s.outstanding;
        t.verify_sent += s.verify_sent;
        t.verify_stored += s.verify_stored;
        t.verify_duplicate += s.verify_duplicate;
        t.verify_outstanding += s.verify_outstanding;
        t.received += s.received;
        t.jobs_received += s.jobs_received;
        t.jobs_acked += s.jobs_acked;
        t.last_job_received_us = t.last_job_received_us.max(s.last_job_received_us);
        t.last_job_acked_us = t.last_job_acked_us.max(s.last_job_acked_us);
        t.last_acked_us = t.last_acked_us.max(s.last_acked_us);
        for e in &s.errors {
            if t.errors.len() < 5 && !t.errors.contains(e) {
                t.errors.push(e.clone());
            }
        }
    }
    t
}

/// Histogram helper re-exported for scenarios that time things in the orchestrator itself.
pub type Hist = Histogram;
