//! The store's format version: recorded in the file, checked on every open, upgraded step by
//! step in one write transaction. A store written by a newer release is refused, never read as if
//! it were this one's: its records could mean something else.
//!
//! Version 1 is every store written before the version was recorded (it has tables but no
//! record); version 2 records it; version 3 may hold jobs `forwarded` to a child relay and a child
//! relay's tables (`uplink`, `mirrored`), which a version-2 release would not read; version 4
//! adds rollouts and device tags (`rollouts`, `active_rollouts`, `device_tags`).

use std::path::Path;

use redb::{Database, ReadableDatabase, WriteTransaction};
use tracing::info;

use super::{META, backend};
use crate::store::StoreError;

/// The format this release writes and reads.
pub const FORMAT_VERSION: u64 = 4;

/// The version's key in the `meta` table.
const KEY: &str = "format_version";

/// One upgrade: from the version it names to the next, inside the open's write transaction.
type Step = fn(&WriteTransaction) -> Result<(), StoreError>;

/// `STEPS[i]` upgrades version `i + 1` to `i + 2`.
const STEPS: [Step; (FORMAT_VERSION - 1) as usize] = [v1_to_v2, v2_to_v3, v3_to_v4];

/// Version 2 only starts recording the version (written by [`upgrade`] after every step); the
/// records themselves are the same.
fn v1_to_v2(_txn: &WriteTransaction) -> Result<(), StoreError> {
    Ok(())
}

/// Version 3 adds a job status and tables a version-2 store has none of: nothing to convert.
fn v2_to_v3(_txn: &WriteTransaction) -> Result<(), StoreError> {
    Ok(())
}

/// Version 4 adds the rollout and device-tag tables: nothing to convert, but a version-3 release
/// would not see its rollouts.
fn v3_to_v4(_txn: &WriteTransaction) -> Result<(), StoreError> {
    Ok(())
}

/// The version the file at `path` holds, before anything is created in it: `None` for a new,
/// empty file; 1 for a store from before the version was recorded.
pub(super) fn found(db: &Database) -> Result<Option<u64>, StoreError> {
    let op = "read the store's format version";
    let txn = db.begin_read().map_err(backend(op))?;
    if txn.list_tables().map_err(backend(op))?.next().is_none() {
        return Ok(None);
    }
    let version = match txn.open_table(META) {
        Ok(meta) => meta.get(KEY).map_err(backend(op))?.map(|g| g.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(backend(op)(e)),
    };
    Ok(Some(version.unwrap_or(1)))
}

/// Refuses a store of a newer format (`found`: what [`found`] said), before anything is written.
pub(super) fn refuse_newer(path: &Path, found: Option<u64>) -> Result<(), StoreError> {
    match found {
        Some(v) if v > FORMAT_VERSION => Err(StoreError::NewerFormat {
            path: path.to_owned(),
            found: v,
            supported: FORMAT_VERSION,
        }),
        _ => Ok(()),
    }
}

/// Brings the store (whose tables now exist) from `found` up to [`FORMAT_VERSION`] and records
/// it, all in one transaction. `found`: what [`found`] said, already checked by [`refuse_newer`].
pub(super) fn upgrade(db: &Database, path: &Path, found: Option<u64>) -> Result<(), StoreError> {
    let from = found.unwrap_or(FORMAT_VERSION);
    if found == Some(FORMAT_VERSION) {
        return Ok(());
    }
    let op = "upgrade the store's format";
    let txn = db.begin_write().map_err(backend(op))?;
    for step in &STEPS[(from.max(1) - 1) as usize..] {
        step(&txn)?;
    }
    {
        let mut meta = txn.open_table(META).map_err(backend(op))?;
        meta.insert(KEY, FORMAT_VERSION).map_err(backend(op))?;
    }
    txn.commit().map_err(backend(op))?;
    if found.is_some() {
        info!(path = %path.display(), from, to = FORMAT_VERSION, "store upgraded to this release's format");
    }
    Ok(())
}

/// Writes `version` as the store's format, whatever it is: for tests that make a store of
/// another release. Never called by the relay.
#[doc(hidden)]
pub fn force_version(data_dir: &Path, version: u64) -> Result<(), StoreError> {
    let path = data_dir.join(super::FILE_NAME);
    let db = Database::create(&path).map_err(|source| StoreError::Open {
        path: path.clone(),
        source,
    })?;
    let op = "write a format version";
    let txn = db.begin_write().map_err(backend(op))?;
    {
        let mut meta = txn.open_table(META).map_err(backend(op))?;
        match version {
            1 => {
                meta.remove(KEY).map_err(backend(op))?;
            }
            v => {
                meta.insert(KEY, v).map_err(backend(op))?;
            }
        }
    }
    txn.commit().map_err(backend(op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb_store::RedbStore;

    fn version_in(dir: &Path) -> Option<u64> {
        let db = Database::create(dir.join(super::super::FILE_NAME)).unwrap();
        found(&db).unwrap()
    }

    #[test]
    fn a_new_store_records_this_release_format() {
        let dir = tempfile::tempdir().unwrap();
        drop(RedbStore::open(dir.path()).unwrap());
        assert_eq!(version_in(dir.path()), Some(FORMAT_VERSION));
    }

    #[test]
    fn a_store_without_a_record_is_version_1_and_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        drop(RedbStore::open(dir.path()).unwrap());
        force_version(dir.path(), 1).unwrap();
        assert_eq!(version_in(dir.path()), Some(1));
        drop(RedbStore::open(dir.path()).unwrap());
        assert_eq!(version_in(dir.path()), Some(FORMAT_VERSION));
    }

    #[test]
    fn a_newer_format_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        drop(RedbStore::open(dir.path()).unwrap());
        force_version(dir.path(), FORMAT_VERSION + 1).unwrap();
        let Err(e) = RedbStore::open(dir.path()) else {
            panic!("a store of a newer format was opened");
        };
        let text = e.to_string();
        assert!(
            matches!(e, StoreError::NewerFormat { found, supported, .. }
            if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
            "{text}"
        );
        assert!(text.contains("broker restore"), "{text}");
        assert_eq!(version_in(dir.path()), Some(FORMAT_VERSION + 1));
    }
}
