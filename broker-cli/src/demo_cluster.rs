//! `broker demo --cluster N`: a clustered relay on this machine. A PostgreSQL server and three
//! NATS servers (joined by routes) of its own in a temporary folder, on loopback; N relay nodes
//! sharing them; simulated copiers spread over the nodes; the service desk on the first node
//! only. A GET DATA to every copier shows jobs filed at one node reaching devices on the others,
//! then `broker nodes list` shows each node with its devices.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;
use device_agent::cli::FleetArgs;
use device_agent::config::{FileConfig, FleetSettings};
use protocol::Role;
use protocol::url::BrokerUrl;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use broker::config::BrokerConfig;

use crate::demo::{connect_host, follow, once_code, print_counters, submit_get_data};
use protocol::data::Section;

const HOST: &str = "service-desk";
/// NATS servers in the demo's bus: a cluster, as an operator would run it.
const BUS_SERVERS: usize = 3;

/// A relay node running in this process.
struct Node {
    url: BrokerUrl,
    stop: CancellationToken,
    task: JoinHandle<Result<broker::Ended, broker::BrokerError>>,
}

/// Server processes started for the demo; stopped when dropped.
struct Servers {
    children: Vec<Child>,
    pg: Option<(PathBuf, PathBuf)>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some((bin, data)) = &self.pg {
            let _ = as_postgres(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(data)
                .args(["-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// PostgreSQL refuses to run as root: its programs run as Debian's `postgres` user then.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Debian's PostgreSQL server programs, newest version first.
fn pg_bindir() -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().context(
        "no PostgreSQL server in /usr/lib/postgresql/*/bin: install it (apt-get install postgresql)",
    )
}

fn nats_server() -> anyhow::Result<PathBuf> {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .context("no nats-server: install it (apt-get install nats-server)")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn run_ok(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A PostgreSQL server of the demo's own on loopback, with database `chukei`: its URL.
fn start_postgres(dir: &Path, servers: &mut Servers) -> anyhow::Result<String> {
    let bin = pg_bindir()?;
    let pg_dir = dir.join("postgres");
    std::fs::create_dir_all(&pg_dir)?;
    if is_root() {
        // The demo's folder is root's (0700); the server's own must be postgres's.
        run_ok(
            {
                let mut c = Command::new("chown");
                c.arg("postgres").arg(&pg_dir);
                c
            },
            "chown postgres",
        )?;
        run_ok(
            {
                let mut c = Command::new("chmod");
                c.arg("o+x").arg(dir);
                c
            },
            "chmod",
        )?;
    }
    let data = pg_dir.join("data");
    let mut initdb = as_postgres(&bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "--no-sync"]);
    run_ok(initdb, "initdb")?;
    let port = free_port()?;
    let mut start = as_postgres(&bin.join("pg_ctl"));
    start
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(pg_dir.join("server.log"))
        .arg("-w")
        .arg("-o")
        .arg(format!(
            "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
        ))
        .arg("start");
    run_ok(start, "pg_ctl start")?;
    servers.pg = Some((bin.clone(), data));
    let mut createdb = Command::new(bin.join("psql"));
    createdb
        .arg(format!("postgresql://postgres@127.0.0.1:{port}/postgres"))
        .args(["-c", "CREATE DATABASE chukei"]);
    run_ok(createdb, "CREATE DATABASE")?;
    Ok(format!("postgresql://postgres@127.0.0.1:{port}/chukei"))
}

/// Three NATS servers joined by routes: their client URLs.
fn start_bus(dir: &Path, servers: &mut Servers) -> anyhow::Result<Vec<String>> {
    let program = nats_server()?;
    let routes: Vec<u16> = (0..BUS_SERVERS)
        .map(|_| free_port())
        .collect::<Result<_, _>>()?;
    let all = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut urls = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        let port = free_port()?;
        let log = std::fs::File::create(dir.join(format!("nats-{}.log", i + 1)))?;
        let child = Command::new(&program)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["--cluster_name", "chukei", "--cluster"])
            .arg(format!("nats://127.0.0.1:{route}"))
            .args(["--routes", &all])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        servers.children.push(child);
        urls.push(format!("nats://127.0.0.1:{port}"));
    }
    Ok(urls)
}

pub async fn run(
    nodes: usize,
    devices: usize,
    once: bool,
    stop: CancellationToken,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (2..=5).contains(&nodes),
        "--cluster {nodes}: use 2 to 5 nodes for the demo"
    );
    anyhow::ensure!(
        (nodes..=2000).contains(&devices),
        "--devices {devices}: use {nodes} to 2000 (at least one per node)"
    );
    let dir = tempfile::Builder::new()
        .prefix("chukei-demo-cluster-")
        .tempdir()
        .context("creating a temporary folder")?;
    println!(
        "chukei demo (a cluster of {nodes} relay nodes) in {}",
        dir.path().display()
    );
    let mut servers = Servers {
        children: Vec::new(),
        pg: None,
    };
    let db = start_postgres(dir.path(), &mut servers)?;
    let (before, after) = tokio::task::spawn_blocking({
        let db = db.clone();
        move || broker::store::pg_store::migrate(&db)
    })
    .await??;
    println!("PostgreSQL on {db}: schema {before} → {after} (broker db migrate)");
    let bus = start_bus(dir.path(), &mut servers)?;
    println!("NATS servers (one cluster): {}", bus.join(" "));

    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &[])?;
    let (host_cert, host_key) = pki::issue_to_dir(&pki_dir, Role::Host, HOST)?;
    let mut started = Vec::new();
    for i in 1..=nodes {
        let cfg = BrokerConfig {
            listen: "127.0.0.1:0".parse()?,
            data_dir: dir.path().join(format!("N{i}-data")),
            pki_dir: pki_dir.clone(),
            server_name: format!("N{i}"),
            node_id: Some(format!("N{i}")),
            cluster_db: Some(db.clone()),
            cluster_bus: bus.clone(),
            ..BrokerConfig::default()
        };
        let listener = broker::bind(&cfg).await?;
        let port = listener.local_addr()?.port();
        let node_stop = CancellationToken::new();
        let task = tokio::spawn(broker::run(
            cfg,
            listener,
            None,
            broker::Faults::default(),
            node_stop.clone(),
            None,
        ));
        let url: BrokerUrl = format!("mqtts://127.0.0.1:{port}").parse()?;
        println!("node N{i} listening on {url}");
        started.push(Node {
            url,
            stop: node_stop,
            task,
        });
    }

    // The copiers, spread over the nodes.
    let mut fleets = Vec::new();
    let mut serials = Vec::new();
    for (i, node) in started.iter().enumerate() {
        let count = devices / nodes + usize::from(i < devices % nodes);
        let fleet = FleetSettings::merge(
            FileConfig::default(),
            FleetArgs {
                count: Some(u32::try_from(count)?),
                pki_dir: Some(pki_dir.clone()),
                broker: vec![node.url.clone()],
                data_dir: Some(dir.path().join(format!("fleet-N{}", i + 1))),
                prefix: Some(format!("N{}C", i + 1)),
                site: Some(format!("On node N{}", i + 1)),
                ..FleetArgs::default()
            },
        )?;
        serials.extend(fleet.serials()?);
        fleets.push(tokio::spawn(device_agent::run_fleet(fleet, stop.clone())));
    }

    // The service desk, on the first node only.
    let first = &started[0].url;
    let (host, _) = connect_host(&pki_dir, &host_cert, &host_key, first)
        .await
        .context("connecting the host to N1")?;
    wait_for_nodes(&db, devices, &stop).await?;

    let jobs = submit_get_data(&host, &serials, &[Section::Counters]).await?;
    println!(
        "\nGET DATA for all {} copiers, submitted at N1 (the copiers N2C…, N3C… are on other nodes):\n",
        jobs.len()
    );
    let all_ok = follow(&host, &jobs, &stop).await?;
    print_counters(&host, &jobs).await?;
    print_nodes(&db).await?;

    let code = if once {
        once_code(all_ok)
    } else {
        let d = dir.path().display();
        println!("\nSubmit more jobs at any node, e.g. N2:\n");
        println!(
            "  cargo run --bin host-agent -- --broker {} --ca {d}/pki/ca.pem --cert {d}/pki/host/{HOST}.pem --key {d}/pki/host/{HOST}.key jobs list\n",
            started.get(1).map_or(first, |n| &n.url)
        );
        println!("  broker nodes list --cluster-db {db}\n");
        println!("Serving until Ctrl-C.");
        stop.cancelled().await;
        ExitCode::SUCCESS
    };
    host.disconnect().await;
    stop.cancel();
    for fleet in fleets {
        let _ = fleet.await;
    }
    for node in started {
        node.stop.cancel();
        if let Ok(Err(e)) = node.task.await {
            eprintln!("node: {e}");
        }
    }
    drop(servers);
    Ok(code)
}

/// Waits until the nodes' heartbeats count every copier connected.
async fn wait_for_nodes(db: &str, devices: usize, stop: &CancellationToken) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + crate::demo::PATIENCE;
    loop {
        let db = db.to_owned();
        let nodes = tokio::task::spawn_blocking(move || broker::store::pg_store::nodes::list(&db))
            .await??;
        let online: u64 = nodes.iter().map(|n| n.devices).sum();
        if online as usize >= devices {
            println!(
                "all {devices} copiers connected, spread over {} nodes",
                nodes.len()
            );
            return Ok(());
        }
        tokio::select! {
            () = stop.cancelled() => anyhow::bail!("stopped"),
            () = tokio::time::sleep_until(deadline) => {
                anyhow::bail!("only {online} of {devices} copiers connected within {:?}", crate::demo::PATIENCE)
            }
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// `broker nodes list`, as the demo's last word.
async fn print_nodes(db: &str) -> anyhow::Result<()> {
    let db = db.to_owned();
    let nodes =
        tokio::task::spawn_blocking(move || broker::store::pg_store::nodes::list(&db)).await??;
    println!("\nbroker nodes list:\n");
    print!("{}", crate::nodes_table(&nodes));
    Ok(())
}
