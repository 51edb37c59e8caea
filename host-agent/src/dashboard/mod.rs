//! `host-agent dashboard`: the service desk's web page (the seed's host display of claim 42,
//! S117/S118/S312). The host agent connects *out* to the relay over mTLS like any
//! host and serves the page locally, so it never needs inbound access from the internet.
//!
//! One job per module:
//! - [`feed`]: the MQTT subscription to the fleet views (`fleet/+/jobs/+`, `fleet/+/state`,
//!   `fleet/+/alarm`), decoded into the [`model`].
//! - [`model`]: active alarms and device states, and a broadcast of what changed.
//! - [`routes`]: the axum router and the handlers; requests (list, submit, cancel, ack, meter
//!   readings, uploads) go through the [`HostClient`] and its `host/{id}/resp`.
//! - [`rollouts`]: the Rollouts page (waves as progress bars, pause/resume/abort/approve).
//! - [`html`] and [`chart`]: server-rendered HTML (maud: every value escaped) and the SVG chart.
//! - [`sse`]: the live stream (Server-Sent Events).
//! - [`auth`]: password (argon2 hash), session cookie and CSRF tokens.
//! - [`hosts`]: the names the dashboard answers to and the origins its forms may come from
//!   (against DNS rebinding).
//! - [`submit`]: the submit form, read into the wire message `jobs submit` sends.
//! - [`throttle`]: failed logins per source address (429 with `Retry-After` past five a minute).
//!
//! Decisions: plain server-rendered HTML with one small script and one stylesheet, both compiled
//! into the binary (no CDN, nothing to build at run time), and a Content-Security-Policy that
//! allows nothing else. Times are shown in UTC. Loopback by default; any other address needs
//! `--auth`. Every request must name the dashboard by its own address or an `--allowed-host`
//! name, so a page on another site cannot reach it by rebinding its name to this machine. The page is plain HTTP: beyond loopback, put it behind a TLS reverse proxy.

pub mod auth;
pub mod chart;
pub mod feed;
pub mod hosts;
pub mod html;
pub mod model;
pub mod rollouts;
pub mod routes;
pub mod sse;
pub mod submit;
pub mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use auth::PasswordHashString;
pub use feed::FeedConfig;
pub use hosts::{AllowedHost, AllowedHosts};
pub use model::Model;

use crate::client::HostClient;
use crate::keys::SigningKey;

/// The default `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Days of meter readings each device's chart covers, unless told otherwise.
pub const DEFAULT_COUNTER_DAYS: u32 = 30;

/// How the dashboard serves, beyond where it listens.
#[derive(Default)]
pub struct Options {
    /// The password's hash; `None`: anyone who reaches the address may use the page.
    pub password: Option<PasswordHashString>,
    /// Signs images uploaded through the submit form.
    pub signing_key: Option<SigningKey>,
    /// Days of meter readings behind the charts; 0 means [`DEFAULT_COUNTER_DAYS`].
    pub counter_days: u32,
    /// Names the dashboard answers to besides its listening address (`--allowed-host`).
    pub allowed_hosts: Vec<AllowedHost>,
}

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error(
        "refusing to serve the dashboard on {addr} without a password: anyone who can reach it could submit jobs. \
         Pass --auth FILE (a file holding the password), or listen on loopback (--listen 127.0.0.1:8080)"
    )]
    OpenToNetwork { addr: SocketAddr },
}

/// Safe by default: a non-loopback address needs a password.
pub fn check_listen(addr: SocketAddr, has_password: bool) -> Result<(), DashboardError> {
    if addr.ip().is_loopback() || has_password {
        Ok(())
    } else {
        Err(DashboardError::OpenToNetwork { addr })
    }
}

/// Serves the dashboard on `listener` until `stop`: starts the feed, then answers HTTP.
/// `client` carries the requests (it needs no job or alarm watching; the feed has its own
/// session). Returns once every connection has closed.
pub async fn serve(
    client: HostClient,
    feed: FeedConfig,
    listener: TcpListener,
    opts: Options,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listen = listener.local_addr()?;
    let model = Arc::new(Model::new());
    let client = Arc::new(client);
    let feed_task = tokio::spawn(feed::run(feed, model.clone(), client.clone(), stop.clone()));
    let app = Arc::new(routes::App {
        model,
        client,
        sessions: auth::Sessions::new(opts.password),
        logins: throttle::LoginThrottle::default(),
        signing_key: opts.signing_key,
        counter_days: if opts.counter_days == 0 {
            DEFAULT_COUNTER_DAYS
        } else {
            opts.counter_days
        },
        stop: stop.clone(),
        allowed: Arc::new(AllowedHosts::new(listen, opts.allowed_hosts)),
    });
    info!(addr = %listen, "dashboard serving");
    // The peer's address, for the log line of a refused request.
    let service = routes::router(app).into_make_service_with_connect_info::<SocketAddr>();
    let result = axum::serve(listener, service)
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await;
    stop.cancel();
    let _ = feed_task.await;
    result
}

/// The URL a person opens for `addr`: `localhost` names for the wildcard addresses, which a
/// browser cannot open as such.
pub fn url_for(addr: SocketAddr) -> String {
    let ip = addr.ip();
    if ip.is_unspecified() {
        return format!("http://localhost:{}/", addr.port());
    }
    match addr {
        SocketAddr::V4(a) => format!("http://{}:{}/", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("http://[{}]:{}/", a.ip(), a.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_may_go_without_a_password() {
        let cases = [
            ("127.0.0.1:8080", false, true),
            ("[::1]:8080", false, true),
            ("0.0.0.0:8080", false, false),
            ("192.0.2.7:8080", false, false),
            ("0.0.0.0:8080", true, true),
        ];
        for (addr, auth, ok) in cases {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(check_listen(addr, auth).is_ok(), ok, "{addr} auth={auth}");
        }
        let e = check_listen("0.0.0.0:80".parse().unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("--auth FILE"), "{e}");
        assert_eq!(
            url_for("0.0.0.0:8080".parse().unwrap()),
            "http://localhost:8080/"
        );
        assert_eq!(url_for("[::1]:80".parse().unwrap()), "http://[::1]:80/");
    }
}
