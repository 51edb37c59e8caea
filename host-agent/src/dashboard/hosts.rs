//! Which names the dashboard answers to, and which pages may send it forms: the lock against
//! DNS rebinding.
//!
//! A page on `rebind.attacker.example` whose name the attacker points at 127.0.0.1 is, to the
//! browser, the same origin as that name: its script may read what the dashboard answers (the
//! page, the cookie it sets, the forms' CSRF tokens) and post forms with them. What gives it away
//! is the name: the browser sends `Host: rebind.attacker.example`. So every request must name the
//! dashboard by one of its own names ([`AllowedHosts::allows`]):
//!
//! - an address (`127.0.0.1:8080`, `[::1]:8080`, `192.0.2.7:8080`) at the listening port: the
//!   address the listener is bound to, any loopback address when it is bound to loopback, any
//!   address when it is bound to all (`0.0.0.0`, `::`). An address cannot be rebound: a browser
//!   that sends it connected to it.
//! - `localhost` at the listening port, when the listener is reachable on loopback;
//! - the names given with `--allowed-host NAME` (or `NAME:PORT`), config key `allowed_hosts`:
//!   the name of a reverse proxy in front, or of this machine.
//!
//! A POST (any method but GET, HEAD and OPTIONS) must also come from one of those names: its
//! `Origin`, which browsers send on every such request, must be `http://` or `https://` one of
//! them. No `Origin` at all is let through (clients that are not browsers do not send it; they
//! still need the session's CSRF token); `Origin: null` is refused.
//!
//! Refusals: 421 Misdirected Request for a name, 403 for an origin, each with a text saying
//! how to open the page and which flag admits a name; logged a few a second with the peer.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use protocol::Shown;
use tracing::warn;

/// The port a `Host` without one means: the dashboard speaks plain HTTP.
const HTTP_PORT: u16 = 80;
const HTTPS_PORT: u16 = 443;

/// A host as a request names it: an address, or a name (lower case, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPart {
    Ip(IpAddr),
    Name(String),
}

impl fmt::Display for HostPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPart::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            HostPart::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            HostPart::Name(name) => f.write_str(name),
        }
    }
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`, as in a `Host` header; `None` if it is none.
fn parse_authority(text: &str) -> Option<(HostPart, Option<u16>)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let ip = v6.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (HostPart::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        };
        let host = match host.parse::<Ipv4Addr>() {
            Ok(ip) => HostPart::Ip(IpAddr::V4(ip)),
            Err(_) => HostPart::Name(name(host)?),
        };
        (host, port)
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
    };
    Some((host, port))
}

/// A DNS name, lower-cased and without its trailing dot; `None` unless it is one.
fn name(text: &str) -> Option<String> {
    let text = text.strip_suffix('.').unwrap_or(text);
    let ok = !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then(|| text.to_ascii_lowercase())
}

/// One `--allowed-host` entry: a name (or an address) the dashboard also answers to, at any
/// port, or only at the port given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    host: HostPart,
    port: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "`{text}` is not a host name the dashboard can answer to: give a name such as \
     dash.example.com, or NAME:PORT (no scheme, no path)"
)]
pub struct BadAllowedHost {
    text: String,
}

impl FromStr for AllowedHost {
    type Err = BadAllowedHost;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match parse_authority(text.trim()) {
            Some((host, port)) => Ok(AllowedHost { host, port }),
            None => Err(BadAllowedHost {
                text: text.to_owned(),
            }),
        }
    }
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

/// The names the dashboard answers to: those of its listening address, and those given.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    listen: SocketAddr,
    names: Vec<AllowedHost>,
}

/// Why a request was refused, and what the person should do; the response's text.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The request named no host, more than one, or one that is not the dashboard's.
    Host { named: Option<String> },
    /// A form from a page under another origin.
    Origin { origin: String },
}

impl AllowedHosts {
    pub fn new(listen: SocketAddr, names: Vec<AllowedHost>) -> AllowedHosts {
        AllowedHosts { listen, names }
    }

    /// Whether `authority` (a `Host` header, or the part of an origin after `scheme://`) names
    /// this dashboard; `default_port` is the port it means when it gives none.
    pub fn allows(&self, authority: &str, default_port: u16) -> bool {
        let Some((host, port)) = parse_authority(authority) else {
            return false;
        };
        let port = port.unwrap_or(default_port);
        let given = self
            .names
            .iter()
            .any(|a| a.host == host && a.port.is_none_or(|p| p == port));
        let listen_ip = self.listen.ip();
        let loopback = listen_ip.is_loopback() || listen_ip.is_unspecified();
        let own = port == self.listen.port()
            && match &host {
                HostPart::Ip(ip) => {
                    *ip == listen_ip
                        || listen_ip.is_unspecified()
                        || (listen_ip.is_loopback() && ip.is_loopback())
                }
                HostPart::Name(n) => loopback && n == "localhost",
            };
        given || own
    }

    /// Whether an `Origin` header's value is one of this dashboard's pages.
    pub fn allows_origin(&self, origin: &str) -> bool {
        let Some((scheme, rest)) = origin.split_once("://") else {
            return false;
        };
        let port = match scheme.to_ascii_lowercase().as_str() {
            "http" => HTTP_PORT,
            "https" => HTTPS_PORT,
            _ => return false,
        };
        self.allows(rest, port)
    }

    /// The checks, on a request's parts: every name it carries (the request line's, if it is
    /// in absolute form, and the one `Host` header) must be the dashboard's, and a POST's
    /// `Origin`, if any, too.
    pub fn check(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
        let hosts: Vec<&HeaderValue> = headers.get_all(header::HOST).iter().collect();
        let host = match hosts.as_slice() {
            [one] => one.to_str().ok(),
            _ => None,
        };
        let Some(host) = host else {
            return Err(Refusal::Host {
                named: hosts
                    .first()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            });
        };
        for named in uri
            .authority()
            .map(|a| a.as_str())
            .into_iter()
            .chain([host])
        {
            if !self.allows(named, HTTP_PORT) {
                return Err(Refusal::Host {
                    named: Some(named.to_owned()),
                });
            }
        }
        let safe = [Method::GET, Method::HEAD, Method::OPTIONS].contains(method);
        if !safe {
            for origin in headers.get_all(header::ORIGIN) {
                let text = origin.to_str().unwrap_or("");
                if !self.allows_origin(text) {
                    return Err(Refusal::Origin {
                        origin: String::from_utf8_lossy(origin.as_bytes()).into_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The URL to open instead.
    fn url(&self) -> String {
        super::url_for(self.listen)
    }

    /// The refusal's status, and a text saying what to do.
    fn explain(&self, refusal: &Refusal) -> (StatusCode, String) {
        match refusal {
            Refusal::Host { named: None } => (
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "This request names no host (or more than one), so it cannot be told from a \
                     DNS-rebinding attack. Open the dashboard as {}",
                    self.url()
                ),
            ),
            Refusal::Host { named: Some(named) } => {
                let shown = Shown(named).to_string();
                let bare = parse_authority(named)
                    .map_or_else(|| "NAME".to_owned(), |(h, _)| h.to_string());
                (
                    StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "This dashboard does not answer to the name {shown}: a page under a name \
                         that is not the dashboard's own may be a DNS-rebinding attack. Open it as \
                         {url}, or, if {bare} is a name of yours (this machine's, or a reverse \
                         proxy's in front of it), start the dashboard with --allowed-host {bare} \
                         (config key allowed_hosts).",
                        url = self.url(),
                        bare = Shown(&bare),
                    ),
                )
            }
            Refusal::Origin { origin } => (
                StatusCode::FORBIDDEN,
                format!(
                    "Refused: this form was sent from a page of {} (its Origin), not from one of \
                     the dashboard's own pages. Open the dashboard as {} and send it from there; \
                     if the dashboard sits behind a proxy under another name, start it with \
                     --allowed-host NAME (config key allowed_hosts).",
                    Shown(origin),
                    self.url()
                ),
            ),
        }
    }

    /// The refusal as an answer.
    fn answer(&self, refusal: &Refusal) -> Response {
        let mut resp = self.explain(refusal).into_response();
        resp.headers_mut().insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        resp
    }
}

/// Lines logged per second for refused requests: a page looping on the dashboard must not fill
/// the terminal; what is left out is counted in the next line.
const LOG_PER_SECOND: u64 = 5;

struct LogBudget {
    second: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

static LOG_BUDGET: LogBudget = LogBudget {
    second: AtomicU64::new(0),
    used: AtomicU64::new(0),
    suppressed: AtomicU64::new(0),
};

impl LogBudget {
    /// `Some(lines left out since the last one logged)` if this one may be logged.
    fn take(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < LOG_PER_SECOND {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The outermost layer: refuses, before anything else runs (no session, no cookie), a request
/// that does not name the dashboard, or a form from another origin.
pub async fn guard(State(allowed): State<Arc<AllowedHosts>>, req: Request, next: Next) -> Response {
    match allowed.check(req.method(), req.uri(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            if let Some(suppressed) = LOG_BUDGET.take() {
                let peer = req
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.to_string())
                    .unwrap_or_default();
                let path = req.uri().path();
                match &refusal {
                    Refusal::Host { named } => warn!(
                        peer = %peer,
                        host = %Shown(named.as_deref().unwrap_or("")),
                        path = %Shown(path),
                        suppressed,
                        "dashboard: refused a request for a name it does not answer to \
                         (DNS rebinding?); --allowed-host admits a name"
                    ),
                    Refusal::Origin { origin } => warn!(
                        peer = %peer,
                        origin = %Shown(origin),
                        path = %Shown(path),
                        suppressed,
                        "dashboard: refused a form from another origin"
                    ),
                }
            }
            allowed.answer(&refusal)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(listen: &str, names: &[&str]) -> AllowedHosts {
        AllowedHosts::new(
            listen.parse().unwrap(),
            names.iter().map(|n| n.parse().unwrap()).collect(),
        )
    }

    #[test]
    fn on_loopback_the_names_of_loopback_at_the_port_are_the_dashboards() {
        let a = allowed("127.0.0.1:8080", &[]);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "localhost.:8080",
            "[::1]:8080",
            "127.0.0.2:8080",
        ] {
            assert!(a.allows(ok, 80), "{ok}");
        }
        for refused in [
            "rebind.attacker.example:8080",
            "localhost.attacker.example:8080",
            "127.0.0.1.nip.io:8080",
            "localhost:8081",
            "127.0.0.1",
            "localhost",
            "192.0.2.7:8080",
            "",
            ":8080",
            "localhost:",
            "localhost:80a",
            "user@localhost:8080",
            "[::1",
            "[::1]x:8080",
            "local host:8080",
        ] {
            assert!(!a.allows(refused, 80), "{refused:?}");
        }
        // Port 80 is the one a Host without a port means.
        let a80 = allowed("127.0.0.1:80", &[]);
        assert!(a80.allows("localhost", 80) && a80.allows("127.0.0.1", 80));
    }

    #[test]
    fn other_listening_addresses_and_given_names() {
        let a = allowed("192.0.2.7:8080", &["dash.example", "nat.example:9090"]);
        assert!(a.allows("192.0.2.7:8080", 80));
        assert!(!a.allows("127.0.0.1:8080", 80), "not listening on loopback");
        assert!(!a.allows("localhost:8080", 80));
        assert!(!a.allows("192.0.2.8:8080", 80));
        assert!(a.allows("dash.example", 80) && a.allows("Dash.Example:8443", 80));
        assert!(a.allows("nat.example:9090", 80) && !a.allows("nat.example:9091", 80));
        assert!(!a.allows("dash.example.evil", 80) && !a.allows("x.dash.example", 80));

        // Listening on all addresses: any address at the port, and localhost.
        let any = allowed("0.0.0.0:8080", &[]);
        assert!(any.allows("192.0.2.7:8080", 80) && any.allows("localhost:8080", 80));
        assert!(!any.allows("192.0.2.7:8081", 80) && !any.allows("printer.lan:8080", 80));
    }

    #[test]
    fn an_origin_must_be_one_of_the_dashboards_pages() {
        let a = allowed("127.0.0.1:8080", &["dash.example"]);
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "https://dash.example",
            "HTTP://dash.example",
        ] {
            assert!(a.allows_origin(ok), "{ok}");
        }
        for refused in [
            "null",
            "http://rebind.attacker.example:8080",
            "http://127.0.0.1",
            "file://",
            "ftp://dash.example",
            "http://dash.example/path",
            "",
        ] {
            assert!(!a.allows_origin(refused), "{refused:?}");
        }
    }

    #[test]
    fn check_reads_the_host_header_the_request_line_and_a_posts_origin() {
        let a = allowed("127.0.0.1:8080", &[]);
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            h
        };
        let root: Uri = "/".parse().unwrap();
        let ok = headers(&[("host", "127.0.0.1:8080")]);
        assert_eq!(a.check(&Method::GET, &root, &ok), Ok(()));
        assert_eq!(
            a.check(&Method::GET, &root, &HeaderMap::new()),
            Err(Refusal::Host { named: None })
        );
        let two = headers(&[("host", "127.0.0.1:8080"), ("host", "evil:8080")]);
        assert!(a.check(&Method::GET, &root, &two).is_err());
        let absolute: Uri = "http://evil.example:8080/".parse().unwrap();
        assert_eq!(
            a.check(&Method::GET, &absolute, &ok),
            Err(Refusal::Host {
                named: Some("evil.example:8080".into())
            })
        );
        let foreign = headers(&[("host", "127.0.0.1:8080"), ("origin", "http://evil")]);
        assert_eq!(a.check(&Method::GET, &root, &foreign), Ok(()), "a GET");
        assert!(matches!(
            a.check(&Method::POST, &root, &foreign),
            Err(Refusal::Origin { .. })
        ));
        let own = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://localhost:8080"),
        ]);
        assert_eq!(a.check(&Method::POST, &root, &own), Ok(()));
        assert_eq!(a.check(&Method::POST, &root, &ok), Ok(()), "no Origin");
    }

    #[test]
    fn refusals_say_which_flag_admits_a_name() {
        let a = allowed("127.0.0.1:8080", &[]);
        let (status, text) = a.explain(&Refusal::Host {
            named: Some("dash.example:8080".into()),
        });
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
        assert!(
            text.contains("--allowed-host dash.example (config key allowed_hosts)")
                && text.contains("http://127.0.0.1:8080/"),
            "{text}"
        );
        let (status, text) = a.explain(&Refusal::Host {
            named: Some("a\nforged line".into()),
        });
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
        assert!(!text.contains('\n'), "{text}");
        let (status, text) = a.explain(&Refusal::Origin {
            origin: "null".into(),
        });
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(
            text.contains("Origin") && text.contains("--allowed-host"),
            "{text}"
        );
        assert!("dash.example".parse::<AllowedHost>().is_ok());
        assert!("[::1]:8080".parse::<AllowedHost>().is_ok());
        for bad in [
            "http://dash.example",
            "dash.example/x",
            "",
            "a b",
            "*.example",
        ] {
            let e = bad.parse::<AllowedHost>().unwrap_err().to_string();
            assert!(e.contains("NAME:PORT"), "{e}");
        }
    }
}
