//! `watch`: one line per job change across the fleet, until Ctrl-C.
//!
//! It reads the retained job views the broker keeps on `fleet/{serial}/jobs/{job}`: on connecting
//! it gets the current view of every job, then each change as it happens.

use std::collections::HashMap;
use std::io::Write;

use anyhow::Context as _;
use protocol::job::{JobStatus, JobView};
use protocol::{HostId, Timestamp};

use crate::cli::WatchArgs;
use crate::client::{ConnectOptions, HostClient};
use crate::config::Settings;
use crate::table::watch_line;
use crate::tls::HostTls;

/// Watches until Ctrl-C or SIGTERM, then disconnects cleanly and returns.
pub async fn run(
    settings: &Settings,
    tls: HostTls,
    args: WatchArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if args.alarms {
        return super::alarms::watch(settings, tls, args.json, out).await;
    }
    let opts = ConnectOptions {
        client_id: Some(client_id(&tls.host, "watch")),
        watch_jobs: true,
        watch_alarms: false,
        timeout: settings.timeout,
        proxy: settings.proxy.clone(),
    };
    let mut client = HostClient::connect_with(&settings.broker, tls.config, tls.host, opts).await?;
    let mut views = client
        .take_job_views()
        .context("the session was opened without job views (a bug in host-agent)")?;
    // On stderr, so stdout is only job lines; a script may wait for this line to know that the
    // subscription is live.
    eprintln!("watching job changes on {}; Ctrl-C stops", settings.broker);

    let mut seen = Seen::default();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            view = views.recv() => {
                let Some(view) = view else {
                    anyhow::bail!("the connection to {} closed", settings.broker);
                };
                if !seen.is_change(&view) {
                    continue;
                }
                let line = if args.json {
                    serde_json::to_string(&view).context("encoding a job view as JSON")?
                } else {
                    watch_line(&view)
                };
                writeln!(out, "{line}").context("writing to stdout")?;
                out.flush().context("writing to stdout")?;
            }
        }
    }
    client.disconnect().await;
    Ok(())
}

/// `watch` runs beside other commands of the same host; with the bare CN as its client id, each
/// `jobs submit` would take its session over (MQTT allows one session per client id). The
/// gateway accepts `CN:SUFFIX` for hosts (`protocol::acl::check_client_id`), so every session
/// of the CLI uses one: `{host}:{what}-{8 hex digits}`.
pub fn client_id(host: &HostId, what: &str) -> String {
    format!("{host}:{what}-{:08x}", rand::random::<u32>())
}

/// What each job last looked like, so a retained view sent again after a reconnect prints
/// nothing: one line per change, not per message.
#[derive(Default)]
pub struct Seen {
    last: HashMap<String, (JobStatus, Timestamp, Option<String>)>,
}

impl Seen {
    pub fn is_change(&mut self, view: &JobView) -> bool {
        let now = (view.status, view.updated_at, view.reason.clone());
        self.last.insert(view.id.clone(), now.clone()).as_ref() != Some(&now)
    }
}

/// Resolves on Ctrl-C or SIGTERM. If a handler cannot be installed, that signal keeps its
/// default action (the process ends), which is what the user asked for anyway.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, status: JobStatus) -> JobView {
        let t = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        JobView {
            id: id.into(),
            serial: "C1".into(),
            site: String::new(),
            instruction: "GET DATA".into(),
            data_type: "counters".into(),
            server: "relay".into(),
            host: "svc".into(),
            instruction_time: Some(t),
            execution_time: None,
            status,
            submitted_at: t,
            updated_at: t,
            reason: None,
        }
    }

    #[test]
    fn a_repeated_view_is_not_a_change() {
        let mut seen = Seen::default();
        assert!(seen.is_change(&view("J-1", JobStatus::Queued)));
        assert!(
            !seen.is_change(&view("J-1", JobStatus::Queued)),
            "a retained resend"
        );
        assert!(
            seen.is_change(&view("J-2", JobStatus::Queued)),
            "another job"
        );
        assert!(seen.is_change(&view("J-1", JobStatus::Delivered)));
        let mut later = view("J-1", JobStatus::Delivered);
        later.updated_at += chrono::Duration::seconds(1);
        assert!(seen.is_change(&later), "same status, newer update");
    }

    #[test]
    fn the_watch_client_id_is_one_the_gateway_accepts() {
        let host = HostId::parse("svc").unwrap();
        let id = client_id(&host, "watch");
        let who = protocol::Identity::host(&host);
        assert!(
            protocol::acl::check_client_id(&who, &id).is_allowed(),
            "{id}"
        );
        assert_ne!(id, "svc", "must not take over the host's CN session");
    }
}
