//! Configuration: a TOML file for what a site shares, flags for the moment. The file refuses
//! unknown keys, so a typo is an error rather than a silent default; a flag, when given, wins over
//! the file. `config/device-agent.toml` in the repository shows every key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::Serial;
use protocol::url::BrokerUrl;
use serde::{Deserialize, Deserializer};

use crate::cli::{FleetArgs, RunArgs};
use crate::sim::{DEFAULT_FIRMWARE, DEFAULT_PAGES_PER_MINUTE, SimSettings};

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

/// The config file, as written. Every key is optional here; [`RunSettings::resolve`] and
/// [`FleetSettings::resolve`] say which ones a subcommand needs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, deserialize_with = "de_url")]
    pub broker: Option<BrokerUrl>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub serial: Option<Serial>,
    pub data_dir: Option<PathBuf>,
    pub site: Option<String>,
    #[serde(default)]
    pub session: SessionConfig,
    #[serde(default)]
    pub sim: SimConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
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

fn de_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BrokerUrl>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
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
        Ok(SessionSettings {
            keepalive: secs(c.keepalive_secs),
            connect_timeout: secs(c.connect_timeout_secs.max(1)),
            reconnect_min: secs(c.reconnect_min_secs),
            reconnect_max: secs(c.reconnect_max_secs),
            resend_min: secs(c.resend_min_secs),
            resend_max: secs(c.resend_max_secs),
            max_packet_bytes: c.max_packet_bytes,
        })
    }
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
    })
}

fn required<T>(
    value: Option<T>,
    what: &'static str,
    flag: &'static str,
    key: &'static str,
) -> Result<T, ConfigError> {
    value.ok_or(ConfigError::Missing { what, flag, key })
}

/// Everything `device-agent run` needs, checked.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub broker: BrokerUrl,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: Serial,
    pub data_dir: PathBuf,
    pub site: String,
    pub ready_file: Option<PathBuf>,
    pub session: SessionSettings,
    pub sim: SimSettings,
}

impl RunSettings {
    /// Reads `--config` if given, then lets every given flag win over it.
    pub fn resolve(args: RunArgs) -> Result<RunSettings, ConfigError> {
        let file = FileConfig::load_opt(args.config.as_deref())?;
        RunSettings::merge(file, args)
    }

    pub fn merge(file: FileConfig, args: RunArgs) -> Result<RunSettings, ConfigError> {
        Ok(RunSettings {
            broker: required(
                args.broker.or(file.broker),
                "relay",
                "--broker mqtts://HOST:PORT",
                "broker",
            )?,
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
            data_dir: required(
                args.data_dir.or(file.data_dir),
                "data directory",
                "--data-dir DIR",
                "data_dir",
            )?,
            site: args.site.or(file.site).unwrap_or_default(),
            ready_file: args.ready_file,
            session: SessionSettings::from_config(&file.session)?,
            sim: sim_settings(&file.sim)?,
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
    pub broker: BrokerUrl,
    pub data_dir: PathBuf,
    pub prefix: String,
    pub site: String,
    pub ready_file: Option<PathBuf>,
    /// Each copier connects after a random delay below this, so they do not all handshake at once.
    pub connect_spread: Duration,
    pub session: SessionSettings,
    pub sim: SimSettings,
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
            .or(file.fleet.prefix)
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
        Ok(FleetSettings {
            count,
            pki_dir: required(
                args.pki_dir.or(file.fleet.pki_dir),
                "PKI directory",
                "--pki-dir DIR",
                "fleet.pki_dir",
            )?,
            broker: required(
                args.broker.or(file.broker),
                "relay",
                "--broker mqtts://HOST:PORT",
                "broker",
            )?,
            data_dir: required(
                args.data_dir.or(file.data_dir),
                "data directory",
                "--data-dir DIR",
                "data_dir",
            )?,
            prefix,
            site: args.site.or(file.site).unwrap_or_default(),
            ready_file: args.ready_file,
            connect_spread: Duration::from_millis(spread_ms),
            session: SessionSettings::from_config(&file.session)?,
            sim: sim_settings(&file.sim)?,
        })
    }

    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join(STORE_FILE)
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
        assert_eq!(s.broker.host, "relay.example.com");
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
    }

    #[test]
    fn flags_win_over_the_file() {
        let args = RunArgs {
            broker: Some("mqtts://other:1".parse().unwrap()),
            serial: Some(Serial::parse("C2").unwrap()),
            site: Some("Kyoto".into()),
            ..RunArgs::default()
        };
        let s = RunSettings::merge(parse(FULL).unwrap(), args).unwrap();
        assert_eq!((s.broker.host.as_str(), s.broker.port), ("other", 1));
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
            broker: Some("mqtts://localhost:1".parse().unwrap()),
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
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/device-agent.toml");
        let file = FileConfig::load(&path).unwrap();
        RunSettings::merge(file, RunArgs::default()).unwrap();
        let file = FileConfig::load(&path).unwrap();
        FleetSettings::merge(file, FleetArgs::default()).unwrap();
    }
}
