//! Notifications (the seed's S116 and S312): mail to several addresses per rule and webhooks, when
//! a job ends OK or NG, when a device raises a fatal alarm, and when a device is overdue.
//!
//! Rules are in the broker's config (`[[notify.rules]]`). When an event happens, the core writes
//! one [`QueuedNotification`] per rule and channel into the store **in the same transaction as the
//! event**, so a notification exists exactly when its event does and survives a restart. A
//! separate worker ([`run_worker`]) drains the queue: it sends, removes what was delivered, and
//! retries the rest with exponential backoff. It never runs inside the core's commit path, so a
//! slow or dead SMTP server delays mail, never alarms.
//!
//! - [`mail`]: SMTP through lettre (STARTTLS, implicit TLS, or plain for a local relay);
//! - [`webhook`]: an HTTP POST of a JSON body;
//! - [`compose`]: what the mail and the JSON say.

pub mod compose;
pub mod mail;
pub mod webhook;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocol::{Serial, Timestamp};
use serde::{Deserialize, Deserializer};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::store::{NotifyChannel, QueuedNotification, Store, StoreError, Txn};
use crate::telemetry::CoreStats;

pub use compose::Message;

/// The longest coalescing window: an hour; an emergency mail must not wait longer.
pub const MAX_COALESCE_SECS: u64 = 3600;

/// What a rule reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyEvent {
    /// A job ended normally (S116: "end notice OK").
    JobSucceeded,
    /// A job ended abnormally: failed or timed out (S116: "NG").
    JobFailed,
    /// A device raised a fatal alarm (S312).
    Alarm,
    /// A device in periodic mode missed its check-in.
    Overdue,
    /// A rollout stopped: its failure rate passed the limit, or a person aborted it. Matches
    /// rules without `serials` only (a rollout is not one device's).
    RolloutAborted,
    /// A rollout ended `succeeded` or `failed` (a wave below its success threshold).
    RolloutFinished,
}

impl NotifyEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::JobSucceeded => "job-succeeded",
            NotifyEvent::JobFailed => "job-failed",
            NotifyEvent::Alarm => "alarm",
            NotifyEvent::Overdue => "overdue",
            NotifyEvent::RolloutAborted => "rollout-aborted",
            NotifyEvent::RolloutFinished => "rollout-finished",
        }
    }
}

impl fmt::Display for NotifyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[notify]` of `broker.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// The SMTP server mail goes through; needed by any rule with `mail`.
    #[serde(default)]
    pub mail: Option<MailConfig>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// First wait after a failed delivery; it doubles each time up to `retry_max_secs`.
    #[serde(default = "defaults::retry_min_secs")]
    pub retry_min_secs: u64,
    #[serde(default = "defaults::retry_max_secs")]
    pub retry_max_secs: u64,
    /// Deliveries tried before a notification is dropped (and logged as an error).
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// One delivery (an SMTP exchange, an HTTP request) may take this long.
    #[serde(default = "defaults::timeout_secs")]
    pub timeout_secs: u64,
    /// A device's alarms within this many seconds of its first are sent as one mail or webhook
    /// call listing them all. 0: one per alarm, at once.
    #[serde(default = "defaults::coalesce_secs")]
    pub coalesce_secs: u64,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            mail: None,
            rules: Vec::new(),
            retry_min_secs: defaults::retry_min_secs(),
            retry_max_secs: defaults::retry_max_secs(),
            max_attempts: defaults::max_attempts(),
            timeout_secs: defaults::timeout_secs(),
            coalesce_secs: defaults::coalesce_secs(),
        }
    }
}

mod defaults {
    pub fn retry_min_secs() -> u64 {
        5
    }
    pub fn retry_max_secs() -> u64 {
        600
    }
    pub fn max_attempts() -> u32 {
        50
    }
    pub fn timeout_secs() -> u64 {
        20
    }
    pub fn coalesce_secs() -> u64 {
        5
    }
    pub fn smtp_port() -> u16 {
        587
    }
}

/// How mail reaches the SMTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Security {
    /// Plain TCP, upgraded with STARTTLS, which is required (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption at all: only for a relay on the same host or network (port 25).
    Plain,
}

/// `[notify.mail]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailConfig {
    /// The SMTP server's host name (also the name its certificate must carry).
    pub server: String,
    #[serde(default = "defaults::smtp_port")]
    pub port: u16,
    #[serde(default)]
    pub security: Security,
    /// The sender, e.g. `chukei <chukei@example.com>`.
    pub from: String,
    /// SMTP AUTH user; with `password_file` (the file's first line is the password).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust besides the public roots, for a server with a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `[[notify.rules]]`: on these events, mail these addresses and/or call this webhook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// One event or a list: `job-succeeded`, `job-failed`, `alarm`, `overdue`,
    /// `rollout-aborted`, `rollout-finished`.
    #[serde(deserialize_with = "one_or_many")]
    pub on: Vec<NotifyEvent>,
    /// Addresses that get one mail together.
    #[serde(default)]
    pub mail: Vec<String>,
    /// An `http://` or `https://` URL that gets an HTTP POST with a JSON body.
    #[serde(default)]
    pub webhook: Option<String>,
    /// Only these devices; empty: every device.
    #[serde(default)]
    pub serials: Vec<String>,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<NotifyEvent>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(NotifyEvent),
        Many(Vec<NotifyEvent>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(e) => vec![e],
        OneOrMany::Many(v) => v,
    })
}

impl NotifyConfig {
    /// Checks what serde cannot: every rule says where to send, addresses parse, mail has a
    /// server, URLs are HTTP(S). The error names the rule (counted from 1) and what to fix.
    pub fn check(&self) -> Result<(), String> {
        if self.retry_min_secs == 0 || self.retry_max_secs < self.retry_min_secs {
            return Err(format!(
                "notify.retry_min_secs = {} and retry_max_secs = {}: use 1 ≤ min ≤ max",
                self.retry_min_secs, self.retry_max_secs
            ));
        }
        if self.max_attempts == 0 || self.timeout_secs == 0 {
            return Err("notify.max_attempts and notify.timeout_secs must be at least 1".into());
        }
        if self.coalesce_secs > MAX_COALESCE_SECS {
            return Err(format!(
                "notify.coalesce_secs = {}: use 0 to {MAX_COALESCE_SECS}; the default is 5",
                self.coalesce_secs
            ));
        }
        if let Some(mail) = &self.mail {
            mail::check_config(mail)?;
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let which = format!("notify.rules[{}]", i + 1);
            if rule.on.is_empty() {
                return Err(format!(
                    "{which}: `on` is empty; use job-succeeded, job-failed, alarm, overdue, rollout-aborted or rollout-finished"
                ));
            }
            if rule.mail.is_empty() && rule.webhook.is_none() {
                return Err(format!(
                    "{which}: give `mail = [\"ops@example.com\", …]` or `webhook = \"https://…\"`"
                ));
            }
            if !rule.mail.is_empty() && self.mail.is_none() {
                return Err(format!(
                    "{which} sends mail, but there is no [notify.mail] with the SMTP server"
                ));
            }
            for addr in &rule.mail {
                mail::check_address(addr).map_err(|e| format!("{which}: {e}"))?;
            }
            if let Some(url) = &rule.webhook {
                webhook::check_url(url).map_err(|e| format!("{which}: {e}"))?;
            }
            for s in &rule.serials {
                Serial::parse(s).map_err(|e| format!("{which}: {e}"))?;
            }
        }
        Ok(())
    }

    /// The delay before attempt `attempts + 1`, after `attempts` failures.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let base = self.retry_min_secs.max(1);
        let factor = 1u64
            .checked_shl(attempts.saturating_sub(1))
            .unwrap_or(u64::MAX);
        Duration::from_secs(base.saturating_mul(factor).min(self.retry_max_secs))
    }

    /// Queues, inside the caller's transaction, one notification per matching rule and channel.
    /// Returns how many were queued.
    pub fn enqueue(
        &self,
        txn: &mut dyn Txn,
        event: NotifyEvent,
        serial: &str,
        message: &Message,
        now: Timestamp,
    ) -> Result<usize, StoreError> {
        let mut queued = 0;
        for rule in self.rules.iter().filter(|r| r.on.contains(&event)) {
            if !rule.serials.is_empty() && !rule.serials.iter().any(|s| s == serial) {
                continue;
            }
            let mut channels = Vec::new();
            if !rule.mail.is_empty() {
                channels.push(NotifyChannel::Mail {
                    to: rule.mail.clone(),
                });
            }
            if let Some(url) = &rule.webhook {
                channels.push(NotifyChannel::Webhook { url: url.clone() });
            }
            for channel in channels {
                txn.push_notification(&QueuedNotification {
                    created_at: now,
                    serial: serial.to_owned(),
                    event: event.as_str().to_owned(),
                    channel,
                    subject: message.subject.clone(),
                    text: message.text.clone(),
                    json: message.json.clone(),
                    attempts: 0,
                    next_at: now,
                    last_error: None,
                })?;
                queued += 1;
            }
        }
        Ok(queued)
    }
}

/// What the worker sends with.
pub struct Senders {
    pub mail: Option<mail::Mailer>,
    pub webhook: webhook::Poster,
}

impl Senders {
    /// Builds the SMTP transport and the HTTP client; an error names the setting to fix.
    pub fn new(cfg: &NotifyConfig, hello: &str) -> Result<Senders, String> {
        let timeout = Duration::from_secs(cfg.timeout_secs);
        Ok(Senders {
            mail: cfg
                .mail
                .as_ref()
                .map(|m| mail::Mailer::new(m, hello, timeout))
                .transpose()?,
            webhook: webhook::Poster::new(timeout)?,
        })
    }

    async fn deliver(&self, item: &QueuedNotification) -> Result<(), String> {
        match &item.channel {
            NotifyChannel::Mail { to } => match &self.mail {
                Some(m) => m.send(to, &item.subject, &item.text).await,
                None => Err("no [notify.mail] is configured any more".into()),
            },
            NotifyChannel::Webhook { url } => self.webhook.post(url, &item.json).await,
        }
    }
}

/// Most notifications in flight at once.
const BATCH: usize = 16;
/// The longest the worker sleeps without looking at the queue.
const MAX_NAP: Duration = Duration::from_secs(60);

fn describe(channel: &NotifyChannel) -> String {
    match channel {
        NotifyChannel::Mail { to } => format!("mail to {}", to.join(", ")),
        NotifyChannel::Webhook { url } => format!("webhook {url}"),
    }
}

/// What the worker delivers with; a reload sends a new one ([`run_worker`]'s `settings`).
#[derive(Clone)]
pub struct WorkerSettings {
    pub cfg: NotifyConfig,
    pub senders: Arc<Senders>,
}

/// Drains the queue until `stop`: sends what is due (several at once, each under the delivery
/// timeout), removes what was delivered, reschedules the rest with backoff. Woken by the core
/// (`wake`) when it queues something, else by the earliest retry. Each round takes the latest
/// `settings` (a reload may have replaced the mail server, timeouts or retries).
pub async fn run_worker(
    store: Arc<dyn Store>,
    stats: Arc<CoreStats>,
    settings: tokio::sync::watch::Receiver<WorkerSettings>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let WorkerSettings { cfg, senders } = settings.borrow().clone();
        let timeout = Duration::from_secs(cfg.timeout_secs);
        let now = chrono::Utc::now();
        let s = store.clone();
        let taken = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            // In a cluster, one node sends (each notification once); the others look again
            // later, in case it goes.
            if !s.leads_cluster_work() {
                return Ok((Vec::new(), Some(now + chrono::Duration::seconds(5))));
            }
            let txn = s.begin()?;
            let due = txn.due_notifications(now, BATCH)?;
            txn.commit()?;
            Ok(due)
        })
        .await;
        let (due, later) = match taken {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                error!(error = %e, "cannot read the notification queue");
                (Vec::new(), Some(now + chrono::Duration::seconds(5)))
            }
            Err(e) => {
                error!(error = %e, "notification queue reader panicked");
                (Vec::new(), Some(now + chrono::Duration::seconds(5)))
            }
        };
        if !due.is_empty() {
            let mut sends = JoinSet::new();
            for (n, item) in due {
                let senders = senders.clone();
                sends.spawn(async move {
                    let result = match tokio::time::timeout(timeout, senders.deliver(&item)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no answer within {} s", timeout.as_secs())),
                    };
                    (n, item, result)
                });
            }
            let mut outcomes = Vec::new();
            while let Some(done) = sends.join_next().await {
                match done {
                    Ok(o) => outcomes.push(o),
                    Err(e) => error!(error = %e, "a notification delivery panicked"),
                }
            }
            record(&store, &stats, &cfg, outcomes).await;
            continue; // more may be due
        }
        let nap = later
            .map(|at| (at - chrono::Utc::now()).to_std().unwrap_or_default())
            .unwrap_or(MAX_NAP)
            .min(MAX_NAP);
        tokio::select! {
            () = stop.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(nap) => {}
        }
    }
}

/// Writes what became of each delivery: removed when sent or given up on, else rescheduled.
async fn record(
    store: &Arc<dyn Store>,
    stats: &CoreStats,
    cfg: &NotifyConfig,
    outcomes: Vec<(u64, QueuedNotification, Result<(), String>)>,
) {
    let now = chrono::Utc::now();
    let mut logs = Vec::new();
    let mut writes = Vec::new();
    for (n, mut item, result) in outcomes {
        let what = describe(&item.channel);
        match result {
            Ok(()) => {
                logs.push(Log::Sent {
                    n,
                    event: item.event.clone(),
                    what,
                    attempts: item.attempts + 1,
                });
                writes.push((n, None));
            }
            Err(e) => {
                item.attempts += 1;
                if item.attempts >= cfg.max_attempts {
                    logs.push(Log::Dropped {
                        n,
                        event: item.event.clone(),
                        what,
                        error: e,
                        attempts: item.attempts,
                    });
                    writes.push((n, None));
                } else {
                    let wait = cfg.backoff(item.attempts);
                    item.next_at = now + chrono::Duration::from_std(wait).unwrap_or_default();
                    item.last_error = Some(e.clone());
                    logs.push(Log::Retry {
                        n,
                        event: item.event.clone(),
                        what,
                        error: e,
                        attempts: item.attempts,
                        wait,
                    });
                    writes.push((n, Some(item)));
                }
            }
        }
    }
    let s = store.clone();
    let written = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
        let mut txn = s.begin()?;
        for (n, item) in writes {
            match item {
                None => txn.remove_notification(n)?,
                Some(item) => txn.put_notification(n, &item)?,
            }
        }
        txn.commit()?;
        Ok(())
    })
    .await;
    match written {
        Ok(Ok(())) => {
            for log in logs {
                log.emit(stats);
            }
        }
        // Not recorded: a delivered one may be sent again, which beats losing one.
        Ok(Err(e)) => error!(error = %e, "cannot record notification deliveries"),
        Err(e) => error!(error = %e, "notification recorder panicked"),
    }
}

enum Log {
    Sent {
        n: u64,
        event: String,
        what: String,
        attempts: u32,
    },
    Retry {
        n: u64,
        event: String,
        what: String,
        error: String,
        attempts: u32,
        wait: Duration,
    },
    Dropped {
        n: u64,
        event: String,
        what: String,
        error: String,
        attempts: u32,
    },
}

impl Log {
    fn emit(self, stats: &CoreStats) {
        match self {
            Log::Sent {
                n,
                event,
                what,
                attempts,
            } => {
                stats
                    .notify_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(notification = n, event = %event, to = %what, attempts, "notification sent")
            }
            Log::Retry {
                n,
                event,
                what,
                error,
                attempts,
                wait,
            } => {
                stats
                    .notify_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(notification = n, event = %event, to = %what, error = %error, attempts, retry_in_secs = wait.as_secs(), "notification failed; will retry")
            }
            Log::Dropped {
                n,
                event,
                what,
                error,
                attempts,
            } => {
                stats
                    .notify_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                error!(notification = n, event = %event, to = %what, error = %error, attempts, "notification dropped after too many attempts")
            }
        }
    }
}

/// Logs, at startup, how many notifications a previous run left in the queue.
pub fn log_backlog(store: &dyn Store) {
    match store.begin().and_then(|txn| {
        let n = txn.notification_count()?;
        txn.commit()?;
        Ok(n)
    }) {
        Ok(0) => {}
        Ok(n) => info!(queued = n, "notifications waiting from before the restart"),
        Err(e) => debug!(error = %e, "cannot count the notification queue"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NotifyConfig, String> {
        let cfg: NotifyConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    #[test]
    fn rules_parse_with_one_event_or_many() {
        let cfg = parse(
            r#"
            [mail]
            server = "smtp.example.com"
            from = "chukei <chukei@example.com>"
            [[rules]]
            on = "alarm"
            mail = ["a@example.com", "b@example.com"]
            [[rules]]
            on = ["job-failed", "overdue"]
            webhook = "https://hooks.example.com/chukei"
            serials = ["C1"]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.rules[0].on, [NotifyEvent::Alarm]);
        assert_eq!(
            cfg.rules[1].on,
            [NotifyEvent::JobFailed, NotifyEvent::Overdue]
        );
        assert_eq!(cfg.mail.unwrap().port, 587);
    }

    #[test]
    fn bad_rules_are_refused_with_the_fix() {
        let cases = [
            ("[[rules]]\non = \"alarm\"\n", "give `mail"),
            (
                "[[rules]]\non = \"alarm\"\nmail = [\"a@example.com\"]\n",
                "no [notify.mail]",
            ),
            (
                "[[rules]]\non = \"alarm\"\nwebhook = \"ftp://x\"\n",
                "http://",
            ),
            (
                "[mail]\nserver = \"s\"\nfrom = \"x@example.com\"\n[[rules]]\non = \"alarm\"\nmail = [\"not an address\"]\n",
                "not an address",
            ),
            (
                "[[rules]]\non = \"job-ended\"\nwebhook = \"http://x\"\n",
                "job-ended",
            ),
            (
                "[[rules]]\non = []\nwebhook = \"http://x\"\n",
                "`on` is empty",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let cfg = NotifyConfig {
            retry_min_secs: 2,
            retry_max_secs: 10,
            ..NotifyConfig::default()
        };
        let waits: Vec<u64> = (1..=5).map(|a| cfg.backoff(a).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 10, 10]);
        assert_eq!(cfg.backoff(200).as_secs(), 10);
    }
}
