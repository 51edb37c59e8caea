//! A running child process whose output is a log the test can wait on.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::{deadline, poll_until};

/// How many lines of a child's log a failure shows.
const TAIL_LINES: usize = 40;

/// Every live child prints its log's tail when a test panics (see `Drop`), so panic messages
/// point there rather than repeat it.
pub(crate) const SEE_BELOW: &str = "\n(the tail of each process's log follows)";

/// What a child has printed so far. Kept in a `watch` channel so that a waiter wakes on each new
/// line rather than polling.
#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// How many of the two output streams have reached end of file: 2 means the process is gone
    /// (or closed both), so a line not yet seen never will be.
    closed: u8,
}

/// A child process started by the harness: killed when dropped, its stdout and stderr captured.
pub struct Proc {
    name: String,
    child: Child,
    log: Arc<watch::Sender<LogState>>,
    log_path: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with its output captured to `log_path` and to memory.
    pub fn spawn(name: String, mut cmd: Command, log_path: PathBuf) -> Proc {
        // Colour codes would split `field=value` in tracing's output; the pump strips them too.
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The binaries' default filters are part of what we test ("acl violation" must be logged
        // by default); an inherited RUST_LOG would change them, one the test sets is meant.
        // CHUKEI_TEST_LOG overrides both on purpose.
        let set_by_test = cmd.as_std().get_envs().any(|(k, _)| k == "RUST_LOG");
        match std::env::var_os("CHUKEI_TEST_LOG") {
            Some(filter) => {
                cmd.env("RUST_LOG", filter);
            }
            None if !set_by_test => {
                cmd.env_remove("RUST_LOG");
            }
            None => {}
        }
        let shown = format!("{:?}", cmd.as_std());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name}: {shown}: {e}"));
        let file = File::create(&log_path)
            .unwrap_or_else(|e| panic!("could not create {}: {e}", log_path.display()));
        let file = Arc::new(Mutex::new(file));
        let log = Arc::new(watch::Sender::new(LogState::default()));
        log.send_modify(|s| s.lines.push(format!("[harness] started: {shown}")));
        // Both are Some: we asked for pipes just above.
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        pump(stdout, log.clone(), file.clone());
        pump(stderr, log.clone(), file);
        Proc {
            name,
            child,
            log,
            log_path,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The file the log is also written to.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process printed so far, one line per line.
    pub fn log(&self) -> String {
        self.log.borrow().lines.join("\n")
    }

    /// The lines printed so far that satisfy `pred`.
    pub fn lines_matching(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.log
            .borrow()
            .lines
            .iter()
            .filter(|l| pred(l))
            .cloned()
            .collect()
    }

    /// The last lines of the log, headed by the process's name, for failure messages.
    pub fn tail(&self) -> String {
        let state = self.log.borrow();
        let start = state.lines.len().saturating_sub(TAIL_LINES);
        let mut out = format!(
            "--- last {} lines of {} (full log: {})\n",
            state.lines.len() - start,
            self.name,
            self.log_path.display()
        );
        for line in &state.lines[start..] {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// Waits for a log line containing `needle`; returns it.
    pub async fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        self.wait_for_line(&format!("a line containing {needle:?}"), within, |l| {
            l.contains(needle)
        })
        .await
    }

    /// Waits for a log line satisfying `pred`; returns it. `what` describes it for the failure
    /// message. Fails at once if the process has exited without printing it.
    pub async fn wait_for_line(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let mut lines = self.wait_for_lines(what, 1, within, pred).await;
        lines.swap_remove(0)
    }

    /// Waits until at least `count` log lines satisfy `pred` (counting lines already printed);
    /// returns them all.
    pub async fn wait_for_lines(
        &self,
        what: &str,
        count: usize,
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut rx = self.log.subscribe();
        let mut matched = Vec::new();
        let mut seen = 0;
        let found = tokio::time::timeout(within, async {
            loop {
                {
                    let state = rx.borrow_and_update();
                    matched.extend(state.lines[seen..].iter().filter(|l| pred(l)).cloned());
                    seen = state.lines.len();
                    if matched.len() >= count.max(1) {
                        return Ok(());
                    }
                    if state.closed == 2 {
                        return Err("the process closed its output (it has exited)");
                    }
                }
                if rx.changed().await.is_err() {
                    return Err("the log was dropped");
                }
            }
        })
        .await;
        let got = matched.len();
        match found {
            Ok(Ok(())) => matched,
            Ok(Err(why)) => panic!(
                "{} never logged {what} ({got} of {count} seen): {why}{SEE_BELOW}",
                self.name
            ),
            Err(_) => panic!(
                "{} did not log {what} within {within:?} ({got} of {count} seen){SEE_BELOW}",
                self.name
            ),
        }
    }

    /// Has the process exited? Never blocks.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL, then waits for the process to be gone: a crash, as far as the process can tell.
    pub async fn kill9(&mut self) {
        // tokio's start_kill sends SIGKILL on Unix.
        if let Err(e) = self.child.start_kill() {
            // Already exited: that is fine for a kill, but worth a line in the log.
            self.note(&format!("SIGKILL not sent: {e}"));
        }
        match tokio::time::timeout(deadline(), self.child.wait()).await {
            Ok(Ok(status)) => self.note(&format!("killed with SIGKILL: {status}")),
            Ok(Err(e)) => panic!("waiting for {} after SIGKILL failed: {e}", self.name),
            Err(_) => panic!("{} still running {:?} after SIGKILL", self.name, deadline()),
        }
    }

    /// Sends `signal` (a name `kill` knows, e.g. `USR1`) and returns at once.
    pub fn signal(&self, signal: &str) {
        let Some(pid) = self.child.id() else {
            panic!("{} has exited; cannot send SIG{signal}", self.name)
        };
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("could not run `kill -{signal} {pid}`: {e}"));
        assert!(
            sent.success(),
            "`kill -{signal} {pid}` failed for {}",
            self.name
        );
        self.note(&format!("sent SIG{signal}"));
    }

    /// SIGTERM, then waits for a clean exit under the default deadline; returns the exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        if let Some(pid) = self.child.id() {
            let sent = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .unwrap_or_else(|e| panic!("could not run `kill -TERM {pid}`: {e}"));
            assert!(
                sent.success(),
                "`kill -TERM {pid}` failed for {}",
                self.name
            );
        }
        match tokio::time::timeout(deadline(), self.child.wait()).await {
            Ok(Ok(status)) => {
                self.note(&format!("stopped with SIGTERM: {status}"));
                status
            }
            Ok(Err(e)) => panic!("waiting for {} after SIGTERM failed: {e}", self.name),
            Err(_) => panic!(
                "{} did not exit within {:?} of SIGTERM{SEE_BELOW}",
                self.name,
                deadline()
            ),
        }
    }

    /// Waits for `path` to exist and hold something, failing early if the process exits first.
    /// Returns the file's contents.
    pub(crate) async fn wait_for_ready_file(&mut self, path: &Path, within: Duration) -> String {
        let name = self.name.clone();
        let what = format!("{name}'s ready file {}", path.display());
        let result = poll_until(&what, within, || {
            let exited = self.try_exit();
            let contents = std::fs::read_to_string(path)
                .ok()
                .filter(|t| !t.trim().is_empty());
            async move {
                match (contents, exited) {
                    (Some(text), _) => Ok(Ok(text)),
                    (None, Some(status)) => Ok(Err(status)),
                    (None, None) => Err("no file yet".to_owned()),
                }
            }
        })
        .await;
        match result {
            Ok(Ok(text)) => text,
            Ok(Err(status)) => {
                self.drained().await;
                panic!(
                    "{name} exited ({status}) before writing its ready file {}{SEE_BELOW}",
                    path.display()
                )
            }
            Err(e) => panic!("{e}{SEE_BELOW}"),
        }
    }

    /// Waits (briefly) until both output streams are closed, so that the tail of an exited
    /// process's log is complete before it is shown.
    async fn drained(&self) {
        let mut rx = self.log.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| s.closed == 2)).await;
    }

    /// Adds a line of the harness's own to the log, so the log reads as a timeline.
    fn note(&self, text: &str) {
        self.log
            .send_modify(|s| s.lines.push(format!("[harness] {text}")));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.tail());
        }
    }
}

/// Copies one output stream of a child into the log, line by line, until it closes.
fn pump(
    stream: impl AsyncRead + Unpin + Send + 'static,
    log: Arc<watch::Sender<LogState>>,
    file: Arc<Mutex<File>>,
) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end());
                    if let Ok(mut f) = file.lock() {
                        // Losing the file copy must not fail the test: memory has the line.
                        let _ = writeln!(f, "{line}");
                    }
                    log.send_modify(|s| s.lines.push(line));
                }
            }
        }
        log.send_modify(|s| s.closed += 1);
    });
}

/// Removes ANSI escape sequences (`ESC [ … letter`), in case a binary colours its output anyway.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn ansi_codes_are_stripped() {
        let cases = [
            ("plain", "plain"),
            (
                "\u{1b}[3mstatus\u{1b}[0m\u{1b}[2m=\u{1b}[0msucceeded",
                "status=succeeded",
            ),
            ("\u{1b}[32m INFO\u{1b}[0m job", " INFO job"),
        ];
        for (input, want) in cases {
            assert_eq!(strip_ansi(input), want, "{input:?}");
        }
    }
}
