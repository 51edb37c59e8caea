//! The host's TLS identity: the broker's CA, our certificate and key, and the host id the
//! certificate names. The id is the certificate's CN (docs/decisions.md, D5): it is what the
//! gateway checks the MQTT client id and every topic against, so we read it from the certificate
//! instead of asking for it on the command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::{HostId, Role};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// pki's read error already names the file.
    #[error(transparent)]
    Read(Box<pki::PkiError>),
    #[error("{}: {source}", .path.display())]
    File {
        path: PathBuf,
        source: Box<pki::PkiError>,
    },
    #[error(
        "{} is a {role} certificate (CN {id:?}), not a host's: issue one with `broker pki issue --role host --id NAME` and pass it with --cert",
        .path.display()
    )]
    NotHost {
        path: PathBuf,
        role: Role,
        id: String,
    },
    #[error("{}: CN {id:?} is not a valid host id: {source}", .path.display())]
    BadId {
        path: PathBuf,
        id: String,
        source: protocol::IdError,
    },
    #[error(
        "could not build a TLS client from --ca {}, --cert {} and --key {}: {source} — check that the key belongs to the certificate",
        .ca.display(), .cert.display(), .key.display()
    )]
    Config {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        source: Box<pki::PkiError>,
    },
}

/// What a host needs to open a session.
#[derive(Clone)]
pub struct HostTls {
    /// The certificate's CN.
    pub host: HostId,
    pub config: Arc<rustls::ClientConfig>,
}

/// Reads the three PEM files and checks that the certificate is a host's.
pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<HostTls, TlsSetupError> {
    let read = |path: &Path| pki::read_pem_file(path).map_err(|e| TlsSetupError::Read(Box::new(e)));
    let (ca_pem, cert_pem, key_pem) = (read(ca)?, read(cert)?, read(key)?);
    let host = host_id(&cert_pem, cert)?;
    let config = pki::client_config(&ca_pem, &cert_pem, &key_pem).map_err(|source| {
        TlsSetupError::Config {
            ca: ca.to_owned(),
            cert: cert.to_owned(),
            key: key.to_owned(),
            source: Box::new(source),
        }
    })?;
    Ok(HostTls { host, config })
}

/// The host id a certificate was issued for; refuses a device's or an integrator's certificate.
pub fn host_id(cert_pem: &str, path: &Path) -> Result<HostId, TlsSetupError> {
    let identity = pki::identity_from_pem(cert_pem).map_err(|source| TlsSetupError::File {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    if identity.role() != Role::Host {
        return Err(TlsSetupError::NotHost {
            path: path.to_owned(),
            role: identity.role(),
            id: identity.id().to_owned(),
        });
    }
    HostId::parse(identity.id()).map_err(|source| TlsSetupError::BadId {
        path: path.to_owned(),
        id: identity.id().to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &[]).unwrap();
        dir
    }

    #[test]
    fn a_host_certificate_yields_its_cn() {
        let dir = ca_dir();
        let (cert, key) = pki::issue_to_dir(dir.path(), Role::Host, "svc").unwrap();
        let tls = load(&dir.path().join(pki::CA_CERT), &cert, &key).unwrap();
        assert_eq!(tls.host.as_str(), "svc");
    }

    #[test]
    fn a_device_certificate_is_refused_with_the_fix() {
        let dir = ca_dir();
        let (cert, key) = pki::issue_to_dir(dir.path(), Role::Device, "C123").unwrap();
        let e = load(&dir.path().join(pki::CA_CERT), &cert, &key)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("device certificate")
                && e.contains("broker pki issue --role host --id NAME"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = ca_dir();
        let (cert, key) = pki::issue_to_dir(dir.path(), Role::Host, "svc").unwrap();
        let missing = dir.path().join("nope.pem");
        let e = load(&missing, &cert, &key).err().unwrap().to_string();
        assert!(e.contains("nope.pem"), "{e}");
    }
}
