//! `devices list [--target …]` and `devices tag`.

use std::io::Write;

use anyhow::Context as _;
use protocol::rollout::DeviceListing;

use super::refused;
use crate::cli::{DeviceListArgs, DeviceTagArgs};
use crate::client::HostClient;
use crate::table::render_grid;

pub async fn list(
    client: &HostClient,
    args: DeviceListArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let devices = client
        .devices(args.targets)
        .await
        .map_err(refused("listing devices"))?;
    print(&devices, args.json, out)?;
    if devices.is_empty() && !args.json {
        eprintln!(
            "no device matches (devices appear once they have connected and announced themselves)"
        );
    }
    Ok(())
}

pub async fn tag(
    client: &HostClient,
    args: DeviceTagArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let devices = client
        .tag_devices(args.serials, args.add, args.remove)
        .await
        .map_err(refused("tagging devices"))?;
    print(&devices, false, out)
}

fn print(devices: &[DeviceListing], json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        let json = serde_json::to_string_pretty(devices).context("encoding as JSON")?;
        return writeln!(out, "{json}").context("writing to stdout");
    }
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                d.serial.clone(),
                d.model.clone(),
                d.site.clone(),
                d.firmware.clone(),
                d.tags.join(","),
                d.last_seen
                    .with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M")
                    .to_string(),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        render_grid(
            &["SERIAL", "MODEL", "SITE", "FIRMWARE", "TAGS", "LAST SEEN"],
            &rows
        )
    )
    .context("writing to stdout")
}
