//! The Rollouts page: every rollout with a bar per wave (ended jobs of its devices), its counts,
//! and pause/resume/abort/approve forms (each with the session's CSRF token). The list is the
//! relay's answer to `rollouts`; a change on `json/fleet/rollouts/+` makes open pages fetch it
//! again. Bars are `<progress>` elements: the page's CSP allows no inline style.

use maud::{Markup, html};
use protocol::rollout::{RolloutStatus, RolloutView, WaveView, counts_summary, finished_in};

use super::html::time;

/// Jobs of a wave that ended, of its devices.
fn ended(w: &WaveView) -> u64 {
    finished_in(&w.counts)
}

fn summary(counts: &std::collections::BTreeMap<String, u64>) -> String {
    counts_summary(counts, " · ")
}

/// What a person may do to a rollout in `status`.
fn actions(status: RolloutStatus) -> &'static [(&'static str, &'static str)] {
    match status {
        RolloutStatus::Scheduled | RolloutStatus::Running => {
            &[("pause", "Pause"), ("abort", "Abort")]
        }
        RolloutStatus::WaitingApproval => &[
            ("approve", "Approve next wave"),
            ("pause", "Pause"),
            ("abort", "Abort"),
        ],
        RolloutStatus::Paused => &[("resume", "Resume"), ("abort", "Abort")],
        RolloutStatus::Succeeded | RolloutStatus::Failed | RolloutStatus::Aborted => &[],
    }
}

/// The page: a hint, then the list the script refreshes.
pub fn page(table: Markup) -> Markup {
    html! {
        p.hint {
            "Create rollouts with " code { "host-agent rollouts create" } "; each wave's bar counts "
            "the jobs of its devices that ended. "
            a href="/jobs" { "The job list" } " filters by rollout."
        }
        div #rollouts-table { (table) }
    }
}

/// One card per rollout, newest first.
pub fn list(rollouts: &[RolloutView], csrf: &str) -> Markup {
    html! {
        @if rollouts.is_empty() {
            p.empty { "No rollouts yet." }
        }
        @for r in rollouts {
            section.rollout data-rollout-id=(r.id) aria-labelledby=(format!("h-{}", r.id)) {
                h2 #(format!("h-{}", r.id)) {
                    (r.id) " " span.name { (r.name) } " "
                    span.badge .(r.status.as_str()) { (r.status.as_str()) }
                }
                p.muted {
                    (r.kind) " to " (r.devices) " devices · targets " code { (r.targets.join(" ")) }
                    " · created " (time(&r.created_at)) " by " (r.host)
                }
                @if let Some(reason) = &r.reason { p.reason { (reason) } }
                table.waves {
                    caption.sr-only { "Waves of " (r.id) }
                    thead { tr {
                        th scope="col" { "Wave" }
                        th scope="col" { "Reaches" }
                        th scope="col" { "Progress" }
                        th scope="col" { "Jobs" }
                    } }
                    tbody {
                        @for (i, w) in r.waves.iter().enumerate() {
                            @let size = w.devices.len().max(w.counts.values().sum::<u64>() as usize);
                            tr .current[i == r.wave && !r.status.is_final()] {
                                th scope="row" { (i + 1) }
                                td { (w.percent) "%" }
                                td {
                                    progress value=(ended(w)) max=(size.max(1))
                                        aria-label=(format!("wave {}: {} of {} ended", i + 1, ended(w), size)) {
                                        (ended(w)) "/" (size)
                                    }
                                    " " (ended(w)) "/" (size)
                                }
                                td { (summary(&w.counts)) }
                            }
                        }
                    }
                }
                p {
                    a href=(format!("/jobs?rollout={}&all=1", r.id)) { "Its jobs" }
                    @for (action, label) in actions(r.status) {
                        " "
                        form.inline method="post" action=(format!("/rollouts/{}/{}", r.id, action)) {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" .secondary[*action != "approve"]
                                aria-label=(format!("{label} {}", r.id)) { (label) }
                        }
                    }
                }
            }
        }
    }
}
