//! `artifacts upload` and `artifacts list`: firmware images on the relay (Fig. 6).

use std::fs;
use std::io::{IsTerminal as _, Write};
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use protocol::artifact::{ArtifactInfo, MAX_ARTIFACT_BYTES};

use crate::cli::{ArtifactListArgs, UploadArgs};
use crate::client::HostClient;
use crate::keys;
use crate::table::render_artifacts;
use crate::upload::{self, Prepared};

/// Everything that can go wrong before the relay is asked: the file and the key. Run first, so a
/// typo in a path fails at once instead of after the connection.
pub fn prepare(args: &UploadArgs) -> anyhow::Result<(Vec<u8>, Prepared)> {
    let key = keys::load_signing_key(&args.signing_key)?;
    let path = args.file.display();
    let meta = fs::metadata(&args.file).with_context(|| format!("could not read {path}"))?;
    if meta.len() > MAX_ARTIFACT_BYTES {
        anyhow::bail!(
            "{path} is {} bytes; the relay takes artifacts up to {MAX_ARTIFACT_BYTES} bytes",
            meta.len()
        );
    }
    let bytes = fs::read(&args.file).with_context(|| format!("could not read {path}"))?;
    if bytes.is_empty() {
        anyhow::bail!("{path} is empty; there is nothing to install");
    }
    let prepared = Prepared::new(&bytes, &args.version, &key);
    Ok((bytes, prepared))
}

/// Uploads with a progress bar on stderr and prints the artifact id alone on stdout, so a
/// script can write `id=$(host-agent … artifacts upload …)`. A refusal from the relay (a digest
/// mismatch) is returned as the broker worded it: `main` prints it and exits 1.
pub async fn upload(
    client: &HostClient,
    bytes: &[u8],
    prepared: &Prepared,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let bar = progress_bar(prepared.size);
    let result = upload::upload(client, bytes, prepared, |held| bar.set_position(held)).await;
    bar.finish_and_clear();
    let done = result?;
    let info = &done.info;
    if done.sent == 0 {
        eprintln!(
            "the relay already holds {} complete; nothing sent",
            info.artifact.id
        );
    } else if done.resumed_at > 0 {
        eprintln!(
            "resumed: the relay already held {} of {} chunks; sent {}",
            done.resumed_at,
            info.artifact.chunks(),
            done.sent
        );
    }
    if info.artifact.version != prepared.version {
        eprintln!(
            "note: the relay holds these bytes as version {:?}; name that version or the id in \
             `jobs submit --kind firmware --artifact`",
            info.artifact.version
        );
    }
    writeln!(out, "{}", info.artifact.id).context("writing to stdout")?;
    Ok(())
}

/// Bytes held by the relay out of the artifact's size. Hidden unless stderr is a terminal, so
/// logs and test output stay clean.
fn progress_bar(size: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "uploading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    // The template is a constant; were it wrong, the default bar is still a bar.
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `artifacts list`: the table, or a JSON array.
pub async fn list(
    client: &HostClient,
    args: ArtifactListArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let artifacts = client.artifacts().await.context("listing artifacts")?;
    if args.json {
        writeln!(out, "{}", to_json(&artifacts)?).context("writing to stdout")?;
        return Ok(());
    }
    write!(out, "{}", render_artifacts(&artifacts)).context("writing to stdout")?;
    if artifacts.is_empty() {
        eprintln!(
            "no artifacts; upload one with `host-agent … artifacts upload FILE --version V --signing-key publisher.key`"
        );
    }
    Ok(())
}

/// The JSON form: protocol's `ArtifactInfo`s as they are (full id, signature, publisher…).
pub fn to_json(artifacts: &[ArtifactInfo]) -> anyhow::Result<String> {
    serde_json::to_string_pretty(artifacts).context("encoding the artifacts as JSON")
}
