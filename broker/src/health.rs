//! Whether the relay should be sent clients: `GET /readyz` on the metrics listener
//! ([`crate::metrics_http`]), for load balancers and supervisors. `GET /healthz` needs nothing
//! from here: answering at all is its proof that the process serves.
//!
//! Ready means all of: the gateway accepts connections (not while the store is opened and the
//! retained orders republished, nor once the relay is stopping), the store takes writes (the
//! core is not refusing new work after a failed commit), the data directory is writable, and its
//! disk has more free than the reserve (`min_free_bytes`, [`crate::store::Space`]), below which
//! every commit is refused. Each failing check has its own reason, so an operator reading the
//! 503 knows what to fix (docs/decisions.md, D17).

use std::sync::atomic::{AtomicU8, Ordering};

use crate::core::Core;

const STARTING: u8 = 0;
const ACCEPTING: u8 = 1;
const STOPPING: u8 = 2;

/// Where the relay is in its life, as the readiness check sees it.
#[derive(Debug, Default)]
pub struct Health {
    phase: AtomicU8,
}

impl Health {
    /// The gateway accepts clients from now on.
    pub fn set_accepting(&self) {
        self.phase.store(ACCEPTING, Ordering::Release);
    }

    /// The relay is stopping: no longer ready, though it may still answer for a moment.
    pub fn set_stopping(&self) {
        self.phase.store(STOPPING, Ordering::Release);
    }

    /// `Ok(())` when ready, else why not. Asks the file system (access, statvfs): call it off
    /// the async threads.
    pub fn readiness(&self, core: &Core) -> Result<(), String> {
        match self.phase.load(Ordering::Acquire) {
            STARTING => {
                return Err(
                    "starting: not accepting connections yet (republishing retained orders)".into(),
                );
            }
            STOPPING => return Err("stopping: not accepting connections".into()),
            _ => {}
        }
        if let Some(reason) = core.storage_problem() {
            return Err(reason);
        }
        let store = core.store();
        if store.is_closed() {
            return Err(format!(
                "store {} closed after an I/O error; reopening",
                store.location()
            ));
        }
        if let Some(space) = store.space() {
            let dir = space.dir();
            if let Err(e) = rustix::fs::access(dir, rustix::fs::Access::WRITE_OK) {
                return Err(format!(
                    "data directory {} is not writable: {e}",
                    dir.display()
                ));
            }
            if let Some(r) = space.read()
                && r.is_low()
            {
                return Err(format!(
                    "disk reserve reached: {} bytes free in {}, less than min_free_bytes ({}); \
                     new work is refused until space returns",
                    r.free,
                    dir.display(),
                    r.reserve
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::core::CoreSettings;
    use crate::store::RedbStore;

    fn open_core(dir: &std::path::Path, reserve: u64) -> Core {
        let store = RedbStore::open(dir).unwrap().keep_free(reserve);
        Core::with_store(
            Arc::new(store),
            CoreSettings {
                server_name: "relay-test".into(),
                max_payload_bytes: 65536,
                finished_visible: Duration::from_secs(600),
                default_deadline: Duration::from_secs(3600),
                default_max_attempts: 3,
                hold_acks: false,
                node: None,
                last_seen_resolution: Duration::from_secs(60),
            },
        )
    }

    #[test]
    fn ready_only_while_accepting_and_above_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let core = open_core(dir.path(), 0);
        let health = Health::default();
        let e = health.readiness(&core).unwrap_err();
        assert!(e.starts_with("starting"), "{e}");
        health.set_accepting();
        assert_eq!(health.readiness(&core), Ok(()));
        health.set_stopping();
        let e = health.readiness(&core).unwrap_err();
        assert!(e.starts_with("stopping"), "{e}");

        let full = tempfile::tempdir().unwrap();
        let core = open_core(full.path(), u64::MAX);
        health.set_accepting();
        let e = health.readiness(&core).unwrap_err();
        assert!(
            e.contains("disk reserve reached") && e.contains("min_free_bytes"),
            "{e}"
        );
    }
}
