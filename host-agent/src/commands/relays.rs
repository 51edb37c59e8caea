//! `relays list`: a parent relay's children, their presence and their devices.

use std::io::Write;

use anyhow::Context as _;

use crate::cli::RelayListArgs;
use crate::client::HostClient;
use crate::table::render_relays;

/// `relays list`: the table, or a JSON array.
pub async fn list(
    client: &HostClient,
    args: RelayListArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let relays = client.relays().await.context("listing child relays")?;
    if args.json {
        let json = serde_json::to_string_pretty(&relays).context("encoding the relays as JSON")?;
        writeln!(out, "{json}").context("writing to stdout")?;
        return Ok(());
    }
    write!(out, "{}", render_relays(&relays)).context("writing to stdout")?;
    if relays.is_empty() {
        eprintln!(
            "no child relays: name them in the parent's broker.toml ([[relays]] id = \"R1\", serials = [\"OSAKA-*\"]) and start each with `broker run --relay-id R1 --parent URL`"
        );
    }
    Ok(())
}
