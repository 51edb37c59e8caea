//! TLS for a cluster node's own connections: to the PostgreSQL database and to the NATS bus.
//!
//! These servers are the operator's, often under a CA of their own, so the files come from the
//! node's configuration (the database URL's `sslrootcert`, `sslcert`, `sslkey`; the bus's
//! `cluster_bus_ca`, `cluster_bus_cert`, `cluster_bus_key`), not from the relay's PKI folder.
//! `broker pki cluster-cert` mints such certificates from our CA for whoever has none.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::{Ca, Issued, PkiError, certs, private_key, provider, read, roots, write};

/// How a node checks the server at the other end of a cluster connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCheck {
    /// Encrypt, check nothing (libpq's `sslmode=require` without a root certificate): safe
    /// from eavesdroppers only, not from whoever can stand in for the server.
    Nothing,
    /// The certificate chains to this CA file (`sslmode=verify-ca`); any name.
    Chain(PathBuf),
    /// The certificate chains to this CA file and names the host connected to
    /// (`sslmode=verify-full`, and always for the bus).
    ChainAndName(PathBuf),
}

/// A client certificate and its key, presented to the server (PostgreSQL's `cert`
/// authentication takes the database user from its CN; NATS `verify` accepts any from its CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The TLS client configuration for one kind of cluster connection; errors name the file.
pub fn cluster_client_config(
    check: &ServerCheck,
    identity: Option<&ClientIdentity>,
) -> Result<rustls::ClientConfig, PkiError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let builder = match check {
        ServerCheck::ChainAndName(ca) => builder.with_root_certificates(roots(&read(ca)?, ca)?),
        ServerCheck::Chain(ca) => {
            let chain = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(&read(ca)?, ca)?),
                provider(),
            )
            .build()
            .map_err(|e| PkiError::Tls(format!("CA in {}: {e}", ca.display())))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient {
                    chain: Some(chain),
                    provider: provider(),
                }))
        }
        ServerCheck::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                chain: None,
                provider: provider(),
            })),
    };
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            let chain = certs(&read(&id.cert)?, &id.cert)?;
            let key = private_key(&read(&id.key)?, &id.key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                PkiError::Tls(format!(
                    "client certificate {} with key {}: {e}",
                    id.cert.display(),
                    id.key.display()
                ))
            })
        }
    }
}

/// The checks short of `verify-full`. `verify-ca` (`chain`): the chain is checked as for
/// `verify-full`, and a certificate that chains to the CA but names another host is accepted
/// (webpki checks the chain before the name, so a name error means the chain was good).
/// `require` without a root certificate (no `chain`): any certificate. Either way the
/// handshake's signatures are checked, so the key exchange is bound to the certificate
/// presented, whoever's it is.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Where `broker pki cluster-cert` puts a certificate: `DIR/cluster/{name}.pem` and `.key`.
pub fn cluster_cert_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let base = dir.join("cluster");
    (
        base.join(format!("{name}.pem")),
        base.join(format!("{name}.key")),
    )
}

impl Ca {
    /// Mints a certificate for the cluster's own connections: a database or NATS server (under
    /// `sans`, DNS names or IP addresses; the name itself when none are given) or a node towards
    /// them (PostgreSQL's `cert` authentication logs it in as the user `name`). It carries no
    /// role, so the relay refuses it as an MQTT client.
    pub fn issue_cluster(&self, name: &str, sans: &[String]) -> Result<Issued, PkiError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(PkiError::Tls(format!(
                "{name:?} is not a cluster certificate name: 1 to 64 ASCII letters, digits, '-', '_' or '.' (a host name, or the database user the node logs in as)"
            )));
        }
        let names = match sans.is_empty() {
            true => vec![name.to_owned()],
            false => sans.to_vec(),
        };
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "chukei");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        crate::validity(&mut params, crate::LEAF_DAYS);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Mints [`Ca::issue_cluster`] into `dir/cluster/{name}.pem` and `.key` (0600); returns both paths.
pub fn issue_cluster_to_dir(
    dir: &Path,
    name: &str,
    sans: &[String],
) -> Result<(PathBuf, PathBuf), PkiError> {
    let issued = Ca::load(dir)?.issue_cluster(name, sans)?;
    let (cert, key) = cluster_cert_paths(dir, name);
    write(&key, &issued.key_pem, true)?;
    write(&cert, &issued.cert_pem, false)?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// A TLS server on loopback with `cert`/`key`, answering one handshake, and the client
    /// configuration's verdict on it.
    fn handshake(
        server: &ClientIdentity,
        client: rustls::ClientConfig,
        name: &str,
    ) -> Result<(), String> {
        let chain = certs(&read(&server.cert).unwrap(), &server.cert).unwrap();
        let key = private_key(&read(&server.key).unwrap(), &server.key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let served = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            let mut conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            let mut tls = rustls::Stream::new(&mut conn, &mut sock);
            let mut byte = [0u8; 1];
            let _ = tls.read(&mut byte);
        });
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(client), server_name).unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let result = tls.write_all(b"x").and_then(|()| tls.flush());
        drop(sock);
        let _ = served.join();
        result.map_err(|e| e.to_string())
    }

    #[test]
    fn each_check_accepts_and_refuses_what_its_sslmode_promises() {
        let dir = tempfile::tempdir().unwrap();
        crate::init(dir.path(), &[]).unwrap();
        let other = tempfile::tempdir().unwrap();
        crate::init(other.path(), &[]).unwrap();
        let (cert, key) = issue_cluster_to_dir(dir.path(), "db1", &["127.0.0.1".into()]).unwrap();
        assert_eq!(
            (cert.clone(), key.clone()),
            cluster_cert_paths(dir.path(), "db1")
        );
        let server = ClientIdentity { cert, key };
        let ca = dir.path().join(crate::CA_CERT);
        let wrong_ca = other.path().join(crate::CA_CERT);
        // (how the server is checked, the name connected to, what comes of it)
        let cases = [
            (ServerCheck::ChainAndName(ca.clone()), "127.0.0.1", None),
            (
                ServerCheck::ChainAndName(ca.clone()),
                "db9.example",
                Some("not valid for name"),
            ),
            // verify-ca: the wrong name passes, the wrong CA does not.
            (ServerCheck::Chain(ca.clone()), "db9.example", None),
            (
                ServerCheck::Chain(wrong_ca.clone()),
                "127.0.0.1",
                Some("BadSignature"),
            ),
            (
                ServerCheck::ChainAndName(wrong_ca),
                "127.0.0.1",
                Some("BadSignature"),
            ),
            (ServerCheck::Nothing, "db9.example", None),
        ];
        for (check, name, refused) in cases {
            let client = cluster_client_config(&check, None).unwrap();
            match (handshake(&server, client, name), refused) {
                (Ok(()), None) => {}
                (Err(e), Some(why)) => assert!(e.contains(why), "{check:?} {name}: {e}"),
                (outcome, _) => panic!("{check:?} {name}: {outcome:?}, expected {refused:?}"),
            }
        }
    }

    #[test]
    fn a_cluster_certificate_has_no_role_and_names_its_host() {
        let dir = tempfile::tempdir().unwrap();
        crate::init(dir.path(), &[]).unwrap();
        let (cert, _) = issue_cluster_to_dir(dir.path(), "chukei", &[]).unwrap();
        let pem = read(&cert).unwrap();
        let e = crate::identity_from_pem(&pem).unwrap_err();
        assert!(e.to_string().contains("OU (role)"), "{e}");
        let der = certs(&pem, &cert).unwrap().remove(0);
        let parsed = crate::parse_cert(&der, true).unwrap();
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let e = issue_cluster_to_dir(dir.path(), "bad name", &[]).unwrap_err();
        assert!(
            e.to_string().contains("not a cluster certificate name"),
            "{e}"
        );
        let missing = cluster_client_config(
            &ServerCheck::ChainAndName(dir.path().join("nope.pem")),
            None,
        )
        .unwrap_err();
        assert!(missing.to_string().contains("nope.pem"), "{missing}");
    }
}
