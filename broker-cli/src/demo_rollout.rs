//! `broker demo --rollout`: rollouts on one relay. Fifty simulated copiers of two models; a
//! firmware rollout to one model in three waves ends `succeeded`; a second one, to the other
//! model's copiers (set to fail every firmware write, and some of them switched off), aborts by
//! itself and cancels the jobs that were never delivered.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use device_agent::cli::FleetArgs;
use device_agent::config::{FileConfig, FleetSettings};
use device_agent::jobs::PublisherKey;
use host_agent::HostClient;
use host_agent::upload::{Prepared, upload};
use protocol::Role;
use protocol::host::SubmitJob;
use protocol::rollout::{RolloutSpec, RolloutStatus, RolloutView};
use protocol::url::BrokerUrl;
use tokio_util::sync::CancellationToken;

use broker::config::BrokerConfig;

use crate::demo::{FIRMWARE_VERSION, PATIENCE, connect_host, demo_firmware_image};
use crate::demo_tree::start_relay;

const HOST: &str = "service-desk";
const GOOD_MODEL: &str = "bizhub C300";
const BAD_MODEL: &str = "bizhub C250";

pub async fn run(once: bool, stop: CancellationToken) -> anyhow::Result<ExitCode> {
    let dir = tempfile::Builder::new()
        .prefix("chukei-demo-rollout-")
        .tempdir()
        .context("creating a temporary folder")?;
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &[])?;
    let (host_cert, host_key) = pki::issue_to_dir(&pki_dir, Role::Host, HOST)?;
    println!("chukei rollout demo in {}", dir.path().display());
    let relay = start_relay(BrokerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().join("broker-data"),
        pki_dir: pki_dir.clone(),
        server_name: "demo-relay".into(),
        ..BrokerConfig::default()
    })
    .await?;
    let url = relay.url.clone();
    println!("broker listening on {url}");

    let signing_key = host_agent::keys::generate();
    let publisher = PublisherKey::from_verifying_key(signing_key.verifying_key());
    // 30 C300s that take the firmware; 15 C250s that fail every write; 5 C250s that announce
    // themselves once and are switched off (their jobs can never be delivered).
    let c300 = fleet(
        &url,
        &pki_dir,
        dir.path(),
        "C300",
        30,
        GOOD_MODEL,
        0,
        &publisher,
    )?;
    let c250 = fleet(
        &url,
        &pki_dir,
        dir.path(),
        "C250",
        15,
        BAD_MODEL,
        100,
        &publisher,
    )?;
    let off = fleet(
        &url,
        &pki_dir,
        dir.path(),
        "C250-OFF",
        5,
        BAD_MODEL,
        100,
        &publisher,
    )?;
    let off_stop = CancellationToken::new();
    let tasks = [
        tokio::spawn(device_agent::run_fleet(c300, stop.clone())),
        tokio::spawn(device_agent::run_fleet(c250, stop.clone())),
        tokio::spawn(device_agent::run_fleet(off, off_stop.clone())),
    ];

    let (host, _) = connect_host(&pki_dir, &host_cert, &host_key, &url)
        .await
        .context("connecting the host")?;
    wait_for_devices(&host, 50, &stop).await?;
    off_stop.cancel();
    println!("50 copiers announced themselves; the 5 C250-OFF copiers are now switched off\n");

    let image = demo_firmware_image(FIRMWARE_VERSION);
    let prepared = Prepared::new(&image, FIRMWARE_VERSION, &signing_key);
    upload(&host, &image, &prepared, |_| {})
        .await
        .context("uploading the demo firmware")?;
    println!("uploaded firmware {FIRMWARE_VERSION}\n");

    let good = host
        .create_rollout(spec(
            "c300-fw2",
            &format!("model={GOOD_MODEL}"),
            &["10%", "50%", "100%"],
        ))
        .await?;
    println!(
        "rollout {} (c300-fw2): {} devices in 3 waves",
        good.id, good.devices
    );
    let good = follow(&host, &good.id, &stop).await?;
    let bad = host
        .create_rollout(spec("c250-fw2", &format!("model={BAD_MODEL}"), &[]))
        .await?;
    println!(
        "\nrollout {} (c250-fw2): {} devices, abort above 20% failed after 3 finished",
        bad.id, bad.devices
    );
    let bad = follow(&host, &bad.id, &stop).await?;

    let expected = matches!(
        (&good, &bad),
        (Some(g), Some(b)) if g.status == RolloutStatus::Succeeded && b.status == RolloutStatus::Aborted
    );
    let code = if once {
        if expected {
            ExitCode::SUCCESS
        } else {
            println!("\nthe rollouts did not end as expected (succeeded, then aborted)");
            ExitCode::FAILURE
        }
    } else {
        let d = dir.path().display();
        println!("\nSee them with:\n");
        println!(
            "  cargo run --bin host-agent -- --broker {url} --ca {d}/pki/ca.pem --cert {d}/pki/host/{HOST}.pem --key {d}/pki/host/{HOST}.key rollouts list\n"
        );
        println!("Serving until Ctrl-C.");
        stop.cancelled().await;
        ExitCode::SUCCESS
    };
    host.disconnect().await;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    relay.stop.cancel();
    if let Ok(Err(e)) = relay.task.await {
        eprintln!("broker: {e}");
    }
    Ok(code)
}

#[allow(clippy::too_many_arguments)] // one call per fleet; each argument is one of its traits
fn fleet(
    url: &BrokerUrl,
    pki_dir: &std::path::Path,
    dir: &std::path::Path,
    prefix: &str,
    count: u32,
    model: &str,
    fail_percent: u8,
    publisher: &PublisherKey,
) -> anyhow::Result<FleetSettings> {
    let mut fleet = FleetSettings::merge(
        FileConfig::default(),
        FleetArgs {
            count: Some(count),
            pki_dir: Some(pki_dir.to_owned()),
            broker: vec![url.clone()],
            data_dir: Some(dir.join(format!("fleet-{prefix}"))),
            prefix: Some(prefix.into()),
            site: Some("Osaka North".into()),
            fail_firmware_percent: Some(fail_percent),
            ..FleetArgs::default()
        },
    )?;
    fleet.sim.model = Some(model.to_owned());
    fleet.publisher_key = Some(publisher.clone());
    Ok(fleet)
}

fn spec(name: &str, target: &str, waves: &[&str]) -> RolloutSpec {
    RolloutSpec {
        name: name.into(),
        job: SubmitJob {
            kind: "firmware".into(),
            artifact: Some(FIRMWARE_VERSION.into()),
            max_attempts: Some(1),
            ..SubmitJob::default()
        },
        targets: vec![target.into()],
        waves: waves.iter().map(|w| w.to_string()).collect(),
        abort_failure_rate: Some("20%".into()),
        abort_min_finished: Some(3),
        ..RolloutSpec::default()
    }
}

async fn wait_for_devices(
    host: &HostClient,
    n: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while host.devices(Vec::new()).await?.len() < n {
        tokio::select! {
            () = stop.cancelled() => anyhow::bail!("stopped"),
            () = tokio::time::sleep_until(deadline) => anyhow::bail!("the copiers did not all connect within {PATIENCE:?}"),
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
    Ok(())
}

/// Prints a line each time the rollout's counts change, until it ends; `None` if patience or
/// the user ran out first.
async fn follow(
    host: &HostClient,
    id: &str,
    stop: &CancellationToken,
) -> anyhow::Result<Option<RolloutView>> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last = String::new();
    loop {
        let r = host.rollout(id).await?;
        let line = line(&r);
        if line != last {
            println!("{line}");
            last = line;
        }
        if r.status.is_final() {
            print_waves(&r);
            return Ok(Some(r));
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(None),
            () = tokio::time::sleep_until(deadline) => return Ok(None),
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// One line per wave: its share, its devices, when it started (after the rollout's creation)
/// and how its jobs ended. Waves go by faster than the lines above can show each: a wave starts
/// in the batch that ends the wave before it.
fn print_waves(r: &RolloutView) {
    for (i, w) in r.waves.iter().enumerate() {
        let started = w.started_at.map_or("never started".to_owned(), |t| {
            let ms = (t - r.created_at).num_milliseconds();
            format!("started at +{:.1} s", ms as f64 / 1000.0)
        });
        println!(
            "  wave {} reaches {}%: {} devices, {started}: {}",
            i + 1,
            w.percent,
            w.devices.len(),
            protocol::rollout::counts_summary(&w.counts, " · ")
        );
    }
}

/// `R-000001 running, wave 2/3: succeeded 3 · queued 12 · pending 15`.
fn line(r: &RolloutView) -> String {
    let counts = protocol::rollout::counts_summary(&r.counts, " · ");
    let reason = r
        .reason
        .as_deref()
        .map(|x| format!("\n  {x}"))
        .unwrap_or_default();
    format!(
        "{} {}, wave {}/{}: {counts}{reason}",
        r.id,
        r.status,
        (r.wave + 1).min(r.waves.len()),
        r.waves.len()
    )
}
