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
//! next batch tries to commit, and the agents' resends are stored and acked. The burst ends with
//! the first commit that succeeds; a disk that keeps failing is tried again with a backoff (up to
//! a minute), not on every message.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::Core;
use crate::store::StoreError;

/// The least time between two attempts to reopen the database: a reopen may repair the file,
/// which reads all of it. (No pause in unit tests, which drive the core batch by batch.)
const REOPEN_EVERY: Duration = if cfg!(test) {
    Duration::ZERO
} else {
    Duration::from_secs(1)
};

/// After a write fails again right after recovering (an I/O error that space does not cure), the
/// next attempt waits this long, doubling up to [`MAX_BACKOFF`]: a failing disk is tried every
/// minute, not on every message.
const FIRST_BACKOFF: Duration = if cfg!(test) {
    Duration::ZERO
} else {
    Duration::from_secs(1)
};
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(super) struct StorageHealth {
    state: Mutex<State>,
}

#[derive(Default)]
enum State {
    #[default]
    Writable,
    /// Refusing work; `retry_at` is when writes may be tried again (once there is space).
    Refusing {
        burst: Burst,
        /// redb latched an I/O error: nothing works until the database is reopened.
        needs_reopen: bool,
        last_reopen: Option<Instant>,
        retry_at: Instant,
    },
    /// Writes are tried again; the burst ends with the first commit that succeeds.
    Probing { burst: Burst },
}

/// One stretch of refusing, from the first failed commit to the next one that succeeds.
struct Burst {
    since: Instant,
    /// Messages refused.
    refused: u64,
    /// Commits that failed (the first, then each probe that failed again).
    failures: u32,
    /// What hosts are told.
    reason: String,
}

impl Core {
    fn storage_state(&self) -> MutexGuard<'_, State> {
        self.storage
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether to try writing now. While refusing, this is where the core recovers: the database
    /// is reopened if an I/O error closed it, and writes are tried again once the disk has ample
    /// space (and any backoff has passed).
    pub(super) fn storage_writable(&self) -> bool {
        let mut state = self.storage_state();
        let State::Refusing {
            burst,
            needs_reopen,
            last_reopen,
            retry_at,
        } = &mut *state
        else {
            return true;
        };
        if !self.reopen_if_needed(needs_reopen, last_reopen) || Instant::now() < *retry_at {
            return false;
        }
        // A file system that cannot be asked is taken at its word: the next commit will tell.
        if !self
            .store
            .space()
            .and_then(|space| space.read())
            .is_none_or(|s| s.is_ample())
        {
            return false;
        }
        let burst = std::mem::replace(
            burst,
            Burst {
                since: Instant::now(),
                refused: 0,
                failures: 0,
                reason: String::new(),
            },
        );
        debug!(
            refused = burst.refused,
            "trying to write to the store again"
        );
        *state = State::Probing { burst };
        true
    }

    /// A commit succeeded: if it ended a burst of refusals, say so (once).
    pub(super) fn storage_committed(&self) {
        let mut state = self.storage_state();
        if let State::Probing { burst } = &*state {
            info!(
                refused = burst.refused,
                failed_commits = burst.failures,
                after_secs = burst.since.elapsed().as_secs(),
                "relay storage writable again; accepting new work"
            );
            *state = State::Writable;
        }
    }

    /// Reopens the database if an I/O error closed it, so that reads work again before writes
    /// do (opening repairs the file, which may succeed on a full disk: it rewrites pages the file
    /// already has).
    pub(super) fn storage_reopen(&self) {
        if let State::Refusing {
            needs_reopen,
            last_reopen,
            ..
        } = &mut *self.storage_state()
        {
            self.reopen_if_needed(needs_reopen, last_reopen);
        }
    }

    /// Whether the database is open, after reopening it if it needed that (at most once a
    /// second).
    fn reopen_if_needed(&self, needs_reopen: &mut bool, last: &mut Option<Instant>) -> bool {
        if !*needs_reopen && !self.store.is_closed() {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        match self.store.reopen() {
            Ok(()) => {
                info!(store = %self.store.location(), "store reopened after an I/O error");
                *needs_reopen = false;
                true
            }
            Err(e) => {
                // Expected while the disk is still full or another task holds a transaction; the
                // burst's first line already said what is wrong.
                debug!(error = %e, "store not reopened yet");
                false
            }
        }
    }

    /// Records that a commit failed for lack of storage. Logged once per burst, with the cause; a
    /// probe that fails again only pushes the next one back.
    pub(super) fn storage_failed(&self, e: &StoreError) {
        let mut state = self.storage_state();
        let now = Instant::now();
        match std::mem::take(&mut *state) {
            State::Writable => {
                let data_dir = self
                    .store
                    .space()
                    .map_or_else(|| self.store.location(), |s| s.dir().display().to_string());
                if e.is_disk_full() {
                    error!(data_dir = %data_dir, error = %e, "relay storage full: refusing new work (device reports stay unacked in their outboxes, host submissions get an error) until space returns; reads continue");
                } else {
                    error!(data_dir = %data_dir, error = %e, "relay storage failing: refusing new work until the store can write again; reads continue where the store allows");
                }
                *state = State::Refusing {
                    burst: Burst {
                        since: now,
                        refused: 0,
                        failures: 1,
                        reason: refusal(e, &data_dir),
                    },
                    needs_reopen: e.needs_reopen(),
                    last_reopen: None,
                    retry_at: now,
                };
            }
            State::Probing { mut burst } => {
                burst.failures += 1;
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << (burst.failures - 2).min(6))
                    .min(MAX_BACKOFF);
                debug!(error = %e, failures = burst.failures, retry_in = ?backoff, "store still cannot write");
                *state = State::Refusing {
                    burst,
                    needs_reopen: e.needs_reopen(),
                    last_reopen: None,
                    retry_at: now + backoff,
                };
            }
            State::Refusing {
                burst,
                needs_reopen,
                last_reopen,
                retry_at,
            } => {
                if e.needs_reopen() && !needs_reopen {
                    warn!(error = %e, "store needs reopening");
                }
                *state = State::Refusing {
                    burst,
                    needs_reopen: needs_reopen || e.needs_reopen(),
                    last_reopen,
                    retry_at,
                };
            }
        }
    }

    /// Counts messages refused in the current burst.
    pub(super) fn storage_refused(&self, n: u64) {
        if n == 0 {
            return;
        }
        if let State::Refusing { burst, .. } | State::Probing { burst } = &mut *self.storage_state()
        {
            burst.refused += n;
        }
    }

    /// Why the store takes no new work right now, or `None` while it writes: what `/readyz`
    /// reports (the same text hosts are told).
    pub fn storage_problem(&self) -> Option<String> {
        match &*self.storage_state() {
            State::Refusing { burst, .. } => Some(burst.reason.clone()),
            State::Probing { .. } | State::Writable => None,
        }
    }

    /// What a host is told when its request would need a write.
    pub(super) fn storage_refusal(&self) -> String {
        match &*self.storage_state() {
            State::Refusing { burst, .. } | State::Probing { burst } => burst.reason.clone(),
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
