//! How a device reaches one relay: MQTT over TLS or over WebSocket over TLS, directly or through
//! an HTTP proxy's `CONNECT` tunnel. rumqttc makes the connection itself, with the
//! options the host agent uses too ([`link::mqtt_options`]); this module pairs each relay with its
//! proxy, and has a probe of its own that checks a relay is back without opening an MQTT session
//! there (see [`crate::failover`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use protocol::proxy::{BadProxy, ProxyUrl, proxy_for};
use protocol::url::BrokerUrl;
use rumqttc::MqttOptions;
use rumqttc::tokio_rustls::TlsConnector;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// One relay and the way to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: BrokerUrl,
    /// The HTTP proxy to tunnel through, if any.
    pub proxy: Option<ProxyUrl>,
}

impl Endpoint {
    pub fn direct(url: BrokerUrl) -> Endpoint {
        Endpoint { url, proxy: None }
    }

    /// The relays in order of preference, each with its proxy decided as curl decides it:
    /// `proxy` (the flag or config key) first, else `HTTPS_PROXY` and friends from `env`, and
    /// none for a host that `NO_PROXY` names (see [`protocol::proxy`]).
    pub fn resolve(
        urls: &[BrokerUrl],
        proxy: Option<&ProxyUrl>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<Endpoint>, BadProxy> {
        urls.iter()
            .map(|url| {
                Ok(Endpoint {
                    url: url.clone(),
                    proxy: proxy_for(url, proxy, &env)?,
                })
            })
            .collect()
    }

    /// rumqttc's options for this endpoint: transport, address and proxy (see [`link`]). The
    /// caller adds keepalive, limits and the rest.
    pub fn mqtt_options(&self, client_id: &str, tls: Arc<rustls::ClientConfig>) -> MqttOptions {
        link::mqtt_options(client_id, &self.url, self.proxy.as_ref(), tls)
    }
}

/// `wss://relay:443/mqtt via http://proxy:3128`, for logs (never shows a proxy password).
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.proxy {
            Some(proxy) => write!(f, "{} via {proxy}", self.url),
            None => write!(f, "{}", self.url),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("could not connect: {0}")]
    Connect(std::io::Error),
    #[error("the proxy refused the tunnel: {0}")]
    Proxy(String),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// Checks that `ep` is reachable and speaks our TLS — TCP, the proxy's tunnel if any, and a TLS
/// handshake with the device's certificate — then hangs up without a word of MQTT, so the relay
/// never sees a session (nor a device flickering online) for a mere probe.
pub async fn probe(
    ep: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    within: Duration,
) -> Result<(), ProbeError> {
    timeout(within, probe_inner(ep, tls))
        .await
        .map_err(|_| ProbeError::Timeout(within))?
}

async fn probe_inner(ep: &Endpoint, tls: Arc<rustls::ClientConfig>) -> Result<(), ProbeError> {
    let tcp = match &ep.proxy {
        Some(proxy) => {
            let mut tcp = TcpStream::connect(proxy.authority())
                .await
                .map_err(ProbeError::Connect)?;
            tunnel(&mut tcp, &ep.url, proxy).await?;
            tcp
        }
        None => TcpStream::connect(ep.url.authority())
            .await
            .map_err(ProbeError::Connect)?,
    };
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(ep.url.host.clone())
        .map_err(|_| ProbeError::ServerName(ep.url.host.clone()))?;
    let mut stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(ProbeError::Tls)?;
    let _ = stream.shutdown().await;
    Ok(())
}

/// The longest proxy response head we read.
const MAX_PROXY_HEAD: usize = 8192;

/// Asks an HTTP proxy for a `CONNECT` tunnel to `to` (RFC 9110 §9.3.6) and reads its answer.
async fn tunnel(tcp: &mut TcpStream, to: &BrokerUrl, proxy: &ProxyUrl) -> Result<(), ProbeError> {
    let target = to.authority();
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, password)) = &proxy.credentials {
        let token = base64(format!("{user}:{password}").as_bytes());
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Connect)?;
    // Byte by byte: the tunnel starts right after the head, and nothing of it may be read here.
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_HEAD {
            return Err(ProbeError::Proxy("response head too long".into()));
        }
        match tcp.read_u8().await {
            Ok(b) => head.push(b),
            Err(e) => return Err(ProbeError::Proxy(format!("closed before answering: {e}"))),
        }
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1);
    if status_line.starts_with("HTTP/1.") && code.is_some_and(|c| c.starts_with('2')) {
        Ok(())
    } else {
        Err(ProbeError::Proxy(status_line.trim().to_owned()))
    }
}

/// Standard base64 with padding (RFC 4648 §4), for the Basic credentials of a proxy.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{ProxyAuth, Transport};
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    #[test]
    fn base64_matches_rfc_4648() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("bob:s3cret", "Ym9iOnMzY3JldA=="),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
    }

    #[test]
    fn endpoints_take_their_proxy_as_curl_would() {
        let urls: Vec<BrokerUrl> = ["mqtts://relay-a:8883", "wss://relay-b.corp/mqtt"]
            .iter()
            .map(|u| u.parse().unwrap())
            .collect();
        let env = |name: &str| match name {
            "HTTPS_PROXY" => Some("http://envproxy:3128".to_owned()),
            "NO_PROXY" => Some(".corp".to_owned()),
            _ => None,
        };
        let eps = Endpoint::resolve(&urls, None, env).unwrap();
        assert_eq!(
            eps[0].proxy.as_ref().map(|p| p.host.as_str()),
            Some("envproxy")
        );
        assert_eq!(eps[1].proxy, None, "NO_PROXY names relay-b.corp");
        assert_eq!(
            eps[0].to_string(),
            "mqtts://relay-a:8883 via http://envproxy:3128"
        );
        let flag: ProxyUrl = "http://u:p@flag:1".parse().unwrap();
        let eps = Endpoint::resolve(&urls, Some(&flag), |_| None).unwrap();
        assert!(eps.iter().all(|e| e.proxy.as_ref() == Some(&flag)));
    }

    #[test]
    fn websocket_endpoints_give_rumqttc_the_whole_url() {
        let tls = test_tls();
        let ep = Endpoint::direct("wss://relay:9001/mqtt".parse().unwrap());
        let opts = ep.mqtt_options("C1", tls.clone());
        assert_eq!(
            opts.broker_address(),
            ("wss://relay:9001/mqtt".to_owned(), 9001)
        );
        assert!(matches!(opts.transport(), Transport::Wss(_)));
        let ep = Endpoint {
            url: "mqtts://relay:8883".parse().unwrap(),
            proxy: Some("http://bob:pw@proxy:3128".parse().unwrap()),
        };
        let opts = ep.mqtt_options("C1", tls);
        assert_eq!(opts.broker_address(), ("relay".to_owned(), 8883));
        let proxy = opts.proxy().unwrap();
        assert_eq!((proxy.addr.as_str(), proxy.port), ("proxy", 3128));
        assert!(matches!(proxy.auth, ProxyAuth::Basic { ref username, .. } if username == "bob"));
    }

    fn test_tls() -> Arc<rustls::ClientConfig> {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &[]).unwrap();
        let ca = pki::Ca::load(dir.path()).unwrap();
        let issued = ca.issue(protocol::Role::Device, "C1").unwrap();
        pki::client_config(ca.ca_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
    }

    /// A one-shot proxy that answers CONNECT with `status` and records the request head.
    async fn fake_proxy(
        status: &'static str,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(tcp);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                head.push_str(&line);
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            let mut tcp = reader.into_inner();
            tcp.write_all(format!("{status}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            head
        });
        (addr, task)
    }

    #[tokio::test]
    async fn the_probe_asks_the_proxy_for_a_tunnel_with_credentials() {
        let (addr, task) = fake_proxy("HTTP/1.1 403 Forbidden").await;
        let ep = Endpoint {
            url: "mqtts://relay.example:8883".parse().unwrap(),
            proxy: Some(format!("http://bob:s3cret@{addr}").parse().unwrap()),
        };
        let e = probe(&ep, test_tls(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("403 Forbidden"), "{e}");
        let head = task.await.unwrap();
        assert!(
            head.starts_with("CONNECT relay.example:8883 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Proxy-Authorization: Basic Ym9iOnMzY3JldA==\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn the_probe_fails_fast_on_a_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let ep = Endpoint::direct(format!("mqtts://{addr}").parse().unwrap());
        let e = probe(&ep, test_tls(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::Connect(_)), "{e}");
    }
}
