//! A disk for tests that fills up on demand: redb's own I/O error path, without root or tmpfs.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::RedbStore;

/// A backend over shared memory whose writes fail with ENOSPC while `full` is set: a disk
/// that fills up under redb and empties again.
#[derive(Debug, Clone, Default)]
pub struct FillingDisk {
    bytes: Arc<RwLock<Vec<u8>>>,
    full: Arc<AtomicBool>,
}

impl FillingDisk {
    fn check(&self) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        Ok(())
    }
}

impl redb::StorageBackend for FillingDisk {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.bytes.read().unwrap().len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let bytes = self.bytes.read().unwrap();
        let start = offset as usize;
        let src = bytes
            .get(start..start + out.len())
            .ok_or(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut bytes = self.bytes.write().unwrap();
        if len as usize > bytes.len() {
            self.check()?;
        }
        bytes.resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        let mut bytes = self.bytes.write().unwrap();
        let start = offset as usize;
        if bytes.len() < start + data.len() {
            bytes.resize(start + data.len(), 0);
        }
        bytes[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

impl FillingDisk {
    /// A store on this disk, reopened on it too.
    pub fn store(&self, data_dir: &Path) -> RedbStore {
        let backing = self.clone();
        RedbStore::open_with(
            data_dir,
            Arc::new(move |_: &Path| redb::Builder::new().create_with_backend(backing.clone())),
        )
        .expect("a store on an empty disk")
    }

    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }
}
