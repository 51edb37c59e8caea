//! Online backup and restore of the redb file.
//!
//! A backup copies the file while holding redb's one write transaction: no commit can start
//! meanwhile, so the copy is exactly what the last commit left on disk (redb commits with fsync),
//! the state a crash at that instant would leave, which redb opens (and repairs) by design.
//! Everything acked before the backup began is in it, because a message is acked only after its
//! commit. The relay's core waits for the copy, one file copy long (`copy_file_range` on Linux).
//!
//! A restore copies a backup into an empty data directory beside the final name, opens it as a
//! store (which checks it, repairs it and creates any table a newer relay added), and only then
//! renames it into place: a failed restore leaves no store behind.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{FILE_NAME, RedbStore, backend};
use crate::store::{StoreError, StoreStats};

/// Where a restore is checked before it takes the store's name, inside the data directory.
const RESTORING_DIR: &str = ".restoring";

impl RedbStore {
    /// See [`crate::store::Store::backup`].
    pub fn backup(&self, out: &Path) -> Result<u64, StoreError> {
        let writer = self.with_db(|db| db.begin_write().map_err(backend("begin a transaction")))?;
        let copied = copy_durably(&self.path, out);
        writer.abort().map_err(backend("abort"))?;
        copied.map_err(|source| StoreError::Backup {
            path: out.to_owned(),
            source,
        })
    }

    /// Makes `data_dir` hold the store saved in `backup`, and says what it holds. Refused if
    /// `data_dir` already has a store; nothing is left behind if `backup` is not a store.
    pub fn restore(backup: &Path, data_dir: &Path) -> Result<StoreStats, StoreError> {
        let target = data_dir.join(FILE_NAME);
        if target.exists() {
            return Err(StoreError::RestoreTarget { path: target });
        }
        let staging = data_dir.join(RESTORING_DIR);
        let dir_err = |source| StoreError::Dir {
            path: staging.clone(),
            source,
        };
        std::fs::create_dir_all(&staging).map_err(dir_err)?;
        let staged = staging.join(FILE_NAME);
        let result = stage(backup, &staged).and_then(|stats| {
            std::fs::rename(&staged, &target)
                .and_then(|()| sync_dir(data_dir))
                .map_err(dir_err)?;
            Ok(stats)
        });
        // The staging folder is empty after a rename; after a failure it holds the partial copy.
        let _ = std::fs::remove_dir_all(&staging);
        result
    }
}

/// Copies `backup` to `staged` and opens it as a store, which checks it.
fn stage(backup: &Path, staged: &Path) -> Result<StoreStats, StoreError> {
    let not_a_backup = |reason: String| StoreError::NotABackup {
        path: backup.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(backup).map_err(|e| not_a_backup(e.to_string()))?;
    if !meta.is_file() {
        return Err(not_a_backup("not a file".into()));
    }
    copy_durably(backup, staged).map_err(|source| StoreError::Backup {
        path: staged.to_owned(),
        source,
    })?;
    let dir = staged.parent().unwrap_or(Path::new("."));
    let store = RedbStore::open(dir).map_err(|e| match e {
        StoreError::Open { source, .. } => not_a_backup(source.to_string()),
        other => other,
    })?;
    store.stats()
}

/// Copies `from` to `to` through a temporary name, with the data and the rename both synced, so
/// `to` is either absent or complete.
fn copy_durably(from: &Path, to: &Path) -> std::io::Result<u64> {
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let bytes = std::fs::copy(from, &partial)?;
    // A copy of every record the relay keeps: for its owner only, whatever the source's mode.
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))?;
    File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, to)?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))?;
    Ok(bytes)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::*;
    use protocol::job::JobStatus;

    fn record(n: u64) -> JobRecord {
        super::super::tests::record(n, "C1", JobStatus::Queued, None)
    }

    fn jobs(store: &dyn Store) -> Vec<String> {
        let txn = store.begin().unwrap();
        txn.jobs_newest_first(&mut |_| true)
            .unwrap()
            .into_iter()
            .map(|r| r.view.id.to_string())
            .collect()
    }

    #[test]
    fn a_backup_of_an_open_store_restores_what_was_committed_and_nothing_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("live")).unwrap();
        for n in 1..=3 {
            let mut txn = store.begin().unwrap();
            txn.put_job(n, &record(n)).unwrap();
            txn.commit().unwrap();
        }
        let file = dir.path().join("relay.backup");
        let bytes = Store::backup(&store, &file).unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(bytes, meta.len());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "owner only");
        // Written after the backup: not in it.
        let mut txn = store.begin().unwrap();
        txn.put_job(4, &record(4)).unwrap();
        txn.commit().unwrap();

        let restored = dir.path().join("restored");
        let stats = RedbStore::restore(&file, &restored).unwrap();
        assert_eq!(stats.jobs.values().sum::<u64>(), 3);
        let reopened = RedbStore::open(&restored).unwrap();
        assert_eq!(jobs(&reopened), ["J-000003", "J-000002", "J-000001"]);
        assert!(!restored.join(RESTORING_DIR).exists());
        // The live store goes on.
        assert_eq!(jobs(&store).len(), 4);
    }

    #[test]
    fn a_restore_never_overwrites_a_store_and_refuses_what_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = RedbStore::open(&live).unwrap();
        let file = dir.path().join("relay.backup");
        Store::backup(&store, &file).unwrap();
        drop(store);
        let err = RedbStore::restore(&file, &live).unwrap_err();
        assert!(matches!(err, StoreError::RestoreTarget { .. }), "{err}");
        assert!(err.to_string().contains("empty data directory"), "{err}");

        let junk = dir.path().join("junk.backup");
        std::fs::write(&junk, b"not a database at all").unwrap();
        let empty = dir.path().join("empty");
        let err = RedbStore::restore(&junk, &empty).unwrap_err();
        assert!(matches!(err, StoreError::NotABackup { .. }), "{err}");
        assert!(!empty.join(FILE_NAME).exists(), "nothing left behind");
        assert!(!empty.join(RESTORING_DIR).exists());
        let err = RedbStore::restore(&dir.path().join("missing"), &empty).unwrap_err();
        assert!(matches!(err, StoreError::NotABackup { .. }), "{err}");
    }
}
