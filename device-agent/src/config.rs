//! Configuration: a TOML file for what a site shares, flags for the moment. The file refuses
//! unknown keys, so a typo is an error rather than a silent default; a flag, when given, wins over
//! the file. `config/device-agent.toml` in the repository shows every key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::Serial;
use protocol::log_format::LogFormat;
use protocol::proxy::ProxyUrl;
use protocol::schedule::{Calendar, Condition, Moment, Schedule, SessionMode};
use protocol::url::BrokerUrl;
use serde::{Deserialize, Deserializer};

use crate::cli::{CommonArgs, FleetArgs, RunArgs};
use crate::exec::ExecSettings;
use crate::faults::MonitorSettings;
use crate::jobs::PublisherKey;
use crate::sim::{DEFAULT_FIRMWARE, DEFAULT_PAGES_PER_MINUTE, SimSettings};
use crate::transport::Endpoint;

/// Prefix of simulated serials unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "SIM";
/// Name of the agent's store inside the data directory.
pub const STORE_FILE: &str = "agent.redb";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read the config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {message}", .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("no {what} given: pass {flag} or set `{key}` in the config file")]
    Missing {
        what: &'static str,
        flag: &'static str,
        key: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The installation site (`--site`, `site`), within what the relay accepts: a longer one would
/// have every state announcement refused.
fn site(given: Option<String>) -> Result<String, ConfigError> {
    let site = given.unwrap_or_default();
    if site.len() > protocol::device::MAX_SITE_BYTES {
        return Err(ConfigError::Invalid(format!(
            "--site (site) is {} bytes; the relay accepts at most {}",
            site.len(),
            protocol::device::MAX_SITE_BYTES
        )));
    }
    Ok(site)
}

/// The config file, as written. Every key is optional here; [`RunSettings::resolve`] and
/// [`FleetSettings::resolve`] say which ones a subcommand needs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The relay, or a list of relays in order of preference (failover).
    #[serde(default, deserialize_with = "de_urls")]
    pub broker: Vec<BrokerUrl>,
    /// An HTTP proxy to tunnel through (CONNECT); without it HTTPS_PROXY and NO_PROXY decide.
    #[serde(default, deserialize_with = "de_proxy")]
    pub proxy: Option<ProxyUrl>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub serial: Option<Serial>,
    pub data_dir: Option<PathBuf>,
    pub site: Option<String>,
    /// The firmware publisher's public key file (64 hex digits).
    pub publisher_key: Option<PathBuf>,
    #[serde(default)]
    pub session: SessionConfig,
    #[serde(default)]
    pub sim: SimConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
    /// `run` only: drive a real device through commands instead of the simulated copier.
    pub exec: Option<ExecConfig>,
    /// Which faults are fatal, and how injected ones are picked up (Fig. 5).
    #[serde(default)]
    pub faults: FaultsConfig,
    /// Reports the agent sends on its own schedule.
    #[serde(default)]
    pub report: ReportConfig,
    /// `text` (the default) or `json`: one JSON object per line, for log shippers.
    pub log_format: Option<LogFormat>,
}

/// `[faults]`: which fault codes are fatal (an alarm at once) and how often `DATA_DIR/faults/`
/// is looked at for injected ones (`device-agent fault`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsConfig {
    /// Fatal codes; every other code is transient (counted, not reported). Default: SC-541,
    /// SC-542, SC-321, SC-670.
    pub fatal: Option<Vec<String>>,
    /// Milliseconds between looks at the fault spool (SIGUSR2 looks at once). Default 250.
    pub poll_ms: Option<u64>,
}

/// `[report]`: reports sent without a job.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Send the counters every N seconds (a meter read for billing). Default: never.
    pub counters_every_secs: Option<u64>,
}

/// `[session]`: how the agent keeps its connection and resends what the relay has not confirmed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub keepalive_secs: u64,
    pub connect_timeout_secs: u64,
    pub reconnect_min_secs: u64,
    pub reconnect_max_secs: u64,
    pub resend_min_secs: u64,
    pub resend_max_secs: u64,
    pub max_packet_bytes: usize,
    /// A firmware download asks again for chunks that have not come after this long.
    pub fetch_timeout_secs: u64,
    /// A periodic check-in ends after this long without news from the relay (and with no job
    /// running and nothing unacked).
    pub drain_quiet_ms: u64,
    /// persistent (stay connected) or periodic (connect on the schedule, drain, disconnect).
    pub mode: SessionMode,
    /// Periodic: check in every this many seconds.
    pub interval_secs: Option<u64>,
    /// Periodic: also check in at these times (UTC): `hourly:MM`, `daily:HH:MM`,
    /// `weekly:DAY HH:MM`, `monthly:DD HH:MM`.
    pub calendar: Vec<String>,
    /// Periodic: also check in at these moments (`power-on`, `operator-action` = SIGUSR1).
    pub moments: Option<Vec<String>>,
    /// Periodic: also check in when these hold (`count:COUNTER/EVERY`, `fault:CODE`).
    pub conditions: Vec<String>,
    /// With several relays: while on a fallback, probe the preferred ones this often and return
    /// to the first that answers (once no job is running). 0 never returns.
    pub failback_secs: u64,
    /// Every relay in `broker` belongs to one tree (a parent relay and its children): they keep
    /// one job list, so a job's reports go to whichever of them the device is on. Without it a
    /// job's reports wait for the relay that issued the job (separate relays number their jobs
    /// apart).
    pub one_tree: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            keepalive_secs: 30,
            connect_timeout_secs: 10,
            reconnect_min_secs: 1,
            reconnect_max_secs: 30,
            resend_min_secs: 2,
            resend_max_secs: 60,
            max_packet_bytes: 1 << 20,
            fetch_timeout_secs: 10,
            drain_quiet_ms: 1000,
            mode: SessionMode::Persistent,
            interval_secs: None,
            calendar: Vec::new(),
            moments: None,
            conditions: Vec::new(),
            failback_secs: 30,
            one_tree: false,
        }
    }
}

/// `[sim]`: the simulated copier behind `run` and every copier of `fleet`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    pub model: Option<String>,
    pub firmware: Option<String>,
    pub pages_per_minute: Option<f64>,
    /// How long writing a firmware image takes.
    pub write_delay_ms: Option<u64>,
    /// Versions whose health check fails (forcing a rollback).
    #[serde(default)]
    pub fail_health_check_versions: Vec<String>,
    /// The first N image writes fail their read-back.
    pub fail_writes: Option<u32>,
    /// This share of copiers (by serial) fail every firmware write. Default 0.
    pub fail_firmware_percent: Option<u8>,
    /// Factory firmware versions spread over a fleet's copiers (by serial) instead of
    /// `firmware` for all.
    #[serde(default)]
    pub firmware_mix: Vec<String>,
    /// Paper jams per hour of running (transient: counted in the JAM/SC data). Default 0.
    pub jam_rate_per_hour: Option<f64>,
    /// Fatal faults (a code of `[faults] fatal`) per hour of running. Default 0.
    pub fatal_rate_per_hour: Option<f64>,
    /// A simulated fatal fault clears by itself after this many seconds (a technician came).
    /// Default: it stays until `device-agent fault … clear CODE`.
    pub fatal_clear_secs: Option<u64>,
}

/// `[exec]`: the hooks of a real device (see [`crate::exec`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    pub get_data: Vec<String>,
    pub apply: Option<Vec<String>>,
    pub write_image: Option<Vec<String>>,
    pub switch_slot: Option<Vec<String>>,
    pub health_check: Option<Vec<String>>,
    pub timeout_secs: Option<u64>,
    pub write_timeout_secs: Option<u64>,
}

/// `[fleet]`: only `device-agent fleet` reads these.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    pub count: Option<u32>,
    pub pki_dir: Option<PathBuf>,
    pub prefix: Option<String>,
    pub connect_spread_ms: Option<u64>,
}

/// `broker = "URL"` or `broker = ["URL", "URL", …]`.
fn de_urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BrokerUrl>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let texts = match OneOrMany::deserialize(d)? {
        OneOrMany::One(t) => vec![t],
        OneOrMany::Many(ts) => ts,
    };
    texts
        .iter()
        .map(|t| t.parse().map_err(serde::de::Error::custom))
        .collect()
}

fn de_proxy<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ProxyUrl>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// The relays from the flags (all of them, if any is given) or else the file, each with its
/// proxy: `--proxy` or `proxy`, else the environment's, as curl reads it.
fn relays(
    flags: Vec<BrokerUrl>,
    file: Vec<BrokerUrl>,
    proxy: Option<ProxyUrl>,
) -> Result<Vec<Endpoint>, ConfigError> {
    let urls = if flags.is_empty() { file } else { flags };
    if urls.is_empty() {
        return Err(ConfigError::Missing {
            what: "relay",
            flag: "--broker mqtts://HOST:PORT",
            key: "broker",
        });
    }
    Endpoint::resolve(&urls, proxy.as_ref(), |name| std::env::var(name).ok())
        .map_err(|e| ConfigError::Invalid(e.to_string()))
}

impl FileConfig {
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        FileConfig::parse(&text, path)
    }

    fn load_opt(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        path.map_or_else(|| Ok(FileConfig::default()), FileConfig::load)
    }
}

/// Session timing as the code uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSettings {
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub resend_min: Duration,
    pub resend_max: Duration,
    pub max_packet_bytes: usize,
    pub fetch_timeout: Duration,
    pub drain_quiet: Duration,
    /// How often a device on a fallback relay probes the preferred ones; zero: never.
    pub failback: Duration,
    /// The relays are one tree: a job's reports may go to any of them.
    pub one_tree: bool,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings::from_config(&SessionConfig::default())
            .unwrap_or_else(|_| unreachable!("defaults are valid"))
    }
}

impl SessionSettings {
    fn from_config(c: &SessionConfig) -> Result<SessionSettings, ConfigError> {
        let secs = Duration::from_secs;
        if c.keepalive_secs < 5 {
            return Err(ConfigError::Invalid(format!(
                "session.keepalive_secs = {} is too short: use 5 or more",
                c.keepalive_secs
            )));
        }
        for (name, min, max) in [
            ("reconnect", c.reconnect_min_secs, c.reconnect_max_secs),
            ("resend", c.resend_min_secs, c.resend_max_secs),
        ] {
            if min == 0 || max < min {
                return Err(ConfigError::Invalid(format!(
                    "session.{name}_min_secs = {min} and {name}_max_secs = {max}: use 1 ≤ min ≤ max"
                )));
            }
        }
        if c.max_packet_bytes < 4096 {
            return Err(ConfigError::Invalid(format!(
                "session.max_packet_bytes = {} is too small: use 4096 or more",
                c.max_packet_bytes
            )));
        }
        if c.fetch_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "session.fetch_timeout_secs = 0: use 1 or more".to_owned(),
            ));
        }
        Ok(SessionSettings {
            keepalive: secs(c.keepalive_secs),
            connect_timeout: secs(c.connect_timeout_secs.max(1)),
            reconnect_min: secs(c.reconnect_min_secs),
            reconnect_max: secs(c.reconnect_max_secs),
            resend_min: secs(c.resend_min_secs),
            resend_max: secs(c.resend_max_secs),
            max_packet_bytes: c.max_packet_bytes,
            fetch_timeout: secs(c.fetch_timeout_secs),
            drain_quiet: Duration::from_millis(c.drain_quiet_ms),
            failback: secs(c.failback_secs),
            one_tree: c.one_tree,
        })
    }
}

/// The schedule the agent starts with: flags over `[session]`. (A schedule set by a job, kept in
/// the agent's store, wins over both at run time.)
fn schedule(
    c: &SessionConfig,
    mode: Option<SessionMode>,
    interval_secs: Option<u64>,
) -> Result<Schedule, ConfigError> {
    let bad = |key: &str, e: String| ConfigError::Invalid(format!("session.{key}: {e}"));
    let mode = mode.unwrap_or(c.mode);
    let interval_secs = interval_secs.or(c.interval_secs);
    if mode == SessionMode::Persistent && interval_secs.is_some() {
        return Err(ConfigError::Invalid(
            "an interval only applies to a periodic session: add --session periodic (or session.mode = \"periodic\")".to_owned(),
        ));
    }
    let calendar = c
        .calendar
        .iter()
        .map(|s| s.parse::<Calendar>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("calendar", e))?;
    let moments = match &c.moments {
        Some(list) => list
            .iter()
            .map(|s| s.parse::<Moment>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("moments", e))?,
        None => vec![Moment::PowerOn, Moment::OperatorAction],
    };
    let conditions = c
        .conditions
        .iter()
        .map(|s| s.parse::<Condition>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("conditions", e))?;
    let schedule = Schedule {
        mode,
        interval_secs,
        calendar,
        moments,
        conditions,
    };
    schedule.check().map_err(|e| {
        ConfigError::Invalid(format!(
            "{e}; for a periodic session pass --interval-secs N or set session.interval_secs or session.calendar"
        ))
    })?;
    Ok(schedule)
}

fn publisher_key(path: Option<&Path>) -> Result<Option<PublisherKey>, ConfigError> {
    path.map(|p| PublisherKey::load(p).map_err(ConfigError::Invalid))
        .transpose()
}

fn exec_settings(c: &ExecConfig) -> Result<ExecSettings, ConfigError> {
    let check = |name: &str, hook: &Option<Vec<String>>| match hook {
        Some(h) if h.is_empty() => Err(ConfigError::Invalid(format!(
            "exec.{name} is empty: give the command as [\"program\", \"arg\", …]"
        ))),
        _ => Ok(()),
    };
    check("get_data", &Some(c.get_data.clone()))?;
    for (name, hook) in [
        ("apply", &c.apply),
        ("write_image", &c.write_image),
        ("switch_slot", &c.switch_slot),
        ("health_check", &c.health_check),
    ] {
        check(name, hook)?;
    }
    let firmware = [&c.write_image, &c.switch_slot, &c.health_check];
    if firmware.iter().any(|h| h.is_some()) && firmware.iter().any(|h| h.is_none()) {
        return Err(ConfigError::Invalid(
            "exec: firmware updates need all of write_image, switch_slot and health_check (or none)"
                .to_owned(),
        ));
    }
    Ok(ExecSettings {
        get_data: c.get_data.clone(),
        apply: c.apply.clone(),
        write_image: c.write_image.clone(),
        switch_slot: c.switch_slot.clone(),
        health_check: c.health_check.clone(),
        timeout: Duration::from_secs(c.timeout_secs.unwrap_or(60).max(1)),
        write_timeout: Duration::from_secs(c.write_timeout_secs.unwrap_or(1800).max(1)),
    })
}

fn sim_settings(c: &SimConfig) -> Result<SimSettings, ConfigError> {
    let pages_per_minute = c.pages_per_minute.unwrap_or(DEFAULT_PAGES_PER_MINUTE);
    if !(0.0..=100_000.0).contains(&pages_per_minute) {
        return Err(ConfigError::Invalid(format!(
            "sim.pages_per_minute = {pages_per_minute} is out of range: use 0 to 100000"
        )));
    }
    Ok(SimSettings {
        model: c.model.clone(),
        firmware: c
            .firmware
            .clone()
            .unwrap_or_else(|| DEFAULT_FIRMWARE.to_owned()),
        pages_per_minute,
        write_delay: Duration::from_millis(c.write_delay_ms.unwrap_or(0)),
        fail_health_check_versions: c.fail_health_check_versions.clone(),
        fail_writes: c.fail_writes.unwrap_or(0),
        firmware_mix: c.firmware_mix.clone(),
        fail_firmware_percent: match c.fail_firmware_percent.unwrap_or(0) {
            p @ 0..=100 => p,
            p => {
                return Err(ConfigError::Invalid(format!(
                    "sim.fail_firmware_percent = {p} is out of range: use 0 to 100"
                )));
            }
        },
    })
}

/// Fault handling and meter reads from `[faults]`, `[report]` and the fault rates of `[sim]`.
fn monitor_settings(
    faults: &FaultsConfig,
    sim: &SimConfig,
    report: &ReportConfig,
) -> Result<MonitorSettings, ConfigError> {
    let mut out = MonitorSettings::default();
    if let Some(fatal) = &faults.fatal {
        for code in fatal {
            protocol::alarm::check_code(code)
                .map_err(|e| ConfigError::Invalid(format!("faults.fatal: {e}")))?;
        }
        out.faults.fatal = fatal.clone();
    }
    if let Some(ms) = faults.poll_ms {
        if ms == 0 {
            return Err(ConfigError::Invalid(
                "faults.poll_ms = 0: use 1 or more".to_owned(),
            ));
        }
        out.faults.poll = Duration::from_millis(ms);
    }
    for (key, rate) in [
        ("jam_rate_per_hour", sim.jam_rate_per_hour),
        ("fatal_rate_per_hour", sim.fatal_rate_per_hour),
    ] {
        if let Some(r) = rate
            && !(0.0..=3_600_000.0).contains(&r)
        {
            return Err(ConfigError::Invalid(format!(
                "sim.{key} = {r} is out of range: use 0 to 3600000"
            )));
        }
    }
    out.faults.jam_rate_per_hour = sim.jam_rate_per_hour.unwrap_or(0.0);
    out.faults.fatal_rate_per_hour = sim.fatal_rate_per_hour.unwrap_or(0.0);
    out.faults.fatal_clear_after = sim.fatal_clear_secs.map(Duration::from_secs);
    out.counters_every = match report.counters_every_secs {
        Some(0) => {
            return Err(ConfigError::Invalid(
                "report.counters_every_secs = 0: use 1 or more, or leave it out".to_owned(),
            ));
        }
        Some(secs) => Some(Duration::from_secs(secs)),
        None => None,
    };
    Ok(out)
}

fn required<T>(
    value: Option<T>,
    what: &'static str,
    flag: &'static str,
    key: &'static str,
) -> Result<T, ConfigError> {
    value.ok_or(ConfigError::Missing { what, flag, key })
}

/// The flags `run` and `fleet` both take.
struct SharedFlags {
    broker: Vec<BrokerUrl>,
    data_dir: Option<PathBuf>,
    site: Option<String>,
    ready_file: Option<PathBuf>,
    common: CommonArgs,
}

/// Moves the flags `run` and `fleet` both take out of either's arguments: [`RunArgs`] and
/// [`FleetArgs`] name them alike.
macro_rules! shared_flags {
    ($args:ident) => {
        SharedFlags {
            broker: $args.broker,
            data_dir: $args.data_dir,
            site: $args.site,
            ready_file: $args.ready_file,
            common: $args.common,
        }
    };
}

/// What `run` and `fleet` both need, merged the same way for both: a flag, when given, wins
/// over the file.
struct Shared {
    relays: Vec<Endpoint>,
    data_dir: PathBuf,
    site: String,
    ready_file: Option<PathBuf>,
    session: SessionSettings,
    sim: SimSettings,
    schedule: Schedule,
    publisher_key: Option<PublisherKey>,
    monitor: MonitorSettings,
    log_format: LogFormat,
}

impl Shared {
    fn merge(file: &FileConfig, flags: SharedFlags) -> Result<Shared, ConfigError> {
        let monitor = monitor_settings(&file.faults, &file.sim, &file.report)?;
        let mut session = file.session.clone();
        session.one_tree |= flags.common.one_tree;
        if let Some(secs) = flags.common.failback_secs {
            session.failback_secs = secs;
        }
        Ok(Shared {
            relays: relays(
                flags.broker,
                file.broker.clone(),
                flags.common.proxy.clone().or(file.proxy.clone()),
            )?,
            data_dir: required(
                flags.data_dir.or(file.data_dir.clone()),
                "data directory",
                "--data-dir DIR",
                "data_dir",
            )?,
            site: site(flags.site.or(file.site.clone()))?,
            ready_file: flags.ready_file,
            session: SessionSettings::from_config(&session)?,
            sim: sim_settings(&file.sim)?,
            schedule: schedule(
                &file.session,
                flags.common.session_mode(),
                flags.common.interval_secs,
            )?,
            publisher_key: publisher_key(
                flags
                    .common
                    .publisher_key
                    .or(file.publisher_key.clone())
                    .as_deref(),
            )?,
            monitor,
            log_format: flags
                .common
                .log_format
                .or(file.log_format)
                .unwrap_or_default(),
        })
    }
}

/// Everything `device-agent run` needs, checked.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// The relays in order of preference, each with its way there.
    pub relays: Vec<Endpoint>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: Serial,
    pub data_dir: PathBuf,
    pub site: String,
    pub ready_file: Option<PathBuf>,
    pub session: SessionSettings,
    pub sim: SimSettings,
    /// The schedule from flags and config.
    pub schedule: Schedule,
    pub publisher_key: Option<PublisherKey>,
    /// Hooks of a real device; `None`: the simulated copier.
    pub exec: Option<ExecSettings>,
    /// Faults (watched in `DATA_DIR/faults/`) and meter reads.
    pub monitor: MonitorSettings,
    /// How the agent's log lines are written.
    pub log_format: LogFormat,
}

impl RunSettings {
    /// Reads `--config` if given, then lets every given flag win over it.
    pub fn resolve(args: RunArgs) -> Result<RunSettings, ConfigError> {
        let file = FileConfig::load_opt(args.config.as_deref())?;
        RunSettings::merge(file, args)
    }

    pub fn merge(file: FileConfig, args: RunArgs) -> Result<RunSettings, ConfigError> {
        let mut shared = Shared::merge(&file, shared_flags!(args))?;
        // Injected faults arrive as files in the data directory (`device-agent fault`).
        shared.monitor.faults.spool = Some(shared.data_dir.join(crate::faults::SPOOL_DIR));
        Ok(RunSettings {
            relays: shared.relays,
            ca: required(args.ca.or(file.ca), "CA certificate", "--ca FILE", "ca")?,
            cert: required(
                args.cert.or(file.cert),
                "device certificate",
                "--cert FILE",
                "cert",
            )?,
            key: required(args.key.or(file.key), "private key", "--key FILE", "key")?,
            serial: required(
                args.serial.or(file.serial),
                "serial",
                "--serial SERIAL",
                "serial",
            )?,
            data_dir: shared.data_dir,
            site: shared.site,
            ready_file: shared.ready_file,
            session: shared.session,
            sim: shared.sim,
            schedule: shared.schedule,
            publisher_key: shared.publisher_key,
            exec: file.exec.as_ref().map(exec_settings).transpose()?,
            monitor: shared.monitor,
            log_format: shared.log_format,
        })
    }

    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join(STORE_FILE)
    }
}

/// Everything `device-agent fleet` needs, checked.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub count: u32,
    pub pki_dir: PathBuf,
    /// The relays in order of preference, each with its way there.
    pub relays: Vec<Endpoint>,
    pub data_dir: PathBuf,
    pub prefix: String,
    pub site: String,
    pub ready_file: Option<PathBuf>,
    /// Each copier connects after a random delay below this, so they do not all handshake at once.
    pub connect_spread: Duration,
    pub session: SessionSettings,
    pub sim: SimSettings,
    pub schedule: Schedule,
    pub publisher_key: Option<PublisherKey>,
    /// Faults (injected in-process: [`crate::faults::inject`]) and meter reads.
    pub monitor: MonitorSettings,
    /// How the fleet's log lines are written.
    pub log_format: LogFormat,
}

/// Most copiers one fleet process simulates: each holds a socket, and a process may hold at most
/// 20,000 open files here.
pub const MAX_FLEET: u32 = 15_000;

impl FleetSettings {
    pub fn resolve(args: FleetArgs) -> Result<FleetSettings, ConfigError> {
        let file = FileConfig::load_opt(args.config.as_deref())?;
        FleetSettings::merge(file, args)
    }

    pub fn merge(file: FileConfig, args: FleetArgs) -> Result<FleetSettings, ConfigError> {
        let fail_firmware_percent = args.fail_firmware_percent;
        let firmware_mix = args.firmware_mix.clone();
        let count = required(
            args.count.or(file.fleet.count),
            "fleet size",
            "--count N",
            "fleet.count",
        )?;
        if count == 0 || count > MAX_FLEET {
            return Err(ConfigError::Invalid(format!(
                "fleet size {count} is out of range: use 1 to {MAX_FLEET} (a process may hold 20,000 open files); run several fleets for more"
            )));
        }
        let prefix = args
            .prefix
            .or(file.fleet.prefix.clone())
            .unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        // The longest serial this prefix makes must itself be a valid serial.
        Serial::parse(&serial_for(&prefix, count - 1)).map_err(|e| {
            ConfigError::Invalid(format!(
                "prefix {prefix:?} does not make valid serials: {e}"
            ))
        })?;
        // By default about 2 ms per copier, at most 10 s: a fleet of 1,000 connects over 2 s.
        let spread_ms = file
            .fleet
            .connect_spread_ms
            .unwrap_or_else(|| (u64::from(count) * 2).min(10_000));
        let pki_dir = required(
            args.pki_dir.or(file.fleet.pki_dir.clone()),
            "PKI directory",
            "--pki-dir DIR",
            "fleet.pki_dir",
        )?;
        let shared = Shared::merge(&file, shared_flags!(args))?;
        Ok(FleetSettings {
            count,
            pki_dir,
            relays: shared.relays,
            data_dir: shared.data_dir,
            prefix,
            site: shared.site,
            ready_file: shared.ready_file,
            connect_spread: Duration::from_millis(spread_ms),
            session: shared.session,
            sim: SimSettings {
                firmware_mix: if firmware_mix.is_empty() {
                    shared.sim.firmware_mix.clone()
                } else {
                    firmware_mix
                },
                fail_firmware_percent: match fail_firmware_percent {
                    Some(p) if p > 100 => {
                        return Err(ConfigError::Invalid(format!(
                            "--fail-firmware-percent {p} is out of range: use 0 to 100"
                        )));
                    }
                    Some(p) => p,
                    None => shared.sim.fail_firmware_percent,
                },
                ..shared.sim
            },
            schedule: shared.schedule,
            publisher_key: shared.publisher_key,
            monitor: shared.monitor,
            log_format: shared.log_format,
        })
    }

    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join(STORE_FILE)
    }

    /// Each simulated copier's own directory (downloads, slots, settings).
    pub fn home_of(&self, serial: &Serial) -> PathBuf {
        self.data_dir.join("devices").join(serial.as_str())
    }

    /// The serials of the fleet, in order: `{prefix}-00000`, `{prefix}-00001` … `{prefix}-{count-1}`.
    pub fn serials(&self) -> Result<Vec<Serial>, ConfigError> {
        (0..self.count)
            .map(|i| {
                Serial::parse(&serial_for(&self.prefix, i))
                    .map_err(|e| ConfigError::Invalid(e.to_string()))
            })
            .collect()
    }
}

/// The serial of simulated copier number `i`, counting from 0.
pub fn serial_for(prefix: &str, i: u32) -> String {
    format!("{prefix}-{i:05}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        broker = "mqtts://relay.example.com:8883"
        ca = "ca.pem"
        cert = "c.pem"
        key = "c.key"
        serial = "C1"
        data_dir = "/var/lib/chukei"
        site = "Osaka"
        [session]
        keepalive_secs = 60
        [sim]
        pages_per_minute = 10.0
        [fleet]
        count = 3
        pki_dir = "pki"
        prefix = "LAB"
    "#;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(text, Path::new("device-agent.toml"))
    }

    #[test]
    fn a_full_file_is_read() {
        let s = RunSettings::merge(parse(FULL).unwrap(), RunArgs::default()).unwrap();
        assert_eq!(s.relays.len(), 1);
        assert_eq!(s.relays[0].url.host, "relay.example.com");
        assert_eq!(s.session.failback, Duration::from_secs(30));
        assert_eq!(s.serial.as_str(), "C1");
        assert_eq!(s.site, "Osaka");
        assert_eq!(s.session.keepalive, Duration::from_secs(60));
        assert_eq!(
            s.session.resend_max,
            Duration::from_secs(60),
            "unset keys keep their defaults"
        );
        assert_eq!(s.sim.pages_per_minute, 10.0);
        assert_eq!(s.store_path(), PathBuf::from("/var/lib/chukei/agent.redb"));
    }

    #[test]
    fn unknown_keys_are_refused_naming_the_key() {
        for (text, key) in [
            ("brokr = \"mqtts://x:1\"", "brokr"),
            ("[session]\nkeepalive = 30", "keepalive"),
            ("[fleet]\ncont = 3", "cont"),
            ("[simulator]\n", "simulator"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains("device-agent.toml"),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn bad_values_in_the_file_are_refused() {
        let e = parse("broker = \"relay:8883\"").unwrap_err().to_string();
        assert!(e.contains("mqtts://HOST:PORT"), "{e}");
        let e = parse("serial = \"C/1\"").unwrap_err().to_string();
        assert!(e.contains("ASCII letters"), "{e}");
        let e = RunSettings::merge(parse(&format!("{FULL}\n")).unwrap(), RunArgs::default());
        assert!(e.is_ok());
        let bad = FULL.replace("keepalive_secs = 60", "keepalive_secs = 1");
        let e = RunSettings::merge(parse(&bad).unwrap(), RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("keepalive_secs"), "{e}");
        let long = FULL.replace(
            "site = \"Osaka\"",
            &format!("site = \"{}\"", "x".repeat(300)),
        );
        assert_ne!(long, FULL);
        let e = RunSettings::merge(parse(&long).unwrap(), RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--site") && e.contains("at most 256"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let args = RunArgs {
            broker: vec!["mqtts://other:1".parse().unwrap()],
            serial: Some(Serial::parse("C2").unwrap()),
            site: Some("Kyoto".into()),
            ..RunArgs::default()
        };
        let s = RunSettings::merge(parse(FULL).unwrap(), args).unwrap();
        let url = &s.relays[0].url;
        assert_eq!((url.host.as_str(), url.port), ("other", 1));
        assert_eq!(s.serial.as_str(), "C2");
        assert_eq!(s.site, "Kyoto");
        assert_eq!(
            s.ca,
            PathBuf::from("ca.pem"),
            "what no flag overrides comes from the file"
        );

        let f = FleetSettings::merge(
            parse(FULL).unwrap(),
            FleetArgs {
                count: Some(7),
                ..FleetArgs::default()
            },
        )
        .unwrap();
        assert_eq!((f.count, f.prefix.as_str()), (7, "LAB"));
    }

    #[test]
    fn a_missing_value_names_the_flag_and_the_key() {
        let e = RunSettings::merge(FileConfig::default(), RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--broker") && e.contains("`broker`"), "{e}");
        let e = FleetSettings::merge(FileConfig::default(), FleetArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--count") && e.contains("fleet.count"), "{e}");
    }

    #[test]
    fn fleet_serials_and_limits() {
        let args = || FleetArgs {
            count: Some(3),
            pki_dir: Some("pki".into()),
            broker: vec!["mqtts://localhost:1".parse().unwrap()],
            data_dir: Some("d".into()),
            ..FleetArgs::default()
        };
        let f = FleetSettings::merge(FileConfig::default(), args()).unwrap();
        let serials: Vec<String> = f.serials().unwrap().iter().map(|s| s.to_string()).collect();
        assert_eq!(serials, ["SIM-00000", "SIM-00001", "SIM-00002"]);
        assert!(
            FleetSettings::merge(
                FileConfig::default(),
                FleetArgs {
                    count: Some(0),
                    ..args()
                }
            )
            .is_err()
        );
        assert!(
            FleetSettings::merge(
                FileConfig::default(),
                FleetArgs {
                    count: Some(20_000),
                    ..args()
                }
            )
            .is_err()
        );
        let e = FleetSettings::merge(
            FileConfig::default(),
            FleetArgs {
                prefix: Some("a/b".into()),
                ..args()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("prefix"), "{e}");
    }

    #[test]
    fn schedule_exec_firmware_and_sim_keys_are_read() {
        let text = format!(
            "{FULL}\n{}",
            r#"
            [exec]
            get_data = ["/opt/dev.sh", "get_data"]
            apply = ["/opt/dev.sh", "apply"]
            timeout_secs = 5
            "#
        )
        .replace(
            "keepalive_secs = 60",
            "keepalive_secs = 60\nmode = \"periodic\"\ninterval_secs = 600\ncalendar = [\"daily:02:00\"]\nconditions = [\"count:total/1000\"]\nfetch_timeout_secs = 3",
        )
        .replace(
            "pages_per_minute = 10.0",
            "pages_per_minute = 10.0\nwrite_delay_ms = 250\nfail_health_check_versions = [\"9.9\"]\nfail_writes = 2",
        );
        let s = RunSettings::merge(parse(&text).unwrap(), RunArgs::default()).unwrap();
        assert_eq!(s.schedule.mode, SessionMode::Periodic);
        assert_eq!(s.schedule.interval_secs, Some(600));
        assert_eq!(s.schedule.calendar[0].to_string(), "daily:02:00");
        assert_eq!(
            s.schedule.moments,
            [Moment::PowerOn, Moment::OperatorAction],
            "moments default to both"
        );
        assert_eq!(s.session.fetch_timeout, Duration::from_secs(3));
        assert_eq!(s.sim.write_delay, Duration::from_millis(250));
        assert_eq!(s.sim.fail_health_check_versions, ["9.9"]);
        assert_eq!(s.sim.fail_writes, 2);
        let exec = s.exec.unwrap();
        assert_eq!(exec.get_data, ["/opt/dev.sh", "get_data"]);
        assert_eq!(exec.timeout, Duration::from_secs(5));
        assert!(exec.write_image.is_none());

        // The flags win: a persistent session from the command line.
        let args = RunArgs {
            common: crate::cli::CommonArgs {
                session: Some("persistent".into()),
                ..Default::default()
            },
            ..RunArgs::default()
        };
        let e = RunSettings::merge(parse(&text).unwrap(), args)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--session periodic"),
            "an interval with a persistent session: {e}"
        );

        let bad = text.replace("daily:02:00", "daily:25:00");
        let e = RunSettings::merge(parse(&bad).unwrap(), RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("session.calendar") && e.contains("25:00"), "{e}");
        let half = text.replace(
            "timeout_secs = 5",
            "write_image = [\"/opt/dev.sh\", \"write_image\"]",
        );
        let e = RunSettings::merge(parse(&half).unwrap(), RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("switch_slot"), "{e}");
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/device-agent.toml");
        let file = FileConfig::load(&path).unwrap();
        RunSettings::merge(file, RunArgs::default()).unwrap();
        let file = FileConfig::load(&path).unwrap();
        FleetSettings::merge(file, FleetArgs::default()).unwrap();
    }

    #[test]
    fn several_relays_a_proxy_and_failback_come_from_the_file_or_the_flags() {
        let text = FULL
            .replace(
                "broker = \"mqtts://relay.example.com:8883\"",
                "broker = [\"mqtts://relay-a:8883\", \"wss://relay-b:443/mqtt\"]\nproxy = \"http://proxy.corp:3128\"",
            )
            .replace("keepalive_secs = 60", "keepalive_secs = 60\nfailback_secs = 90");
        let s = RunSettings::merge(parse(&text).unwrap(), RunArgs::default()).unwrap();
        let urls: Vec<String> = s.relays.iter().map(|e| e.url.to_string()).collect();
        assert_eq!(urls, ["mqtts://relay-a:8883", "wss://relay-b:443/mqtt"]);
        assert!(
            s.relays
                .iter()
                .all(|e| e.proxy.as_ref().is_some_and(|p| p.host == "proxy.corp"))
        );
        assert_eq!(s.session.failback, Duration::from_secs(90));

        let args = RunArgs {
            broker: vec![
                "mqtts://x:1".parse().unwrap(),
                "mqtts://y:2".parse().unwrap(),
                "mqtts://z:3".parse().unwrap(),
            ],
            common: crate::cli::CommonArgs {
                proxy: Some("http://u:p@flagproxy:8080".parse().unwrap()),
                failback_secs: Some(5),
                ..Default::default()
            },
            ..RunArgs::default()
        };
        let s = RunSettings::merge(parse(&text).unwrap(), args).unwrap();
        let hosts: Vec<&str> = s.relays.iter().map(|e| e.url.host.as_str()).collect();
        assert_eq!(hosts, ["x", "y", "z"], "the flags replace the file's list");
        assert_eq!(
            s.relays[0].proxy.as_ref().map(|p| p.host.as_str()),
            Some("flagproxy")
        );
        assert_eq!(s.session.failback, Duration::from_secs(5));

        let e = parse("proxy = \"socks5://p:1\"").unwrap_err().to_string();
        assert!(e.contains("http://HOST:PORT"), "{e}");
        let e = parse("broker = [\"mqtts://a:1\", \"b:2\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("wss://HOST:PORT/mqtt"), "{e}");
    }
}
