//! The job list of Fig. 9, as a plain-text table, and the other human forms of a job.
//!
//! Times travel in UTC (docs/decisions.md, D6) and are shown in the viewer's local time. Every
//! function here has an `_in` twin that takes the time zone, so tests can pin it.

use std::fmt::{Display, Write as _};

use chrono::{DateTime, Local, TimeZone, Utc};
use protocol::artifact::ArtifactInfo;
use protocol::job::{JobDetail, JobView};

/// The columns of Fig. 9, in its order.
pub const COLUMNS: [&str; 10] = [
    "ID",
    "SERIAL",
    "SITE",
    "INSTRUCTION",
    "DATA TYPE",
    "SERVER",
    "HOST",
    "INSTRUCTION TIME",
    "EXECUTION TIME",
    "STATUS",
];

/// Short local time for table cells: minutes are enough to read a schedule.
const SHORT: &str = "%Y-%m-%d %H:%M";
/// Full local time, for a timeline where seconds matter.
const LONG: &str = "%Y-%m-%d %H:%M:%S %:z";

/// Renders `jobs` as the Fig. 9 table, times in local time. A header line, then one line per job.
pub fn render_table(jobs: &[JobView]) -> String {
    render_table_in(jobs, &Local)
}

/// [`render_table`] in a given time zone.
pub fn render_table_in<Tz: TimeZone>(jobs: &[JobView], tz: &Tz) -> String
where
    Tz::Offset: Display,
{
    let rows: Vec<[String; 10]> = jobs
        .iter()
        .map(|j| {
            [
                j.id.clone(),
                j.serial.clone(),
                j.site.clone(),
                j.instruction.clone(),
                j.data_type.clone(),
                j.server.clone(),
                j.host.clone(),
                time_in(j.instruction_time.as_ref(), tz, SHORT),
                time_in(j.execution_time.as_ref(), tz, SHORT),
                j.status.to_string(),
            ]
            .map(|cell| {
                if cell.is_empty() {
                    "-".to_owned()
                } else {
                    cell
                }
            })
        })
        .collect();
    let mut widths = COLUMNS.map(|c| c.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    push_row(&mut out, &COLUMNS, &widths);
    for row in &rows {
        push_row(&mut out, row, &widths);
    }
    out
}

/// Any table in the style of the job list: a header, columns as wide as their widest cell.
pub fn render_grid<S: AsRef<str>>(columns: &[&str], rows: &[Vec<S>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.as_ref().chars().count());
        }
    }
    let mut out = String::new();
    push_row(&mut out, columns, &widths);
    for row in rows {
        push_row(&mut out, row, &widths);
    }
    out
}

fn push_row<S: AsRef<str>>(out: &mut String, cells: &[S], widths: &[usize]) {
    let last = cells.len() - 1;
    for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
        let cell = cell.as_ref();
        if i == last {
            // No trailing padding: lines stay clean for grep and diff.
            out.push_str(cell);
        } else {
            let pad = w - cell.chars().count();
            out.push_str(cell);
            out.extend(std::iter::repeat_n(' ', pad + 2));
        }
    }
    out.push('\n');
}

fn time_in<Tz: TimeZone>(t: Option<&DateTime<Utc>>, tz: &Tz, format: &str) -> String
where
    Tz::Offset: Display,
{
    match t {
        Some(t) => t.with_timezone(tz).format(format).to_string(),
        None => "-".to_owned(),
    }
}

/// `jobs show` in human form: the status, the Fig. 9 fields, the timeline, then the collected
/// data, one block per section with `name = value` lines.
pub fn render_detail(job: &JobDetail) -> String {
    render_detail_in(job, &Local)
}

/// [`render_detail`] in a given time zone.
pub fn render_detail_in<Tz: TimeZone>(job: &JobDetail, tz: &Tz) -> String
where
    Tz::Offset: Display,
{
    let v = &job.view;
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "job {}: {}", v.id, v.status);
    let fields = [
        ("serial", dash(&v.serial)),
        ("site", dash(&v.site)),
        ("instruction", dash(&v.instruction)),
        ("data type", dash(&v.data_type)),
        ("server", dash(&v.server)),
        ("host", dash(&v.host)),
        (
            "instruction time",
            time_in(v.instruction_time.as_ref(), tz, LONG),
        ),
        (
            "execution time",
            time_in(v.execution_time.as_ref(), tz, LONG),
        ),
        ("submitted", time_in(Some(&v.submitted_at), tz, LONG)),
        ("updated", time_in(Some(&v.updated_at), tz, LONG)),
    ];
    for (name, value) in fields {
        let _ = writeln!(out, "  {name:<17} {value}");
    }
    if let Some(reason) = &v.reason {
        // A device that refuses several values gives one reason per key ("refused: a.b: …;
        // c.d: …"): one line each reads better than one long line.
        let mut lines = reason_lines(reason).into_iter();
        let first = lines.next().unwrap_or_default();
        let _ = writeln!(out, "  {:<17} {first}", "reason");
        for line in lines {
            let _ = writeln!(out, "  {:<17} {line}", "");
        }
    }
    let _ = writeln!(out, "\ntimeline:");
    for e in &job.timeline {
        let at = time_in(Some(&e.at), tz, LONG);
        match &e.note {
            Some(note) => {
                let _ = writeln!(out, "  {at}  {:<11}  {note}", e.status.as_str());
            }
            None => {
                let _ = writeln!(out, "  {at}  {}", e.status);
            }
        }
    }
    match &job.data {
        Some(data) if !data.is_empty() => {
            let _ = writeln!(out, "\ndata:");
            for (section, values) in data {
                let _ = writeln!(out, "[{section}]");
                for (name, value) in values {
                    let _ = writeln!(out, "{name} = {}", value_text(value));
                }
                out.push('\n');
            }
            // One blank line between sections, none after the last.
            out.pop();
        }
        // A GET DATA job collects data; the others report what they applied, if anything.
        _ if v.instruction == "GET DATA" => {
            let _ = writeln!(out, "\ndata: none collected");
        }
        _ => {
            let _ = writeln!(out, "\ndata: none reported");
        }
    }
    out
}

/// A reason split at `"; "` into its parts, each trimmed: the per-key reasons of a refused
/// update, or the single line of any other reason.
pub fn reason_lines(reason: &str) -> Vec<&str> {
    reason
        .split("; ")
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect()
}

fn value_text(v: &protocol::data::Value) -> String {
    use protocol::data::Value;
    match v {
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Text(t) => t.clone(),
    }
}

/// The columns of `artifacts list`.
pub const ARTIFACT_COLUMNS: [&str; 7] = [
    "ID",
    "VERSION",
    "SIZE",
    "CHUNKS",
    "COMPLETE",
    "PUBLISHER",
    "UPLOADED",
];

/// How many hex digits of an artifact id the table shows: enough to tell artifacts apart and
/// to find the full id in `artifacts list --json`.
pub const SHORT_ID: usize = 12;

/// `artifacts list` as a table: the id's first hex digits, version, size in bytes, chunks held
/// of total, complete yes/no, publisher, upload time (local).
pub fn render_artifacts(artifacts: &[ArtifactInfo]) -> String {
    render_artifacts_in(artifacts, &Local)
}

/// [`render_artifacts`] in a given time zone.
pub fn render_artifacts_in<Tz: TimeZone>(artifacts: &[ArtifactInfo], tz: &Tz) -> String
where
    Tz::Offset: Display,
{
    let rows: Vec<[String; 7]> = artifacts
        .iter()
        .map(|a| {
            let r = &a.artifact;
            let id = r.id.as_str();
            [
                id.get(..SHORT_ID).unwrap_or(id).to_owned(),
                r.version.clone(),
                r.size.to_string(),
                format!("{}/{}", a.received, r.chunks()),
                if a.complete { "yes" } else { "no" }.to_owned(),
                r.publisher.clone(),
                time_in(Some(&a.uploaded_at), tz, SHORT),
            ]
            .map(|cell| {
                if cell.is_empty() {
                    "-".to_owned()
                } else {
                    cell
                }
            })
        })
        .collect();
    let mut widths = ARTIFACT_COLUMNS.map(|c| c.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    push_row(&mut out, &ARTIFACT_COLUMNS, &widths);
    for row in &rows {
        push_row(&mut out, row, &widths);
    }
    out
}

/// The columns of `relays list`.
pub const RELAY_COLUMNS: [&str; 8] = [
    "RELAY",
    "STATUS",
    "SINCE",
    "ONLINE",
    "UNREACHABLE",
    "SERVED",
    "LAST BATCH",
    "SERIALS",
];

/// `relays list` as a table (times local).
pub fn render_relays(relays: &[protocol::relay::RelayView]) -> String {
    render_relays_in(relays, &Local)
}

/// [`render_relays`] in a given time zone.
pub fn render_relays_in<Tz: TimeZone>(relays: &[protocol::relay::RelayView], tz: &Tz) -> String
where
    Tz::Offset: Display,
{
    let rows: Vec<[String; 8]> = relays
        .iter()
        .map(|r| {
            let status = match (r.configured, r.connected) {
                (true, true) => "connected",
                (true, false) => "disconnected",
                (false, true) => "connected, not in [[relays]]",
                (false, false) => "not in [[relays]]",
            };
            [
                r.id.clone(),
                status.to_owned(),
                time_in(r.since.as_ref(), tz, SHORT),
                r.devices_online.to_string(),
                r.devices_unreachable.to_string(),
                r.devices_served.to_string(),
                time_in(r.last_batch.as_ref(), tz, SHORT),
                if r.serials.is_empty() {
                    "-".to_owned()
                } else {
                    r.serials.join(",")
                },
            ]
        })
        .collect();
    let rows: Vec<Vec<String>> = rows.into_iter().map(Vec::from).collect();
    render_grid(&RELAY_COLUMNS, &rows)
}

/// One line of `watch`: when, which job, which device, what, and the new status (and why).
pub fn watch_line(view: &JobView) -> String {
    watch_line_in(view, &Local)
}

/// [`watch_line`] in a given time zone.
pub fn watch_line_in<Tz: TimeZone>(view: &JobView, tz: &Tz) -> String
where
    Tz::Offset: Display,
{
    let at = time_in(Some(&view.updated_at), tz, "%Y-%m-%d %H:%M:%S");
    let mut line = format!(
        "{at}  {:<10}  {:<12}  {:<11}  {}",
        view.id,
        view.serial,
        view.instruction,
        view.status.as_str()
    );
    // The path through child relays (Fig. 8), once the job has taken one.
    if view.server.contains(" › ") {
        let _ = write!(line, "  [{}]", view.server);
    }
    if let Some(reason) = &view.reason {
        let _ = write!(line, "  ({reason})");
    }
    line.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::FixedOffset;
    use protocol::data::{DeviceData, Section, SectionData, Value};
    use protocol::job::{JobEvent, JobStatus};

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 26, h, m, 0).unwrap()
    }

    fn view(id: &str, serial: &str, status: JobStatus) -> JobView {
        JobView {
            id: id.into(),
            serial: serial.into(),
            site: "Osaka 3F".into(),
            instruction: "GET DATA".into(),
            data_type: "counters,jams".into(),
            server: "relay-1".into(),
            host: "svc".into(),
            instruction_time: Some(at(9, 0)),
            execution_time: None,
            status,
            submitted_at: at(8, 59),
            updated_at: at(9, 1),
            reason: None,
        }
    }

    #[test]
    fn the_table_has_every_fig_9_column_and_one_row_per_job() {
        let jobs = [
            view("J-000001", "C123", JobStatus::Queued),
            view("J-000002", "bad/serial", JobStatus::Rejected),
        ];
        let table = render_table_in(&jobs, &Utc);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        for col in COLUMNS {
            assert!(lines[0].contains(col), "header lacks {col}: {table}");
        }
        let row = lines[1];
        for cell in [
            "J-000001",
            "C123",
            "Osaka 3F",
            "GET DATA",
            "counters,jams",
            "relay-1",
            "svc",
            "2026-11-26 09:00",
            "queued",
        ] {
            assert!(row.contains(cell), "row lacks {cell:?}: {row}");
        }
        assert!(
            lines[2].contains("bad/serial") && lines[2].ends_with("rejected"),
            "{table}"
        );
        // The columns line up: each cell starts where its header does.
        let col = lines[0].find("STATUS").unwrap();
        assert_eq!(&lines[1][col..], "queued");
        let col = lines[0].find("EXECUTION TIME").unwrap();
        assert!(
            lines[1][col..].starts_with('-'),
            "no execution time shows as -: {table}"
        );
    }

    #[test]
    fn table_times_are_local() {
        let jobs = [view("J-1", "C1", JobStatus::Queued)];
        let tokyo = FixedOffset::east_opt(9 * 3600).unwrap();
        let table = render_table_in(&jobs, &tokyo);
        assert!(
            table.contains("2026-11-26 18:00"),
            "09:00 UTC is 18:00 in Tokyo: {table}"
        );
    }

    #[test]
    fn an_empty_list_is_just_the_header() {
        assert_eq!(render_table_in(&[], &Utc).lines().count(), 1);
    }

    #[test]
    fn detail_shows_fields_timeline_and_data_by_section() {
        let mut data = DeviceData::new();
        let mut counters = SectionData::new();
        counters.insert("total".into(), Value::Int(1234));
        counters.insert("a4".into(), Value::Int(1000));
        data.insert(Section::Counters, counters);
        let mut ident = SectionData::new();
        ident.insert("rom".into(), "v1.2".into());
        data.insert(Section::Identification, ident);
        let detail = JobDetail {
            view: JobView {
                reason: Some("paper jam".into()),
                ..view("J-7", "C123", JobStatus::Failed)
            },
            timeline: vec![
                JobEvent {
                    at: at(9, 0),
                    status: JobStatus::Queued,
                    note: None,
                },
                JobEvent {
                    at: at(9, 1),
                    status: JobStatus::Failed,
                    note: Some("jam at tray 2".into()),
                },
            ],
            data: Some(data),
        };
        let text = render_detail_in(&detail, &Utc);
        for want in [
            "job J-7: failed",
            "serial            C123",
            "site              Osaka 3F",
            "data type         counters,jams",
            "reason            paper jam",
            "2026-11-26 09:00:00 +00:00  queued",
            "failed       jam at tray 2",
            "[counters]\na4 = 1000\ntotal = 1234\n\n[identification]\nrom = v1.2\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let none = JobDetail {
            data: None,
            ..detail
        };
        assert!(render_detail_in(&none, &Utc).contains("data: none collected"));
        let schedule = JobDetail {
            view: JobView {
                instruction: "SET SCHEDULE".into(),
                ..none.view.clone()
            },
            ..none
        };
        assert!(render_detail_in(&schedule, &Utc).contains("data: none reported"));
    }

    #[test]
    fn a_refused_update_shows_one_line_per_key() {
        let reason = "refused: adjustment.density: 12 is out of range 1..=9; \
                      adjustment.colour: unknown setting";
        let detail = JobDetail {
            view: JobView {
                instruction: "UPDATE DATA".into(),
                data_type: "adjustment".into(),
                reason: Some(reason.into()),
                ..view("J-8", "C123", JobStatus::Failed)
            },
            timeline: vec![],
            data: None,
        };
        let text = render_detail_in(&detail, &Utc);
        assert!(
            text.contains(
                "  reason            refused: adjustment.density: 12 is out of range 1..=9\n\
                 \x20                   adjustment.colour: unknown setting\n"
            ),
            "{text}"
        );
        assert_eq!(reason_lines("timed out"), ["timed out"]);
        assert_eq!(reason_lines("a; b; "), ["a", "b"]);
    }

    #[test]
    fn the_artifact_table_shows_short_ids_chunks_and_completeness() {
        use protocol::artifact::{ArtifactId, ArtifactRef, CHUNK_SIZE};
        let info = |digest: u8, version: &str, received: u32, complete: bool| ArtifactInfo {
            artifact: ArtifactRef {
                id: ArtifactId::from_digest(&[digest; 32]),
                version: version.into(),
                size: 3 * u64::from(CHUNK_SIZE) + 5,
                chunk_size: CHUNK_SIZE,
                signature: "00".repeat(64),
                publisher: "svc".into(),
            },
            received,
            complete,
            uploaded_at: at(9, 30),
        };
        let table = render_artifacts_in(
            &[info(0xab, "2.1", 4, true), info(0x01, "2.2-rc1", 1, false)],
            &Utc,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        for col in ARTIFACT_COLUMNS {
            assert!(lines[0].contains(col), "header lacks {col}: {table}");
        }
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "abababababab",
                "2.1",
                "98309",
                "4/4",
                "yes",
                "svc",
                "2026-11-26",
                "09:30"
            ],
            "{table}"
        );
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            &cells[..5],
            ["010101010101", "2.2-rc1", "98309", "1/4", "no"]
        );
        assert_eq!(render_artifacts_in(&[], &Utc).lines().count(), 1);
    }

    #[test]
    fn watch_lines_name_time_job_serial_instruction_status_and_reason() {
        let line = watch_line_in(&view("J-1", "C1", JobStatus::InProgress), &Utc);
        assert!(line.starts_with("2026-11-26 09:01:00  J-1"), "{line}");
        for want in ["C1", "GET DATA", "in-progress"] {
            assert!(line.contains(want), "{line}");
        }
        let rejected = JobView {
            reason: Some("unknown serial".into()),
            ..view("J-2", "X", JobStatus::Rejected)
        };
        assert!(watch_line_in(&rejected, &Utc).ends_with("rejected  (unknown serial)"));
        let through_child = JobView {
            server: "parent › R1".into(),
            ..view("J-3", "C1", JobStatus::Forwarded)
        };
        assert!(
            watch_line_in(&through_child, &Utc).ends_with("forwarded  [parent › R1]"),
            "{}",
            watch_line_in(&through_child, &Utc)
        );
    }
}
