//! `broker supervise`: runs a relay program from the program directory, restarts it into a new
//! program it staged, and puts the old one back when the new one fails its trial.
//!
//! The supervisor is deliberately small and does not change: it is the binary that was
//! installed, and only the program it runs is replaced. Signals it gets (TERM, INT, HUP) go to
//! the relay; when the relay stops for any other reason than a restart into a new program, the
//! supervisor exits with the relay's status, and the service manager restarts the pair.

use std::ffi::OsString;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use super::{PROGRAM_DIR_ENV, ProgramDir, ProgramError, RESTART_INTO_NEW_PROGRAM, UpdateState};

/// How the supervisor runs.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    pub dir: ProgramDir,
    /// Installed as the current program at the first start (the supervisor's own executable).
    pub install_from: std::path::PathBuf,
    /// What follows `run` on the relay's command line.
    pub run_args: Vec<OsString>,
    /// A new program must reach its parent within this, or the old one comes back.
    pub confirm_within: Duration,
}

/// How often the supervisor looks at the record while a new program is on trial.
const TRIAL_POLL: Duration = Duration::from_millis(200);
/// A pause before starting a program again that asked for a restart with nothing staged.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Why [`wait`] returned.
enum Ended {
    /// The program exited by itself.
    Exited(ExitStatus),
    /// The supervisor was told to stop; the program was told too and has exited.
    Stopped(ExitStatus),
    /// The trial's deadline passed; the program was killed.
    TrialExpired,
}

/// Runs until the relay stops for good; returns its exit status as the supervisor's.
pub async fn supervise(settings: SupervisorSettings) -> Result<u8, ProgramError> {
    let dir = &settings.dir;
    if dir.install(&settings.install_from)? {
        info!(program = %dir.current().display(), from = %settings.install_from.display(), "installed the relay program");
    }
    let mut signals = Signals::new().map_err(|source| ProgramError::Io {
        action: "could not listen for signals in",
        path: dir.path().to_owned(),
        source,
    })?;
    // A supervisor restarted while a new program was on trial tries it again from the start.
    let mut on_trial = matches!(dir.read_update()?, Some(r) if r.state == UpdateState::Trial);
    loop {
        let mut child = start(&settings)?;
        let pid = child.id();
        info!(pid, on_trial, program = %dir.current().display(), "relay program started");
        let deadline = on_trial.then(|| tokio::time::Instant::now() + settings.confirm_within);
        match wait(&mut child, dir, deadline, &mut signals).await {
            Ended::Stopped(status) => return Ok(exit_code(status)),
            Ended::Exited(status) if status.code() == Some(RESTART_INTO_NEW_PROGRAM.into()) => {
                on_trial = switch_to_next(dir).await?;
            }
            Ended::Exited(status) if on_trial && !confirmed(dir)? => {
                let reason =
                    format!("the new program exited ({status}) before it reached its parent relay");
                roll_back(dir, &reason)?;
                on_trial = false;
            }
            Ended::Exited(status) => {
                info!(%status, "relay program exited; the supervisor exits with it");
                return Ok(exit_code(status));
            }
            Ended::TrialExpired if confirmed(dir)? => on_trial = false,
            Ended::TrialExpired => {
                let reason = format!(
                    "the new program did not reach its parent relay within {} s",
                    settings.confirm_within.as_secs()
                );
                roll_back(dir, &reason)?;
                on_trial = false;
            }
        }
    }
}

fn start(settings: &SupervisorSettings) -> Result<Child, ProgramError> {
    let program = settings.dir.current();
    Command::new(&program)
        .arg("run")
        .args(&settings.run_args)
        .env(PROGRAM_DIR_ENV, settings.dir.path())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProgramError::Io {
            action: "could not start",
            path: program,
            source,
        })
}

/// Waits for the program to end, passing signals on and watching a trial's deadline.
async fn wait(
    child: &mut Child,
    dir: &ProgramDir,
    mut deadline: Option<tokio::time::Instant>,
    signals: &mut Signals,
) -> Ended {
    let mut poll = tokio::time::interval(TRIAL_POLL);
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(s) => Ended::Exited(s),
                    Err(e) => {
                        error!(error = %e, "lost track of the relay program");
                        Ended::Stopped(ExitStatus::default())
                    }
                };
            }
            sig = signals.next() => {
                pass_on(child, sig);
                if sig != rustix::process::Signal::HUP {
                    let status = child.wait().await.unwrap_or_default();
                    return Ended::Stopped(status);
                }
            }
            _ = poll.tick(), if deadline.is_some() => {
                if confirmed(dir).unwrap_or(false) {
                    info!("the new relay program reached its parent: it stays");
                    deadline = None;
                } else if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    // Killed before the record is read again: a confirmation can no longer race
                    // with the decision.
                    let _ = child.kill().await;
                    return Ended::TrialExpired;
                }
            }
        }
    }
}

/// Whether the program on trial has confirmed itself (or already finished its report).
fn confirmed(dir: &ProgramDir) -> Result<bool, ProgramError> {
    Ok(matches!(
        dir.read_update()?.map(|r| r.state),
        Some(
            UpdateState::Confirmed
                | UpdateState::Done {
                    succeeded: true,
                    ..
                }
        )
    ))
}

/// The relay exited to be restarted into its staged program: switch and start it on trial.
/// Returns whether a trial began.
async fn switch_to_next(dir: &ProgramDir) -> Result<bool, ProgramError> {
    match dir.read_update()? {
        Some(mut record) if record.state == UpdateState::Switch && dir.next().exists() => {
            dir.switch()?;
            record.state = UpdateState::Trial;
            dir.write_update(&record)?;
            info!(job = %record.job, version = %record.version, "restarting into the new relay program; the old one is kept as the fallback");
            Ok(true)
        }
        _ => {
            warn!(
                "the relay asked to be restarted into a new program but none is staged; starting the current one again"
            );
            tokio::time::sleep(RESTART_PAUSE).await;
            Ok(false)
        }
    }
}

fn roll_back(dir: &ProgramDir, reason: &str) -> Result<(), ProgramError> {
    dir.roll_back()?;
    if let Some(mut record) = dir.read_update()? {
        warn!(job = %record.job, version = %record.version, reason, "the new relay program failed its trial; back to the old one");
        record.state = UpdateState::RolledBack {
            reason: reason.to_owned(),
        };
        dir.write_update(&record)?;
    }
    Ok(())
}

fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        _ => 1,
    }
}

fn pass_on(child: &Child, sig: rustix::process::Signal) {
    let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    else {
        return;
    };
    if let Err(e) = rustix::process::kill_process(pid, sig) {
        warn!(error = %e, "could not pass a signal on to the relay program");
    }
}

/// The signals the supervisor passes on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> rustix::process::Signal {
        use rustix::process::Signal;
        tokio::select! {
            _ = self.term.recv() => Signal::TERM,
            _ = self.int.recv() => Signal::INT,
            _ = self.hup.recv() => Signal::HUP,
        }
    }
}
