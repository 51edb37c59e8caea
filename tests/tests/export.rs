//! Meter reads for billing (Fig. 3 counters): `host-agent export counters` gives one CSV row per
//! device per reading, from get-data jobs and from the reports devices send on their own.

use harness::mqtt::envelope;
use harness::{TestEnv, deadline, secs};
use protocol::data::Value as DataValue;
use protocol::meter::CounterReport;
use protocol::topic::{self, UpKind};
use protocol::{Role, Serial};
use serde_json::Value;

/// The CSV as rows of (header → cell).
fn parse_csv(text: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let header: Vec<String> = lines
        .next()
        .expect("a header line")
        .split(',')
        .map(str::to_owned)
        .collect();
    // The cells here hold no commas or quotes (serials, sites without commas, numbers, times).
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            assert_eq!(cells.len(), header.len(), "a ragged row: {l}");
            header
                .iter()
                .cloned()
                .zip(cells.iter().map(|c| (*c).to_owned()))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn the_csv_export_has_one_row_per_reading_with_the_counters_that_were_sent() {
    let env =
        TestEnv::new("the_csv_export_has_one_row_per_reading_with_the_counters_that_were_sent");
    let from = (chrono::Utc::now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // A line per stored counters report (debug), counted below.
    let broker = env
        .broker()
        .log_also("broker::core::meter=debug")
        .start()
        .await;
    let _c1 = env.device("C1").site("Kobe").start(&broker).await;
    // C2 reads its counters every second on its own (a periodic meter read).
    let mut c2 = env
        .device("C2")
        .site("Osaka")
        .config("[report]\ncounters_every_secs = 1\n")
        .start(&broker)
        .await;
    let host = env.host("svc", &broker);

    // Two get-data jobs for C1: two readings, with exactly the counters the device sent.
    let mut sent = Vec::new();
    for _ in 0..2 {
        let job = host
            .submit(&[
                "--serial",
                "C1",
                "--kind",
                "get-data",
                "--sections",
                "counters,jams",
            ])
            .await;
        let detail = host.wait_for_status(&job, "succeeded", deadline()).await;
        sent.push((job, detail["data"]["counters"].clone()));
    }
    // A get-data job without the counters is not a reading.
    let jams_only = host
        .submit(&["--serial", "C1", "--kind", "get-data", "--sections", "jams"])
        .await;
    host.wait_for_status(&jams_only, "succeeded", deadline())
        .await;

    broker
        .wait_for_lines("two counters reports from C2", 2, secs(30), |l| {
            l.contains("counters report stored") && l.contains("serial=C2")
        })
        .await;
    c2.stop().await;

    let to = (chrono::Utc::now() + chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let csv = host
        .run_ok([
            "export", "counters", "--from", &from, "--to", &to, "--format", "csv",
        ])
        .await;
    let rows = parse_csv(&csv);
    // Counted after the export: a report in flight when C2 stopped is stored by now.
    let reports = broker
        .lines_matching(|l| l.contains("counters report stored") && l.contains("serial=C2"))
        .len();
    assert_eq!(
        &csv[..csv.find("\r\n").unwrap_or(0)][..34],
        "serial,site,read_at,source,total,a",
        "the leading columns, then the counters by name:\n{csv}"
    );

    let c1_rows: Vec<_> = rows.iter().filter(|r| r["serial"] == "C1").collect();
    assert_eq!(c1_rows.len(), 2, "one row per get-data reading:\n{csv}");
    for (job, counters) in &sent {
        let row = c1_rows
            .iter()
            .find(|r| r["source"] == format!("job {job}"))
            .unwrap_or_else(|| panic!("no row for {job}:\n{csv}"));
        assert_eq!(row["site"], "Kobe");
        let counters = counters.as_object().expect("a counters section");
        for name in ["total", "copy", "print", "fax", "scan", "a4", "duplex"] {
            assert_eq!(
                row[name],
                counters[name].to_string(),
                "{job}: counter {name} as the device sent it:\n{csv}"
            );
        }
    }
    let c2_rows: Vec<_> = rows.iter().filter(|r| r["serial"] == "C2").collect();
    assert_eq!(
        c2_rows.len(),
        reports,
        "one row per periodic report the relay stored:\n{csv}"
    );
    let totals: Vec<i64> = c2_rows
        .iter()
        .map(|r| r["total"].parse().expect("a number"))
        .collect();
    assert!(
        c2_rows
            .iter()
            .all(|r| r["source"] == "report" && r["site"] == "Osaka"),
        "{csv}"
    );
    assert!(
        totals.windows(2).all(|w| w[0] <= w[1]),
        "counters never go back: {totals:?}"
    );

    // JSON and a window that excludes everything.
    let json = host
        .run_ok([
            "export", "counters", "--from", &from, "--to", &to, "--format", "json",
        ])
        .await;
    let all: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(all.as_array().map(Vec::len), Some(rows.len()));
    let none = host
        .run_ok([
            "export",
            "counters",
            "--from",
            "2001-01-01T00:00:00Z",
            "--to",
            "2001-01-02T00:00:00Z",
        ])
        .await;
    assert_eq!(parse_csv(&none).len(), 0, "{none}");
    let bad = host
        .run(["export", "counters", "--from", "yesterday", "--to", &to])
        .await;
    assert_eq!(bad.status.code(), Some(1), "{bad}");
    assert!(bad.stderr.contains("RFC 3339"), "{bad}");
}

/// A device chooses its site and its counters' names; a billing spreadsheet must show them as
/// text in their own cells: no extra column or row, no live formula.
#[tokio::test]
async fn device_chosen_names_stay_in_their_cells_and_never_become_formulas() {
    const SITE: &str = "=HYPERLINK(\"http://evil.example/\",\"Osaka\")";
    let env = TestEnv::new("device_chosen_names_stay_in_their_cells");
    let from = (chrono::Utc::now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let broker = env
        .broker()
        .log_also("broker::core::meter=debug")
        .start()
        .await;
    // The real agent reports the site; a get-data job stores a reading under it.
    let mut c1 = env.device("C1").site(SITE).start(&broker).await;
    let host = env.host("svc", &broker);
    let job = host
        .submit(&[
            "--serial",
            "C1",
            "--kind",
            "get-data",
            "--sections",
            "counters",
        ])
        .await;
    host.wait_for_status(&job, "succeeded", deadline()).await;
    c1.stop().await;

    // Then C1's certificate sends a meter report with names of its own choosing.
    let (serial, client) = device_c1(&env, &broker).await;
    let counters = [
        ("total", DataValue::Int(7)),
        ("a,b\nc", DataValue::Int(1)),
        ("=1+1", DataValue::Int(2)),
        ("@SUM(A1)", DataValue::Int(3)),
        ("note", DataValue::Text("-1+2".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let report = CounterReport {
        read_at: chrono::Utc::now(),
        counters,
    };
    // An id the agent's own outbox has not used, or the relay would take it for a resend.
    client
        .publish(
            &topic::dev_up(&serial, UpKind::Counters),
            envelope(1 << 40, &report),
        )
        .await;
    broker
        .wait_for_lines("the hostile counters report", 1, secs(30), |l| {
            l.contains("counters report stored") && l.contains("msg_id=1099511627776")
        })
        .await;

    let to = (chrono::Utc::now() + chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let text = host
        .run_ok(["export", "counters", "--from", &from, "--to", &to])
        .await;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes());
    let rows: Vec<Vec<String>> = reader
        .records()
        .map(|r| {
            r.unwrap_or_else(|e| panic!("a ragged or broken CSV ({e}):\n{text}"))
                .iter()
                .map(str::to_owned)
                .collect()
        })
        .collect();
    assert_eq!(
        rows.len(),
        3,
        "a header and two readings, nothing stray:\n{text}"
    );
    let header = &rows[0];
    for name in ["'=1+1", "'@SUM(A1)", "a,b\nc", "note"] {
        assert!(header.iter().any(|h| h == name), "{name:?} in {header:?}");
    }
    let column = |name: &str| header.iter().position(|h| h == name).expect("a column");
    let hostile = rows
        .iter()
        .find(|r| r[column("total")] == "7")
        .unwrap_or_else(|| panic!("the report's row:\n{text}"));
    assert_eq!(hostile[column("'=1+1")], "2", "a number stays a number");
    assert_eq!(hostile[column("note")], "'-1+2");
    for row in &rows[1..] {
        assert_eq!(row[column("site")], format!("'{SITE}"), "{text}");
    }
    for cell in rows.iter().flatten() {
        assert!(
            !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
            "a live formula: {cell:?}\n{text}"
        );
    }
}

/// `export counters` with neither `--from` nor `--to` exports every reading, however old or far
/// ahead a device's clock put it; each flag alone narrows from its side.
#[tokio::test]
async fn without_from_and_to_every_reading_is_exported() {
    let env = TestEnv::new("without_from_and_to_every_reading_is_exported");
    let broker = env
        .broker()
        .log_also("broker::core::meter=debug")
        .start()
        .await;
    let (serial, client) = device_c1(&env, &broker).await;
    let times = [
        "1971-02-03T04:05:06Z",
        "2026-11-01T00:00:00Z",
        "2199-12-31T23:00:00Z",
    ];
    for (i, at) in times.iter().enumerate() {
        let report = CounterReport {
            read_at: chrono::DateTime::parse_from_rfc3339(at)
                .expect("a time")
                .with_timezone(&chrono::Utc),
            counters: [("total".to_owned(), DataValue::Int(i as i64 + 1))]
                .into_iter()
                .collect(),
        };
        client
            .publish(
                &topic::dev_up(&serial, UpKind::Counters),
                envelope(i as u64 + 1, &report),
            )
            .await;
    }
    broker
        .wait_for_lines("three counters reports", 3, secs(30), |l| {
            l.contains("counters report stored")
        })
        .await;

    let read_ats = |json: &str| -> Vec<String> {
        let rows: Value = serde_json::from_str(json).expect("JSON");
        rows.as_array()
            .expect("an array")
            .iter()
            .map(|r| {
                let at = r["read_at"].as_str().expect("read_at");
                chrono::DateTime::parse_from_rfc3339(at)
                    .expect("RFC 3339")
                    .with_timezone(&chrono::Utc)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            })
            .collect()
    };
    let all = host_export(&env, &broker, &["--format", "json"]).await;
    assert_eq!(read_ats(&all), times, "every reading, oldest first");
    let csv = host_export(&env, &broker, &[]).await;
    assert_eq!(parse_csv(&csv).len(), 3, "{csv}");
    let since = host_export(
        &env,
        &broker,
        &["--from", "2000-01-01T00:00:00Z", "--format", "json"],
    )
    .await;
    assert_eq!(read_ats(&since), times[1..], "--from alone");
    let until = host_export(
        &env,
        &broker,
        &["--to", "2000-01-01T00:00:00Z", "--format", "json"],
    )
    .await;
    assert_eq!(read_ats(&until), times[..1], "--to alone");
}

/// `host-agent export counters EXTRA…` as host `svc`: its stdout.
async fn host_export(env: &TestEnv, broker: &harness::Broker, extra: &[&str]) -> String {
    let mut args = vec!["export", "counters"];
    args.extend_from_slice(extra);
    env.host("svc", broker).run_ok(args).await
}

/// An MQTT session with device C1's certificate, to send reports the real agent would not.
async fn device_c1(env: &TestEnv, broker: &harness::Broker) -> (Serial, harness::MqttClient) {
    let serial = Serial::parse("C1").expect("a serial");
    let client = env
        .mqtt(Role::Device, "C1")
        .connect(broker)
        .await
        .expect("C1's certificate connects");
    (serial, client)
}
