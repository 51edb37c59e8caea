//! Faults and emergencies on the device (the seed's Fig. 5).
//!
//! A fault is detected (S301) — by the simulated copier at configurable rates, by an operator or a
//! test through [`inject`] / [`spool`], or by a real machine's own software through the same spool
//! (`device-agent fault`) — and judged (S303):
//!
//! - **transient** (a paper jam): counted in the device's JAM/SC data; nothing is reported (S304).
//!   A `fault:CODE` check-in condition of a periodic schedule still fires (claim 15).
//! - **fatal** (a motor failure): the agent holds back every other job (S305), sends an
//!   [`AlarmReport`] `raised` with the fault at once through the durable outbox (S306) — ahead of
//!   anything else waiting there — which resends it until the relay acknowledges it (S307–S308),
//!   then sends `in-progress` (S309) and lets jobs run again (S311). Clearing the fault sends
//!   `cleared`.
//!
//! Which codes are fatal is configuration (`[faults] fatal = ["SC-541", …]`); a request may also
//! say so itself (`fatal CODE` / `transient CODE`), which is how an exec-hook machine that judges
//! its own faults reports them.
//!
//! **Injecting a fault.** In the same process (the fleet simulator, `broker demo`):
//! [`inject`]`(&serial, FaultRequest::raise("SC-541"))`. Into a running `device-agent run`:
//! `device-agent fault --data-dir DIR raise SC-541`, which drops a one-line request file into
//! `DIR/faults/` ([`spool`]); the agent picks it up within `[faults] poll_ms` (250 ms), or at once
//! on SIGUSR2. The line is one of:
//!
//! ```text
//! raise CODE [DETAIL…]       fatal if CODE is in [faults] fatal, else transient
//! fatal CODE [DETAIL…]       fatal, whatever the list says
//! transient CODE [DETAIL…]   transient, whatever the list says
//! jam [LOCATION…]            a paper jam (transient, code JAM)
//! clear CODE                 the fault is fixed
//! ```

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use protocol::alarm::{self, AlarmReport, FaultEvent};
use protocol::data::Section;
use protocol::topic::UpKind;
use protocol::{MsgId, Serial};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::device::{self, SharedDevice};
use crate::relay::RelayHandle;
use crate::report::Reporter;

/// Fatal unless configured otherwise: service calls that stop a copier.
pub const DEFAULT_FATAL: [&str; 4] = ["SC-541", "SC-542", "SC-321", "SC-670"];
/// The code of a paper jam.
pub const JAM_CODE: &str = "JAM";
/// The spool directory inside the data directory.
pub const SPOOL_DIR: &str = "faults";
const SPOOL_EXT: &str = "fault";

/// What the simulated copier (and a request without a detail) says about well-known codes.
fn known_detail(code: &str) -> &'static str {
    match code {
        "SC-541" => "main motor failure",
        "SC-542" => "fuser thermistor failure",
        "SC-321" => "laser unit failure",
        "SC-670" => "engine communication failure",
        JAM_CODE => "paper jam",
        _ => "",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("fault request {0:?}: {1}")]
    Parse(String, String),
    #[error("device {0} is not running in this process")]
    NotRunning(Serial),
    #[error("could not write the fault request into {}: {source}", .dir.display())]
    Spool {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// One thing that happened to a fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultRequest {
    /// A fault was detected. `fatal`: `None` decides by the `[faults] fatal` list.
    Raise {
        code: String,
        detail: String,
        fatal: Option<bool>,
    },
    /// The fault is fixed.
    Clear { code: String },
}

impl FaultRequest {
    /// A fault whose severity the configuration decides.
    pub fn raise(code: &str) -> FaultRequest {
        FaultRequest::Raise {
            code: code.to_owned(),
            detail: String::new(),
            fatal: None,
        }
    }

    /// A fatal fault, whatever the configuration says.
    pub fn fatal(code: &str, detail: &str) -> FaultRequest {
        FaultRequest::Raise {
            code: code.to_owned(),
            detail: detail.to_owned(),
            fatal: Some(true),
        }
    }

    /// A paper jam at `location`: transient.
    pub fn jam(location: &str) -> FaultRequest {
        FaultRequest::Raise {
            code: JAM_CODE.to_owned(),
            detail: location.to_owned(),
            fatal: Some(false),
        }
    }

    pub fn clear(code: &str) -> FaultRequest {
        FaultRequest::Clear {
            code: code.to_owned(),
        }
    }

    /// Reads one request line (see the module's documentation).
    pub fn parse(line: &str) -> Result<FaultRequest, FaultError> {
        let bad = |why: &str| FaultError::Parse(line.trim().to_owned(), why.to_owned());
        let line = line.trim();
        let (verb, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        let (code, detail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let code_ok = |code: &str| alarm::check_code(code).map_err(|e| bad(&e));
        let req = match verb {
            "raise" | "fatal" | "transient" => {
                code_ok(code)?;
                FaultRequest::Raise {
                    code: code.to_owned(),
                    detail: detail.trim().to_owned(),
                    fatal: match verb {
                        "fatal" => Some(true),
                        "transient" => Some(false),
                        _ => None,
                    },
                }
            }
            "jam" => FaultRequest::jam(rest),
            "clear" => {
                code_ok(code)?;
                if !detail.trim().is_empty() {
                    return Err(bad("write `clear CODE` with nothing after the code"));
                }
                FaultRequest::clear(code)
            }
            _ => {
                return Err(bad(
                    "start with raise, fatal, transient, jam or clear (e.g. `raise SC-541`)",
                ));
            }
        };
        Ok(req)
    }

    /// The request as one line that [`FaultRequest::parse`] reads back.
    pub fn to_line(&self) -> String {
        match self {
            FaultRequest::Raise {
                code,
                detail,
                fatal,
            } => {
                let verb = match fatal {
                    None => "raise",
                    Some(true) => "fatal",
                    Some(false) => "transient",
                };
                format!("{verb} {code} {detail}").trim_end().to_owned()
            }
            FaultRequest::Clear { code } => format!("clear {code}"),
        }
    }
}

/// How faults are judged, simulated and received (`[faults]` and the fault rates of `[sim]`).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSettings {
    /// Codes that are fatal (alarm at once); every other code is transient.
    pub fatal: Vec<String>,
    /// Simulated copier: paper jams per hour of running (0: none).
    pub jam_rate_per_hour: f64,
    /// Simulated copier: fatal faults per hour of running (0: none).
    pub fatal_rate_per_hour: f64,
    /// Simulated copier: a simulated fatal fault clears by itself after this long (a technician's
    /// visit); `None`: only a `clear` request clears it.
    pub fatal_clear_after: Option<Duration>,
    /// The directory watched for request files (`device-agent run`: `DATA_DIR/faults`).
    pub spool: Option<PathBuf>,
    /// How often the spool directory is looked at (SIGUSR2 looks at once).
    pub poll: Duration,
}

impl Default for FaultSettings {
    fn default() -> Self {
        FaultSettings {
            fatal: DEFAULT_FATAL.iter().map(|s| (*s).to_owned()).collect(),
            jam_rate_per_hour: 0.0,
            fatal_rate_per_hour: 0.0,
            fatal_clear_after: None,
            spool: None,
            poll: Duration::from_millis(250),
        }
    }
}

impl FaultSettings {
    pub fn is_fatal(&self, code: &str) -> bool {
        self.fatal.iter().any(|c| c == code)
    }
}

/// What runs beside a device's session besides its jobs: fault handling and meter reads.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MonitorSettings {
    pub faults: FaultSettings,
    /// Send the counters on `dev/{serial}/up/counters` this often (a periodic meter read for
    /// billing); `None`: only when a get-data job asks.
    pub counters_every: Option<Duration>,
}

type Registry = Mutex<HashMap<Serial, mpsc::UnboundedSender<FaultRequest>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Injects a fault into device `serial` running in this process (a `fleet`, `broker demo`, or a
/// `run` started from a library). Handled as if the device had detected it.
pub fn inject(serial: &Serial, request: FaultRequest) -> Result<(), FaultError> {
    let sent = registry()
        .lock()
        .ok()
        .and_then(|r| r.get(serial).map(|tx| tx.send(request).is_ok()));
    match sent {
        Some(true) => Ok(()),
        _ => Err(FaultError::NotRunning(serial.clone())),
    }
}

/// Writes `request` into `DATA_DIR/faults/` for the `device-agent run` using that data directory,
/// atomically (written under another name, then renamed). Returns the file's path.
pub fn spool(data_dir: &Path, request: &FaultRequest) -> Result<PathBuf, FaultError> {
    let dir = data_dir.join(SPOOL_DIR);
    let err = |source| FaultError::Spool {
        dir: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = format!("{nanos:024}-{:08x}", rand::random::<u32>());
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(format!("{name}.{SPOOL_EXT}"));
    std::fs::write(&tmp, format!("{}\n", request.to_line())).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(path)
}

/// Takes every request file out of the spool directory, oldest first.
fn drain_spool(dir: &Path, serial: &Serial) -> Vec<FaultRequest> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == SPOOL_EXT))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path);
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(serial = %serial, file = %path.display(), error = %e, "cannot remove a fault request; ignoring it");
            continue;
        }
        match text {
            Ok(text) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match FaultRequest::parse(line) {
                        Ok(r) => out.push(r),
                        Err(e) => warn!(serial = %serial, error = %e, "fault request ignored"),
                    }
                }
            }
            Err(e) => {
                warn!(serial = %serial, file = %path.display(), error = %e, "cannot read a fault request")
            }
        }
    }
    out
}

/// Removes the device from the registry when its monitor ends.
struct Registered(Serial);

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut r) = registry().lock() {
            r.remove(&self.0);
        }
    }
}

/// A delay drawn from an exponential distribution with `per_hour` events an hour; `None` at 0.
fn next_event(per_hour: f64) -> Option<Instant> {
    if !(per_hour > 0.0 && per_hour.is_finite()) {
        return None;
    }
    let u: f64 = rand::thread_rng().gen_range(f64::EPSILON..1.0);
    let hours = -u.ln() / per_hour;
    Some(Instant::now() + Duration::from_secs_f64((hours * 3600.0).min(1e9)))
}

/// One device's fault handling. Spawned beside its session by [`crate::agent::run_device`].
pub struct Monitor {
    pub serial: Serial,
    pub report: Reporter,
    pub relay: RelayHandle,
    pub device: SharedDevice,
    pub settings: FaultSettings,
}

impl Monitor {
    /// Runs until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        if let Ok(mut r) = registry().lock() {
            r.insert(self.serial.clone(), tx);
        }
        let _registered = Registered(self.serial.clone());
        let mut usr2 = match &self.settings.spool {
            Some(_) => sigusr2(),
            None => None,
        };
        let mut poll = tokio::time::interval(self.settings.poll.max(Duration::from_millis(10)));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state = State::default();
        let mut next_jam = next_event(self.settings.jam_rate_per_hour);
        let mut next_fatal = next_event(self.settings.fatal_rate_per_hour);
        let mut sim_clear: Option<(Instant, String)> = None;
        let mut acks: JoinSet<(String, MsgId, bool)> = JoinSet::new();
        loop {
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                () = stop.cancelled() => return,
                Some(req) = rx.recv() => self.handle(req, &mut state, &mut acks).await,
                _ = poll.tick(), if self.settings.spool.is_some() => self.scan(&mut state, &mut acks).await,
                Some(()) = recv_signal(&mut usr2) => self.scan(&mut state, &mut acks).await,
                () = sleep_until(next_jam.unwrap_or(far)), if next_jam.is_some() => {
                    next_jam = next_event(self.settings.jam_rate_per_hour);
                    let spot = ["tray 1 feed", "tray 2 feed", "registration", "fuser exit", "duplex unit", "ADF"];
                    let at = spot[rand::thread_rng().gen_range(0..spot.len())];
                    self.handle(FaultRequest::jam(at), &mut state, &mut acks).await;
                }
                () = sleep_until(next_fatal.unwrap_or(far)), if next_fatal.is_some() => {
                    next_fatal = next_event(self.settings.fatal_rate_per_hour);
                    if let Some(code) = self.pick_fatal(&state) {
                        self.handle(FaultRequest::raise(&code), &mut state, &mut acks).await;
                        if let Some(after) = self.settings.fatal_clear_after {
                            sim_clear = Some((Instant::now() + after, code));
                        }
                    }
                }
                () = sleep_until(sim_clear.as_ref().map_or(far, |(at, _)| *at)), if sim_clear.is_some() => {
                    if let Some((_, code)) = sim_clear.take() {
                        self.handle(FaultRequest::clear(&code), &mut state, &mut acks).await;
                    }
                }
                Some(done) = acks.join_next() => {
                    if let Ok((code, id, acked)) = done {
                        self.acked(&code, id, acked, &mut state).await;
                    }
                }
            }
        }
    }

    /// A fatal code for the simulated copier that is not already active.
    fn pick_fatal(&self, state: &State) -> Option<String> {
        let free: Vec<&String> = self
            .settings
            .fatal
            .iter()
            .filter(|c| !state.active.contains(*c))
            .collect();
        if free.is_empty() {
            return None;
        }
        Some(free[rand::thread_rng().gen_range(0..free.len())].clone())
    }

    async fn scan(&self, state: &mut State, acks: &mut JoinSet<(String, MsgId, bool)>) {
        let Some(dir) = self.settings.spool.clone() else {
            return;
        };
        let serial = self.serial.clone();
        let requests = tokio::task::spawn_blocking(move || drain_spool(&dir, &serial))
            .await
            .unwrap_or_default();
        for req in requests {
            self.handle(req, state, acks).await;
        }
    }

    async fn handle(
        &self,
        req: FaultRequest,
        state: &mut State,
        acks: &mut JoinSet<(String, MsgId, bool)>,
    ) {
        match req {
            FaultRequest::Raise {
                code,
                detail,
                fatal,
            } => {
                let fatal = fatal.unwrap_or_else(|| self.settings.is_fatal(&code));
                let detail = if detail.is_empty() {
                    known_detail(&code).to_owned()
                } else {
                    detail
                };
                self.raise(code, detail, fatal, state, acks).await;
            }
            FaultRequest::Clear { code } => self.clear(code, state).await,
        }
    }

    async fn raise(
        &self,
        code: String,
        detail: String,
        fatal: bool,
        state: &mut State,
        acks: &mut JoinSet<(String, MsgId, bool)>,
    ) {
        let serial = &self.serial;
        // S301–S302: the fault is on the device's panel and in its JAM/SC data either way.
        let (c, d) = (code.clone(), detail.clone());
        let _ = device::call(&self.device, move |dev| {
            dev.record_fault(&c, &d, fatal);
            Ok(())
        })
        .await;
        // A `fault:CODE` condition makes a periodic device check in (claim 15).
        self.relay.fault_seen(code.clone());
        if !fatal {
            // S304: recovered once cleared; nothing to report.
            info!(serial = %serial, code = %code, detail = %detail, "transient fault; counted, not reported");
            return;
        }
        if !state.active.insert(code.clone()) {
            debug!(serial = %serial, code = %code, "fatal fault already active");
            return;
        }
        // S305: no other relay work until the relay has the alarm.
        state.held += 1;
        self.relay.hold_jobs(true);
        let total = total_count(&self.device).await;
        let report = AlarmReport {
            code: code.clone(),
            event: FaultEvent::Raised,
            detail: alarm::clip_detail(&detail),
            at: chrono::Utc::now(),
            total,
        };
        match self.report.send(UpKind::Alarm, report, None).await {
            Ok(id) => {
                warn!(serial = %serial, code = %code, detail = %detail, msg_id = id, "fatal fault; alarm sent");
                let relay = self.relay.clone();
                acks.spawn(async move {
                    let acked = relay.acked(id).await.is_some();
                    (code, id, acked)
                });
            }
            Err(e) => {
                // Only a broken disk gets here; the device cannot keep the alarm, so it must not
                // hold every job back waiting for it either.
                warn!(serial = %serial, code = %code, error = %e, "could not store the alarm");
                state.held = state.held.saturating_sub(1);
                self.relay.hold_jobs(state.held > 0);
            }
        }
    }

    /// S308–S311: the relay has the alarm; say the fault is in progress and resume.
    async fn acked(&self, code: &str, id: MsgId, acked: bool, state: &mut State) {
        state.held = state.held.saturating_sub(1);
        self.relay.hold_jobs(state.held > 0);
        if !acked {
            return; // the session is gone: shutting down
        }
        info!(serial = %self.serial, code = %code, msg_id = id, "alarm acknowledged by the relay");
        if !state.active.contains(code) {
            return; // cleared meanwhile: no "in progress" after the clear
        }
        let report = AlarmReport {
            code: code.to_owned(),
            event: FaultEvent::InProgress,
            detail: String::new(),
            at: chrono::Utc::now(),
            total: None,
        };
        if let Err(e) = self.report.send(UpKind::Alarm, report, None).await {
            warn!(serial = %self.serial, code = %code, error = %e, "could not store fault in progress");
        }
    }

    async fn clear(&self, code: String, state: &mut State) {
        let was_active = state.active.remove(&code);
        let c = code.clone();
        let _ = device::call(&self.device, move |dev| {
            dev.clear_fault(&c);
            Ok(())
        })
        .await;
        // Sent even if this run never saw the raise: the agent may have restarted since.
        let report = AlarmReport {
            code: code.clone(),
            event: FaultEvent::Cleared,
            detail: String::new(),
            at: chrono::Utc::now(),
            total: None,
        };
        match self.report.send(UpKind::Alarm, report, None).await {
            Ok(id) => {
                info!(serial = %self.serial, code = %code, msg_id = id, was_active, "fault cleared")
            }
            Err(e) => {
                warn!(serial = %self.serial, code = %code, error = %e, "could not store the clear")
            }
        }
    }
}

#[derive(Default)]
struct State {
    /// Fatal faults raised and not cleared.
    active: BTreeSet<String>,
    /// Raised alarms the relay has not acknowledged yet: jobs wait while any is.
    held: usize,
}

/// The total counter, for the alarm (the seed's call info: "total count at the call").
async fn total_count(device: &SharedDevice) -> Option<i64> {
    let data = device::read_sections(device, vec![Section::Counters])
        .await
        .ok()?;
    data.get(&Section::Counters)?.get("total")?.as_int()
}

fn sigusr2() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::user_defined2()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGUSR2; fault requests are read every poll");
            None
        }
    }
}

async fn recv_signal(sig: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// `device-agent fault`: writes the request into the agent's spool and, with `--signal PID`,
/// tells the agent to read it now. Returns the request file's path.
pub fn request_from_cli(args: &crate::cli::FaultArgs) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let data_dir = match (&args.data_dir, &args.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(config)) => crate::config::FileConfig::load(config)?
            .data_dir
            .with_context(|| {
                format!("{} sets no data_dir: pass --data-dir DIR", config.display())
            })?,
        (None, None) => anyhow::bail!(
            "which agent? pass --data-dir DIR (the running agent's data directory) or --config FILE"
        ),
    };
    let request = FaultRequest::parse(&args.request.join(" "))?;
    let path = spool(&data_dir, &request)?;
    if let Some(pid) = args.signal {
        let status = std::process::Command::new("kill")
            .arg("-USR2")
            .arg(pid.to_string())
            .status()
            .context("running kill -USR2")?;
        anyhow::ensure!(
            status.success(),
            "kill -USR2 {pid} failed ({status}); the agent reads the request within its poll anyway"
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_and_print_back() {
        let cases = [
            ("raise SC-541", FaultRequest::raise("SC-541")),
            (
                "fatal SC-999 drum motor locked",
                FaultRequest::fatal("SC-999", "drum motor locked"),
            ),
            (
                "transient J-12 tray 2",
                FaultRequest::Raise {
                    code: "J-12".into(),
                    detail: "tray 2".into(),
                    fatal: Some(false),
                },
            ),
            ("jam fuser exit", FaultRequest::jam("fuser exit")),
            ("  clear SC-541 ", FaultRequest::clear("SC-541")),
        ];
        for (line, want) in cases {
            let got = FaultRequest::parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(got, want, "{line}");
            assert_eq!(FaultRequest::parse(&got.to_line()).unwrap(), got);
        }
        for bad in [
            "",
            "explode SC-1",
            "raise",
            "raise SC/541",
            "clear SC-1 now",
            "clear",
        ] {
            let e = FaultRequest::parse(bad).unwrap_err().to_string();
            assert!(!e.is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn spooled_requests_come_back_in_order_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        spool(dir.path(), &FaultRequest::raise("SC-541")).unwrap();
        spool(dir.path(), &FaultRequest::clear("SC-541")).unwrap();
        std::fs::write(dir.path().join(SPOOL_DIR).join("x.fault"), "nonsense\n").unwrap();
        let serial = Serial::parse("C1").unwrap();
        let got = drain_spool(&dir.path().join(SPOOL_DIR), &serial);
        assert_eq!(
            got,
            [FaultRequest::raise("SC-541"), FaultRequest::clear("SC-541")]
        );
        assert!(drain_spool(&dir.path().join(SPOOL_DIR), &serial).is_empty());
    }

    #[test]
    fn the_fatal_list_decides_unless_the_request_does() {
        let s = FaultSettings::default();
        assert!(s.is_fatal("SC-541"));
        assert!(!s.is_fatal(JAM_CODE));
        assert_eq!(next_event(0.0), None);
        assert!(next_event(3600.0).is_some());
    }

    #[test]
    fn the_config_sets_fatal_codes_rates_reports_and_the_spool() {
        use crate::cli::RunArgs;
        use crate::config::{FileConfig, RunSettings};
        let args = || RunArgs {
            broker: vec!["mqtts://relay:8883".parse().unwrap()],
            ca: Some("ca.pem".into()),
            cert: Some("c.pem".into()),
            key: Some("c.key".into()),
            serial: Some(Serial::parse("C1").unwrap()),
            data_dir: Some("d".into()),
            ..RunArgs::default()
        };
        let parse = |text: &str| FileConfig::parse(text, Path::new("agent.toml"));
        let file = parse(
            "[faults]\nfatal = [\"SC-1\"]\npoll_ms = 100\n[sim]\njam_rate_per_hour = 2.5\nfatal_clear_secs = 9\n[report]\ncounters_every_secs = 60\n",
        )
        .unwrap();
        let run = RunSettings::merge(file, args()).unwrap();
        let m = &run.monitor;
        assert_eq!(m.faults.fatal, ["SC-1"]);
        assert_eq!(m.faults.poll, Duration::from_millis(100));
        assert_eq!(m.faults.jam_rate_per_hour, 2.5);
        assert_eq!(m.faults.fatal_clear_after, Some(Duration::from_secs(9)));
        assert_eq!(m.counters_every, Some(Duration::from_secs(60)));
        assert_eq!(m.faults.spool, Some(Path::new("d").join(SPOOL_DIR)));
        let defaults = RunSettings::merge(parse("").unwrap(), args()).unwrap();
        assert!(defaults.monitor.faults.is_fatal("SC-541"));
        assert_eq!(defaults.monitor.counters_every, None);
        for (text, want) in [
            ("[faults]\nfatal = [\"SC 1\"]\n", "faults.fatal"),
            ("[faults]\npoll_ms = 0\n", "poll_ms"),
            ("[sim]\nfatal_rate_per_hour = -1.0\n", "fatal_rate_per_hour"),
            ("[report]\ncounters_every_secs = 0\n", "counters_every_secs"),
        ] {
            let e = RunSettings::merge(parse(text).unwrap(), args())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn the_fault_command_parses_and_needs_a_data_dir() {
        use crate::cli::{Cli, Command};
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "device-agent",
            "fault",
            "--data-dir",
            "d",
            "fatal",
            "SC-9",
            "drum",
            "motor",
        ])
        .unwrap();
        let Command::Fault(args) = cli.command else {
            panic!("not fault")
        };
        assert_eq!(args.request.join(" "), "fatal SC-9 drum motor");
        let dir = tempfile::tempdir().unwrap();
        let args = crate::cli::FaultArgs {
            data_dir: Some(dir.path().to_owned()),
            request: vec!["clear".into(), "SC-9".into()],
            ..Default::default()
        };
        let path = request_from_cli(&args).unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "clear SC-9\n");
        let e = request_from_cli(&crate::cli::FaultArgs {
            request: vec!["clear".into(), "SC-9".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--data-dir"), "{e}");
        assert!(Cli::try_parse_from(["device-agent", "fault", "--data-dir", "d"]).is_err());
    }

    #[test]
    fn injecting_into_a_device_not_running_here_says_so() {
        let serial = Serial::parse("NOT-HERE").unwrap();
        let e = inject(&serial, FaultRequest::raise("SC-541")).unwrap_err();
        assert!(e.to_string().contains("not running"), "{e}");
    }
}
