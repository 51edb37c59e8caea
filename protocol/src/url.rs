//! Where an agent finds the relay: `mqtts://HOST:PORT` (MQTT over TLS), or
//! `wss://HOST:PORT/mqtt` (MQTT over WebSocket over TLS, for networks whose proxy or firewall
//! lets only HTTPS out).

use std::fmt;
use std::str::FromStr;

/// How the agent speaks to the relay. Both are TLS with the same client certificate; WebSocket
/// adds an HTTP upgrade so the connection looks like HTTPS to the networks it crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheme {
    /// MQTT over TLS.
    #[default]
    Mqtts,
    /// MQTT over WebSocket over TLS (subprotocol `mqtt`).
    Wss,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Mqtts => "mqtts",
            Scheme::Wss => "wss",
        }
    }

    /// The port a relay listens on when the URL names none.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Mqtts => DEFAULT_PORT,
            Scheme::Wss => DEFAULT_WSS_PORT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub scheme: Scheme,
    /// The HTTP path of a `wss://` URL (`/mqtt` unless the URL names another); empty for `mqtts://`.
    pub path: String,
}

/// The port a relay listens on when the URL names none (MQTT over TLS).
pub const DEFAULT_PORT: u16 = 8883;
/// The port of a `wss://` URL that names none: HTTPS's, as a proxy expects.
pub const DEFAULT_WSS_PORT: u16 = 443;
/// The path of a `wss://` URL that names none, and the one the relay serves.
pub const DEFAULT_WS_PATH: &str = "/mqtt";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "broker URL {url:?} is not valid: {why}; write it as mqtts://HOST:PORT or wss://HOST:PORT/mqtt, e.g. mqtts://localhost:8883"
)]
pub struct BadUrl {
    pub url: String,
    pub why: &'static str,
}

impl FromStr for BrokerUrl {
    type Err = BadUrl;
    fn from_str(url: &str) -> Result<Self, BadUrl> {
        let bad = |why| BadUrl {
            url: url.to_owned(),
            why,
        };
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (Scheme::Mqtts, rest)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (Scheme::Wss, rest)
        } else {
            return Err(bad("the scheme must be mqtts:// or wss://"));
        };
        let (authority, path) = match (scheme, rest.find('/')) {
            (Scheme::Wss, Some(i)) => (&rest[..i], &rest[i..]),
            (Scheme::Wss, None) => (rest, DEFAULT_WS_PATH),
            (Scheme::Mqtts, _) => (rest.trim_end_matches('/'), ""),
        };
        if path.contains(['?', '#', ' ']) {
            return Err(bad("the path may not hold a query, a fragment or spaces"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
            ),
            _ => (authority, scheme.default_port()),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(bad("the host is missing"));
        }
        if port == 0 {
            return Err(bad("the port is not a number from 1 to 65535"));
        }
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
            scheme,
            path: path.to_owned(),
        })
    }
}

impl BrokerUrl {
    pub fn is_websocket(&self) -> bool {
        self.scheme == Scheme::Wss
    }

    /// `HOST:PORT`, with an IPv6 host in brackets: what a TCP connect and an HTTP `CONNECT` take.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme.as_str(),
            self.authority(),
            self.path
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ok = [
            ("mqtts://localhost:8883", "localhost", 8883),
            ("mqtts://127.0.0.1:1", "127.0.0.1", 1),
            ("mqtts://relay.example.com", "relay.example.com", 8883),
            ("mqtts://[::1]:9000", "::1", 9000),
        ];
        for (url, host, port) in ok {
            let u: BrokerUrl = url.parse().unwrap();
            assert_eq!((u.host.as_str(), u.port), (host, port), "{url}");
            assert_eq!(u.scheme, Scheme::Mqtts);
            assert_eq!(u.to_string().parse::<BrokerUrl>().unwrap(), u);
        }
        for bad in [
            "localhost:8883",
            "mqtt://x:1",
            "mqtts://:1",
            "mqtts://x:99999",
            "mqtts://x:0",
            "mqtts://x:1/mqtt",
            "ws://x:1/mqtt",
            "wss://:443/mqtt",
            "wss://x:0/mqtt",
            "wss://x:1/mqtt?a=b",
            "wss://user@x:1/mqtt",
        ] {
            let e = bad.parse::<BrokerUrl>().unwrap_err().to_string();
            assert!(e.contains("mqtts://HOST:PORT"), "{bad}: {e}");
            assert!(e.contains("wss://HOST:PORT/mqtt"), "{bad}: {e}");
        }
    }

    #[test]
    fn websocket_urls() {
        let ok = [
            (
                "wss://relay.example.com:8443/mqtt",
                "relay.example.com",
                8443,
                "/mqtt",
            ),
            (
                "wss://relay.example.com/mqtt",
                "relay.example.com",
                443,
                "/mqtt",
            ),
            ("wss://relay.example.com", "relay.example.com", 443, "/mqtt"),
            (
                "wss://10.0.0.1:9001/chukei/mqtt",
                "10.0.0.1",
                9001,
                "/chukei/mqtt",
            ),
            ("wss://[::1]:9001/mqtt", "::1", 9001, "/mqtt"),
        ];
        for (url, host, port, path) in ok {
            let u: BrokerUrl = url.parse().unwrap();
            assert_eq!(
                (u.host.as_str(), u.port, u.path.as_str()),
                (host, port, path),
                "{url}"
            );
            assert!(u.is_websocket());
            assert_eq!(u.to_string().parse::<BrokerUrl>().unwrap(), u);
        }
        let u: BrokerUrl = "wss://[::1]:9001/mqtt".parse().unwrap();
        assert_eq!(u.to_string(), "wss://[::1]:9001/mqtt");
        assert_eq!(u.authority(), "[::1]:9001");
    }
}
