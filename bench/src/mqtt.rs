//! The few MQTT 3.1.1 packets a load generator needs, encoded and decoded by hand.
//!
//! Why not rumqttc: the load shares two cores with the relay under test, so every microsecond the
//! client spends is taken from the relay. A client that is a buffer and a match costs far less
//! than a full event loop per device, and it lets one task drive many connections.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// What the load generator reads from a broker.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    ConnAck {
        code: u8,
        /// The broker resumed the client's persistent session (asked for with `clean` false).
        session_present: bool,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    Publish(Publish),
    PubAck {
        pkid: u16,
    },
    PingResp,
    /// Anything else a broker may send that the load generator ignores (UNSUBACK, PUBREC…).
    Other(u8),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub topic: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub pkid: u16,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("malformed remaining length")]
    BadLength,
    #[error("packet of {0} bytes is over the load generator's limit")]
    TooLarge(usize),
    #[error("malformed {0} packet")]
    Malformed(&'static str),
}

const MAX_PACKET: usize = 1 << 20;

/// Decodes one packet from the front of `buf`, or `Ok(None)` if more bytes are needed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Incoming>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut shift = 0;
    let mut header = 1;
    loop {
        let Some(&b) = buf.get(header) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << shift;
        header += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(DecodeError::BadLength);
        }
    }
    if len > MAX_PACKET {
        return Err(DecodeError::TooLarge(len));
    }
    if buf.len() < header + len {
        return Ok(None);
    }
    let first = buf[0];
    buf.advance(header);
    let mut body = buf.split_to(len).freeze();
    let packet = match first >> 4 {
        2 => {
            if body.len() < 2 {
                return Err(DecodeError::Malformed("CONNACK"));
            }
            Incoming::ConnAck {
                code: body[1],
                session_present: body[0] & 1 == 1,
            }
        }
        3 => {
            let qos = (first >> 1) & 3;
            let retain = first & 1 == 1;
            if body.len() < 2 {
                return Err(DecodeError::Malformed("PUBLISH"));
            }
            let tlen = usize::from(body.get_u16());
            if body.len() < tlen {
                return Err(DecodeError::Malformed("PUBLISH"));
            }
            let topic = body.split_to(tlen);
            let pkid = if qos > 0 {
                if body.len() < 2 {
                    return Err(DecodeError::Malformed("PUBLISH"));
                }
                body.get_u16()
            } else {
                0
            };
            Incoming::Publish(Publish {
                topic,
                qos,
                retain,
                pkid,
                payload: body,
            })
        }
        4 => {
            if body.len() < 2 {
                return Err(DecodeError::Malformed("PUBACK"));
            }
            Incoming::PubAck {
                pkid: body.get_u16(),
            }
        }
        9 => {
            if body.len() < 2 {
                return Err(DecodeError::Malformed("SUBACK"));
            }
            let pkid = body.get_u16();
            Incoming::SubAck {
                pkid,
                codes: body.to_vec(),
            }
        }
        13 => Incoming::PingResp,
        other => Incoming::Other(other),
    };
    Ok(Some(packet))
}

fn put_len(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}

/// CONNECT with no credentials (identity is the client certificate); without `clean`, asking to
/// resume the client's persistent session.
pub fn connect(out: &mut BytesMut, client_id: &str, keep_alive_secs: u16, clean: bool) {
    let len = 10 + 2 + client_id.len();
    out.put_u8(0x10);
    put_len(out, len);
    put_str(out, b"MQTT");
    out.put_u8(4); // protocol level 3.1.1
    out.put_u8(if clean { 0x02 } else { 0 }); // connect flags: clean session or not
    out.put_u16(keep_alive_secs);
    put_str(out, client_id.as_bytes());
}

/// SUBSCRIBE to each filter at QoS 1.
pub fn subscribe(out: &mut BytesMut, pkid: u16, filters: &[String]) {
    let len = 2 + filters.iter().map(|f| 2 + f.len() + 1).sum::<usize>();
    out.put_u8(0x82);
    put_len(out, len);
    out.put_u16(pkid);
    for f in filters {
        put_str(out, f.as_bytes());
        out.put_u8(1);
    }
}

/// PUBLISH at QoS 0 (pkid ignored) or 1.
pub fn publish(out: &mut BytesMut, topic: &[u8], qos: u8, pkid: u16, payload: &[u8]) {
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    out.put_u8(0x30 | (qos << 1));
    put_len(out, len);
    put_str(out, topic);
    if qos > 0 {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
}

pub fn puback(out: &mut BytesMut, pkid: u16) {
    out.put_u8(0x40);
    out.put_u8(2);
    out.put_u16(pkid);
}

pub fn disconnect(out: &mut BytesMut) {
    out.put_slice(&[0xe0, 0]);
}

/// Packet ids for QoS 1: 1..=65535, never 0.
pub fn next_pkid(pkid: &mut u16) -> u16 {
    *pkid = pkid.wrapping_add(1);
    if *pkid == 0 {
        *pkid = 1;
    }
    *pkid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_through_the_decoder() {
        let mut buf = BytesMut::new();
        let payload = vec![7u8; 300]; // a two-byte remaining length
        publish(&mut buf, b"dev/A/up/state", 1, 42, &payload);
        let Some(Incoming::Publish(p)) = decode(&mut buf).unwrap() else {
            panic!("not a publish")
        };
        assert_eq!(
            (&p.topic[..], p.qos, p.pkid, p.payload.len()),
            (&b"dev/A/up/state"[..], 1, 42, 300)
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn a_partial_packet_waits_for_more_bytes() {
        let mut full = BytesMut::new();
        publish(&mut full, b"t", 0, 0, b"hello");
        let mut part = BytesMut::from(&full[..4]);
        assert_eq!(decode(&mut part).unwrap(), None);
        assert_eq!(part.len(), 4, "nothing consumed");
    }

    #[test]
    fn acks_decode() {
        let mut buf =
            BytesMut::from(&[0x20, 2, 0, 0, 0x90, 3, 0, 1, 1, 0x40, 2, 0, 9, 0xd0, 0][..]);
        assert_eq!(
            decode(&mut buf).unwrap(),
            Some(Incoming::ConnAck {
                code: 0,
                session_present: false
            })
        );
        assert_eq!(
            decode(&mut buf).unwrap(),
            Some(Incoming::SubAck {
                pkid: 1,
                codes: vec![1]
            })
        );
        assert_eq!(
            decode(&mut buf).unwrap(),
            Some(Incoming::PubAck { pkid: 9 })
        );
        assert_eq!(decode(&mut buf).unwrap(), Some(Incoming::PingResp));
    }
}
