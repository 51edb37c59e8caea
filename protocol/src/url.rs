//! Where an agent finds the relay: `mqtts://HOST:PORT`.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
}

/// The port a relay listens on when the URL names none (MQTT over TLS).
pub const DEFAULT_PORT: u16 = 8883;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "broker URL {url:?} is not valid: {why}; write it as mqtts://HOST:PORT, e.g. mqtts://localhost:8883"
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
        let rest = url
            .strip_prefix("mqtts://")
            .ok_or_else(|| bad("the scheme must be mqtts://"))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
            ),
            _ => (rest, DEFAULT_PORT),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(bad("the host is missing"));
        }
        if port == 0 {
            return Err(bad("the port is not a number from 1 to 65535"));
        }
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "mqtts://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "mqtts://{}:{}", self.host, self.port)
        }
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
            assert_eq!(u.to_string().parse::<BrokerUrl>().unwrap(), u);
        }
        for bad in [
            "localhost:8883",
            "mqtt://x:1",
            "mqtts://:1",
            "mqtts://x:99999",
            "mqtts://x:0",
        ] {
            let e = bad.parse::<BrokerUrl>().unwrap_err().to_string();
            assert!(e.contains("mqtts://HOST:PORT"), "{bad}: {e}");
        }
    }
}
