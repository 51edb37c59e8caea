//! chukei's identity layer (DESIGN D5): a CA, the relay's server certificate, one client
//! certificate per device, host and integrator — CN = id, OU = role — and the rustls
//! configurations built from them.
//!
//! Every part of chukei builds its TLS here, with the `ring` provider passed explicitly: several
//! crates in the tree pull rustls in, and a process-wide default provider would be a guess.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::{IdError, Identity, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Re-exported so callers of [`Ca::issue_valid`] need no `time` dependency of their own.
pub use time::{Duration as ValidityDuration, OffsetDateTime};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";

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
        let identity = Identity::new(role, id)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.id());
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        dn.push(DnType::OrganizationName, "chukei");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
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

/// Mints a client certificate into `dir/{role}/{id}.pem` and `.key`; returns both paths.
pub fn issue_to_dir(dir: &Path, role: Role, id: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    let issued = Ca::load(dir)?.issue(role, id)?;
    let cert = dir.join(role.as_str()).join(format!("{id}.pem"));
    let key = dir.join(role.as_str()).join(format!("{id}.key"));
    write(&key, &issued.key_pem, true)?;
    write(&cert, &issued.cert_pem, false)?;
    Ok((cert, key))
}

/// Reads the role (OU) and id (CN) a certificate was issued for.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::NoIdentity(format!("not an X.509 certificate ({e})")))?;
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
    let role: Role = ou.parse()?;
    Ok(Identity::new(role, cn)?)
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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
/// our CA required of everyone. Built once at startup and shared by every handshake.
pub fn server_config(pki_dir: &Path) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let ca_path = pki_dir.join(CA_CERT);
    if !ca_path.exists() {
        return Err(PkiError::NoCa {
            dir: pki_dir.to_owned(),
        });
    }
    let (cert_path, key_path) = (pki_dir.join(SERVER_CERT), pki_dir.join(SERVER_KEY));
    let roots = Arc::new(roots(&read(&ca_path)?, &ca_path)?);
    let chain = certs(&read(&cert_path)?, &cert_path)?;
    let key = private_key(&read(&key_path)?, &key_path)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
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
    Ok(Arc::new(config))
}

/// An agent's TLS configuration: trust only our CA, present our own certificate.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let roots = roots(ca_pem, Path::new("<CA>"))?;
    let chain = certs(cert_pem, Path::new("<certificate>"))?;
    let key = private_key(key_pem, Path::new("<key>"))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| PkiError::Tls(format!("client certificate: {e}")))?;
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
