//! The benchmark's scenarios (their figures: `bench/RESULTS.md`). Each runs against every target it
//! applies to, one after the other (each relay gets the machine to itself), and returns one JSON
//! object.

pub mod alarm;
pub mod cluster;
pub mod fanout;
pub mod idle;
pub mod pubsub;
pub mod reports;
pub mod rollout;
pub mod storm;
pub mod tree;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Map, Value, json};

use crate::fleet::LoadShape;
use crate::procfs;
use crate::servers::{self, Kind, Target};

/// The working directory of one invocation: the CA and one folder per target run.
pub struct Env {
    _temp: Option<tempfile::TempDir>,
    pub dir: PathBuf,
    pub pki: PathBuf,
    pub shape: LoadShape,
}

impl Env {
    /// Creates a CA in `dir` (or a temporary folder, removed at the end).
    pub fn new(dir: Option<&Path>, shape: LoadShape) -> anyhow::Result<Env> {
        let (temp, dir) = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.to_owned())
            }
            None => {
                let t = tempfile::Builder::new().prefix("chukei-bench-").tempdir()?;
                let d = t.path().to_owned();
                (Some(t), d)
            }
        };
        let pki = dir.join("pki");
        if !pki.join(pki::CA_CERT).exists() {
            pki::init(&pki, &[]).context("creating the benchmark CA")?;
        }
        Ok(Env {
            _temp: temp,
            dir,
            pki,
            shape,
        })
    }

    /// A fresh folder for one target in one scenario.
    pub fn run_dir(&self, scenario: &str, target: &Target) -> anyhow::Result<PathBuf> {
        let d = self.dir.join(scenario).join(&target.name);
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }
}

/// Assembles the one JSON object a scenario prints.
pub async fn report(
    scenario: &str,
    params: Value,
    targets: &[Target],
    results: Map<String, Value>,
    ratios: Value,
    goal: &str,
    env: &Env,
) -> Value {
    let mut versions = Map::new();
    for t in targets {
        let mut v = servers::version_of(t).await;
        for (k, val) in &t.env {
            v.push_str(&format!(" ({k}={val})"));
        }
        for a in &t.args {
            v.push_str(&format!(" ({a})"));
        }
        versions.insert(t.name.clone(), Value::String(v));
    }
    json!({
        "scenario": scenario,
        "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "params": params,
        "machine": procfs::machine(),
        // Other work on the machine skews every figure: the 1, 5 and 15 minute load averages.
        "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "load": {
            "devices_per_process": env.shape.per_process,
            "connects_in_flight": env.shape.concurrency,
            "source_addresses": env.shape.sources,
        },
        "versions": versions,
        "results": results,
        "ratios": ratios,
        "goal": goal,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    })
}

/// `a / b` of a numeric field in two targets' results, when both exist.
pub fn ratio(results: &Map<String, Value>, field: &str, a: &str, b: &str) -> Value {
    let get = |t: &str| {
        results
            .get(t)
            .and_then(|r| r.get(field))
            .and_then(Value::as_f64)
    };
    match (get(a), get(b)) {
        (Some(x), Some(y)) if y > 0.0 => json!(procfs::r2(x / y)),
        _ => Value::Null,
    }
}

/// Ratios of every chukei build against each other target, for `field`.
pub fn ratios(results: &Map<String, Value>, targets: &[Target], field: &str) -> Value {
    let mut out = Map::new();
    for c in targets.iter().filter(|t| t.kind == Kind::Chukei) {
        for o in targets.iter().filter(|t| t.name != c.name) {
            out.insert(
                format!("{}/{}", c.name, o.name),
                ratio(results, field, &c.name, &o.name),
            );
        }
    }
    Value::Object(out)
}

/// Lets a relay settle (buffers freed, timers run) before a memory reading.
pub async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Keeps only the chukei targets: scenarios that need chukei's acks and views.
pub fn chukei_only(targets: &[Target]) -> Vec<Target> {
    targets
        .iter()
        .filter(|t| t.kind == Kind::Chukei)
        .cloned()
        .collect()
}

pub fn mib(kib: u64) -> f64 {
    procfs::r2(kib as f64 / 1024.0)
}
