//! `broker demo --children N`: child and parent relays in one process. A parent relay where the
//! service desk connects, N child relays (each a customer site) that connect out to it, and
//! simulated copiers behind each child. Shows Fig. 8 on screen: a firmware job for a copier behind
//! the first child passes queued → forwarded → delivered → staged → in-progress → succeeded, then
//! a GET DATA to every copier collects the counters through the tree, and `relays list` shows the
//! children.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use device_agent::cli::FleetArgs;
use device_agent::config::{FileConfig, FleetSettings};
use device_agent::jobs::PublisherKey;
use host_agent::HostClient;
use host_agent::upload::{Prepared, upload};
use protocol::host::SubmitJob;
use protocol::url::BrokerUrl;
use protocol::{RelayId, Role};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use broker::config::BrokerConfig;
use broker::relays::RelayAssignment;

use crate::demo::{
    FIRMWARE_VERSION, PATIENCE, connect_host, demo_firmware_image, follow, once_code,
    print_counters, submit_get_data, submitted,
};
use protocol::data::Section;

const HOST: &str = "service-desk";

/// A relay running in this process.
pub(crate) struct Relay {
    pub(crate) url: BrokerUrl,
    pub(crate) stop: CancellationToken,
    pub(crate) task: JoinHandle<Result<broker::Ended, broker::BrokerError>>,
}

pub(crate) async fn start_relay(cfg: BrokerConfig) -> anyhow::Result<Relay> {
    let listener = broker::bind(&cfg).await?;
    let port = listener.local_addr()?.port();
    let stop = CancellationToken::new();
    let task = tokio::spawn(broker::run(
        cfg,
        listener,
        None,
        broker::Faults::default(),
        stop.clone(),
        None,
    ));
    Ok(Relay {
        url: format!("mqtts://127.0.0.1:{port}").parse()?,
        stop,
        task,
    })
}

/// The serial prefix of the copiers behind child `i` (1-based): `SITE1-00001`, …
fn site_prefix(i: usize) -> String {
    format!("SITE{i}")
}

pub async fn run(
    children: usize,
    devices: usize,
    once: bool,
    stop: CancellationToken,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (1..=8).contains(&children),
        "--children {children}: use 1 to 8 for the demo"
    );
    anyhow::ensure!(
        (children..=2000).contains(&devices),
        "--devices {devices}: use {children} to 2000 (at least one per child)"
    );
    let dir = tempfile::Builder::new()
        .prefix("chukei-demo-tree-")
        .tempdir()
        .context("creating a temporary folder")?;
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &[])?;
    let (host_cert, host_key) = pki::issue_to_dir(&pki_dir, Role::Host, HOST)?;
    println!(
        "chukei demo (child and parent relays) in {}",
        dir.path().display()
    );

    // The parent: each child may speak for the copiers of its own site only.
    let relay_ids: Vec<RelayId> = (1..=children)
        .map(|i| RelayId::parse(&format!("R{i}")))
        .collect::<Result<_, _>>()?;
    let parent_cfg = BrokerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().join("parent-data"),
        pki_dir: pki_dir.clone(),
        server_name: "parent".into(),
        uplink_batch_delay_ms: 50,
        relays: relay_ids
            .iter()
            .enumerate()
            .map(|(i, id)| RelayAssignment {
                id: id.clone(),
                serials: vec![format!("{}-*", site_prefix(i + 1))],
            })
            .collect(),
        ..BrokerConfig::default()
    };
    let parent = start_relay(parent_cfg).await?;
    println!("parent relay listening on {}", parent.url);

    // The children, each with its relay certificate, connecting out to the parent.
    let mut relays = Vec::new();
    for id in &relay_ids {
        pki::issue_relay_to_dir(&pki_dir, id.as_str(), &[])?;
        let cfg = BrokerConfig {
            listen: "127.0.0.1:0".parse()?,
            data_dir: dir.path().join(format!("{id}-data")),
            pki_dir: pki_dir.clone(),
            server_name: id.to_string(),
            relay_id: Some(id.clone()),
            parent: vec![parent.url.clone()],
            uplink_batch_delay_ms: 50,
            ..BrokerConfig::default()
        };
        let child = start_relay(cfg).await?;
        println!(
            "child relay {id} listening on {}, connected out to the parent",
            child.url
        );
        relays.push(child);
    }

    // The copiers, spread over the children.
    let signing_key = host_agent::keys::generate();
    let mut fleets = Vec::new();
    let mut serials = Vec::new();
    for (i, child) in relays.iter().enumerate() {
        let count = devices / children + usize::from(i < devices % children);
        let mut fleet = FleetSettings::merge(
            FileConfig::default(),
            FleetArgs {
                count: Some(u32::try_from(count)?),
                pki_dir: Some(pki_dir.clone()),
                broker: vec![child.url.clone()],
                data_dir: Some(dir.path().join(format!("fleet-{}", i + 1))),
                prefix: Some(site_prefix(i + 1)),
                site: Some(format!("Customer site {}", i + 1)),
                ..FleetArgs::default()
            },
        )?;
        fleet.publisher_key = Some(PublisherKey::from_verifying_key(
            signing_key.verifying_key(),
        ));
        serials.extend(fleet.serials()?);
        fleets.push(tokio::spawn(device_agent::run_fleet(fleet, stop.clone())));
    }

    // The service desk, at the parent only.
    let (host, _) = connect_host(&pki_dir, &host_cert, &host_key, &parent.url)
        .await
        .context("connecting the host to the parent")?;
    wait_for_devices(&host, devices, &stop).await?;
    print!(
        "{}",
        host_agent::table::render_relays(&host.relays().await?)
    );

    // Fig. 8: firmware for the first copier behind R1, followed hop by hop.
    let image = demo_firmware_image(FIRMWARE_VERSION);
    let prepared = Prepared::new(&image, FIRMWARE_VERSION, &signing_key);
    upload(&host, &image, &prepared, |_| {})
        .await
        .context("uploading the demo firmware")?;
    let first = serials[0].to_string();
    let firmware = submitted(
        host.submit(SubmitJob {
            serial: first.clone(),
            kind: "firmware".into(),
            artifact: Some(FIRMWARE_VERSION.into()),
            ..SubmitJob::default()
        })
        .await?,
    )?;
    println!("\nUPDATE ISW {FIRMWARE_VERSION} for {first}, behind R1, submitted at the parent:\n");
    let firmware_ok = follow(&host, std::slice::from_ref(&firmware), &stop).await?;
    // Each hop with its time (Fig. 8): the parent, the child's disk, the copier.
    println!(
        "{}",
        host_agent::table::render_detail(&host.show(&firmware).await?)
    );

    // A GET DATA to every copier, through its child.
    let jobs = submit_get_data(&host, &serials, &[Section::Counters]).await?;
    println!(
        "\nGET DATA for all {} copiers, submitted at the parent:\n",
        jobs.len()
    );
    let get_data_ok = follow(&host, &jobs, &stop).await?;
    print_counters(&host, &jobs).await?;
    println!();
    print!(
        "{}",
        host_agent::table::render_relays(&host.relays().await?)
    );

    let all_ok = firmware_ok.zip(get_data_ok).map(|(a, b)| a && b);
    let code = if once {
        once_code(all_ok)
    } else {
        let d = dir.path().display();
        println!("\nSubmit more jobs at the parent with:\n");
        println!(
            "  cargo run --bin host-agent -- --broker {} --ca {d}/pki/ca.pem --cert {d}/pki/host/{HOST}.pem --key {d}/pki/host/{HOST}.key jobs submit --serial {} --kind get-data\n",
            parent.url, serials[0]
        );
        println!("Serving until Ctrl-C.");
        stop.cancelled().await;
        ExitCode::SUCCESS
    };
    host.disconnect().await;
    stop.cancel();
    for fleet in fleets {
        let _ = fleet.await;
    }
    for relay in relays.into_iter().chain([parent]) {
        relay.stop.cancel();
        if let Ok(Err(e)) = relay.task.await {
            eprintln!("relay: {e}");
        }
    }
    Ok(code)
}

/// Waits until the parent sees every copier online through its child.
async fn wait_for_devices(
    host: &HostClient,
    devices: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let online: u64 = host.relays().await?.iter().map(|r| r.devices_online).sum();
        if online as usize >= devices {
            println!("all {devices} copiers online at the parent, through their children\n");
            return Ok(());
        }
        tokio::select! {
            () = stop.cancelled() => anyhow::bail!("stopped"),
            () = tokio::time::sleep_until(deadline) => {
                anyhow::bail!("only {online} of {devices} copiers came online within {PATIENCE:?}")
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
