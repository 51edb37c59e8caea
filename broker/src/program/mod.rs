//! A child relay's own program and its replacement by a firmware job (claim 22).
//!
//! Two processes share one folder, the program directory:
//! - `broker supervise` ([`supervisor`]) runs `DIR/current` and outlives it. It is the installed
//!   binary and is never replaced itself, so it can always go back.
//! - The relay it runs (`broker run` with [`PROGRAM_DIR_ENV`] set) takes a firmware job for
//!   itself: it checks the publisher's signature, downloads the image through its parent into
//!   `DIR/next`, checks its SHA-256, and exits with [`RESTART_INTO_NEW_PROGRAM`].
//!
//! The supervisor then keeps the running program as `DIR/fallback`, makes `DIR/next` the current
//! one and starts it on trial: it must reach its parent within the confirmation deadline (the
//! relay marks the record `confirmed` once its uplink is subscribed there), or — if it exits
//! first or the deadline passes — the supervisor stops it, puts the fallback back and starts the
//! old program, which reports the job failed with the reason. Every step is a rename of whole
//! files and a record written whole ([`UpdateRecord`]), so a power cut at any point leaves a
//! program that runs and a record that says what to finish.

pub mod supervisor;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use protocol::artifact::ArtifactId;
use protocol::{JobId, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The environment variable through which the supervisor tells the relay where its program
/// directory is. Without it the relay refuses to replace its program (nothing would go back).
pub const PROGRAM_DIR_ENV: &str = "CHUKEI_PROGRAM_DIR";

/// The relay's exit status when it has staged a new program and wants to be restarted into it
/// (75, EX_TEMPFAIL: "try again").
pub const RESTART_INTO_NEW_PROGRAM: u8 = 75;

/// The record of the one update in hand (`DIR/update.json`), written whole (temp file, fsync,
/// rename), read at every start by both processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRecord {
    pub job: JobId,
    /// The artifact's id: the SHA-256 of the new program.
    pub artifact: ArtifactId,
    /// The artifact's version label (`artifacts upload --version`).
    pub version: String,
    /// When to restart into it (the job's execution time); `None`: at once.
    #[serde(default)]
    pub execute_at: Option<Timestamp>,
    pub state: UpdateState,
}

/// Where an update stands. Moves forward only: staged → switch → trial → confirmed → done, or
/// trial → rolled-back → done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum UpdateState {
    /// `DIR/next` holds the checked image; the relay restarts into it at `execute_at`.
    Staged,
    /// The relay exited to be restarted into `DIR/next`.
    Switch,
    /// The new program runs and has not reached its parent yet.
    Trial,
    /// The new program reached its parent: it stays.
    Confirmed,
    /// The new program failed its trial; the old one runs again.
    RolledBack { reason: String },
    /// The job's result is queued for the parent (a re-sent order gets the same answer).
    Done {
        succeeded: bool,
        #[serde(default)]
        reason: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("{action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} is not an update record this program understands ({reason}); remove it to forget the update in hand", .path.display())]
    Record { path: PathBuf, reason: String },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ProgramError + 'a {
    move |source| ProgramError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The program directory's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramDir {
    dir: PathBuf,
}

impl ProgramDir {
    pub fn new(dir: impl Into<PathBuf>) -> ProgramDir {
        ProgramDir { dir: dir.into() }
    }

    /// The directory the supervisor named, if this relay runs under one.
    pub fn from_env() -> Option<ProgramDir> {
        std::env::var_os(PROGRAM_DIR_ENV)
            .filter(|d| !d.is_empty())
            .map(ProgramDir::new)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The program the supervisor runs.
    pub fn current(&self) -> PathBuf {
        self.dir.join("current")
    }

    /// The program that ran before the last update: what a failed trial goes back to.
    pub fn fallback(&self) -> PathBuf {
        self.dir.join("fallback")
    }

    /// A downloaded and checked new program, until the supervisor switches to it.
    pub fn next(&self) -> PathBuf {
        self.dir.join("next")
    }

    /// The download in progress.
    pub fn next_part(&self) -> PathBuf {
        self.dir.join("next.part")
    }

    /// The program a failed trial left behind, kept for a look.
    pub fn rejected(&self) -> PathBuf {
        self.dir.join("rejected")
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("update.json")
    }

    /// The update in hand, if any.
    pub fn read_update(&self) -> Result<Option<UpdateRecord>, ProgramError> {
        let path = self.record_path();
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| ProgramError::Record {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("could not read", &path)(e)),
        }
    }

    /// Writes the record whole: a crash leaves the old one or the new one.
    pub fn write_update(&self, record: &UpdateRecord) -> Result<(), ProgramError> {
        let path = self.record_path();
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| ProgramError::Record {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let tmp = self.dir.join("update.json.tmp");
        let mut f = File::create(&tmp).map_err(io_error("could not create", &tmp))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io_error("could not write", &tmp))?;
        self.rename(&tmp, &path)
    }

    /// Forgets the update in hand.
    pub fn remove_update(&self) -> Result<(), ProgramError> {
        let path = self.record_path();
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("could not remove", &path)(e)),
        }
    }

    /// At the supervisor's start: creates the directory and, the first time, installs `program`
    /// (the binary the supervisor was started from) as the current program. Returns whether it
    /// installed it.
    pub fn install(&self, program: &Path) -> Result<bool, ProgramError> {
        fs::create_dir_all(&self.dir).map_err(io_error("could not create", &self.dir))?;
        self.recover()?;
        if self.current().exists() {
            return Ok(false);
        }
        let tmp = self.dir.join("current.tmp");
        fs::copy(program, &tmp).map_err(io_error("could not copy the program to", &tmp))?;
        make_executable(&tmp)?;
        self.rename(&tmp, &self.current())?;
        Ok(true)
    }

    /// Finishes a switch or a rollback a crash cut between its two renames: there is always a
    /// current program afterwards if there was one before.
    fn recover(&self) -> Result<(), ProgramError> {
        if self.current().exists() {
            return Ok(());
        }
        if self.next().exists() && self.fallback().exists() {
            self.rename(&self.next(), &self.current())
        } else if self.fallback().exists() {
            self.rename(&self.fallback(), &self.current())
        } else {
            Ok(())
        }
    }

    /// The running program becomes the fallback and the new one the current.
    pub fn switch(&self) -> Result<(), ProgramError> {
        self.rename(&self.current(), &self.fallback())?;
        self.rename(&self.next(), &self.current())
    }

    /// The program on trial is put aside (as `rejected`) and the fallback is current again.
    pub fn roll_back(&self) -> Result<(), ProgramError> {
        self.rename(&self.current(), &self.rejected())?;
        self.rename(&self.fallback(), &self.current())
    }

    /// Moves a checked download into place as `next`, executable, synced.
    pub fn stage(&self, part: &Path) -> Result<(), ProgramError> {
        make_executable(part)?;
        self.rename(part, &self.next())
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), ProgramError> {
        fs::rename(from, to).map_err(io_error("could not rename into place", to))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), ProgramError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("could not sync", &self.dir))
    }
}

fn make_executable(path: &Path) -> Result<(), ProgramError> {
    use std::os::unix::fs::PermissionsExt;
    let f = File::open(path).map_err(io_error("could not open", path))?;
    f.set_permissions(fs::Permissions::from_mode(0o755))
        .and_then(|()| f.sync_all())
        .map_err(io_error("could not make executable", path))
}

/// The SHA-256 of a file: what a program is known by (an artifact's id is its digest).
pub fn sha256_file(path: &Path) -> Result<ArtifactId, ProgramError> {
    let mut f = File::open(path).map_err(io_error("could not open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io_error("could not read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(ArtifactId::from_digest(&hasher.finalize().into()))
}

/// How often a supervised relay looks whether its supervisor is still there.
const ORPHAN_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Stops a supervised relay once the supervisor that started it is gone. A supervisor that
/// stops tells its relay itself; one that is killed cannot, and its relay would keep the port,
/// so the service manager's next supervisor could not start one. Watching the parent process id
/// needs no signal set up before `exec`.
pub async fn stop_when_orphaned(stop: tokio_util::sync::CancellationToken) {
    let supervisor = std::os::unix::process::parent_id();
    let mut every = tokio::time::interval(ORPHAN_CHECK);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        if std::os::unix::process::parent_id() != supervisor {
            tracing::warn!(
                supervisor,
                "the supervisor that started this relay is gone; stopping"
            );
            stop.cancel();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: UpdateState) -> UpdateRecord {
        UpdateRecord {
            job: JobId::parse("J-000007").unwrap(),
            artifact: ArtifactId::from_digest(&[7; 32]),
            version: "relay-0.3.0".into(),
            execute_at: None,
            state,
        }
    }

    fn program(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_first_start_installs_the_program_and_later_ones_keep_the_current() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ProgramDir::new(tmp.path().join("program"));
        let old = program(tmp.path(), "old", "old");
        assert!(dir.install(&old).unwrap());
        assert_eq!(fs::read_to_string(dir.current()).unwrap(), "old");
        let other = program(tmp.path(), "other", "other");
        assert!(!dir.install(&other).unwrap(), "an installed program stays");
        assert_eq!(fs::read_to_string(dir.current()).unwrap(), "old");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.current()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn switch_keeps_the_old_program_as_fallback_and_roll_back_restores_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ProgramDir::new(tmp.path());
        dir.install(&program(tmp.path(), "old", "old")).unwrap();
        let part = program(tmp.path(), "next.part", "new");
        dir.stage(&part).unwrap();
        dir.switch().unwrap();
        assert_eq!(fs::read_to_string(dir.current()).unwrap(), "new");
        assert_eq!(fs::read_to_string(dir.fallback()).unwrap(), "old");
        dir.roll_back().unwrap();
        assert_eq!(fs::read_to_string(dir.current()).unwrap(), "old");
        assert_eq!(fs::read_to_string(dir.rejected()).unwrap(), "new");
        assert!(!dir.fallback().exists());
    }

    #[test]
    fn a_switch_cut_between_its_renames_is_finished_at_the_next_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ProgramDir::new(tmp.path());
        // current was renamed to fallback; the crash came before next became current.
        program(tmp.path(), "fallback", "old");
        program(tmp.path(), "next", "new");
        dir.install(&program(tmp.path(), "installed", "installed"))
            .unwrap();
        assert_eq!(fs::read_to_string(dir.current()).unwrap(), "new");
        // A rollback cut the same way: only the fallback is left.
        let tmp = tempfile::tempdir().unwrap();
        let dir = ProgramDir::new(tmp.path());
        program(tmp.path(), "fallback", "old");
        program(tmp.path(), "rejected", "new");
        dir.install(&program(tmp.path(), "installed", "installed"))
            .unwrap();
        assert_eq!(fs::read_to_string(dir.current()).unwrap(), "old");
    }

    #[test]
    fn the_record_is_written_whole_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ProgramDir::new(tmp.path());
        assert_eq!(dir.read_update().unwrap(), None);
        for state in [
            UpdateState::Staged,
            UpdateState::Trial,
            UpdateState::RolledBack {
                reason: "exited".into(),
            },
            UpdateState::Done {
                succeeded: false,
                reason: Some("exited".into()),
            },
        ] {
            dir.write_update(&record(state.clone())).unwrap();
            assert_eq!(dir.read_update().unwrap(), Some(record(state)));
        }
        dir.remove_update().unwrap();
        assert_eq!(dir.read_update().unwrap(), None);
        fs::write(dir.record_path(), b"{ not json").unwrap();
        let err = dir.read_update().unwrap_err().to_string();
        assert!(err.contains("remove it"), "{err}");
    }

    #[test]
    fn a_program_is_known_by_its_sha256() {
        let tmp = tempfile::tempdir().unwrap();
        let path = program(tmp.path(), "p", "abc");
        assert_eq!(
            sha256_file(&path).unwrap().as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
