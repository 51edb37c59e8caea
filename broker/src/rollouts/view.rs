//! A rollout's record as people and integrators read it ([`RolloutView`]).

use std::collections::BTreeMap;

use protocol::rollout::{RolloutView, WaveView};

use crate::store::{Member, RolloutRecord, job_id};

/// What a member counts as: its job's status, or `pending` before it has one.
fn bucket(m: &Member) -> &'static str {
    m.status.map_or("pending", |s| s.as_str())
}

/// The whole view; `full: false` leaves out the device and job lists (`rollouts list`).
pub fn view(r: &RolloutRecord, full: bool) -> RolloutView {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let waves = r
        .waves
        .iter()
        .map(|w| {
            let mut wave_counts: BTreeMap<String, u64> = BTreeMap::new();
            for m in &w.members {
                *wave_counts.entry(bucket(m).to_owned()).or_default() += 1;
                *counts.entry(bucket(m).to_owned()).or_default() += 1;
            }
            WaveView {
                percent: w.percent,
                devices: if full {
                    w.members.iter().map(|m| m.serial.clone()).collect()
                } else {
                    Vec::new()
                },
                counts: wave_counts,
                started_at: w.started_at,
            }
        })
        .collect();
    let jobs = if full {
        let mut numbers: Vec<u64> = r
            .waves
            .iter()
            .flat_map(|w| w.members.iter().filter_map(|m| m.job))
            .chain(r.withdrawn.iter().copied())
            .collect();
        numbers.sort_unstable();
        numbers.into_iter().map(|n| job_id(n).to_string()).collect()
    } else {
        Vec::new()
    };
    RolloutView {
        id: r.id.clone(),
        name: r.name.clone(),
        kind: r.job.kind.clone(),
        status: r.status,
        reason: r.reason.clone(),
        host: r.host.clone(),
        created_at: r.created_at,
        updated_at: r.updated_at,
        targets: r.targets.clone(),
        wave: r.wave,
        waves,
        jobs,
        counts,
        devices: r.waves.iter().map(|w| w.members.len() as u64).sum(),
        success_threshold_pct: r.success_threshold_pct,
        abort_failure_rate_pct: r.abort_failure_rate_pct,
        abort_min_finished: r.abort_min_finished,
        rate_per_min: r.rate_per_min,
        window: r.window.clone(),
        start_at: r.start_at,
        approve_each_wave: r.approve_each_wave,
        dynamic: r.dynamic,
    }
}
