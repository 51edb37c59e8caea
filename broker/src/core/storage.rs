//! What the core does while its store cannot write: the disk is full, or a write failed.
//!
//! The rule is the one of every batch: nothing is acknowledged that is not on disk. So while the
//! store cannot commit, device reports get no ack (each agent keeps them in its outbox and resends
//! them), and a host's submissions, cancels and uploads are answered with an error naming the
//! cause. Reads (`jobs list`, `jobs show`, alarms, exports) are still answered, connections stay up
//! and the router keeps serving the retained views it holds in memory.
//!
//! A burst of refusals is logged once when it starts and once when it ends, with how many
//! messages were refused in between, never once per message: a fleet resending into a full disk
//! must not fill the log's disk as well.
//!
//! Recovery is automatic. Before each batch and once a second the core looks at the free space;
//! once it is ample again (and the database, if an I/O error closed it, has been reopened) the
//! next batch commits normally and the agents' resends are stored and acked.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::Core;
use crate::store::StoreError;

/// The least time between two attempts to reopen the database: a reopen may repair the file,
/// which reads all of it.
/// (No pause in unit tests, which drive the core batch by batch without waiting.)
const REOPEN_EVERY: Duration = if cfg!(test) {
    Duration::ZERO
} else {
    Duration::from_secs(1)
};

#[derive(Default)]
pub(super) struct StorageHealth {
    state: Mutex<State>,
}

#[derive(Default)]
enum State {
    #[default]
    Writable,
    Refusing(Refusing),
}

struct Refusing {
    since: Instant,
    /// Messages refused in this burst.
    refused: u64,
    /// What hosts are told.
    reason: String,
    /// redb latched an I/O error: nothing works until the database is reopened.
    needs_reopen: bool,
    last_reopen: Option<Instant>,
}

impl Core {
    /// Whether the store takes writes now. While it has been refusing, this is where it recovers:
    /// the database is reopened if an I/O error closed it, and writing resumes once the disk has
    /// ample space again.
    pub(super) fn storage_writable(&self) -> bool {
        let mut state = self
            .storage
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let State::Refusing(r) = &mut *state else {
            return true;
        };
        if !self.reopen_if_needed(r) {
            return false;
        }
        // A file system that cannot be asked is taken at its word: the next commit will tell.
        let ample = self.store.space().read().is_none_or(|s| s.is_ample());
        if !ample {
            return false;
        }
        info!(
            refused = r.refused,
            after_secs = r.since.elapsed().as_secs(),
            "relay storage writable again; accepting new work"
        );
        *state = State::Writable;
        true
    }

    /// Reopens the database if an I/O error closed it, so that reads work again before writes
    /// do (opening repairs the file, which may succeed on a full disk: it rewrites pages the file
    /// already has).
    pub(super) fn storage_reopen(&self) {
        if let State::Refusing(r) = &mut *self
            .storage
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            self.reopen_if_needed(r);
        }
    }

    /// Whether the database is open, after reopening it if it needed that (at most once a
    /// second).
    fn reopen_if_needed(&self, r: &mut Refusing) -> bool {
        if !r.needs_reopen && !self.store.is_closed() {
            return true;
        }
        if r.last_reopen.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return false;
        }
        r.last_reopen = Some(Instant::now());
        match self.store.reopen() {
            Ok(()) => {
                info!(path = %self.store.path().display(), "store reopened after an I/O error");
                r.needs_reopen = false;
                true
            }
            Err(e) => {
                // Expected while the disk is still full or another task holds a transaction; the
                // burst's first line already said what is wrong.
                tracing::debug!(error = %e, "store not reopened yet");
                false
            }
        }
    }

    /// Records that a commit failed for lack of storage. Logged once per burst, with the cause.
    pub(super) fn storage_failed(&self, e: &StoreError) {
        let mut state = self
            .storage
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *state {
            State::Writable => {
                let data_dir = self.store.space().dir().display().to_string();
                if e.is_disk_full() {
                    error!(data_dir = %data_dir, error = %e, "relay storage full: refusing new work (device reports stay unacked in their outboxes, host submissions get an error) until space returns; reads continue");
                } else {
                    error!(data_dir = %data_dir, error = %e, "relay storage failing: refusing new work until the store can write again; reads continue where the store allows");
                }
                *state = State::Refusing(Refusing {
                    since: Instant::now(),
                    refused: 0,
                    reason: refusal(e, &data_dir),
                    needs_reopen: e.needs_reopen(),
                    last_reopen: None,
                });
            }
            State::Refusing(r) => {
                if e.needs_reopen() && !r.needs_reopen {
                    warn!(error = %e, "store needs reopening");
                    r.needs_reopen = true;
                }
            }
        }
    }

    /// Counts messages refused in the current burst.
    pub(super) fn storage_refused(&self, n: u64) {
        if n == 0 {
            return;
        }
        if let State::Refusing(r) = &mut *self
            .storage
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            r.refused += n;
        }
    }

    /// What a host is told when its request would need a write.
    pub(super) fn storage_refusal(&self) -> String {
        match &*self
            .storage
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            State::Refusing(r) => r.reason.clone(),
            State::Writable => "relay storage unavailable; try again later".to_owned(),
        }
    }
}

/// The error text a host shows its user: the cause first, then what happens and what to do.
fn refusal(e: &StoreError, data_dir: &str) -> String {
    match e {
        StoreError::Full { .. } => e.to_string(),
        _ if e.is_disk_full() => format!(
            "relay storage full: writing to {data_dir} failed ({e}); the relay refuses new work \
             until its operator frees space there, and resumes by itself"
        ),
        _ => format!(
            "relay storage failing ({e}); the relay refuses new work until it can write to \
             {data_dir} again: tell its operator"
        ),
    }
}
