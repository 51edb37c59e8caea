//! Helpers for the failure scenarios (`tests/tests/chaos.rs`, `tests/tests/disk_full.rs`): fleet
//! processes that can be killed and restarted on the same data directory, a seeded random
//! source that a failing run can be replayed with, reading fields out of the agents' log lines,
//! and a small tmpfs mount that is always unmounted.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::Duration;

use tokio::process::Command;

use crate::{Broker, Proc, TestEnv, bin, deadline};

/// A seeded random source (xorshift64*): the same seed gives the same kills at the same steps.
/// `CHUKEI_CHAOS_SEED` replays a run; otherwise the seed comes from the clock.
pub struct Rng(u64);

impl Rng {
    /// The seed of `CHUKEI_CHAOS_SEED` if set, else a fresh one. Print it: it is how a failing run
    /// is replayed.
    pub fn from_env() -> (Rng, u64) {
        let seed = std::env::var("CHUKEI_CHAOS_SEED")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0x5eed)
            });
        (Rng::new(seed), seed)
    }

    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A duration between `lo` and `hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

/// The value of `key=` in a tracing log line (`msg_id=7`, `serial=C1`), unquoted.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    let start = line.find(&needle)? + needle.len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// (serial, msg id) of every line with `message` in these logs.
pub fn ids_logged(logs: &[String], message: &str) -> BTreeSet<(String, u64)> {
    logs.iter()
        .flat_map(|log| log.lines())
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            let serial = field(l, "serial")?.to_owned();
            let id = field(l, "msg_id")?.parse().ok()?;
            Some((serial, id))
        })
        .collect()
}

/// (serial, msg id) of every ack an agent received, with the outcome it names.
pub fn acks_logged(logs: &[String]) -> BTreeSet<(String, u64, String)> {
    logs.iter()
        .flat_map(|log| log.lines())
        .filter(|l| l.contains("ack received"))
        .filter_map(|l| {
            let serial = field(l, "serial")?.to_owned();
            let id = field(l, "msg_id")?.parse().ok()?;
            let outcome = field(l, "outcome")?.to_owned();
            Some((serial, id, outcome))
        })
        .collect()
}

/// A `device-agent fleet` of `count` copiers `PREFIX-00000…` whose data directory is the same
/// for every start, so a fleet killed with SIGKILL and started again finds its outbox (the
/// harness's [`crate::Fleet`] gives each start a fresh one).
pub struct FleetSpec {
    pub prefix: String,
    pub count: usize,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    /// Starts so far, to name each one's log and ready file.
    pub starts: usize,
}

impl FleetSpec {
    /// Writes the fleet's config (`toml`) next to its data directory.
    pub fn new(env: &TestEnv, prefix: &str, count: usize, toml: &str) -> FleetSpec {
        let config = env.path(format!("fleet-{prefix}.toml"));
        std::fs::write(&config, toml)
            .unwrap_or_else(|e| panic!("could not write {}: {e}", config.display()));
        FleetSpec {
            prefix: prefix.to_owned(),
            count,
            data_dir: env.path(format!("fleet-{prefix}")),
            config,
            starts: 0,
        }
    }

    pub fn serial(&self, i: usize) -> String {
        format!("{}-{i:05}", self.prefix)
    }

    /// Starts the fleet; waits for its ready file (every copier connected) only if `wait`. A
    /// fleet restarted while the broker is down cannot connect, so the caller does not wait then.
    pub async fn start(&mut self, env: &TestEnv, broker_url: &str, wait: bool) -> Proc {
        self.start_on(env, &[broker_url.to_owned()], wait).await
    }

    /// [`FleetSpec::start`] with several relays (`--broker` each, most preferred first).
    pub async fn start_on(&mut self, env: &TestEnv, brokers: &[String], wait: bool) -> Proc {
        self.starts += 1;
        let n = self.starts;
        let ready = env.path(format!("fleet-{}-{n}.ready", self.prefix));
        let mut cmd = Command::new(bin("device-agent"));
        cmd.arg("fleet")
            .arg("--count")
            .arg(self.count.to_string())
            .arg("--pki-dir")
            .arg(env.pki().dir());
        for broker in brokers {
            cmd.arg("--broker").arg(broker);
        }
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--prefix")
            .arg(&self.prefix)
            .arg("--config")
            .arg(&self.config)
            .arg("--ready-file")
            .arg(&ready);
        let mut proc = Proc::spawn(
            format!("fleet {}#{n}", self.prefix),
            cmd,
            env.path(format!("fleet-{}-{n}.log", self.prefix)),
        );
        if wait {
            let within = deadline() + Duration::from_millis(50 * self.count as u64);
            proc.wait_for_ready_file(&ready, within).await;
        }
        proc
    }
}

/// `broker run` on `data_dir` at a fixed address, the way the chaos test restarts it; does not
/// wait for anything but the ready file.
pub async fn start_broker(
    env: &TestEnv,
    addr: Option<std::net::SocketAddr>,
    data_dir: &Path,
) -> Broker {
    let mut b = env.broker().data_dir(data_dir);
    if let Some(addr) = addr {
        b = b.listen(addr);
    }
    b.start().await
}

/// A tmpfs of `size` (`8m`) mounted at a fresh directory; unmounted when dropped, even when
/// the test fails. Needs root: [`Tmpfs::mount`] returns `Err` with the reason otherwise.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: PathBuf, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let out = StdCommand::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(OsString::from(format!("size={size}")))
            .arg("tmpfs")
            .arg(&dir)
            .output()
            .map_err(|e| format!("could not run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes an unprivileged writer may still use (`stat -f`).
    pub fn available(&self) -> u64 {
        let out = StdCommand::new("stat")
            .args(["-f", "--format=%a %S"])
            .arg(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("could not run stat -f: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut parts = text.split_whitespace().map(|p| p.parse::<u64>());
        match (parts.next(), parts.next()) {
            (Some(Ok(blocks)), Some(Ok(size))) => blocks * size,
            _ => panic!("stat -f printed {text:?}"),
        }
    }

    /// Writes a file of zeros until `leave` bytes (or less) remain available; returns its path.
    pub fn fill(&self, name: &str, leave: u64) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join(name);
        let mut file = std::fs::File::create(&path)
            .unwrap_or_else(|e| panic!("could not create {}: {e}", path.display()));
        let chunk = vec![0u8; 16 * 1024];
        while self.available() > leave {
            let want = (self.available() - leave).min(chunk.len() as u64) as usize;
            if let Err(e) = file
                .write_all(&chunk[..want])
                .and_then(|()| file.sync_data())
            {
                // Full already (the broker wrote meanwhile): as good.
                eprintln!("filler stopped: {e}");
                break;
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process that still has a file open there (a broker being killed) does not
        // keep the mount busy.
        let _ = StdCommand::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_from_log_lines() {
        let line = "2026-11-26T12:00:00.1Z  INFO device_agent::agent: ack received serial=F0-00001 msg_id=17 outcome=stored";
        assert_eq!(field(line, "serial"), Some("F0-00001"));
        assert_eq!(field(line, "msg_id"), Some("17"));
        assert_eq!(field(line, "outcome"), Some("stored"));
        assert_eq!(field(line, "job"), None);
        let acks = acks_logged(&[line.to_owned()]);
        assert!(acks.contains(&("F0-00001".into(), 17, "stored".into())));
    }

    #[test]
    fn the_same_seed_gives_the_same_choices() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let xs: Vec<u64> = (0..8).map(|_| a.below(10)).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.below(10)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 10));
    }
}
