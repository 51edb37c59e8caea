//! `broker demo`: the whole system in one process, for a first look. A fresh CA and data folder
//! in a temporary directory, the broker, N simulated copiers (the device agent's fleet) and a
//! service-desk host that asks every copier for its counters — the seed's Fig. 2, N times over.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use device_agent::cli::FleetArgs;
use device_agent::config::{FileConfig, FleetSettings};
use device_agent::jobs::PublisherKey;
use host_agent::upload::{Prepared, upload};
use host_agent::{ConnectOptions, HostClient};
use protocol::alarm::AlarmView;
use protocol::data::Section;
use protocol::data::Value;
use protocol::host::{HostReply, HostRequest, SubmitJob};
use protocol::job::{JobStatus, JobView};
use protocol::url::BrokerUrl;
use protocol::{HostId, Role};
use tokio_util::sync::CancellationToken;

use broker::config::BrokerConfig;

const HOST: &str = "service-desk";
const INTEGRATOR: &str = "crm";
const PREFIX: &str = "COPIER";
/// How long `--once` waits for every job to end before it gives up.
pub(crate) const PATIENCE: Duration = Duration::from_secs(120);

pub async fn run(devices: usize, once: bool, stop: CancellationToken) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (1..=2000).contains(&devices),
        "--devices {devices}: use 1 to 2000 for the demo"
    );
    let dir = tempfile::Builder::new()
        .prefix("chukei-demo-")
        .tempdir()
        .context("creating a temporary folder")?;
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &[])?;
    let (host_cert, host_key) = pki::issue_to_dir(&pki_dir, Role::Host, HOST)?;
    pki::issue_to_dir(&pki_dir, Role::Integrator, INTEGRATOR)?;
    println!("chukei demo in {}", dir.path().display());

    // The broker, on a free port of loopback.
    let cfg = BrokerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().join("broker-data"),
        pki_dir: pki_dir.clone(),
        server_name: "demo-relay".into(),
        ..BrokerConfig::default()
    };
    let listener = broker::bind(&cfg).await?;
    let addr = listener.local_addr()?;
    let url: BrokerUrl = format!("mqtts://127.0.0.1:{}", addr.port()).parse()?;
    // The broker stops last, after the copiers have said goodbye, so nobody logs a lost relay.
    let broker_stop = CancellationToken::new();
    let broker = tokio::spawn(broker::run(
        cfg,
        listener,
        None,
        broker::Faults::default(),
        broker_stop.clone(),
        None,
    ));
    println!("broker listening on {url}");

    // The firmware publisher's key: the host signs, the copiers are provisioned with the public half.
    let signing_key = host_agent::keys::generate();
    host_agent::keys::write_pair(&dir.path().join("publisher"), &signing_key)?;

    // The simulated copiers.
    let mut fleet = FleetSettings::merge(
        FileConfig::default(),
        FleetArgs {
            count: Some(u32::try_from(devices)?),
            pki_dir: Some(pki_dir.clone()),
            broker: vec![url.clone()],
            data_dir: Some(dir.path().join("fleet-data")),
            prefix: Some(PREFIX.into()),
            site: Some("Demo Customer, 3F".into()),
            ..FleetArgs::default()
        },
    )?;
    fleet.publisher_key = Some(PublisherKey::from_verifying_key(
        signing_key.verifying_key(),
    ));
    let serials = fleet.serials()?;
    let fleet_task = tokio::spawn(device_agent::run_fleet(fleet, stop.clone()));

    // The service desk: one GET DATA job per copier.
    let (host, tls) = connect_host(&pki_dir, &host_cert, &host_key, &url)
        .await
        .context("connecting the host")?;
    let dashboard_stop = CancellationToken::new();
    let (dashboard, dashboard_url) =
        start_dashboard(&url, tls, signing_key.clone(), dashboard_stop.clone()).await?;
    let sections = [Section::Counters, Section::Identification, Section::Jams];
    let mut jobs = submit_get_data(&host, &serials, &sections).await?;
    println!("submitted {} GET DATA jobs", jobs.len());

    // Fig. 4 and Fig. 6 on the first copier: new settings merged at the relay, then new firmware.
    let first = serials[0].to_string();
    let mut update = SubmitJob {
        serial: first.clone(),
        kind: "update-data".into(),
        ..SubmitJob::default()
    };
    update
        .values
        .insert("adjustment.density".into(), Value::Int(7));
    update
        .values
        .insert("call-settings.every_counts".into(), Value::Int(5000));
    jobs.push(submitted(host.submit(update).await?)?);
    let image = demo_firmware_image(FIRMWARE_VERSION);
    let prepared = Prepared::new(&image, FIRMWARE_VERSION, &signing_key);
    let uploaded = upload(&host, &image, &prepared, |_| {})
        .await
        .context("uploading the demo firmware")?;
    println!(
        "uploaded firmware {FIRMWARE_VERSION} ({} bytes, {} chunks, signed by {HOST}) as artifact {}",
        uploaded.info.artifact.size,
        uploaded.info.artifact.chunks(),
        &uploaded.info.artifact.id.as_str()[..12]
    );
    let firmware = SubmitJob {
        serial: first.clone(),
        kind: "firmware".into(),
        artifact: Some(FIRMWARE_VERSION.into()),
        ..SubmitJob::default()
    };
    jobs.push(submitted(host.submit(firmware).await?)?);
    println!("submitted an UPDATE DATA and an UPDATE ISW job for {first}\n");

    let outcome = follow(&host, &jobs, &stop).await?;
    print_counters(&host, &jobs).await?;
    show_emergency(&host, &serials[serials.len() - 1]).await?;

    let code = if once {
        once_code(outcome)
    } else {
        let d = dir.path().display();
        println!("\nAn integrator can watch the JSON views with:\n");
        println!(
            "  mosquitto_sub -h 127.0.0.1 -p {} --cafile {d}/pki/ca.pem --cert {d}/pki/integrator/{INTEGRATOR}.pem --key {d}/pki/integrator/{INTEGRATOR}.key -i {INTEGRATOR} -t 'json/fleet/#' -v\n",
            addr.port()
        );
        println!("and submit more jobs with:\n");
        println!(
            "  cargo run --bin host-agent -- --broker {url} --ca {d}/pki/ca.pem --cert {d}/pki/host/{HOST}.pem --key {d}/pki/host/{HOST}.key jobs submit --serial {PREFIX}-00001 --kind get-data\n"
        );
        println!("The service desk's dashboard is at {dashboard_url}\n");
        println!("Serving until Ctrl-C.");
        stop.cancelled().await;
        ExitCode::SUCCESS
    };
    host.disconnect().await;
    dashboard_stop.cancel();
    if let Ok(Err(e)) = dashboard.await {
        eprintln!("dashboard: {e}");
    }
    stop.cancel();
    let _ = fleet_task.await;
    broker_stop.cancel();
    if let Ok(Err(e)) = broker.await {
        eprintln!("broker: {e}");
    }
    Ok(code)
}

/// The service desk's session, as host `service-desk` with the certificate the demo issued
/// (and that TLS configuration, for the dashboard's sessions). Its client id has a suffix, so a
/// `host-agent` run by the user with the same certificate does not take this session over.
pub(crate) async fn connect_host(
    pki_dir: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    url: &BrokerUrl,
) -> anyhow::Result<(HostClient, std::sync::Arc<rustls::ClientConfig>)> {
    let pem = |p: &std::path::Path| pki::read_pem_file(p);
    let tls = pki::client_config(&pem(&pki_dir.join(pki::CA_CERT))?, &pem(cert)?, &pem(key)?)?;
    let opts = ConnectOptions {
        client_id: Some(format!("{HOST}:demo")),
        ..ConnectOptions::default()
    };
    let host = HostClient::connect_with(url, tls.clone(), HostId::parse(HOST)?, opts).await?;
    Ok((host, tls))
}

/// Where the demo serves the dashboard: the same address as `host-agent dashboard`'s default,
/// or a free port of loopback when that one is taken.
const DASHBOARD_LISTEN: &str = host_agent::dashboard::DEFAULT_LISTEN;

/// The service desk's web page, in this process (the broker already links the host agent's
/// library): its own sessions to the relay, as `host-agent dashboard` would open them, and the
/// demo's publisher key so its submit form can upload firmware. Prints the URL.
async fn start_dashboard(
    url: &BrokerUrl,
    tls: std::sync::Arc<rustls::ClientConfig>,
    signing_key: host_agent::keys::SigningKey,
    stop: CancellationToken,
) -> anyhow::Result<(tokio::task::JoinHandle<std::io::Result<()>>, String)> {
    let listener = match tokio::net::TcpListener::bind(DASHBOARD_LISTEN).await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the dashboard to loopback")?,
    };
    let addr = listener.local_addr()?;
    let host = HostId::parse(HOST)?;
    let opts = ConnectOptions {
        client_id: Some(format!("{HOST}:dashboard")),
        ..ConnectOptions::default()
    };
    let client = HostClient::connect_with(url, tls.clone(), host.clone(), opts)
        .await
        .context("connecting the dashboard")?;
    let feed = host_agent::dashboard::FeedConfig {
        broker: url.clone(),
        proxy: None,
        tls,
        host,
    };
    let opts = host_agent::dashboard::Options {
        signing_key: Some(signing_key),
        ..host_agent::dashboard::Options::default()
    };
    let page = host_agent::dashboard::url_for(addr);
    println!("dashboard: {page} (emergencies, jobs, devices; submit and cancel)");
    let task = tokio::spawn(host_agent::dashboard::serve(
        client, feed, listener, opts, stop,
    ));
    Ok((task, page))
}

pub(crate) const FIRMWARE_VERSION: &str = "2.0.0";
/// A fatal service call (drive motor failure): Fig. 5's emergency.
const FATAL_CODE: &str = "SC-541";

/// Fig. 5: one copier detects a fatal fault; the alarm reaches the relay at once (through the
/// device's outbox) and every host sees it.
async fn show_emergency(host: &HostClient, serial: &protocol::Serial) -> anyhow::Result<()> {
    device_agent::faults::inject(
        serial,
        device_agent::faults::FaultRequest::raise(FATAL_CODE),
    )
    .map_err(|e| anyhow::anyhow!("injecting a fault into {serial}: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = host
            .request(HostRequest::Alarms {
                all: false,
                serial: Some(serial.to_string()),
            })
            .await?;
        if let HostReply::Alarms { alarms } = reply
            && let Some(alarm) = alarms.iter().find(|a| a.code == FATAL_CODE)
        {
            println!("\n{}", emergency_line(alarm));
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the injected fault never reached the relay"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The demo's line for an alarm: its status as `alarms` and the job list write statuses
/// (`in-progress`), never Rust's name for it.
fn emergency_line(alarm: &AlarmView) -> String {
    let latency = (alarm.received_at - alarm.raised_at).num_milliseconds();
    format!(
        "Emergency: {} on {} ({}): {} {}, at the relay {latency} ms after the device detected it",
        alarm.id, alarm.serial, alarm.site, alarm.code, alarm.status
    )
}

/// One GET DATA job per serial, for `sections`: the job ids, in the serials' order.
pub(crate) async fn submit_get_data(
    host: &HostClient,
    serials: &[protocol::Serial],
    sections: &[Section],
) -> anyhow::Result<Vec<String>> {
    let mut jobs = Vec::with_capacity(serials.len());
    for serial in serials {
        let req = SubmitJob {
            serial: serial.to_string(),
            kind: "get-data".into(),
            sections: sections.iter().map(|s| s.to_string()).collect(),
            ..SubmitJob::default()
        };
        jobs.push(submitted(host.submit(req).await?)?);
    }
    Ok(jobs)
}

pub(crate) fn submitted(reply: HostReply) -> anyhow::Result<String> {
    match reply {
        HostReply::Submitted { job } => Ok(job.id),
        other => anyhow::bail!("the broker refused a demo job: {other:?}"),
    }
}

/// A stand-in firmware image: a header naming the version, then 200 KiB of deterministic bytes.
pub(crate) fn demo_firmware_image(version: &str) -> Vec<u8> {
    let mut image = format!("SimCopier ISW {version}\n").into_bytes();
    let mut x: u32 = 0x2545_f491;
    image.extend((0..200 * 1024).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    image
}

/// `--once`'s exit: 0 if every job ended normally (`Some(true)`), else 1 with why.
pub(crate) fn once_code(outcome: Option<bool>) -> ExitCode {
    match outcome {
        Some(true) => ExitCode::SUCCESS,
        Some(false) => {
            println!("\nsome jobs did not end normally");
            ExitCode::FAILURE
        }
        None => {
            println!("\nnot every job ended within {PATIENCE:?}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the job list each time it changes, until every job has ended. `Some(all_succeeded)`,
/// or `None` when patience or the user ran out first.
pub(crate) async fn follow(
    host: &HostClient,
    jobs: &[String],
    stop: &CancellationToken,
) -> anyhow::Result<Option<bool>> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last = String::new();
    loop {
        let views: Vec<JobView> = host
            .list(true)
            .await?
            .into_iter()
            .filter(|v| jobs.contains(&v.id))
            .collect();
        let table = host_agent::render_table(&views);
        if table != last {
            println!("{table}");
            last = table;
        }
        if views.len() == jobs.len() && views.iter().all(|v| v.status.is_terminal()) {
            return Ok(Some(views.iter().all(|v| v.status == JobStatus::Succeeded)));
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(None),
            () = tokio::time::sleep_until(deadline) => return Ok(None),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// The counters every copier sent, and the fleet's totals.
pub(crate) async fn print_counters(host: &HostClient, jobs: &[String]) -> anyhow::Result<()> {
    const COLUMNS: [&str; 5] = ["total", "copy", "print", "scan", "fax"];
    println!("\nCounters collected:");
    println!(
        "{:<14}{}",
        "SERIAL",
        COLUMNS.map(|c| format!("{c:>10}")).join("")
    );
    let mut sums: BTreeMap<&str, i64> = BTreeMap::new();
    for job in jobs {
        let detail = host.show(job).await?;
        if detail.view.instruction != "GET DATA" {
            continue;
        }
        let counters = detail.data.as_ref().and_then(|d| d.get(&Section::Counters));
        let Some(counters) = counters else {
            println!(
                "{:<14}  (no data: {})",
                detail.view.serial, detail.view.status
            );
            continue;
        };
        let cells = COLUMNS.map(|c| {
            let v = counters.get(c).and_then(|v| v.as_int()).unwrap_or(0);
            *sums.entry(c).or_default() += v;
            format!("{v:>10}")
        });
        println!("{:<14}{}", detail.view.serial, cells.join(""));
    }
    println!(
        "{:<14}{}",
        "FLEET",
        COLUMNS
            .map(|c| format!("{:>10}", sums.get(c).unwrap_or(&0)))
            .join("")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::alarm::{AlarmKind, AlarmStatus};

    #[test]
    fn the_emergency_line_writes_the_status_as_the_lists_do() {
        let at = protocol::Timestamp::from_timestamp(1_790_000_000, 0).unwrap();
        let alarm = AlarmView {
            id: "A-000001".into(),
            serial: "COPIER-00007".into(),
            site: "Osaka".into(),
            kind: AlarmKind::Fault,
            code: FATAL_CODE.into(),
            detail: String::new(),
            status: AlarmStatus::InProgress,
            raised_at: at,
            received_at: at + Duration::from_millis(12),
            updated_at: at,
            cleared_at: None,
            acked_by: None,
            acked_at: None,
            total: None,
        };
        let line = emergency_line(&alarm);
        assert_eq!(
            line,
            format!(
                "Emergency: A-000001 on COPIER-00007 (Osaka): {FATAL_CODE} in-progress, at the relay 12 ms after the device detected it"
            )
        );
        assert!(!line.contains("InProgress"), "{line}");
    }
}
