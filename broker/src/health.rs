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
