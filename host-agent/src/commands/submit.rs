//! `jobs submit`: file a job for one device (S101) and print its id.

use std::io::Write;

use anyhow::Context as _;
use protocol::host::{HostReply, SubmitJob};

use super::Refusal;
use crate::cli::SubmitArgs;
use crate::client::HostClient;

/// Sends the submission as typed — the broker is the judge of every field (S103) and records a
/// refused one with its reason (S104) — and prints the new job's id alone on a line, so a script
/// can write `job=$(host-agent … jobs submit …)`.
pub async fn run(
    client: &HostClient,
    args: SubmitArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let job = into_submission(args);
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

/// The flags, as the wire message. Nothing is checked or dropped here.
pub fn into_submission(args: SubmitArgs) -> SubmitJob {
    SubmitJob {
        serial: args.serial,
        kind: args.kind,
        sections: args.sections,
        at: args.at,
        execute_at: args.execute_at,
        deadline: args.deadline,
        ..SubmitJob::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_reaches_the_submission_unchanged() {
        let args = SubmitArgs {
            serial: "c/123".into(),
            kind: "get-dta".into(),
            sections: vec!["counters".into(), "toner".into()],
            at: Some("tomorrow".into()),
            execute_at: None,
            deadline: Some("2026-11-28T00:00:00Z".into()),
        };
        let job = into_submission(args);
        assert_eq!(job.serial, "c/123");
        assert_eq!(job.kind, "get-dta");
        assert_eq!(job.sections, ["counters", "toner"]);
        assert_eq!(job.at.as_deref(), Some("tomorrow"));
        assert_eq!(job.deadline.as_deref(), Some("2026-11-28T00:00:00Z"));
    }
}
