//! What the store keeps, one type per table value. Every record is CBOR and every field added later
//! gets `#[serde(default)]`, so a newer broker reads an older file.

use protocol::device::DeviceState;
use protocol::job::{JobOrder, JobView};
use protocol::schedule::SessionMode;
use protocol::{JobId, Timestamp};
use serde::{Deserialize, Serialize};

/// A job as the broker keeps it: the Fig. 9 row, plus the order the device runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub view: JobView,
    /// What the device is told to do. `None` for a rejected submission: there is nothing to run,
    /// and its serial may not even be valid.
    #[serde(default)]
    pub order: Option<JobOrder>,
    /// When the job reached an end state; what "hidden from the default list after a while" counts from.
    #[serde(default)]
    pub ended_at: Option<Timestamp>,
    /// The rollout that filed it: when it ends, its rollout moves on in the same batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<u64>,
}

impl JobRecord {
    /// An open job has a retained order on its device's topic and may still time out.
    pub fn is_open(&self) -> bool {
        self.order.is_some() && !self.view.status.is_terminal()
    }
}

/// A device as it last announced itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    #[serde(default)]
    pub state: DeviceState,
    /// When the broker last received anything from it.
    pub last_seen: Timestamp,
}

/// The state of a device record alone (`Txn::device_state`): the rest is skipped, not parsed.
#[derive(Deserialize)]
pub(crate) struct StoredState {
    #[serde(default)]
    pub state: DeviceState,
}

/// What the broker did with a message it handled, keyed by (sender, msg id): the dedupe journal
/// that gives a resend its original answer (docs/decisions.md, D3). Hosts get a row per request;
/// a device message gets a row only where its outbox's window ([`super::seen`]) cannot say it
/// exactly: an id far ahead of the window, or a refusal (D9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub at: Timestamp,
    pub outcome: JournalOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum JournalOutcome {
    /// A device message was committed (or was a harmless repeat).
    Stored,
    /// A device message was refused for good; a resend is refused again with the same reason.
    Refused { reason: String },
    /// A host's submission became this job (accepted or recorded as rejected); a resend gets the
    /// same job back.
    Submission { job: JobId },
    /// A host's cancel request withdrew this job; a resend gets the same answer rather than
    /// "already ended".
    Cancel { job: JobId },
    /// A host's `rollouts create` made this rollout; a resend gets it back.
    Rollout { rollout: String },
}

/// The id the broker gives its `n`th alarm: `A-000001`, …
pub fn alarm_id(n: u64) -> String {
    format!("A-{n:06}")
}

/// The number behind an alarm id, or `None` for text the broker never gives out.
pub fn alarm_number(id: &str) -> Option<u64> {
    let digits = id.strip_prefix("A-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The most refused codes an overflow record names; more are only counted (`untracked`).
pub const MAX_OVERFLOW_CODES: usize = 64;

/// Alarms the relay refused one device, and the overflow alarm that shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverflowRecord {
    /// The number of the device's overflow alarm.
    pub alarm: u64,
    /// The distinct codes refused and not cleared since (at most [`MAX_OVERFLOW_CODES`]).
    #[serde(default)]
    pub codes: Vec<String>,
    /// Refused codes beyond those named.
    #[serde(default)]
    pub untracked: u64,
    /// Refused reports in all (resends and repeats included).
    #[serde(default)]
    pub refused: u64,
    /// When the first was refused.
    pub since: Timestamp,
}

/// What the relay knows about a device's reachability beyond its last-seen time.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// The session mode, from the device's state message or its last set-schedule job.
    #[serde(default)]
    pub mode: Option<SessionMode>,
    /// Periodic: the check-in interval.
    #[serde(default)]
    pub interval_secs: Option<u64>,
    /// When the presence (online, offline, overdue) last changed.
    #[serde(default)]
    pub since: Option<Timestamp>,
    /// Offline and periodic: when the device becomes overdue (mirrors `checkin_due`).
    #[serde(default)]
    pub due_by: Option<Timestamp>,
    /// The active overdue alarm, if any.
    #[serde(default)]
    pub overdue_alarm: Option<u64>,
    /// In a cluster: the node holding the device's session while it is online there. A session
    /// ending on another node (the device moved) leaves it be; the leader marks the devices of a
    /// node that died offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The topic filters of the device's persistent MQTT session (it connected with
    /// `clean_session` 0 and subscribed): what its next connection, to this relay restarted or
    /// not, resumes without subscribing again. Empty: no persistent session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub session_filters: Vec<String>,
}

impl PresenceRecord {
    /// The interval a late check-in is measured against: only periodic devices are expected.
    pub fn expected_interval(&self) -> Option<u64> {
        match self.mode {
            Some(SessionMode::Periodic) => self.interval_secs,
            _ => None,
        }
    }
}

/// The most alarms one digest names; more are only counted (`more`). A device holds at most
/// `max_active_alarms_per_device` active alarms, so this is reached only by one that raises and
/// clears many within one window.
pub const MAX_DIGEST_ALARMS: usize = 100;

/// A device's alarms raised within one coalescing window, to be notified as one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmDigest {
    /// When the window closes (mirrors `digest_due`).
    pub due_at: Timestamp,
    /// Alarm numbers, oldest first (at most [`MAX_DIGEST_ALARMS`]).
    pub alarms: Vec<u64>,
    /// Alarms beyond those named.
    #[serde(default)]
    pub more: u64,
}

impl AlarmDigest {
    /// `existing` with alarm `n` added, or a new digest closing at `due_at`; and whether it is
    /// new. Past [`MAX_DIGEST_ALARMS`] an alarm is only counted.
    pub fn with_alarm(
        existing: Option<AlarmDigest>,
        n: u64,
        due_at: Timestamp,
    ) -> (AlarmDigest, bool) {
        let opened = existing.is_none();
        let mut digest = existing.unwrap_or(AlarmDigest {
            due_at,
            alarms: Vec::new(),
            more: 0,
        });
        if digest.alarms.len() < MAX_DIGEST_ALARMS {
            digest.alarms.push(n);
        } else {
            digest.more += 1;
        }
        (digest, opened)
    }
}

/// What is due now (with its number), and when the next one is due.
pub type Due = (Vec<(u64, QueuedNotification)>, Option<Timestamp>);

/// Where a notification goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "kebab-case")]
pub enum NotifyChannel {
    /// One mail to all of these addresses.
    Mail { to: Vec<String> },
    /// An HTTP POST of the JSON body.
    Webhook { url: String },
}

/// One mail or webhook call waiting to be delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedNotification {
    pub created_at: Timestamp,
    /// The device the event concerns, so the worker can serve devices in turn.
    #[serde(default)]
    pub serial: String,
    /// What happened: `job-succeeded`, `job-failed`, `alarm`, `overdue`.
    pub event: String,
    pub channel: NotifyChannel,
    /// The mail's subject line.
    pub subject: String,
    /// The mail's text.
    pub text: String,
    /// The webhook's JSON body.
    pub json: String,
    /// Attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// Not before this time (backoff after a failure).
    pub next_at: Timestamp,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// Where a page of an export stops: the key of its last reading, as text for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadingCursor {
    pub at_ms: i64,
    pub serial: String,
    pub n: u64,
}

impl ReadingCursor {
    pub fn to_text(&self) -> String {
        format!("{}/{}/{}", self.at_ms, self.serial, self.n)
    }

    pub fn parse(text: &str) -> Option<ReadingCursor> {
        let mut parts = text.splitn(3, '/');
        let at_ms = parts.next()?.parse().ok()?;
        let serial = parts.next()?.to_owned();
        let n = parts.next()?.parse().ok()?;
        Some(ReadingCursor { at_ms, serial, n })
    }
}

/// A rollout as the relay keeps it: what was asked, where it stands, and each device's job. The
/// counts people see are derived from the members' last known job statuses, refreshed by the
/// rollout tick, so they survive a restart with the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub id: String,
    pub name: String,
    /// The host that created it: its jobs are filed in that host's name.
    pub host: String,
    /// The job each device gets, without a serial.
    pub job: protocol::host::SubmitJob,
    pub targets: Vec<String>,
    #[serde(default)]
    pub serials: Vec<String>,
    pub status: protocol::rollout::RolloutStatus,
    #[serde(default)]
    pub reason: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default)]
    pub start_at: Option<Timestamp>,
    pub success_threshold_pct: f64,
    #[serde(default)]
    pub abort_failure_rate_pct: Option<f64>,
    pub abort_min_finished: u32,
    #[serde(default)]
    pub rate_per_min: Option<u32>,
    #[serde(default)]
    pub window: Option<String>,
    pub approve_each_wave: bool,
    pub dynamic: bool,
    /// The wave being filed (0-based).
    pub wave: usize,
    /// Waves up to this index may start; with `approve_each_wave`, `rollouts approve` raises it.
    pub approved: usize,
    pub waves: Vec<WaveRecord>,
    /// With a rate: no job is filed before this time.
    #[serde(default)]
    pub next_release: Option<Timestamp>,
    /// Jobs withdrawn when a window closed before their device took them (the device gets a new
    /// job in the next window); listed among the rollout's jobs.
    #[serde(default)]
    pub withdrawn: Vec<u64>,
    /// When a dynamic rollout last looked for newly matching devices.
    #[serde(default)]
    pub scanned_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveRecord {
    /// The cumulative share of the devices this wave reaches.
    pub percent: f64,
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    pub members: Vec<Member>,
}

/// One device of a wave and its job, once filed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub serial: String,
    #[serde(default)]
    pub job: Option<u64>,
    /// The job's status when the tick last looked.
    #[serde(default)]
    pub status: Option<protocol::job::JobStatus>,
}

impl RolloutRecord {
    pub fn is_active(&self) -> bool {
        !self.status.is_final()
    }
}

/// The id the relay gives its `n`th rollout: `R-000001`.
pub fn rollout_id(n: u64) -> String {
    format!("R-{n:06}")
}

/// The number behind a rollout id, or `None` for text the relay never gives out.
pub fn rollout_number(id: &str) -> Option<u64> {
    let digits = id.strip_prefix("R-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
