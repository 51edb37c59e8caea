//! A real NATS server for the cluster tests: Debian's `nats-server` (installed by
//! `scripts/test`), on loopback, on a port of its own.

use crate::{Proc, TestEnv, deadline};

/// How many ports a server is tried on before a test gives up (each taken meanwhile).
const PORT_TRIES: usize = 5;

/// What nats-server logs when its port is bound already.
const ADDRESS_IN_USE: &str = "address already in use";

/// One running server. Derefs to its [`Proc`] (`kill9`, `stop`, logs).
pub struct Nats {
    proc: Proc,
    port: u16,
    name: String,
    args: Vec<String>,
    starts: usize,
    /// The HTTP monitoring port of a [`Nats::start_monitored`] server.
    monitor: Option<u16>,
}

/// One client connection as the server counts it (`/connz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The name the client gave (`chukei node N1`).
    pub name: String,
    /// Messages the client published.
    pub in_msgs: u64,
    /// Messages the server delivered to the client.
    pub out_msgs: u64,
}

impl Nats {
    /// The password of user `chukei` on a [`Nats::start_tls`] server.
    pub const PASSWORD: &str = "bus-s3cret";

    /// Starts a server on an ephemeral port (or `port`, to bring one back where it was).
    pub async fn start(env: &TestEnv, name: &str, port: Option<u16>) -> Nats {
        Nats::start_with(env, name, port, &[]).await
    }

    /// Starts a server that also serves its monitoring endpoints over HTTP ([`Nats::connections`]).
    pub async fn start_monitored(env: &TestEnv, name: &str) -> Nats {
        let monitor = crate::postgres::free_port();
        let mut nats = Nats::start_with(env, name, None, &["-m".into(), monitor.to_string()]).await;
        nats.monitor = Some(monitor);
        nats
    }

    /// Every client connection and its message counts, from the server's `/connz`. Panics on a
    /// server not started with [`Nats::start_monitored`].
    pub async fn connections(&self) -> Vec<Connection> {
        let monitor = self.monitor.expect("a server started with start_monitored");
        let url = format!("http://127.0.0.1:{monitor}/connz");
        let text = reqwest::get(&url)
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let body: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"));
        let count = |c: &serde_json::Value, key: &str| c.get(key).and_then(|v| v.as_u64());
        body.get("connections")
            .and_then(|c| c.as_array())
            .map(|all| {
                all.iter()
                    .map(|c| Connection {
                        name: c
                            .get("name")
                            .and_then(|n| n.as_str())
                            .unwrap_or("")
                            .to_owned(),
                        in_msgs: count(c, "in_msgs").unwrap_or(0),
                        out_msgs: count(c, "out_msgs").unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Starts `n` servers joined by routes into one NATS cluster, as an operator runs the bus.
    pub async fn start_cluster(env: &TestEnv, n: usize) -> Vec<Nats> {
        let routes = engines::nats::Routes::new(n).unwrap_or_else(|e| panic!("{e}"));
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("bus{}", i + 1);
            servers.push(Nats::start_with(env, &name, None, &routes.args(i)).await);
        }
        servers
    }

    /// Two servers of one cluster that are apart: the second listens for routes, the first
    /// does not, so what is published at one does not reach the other's clients until
    /// [`Nats::join_cluster`] starts the first again with its routes.
    pub async fn start_apart(env: &TestEnv) -> (Nats, Nats) {
        let routes = engines::nats::Routes::new(2).unwrap_or_else(|e| panic!("{e}"));
        let mut first = Nats::start_with(env, "bus1", None, &[]).await;
        first.args = routes.args(0);
        let second = Nats::start_with(env, "bus2", None, &routes.args(1)).await;
        (first, second)
    }

    /// Kills a server of [`Nats::start_apart`] and starts it again, on the same port, routed to
    /// the rest of its cluster.
    pub async fn join_cluster(&mut self, env: &TestEnv) {
        self.proc.kill9().await;
        self.restart(env).await;
    }

    /// Starts a server that speaks TLS only, with a certificate for 127.0.0.1 from the CA in
    /// `pki_dir`, and admits clients with a certificate from that CA and the user `chukei`,
    /// password [`Nats::PASSWORD`], only.
    pub async fn start_tls(env: &TestEnv, name: &str, pki_dir: &std::path::Path) -> Nats {
        let mut args = engines::nats::tls_args(pki_dir, name).unwrap_or_else(|e| panic!("{e}"));
        args.extend([
            "--user=chukei".to_owned(),
            format!("--pass={}", Nats::PASSWORD),
        ]);
        Nats::start_with(env, name, None, &args).await
    }

    async fn start_with(env: &TestEnv, name: &str, port: Option<u16>, extra: &[String]) -> Nats {
        match port {
            Some(port) => Nats::start_picking(env, name, || port, 1, extra).await,
            None => {
                Nats::start_picking(env, name, crate::postgres::free_port, PORT_TRIES, extra).await
            }
        }
    }

    /// Starts a server on a port `pick` chooses; while the server says the port was taken
    /// meanwhile (another test's server bound it between `pick` and the start), on the next one
    /// picked, up to `tries` in all.
    async fn start_picking(
        env: &TestEnv,
        name: &str,
        mut pick: impl FnMut() -> u16,
        tries: usize,
        extra: &[String],
    ) -> Nats {
        let program = engines::nats::program().unwrap_or_else(|e| panic!("{e}"));
        let mut attempt = 1;
        loop {
            let port = pick();
            let log_name = match attempt {
                1 => format!("nats-{name}"),
                n => format!("nats-{name}-port-try-{n}"),
            };
            let mut cmd = tokio::process::Command::new(&program);
            cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .args(extra);
            let proc = Proc::spawn(log_name.clone(), cmd, env.path(format!("{log_name}.log")));
            let client_port_taken = format!("127.0.0.1:{port}: bind: {ADDRESS_IN_USE}");
            let line = proc
                .wait_for_line(
                    "\"Server is ready\" or that its port is taken",
                    deadline(),
                    |l| l.contains("Server is ready") || l.contains(&client_port_taken),
                )
                .await;
            if !line.contains("Server is ready") && attempt < tries {
                attempt += 1;
                continue;
            }
            assert!(
                line.contains("Server is ready"),
                "nats-server could not listen on port {port}: {line}"
            );
            return Nats {
                proc,
                port,
                name: name.to_owned(),
                args: extra.to_vec(),
                starts: 1,
                monitor: None,
            };
        }
    }

    /// Starts the server again (after a kill) on the same port, in the same cluster.
    pub async fn restart(&mut self, env: &TestEnv) {
        let starts = self.starts + 1;
        let name = format!("{}-{starts}", self.name);
        let again = Nats::start_with(env, &name, Some(self.port), &self.args).await;
        self.proc = again.proc;
        self.starts = starts;
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// [`Nats::url`] with user `chukei` and its password, for a [`Nats::start_tls`] server.
    pub fn url_with_credentials(&self) -> String {
        format!("nats://chukei:{}@127.0.0.1:{}", Nats::PASSWORD, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl std::ops::Deref for Nats {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for Nats {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port taken between the pick and the start (another test's server got it first): the
    /// server says so, and starts on the next port picked. Needs Debian's `nats-server`
    /// (`scripts/test` installs it).
    #[tokio::test]
    async fn a_server_whose_port_was_taken_meanwhile_starts_on_another() {
        let env = TestEnv::new("nats-port-taken");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let mut picks = vec![taken_port];
        let pick = || picks.pop().unwrap_or_else(crate::postgres::free_port);
        let nats = Nats::start_picking(&env, "bus", pick, PORT_TRIES, &[]).await;
        assert_ne!(nats.port(), taken_port);
        let first = std::fs::read_to_string(env.path("nats-bus.log")).unwrap();
        assert!(
            first.contains(ADDRESS_IN_USE),
            "the first start failed for the taken port: {first}"
        );
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", nats.port())).is_ok(),
            "the server takes connections on the port it got"
        );
    }
}
