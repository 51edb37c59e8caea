//! A real browser for the dashboard tests: Debian's headless Chromium, driven over the Chrome
//! DevTools protocol (a WebSocket) so a test can look at the *open* page — evaluate script in
//! it, wait for an element to appear without a reload, take a screenshot.
//!
//! Chromium is found on `PATH` (`chromium`, `chromium-browser`) or at `CHUKEI_CHROMIUM`. A
//! missing Chromium is a failure with instructions, never a silent skip: `scripts/test`
//! installs it, so a missing one means the test machine is not set up.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{TestEnv, deadline, poll_until};

/// The Chromium binary, or a panic that says how to get one.
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHUKEI_CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "Chromium not found on PATH: the dashboard's browser test needs it. Install Debian's \
         package (`apt-get install chromium`; scripts/test does this), or point CHUKEI_CHROMIUM \
         at a Chromium binary"
    );
}

/// Where screenshots and other test artifacts go: `<target>/test-artifacts/`.
pub fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("could not create {}: {e}", dir.display()));
    dir
}

impl Drop for Browser {
    /// Chromium's helper processes outlive a killed browser and go on writing to the profile, which
    /// then survives its `TempDir`: the whole process group is killed, and the browser reaped,
    /// before the profile is removed (fields drop after this).
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let group = format!("-{pid}");
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &group])
                .status();
        }
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < end {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Ok(Some(_)) | Err(_) => break,
            }
        }
    }
}

/// One headless Chromium with one page open, and a DevTools session on that page.
pub struct Browser {
    child: tokio::process::Child,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium on `url` at 1366x768 and attaches to the page. Its output goes to
    /// `<test dir>/chromium.log`.
    pub async fn open(env: &TestEnv, url: &str) -> Browser {
        let bin = chromium();
        let profile = tempfile::Builder::new()
            .prefix("chukei-chromium-")
            .tempdir()
            .unwrap_or_else(|e| panic!("could not create a Chromium profile directory: {e}"));
        let log = std::fs::File::create(env.path("chromium.log"))
            .unwrap_or_else(|e| panic!("could not create chromium.log: {e}"));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("could not share chromium.log: {e}"));
        let child = tokio::process::Command::new(&bin)
            .args([
                "--headless",
                // Root in a container has no user namespace for the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                "--window-size=1366,768",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            // Its own process group, so that dropping the browser ends its helpers too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", bin.display()));

        // Chromium writes the port it bound (and the browser's path) to DevToolsActivePort.
        let port_file = profile.path().join("DevToolsActivePort");
        let port: u16 = poll_until("Chromium's DevToolsActivePort", deadline(), || async {
            let text = std::fs::read_to_string(&port_file).map_err(|e| e.to_string())?;
            text.lines()
                .next()
                .and_then(|l| l.trim().parse().ok())
                .ok_or_else(|| format!("no port yet in {text:?}"))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; see {}", env.path("chromium.log").display()));

        // The page's own DevTools endpoint, from the target list.
        let list = format!("http://127.0.0.1:{port}/json/list");
        let ws_url: String = poll_until(
            "the dashboard page in Chromium's targets",
            deadline(),
            || async {
                let text = reqwest::get(&list)
                    .await
                    .map_err(|e| e.to_string())?
                    .text()
                    .await
                    .map_err(|e| e.to_string())?;
                let targets: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                targets
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
                    .ok_or_else(|| format!("targets: {targets}"))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .unwrap_or_else(|e| panic!("could not open the DevTools WebSocket {ws_url}: {e}"));
        let mut browser = Browser {
            child,
            ws,
            next_id: 0,
            _profile: profile,
        };
        // The first page may still be about:blank: wait for ours, loaded.
        let loaded = format!(
            "location.href.startsWith({}) && document.readyState === 'complete'",
            json!(url)
        );
        browser
            .wait_for("the page to load", &loaded, deadline())
            .await;
        browser
    }

    /// Sends one DevTools command and returns its `result`; events in between are skipped.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .await
            .unwrap_or_else(|e| panic!("DevTools {method} failed: {e}"))
    }

    /// Like [`Browser::call`], with the protocol's error (e.g. "execution context was
    /// destroyed" while the page navigates) returned rather than a panic. A lost connection or
    /// no answer at all still panics: the browser is gone.
    pub async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .unwrap_or_else(|e| panic!("DevTools {method}: could not send: {e}"));
        let answer = tokio::time::timeout(deadline(), async {
            while let Some(frame) = self.ws.next().await {
                let frame = frame.unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
                let Message::Text(text) = frame else { continue };
                let v: Value = serde_json::from_str(text.as_str())
                    .unwrap_or_else(|e| panic!("DevTools sent bad JSON ({e}): {text}"));
                if v["id"] == json!(id) {
                    return v;
                }
            }
            panic!("DevTools closed the connection during {method}");
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools did not answer {method} within {:?}", deadline()));
        match answer.get("error") {
            Some(err) => Err(err.to_string()),
            None => Ok(answer["result"].clone()),
        }
    }

    /// Evaluates `expr` in the open page and returns its value (JSON); panics if it throws.
    pub async fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr)
            .await
            .unwrap_or_else(|e| panic!("script {expr:?}: {e}"))
    }

    /// Evaluates `expr`; `Err` if it threw or the page could not run it (navigating).
    pub async fn try_eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self
            .try_call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            return Err(format!("threw {ex}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expr` in the page until it is truthy (neither false, null, 0 nor ""), under a
    /// deadline; returns the value. A script error (the page is between two documents, say)
    /// counts as "not yet". This never reloads the page itself.
    pub async fn wait_for(&mut self, what: &str, expr: &str, within: Duration) -> Value {
        let start = std::time::Instant::now();
        loop {
            let v = self.try_eval(expr).await;
            if let Ok(v) = &v
                && !matches!(v, Value::Null | Value::Bool(false))
                && *v != json!(0)
                && *v != json!("")
            {
                return v.clone();
            }
            assert!(
                start.elapsed() < within,
                "{what}: `{expr}` still {v:?} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the page as `<target>/test-artifacts/NAME.png`, prints and returns its path.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let data = r["data"]
            .as_str()
            .unwrap_or_else(|| panic!("Page.captureScreenshot returned no data: {r}"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap_or_else(|e| panic!("the screenshot is not base64: {e}"));
        let path = artifacts_dir().join(format!("{name}.png"));
        std::fs::write(&path, png)
            .unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
        eprintln!("screenshot saved: {}", path.display());
        path
    }
}
