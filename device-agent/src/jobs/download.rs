//! Downloading a firmware artifact chunk by chunk (Fig. 6, S415–S416), resuming where it stopped.
//!
//! Chunks are written at their place in `HOME/downloads/{artifact}.part`; which ones are held is a
//! bitmap in the agent's store, committed only after the chunks it names are synced to disk. So
//! after a cut link (the bitmap is in memory) or a restart (it is on disk) the device asks only for
//! the chunks it lacks. Requests go out in windows of at most [`MAX_CHUNKS_PER_FETCH`] on
//! `up/fetch`, outside the outbox (a lost request is simply asked again); chunks that have not
//! come after the fetch timeout, or when the link drops, are asked again.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::artifact::{
    ArtifactId, ArtifactRef, Chunk, FetchRequest, MAX_ARTIFACT_BYTES, MAX_CHUNKS_PER_FETCH,
};
use protocol::topic::{self, UpKind};
use protocol::{Envelope, Serial};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::{JobCtx, JobEnv};

/// Held chunks are committed to the store at least this often (and at the end of every window).
const FLUSH_EVERY: usize = 16;
/// Pause before asking again when a request could not leave although the session said online.
const RESEND_PAUSE: Duration = Duration::from_millis(200);

/// Which chunks of an artifact are held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    bits: Vec<u8>,
    total: u32,
}

impl Bitmap {
    pub fn new(total: u32) -> Bitmap {
        Bitmap {
            bits: vec![0; (total as usize).div_ceil(8)],
            total,
        }
    }

    /// From stored bytes; a bitmap of the wrong length (another artifact layout) starts over.
    pub fn from_bytes(bytes: Vec<u8>, total: u32) -> Bitmap {
        if bytes.len() == (total as usize).div_ceil(8) {
            Bitmap { bits: bytes, total }
        } else {
            Bitmap::new(total)
        }
    }

    pub fn has(&self, i: u32) -> bool {
        i < self.total && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    pub fn set(&mut self, i: u32) {
        if i < self.total {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    pub fn count(&self) -> u32 {
        (0..self.total).filter(|&i| self.has(i)).count() as u32
    }

    pub fn is_complete(&self) -> bool {
        self.count() == self.total
    }

    /// The chunks not held, in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.total).filter(|&i| !self.has(i))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }
}

/// Where an artifact's bytes are kept while and after they download.
pub fn part_path(home: &Path, artifact: &ArtifactId) -> PathBuf {
    home.join("downloads").join(format!("{artifact}.part"))
}

/// Why a download stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadError {
    /// The relay withdrew the job's order.
    Withdrawn,
    /// The agent is shutting down; what is held stays for the next start.
    Stopped,
    /// It cannot go on; the reason is the job's failure note.
    Failed(String),
}

/// The size chunk `i` must have.
fn chunk_len(a: &ArtifactRef, i: u32) -> u64 {
    let start = u64::from(i) * u64::from(a.chunk_size);
    a.size.saturating_sub(start).min(u64::from(a.chunk_size))
}

/// Checks what the relay says about an artifact before trusting it with the disk.
fn check_layout(a: &ArtifactRef) -> Result<(), String> {
    if a.chunk_size == 0 {
        return Err("the artifact's chunk size is 0".into());
    }
    if a.size > MAX_ARTIFACT_BYTES {
        return Err(format!(
            "the artifact is {} bytes, over the limit of {MAX_ARTIFACT_BYTES}",
            a.size
        ));
    }
    Ok(())
}

/// Downloads what is missing of `a` and returns the file. Returns at once if all is held.
pub async fn download(ctx: &mut JobCtx<'_>, a: &ArtifactRef) -> Result<PathBuf, DownloadError> {
    check_layout(a).map_err(DownloadError::Failed)?;
    let (serial, job) = (ctx.serial().clone(), ctx.job().clone());
    let path = part_path(&ctx.env.home, &a.id);
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        DownloadError::Failed(format!("{what} {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed("could not create the directory of", &e))?;
    }
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| failed("could not open", &e))?;
    let total = a.chunks();
    let stored = ctx
        .env
        .store
        .held_chunks(&serial, &a.id)
        .await
        .map_err(|e| DownloadError::Failed(e.to_string()))?;
    let mut held = match stored {
        // A bitmap without its file (someone removed it) holds nothing.
        Some(bytes) if existed => Bitmap::from_bytes(bytes, total),
        _ => Bitmap::new(total),
    };
    if file.metadata().map(|m| m.len()).ok() != Some(a.size) {
        file.set_len(a.size)
            .map_err(|e| failed("could not size", &e))?;
    }
    if held.is_complete() {
        return Ok(path);
    }
    info!(
        serial = %serial, job = %job, artifact = %a.id, chunks = total, held = held.count(),
        "download started"
    );
    let mut file = Some(file);
    let mut dirty = 0usize;
    while !held.is_complete() {
        tokio::select! {
            online = ctx.env.relay.wait_online() => if !online { return Err(DownloadError::Stopped) },
            () = ctx.withdrawn.cancelled() => return Err(DownloadError::Withdrawn),
            () = ctx.env.stop.cancelled() => return Err(DownloadError::Stopped),
        }
        // Chunks that arrived around a reconnect (rumqttc hands over what it read before the
        // link broke only after it reconnects) count before anything is asked again.
        while let Some(chunk) = ctx.inbox.try_chunk() {
            if let Some(f) = &file
                && take_chunk(f, a, &mut held, &chunk, &path)?
            {
                dirty += 1;
            }
        }
        if held.is_complete() {
            break;
        }
        let window: Vec<u32> = held.missing().take(MAX_CHUNKS_PER_FETCH).collect();
        let request = FetchRequest {
            job: job.clone(),
            artifact: a.id.clone(),
            chunks: window.clone(),
        };
        let payload = Envelope::new(0, chrono::Utc::now(), request)
            .to_cbor()
            .map_err(|e| DownloadError::Failed(e.to_string()))?;
        if !ctx
            .env
            .relay
            .publish(topic::dev_up(&serial, UpKind::Fetch), payload)
            .await
        {
            tokio::time::sleep(RESEND_PAUSE).await;
            continue;
        }
        debug!(serial = %serial, job = %job, artifact = %a.id, chunks = ?window, "chunks requested");
        let mut outstanding: BTreeSet<u32> = window.into_iter().collect();
        let ended = loop {
            if outstanding.is_empty() {
                break None;
            }
            tokio::select! {
                // Chunks that came are taken before a lost link or a timeout is acted on.
                biased;
                chunk = ctx.inbox.chunk() => {
                    let Some(chunk) = chunk else { break Some(DownloadError::Stopped) };
                    if let Some(f) = &file
                        && take_chunk(f, a, &mut held, &chunk, &path)?
                    {
                        outstanding.remove(&chunk.index);
                        dirty += 1;
                        if dirty >= FLUSH_EVERY {
                            file = Some(flush(ctx, file.take(), &serial, a, &held).await?);
                            dirty = 0;
                        }
                    }
                }
                () = ctx.withdrawn.cancelled() => break Some(DownloadError::Withdrawn),
                () = ctx.env.stop.cancelled() => break Some(DownloadError::Stopped),
                () = ctx.env.relay.wait_offline() => {
                    debug!(serial = %serial, job = %job, "link lost during the download; asking again after reconnecting");
                    break None;
                }
                () = tokio::time::sleep(ctx.env.fetch_timeout) => {
                    debug!(serial = %serial, job = %job, missing = outstanding.len(), "chunks did not come; asking again");
                    break None;
                }
            }
        };
        // What the session passed on before the link dropped is held before anything is asked again.
        while let Some(chunk) = ctx.inbox.try_chunk() {
            if let Some(f) = &file
                && take_chunk(f, a, &mut held, &chunk, &path)?
            {
                dirty += 1;
            }
        }
        if dirty > 0 {
            file = Some(flush(ctx, file.take(), &serial, a, &held).await?);
            dirty = 0;
        }
        if let Some(e) = ended {
            return Err(e);
        }
    }
    if dirty > 0 {
        flush(ctx, file.take(), &serial, a, &held).await?;
    }
    info!(serial = %serial, job = %job, artifact = %a.id, chunks = total, "download complete");
    Ok(path)
}

/// Writes a chunk in place if it belongs to this download and is not held yet. `Ok(true)`: taken.
fn take_chunk(
    file: &File,
    a: &ArtifactRef,
    held: &mut Bitmap,
    chunk: &Chunk,
    path: &Path,
) -> Result<bool, DownloadError> {
    if chunk.artifact != a.id || chunk.index >= a.chunks() || held.has(chunk.index) {
        return Ok(false);
    }
    let want = chunk_len(a, chunk.index);
    if chunk.data.len() as u64 != want {
        warn!(artifact = %a.id, index = chunk.index, len = chunk.data.len(), want, "chunk of the wrong size ignored");
        return Ok(false);
    }
    let offset = u64::from(chunk.index) * u64::from(a.chunk_size);
    file.write_all_at(&chunk.data, offset).map_err(|e| {
        DownloadError::Failed(format!("could not write to {}: {e}", path.display()))
    })?;
    held.set(chunk.index);
    Ok(true)
}

/// Syncs the file, then commits the bitmap: the store never claims a chunk the disk lacks.
async fn flush(
    ctx: &JobCtx<'_>,
    file: Option<File>,
    serial: &Serial,
    a: &ArtifactRef,
    held: &Bitmap,
) -> Result<File, DownloadError> {
    let Some(file) = file else {
        return Err(DownloadError::Failed("download file closed".into()));
    };
    let file = tokio::task::spawn_blocking(move || file.sync_data().map(|()| file))
        .await
        .map_err(|e| DownloadError::Failed(e.to_string()))?
        .map_err(|e| DownloadError::Failed(format!("could not sync the download: {e}")))?;
    ctx.env
        .store
        .set_held_chunks(serial, &a.id, held.as_bytes().to_vec())
        .await
        .map_err(|e| DownloadError::Failed(e.to_string()))?;
    Ok(file)
}

/// SHA-256 and length of a file, on a blocking thread.
pub async fn digest_file(path: &Path) -> std::io::Result<([u8; 32], u64)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut f = File::open(&path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            len += n as u64;
            hasher.update(&buf[..n]);
        }
        Ok((hasher.finalize().into(), len))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Removes a finished or abandoned download: its file and its bitmap.
pub async fn forget(env: &JobEnv, artifact: &ArtifactId) {
    let path = part_path(&env.home, artifact);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "could not remove a finished download");
    }
    if let Err(e) = env.store.forget_download(env.serial(), artifact).await {
        warn!(serial = %env.serial(), error = %e, "could not forget a finished download");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::shared;
    use crate::jobs::testkit::{Kit, kit, order};
    use crate::relay::{Control, Incoming};
    use crate::sim::{SimCopier, SimSettings};
    use protocol::job::JobSpec;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn bitmap_tracks_what_is_held() {
        let mut b = Bitmap::new(10);
        assert_eq!(b.as_bytes().len(), 2);
        b.set(0);
        b.set(9);
        b.set(42); // out of range: ignored
        assert!(b.has(0) && b.has(9) && !b.has(1));
        assert_eq!(b.missing().collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7, 8]);
        let back = Bitmap::from_bytes(b.as_bytes().to_vec(), 10);
        assert_eq!(back, b);
        assert_eq!(
            Bitmap::from_bytes(vec![0xff], 10).count(),
            0,
            "wrong length starts over"
        );
        assert!(Bitmap::new(0).is_complete());
    }

    fn artifact(bytes: &[u8], chunk_size: u32) -> ArtifactRef {
        ArtifactRef {
            id: ArtifactId::from_digest(&Sha256::digest(bytes).into()),
            version: "2.0".into(),
            size: bytes.len() as u64,
            chunk_size,
            signature: String::new(),
            publisher: "svc".into(),
        }
    }

    /// Plays the relay: answers each fetch with the chunks asked for, except those `skip` says
    /// to hold back (once each); records every request.
    fn serve(
        k: &mut Kit,
        bytes: Vec<u8>,
        chunk_size: u32,
        mut skip: impl FnMut(u32) -> bool + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<Vec<u32>>> {
        let (_, dummy) = crate::relay::pair();
        let mut control = std::mem::replace(&mut k.session.control, dummy.control);
        let to_inbox = k.to_inbox.clone();
        k.session.online.send_replace(true);
        tokio::spawn(async move {
            let mut asked = Vec::new();
            while let Some(msg) = control.recv().await {
                let Control::Publish { payload, reply, .. } = msg else {
                    continue;
                };
                let _ = reply.send(true);
                let req: Envelope<FetchRequest> = Envelope::from_cbor(&payload, 1 << 20).unwrap();
                asked.push(req.body.chunks.clone());
                for i in req.body.chunks {
                    if skip(i) {
                        continue;
                    }
                    let start = i as usize * chunk_size as usize;
                    let end = (start + chunk_size as usize).min(bytes.len());
                    let _ = to_inbox.send(Incoming::Chunk(Chunk {
                        artifact: req.body.artifact.clone(),
                        index: i,
                        data: bytes[start..end].to_vec(),
                    }));
                }
            }
            asked
        })
    }

    async fn run(k: &mut Kit, a: &ArtifactRef) -> Result<PathBuf, DownloadError> {
        let order = order(JobSpec::Firmware {
            artifact: a.clone(),
        });
        let withdrawn = CancellationToken::new();
        let mut ctx = JobCtx {
            order: &order,
            env: &k.env,
            inbox: &mut k.inbox,
            withdrawn: &withdrawn,
        };
        download(&mut ctx, a).await
    }

    fn sim_kit() -> Kit {
        kit(
            shared(SimCopier::new(
                &Serial::parse("C1").unwrap(),
                &SimSettings::default(),
            )),
            None,
        )
    }

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_download_fetches_every_chunk_in_windows_and_reasks_what_did_not_come() {
        let bytes = image(100 * 10 + 3); // 101 chunks of 10 bytes: two windows
        let a = artifact(&bytes, 10);
        let mut k = sim_kit();
        let mut lost = vec![5u32, 70];
        let server = serve(&mut k, bytes.clone(), 10, move |i| {
            lost.iter()
                .position(|&l| l == i)
                .map(|p| lost.remove(p))
                .is_some()
        });
        let path = run(&mut k, &a).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        drop(k);
        let asked = server.await.unwrap();
        let all: Vec<u32> = asked.iter().flatten().copied().collect();
        assert!(asked.iter().all(|w| w.len() <= MAX_CHUNKS_PER_FETCH));
        assert_eq!(
            all.iter().filter(|&&i| i == 5).count(),
            2,
            "5 was lost once: {asked:?}"
        );
        assert_eq!(
            all.iter().filter(|&&i| i == 6).count(),
            1,
            "6 came the first time"
        );
        assert_eq!(all.len(), 101 + 2);
    }

    #[tokio::test]
    async fn download_resume_asks_only_for_missing_chunks() {
        let bytes = image(40 * 8);
        let a = artifact(&bytes, 8);
        let dir;
        let held_before;
        {
            // First run: chunks 20.. never come; the agent stops (withdrawn, here) part-way.
            let mut k = sim_kit();
            let server = serve(&mut k, bytes.clone(), 8, |i| i >= 20);
            let order = order(JobSpec::Firmware {
                artifact: a.clone(),
            });
            let withdrawn = CancellationToken::new();
            let w = withdrawn.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                w.cancel();
            });
            let mut ctx = JobCtx {
                order: &order,
                env: &k.env,
                inbox: &mut k.inbox,
                withdrawn: &withdrawn,
            };
            assert_eq!(download(&mut ctx, &a).await, Err(DownloadError::Withdrawn));
            held_before = k
                .env
                .store
                .held_chunks(k.env.serial(), &a.id)
                .await
                .unwrap()
                .map(|b| Bitmap::from_bytes(b, 40))
                .unwrap();
            assert_eq!(held_before.count(), 20);
            // Same store, same home: a restart.
            let env_dir = k.dir;
            drop(k.env);
            drop(k.inbox);
            drop(k.session);
            server.abort();
            dir = env_dir;
        }
        let outbox = crate::outbox::Outbox::open(&dir.path().join("agent.redb")).unwrap();
        let mut k = sim_kit();
        k.env.store = outbox.store();
        k.env.outbox = outbox;
        k.env.home = dir.path().to_owned();
        let server = serve(&mut k, bytes.clone(), 8, |_| false);
        let path = run(&mut k, &a).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        drop(k);
        let asked: Vec<u32> = server.await.unwrap().into_iter().flatten().collect();
        assert_eq!(
            asked,
            (20..40).collect::<Vec<_>>(),
            "only the missing chunks"
        );
    }

    #[tokio::test]
    async fn chunks_of_the_wrong_size_or_artifact_are_not_taken() {
        let bytes = image(30);
        let a = artifact(&bytes, 10);
        let mut k = sim_kit();
        // Before the real server answers, junk arrives.
        k.to_inbox
            .send(Incoming::Chunk(Chunk {
                artifact: a.id.clone(),
                index: 0,
                data: vec![0; 9],
            }))
            .unwrap();
        k.to_inbox
            .send(Incoming::Chunk(Chunk {
                artifact: ArtifactId::from_digest(&[9; 32]),
                index: 1,
                data: vec![0; 10],
            }))
            .unwrap();
        let server = serve(&mut k, bytes.clone(), 10, |_| false);
        let path = run(&mut k, &a).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        drop(k);
        server.await.unwrap();
    }
}
