//! `export counters`: meter readings for billing (Fig. 3 counters), one row per device per
//! reading, as CSV (RFC 4180) or JSON. The relay answers a page at a time; this asks until the
//! last page, then writes everything in one go.

use std::collections::BTreeSet;
use std::io::Write;

use anyhow::Context as _;
use protocol::data::Value;
use protocol::host::{HostReply, HostRequest};
use protocol::meter::CounterReading;

use crate::cli::ExportCountersArgs;
use crate::client::{HostClient, HostError, unexpected};

/// The columns that come first, in this order; every other counter follows, sorted by name.
pub const LEADING: [&str; 5] = ["serial", "site", "read_at", "source", "total"];

/// Runs `export counters`: to `--output FILE` (written whole, then renamed into place) or stdout.
pub async fn counters(
    client: &HostClient,
    args: ExportCountersArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let readings = fetch_all(client, &args.from, &args.to, args.serial.clone())
        .await
        .context("exporting counters")?;
    let text = match args.format.as_str() {
        "json" => {
            let mut s =
                serde_json::to_string_pretty(&readings).context("encoding readings as JSON")?;
            s.push('\n');
            s
        }
        _ => to_csv(&readings),
    };
    match &args.output {
        Some(path) => {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("{} readings written to {}", readings.len(), path.display());
        }
        None => out
            .write_all(text.as_bytes())
            .context("writing to stdout")?,
    }
    Ok(())
}

/// Every reading with `from <= read_at < to`, oldest first, page after page.
pub async fn fetch_all(
    client: &HostClient,
    from: &str,
    to: &str,
    serial: Option<String>,
) -> Result<Vec<CounterReading>, HostError> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let req = HostRequest::ExportCounters {
            from: from.to_owned(),
            to: to.to_owned(),
            after: after.clone(),
            serial: serial.clone(),
        };
        match client.request(req).await? {
            HostReply::Counters { readings, next } => {
                all.extend(readings);
                match next {
                    Some(n) => after = Some(n),
                    None => return Ok(all),
                }
            }
            HostReply::Error { reason } => return Err(HostError::Refused { reason }),
            other => return Err(unexpected("export-counters", &other)),
        }
    }
}

fn cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn value(v: &Value) -> String {
    match v {
        Value::Int(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Text(t) => cell(t),
    }
}

/// The CSV: a header, then one line per reading; a counter a device does not have is empty.
pub fn to_csv(readings: &[CounterReading]) -> String {
    let others: BTreeSet<&str> = readings
        .iter()
        .flat_map(|r| r.counters.keys().map(String::as_str))
        .filter(|k| *k != "total")
        .collect();
    let mut out = String::new();
    let header: Vec<&str> = LEADING
        .iter()
        .copied()
        .chain(others.iter().copied())
        .collect();
    out.push_str(&header.join(","));
    out.push_str("\r\n");
    for r in readings {
        let mut row = vec![
            cell(&r.serial),
            cell(&r.site),
            r.read_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            cell(&r.source),
            r.counters.get("total").map(value).unwrap_or_default(),
        ];
        row.extend(
            others
                .iter()
                .map(|k| r.counters.get(*k).map(value).unwrap_or_default()),
        );
        out.push_str(&row.join(","));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::data::SectionData;

    fn reading(serial: &str, site: &str, counters: &[(&str, Value)]) -> CounterReading {
        let counters: SectionData = counters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        CounterReading {
            serial: serial.into(),
            site: site.into(),
            read_at: chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap(),
            source: "job J-000001".into(),
            counters,
        }
    }

    #[test]
    fn one_row_per_reading_with_the_union_of_counters() {
        let csv = to_csv(&[
            reading(
                "C1",
                "Osaka, 3F",
                &[("total", Value::Int(120)), ("copy", Value::Int(70))],
            ),
            reading(
                "C2",
                "",
                &[("total", Value::Int(5)), ("fax", Value::Int(5))],
            ),
        ]);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], "serial,site,read_at,source,total,copy,fax");
        assert_eq!(
            lines[1],
            "C1,\"Osaka, 3F\",2026-09-21T14:13:20Z,job J-000001,120,70,"
        );
        assert_eq!(lines[2], "C2,,2026-09-21T14:13:20Z,job J-000001,5,,5");
        assert_eq!(lines[3], "");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(cell("a \"b\""), "\"a \"\"b\"\"\"");
        assert_eq!(cell("plain"), "plain");
    }
}
