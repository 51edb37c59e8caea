//! The device's TLS identity: its certificate must name the serial it runs as, or the relay would
//! refuse it later with a less helpful reason. Checked at startup, before any connection.

use std::path::Path;
use std::sync::Arc;

use protocol::{Role, Serial};

use crate::AgentError;

/// Reads the CA, certificate and key, checks the certificate is a device certificate for `serial`
/// and builds the client configuration.
pub fn device_tls(
    ca: &Path,
    cert: &Path,
    key: &Path,
    serial: &Serial,
) -> Result<Arc<rustls::ClientConfig>, AgentError> {
    let ca_pem = pki::read_pem_file(ca)?;
    let cert_pem = pki::read_pem_file(cert)?;
    let key_pem = pki::read_pem_file(key)?;
    check_identity(&cert_pem, cert, serial)?;
    Ok(pki::client_config(&ca_pem, &cert_pem, &key_pem)?)
}

/// The certificate's role must be device and its CN the serial.
pub fn check_identity(cert_pem: &str, cert: &Path, serial: &Serial) -> Result<(), AgentError> {
    let id = pki::identity_from_pem(cert_pem)?;
    if id.role() != Role::Device {
        return Err(AgentError::NotADeviceCert {
            cert: cert.to_owned(),
            role: id.role(),
            serial: serial.clone(),
        });
    }
    if id.id() != serial.as_str() {
        return Err(AgentError::WrongSerial {
            cert: cert.to_owned(),
            found: id.id().to_owned(),
            serial: serial.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_must_name_the_serial() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &[]).unwrap();
        let (cert, key) = pki::issue_to_dir(dir.path(), Role::Device, "C2").unwrap();
        let ca = dir.path().join("ca.pem");
        let c2 = Serial::parse("C2").unwrap();
        device_tls(&ca, &cert, &key, &c2).unwrap();

        let e = device_tls(&ca, &cert, &key, &Serial::parse("C1").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("for device C2, not C1") && e.contains("--serial C2"),
            "{e}"
        );

        let (host_cert, host_key) = pki::issue_to_dir(dir.path(), Role::Host, "C2").unwrap();
        let e = device_tls(&ca, &host_cert, &host_key, &c2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("host certificate"), "{e}");

        let e = device_tls(&ca, &dir.path().join("nope.pem"), &key, &c2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.pem"), "{e}");
    }
}
