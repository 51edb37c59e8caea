//! A client connection's framing: bytes in, MQTT packets out, and back.

use bytes::BytesMut;
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
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Owns the socket and its read buffer; the session above sees only packets.
pub struct ClientConn<S> {
    io: S,
    buf: BytesMut,
    out: BytesMut,
    max_packet_bytes: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientConn<S> {
    pub fn new(io: S, max_packet_bytes: usize) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(4096),
            out: BytesMut::with_capacity(4096),
            max_packet_bytes,
        }
    }

    pub fn io(&self) -> &S {
        &self.io
    }

    /// `Ok(None)`: the client closed cleanly between packets. Closing mid-packet is an error.
    /// Cancel-safe: bytes read so far stay in the buffer.
    pub async fn read_packet(&mut self) -> Result<Option<Packet>, ConnError> {
        loop {
            if !self.buf.is_empty() {
                match V4.read_mut(&mut self.buf, self.max_packet_bytes) {
                    Ok(packet) => return Ok(Some(packet)),
                    Err(protocol::Error::InsufficientBytes(_)) => {}
                    Err(protocol::Error::PayloadSizeLimitExceeded(_)) => {
                        return Err(ConnError::TooLarge {
                            max: self.max_packet_bytes,
                        });
                    }
                    Err(e) => return Err(ConnError::Malformed(e)),
                }
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::ClosedMidPacket)
                };
            }
        }
    }

    /// Encodes packets for the client and flushes them in one write.
    pub async fn write_packets(
        &mut self,
        packets: impl IntoIterator<Item = Packet>,
    ) -> Result<(), ConnError> {
        for packet in packets {
            V4.write(packet, &mut self.out)
                .map_err(ConnError::Malformed)?;
        }
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.out.clear();
            self.io.flush().await?;
        }
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }
}
