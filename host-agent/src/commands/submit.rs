//! `jobs submit`: file a job for one device (S101) and print its id.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::io::Write;

use anyhow::Context as _;
use protocol::host::{HostReply, SubmitJob};

use super::Refusal;
use crate::cli::{JobFlags, SubmitArgs};
use crate::client::HostClient;

/// Sends the submission as typed — the broker is the judge of every field (S103) and records a
/// refused one with its reason (S104) — and prints the new job's id alone on a line, so a script
/// can write `job=$(host-agent … jobs submit …)`.
pub async fn run(
    client: &HostClient,
    args: SubmitArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let job = into_submission(args)?;
    let reply = client.submit(job).await.context("submitting the job")?;
    match reply {
        HostReply::Submitted { job } => {
            writeln!(out, "{}", job.id).context("writing to stdout")?;
            Ok(())
        }
        HostReply::Rejected { job, reason } => {
            Err(Refusal(format!("job {} rejected: {reason}", job.id)).into())
        }
        // `HostClient::submit` turns every other reply into an error.
        other => anyhow::bail!("unexpected reply to a submission: {other:?}"),
    }
}

/// The flags, as the wire message. Nothing is checked or dropped here — a flag that does not
/// fit the kind is for the broker to refuse.
pub fn into_submission(args: SubmitArgs) -> anyhow::Result<SubmitJob> {
    // A job for a child relay itself is addressed to its id, through it.
    let (serial, via) = match args.relay {
        Some(relay) => (relay.clone(), Some(relay)),
        None => (args.serial.unwrap_or_default(), args.via),
    };
    Ok(SubmitJob {
        serial,
        via,
        ..job_of(args.job)?
    })
}

/// The job's own flags as a submission without a serial: what `rollouts create` sends as its
/// template. One check only: the same `--set` name twice, which the map cannot carry, is a usage
/// error rather than a silent "last one wins".
pub fn job_of(flags: JobFlags) -> anyhow::Result<SubmitJob> {
    let mut values = BTreeMap::new();
    for (name, value) in flags.set {
        match values.entry(name) {
            Entry::Vacant(slot) => {
                slot.insert(value);
            }
            Entry::Occupied(slot) => {
                anyhow::bail!("--set {} is given twice; give each value once", slot.key())
            }
        }
    }
    Ok(SubmitJob {
        serial: String::new(),
        kind: flags.kind,
        sections: flags.sections,
        at: flags.at,
        execute_at: flags.execute_at,
        deadline: flags.deadline,
        max_attempts: flags.max_attempts,
        values,
        merge: flags.merge,
        artifact: flags.artifact,
        mode: flags.mode,
        interval_secs: flags.interval_secs,
        calendar: flags.calendar,
        moments: flags.moments,
        conditions: flags.conditions,
        via: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::data::Value;

    #[test]
    fn every_flag_reaches_the_submission_unchanged() {
        let job = JobFlags {
            kind: "get-dta".into(),
            sections: vec!["counters".into(), "toner".into()],
            at: Some("tomorrow".into()),
            execute_at: Some("2026-11-27T02:00:00Z".into()),
            deadline: Some("2026-11-28T00:00:00Z".into()),
            set: vec![
                ("adjustment.density".into(), Value::Int(6)),
                ("adjustment.toner_save".into(), Value::Bool(true)),
            ],
            merge: Some("devise".into()),
            artifact: Some("2.1".into()),
            max_attempts: Some(0),
            mode: Some("periodic".into()),
            interval_secs: Some(900),
            calendar: vec!["daily:22:00".into()],
            moments: vec!["power-on".into()],
            conditions: vec!["count:total/1000".into()],
        };
        let args = SubmitArgs {
            serial: Some("c/123".into()),
            job,
            via: Some("R 1".into()),
            relay: None,
        };
        let job = into_submission(args).unwrap();
        // Typos and out-of-range numbers pass through: the broker refuses them with a reason.
        let want = SubmitJob {
            serial: "c/123".into(),
            kind: "get-dta".into(),
            sections: vec!["counters".into(), "toner".into()],
            at: Some("tomorrow".into()),
            execute_at: Some("2026-11-27T02:00:00Z".into()),
            deadline: Some("2026-11-28T00:00:00Z".into()),
            max_attempts: Some(0),
            values: BTreeMap::from([
                ("adjustment.density".into(), Value::Int(6)),
                ("adjustment.toner_save".into(), Value::Bool(true)),
            ]),
            merge: Some("devise".into()),
            artifact: Some("2.1".into()),
            mode: Some("periodic".into()),
            interval_secs: Some(900),
            calendar: vec!["daily:22:00".into()],
            moments: vec!["power-on".into()],
            conditions: vec!["count:total/1000".into()],
            via: Some("R 1".into()),
        };
        assert_eq!(job, want);
    }

    #[test]
    fn the_same_value_twice_is_a_usage_error() {
        let args = SubmitArgs {
            serial: Some("C1".into()),
            job: JobFlags {
                kind: "update-data".into(),
                set: vec![
                    ("adjustment.density".into(), Value::Int(6)),
                    ("adjustment.density".into(), Value::Int(7)),
                ],
                ..JobFlags::default()
            },
            ..SubmitArgs::default()
        };
        let e = into_submission(args).unwrap_err();
        assert!(
            e.to_string()
                .contains("--set adjustment.density is given twice"),
            "{e}"
        );
    }

    #[test]
    fn a_job_for_a_child_relay_is_addressed_to_it_through_it() {
        let args = SubmitArgs {
            relay: Some("R1".into()),
            job: JobFlags {
                kind: "get-data".into(),
                ..JobFlags::default()
            },
            ..SubmitArgs::default()
        };
        let job = into_submission(args).unwrap();
        assert_eq!(
            (job.serial.as_str(), job.via.as_deref()),
            ("R1", Some("R1"))
        );
    }
}
