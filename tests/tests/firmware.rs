//! Firmware (ISW, the seed's Fig. 6; claims 3–5, 12) end to end: a publisher key, a signed
//! upload, a resumable download that never fetches a held chunk twice, the device's own checks
//! (digest and signature), the write into the inactive A/B slot with the relay session closed,
//! power cuts, rollback after a failed health check, and the maintenance window.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use harness::{
    Broker, Device, Host, Proc, PublisherKeys, TestEnv, deadline, log_time, pseudo_random_bytes,
    secs,
};
use protocol::artifact::{CHUNK_SIZE, MAX_CHUNKS_PER_FETCH};
use serde_json::Value;

/// The factory image of a simulated copier (device-agent's `DEFAULT_FIRMWARE`).
const FACTORY: &str = "1.0.0";

/// One test's relay, host and publisher key.
struct World {
    env: TestEnv,
    broker: Broker,
    host: Host,
    keys: PublisherKeys,
}

impl World {
    async fn new(name: &str) -> World {
        let env = TestEnv::new(name);
        let broker = env.broker().start().await;
        let host = env.host("svc", &broker);
        let keys = host.keys_generate(&env.path("keys")).await;
        World {
            env,
            broker,
            host,
            keys,
        }
    }

    /// Writes an image of `len` pseudo-random bytes and uploads it as `version`, signed with
    /// this world's key: returns the artifact id and the file.
    async fn upload(&self, len: usize, version: &str) -> (String, PathBuf) {
        let file = self.env.path(format!("fw-{version}.bin"));
        let seed = version
            .bytes()
            .fold(len as u64, |h, b| h * 31 + u64::from(b));
        std::fs::write(&file, pseudo_random_bytes(len, seed))
            .unwrap_or_else(|e| panic!("could not write {}: {e}", file.display()));
        let id = self.host.upload(&file, version, &self.keys.secret).await;
        (id, file)
    }

    /// A device provisioned with this world's public key, its copier tuned by `sim` (a `[sim]`
    /// table's body).
    async fn device(&self, serial: &str, sim: &str) -> Device {
        self.env
            .device(serial)
            .publisher_key(&self.keys.public)
            .config(&format!("[sim]\n{sim}\n"))
            .start(&self.broker)
            .await
    }

    async fn submit_firmware(&self, serial: &str, artifact: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "--serial",
            serial,
            "--kind",
            "firmware",
            "--artifact",
            artifact,
        ];
        args.extend_from_slice(extra);
        self.host.submit(&args).await
    }

    /// The identification section as a get-data job reads it now.
    async fn identification(&self, serial: &str) -> Value {
        self.host.get_data(serial, "identification").await["identification"].clone()
    }
}

fn chunks_of(len: usize) -> u32 {
    len.div_ceil(CHUNK_SIZE as usize) as u32
}

/// The statuses of a job's timeline, in order.
fn statuses(detail: &Value) -> Vec<String> {
    detail["timeline"]
        .as_array()
        .unwrap_or_else(|| panic!("no timeline array in {detail:#}"))
        .iter()
        .map(|e| e["status"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// When the timeline's first event with `status` happened.
fn event_time(detail: &Value, status: &str) -> DateTime<Utc> {
    let event = detail["timeline"]
        .as_array()
        .and_then(|t| t.iter().find(|e| e["status"] == status))
        .unwrap_or_else(|| panic!("no {status:?} event in the timeline of {detail:#}"));
    let at = event["at"]
        .as_str()
        .unwrap_or_else(|| panic!("event without a time: {event}"));
    DateTime::parse_from_rfc3339(at)
        .unwrap_or_else(|e| panic!("event time {at:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

fn position(timeline: &[String], status: &str) -> usize {
    timeline
        .iter()
        .position(|s| s == status)
        .unwrap_or_else(|| panic!("no {status:?} in the timeline {timeline:?}"))
}

fn reason(detail: &Value) -> &str {
    detail["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("the job has no reason:\n{detail:#}"))
}

/// The chunk indices of one broker "chunks served" line (`chunks=[0, 1, 2]`).
fn served_indices(line: &str) -> Vec<u32> {
    let list = line
        .split_once("chunks=[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .unwrap_or_else(|| panic!("no chunks=[…] in {line:?}"));
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|e| panic!("bad index {s:?} in {line:?}: {e}"))
        })
        .collect()
}

/// Each "chunks served" line of `broker` for `job`, as its indices.
fn served(broker: &Proc, job: &str) -> Vec<Vec<u32>> {
    broker
        .lines_matching(|l| l.contains("chunks served") && l.contains(job))
        .iter()
        .map(|l| served_indices(l))
        .collect()
}

fn time_of(line: &str) -> DateTime<Utc> {
    log_time(line).unwrap_or_else(|| panic!("a log line without a time: {line}"))
}

fn rfc3339_in(d: Duration) -> String {
    let at = Utc::now() + chrono::Duration::from_std(d).expect("a small duration");
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[tokio::test]
async fn firmware_is_staged_then_written_while_the_device_has_no_session() {
    let w = World::new("firmware_happy_path").await;

    // keys generate: the secret readable only by its owner, the public half 64 hex digits.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&w.keys.secret)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_else(|e| panic!("{}: {e}", w.keys.secret.display()));
        assert_eq!(mode, 0o600, "publisher.key must be private");
    }
    let public = std::fs::read_to_string(&w.keys.public).expect("publisher.pub is readable");
    assert!(
        public.trim().len() == 64 && public.trim().chars().all(|c| c.is_ascii_hexdigit()),
        "publisher.pub is 64 hex digits: {public:?}"
    );

    // A few hundred KiB: several chunks, the last one short.
    let len = 300 * 1024 + 123;
    let (id, file) = w.upload(len, "2.0.0").await;
    let listed = w.host.artifacts_json().await;
    let info = listed
        .iter()
        .find(|a| a["id"] == id.as_str())
        .unwrap_or_else(|| panic!("`artifacts list --json` lacks {id}: {listed:#?}"));
    assert_eq!(info["complete"], true, "{info:#}");
    assert_eq!(info["version"], "2.0.0", "{info:#}");
    assert_eq!(info["size"], len, "{info:#}");
    assert_eq!(info["received"], chunks_of(len), "{info:#}");
    assert_eq!(info["publisher"], "svc", "{info:#}");
    // Uploading it again sends nothing: the relay already holds it complete.
    let again = w
        .host
        .run([
            "artifacts".as_ref(),
            "upload".as_ref(),
            file.as_os_str(),
            "--version".as_ref(),
            "2.0.0".as_ref(),
            "--signing-key".as_ref(),
            w.keys.secret.as_os_str(),
        ])
        .await;
    assert!(again.success(), "{again}");
    assert_eq!(again.stdout.trim(), id, "{again}");
    assert!(again.stderr.contains("already holds"), "{again}");
    assert_eq!(
        w.broker
            .lines_matching(|l| l.contains("artifact stored") && l.contains(&id))
            .len(),
        1,
        "the artifact was stored once"
    );

    // The write takes a while, so the session's absence can be seen from the relay.
    let c1 = w.device("C1", "write_delay_ms = 1500").await;
    let job = w.submit_firmware("C1", "2.0.0", &[]).await;
    let detail = w.host.wait_for_status(&job, "succeeded", deadline()).await;
    assert_eq!(detail["instruction"], "UPDATE ISW", "{detail:#}");
    let timeline = statuses(&detail);
    assert!(
        position(&timeline, "staged") < position(&timeline, "in-progress"),
        "staged (data acquired) comes before in-progress: {timeline:?}"
    );
    let id_section = w.identification("C1").await;
    assert_eq!(id_section["rom_version"], "2.0.0", "{id_section:#}");
    assert_eq!(id_section["active_slot"], "b", "{id_section:#}");
    assert_eq!(id_section["slot_a"], FACTORY, "{id_section:#}");
    w.broker
        .wait_for_line("C1's state with the new firmware", deadline(), |l| {
            l.contains("device state stored")
                && l.contains("serial=C1")
                && l.contains("firmware=2.0.0")
        })
        .await;

    // Every chunk was served exactly once.
    let served: Vec<u32> = served(&w.broker, &job).into_iter().flatten().collect();
    let want: Vec<u32> = (0..chunks_of(len)).collect();
    let mut sorted = served.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want, "each chunk served once: {served:?}");

    // No MQTT session while writing, as the relay saw it. The device logs "suspending relay
    // access" before it sends its DISCONNECT and reconnects only after "firmware written", so
    // these comparisons of the two logs' times follow cause and effect, not scheduling luck:
    // the session C1 had ended after the suspension began, and no session of C1 started from
    // then until the image was written and switched to. (The end is logged by the relay within
    // a fraction of a millisecond of the device's first "firmware write attempt"; the figures
    // are printed below.)
    let suspended = time_of(&c1.wait_for_log("suspending relay access", deadline()).await);
    let write = time_of(&c1.wait_for_log("firmware write attempt", deadline()).await);
    let written = time_of(&c1.wait_for_log("firmware written", deadline()).await);
    let c1_times = |pred: &dyn Fn(&str) -> bool| -> Vec<DateTime<Utc>> {
        w.broker
            .lines_matching(pred)
            .iter()
            .map(|l| time_of(l))
            .collect()
    };
    let ends = c1_times(&|l: &str| {
        (l.contains("session ended") || l.contains("session closed"))
            && l.contains("identity=device:C1")
    });
    let starts = c1_times(&|l: &str| l.contains("session started") && l.contains("client_id=C1 "));
    let closed = ends
        .iter()
        .copied()
        .find(|t| *t >= suspended && *t < written)
        .unwrap_or_else(|| {
            panic!(
                "the relay logged no end of C1's session between the suspension ({suspended}) and the end of the write ({written}): ends {ends:?}"
            )
        });
    let open_at = |t: DateTime<Utc>| {
        starts.iter().filter(|s| **s < t).count() as i64
            - ends.iter().filter(|e| **e < t).count() as i64
    };
    assert_eq!(
        open_at(written),
        0,
        "C1 had a session open when the image was written: starts {starts:?}, ends {ends:?}"
    );
    assert!(
        !starts.iter().any(|t| *t >= suspended && *t < written),
        "C1 started a session during the write ({suspended} to {written}): {starts:?}"
    );
    let next_start = starts
        .iter()
        .copied()
        .find(|t| *t >= written)
        .unwrap_or_else(|| panic!("C1 never came back after the write: {starts:?}"));
    eprintln!(
        "C1: suspended {suspended}, session end logged by the relay {closed} ({:+} µs from the first write attempt {write}), written {written}, next session {next_start}",
        (closed - write).num_microseconds().unwrap_or(i64::MAX)
    );
}

#[tokio::test]
async fn firmware_waits_staged_until_its_execution_time() {
    let w = World::new("firmware_execution_time").await;
    let (id, _) = w.upload(100 * 1024, "3.1").await;
    let _c1 = w.device("C1", "").await;

    let execute_at = rfc3339_in(secs(6));
    let at = DateTime::parse_from_rfc3339(&execute_at)
        .expect("chrono reads what it wrote")
        .with_timezone(&Utc);
    let job = w
        .submit_firmware("C1", &id, &["--execute-at", &execute_at])
        .await;
    let staged = w.host.wait_for_status(&job, "staged", deadline()).await;
    assert!(
        Utc::now() < at,
        "the download took past the execution time; the test proves nothing"
    );
    assert!(
        !statuses(&staged).iter().any(|s| s == "in-progress"),
        "{staged:#}"
    );
    let shown = staged["execution_time"]
        .as_str()
        .map(DateTime::parse_from_rfc3339);
    assert!(
        matches!(shown, Some(Ok(t)) if t == at),
        "execution_time is the --execute-at given:\n{staged:#}"
    );
    // Staged, the device takes other jobs.
    let other = w.host.submit_get_data("C1").await;
    w.host
        .wait_for_status(&other, "succeeded", deadline())
        .await;
    if Utc::now() < at {
        assert_eq!(w.host.show_json(&job).await["status"], "staged");
    }

    let detail = w
        .host
        .wait_for_status(&job, "succeeded", deadline() + secs(6))
        .await;
    let started = event_time(&detail, "in-progress");
    assert!(
        started >= at,
        "the write began at {started}, before the execution time {at}:\n{detail:#}"
    );
    assert!(event_time(&detail, "staged") < at, "{detail:#}");
    assert_eq!(w.identification("C1").await["rom_version"], "3.1");
}

#[tokio::test]
async fn a_staged_firmware_job_is_canceled_before_its_write_and_unknown_artifacts_are_rejected() {
    let w = World::new("firmware_cancel_staged").await;
    let (id, _) = w.upload(100 * 1024, "8.0").await;
    let c1 = w.device("C1", "").await;

    // Downloaded and waiting for a maintenance window an hour away: still withdrawable.
    let job = w
        .submit_firmware(
            "C1",
            "8.0",
            &["--execute-at", &rfc3339_in(Duration::from_secs(3600))],
        )
        .await;
    w.host.wait_for_status(&job, "staged", deadline()).await;
    let part = c1.data_dir().join("downloads").join(format!("{id}.part"));
    assert!(
        part.is_file(),
        "the staged image is kept at {}",
        part.display()
    );
    let out = w.host.cancel(&job).await;
    assert!(
        out.success(),
        "a staged firmware job can be canceled\n{out}"
    );
    c1.wait_for_line("\"job dropped: order withdrawn\"", deadline(), |l| {
        l.contains("job dropped: order withdrawn") && l.contains(&job)
    })
    .await;
    let detail = w.host.show_json(&job).await;
    assert_eq!(detail["status"], "canceled", "{detail:#}");
    assert!(
        !part.exists(),
        "the withdrawn job's download is removed: {}",
        part.display()
    );
    assert!(
        c1.lines_matching(|l| l.contains("firmware write attempt"))
            .is_empty(),
        "{}",
        c1.log()
    );

    // An artifact the relay does not have: rejected at submission, with what to do.
    for name in ["9.9", &"0".repeat(64)] {
        let out = w
            .host
            .run([
                "jobs",
                "submit",
                "--serial",
                "C1",
                "--kind",
                "firmware",
                "--artifact",
                name,
            ])
            .await;
        assert_eq!(out.status.code(), Some(1), "{out}");
        assert!(
            out.stderr.contains("artifacts upload"),
            "the reason says to upload it\n{out}"
        );
    }
    // A deadline before the maintenance window: the job could only time out, so it is refused.
    let out = w
        .host
        .run([
            "jobs",
            "submit",
            "--serial",
            "C1",
            "--kind",
            "firmware",
            "--artifact",
            &id,
            "--execute-at",
            &rfc3339_in(Duration::from_secs(7200)),
            "--deadline",
            &rfc3339_in(Duration::from_secs(3600)),
        ])
        .await;
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("is not after the execution time"),
        "{out}"
    );
    assert_eq!(w.identification("C1").await["rom_version"], FACTORY);
}

/// The device's "download started … held=N" line: how many chunks it already held.
fn held_at_start(line: &str) -> u32 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("held="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no held=N in {line:?}"))
}

/// Large enough for four fetch windows, so that a cut after the second request is mid-download.
const BIG: usize = 4 * MAX_CHUNKS_PER_FETCH * CHUNK_SIZE as usize - 1000;

#[tokio::test]
async fn download_resumes_after_an_agent_crash_without_refetching_held_chunks() {
    let w = World::new("download_resume_agent_crash").await;
    let (id, _) = w.upload(BIG, "4.0").await;
    let total = chunks_of(BIG);
    let mut c1 = w.device("C1", "").await;
    let job = w.submit_firmware("C1", &id, &[]).await;

    // The device asks for the next window only once the previous one is held and committed, so
    // at the second request the first window is on its disk.
    w.broker
        .wait_for_lines("two \"chunks served\" lines", 2, deadline(), |l| {
            l.contains("chunks served") && l.contains(&job)
        })
        .await;
    c1.kill9().await;
    let before = served(&w.broker, &job);
    let first_window: BTreeSet<u32> = before[0].iter().copied().collect();

    let c1 = w.device("C1", "").await;
    let started = c1.wait_for_log("download started", deadline()).await;
    let held = held_at_start(&started);
    w.host.wait_for_status(&job, "succeeded", deadline()).await;
    let after: Vec<u32> = served(&w.broker, &job)[before.len()..]
        .iter()
        .flatten()
        .copied()
        .collect();

    eprintln!(
        "{total} chunks; before the crash {} served in {} requests; the restarted agent held {held} and was served {}",
        before.iter().map(Vec::len).sum::<usize>(),
        before.len(),
        after.len()
    );
    assert!(
        held >= first_window.len() as u32 && held < total,
        "the restarted agent resumes mid-download, holding at least the first window ({} chunks): held={held} of {total}",
        first_window.len()
    );
    // What is asserted: after the restart the relay served each chunk at most once, and exactly
    // as many as the agent lacked (total − held). Every chunk is held at the end (the job
    // succeeded and the image verified), so no chunk the agent held was served again.
    let unique: BTreeSet<u32> = after.iter().copied().collect();
    assert_eq!(
        unique.len(),
        after.len(),
        "a chunk was served twice after the restart: {after:?}"
    );
    assert_eq!(
        after.len() as u32,
        total - held,
        "after the restart the relay served {} chunks, the agent lacked {}: {after:?}",
        after.len(),
        total - held
    );
    assert!(
        first_window.is_disjoint(&unique),
        "chunks of the first (committed) window were served again: {:?}",
        first_window.intersection(&unique).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn download_resumes_after_the_relay_dies_without_refetching_held_chunks() {
    let w = World::new("download_resume_relay_crash").await;
    let (id, _) = w.upload(BIG, "4.1").await;
    let total = chunks_of(BIG);
    let addr = w.broker.addr();
    let _c1 = w.device("C1", "").await;
    let job = w.submit_firmware("C1", &id, &[]).await;

    let mut first = w.broker;
    first
        .wait_for_lines("two \"chunks served\" lines", 2, deadline(), |l| {
            l.contains("chunks served") && l.contains(&job)
        })
        .await;
    // The cut link: the relay dies mid-download and comes back where it was.
    first.kill9().await;
    let before = served(&first, &job);
    let second = w.env.broker().listen(addr).start().await;
    let detail = w.host.wait_for_status(&job, "succeeded", deadline()).await;
    let after: Vec<u32> = served(&second, &job).into_iter().flatten().collect();

    // Every window but the last one asked of the first relay had all arrived before the
    // device asked for the next: those chunks were held when the link broke.
    let held: BTreeSet<u32> = before[..before.len() - 1]
        .iter()
        .flatten()
        .copied()
        .collect();
    let unique: BTreeSet<u32> = after.iter().copied().collect();
    eprintln!(
        "{total} chunks; first relay served {} in {} requests ({} surely held), the second {}",
        before.iter().map(Vec::len).sum::<usize>(),
        before.len(),
        held.len(),
        after.len()
    );
    assert!(
        !held.is_empty() && (held.len() as u32) < total,
        "the cut was mid-download"
    );
    assert_eq!(
        unique.len(),
        after.len(),
        "a chunk was served twice after the cut: {after:?}"
    );
    assert!(
        held.is_disjoint(&unique),
        "chunks held before the cut were served again: {:?}",
        held.intersection(&unique).collect::<Vec<_>>()
    );
    let all: BTreeSet<u32> = before
        .iter()
        .flatten()
        .copied()
        .chain(after.iter().copied())
        .collect();
    assert_eq!(all.len() as u32, total, "{detail:#}");
}

#[tokio::test]
async fn devices_refuse_firmware_with_a_wrong_signature_or_without_a_publisher_key() {
    let w = World::new("firmware_wrong_signature").await;
    let (id, _) = w.upload(64 * 1024, "5.0").await;
    // C1 trusts another publisher; C2 trusts none.
    let other = w.host.keys_generate(&w.env.path("other-keys")).await;
    let c1 = w
        .env
        .device("C1")
        .publisher_key(&other.public)
        .start(&w.broker)
        .await;
    let _c2 = w.env.device("C2").start(&w.broker).await;

    let job1 = w.submit_firmware("C1", &id, &[]).await;
    let job2 = w.submit_firmware("C2", &id, &[]).await;
    let d1 = w.host.wait_for_status(&job1, "failed", deadline()).await;
    let d2 = w.host.wait_for_status(&job2, "failed", deadline()).await;
    assert!(
        reason(&d1).contains("signature does not verify with the provisioned publisher key"),
        "{d1:#}"
    );
    assert!(
        reason(&d2).contains("no publisher key is provisioned"),
        "{d2:#}"
    );
    for job in [&job1, &job2] {
        assert!(
            served(&w.broker, job).is_empty(),
            "nothing is downloaded for firmware the device will not accept ({job})"
        );
    }
    assert!(
        c1.lines_matching(|l| l.contains("firmware write attempt"))
            .is_empty(),
        "{}",
        c1.log()
    );
    assert_eq!(w.identification("C1").await["rom_version"], FACTORY);
}

/// Flips one byte of `needle`'s only occurrence in `file`; panics if it is not there once.
fn flip_in_file(file: &Path, needle: &[u8]) {
    let mut bytes =
        std::fs::read(file).unwrap_or_else(|e| panic!("could not read {}: {e}", file.display()));
    let hits: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "the image's bytes should be in {} once",
        file.display()
    );
    bytes[hits[0] + needle.len() / 2] ^= 0xff;
    std::fs::write(file, bytes)
        .unwrap_or_else(|e| panic!("could not write {}: {e}", file.display()));
}

#[tokio::test]
async fn a_tampered_artifact_is_refused_by_the_device() {
    let mut w = World::new("firmware_tampered").await;
    let len = 100 * 1024;
    let (id, file) = w.upload(len, "6.0").await;
    let image = std::fs::read(&file).expect("the image is readable");
    let addr = w.broker.addr();
    assert!(w.broker.stop().await.success(), "the broker stops cleanly");

    // Someone with access to the relay's disk changes a byte of the stored image.
    let mut dbs: Vec<PathBuf> = std::fs::read_dir(w.env.path("broker-data"))
        .expect("the broker's data dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "redb"))
        .collect();
    assert_eq!(
        dbs.len(),
        1,
        "one redb file in the broker's data dir: {dbs:?}"
    );
    let at = CHUNK_SIZE as usize + 1000;
    flip_in_file(&dbs.remove(0), &image[at..at + 64]);

    w.broker = w.env.broker().listen(addr).start().await;
    let _c1 = w.device("C1", "").await;
    let job = w.submit_firmware("C1", &id, &[]).await;
    let detail = w.host.wait_for_status(&job, "failed", deadline()).await;
    assert!(reason(&detail).contains("digest mismatch"), "{detail:#}");
    assert!(
        !statuses(&detail)
            .iter()
            .any(|s| s == "staged" || s == "in-progress"),
        "a damaged image is never staged:\n{detail:#}"
    );
    assert_eq!(w.identification("C1").await["rom_version"], FACTORY);
}

/// What a power cut during the write led to.
struct AfterCut {
    /// The job once it ended.
    detail: Value,
    /// The identification section read after it ended.
    ids: Value,
    /// The restarted agent.
    c1: Device,
    _world: World,
}

/// Cuts the power while the device writes the image of a job allowed `max_attempts` writes,
/// restarts the agent and waits for the job to end.
async fn power_cut_during_write(name: &str, max_attempts: &str) -> AfterCut {
    let w = World::new(name).await;
    let (id, _) = w.upload(200 * 1024, "7.0").await;
    let mut c1 = w.device("C1", "write_delay_ms = 8000").await;
    let job = w
        .submit_firmware("C1", &id, &["--max-attempts", max_attempts])
        .await;
    c1.wait_for_log("firmware write attempt", deadline()).await;
    // The device is writing: too late to cancel safely, and the relay says so.
    let out = w.host.cancel(&job).await;
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "{job} is in progress on the device and cannot be stopped safely"
        )),
        "{out}"
    );
    // The power cut: mid-write (the write takes 8 s), the old slot still active.
    c1.kill9().await;
    let marker = c1.data_dir().join("slots").join("active");
    if let Ok(active) = std::fs::read_to_string(&marker) {
        assert_eq!(active.trim(), "a", "{} after the cut", marker.display());
    }
    drop(c1);

    let c1 = w.device("C1", "write_delay_ms = 100").await;
    c1.wait_for_log("interrupted firmware write found", deadline())
        .await;
    let detail = w.host.wait_for_end(&job, deadline()).await;
    let ids = w.identification("C1").await;
    AfterCut {
        detail,
        ids,
        c1,
        _world: w,
    }
}

#[tokio::test]
async fn power_cut_during_the_last_allowed_write_fails_with_the_old_slot_active() {
    let AfterCut {
        detail, ids, c1, ..
    } = power_cut_during_write("power_cut_no_retry", "1").await;
    assert_eq!(
        detail["status"], "failed",
        "max_attempts 1: no retry\n{detail:#}"
    );
    let why = reason(&detail);
    assert!(
        why.contains("interrupted during write")
            && why.contains(&format!("slot a still active (version {FACTORY})")),
        "{detail:#}"
    );
    assert_eq!(ids["active_slot"], "a", "{ids:#}");
    assert_eq!(ids["rom_version"], FACTORY, "{ids:#}");
    assert!(
        c1.lines_matching(|l| l.contains("firmware write attempt"))
            .is_empty(),
        "no second write with max_attempts 1:\n{}",
        c1.log()
    );
}

#[tokio::test]
async fn power_cut_during_a_write_with_attempts_left_writes_again() {
    let AfterCut {
        detail, ids, c1, ..
    } = power_cut_during_write("power_cut_retry", "2").await;
    assert_eq!(
        detail["status"], "succeeded",
        "max_attempts 2: the interrupted write is retried\n{detail:#}"
    );
    let line = c1.wait_for_log("firmware write attempt", deadline()).await;
    assert!(line.contains("attempt=2"), "the retry is attempt 2: {line}");
    assert_eq!(ids["active_slot"], "b", "{ids:#}");
    assert_eq!(ids["rom_version"], "7.0", "{ids:#}");
}

#[tokio::test]
async fn a_failed_health_check_rolls_back_and_is_reported() {
    let w = World::new("firmware_rollback").await;
    let (id, _) = w.upload(100 * 1024, "6.6.6").await;
    let c1 = w
        .device("C1", "fail_health_check_versions = [\"6.6.6\"]")
        .await;
    let job = w.submit_firmware("C1", &id, &[]).await;
    let detail = w.host.wait_for_status(&job, "failed", deadline()).await;
    let why = reason(&detail);
    assert!(
        why.contains("health check failed on version 6.6.6")
            && why.contains("rolled back")
            && why.contains(&format!("slot a (version {FACTORY})")),
        "{detail:#}"
    );
    c1.wait_for_log("rolled back", deadline()).await;
    let ids = w.identification("C1").await;
    assert_eq!(ids["active_slot"], "a", "{ids:#}");
    assert_eq!(ids["rom_version"], FACTORY, "{ids:#}");
}

#[tokio::test]
async fn a_periodic_device_takes_firmware_at_an_operator_check_in_and_reports_after_the_write() {
    let w = World::new("firmware_periodic").await;
    let (id, _) = w.upload(100 * 1024, "9.0").await;
    // Checks in at power-on, then only every hour or when the operator asks (SIGUSR1).
    let c1 = w
        .env
        .device("C1")
        .publisher_key(&w.keys.public)
        .config("[session]\ndrain_quiet_ms = 200\n[sim]\nwrite_delay_ms = 500\n")
        .arg("--session")
        .arg("periodic")
        .arg("--interval-secs")
        .arg("3600")
        .start(&w.broker)
        .await;
    c1.wait_for_log("check-in drained; disconnecting", deadline())
        .await;

    let job = w.submit_firmware("C1", &id, &[]).await;
    assert_eq!(
        w.host.show_json(&job).await["status"],
        "queued",
        "the device is between check-ins"
    );
    c1.signal("USR1");
    let detail = w.host.wait_for_status(&job, "succeeded", deadline()).await;
    let timeline = statuses(&detail);
    assert!(
        position(&timeline, "staged") < position(&timeline, "in-progress"),
        "{timeline:?}"
    );
    c1.wait_for_line("a check-in for the operator action", deadline(), |l| {
        l.contains("periodic check-in") && l.contains("operator")
    })
    .await;
    // The result went out on a session opened after the write, which then drained and closed.
    let written = time_of(&c1.wait_for_log("firmware written", deadline()).await);
    let resumed = c1
        .lines_matching(|l| l.contains("connected to broker"))
        .iter()
        .map(|l| time_of(l))
        .filter(|t| *t > written)
        .count();
    assert!(
        resumed >= 1,
        "the device reconnected after the write:\n{}",
        c1.log()
    );
    w.broker
        .wait_for_line("C1's state with the new firmware", deadline(), |l| {
            l.contains("device state stored")
                && l.contains("serial=C1")
                && l.contains("firmware=9.0")
        })
        .await;
    c1.wait_for_line("the check-in after the write ending", deadline(), |l| {
        l.contains("check-in drained; disconnecting") && time_of(l) > written
    })
    .await;
}

#[tokio::test]
async fn an_interrupted_upload_resumes_where_the_relays_copy_ends() {
    let w = World::new("upload_resume").await;
    let len = 16 << 20;
    let total = chunks_of(len);
    let file = w.env.path("fw-big.bin");
    std::fs::write(&file, pseudo_random_bytes(len, 10)).expect("the image is written");
    let args = |file: &Path| {
        vec![
            "artifacts".into(),
            "upload".into(),
            file.as_os_str().to_owned(),
            "--version".into(),
            "10.0".into(),
            "--signing-key".into(),
            w.keys.secret.as_os_str().to_owned(),
        ]
    };
    let held_by_relay = || async {
        let listed = w.host.artifacts_json().await;
        let info = listed.iter().find(|a| a["version"] == "10.0");
        match info {
            Some(a) if a["complete"] == true => Ok(Err(a.clone())),
            Some(a) if a["received"].as_u64().is_some_and(|n| n > 0) => Ok(Ok(a.clone())),
            other => Err(format!("{other:?}")),
        }
    };

    // The first upload is killed once the relay holds part of it.
    let mut first = w.host.spawn("upload-1", args(&file));
    let part = harness::poll_until("part of the upload at the relay", deadline(), held_by_relay)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|a| panic!("the upload finished before it could be cut: {a:#}"));
    first.kill9().await;
    let seen = part["received"].as_u64().expect("a number") as u32;

    let out = w.host.run(args(&file)).await;
    assert!(out.success(), "{out}");
    let begun = w
        .broker
        .lines_matching(|l| l.contains("upload begun") && l.contains("version=10.0"));
    assert_eq!(begun.len(), 2, "two uploads were begun: {begun:#?}");
    let resumed_at: u32 = begun[1]
        .split_whitespace()
        .find_map(|f| f.strip_prefix("received="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no received=N in {}", begun[1]));
    eprintln!(
        "{total} chunks; {seen} seen at the relay before the cut, the second upload resumed at {resumed_at}"
    );
    assert!(
        resumed_at >= seen && resumed_at < total,
        "the second upload resumes mid-way, at or after what the relay was seen holding ({seen}): {resumed_at} of {total}"
    );
    assert!(
        out.stderr.contains(&format!(
            "resumed: the relay already held {resumed_at} of {total} chunks; sent {}",
            total - resumed_at
        )),
        "{out}"
    );
    let listed = w.host.artifacts_json().await;
    let info = listed
        .iter()
        .find(|a| a["id"] == out.stdout.trim())
        .unwrap_or_else(|| panic!("the uploaded artifact is listed: {listed:#?}"));
    assert_eq!(info["complete"], true, "{info:#}");
    assert_eq!(info["received"], total, "{info:#}");
}
