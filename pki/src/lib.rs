//! chukei's identity layer (docs/decisions.md, D5): a CA, the relay's server certificate, one
//! client certificate per device, host and integrator — CN = id, OU = role — and the rustls
//! configurations built from them.
//!
//! Every part of chukei builds its TLS here, with the `ring` provider (its X25519 from aws-lc-rs,
//! [`kx`]) passed explicitly: several crates in the tree pull rustls in, and a process-wide
//! default provider would be a guess.

pub mod cluster;
pub mod kx;
pub mod publisher;
mod quick_cert;
pub mod random;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::{IdError, Identity, Role};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Re-exported so callers of [`Ca::issue_valid`] need no `time` dependency of their own.
pub use time::{Duration as ValidityDuration, OffsetDateTime};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";
/// Where `broker pki revoke` keeps the certificate revocation list, and where the relay looks
/// for one when none is configured.
pub const CRL: &str = "crl.pem";

/// How long certificates minted here are valid.
const CA_DAYS: i64 = 20 * 365;
const LEAF_DAYS: i64 = 5 * 365;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{} already holds a CA; use another --dir, or remove it to start over (every issued certificate becomes useless)", .dir.display())]
    CaExists { dir: PathBuf },
    #[error("no CA in {}; create one with `broker pki init --dir {}`", .dir.display(), .dir.display())]
    NoCa { dir: PathBuf },
    #[error("could not read {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("could not write {}: {source}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{} holds no {what} in PEM form", .path.display())]
    NoPem { path: PathBuf, what: &'static str },
    #[error("certificate has no usable identity: {0}; issue one with `broker pki issue`")]
    NoIdentity(String),
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Tls(String),
    #[error("{}: {why}", .path.display())]
    BadCrl { path: PathBuf, why: String },
    #[error("{0:?} is not a serial number: give it in hex, e.g. 3A:0F:9C or 3a0f9c")]
    BadSerial(String),
    #[error("no certificate for {id:?} in {}; revoke it by --serial (from `openssl x509 -noout -serial -in CERT`) or --cert FILE", .dir.display())]
    NotIssued { dir: PathBuf, id: String },
    #[error("no relay certificate {}: issue one where the CA is (`broker pki issue --dir PKI --role relay --id {id} --san NAME`) and copy {id}.pem and {id}.key into {}", .path.display(), .path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    NoRelayCert { path: PathBuf, id: String },
    #[error("{id:?} has certificates as {roles}; say which with --role")]
    AmbiguousId { id: String, roles: String },
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    fs::write(path, contents).map_err(err)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(())
}

/// Reads a PEM file, with an error that names it.
pub fn read_pem_file(path: &Path) -> Result<String, PkiError> {
    read(path)
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A day of slack for devices whose clocks run a little behind.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

/// Creates a CA and the relay's server certificate in `dir`. The server certificate names
/// localhost, 127.0.0.1 and every `extra_sans` (DNS names or IP addresses).
pub fn init(dir: &Path, extra_sans: &[String]) -> Result<(), PkiError> {
    if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
        return Err(PkiError::CaExists {
            dir: dir.to_owned(),
        });
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "chukei CA");
    dn.push(DnType::OrganizationName, "chukei");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params, CA_DAYS);
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    names.extend(extra_sans.iter().cloned());
    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(names)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "chukei relay");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server_params, LEAF_DAYS);
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    write(&dir.join(CA_KEY), &ca_key.serialize_pem(), true)?;
    write(&dir.join(CA_CERT), &ca_cert.pem(), false)?;
    write(&dir.join(SERVER_KEY), &server_key.serialize_pem(), true)?;
    write(&dir.join(SERVER_CERT), &server_cert.pem(), false)?;
    Ok(())
}

/// A loaded CA that can mint client certificates.
pub struct Ca {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A freshly minted certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if !cert_path.exists() || !key_path.exists() {
            return Err(PkiError::NoCa {
                dir: dir.to_owned(),
            });
        }
        let ca_pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)?;
        Ok(Ca { ca_pem, issuer })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Mints a client certificate for `id` in `role`: CN = id, OU = role, valid for five years.
    pub fn issue(&self, role: Role, id: &str) -> Result<Issued, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        self.issue_valid(
            role,
            id,
            now - time::Duration::days(1),
            now + time::Duration::days(LEAF_DAYS),
        )
    }

    /// Mints a client certificate valid from `not_before` to `not_after`: for short-lived
    /// credentials, and for tests that need an expired one.
    pub fn issue_valid(
        &self,
        role: Role,
        id: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        self.issue_with(role, id, &[], not_before, not_after)
    }

    /// Mints a relay certificate for `id`: the child relay's client certificate towards its
    /// parent and its server certificate towards its devices, so it names localhost, 127.0.0.1
    /// and every `sans` (DNS names or IP addresses), as `init`'s server certificate does.
    pub fn issue_relay(&self, id: &str, sans: &[String]) -> Result<Issued, PkiError> {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        names.extend(sans.iter().cloned());
        let now = time::OffsetDateTime::now_utc();
        self.issue_with(
            Role::Relay,
            id,
            &names,
            now - time::Duration::days(1),
            now + time::Duration::days(LEAF_DAYS),
        )
    }

    /// A certificate for `id` in `role`; with `sans` it also serves TLS under those names.
    fn issue_with(
        &self,
        role: Role,
        id: &str,
        sans: &[String],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        let identity = Identity::new(role, id)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.id());
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        dn.push(DnType::OrganizationName, "chukei");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if !sans.is_empty() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Mints a client certificate into `dir/{role}/{id}.pem` and `.key`; returns both paths. A relay
/// certificate names localhost and 127.0.0.1 only: use [`issue_relay_to_dir`] to give its names.
pub fn issue_to_dir(dir: &Path, role: Role, id: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    if role == Role::Relay {
        return issue_relay_to_dir(dir, id, &[]);
    }
    let issued = Ca::load(dir)?.issue(role, id)?;
    write_issued(dir, role, id, &issued)
}

/// Mints a relay certificate ([`Ca::issue_relay`]) into `dir/relay/{id}.pem` and `.key`.
pub fn issue_relay_to_dir(
    dir: &Path,
    id: &str,
    sans: &[String],
) -> Result<(PathBuf, PathBuf), PkiError> {
    let issued = Ca::load(dir)?.issue_relay(id, sans)?;
    write_issued(dir, Role::Relay, id, &issued)
}

/// Where a relay's certificate and key are in a PKI folder (`pki issue --role relay`).
pub fn relay_cert_paths(dir: &Path, id: &str) -> (PathBuf, PathBuf) {
    let base = dir.join(Role::Relay.as_str());
    (
        base.join(format!("{id}.pem")),
        base.join(format!("{id}.key")),
    )
}

fn write_issued(
    dir: &Path,
    role: Role,
    id: &str,
    issued: &Issued,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let cert = dir.join(role.as_str()).join(format!("{id}.pem"));
    let key = dir.join(role.as_str()).join(format!("{id}.key"));
    write(&key, &issued.key_pem, true)?;
    write(&cert, &issued.cert_pem, false)?;
    Ok((cert, key))
}

/// Reads the role (OU) and id (CN) a certificate was issued for.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, PkiError> {
    identity_of(&parse_cert(der, false)?)
}

/// `deep`: whether the extensions' contents are decoded too (nothing the relay reads after a
/// handshake is in them).
fn parse_cert(
    der: &[u8],
    deep: bool,
) -> Result<x509_parser::certificate::X509Certificate<'_>, PkiError> {
    use x509_parser::nom::Parser;
    let (_, cert) = x509_parser::certificate::X509CertificateParser::new()
        .with_deep_parse_extensions(deep)
        .parse(der)
        .map_err(|e| PkiError::NoIdentity(format!("not an X.509 certificate ({e})")))?;
    Ok(cert)
}

fn identity_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<Identity, PkiError> {
    let subject = cert.subject();
    let missing = |what: &str| PkiError::NoIdentity(format!("no {what} in the subject"));
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| missing("CN"))?;
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| missing("OU (role)"))?;
    identity_named(cn, ou)
}

/// The identity a certificate's CN and OU name: the id and the role.
fn identity_named(cn: &str, ou: &str) -> Result<Identity, PkiError> {
    let role: Role = ou.parse()?;
    Ok(Identity::new(role, cn)?)
}

/// What the relay needs of a client's certificate after a handshake, read in one parse: who it
/// is, its serial (to check against the revocation list, for a resumed session too, whose
/// certificate rustls did not verify again) and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub identity: Identity,
    /// Without leading zero bytes, as [`LoadedCrl::revoked_serials`] lists them.
    pub serial: Vec<u8>,
    /// `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl PeerCert {
    /// The serial as `openssl x509 -serial` prints it, for logs.
    pub fn serial_text(&self) -> String {
        serial_text(&self.serial)
    }
}

/// Reads a client certificate's identity, serial and expiry ([`PeerCert`]), after every
/// handshake. The extensions are left undecoded (none of the three is in them): their decoding
/// was a quarter of this parse's time.
pub fn peer_cert(der: &[u8]) -> Result<PeerCert, PkiError> {
    // The usual case, read without decoding the rest ([`quick_cert`]); anything it does not
    // read, or an identity it would refuse, goes through the full parse, which says why.
    if let Some(f) = quick_cert::fields(der)
        && let Ok(identity) = identity_named(f.cn, f.ou)
    {
        return Ok(PeerCert {
            identity,
            serial: minimal(f.serial).to_vec(),
            not_after: f.not_after,
        });
    }
    peer_cert_parsed(der)
}

/// [`peer_cert`] from x509-parser's parse of the whole certificate.
fn peer_cert_parsed(der: &[u8]) -> Result<PeerCert, PkiError> {
    let cert = parse_cert(der, false)?;
    Ok(PeerCert {
        identity: identity_of(&cert)?,
        serial: minimal(cert.raw_serial()).to_vec(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Like [`identity_from_der`], for the first certificate in a PEM text.
pub fn identity_from_pem(cert_pem: &str) -> Result<Identity, PkiError> {
    let der = certs(cert_pem, Path::new("<certificate>"))?;
    identity_from_der(&der[0])
}

fn certs(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(PkiError::NoPem {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn private_key(pem: &str, path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .ok()
        .flatten()
        .ok_or_else(|| PkiError::NoPem {
            path: path.to_owned(),
            what: "private key",
        })
}

/// ring's provider with aws-lc-rs' X25519 ([`kx`]): every TLS configuration chukei builds.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(kx::ring_with_fast_x25519())
}

/// The relay's provider: TLS 1.3's AES-128-GCM-SHA256 suite first, chosen whatever the client
/// prefers ([`server_config_with_crl`] sets `ignore_client_order`). rustls' default puts
/// AES-256-GCM-SHA384 first, whose key schedule runs SHA-384 in software (no CPU has SHA-512
/// instructions here), while SHA-256 runs on the CPU's SHA extensions: the handshake's hashing
/// was 8 % of the relay's CPU in a reconnect storm (bench/RESULTS.md). Both suites are TLS 1.3's
/// own; AES-128 is its mandatory one.
///
/// Draws once from aws-lc's generator here, which every X25519 key pair draws from: aws-lc
/// gathers its first entropy (about 30 ms of CPU) at the first draw of the process, otherwise
/// the first handshake after a restart, in the middle of its storm of reconnects.
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    let mut p = kx::ring_with_fast_x25519();
    // A generator that cannot draw now fails the first handshake instead, with its own error.
    let _ = aws_lc_rs::rand::fill(&mut [0u8; 1]);
    p.secure_random = random::THREAD_RANDOM;
    p.cipher_suites
        .sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn roots(ca_pem: &str, path: &Path) -> Result<rustls::RootCertStore, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca_pem, path)? {
        roots
            .add(cert)
            .map_err(|e| PkiError::Tls(format!("CA certificate in {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The relay's TLS configuration: its server certificate, and a client certificate signed by
/// our CA required of everyone, checked against `PKI_DIR/crl.pem` if there is one.
pub fn server_config(pki_dir: &Path) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let crl = load_crl(pki_dir, None)?;
    server_config_with_crl(pki_dir, crl.as_ref())
}

/// Like [`server_config`], with the revocation list `crl` (from [`load_crl`]) or none. Built
/// once at startup and shared by every handshake.
pub fn server_config_with_crl(
    pki_dir: &Path,
    crl: Option<&LoadedCrl>,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    server_config_as(pki_dir, crl, None)
}

/// Like [`server_config_with_crl`]; a child relay (`relay`: its id) serves its devices with its
/// relay certificate (`PKI_DIR/relay/{id}.pem`) instead of `server.pem`.
pub fn server_config_as(
    pki_dir: &Path,
    crl: Option<&LoadedCrl>,
    relay: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let ca_path = pki_dir.join(CA_CERT);
    if !ca_path.exists() {
        return Err(PkiError::NoCa {
            dir: pki_dir.to_owned(),
        });
    }
    let (cert_path, key_path) = match relay {
        Some(id) => {
            let (cert, key) = relay_cert_paths(pki_dir, id);
            if !cert.exists() {
                return Err(PkiError::NoRelayCert {
                    path: cert,
                    id: id.to_owned(),
                });
            }
            (cert, key)
        }
        None => (pki_dir.join(SERVER_CERT), pki_dir.join(SERVER_KEY)),
    };
    let roots = Arc::new(roots(&read(&ca_path)?, &ca_path)?);
    let chain = certs(&read(&cert_path)?, &cert_path)?;
    let key = private_key(&read(&key_path)?, &key_path)?;
    let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
    if let Some(crl) = crl {
        // Only client certificates are listed (the CA is the trust anchor); the list's
        // nextUpdate is not enforced, so an old list never locks the whole fleet out.
        verifier = verifier
            .with_crls([crl.der.clone()])
            .only_check_end_entity_revocation();
    }
    let verifier = verifier.build().map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(server_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            PkiError::Tls(format!(
                "server certificate in {}: {e}",
                cert_path.display()
            ))
        })?;
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// A revocation list read and checked against the CA, ready for [`server_config_with_crl`].
#[derive(Debug, Clone)]
pub struct LoadedCrl {
    pub path: PathBuf,
    /// How many certificates it revokes.
    pub revoked: usize,
    der: CertificateRevocationListDer<'static>,
}

impl LoadedCrl {
    /// The serials the list revokes, without leading zero bytes (as [`PeerCert::serial`]).
    pub fn revoked_serials(&self) -> std::collections::HashSet<Vec<u8>> {
        match x509_parser::parse_x509_crl(&self.der) {
            Ok((_, crl)) => crl
                .iter_revoked_certificates()
                .map(|e| minimal(e.raw_serial()).to_vec())
                .collect(),
            // Parsed when it was loaded; cannot fail now.
            Err(_) => std::collections::HashSet::new(),
        }
    }
}

/// Reads the revocation list at `configured`, or else at `PKI_DIR/crl.pem` if that exists
/// (`Ok(None)` if not). A configured file that is missing, unreadable, or not signed by the CA
/// in `PKI_DIR/ca.pem` is an error: a relay must not start believing it checks revocations
/// when it does not, nor lock out every client with a list from another CA.
pub fn load_crl(pki_dir: &Path, configured: Option<&Path>) -> Result<Option<LoadedCrl>, PkiError> {
    let path = match configured {
        Some(p) => p.to_owned(),
        None => {
            let default = pki_dir.join(CRL);
            if !default.exists() {
                return Ok(None);
            }
            default
        }
    };
    let der = read_crl_der(&path)?;
    let bad = |why: String| PkiError::BadCrl {
        path: path.clone(),
        why,
    };
    let (_, crl) = x509_parser::parse_x509_crl(&der)
        .map_err(|e| bad(format!("not a certificate revocation list ({e})")))?;
    let ca_path = pki_dir.join(CA_CERT);
    let ca_der = certs(&read(&ca_path)?, &ca_path)?.remove(0);
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| PkiError::Tls(format!("CA certificate in {}: {e}", ca_path.display())))?;
    if crl.issuer().as_raw() != ca.subject().as_raw() {
        return Err(bad(format!(
            "issued by \"{}\", not by the CA in {} (\"{}\")",
            crl.issuer(),
            ca_path.display(),
            ca.subject()
        )));
    }
    crl.verify_signature(ca.public_key()).map_err(|e| {
        bad(format!(
            "not signed by the CA in {} ({e})",
            ca_path.display()
        ))
    })?;
    let revoked = crl.iter_revoked_certificates().count();
    Ok(Some(LoadedCrl {
        path,
        revoked,
        der: CertificateRevocationListDer::from(der),
    }))
}

fn read_crl_der(path: &Path) -> Result<Vec<u8>, PkiError> {
    let pem = read(path)?;
    rustls_pemfile::crls(&mut pem.as_bytes())
        .filter_map(Result::ok)
        .next()
        .map(|der| der.to_vec())
        .ok_or_else(|| PkiError::NoPem {
            path: path.to_owned(),
            what: "X509 CRL",
        })
}

/// The outcome of [`revoke`].
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The serial, as `openssl x509 -serial` prints it (upper-case hex).
    pub serial: String,
    /// It was on the list already; the list is unchanged.
    pub already: bool,
    /// Certificates the list revokes now.
    pub revoked: usize,
    pub path: PathBuf,
}

/// The serial number of the first certificate in a PEM text.
pub fn serial_of_pem(cert_pem: &str) -> Result<Vec<u8>, PkiError> {
    let der = certs(cert_pem, Path::new("<certificate>"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der[0])
        .map_err(|e| PkiError::NoIdentity(format!("not an X.509 certificate ({e})")))?;
    Ok(minimal(cert.raw_serial()).to_vec())
}

/// A serial number given in hex, with or without `:` between bytes (as openssl prints it).
pub fn parse_serial(text: &str) -> Result<Vec<u8>, PkiError> {
    let bad = || PkiError::BadSerial(text.to_owned());
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    let hex = hex.strip_prefix("0x").unwrap_or(&hex);
    if hex.is_empty() || hex.len() > 42 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let padded = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex.to_owned()
    };
    let bytes = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, _>>()?;
    Ok(minimal(&bytes).to_vec())
}

/// A serial without the leading zero bytes DER may add, so that equal serials compare equal.
fn minimal(serial: &[u8]) -> &[u8] {
    let start = serial
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(serial.len().saturating_sub(1));
    &serial[start..]
}

/// A serial as `openssl x509 -serial` prints it (`3A:0F:9C`).
pub fn serial_text(serial: &[u8]) -> String {
    serial
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The certificate `broker pki issue` wrote for `id` (in `role`'s folder, or whichever role's
/// folder has one).
pub fn issued_cert(dir: &Path, role: Option<Role>, id: &str) -> Result<PathBuf, PkiError> {
    let roles: Vec<Role> = role.map_or_else(|| Role::ALL.to_vec(), |r| vec![r]);
    let found: Vec<(Role, PathBuf)> = roles
        .into_iter()
        .map(|r| (r, dir.join(r.as_str()).join(format!("{id}.pem"))))
        .filter(|(_, p)| p.is_file())
        .collect();
    match found.as_slice() {
        [] => Err(PkiError::NotIssued {
            dir: dir.to_owned(),
            id: id.to_owned(),
        }),
        [(_, path)] => Ok(path.clone()),
        many => Err(PkiError::AmbiguousId {
            id: id.to_owned(),
            roles: many
                .iter()
                .map(|(r, _)| r.as_str())
                .collect::<Vec<_>>()
                .join(" and "),
        }),
    }
}

/// Adds `serial` to the CA's revocation list in `dir/crl.pem` (created on first use), signed
/// by the CA in `dir`, with the next CRL number. Revoking a serial twice changes nothing.
pub fn revoke(dir: &Path, serial: &[u8]) -> Result<Revocation, PkiError> {
    let ca = Ca::load(dir)?;
    let path = dir.join(CRL);
    let serial = minimal(serial).to_vec();
    let now = time::OffsetDateTime::now_utc();
    let mut entries: Vec<RevokedCertParams> = Vec::new();
    let mut number: u64 = 0;
    if path.exists() {
        let der = read_crl_der(&path)?;
        let bad = |why: String| PkiError::BadCrl {
            path: path.clone(),
            why,
        };
        let (_, crl) = x509_parser::parse_x509_crl(&der)
            .map_err(|e| bad(format!("not a certificate revocation list ({e})")))?;
        number = crl
            .crl_number()
            .map(|n| {
                n.to_bytes_be().iter().fold(0u64, |acc, b| {
                    acc.saturating_mul(256).saturating_add(u64::from(*b))
                })
            })
            .unwrap_or(0);
        for entry in crl.iter_revoked_certificates() {
            let revocation_time =
                time::OffsetDateTime::from_unix_timestamp(entry.revocation_date.timestamp())
                    .unwrap_or(now);
            entries.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(minimal(entry.raw_serial())),
                revocation_time,
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    let already = entries
        .iter()
        .any(|e| minimal(e.serial_number.as_ref()) == serial.as_slice());
    if !already {
        entries.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: now,
            reason_code: Some(RevocationReason::Unspecified),
            invalidity_date: None,
        });
        let revoked = entries.len();
        let params = CertificateRevocationListParams {
            this_update: now,
            // Not enforced by the relay; a year, for other tools that read the list.
            next_update: now + time::Duration::days(365),
            crl_number: SerialNumber::from(number.saturating_add(1)),
            issuing_distribution_point: None,
            revoked_certs: entries,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&ca.issuer)?;
        write(&path, &crl.pem()?, false)?;
        return Ok(Revocation {
            serial: serial_text(&serial),
            already,
            revoked,
            path,
        });
    }
    Ok(Revocation {
        serial: serial_text(&serial),
        already,
        revoked: entries.len(),
        path,
    })
}

/// Relays one client configuration keeps session tickets for. An agent knows a relay or a few
/// fallbacks; rustls' default of 256 would reserve room for 256 in every device of a fleet
/// simulator. The tickets are what lets a client reconnecting through the same configuration
/// (rumqttc reconnecting, or a relay restart) resume instead of doing a full handshake.
const RESUMPTION_CACHE: usize = 4;

/// An agent's TLS configuration: trust only our CA, present our own certificate. Share it
/// across reconnects: its session tickets live in it.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let roots = roots(ca_pem, Path::new("<CA>"))?;
    let chain = certs(cert_pem, Path::new("<certificate>"))?;
    let key = private_key(key_pem, Path::new("<key>"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| PkiError::Tls(format!("client certificate: {e}")))?;
    config.resumption = rustls::client::Resumption::in_memory_sessions(RESUMPTION_CACHE);
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_carries_role_and_id() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["relay.example.com".into()]).unwrap();
        for f in [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        for role in Role::ALL {
            let (cert, key) = issue_to_dir(dir.path(), role, "C-1").unwrap();
            assert_eq!(cert, dir.path().join(role.as_str()).join("C-1.pem"));
            assert!(key.exists());
            let id = identity_from_pem(&read_pem_file(&cert).unwrap()).unwrap();
            assert_eq!((id.role(), id.id()), (role, "C-1"));
        }
        server_config(dir.path()).unwrap();
        let issued = Ca::load(dir.path())
            .unwrap()
            .issue(Role::Device, "X9")
            .unwrap();
        let ca = read_pem_file(&dir.path().join(CA_CERT)).unwrap();
        client_config(&ca, &issued.cert_pem, &issued.key_pem).unwrap();
    }

    #[test]
    fn a_relay_certificate_serves_under_its_names_and_authenticates_as_a_client() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[]).unwrap();
        let e = server_config_as(dir.path(), None, Some("R1")).unwrap_err();
        assert!(e.to_string().contains("--role relay --id R1"), "{e}");

        let (cert, _) = issue_relay_to_dir(dir.path(), "R1", &["child1.example".into()]).unwrap();
        assert_eq!(cert, relay_cert_paths(dir.path(), "R1").0);
        let pem = read_pem_file(&cert).unwrap();
        let der = certs(&pem, &cert).unwrap().remove(0);
        let parsed = parse_cert(&der, true).unwrap();
        let sans: Vec<String> = parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(
            sans.iter().any(|n| n.contains("child1.example")),
            "{sans:?}"
        );
        assert!(sans.iter().any(|n| n.contains("localhost")), "{sans:?}");
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let id = identity_from_pem(&pem).unwrap();
        assert_eq!((id.role(), id.id()), (Role::Relay, "R1"));
        server_config_as(dir.path(), None, Some("R1")).unwrap();
    }

    #[test]
    fn revoking_appends_to_a_signed_list_the_server_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[]).unwrap();
        assert!(load_crl(dir.path(), None).unwrap().is_none(), "no list yet");
        let (c1, _) = issue_to_dir(dir.path(), Role::Device, "C1").unwrap();
        let (c2, _) = issue_to_dir(dir.path(), Role::Device, "C2").unwrap();
        let s1 = serial_of_pem(&read_pem_file(&c1).unwrap()).unwrap();
        let s2 = serial_of_pem(&read_pem_file(&c2).unwrap()).unwrap();
        assert_ne!(s1, s2);

        let first = revoke(dir.path(), &s1).unwrap();
        assert_eq!((first.already, first.revoked), (false, 1));
        assert_eq!(first.path, dir.path().join(CRL));
        let again = revoke(dir.path(), &s1).unwrap();
        assert_eq!((again.already, again.revoked), (true, 1));
        // Given as openssl prints it, with colons.
        let second = revoke(dir.path(), &parse_serial(&serial_text(&s2)).unwrap()).unwrap();
        assert_eq!((second.already, second.revoked), (false, 2));

        let der = read_crl_der(&first.path).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let listed: Vec<Vec<u8>> = crl
            .iter_revoked_certificates()
            .map(|e| minimal(e.raw_serial()).to_vec())
            .collect();
        assert_eq!(listed, vec![s1, s2]);
        assert_eq!(crl.crl_number().map(|n| n.to_bytes_be()), Some(vec![2]));

        let loaded = load_crl(dir.path(), None)
            .unwrap()
            .expect("crl.pem is found");
        assert_eq!(loaded.revoked, 2);
        server_config_with_crl(dir.path(), Some(&loaded)).unwrap();
        server_config(dir.path()).unwrap();
    }

    #[test]
    fn a_missing_or_foreign_list_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[]).unwrap();
        let missing = dir.path().join("nope.pem");
        let e = load_crl(dir.path(), Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.pem"), "{e}");

        let other = tempfile::tempdir().unwrap();
        init(other.path(), &[]).unwrap();
        let (cert, _) = issue_to_dir(other.path(), Role::Device, "X").unwrap();
        revoke(
            other.path(),
            &serial_of_pem(&read_pem_file(&cert).unwrap()).unwrap(),
        )
        .unwrap();
        let foreign = other.path().join(CRL);
        let e = load_crl(dir.path(), Some(&foreign))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not signed by the CA"), "{e}");
        assert!(parse_serial("zz").unwrap_err().to_string().contains("hex"));
    }

    #[test]
    fn serials_parse_as_openssl_prints_them() {
        assert_eq!(parse_serial("3A:0F:9C").unwrap(), vec![0x3a, 0x0f, 0x9c]);
        assert_eq!(parse_serial("00:3a0f9c").unwrap(), vec![0x3a, 0x0f, 0x9c]);
        assert_eq!(parse_serial("0x1").unwrap(), vec![1]);
        assert_eq!(parse_serial("abc").unwrap(), vec![0x0a, 0xbc]);
        for bad in ["", ":", "xyz", &"1".repeat(43)] {
            assert!(parse_serial(bad).is_err(), "{bad:?}");
        }
        assert_eq!(serial_text(&[0x3a, 0x0f]), "3A:0F");
    }

    #[test]
    fn issued_certificates_are_found_by_id() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[]).unwrap();
        issue_to_dir(dir.path(), Role::Device, "C1").unwrap();
        issue_to_dir(dir.path(), Role::Host, "svc").unwrap();
        issue_to_dir(dir.path(), Role::Integrator, "svc").unwrap();
        assert_eq!(
            issued_cert(dir.path(), None, "C1").unwrap(),
            dir.path().join("device/C1.pem")
        );
        let e = issued_cert(dir.path(), None, "svc")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--role"), "{e}");
        issued_cert(dir.path(), Some(Role::Host), "svc").unwrap();
        let e = issued_cert(dir.path(), None, "C9").unwrap_err().to_string();
        assert!(e.contains("--serial"), "{e}");
    }

    #[test]
    fn bad_ids_and_missing_ca_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let e = issue_to_dir(dir.path(), Role::Device, "C1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker pki init --dir"), "{e}");
        init(dir.path(), &[]).unwrap();
        let e = issue_to_dir(dir.path(), Role::Device, "C/1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ASCII letters"), "{e}");
        let e = init(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("already holds a CA"), "{e}");
    }
}
