//! Connection settings: a TOML file for what stays the same, flags for the moment. Flags win.
//!
//! The file's keys are the flags' names (`broker`, `proxy`, `ca`, `cert`, `key`, `timeout_secs`,
//! `log_format`, and the dashboard's `allowed_hosts`, the list of its `--allowed-host`); an
//! unknown key is an error, so a typo cannot silently fall back to a default. Relative paths in
//! the file are read from the file's directory, so one file works from any working directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::log_format::LogFormat;
use protocol::proxy::{BadProxy, ProxyUrl, proxy_for};
use protocol::url::BrokerUrl;
use serde::Deserialize;

use crate::cli::ConnectArgs;
use crate::client::DEFAULT_TIMEOUT;
use crate::dashboard::{AllowedHost, hosts::BadAllowedHost};

/// The `--config` file, as written.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub broker: Option<String>,
    pub proxy: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub timeout_secs: Option<u64>,
    /// `dashboard`: names it answers to besides its listening address.
    pub allowed_hosts: Option<Vec<String>>,
    /// `text` (the default) or `json`: one JSON object per line, for log shippers.
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {source}", .path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {}: `broker`: {source}", .path.display())]
    BadBroker {
        path: PathBuf,
        source: protocol::url::BadUrl,
    },
    /// A bad `proxy` in the file, or a bad HTTPS_PROXY / ALL_PROXY in the environment.
    #[error("{0}")]
    BadProxy(BadProxy),
    #[error("config file {}: `timeout_secs` must be at least 1", .path.display())]
    ZeroTimeout { path: PathBuf },
    #[error("config file {}: `allowed_hosts`: {source}", .path.display())]
    BadAllowedHost {
        path: PathBuf,
        source: BadAllowedHost,
    },
    #[error("no {what} given: pass --{flag} {example}, or set `{flag}` in a --config file")]
    Missing {
        what: &'static str,
        flag: &'static str,
        example: &'static str,
    },
}

/// Everything a command needs to connect, after merging the file and the flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub broker: BrokerUrl,
    /// The HTTP proxy to the relay, if any: the flag, the file, or the environment (curl's way).
    pub proxy: Option<ProxyUrl>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub timeout: Duration,
    /// The file's `allowed_hosts` (the dashboard's `--allowed-host`, given, replaces them).
    pub allowed_hosts: Vec<AllowedHost>,
    /// How log lines are written (`--log-format`, else the file's `log_format`).
    pub log_format: LogFormat,
}

impl ConfigFile {
    /// Reads and parses a config file; toml's errors name the line and the key.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of the file at `path`, resolving relative paths against its directory.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
        let mut file: ConfigFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        for p in [&mut file.ca, &mut file.cert, &mut file.key]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(file)
    }
}

impl Settings {
    /// Loads `--config` if given, then lets every flag that was given override it.
    pub fn resolve(args: &ConnectArgs) -> Result<Settings, ConfigError> {
        let (file, path) = match &args.config {
            Some(path) => (ConfigFile::load(path)?, path.clone()),
            None => (ConfigFile::default(), PathBuf::new()),
        };
        Self::merge(file, &path, args)
    }

    /// The merge rule on its own: a flag, if given, wins over the file.
    pub fn merge(
        file: ConfigFile,
        path: &Path,
        args: &ConnectArgs,
    ) -> Result<Settings, ConfigError> {
        let broker = match (&args.broker, file.broker) {
            (Some(url), _) => url.clone(),
            (None, Some(text)) => text.parse().map_err(|source| ConfigError::BadBroker {
                path: path.to_owned(),
                source,
            })?,
            (None, None) => {
                return Err(ConfigError::Missing {
                    what: "broker",
                    flag: "broker",
                    example: "mqtts://HOST:PORT",
                });
            }
        };
        let proxy = match (&args.proxy, file.proxy) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(text)) => Some(text.parse().map_err(ConfigError::BadProxy)?),
            (None, None) => None,
        };
        let proxy = proxy_for(&broker, proxy.as_ref(), |name| std::env::var(name).ok())
            .map_err(ConfigError::BadProxy)?;
        let pick = |flag: &Option<PathBuf>, from_file: Option<PathBuf>, what, name, example| {
            flag.clone().or(from_file).ok_or(ConfigError::Missing {
                what,
                flag: name,
                example,
            })
        };
        let ca = pick(&args.ca, file.ca, "CA certificate", "ca", "pki/ca.pem")?;
        let cert = pick(
            &args.cert,
            file.cert,
            "host certificate",
            "cert",
            "pki/host/NAME.pem",
        )?;
        let key = pick(&args.key, file.key, "host key", "key", "pki/host/NAME.key")?;
        let timeout = match (args.timeout_secs, file.timeout_secs) {
            (Some(secs), _) => Duration::from_secs(secs),
            (None, Some(0)) => {
                return Err(ConfigError::ZeroTimeout {
                    path: path.to_owned(),
                });
            }
            (None, Some(secs)) => Duration::from_secs(secs),
            (None, None) => DEFAULT_TIMEOUT,
        };
        let allowed_hosts = file
            .allowed_hosts
            .unwrap_or_default()
            .iter()
            .map(|name| {
                name.parse().map_err(|source| ConfigError::BadAllowedHost {
                    path: path.to_owned(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Settings {
            broker,
            proxy,
            ca,
            cert,
            key,
            timeout,
            allowed_hosts,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        broker = "mqtts://relay.example.com:8883"
        ca = "pki/ca.pem"
        cert = "/etc/chukei/svc.pem"
        key = "pki/host/svc.key"
        timeout_secs = 30
    "#;

    #[test]
    fn a_full_file_is_read_and_relative_paths_follow_it() {
        let file = ConfigFile::parse(FULL, Path::new("/srv/conf/host.toml")).unwrap();
        let s = Settings::merge(
            file,
            Path::new("/srv/conf/host.toml"),
            &ConnectArgs::default(),
        )
        .unwrap();
        assert_eq!(s.broker.to_string(), "mqtts://relay.example.com:8883");
        assert_eq!(s.ca, PathBuf::from("/srv/conf/pki/ca.pem"));
        assert_eq!(s.cert, PathBuf::from("/etc/chukei/svc.pem"));
        assert_eq!(s.key, PathBuf::from("/srv/conf/pki/host/svc.key"));
        assert_eq!(s.timeout, Duration::from_secs(30));
    }

    #[test]
    fn an_unknown_key_is_refused_and_named() {
        let e = ConfigFile::parse("brokr = \"mqtts://x:1\"\n", Path::new("h.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("h.toml") && e.contains("brokr"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = ConfigFile::parse(FULL, Path::new("h.toml")).unwrap();
        let args = ConnectArgs {
            broker: Some("mqtts://localhost:1234".parse().unwrap()),
            cert: Some(PathBuf::from("other.pem")),
            timeout_secs: Some(3),
            ..ConnectArgs::default()
        };
        let s = Settings::merge(file, Path::new("h.toml"), &args).unwrap();
        assert_eq!(s.broker.to_string(), "mqtts://localhost:1234");
        assert_eq!(s.cert, PathBuf::from("other.pem"));
        assert_eq!(
            s.ca,
            PathBuf::from("pki/ca.pem"),
            "not given as a flag: the file's value"
        );
        assert_eq!(s.timeout, Duration::from_secs(3));
    }

    #[test]
    fn flags_alone_suffice_and_the_timeout_defaults_to_15_s() {
        let args = ConnectArgs {
            broker: Some("mqtts://localhost:8883".parse().unwrap()),
            ca: Some("ca.pem".into()),
            cert: Some("svc.pem".into()),
            key: Some("svc.key".into()),
            ..ConnectArgs::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.timeout, Duration::from_secs(15));
    }

    #[test]
    fn missing_and_bad_values_say_which_flag_fixes_them() {
        let e = Settings::resolve(&ConnectArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--broker mqtts://HOST:PORT"), "{e}");
        let args = ConnectArgs {
            broker: Some("mqtts://x:1".parse().unwrap()),
            ..ConnectArgs::default()
        };
        let e = Settings::resolve(&args).unwrap_err().to_string();
        assert!(e.contains("--ca"), "{e}");
        let file = ConfigFile::parse("broker = \"x:1\"", Path::new("h.toml")).unwrap();
        let e = Settings::merge(file, Path::new("h.toml"), &ConnectArgs::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`broker`") && e.contains("mqtts://HOST:PORT"),
            "{e}"
        );
        let file = ConfigFile::parse("timeout_secs = 0", Path::new("h.toml")).unwrap();
        let args = ConnectArgs {
            broker: Some("mqtts://x:1".parse().unwrap()),
            ca: Some("a".into()),
            cert: Some("b".into()),
            key: Some("c".into()),
            ..ConnectArgs::default()
        };
        assert!(matches!(
            Settings::merge(file, Path::new("h.toml"), &args),
            Err(ConfigError::ZeroTimeout { .. })
        ));
    }

    #[test]
    fn a_proxy_comes_from_the_flag_or_the_file() {
        let text = format!("{FULL}\nproxy = \"http://bob:pw@proxy.corp:3128\"");
        let file = ConfigFile::parse(&text, Path::new("h.toml")).unwrap();
        let s = Settings::merge(file, Path::new("h.toml"), &ConnectArgs::default()).unwrap();
        let p = s.proxy.unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        let file = ConfigFile::parse(&text, Path::new("h.toml")).unwrap();
        let args = ConnectArgs {
            broker: Some("wss://relay:443/mqtt".parse().unwrap()),
            proxy: Some("http://flag:1".parse().unwrap()),
            ..ConnectArgs::default()
        };
        let s = Settings::merge(file, Path::new("h.toml"), &args).unwrap();
        assert_eq!(s.proxy.unwrap().host, "flag");
        assert!(s.broker.is_websocket());
        let bad = format!("{FULL}\nproxy = \"socks5://p:1\"");
        let file = ConfigFile::parse(&bad, Path::new("h.toml")).unwrap();
        let e = Settings::merge(file, Path::new("h.toml"), &ConnectArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("http://HOST:PORT"), "{e}");
    }

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/host-agent.toml");
        let file = ConfigFile::load(&path).unwrap();
        assert!(file.broker.is_some() && file.ca.is_some() && file.timeout_secs.is_some());
        // Its commented-out example of the dashboard's names holds too.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("# allowed_hosts = ", "allowed_hosts = ");
        let file = ConfigFile::parse(&text, &path).unwrap();
        let s = Settings::merge(file, &path, &ConnectArgs::default()).unwrap();
        assert!(!s.allowed_hosts.is_empty());
    }

    #[test]
    fn allowed_hosts_are_read_and_checked() {
        let text = format!("{FULL}\nallowed_hosts = [\"dash.example.com\", \"office-pc:8080\"]");
        let file = ConfigFile::parse(&text, Path::new("h.toml")).unwrap();
        let s = Settings::merge(file, Path::new("h.toml"), &ConnectArgs::default()).unwrap();
        let names: Vec<String> = s.allowed_hosts.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["dash.example.com", "office-pc:8080"]);
        let bad = format!("{FULL}\nallowed_hosts = [\"https://dash.example.com/\"]");
        let file = ConfigFile::parse(&bad, Path::new("h.toml")).unwrap();
        let e = Settings::merge(file, Path::new("h.toml"), &ConnectArgs::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("h.toml") && e.contains("allowed_hosts") && e.contains("NAME:PORT"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let args = ConnectArgs {
            config: Some("/nonexistent/h.toml".into()),
            ..ConnectArgs::default()
        };
        let e = Settings::resolve(&args).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/h.toml"), "{e}");
    }
}
