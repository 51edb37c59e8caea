//! Maintenance windows: `daily 01:00-05:00 Asia/Tokyo`, `mon-fri 22:00-06:00 Europe/Berlin`,
//! `sat,sun 00:00-23:59:59 UTC`. A window whose end is before its start runs past midnight, and
//! belongs to the day it opens on. Times are wall-clock times in the named IANA zone (chrono-tz),
//! so a window keeps its hours across daylight-saving changes.

use chrono::{Datelike, Duration, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use protocol::Timestamp;

/// A parsed window.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Days it opens on, Monday first.
    days: [bool; 7],
    start: NaiveTime,
    end: NaiveTime,
    zone: Tz,
}

const FORM: &str =
    "use DAYS HH:MM-HH:MM ZONE, e.g. 'daily 01:00-05:00 Asia/Tokyo' or 'mon-fri 22:00-06:00 UTC'";

impl Window {
    /// Parses a window; the error says which part is wrong and what to write.
    pub fn parse(text: &str) -> Result<Window, String> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [days, hours, zone] = parts.as_slice() else {
            return Err(format!("window {text:?}: {FORM}"));
        };
        let days = parse_days(days).map_err(|e| format!("window {text:?}: {e}; {FORM}"))?;
        let (start, end) = hours
            .split_once('-')
            .ok_or_else(|| format!("window {text:?}: no HH:MM-HH:MM; {FORM}"))?;
        let time = |t: &str| {
            NaiveTime::parse_from_str(t, "%H:%M:%S")
                .or_else(|_| NaiveTime::parse_from_str(t, "%H:%M"))
                .map_err(|_| format!("window {text:?}: {t:?} is not a time HH:MM[:SS]"))
        };
        let (start, end) = (time(start)?, time(end)?);
        if start == end {
            return Err(format!(
                "window {text:?} never opens: it starts and ends at {start}"
            ));
        }
        if !days.iter().any(|d| *d) {
            return Err(format!("window {text:?} never opens: it has no days"));
        }
        let zone: Tz = zone.parse().map_err(|_| {
            format!("window {text:?}: {zone:?} is not an IANA time zone (e.g. Asia/Tokyo, UTC)")
        })?;
        Ok(Window {
            days,
            start,
            end,
            zone,
        })
    }

    /// Whether jobs may be filed at `now`.
    pub fn is_open(&self, now: Timestamp) -> bool {
        let local = now.with_timezone(&self.zone);
        let (day, time) = (local.date_naive(), local.time());
        let on = |d: chrono::NaiveDate| self.days[d.weekday().num_days_from_monday() as usize];
        if self.start < self.end {
            on(day) && self.start <= time && time < self.end
        } else {
            // Past midnight: the evening part belongs to today, the morning part to yesterday.
            (on(day) && time >= self.start) || (time < self.end && day.pred_opt().is_some_and(on))
        }
    }

    /// When it next opens after `now` (now, if it is open), within the next eight days.
    pub fn next_open(&self, now: Timestamp) -> Option<Timestamp> {
        if self.is_open(now) {
            return Some(now);
        }
        let today = now.with_timezone(&self.zone).date_naive();
        (0..=8)
            .filter_map(|i| today.checked_add_signed(Duration::days(i)))
            .filter(|d| self.days[d.weekday().num_days_from_monday() as usize])
            .filter_map(|d| {
                self.zone
                    .from_local_datetime(&d.and_time(self.start))
                    .earliest()
            })
            .map(|t| t.with_timezone(&Utc))
            .find(|t| *t > now)
    }
}

fn parse_days(text: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    if text.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    let day = |t: &str| {
        t.parse::<Weekday>()
            .map_err(|_| format!("{t:?} is not a day (mon, tue, …, or daily)"))
    };
    for part in text.split(',') {
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day(from)?, day(to)?);
                let mut d = from;
                loop {
                    days[d.num_days_from_monday() as usize] = true;
                    if d == to {
                        break;
                    }
                    d = d.succ();
                }
            }
            None => days[day(part)?.num_days_from_monday() as usize] = true,
        }
    }
    Ok(days)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> Timestamp {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_daily_window_is_open_in_its_zone_hours_only() {
        let w = Window::parse("daily 01:00-05:00 Asia/Tokyo").unwrap();
        // 01:30 in Tokyo is 16:30 UTC the day before.
        assert!(w.is_open(utc("2026-12-03T16:30:00Z")));
        assert!(!w.is_open(utc("2026-12-03T20:00:00Z")));
        assert!(!w.is_open(utc("2026-12-03T15:59:59Z")));
        assert_eq!(
            w.next_open(utc("2026-12-03T20:00:00Z")),
            Some(utc("2026-12-04T16:00:00Z"))
        );
    }

    #[test]
    fn an_overnight_window_belongs_to_the_day_it_opens() {
        // Friday 22:00 to Saturday 06:00 is open; Saturday 22:00 is not.
        let w = Window::parse("mon-fri 22:00-06:00 UTC").unwrap();
        assert!(w.is_open(utc("2026-12-04T23:00:00Z"))); // Friday
        assert!(w.is_open(utc("2026-12-05T05:00:00Z"))); // Saturday morning
        assert!(!w.is_open(utc("2026-12-05T23:00:00Z"))); // Saturday night
        assert!(!w.is_open(utc("2026-12-07T05:00:00Z"))); // Monday morning: Sunday's
        assert_eq!(
            w.next_open(utc("2026-12-05T12:00:00Z")),
            Some(utc("2026-12-07T22:00:00Z"))
        );
    }

    #[test]
    fn seconds_and_day_lists_are_understood() {
        let w = Window::parse("sat,sun 10:00:30-10:00:45 UTC").unwrap();
        assert!(w.is_open(utc("2026-12-05T10:00:30Z")));
        assert!(!w.is_open(utc("2026-12-05T10:00:45Z")));
        assert!(!w.is_open(utc("2026-12-04T10:00:35Z")));
    }

    #[test]
    fn windows_that_cannot_open_or_cannot_be_read_are_refused_with_the_reason() {
        for (text, want) in [
            ("daily 01:00-01:00 UTC", "never opens"),
            ("daily 01:00-05:00", "DAYS HH:MM-HH:MM ZONE"),
            ("often 01:00-05:00 UTC", "not a day"),
            ("daily 1am-5am UTC", "not a time"),
            ("daily 01:00-05:00 Mars/Olympus", "IANA time zone"),
        ] {
            let e = Window::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
