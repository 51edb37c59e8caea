//! A real HTTP proxy for the reachability tests: tinyproxy (installed by `scripts/test`),
//! configured as a strict customer proxy would be — clients from one address only, and nothing
//! but `CONNECT` to the relay's own address and ports: `ConnectPort` refuses other ports, and a
//! default-deny URL filter whose only rules are `RELAY:PORT` refuses every other host and every
//! plain HTTP request (a `GET` URL never matches `^RELAY:PORT$`).

use std::net::Ipv4Addr;
use std::ops::{Deref, DerefMut};
use std::path::Path;

use crate::netns::command_in;
use crate::{Proc, TestEnv, deadline};

/// How to start one tinyproxy.
pub struct TinyproxyBuilder<'a> {
    env: &'a TestEnv,
    ns: Option<String>,
    listen: Ipv4Addr,
    port: u16,
    allow_from: Vec<Ipv4Addr>,
    relay: Ipv4Addr,
    relay_ports: Vec<u16>,
    credentials: Option<(String, String)>,
}

impl<'a> TinyproxyBuilder<'a> {
    /// A proxy listening on `listen:port` that tunnels to `relay` only, on `relay_ports` only.
    pub fn new(
        env: &'a TestEnv,
        listen: Ipv4Addr,
        port: u16,
        relay: Ipv4Addr,
        relay_ports: &[u16],
    ) -> Self {
        TinyproxyBuilder {
            env,
            ns: None,
            listen,
            port,
            allow_from: Vec::new(),
            relay,
            relay_ports: relay_ports.to_vec(),
            credentials: None,
        }
    }

    /// Run it inside network namespace `ns`.
    pub fn netns(mut self, ns: &str) -> Self {
        self.ns = Some(ns.to_owned());
        self
    }

    /// Accept clients from `ip` (by default, from anyone).
    pub fn allow(mut self, ip: Ipv4Addr) -> Self {
        self.allow_from.push(ip);
        self
    }

    /// Require Basic credentials (tinyproxy's `BasicAuth`).
    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Writes the config and filter, starts `tinyproxy -d` and waits until it listens.
    pub async fn start(self) -> Tinyproxy {
        let n = self.env.next_start();
        let dir = self.env.path(format!("tinyproxy-{n}"));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("could not create {}: {e}", dir.display()));
        let filter = dir.join("filter");
        let relay = self.relay.to_string().replace('.', r"\.");
        let rules: String = self
            .relay_ports
            .iter()
            .map(|p| format!("^{relay}:{p}$\n"))
            .collect();
        write(&filter, &rules);
        let log = dir.join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen {listen}\nTimeout 600\nMaxClients 50\n\
             FilterDefaultDeny Yes\nFilterURLs On\nFilterType ere\nFilter \"{filter}\"\n\
             LogFile \"{log}\"\nLogLevel Connect\nPidFile \"{pid}\"\nDisableViaHeader Yes\n",
            port = self.port,
            listen = self.listen,
            filter = filter.display(),
            log = log.display(),
            pid = dir.join("tinyproxy.pid").display(),
        );
        for p in &self.relay_ports {
            conf.push_str(&format!("ConnectPort {p}\n"));
        }
        for ip in &self.allow_from {
            conf.push_str(&format!("Allow {ip}\n"));
        }
        if let Some((user, password)) = &self.credentials {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let conf_path = dir.join("tinyproxy.conf");
        write(&conf_path, &conf);
        let mut cmd = command_in(self.ns.as_deref(), Path::new("tinyproxy"));
        cmd.arg("-d").arg("-c").arg(&conf_path);
        let proc = Proc::spawn(
            format!("tinyproxy#{n}"),
            cmd,
            self.env.path(format!("tinyproxy-{n}.log")),
        );
        // tinyproxy writes its log to LogFile, not to stdout: wait for it to accept instead.
        let (ns, listen, port) = (self.ns.clone(), self.listen, self.port);
        crate::poll_until("tinyproxy listening", deadline(), || {
            let ns = ns.clone();
            async move { accepts(ns.as_deref(), listen, port) }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        Tinyproxy {
            proc,
            addr: self.listen,
            port: self.port,
            log,
            credentials: self.credentials,
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text)
        .unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
}

/// Whether `ip:port` accepts a TCP connection from inside `ns`.
fn accepts(ns: Option<&str>, ip: Ipv4Addr, port: u16) -> Result<(), String> {
    let script =
        format!("import socket\ns=socket.socket()\ns.settimeout(1)\ns.connect(('{ip}',{port}))\n");
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, "python3"]);
            c
        }
        None => std::process::Command::new("python3"),
    };
    let out = cmd
        .args(["-c", &script])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// A running tinyproxy. Derefs to its [`Proc`].
pub struct Tinyproxy {
    proc: Proc,
    addr: Ipv4Addr,
    port: u16,
    log: std::path::PathBuf,
    credentials: Option<(String, String)>,
}

impl Tinyproxy {
    /// `http://[USER:PASSWORD@]IP:PORT`, as the agents' `--proxy` takes it.
    pub fn url(&self) -> String {
        match &self.credentials {
            Some((u, p)) => format!("http://{u}:{p}@{}:{}", self.addr, self.port),
            None => format!("http://{}:{}", self.addr, self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What tinyproxy logged so far (its `LogFile`).
    pub fn proxy_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `CONNECT` requests it logged, e.g. `CONNECT 10.1.2.1:8883 HTTP/1.1`.
    pub fn connects(&self) -> Vec<String> {
        self.proxy_log()
            .lines()
            .filter_map(|l| l.split_once("Request (file descriptor "))
            .filter_map(|(_, rest)| rest.split_once("): "))
            .map(|(_, req)| req.trim().to_owned())
            .filter(|req| req.starts_with("CONNECT "))
            .collect()
    }

    /// Sends one raw request through the proxy from inside `ns`; returns the status line.
    pub fn ask(&self, ns: &str, request: &str) -> String {
        let script = format!(
            "import socket,sys\ns=socket.create_connection(('{ip}',{port}),timeout=3)\n\
             s.sendall({request:?}.encode())\nd=s.recv(200).decode('latin-1')\n\
             print(d.split('\\r\\n')[0])\n",
            ip = self.addr,
            port = self.port,
        );
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", &script])
            .output()
            .unwrap_or_else(|e| panic!("could not run python3 in {ns}: {e}"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
            + String::from_utf8_lossy(&out.stderr).trim()
    }
}

impl Deref for Tinyproxy {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl DerefMut for Tinyproxy {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}
