//! The publisher key: the ed25519 key pair a service company signs firmware with (Fig. 6).
//!
//! The relay stores and forwards artifacts but is not trusted to vouch for them: a device checks
//! every artifact's signature with the public key it was provisioned with, so a relay (or anyone
//! who took it over) cannot make a device install an image the publisher did not sign. The
//! secret half therefore stays with the host, in a file only its owner can read; only the public
//! half goes to devices.
//!
//! Both files hold 32 bytes as 64 lowercase hex digits and a newline: easy to paste into a
//! device's config, to diff and to check by eye.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, Verifier as _};
use protocol::artifact::{ArtifactId, signed_message};
use rand::RngCore as _;

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// The secret key's file name in `keys generate --out DIR`.
pub const SECRET_FILE: &str = "publisher.key";
/// The public key's file name in `keys generate --out DIR`.
pub const PUBLIC_FILE: &str = "publisher.pub";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{} already exists; a publisher key is never overwritten (devices provisioned with it would refuse firmware signed by a new one): move it away or choose another --out",
        .path.display()
    )]
    Exists { path: PathBuf },
    #[error("could not create directory {}: {source}", .path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("could not write {}: {source}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "could not read signing key {}: {source}; make a key pair with `host-agent keys generate --out DIR` and pass DIR/{SECRET_FILE}",
        .path.display()
    )]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{} is not a publisher secret key: {problem}; pass the {SECRET_FILE} that `host-agent keys generate` wrote",
        .path.display()
    )]
    Malformed { path: PathBuf, problem: String },
}

/// Where [`write_pair`] put the two halves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPaths {
    pub secret: PathBuf,
    pub public: PathBuf,
}

/// A new key from the operating system's random source.
pub fn generate() -> SigningKey {
    // 32 random bytes are an ed25519 secret key; drawing them ourselves keeps ed25519-dalek's
    // `rand_core` feature (and its rand_core version) out of the build.
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

/// Writes `key` as DIR/publisher.key (mode 0600) and DIR/publisher.pub, creating DIR if needed.
/// Refuses, before writing anything, if either file exists.
pub fn write_pair(dir: &Path, key: &SigningKey) -> Result<KeyPaths, KeyError> {
    let paths = KeyPaths {
        secret: dir.join(SECRET_FILE),
        public: dir.join(PUBLIC_FILE),
    };
    for path in [&paths.secret, &paths.public] {
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(|source| KeyError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    write_new(&paths.secret, &secret_hex(key), 0o600)?;
    write_new(&paths.public, &public_hex(&key.verifying_key()), 0o644)?;
    Ok(paths)
}

/// Creates `path` with `line` and a newline; `create_new`, so a file that appeared since the
/// check above is still never overwritten. The mode is set at creation, so the secret is never
/// readable by others, not even for a moment.
fn write_new(path: &Path, line: &str, mode: u32) -> Result<(), KeyError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_owned(),
            }
        } else {
            KeyError::Write {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    file.write_all(format!("{line}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyError::Write {
            path: path.to_owned(),
            source,
        })
}

/// Reads a secret key file as [`write_pair`] wrote it.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let malformed = |problem: String| KeyError::Malformed {
        path: path.to_owned(),
        problem,
    };
    if path.extension().is_some_and(|e| e == "pub") {
        return Err(malformed(
            "it is the public half (a .pub file), which can only verify".into(),
        ));
    }
    let bytes = parse_hex32(text.trim()).map_err(malformed)?;
    #[cfg(unix)]
    if let Ok(meta) = fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt as _;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the publisher secret key is readable by other users; `chmod 600` it"
            );
        }
    }
    Ok(SigningKey::from_bytes(&bytes))
}

/// Parses a public key as DIR/publisher.pub holds it (64 hex digits).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = parse_hex32(text.trim())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an ed25519 public key: {e}"))
}

/// The signature a device checks: ed25519 over [`signed_message`]`(id, version)`, as 128 hex
/// digits (`ArtifactRef::signature`).
pub fn sign_artifact(key: &SigningKey, id: &ArtifactId, version: &str) -> String {
    to_hex(&key.sign(&signed_message(id, version)).to_bytes())
}

/// The device's check, here so the host side can prove what it signs verifies.
pub fn verify_artifact(
    public: &VerifyingKey,
    id: &ArtifactId,
    version: &str,
    signature_hex: &str,
) -> Result<(), String> {
    let bytes = from_hex(signature_hex)?;
    let bytes: [u8; 64] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("a signature is 64 bytes, not {}", b.len()))?;
    public
        .verify(&signed_message(id, version), &Signature::from_bytes(&bytes))
        .map_err(|_| "the signature does not verify with this public key".to_owned())
}

/// The secret key as 64 hex digits.
pub fn secret_hex(key: &SigningKey) -> String {
    to_hex(&key.to_bytes())
}

/// The public key as 64 hex digits: what devices are provisioned with.
pub fn public_hex(key: &VerifyingKey) -> String {
    to_hex(key.as_bytes())
}

/// Lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("{} hex digits is an odd number", text.len()));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| "it holds characters other than hex digits".to_owned())
        })
        .collect()
}

fn parse_hex32(text: &str) -> Result<[u8; 32], String> {
    if text.len() != 64 {
        return Err(format!(
            "expected 64 hex digits, found {} characters",
            text.len()
        ));
    }
    let bytes = from_hex(text)?;
    bytes.try_into().map_err(|_| "expected 32 bytes".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ArtifactId {
        ArtifactId::from_digest(&[7; 32])
    }

    #[test]
    fn generate_writes_a_0600_secret_and_a_public_key_that_belong_together() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("keys");
        let key = generate();
        let paths = write_pair(&out, &key).unwrap();
        assert_eq!(paths.secret, out.join("publisher.key"));
        assert_eq!(paths.public, out.join("publisher.pub"));

        let secret = fs::read_to_string(&paths.secret).unwrap();
        let public = fs::read_to_string(&paths.public).unwrap();
        for text in [&secret, &public] {
            let line = text.strip_suffix('\n').expect("ends in a newline");
            assert_eq!(line.len(), 64, "{text:?}");
            assert!(
                line.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{text:?}"
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&paths.secret).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "secret mode {mode:o}");
        }

        let loaded = load_signing_key(&paths.secret).unwrap();
        assert_eq!(loaded.to_bytes(), key.to_bytes());
        let public = parse_public_key(&public).unwrap();
        assert_eq!(public, key.verifying_key());
    }

    #[test]
    fn an_existing_key_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_pair(dir.path(), &generate()).unwrap();
        let before = fs::read(&first.secret).unwrap();
        let err = write_pair(dir.path(), &generate()).unwrap_err();
        assert!(
            matches!(&err, KeyError::Exists { path } if *path == first.secret),
            "{err}"
        );
        assert!(err.to_string().contains("never overwritten"), "{err}");
        assert_eq!(fs::read(&first.secret).unwrap(), before);

        // Only the public half left behind: still refused, and no secret written beside it.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join(PUBLIC_FILE), "x").unwrap();
        let err = write_pair(other.path(), &generate()).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert!(!other.path().join(SECRET_FILE).exists());
    }

    #[test]
    fn the_signature_verifies_over_signed_message_and_nothing_else() {
        let key = generate();
        let sig = sign_artifact(&key, &id(), "2.1");
        assert_eq!(sig.len(), 128);
        let public = key.verifying_key();
        verify_artifact(&public, &id(), "2.1", &sig).unwrap();
        // Straight from ed25519-dalek, over the protocol's message: what a device does.
        let raw = Signature::from_bytes(&from_hex(&sig).unwrap().try_into().unwrap());
        public
            .verify_strict(&signed_message(&id(), "2.1"), &raw)
            .unwrap();

        assert!(
            verify_artifact(&public, &id(), "2.2", &sig).is_err(),
            "another version"
        );
        let other_id = ArtifactId::from_digest(&[8; 32]);
        assert!(
            verify_artifact(&public, &other_id, "2.1", &sig).is_err(),
            "another image"
        );
        let stranger = generate().verifying_key();
        assert!(
            verify_artifact(&stranger, &id(), "2.1", &sig).is_err(),
            "another key"
        );
    }

    #[test]
    fn bad_key_files_say_what_to_pass() {
        let dir = tempfile::tempdir().unwrap();
        let missing = load_signing_key(&dir.path().join("nope.key")).unwrap_err();
        assert!(missing.to_string().contains("keys generate"), "{missing}");

        let short = dir.path().join("short.key");
        fs::write(&short, "abcd\n").unwrap();
        let e = load_signing_key(&short).unwrap_err();
        assert!(e.to_string().contains("expected 64 hex digits"), "{e}");

        let not_hex = dir.path().join("nothex.key");
        fs::write(&not_hex, "z".repeat(64)).unwrap();
        assert!(load_signing_key(&not_hex).is_err());

        let paths = write_pair(&dir.path().join("k"), &generate()).unwrap();
        let e = load_signing_key(&paths.public).unwrap_err();
        assert!(e.to_string().contains("public half"), "{e}");
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(to_hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(from_hex("00abff").unwrap(), [0, 0xab, 0xff]);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("éa").is_err());
    }
}
