//! `jobs show ID`: one job, its timeline and the data it collected (S118).

use std::io::Write;

use anyhow::Context as _;
use protocol::job::JobDetail;

use crate::cli::ShowArgs;
use crate::client::HostClient;
use crate::table::render_detail;

/// Asks the broker for one job. An unknown id is the broker's refusal (exit 1) with its reason.
pub async fn run(client: &HostClient, args: ShowArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let job = client
        .show(&args.id)
        .await
        .with_context(|| format!("showing job {}", args.id))?;
    if args.json {
        writeln!(out, "{}", to_json(&job)?).context("writing to stdout")?;
    } else {
        write!(out, "{}", render_detail(&job)).context("writing to stdout")?;
    }
    Ok(())
}

/// The JSON form: the Fig. 9 fields flattened, plus `timeline` and `data`.
pub fn to_json(job: &JobDetail) -> anyhow::Result<String> {
    serde_json::to_string_pretty(job).context("encoding the job as JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::data::{DeviceData, Section, SectionData, Value};
    use protocol::job::{JobEvent, JobStatus, JobView};

    #[test]
    fn json_has_the_view_flattened_with_timeline_and_data() {
        let now = chrono::Utc::now();
        let mut counters = SectionData::new();
        counters.insert("total".into(), Value::Int(42));
        let mut data = DeviceData::new();
        data.insert(Section::Counters, counters);
        let job = JobDetail {
            view: JobView {
                id: "J-000001".into(),
                serial: "C123".into(),
                site: String::new(),
                instruction: "GET DATA".into(),
                data_type: "counters".into(),
                server: "relay".into(),
                host: "svc".into(),
                instruction_time: Some(now),
                execution_time: None,
                status: JobStatus::Succeeded,
                submitted_at: now,
                updated_at: now,
                reason: None,
            },
            timeline: vec![JobEvent {
                at: now,
                status: JobStatus::Queued,
                note: None,
            }],
            data: Some(data),
        };
        let json: serde_json::Value = serde_json::from_str(&to_json(&job).unwrap()).unwrap();
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
            "timeline",
            "data",
        ] {
            assert!(json.get(key).is_some(), "missing {key}: {json}");
        }
        assert_eq!(json["status"], "succeeded");
        assert_eq!(json["timeline"][0]["status"], "queued");
        assert_eq!(json["data"]["counters"]["total"], 42);
    }
}
