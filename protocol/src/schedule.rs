//! When a device reaches the relay (claim 15) and how a set-schedule job changes it (claim 38).
//!
//! A device runs a **persistent** session (connected all the time; jobs arrive at once) or a
//! **periodic** one (connect, drain jobs and the outbox, disconnect — for metered links). A
//! periodic device also checks in at calendar times, at moments (power-on, an operator action)
//! and when a condition holds (a counter reached a multiple, a given fault seen).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionMode {
    #[default]
    Persistent,
    Periodic,
}

impl FromStr for SessionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "persistent" => Ok(SessionMode::Persistent),
            "periodic" => Ok(SessionMode::Periodic),
            other => Err(format!(
                "session mode {other:?} is not known: use persistent or periodic"
            )),
        }
    }
}

impl fmt::Display for SessionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SessionMode::Persistent => "persistent",
            SessionMode::Periodic => "periodic",
        })
    }
}

/// Shortest and longest check-in interval a schedule may set.
pub const MIN_INTERVAL_SECS: u64 = 1;
pub const MAX_INTERVAL_SECS: u64 = 31 * 24 * 3600;

/// A device's access timing. Every field is optional on the wire so a newer device can add more.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Schedule {
    #[serde(default)]
    pub mode: SessionMode,
    /// Periodic: check in every this many seconds (the embodiment: 15 min for devices).
    #[serde(default)]
    pub interval_secs: Option<u64>,
    /// Periodic: also check in at these calendar times (UTC).
    #[serde(default)]
    pub calendar: Vec<Calendar>,
    /// Also check in at these moments.
    #[serde(default)]
    pub moments: Vec<Moment>,
    /// Also check in when these conditions hold.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A calendar time: `hourly:MM`, `daily:HH:MM`, `weekly:DAY HH:MM` (mon…sun), `monthly:DD HH:MM`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "every", rename_all = "kebab-case")]
pub enum Calendar {
    Hourly { minute: u8 },
    Daily { hour: u8, minute: u8 },
    Weekly { weekday: u8, hour: u8, minute: u8 },
    Monthly { day: u8, hour: u8, minute: u8 },
}

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn hh_mm(s: &str, spec: &str) -> Result<(u8, u8), String> {
    let bad = || format!("calendar time {spec:?}: {s:?} is not HH:MM (00:00 to 23:59)");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m) = (
        h.parse::<u8>().map_err(|_| bad())?,
        m.parse::<u8>().map_err(|_| bad())?,
    );
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok((h, m))
}

impl FromStr for Calendar {
    type Err = String;
    fn from_str(spec: &str) -> Result<Self, String> {
        let help = "write hourly:MM, daily:HH:MM, weekly:DAY HH:MM or monthly:DD HH:MM";
        let (every, rest) = spec
            .split_once(':')
            .ok_or_else(|| format!("calendar time {spec:?}: {help}"))?;
        match every {
            "hourly" => match rest.parse::<u8>() {
                Ok(minute) if minute <= 59 => Ok(Calendar::Hourly { minute }),
                _ => Err(format!(
                    "calendar time {spec:?}: the minute must be 0 to 59"
                )),
            },
            "daily" => hh_mm(rest, spec).map(|(hour, minute)| Calendar::Daily { hour, minute }),
            "weekly" => {
                let (day, time) = rest
                    .split_once(' ')
                    .ok_or_else(|| format!("calendar time {spec:?}: {help}"))?;
                let weekday = WEEKDAYS
                    .iter()
                    .position(|d| *d == day.to_ascii_lowercase())
                    .ok_or_else(|| {
                        format!(
                            "calendar time {spec:?}: the day must be one of {}",
                            WEEKDAYS.join(", ")
                        )
                    })?;
                let (hour, minute) = hh_mm(time, spec)?;
                Ok(Calendar::Weekly {
                    weekday: weekday as u8,
                    hour,
                    minute,
                })
            }
            "monthly" => {
                let (day, time) = rest
                    .split_once(' ')
                    .ok_or_else(|| format!("calendar time {spec:?}: {help}"))?;
                let day = match day.parse::<u8>() {
                    Ok(d) if (1..=28).contains(&d) => d,
                    _ => {
                        return Err(format!(
                            "calendar time {spec:?}: the day must be 1 to 28 (every month has it)"
                        ));
                    }
                };
                let (hour, minute) = hh_mm(time, spec)?;
                Ok(Calendar::Monthly { day, hour, minute })
            }
            _ => Err(format!("calendar time {spec:?}: {help}")),
        }
    }
}

impl fmt::Display for Calendar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Calendar::Hourly { minute } => write!(f, "hourly:{minute:02}"),
            Calendar::Daily { hour, minute } => write!(f, "daily:{hour:02}:{minute:02}"),
            Calendar::Weekly {
                weekday,
                hour,
                minute,
            } => {
                let day = WEEKDAYS.get(usize::from(*weekday)).copied().unwrap_or("?");
                write!(f, "weekly:{day} {hour:02}:{minute:02}")
            }
            Calendar::Monthly { day, hour, minute } => {
                write!(f, "monthly:{day:02} {hour:02}:{minute:02}")
            }
        }
    }
}

/// A moment that makes a device check in at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Moment {
    PowerOn,
    OperatorAction,
}

impl FromStr for Moment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "power-on" => Ok(Moment::PowerOn),
            "operator-action" => Ok(Moment::OperatorAction),
            other => Err(format!(
                "moment {other:?} is not known: use power-on or operator-action"
            )),
        }
    }
}

/// A condition that makes a device check in when it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "when", rename_all = "kebab-case")]
pub enum Condition {
    /// Every time `counter` (a name in the counters section) passes a multiple of `every`.
    CountReached { counter: String, every: u64 },
    /// When the device sees this fault code.
    FaultSeen { code: String },
}

impl FromStr for Condition {
    type Err = String;
    /// `count:COUNTER/EVERY` (e.g. `count:total/1000`) or `fault:CODE` (e.g. `fault:SC-541`).
    fn from_str(s: &str) -> Result<Self, String> {
        let help =
            "write count:COUNTER/EVERY (e.g. count:total/1000) or fault:CODE (e.g. fault:SC-541)";
        if let Some(rest) = s.strip_prefix("count:") {
            let (counter, every) = rest
                .split_once('/')
                .ok_or_else(|| format!("condition {s:?}: {help}"))?;
            let every = every.parse::<u64>().ok().filter(|n| *n > 0);
            match every {
                Some(every) if !counter.is_empty() => Ok(Condition::CountReached {
                    counter: counter.to_owned(),
                    every,
                }),
                _ => Err(format!("condition {s:?}: {help}")),
            }
        } else if let Some(code) = s.strip_prefix("fault:").filter(|c| !c.is_empty()) {
            Ok(Condition::FaultSeen {
                code: code.to_owned(),
            })
        } else {
            Err(format!("condition {s:?}: {help}"))
        }
    }
}

impl Schedule {
    /// Checks what the types cannot: a periodic schedule says when to connect, intervals are in range.
    pub fn check(&self) -> Result<(), String> {
        if let Some(secs) = self.interval_secs
            && !(MIN_INTERVAL_SECS..=MAX_INTERVAL_SECS).contains(&secs)
        {
            return Err(format!(
                "interval_secs {secs} is out of range: use {MIN_INTERVAL_SECS} to {MAX_INTERVAL_SECS}"
            ));
        }
        if self.mode == SessionMode::Periodic
            && self.interval_secs.is_none()
            && self.calendar.is_empty()
        {
            return Err("a periodic schedule needs interval_secs or a calendar time, or the device would never connect".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_specs_parse_and_print() {
        for spec in [
            "hourly:05",
            "daily:22:00",
            "weekly:mon 03:30",
            "monthly:01 00:15",
        ] {
            let c: Calendar = spec.parse().unwrap();
            assert_eq!(c.to_string(), spec);
        }
        for bad in [
            "hourly:60",
            "daily:24:00",
            "weekly:xyz 01:00",
            "monthly:31 01:00",
            "yearly:1",
            "daily",
        ] {
            assert!(bad.parse::<Calendar>().is_err(), "{bad}");
        }
    }

    #[test]
    fn conditions_and_moments_parse() {
        assert_eq!(
            "count:total/1000".parse::<Condition>().unwrap(),
            Condition::CountReached {
                counter: "total".into(),
                every: 1000
            }
        );
        assert_eq!(
            "fault:SC-541".parse::<Condition>().unwrap(),
            Condition::FaultSeen {
                code: "SC-541".into()
            }
        );
        for bad in ["count:total", "count:/5", "count:total/0", "fault:", "x"] {
            assert!(bad.parse::<Condition>().is_err(), "{bad}");
        }
        assert_eq!("power-on".parse::<Moment>().unwrap(), Moment::PowerOn);
        assert!("reboot".parse::<Moment>().is_err());
    }

    #[test]
    fn schedules_are_checked() {
        let periodic = |interval| Schedule {
            mode: SessionMode::Periodic,
            interval_secs: interval,
            ..Default::default()
        };
        assert!(periodic(Some(900)).check().is_ok());
        assert!(
            periodic(None)
                .check()
                .unwrap_err()
                .contains("never connect")
        );
        assert!(
            periodic(Some(0))
                .check()
                .unwrap_err()
                .contains("out of range")
        );
        assert!(Schedule::default().check().is_ok());
    }

    #[test]
    fn schedule_round_trips_through_cbor() {
        let s = Schedule {
            mode: SessionMode::Periodic,
            interval_secs: Some(900),
            calendar: vec!["weekly:sun 02:00".parse().unwrap()],
            moments: vec![Moment::PowerOn],
            conditions: vec!["count:total/500".parse().unwrap()],
        };
        let mut cbor = Vec::new();
        ciborium::into_writer(&s, &mut cbor).unwrap();
        let back: Schedule = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(back, s);
    }
}
