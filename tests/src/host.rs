//! Driving the real `host-agent` CLI, as a service desk would.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{CertPaths, TestEnv, bin, deadline, poll_until};

/// The statuses a job ends in.
pub const ENDS: [&str; 5] = ["succeeded", "failed", "rejected", "canceled", "timed-out"];

/// `host-agent --broker URL --ca --cert --key …` as one host.
pub struct Host {
    id: String,
    url: String,
    certs: CertPaths,
    cwd: PathBuf,
    netns: Option<String>,
    /// More connection flags for every run, e.g. `--proxy URL`.
    extra: Vec<String>,
}

/// The two halves of a publisher key pair made by `host-agent keys generate`.
#[derive(Debug, Clone)]
pub struct PublisherKeys {
    /// `publisher.key`: signs uploads (`artifacts upload --signing-key`).
    pub secret: PathBuf,
    /// `publisher.pub`: what devices are provisioned with (`device-agent --publisher-key`).
    pub public: PathBuf,
}

/// What one `host-agent` run printed.
pub struct RunOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl fmt::Display for RunOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "command: {}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

impl Host {
    pub(crate) fn new(
        env: &TestEnv,
        id: &str,
        certs: CertPaths,
        url: String,
        netns: Option<String>,
    ) -> Host {
        Host {
            id: id.to_owned(),
            url,
            certs,
            cwd: env.root().to_owned(),
            netns,
            extra: Vec::new(),
        }
    }

    /// Passes `args` (connection flags such as `--proxy URL`) on every run.
    pub fn with_args(mut self, args: &[&str]) -> Host {
        self.extra.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs `host-agent` with the connection flags and then `args`; never panics on the exit
    /// status (a test of a rejection wants the failure), only if it hangs past the deadline.
    pub async fn run<I, S>(&self, args: I) -> RunOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = crate::netns::command_in(self.netns.as_deref(), &bin("host-agent"));
        cmd.current_dir(&self.cwd)
            .env("NO_COLOR", "1")
            .arg("--broker")
            .arg(&self.url)
            .arg("--ca")
            .arg(&self.certs.ca)
            .arg("--cert")
            .arg(&self.certs.cert)
            .arg("--key")
            .arg(&self.certs.key)
            .args(&self.extra)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let command = format!("{:?}", cmd.as_std());
        let out = match tokio::time::timeout(deadline(), cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("could not run {command}: {e}"),
            Err(_) => panic!("{command} did not finish within {:?}", deadline()),
        };
        RunOutput {
            command,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts `host-agent` with the connection flags and then `args` as a process the test
    /// controls (to kill it mid-upload, say); its output goes to `<root>/<name>.log`.
    pub fn spawn<I, S>(&self, name: &str, args: I) -> crate::Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = crate::netns::command_in(self.netns.as_deref(), &bin("host-agent"));
        cmd.current_dir(&self.cwd)
            .arg("--broker")
            .arg(&self.url)
            .arg("--ca")
            .arg(&self.certs.ca)
            .arg("--cert")
            .arg(&self.certs.cert)
            .arg("--key")
            .arg(&self.certs.key)
            .args(&self.extra)
            .args(args);
        crate::Proc::spawn(name.to_owned(), cmd, self.cwd.join(format!("{name}.log")))
    }

    /// Runs `args`, panics unless it succeeds; returns stdout.
    pub async fn run_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.run(args).await;
        assert!(out.success(), "host-agent failed\n{out}");
        out.stdout
    }

    /// `jobs submit ARGS…`: returns the job id, which is all the command prints.
    pub async fn submit(&self, args: &[&str]) -> String {
        let mut full = vec!["jobs", "submit"];
        full.extend_from_slice(args);
        let out = self.run(&full).await;
        assert!(out.success(), "submission was refused\n{out}");
        let id = out.stdout.trim();
        assert!(
            !id.is_empty() && !id.contains(char::is_whitespace),
            "`jobs submit` must print the job id alone\n{out}"
        );
        id.to_owned()
    }

    /// `jobs submit --serial SERIAL --kind get-data`: returns the job id.
    pub async fn submit_get_data(&self, serial: &str) -> String {
        self.submit(&["--serial", serial, "--kind", "get-data"])
            .await
    }

    /// `jobs submit --serial SERIAL --kind get-data --sections SECTIONS`, waited for until it
    /// succeeds: returns the job's `data` (what the device read).
    pub async fn get_data(&self, serial: &str, sections: &str) -> Value {
        let job = self
            .submit(&[
                "--serial",
                serial,
                "--kind",
                "get-data",
                "--sections",
                sections,
            ])
            .await;
        let detail = self.wait_for_status(&job, "succeeded", deadline()).await;
        detail["data"].clone()
    }

    /// `keys generate --out DIR` (no relay needed; the connection flags are ignored): returns
    /// the paths of the pair, after checking that both exist.
    pub async fn keys_generate(&self, dir: &Path) -> PublisherKeys {
        let out = self
            .run([
                OsStr::new("keys"),
                OsStr::new("generate"),
                OsStr::new("--out"),
                dir.as_os_str(),
            ])
            .await;
        assert!(out.success(), "`keys generate` failed\n{out}");
        let keys = PublisherKeys {
            secret: dir.join("publisher.key"),
            public: dir.join("publisher.pub"),
        };
        for path in [&keys.secret, &keys.public] {
            assert!(
                path.is_file(),
                "`keys generate --out {}` did not write {}\n{out}",
                dir.display(),
                path.display()
            );
        }
        keys
    }

    /// `artifacts upload FILE --version V --signing-key KEY`: returns the artifact id (64 hex
    /// digits), which is all the command prints on stdout.
    pub async fn upload(&self, file: &Path, version: &str, signing_key: &Path) -> String {
        let out = self
            .run([
                OsStr::new("artifacts"),
                OsStr::new("upload"),
                file.as_os_str(),
                OsStr::new("--version"),
                OsStr::new(version),
                OsStr::new("--signing-key"),
                signing_key.as_os_str(),
            ])
            .await;
        assert!(out.success(), "`artifacts upload` failed\n{out}");
        let id = out.stdout.trim();
        assert!(
            id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "`artifacts upload` must print the artifact id (64 hex digits) alone\n{out}"
        );
        id.to_owned()
    }

    /// `artifacts list --json`, parsed.
    pub async fn artifacts_json(&self) -> Vec<Value> {
        let out = self.run(["artifacts", "list", "--json"]).await;
        assert!(out.success(), "`artifacts list --json` failed\n{out}");
        match serde_json::from_str::<Value>(&out.stdout) {
            Ok(Value::Array(a)) => a,
            Ok(other) => panic!("`artifacts list --json` must print an array, got {other}"),
            Err(e) => panic!("`artifacts list --json` did not print JSON: {e}\n{out}"),
        }
    }

    /// `jobs cancel ID`; the caller judges the outcome (a refusal exits 1 with the reason).
    pub async fn cancel(&self, id: &str) -> RunOutput {
        self.run(["jobs", "cancel", id]).await
    }

    /// Polls `jobs show ID --json` until the job has ended, whichever way; returns the detail.
    pub async fn wait_for_end(&self, id: &str, within: Duration) -> Value {
        let what = format!("job {id} ended");
        poll_until(&what, within, || async {
            let detail = self.show_json(id).await;
            match detail.get("status").and_then(Value::as_str) {
                Some(s) if ENDS.contains(&s) => Ok(detail),
                _ => Err(detail.to_string()),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `jobs show ID --json`, parsed.
    pub async fn show_json(&self, id: &str) -> Value {
        let out = self.run(["jobs", "show", id, "--json"]).await;
        assert!(out.success(), "`jobs show {id} --json` failed\n{out}");
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("`jobs show --json` did not print JSON: {e}\n{out}"))
    }

    /// `devices list --json`, polled until the relay knows at least `n` devices (they appear
    /// once they have connected and announced themselves).
    pub async fn wait_for_devices(&self, n: usize) -> Vec<Value> {
        poll_until(&format!("{n} devices listed"), deadline(), || async {
            let out = self.run(["devices", "list", "--json"]).await;
            let list: Vec<Value> = serde_json::from_str(&out.stdout)
                .map_err(|e| format!("`devices list --json` did not print JSON ({e}): {out}"))?;
            if list.len() >= n {
                Ok(list)
            } else {
                Err(format!("{} devices", list.len()))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `jobs list --json [--all]`, parsed: one object per job.
    pub async fn list_json(&self, all: bool) -> Vec<Value> {
        self.try_list_json(all)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Host::list_json`], with a refusal (a relay whose store is away) as an error to wait out.
    pub async fn try_list_json(&self, all: bool) -> Result<Vec<Value>, String> {
        let mut args = vec!["jobs", "list", "--json"];
        if all {
            args.push("--all");
        }
        let out = self.run(&args).await;
        if !out.success() {
            return Err(format!("`jobs list` failed\n{out}"));
        }
        match serde_json::from_str::<Value>(&out.stdout) {
            Ok(Value::Array(jobs)) => Ok(jobs),
            Ok(other) => panic!("`jobs list --json` must print an array of jobs, got {other}"),
            Err(e) => panic!("`jobs list --json` did not print JSON: {e}\n{out}"),
        }
    }

    /// Polls `jobs show ID --json` until the job's status is `status`; returns the last detail.
    /// Fails early if the job reaches a different end state.
    pub async fn wait_for_status(&self, id: &str, status: &str, within: Duration) -> Value {
        let what = format!("job {id} with status {status:?}");
        let result = poll_until(&what, within, || async {
            let out = self.run(["jobs", "show", id, "--json"]).await;
            if !out.success() {
                return Err(format!("`jobs show` failed: {}", out.stderr.trim()));
            }
            let detail: Value = serde_json::from_str(&out.stdout)
                .map_err(|e| format!("not JSON ({e}): {}", out.stdout))?;
            match detail.get("status").and_then(Value::as_str) {
                Some(s) if s == status => Ok(Ok(detail)),
                Some(s) if ENDS.contains(&s) => Ok(Err(detail)),
                _ => Err(detail.to_string()),
            }
        })
        .await;
        match result {
            Ok(Ok(detail)) => detail,
            Ok(Err(detail)) => panic!("{what}: the job ended otherwise:\n{detail:#}"),
            Err(e) => panic!("{e}"),
        }
    }
}
