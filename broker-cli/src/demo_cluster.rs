//! `broker demo --cluster N`: a clustered relay on this machine. A PostgreSQL server and three
//! NATS servers (joined by routes) of its own in a temporary folder, on loopback; N relay nodes
//! sharing them; simulated copiers spread over the nodes; the service desk on the first node
//! only. A GET DATA to every copier shows jobs filed at one node reaching devices on the others,
//! then `broker nodes list` shows each node with its devices.

use std::path::Path;
use std::process::ExitCode;
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

/// The demo's own engines, on loopback, as an operator would run them across a network: the
/// node user logs in to PostgreSQL by its certificate over TLS only (`sslmode=verify-full`),
/// and the NATS servers speak TLS only and want a certificate from the same CA.
struct Engines {
    /// Dropped (stopped) after the nodes.
    _pg: engines::Postgres,
    _bus: engines::NatsCluster,
    db: String,
    bus: Vec<String>,
}

fn start_engines(dir: &Path, pki_dir: &Path) -> anyhow::Result<Engines> {
    let pg = engines::Postgres::start(&dir.join("postgres"), &[]).context("starting PostgreSQL")?;
    pg.require_tls(pki_dir, "db1")?;
    let db = pg.tls_url(pki_dir)?;
    let bus = engines::NatsCluster::start(dir, BUS_SERVERS, Some(pki_dir))
        .context("starting the NATS servers")?;
    let urls = bus.urls();
    Ok(Engines {
        _pg: pg,
        _bus: bus,
        db,
        bus: urls,
    })
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
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &[])?;
    let engines = start_engines(dir.path(), &pki_dir)?;
    let db = engines.db.clone();
    let (before, after) = tokio::task::spawn_blocking({
        let db = db.clone();
        move || broker::store::pg_store::migrate(&db)
    })
    .await??;
    println!(
        "PostgreSQL on 127.0.0.1 (TLS, the nodes log in by certificate): schema {before} → {after} (broker db migrate)"
    );
    let bus = engines.bus.clone();
    println!(
        "NATS servers (one cluster, TLS, the nodes' certificate checked): {}",
        bus.join(" ")
    );
    let (bus_cert, bus_key) =
        pki::cluster::cluster_cert_paths(&pki_dir, engines::postgres::NODE_USER);
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
            cluster_bus_ca: Some(pki_dir.join(pki::CA_CERT)),
            cluster_bus_cert: Some(bus_cert.clone()),
            cluster_bus_key: Some(bus_key.clone()),
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
        println!("  broker nodes list --cluster-db '{db}'\n");
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
    drop(engines);
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
