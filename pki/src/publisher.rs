//! The firmware publisher's key (claims 3–5): what a device — or a child relay replacing its own
//! program — checks an artifact's signature with before it downloads a byte. The relays store and
//! forward artifacts but hold no signing key, so a compromised relay cannot forge one.

use std::path::Path;

use ed25519_dalek::{Signature, VerifyingKey};
use protocol::artifact::{ArtifactRef, signed_message};

/// The public half of the publisher's ed25519 key (`publisher.pub` of `host-agent keys generate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherKey(VerifyingKey);

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl PublisherKey {
    /// 64 hex digits (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<PublisherKey, String> {
        let text = text.trim();
        let bytes: [u8; 32] = from_hex(text)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                format!(
                    "expected 64 hex digits (a publisher.pub made by `host-agent keys generate`), found {} characters",
                    text.len()
                )
            })?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublisherKey)
            .map_err(|e| format!("not a valid ed25519 public key: {e}"))
    }

    pub fn load(path: &Path) -> Result<PublisherKey, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("could not read the publisher key {}: {e}", path.display()))?;
        PublisherKey::parse(&text).map_err(|e| format!("publisher key {}: {e}", path.display()))
    }

    pub fn from_verifying_key(key: VerifyingKey) -> PublisherKey {
        PublisherKey(key)
    }
}

/// Refusal when the device was provisioned without a publisher key.
pub const NO_PUBLISHER_KEY: &str = "no publisher key is provisioned on this device, so it accepts no firmware; start the agent with --publisher-key FILE (the publisher.pub of `host-agent keys generate`)";

/// Checks the publisher's signature over (artifact id, version) before a byte is downloaded.
pub fn check_signature(key: Option<&PublisherKey>, a: &ArtifactRef) -> Result<(), String> {
    let key = key.ok_or_else(|| NO_PUBLISHER_KEY.to_owned())?;
    let bad = || {
        format!(
            "signature does not verify with the provisioned publisher key (artifact {}, version {}, published by {})",
            a.id, a.version, a.publisher
        )
    };
    let bytes: [u8; 64] = from_hex(a.signature.trim())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    key.0
        .verify_strict(
            &signed_message(&a.id, &a.version),
            &Signature::from_bytes(&bytes),
        )
        .map_err(|_| bad())
}
