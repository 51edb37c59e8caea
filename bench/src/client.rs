//! One MQTT connection of the load generator: TCP from a chosen loopback source address, TLS with
//! a client certificate (or plain TCP for rumqttd's plain listener), CONNECT and SUBSCRIBE.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

use crate::mqtt::{self, Incoming, Publish};

/// Where a relay listens, and whether it speaks TLS there.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// Long enough that no relay pings anyone out during a run (every run is under 15 minutes), so an
/// idle connection costs nothing but memory.
pub const KEEP_ALIVE_SECS: u16 = 1200;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Conn {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    pub wbuf: BytesMut,
    pkid: u16,
    /// Publishes that arrived before the SUBACK (retained messages may).
    early: Vec<Publish>,
    /// The TLS handshake resumed a session from a ticket.
    pub resumed: bool,
    /// The broker resumed the client's persistent MQTT session: its subscriptions are in place.
    pub session_present: bool,
}

impl Conn {
    /// Connects with a clean session ([`Conn::open_session`]).
    pub async fn open(
        endpoint: Endpoint,
        source: Ipv4Addr,
        tls: Option<&Arc<ClientConfig>>,
        client_id: &str,
    ) -> anyhow::Result<Conn> {
        Conn::open_session(endpoint, source, tls, client_id, true).await
    }

    /// Connects, sends CONNECT (a clean session, or asking to resume a persistent one) and waits
    /// for a successful CONNACK.
    pub async fn open_session(
        endpoint: Endpoint,
        source: Ipv4Addr,
        tls: Option<&Arc<ClientConfig>>,
        client_id: &str,
        clean: bool,
    ) -> anyhow::Result<Conn> {
        let socket = TcpSocket::new_v4()?;
        socket
            .bind(SocketAddr::new(IpAddr::V4(source), 0))
            .with_context(|| format!("binding to {source}"))?;
        let tcp = socket.connect(endpoint.addr).await.context("TCP connect")?;
        tcp.set_nodelay(true)?;
        let mut resumed = false;
        let io: Box<dyn Io> = match (endpoint.tls, tls) {
            (true, Some(config)) => {
                let name = ServerName::try_from("localhost").expect("a valid DNS name");
                let stream = TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake")?;
                resumed =
                    stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                Box::new(stream)
            }
            (true, None) => bail!("a TLS endpoint needs a client certificate"),
            (false, _) => Box::new(tcp),
        };
        let mut conn = Conn {
            io,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::with_capacity(256),
            pkid: 0,
            early: Vec::new(),
            resumed,
            session_present: false,
        };
        mqtt::connect(&mut conn.wbuf, client_id, KEEP_ALIVE_SECS, clean);
        conn.flush().await?;
        match conn.read().await? {
            Some(Incoming::ConnAck {
                code: 0,
                session_present,
            }) => {
                conn.session_present = session_present;
                Ok(conn)
            }
            Some(Incoming::ConnAck { code, .. }) => bail!("CONNACK refused with code {code}"),
            Some(other) => bail!("expected CONNACK, got {other:?}"),
            None => bail!("closed before CONNACK"),
        }
    }

    /// Subscribes at QoS 1 and waits for the SUBACK; every filter must be granted.
    pub async fn subscribe(&mut self, filters: &[String]) -> anyhow::Result<()> {
        if filters.is_empty() {
            return Ok(());
        }
        let pkid = self.next_pkid();
        mqtt::subscribe(&mut self.wbuf, pkid, filters);
        self.flush().await?;
        loop {
            match self.read().await? {
                Some(Incoming::SubAck { codes, .. }) => {
                    if codes.iter().any(|c| *c >= 0x80) {
                        bail!("subscription refused: {codes:?}");
                    }
                    return Ok(());
                }
                Some(Incoming::Publish(p)) => {
                    if p.qos > 0 {
                        mqtt::puback(&mut self.wbuf, p.pkid);
                    }
                    self.early.push(p);
                }
                Some(_) => {}
                None => bail!("closed before SUBACK"),
            }
        }
    }

    /// Publishes that arrived while subscribing.
    pub fn take_early(&mut self) -> Vec<Publish> {
        std::mem::take(&mut self.early)
    }

    pub fn next_pkid(&mut self) -> u16 {
        mqtt::next_pkid(&mut self.pkid)
    }

    /// The next packet, `Ok(None)` on a clean close. Cancel-safe: bytes read stay buffered.
    pub async fn read(&mut self) -> anyhow::Result<Option<Incoming>> {
        loop {
            if let Some(packet) = mqtt::decode(&mut self.rbuf)? {
                return Ok(Some(packet));
            }
            if self.rbuf.capacity() - self.rbuf.len() < 512 {
                self.rbuf.reserve(4096);
            }
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// The next packet if one is already buffered, without reading the socket.
    pub fn buffered(&mut self) -> anyhow::Result<Option<Incoming>> {
        Ok(mqtt::decode(&mut self.rbuf)?)
    }

    /// Writes whatever has been queued in `wbuf`.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.io.flush().await?;
        Ok(())
    }

    /// Sends DISCONNECT and closes, within a second.
    pub async fn close(mut self) {
        mqtt::disconnect(&mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.flush().await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}
