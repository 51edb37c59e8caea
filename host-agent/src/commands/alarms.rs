//! `alarms list`, `alarms ack` and `watch --alarms`: the host's emergency display (the seed's
//! S312, Fig. 5).
//!
//! `watch --alarms` reads the retained `fleet/{serial}/alarm` views: on connecting it gets every
//! device's active alarms at once, then each change. The relay deletes a device's view when its
//! last alarm clears, so an alarm that was shown and is no longer in its device's view has
//! cleared.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::io::Write;

use anyhow::Context as _;
use chrono::{DateTime, Local, TimeZone, Utc};
use protocol::alarm::{AlarmStatus, AlarmView};
use protocol::host::{HostReply, HostRequest};
use protocol::{Serial, Timestamp};

use crate::cli::{AlarmAckArgs, AlarmListArgs};
use crate::client::{AlarmUpdate, ConnectOptions, HostClient, HostError, unexpected};
use crate::config::Settings;
use crate::tls::HostTls;

/// `alarms list`.
pub async fn list(
    client: &HostClient,
    args: AlarmListArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let alarms = fetch(client, args.all, args.serial.clone())
        .await
        .context("listing alarms")?;
    if args.json {
        let text = serde_json::to_string_pretty(&alarms).context("encoding alarms as JSON")?;
        writeln!(out, "{text}").context("writing to stdout")?;
        return Ok(());
    }
    write!(out, "{}", render(&alarms, &Local)).context("writing to stdout")?;
    if alarms.is_empty() && !args.all {
        eprintln!("no active alarms; `alarms list --all` also shows cleared ones");
    }
    Ok(())
}

/// Asks the relay for the alarms.
pub async fn fetch(
    client: &HostClient,
    all: bool,
    serial: Option<String>,
) -> Result<Vec<AlarmView>, HostError> {
    match client.request(HostRequest::Alarms { all, serial }).await? {
        HostReply::Alarms { alarms } => Ok(alarms),
        HostReply::Error { reason } => Err(HostError::Refused { reason }),
        other => Err(unexpected("alarms", &other)),
    }
}

/// `alarms ack ID`: prints the alarm as it now is.
pub async fn ack(
    client: &HostClient,
    args: AlarmAckArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let reply = client
        .request(HostRequest::AckAlarm {
            id: args.id.clone(),
        })
        .await
        .with_context(|| format!("acknowledging alarm {}", args.id))?;
    let alarm = match reply {
        HostReply::Alarm { alarm } => alarm,
        HostReply::Error { reason } => return Err(HostError::Refused { reason }.into()),
        other => return Err(unexpected("ack-alarm", &other).into()),
    };
    writeln!(out, "{}", line(&alarm, &Local)).context("writing to stdout")?;
    Ok(())
}

const SHORT: &str = "%Y-%m-%d %H:%M:%S";

fn local<Tz: TimeZone>(t: &DateTime<Utc>, tz: &Tz) -> String
where
    Tz::Offset: Display,
{
    t.with_timezone(tz).format(SHORT).to_string()
}

/// The alarm table: one line per alarm under a header, columns padded to fit.
pub fn render<Tz: TimeZone>(alarms: &[AlarmView], tz: &Tz) -> String
where
    Tz::Offset: Display,
{
    let header = [
        "ID", "SERIAL", "SITE", "KIND", "CODE", "STATUS", "RAISED", "ACKED BY", "DETAIL",
    ];
    let rows: Vec<[String; 9]> = alarms
        .iter()
        .map(|a| {
            [
                a.id.clone(),
                a.serial.clone(),
                a.site.clone(),
                a.kind.to_string(),
                a.code.clone(),
                a.status.to_string(),
                local(&a.raised_at, tz),
                a.acked_by.clone().unwrap_or_else(|| "-".into()),
                a.detail.clone(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        // No trailing blanks when the last cell is empty.
        while out.ends_with(' ') {
            out.pop();
        }
        out.push('\n');
    };
    push(header.to_vec());
    for row in &rows {
        push(row.iter().map(String::as_str).collect());
    }
    out
}

/// One alarm on one line, for `watch --alarms` and `alarms ack`.
pub fn line<Tz: TimeZone>(a: &AlarmView, tz: &Tz) -> String
where
    Tz::Offset: Display,
{
    let site = if a.site.is_empty() {
        String::new()
    } else {
        format!(" ({})", a.site)
    };
    let mut text = format!(
        "{}  {:<11}  {}  {}{}  {} {}",
        local(&a.updated_at, tz),
        a.status.as_str(),
        a.id,
        a.serial,
        site,
        a.kind,
        a.code
    );
    if !a.detail.is_empty() {
        text.push_str(&format!("  {}", a.detail));
    }
    if let Some(by) = &a.acked_by {
        text.push_str(&format!("  [acked by {by}]"));
    }
    text
}

/// What each device's alarms last looked like, so a retained view sent again prints nothing.
#[derive(Default)]
pub struct Seen {
    by_serial: HashMap<Serial, BTreeMap<String, AlarmView>>,
}

impl Seen {
    /// The alarms that changed with this update: new or changed ones as they are, and ones that
    /// left the device's view as `cleared` (at `now`).
    pub fn changes(&mut self, update: AlarmUpdate, now: Timestamp) -> Vec<AlarmView> {
        let mut before = self.by_serial.remove(&update.serial).unwrap_or_default();
        let mut out = Vec::new();
        let mut after = BTreeMap::new();
        for a in update.state.map(|s| s.alarms).unwrap_or_default() {
            let old = before.remove(&a.id);
            let changed = old.is_none_or(|o| {
                (o.status, &o.acked_by, o.updated_at) != (a.status, &a.acked_by, a.updated_at)
            });
            if changed {
                out.push(a.clone());
            }
            after.insert(a.id.clone(), a);
        }
        for (_, mut gone) in before {
            gone.status = AlarmStatus::Cleared;
            gone.cleared_at = Some(now);
            gone.updated_at = now;
            out.push(gone);
        }
        if !after.is_empty() {
            self.by_serial.insert(update.serial, after);
        }
        out
    }
}

/// `watch --alarms`: one line per alarm change until Ctrl-C or SIGTERM.
pub async fn watch(
    settings: &Settings,
    tls: HostTls,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let opts = ConnectOptions {
        client_id: Some(super::watch::client_id(&tls.host, "alarms")),
        watch_alarms: true,
        timeout: settings.timeout,
        proxy: settings.proxy.clone(),
        ..ConnectOptions::default()
    };
    let mut client = HostClient::connect_with(&settings.broker, tls.config, tls.host, opts).await?;
    let mut updates = client
        .take_alarm_states()
        .context("the session was opened without alarm views (a bug in host-agent)")?;
    // On stderr, so stdout is only alarm lines; a script may wait for this line to know that
    // the subscription is live.
    eprintln!("watching alarms on {}; Ctrl-C stops", settings.broker);
    let mut seen = Seen::default();
    let stop = super::watch::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            update = updates.recv() => {
                let Some(update) = update else {
                    anyhow::bail!("the connection to {} closed", settings.broker);
                };
                for alarm in seen.changes(update, chrono::Utc::now()) {
                    let text = if json {
                        serde_json::to_string(&alarm).context("encoding an alarm as JSON")?
                    } else {
                        line(&alarm, &Local)
                    };
                    writeln!(out, "{text}").context("writing to stdout")?;
                }
                out.flush().context("writing to stdout")?;
            }
        }
    }
    client.disconnect().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::alarm::{AlarmKind, AlarmState};

    fn at(s: i64) -> Timestamp {
        chrono::DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    fn alarm(id: &str, status: AlarmStatus) -> AlarmView {
        AlarmView {
            id: id.into(),
            serial: "C1".into(),
            site: "Kobe".into(),
            kind: AlarmKind::Fault,
            code: "SC-541".into(),
            detail: "main motor failure".into(),
            status,
            raised_at: at(0),
            received_at: at(0),
            updated_at: at(0),
            cleared_at: None,
            acked_by: None,
            acked_at: None,
            total: None,
        }
    }

    fn update(alarms: Vec<AlarmView>) -> AlarmUpdate {
        AlarmUpdate {
            serial: Serial::parse("C1").unwrap(),
            state: (!alarms.is_empty()).then(|| AlarmState {
                serial: "C1".into(),
                alarms,
            }),
        }
    }

    #[test]
    fn watch_prints_each_change_once_and_a_vanished_alarm_as_cleared() {
        let mut seen = Seen::default();
        let raised = alarm("A-000001", AlarmStatus::Raised);
        assert_eq!(seen.changes(update(vec![raised.clone()]), at(1)).len(), 1);
        assert!(
            seen.changes(update(vec![raised.clone()]), at(2)).is_empty(),
            "a retained view sent again"
        );
        let mut progress = raised.clone();
        progress.status = AlarmStatus::InProgress;
        progress.updated_at = at(3);
        let got = seen.changes(update(vec![progress]), at(3));
        assert_eq!(got[0].status, AlarmStatus::InProgress);
        let got = seen.changes(update(vec![]), at(4));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].status, AlarmStatus::Cleared);
        assert_eq!(got[0].cleared_at, Some(at(4)));
        assert!(seen.changes(update(vec![]), at(5)).is_empty());
    }

    #[test]
    fn the_table_and_line_show_what_the_desk_needs() {
        let mut a = alarm("A-000001", AlarmStatus::Raised);
        a.acked_by = Some("svc".into());
        let table = render(&[a.clone()], &Utc);
        let mut lines = table.lines();
        assert!(lines.next().unwrap().starts_with("ID "));
        let row = lines.next().unwrap();
        for want in [
            "A-000001",
            "C1",
            "Kobe",
            "fault",
            "SC-541",
            "raised",
            "svc",
            "main motor",
        ] {
            assert!(row.contains(want), "{want}: {row}");
        }
        let l = line(&a, &Utc);
        assert!(
            l.contains("raised") && l.contains("C1 (Kobe)") && l.contains("acked by svc"),
            "{l}"
        );
    }
}
