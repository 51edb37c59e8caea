//! `jobs list`: the job list of Fig. 9.

use std::io::Write;

use anyhow::Context as _;
use protocol::job::JobView;

use crate::cli::ListArgs;
use crate::client::HostClient;
use crate::table::render_table;

/// Asks the broker for the list and prints it as the Fig. 9 table, or as a JSON array.
pub async fn run(client: &HostClient, args: ListArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let jobs = client.list(args.all).await.context("listing jobs")?;
    if args.json {
        writeln!(out, "{}", to_json(&jobs)?).context("writing to stdout")?;
        return Ok(());
    }
    write!(out, "{}", render_table(&jobs)).context("writing to stdout")?;
    if jobs.is_empty() && !args.all {
        // On stderr, so that stdout stays the bare table for scripts.
        eprintln!("no jobs to show; `jobs list --all` also shows those that succeeded a while ago");
    }
    Ok(())
}

/// The JSON form: protocol's `JobView`s as they are, so the keys are the wire's.
pub fn to_json(jobs: &[JobView]) -> anyhow::Result<String> {
    serde_json::to_string_pretty(jobs).context("encoding the list as JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::job::JobStatus;

    #[test]
    fn json_rows_carry_every_documented_key() {
        let now = chrono::Utc::now();
        let job = JobView {
            id: "J-000001".into(),
            serial: "C123".into(),
            site: "Osaka".into(),
            instruction: "GET DATA".into(),
            data_type: "counters".into(),
            server: "relay".into(),
            host: "svc".into(),
            instruction_time: Some(now),
            execution_time: None,
            status: JobStatus::InProgress,
            submitted_at: now,
            updated_at: now,
            reason: None,
        };
        let json: serde_json::Value = serde_json::from_str(&to_json(&[job]).unwrap()).unwrap();
        let rows = json.as_array().expect("an array");
        assert_eq!(rows.len(), 1);
        for key in [
            "id",
            "serial",
            "site",
            "instruction",
            "data_type",
            "server",
            "host",
            "instruction_time",
            "execution_time",
            "status",
        ] {
            assert!(rows[0].get(key).is_some(), "missing {key}: {json}");
        }
        assert_eq!(rows[0]["status"], "in-progress");
        assert_eq!(rows[0]["execution_time"], serde_json::Value::Null);
    }
}
