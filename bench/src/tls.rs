//! Client-side TLS for the load generator: a certificate per client from our CA, minted in memory.
//!
//! The load generator does not verify the relay's certificate. It shares two cores with the relay
//! under test, and two ECDSA verifications per handshake on the client side would take CPU from
//! whichever relay is being measured; every relay still verifies every client's certificate, which
//! is the side being measured. The same configuration is used against every relay.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use protocol::Role;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// Mints certificates for one process's clients.
pub struct Minter {
    ca: pki::Ca,
    provider: Arc<CryptoProvider>,
}

impl Minter {
    pub fn load(pki_dir: &Path) -> anyhow::Result<Minter> {
        Ok(Minter {
            ca: pki::Ca::load(pki_dir).context("loading the benchmark CA")?,
            provider: pki::provider(),
        })
    }

    /// A client configuration presenting a fresh certificate for `id` in `role`.
    pub fn client(&self, role: Role, id: &str) -> anyhow::Result<Arc<ClientConfig>> {
        let issued = self
            .ca
            .issue(role, id)
            .with_context(|| format!("issuing a certificate for {id}"))?;
        let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("reading a minted certificate")?;
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
            .context("reading a minted key")?;
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoServerVerification(self.provider.clone())))
            .with_client_auth_cert(chain, key)?;
        // As the agents keep them (pki::client_config): a device offers the ticket its last
        // session received, and a relay that sends none leaves nothing to offer.
        config.resumption = rustls::client::Resumption::in_memory_sessions(4);
        Ok(Arc::new(config))
    }
}

/// See the module doc: trust the relay without checking, to leave the CPU to the relay.
#[derive(Debug)]
struct NoServerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
