//! Mail through a real SMTP server with lettre: STARTTLS (required, not opportunistic), implicit
//! TLS, or plain for a relay on the same host. TLS is rustls with the ring provider and the
//! public roots, plus `ca_file` for a server with a private CA.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{MailConfig, Security};

/// Checks an address as lettre will parse it: `ops@example.com` or `Ops <ops@example.com>`.
pub fn check_address(addr: &str) -> Result<(), String> {
    addr.parse::<Mailbox>()
        .map(|_| ())
        .map_err(|e| format!("mail address {addr:?} is not valid: {e}"))
}

/// Checks `[notify.mail]` before anything connects.
pub fn check_config(cfg: &MailConfig) -> Result<(), String> {
    if cfg.server.trim().is_empty() {
        return Err("notify.mail.server is empty: give the SMTP server's host name".into());
    }
    check_address(&cfg.from).map_err(|e| format!("notify.mail.from: {e}"))?;
    if cfg.username.is_some() != cfg.password_file.is_some() {
        return Err(
            "notify.mail: give both username and password_file (SMTP AUTH), or neither".into(),
        );
    }
    if cfg.security == Security::Plain && cfg.username.is_some() {
        return Err(
            "notify.mail: a password over plain SMTP would travel in clear; use security = \"starttls\" or \"tls\""
                .into(),
        );
    }
    Ok(())
}

/// An SMTP transport and the sender address. Cheap to share: lettre pools connections.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    /// Builds the transport; reads the password and CA files now, so a wrong path is a startup
    /// error, not a failed mail hours later. `hello` is the name given in EHLO.
    pub fn new(cfg: &MailConfig, hello: &str, timeout: Duration) -> Result<Mailer, String> {
        check_config(cfg)?;
        let from = cfg
            .from
            .parse::<Mailbox>()
            .map_err(|e| format!("notify.mail.from {:?}: {e}", cfg.from))?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.server)
            .port(cfg.port)
            .timeout(Some(timeout))
            .hello_name(ClientId::Domain(hello.to_owned()));
        if cfg.security != Security::Plain {
            let mut params = TlsParameters::builder(cfg.server.clone());
            if let Some(path) = &cfg.ca_file {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("notify.mail.ca_file {}: {e}", path.display()))?;
                let cert = Certificate::from_pem(&pem).map_err(|e| {
                    format!(
                        "notify.mail.ca_file {}: not a PEM certificate: {e}",
                        path.display()
                    )
                })?;
                params = params.add_root_certificate(cert);
            }
            let params = params
                .build_rustls()
                .map_err(|e| format!("notify.mail: TLS setup failed: {e}"))?;
            builder = builder.tls(match cfg.security {
                Security::Tls => Tls::Wrapper(params),
                _ => Tls::Required(params),
            });
        }
        if let (Some(user), Some(path)) = (&cfg.username, &cfg.password_file) {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("notify.mail.password_file {}: {e}", path.display()))?;
            let password = text.lines().next().unwrap_or_default().to_owned();
            builder = builder.credentials(Credentials::new(user.clone(), password));
        }
        Ok(Mailer {
            transport: builder.build(),
            from,
        })
    }

    /// Sends one plain-text mail to every address in `to`.
    pub async fn send(&self, to: &[String], subject: &str, text: &str) -> Result<(), String> {
        let mut message = lettre::Message::builder()
            .from(self.from.clone())
            .subject(subject);
        for addr in to {
            let mailbox = addr
                .parse::<Mailbox>()
                .map_err(|e| format!("mail address {addr:?}: {e}"))?;
            message = message.to(mailbox);
        }
        let message = message
            .header(ContentType::TEXT_PLAIN)
            .body(text.to_owned())
            .map_err(|e| format!("cannot build the mail: {e}"))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| format!("SMTP: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MailConfig {
        MailConfig {
            server: "smtp.example.com".into(),
            port: 587,
            security: Security::Starttls,
            from: "chukei <chukei@example.com>".into(),
            username: None,
            password_file: None,
            ca_file: None,
        }
    }

    #[test]
    fn config_is_checked() {
        assert!(check_config(&cfg()).is_ok());
        let e = check_config(&MailConfig {
            username: Some("u".into()),
            ..cfg()
        })
        .unwrap_err();
        assert!(e.contains("password_file"), "{e}");
        let e = check_config(&MailConfig {
            security: Security::Plain,
            username: Some("u".into()),
            password_file: Some("p".into()),
            ..cfg()
        })
        .unwrap_err();
        assert!(e.contains("in clear"), "{e}");
        assert!(check_address("Ops <ops@example.com>").is_ok());
        assert!(check_address("ops").is_err());
    }

    #[test]
    fn a_missing_password_file_is_a_startup_error() {
        let e = Mailer::new(
            &MailConfig {
                username: Some("u".into()),
                password_file: Some("/nonexistent/chukei-smtp-password".into()),
                ..cfg()
            },
            "relay-1",
            Duration::from_secs(5),
        )
        .err()
        .expect("must fail");
        assert!(e.contains("password_file"), "{e}");
    }
}
