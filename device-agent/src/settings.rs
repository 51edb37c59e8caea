//! Settings a device accepts from an update-data job (Fig. 4), each with a type and a range, and
//! the check that refuses bad values key by key before anything is applied.
//!
//! The reasons are read by the service desk in the job's note ("refused: adjustment.density: 12 is
//! out of range 1..=9"), so each one quotes the value and says what would have been accepted.

use std::collections::BTreeMap;

use protocol::data::{DeviceData, Section, Value};

/// What kind of value a setting takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole number in `min..=max`.
    Int {
        min: i64,
        max: i64,
    },
    Bool,
    /// A time of day, `HH:MM` (00:00 to 23:59).
    HhMm,
    /// An absolute URL with one of the schemes the device can reach.
    Url,
    /// One of a few words.
    OneOf(&'static [&'static str]),
}

/// One setting: where it lives and what it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub section: Section,
    pub name: &'static str,
    pub kind: Kind,
}

/// The settings of the simulated copier (and a fair picture of a real one).
pub const SIM_SETTINGS: &[Setting] = &[
    Setting {
        section: Section::Adjustment,
        name: "density",
        kind: Kind::Int { min: 1, max: 9 },
    },
    Setting {
        section: Section::Adjustment,
        name: "toner_save",
        kind: Kind::Bool,
    },
    Setting {
        section: Section::Adjustment,
        name: "fax_resolution",
        kind: Kind::OneOf(&["standard", "fine", "superfine"]),
    },
    Setting {
        section: Section::Adjustment,
        name: "fax_ecm",
        kind: Kind::Bool,
    },
    Setting {
        section: Section::Adjustment,
        name: "remote_diagnosis",
        kind: Kind::Bool,
    },
    Setting {
        section: Section::CallSettings,
        name: "every_counts",
        kind: Kind::Int {
            min: 100,
            max: 100_000,
        },
    },
    Setting {
        section: Section::CallSettings,
        name: "at",
        kind: Kind::HhMm,
    },
    Setting {
        section: Section::CallSettings,
        name: "interval_minutes",
        kind: Kind::Int { min: 1, max: 1440 },
    },
    Setting {
        section: Section::Settings,
        name: "host_url",
        kind: Kind::Url,
    },
];

/// Schemes a `Url` setting accepts.
const URL_SCHEMES: &[&str] = &["mqtts://", "wss://", "https://"];

fn type_name(v: &Value) -> String {
    match v {
        Value::Bool(b) => format!("the truth value {b}"),
        Value::Int(n) => format!("the number {n}"),
        Value::Text(t) => format!("the text {t:?}"),
    }
}

impl Kind {
    /// `Ok` if `v` fits, else why not.
    pub fn check(self, v: &Value) -> Result<(), String> {
        match (self, v) {
            (Kind::Int { min, max }, Value::Int(n)) => {
                if (min..=max).contains(n) {
                    Ok(())
                } else {
                    Err(format!("{n} is out of range {min}..={max}"))
                }
            }
            (Kind::Int { min, max }, other) => Err(format!(
                "expected a whole number {min}..={max}, got {}",
                type_name(other)
            )),
            (Kind::Bool, Value::Bool(_)) => Ok(()),
            (Kind::Bool, other) => Err(format!("expected true or false, got {}", type_name(other))),
            (Kind::HhMm, Value::Text(t)) => {
                let ok = t.len() == 5
                    && t.split_once(':').is_some_and(|(h, m)| {
                        h.len() == 2
                            && m.len() == 2
                            && h.parse::<u8>().is_ok_and(|h| h < 24)
                            && m.parse::<u8>().is_ok_and(|m| m < 60)
                    });
                if ok {
                    Ok(())
                } else {
                    Err(format!("{t:?} is not a time HH:MM (00:00 to 23:59)"))
                }
            }
            (Kind::HhMm, other) => Err(format!("expected a time HH:MM, got {}", type_name(other))),
            (Kind::Url, Value::Text(t)) => {
                let scheme = URL_SCHEMES.iter().find(|s| t.starts_with(**s));
                match scheme {
                    Some(s) if t.len() > s.len() && !t.contains(char::is_whitespace) => Ok(()),
                    _ => Err(format!(
                        "{t:?} is not a URL starting with {}",
                        URL_SCHEMES.join(", ")
                    )),
                }
            }
            (Kind::Url, other) => Err(format!("expected a URL, got {}", type_name(other))),
            (Kind::OneOf(words), Value::Text(t)) if words.contains(&t.as_str()) => Ok(()),
            (Kind::OneOf(words), other) => Err(format!(
                "expected one of {}, got {}",
                words.join(", "),
                type_name(other)
            )),
        }
    }
}

/// The key a refusal is filed under: "section.name".
pub fn key(section: Section, name: &str) -> String {
    format!("{section}.{name}")
}

/// Checks every value against `schema`; returns the refusals ("section.name" → reason).
pub fn check(schema: &[Setting], values: &DeviceData) -> BTreeMap<String, String> {
    let mut refused = BTreeMap::new();
    for (&section, kv) in values {
        for (name, value) in kv {
            let found = schema
                .iter()
                .find(|s| s.section == section && s.name == name);
            let verdict = match found {
                Some(setting) => setting.kind.check(value),
                None => {
                    let settable: Vec<&str> = schema
                        .iter()
                        .filter(|s| s.section == section)
                        .map(|s| s.name)
                        .collect();
                    Err(if settable.is_empty() {
                        format!("is not a setting of this device (section {section} is read-only)")
                    } else {
                        format!(
                            "is not a setting of this device (settable in {section}: {})",
                            settable.join(", ")
                        )
                    })
                }
            };
            if let Err(reason) = verdict {
                refused.insert(key(section, name), reason);
            }
        }
    }
    refused
}

/// "refused: a.b: reason; c.d: reason" — the job's note when values are refused.
pub fn refusal_note(refused: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = refused.iter().map(|(k, r)| format!("{k}: {r}")).collect();
    format!("refused: {}", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(section: Section, name: &str, v: Value) -> DeviceData {
        let mut data = DeviceData::new();
        data.entry(section).or_default().insert(name.to_owned(), v);
        data
    }

    #[test]
    fn settings_validation_table() {
        use Section::*;
        let ok = None;
        let cases: [(Section, &str, Value, Option<&str>); 20] = [
            (Adjustment, "density", 5.into(), ok),
            (Adjustment, "density", 1.into(), ok),
            (Adjustment, "density", 9.into(), ok),
            (
                Adjustment,
                "density",
                12.into(),
                Some("12 is out of range 1..=9"),
            ),
            (
                Adjustment,
                "density",
                0.into(),
                Some("0 is out of range 1..=9"),
            ),
            (
                Adjustment,
                "density",
                "dark".into(),
                Some("expected a whole number 1..=9, got the text \"dark\""),
            ),
            (Adjustment, "toner_save", true.into(), ok),
            (
                Adjustment,
                "toner_save",
                1.into(),
                Some("expected true or false, got the number 1"),
            ),
            (Adjustment, "fax_resolution", "fine".into(), ok),
            (
                Adjustment,
                "fax_resolution",
                "ultra".into(),
                Some("expected one of standard, fine, superfine"),
            ),
            (
                Adjustment,
                "bogus",
                1.into(),
                Some("is not a setting of this device (settable in adjustment: density,"),
            ),
            (CallSettings, "every_counts", 100.into(), ok),
            (
                CallSettings,
                "every_counts",
                99.into(),
                Some("99 is out of range 100..=100000"),
            ),
            (CallSettings, "at", "02:30".into(), ok),
            (
                CallSettings,
                "at",
                "24:00".into(),
                Some("\"24:00\" is not a time HH:MM"),
            ),
            (
                CallSettings,
                "at",
                "2:30".into(),
                Some("is not a time HH:MM"),
            ),
            (
                Settings,
                "host_url",
                "mqtts://relay.example.com:8883".into(),
                ok,
            ),
            (
                Settings,
                "host_url",
                "relay.example.com".into(),
                Some("is not a URL starting with mqtts://"),
            ),
            (
                Counters,
                "total",
                5.into(),
                Some("section counters is read-only"),
            ),
            (
                Settings,
                "host_url",
                "https://".into(),
                Some("is not a URL"),
            ),
        ];
        for (section, name, value, want) in cases {
            let refused = check(SIM_SETTINGS, &one(section, name, value.clone()));
            let got = refused.get(&key(section, name));
            match want {
                None => assert!(
                    refused.is_empty(),
                    "{section}.{name}={value:?}: {refused:?}"
                ),
                Some(text) => assert!(
                    got.is_some_and(|r| r.contains(text)),
                    "{section}.{name}={value:?}: want {text:?}, got {got:?}"
                ),
            }
        }
    }

    #[test]
    fn every_bad_key_is_reported_and_the_note_lists_them() {
        let mut data = one(Section::Adjustment, "density", 12.into());
        data.entry(Section::Adjustment)
            .or_default()
            .insert("toner_save".into(), "yes".into());
        data.entry(Section::Adjustment)
            .or_default()
            .insert("fax_ecm".into(), true.into());
        let refused = check(SIM_SETTINGS, &data);
        assert_eq!(
            refused.keys().collect::<Vec<_>>(),
            ["adjustment.density", "adjustment.toner_save"]
        );
        let note = refusal_note(&refused);
        assert!(
            note.starts_with("refused: adjustment.density: 12 is out of range 1..=9; adjustment.toner_save: expected true or false"),
            "{note}"
        );
    }
}
