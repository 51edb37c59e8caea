//! A structural check of every CBOR payload received from the network, before serde sees it.
//!
//! Why: serde preallocates a sequence or map from the length the input *declares* (up to 1 MiB
//! each), and a buffered enum (`#[serde(tag = …)]`, as [`crate::host::HostRequest`] is) keeps
//! every nested level alive at once. The fuzzer found that 787 bytes of maps nested as map keys,
//! each declaring 65,535 entries, made one decode hold 250 MiB (ciborium stops only at 256
//! levels). This walk reads every item's header without building anything, and refuses a
//! payload whose containers declare more items than it has bytes left, that ends before its
//! items do, or that nests deeper than [`MAX_DEPTH`]. What passes has, across all its containers,
//! at most one declared item per byte, so what serde preallocates is proportional to the
//! payload's length, which the caller's size cap (`max_payload_bytes`, `max_packet_bytes`) bounds.
//!
//! It lives here, not in the relay, because every binary decodes CBOR from the network: the relay
//! what clients send, the agents what the relay sends them. [`crate::Envelope::from_cbor`] and
//! [`crate::Envelope::peek_id`] apply it, so no decoder in any binary can skip it.
//!
//! It costs one pass over bytes that serde reads anyway; it allocates one small stack.

/// Deeper than any chukei message (about six levels) by a wide margin.
pub const MAX_DEPTH: usize = 32;

/// Refuses what could make a decoder allocate out of proportion to `bytes`; `Err` says why, in
/// words for the sender's rejection ack.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let mut pos = 0usize;
    // Items still expected in each open container: `Some(n)` for a definite length, `None` for an
    // indefinite one (ended by a break). The bottom entry is the one top-level item.
    let mut open: Vec<Option<u64>> = vec![Some(1)];
    while let Some(top) = open.last_mut() {
        if *top == Some(0) {
            open.pop();
            continue;
        }
        let initial = *bytes.get(pos).ok_or("CBOR ends in the middle of an item")?;
        pos += 1;
        if initial == 0xff {
            // A break closes an indefinite-length container, and nothing else.
            if top.is_some() {
                return Err("a CBOR break where an item was expected".to_owned());
            }
            open.pop();
            continue;
        }
        if let Some(n) = top {
            *n -= 1;
        }
        let (major, info) = (initial >> 5, initial & 0x1f);
        let arg = match info {
            0..=23 => Some(u64::from(info)),
            24..=27 => {
                let len = 1usize << (info - 24);
                let raw = bytes
                    .get(pos..pos + len)
                    .ok_or("CBOR ends in the middle of a length")?;
                pos += len;
                Some(raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
            }
            31 => None,
            _ => return Err(format!("reserved CBOR header byte 0x{initial:02x}")),
        };
        let left = (bytes.len() - pos) as u64;
        match (major, arg) {
            (0 | 1, Some(_)) | (7, _) => {}
            (0 | 1 | 6, None) => {
                return Err(format!("CBOR header byte 0x{initial:02x} is invalid"));
            }
            (2 | 3, Some(len)) => {
                if len > left {
                    return Err(format!(
                        "a CBOR string declares {len} bytes with {left} left"
                    ));
                }
                pos += len as usize;
            }
            (2..=5, None) => open.push(None),
            (4, Some(len)) => {
                if len > left {
                    return Err(format!(
                        "a CBOR array declares {len} items with {left} bytes left"
                    ));
                }
                open.push(Some(len));
            }
            (5, Some(len)) => {
                let items = len.saturating_mul(2);
                if items > left {
                    return Err(format!(
                        "a CBOR map declares {len} entries with {left} bytes left"
                    ));
                }
                open.push(Some(items));
            }
            (6, Some(_)) => open.push(Some(1)),
            _ => return Err(format!("CBOR header byte 0x{initial:02x} is invalid")),
        }
        if open.len() > MAX_DEPTH + 1 {
            return Err(format!("CBOR nested deeper than {MAX_DEPTH} levels"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor<T: serde::Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn real_messages_pass() {
        use crate::host::{HostRequest, SubmitJob};
        let env = crate::Envelope::new(
            7,
            chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap(),
            HostRequest::Submit(SubmitJob {
                serial: "C1".into(),
                kind: "get-data".into(),
                sections: vec!["counters".into()],
                ..Default::default()
            }),
        );
        check(&env.to_cbor().unwrap()).unwrap();
        check(&cbor(&(
            1u8,
            -5i64,
            1.5f64,
            "text",
            vec![true, false],
            [0u8; 3],
        )))
        .unwrap();
        // Indefinite lengths: an array and a map, each closed by a break.
        check(&[0x9f, 0x01, 0x02, 0xff]).unwrap();
        check(&[0xbf, 0x61, b'a', 0x01, 0xff]).unwrap();
        check(&[0xc1, 0x1a, 0, 0, 0, 1]).unwrap(); // a tagged integer
    }

    #[test]
    fn lengths_that_outrun_the_bytes_are_refused() {
        // A map declaring 65,535 entries in 4 bytes: the shape of the fuzzer's 250 MiB input.
        let e = check(&[0xb9, 0xff, 0xff, 0x00]).unwrap_err();
        assert!(e.contains("declares 65535 entries"), "{e}");
        let e = check(&[0x99, 0xff, 0xff]).unwrap_err();
        assert!(e.contains("array declares 65535 items"), "{e}");
        assert!(check(&[0x7a, 0xff, 0xff, 0xff, 0xff, b'a']).is_err());
        // Items that are not there.
        assert!(check(&[0x83, 0x01, 0x02]).is_err());
        assert!(check(&[]).is_err());
        assert!(check(&[0x1b, 0x00]).is_err());
    }

    #[test]
    fn deep_nesting_and_stray_breaks_are_refused() {
        let deep = vec![0x81; MAX_DEPTH + 1];
        let mut deep = deep;
        deep.push(0x00);
        assert!(check(&deep).unwrap_err().contains("deeper"));
        let ok = [vec![0x81; MAX_DEPTH - 1], vec![0x00]].concat();
        check(&ok).unwrap();
        assert!(check(&[0x82, 0x01, 0xff]).is_err());
        assert!(check(&[0xff]).is_err());
        assert!(check(&[0x1c]).is_err(), "reserved additional information");
    }
}
