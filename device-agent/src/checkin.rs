//! When a device in a periodic session reaches the relay (claim 15): every interval, at calendar
//! times (UTC), at moments (power-on, an operator action) and when a condition holds (a counter
//! passed a multiple; a fault seen). Pure functions and a small planner the session asks "when
//! next, and why"; the session does the connecting.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use chrono::{Datelike, Duration as Span, NaiveTime, TimeZone, Timelike};
use protocol::Timestamp;
use protocol::data::SectionData;
use protocol::schedule::{Calendar, Condition, Moment, Schedule, SessionMode};
use tokio::time::Instant;

/// Why a check-in began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    PowerOn,
    Interval,
    Calendar(Calendar),
    OperatorAction,
    Condition(String),
    /// A job needs the relay between check-ins (a firmware write at its execution time).
    Job,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::PowerOn => f.write_str("power-on"),
            Reason::Interval => f.write_str("interval"),
            Reason::Calendar(c) => write!(f, "calendar {c}"),
            Reason::OperatorAction => f.write_str("operator-action"),
            Reason::Condition(c) => write!(f, "condition {c}"),
            Reason::Job => f.write_str("job"),
        }
    }
}

fn at(date: chrono::NaiveDate, hour: u8, minute: u8) -> Timestamp {
    let time = NaiveTime::from_hms_opt(u32::from(hour), u32::from(minute), 0).unwrap_or_default();
    chrono::Utc.from_utc_datetime(&date.and_time(time))
}

/// The first time strictly after `after` that `c` names.
pub fn next_calendar(c: &Calendar, after: Timestamp) -> Timestamp {
    let date = after.date_naive();
    match *c {
        Calendar::Hourly { minute } => {
            let t = at(date, after.hour() as u8, minute);
            if t > after { t } else { t + Span::hours(1) }
        }
        Calendar::Daily { hour, minute } => {
            let t = at(date, hour, minute);
            if t > after { t } else { t + Span::days(1) }
        }
        Calendar::Weekly {
            weekday,
            hour,
            minute,
        } => {
            let today = after.weekday().num_days_from_monday() as i64;
            let ahead = (i64::from(weekday) - today).rem_euclid(7);
            let t = at(date + Span::days(ahead), hour, minute);
            if t > after { t } else { t + Span::days(7) }
        }
        Calendar::Monthly { day, hour, minute } => {
            // Days are 1..=28 (the schedule's check), so every month has them.
            let month_of = |y: i32, m: u32| {
                chrono::NaiveDate::from_ymd_opt(y, m, u32::from(day)).unwrap_or(date)
            };
            let t = at(month_of(date.year(), date.month()), hour, minute);
            if t > after {
                t
            } else {
                let (y, m) = if date.month() == 12 {
                    (date.year() + 1, 1)
                } else {
                    (date.year(), date.month() + 1)
                };
                at(month_of(y, m), hour, minute)
            }
        }
    }
}

/// Which multiple of `every` each watched counter last stood at.
#[derive(Debug, Default)]
pub struct Marks {
    seen: HashMap<String, i64>,
}

impl Marks {
    /// Checks the counters against the conditions; returns the first that fired. The first look
    /// at a counter only notes where it stands.
    pub fn check(&mut self, conditions: &[Condition], counters: &SectionData) -> Option<String> {
        let mut fired = None;
        for c in conditions {
            let Condition::CountReached { counter, every } = c else {
                continue; // fault-seen: faults arrive with the alarm work; the hook is here
            };
            let Some(value) = counters.get(counter).and_then(|v| v.as_int()) else {
                continue;
            };
            let every = i64::try_from(*every).unwrap_or(i64::MAX).max(1);
            let mark = value.div_euclid(every);
            let before = self.seen.insert(counter.clone(), mark);
            if before.is_some_and(|b| mark > b) && fired.is_none() {
                fired = Some(format!("count:{counter}/{every} reached {value}"));
            }
        }
        fired
    }
}

/// The longest the session sleeps before looking at the wall clock again.
pub const MAX_NAP: Duration = Duration::from_secs(60);

/// Plans the timed check-ins of a schedule.
#[derive(Debug)]
pub struct Planner {
    schedule: Schedule,
    /// When the interval clock last started: the start of the last check-in.
    last_start: Instant,
    /// Calendar times up to here have been honoured.
    calendar_after: Timestamp,
    pub marks: Marks,
}

impl Planner {
    pub fn new(schedule: Schedule, now: Instant, utc: Timestamp) -> Planner {
        Planner {
            schedule,
            last_start: now,
            calendar_after: utc,
            marks: Marks::default(),
        }
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn is_periodic(&self) -> bool {
        self.schedule.mode == SessionMode::Periodic
    }

    /// A check-in began: the interval counts from here.
    pub fn started(&mut self, now: Instant) {
        self.last_start = now;
    }

    /// Whether an operator action (SIGUSR1) makes the device check in.
    pub fn honours(&self, moment: Moment) -> bool {
        self.schedule.moments.contains(&moment)
    }

    pub fn conditions(&self) -> &[Condition] {
        &self.schedule.conditions
    }

    /// The next timed check-in (interval or calendar) as of `now`/`utc`, and why.
    pub fn next(&self, utc: Timestamp) -> Option<(Instant, Reason)> {
        if !self.is_periodic() {
            return None;
        }
        let now = Instant::now();
        let interval = self
            .schedule
            .interval_secs
            .map(|s| (self.last_start + Duration::from_secs(s), Reason::Interval));
        let calendar = self
            .schedule
            .calendar
            .iter()
            .map(|c| (next_calendar(c, self.calendar_after), c))
            .min_by_key(|(t, _)| *t)
            .map(|(t, c)| {
                let ahead = (t - utc).to_std().unwrap_or_default();
                (now + ahead, Reason::Calendar(c.clone()))
            });
        match (interval, calendar) {
            (Some(i), Some(c)) => Some(if c.0 < i.0 { c } else { i }),
            (i, c) => i.or(c),
        }
    }

    /// A calendar check-in happened at `utc`: times up to it are honoured.
    pub fn calendar_done(&mut self, utc: Timestamp) {
        self.calendar_after = utc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::data::Value;

    fn t(s: &str) -> Timestamp {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn next_calendar_table() {
        // 2026-11-26 is a Thursday.
        let now = t("2026-11-26T09:30:00Z");
        let cases = [
            ("hourly:45", "2026-11-26T09:45:00Z"),
            ("hourly:30", "2026-11-26T10:30:00Z"), // exactly now is not "after"
            ("hourly:05", "2026-11-26T10:05:00Z"),
            ("daily:22:00", "2026-11-26T22:00:00Z"),
            ("daily:09:00", "2026-11-27T09:00:00Z"),
            ("weekly:thu 10:00", "2026-11-26T10:00:00Z"),
            ("weekly:thu 09:00", "2026-12-03T09:00:00Z"),
            ("weekly:mon 02:00", "2026-11-30T02:00:00Z"),
            ("weekly:sun 23:59", "2026-11-29T23:59:00Z"),
            ("monthly:28 00:00", "2026-11-28T00:00:00Z"),
            ("monthly:01 03:00", "2026-12-01T03:00:00Z"),
            ("monthly:26 09:00", "2026-12-26T09:00:00Z"),
        ];
        for (spec, want) in cases {
            let c: Calendar = spec.parse().unwrap();
            assert_eq!(next_calendar(&c, now), t(want), "{spec}");
        }
        let c: Calendar = "monthly:15 00:00".parse().unwrap();
        assert_eq!(
            next_calendar(&c, t("2026-12-20T00:00:00Z")),
            t("2027-01-15T00:00:00Z"),
            "across the year"
        );
    }

    #[test]
    fn a_counter_condition_fires_when_it_passes_a_multiple() {
        let conds = vec!["count:total/1000".parse::<Condition>().unwrap()];
        let mut marks = Marks::default();
        let counters = |n: i64| SectionData::from([("total".to_owned(), Value::Int(n))]);
        assert_eq!(marks.check(&conds, &counters(1990)), None, "first look");
        assert_eq!(marks.check(&conds, &counters(1999)), None);
        let fired = marks.check(&conds, &counters(2001)).unwrap();
        assert!(fired.contains("count:total/1000"), "{fired}");
        assert_eq!(
            marks.check(&conds, &counters(2500)),
            None,
            "once per multiple"
        );
        assert!(marks.check(&conds, &counters(5000)).is_some());
    }

    #[tokio::test]
    async fn the_planner_picks_the_earlier_of_interval_and_calendar() {
        let utc = chrono::Utc::now();
        let now = Instant::now();
        let periodic = |interval, calendar: Vec<&str>| Schedule {
            mode: SessionMode::Periodic,
            interval_secs: interval,
            calendar: calendar.into_iter().map(|c| c.parse().unwrap()).collect(),
            ..Schedule::default()
        };
        let p = Planner::new(periodic(Some(30), vec![]), now, utc);
        let (when, why) = p.next(utc).unwrap();
        assert_eq!(why, Reason::Interval);
        assert!(when >= now + Duration::from_secs(29) && when <= now + Duration::from_secs(31));

        let p = Planner::new(periodic(Some(7200), vec!["hourly:00"]), now, utc);
        assert!(matches!(p.next(utc).unwrap().1, Reason::Calendar(_)));

        let p = Planner::new(Schedule::default(), now, utc);
        assert_eq!(p.next(utc), None, "a persistent session plans no check-ins");
    }
}
