//! `dashboard`: serve the service desk's web page (see [`crate::dashboard`]) until Ctrl-C.

use std::io::Write;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::DashboardArgs;
use crate::client::{ConnectOptions, HostClient};
use crate::config::Settings;
use crate::dashboard::{self, FeedConfig, Options, PasswordHashString};
use crate::keys;
use crate::tls::HostTls;

/// Checks everything local first (password file, address, signing key, port), then connects to
/// the relay, prints the page's URL on stdout and serves until Ctrl-C or SIGTERM.
pub async fn run(
    settings: &Settings,
    tls: HostTls,
    args: DashboardArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let password = args
        .auth
        .as_deref()
        .map(PasswordHashString::from_file)
        .transpose()?;
    dashboard::check_listen(args.listen, password.is_some())?;
    let signing_key = args
        .signing_key
        .as_deref()
        .map(keys::load_signing_key)
        .transpose()?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "could not listen on {}; is another program using it? pick another with --listen",
            args.listen
        )
    })?;
    let addr = listener.local_addr().context("reading the bound address")?;

    let opts = ConnectOptions {
        client_id: Some(super::watch::client_id(&tls.host, "dashboard")),
        timeout: settings.timeout,
        proxy: settings.proxy.clone(),
        ..ConnectOptions::default()
    };
    let client =
        HostClient::connect_with(&settings.broker, tls.config.clone(), tls.host.clone(), opts)
            .await
            .context("connecting the dashboard to the relay")?;
    let feed = FeedConfig {
        broker: settings.broker.clone(),
        proxy: settings.proxy.clone(),
        tls: tls.config,
        host: tls.host,
    };

    // The URL alone on stdout, so a script (or a test) can read it; the rest on stderr.
    writeln!(out, "{}", dashboard::url_for(addr)).context("writing to stdout")?;
    out.flush().context("writing to stdout")?;
    eprintln!(
        "dashboard for {} on {}{}; Ctrl-C stops",
        settings.broker,
        dashboard::url_for(addr),
        if password.is_some() {
            " (password required)"
        } else {
            ""
        }
    );

    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        super::watch::shutdown_signal().await;
        on_signal.cancel();
    });
    // The flag, if given, replaces the file's list, as every flag does.
    let allowed_hosts = if args.allowed_hosts.is_empty() {
        settings.allowed_hosts.clone()
    } else {
        args.allowed_hosts
    };
    let opts = Options {
        password,
        signing_key,
        counter_days: args.counter_days,
        allowed_hosts,
    };
    dashboard::serve(client, feed, listener, opts, stop)
        .await
        .context("serving the dashboard")
}
