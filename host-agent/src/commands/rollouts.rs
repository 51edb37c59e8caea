//! `rollouts create | list | show [--watch] | pause | resume | abort | approve`.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use protocol::rollout::{RolloutAction, RolloutSpec, RolloutView, counts_summary, finished_in};

use super::refused;
use super::submit::job_of;
use crate::cli::{RolloutCreateArgs, RolloutListArgs, RolloutShowArgs};
use crate::client::HostClient;
use crate::table::render_grid;

/// How often `show --watch` asks again.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Sends the rollout as typed (the relay checks every field) and prints its id alone.
pub async fn create(
    client: &HostClient,
    args: RolloutCreateArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let serials = match &args.serials_file {
        Some(path) => read_serials(path)?,
        None => Vec::new(),
    };
    let spec = RolloutSpec {
        name: args.name,
        job: job_of(args.job)?,
        targets: args.targets,
        serials,
        waves: args.waves,
        success_threshold: args.success_threshold,
        abort_failure_rate: args.abort_failure_rate,
        abort_min_finished: args.abort_min_finished,
        rate_per_min: args.rate_per_min,
        window: args.window,
        start_at: args.start_at,
        approve_each_wave: args.approve_each_wave,
        dynamic: args.dynamic,
    };
    let rollout = client
        .create_rollout(spec)
        .await
        .map_err(refused("creating the rollout"))?;
    writeln!(out, "{}", rollout.id).context("writing to stdout")?;
    eprintln!(
        "{}: {} devices in {} waves, {}",
        rollout.id,
        rollout.devices,
        rollout.waves.len(),
        rollout.status
    );
    Ok(())
}

/// One serial per line; blank lines and `#` comments skipped.
fn read_serials(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the serials file {}", path.display()))?;
    let serials: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if serials.is_empty() {
        anyhow::bail!(
            "the serials file {} names no serial (one per line)",
            path.display()
        );
    }
    Ok(serials)
}

pub async fn list(
    client: &HostClient,
    args: RolloutListArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let rollouts = client.rollouts().await.context("listing rollouts")?;
    if args.json {
        let json = serde_json::to_string_pretty(&rollouts).context("encoding as JSON")?;
        writeln!(out, "{json}").context("writing to stdout")?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = rollouts
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.name.clone(),
                r.kind.clone(),
                r.status.to_string(),
                r.devices.to_string(),
                count(r, "succeeded").to_string(),
                failed(r).to_string(),
                count(r, "pending").to_string(),
                format!("{}/{}", (r.wave + 1).min(r.waves.len()), r.waves.len()),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        render_grid(
            &[
                "ID",
                "NAME",
                "KIND",
                "STATUS",
                "DEVICES",
                "SUCCEEDED",
                "FAILED",
                "PENDING",
                "WAVE"
            ],
            &rows
        )
    )
    .context("writing to stdout")?;
    if rollouts.is_empty() {
        eprintln!("no rollouts yet: create one with `host-agent rollouts create --help`");
    }
    Ok(())
}

fn count(r: &RolloutView, status: &str) -> u64 {
    r.counts.get(status).copied().unwrap_or(0)
}

fn failed(r: &RolloutView) -> u64 {
    ["failed", "timed-out", "rejected"]
        .iter()
        .map(|s| count(r, s))
        .sum()
}

pub async fn show(
    client: &HostClient,
    args: RolloutShowArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let rollout = client
        .rollout(&args.id)
        .await
        .map_err(refused("reading the rollout"))?;
    if args.json {
        let json = serde_json::to_string_pretty(&rollout).context("encoding as JSON")?;
        writeln!(out, "{json}").context("writing to stdout")?;
        return Ok(());
    }
    if args.watch {
        return watch(client, rollout, out).await;
    }
    write!(out, "{}", describe(&rollout)).context("writing to stdout")
}

/// The rollout as text: its settings, then one line per wave with its counts.
pub fn describe(r: &RolloutView) -> String {
    let mut s = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(s, "Rollout:   {} ({})", r.id, r.name);
    let _ = writeln!(s, "Kind:      {}", r.kind);
    let _ = writeln!(s, "Status:    {}", r.status);
    if let Some(reason) = &r.reason {
        let _ = writeln!(s, "Reason:    {reason}");
    }
    let _ = writeln!(s, "Targets:   {}", r.targets.join("  "));
    let _ = writeln!(s, "Devices:   {}", r.devices);
    let _ = writeln!(
        s,
        "Threshold: {}% succeeded per wave{}",
        r.success_threshold_pct,
        r.abort_failure_rate_pct
            .map(|p| format!(
                "; abort above {p}% failed (after {} finished)",
                r.abort_min_finished
            ))
            .unwrap_or_default()
    );
    if let Some(rate) = r.rate_per_min {
        let _ = writeln!(s, "Rate:      {rate} jobs/min");
    }
    if let Some(w) = &r.window {
        let _ = writeln!(s, "Window:    {w}");
    }
    let _ = writeln!(s);
    let rows: Vec<Vec<String>> = r
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            vec![
                format!("{}{}", i + 1, if i == r.wave { " *" } else { "" }),
                format!("{}%", w.percent),
                w.devices.len().to_string(),
                summary(&w.counts),
            ]
        })
        .collect();
    let _ = write!(
        s,
        "{}",
        render_grid(&["WAVE", "REACHES", "DEVICES", "JOBS"], &rows)
    );
    s
}

fn summary(counts: &std::collections::BTreeMap<String, u64>) -> String {
    counts_summary(counts, ", ")
}

/// A bar per wave (ended jobs of its devices) until the rollout ends; then its description.
async fn watch(
    client: &HostClient,
    mut rollout: RolloutView,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("wave {prefix:>2} [{bar:30}] {pos}/{len} {msg}")
        .context("progress bar template")?
        .progress_chars("=> ");
    let header = bars.add(ProgressBar::new_spinner());
    let waves: Vec<ProgressBar> = rollout
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let bar = bars.add(ProgressBar::new(w.devices.len() as u64));
            bar.set_style(style.clone());
            bar.set_prefix((i + 1).to_string());
            bar
        })
        .collect();
    loop {
        header.set_message(format!(
            "{} ({}): {}{}",
            rollout.id,
            rollout.name,
            rollout.status,
            rollout
                .reason
                .as_deref()
                .map(|r| format!(" — {r}"))
                .unwrap_or_default()
        ));
        for (bar, w) in waves.iter().zip(&rollout.waves) {
            bar.set_length(w.devices.len() as u64);
            bar.set_position(finished_in(&w.counts));
            bar.set_message(summary(&w.counts));
        }
        if rollout.status.is_final() {
            break;
        }
        tokio::time::sleep(WATCH_EVERY).await;
        rollout = client
            .rollout(&rollout.id)
            .await
            .map_err(refused("reading the rollout"))?;
    }
    for bar in &waves {
        bar.finish();
    }
    header.finish();
    write!(out, "{}", describe(&rollout)).context("writing to stdout")
}

/// `rollouts pause|resume|abort|approve ID`: prints the rollout's new status.
pub async fn act(
    client: &HostClient,
    id: &str,
    action: RolloutAction,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let r = client
        .act_on_rollout(id, action)
        .await
        .map_err(refused("changing the rollout"))?;
    writeln!(
        out,
        "{} {}{}",
        r.id,
        r.status,
        r.reason
            .as_deref()
            .map(|x| format!(": {x}"))
            .unwrap_or_default()
    )
    .context("writing to stdout")
}
