//! Who may use the dashboard, and proof that a form was sent by the dashboard's own page.
//!
//! - **Password** (`--auth FILE`): the file holds the password, or an argon2 PHC hash of it
//!   (`$argon2id$…`). A plain password is hashed at startup and only the hash is kept; the
//!   password never appears on the command line (where `ps` would show it). One login gives a
//!   session cookie (random 256-bit id, `HttpOnly`, `SameSite=Strict`); the password is checked
//!   once per login, not on every request, because argon2 is deliberately slow. Without `--auth`
//!   (loopback only) every visitor may use the page at once.
//! - **Visitors hold no server-side state.** Only a login makes a session the server keeps
//!   (at most [`MAX_SESSIONS`], the least recently used dropped first), so no number of
//!   strangers opening pages without a cookie can push a logged-in session out. A visitor
//!   (before the login, or anyone when no password is set) gets a random id in the same cookie
//!   and a CSRF token derived from it: HMAC-SHA-256 under a key made at each start, so a token
//!   cannot be made up for an id, and nothing needs storing.
//! - **CSRF**: every form carries the session's (or the visitor's) token in a hidden `csrf`
//!   field and every POST is refused (403) unless it matches. `SameSite=Strict` already keeps
//!   other sites' forms from carrying the cookie, and [`super::hosts`] refuses pages under other
//!   names and forms from other origins; the token is the third lock.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use axum::http::{HeaderMap, header};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The session cookie's name.
pub const COOKIE: &str = "chukei_dashboard";
/// How long a session lasts without being used.
pub const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// Logged-in sessions kept at most; past it the least recently used one is dropped. Only a
/// correct password makes one, so this bounds what many logins leave, and strangers cannot
/// reach it.
pub const MAX_SESSIONS: usize = 1024;
/// Mixed into a visitor's CSRF token, so the key signs nothing else by accident.
const CSRF_CONTEXT: &[u8] = b"chukei dashboard visitor csrf\0";

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

/// One browser's session, or a visitor's (see the module's doc).
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub csrf: String,
    /// False only while a password is required and has not been given.
    pub authenticated: bool,
}

/// A logged-in session, as the server keeps it.
struct Entry {
    csrf: String,
    last_used: Instant,
}

/// The logged-in sessions, the password, if any, and the key of visitors' tokens.
pub struct Sessions {
    password: Option<PasswordHashString>,
    visitor_key: [u8; 32],
    map: Mutex<HashMap<String, Entry>>,
}

impl Sessions {
    pub fn new(password: Option<PasswordHashString>) -> Sessions {
        Sessions {
            password,
            visitor_key: rand::random(),
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

    /// The session the request's cookie names: a live logged-in session (touching it keeps it
    /// alive), else the visitor of that id if it is one of ours in form. `None` without a
    /// usable cookie.
    pub fn find(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        {
            let mut map = self.lock();
            if let Some(entry) = map.get_mut(id) {
                if entry.last_used.elapsed() <= SESSION_IDLE {
                    entry.last_used = Instant::now();
                    return Some(Session {
                        id: id.to_owned(),
                        csrf: entry.csrf.clone(),
                        authenticated: true,
                    });
                }
                map.remove(id);
            }
        }
        is_token(id).then(|| self.visitor(id.to_owned()))
    }

    /// A new visitor (nothing is stored): allowed in at once when no password is required.
    pub fn create(&self) -> Session {
        self.visitor(random_token())
    }

    fn visitor(&self, id: String) -> Session {
        let csrf = self.visitor_csrf(&id);
        Session {
            id,
            csrf,
            authenticated: !self.required(),
        }
    }

    /// HMAC-SHA-256 of the visitor's id under this run's key, as hex.
    fn visitor_csrf(&self, id: &str) -> String {
        // HMAC takes a key of any length; a 32-byte one cannot be refused.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.visitor_key) else {
            unreachable!("HMAC accepts keys of every length")
        };
        mac.update(CSRF_CONTEXT);
        mac.update(id.as_bytes());
        crate::keys::to_hex(&mac.finalize().into_bytes())
    }

    /// After a good password: a *new* session id (so an id planted before the login is
    /// worthless), kept by the server; the old one is dropped. Past [`MAX_SESSIONS`] the least
    /// recently used logged-in session goes.
    pub fn login(&self, old: &Session) -> Session {
        let session = Session {
            id: random_token(),
            csrf: random_token(),
            authenticated: true,
        };
        let mut map = self.lock();
        map.remove(&old.id);
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
                last_used: Instant::now(),
            },
        );
        session
    }

    pub fn logout(&self, session: &Session) {
        self.lock().remove(&session.id);
    }

    /// Logged-in sessions held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().len()
    }
}

/// Whether `id` has the form of the ids this module makes: 64 lower-case hex digits.
fn is_token(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
        let before = sessions.find(&headers).unwrap();
        assert!(
            !before.authenticated && before.csrf != logged.csrf,
            "the pre-login id stays a stranger's"
        );
        assert!(csrf_ok(&logged, Some(&logged.csrf)));
        assert!(!csrf_ok(&logged, Some(&anon.csrf)));
        assert!(!csrf_ok(&logged, None));
        assert!(!csrf_ok(&logged, Some("")));
        assert!(Sessions::new(None).create().authenticated);
    }

    #[test]
    fn a_visitors_token_belongs_to_its_id_and_to_this_run() {
        let sessions = Sessions::new(None);
        let visitor = sessions.create();
        assert_eq!(sessions.held(), 0, "a visitor is not stored");
        let again = sessions.find(&with_cookie(&visitor.id)).unwrap();
        assert_eq!(
            (again.id.as_str(), again.csrf.as_str()),
            (visitor.id.as_str(), visitor.csrf.as_str())
        );
        assert!(again.authenticated, "no password: everyone is in");
        let other = sessions.create();
        assert_ne!(other.csrf, visitor.csrf);
        assert!(!csrf_ok(&other, Some(&visitor.csrf)));
        let restarted = Sessions::new(None);
        assert_ne!(
            restarted.find(&with_cookie(&visitor.id)).unwrap().csrf,
            visitor.csrf,
            "a token from before a restart is void"
        );
        for bad in ["", "abc", &"G".repeat(64), &visitor.id.to_uppercase()] {
            assert!(sessions.find(&with_cookie(bad)).is_none(), "{bad:?}");
        }
    }

    fn with_cookie(id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{COOKIE}={id}")).unwrap(),
        );
        headers
    }

    #[test]
    fn anonymous_visitors_never_displace_a_logged_in_session() {
        let sessions = Sessions::new(Some(PasswordHashString::hash("pw").unwrap()));
        let logged = sessions.login(&sessions.create());
        // A script opening page after page without a cookie, as the session layer serves it.
        for _ in 0..1100 {
            assert!(sessions.find(&HeaderMap::new()).is_none());
            let visitor = sessions.create();
            assert!(!visitor.authenticated);
        }
        assert_eq!(sessions.held(), 1, "visitors leave nothing behind");
        let found = sessions
            .find(&with_cookie(&logged.id))
            .expect("the logged-in session outlives any number of anonymous visitors");
        assert!(found.authenticated);
        assert_eq!(found.csrf, logged.csrf, "and its forms' token still holds");
    }
}
