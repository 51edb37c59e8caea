//! The three fields a relay reads from a client certificate after every handshake — serial,
//! `notAfter`, and the subject's first CN and OU — read by walking the DER to them.
//!
//! x509-parser decodes the whole certificate (both names, the key, the signature) into owned
//! structures: 1.5 % of the relay's CPU in a reconnect storm of resumed sessions, whose
//! certificate comes out of the session ticket at every reconnect. The walk here allocates
//! nothing but the result. It takes only the plain form every certificate chukei issues has
//! (short lengths, UTC or generalized times without fractions, string values in UTF-8,
//! printable or IA5); for anything else it answers `None` and the caller parses the whole
//! certificate as before, so that both paths give the same answer wherever this one gives one.

/// Serial (content bytes, as written), `notAfter` (Unix seconds), CN, OU.
pub(crate) struct Fields<'a> {
    pub serial: &'a [u8],
    pub not_after: i64,
    pub cn: &'a str,
    pub ou: &'a str,
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION: u8 = 0xa0;
/// id-at-commonName, 2.5.4.3, and id-at-organizationalUnitName, 2.5.4.11.
const CN: &[u8] = &[0x55, 0x04, 0x03];
const OU: &[u8] = &[0x55, 0x04, 0x0b];

/// The fields, or `None` if `der` is not in the plain form this reads.
pub(crate) fn fields(der: &[u8]) -> Option<Fields<'_>> {
    let (cert, _) = element(der, SEQUENCE)?;
    let (tbs, _) = element(cert, SEQUENCE)?;
    let rest = match element(tbs, VERSION) {
        Some((_, rest)) => rest,
        None => tbs,
    };
    let (serial, rest) = element(rest, INTEGER)?;
    let (_signature, rest) = element(rest, SEQUENCE)?;
    let (_issuer, rest) = element(rest, SEQUENCE)?;
    let (validity, rest) = element(rest, SEQUENCE)?;
    let (subject, _) = element(rest, SEQUENCE)?;
    let (_, _not_before, validity) = tlv(validity)?;
    let not_after = not_after(validity)?;
    let (cn, ou) = cn_and_ou(subject)?;
    Some(Fields {
        serial,
        not_after,
        cn: cn?,
        ou: ou?,
    })
}

/// One element of type `tag` at the front of `input`: its content and what follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, content, rest) = tlv(input)?;
    (found == tag).then_some((content, rest))
}

/// The element at the front of `input`: its tag, its content and what follows it. Single-byte
/// tags and definite lengths of up to four bytes only.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, input) = input.split_first()?;
    let (len, input) = if first < 0x80 {
        (usize::from(first), input)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || input.len() < n {
            return None;
        }
        let (bytes, input) = input.split_at(n);
        let len = bytes.iter().fold(0usize, |l, b| (l << 8) | usize::from(*b));
        (len, input)
    };
    if input.len() < len {
        return None;
    }
    let (content, rest) = input.split_at(len);
    Some((tag, content, rest))
}

/// `notAfter` from the front of what follows `notBefore`.
fn not_after(input: &[u8]) -> Option<i64> {
    let (tag, text, _) = tlv(input)?;
    let digits = |s: &[u8]| -> Option<u32> {
        s.iter().try_fold(0u32, |n, b| {
            b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
        })
    };
    let (year, rest) = match (tag, text.len()) {
        // RFC 5280: two-digit years 50–99 are 19xx, 00–49 are 20xx.
        (UTC_TIME, 13) => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let month = u8::try_from(digits(&rest[0..2])?).ok()?;
    let day = u8::try_from(digits(&rest[2..4])?).ok()?;
    let (hour, minute, second) = (
        u8::try_from(digits(&rest[4..6])?).ok()?,
        u8::try_from(digits(&rest[6..8])?).ok()?,
        u8::try_from(digits(&rest[8..10])?).ok()?,
    );
    let date = time::Date::from_calendar_date(
        i32::try_from(year).ok()?,
        time::Month::try_from(month).ok()?,
        day,
    )
    .ok()?;
    let at = date.with_hms(hour, minute, second).ok()?;
    Some(at.assume_utc().unix_timestamp())
}

/// A name's first CN and first OU, each `None` if it has none.
type CnAndOu<'a> = (Option<&'a str>, Option<&'a str>);

/// The first CN and the first OU of a name; `None` if the name is not in the plain form (one
/// attribute per set, string values of a known type).
fn cn_and_ou(mut name: &[u8]) -> Option<CnAndOu<'_>> {
    let (mut cn, mut ou) = (None, None);
    while !name.is_empty() {
        let (set, rest) = element(name, SET)?;
        name = rest;
        let (attribute, more) = element(set, SEQUENCE)?;
        if !more.is_empty() {
            return None;
        }
        let (oid, value) = element(attribute, OID)?;
        let (tag, text, tail) = tlv(value)?;
        if !tail.is_empty() {
            return None;
        }
        let slot = match oid {
            CN => &mut cn,
            OU => &mut ou,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(string(tag, text)?);
        }
    }
    Some((cn, ou))
}

/// UTF8String, PrintableString or IA5String as text; any other type is left to x509-parser.
fn string(tag: u8, bytes: &[u8]) -> Option<&str> {
    match tag {
        0x0c | 0x13 | 0x16 => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{peer_cert, peer_cert_parsed};
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair, SerialNumber};
    use time::macros::datetime;

    /// A certificate with `names` as its subject, in order, expiring at `not_after`.
    fn cert(
        names: &[(DnType, DnValue)],
        serial: &[u8],
        not_after: time::OffsetDateTime,
    ) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        for (t, v) in names {
            dn.push(t.clone(), v.clone());
        }
        params.distinguished_name = dn;
        params.serial_number = Some(SerialNumber::from_slice(serial));
        params.not_before = datetime!(2020-01-01 0:00 UTC);
        params.not_after = not_after;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn utf8(s: &str) -> DnValue {
        DnValue::Utf8String(s.into())
    }

    fn printable(s: &str) -> DnValue {
        DnValue::PrintableString(s.try_into().unwrap())
    }

    fn same(der: &[u8]) {
        let quick = peer_cert(der).map_err(|e| e.to_string());
        let parsed = peer_cert_parsed(der).map_err(|e| e.to_string());
        assert_eq!(quick, parsed);
    }

    #[test]
    fn reads_what_x509_parser_reads_from_every_form_chukei_issues_and_more() {
        let device = [
            (DnType::CommonName, utf8("OSAKA-0001")),
            (DnType::OrganizationalUnitName, utf8("device")),
            (DnType::OrganizationName, utf8("chukei")),
        ];
        let times = [
            // A two-digit year of 50 or more is in the 1900s.
            datetime!(1999-12-31 23:59:59 UTC),
            datetime!(2030-06-01 12:34:56 UTC),
            // The last UTCTime year, and the first that RFC 5280 writes as GeneralizedTime.
            datetime!(2049-12-31 23:59:59 UTC),
            datetime!(2050-01-01 0:00 UTC),
            datetime!(2199-02-28 1:02:03 UTC),
        ];
        let serials: [&[u8]; 4] = [&[1], &[0x80, 0x01], &[0x00, 0x00, 0x7f], &[0xff; 20]];
        for not_after in times {
            for serial in serials {
                let der = cert(&device, serial, not_after);
                let f = fields(&der).expect("the plain form");
                assert_eq!((f.cn, f.ou), ("OSAKA-0001", "device"));
                assert_eq!(f.not_after, not_after.unix_timestamp());
                same(&der);
            }
        }
        // Other orders, other string types, repeated attributes: the first CN and OU count.
        let subjects: Vec<Vec<(DnType, DnValue)>> = vec![
            vec![
                (DnType::OrganizationalUnitName, printable("host")),
                (DnType::CommonName, printable("svc")),
            ],
            vec![
                (
                    DnType::CommonName,
                    DnValue::Ia5String("svc".try_into().unwrap()),
                ),
                (DnType::CommonName, utf8("second")),
                (DnType::OrganizationalUnitName, utf8("integrator")),
                (DnType::OrganizationalUnitName, utf8("device")),
            ],
            // Left to x509-parser: a string type this does not read.
            vec![
                (
                    DnType::CommonName,
                    DnValue::TeletexString("tx".try_into().unwrap()),
                ),
                (DnType::OrganizationalUnitName, utf8("device")),
            ],
            // No identity: both refuse, with x509-parser's reason.
            vec![(DnType::CommonName, utf8("C1"))],
            vec![(DnType::OrganizationalUnitName, utf8("device"))],
            vec![
                (DnType::CommonName, utf8("C1")),
                (DnType::OrganizationalUnitName, utf8("printer")),
            ],
            vec![],
        ];
        for subject in &subjects {
            same(&cert(subject, &[7], datetime!(2031-01-01 0:00 UTC)));
        }
        let teletex = cert(&subjects[2], &[7], datetime!(2031-01-01 0:00 UTC));
        assert!(fields(&teletex).is_none());
    }

    /// Whatever the bytes, no panic; wherever this reads a certificate x509-parser reads too,
    /// both read the same (it may read one whose key or signature x509-parser refuses: the
    /// relay reads only certificates rustls verified or its own session tickets carry).
    #[test]
    fn cut_or_altered_certificates_are_read_alike_or_left_to_x509_parser() {
        let der = cert(
            &[
                (DnType::CommonName, utf8("KOBE-7")),
                (DnType::OrganizationalUnitName, utf8("device")),
            ],
            &[0x3a, 0x0f, 0x9c],
            datetime!(2031-01-01 0:00 UTC),
        );
        for end in 0..der.len() {
            assert!(fields(&der[..end]).is_none(), "cut at {end}");
            same(&der[..end]);
        }
        let mut read_alike = 0;
        for i in 0..der.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = der.clone();
                bad[i] ^= flip;
                let quick = peer_cert(&bad);
                if let (Ok(q), Ok(p)) = (&quick, peer_cert_parsed(&bad)) {
                    assert_eq!(q, &p, "byte {i} ^ {flip:#x}");
                    read_alike += 1;
                }
            }
        }
        assert!(read_alike > 0);
    }
}
