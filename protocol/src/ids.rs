//! Domain identifiers. Each is a newtype with a private field, built only by `parse`, so no
//! unchecked string can reach a topic name or a redb key.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest id we accept, in bytes. Long enough for any vendor serial, short enough for a topic level.
pub const MAX_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} is empty: use 1 to 64 ASCII letters, digits or -")]
    Empty { what: &'static str },
    #[error("{what} {value:?} is {len} bytes long: use at most 64 ASCII letters, digits or -")]
    TooLong {
        what: &'static str,
        value: String,
        len: usize,
    },
    #[error("{what} {value:?} contains {bad:?}: use only ASCII letters, digits or -")]
    BadChar {
        what: &'static str,
        value: String,
        bad: char,
    },
    #[error("role {0:?} is not known: use device, host, integrator or relay")]
    BadRole(String),
    #[error("artifact id {0:?} is not a SHA-256 digest: use 64 lowercase hex digits")]
    BadArtifact(String),
}

fn check_id(what: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            what,
            value: value.to_owned(),
            len: value.len(),
        });
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(IdError::BadChar {
            what,
            value: value.to_owned(),
            bad,
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Checks `value` against the id rules (1–64 ASCII letters, digits or `-`).
            pub fn parse(value: &str) -> Result<Self, IdError> {
                check_id($what, value)?;
                Ok(Self(value.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        /// Deserializing re-checks the rules: a peer cannot smuggle a bad id past `parse`.
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A device's serial number (the copier's body serial, Fig. 3). The CN of its certificate.
    Serial,
    "serial"
);
id_type!(
    /// A service company's host (the instructing host of Fig. 9). The CN of its certificate.
    HostId,
    "host id"
);
id_type!(
    /// A child relay (`broker run --relay-id`). The CN of its relay certificate.
    RelayId,
    "relay id"
);
id_type!(
    /// A job, named by the broker when it accepts a submission.
    JobId,
    "job id"
);

/// A sender's message number. Each agent numbers what it sends from its durable outbox; the broker
/// deduplicates by (sender, msg id), so a resend never stores anything twice (docs/decisions.md,
/// D3).
pub type MsgId = u64;

/// Which outbox of a device numbered a message: chosen at random when the outbox is created, so
/// a device that lost its outbox and counts from 1 again is told apart from a replay. 0 means
/// "none named" (agents older than incarnations).
pub type Incarnation = u64;

/// What a certificate lets its holder be. Carried in the certificate subject (OU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Device,
    Host,
    Integrator,
    /// A child relay towards its parent: it forwards what its devices send and takes their jobs.
    Relay,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Device, Role::Host, Role::Integrator, Role::Relay];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Host => "host",
            Role::Integrator => "integrator",
            Role::Relay => "relay",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        match s {
            "device" => Ok(Role::Device),
            "host" => Ok(Role::Host),
            "integrator" => Ok(Role::Integrator),
            "relay" => Ok(Role::Relay),
            other => Err(IdError::BadRole(other.to_owned())),
        }
    }
}

/// Who is on the other end of a connection, as proven by its client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    role: Role,
    id: String,
}

impl Identity {
    /// Builds an identity from a certificate's role and CN, checking the id rules.
    pub fn new(role: Role, id: &str) -> Result<Self, IdError> {
        check_id("id", id)?;
        Ok(Self {
            role,
            id: id.to_owned(),
        })
    }

    pub fn device(serial: &Serial) -> Self {
        Self {
            role: Role::Device,
            id: serial.as_str().to_owned(),
        }
    }

    pub fn host(host: &HostId) -> Self {
        Self {
            role: Role::Host,
            id: host.as_str().to_owned(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The CN; also the only MQTT client id this identity may connect with.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rules() {
        let cases: [(&str, bool); 9] = [
            ("C123", true),
            ("copier-7-A", true),
            ("-", true),
            (&"a".repeat(64), true),
            ("", false),
            (&"a".repeat(65), false),
            ("a/b", false),
            ("a+b", false),
            ("ü", false),
        ];
        for (value, ok) in cases {
            assert_eq!(Serial::parse(value).is_ok(), ok, "{value:?}");
        }
    }

    #[test]
    fn id_errors_say_what_to_do() {
        let e = Serial::parse("dev/1").unwrap_err().to_string();
        assert!(e.contains("'/'") && e.contains("ASCII letters"), "{e}");
        let e = Serial::parse("").unwrap_err().to_string();
        assert!(e.contains("1 to 64"), "{e}");
    }

    #[test]
    fn deserialize_rechecks_ids() {
        let ok: Serial = serde_json::from_str("\"C1\"").unwrap();
        assert_eq!(ok.as_str(), "C1");
        assert!(serde_json::from_str::<Serial>("\"C/1\"").is_err());
    }

    #[test]
    fn roles_parse() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("admin".parse::<Role>().is_err());
    }
}
