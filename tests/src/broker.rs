//! Starting the real `broker run`.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;

use crate::process::SEE_BELOW;
use crate::{Proc, TestEnv, bin, deadline};

/// How to start a broker. Defaults: this test's CA, `<root>/broker-data`, `127.0.0.1:0`.
pub struct BrokerBuilder<'a> {
    env: &'a TestEnv,
    listen: Option<SocketAddr>,
    data_dir: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    netns: Option<String>,
    ws: bool,
    supervise: Vec<OsString>,
}

impl<'a> BrokerBuilder<'a> {
    pub(crate) fn new(env: &'a TestEnv) -> Self {
        BrokerBuilder {
            env,
            listen: None,
            data_dir: env.path("broker-data"),
            args: Vec::new(),
            envs: Vec::new(),
            netns: None,
            ws: false,
            supervise: Vec::new(),
        }
    }

    /// Also listen for MQTT over WebSocket over TLS (`--ws-listen`, an ephemeral port on the
    /// same addresses); see [`Broker::ws_url`].
    pub fn ws(mut self) -> Self {
        self.ws = true;
        self
    }

    /// Run the broker inside network namespace `ns`, listening on all its addresses (an
    /// ephemeral port unless [`BrokerBuilder::listen`] says otherwise).
    pub fn netns(mut self, ns: &crate::netns::Ns) -> Self {
        self.netns = Some(ns.name.clone());
        self
    }

    /// Listen on this address rather than an ephemeral port: how a restarted broker comes back
    /// where its devices expect it.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// The redb data directory. The default is the same for every broker of a test, so a
    /// restarted broker finds what the previous one stored.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = dir.into();
        self
    }

    /// Runs the relay under `broker supervise --program-dir DIR` with these flags of its own
    /// (`--confirm-secs`, `--program`): the process is the supervisor, its log holds both.
    pub fn supervised<I, S>(mut self, program_dir: impl AsRef<OsStr>, flags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.supervise = vec!["--program-dir".into(), program_dir.as_ref().to_owned()];
        self.supervise
            .extend(flags.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// One more argument to `broker run`, e.g. `--max-payload-bytes`.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// An environment variable for the broker, e.g. `CHUKEI_TEST_HOLD_ACKS=1`.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Also logs what `directive` enables (e.g. `broker::core::meter=debug`: a line per counters
    /// report), on top of the broker's default filter, for a test that reads those lines.
    pub fn log_also(self, directive: &str) -> Self {
        // The broker's default filter is `init_tracing`'s in broker/src/main.rs.
        self.env(
            "RUST_LOG",
            format!("info,rumqttd=warn,rustls=error,{directive}"),
        )
    }

    /// Starts the broker and waits for its ready file, which says where it listens.
    pub async fn start(self) -> Broker {
        let n = self.env.next_start();
        let ready = self.env.path(format!("broker-{n}.ready.json"));
        let any = if self.netns.is_some() {
            "0.0.0.0:0"
        } else {
            "127.0.0.1:0"
        };
        let listen = self
            .listen
            .map_or_else(|| any.to_owned(), |a| a.to_string());
        let mut cmd = crate::netns::command_in(self.netns.as_deref(), &bin("broker"));
        if self.supervise.is_empty() {
            cmd.arg("run");
        } else {
            cmd.arg("supervise").args(&self.supervise).arg("--");
        }
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--pki-dir")
            .arg(self.env.pki().dir())
            .arg("--listen")
            .arg(&listen)
            .arg("--ready-file")
            .arg(&ready);
        if self.ws {
            let any_ip = any.split(':').next().unwrap_or("127.0.0.1");
            cmd.arg("--ws-listen").arg(format!("{any_ip}:0"));
        }
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn(
            format!("broker#{n}"),
            cmd,
            self.env.path(format!("broker-{n}.log")),
        );
        let text = proc.wait_for_ready_file(&ready, deadline()).await;
        let ws_addr = parse_ready_ws(&text);
        assert_eq!(
            ws_addr.is_some(),
            self.ws,
            "{}'s ready file must name a ws_listen address exactly when asked for one:\n{text}",
            proc.name()
        );
        let addr = parse_ready(&text).unwrap_or_else(|e| {
            panic!(
                "{}'s ready file {} is not valid: {e}\n{text}{SEE_BELOW}",
                proc.name(),
                ready.display()
            )
        });
        if let Some(want) = self.listen {
            assert_eq!(
                addr,
                want,
                "{} was asked to listen on {want} but reports {addr}",
                proc.name()
            );
        }
        let metrics_addr = parse_ready_field(&text, "metrics_listen");
        Broker {
            proc,
            addr,
            ws_addr,
            metrics_addr,
        }
    }
}

/// `"KEY":"IP:PORT"` of the ready file, if there.
fn parse_ready_field(text: &str, key: &str) -> Option<SocketAddr> {
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    json.get(key)?.as_str()?.parse().ok()
}

/// `"ws_listen":"IP:PORT"` of the ready file, if there.
fn parse_ready_ws(text: &str) -> Option<SocketAddr> {
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    json.get("ws_listen")?.as_str()?.parse().ok()
}

/// `{"listen":"127.0.0.1:PORT"}`.
fn parse_ready(text: &str) -> Result<SocketAddr, String> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let listen = json
        .get("listen")
        .and_then(|v| v.as_str())
        .ok_or("no \"listen\" string")?;
    listen
        .parse()
        .map_err(|e| format!("\"listen\": {listen:?}: {e}"))
}

/// A running broker. Derefs to its [`Proc`] for logs, `kill9` and `stop`.
pub struct Broker {
    proc: Proc,
    addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
}

impl Broker {
    /// Where the gateway listens (MQTT over TLS).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `mqtts://127.0.0.1:PORT`, as the agents take it.
    pub fn url(&self) -> String {
        format!("mqtts://{}", self.addr)
    }

    /// `mqtts://IP:PORT`: the broker's port at another of its addresses (a namespace's view).
    pub fn url_at(&self, ip: std::net::Ipv4Addr) -> String {
        format!("mqtts://{ip}:{}", self.addr.port())
    }

    /// The metrics endpoint (started with `.args(["--metrics-listen", "127.0.0.1:0"])`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr.unwrap_or_else(|| {
            panic!(
                "{} has no metrics endpoint: start it with --metrics-listen 127.0.0.1:0",
                self.proc.name()
            )
        })
    }

    /// The WebSocket listener's port (started with [`BrokerBuilder::ws`]).
    pub fn ws_port(&self) -> u16 {
        match self.ws_addr {
            Some(a) => a.port(),
            None => panic!(
                "{} has no WebSocket listener: start it with .ws()",
                self.proc.name()
            ),
        }
    }

    /// `wss://127.0.0.1:PORT/mqtt`.
    pub fn ws_url(&self) -> String {
        format!("wss://127.0.0.1:{}/mqtt", self.ws_port())
    }

    /// `wss://IP:PORT/mqtt`: the WebSocket listener at another of the broker's addresses.
    pub fn ws_url_at(&self, ip: std::net::Ipv4Addr) -> String {
        format!("wss://{ip}:{}/mqtt", self.ws_port())
    }
}

impl Deref for Broker {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl DerefMut for Broker {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

#[cfg(test)]
mod tests {
    use super::parse_ready;

    #[test]
    fn ready_file_is_read() {
        assert_eq!(
            parse_ready(r#"{"listen":"127.0.0.1:4242"}"#)
                .unwrap()
                .port(),
            4242
        );
        assert!(parse_ready(r#"{"listen":"#).is_err());
        assert!(parse_ready(r#"{"port":1}"#).is_err());
    }
}
