//! The relays under test, each its own process on loopback: chukei's `broker`, bare rumqttd
//! (`bench-rumqttd`, its TLS or its plain listener) and Mosquitto with a generated config.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::client::Endpoint;
use crate::procfs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Chukei,
    RumqttdTls,
    RumqttdPlain,
    Mosquitto,
}

/// A relay to measure: a kind, and for chukei the binary (so an older build can run beside).
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub kind: Kind,
    pub binary: PathBuf,
    /// Extra environment for the relay process (`--env NAME:KEY=VALUE`), e.g. LD_PRELOAD to try
    /// another allocator without a rebuild.
    pub env: Vec<(String, String)>,
    /// Extra arguments for a chukei relay's `broker run` (`--arg NAME:ARG`), e.g.
    /// `--tls-tickets=false` to measure without session resumption beside the default.
    pub args: Vec<String>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Target {
    pub fn tls(&self) -> bool {
        self.kind != Kind::RumqttdPlain
    }
}

/// Where the binaries are: next to `bench` in the target directory, and Mosquitto from Debian.
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

pub fn mosquitto_binary() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("mosquitto")
}

/// Parses `chukei,rumqttd-tls,…`; `chukei@NAME=PATH` adds another chukei build under NAME.
pub fn parse_targets(list: &[String]) -> anyhow::Result<Vec<Target>> {
    let mut out = Vec::new();
    for item in list {
        let t = match item.as_str() {
            "chukei" => Target {
                name: "chukei".into(),
                kind: Kind::Chukei,
                binary: sibling("broker"),
                env: Vec::new(),
                args: Vec::new(),
            },
            "rumqttd-tls" => Target {
                name: item.clone(),
                kind: Kind::RumqttdTls,
                binary: sibling("bench-rumqttd"),
                env: Vec::new(),
                args: Vec::new(),
            },
            "rumqttd-plain" => Target {
                name: item.clone(),
                kind: Kind::RumqttdPlain,
                binary: sibling("bench-rumqttd"),
                env: Vec::new(),
                args: Vec::new(),
            },
            "mosquitto" => Target {
                name: item.clone(),
                kind: Kind::Mosquitto,
                binary: mosquitto_binary(),
                env: Vec::new(),
                args: Vec::new(),
            },
            other => match other
                .strip_prefix("chukei@")
                .and_then(|r| r.split_once('='))
            {
                Some((name, path)) => Target {
                    name: name.to_owned(),
                    kind: Kind::Chukei,
                    binary: PathBuf::from(path),
                    env: Vec::new(),
                    args: Vec::new(),
                },
                None => bail!(
                    "unknown target {other:?}: use chukei, rumqttd-tls, rumqttd-plain, mosquitto or chukei@NAME=PATH"
                ),
            },
        };
        out.push(t);
    }
    Ok(out)
}

/// Applies `NAME:KEY=VALUE` settings to the targets they name.
pub fn apply_env(targets: &mut [Target], settings: &[String]) -> anyhow::Result<()> {
    for s in settings {
        let Some((name, kv)) = s.split_once(':') else {
            bail!("--env {s:?}: use NAME:KEY=VALUE");
        };
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env {s:?}: use NAME:KEY=VALUE");
        };
        let Some(t) = targets.iter_mut().find(|t| t.name == name) else {
            bail!("--env {s:?}: no target named {name:?}");
        };
        t.env.push((k.to_owned(), v.to_owned()));
    }
    Ok(())
}

/// Applies `NAME:ARG` extra `broker run` arguments to the chukei targets they name.
pub fn apply_args(targets: &mut [Target], args: &[String]) -> anyhow::Result<()> {
    for a in args {
        let Some((name, arg)) = a.split_once(':') else {
            bail!("--arg {a:?}: use NAME:ARG, e.g. no-tickets:--tls-tickets=false");
        };
        let Some(t) = targets.iter_mut().find(|t| t.name == name) else {
            bail!("--arg {a:?}: no target named {name:?}");
        };
        if t.kind != Kind::Chukei {
            bail!("--arg {a:?}: only a chukei target takes broker arguments");
        }
        t.args.push(arg.to_owned());
    }
    Ok(())
}

/// The version string of each target's software, for the JSON.
pub async fn version_of(target: &Target) -> String {
    match target.kind {
        Kind::Chukei => {
            let out = Command::new(&target.binary).arg("--version").output().await;
            out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|e| format!("unknown ({e})"))
        }
        Kind::RumqttdTls | Kind::RumqttdPlain => {
            format!("rumqttd {}", env!("BENCH_RUMQTTD_VERSION"))
        }
        Kind::Mosquitto => {
            let out = Command::new(&target.binary).arg("-h").output().await;
            out.ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "unknown".into())
        }
    }
}

/// The most clients `broker run` accepts in its configuration: the rest of the process's 20,000
/// files is kept for handshakes in flight (800 in the benchmark) and the store.
pub const CHUKEI_MAX_CLIENTS: usize = 19_000;

/// A running relay.
pub struct Server {
    pub target: Target,
    child: Option<Child>,
    pub endpoint: Endpoint,
    dir: PathBuf,
    pki_dir: PathBuf,
    max_clients: usize,
    starts: u32,
}

/// Picks a free loopback port (the relay binds it right after; the race is harmless here).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    /// Starts `target` in `dir` (its data, config and log) with room for `max_clients`.
    pub async fn start(
        target: &Target,
        dir: &Path,
        pki_dir: &Path,
        max_clients: usize,
    ) -> anyhow::Result<Server> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut server = Server {
            target: target.clone(),
            child: None,
            endpoint: Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                tls: target.tls(),
            },
            dir: dir.to_owned(),
            pki_dir: pki_dir.to_owned(),
            max_clients,
            starts: 0,
        };
        server.spawn().await?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).unwrap_or(0)
    }

    pub fn rss_kib(&self) -> u64 {
        procfs::rss_kib(self.pid())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.target.name))
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let addr = self.endpoint.addr;
        let ready = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(&self.target.binary);
        match self.target.kind {
            Kind::Chukei => {
                cmd.arg("run")
                    .arg("--pki-dir")
                    .arg(&self.pki_dir)
                    .arg("--data-dir")
                    .arg(self.dir.join("data"))
                    .arg("--listen")
                    .arg(addr.to_string())
                    .arg("--ready-file")
                    .arg(&ready)
                    .arg("--max-clients")
                    .arg(self.max_clients.min(CHUKEI_MAX_CLIENTS).to_string())
                    // 19,000 clients leave room for 800 handshakes in the 19,800 files the
                    // relay spends on connections.
                    .arg("--max-handshakes")
                    .arg("800")
                    // job-fanout's host keeps up to 2,000 submissions in flight, more than a
                    // host's default window of 100.
                    .arg("--max-inflight")
                    .arg("4096")
                    .args(&self.target.args);
                // The broker's own default log filter is part of what we measure; BENCH_RUST_LOG
                // changes it on purpose.
                match std::env::var_os("BENCH_RUST_LOG") {
                    Some(f) => cmd.env("RUST_LOG", f),
                    None => cmd.env_remove("RUST_LOG"),
                };
            }
            Kind::RumqttdTls | Kind::RumqttdPlain => {
                cmd.arg("--listen")
                    .arg(addr.to_string())
                    .arg("--max-connections")
                    .arg(self.max_clients.to_string());
                if self.target.kind == Kind::RumqttdTls {
                    cmd.arg("--pki-dir").arg(&self.pki_dir);
                }
            }
            Kind::Mosquitto => {
                let conf = self.dir.join("mosquitto.conf");
                std::fs::write(&conf, mosquitto_conf(addr.port(), &self.pki_dir))?;
                cmd.arg("-c").arg(&conf);
            }
        }
        for (k, v) in &self.target.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {} ({})",
                self.target,
                self.target.binary.display()
            )
        })?;
        self.child = Some(child);
        self.wait_ready(&ready).await
    }

    /// Waits until the relay accepts connections: chukei writes its ready file (after republishing
    /// everything retained); the others are probed with a TCP connect.
    async fn wait_ready(&mut self, ready: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited at startup ({status}); see {}",
                    self.target,
                    self.log_path().display()
                );
            }
            let up = match self.target.kind {
                Kind::Chukei => ready.exists(),
                _ => tokio::net::TcpStream::connect(self.endpoint.addr)
                    .await
                    .is_ok(),
            };
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready within 60 s; see {}",
                    self.target,
                    self.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL after 15 s. Returns how long it took to exit.
    pub async fn stop(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        if let Some(pid) = child.id() {
            // SAFETY: kill has no memory preconditions; pid is our own child, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .is_err()
        {
            child.kill().await?;
        }
        Ok(started.elapsed())
    }

    /// Stops and starts again on the same port (chukei keeps its data directory).
    pub async fn restart(&mut self) -> anyhow::Result<(Duration, Duration)> {
        let down = self.stop().await?;
        let started = Instant::now();
        self.spawn().await?;
        Ok((down, started.elapsed()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Some(pid) = child.id()
        {
            // SAFETY: as in `stop`. kill_on_drop then reaps it.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Mosquitto as a user would set it up for mTLS: our CA, a client certificate required, the
/// certificate's CN as the user name. TCP_NODELAY is on (off by default) so that Nagle's delays
/// do not count against it; no persistence, since nothing here needs it.
fn mosquitto_conf(port: u16, pki: &Path) -> String {
    let p = |f: &str| pki.join(f).display().to_string();
    format!(
        "per_listener_settings false\n\
         persistence false\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         max_keepalive 65535\n\
         set_tcp_nodelay true\n\
         user root\n\
         listener {port} 127.0.0.1\n\
         max_connections -1\n\
         cafile {}\n\
         certfile {}\n\
         keyfile {}\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         allow_anonymous false\n",
        p(pki::CA_CERT),
        p(pki::SERVER_CERT),
        p(pki::SERVER_KEY),
    )
}
