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

/// Ports a server start tries before it gives up ([`NatsCluster::start`]).
const PORT_TRIES: usize = 5;

/// What a server start came to.
enum Started {
    Ready(Child),
    /// Its client port was taken between the pick and the bind (by another program).
    PortTaken,
}

impl NatsCluster {
    /// Starts `n` servers (TLS-only with certificates from the CA in `tls`, if given) and
    /// returns once each takes connections. A server whose port was taken meanwhile starts on
    /// another, up to [`PORT_TRIES`] in all.
    pub fn start(dir: &Path, n: usize, tls: Option<&Path>) -> Result<NatsCluster> {
        NatsCluster::start_picking(dir, n, tls, free_port)
    }

    fn start_picking(
        dir: &Path,
        n: usize,
        tls: Option<&Path>,
        mut pick: impl FnMut() -> Result<u16>,
    ) -> Result<NatsCluster> {
        let routes = Routes::new(n)?;
        let mut cluster = NatsCluster {
            children: Vec::new(),
            ports: Vec::new(),
        };
        for i in 0..n {
            let mut extra = routes.args(i);
            if let Some(pki_dir) = tls {
                extra.extend(tls_args(pki_dir, &format!("bus{}", i + 1))?);
            }
            let log_path = dir.join(format!("nats-{}.log", i + 1));
            let mut tries = 0;
            loop {
                tries += 1;
                let port = pick()?;
                match start_one(port, &extra, &log_path)? {
                    Started::Ready(child) => {
                        cluster.children.push(child);
                        cluster.ports.push(port);
                        break;
                    }
                    Started::PortTaken if tries < PORT_TRIES => {}
                    Started::PortTaken => {
                        return Err(EngineError::NotReady(format!(
                            "nats-server found its port taken {PORT_TRIES} times (see {})",
                            log_path.display()
                        )));
                    }
                }
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

/// Starts one server on `port` and waits until it says it is ready (its log, `log_path`), or
/// has exited.
fn start_one(port: u16, extra: &[String], log_path: &Path) -> Result<Started> {
    let log =
        std::fs::File::create(log_path).map_err(io(format!("creating {}", log_path.display())))?;
    let err_log = log
        .try_clone()
        .map_err(io(format!("opening {}", log_path.display())))?;
    let mut child = command(port, extra)?
        .stdout(log)
        .stderr(err_log)
        .spawn()
        .map_err(|source| EngineError::Spawn {
            what: "nats-server".into(),
            source,
        })?;
    let logged = || std::fs::read_to_string(log_path).unwrap_or_default();
    let started = Instant::now();
    loop {
        if logged().contains("Server is ready") {
            return Ok(Started::Ready(child));
        }
        if let Ok(Some(status)) = child.try_wait() {
            // "127.0.0.1:PORT: bind: address already in use": this port only; a route port
            // taken is an error of its own.
            if logged().contains(&format!("127.0.0.1:{port}: bind: address already in use")) {
                return Ok(Started::PortTaken);
            }
            return Err(EngineError::NotReady(format!(
                "nats-server on port {port} exited ({status}) before it was ready (see {})",
                log_path.display()
            )));
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(EngineError::NotReady(format!(
                "nats-server on port {port} did not start within 20 s (see {})",
                log_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The race made on purpose: the first port picked for the first server is taken before the
    /// server binds it. It says so in its log, and starts on the next port picked; the bus is
    /// whole. Needs `nats-server` (`scripts/test` installs it).
    #[test]
    fn a_server_whose_port_was_taken_meanwhile_starts_on_another() {
        let dir = tempfile::tempdir().unwrap();
        let (_taken, taken_port, pick) = crate::taken_first();
        let bus =
            NatsCluster::start_picking(dir.path(), 2, None, pick).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bus.ports.len(), 2);
        assert!(!bus.ports.contains(&taken_port), "{:?}", bus.ports);
        for port in &bus.ports {
            let mut conn = std::net::TcpStream::connect(("127.0.0.1", *port)).unwrap();
            let mut hello = [0u8; 4];
            std::io::Read::read_exact(&mut conn, &mut hello).unwrap();
            assert_eq!(&hello, b"INFO", "a NATS server answers on {port}");
        }
    }
}
