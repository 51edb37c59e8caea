//! Which HTTP proxy, if any, an agent goes through to reach a relay, decided as curl decides it:
//! the `--proxy` flag first, else `https_proxy` / `HTTPS_PROXY` / `all_proxy` / `ALL_PROXY` (both
//! `mqtts://` and `wss://` are TLS, so the HTTPS variables apply), and never for a host that
//! `no_proxy` / `NO_PROXY` names. The agent then asks the proxy for a `CONNECT` tunnel; the TLS
//! inside it is end to end, so the proxy sees neither the certificates nor the messages.
//!
//! Pure parsing and matching: the caller passes the environment in, so this stays free of I/O.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::url::BrokerUrl;

/// The port of a proxy URL that names none, as in curl.
pub const DEFAULT_PROXY_PORT: u16 = 1080;

/// `http://[user:password@]HOST[:PORT]`: an HTTP proxy that tunnels with `CONNECT`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    /// Basic credentials, percent-decoded.
    pub credentials: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "proxy {shown:?} is not valid: {why}; write it as http://HOST:PORT or http://USER:PASSWORD@HOST:PORT"
)]
pub struct BadProxy {
    /// The proxy as given, with any password masked.
    pub shown: String,
    pub why: &'static str,
}

impl FromStr for ProxyUrl {
    type Err = BadProxy;
    fn from_str(text: &str) -> Result<Self, BadProxy> {
        let bad = |why| BadProxy {
            shown: mask_password(text),
            why,
        };
        let rest = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => {
                return Err(bad(
                    "only http:// proxies are supported (the tunnel inside is TLS already)",
                ));
            }
            // curl takes a bare HOST:PORT as an HTTP proxy.
            None => text,
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains(['/', '?', '#']) {
            return Err(bad("a proxy URL has no path"));
        }
        let (credentials, authority) = match rest.rsplit_once('@') {
            Some((userinfo, authority)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let user = percent_decode(user).ok_or_else(|| bad("bad %-escape in the user"))?;
                let password =
                    percent_decode(password).ok_or_else(|| bad("bad %-escape in the password"))?;
                if user.is_empty() {
                    return Err(bad("the user before @ is empty"));
                }
                (Some((user, password)), authority)
            }
            None => (None, rest),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
            ),
            _ => (authority, DEFAULT_PROXY_PORT),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(' ') {
            return Err(bad("the host is missing"));
        }
        Ok(ProxyUrl {
            host: host.to_owned(),
            port,
            credentials,
        })
    }
}

impl ProxyUrl {
    /// `HOST:PORT`, with an IPv6 host in brackets.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Never shows the password: proxy URLs end up in logs.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.credentials {
            Some((user, _)) => write!(f, "http://{user}:***@{}", self.authority()),
            None => write!(f, "http://{}", self.authority()),
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

fn mask_password(text: &str) -> String {
    let Some((before, after)) = text.rsplit_once('@') else {
        return text.to_owned();
    };
    let start = before.find("://").map_or(0, |i| i + 3);
    match before[start..].split_once(':') {
        Some((user, _)) => format!("{}{user}:***@{after}", &before[..start]),
        None => text.to_owned(),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One entry of a `NO_PROXY` list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Skip {
    /// `*`: no proxy for anyone.
    All,
    /// A name: itself and every name under it (`example.com` covers `relay.example.com`).
    Domain(String),
    /// An address, or a network in CIDR form (`10.0.0.0/8`).
    Net(IpAddr, u8),
}

/// The hosts that bypass the proxy: `NO_PROXY`'s comma-separated list, read as curl reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy(Vec<Skip>);

impl NoProxy {
    pub fn parse(list: &str) -> NoProxy {
        let entries = list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e == "*" {
                    return Skip::All;
                }
                let (addr, bits) = match e.split_once('/') {
                    Some((a, b)) => (a, b.parse::<u8>().ok()),
                    None => (e, None),
                };
                let bare = addr.trim_start_matches('[').trim_end_matches(']');
                match bare.parse::<IpAddr>() {
                    Ok(ip) => {
                        let max = if ip.is_ipv4() { 32 } else { 128 };
                        Skip::Net(ip, bits.unwrap_or(max).min(max))
                    }
                    Err(_) => Skip::Domain(e.trim_start_matches('.').to_ascii_lowercase()),
                }
            })
            .collect();
        NoProxy(entries)
    }

    /// Whether `host` (as written in the relay's URL, never resolved) goes direct.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.0.iter().any(|skip| match (skip, ip) {
            (Skip::All, _) => true,
            (Skip::Net(net, bits), Some(ip)) => in_net(ip, *net, *bits),
            (Skip::Domain(d), None) => {
                host == *d
                    || host
                        .strip_suffix(d.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }
            _ => false,
        })
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (a, b, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    if shift >= 128 {
        return true;
    }
    (a >> shift) == (b >> shift)
}

/// The proxy to reach `url` through, curl's way. `flag` is `--proxy` (or the config file's
/// `proxy`); `env` looks up an environment variable. `NO_PROXY` applies to both, as curl's does.
pub fn proxy_for(
    url: &BrokerUrl,
    flag: Option<&ProxyUrl>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<ProxyUrl>, BadProxy> {
    let first = |names: &[&'static str]| {
        names
            .iter()
            .find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
    };
    if let Some((_, list)) = first(&["no_proxy", "NO_PROXY"])
        && NoProxy::parse(&list).matches(&url.host)
    {
        return Ok(None);
    }
    if let Some(proxy) = flag {
        return Ok(Some(proxy.clone()));
    }
    match first(&["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]) {
        Some((name, value)) => value
            .trim()
            .parse()
            .map(Some)
            .map_err(|e: BadProxy| BadProxy {
                shown: format!("{name}={}", e.shown),
                why: e.why,
            }),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        let ok = [
            ("http://proxy:3128", "proxy", 3128, None),
            ("proxy.corp:8080", "proxy.corp", 8080, None),
            ("http://proxy", "proxy", 1080, None),
            ("HTTP://10.0.0.1:3128/", "10.0.0.1", 3128, None),
            ("http://[::1]:3128", "::1", 3128, None),
            (
                "http://bob:s3cret@proxy:3128",
                "proxy",
                3128,
                Some(("bob", "s3cret")),
            ),
            (
                "http://bob:p%40ss%3Aw@proxy:3128",
                "proxy",
                3128,
                Some(("bob", "p@ss:w")),
            ),
            ("http://bob@proxy:3128", "proxy", 3128, Some(("bob", ""))),
        ];
        for (text, host, port, creds) in ok {
            let p: ProxyUrl = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((p.host.as_str(), p.port), (host, port), "{text}");
            let got = p
                .credentials
                .as_ref()
                .map(|(u, w)| (u.as_str(), w.as_str()));
            assert_eq!(got, creds, "{text}");
        }
        for bad in [
            "https://proxy:3128",
            "socks5://proxy:1080",
            "http://:3128",
            "http://proxy:0",
            "http://proxy:http",
            "http://proxy:3128/path",
            "http://:pw@proxy:1",
            "http://u:%zz@proxy:1",
        ] {
            let e = bad.parse::<ProxyUrl>().unwrap_err().to_string();
            assert!(e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn passwords_never_show() {
        let p: ProxyUrl = "http://bob:s3cret@proxy:3128".parse().unwrap();
        assert_eq!(p.to_string(), "http://bob:***@proxy:3128");
        assert!(!format!("{p:?}").contains("s3cret"));
        let e = "http://bob:s3cret@proxy:99999"
            .parse::<ProxyUrl>()
            .unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn no_proxy_matches_as_curl_does() {
        let list = NoProxy::parse(" example.com, .corp.local ,10.0.0.0/8, 192.168.1.7, ::1");
        let cases = [
            ("example.com", true),
            ("relay.example.com", true),
            ("RELAY.Example.COM", true),
            ("notexample.com", false),
            ("example.com.evil", false),
            ("a.corp.local", true),
            ("corp.local", true),
            ("10.20.30.40", true),
            ("11.0.0.1", false),
            ("192.168.1.7", true),
            ("192.168.1.8", false),
            ("::1", true),
            ("relay", false),
        ];
        for (host, want) in cases {
            assert_eq!(list.matches(host), want, "{host}");
        }
        assert!(NoProxy::parse("*").matches("anything"));
        assert!(!NoProxy::parse("").matches("anything"));
    }

    #[test]
    fn the_flag_wins_over_the_environment_and_no_proxy_over_both() {
        let url: BrokerUrl = "mqtts://relay.example.com:8883".parse().unwrap();
        let flag: ProxyUrl = "http://flag:1".parse().unwrap();
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let host = |p: Option<ProxyUrl>| p.map(|p| p.host);
        assert_eq!(host(proxy_for(&url, None, env(&[])).unwrap()), None);
        assert_eq!(
            host(proxy_for(&url, None, env(&[("HTTPS_PROXY", "http://big:2")])).unwrap()),
            Some("big".into())
        );
        assert_eq!(
            host(
                proxy_for(
                    &url,
                    None,
                    env(&[("HTTPS_PROXY", "http://big:2"), ("https_proxy", "small:3")])
                )
                .unwrap()
            ),
            Some("small".into())
        );
        assert_eq!(
            host(proxy_for(&url, None, env(&[("ALL_PROXY", "http://all:4")])).unwrap()),
            Some("all".into())
        );
        assert_eq!(
            host(proxy_for(&url, Some(&flag), env(&[("HTTPS_PROXY", "http://big:2")])).unwrap()),
            Some("flag".into())
        );
        assert_eq!(
            host(proxy_for(&url, Some(&flag), env(&[("NO_PROXY", "example.com")])).unwrap()),
            None
        );
        assert_eq!(
            host(
                proxy_for(
                    &url,
                    None,
                    env(&[("no_proxy", "other.org"), ("HTTPS_PROXY", "http://big:2")])
                )
                .unwrap()
            ),
            Some("big".into())
        );
        // http_proxy is for plain HTTP only, as in curl.
        assert_eq!(
            host(proxy_for(&url, None, env(&[("http_proxy", "http://plain:5")])).unwrap()),
            None
        );
        let e = proxy_for(&url, None, env(&[("HTTPS_PROXY", "socks5://x:1")])).unwrap_err();
        assert!(e.to_string().contains("HTTPS_PROXY="), "{e}");
    }
}
