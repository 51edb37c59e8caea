//! The command line. Each command's doc comment is its `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use protocol::data::Value;
use protocol::log_format::LogFormat;
use protocol::proxy::ProxyUrl;
use protocol::url::BrokerUrl;

const EXAMPLES: &str = "\
Examples:
  # Ask copier C123 for its counters; prints the new job id
  host-agent --broker mqtts://localhost:8883 --ca pki/ca.pem \\
      --cert pki/host/svc.pem --key pki/host/svc.key \\
      jobs submit --serial C123 --kind get-data --sections counters

  # The same, with the connection settings in a file
  host-agent --config config/host-agent.toml jobs list
  host-agent --config config/host-agent.toml jobs show J-000001
  host-agent --config config/host-agent.toml watch --json

  # Firmware: a publisher key once, then upload and submit
  host-agent keys generate --out keys
  host-agent --config config/host-agent.toml artifacts upload fw-2.1.bin \\
      --version 2.1 --signing-key keys/publisher.key
  host-agent --config config/host-agent.toml jobs submit --serial C123 \\
      --kind firmware --artifact 2.1

Exit status: 0 done, 1 the broker said no (job rejected, unknown job, cancel refused, upload
refused), 2 usage, file, connection, TLS or timeout error.";

/// The service company's side of chukei: submit jobs for devices behind firewalls, list them
/// (the job list of Fig. 9), look at one, and watch them change; publish signed firmware.
///
/// The host id is the CN of the certificate given with --cert; issue one with
/// `broker pki issue --role host --id NAME`.
#[derive(Debug, Parser)]
#[command(name = "host-agent", version, after_help = EXAMPLES, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the relay. Every flag overrides the same key in --config.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectArgs {
    /// The relay, as mqtts://HOST:PORT (port 8883 if omitted), or wss://HOST:PORT/mqtt (MQTT
    /// over WebSocket, for networks that let only HTTPS out). Overrides `broker` in --config.
    #[arg(long, value_name = "URL", global = true, help_heading = "Connection")]
    pub broker: Option<BrokerUrl>,
    /// Reach the relay through this HTTP proxy (CONNECT tunnel; TLS stays end to end):
    /// http://HOST:PORT or http://USER:PASSWORD@HOST:PORT. Without it HTTPS_PROXY (or
    /// ALL_PROXY) is used, as curl does; NO_PROXY lists hosts reached directly either way.
    /// Overrides `proxy` in --config.
    #[arg(long, value_name = "URL", global = true, help_heading = "Connection")]
    pub proxy: Option<ProxyUrl>,
    /// The broker's CA certificate (PEM), e.g. pki/ca.pem. Overrides `ca` in --config.
    #[arg(long, value_name = "FILE", global = true, help_heading = "Connection")]
    pub ca: Option<PathBuf>,
    /// This host's certificate (PEM); its CN is the host id. Overrides `cert` in --config.
    #[arg(long, value_name = "FILE", global = true, help_heading = "Connection")]
    pub cert: Option<PathBuf>,
    /// This host's private key (PEM). Overrides `key` in --config.
    #[arg(long, value_name = "FILE", global = true, help_heading = "Connection")]
    pub key: Option<PathBuf>,
    /// A TOML file with broker, ca, cert, key, timeout_secs and the dashboard's allowed_hosts
    /// (see config/host-agent.toml).
    /// Relative paths in it are read from the file's own directory.
    #[arg(long, value_name = "FILE", global = true, help_heading = "Connection")]
    pub config: Option<PathBuf>,
    /// Give up on the connection or a reply after N seconds; requests are resent every 2 s
    /// until then. Default 15. Overrides `timeout_secs` in --config.
    #[arg(long, value_name = "N", global = true, help_heading = "Connection", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_secs: Option<u64>,
    /// text, or json: one JSON object per line with the same fields, for log shippers (the
    /// dashboard's log above all). Default text. Overrides `log_format` in --config.
    #[arg(long, value_name = "text|json", global = true)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit, list, show and cancel jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Print one line per job change, across the fleet, until Ctrl-C.
    Watch(WatchArgs),
    /// Upload and list firmware artifacts (the images firmware jobs install).
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
    /// Make the publisher key pair that signs firmware. Works offline.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Emergencies (Fig. 5): list the alarms devices raised, acknowledge one. `watch --alarms`
    /// follows them live.
    #[command(subcommand)]
    Alarms(AlarmsCommand),
    /// Export data for other systems: meter readings for billing.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Child relays (at a parent relay): which are connected, and their devices.
    #[command(subcommand)]
    Relays(RelaysCommand),
    /// One job to a whole group of devices: in waves, at a rate, inside maintenance windows,
    /// stopped by itself when too many fail.
    #[command(subcommand)]
    Rollouts(RolloutsCommand),
    /// The devices the relay knows: list them by what they report (what a rollout's targets
    /// would select), and tag them.
    #[command(subcommand)]
    Devices(DevicesCommand),
    // Its help is `DashboardArgs`'s doc comment, long form included.
    Dashboard(DashboardArgs),
}

/// Serve the service desk's web page: live emergencies, the job list, devices, submit, cancel.
///
/// The host display of the seed's Fig. 5 and Fig. 9, until Ctrl-C. It connects out to the relay over mTLS like every host command, subscribes to the
/// fleet's job, state and alarm views, and serves locally: it never needs inbound access from
/// the internet.
///
/// Pages: Emergencies (active alarms, device faults first, live, with Acknowledge), Jobs (the
/// Fig. 9 list, filtered by status or serial; succeeded and canceled jobs leave it after the
/// relay's retention, as in `jobs list`), Devices (presence, last seen, firmware, counters and a
/// chart of the total count), Rollouts (a bar per wave; pause, resume, abort, approve), Submit
/// (get-data, update-data, firmware, set-schedule) and Cancel.
/// Open pages update by themselves (Server-Sent Events).
///
/// The page's URL is printed alone on stdout. It listens on 127.0.0.1:8080 by default; any
/// address that is not loopback is refused unless --auth sets a password. It answers only to
/// its own address (see --allowed-host). The page is plain HTTP: to serve it beyond this
/// machine, put it behind a TLS reverse proxy.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  # On the service desk's own machine: open http://127.0.0.1:8080/
  host-agent --config config/host-agent.toml dashboard

  # For the whole office: a password, and firmware uploads signed with the publisher key
  printf '%s\\n' 'a long passphrase' > dashboard.pw && chmod 600 dashboard.pw
  host-agent --config config/host-agent.toml dashboard --listen 0.0.0.0:8080 \\
      --auth dashboard.pw --signing-key keys/publisher.key

  # Behind a TLS reverse proxy at https://dash.example.com/
  host-agent --config config/host-agent.toml dashboard --auth dashboard.pw \\
      --allowed-host dash.example.com")]
pub struct DashboardArgs {
    /// Where to serve the page, as ADDRESS:PORT. Any address that is not loopback (127.0.0.1,
    /// ::1) needs --auth. Port 0 picks a free one (the URL on stdout says which).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Require a password: FILE's first line is the password, or an argon2 hash of it
    /// (`$argon2id$…`). Only its hash is kept in memory; a file keeps it out of `ps` and shell
    /// history. One login per browser (a session cookie, 12 hours idle).
    #[arg(long, value_name = "FILE")]
    pub auth: Option<PathBuf>,
    /// The publisher's secret key (`keys generate` wrote publisher.key): lets the submit form
    /// upload and sign a new firmware image. Without it the form installs only artifacts
    /// already on the relay.
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// Days of meter readings behind each device's chart.
    #[arg(long, value_name = "N", default_value_t = crate::dashboard::DEFAULT_COUNTER_DAYS, value_parser = clap::value_parser!(u32).range(1..=3660))]
    pub counter_days: u32,
    /// Also answer to this name (any port), or NAME:PORT (that port only): a reverse proxy's
    /// name, or this machine's. Repeatable. Without it the page answers only to its listening
    /// address (and localhost, 127.0.0.1 and [::1] at the listening port when that is
    /// loopback), and refuses other names (421) and forms from other origins (403), so that a
    /// web page cannot reach it by pointing its own name at this machine (DNS rebinding).
    /// Replaces `allowed_hosts` in --config.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<crate::dashboard::AllowedHost>,
}

#[derive(Debug, Subcommand)]
pub enum AlarmsCommand {
    List(AlarmListArgs),
    Ack(AlarmAckArgs),
}

/// List alarms: the active ones (raised or in progress), oldest first; with --all, the newest
/// 1,000 of every alarm, cleared ones included. Columns: ID, serial, site, kind, code, status,
/// raised (local time), acknowledged by, detail.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  host-agent … alarms list
  host-agent … alarms list --all --serial C123 --json
  host-agent … watch --alarms        # live")]
pub struct AlarmListArgs {
    /// Also cleared alarms (the newest 1,000).
    #[arg(long)]
    pub all: bool,
    /// Only this device's alarms.
    #[arg(long, value_name = "SERIAL")]
    pub serial: Option<String>,
    /// Print a JSON array of alarm objects instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Acknowledge an alarm: the service desk has seen it. It stays active until the device clears
/// it; the first host to acknowledge is kept. Prints the alarm's line.
#[derive(Debug, Clone, Args)]
pub struct AlarmAckArgs {
    /// The alarm id, e.g. A-000001.
    #[arg(value_name = "ID")]
    pub id: String,
}

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    Counters(ExportCountersArgs),
}

/// Meter readings (Fig. 3 counters) for billing, one row per device per reading: every get-data
/// job that read the counters, and every counters report a device sent on its own schedule.
/// Columns: serial, site, read_at (UTC), source, then total and every other counter (empty
/// where a device has no such counter). Without --from and --to, every reading the relay holds.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  host-agent … export counters --format csv --output all.csv
  host-agent … export counters --from 2026-11-01T00:00:00Z --to 2026-12-01T00:00:00Z \\
      --format csv --output november.csv")]
pub struct ExportCountersArgs {
    /// Readings taken at or after this time (RFC 3339). Default: the earliest.
    #[arg(long, value_name = "RFC3339")]
    pub from: Option<String>,
    /// Readings taken before this time (RFC 3339). Default: no end.
    #[arg(long, value_name = "RFC3339")]
    pub to: Option<String>,
    /// Only this device.
    #[arg(long, value_name = "SERIAL")]
    pub serial: Option<String>,
    /// csv (the default) or json (an array of readings).
    #[arg(long, value_name = "csv|json", default_value = "csv", value_parser = ["csv", "json"])]
    pub format: String,
    /// Write here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    // Boxed: its many flags would make every other command as large.
    Submit(Box<SubmitArgs>),
    List(ListArgs),
    Show(ShowArgs),
    Cancel(CancelArgs),
}

const SUBMIT_EXAMPLES: &str = "\
Examples:
  # get-data: read sections now, or at 02:00 Tokyo time
  host-agent … jobs submit --serial C123 --kind get-data --sections counters,jams
  host-agent … jobs submit --serial C123 --kind get-data --at 2026-11-27T02:00:00+09:00

  # update-data: set values; the relay merges them into the device's current data
  host-agent … jobs submit --serial C123 --kind update-data \\
      --set adjustment.density=6 --set adjustment.toner_save=true \\
      --set call-settings.at=22:30
  # …or let the device merge them itself
  host-agent … jobs submit --serial C123 --kind update-data \\
      --set adjustment.density=6 --merge device

  # firmware: download now, write tonight at 02:00 UTC, try the write up to 2 times
  host-agent … jobs submit --serial C123 --kind firmware --artifact 2.1 \\
      --execute-at 2026-11-27T02:00:00Z --max-attempts 2

  # set-schedule: check in every 15 minutes and on Sundays at 02:00 UTC, and at power-on
  host-agent … jobs submit --serial C123 --kind set-schedule --mode periodic \\
      --interval-secs 900 --calendar 'weekly:sun 02:00' --moment power-on \\
      --condition count:total/1000
  # …back to an always-connected session
  host-agent … jobs submit --serial C123 --kind set-schedule --mode persistent";

/// Submit a job for one device. Prints the new job id alone on stdout; follow it with
/// `jobs show ID` or `watch`.
///
/// Kinds: get-data (read sections of the device's data), update-data (set values),
/// firmware (install an uploaded artifact), set-schedule (change when the device reaches the
/// relay). Each kind reads only its own flags below.
///
/// The broker checks the job (serial, kind, values, artifact, times): if it refuses it, the job
/// is recorded as rejected with the reason, the reason is printed and host-agent exits 1.
#[derive(Debug, Clone, Default, Args)]
#[command(after_help = SUBMIT_EXAMPLES)]
pub struct SubmitArgs {
    /// The target device's serial (the CN of its certificate).
    #[arg(long, value_name = "SERIAL", required_unless_present = "relay")]
    pub serial: Option<String>,
    /// What the device is to do.
    #[command(flatten)]
    pub job: JobFlags,

    /// At a parent relay: send the job through this child relay (its id), wherever the device
    /// was last seen; the child must be one whose [[relays]] serials match the device.
    #[arg(long, value_name = "RELAY", help_heading = "child relays")]
    pub via: Option<String>,
    /// At a parent relay: a job for the child relay itself (its own status with get-data),
    /// instead of a device.
    #[arg(long, value_name = "RELAY", conflicts_with_all = ["serial", "via"], help_heading = "child relays")]
    pub relay: Option<String>,
}

/// The job's own flags, shared by `jobs submit` (one device) and `rollouts create` (every device
/// its targets select).
#[derive(Debug, Clone, Default, Args)]
pub struct JobFlags {
    /// What to do: get-data, update-data, firmware or set-schedule.
    #[arg(long, value_name = "KIND")]
    pub kind: String,
    /// Instruction time (RFC 3339): the device runs the job not before then. Default: now.
    #[arg(long, value_name = "RFC3339")]
    pub at: Option<String>,
    /// Execution time (RFC 3339): for firmware, when to write the downloaded image (a
    /// maintenance window); the job waits as `staged` until then. Default: right after the
    /// download.
    #[arg(long, value_name = "RFC3339")]
    pub execute_at: Option<String>,
    /// Deadline (RFC 3339): the job times out if it has not ended by then. Default: the
    /// broker's (7 days).
    #[arg(long, value_name = "RFC3339")]
    pub deadline: Option<String>,

    /// The sections to send: counters, identification, calls, call-settings,
    /// jams, adjustment, comms, settings. Default: all of them.
    #[arg(
        long,
        value_name = "NAME,…",
        value_delimiter = ',',
        help_heading = "get-data"
    )]
    pub sections: Vec<String>,

    /// One value to set, as SECTION.NAME=VALUE (repeat for more). VALUE is an
    /// integer if it reads as one, true or false as a boolean, else text; wrap it in double
    /// quotes to send digits as text (--set 'settings.code="0042"').
    #[arg(long = "set", value_name = "SECTION.NAME=VALUE", value_parser = parse_set, help_heading = "update-data")]
    pub set: Vec<(String, Value)>,
    /// Where the values are merged into the device's current data: broker (the
    /// relay merges and sends the device the full merged set; the default) or device.
    #[arg(long, value_name = "broker|device", help_heading = "update-data")]
    pub merge: Option<String>,

    /// The artifact to install, by id (the SHA-256 `artifacts upload` printed) or by
    /// version (the latest complete upload with that version).
    #[arg(long, value_name = "ID|VERSION", help_heading = "firmware")]
    pub artifact: Option<String>,
    /// How many times the device may try to write the image before the job fails.
    /// Default: the broker's (3).
    #[arg(long, value_name = "N", help_heading = "firmware")]
    pub max_attempts: Option<u32>,

    /// Persistent (always connected) or periodic (connect, drain, disconnect).
    /// Default: periodic if --interval-secs or --calendar is given, else persistent.
    #[arg(
        long,
        value_name = "persistent|periodic",
        help_heading = "set-schedule"
    )]
    pub mode: Option<String>,
    /// Check in every N seconds (periodic mode).
    #[arg(long, value_name = "N", help_heading = "set-schedule")]
    pub interval_secs: Option<u64>,
    /// Also check in at a calendar time, UTC (repeat for more): hourly:MM,
    /// daily:HH:MM, weekly:DAY HH:MM (mon…sun) or monthly:DD HH:MM (01…28).
    #[arg(long = "calendar", value_name = "SPEC", help_heading = "set-schedule")]
    pub calendar: Vec<String>,
    /// Also check in at a moment (repeat for more): power-on or operator-action.
    #[arg(long = "moment", value_name = "MOMENT", help_heading = "set-schedule")]
    pub moments: Vec<String>,
    /// Also check in when a condition holds (repeat for more):
    /// count:COUNTER/EVERY (a counters value passes a multiple of EVERY, e.g. count:total/1000)
    /// or fault:CODE (e.g. fault:SC-541).
    #[arg(long = "condition", value_name = "COND", help_heading = "set-schedule")]
    pub conditions: Vec<String>,
}

/// Reads `SECTION.NAME=VALUE`. Only the shape is checked here; whether the name exists and the
/// value fits is for the broker (names) and the device (types and ranges) to say.
pub fn parse_set(arg: &str) -> Result<(String, Value), String> {
    let Some((name, value)) = arg.split_once('=') else {
        return Err(format!(
            "{arg:?} is not SECTION.NAME=VALUE; write e.g. --set adjustment.density=6"
        ));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(format!(
            "{arg:?} has no name before '='; write e.g. --set adjustment.density=6"
        ));
    }
    Ok((name.to_owned(), typed_value(value)))
}

/// The value's type, from its text: an integer, then `true`/`false`, else text. Text in double
/// quotes is text without them, so digits can be sent as text.
pub fn typed_value(text: &str) -> Value {
    if let Some(inner) = text
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    {
        return Value::Text(inner.to_owned());
    }
    if let Ok(n) = text.parse::<i64>() {
        return Value::Int(n);
    }
    match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::Text(text.to_owned()),
    }
}

/// List jobs as in Fig. 9: ID, serial, site, instruction, data type, server, host, instruction
/// and execution time (local time), status. Succeeded and canceled jobs drop out of it a while
/// after they end (the broker's finished_visible_secs, 10 minutes by default, as in Fig. 9);
/// failed, rejected and timed-out ones always stay. --all shows every job.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Every job, also the succeeded and canceled ones past the broker's retention.
    #[arg(long)]
    pub all: bool,
    /// Print a JSON array of job objects instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Show one job: status, the Fig. 9 fields, why it failed (one line per refused value), its
/// timeline and the data it collected or applied.
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// The job id that `jobs submit` printed, e.g. J-000001.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Print the job as one JSON object (the Fig. 9 fields, `timeline` and `data`).
    #[arg(long)]
    pub json: bool,
}

/// Withdraw a job. Prints `canceled ID`.
///
/// A job the device has not started (queued or delivered) is always withdrawn, and the device
/// never runs it; so is a firmware job that is downloaded (staged) but not yet being written.
/// A job in progress cannot be stopped safely and one that has ended has nothing to cancel: the
/// broker says so, host-agent prints its reason and exits 1.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  host-agent … jobs cancel J-000042
  host-agent … jobs list --all     # the job now shows as canceled")]
pub struct CancelArgs {
    /// The job id, e.g. J-000042.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Options of `watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Watch emergencies instead of jobs: every active alarm at once (they are retained), then
    /// one line per alarm raised, in progress, acknowledged or cleared.
    #[arg(long)]
    pub alarms: bool,
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    Upload(UploadArgs),
    List(ArtifactListArgs),
}

/// Upload a firmware image to the relay, signed with the publisher key. Prints the artifact id
/// (its SHA-256, 64 hex digits) alone on stdout; a progress bar goes to stderr.
///
/// The relay stores artifacts by content and never vouches for them: each device checks the
/// SHA-256 and the signature with the publisher key it was provisioned with
/// (`device-agent … --publisher-key publisher.pub`). An interrupted upload resumes where the
/// relay's copy ends; uploading an artifact the relay already has sends nothing.
#[derive(Debug, Clone, Args)]
// `--version` here is the artifact's; host-agent's own is `host-agent --version`.
#[command(
    disable_version_flag = true,
    after_help = "\
Examples:
  host-agent keys generate --out keys          # once
  id=$(host-agent … artifacts upload fw-2.1.bin --version 2.1 --signing-key keys/publisher.key)
  host-agent … jobs submit --serial C123 --kind firmware --artifact \"$id\"
  host-agent … artifacts list"
)]
pub struct UploadArgs {
    /// The image file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The version this image is (what `jobs submit --artifact` and the devices' state show).
    /// The signature covers it.
    #[arg(long, value_name = "V")]
    pub version: String,
    /// The publisher's secret key, as `keys generate` wrote it (publisher.key).
    #[arg(long, value_name = "FILE")]
    pub signing_key: PathBuf,
}

/// List the artifacts the relay holds: ID (its first 12 hex digits), version, size in bytes,
/// chunks held/total, complete, publisher (host) and upload time (local).
#[derive(Debug, Clone, Args)]
pub struct ArtifactListArgs {
    /// Print a JSON array (full ids, signatures, sizes) instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RelaysCommand {
    List(RelayListArgs),
}

/// List the child relays of this (parent) relay: each configured in its [[relays]] and any other
/// that connected, whether it is connected and since when, its devices online (and unreachable
/// while it is away), the devices it has forwarded for and its last batch.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  host-agent … relays list\n  host-agent … relays list --json")]
pub struct RelayListArgs {
    /// Print a JSON array instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RolloutsCommand {
    // Boxed: its many flags would make every other command as large.
    Create(Box<RolloutCreateArgs>),
    List(RolloutListArgs),
    Show(RolloutShowArgs),
    /// Stop filing jobs until `rollouts resume`; jobs already filed go on.
    Pause(RolloutIdArg),
    /// File jobs again after a pause.
    Resume(RolloutIdArg),
    /// Stop for good: jobs not yet delivered are canceled, jobs already running finish.
    Abort(RolloutIdArg),
    /// Start the next wave of a rollout made with --approve-each-wave.
    Approve(RolloutIdArg),
}

const ROLLOUT_EXAMPLES: &str = "\
Examples:
  # Firmware 2.0.0 to the C300s still on 1.x in Osaka, a few first, only at night in Tokyo
  host-agent … rollouts create --name c300-fw2 --kind firmware --artifact 2.0.0 \\
      --target 'model=C300' --target 'firmware<2.0.0' --target 'site=Osaka*' \\
      --waves 1%,10%,50%,100% --success-threshold 95% \\
      --abort-failure-rate 5% --abort-min-finished 10 \\
      --rate-per-min 200 --window 'daily 01:00-05:00 Asia/Tokyo'

  # Check what a target selects first
  host-agent … devices list --target 'model=C300' --target 'firmware<2.0.0'

  # A setting to the devices named in a file, one wave, each wave approved by a person
  host-agent … rollouts create --name density-6 --kind update-data \\
      --set adjustment.density=6 --serials-file serials.txt --approve-each-wave

  host-agent … rollouts show R-000001 --watch";

/// Create a rollout: the same job for every device the targets select, filed wave by wave.
/// Prints the rollout's id alone on stdout; follow it with `rollouts show ID --watch`.
///
/// A wave starts when the one before it has --success-threshold of its devices succeeded
/// (with --approve-each-wave, when a person approves). Jobs are filed no faster than
/// --rate-per-min and only inside --window. When the failure rate among finished jobs passes
/// --abort-failure-rate (after --abort-min-finished), the rollout aborts: jobs not yet
/// delivered are canceled, running ones finish. The job flags are those of `jobs submit`.
#[derive(Debug, Clone, Args)]
#[command(after_help = ROLLOUT_EXAMPLES)]
pub struct RolloutCreateArgs {
    /// A name to recognise it by, e.g. c300-fw2.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// Select devices by what they report (all must match): model=GLOB, site=GLOB,
    /// serial=GLOB, firmware=GLOB, tag=GLOB, or firmware<VERSION (also <=, >, >=).
    #[arg(long = "target", value_name = "FILTER", help_heading = "Rollout")]
    pub targets: Vec<String>,
    /// Only these devices: one serial per line (# comments and blank lines skipped); with
    /// --target, a device must be in both.
    #[arg(long, value_name = "FILE", help_heading = "Rollout")]
    pub serials_file: Option<PathBuf>,
    /// Cumulative share of the devices each wave reaches, ending at 100%. Default: one wave.
    #[arg(
        long,
        value_name = "P%,…",
        value_delimiter = ',',
        help_heading = "Rollout"
    )]
    pub waves: Vec<String>,
    /// Share of a wave's devices that must have succeeded before the next starts. Default: 100%.
    #[arg(long, value_name = "P%", help_heading = "Rollout")]
    pub success_threshold: Option<String>,
    /// Abort when more than this share of finished jobs failed. Default: never by itself.
    #[arg(long, value_name = "P%", help_heading = "Rollout")]
    pub abort_failure_rate: Option<String>,
    /// Judge the failure rate only once this many jobs have finished. Default: 1.
    #[arg(long, value_name = "N", help_heading = "Rollout")]
    pub abort_min_finished: Option<u32>,
    /// File at most this many jobs a minute. Default: no limit.
    #[arg(long, value_name = "N", help_heading = "Rollout")]
    pub rate_per_min: Option<u32>,
    /// File jobs only inside this window: DAYS HH:MM-HH:MM ZONE, e.g.
    /// 'daily 01:00-05:00 Asia/Tokyo' or 'mon-fri 22:00-06:00 UTC'. A job not yet taken by its
    /// device when the window closes is withdrawn and filed again in the next one.
    #[arg(long, value_name = "WINDOW", help_heading = "Rollout")]
    pub window: Option<String>,
    /// Start at this time (RFC 3339); until then the rollout is scheduled.
    #[arg(long, value_name = "RFC3339", help_heading = "Rollout")]
    pub start_at: Option<String>,
    /// Wait for `rollouts approve` before each wave after the first.
    #[arg(long, help_heading = "Rollout")]
    pub approve_each_wave: bool,
    /// Keep the rollout open: a device that appears later and matches gets the job too.
    #[arg(long, help_heading = "Rollout")]
    pub dynamic: bool,
    /// The job each device gets.
    #[command(flatten)]
    pub job: JobFlags,
}

/// List rollouts, newest first: id, name, kind, status, devices, succeeded, failed, pending,
/// current wave.
#[derive(Debug, Clone, Args)]
pub struct RolloutListArgs {
    /// Print a JSON array of rollouts (without their device and job lists).
    #[arg(long)]
    pub json: bool,
}

/// Show a rollout: its status, each wave with its jobs per status, and why it stopped.
#[derive(Debug, Clone, Args)]
pub struct RolloutShowArgs {
    /// The rollout id, e.g. R-000001.
    #[arg(value_name = "ROLLOUT")]
    pub id: String,
    /// Print the rollout as JSON (id, status, waves with their devices and counts, jobs).
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Follow it with a progress bar per wave until it ends (Ctrl-C to stop watching).
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RolloutIdArg {
    /// The rollout id, e.g. R-000001.
    #[arg(value_name = "ROLLOUT")]
    pub id: String,
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    List(DeviceListArgs),
    Tag(DeviceTagArgs),
}

/// List the devices the relay knows (serial, model, site, firmware, tags, last seen), narrowed
/// by targets as `rollouts create --target` would select them.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  host-agent … devices list --target 'model=C300' --target 'firmware<2.0.0'\n  host-agent … devices list --target tag=night-shift --json"
)]
pub struct DeviceListArgs {
    /// A filter every listed device passes (see `rollouts create --target`).
    #[arg(long = "target", value_name = "FILTER")]
    pub targets: Vec<String>,
    /// Print a JSON array instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Add or remove tags on devices; rollout targets select by them (tag=GLOB).
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  host-agent … devices tag C3-0001 C3-0002 --add night-shift\n  host-agent … devices tag C3-0001 --remove night-shift"
)]
pub struct DeviceTagArgs {
    /// The devices' serials.
    #[arg(value_name = "SERIAL", required = true)]
    pub serials: Vec<String>,
    /// Tags to add (letters, digits, - _ . :).
    #[arg(long, value_name = "TAG")]
    pub add: Vec<String>,
    /// Tags to remove.
    #[arg(long, value_name = "TAG")]
    pub remove: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    Generate(KeysGenerateArgs),
}

/// Make a new ed25519 publisher key pair: DIR/publisher.key (the secret, readable only by you)
/// and DIR/publisher.pub (the public key, for devices). Needs no connection to the relay.
///
/// Sign uploads with the secret (`artifacts upload … --signing-key DIR/publisher.key`) and
/// provision every device with the public half (`device-agent … --publisher-key
/// DIR/publisher.pub`): a device refuses firmware whose signature does not verify with it.
/// An existing key is never overwritten: devices provisioned with it would refuse firmware
/// signed by a new one.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  host-agent keys generate --out keys
  device-agent … --publisher-key keys/publisher.pub")]
pub struct KeysGenerateArgs {
    /// The directory to write publisher.key and publisher.pub into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    const CONN: [&str; 9] = [
        "host-agent",
        "--broker",
        "mqtts://localhost:8883",
        "--ca",
        "ca.pem",
        "--cert",
        "svc.pem",
        "--key",
        "svc.key",
    ];

    fn parse(rest: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(CONN.iter().chain(rest))
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_parses_every_flag_and_passes_sections_through() {
        let cli = parse(&[
            "jobs",
            "submit",
            "--serial",
            "C123",
            "--kind",
            "get-data",
            "--sections",
            "counters,toner",
            "--at",
            "2026-11-27T02:00:00Z",
            "--deadline",
            "2026-11-28T00:00:00Z",
        ])
        .unwrap();
        assert_eq!(
            cli.connect.broker.unwrap().to_string(),
            "mqtts://localhost:8883"
        );
        assert_eq!(cli.connect.cert.unwrap(), PathBuf::from("svc.pem"));
        let Command::Jobs(JobsCommand::Submit(s)) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(s.serial.as_deref(), Some("C123"));
        assert_eq!(s.job.kind, "get-data");
        // Not checked here: the broker is the judge of section names (S103).
        assert_eq!(s.job.sections, ["counters", "toner"]);
        assert_eq!(s.job.at.as_deref(), Some("2026-11-27T02:00:00Z"));
        assert_eq!(s.job.deadline.as_deref(), Some("2026-11-28T00:00:00Z"));
        assert_eq!(s.job.execute_at, None);
    }

    #[test]
    fn submit_needs_serial_and_kind() {
        assert!(parse(&["jobs", "submit", "--kind", "get-data"]).is_err());
        assert!(parse(&["jobs", "submit", "--serial", "C1"]).is_err());
        let cli = parse(&["jobs", "submit", "--serial", "C1", "--kind", "get-data"]).unwrap();
        let Command::Jobs(JobsCommand::Submit(s)) = cli.command else {
            panic!("not submit")
        };
        assert!(
            s.job.sections.is_empty(),
            "no --sections means all, decided by the broker"
        );
    }

    #[test]
    fn list_show_and_watch_parse() {
        let cli = parse(&["jobs", "list", "--all", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Jobs(JobsCommand::List(ListArgs {
                all: true,
                json: true
            }))
        ));
        let cli = parse(&["jobs", "list"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Jobs(JobsCommand::List(ListArgs {
                all: false,
                json: false
            }))
        ));
        let cli = parse(&["jobs", "show", "J-000001", "--json"]).unwrap();
        let Command::Jobs(JobsCommand::Show(s)) = cli.command else {
            panic!("not show")
        };
        assert_eq!((s.id.as_str(), s.json), ("J-000001", true));
        let cli = parse(&["watch", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Watch(WatchArgs {
                json: true,
                alarms: false
            })
        ));
        let cli = parse(&["watch", "--alarms"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Watch(WatchArgs {
                json: false,
                alarms: true
            })
        ));
    }

    fn submit(rest: &[&str]) -> SubmitArgs {
        let mut args = vec!["jobs", "submit", "--serial", "C123"];
        args.extend_from_slice(rest);
        match parse(&args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
        {
            Command::Jobs(JobsCommand::Submit(s)) => *s,
            other => panic!("not submit: {other:?}"),
        }
    }

    #[test]
    fn update_data_flags_parse_and_repeat() {
        let s = submit(&[
            "--kind",
            "update-data",
            "--set",
            "adjustment.density=6",
            "--set",
            "settings.host_url=https://svc.example.com/?a=b",
            "--merge",
            "device",
        ]);
        assert_eq!(s.job.kind, "update-data");
        assert_eq!(
            s.job.set,
            [
                ("adjustment.density".to_owned(), Value::Int(6)),
                (
                    "settings.host_url".to_owned(),
                    Value::Text("https://svc.example.com/?a=b".into())
                ),
            ]
        );
        assert_eq!(s.job.merge.as_deref(), Some("device"));
        assert_eq!(submit(&["--kind", "update-data"]).job.set, []);
    }

    #[test]
    fn set_values_are_typed_integer_then_boolean_then_text() {
        let cases = [
            ("a.b=6", Value::Int(6)),
            ("a.b=-12", Value::Int(-12)),
            ("a.b=+3", Value::Int(3)),
            ("a.b=007", Value::Int(7)),
            ("a.b=true", Value::Bool(true)),
            ("a.b=false", Value::Bool(false)),
            ("a.b=True", Value::Text("True".into())),
            ("a.b=22:30", Value::Text("22:30".into())),
            ("a.b=1.5", Value::Text("1.5".into())),
            (
                "a.b=99999999999999999999",
                Value::Text("99999999999999999999".into()),
            ),
            ("a.b=", Value::Text(String::new())),
            ("a.b=x=y", Value::Text("x=y".into())),
            ("a.b=\"0042\"", Value::Text("0042".into())),
            ("a.b=\"true\"", Value::Text("true".into())),
            (" a.b =5", Value::Int(5)),
        ];
        for (arg, want) in cases {
            let (name, value) = parse_set(arg).unwrap_or_else(|e| panic!("{arg}: {e}"));
            assert_eq!(name, "a.b", "{arg}");
            assert_eq!(value, want, "{arg}");
        }
        for bad in ["adjustment.density", "=5", ""] {
            assert!(parse_set(bad).is_err(), "{bad:?}");
        }
        let e = parse(&[
            "jobs",
            "submit",
            "--serial",
            "C1",
            "--kind",
            "update-data",
            "--set",
            "x",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("SECTION.NAME=VALUE"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn firmware_flags_parse() {
        let s = submit(&[
            "--kind",
            "firmware",
            "--artifact",
            "2.1",
            "--execute-at",
            "2026-11-27T02:00:00Z",
            "--max-attempts",
            "2",
        ]);
        assert_eq!(s.job.artifact.as_deref(), Some("2.1"));
        assert_eq!(s.job.execute_at.as_deref(), Some("2026-11-27T02:00:00Z"));
        assert_eq!(s.job.max_attempts, Some(2));
        assert!(
            parse(&[
                "jobs",
                "submit",
                "--serial",
                "C1",
                "--kind",
                "firmware",
                "--max-attempts",
                "-1"
            ])
            .is_err()
        );
    }

    #[test]
    fn set_schedule_flags_parse_and_repeat() {
        let s = submit(&[
            "--kind",
            "set-schedule",
            "--mode",
            "periodic",
            "--interval-secs",
            "900",
            "--calendar",
            "weekly:sun 02:00",
            "--calendar",
            "hourly:05",
            "--moment",
            "power-on",
            "--moment",
            "operator-action",
            "--condition",
            "count:total/1000",
            "--condition",
            "fault:SC-541",
        ]);
        assert_eq!(s.job.mode.as_deref(), Some("periodic"));
        assert_eq!(s.job.interval_secs, Some(900));
        assert_eq!(s.job.calendar, ["weekly:sun 02:00", "hourly:05"]);
        assert_eq!(s.job.moments, ["power-on", "operator-action"]);
        assert_eq!(s.job.conditions, ["count:total/1000", "fault:SC-541"]);
    }

    #[test]
    fn cancel_keys_and_artifacts_parse() {
        let cli = parse(&["jobs", "cancel", "J-000042"]).unwrap();
        let Command::Jobs(JobsCommand::Cancel(c)) = cli.command else {
            panic!("not cancel")
        };
        assert_eq!(c.id, "J-000042");
        assert!(parse(&["jobs", "cancel"]).is_err());

        // keys needs no connection flags at all.
        let cli = Cli::try_parse_from(["host-agent", "keys", "generate", "--out", "k"]).unwrap();
        let Command::Keys(KeysCommand::Generate(k)) = cli.command else {
            panic!("not keys generate")
        };
        assert_eq!(k.out, PathBuf::from("k"));
        assert!(Cli::try_parse_from(["host-agent", "keys", "generate"]).is_err());

        let cli = parse(&[
            "artifacts",
            "upload",
            "fw.bin",
            "--version",
            "2.1",
            "--signing-key",
            "keys/publisher.key",
        ])
        .unwrap();
        let Command::Artifacts(ArtifactsCommand::Upload(u)) = cli.command else {
            panic!("not upload")
        };
        assert_eq!(
            (u.file, u.version.as_str(), u.signing_key),
            (
                PathBuf::from("fw.bin"),
                "2.1",
                PathBuf::from("keys/publisher.key")
            )
        );
        assert!(parse(&["artifacts", "upload", "fw.bin", "--version", "2.1"]).is_err());
        assert!(parse(&["artifacts", "upload", "fw.bin", "--signing-key", "k"]).is_err());

        let cli = parse(&["artifacts", "list", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Artifacts(ArtifactsCommand::List(ArtifactListArgs { json: true }))
        ));
    }

    #[test]
    fn dashboard_listens_on_loopback_by_default_and_takes_auth_from_a_file() {
        let cli = parse(&["dashboard"]).unwrap();
        let Command::Dashboard(d) = cli.command else {
            panic!("not dashboard")
        };
        assert_eq!(d.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!((d.auth, d.signing_key, d.counter_days), (None, None, 30));
        let cli = parse(&[
            "dashboard",
            "--listen",
            "0.0.0.0:9000",
            "--auth",
            "pw.txt",
            "--signing-key",
            "keys/publisher.key",
        ])
        .unwrap();
        let Command::Dashboard(d) = cli.command else {
            panic!("not dashboard")
        };
        assert_eq!(d.listen.port(), 9000);
        assert_eq!(d.auth, Some(PathBuf::from("pw.txt")));
        assert!(d.allowed_hosts.is_empty());
        assert!(parse(&["dashboard", "--listen", "localhost"]).is_err());
        let cli = parse(&[
            "dashboard",
            "--allowed-host",
            "dash.example.com",
            "--allowed-host",
            "office-pc:8080",
        ])
        .unwrap();
        let Command::Dashboard(d) = cli.command else {
            panic!("not dashboard")
        };
        let names: Vec<String> = d.allowed_hosts.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["dash.example.com", "office-pc:8080"]);
        let e = parse(&["dashboard", "--allowed-host", "http://x/"]).unwrap_err();
        assert!(e.to_string().contains("NAME:PORT"), "{e}");
    }

    #[test]
    fn connection_flags_may_follow_the_command_and_are_optional() {
        let cli = Cli::try_parse_from([
            "host-agent",
            "jobs",
            "list",
            "--config",
            "h.toml",
            "--timeout-secs",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.connect.config.unwrap(), PathBuf::from("h.toml"));
        assert_eq!(cli.connect.timeout_secs, Some(3));
        assert!(cli.connect.broker.is_none());
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        let e = Cli::try_parse_from(["host-agent", "--broker", "localhost:8883", "jobs", "list"])
            .unwrap_err();
        assert!(e.to_string().contains("mqtts://HOST:PORT"), "{e}");
        assert_eq!(e.exit_code(), 2);
        assert!(parse(&["--timeout-secs", "0", "jobs", "list"]).is_err());
        assert!(parse(&["jobs", "show"]).is_err());
        assert!(parse(&["jobs", "frobnicate"]).is_err());
    }
}
