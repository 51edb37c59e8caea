//! The format version of the agent's store (`agent.redb`: the outbox and what [`crate::store`]
//! keeps): recorded in the file, checked before anything is written. A store written by a newer
//! agent is refused, never read as if it were this one's.
//!
//! Version 1 is every store written before the version was recorded; version 2 records it, with
//! the same tables.

use std::path::Path;

use redb::{Database, ReadableDatabase, TableDefinition, WriteTransaction};
use tracing::info;

use crate::outbox::OutboxError;

/// The format this release writes and reads.
pub const FORMAT_VERSION: u64 = 2;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const KEY: &str = "format_version";

/// The version the store holds before this release touches it: `None` for a new, empty file; 1
/// for a store from before the version was recorded.
pub(crate) fn found(db: &Database) -> Result<Option<u64>, redb::Error> {
    let txn = db.begin_read()?;
    if txn.list_tables()?.next().is_none() {
        return Ok(None);
    }
    let version = match txn.open_table(META) {
        Ok(meta) => meta.get(KEY)?.map(|g| g.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(Some(version.unwrap_or(1)))
}

/// Refuses a store of a newer format (`found`: what [`found`] said).
pub(crate) fn refuse_newer(path: &Path, found: Option<u64>) -> Result<(), OutboxError> {
    match found {
        Some(v) if v > FORMAT_VERSION => Err(OutboxError::NewerFormat {
            path: path.to_owned(),
            found: v,
            supported: FORMAT_VERSION,
        }),
        _ => Ok(()),
    }
}

/// Records this release's format inside the opening transaction (upgrading an older store: the
/// tables are the same).
pub(crate) fn record(
    txn: &WriteTransaction,
    path: &Path,
    found: Option<u64>,
) -> Result<(), redb::Error> {
    if found == Some(FORMAT_VERSION) {
        return Ok(());
    }
    txn.open_table(META)?.insert(KEY, FORMAT_VERSION)?;
    if let Some(from) = found {
        info!(path = %path.display(), from, to = FORMAT_VERSION, "agent store upgraded to this release's format");
    }
    Ok(())
}

/// Writes `version` as the store's format, whatever it is: for tests that make a store of
/// another release. Never called by the agent.
#[doc(hidden)]
pub fn force_version(path: &Path, version: u64) -> Result<(), redb::Error> {
    let db = Database::create(path)?;
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        if version == 1 {
            meta.remove(KEY)?;
        } else {
            meta.insert(KEY, version)?;
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;

    fn version_in(path: &Path) -> Option<u64> {
        found(&Database::create(path).unwrap()).unwrap()
    }

    #[test]
    fn a_new_store_records_this_release_format_and_an_old_one_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        drop(Outbox::open(&path).unwrap());
        assert_eq!(version_in(&path), Some(FORMAT_VERSION));
        force_version(&path, 1).unwrap();
        assert_eq!(version_in(&path), Some(1));
        drop(Outbox::open(&path).unwrap());
        assert_eq!(version_in(&path), Some(FORMAT_VERSION));
    }

    #[test]
    fn a_newer_format_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        drop(Outbox::open(&path).unwrap());
        force_version(&path, FORMAT_VERSION + 1).unwrap();
        let Err(e) = Outbox::open(&path) else {
            panic!("an agent store of a newer format was opened");
        };
        let text = e.to_string();
        assert!(
            text.contains(&format!("format version {}", FORMAT_VERSION + 1)),
            "{text}"
        );
        assert!(text.contains("newer device-agent"), "{text}");
        assert_eq!(version_in(&path), Some(FORMAT_VERSION + 1));
    }
}
