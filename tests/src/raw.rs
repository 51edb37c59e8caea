//! MQTT over TLS by hand: packets encoded byte by byte and written in one go, so a test controls
//! exactly what reaches the broker together (fifty QoS 1 publishes in one write, a QoS 2 publish,
//! a SUBSCRIBE past a limit) — things a well-behaved client library will not do. Plus a plain
//! `GET /metrics`, to read the counters a test expects to move.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::{CertPaths, deadline};

/// MQTT control packet types (the high nibble of the first byte).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBACK: u8 = 9;
pub const UNSUBACK: u8 = 11;
pub const PINGRESP: u8 = 13;

/// CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
pub const ACCEPTED: u8 = 0;
pub const SERVER_UNAVAILABLE: u8 = 3;
pub const NOT_AUTHORIZED: u8 = 5;

/// One packet from the broker.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The packet type ([`CONNACK`], [`PUBACK`], …).
    pub kind: u8,
    /// The low nibble of the first byte.
    pub flags: u8,
    pub body: Vec<u8>,
}

impl Incoming {
    /// A PUBLISH's topic (lossy UTF-8); `None` for any other packet.
    pub fn topic(&self) -> Option<String> {
        if self.kind != PUBLISH || self.body.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        let topic = self.body.get(2..2 + len)?;
        Some(String::from_utf8_lossy(topic).into_owned())
    }
}

/// A TLS connection to the broker that speaks MQTT only as far as a test writes it.
pub struct RawClient {
    name: String,
    tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

fn read_pem(path: &Path) -> String {
    pki::read_pem_file(path).unwrap_or_else(|e| panic!("reading test certificate: {e}"))
}

/// The TLS client configuration of `certs` (its session tickets live in it).
pub fn client_config(certs: &CertPaths) -> Arc<rustls::ClientConfig> {
    pki::client_config(
        &read_pem(&certs.ca),
        &read_pem(&certs.cert),
        &read_pem(&certs.key),
    )
    .unwrap_or_else(|e| panic!("building a TLS client config from {certs:?}: {e}"))
}

impl RawClient {
    /// TCP and TLS only, from `source` if given (another 127.0.0.x address is another source to
    /// the broker). `Err` says why the broker would not finish the handshake.
    pub async fn tls_from(
        addr: SocketAddr,
        certs: &CertPaths,
        source: Option<IpAddr>,
    ) -> Result<RawClient, String> {
        let mut c = RawClient::tls_with(addr, &client_config(certs), source).await?;
        c.name = format!("raw client {}", certs.cert.display());
        Ok(c)
    }

    /// Like [`RawClient::tls_from`] with a TLS configuration the caller keeps: a second
    /// connection with the same one offers the session ticket the first received.
    pub async fn tls_with(
        addr: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
        source: Option<IpAddr>,
    ) -> Result<RawClient, String> {
        let tcp = tcp_from(addr, source).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio::time::timeout(
            deadline(),
            TlsConnector::from(Arc::clone(config)).connect(name, tcp),
        )
        .await
        .map_err(|_| format!("no TLS handshake with {addr} within {:?}", deadline()))?
        .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
        Ok(RawClient {
            name: "raw client".to_owned(),
            tls,
            buf: Vec::new(),
        })
    }

    /// TLS, CONNECT as `client_id`, and the CONNACK's return code (`Err` if the connection
    /// closed first). The connection stays open whatever the code, for the test to look at.
    pub async fn connect_as(
        addr: SocketAddr,
        certs: &CertPaths,
        client_id: &str,
    ) -> Result<(RawClient, u8), String> {
        let c = RawClient::tls_from(addr, certs, None).await?;
        c.mqtt_connect(client_id).await
    }

    /// CONNECT as `client_id` on this TLS connection, and the CONNACK's return code (`Err` if
    /// the connection closed first).
    pub async fn mqtt_connect(self, client_id: &str) -> Result<(RawClient, u8), String> {
        let (c, code, _) = self.mqtt_connect_session(client_id, true).await?;
        Ok((c, code))
    }

    /// CONNECT as `client_id` with a clean session or not, and the CONNACK's return code and
    /// "session present" flag (`Err` if the connection closed first).
    pub async fn mqtt_connect_session(
        self,
        client_id: &str,
        clean: bool,
    ) -> Result<(RawClient, u8, bool), String> {
        let mut c = self;
        c.name = format!("raw client {client_id:?}");
        let flags = if clean { 0x02 } else { 0 };
        c.send(&connect_full(client_id, 60, flags, &[])).await?;
        match c.next(deadline()).await? {
            Some(p) if p.kind == CONNACK && p.body.len() == 2 => {
                let (present, code) = (p.body[0] & 1 == 1, p.body[1]);
                Ok((c, code, present))
            }
            Some(p) => Err(format!("{}: expected a CONNACK, got {p:?}", c.name)),
            None => Err(format!("{}: closed before a CONNACK", c.name)),
        }
    }

    /// Like [`RawClient::connect_as`], and panics unless the CONNACK accepted the session.
    pub async fn connect(addr: SocketAddr, certs: &CertPaths, client_id: &str) -> RawClient {
        match RawClient::connect_as(addr, certs, client_id).await {
            Ok((c, ACCEPTED)) => c,
            Ok((_, code)) => panic!("CONNACK for {client_id:?} refused it with code {code}"),
            Err(e) => panic!("{e}"),
        }
    }

    /// Writes `bytes` in one write (one TLS record if under 16 KiB).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.tls
            .write_all(bytes)
            .await
            .and(self.tls.flush().await)
            .map_err(|e| format!("{}: write failed: {e}", self.name))
    }

    /// The next packet, `Ok(None)` if the broker closed the connection; `Err` if nothing came
    /// within `within`.
    pub async fn next(&mut self, within: Duration) -> Result<Option<Incoming>, String> {
        let name = self.name.clone();
        tokio::time::timeout(within, self.read_packet())
            .await
            .map_err(|_| format!("{name}: nothing from the broker within {within:?}"))
    }

    /// The whole packets of the first read that brings any, with what was already buffered:
    /// what the broker sent in one write comes in one read. `Ok(vec![])` if the broker closed the
    /// connection; `Err` if nothing came within `within`.
    pub async fn next_read(&mut self, within: Duration) -> Result<Vec<Incoming>, String> {
        let name = self.name.clone();
        tokio::time::timeout(within, async {
            loop {
                let mut packets = Vec::new();
                while let Some(p) = take_packet(&mut self.buf) {
                    packets.push(p);
                }
                if !packets.is_empty() {
                    return packets;
                }
                let mut chunk = [0u8; 4096];
                match self.tls.read(&mut chunk).await {
                    Ok(0) | Err(_) => return packets,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .map_err(|_| format!("{name}: nothing from the broker within {within:?}"))
    }

    async fn read_packet(&mut self) -> Option<Incoming> {
        loop {
            if let Some(p) = take_packet(&mut self.buf) {
                return Some(p);
            }
            let mut chunk = [0u8; 4096];
            match self.tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Waits for a packet of type `kind`, skipping others; panics if the connection closes.
    pub async fn expect(&mut self, kind: u8) -> Incoming {
        loop {
            match self.next(deadline()).await {
                Ok(Some(p)) if p.kind == kind => return p,
                Ok(Some(_)) => {}
                Ok(None) => panic!("{}: closed while waiting for packet type {kind}", self.name),
                Err(e) => panic!("{e} (waiting for packet type {kind})"),
            }
        }
    }

    /// Waits for the broker to close the connection; returns what it sent before. Panics if
    /// it is still open at the deadline.
    pub async fn expect_closed(&mut self) -> Vec<Incoming> {
        let mut seen = Vec::new();
        loop {
            match self.next(deadline()).await {
                Ok(Some(p)) => seen.push(p),
                Ok(None) => return seen,
                Err(e) => panic!("{e}: the broker did not close the connection"),
            }
        }
    }

    /// Sends DISCONNECT and waits for the broker to close the connection: the session ended as
    /// a client ends it normally.
    pub async fn disconnect(mut self) {
        self.send(&[0xe0, 0])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.expect_closed().await;
    }

    /// A PINGREQ answered by a PINGRESP: the session is alive.
    pub async fn ping(&mut self) {
        self.send(&[0xc0, 0])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.expect(PINGRESP).await;
    }

    /// A QoS 1 PUBLISH answered by its PUBACK.
    pub async fn publish_acked(&mut self, topic: &str, payload: &[u8], pkid: u16) {
        self.send(&publish(topic, payload, 1, pkid))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let ack = self.expect(PUBACK).await;
        assert_eq!(
            ack.body,
            pkid.to_be_bytes(),
            "{}: PUBACK for another id",
            self.name
        );
    }

    /// A SUBSCRIBE answered by its SUBACK; returns the SUBACK's return codes.
    pub async fn subscribe_acked(&mut self, pkid: u16, filters: &[&str]) -> Vec<u8> {
        self.send(&subscribe(pkid, filters))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let ack = self.expect(SUBACK).await;
        ack.body[2..].to_vec()
    }
}

async fn tcp_from(addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, String> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("binding to {ip}: {e}"))?;
    }
    socket
        .connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))
}

/// A plain TCP connection from `source`: for sockets that never start TLS.
pub async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> TcpStream {
    tcp_from(addr, source)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Removes the first whole packet from `buf`, if there is one.
fn take_packet(buf: &mut Vec<u8>) -> Option<Incoming> {
    let first = *buf.first()?;
    let mut len = 0usize;
    let mut at = 1;
    loop {
        let byte = *buf.get(at)?;
        len |= usize::from(byte & 0x7f) << (7 * (at - 1));
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        assert!(at <= 4, "the broker sent a malformed remaining length");
    }
    if buf.len() < at + len {
        return None;
    }
    let body = buf[at..at + len].to_vec();
    buf.drain(..at + len);
    Some(Incoming {
        kind: first >> 4,
        flags: first & 0x0f,
        body,
    })
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("MQTT strings are under 64 KiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// CONNECT (MQTT 3.1.1, clean session).
pub fn connect(client_id: &str, keep_alive: u16) -> Vec<u8> {
    connect_full(client_id, keep_alive, 0x02, &[])
}

/// CONNECT with the connect flags byte as given (MQTT 3.1.1 §3.1.2.3: 0x80 user name, 0x40
/// password, 0x02 clean session, 0x01 reserved), followed by `fields` (will topic and message,
/// user name, password: whichever the flags announce, in that order).
pub fn connect_with_flags(client_id: &str, flags: u8, fields: &[&str]) -> Vec<u8> {
    connect_full(client_id, 60, flags, fields)
}

fn connect_full(client_id: &str, keep_alive: u16, flags: u8, fields: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    string(&mut body, client_id);
    for f in fields {
        string(&mut body, f);
    }
    packet(0x10, &body)
}

/// PUBLISH at `qos` (0, 1 or 2); `pkid` is ignored at QoS 0.
pub fn publish(topic: &str, payload: &[u8], qos: u8, pkid: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// PUBLISH at `qos` with the retain flag set.
pub fn publish_retained(topic: &str, payload: &[u8], qos: u8, pkid: u16) -> Vec<u8> {
    let mut bytes = publish(topic, payload, qos, pkid);
    bytes[0] |= 0x01;
    bytes
}

/// The start of a TLS handshake that never finishes: a handshake record header announcing a
/// 512-byte ClientHello, and its first few bytes. A slow client, not a silent one.
pub const PARTIAL_CLIENT_HELLO: [u8; 9] = [22, 3, 1, 2, 0, 1, 0, 1, 252];

/// SUBSCRIBE to every filter at QoS 1.
pub fn subscribe(pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for f in filters {
        string(&mut body, f);
        body.push(1);
    }
    packet(0x82, &body)
}

pub fn unsubscribe(pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for f in filters {
        string(&mut body, f);
    }
    packet(0xa2, &body)
}

/// The broker's Prometheus text (`GET /metrics` over plain HTTP), the response's head included.
pub async fn scrape(addr: SocketAddr) -> String {
    get(addr, "/metrics").await
}

/// `GET path` over plain HTTP/1.1 on a fresh connection: the whole response, head and body.
async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap_or_else(|e| panic!("writing to {addr}: {e}"));
    let mut out = String::new();
    tokio::time::timeout(deadline(), s.read_to_string(&mut out))
        .await
        .unwrap_or_else(|_| panic!("no answer from {addr}{path}"))
        .unwrap_or_else(|e| panic!("reading {addr}{path}: {e}"));
    out
}

/// `GET path` over plain HTTP/1.1 (the metrics listener's `/healthz`, `/readyz`): the status
/// code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let out = get(addr, path).await;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response from {addr}{path}:\n{out}"));
    let body = out
        .split_once("\r\n\r\n")
        .map_or_else(String::new, |(_, b)| b.to_owned());
    (status, body)
}

/// The value of one sample (`name` with its labels, e.g. `x_total{limit="a"}`) in `text`.
pub fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in the metrics:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_framed_both_ways() {
        let mut buf = publish("a/b", &[7; 200], 1, 0x1234);
        assert_eq!(buf[0], 0x32);
        // 2 + 3 + 2 + 200 = 207: two length bytes.
        assert_eq!(&buf[1..3], &[207 & 0x7f | 0x80, 1]);
        buf.extend_from_slice(&[0xd0, 0]);
        let p = take_packet(&mut buf).unwrap();
        assert_eq!((p.kind, p.flags, p.body.len()), (PUBLISH, 2, 207));
        let p = take_packet(&mut buf).unwrap();
        assert_eq!(p.kind, PINGRESP);
        assert!(take_packet(&mut buf).is_none());
        let mut partial = connect("C1", 60);
        partial.pop();
        assert!(take_packet(&mut partial).is_none());
        assert_eq!(sample("a 1\nb{x=\"y\"} 22\n", "b{x=\"y\"}"), 22);
    }
}
