//! Which node does the cluster's once-only work (deadlines, overdue check-ins, alarm digests,
//! notifications): the one holding a PostgreSQL session-level advisory lock on a connection of
//! its own. The lock goes with that connection — a node that dies, or loses the database, lets
//! it go, and the next node to ask takes it.

use std::sync::Mutex;

use tracing::{info, warn};

use super::{Conn, P, Target};

/// The advisory lock's key: "chukei" in ASCII, as a number.
const LOCK_KEY: i64 = 0x6368_756b_6569;

#[derive(Default)]
pub(super) struct Leader {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    conn: Option<Conn>,
    holds: bool,
    /// The database was unreachable and that was logged (once per outage).
    unreachable_logged: bool,
}

impl Leader {
    /// Whether this node holds the lock: checks that the connection holding it still lives,
    /// or tries to take it. Never blocks on another node.
    pub(super) fn leads(&self, target: &Target) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.conn.is_none() {
            match Conn::open(target, "chukei-pg-leader") {
                Ok(conn) => {
                    state.conn = Some(conn);
                    state.unreachable_logged = false;
                }
                Err(e) => {
                    if !std::mem::replace(&mut state.unreachable_logged, true) {
                        warn!(error = %e, "cannot reach the cluster database to take the leader lock; trying every second");
                    }
                    return false;
                }
            }
        }
        let Some(conn) = state.conn.as_ref() else {
            return false;
        };
        let answer = if state.holds {
            conn.query("SELECT true", Vec::new())
        } else {
            conn.query("SELECT pg_try_advisory_lock($1)", vec![P::I64(LOCK_KEY)])
        };
        match answer {
            Some(Ok(rows)) => {
                let now = rows
                    .first()
                    .is_some_and(|r| r.try_get::<_, bool>(0).unwrap_or(false));
                if now && !state.holds {
                    info!(
                        "this node now does the cluster's periodic work (deadlines, overdue check-ins, notifications)"
                    );
                }
                state.holds = now;
                now
            }
            _ => {
                if state.holds {
                    warn!(
                        "lost the connection holding the leader lock; another node takes over the periodic work"
                    );
                }
                state.conn = None;
                state.holds = false;
                false
            }
        }
    }
}
