//! `jobs cancel ID`: withdraw a job.

use std::io::Write;

use anyhow::Context as _;

use crate::cli::CancelArgs;
use crate::client::HostClient;

/// Asks the broker to cancel; prints `canceled ID`. A refusal (in progress, already ended,
/// unknown) is returned as the broker worded it — it names the job and says why — so `main`
/// prints `error: <reason>` and exits 1.
pub async fn run(
    client: &HostClient,
    args: CancelArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let job = client.cancel(&args.id).await?;
    writeln!(out, "canceled {}", job.id).context("writing to stdout")?;
    Ok(())
}
