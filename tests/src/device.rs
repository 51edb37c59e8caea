//! Starting the real `device-agent run` and `device-agent fleet`.

use std::ffi::{OsStr, OsString};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::Role;
use tokio::process::Command;

use crate::{Broker, Proc, TestEnv, bin, deadline};

/// How to start one device agent. Its data directory (`<root>/device-{serial}`) is the same for
/// every start, so a restarted agent finds its outbox.
pub struct DeviceBuilder<'a> {
    env: &'a TestEnv,
    serial: String,
    site: Option<String>,
    data_dir: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    netns: Option<String>,
    urls: Vec<String>,
    config: Option<String>,
}

impl<'a> DeviceBuilder<'a> {
    pub(crate) fn new(env: &'a TestEnv, serial: &str) -> Self {
        DeviceBuilder {
            env,
            serial: serial.to_owned(),
            site: None,
            data_dir: env.path(format!("device-{serial}")),
            args: Vec::new(),
            envs: Vec::new(),
            netns: None,
            urls: Vec::new(),
            config: None,
        }
    }

    /// A config file for the agent (`--config`), written into the test directory at start.
    /// The flags the harness passes (broker, certificates, serial, data dir) win over it, so it
    /// is for what only the file says, e.g. the simulated copier's `[sim]` knobs:
    /// `.config("[sim]\nwrite_delay_ms = 2000\n")`.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    /// `--publisher-key FILE`: the public key firmware must be signed with (the `publisher.pub`
    /// of `host-agent keys generate`).
    pub fn publisher_key(self, path: impl AsRef<Path>) -> Self {
        self.arg("--publisher-key").arg(path.as_ref())
    }

    /// Run the agent inside network namespace `ns`, reaching the relay at `url` (its address as
    /// seen from that namespace) instead of the broker's loopback address.
    pub fn netns(mut self, ns: &crate::netns::Ns, url: String) -> Self {
        self.netns = Some(ns.name.clone());
        self.urls = vec![url];
        self
    }

    /// Relay URLs in order of preference, each passed as `--broker` (failover), instead of
    /// the broker given to `start`.
    pub fn brokers(mut self, urls: &[String]) -> Self {
        self.urls = urls.to_vec();
        self
    }

    /// The installation site the device reports (Fig. 9).
    pub fn site(mut self, site: &str) -> Self {
        self.site = Some(site.to_owned());
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Starts the agent and waits until it is connected and subscribed (its ready file).
    pub async fn start(self, broker: &Broker) -> Device {
        let n = self.env.next_start();
        let certs = self.env.certs(Role::Device, &self.serial);
        let ready = self.env.path(format!("device-{}-{n}.ready", self.serial));
        let mut cmd = crate::netns::command_in(self.netns.as_deref(), &bin("device-agent"));
        cmd.arg("run");
        if self.urls.is_empty() {
            cmd.arg("--broker").arg(broker.url());
        }
        for url in &self.urls {
            cmd.arg("--broker").arg(url);
        }
        cmd.arg("--ca")
            .arg(&certs.ca)
            .arg("--cert")
            .arg(&certs.cert)
            .arg("--key")
            .arg(&certs.key)
            .arg("--serial")
            .arg(&self.serial)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--ready-file")
            .arg(&ready);
        if let Some(site) = &self.site {
            cmd.arg("--site").arg(site);
        }
        if let Some(toml) = &self.config {
            let path = self.env.path(format!("device-{}-{n}.toml", self.serial));
            std::fs::write(&path, toml)
                .unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
            cmd.arg("--config").arg(path);
        }
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        let name = format!("device {}#{n}", self.serial);
        let log = self.env.path(format!("device-{}-{n}.log", self.serial));
        let mut proc = Proc::spawn(name, cmd, log);
        proc.wait_for_ready_file(&ready, deadline()).await;
        Device {
            proc,
            serial: self.serial,
            data_dir: self.data_dir,
        }
    }
}

/// A running device agent. Derefs to its [`Proc`].
pub struct Device {
    proc: Proc,
    serial: String,
    data_dir: PathBuf,
}

impl Device {
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The agent's `--data-dir`: its outbox, and the simulated copier's settings and slots.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

impl Deref for Device {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl DerefMut for Device {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// How to start a fleet simulator: `count` devices `PREFIX-00000…`, their certificates minted
/// from this test's CA.
pub struct FleetBuilder<'a> {
    env: &'a TestEnv,
    count: usize,
    prefix: String,
    args: Vec<OsString>,
}

impl<'a> FleetBuilder<'a> {
    pub(crate) fn new(env: &'a TestEnv, count: usize) -> Self {
        FleetBuilder {
            env,
            count,
            prefix: "SIM".to_owned(),
            args: Vec::new(),
        }
    }

    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_owned();
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Starts the fleet and waits until every device is connected (its ready file). A fleet takes
    /// longer than one device to come up, so the deadline grows with its size.
    pub async fn start(self, broker: &Broker) -> Fleet {
        let n = self.env.next_start();
        let ready = self.env.path(format!("fleet-{n}.ready"));
        let mut cmd = Command::new(bin("device-agent"));
        cmd.arg("fleet")
            .arg("--count")
            .arg(self.count.to_string())
            .arg("--pki-dir")
            .arg(self.env.pki().dir())
            .arg("--broker")
            .arg(broker.url())
            .arg("--data-dir")
            .arg(self.env.path(format!("fleet-{n}")))
            .arg("--prefix")
            .arg(&self.prefix)
            .arg("--ready-file")
            .arg(&ready)
            .args(&self.args);
        let mut proc = Proc::spawn(
            format!("fleet#{n}"),
            cmd,
            self.env.path(format!("fleet-{n}.log")),
        );
        let within = deadline() + Duration::from_millis(20 * self.count as u64);
        proc.wait_for_ready_file(&ready, within).await;
        Fleet {
            proc,
            prefix: self.prefix,
            count: self.count,
        }
    }
}

/// A running fleet simulator. Derefs to its [`Proc`].
pub struct Fleet {
    proc: Proc,
    prefix: String,
    count: usize,
}

impl Fleet {
    /// The serial of the `i`th simulated device: `SIM-00000`, `SIM-00001`…
    pub fn serial(&self, i: usize) -> String {
        assert!(
            i < self.count,
            "the fleet has {} devices, not {}",
            self.count,
            i + 1
        );
        format!("{}-{i:05}", self.prefix)
    }

    pub fn count(&self) -> usize {
        self.count
    }
}

impl Deref for Fleet {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl DerefMut for Fleet {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}
