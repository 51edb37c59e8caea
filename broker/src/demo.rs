//! `broker demo`: written once the agents' libraries land.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

pub async fn run(
    _devices: usize,
    _once: bool,
    _stop: CancellationToken,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("demo not built yet")
}
