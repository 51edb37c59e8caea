//! TLS 1.3 session tickets that survive a restart: a reconnecting device resumes with a ticket
//! instead of a full handshake (no certificate chain, no signature from either side).
//!
//! A ticket is the session's secrets and the client's certificate chain, sealed with AES-256-GCM
//! under a key that only the relay holds; the relay keeps nothing per ticket. The keys live in
//! the data directory (`tls-ticket-keys`, readable by the relay's user only), so tickets issued
//! before a restart open after it. A key seals new tickets for `rotation`, then only opens the
//! ones it sealed for `lifetime` more, then is erased: whoever steals the file can open the
//! sessions of that window and no older one (forward secrecy is bounded by rotation and
//! erasure, as rustls' `ProducesTickets` asks).
//!
//! In a cluster the keys live in the cluster's database instead ([`SharedKeys`]): every node seals
//! and opens with the same keys, so a device that moves to another node resumes there too. Each
//! node rotates by reading the set, replacing it if a key is due, and adopting what the database
//! then holds, in one transaction.
//!
//! What a ticket does not do is vouch for the certificate inside it: the gateway checks a
//! resumed session's certificate against the revocation list in force and its expiry, as it
//! does after every handshake.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// The key file, in the data directory.
pub const KEY_FILE: &str = "tls-ticket-keys";
/// Bumped when the file's layout changes; a file of another version is replaced (tickets are
/// disposable: the cost is one full handshake per client).
const FORMAT: u32 = 1;
const KEY_ID_LEN: usize = 4;
const SECRET_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// TLS 1.3 forbids a longer ticket lifetime (RFC 8446, 4.6.1).
pub const MAX_LIFETIME_SECS: u64 = 7 * 24 * 3600;

/// How long keys seal and open tickets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketSettings {
    /// A retired key still opens its tickets this long; also the lifetime clients are told.
    pub lifetime: Duration,
    /// A key seals new tickets this long, then a new one takes over.
    pub rotation: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error("could not write the TLS ticket keys {}: {source} (is the data directory writable by the relay's user?)", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not read the TLS ticket keys {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not read or write the cluster's TLS ticket keys: {0}")]
    Shared(String),
    #[error("the system's random number generator failed")]
    Random,
}

/// One key: its public id (the first bytes of every ticket it seals), when it began sealing,
/// and its secret.
struct TicketKey {
    id: [u8; KEY_ID_LEN],
    created: u64,
    secret: [u8; SECRET_LEN],
    aead: LessSafeKey,
}

impl TicketKey {
    fn new(id: [u8; KEY_ID_LEN], created: u64, secret: [u8; SECRET_LEN]) -> Option<Self> {
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &secret).ok()?);
        Some(TicketKey {
            id,
            created,
            secret,
            aead,
        })
    }
}

/// The file's layout (CBOR).
#[derive(Serialize, Deserialize)]
struct KeyFile {
    format: u32,
    /// Newest first.
    keys: Vec<StoredKey>,
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    id: [u8; KEY_ID_LEN],
    created: u64,
    #[serde(with = "serde_bytes_array")]
    secret: [u8; SECRET_LEN],
}

/// A 32-byte array as a CBOR byte string (serde's default is an array of 32 integers).
mod serde_bytes_array {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let bytes = ciborium::value::Value::deserialize(d)?;
        bytes
            .as_bytes()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| D::Error::custom("a ticket key must be 32 bytes"))
    }
}

/// Where a cluster keeps one set of ticket keys for all its nodes.
pub trait SharedKeys: Send + Sync {
    /// In one transaction: reads the stored keys (`None`: none yet), stores what `update`
    /// returns for them (`None`: keep them), and returns the keys in force afterwards.
    fn update(&self, update: KeyUpdate) -> Result<Option<Vec<u8>>, String>;
}

/// What [`SharedKeys::update`] runs on the stored keys.
pub type KeyUpdate = Box<dyn FnOnce(Option<&[u8]>) -> Option<Vec<u8>> + Send>;

/// Where the keys are kept.
enum Vault {
    /// `DATA_DIR/tls-ticket-keys`: this relay's alone.
    File(PathBuf),
    /// The cluster's database: every node's.
    Shared(Arc<dyn SharedKeys>),
}

/// Seals and opens the relay's session tickets (rustls' [`rustls::server::ProducesTickets`]).
pub struct Ticketer {
    vault: Vault,
    settings: TicketSettings,
    /// Newest first; the first seals.
    keys: RwLock<Arc<Vec<Arc<TicketKey>>>>,
    random: SystemRandom,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vault = match &self.vault {
            Vault::File(path) => path.display().to_string(),
            Vault::Shared(_) => "the cluster store".to_owned(),
        };
        f.debug_struct("Ticketer")
            .field("vault", &vault)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Ticketer {
    /// Opens the keys in `data_dir` (creating the file, or replacing one it cannot read, with a
    /// warning), erases expired ones and starts a new key if the newest is due.
    pub fn open(data_dir: &Path, settings: TicketSettings) -> Result<Arc<Self>, TicketKeyError> {
        Self::open_at(data_dir, settings, unix_now())
    }

    fn open_at(
        data_dir: &Path,
        settings: TicketSettings,
        now: u64,
    ) -> Result<Arc<Self>, TicketKeyError> {
        let path = data_dir.join(KEY_FILE);
        let keys = match fs::read(&path) {
            Ok(bytes) => match decode(&bytes) {
                Some(keys) => keys,
                None => {
                    warn!(path = %path.display(), "TLS ticket key file unreadable; starting with a new key (clients do one full handshake)");
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(TicketKeyError::Read { path, source }),
        };
        let ticketer = Ticketer {
            vault: Vault::File(path),
            settings,
            keys: RwLock::new(Arc::new(keys)),
            random: SystemRandom::new(),
        };
        // Written even when nothing is due: the file's mode is made the relay's alone.
        if !ticketer.rotate_at(now)? {
            ticketer.save(&ticketer.keys())?;
        }
        Ok(Arc::new(ticketer))
    }

    /// The keys every node of a cluster shares, from its database (made there if none yet).
    pub fn open_shared(
        shared: Arc<dyn SharedKeys>,
        settings: TicketSettings,
    ) -> Result<Arc<Self>, TicketKeyError> {
        let ticketer = Ticketer {
            vault: Vault::Shared(shared),
            settings,
            keys: RwLock::new(Arc::new(Vec::new())),
            random: SystemRandom::new(),
        };
        ticketer.rotate_at(unix_now())?;
        Ok(Arc::new(ticketer))
    }

    fn keys(&self) -> Arc<Vec<Arc<TicketKey>>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts a new key if the newest has sealed for `rotation`, and erases keys past their
    /// lifetime; `true` if anything changed (and was written).
    pub fn rotate(&self) -> Result<bool, TicketKeyError> {
        self.rotate_at(unix_now())
    }

    fn rotate_at(&self, now: u64) -> Result<bool, TicketKeyError> {
        let mut slot = self.keys.write().unwrap_or_else(|p| p.into_inner());
        match &self.vault {
            Vault::File(_) => {
                let (keys, due) = rotated(&self.settings, &self.random, &slot, now)?;
                let changed = due || keys.len() != slot.len();
                if changed {
                    self.save(&keys)?;
                    if due {
                        info!(keys = keys.len(), "TLS ticket key rotated");
                    }
                    *slot = Arc::new(keys);
                }
                Ok(changed)
            }
            Vault::Shared(shared) => {
                let (settings, random) = (self.settings, self.random.clone());
                let stored = shared
                    .update(Box::new(move |current| {
                        let keys = current.and_then(decode).unwrap_or_default();
                        let (next, due) = rotated(&settings, &random, &keys, now).ok()?;
                        if due {
                            info!(keys = next.len(), "TLS ticket key rotated for the cluster");
                        }
                        (due || next.len() != keys.len()).then(|| encode(&next).ok())?
                    }))
                    .map_err(TicketKeyError::Shared)?;
                let keys = stored.as_deref().and_then(decode).unwrap_or_default();
                let ids = |k: &[Arc<TicketKey>]| k.iter().map(|k| k.id).collect::<Vec<_>>();
                let changed = ids(&keys) != ids(&slot);
                *slot = Arc::new(keys);
                Ok(changed)
            }
        }
    }

    /// Writes the keys whole (a temporary file, synced, renamed over the old one), readable
    /// and writable by the relay's user only.
    fn save(&self, keys: &[Arc<TicketKey>]) -> Result<(), TicketKeyError> {
        let Vault::File(path) = &self.vault else {
            return Ok(()); // the cluster's keys are written by `rotate_at`
        };
        let bytes = encode(keys).map_err(|e| TicketKeyError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let _ = fs::remove_file(&tmp);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|source| TicketKeyError::Write {
            path: path.clone(),
            source,
        })
    }

    /// Rotates on schedule until `stop`; a failed write is logged and tried again next time
    /// (the current key goes on sealing meanwhile).
    pub async fn rotate_until(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let every = self
            .settings
            .rotation
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.rotate() {
                warn!(error = %e, "TLS ticket key rotation failed; the current key goes on sealing");
            }
        }
    }

    /// Whether the key at `i` (newest first) still opens tickets at `now`.
    fn opens(&self, keys: &[Arc<TicketKey>], i: usize, now: u64) -> bool {
        i == 0 || keys[i - 1].created + self.settings.lifetime.as_secs() > now
    }

    fn open_ticket(&self, cipher: &[u8], now: u64) -> Option<Vec<u8>> {
        if cipher.len() < KEY_ID_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (id, rest) = cipher.split_at(KEY_ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys();
        let i = keys.iter().position(|k| k.id == id)?;
        if !self.opens(&keys, i, now) {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = keys[i]
            .aead
            .open_in_place(nonce, Aad::from(id), &mut buf)
            .ok()?;
        let n = plain.len();
        buf.truncate(n);
        Some(buf)
    }
}

/// `keys` at `now`: a new key first if the newest has sealed for `rotation` (and whether it
/// was), and without keys past their lifetime.
fn rotated(
    settings: &TicketSettings,
    random: &SystemRandom,
    keys: &[Arc<TicketKey>],
    now: u64,
) -> Result<(Vec<Arc<TicketKey>>, bool), TicketKeyError> {
    let due = keys
        .first()
        .is_none_or(|k| k.created + settings.rotation.as_secs() <= now);
    let mut next: Vec<Arc<TicketKey>> = Vec::with_capacity(keys.len() + 1);
    if due {
        next.push(Arc::new(new_key(random, now, keys)?));
    }
    let lifetime = settings.lifetime.as_secs();
    // A key retires when the next one begins; it opens tickets for `lifetime` after that.
    let mut retired_at = next.first().map(|k| k.created);
    for k in keys {
        if retired_at.is_none_or(|r| r + lifetime > now) {
            next.push(k.clone());
        }
        retired_at = Some(k.created);
    }
    Ok((next, due))
}

fn new_key(
    random: &SystemRandom,
    now: u64,
    existing: &[Arc<TicketKey>],
) -> Result<TicketKey, TicketKeyError> {
    loop {
        let mut id = [0u8; KEY_ID_LEN];
        let mut secret = [0u8; SECRET_LEN];
        random
            .fill(&mut id)
            .and_then(|()| random.fill(&mut secret))
            .map_err(|_| TicketKeyError::Random)?;
        if existing.iter().any(|k| k.id == id) {
            continue;
        }
        return TicketKey::new(id, now, secret).ok_or(TicketKeyError::Random);
    }
}

/// The keys as this version stores them (CBOR).
fn encode(keys: &[Arc<TicketKey>]) -> Result<Vec<u8>, String> {
    let file = KeyFile {
        format: FORMAT,
        keys: keys
            .iter()
            .map(|k| StoredKey {
                id: k.id,
                created: k.created,
                secret: k.secret,
            })
            .collect(),
    };
    let mut bytes = Vec::new();
    ciborium::into_writer(&file, &mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// The keys of a file this version wrote, newest first; `None` for anything else.
fn decode(bytes: &[u8]) -> Option<Vec<Arc<TicketKey>>> {
    let file: KeyFile = ciborium::from_reader(bytes).ok()?;
    if file.format != FORMAT {
        return None;
    }
    file.keys
        .into_iter()
        .map(|k| TicketKey::new(k.id, k.created, k.secret).map(Arc::new))
        .collect()
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.settings.lifetime.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys();
        let key = keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        // Per ticket, from the thread's generator: no system call per handshake.
        pki::random::fill(&mut nonce).ok()?;
        // Sealed where it lies, in the ticket's one allocation.
        let mut out = Vec::with_capacity(KEY_ID_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.id),
                &mut out[KEY_ID_LEN + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_ticket(cipher, unix_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;
    use std::os::unix::fs::PermissionsExt;

    const HOUR: u64 = 3600;

    fn settings() -> TicketSettings {
        TicketSettings {
            lifetime: Duration::from_secs(24 * HOUR),
            rotation: Duration::from_secs(HOUR),
        }
    }

    #[test]
    fn a_ticket_opens_after_a_restart_and_the_key_file_is_the_relays_alone() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ticketer::open(dir.path(), settings()).unwrap();
        let ticket = first.encrypt(b"session state").unwrap();
        assert_ne!(&ticket[KEY_ID_LEN + NONCE_LEN..][..13], b"session state");
        drop(first);
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let again = Ticketer::open(dir.path(), settings()).unwrap();
        assert_eq!(
            again.decrypt(&ticket).as_deref(),
            Some(&b"session state"[..])
        );
    }

    #[test]
    fn a_tampered_or_foreign_ticket_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let t = Ticketer::open(dir.path(), settings()).unwrap();
        let mut ticket = t.encrypt(b"state").unwrap();
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert_eq!(t.decrypt(&ticket), None);
        assert_eq!(t.decrypt(b"short"), None);
        let other = tempfile::tempdir().unwrap();
        let stranger = Ticketer::open(other.path(), settings()).unwrap();
        assert_eq!(stranger.decrypt(&t.encrypt(b"state").unwrap()), None);
    }

    #[test]
    fn keys_rotate_and_a_retired_key_opens_its_tickets_for_the_lifetime_then_is_erased() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_000_000;
        let t = Ticketer::open_at(dir.path(), settings(), t0).unwrap();
        let old = t.encrypt(b"old").unwrap();
        assert!(!t.rotate_at(t0 + HOUR - 1).unwrap(), "not due yet");
        assert!(t.rotate_at(t0 + HOUR).unwrap());
        let new = t.encrypt(b"new").unwrap();
        assert_ne!(old[..KEY_ID_LEN], new[..KEY_ID_LEN], "a new key seals");
        // Retired at t0 + 1 h, it opens its tickets for 24 h more.
        assert!(t.open_ticket(&old, t0 + 25 * HOUR - 1).is_some());
        assert!(t.open_ticket(&old, t0 + 25 * HOUR).is_none());
        // Rotation erases it from memory and from the file.
        for h in 2..=25 {
            t.rotate_at(t0 + h * HOUR).unwrap();
        }
        let reopened = Ticketer::open_at(dir.path(), settings(), t0 + 25 * HOUR).unwrap();
        assert_eq!(
            reopened.keys().len(),
            25,
            "the sealing key and 24 retired ones"
        );
        assert!(
            reopened.open_ticket(&old, t0 + 2 * HOUR).is_none(),
            "erased"
        );
        // The second key retired at t0 + 2 h: it opens until t0 + 26 h.
        assert!(reopened.open_ticket(&new, t0 + 25 * HOUR).is_some());
    }

    #[test]
    fn an_unreadable_key_file_is_replaced_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), b"not cbor").unwrap();
        let t = Ticketer::open(dir.path(), settings()).unwrap();
        let ticket = t.encrypt(b"x").unwrap();
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"x"[..]));
        assert!(decode(&fs::read(dir.path().join(KEY_FILE)).unwrap()).is_some());
    }
}
