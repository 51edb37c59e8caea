//! A client connection's framing: bytes in, MQTT packets out, and back.
//!
//! Memory is the budget here (a relay holds ~19,000 mostly idle devices per process), so no large
//! buffer is kept while a connection is idle: a read that starts with nothing buffered asks for a
//! few bytes only (that is the read an idle connection sits in), and only a read that filled its
//! buffer is followed by a large one; the write buffer is released after every flush. A busy
//! connection pays an allocation per read and per write, small beside the TLS record it carries.

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{self, Packet, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed in the middle of a packet")]
    ClosedMidPacket,
    #[error("malformed MQTT packet: {0:?}")]
    Malformed(protocol::Error),
    #[error("packet is larger than the limit of {max} bytes")]
    TooLarge { max: usize },
    /// MQTT 3.1.1 §3.1.4: a CONNECT that breaks the protocol is closed without a CONNACK.
    #[error("malformed CONNECT: {0}")]
    BadConnect(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How much a read asks for while data is flowing. A TLS record holds up to 16 KiB of plaintext;
/// 4 KiB takes dozens of small packets at once and is cheap to allocate for every read.
const READ_CHUNK: usize = 4096;
/// How much a read asks for when nothing suggests more data is waiting: what an idle connection
/// holds while it waits. Big enough for a PINGREQ or a small PUBLISH in one read.
const IDLE_READ: usize = 64;

/// Owns the socket and its buffers; the session above sees only packets.
pub struct ClientConn<S> {
    /// Boxed: a TLS stream is 1.2 KiB, and an async fn keeps its own copy of what it was passed,
    /// so each layer a connection goes through (listener, session, device session) would hold
    /// one more in the connection's task.
    io: Box<S>,
    buf: BytesMut,
    out: BytesMut,
    max_packet_bytes: usize,
    /// The last read filled all the room it had: more is probably waiting.
    busy: bool,
    /// QoS and packet id of the PUBLISH last decoded (see [`ClientConn::publish_id`]).
    publish_id: Option<PublishId>,
}

/// A client PUBLISH's QoS and packet id. rumqttd's `Publish` keeps both private (its local links
/// only ever carry QoS 0), so they are read from the packet's bytes before it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishId {
    pub qos: u8,
    pub pkid: u16,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientConn<S> {
    pub fn new(io: S, max_packet_bytes: usize) -> Self {
        Self {
            io: Box::new(io),
            buf: BytesMut::new(),
            out: BytesMut::new(),
            max_packet_bytes,
            busy: false,
            publish_id: None,
        }
    }

    pub fn io(&self) -> &S {
        &self.io
    }

    /// `Ok(None)`: the client closed cleanly between packets. Closing mid-packet is an error.
    /// Cancel-safe: bytes read so far stay in the buffer.
    pub async fn read_packet(&mut self) -> Result<Option<Packet>, ConnError> {
        loop {
            if let Some(packet) = self.buffered_packet()? {
                return Ok(Some(packet));
            }
            if self.buf.is_empty() {
                // Nothing partial to keep: drop a large buffer rather than sit on it.
                self.buf = BytesMut::new();
            }
            self.buf
                .reserve(if self.busy { READ_CHUNK } else { IDLE_READ });
            let room = self.buf.capacity() - self.buf.len();
            let n = self.io.read_buf(&mut self.buf).await?;
            self.busy = n == room;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::ClosedMidPacket)
                };
            }
        }
    }

    /// The next packet if a whole one is already buffered; never reads the socket. Lets the
    /// session hand everything one read brought to the router at once.
    pub fn buffered_packet(&mut self) -> Result<Option<Packet>, ConnError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let publish_id = peek_publish_id(&self.buf);
        let connect_flags = peek_connect_flags(&self.buf);
        match V4.read_mut(&mut self.buf, self.max_packet_bytes) {
            Ok(packet) => {
                if let Packet::Connect(..) = packet
                    && let Some(why) = connect_flags.and_then(connect_flags_problem)
                {
                    return Err(ConnError::BadConnect(why));
                }
                self.publish_id = publish_id;
                Ok(Some(unshare(packet)))
            }
            Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
            Err(protocol::Error::PayloadSizeLimitExceeded(_)) => Err(ConnError::TooLarge {
                max: self.max_packet_bytes,
            }),
            Err(e) => Err(ConnError::Malformed(e)),
        }
    }

    /// The QoS and packet id of the PUBLISH just returned by [`ClientConn::read_packet`] or
    /// [`ClientConn::buffered_packet`]; `None` after any other packet.
    pub fn publish_id(&self) -> Option<PublishId> {
        self.publish_id
    }

    /// Encodes a packet for the client; [`ClientConn::flush`] sends everything queued.
    pub fn queue(&mut self, packet: Packet) -> Result<(), ConnError> {
        V4.write(packet, &mut self.out)
            .map_err(ConnError::Malformed)?;
        Ok(())
    }

    /// Whether packets are queued that [`ClientConn::flush`] has not sent yet.
    pub fn has_unsent(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes what [`ClientConn::queue`] encoded, in one write, and releases the buffer.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.out = BytesMut::new();
            self.io.flush().await?;
        }
        Ok(())
    }

    /// Encodes packets for the client and flushes them in one write.
    pub async fn write_packets(
        &mut self,
        packets: impl IntoIterator<Item = Packet>,
    ) -> Result<(), ConnError> {
        for packet in packets {
            self.queue(packet)?;
        }
        self.flush().await
    }

    pub async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }
}

/// The QoS and packet id of the PUBLISH at the start of `buf`, read from its bytes (MQTT 3.1.1
/// §3.3: fixed header, remaining length, topic, then the packet id when QoS > 0). `None` for any
/// other packet or too few bytes; the decoder that runs next judges the packet itself.
fn peek_publish_id(buf: &[u8]) -> Option<PublishId> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    let mut at = variable_header_at(buf)?;
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    at += 2 + topic_len;
    let pkid = if qos == 0 {
        0
    } else {
        u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?])
    };
    Some(PublishId { qos, pkid })
}

/// Where the variable header of the packet at the start of `buf` begins: after the first byte and
/// the remaining length (1–4 bytes, seven bits each, the high bit saying another follows).
/// `None` if `buf` ends first or the length runs past four bytes.
fn variable_header_at(buf: &[u8]) -> Option<usize> {
    let mut at = 1;
    loop {
        let byte = *buf.get(at)?;
        at += 1;
        if byte & 0x80 == 0 {
            return Some(at);
        }
        if at > 4 {
            return None;
        }
    }
}

/// The connect flags of the CONNECT at the start of `buf` (MQTT 3.1.1 §3.1.2.3: after the fixed
/// header, the protocol name and the protocol level). rumqttd's decoder does not keep them, and
/// lets through some combinations the protocol forbids ([`connect_flags_problem`]). `None` for any
/// other packet or too few bytes.
fn peek_connect_flags(buf: &[u8]) -> Option<u8> {
    if *buf.first()? >> 4 != 1 {
        return None;
    }
    let at = variable_header_at(buf)?;
    let name_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    // The protocol name, then the level byte, then the flags.
    buf.get(at + 2 + name_len + 1).copied()
}

/// What is wrong with a CONNECT's flags, by MQTT 3.1.1 (each a "MUST close the connection").
fn connect_flags_problem(flags: u8) -> Option<&'static str> {
    const RESERVED: u8 = 0x01;
    const WILL: u8 = 0x04;
    const WILL_QOS: u8 = 0x18;
    const WILL_RETAIN: u8 = 0x20;
    const PASSWORD: u8 = 0x40;
    const USERNAME: u8 = 0x80;
    if flags & RESERVED != 0 {
        Some("the reserved connect flag is set (MQTT 3.1.1 §3.1.2.3)")
    } else if flags & PASSWORD != 0 && flags & USERNAME == 0 {
        Some("a password without a user name (MQTT 3.1.1 §3.1.2.9)")
    } else if flags & WILL == 0 && flags & (WILL_QOS | WILL_RETAIN) != 0 {
        Some("a will QoS or retain flag without a will (MQTT 3.1.1 §3.1.2.6)")
    } else if flags & WILL_QOS == WILL_QOS {
        Some("will QoS 3 (MQTT 3.1.1 §3.1.2.6)")
    } else {
        None
    }
}

/// A decoded PUBLISH borrows its topic and payload from the read buffer, and the router keeps
/// publishes in its log long after: a 100-byte message would pin a whole 4 KiB read. Copying them
/// out keeps the read buffer free to be reused or released, and the log's memory what it counts.
fn unshare(packet: Packet) -> Packet {
    match packet {
        Packet::Publish(mut publish, props) => {
            publish.topic = Bytes::copy_from_slice(&publish.topic);
            publish.payload = Bytes::copy_from_slice(&publish.payload);
            Packet::Publish(publish, props)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{PingReq, Publish};
    use tokio::io::AsyncWriteExt;

    fn encoded(packets: Vec<Packet>) -> Vec<u8> {
        let mut out = BytesMut::new();
        for p in packets {
            V4.write(p, &mut out).unwrap();
        }
        out.to_vec()
    }

    #[tokio::test]
    async fn one_read_of_many_packets_yields_each_and_holds_no_buffer_when_idle() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let mut conn = ClientConn::new(server, 1024);
        let mut client = client;
        let publish = |n: u8| {
            Packet::Publish(
                Publish::new(
                    Bytes::from_static(b"dev/A/up/state"),
                    Bytes::from(vec![n; 10]),
                    false,
                ),
                None,
            )
        };
        client
            .write_all(&encoded(vec![
                publish(1),
                publish(2),
                Packet::PingReq(PingReq),
            ]))
            .await
            .unwrap();
        let Some(Packet::Publish(first, _)) = conn.read_packet().await.unwrap() else {
            panic!("expected a publish")
        };
        assert_eq!(&first.payload[..], &[1; 10]);
        // The rest came in the same read and is handed out without touching the socket.
        assert!(matches!(
            conn.buffered_packet().unwrap(),
            Some(Packet::Publish(..))
        ));
        assert!(matches!(
            conn.buffered_packet().unwrap(),
            Some(Packet::PingReq(_))
        ));
        assert!(conn.buffered_packet().unwrap().is_none());
        assert_eq!(conn.buf.len(), 0);
        // Waiting for the next packet holds a small buffer, not a 4 KiB one.
        client
            .write_all(&encoded(vec![Packet::PingReq(PingReq)]))
            .await
            .unwrap();
        assert!(matches!(
            conn.read_packet().await.unwrap(),
            Some(Packet::PingReq(_))
        ));
        assert!(!conn.busy);
        drop(client);
        assert!(conn.read_packet().await.unwrap().is_none());
        assert!(conn.buf.capacity() <= IDLE_READ, "{}", conn.buf.capacity());
    }

    #[tokio::test]
    async fn closing_mid_packet_is_an_error_and_oversized_packets_are_refused() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut conn = ClientConn::new(server, 16);
        let bytes = encoded(vec![Packet::Publish(
            Publish::new(Bytes::from_static(b"t"), Bytes::from(vec![0; 64]), false),
            None,
        )]);
        client.write_all(&bytes).await.unwrap();
        assert!(matches!(
            conn.read_packet().await,
            Err(ConnError::TooLarge { max: 16 })
        ));

        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut conn = ClientConn::new(server, 1024);
        client.write_all(&bytes[..5]).await.unwrap();
        drop(client);
        assert!(matches!(
            conn.read_packet().await,
            Err(ConnError::ClosedMidPacket)
        ));
    }

    #[tokio::test]
    async fn the_qos_and_packet_id_of_each_publish_are_known() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut conn = ClientConn::new(server, 1024);
        let mut out = BytesMut::new();
        // rumqttd cannot build a QoS 1 publish, so it is written by hand: PUBLISH QoS 1, topic
        // "a/b", packet id 0x1234, payload "hi"; then a QoS 0 one for contrast.
        out.extend_from_slice(&[0x32, 9, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'h', b'i']);
        V4.write(
            Packet::Publish(
                Publish::new(Bytes::from_static(b"t"), Bytes::new(), false),
                None,
            ),
            &mut out,
        )
        .unwrap();
        client.write_all(&out).await.unwrap();
        let Some(Packet::Publish(first, _)) = conn.read_packet().await.unwrap() else {
            panic!("expected a publish")
        };
        assert_eq!(&first.payload[..], b"hi");
        assert_eq!(
            conn.publish_id(),
            Some(PublishId {
                qos: 1,
                pkid: 0x1234
            })
        );
        assert!(conn.read_packet().await.unwrap().is_some());
        assert_eq!(conn.publish_id(), Some(PublishId { qos: 0, pkid: 0 }));
        assert_eq!(
            peek_publish_id(&[0xc0, 0]),
            None,
            "PINGREQ is not a publish"
        );
        assert_eq!(peek_publish_id(&[0x32, 0xff, 0xff, 0xff, 0xff, 0x01]), None);
    }

    #[tokio::test]
    async fn connects_with_flags_the_protocol_forbids_are_refused() {
        let connect = |flags: u8, fields: &[&str]| {
            let mut body = vec![
                0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60, 0, 2, b'C', b'1',
            ];
            for f in fields {
                body.extend_from_slice(&(f.len() as u16).to_be_bytes());
                body.extend_from_slice(f.as_bytes());
            }
            let mut out = vec![0x10, body.len() as u8];
            out.extend_from_slice(&body);
            out
        };
        let cases: [(u8, &[&str], Option<&str>); 6] = [
            (0x02, &[], None),
            (0xc2, &["user", "secret"], None),
            (0x82, &["user"], None),
            (0x42, &["secret"], Some("password without a user name")),
            (0x03, &[], Some("reserved")),
            (0x1e, &["will/topic", "bye"], Some("will QoS 3")),
        ];
        for (flags, fields, want) in cases {
            let (mut client, server) = tokio::io::duplex(1024);
            let mut conn = ClientConn::new(server, 1024);
            client.write_all(&connect(flags, fields)).await.unwrap();
            match (conn.read_packet().await, want) {
                (Ok(Some(Packet::Connect(..))), None) => {}
                (Err(ConnError::BadConnect(why)), Some(want)) => {
                    assert!(why.contains(want), "{flags:#04x}: {why}")
                }
                // rumqttd's decoder refuses this one itself.
                (Err(ConnError::Malformed(_)), Some("will QoS 3")) => {}
                (got, want) => panic!("{flags:#04x}: {got:?}, wanted {want:?}"),
            }
        }
        assert_eq!(
            peek_connect_flags(&[0x10, 5, 0, 4, b'M']),
            None,
            "too short"
        );
        assert_eq!(peek_connect_flags(&[0xc0, 0]), None, "not a CONNECT");
    }

    #[tokio::test]
    async fn queued_packets_go_out_in_one_flush_and_the_buffer_is_released() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut conn = ClientConn::new(server, 1024);
        conn.queue(Packet::PingReq(PingReq)).unwrap();
        conn.queue(Packet::PingReq(PingReq)).unwrap();
        conn.flush().await.unwrap();
        assert_eq!(conn.out.capacity(), 0);
        let mut got = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut got)
            .await
            .unwrap();
        assert_eq!(got, [0xc0, 0, 0xc0, 0]);
    }
}
