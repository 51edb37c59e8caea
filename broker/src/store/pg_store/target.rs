//! Where the cluster database is and how a node reaches it, from one connection string.
//!
//! The PostgreSQL client (`tokio-postgres`) parses libpq's settings but leaves TLS to its
//! caller, and knows `sslmode` only as disable, prefer and require. So a node takes libpq's TLS
//! settings out of the URL itself — `sslmode=verify-ca|verify-full`, `sslrootcert`, `sslcert`,
//! `sslkey` — and the string an operator tries with `psql` is the one the node is given.
//!
//! Stricter than libpq in one way: a node never tries TLS it was not asked for (`prefer`, the
//! default, connects in the clear, as with libpq against a server without TLS), and a
//! certificate file given where the mode does not use it is refused, not ignored.

use pki::cluster::{ClientIdentity, ServerCheck};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// libpq's `sslmode`, as a node applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Disable,
    /// `allow` and `prefer`: in the clear.
    Prefer,
    /// Encrypted; the server's certificate checked against `sslrootcert` if given.
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(text: &str) -> Result<Mode, String> {
        Ok(match text {
            "disable" => Mode::Disable,
            "allow" | "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other}: one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }

    pub(crate) fn encrypts(self) -> bool {
        matches!(self, Mode::Require | Mode::VerifyCa | Mode::VerifyFull)
    }
}

/// The TLS settings taken out of a URL.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    mode: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

/// A parsed connection string: what the client connects with, and its TLS.
#[derive(Clone)]
pub(crate) struct Target {
    config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    mode: Mode,
    /// Hosts and database, never a password: for logs and errors.
    pub(crate) location: String,
}

impl Target {
    /// Reads `url` (a libpq URL, or `key=value` settings without the TLS files); every TLS
    /// file is read now, so a missing or wrong one stops the node at start with its name.
    pub(crate) fn parse(url: &str) -> Result<Target, StoreError> {
        let refused = |reason: String| StoreError::Unavailable {
            location: redact(url),
            reason,
        };
        let (rest, params) = take_tls_params(url).map_err(refused)?;
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e: postgres::Error| {
            refused(format!("not a PostgreSQL connection string: {e}"))
        })?;
        let mode = match &params.mode {
            Some(text) => Mode::parse(text).map_err(refused)?,
            None => match config.get_ssl_mode() {
                SslMode::Disable => Mode::Disable,
                SslMode::Require => Mode::Require,
                _ => Mode::Prefer,
            },
        };
        let location = describe(&config);
        let tls = tls_config(mode, &params).map_err(|reason| StoreError::Unavailable {
            location: location.clone(),
            reason,
        })?;
        config.ssl_mode(match mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        Ok(Target {
            config,
            tls: tls.map(MakeRustlsConnect::new),
            mode,
            location,
        })
    }

    /// A new connection (blocking; the caller's thread must not run a Tokio runtime); the
    /// error says why it failed.
    pub(crate) fn connect(&self) -> Result<super::client::Client, String> {
        super::client::Client::connect(&self.config, self.tls.as_ref())
    }

    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the connection is in the clear to a host other than this machine (a warning at
    /// start: the database holds every job and the TLS ticket keys).
    pub(crate) fn clear_over_network(&self) -> bool {
        !self.mode.encrypts()
            && self.config.get_hosts().iter().any(|h| match h {
                Host::Tcp(name) => !is_loopback(name),
                Host::Unix(_) => false,
            })
    }
}

/// Whether `host` is this machine: `localhost` or a loopback address (the bus's servers too).
pub(crate) fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The rustls configuration `mode` and the files ask for; none in the clear.
fn tls_config(mode: Mode, params: &TlsParams) -> Result<Option<rustls::ClientConfig>, String> {
    let files: Vec<&str> = [
        ("sslrootcert", &params.root_cert),
        ("sslcert", &params.cert),
        ("sslkey", &params.key),
    ]
    .iter()
    .filter(|(_, v)| v.is_some())
    .map(|(k, _)| *k)
    .collect();
    if !mode.encrypts() {
        if files.is_empty() {
            return Ok(None);
        }
        return Err(format!(
            "{} given, but sslmode={} connects without TLS: add sslmode=verify-full",
            files.join(", "),
            mode.as_str()
        ));
    }
    if params.root_cert.as_deref() == Some("system") {
        return Err(
            "sslrootcert=system is not supported: give the file of the CA that signed the database's certificate"
                .into(),
        );
    }
    let root = params.root_cert.as_ref().map(std::path::PathBuf::from);
    let check = match (mode, root) {
        (Mode::VerifyFull, Some(ca)) => ServerCheck::ChainAndName(ca),
        // verify-ca, and require with a root certificate (as libpq does).
        (_, Some(ca)) => ServerCheck::Chain(ca),
        (Mode::Require, None) => ServerCheck::Nothing,
        (_, None) => {
            return Err(format!(
                "sslmode={} needs sslrootcert=FILE: the CA certificate that signed the database server's",
                mode.as_str()
            ));
        }
    };
    let identity = match (&params.cert, &params.key) {
        (Some(cert), Some(key)) => Some(ClientIdentity {
            cert: cert.into(),
            key: key.into(),
        }),
        (None, None) => None,
        _ => return Err("sslcert and sslkey go together: give both, or neither".into()),
    };
    pki::cluster::cluster_client_config(&check, identity.as_ref())
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Splits libpq's TLS settings off a URL's query; the rest is for the client.
/// `key=value` strings pass through untouched (the client refuses the file settings there
/// with "unknown option", which [`Target::parse`] explains).
fn take_tls_params(url: &str) -> Result<(String, TlsParams), String> {
    let is_url = url.starts_with("postgresql://") || url.starts_with("postgres://");
    if !is_url {
        if [
            "sslrootcert",
            "sslcert",
            "sslkey",
            "verify-ca",
            "verify-full",
        ]
        .iter()
        .any(|k| url.contains(k))
        {
            return Err(
                "give TLS settings in the URL form: postgresql://USER@HOST/DB?sslmode=verify-full&sslrootcert=CA.pem&sslcert=NODE.pem&sslkey=NODE.key"
                    .into(),
            );
        }
        return Ok((url.to_owned(), TlsParams::default()));
    }
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), TlsParams::default()));
    };
    let mut params = TlsParams::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            "sslmode" => &mut params.mode,
            "sslrootcert" => &mut params.root_cert,
            "sslcert" => &mut params.cert,
            "sslkey" => &mut params.key,
            _ => {
                kept.push(pair);
                continue;
            }
        };
        let decoded = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("{key}: not UTF-8 once its %-escapes are decoded"))?;
        *slot = Some(decoded.into_owned());
    }
    let rest = match kept.is_empty() {
        true => base.to_owned(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((rest, params))
}

/// Where a store is, for logs: hosts and database, never a password.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            Host::Tcp(name) => format!("{name}:{p}"),
            Host::Unix(path) => format!("{}:{p}", path.display()),
        })
        .collect();
    format!(
        "postgresql://{}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// A connection string for an error message, without its password.
fn redact(url: &str) -> String {
    match url.split_once('@') {
        Some((_, rest)) if url.contains("://") => format!("postgresql://…@{rest}"),
        _ => "(the --cluster-db connection string)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(url: &str) -> String {
        match Target::parse(url) {
            Ok(_) => panic!("{url} accepted"),
            Err(StoreError::Unavailable { reason, .. }) => reason,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn tls_settings_leave_the_url_and_the_rest_stays_in_order() {
        let (rest, p) = take_tls_params(
            "postgresql://u@a,b/db?target_session_attrs=read-write&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem&connect_timeout=5&sslcert=n.pem&sslkey=n.key",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgresql://u@a,b/db?target_session_attrs=read-write&connect_timeout=5"
        );
        assert_eq!(
            p,
            TlsParams {
                mode: Some("verify-full".into()),
                root_cert: Some("/etc/ca x.pem".into()),
                cert: Some("n.pem".into()),
                key: Some("n.key".into()),
            }
        );
        let (rest, p) = take_tls_params("postgresql://u@h/db?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), p.mode.as_deref()),
            ("postgresql://u@h/db", Some("require"))
        );
        let (rest, _) = take_tls_params("host=h dbname=db sslmode=disable").unwrap();
        assert_eq!(rest, "host=h dbname=db sslmode=disable");
    }

    #[test]
    fn each_mode_uses_tls_only_when_asked_and_names_what_is_missing() {
        let plain = Target::parse("postgresql://u@db1.example/chukei").unwrap();
        assert_eq!(plain.mode(), Mode::Prefer);
        assert!(plain.tls.is_none());
        assert!(plain.clear_over_network());
        let local = Target::parse("postgresql://u@127.0.0.1:5433/chukei").unwrap();
        assert!(!local.clear_over_network());
        let kv = Target::parse("host=localhost dbname=chukei sslmode=disable").unwrap();
        assert_eq!(kv.mode(), Mode::Disable);
        let require = Target::parse("postgresql://u@db1.example/chukei?sslmode=require").unwrap();
        assert!(require.tls.is_some() && !require.clear_over_network());

        assert!(
            reason("postgresql://u@h/db?sslmode=verify-full").contains("needs sslrootcert=FILE")
        );
        assert!(
            reason("postgresql://u@h/db?sslrootcert=ca.pem").contains("add sslmode=verify-full")
        );
        assert!(reason("postgresql://u@h/db?sslmode=strict").contains("one of disable"));
        assert!(
            reason("postgresql://u@h/db?sslmode=require&sslcert=n.pem")
                .contains("sslcert and sslkey go together")
        );
        assert!(
            reason("postgresql://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
                .contains("/nonexistent/ca.pem")
        );
        assert!(reason("host=h sslrootcert=ca.pem").contains("URL form"));
        assert!(
            reason("postgresql://u@h/db?sslmode=verify-ca&sslrootcert=system")
                .contains("not supported")
        );
    }

    #[test]
    fn a_url_with_the_ca_and_a_client_certificate_builds_its_tls() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &[]).unwrap();
        let (cert, key) = pki::cluster::issue_cluster_to_dir(dir.path(), "chukei", &[]).unwrap();
        let ca = dir.path().join(pki::CA_CERT);
        let url = format!(
            "postgresql://chukei@db1.example/chukei?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            ca.display(),
            cert.display(),
            key.display()
        );
        let target = Target::parse(&url).unwrap();
        assert_eq!(target.mode(), Mode::VerifyFull);
        assert!(target.tls.is_some());
        assert_eq!(target.location, "postgresql://db1.example:5432/chukei");
    }
}
