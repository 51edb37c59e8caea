//! A test bed of network namespaces, for `tests/tests/reachability.rs`. Each test gets its own: a
//! `relay` namespace for the broker, and a `device` and a `host` namespace, each joined to the
//! relay by a veth pair on private addresses chosen here, never routed anywhere else. Firewalls are
//! real nftables rulesets inside the namespaces; a link is cut with `ip link set … down`.
//!
//! Namespaces need root. [`NetBed::create`] returns `Err` with the reason when it cannot build
//! one, so a test can skip with a message on a developer machine (CI runs as root).
//! Everything is removed when the bed is dropped, processes inside first.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static BEDS: AtomicU32 = AtomicU32::new(0);

/// One namespace of the bed and its address on its link to the relay.
#[derive(Debug, Clone)]
pub struct Ns {
    pub name: String,
    /// This namespace's own address (for the relay namespace: its address on the device link).
    pub addr: Ipv4Addr,
    /// Its end of the veth pair, the interface to cut.
    pub veth: String,
}

/// A relay with a device and a host behind their own links.
pub struct NetBed {
    pub relay: Ns,
    pub device: Ns,
    pub host: Ns,
    /// The relay's address as the host sees it (the relay's end of the host link).
    pub relay_for_host: Ipv4Addr,
    extra: Vec<String>,
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// Why this machine cannot build a bed, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY-free check: geteuid via `id -u`, to avoid a libc dependency.
    match run(&["id", "-u"]) {
        Ok(uid) if uid.trim() == "0" => {}
        _ => return Some("network-namespace tests need root (CI runs them as root)".into()),
    }
    if run(&["ip", "-V"]).is_err() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    if run(&["nft", "--version"]).is_err() {
        return Some("`nft` is not installed: run scripts/test, which installs nftables".into());
    }
    None
}

impl NetBed {
    /// Builds the three namespaces and their links. Names are unique per process and bed.
    pub fn create() -> Result<NetBed, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        let n = BEDS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // 10.A.B.0/24 per bed: A from the pid, B from the bed number; /30 per link inside it.
        let a = 100 + (pid % 100) as u8;
        let b = ((pid / 100 + n * 7) % 250) as u8;
        let tag = format!("{}{}", pid % 100_000, n);
        let name = |role: &str| format!("chk{tag}{role}");
        let ip = |last: u8| Ipv4Addr::new(10, a, b, last);
        let mut bed = NetBed {
            relay: Ns {
                name: name("r"),
                addr: ip(1),
                veth: format!("v{tag}rd"),
            },
            device: Ns {
                name: name("d"),
                addr: ip(2),
                veth: format!("v{tag}d"),
            },
            host: Ns {
                name: name("h"),
                addr: ip(6),
                veth: format!("v{tag}h"),
            },
            relay_for_host: ip(5),
            extra: Vec::new(),
        };
        for ns in [&bed.relay.name, &bed.device.name, &bed.host.name] {
            run(&["ip", "netns", "add", ns])?;
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        let relay_host_veth = format!("v{tag}rh");
        bed.link(
            &bed.relay.veth.clone(),
            ip(1),
            &bed.device.veth.clone(),
            ip(2),
            &bed.device.name.clone(),
        )?;
        bed.link(
            &relay_host_veth,
            ip(5),
            &bed.host.veth.clone(),
            ip(6),
            &bed.host.name.clone(),
        )?;
        Ok(bed)
    }

    /// A veth pair between the relay and `peer_ns`, a /30 between them.
    fn link(
        &mut self,
        relay_end: &str,
        relay_ip: Ipv4Addr,
        peer_end: &str,
        peer_ip: Ipv4Addr,
        peer_ns: &str,
    ) -> Result<(), String> {
        let relay = self.relay.name.clone();
        run(&[
            "ip", "link", "add", relay_end, "netns", &relay, "type", "veth", "peer", "name",
            peer_end, "netns", peer_ns,
        ])?;
        in_ns(
            &relay,
            &[
                "ip",
                "addr",
                "add",
                &format!("{relay_ip}/30"),
                "dev",
                relay_end,
            ],
        )?;
        in_ns(&relay, &["ip", "link", "set", relay_end, "up"])?;
        in_ns(
            peer_ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{peer_ip}/30"),
                "dev",
                peer_end,
            ],
        )?;
        in_ns(peer_ns, &["ip", "link", "set", peer_end, "up"])?;
        Ok(())
    }

    /// The customer's firewall: nothing new comes in; what went out may answer.
    pub fn drop_inbound(&self, ns: &Ns) -> Result<(), String> {
        let rules = "table inet chukei_fw {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
  }
}";
        self.nft(ns, rules)
    }

    /// A stricter customer network: besides dropping inbound, only `to:port` may be reached
    /// (the proxy); everything else going out is dropped.
    pub fn only_out_to(&self, ns: &Ns, to: Ipv4Addr, port: u16) -> Result<(), String> {
        let rules = format!(
            "table inet chukei_out {{
  chain output {{
    type filter hook output priority 0; policy drop;
    oif lo accept
    ct state established,related accept
    ip daddr {to} tcp dport {port} accept
  }}
}}"
        );
        self.nft(ns, &rules)
    }

    fn nft(&self, ns: &Ns, rules: &str) -> Result<(), String> {
        let file = std::env::temp_dir().join(format!("{}-{}.nft", ns.name, rules.len()));
        std::fs::write(&file, rules).map_err(|e| e.to_string())?;
        let path = file.to_string_lossy().into_owned();
        let result = in_ns(&ns.name, &["nft", "-f", &path]);
        let _ = std::fs::remove_file(&file);
        result.map(|_| ())
    }

    /// Cuts `ns`'s link to the relay (both directions, immediately).
    pub fn cut(&self, ns: &Ns) -> Result<(), String> {
        in_ns(&ns.name, &["ip", "link", "set", &ns.veth, "down"]).map(|_| ())
    }

    /// Restores a link cut with [`NetBed::cut`].
    pub fn restore(&self, ns: &Ns) -> Result<(), String> {
        in_ns(&ns.name, &["ip", "link", "set", &ns.veth, "up"]).map(|_| ())
    }

    /// Tries a TCP connection from `from` to `to:port` with a short timeout; `Ok(())` if it
    /// connected. Used to prove a firewall is really there.
    pub fn probe_tcp(&self, from: &Ns, to: Ipv4Addr, port: u16) -> Result<(), String> {
        let script = format!(
            "import socket,sys\ns=socket.socket()\ns.settimeout(2)\ntry:\n  s.connect(('{to}',{port}))\nexcept Exception as e:\n  print(e); sys.exit(1)\n"
        );
        in_ns(&from.name, &["python3", "-c", &script]).map(|_| ())
    }

    /// Also delete this namespace when the bed goes (for extra namespaces a test adds).
    pub fn adopt(&mut self, ns: &str) {
        self.extra.push(ns.to_owned());
    }
}

/// A customer's HTTP proxy in its own namespace, between the device's network and the relay:
/// see [`NetBed::add_proxy`].
#[derive(Debug, Clone)]
pub struct ProxyNet {
    /// The proxy's namespace; its `addr` is its address on the link to the relay.
    pub ns: Ns,
    /// The proxy's address as the device sees it (on the device–proxy link).
    pub addr_for_device: Ipv4Addr,
    /// The device's address on that link.
    pub device_addr: Ipv4Addr,
}

impl NetBed {
    /// Adds a `proxy` namespace joined to the relay and to the device by links of its own. The
    /// proxy reaches the relay at the relay's usual address (`relay.addr`, the one in the URLs
    /// and the server certificate) through a route over its own link, so a device that goes
    /// through the proxy names the relay exactly as one that goes direct. Nothing is forwarded:
    /// the proxy only reaches the relay by making connections of its own.
    pub fn add_proxy(&mut self) -> Result<ProxyNet, String> {
        let tag = self
            .relay
            .name
            .strip_prefix("chk")
            .and_then(|t| t.strip_suffix('r'))
            .ok_or("unexpected relay namespace name")?
            .to_owned();
        let [_, a, b, _] = self.relay.addr.octets();
        let ip = |last: u8| Ipv4Addr::new(10, a, b, last);
        let name = format!("chk{tag}p");
        run(&["ip", "netns", "add", &name])?;
        self.adopt(&name);
        in_ns(&name, &["ip", "link", "set", "lo", "up"])?;
        // relay .9 — proxy .10 (10.A.B.8/30); proxy .13 — device .14 (10.A.B.12/30).
        let (relay_end, proxy_up) = (format!("v{tag}rp"), format!("v{tag}pr"));
        let (proxy_down, device_end) = (format!("v{tag}pd"), format!("v{tag}dp"));
        let relay_ns = self.relay.name.clone();
        let device_ns = self.device.name.clone();
        veth(&relay_ns, &relay_end, ip(9), &name, &proxy_up, ip(10))?;
        veth(&name, &proxy_down, ip(13), &device_ns, &device_end, ip(14))?;
        in_ns(
            &name,
            &[
                "ip",
                "route",
                "add",
                &format!("{}/32", self.relay.addr),
                "via",
                &ip(9).to_string(),
            ],
        )?;
        Ok(ProxyNet {
            ns: Ns {
                name,
                addr: ip(10),
                veth: proxy_up,
            },
            addr_for_device: ip(13),
            device_addr: ip(14),
        })
    }
}

/// A veth pair from `ns_a` to `ns_b`, a /30 between them, both ends up.
fn veth(
    ns_a: &str,
    end_a: &str,
    ip_a: Ipv4Addr,
    ns_b: &str,
    end_b: &str,
    ip_b: Ipv4Addr,
) -> Result<(), String> {
    run(&[
        "ip", "link", "add", end_a, "netns", ns_a, "type", "veth", "peer", "name", end_b, "netns",
        ns_b,
    ])?;
    for (ns, end, ip) in [(ns_a, end_a, ip_a), (ns_b, end_b, ip_b)] {
        in_ns(ns, &["ip", "addr", "add", &format!("{ip}/30"), "dev", end])?;
        in_ns(ns, &["ip", "link", "set", end, "up"])?;
    }
    Ok(())
}

/// The prefix that runs a program inside `ns`: `ip netns exec NS program …`.
pub fn command_in(ns: Option<&str>, program: &std::path::Path) -> tokio::process::Command {
    match ns {
        None => tokio::process::Command::new(program),
        Some(ns) => {
            let mut cmd = tokio::process::Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
    }
}

impl Drop for NetBed {
    fn drop(&mut self) {
        let names: Vec<String> = [&self.relay.name, &self.device.name, &self.host.name]
            .into_iter()
            .cloned()
            .chain(self.extra.iter().cloned())
            .collect();
        for ns in &names {
            if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
                for pid in pids.split_whitespace() {
                    let _ = run(&["kill", "-9", pid]);
                }
            }
        }
        for ns in &names {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}
