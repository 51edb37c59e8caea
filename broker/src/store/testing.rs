//! The store the core's tests run on: one suite, every backend. `CHUKEI_TEST_STORE` names the
//! backend — `redb`, the default, on a file in the test's temp directory. A backend added to the
//! relay adds its arm here, and the core's whole suite runs on it:
//! `CHUKEI_TEST_STORE=<name> cargo nextest run -p chukei-broker core::`.

use std::path::Path;
use std::sync::Arc;

use super::{RedbStore, Store};

/// The environment variable that picks the backend.
pub const BACKEND_VAR: &str = "CHUKEI_TEST_STORE";

/// Opens the test store kept under `dir`; opening the same `dir` again finds what was committed
/// (the tests of restarts rely on it).
pub fn open(dir: &Path) -> Arc<dyn Store> {
    let backend = std::env::var(BACKEND_VAR).unwrap_or_else(|_| "redb".to_owned());
    match backend.as_str() {
        "redb" => Arc::new(RedbStore::open(dir).expect("open a redb store in a temp dir")),
        other => panic!("{BACKEND_VAR}={other}: unknown store backend (known: redb)"),
    }
}
