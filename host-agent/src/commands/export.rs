//! `export counters`: meter readings for billing (Fig. 3 counters), one row per device per
//! reading, as CSV (RFC 4180, written by the `csv` crate, every device-chosen text kept from
//! starting a spreadsheet formula) or JSON. The relay answers a page at a time; this asks until the
//! last page, then writes everything in one go.

use std::borrow::Cow;
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

/// `--from` when not given: the earliest time RFC 3339 can write, so every reading is at or
/// after it. The relay's request keeps both bounds (a relay of any release answers it).
pub const EARLIEST: &str = "0000-01-01T00:00:00Z";
/// `--to` when not given: past the latest time RFC 3339 can write (the bound is excluded).
pub const LATEST: &str = "9999-12-31T23:59:59.999Z";

/// Runs `export counters`: to `--output FILE` (written whole, then renamed into place) or stdout.
pub async fn counters(
    client: &HostClient,
    args: ExportCountersArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let from = args.from.as_deref().unwrap_or(EARLIEST);
    let to = args.to.as_deref().unwrap_or(LATEST);
    let readings = fetch_all(client, from, to, args.serial.clone())
        .await
        .context("exporting counters")?;
    let text = match args.format.as_str() {
        "json" => {
            let mut s =
                serde_json::to_vec_pretty(&readings).context("encoding readings as JSON")?;
            s.push(b'\n');
            s
        }
        _ => to_csv(&readings).context("writing the CSV")?,
    };
    match &args.output {
        Some(path) => {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("{} readings written to {}", readings.len(), path.display());
        }
        None => out.write_all(&text).context("writing to stdout")?,
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

/// A cell that holds a peer's text (a serial, a site, a counter's name or a text value): a
/// spreadsheet would run text that starts with `=`, `+`, `-` or `@` (or a tab or a carriage
/// return, which some strip first) as a formula, so, per OWASP's rule for CSV injection, such
/// text gets a leading `'`, which spreadsheets show as text and do not run.
fn text_cell(text: &str) -> Cow<'_, str> {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        Cow::Owned(format!("'{text}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// A counter's value: numbers and booleans as such (a negative number stays a number), text as
/// [`text_cell`].
fn value_cell(v: &Value) -> Cow<'_, str> {
    match v {
        Value::Int(n) => Cow::Owned(n.to_string()),
        Value::Bool(b) => Cow::Owned(b.to_string()),
        Value::Text(t) => text_cell(t),
    }
}

/// The CSV (RFC 4180, CRLF line ends): a header, then one line per reading; a counter a device
/// does not have is empty. Counter names come from devices, so the header goes through the same
/// writer as the cells: quoted where it holds a comma, a quote or a line break (a name cannot
/// add a column or a row), and kept from starting a formula.
pub fn to_csv(readings: &[CounterReading]) -> Result<Vec<u8>, csv::Error> {
    let others: BTreeSet<&str> = readings
        .iter()
        .flat_map(|r| r.counters.keys().map(String::as_str))
        .filter(|k| *k != "total")
        .collect();
    let mut out = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    let header = LEADING
        .iter()
        .map(|h| Cow::Borrowed(*h))
        .chain(others.iter().map(|k| text_cell(k)));
    out.write_record(header.map(|c| c.into_owned()))?;
    for r in readings {
        let read_at = r.read_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let leading = [
            text_cell(&r.serial),
            text_cell(&r.site),
            Cow::Borrowed(read_at.as_str()),
            text_cell(&r.source),
            r.counters.get("total").map(value_cell).unwrap_or_default(),
        ];
        let rest = others
            .iter()
            .map(|k| r.counters.get(*k).map(value_cell).unwrap_or_default());
        out.write_record(leading.into_iter().chain(rest).map(|c| c.into_owned()))?;
    }
    out.into_inner().map_err(|e| e.into_error().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_range_is_valid_rfc3339_and_holds_any_reading() {
        let earliest = chrono::DateTime::parse_from_rfc3339(EARLIEST).unwrap();
        let latest = chrono::DateTime::parse_from_rfc3339(LATEST).unwrap();
        let now = chrono::Utc::now();
        assert!(earliest < chrono::DateTime::UNIX_EPOCH && now < latest);
    }
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
        let csv = csv_text(&[
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

    /// Reads `text` back as a spreadsheet would: every record, every cell as it would be shown.
    fn records(text: &str) -> Vec<Vec<String>> {
        csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(text.as_bytes())
            .records()
            .map(|r| r.unwrap().iter().map(str::to_owned).collect())
            .collect()
    }

    #[test]
    fn device_chosen_names_stay_in_their_cells_and_are_never_formulas() {
        let hyperlink = "=HYPERLINK(\"http://evil.example/\",\"click\")";
        let csv = csv_text(&[reading(
            "C1",
            hyperlink,
            &[
                ("total", Value::Int(-3)),
                ("a,b\nc", Value::Int(1)),
                ("=1+1", Value::Int(2)),
                ("@SUM(A1)", Value::Int(3)),
                ("+cmd", Value::Text("-2+3".into())),
                ("\tx", Value::Text("\rR".into())),
                ("ok", Value::Text("plain \"quoted\"".into())),
            ],
        )]);
        let rows = records(&csv);
        assert_eq!(rows.len(), 2, "a header and one row, nothing stray:\n{csv}");
        let header: Vec<&str> = rows[0].iter().map(String::as_str).collect();
        assert_eq!(
            header,
            [
                "serial",
                "site",
                "read_at",
                "source",
                "total",
                "'\tx",
                "'+cmd",
                "'=1+1",
                "'@SUM(A1)",
                "a,b\nc",
                "ok"
            ],
            "{csv}"
        );
        let row: Vec<&str> = rows[1].iter().map(String::as_str).collect();
        let site = format!("'{hyperlink}");
        assert_eq!(
            row,
            [
                "C1",
                site.as_str(),
                "2026-09-21T14:13:20Z",
                "job J-000001",
                "-3",
                "'\rR",
                "'-2+3",
                "2",
                "3",
                "1",
                "plain \"quoted\""
            ],
            "a real number stays a number; device text never starts a formula:\n{csv}"
        );
        for cell in rows.iter().flatten() {
            if cell != "-3" {
                assert!(
                    !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
                    "a live formula: {cell:?}\n{csv}"
                );
            }
        }
    }

    fn csv_text(readings: &[CounterReading]) -> String {
        String::from_utf8(to_csv(readings).unwrap()).unwrap()
    }

    #[test]
    fn quotes_are_doubled_and_line_breaks_quoted() {
        let csv = csv_text(&[reading(
            "C1",
            "a \"b\"",
            &[("x\r\ny", Value::Text("1\n2".into()))],
        )]);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], "serial,site,read_at,source,total,\"x");
        assert_eq!(lines[1], "y\"");
        assert!(
            lines[2].starts_with("C1,\"a \"\"b\"\"\",") && lines[2].ends_with(",,\"1\n2\""),
            "{csv}"
        );
    }
}
