//! Device data (Fig. 3): what a GET DATA job collects, section by section.
//!
//! Each section is a flat map of named values, so a new counter or setting needs no protocol
//! change, and the same names are what an UPDATE DATA job will address.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The sections of Fig. 3 a host can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Section {
    /// Maintenance and billing counters: total, per paper size, per function, PM, drum…
    Counters,
    /// Body serial, option serials and configuration, ROM versions.
    Identification,
    /// When the device last called the host, and why.
    Calls,
    /// Periodic call settings: every N counts, at set times.
    CallSettings,
    /// Paper jams and service calls: counts, last time, where, history.
    Jams,
    /// Machine adjustment, fax and system settings.
    Adjustment,
    /// Communication log and user settings.
    Comms,
    /// Other settings: host selection, identification password (never sent in clear).
    Settings,
}

impl Section {
    pub const ALL: [Section; 8] = [
        Section::Counters,
        Section::Identification,
        Section::Calls,
        Section::CallSettings,
        Section::Jams,
        Section::Adjustment,
        Section::Comms,
        Section::Settings,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Section::Counters => "counters",
            Section::Identification => "identification",
            Section::Calls => "calls",
            Section::CallSettings => "call-settings",
            Section::Jams => "jams",
            Section::Adjustment => "adjustment",
            Section::Comms => "comms",
            Section::Settings => "settings",
        }
    }

    /// The names, comma-separated, for error messages and `--help`.
    pub fn names() -> String {
        Section::ALL.map(Section::as_str).join(", ")
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("section {0:?} is not known: use one of {names}", names = Section::names())]
pub struct UnknownSection(pub String);

impl FromStr for Section {
    type Err = UnknownSection;
    fn from_str(s: &str) -> Result<Self, UnknownSection> {
        Section::ALL
            .into_iter()
            .find(|sec| sec.as_str() == s)
            .ok_or_else(|| UnknownSection(s.to_owned()))
    }
}

/// One value in a section. Untagged, so JSON shows plain numbers and strings.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for Value {
    /// By hand rather than derived `untagged`, which buffers every value and then tries each
    /// variant in turn: a counters report is mostly these values, and the relay decodes tens of
    /// thousands of reports a second. Accepts what the derived form did: a boolean, an integer
    /// that fits in an i64, a string (or UTF-8 bytes).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl Visitor<'_> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a boolean, an integer within 64 signed bits or a string")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::invalid_value(de::Unexpected::Other("a 128-bit integer"), &self))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::invalid_value(de::Unexpected::Other("a 128-bit integer"), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Value, E> {
        std::str::from_utf8(v)
            .map(|s| Value::Text(s.to_owned()))
            .map_err(|_| E::invalid_value(de::Unexpected::Bytes(v), &self))
    }
}

impl Value {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

/// The named values of one section.
pub type SectionData = BTreeMap<String, Value>;

/// What a device returns for a GET DATA job: the requested sections, each a map of values.
pub type DeviceData = BTreeMap<Section, SectionData>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_parse_and_print() {
        for s in Section::ALL {
            assert_eq!(s.as_str().parse::<Section>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        let e = "toner".parse::<Section>().unwrap_err().to_string();
        assert!(e.contains("counters, identification"), "{e}");
    }

    fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn a_value_is_a_boolean_an_i64_or_a_string_and_nothing_else() {
        let utf8_bytes = ciborium::Value::Bytes(b"v1.2".to_vec());
        for (bytes, want) in [
            (cbor(&true), Value::Bool(true)),
            (cbor(&-5i64), Value::Int(-5)),
            (cbor(&(i64::MAX as u64)), Value::Int(i64::MAX)),
            (cbor(&i64::MIN), Value::Int(i64::MIN)),
            (cbor(&"v1.2"), Value::Text("v1.2".into())),
            // What the derived form accepted too: a string sent as UTF-8 bytes.
            (cbor(&utf8_bytes), Value::Text("v1.2".into())),
        ] {
            let got: Value = ciborium::from_reader(bytes.as_slice()).unwrap();
            assert_eq!(got, want);
        }
        for (bytes, what) in [
            (cbor(&(i64::MAX as u64 + 1)), "9223372036854775808"),
            (cbor(&1.5f64), "floating point"),
            (
                cbor(&ciborium::Value::Bytes(vec![0xff, 0xfe])),
                "byte array",
            ),
            (cbor(&Option::<i64>::None), "Option value"),
            (cbor(&[1, 2]), "sequence"),
        ] {
            let err = ciborium::from_reader::<Value, _>(bytes.as_slice())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(what) && err.contains("64 signed bits"),
                "{what}: {err}"
            );
        }
        assert_eq!(serde_json::from_str::<Value>("42").unwrap(), Value::Int(42));
        assert_eq!(
            serde_json::from_str::<Value>("\"x\"").unwrap(),
            Value::Text("x".into())
        );
        assert!(serde_json::from_str::<Value>("[1]").is_err());
    }

    #[test]
    fn data_round_trips_through_cbor_and_json() {
        let mut data = DeviceData::new();
        let mut counters = SectionData::new();
        counters.insert("total".into(), Value::Int(1234));
        counters.insert("a4".into(), Value::Int(1000));
        data.insert(Section::Counters, counters);
        let mut ident = SectionData::new();
        ident.insert("rom".into(), "v1.2".into());
        ident.insert("duplex".into(), true.into());
        data.insert(Section::Identification, ident);

        let mut cbor = Vec::new();
        ciborium::into_writer(&data, &mut cbor).unwrap();
        let back: DeviceData = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(back, data);

        let json = serde_json::to_string(&data).unwrap();
        assert!(
            json.contains("\"counters\":{\"a4\":1000,\"total\":1234}"),
            "{json}"
        );
        let back: DeviceData = serde_json::from_str(&json).unwrap();
        assert_eq!(back, data);
    }
}
