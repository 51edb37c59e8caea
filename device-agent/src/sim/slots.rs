//! The simulated copier's A/B firmware slots.
//!
//! On disk (`HOME/slots/`): `a.img` and `b.img` (the images), `a.version` and `b.version`, and
//! `active` (the slot it boots), which is replaced atomically (written aside, synced, renamed), so
//! a power cut leaves either the old or the new choice, never half of one. A slot's version file is
//! removed before its image is rewritten and written back only after the image is synced: a slot
//! cut off mid-write claims no version. Without a home the slots live in memory (unit tests).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::device::{DeviceError, Slot, Slots};

/// A write is cut into this many pieces, with the configured delay spread between them, so a test
/// that kills the agent mid-write leaves a torn image behind.
const WRITE_PIECES: usize = 20;

pub(crate) enum SlotStore {
    Memory {
        active: Slot,
        images: [Vec<u8>; 2],
        versions: [Option<String>; 2],
    },
    Dir(PathBuf),
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> DeviceError {
    DeviceError::Failed(format!("{what} {}: {e}", path.display()))
}

/// Writes `text` to `path` through a synced temporary file and a rename.
pub(crate) fn replace_file(path: &Path, text: &[u8]) -> Result<(), DeviceError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
    f.write_all(text)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err("writing", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err("renaming", &tmp, e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all(); // makes the rename itself durable; best effort
    }
    Ok(())
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

impl SlotStore {
    pub(crate) fn in_dir(home: &Path) -> SlotStore {
        SlotStore::Dir(home.join("slots"))
    }

    pub(crate) fn memory(factory: &str) -> SlotStore {
        SlotStore::Memory {
            active: Slot::A,
            images: [Vec::new(), Vec::new()],
            versions: [Some(factory.to_owned()), None],
        }
    }

    fn img(dir: &Path, slot: Slot) -> PathBuf {
        dir.join(format!("{slot}.img"))
    }

    fn version_file(dir: &Path, slot: Slot) -> PathBuf {
        dir.join(format!("{slot}.version"))
    }

    /// The slots; `factory` is slot a's version on a copier never updated.
    pub(crate) fn slots(&self, factory: &str) -> Slots {
        match self {
            SlotStore::Memory {
                active, versions, ..
            } => Slots {
                active: *active,
                versions: versions.clone(),
            },
            SlotStore::Dir(dir) => {
                let active = read_trimmed(&dir.join("active"))
                    .and_then(|s| Slot::parse(&s))
                    .unwrap_or(Slot::A);
                let a = read_trimmed(&Self::version_file(dir, Slot::A)).or_else(|| {
                    // Slot a holds the factory image until it is first rewritten.
                    (!Self::img(dir, Slot::A).exists()).then(|| factory.to_owned())
                });
                let b = read_trimmed(&Self::version_file(dir, Slot::B));
                Slots {
                    active,
                    versions: [a, b],
                }
            }
        }
    }

    /// Copies `image` into `slot`, taking about `delay`; `corrupt` flips a byte, as a bad flash
    /// write would, so the read-back catches it.
    pub(crate) fn write(
        &mut self,
        slot: Slot,
        image: &Path,
        version: &str,
        delay: Duration,
        corrupt: bool,
    ) -> Result<(), DeviceError> {
        let mut bytes = Vec::new();
        File::open(image)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| io_err("reading the image", image, e))?;
        let piece = bytes.len().div_ceil(WRITE_PIECES).max(1);
        let pause = delay / WRITE_PIECES as u32;
        match self {
            SlotStore::Memory {
                images, versions, ..
            } => {
                versions[slot as usize] = None;
                let out = &mut images[slot as usize];
                out.clear();
                for part in bytes.chunks(piece) {
                    out.extend_from_slice(part);
                    std::thread::sleep(pause);
                }
                if corrupt {
                    flip(out);
                }
                versions[slot as usize] = Some(version.to_owned());
            }
            SlotStore::Dir(dir) => {
                fs::create_dir_all(&*dir).map_err(|e| io_err("creating", dir, e))?;
                let vfile = Self::version_file(dir, slot);
                match fs::remove_file(&vfile) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("removing", &vfile, e)),
                }
                let path = Self::img(dir, slot);
                let mut f = File::create(&path).map_err(|e| io_err("creating", &path, e))?;
                for part in bytes.chunks(piece) {
                    f.write_all(part)
                        .and_then(|()| f.sync_data())
                        .map_err(|e| io_err("writing", &path, e))?;
                    std::thread::sleep(pause);
                }
                if bytes.is_empty() {
                    std::thread::sleep(delay);
                }
                if corrupt {
                    use std::os::unix::fs::FileExt;
                    let bad = [bytes.first().map_or(0xff, |b| b ^ 0xff)];
                    f.write_at(&bad, 0)
                        .map_err(|e| io_err("writing", &path, e))?;
                }
                f.sync_all().map_err(|e| io_err("syncing", &path, e))?;
                replace_file(&vfile, format!("{version}\n").as_bytes())?;
            }
        }
        Ok(())
    }

    pub(crate) fn digest(&self, slot: Slot) -> Result<[u8; 32], DeviceError> {
        let mut hasher = Sha256::new();
        match self {
            SlotStore::Memory { images, .. } => hasher.update(&images[slot as usize]),
            SlotStore::Dir(dir) => {
                let path = Self::img(dir, slot);
                let mut f = File::open(&path).map_err(|e| io_err("opening", &path, e))?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = f.read(&mut buf).map_err(|e| io_err("reading", &path, e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
            }
        }
        Ok(hasher.finalize().into())
    }

    pub(crate) fn activate(&mut self, slot: Slot) -> Result<(), DeviceError> {
        match self {
            SlotStore::Memory { active, .. } => {
                *active = slot;
                Ok(())
            }
            SlotStore::Dir(dir) => {
                fs::create_dir_all(&*dir).map_err(|e| io_err("creating", dir, e))?;
                replace_file(&dir.join("active"), format!("{slot}\n").as_bytes())
            }
        }
    }
}

fn flip(bytes: &mut Vec<u8>) {
    match bytes.first_mut() {
        Some(b) => *b ^= 0xff,
        None => bytes.push(0xff),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, body: &[u8]) -> PathBuf {
        let p = dir.join("image.bin");
        fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn a_fresh_copier_runs_the_factory_image_from_slot_a() {
        let dir = tempfile::tempdir().unwrap();
        let s = SlotStore::in_dir(dir.path()).slots("1.0.0");
        assert_eq!(s.active, Slot::A);
        assert_eq!(s.versions, [Some("1.0.0".into()), None]);
    }

    #[test]
    fn write_verify_and_switch_on_disk_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), &[7u8; 5000]);
        let mut store = SlotStore::in_dir(dir.path());
        store
            .write(Slot::B, &img, "2.0.0", Duration::ZERO, false)
            .unwrap();
        let want: [u8; 32] = Sha256::digest([7u8; 5000]).into();
        assert_eq!(store.digest(Slot::B).unwrap(), want);
        assert_eq!(
            store.slots("1.0.0").active,
            Slot::A,
            "writing does not switch"
        );
        store.activate(Slot::B).unwrap();
        let again = SlotStore::in_dir(dir.path()).slots("1.0.0");
        assert_eq!(again.active, Slot::B);
        assert_eq!(again.active_version(), "2.0.0");
    }

    #[test]
    fn a_corrupt_write_fails_its_read_back() {
        let dir = tempfile::tempdir().unwrap();
        for mut store in [SlotStore::memory("1.0.0"), SlotStore::in_dir(dir.path())] {
            let img = image(dir.path(), b"firmware");
            store
                .write(Slot::B, &img, "2", Duration::ZERO, true)
                .unwrap();
            let want: [u8; 32] = Sha256::digest(b"firmware").into();
            assert_ne!(store.digest(Slot::B).unwrap(), want);
        }
    }
}
