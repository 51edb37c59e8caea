//! The end-to-end harness: every scenario starts the real `broker`, `device-agent` and
//! `host-agent` binaries in a fresh temporary directory, on ephemeral ports, and waits for what it
//! expects under a deadline.
//!
//! The shape follows ripgrep's `tests/util.rs` (a directory per test, commands that read like the
//! user's own, failures that show everything) and linkerd2-proxy's integration harness (listeners
//! on `127.0.0.1:0`, bound addresses read back from each process, patience tunable for slow CI).
//!
//! ```no_run
//! # async fn f() {
//! use harness::{TestEnv, deadline};
//! let env = TestEnv::new("get_data_round_trip");
//! let broker = env.broker().start().await;
//! let _c1 = env.device("C1").start(&broker).await;
//! let host = env.host("svc", &broker);
//! let job = host.submit_get_data("C1").await;
//! host.wait_for_status(&job, "succeeded", deadline()).await;
//! # }
//! ```
//!
//! What the helpers guarantee, so that scenarios need not:
//! - Children start with `kill_on_drop(true)`. Their stdout and stderr are captured line by line,
//!   kept in memory for [`Proc::wait_for_log`] and written to `<name>.log` in the test directory.
//! - Waiting is on events (a log line, an MQTT message) under `tokio::time::timeout`. The only
//!   polling is [`poll_until`], for ready files and `jobs show`, which have no event to wait on.
//! - When a test panics, each live child prints the tail of its log and the test directory is
//!   kept (its path is printed), so a failure can be read after the fact.
//!
//! The binaries are not built by `cargo test`: run `cargo build --workspace --bins` first, or
//! `scripts/test`, which does both.

mod broker;
pub mod browser;
pub mod chaos;
mod device;
mod host;
pub mod mqtt;
pub mod nats;
pub mod netns;
pub mod postgres;
mod process;
pub mod raw;
pub mod tinyproxy;

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use protocol::Role;

pub use broker::{Broker, BrokerBuilder};
pub use device::{Device, DeviceBuilder, Fleet, FleetBuilder};
pub use host::{ENDS, Host, PublisherKeys, RunOutput};
pub use mqtt::{MqttBuilder, MqttClient};
pub use process::Proc;

/// The columns of the job list in the seed's Fig. 9, as keys of `jobs show --json`, `jobs list
/// --json` and the JSON mirror.
pub const FIG9_KEYS: [&str; 10] = [
    "id",
    "serial",
    "site",
    "instruction",
    "data_type",
    "server",
    "host",
    "instruction_time",
    "execution_time",
    "status",
];

/// The factor every deadline is multiplied by: `CHUKEI_TEST_PATIENCE` (default 1). A slow or
/// loaded CI machine sets it to 3 rather than anyone editing timeouts in the tests.
pub fn patience() -> f64 {
    std::env::var("CHUKEI_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f > 0.0)
        .unwrap_or(1.0)
}

/// `n` seconds, times [`patience`].
pub fn secs(n: u64) -> Duration {
    Duration::from_secs_f64(n as f64 * patience())
}

/// The default deadline for anything a test waits for: generous, because a deadline that passes
/// means a failure, never a retry.
pub fn deadline() -> Duration {
    secs(30)
}

/// Where the workspace's binaries are. The test executable itself lives in `<target>/debug/deps`,
/// so its grandparent is the most faithful answer; `CARGO_TARGET_DIR` and `<workspace>/target` are
/// the fallbacks for runners that copy test executables elsewhere.
fn bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(deps) = exe
            .parent()
            .filter(|d| d.file_name() == Some(OsStr::new("deps")))
        && let Some(profile) = deps.parent()
    {
        dirs.push(profile.to_owned());
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(target).join("debug"));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    dirs
}

/// The path of one of the workspace's binaries (`broker`, `device-agent`, `host-agent`).
pub fn bin(name: &str) -> PathBuf {
    let dirs = bin_dirs();
    for dir in &dirs {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "binary `{name}` not found in any of {dirs:?}: run `cargo build --workspace --bins` first \
         (or `scripts/test`, which builds and then tests)"
    );
}

/// Runs `broker ARGS…` to its end (`pki`, `db migrate`, `backup`…); returns (success, stdout,
/// stderr).
pub async fn broker_cmd(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin("broker"))
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("could not run `broker {}`: {e}", args.join(" ")));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Checks `check` until it returns `Ok`, or fails once `within` has passed. `Err(text)` from
/// `check` says what was last seen; the final error quotes it.
///
/// This is the harness's one polling loop. It exists for the two things that offer no event to
/// wait on: a ready file appearing, and a job's state as `jobs show` reports it.
pub async fn poll_until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        let last = match check().await {
            Ok(v) => return Ok(v),
            Err(last) => last,
        };
        if start.elapsed() >= within {
            return Err(format!(
                "{what}: not seen within {within:?}; last seen: {last}"
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// `len` bytes that look random and are the same for the same `seed`: firmware images for
/// tests (xorshift64*, so no dependency and no two tests sharing bytes by accident).
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The timestamp that starts each line of the binaries' logs (tracing's default format,
/// RFC 3339 in UTC), or `None` for a line without one (the harness's own notes). Both agents
/// and the broker run on this machine's clock, so times from different logs compare.
pub fn log_time(line: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let first = line.split_whitespace().next()?;
    chrono::DateTime::parse_from_rfc3339(first)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// A certificate, its key and the CA that the holder trusts, as files.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA directory made by `broker pki init`, issuing certificates with `broker pki issue`. The
/// harness drives the real commands so that they are tested by every scenario.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn init(dir: PathBuf, sans: &[String]) -> Pki {
        let mut cmd = Command::new(bin("broker"));
        cmd.arg("pki").arg("init").arg("--dir").arg(&dir);
        for san in sans {
            cmd.arg("--san").arg(san);
        }
        run_sync(&mut cmd);
        Pki { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (`ca.pem`).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The certificate for `role`/`id`, issued on first use.
    pub fn issue(&self, role: Role, id: &str) -> CertPaths {
        let cert = self.dir.join(role.as_str()).join(format!("{id}.pem"));
        let key = self.dir.join(role.as_str()).join(format!("{id}.key"));
        if !cert.is_file() || !key.is_file() {
            run_sync(
                Command::new(bin("broker"))
                    .args(["pki", "issue", "--dir"])
                    .arg(&self.dir)
                    .args(["--role", role.as_str(), "--id", id]),
            );
        }
        assert!(
            cert.is_file(),
            "`broker pki issue` did not write {}",
            cert.display()
        );
        assert!(
            key.is_file(),
            "`broker pki issue` did not write {}",
            key.display()
        );
        CertPaths {
            ca: self.ca(),
            cert,
            key,
        }
    }
}

/// Runs a short command to completion; panics with everything it printed if it fails.
/// Runs `broker ARGS…` to its end — a `pki` or `reload` command, or a `broker run` expected to
/// refuse to start — and returns what it printed; the caller judges the exit status.
pub fn broker_command<I, S>(args: I) -> RunOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(bin("broker"));
    cmd.args(args).env("NO_COLOR", "1");
    let command = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {command}: {e}"));
    RunOutput {
        command,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// [`broker_command`] that must succeed; returns its stdout.
pub fn broker_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = broker_command(args);
    assert!(out.success(), "{out}");
    out.stdout
}

fn run_sync(cmd: &mut Command) -> std::process::Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("could not run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({})\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One test's world: a temporary directory holding a CA (made by `broker pki init`), the
/// certificates issued so far, each process's data directory, ready file and log.
pub struct TestEnv {
    name: String,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    pki: Pki,
    started: AtomicUsize,
}

impl TestEnv {
    /// `name` is the test's name; it prefixes the temporary directory so a kept one is findable.
    pub fn new(name: &str) -> TestEnv {
        TestEnv::with_sans(name, &[])
    }

    /// Like [`TestEnv::new`], with more names in the relay's server certificate: the addresses
    /// a relay in a network namespace is reached by.
    pub fn with_sans(name: &str, sans: &[String]) -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix(&format!("chukei-{name}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("could not create a temporary directory: {e}"));
        let root = dir.path().to_owned();
        let pki = Pki::init(root.join("pki"), sans);
        TestEnv {
            name: name.to_owned(),
            dir: Some(dir),
            root,
            pki,
            started: AtomicUsize::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The test's temporary directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A path inside the test's directory.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    /// Runs `broker run` on this test's PKI and `data_dir` (on an ephemeral port, with `extra`
    /// flags) to its end: for a start that must be refused.
    pub fn broker_refused_start(&self, data_dir: &Path, extra: &[&OsStr]) -> RunOutput {
        let mut args = vec![
            OsStr::new("run"),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--pki-dir"),
            self.pki.dir().as_os_str(),
            OsStr::new("--data-dir"),
            data_dir.as_os_str(),
        ];
        args.extend_from_slice(extra);
        broker_command(args)
    }

    /// The CA the broker trusts.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// Another, unrelated CA in `<root>/<name>`: its certificates must not get anyone in.
    pub fn other_ca(&self, name: &str) -> Pki {
        Pki::init(self.path(name), &[])
    }

    /// A certificate from the broker's CA, issued on first use.
    pub fn certs(&self, role: Role, id: &str) -> CertPaths {
        self.pki.issue(role, id)
    }

    /// A number for each process started, so ready files and logs never collide across restarts.
    fn next_start(&self) -> usize {
        self.started.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A broker with this test's CA and data directory; see [`BrokerBuilder`].
    pub fn broker(&self) -> BrokerBuilder<'_> {
        BrokerBuilder::new(self)
    }

    /// A real `device-agent run` for `serial`, with its own certificate and data directory.
    pub fn device(&self, serial: &str) -> DeviceBuilder<'_> {
        DeviceBuilder::new(self, serial)
    }

    /// A `device-agent fleet` of `count` simulated devices.
    pub fn fleet(&self, count: usize) -> FleetBuilder<'_> {
        FleetBuilder::new(self, count)
    }

    /// The `host-agent` CLI as host `id`, talking to `broker`.
    pub fn host(&self, id: &str, broker: &Broker) -> Host {
        Host::new(self, id, self.certs(Role::Host, id), broker.url(), None)
    }

    /// The `host-agent` CLI as host `id`, reaching the relay at `url` (e.g. a `wss://` one).
    pub fn host_at(&self, id: &str, url: String) -> Host {
        Host::new(self, id, self.certs(Role::Host, id), url, None)
    }

    /// The `host-agent` CLI run inside network namespace `ns`, reaching the relay at `url`.
    pub fn host_in(&self, id: &str, url: String, ns: &netns::Ns) -> Host {
        Host::new(
            self,
            id,
            self.certs(Role::Host, id),
            url,
            Some(ns.name.clone()),
        )
    }

    /// An in-process MQTT client over TLS with `role`/`id`'s certificate; client id `id` unless
    /// changed. This is how a test plays a hostile or broken device.
    pub fn mqtt(&self, role: Role, id: &str) -> MqttBuilder {
        MqttBuilder::new(self.certs(role, id), id)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "[{}] test directory kept for inspection: {}",
                self.name,
                kept.display()
            );
        }
    }
}
