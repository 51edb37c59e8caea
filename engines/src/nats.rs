//! NATS servers of our own: Debian's `nats-server`, on 127.0.0.1, joined by routes into one
//! bus as an operator runs it, optionally TLS-only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::{EngineError, Result, find_program, free_port, io};

/// The server program (Debian installs it in /usr/sbin, not always on a user's PATH).
pub fn program() -> Result<PathBuf> {
    find_program(&[
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ])
    .ok_or(EngineError::NotInstalled {
        what: "nats-server",
        install: "apt-get install nats-server",
    })
}

/// The route ports of `n` servers to be joined into one NATS cluster named `chukei`.
pub struct Routes {
    ports: Vec<u16>,
}

impl Routes {
    pub fn new(n: usize) -> Result<Routes> {
        Ok(Routes {
            ports: (0..n).map(|_| free_port()).collect::<Result<_>>()?,
        })
    }

    /// Server `i`'s arguments: its own route port and every server's route.
    pub fn args(&self, i: usize) -> Vec<String> {
        let all = self
            .ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        vec![
            "--cluster_name".into(),
            "chukei".into(),
            "--cluster".into(),
            format!("nats://127.0.0.1:{}", self.ports[i]),
            "--routes".into(),
            all,
        ]
    }
}

/// Arguments for a server that speaks TLS only, with a certificate for 127.0.0.1 named `name`
/// from the CA in `pki_dir` (`broker pki cluster-cert`), and admits only clients with a
/// certificate from that CA (`--tlsverify`).
pub fn tls_args(pki_dir: &Path, name: &str) -> Result<Vec<String>> {
    let (cert, key) = pki::cluster::issue_cluster_to_dir(pki_dir, name, &["127.0.0.1".into()])?;
    Ok(vec![
        "--tlsverify".into(),
        format!("--tlscert={}", cert.display()),
        format!("--tlskey={}", key.display()),
        format!("--tlscacert={}", pki_dir.join(pki::CA_CERT).display()),
    ])
}

/// `nats-server` on 127.0.0.1:`port` with `extra` arguments, its output in `log`.
pub fn command(port: u16, extra: &[String]) -> Result<Command> {
    let mut cmd = Command::new(program()?);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .args(extra);
    Ok(cmd)
}

/// Servers joined by routes into one bus, each with a log in the directory given; stopped
/// when dropped.
pub struct NatsCluster {
    children: Vec<Child>,
    ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts `n` servers (TLS-only with certificates from the CA in `tls`, if given) and
    /// returns once each takes connections.
    pub fn start(dir: &Path, n: usize, tls: Option<&Path>) -> Result<NatsCluster> {
        let routes = Routes::new(n)?;
        let mut cluster = NatsCluster {
            children: Vec::new(),
            ports: Vec::new(),
        };
        for i in 0..n {
            let port = free_port()?;
            let mut extra = routes.args(i);
            if let Some(pki_dir) = tls {
                extra.extend(tls_args(pki_dir, &format!("bus{}", i + 1))?);
            }
            let log_path = dir.join(format!("nats-{}.log", i + 1));
            let log = std::fs::File::create(&log_path)
                .map_err(io(format!("creating {}", log_path.display())))?;
            let err_log = log
                .try_clone()
                .map_err(io(format!("opening {}", log_path.display())))?;
            let child = command(port, &extra)?
                .stdout(log)
                .stderr(err_log)
                .spawn()
                .map_err(|source| EngineError::Spawn {
                    what: "nats-server".into(),
                    source,
                })?;
            cluster.children.push(child);
            cluster.ports.push(port);
        }
        for port in &cluster.ports {
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                if started.elapsed() > Duration::from_secs(20) {
                    return Err(EngineError::NotReady(format!(
                        "nats-server on port {port} did not start within 20 s (see {})",
                        dir.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(cluster)
    }

    /// `nats://127.0.0.1:PORT` of every server.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
