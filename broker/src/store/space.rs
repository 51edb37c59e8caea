//! Free space on the data directory's file system, checked before every commit.
//!
//! Why check at all, when redb reports a full disk itself: redb latches any failed write. After one
//! `ENOSPC` every later transaction, reads included, fails with "previous I/O error" until the
//! database is closed and opened again (with a repair). Refusing to commit while the disk is nearly
//! full keeps the database healthy, so the relay goes on answering reads (`jobs list`, `jobs show`)
//! while it refuses new work. The I/O-error path is still handled (the core reopens the store once
//! space is back), for the writes that race past this check.

use std::path::{Path, PathBuf};

/// The least free space kept in reserve: below it, commits are refused.
const MIN_RESERVE: u64 = 256 * 1024;
/// The most: a large disk keeps 1% free, up to this much.
const MAX_RESERVE: u64 = 64 * 1024 * 1024;

/// How much the data directory's file system must keep free, and what it has.
#[derive(Debug, Clone)]
pub struct Space {
    dir: PathBuf,
    reserve: u64,
}

/// One look at the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Bytes an unprivileged writer may still use.
    pub free: u64,
    /// The reserve commits must leave.
    pub reserve: u64,
}

impl Reading {
    /// Below the reserve: refuse to commit.
    pub fn is_low(&self) -> bool {
        self.free < self.reserve
    }

    /// Comfortably above the reserve (twice it): enough to resume, without flapping between
    /// refusing and accepting as a few writes come and go.
    pub fn is_ample(&self) -> bool {
        self.free >= self.reserve.saturating_mul(2)
    }
}

impl Space {
    /// The automatic reserve: 1% of the file system, at least 256 KiB and at most 64 MiB (256 KiB
    /// if the file system cannot be asked).
    pub fn for_dir(dir: &Path) -> Space {
        let reserve = match rustix::fs::statvfs(dir) {
            Ok(s) => (s.f_blocks.saturating_mul(s.f_frsize) / 100).clamp(MIN_RESERVE, MAX_RESERVE),
            Err(_) => MIN_RESERVE,
        };
        Space {
            dir: dir.to_owned(),
            reserve,
        }
    }

    /// A reserve the operator chose (`min_free_bytes`): a disk shared with other data may need
    /// more than 1% kept free, a small dedicated one less. 0 turns the check off, leaving a full
    /// disk to the I/O-error path (reads then stop until the store is reopened).
    pub fn with_reserve(dir: &Path, reserve: u64) -> Space {
        Space {
            dir: dir.to_owned(),
            reserve,
        }
    }

    /// Free space now; `None` if the file system cannot be asked (no reason to refuse then:
    /// a real shortage still shows up as a failed write).
    pub fn read(&self) -> Option<Reading> {
        let s = rustix::fs::statvfs(&self.dir).ok()?;
        Some(Reading {
            free: s.f_bavail.saturating_mul(s.f_frsize),
            reserve: self.reserve,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn reserve(&self) -> u64 {
        self.reserve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_bounded_and_a_reading_compares_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::for_dir(dir.path());
        assert!((MIN_RESERVE..=MAX_RESERVE).contains(&space.reserve()));
        let r = space
            .read()
            .expect("a temp dir's file system answers statvfs");
        assert_eq!(r.reserve, space.reserve());
        let low = Reading {
            free: 10,
            reserve: 100,
        };
        assert!(low.is_low() && !low.is_ample());
        let between = Reading {
            free: 150,
            reserve: 100,
        };
        assert!(!between.is_low() && !between.is_ample());
        assert!(
            Reading {
                free: 200,
                reserve: 100
            }
            .is_ample()
        );
    }

    #[test]
    fn a_chosen_reserve_replaces_the_automatic_one() {
        let dir = tempfile::tempdir().unwrap();
        let huge = Space::with_reserve(dir.path(), u64::MAX);
        assert_eq!(huge.reserve(), u64::MAX);
        assert!(huge.read().expect("statvfs answers").is_low());
        let off = Space::with_reserve(dir.path(), 0);
        let r = off.read().expect("statvfs answers");
        assert!(!r.is_low() && r.is_ample());
    }
}
