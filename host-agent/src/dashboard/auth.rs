//! Who may use the dashboard, and proof that a form was sent by the dashboard's own page.
//!
//! - **Password** (`--auth FILE`): the file holds the password, or an argon2 PHC hash of it
//!   (`$argon2id$…`). A plain password is hashed at startup and only the hash is kept; the
//!   password never appears on the command line (where `ps` would show it). One login gives a
//!   session cookie (random 256-bit id, `HttpOnly`, `SameSite=Strict`); the password is checked
//!   once per login, not on every request, because argon2 is deliberately slow. Without `--auth`
//!   (loopback only) every visitor gets a session at once.
//! - **CSRF**: each session has a random token; every form carries it in a hidden `csrf` field
//!   and every POST is refused (403) unless it matches. `SameSite=Strict` already keeps other
//!   sites' forms from carrying the cookie; the token is the second lock.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use axum::http::{HeaderMap, header};

/// The session cookie's name.
pub const COOKIE: &str = "chukei_dashboard";
/// How long a session lasts without being used.
pub const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; past it the least recently used one is dropped. Bounds the memory a
/// script opening page after page without a cookie can take.
const MAX_SESSIONS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("could not read the password file {}: {source}", .path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the password file {} is empty; put the password (or an argon2 hash of it) on its first line", .path.display())]
    Empty { path: std::path::PathBuf },
    #[error("the password file {} holds an argon2 hash that does not parse: {reason}", .path.display())]
    BadHash {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("could not hash the password: {0}")]
    Hash(String),
}

/// The password's argon2 hash, as a PHC string.
#[derive(Clone)]
pub struct PasswordHashString(String);

impl std::fmt::Debug for PasswordHashString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHashString(..)")
    }
}

impl PasswordHashString {
    /// Reads `--auth FILE`: its first line is the password, or its hash if it starts `$argon2`.
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if line.is_empty() {
            return Err(AuthError::Empty {
                path: path.to_owned(),
            });
        }
        if line.starts_with("$argon2") {
            let parsed = PasswordHash::new(line).map_err(|e| AuthError::BadHash {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            if parsed.hash.is_none() || parsed.salt.is_none() {
                return Err(AuthError::BadHash {
                    path: path.to_owned(),
                    reason: "it has no salt or no hash".into(),
                });
            }
            return Ok(Self(line.to_owned()));
        }
        Self::hash(line)
    }

    /// Hashes `password` with argon2id and a fresh salt.
    pub fn hash(password: &str) -> Result<Self, AuthError> {
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| AuthError::Hash(e.to_string()))?;
        Ok(Self(hash.to_string()))
    }

    /// Whether `password` is the one. Slow on purpose (argon2): call it from a blocking thread.
    pub fn verify(&self, password: &str) -> bool {
        match PasswordHash::new(&self.0) {
            Ok(hash) => Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok(),
            Err(_) => false,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One browser's session.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub csrf: String,
    /// False only while a password is required and has not been given.
    pub authenticated: bool,
}

struct Entry {
    csrf: String,
    authenticated: bool,
    last_used: Instant,
}

/// The sessions and the password, if any.
pub struct Sessions {
    password: Option<PasswordHashString>,
    map: Mutex<HashMap<String, Entry>>,
}

impl Sessions {
    pub fn new(password: Option<PasswordHashString>) -> Sessions {
        Sessions {
            password,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a password protects the dashboard.
    pub fn required(&self) -> bool {
        self.password.is_some()
    }

    pub fn password(&self) -> Option<&PasswordHashString> {
        self.password.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // Each operation is one insert, lookup or remove: a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session the request's cookie names, if it is live; touching it keeps it alive.
    pub fn find(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut map = self.lock();
        let entry = map.get_mut(id)?;
        if entry.last_used.elapsed() > SESSION_IDLE {
            map.remove(id);
            return None;
        }
        entry.last_used = Instant::now();
        Some(Session {
            id: id.to_owned(),
            csrf: entry.csrf.clone(),
            authenticated: entry.authenticated,
        })
    }

    /// A new session: authenticated at once when no password is required.
    pub fn create(&self) -> Session {
        self.create_with(!self.required())
    }

    fn create_with(&self, authenticated: bool) -> Session {
        let session = Session {
            id: random_token(),
            csrf: random_token(),
            authenticated,
        };
        let mut map = self.lock();
        map.retain(|_, e| e.last_used.elapsed() <= SESSION_IDLE);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            session.id.clone(),
            Entry {
                csrf: session.csrf.clone(),
                authenticated,
                last_used: Instant::now(),
            },
        );
        session
    }

    /// After a good password: a *new* session id (so an id planted before the login is
    /// worthless), authenticated; the old one is dropped.
    pub fn login(&self, old: &Session) -> Session {
        self.lock().remove(&old.id);
        self.create_with(true)
    }

    pub fn logout(&self, session: &Session) {
        self.lock().remove(&session.id);
    }
}

/// `Set-Cookie` for `session`.
pub fn set_cookie(session: &Session) -> String {
    format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        session.id,
        SESSION_IDLE.as_secs()
    )
}

/// `Set-Cookie` that deletes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Whether a form's token is this session's, compared in constant time.
pub fn csrf_ok(session: &Session, token: Option<&str>) -> bool {
    let Some(token) = token else { return false };
    let (a, b) = (session.csrf.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 256 random bits, as 64 hex digits.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    crate::keys::to_hex(&bytes)
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_password_is_kept_only_as_its_hash_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "correct horse\n").unwrap();
        let hash = PasswordHashString::from_file(&path).unwrap();
        assert!(hash.as_str().starts_with("$argon2id$"), "{}", hash.as_str());
        assert!(!hash.as_str().contains("correct horse"));
        assert!(hash.verify("correct horse"));
        assert!(!hash.verify("correct horse\n"));
        assert!(!hash.verify("wrong"));
        // A file may hold the hash instead of the password.
        std::fs::write(&path, format!("{}\n", hash.as_str())).unwrap();
        let again = PasswordHashString::from_file(&path).unwrap();
        assert!(again.verify("correct horse"));
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            PasswordHashString::from_file(&path),
            Err(AuthError::Empty { .. })
        ));
        std::fs::write(&path, "$argon2id$nonsense").unwrap();
        assert!(matches!(
            PasswordHashString::from_file(&path),
            Err(AuthError::BadHash { .. })
        ));
    }

    #[test]
    fn sessions_come_from_the_cookie_and_login_rotates_the_id() {
        let sessions = Sessions::new(Some(PasswordHashString::hash("pw").unwrap()));
        let anon = sessions.create();
        assert!(!anon.authenticated);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("theme=dark; {COOKIE}={}", anon.id)).unwrap(),
        );
        assert_eq!(sessions.find(&headers).unwrap().csrf, anon.csrf);
        let logged = sessions.login(&anon);
        assert!(logged.authenticated);
        assert_ne!(logged.id, anon.id);
        assert!(
            sessions.find(&headers).is_none(),
            "the pre-login id is void"
        );
        assert!(csrf_ok(&logged, Some(&logged.csrf)));
        assert!(!csrf_ok(&logged, Some(&anon.csrf)));
        assert!(!csrf_ok(&logged, None));
        assert!(!csrf_ok(&logged, Some("")));
        assert!(Sessions::new(None).create().authenticated);
    }
}
