//! Revocation while the relay runs: the TLS configuration a reload may replace (with the
//! revocation list it was built from), and the open sessions by certificate serial, so that a
//! reload closes those of a certificate it now finds revoked and leaves every other one alone.
//!
//! A session checks the list after it is registered, and a reload swaps the list before it
//! looks for sessions to close: whichever comes first, a revoked certificate's session is either
//! refused or closed, never missed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;

/// The server configuration handshakes start with, and the serials revoked in the list it was
/// built from.
pub struct TlsState {
    pub config: Arc<rustls::ServerConfig>,
    revoked: HashSet<Vec<u8>>,
}

impl TlsState {
    pub fn new(config: Arc<rustls::ServerConfig>, revoked: HashSet<Vec<u8>>) -> Self {
        TlsState { config, revoked }
    }

    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.revoked.contains(serial)
    }
}

/// The current [`TlsState`]: read at every handshake, replaced by a reload.
pub struct CurrentTls(RwLock<Arc<TlsState>>);

impl CurrentTls {
    pub fn new(state: TlsState) -> Self {
        CurrentTls(RwLock::new(Arc::new(state)))
    }

    pub fn get(&self) -> Arc<TlsState> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, state: TlsState) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
    }
}

/// Open sessions by the serial of their certificate. Each holds a token of its own (a child of
/// the relay's stop token) that cancels it alone.
#[derive(Default)]
pub struct OpenSessions {
    by_serial: Mutex<HashMap<Vec<u8>, Vec<Registered>>>,
    next_id: AtomicU64,
}

/// One open session: its number and the token that ends it alone.
type Registered = (u64, CancellationToken);

/// A session's place in [`OpenSessions`]; dropping it removes the session.
pub struct OpenSession {
    sessions: Arc<OpenSessions>,
    serial: Vec<u8>,
    id: u64,
    token: CancellationToken,
}

impl OpenSession {
    /// Cancelled when the relay stops or the session's certificate is revoked.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl OpenSessions {
    /// Makes room for `sessions` at once.
    pub fn expect(&self, sessions: usize) {
        let mut map = self.by_serial.lock().unwrap_or_else(|p| p.into_inner());
        let more = sessions.saturating_sub(map.len());
        map.reserve(more);
    }

    /// Registers a session of the certificate `serial`, ended by `stop` or by [`Self::close`].
    pub fn open(self: &Arc<Self>, serial: &[u8], stop: &CancellationToken) -> OpenSession {
        let token = stop.child_token();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut map = self.by_serial.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(serial.to_vec())
            .or_default()
            .push((id, token.clone()));
        OpenSession {
            sessions: self.clone(),
            serial: serial.to_vec(),
            id,
            token,
        }
    }

    /// Cancels every session whose certificate `state` finds revoked; returns how many.
    pub fn close(&self, state: &TlsState) -> usize {
        let map = self.by_serial.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for (serial, sessions) in map.iter() {
            if state.is_revoked(serial) {
                for (_, token) in sessions {
                    token.cancel();
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Certificates with at least one session open.
    pub fn certificates(&self) -> usize {
        self.by_serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        let mut map = self
            .sessions
            .by_serial
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(sessions) = map.get_mut(&self.serial) {
            sessions.retain(|(id, _)| *id != self.id);
            if sessions.is_empty() {
                map.remove(&self.serial);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(revoked: &[&[u8]]) -> TlsState {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &[]).unwrap();
        let config = pki::server_config(dir.path()).unwrap();
        TlsState::new(config, revoked.iter().map(|s| s.to_vec()).collect())
    }

    #[test]
    fn room_is_made_for_the_sessions_expected() {
        let sessions = OpenSessions::default();
        sessions.expect(500);
        let map = sessions.by_serial.lock().unwrap();
        assert!(map.capacity() >= 500, "{}", map.capacity());
        assert!(map.is_empty());
    }

    #[test]
    fn only_sessions_of_a_revoked_serial_are_cancelled_and_ended_ones_are_forgotten() {
        let sessions = Arc::new(OpenSessions::default());
        let stop = CancellationToken::new();
        let a1 = sessions.open(&[1], &stop);
        let a2 = sessions.open(&[1], &stop);
        let b = sessions.open(&[2], &stop);
        assert_eq!(sessions.certificates(), 2);
        assert_eq!(sessions.close(&state(&[&[1], &[9]])), 2);
        assert!(a1.token().is_cancelled() && a2.token().is_cancelled());
        assert!(!b.token().is_cancelled() && !stop.is_cancelled());
        drop((a1, a2));
        assert_eq!(sessions.certificates(), 1);
        stop.cancel();
        assert!(
            b.token().is_cancelled(),
            "the relay's stop ends every session"
        );
        drop(b);
        assert_eq!(sessions.certificates(), 0);
    }
}
