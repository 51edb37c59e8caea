//! UPDATE ISW (Fig. 6; claims 3–5, 12): replace the device's firmware.
//!
//! - **Instruction time**: check the publisher's signature (with the key this device was
//!   provisioned with: the relay stores and forwards artifacts but cannot forge one), download the
//!   image ([`super::download`], resuming), check its SHA-256 against the artifact id, report
//!   `staged` (Fig. 9 "data acquired") and wait for the execution time, taking other jobs meanwhile.
//! - **Execution time** (a maintenance window): report `in-progress` and wait until the relay has
//!   it, then **suspend relay access** — close the MQTT session, take no job — and write the image
//!   into the inactive slot of the A/B pair, read it back, retry up to the job's `max_attempts`,
//!   switch slots, boot and health-check; a failed health check switches back (rollback). The
//!   result is committed to the outbox, then the session reopens and sends it (S421–S423).
//! - **Power cut**: a write-intent is committed before every risky step. At the next start the
//!   agent finds it with the old slot still active and writes again if attempts remain, else
//!   reports the job failed — before it reconnects.

use std::path::{Path, PathBuf};

use protocol::artifact::ArtifactRef;
use protocol::device::AckOutcome;
use protocol::job::JobStatus;
use tracing::{info, warn};

use super::download::{self, DownloadError};
use super::{JobCtx, Outcome, Phase, Step};
use crate::device::{self, Slot};
use crate::store::{WriteIntent, WriteStep};

pub use pki::publisher::{NO_PUBLISHER_KEY, PublisherKey, check_signature};

/// Checks the downloaded file against the artifact's id (its SHA-256) and size.
async fn check_digest(path: &Path, a: &ArtifactRef) -> Result<(), String> {
    match download::digest_file(path).await {
        Ok((digest, len)) if digest == a.id.digest() && len == a.size => Ok(()),
        Ok(_) => Err(format!(
            "digest mismatch: the downloaded bytes do not hash to {}; the artifact at the relay is damaged or was tampered with",
            a.id
        )),
        Err(e) => Err(format!(
            "could not read the download {}: {e}",
            path.display()
        )),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Firmware {
    artifact: ArtifactRef,
}

impl Firmware {
    pub fn new(artifact: ArtifactRef) -> Firmware {
        Firmware { artifact }
    }

    pub async fn run(self, ctx: &mut JobCtx<'_>, phase: Phase) -> Step {
        match phase {
            Phase::Instruction => self.fetch(ctx).await,
            Phase::Execution => self.execute(ctx).await,
            Phase::Recover(intent) => self.recover(ctx, *intent).await,
        }
    }

    /// Downloads the image (resuming) and checks it. `Err` is the job's end.
    async fn image(&self, ctx: &mut JobCtx<'_>) -> Result<PathBuf, Step> {
        let a = &self.artifact;
        let path = match download::download(ctx, a).await {
            Ok(p) => p,
            Err(DownloadError::Withdrawn) => {
                download::forget(ctx.env, &a.id).await;
                return Err(Step::Dropped);
            }
            // What is held stays for the next start.
            Err(DownloadError::Stopped) => return Err(Step::Dropped),
            Err(DownloadError::Failed(why)) => {
                return Err(Step::Done(Outcome::failed(format!(
                    "download failed: {why}"
                ))));
            }
        };
        if let Err(why) = check_digest(&path, a).await {
            // A damaged download is of no use to anyone: the next try starts afresh.
            download::forget(ctx.env, &a.id).await;
            return Err(Step::Done(Outcome::failed(why)));
        }
        Ok(path)
    }

    /// At the instruction time: verify, download, stage.
    async fn fetch(self, ctx: &mut JobCtx<'_>) -> Step {
        let a = &self.artifact;
        if let Err(why) = check_signature(ctx.env.publisher.as_ref(), a) {
            warn!(serial = %ctx.serial(), job = %ctx.job(), artifact = %a.id, reason = %why, "firmware refused");
            return Step::Done(Outcome::failed(why));
        }
        let note = format!(
            "downloading firmware {} ({} bytes, {} chunks)",
            a.version,
            a.size,
            a.chunks()
        );
        let (job, stop) = (ctx.job().clone(), ctx.env.stop.clone());
        ctx.env
            .report
            .status_until_stored(&job, JobStatus::Delivered, Some(note), &stop)
            .await;
        if let Err(end) = self.image(ctx).await {
            return end;
        }
        let execution = ctx.order.execution_time;
        let note = match execution {
            Some(t) if t > chrono::Utc::now() => format!(
                "firmware {} downloaded and verified; writing at {}",
                a.version,
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            _ => format!("firmware {} downloaded and verified", a.version),
        };
        ctx.env
            .report
            .status_until_stored(&job, JobStatus::Staged, Some(note), &stop)
            .await;
        info!(
            serial = %ctx.serial(), job = %job, artifact = %a.id, version = %a.version,
            execution_time = ?execution.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            "firmware staged"
        );
        match execution {
            Some(until) if until > chrono::Utc::now() => Step::Park { until },
            _ => self.execute(ctx).await,
        }
    }

    /// At the execution time: announce, suspend, write, switch, check, report, resume.
    async fn execute(self, ctx: &mut JobCtx<'_>) -> Step {
        let a = &self.artifact;
        let (serial, job, stop) = (
            ctx.serial().clone(),
            ctx.job().clone(),
            ctx.env.stop.clone(),
        );
        // The image may have been downloaded long ago: check it (and the signature) again.
        if let Err(why) = check_signature(ctx.env.publisher.as_ref(), a) {
            return Step::Done(Outcome::failed(why));
        }
        let path = match self.image(ctx).await {
            Ok(p) => p,
            Err(end) => return end,
        };
        let slots = match device::call(&ctx.env.device, |d| d.slots()).await {
            Ok(s) => s,
            Err(e) => return Step::Done(Outcome::failed(e.to_string())),
        };
        let target = slots.active.other();
        let old_version = slots.active_version().to_owned();
        let note = format!(
            "writing firmware {} into slot {target} (slot {} runs {old_version})",
            a.version, slots.active
        );
        let Some(id) = ctx
            .env
            .report
            .status_until_stored(&job, JobStatus::InProgress, Some(note), &stop)
            .await
        else {
            return Step::Dropped;
        };
        // The relay must know the device is busy before it goes quiet.
        let acked = tokio::select! {
            acked = ctx.env.relay.acked(id) => acked,
            () = ctx.withdrawn.cancelled() => None,
            () = stop.cancelled() => None,
        };
        match acked {
            Some(AckOutcome::Stored | AckOutcome::Duplicate) if !ctx.withdrawn.is_cancelled() => {}
            Some(AckOutcome::Rejected { reason }) => {
                warn!(serial = %serial, job = %job, reason = %reason, "the relay refused the start of the write");
                return Step::Dropped;
            }
            _ => return Step::Dropped,
        }
        info!(serial = %serial, job = %job, "suspending relay access for firmware write");
        ctx.env.relay.suspend().await;
        let outcome = self.write(ctx, &path, target, &old_version, 1).await;
        self.finish(ctx, outcome).await
    }

    /// Writes and verifies `slot`, attempts `first..=max_attempts`, then boots it.
    async fn write(
        &self,
        ctx: &mut JobCtx<'_>,
        image: &Path,
        slot: Slot,
        old_version: &str,
        first: u32,
    ) -> Outcome {
        let a = &self.artifact;
        let (serial, job) = (ctx.serial().clone(), ctx.job().clone());
        let max = ctx.order.max_attempts.max(1);
        let mut last = String::new();
        for attempt in first..=max {
            let intent = WriteIntent {
                order: ctx.order.clone(),
                attempt,
                slot,
                old_version: old_version.to_owned(),
                step: WriteStep::Write,
            };
            if let Err(e) = ctx.env.store.set_write_intent(&serial, &intent).await {
                return Outcome::failed(format!(
                    "could not record the write-intent ({e}); nothing was written; slot {} still active (version {old_version})",
                    slot.other()
                ));
            }
            info!(serial = %serial, job = %job, attempt, max_attempts = max, slot = %slot, version = %a.version, "firmware write attempt");
            let (img, version, want) = (image.to_owned(), a.version.clone(), a.id.digest());
            let written = device::call(&ctx.env.device, move |d| {
                d.write_image(slot, &img, &version)?;
                d.image_digest(slot)
            })
            .await;
            match written {
                Ok(digest) if digest == want => {
                    return self.boot(ctx, slot, old_version).await;
                }
                Ok(_) => last = format!("slot {slot} does not read back as {}", a.id),
                Err(e) => last = e.to_string(),
            }
            warn!(serial = %serial, job = %job, attempt, slot = %slot, reason = %last, "firmware write failed");
        }
        Outcome::failed(format!(
            "writing slot {slot} failed {} time(s) (last: {last}); slot {} still active (version {old_version})",
            max + 1 - first,
            slot.other()
        ))
    }

    /// Switches to the written slot and checks the device's health; rolls back if it is not well.
    async fn boot(&self, ctx: &mut JobCtx<'_>, slot: Slot, old_version: &str) -> Outcome {
        let a = &self.artifact;
        let (serial, job) = (ctx.serial().clone(), ctx.job().clone());
        self.set_step(ctx, slot, old_version, WriteStep::Boot).await;
        if let Err(e) = device::call(&ctx.env.device, move |d| d.activate(slot)).await {
            return Outcome::failed(format!(
                "could not switch to slot {slot}: {e}; slot {} still active (version {old_version})",
                slot.other()
            ));
        }
        info!(serial = %serial, job = %job, slot = %slot, version = %a.version, "firmware written");
        match device::call(&ctx.env.device, |d| d.health_check()).await {
            Ok(()) => {
                info!(serial = %serial, job = %job, slot = %slot, version = %a.version, "firmware healthy");
                Outcome::succeeded(None)
                    .with_note(format!("slot {slot} active, version {}", a.version))
            }
            Err(e) => self.rollback(ctx, slot, old_version, &e.to_string()).await,
        }
    }

    /// Switches back to the slot that ran before.
    async fn rollback(
        &self,
        ctx: &mut JobCtx<'_>,
        failed_slot: Slot,
        old_version: &str,
        why: &str,
    ) -> Outcome {
        let a = &self.artifact;
        let (serial, job) = (ctx.serial().clone(), ctx.job().clone());
        let back = failed_slot.other();
        warn!(serial = %serial, job = %job, slot = %failed_slot, version = %a.version, reason = %why, "health check failed");
        self.set_step(ctx, failed_slot, old_version, WriteStep::Rollback)
            .await;
        match device::call(&ctx.env.device, move |d| d.activate(back)).await {
            Ok(()) => {
                info!(serial = %serial, job = %job, slot = %back, version = %old_version, "rolled back");
                Outcome::failed(format!(
                    "health check failed on version {}; rolled back to slot {back} (version {old_version}): {why}",
                    a.version
                ))
            }
            Err(e) => Outcome::failed(format!(
                "health check failed on version {} ({why}), and switching back to slot {back} failed too: {e}",
                a.version
            )),
        }
    }

    async fn set_step(&self, ctx: &JobCtx<'_>, slot: Slot, old_version: &str, step: WriteStep) {
        let attempt = match ctx.env.store.write_intent(ctx.serial()).await {
            Ok(Some(i)) => i.attempt,
            _ => 1,
        };
        let intent = WriteIntent {
            order: ctx.order.clone(),
            attempt,
            slot,
            old_version: old_version.to_owned(),
            step,
        };
        if let Err(e) = ctx.env.store.set_write_intent(ctx.serial(), &intent).await {
            // The step goes on: a power cut now would be recovered as the previous step.
            warn!(serial = %ctx.serial(), job = %ctx.job(), error = %e, "could not record the write step");
        }
    }

    /// Commits the end (which marks the job finished), drops the intent and the download, and
    /// reopens the session, which sends the result.
    async fn finish(self, ctx: &mut JobCtx<'_>, outcome: Outcome) -> Step {
        let (serial, job, stop) = (
            ctx.serial().clone(),
            ctx.job().clone(),
            ctx.env.stop.clone(),
        );
        let status = outcome.status;
        if let Some(note) = &outcome.note
            && status == JobStatus::Failed
        {
            warn!(serial = %serial, job = %job, note = %note, "firmware job failed");
        }
        let stored = ctx
            .env
            .report
            .update_until_stored(outcome.into_update(&job), &stop)
            .await;
        if stored.is_some() {
            if let Err(e) = ctx.env.store.clear_write_intent(&serial).await {
                warn!(serial = %serial, job = %job, error = %e, "could not clear the write-intent; it is cleared at the next start");
            }
            download::forget(ctx.env, &self.artifact.id).await;
        }
        info!(serial = %serial, job = %job, "resuming relay access");
        ctx.env.relay.resume();
        Step::Reported(status)
    }

    /// At start: a write-intent was found, so a power cut interrupted this job.
    async fn recover(self, ctx: &mut JobCtx<'_>, intent: WriteIntent) -> Step {
        let (serial, job) = (ctx.serial().clone(), ctx.job().clone());
        let max = ctx.order.max_attempts.max(1);
        info!(
            serial = %serial, job = %job, attempt = intent.attempt, max_attempts = max,
            slot = %intent.slot, step = ?intent.step, "interrupted firmware write found"
        );
        ctx.env.relay.suspend().await;
        let old = intent.slot.other();
        let outcome = match intent.step {
            WriteStep::Boot => self.boot(ctx, intent.slot, &intent.old_version).await,
            WriteStep::Rollback => {
                self.rollback(
                    ctx,
                    intent.slot,
                    &intent.old_version,
                    "interrupted while rolling back",
                )
                .await
            }
            WriteStep::Write if intent.attempt < max => {
                let path = download::part_path(&ctx.env.home, &self.artifact.id);
                match check_digest(&path, &self.artifact).await {
                    Ok(()) => {
                        self.write(
                            ctx,
                            &path,
                            intent.slot,
                            &intent.old_version,
                            intent.attempt + 1,
                        )
                        .await
                    }
                    Err(why) => Outcome::failed(format!(
                        "interrupted during write, and the image is no longer intact ({why}); slot {old} still active (version {})",
                        intent.old_version
                    )),
                }
            }
            WriteStep::Write => Outcome::failed(format!(
                "interrupted during write; slot {old} still active (version {})",
                intent.old_version
            )),
        };
        self.finish(ctx, outcome).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{SharedDevice, shared};
    use crate::jobs::testkit::{Kit, kit, order};
    use crate::relay::{Control, Incoming};
    use crate::sim::{SimCopier, SimSettings};
    use ed25519_dalek::{Signer, SigningKey};
    use protocol::artifact::{ArtifactId, Chunk, FetchRequest, signed_message};
    use protocol::device::JobUpdate;
    use protocol::job::JobSpec;
    use protocol::{Envelope, Serial};
    use sha2::{Digest, Sha256};
    use tokio_util::sync::CancellationToken;

    const CHUNK: u32 = 1024;

    fn signing_key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn publisher() -> PublisherKey {
        PublisherKey::from_verifying_key(signing_key().verifying_key())
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn signed(bytes: &[u8], version: &str, key: &SigningKey) -> ArtifactRef {
        let id = ArtifactId::from_digest(&Sha256::digest(bytes).into());
        ArtifactRef {
            signature: hex(&key.sign(&signed_message(&id, version)).to_bytes()),
            id,
            version: version.into(),
            size: bytes.len() as u64,
            chunk_size: CHUNK,
            publisher: "svc".into(),
        }
    }

    fn image(version: &str) -> Vec<u8> {
        format!("firmware {version} ").repeat(300).into_bytes()
    }

    fn sim(settings: SimSettings) -> SharedDevice {
        shared(SimCopier::new(&Serial::parse("C1").unwrap(), &settings))
    }

    /// Plays the session: serves fetches from `bytes`, acks everything, suspends at once; records
    /// whether the session was suspended while the device was written.
    struct Relay {
        log: tokio::task::JoinHandle<Vec<String>>,
    }

    fn relay(k: &mut Kit, bytes: Vec<u8>) -> Relay {
        let (_, dummy) = crate::relay::pair();
        let mut control = std::mem::replace(&mut k.session.control, dummy.control);
        let to_inbox = k.to_inbox.clone();
        k.session.online.send_replace(true);
        let log = tokio::spawn(async move {
            let mut log = Vec::new();
            while let Some(msg) = control.recv().await {
                match msg {
                    Control::Publish { payload, reply, .. } => {
                        let _ = reply.send(true);
                        let req: Envelope<FetchRequest> =
                            Envelope::from_cbor(&payload, 1 << 20).unwrap();
                        for i in req.body.chunks {
                            let start = (i * CHUNK) as usize;
                            let end = (start + CHUNK as usize).min(bytes.len());
                            let _ = to_inbox.send(Incoming::Chunk(Chunk {
                                artifact: req.body.artifact.clone(),
                                index: i,
                                data: bytes[start..end].to_vec(),
                            }));
                        }
                    }
                    Control::WhenAcked { reply, .. } => {
                        let _ = reply.send(AckOutcome::Stored);
                    }
                    Control::Suspend { reply } => {
                        log.push("suspend".to_owned());
                        let _ = reply.send(());
                    }
                    Control::Resume => log.push("resume".to_owned()),
                    Control::Schedule(_) | Control::FaultSeen(_) => {}
                }
            }
            log
        });
        Relay { log }
    }

    async fn run(k: &mut Kit, a: &ArtifactRef, max_attempts: u32, phase: Phase) -> Step {
        let mut order = order(JobSpec::Firmware {
            artifact: a.clone(),
        });
        order.max_attempts = max_attempts;
        let withdrawn = CancellationToken::new();
        let mut ctx = JobCtx {
            order: &order,
            env: &k.env,
            inbox: &mut k.inbox,
            withdrawn: &withdrawn,
        };
        Firmware::new(a.clone()).run(&mut ctx, phase).await
    }

    /// Every job update the job committed, in order.
    fn updates(k: &mut Kit) -> Vec<JobUpdate> {
        let mut out = Vec::new();
        while let Ok(p) = k.sent.try_recv() {
            if p.topic.ends_with("/up/job") {
                out.push(
                    Envelope::<JobUpdate>::from_cbor(&p.payload, 1 << 20)
                        .unwrap()
                        .body,
                );
            }
        }
        out
    }

    fn statuses(u: &[JobUpdate]) -> Vec<JobStatus> {
        u.iter().map(|u| u.status).collect()
    }

    async fn firmware_of(k: &Kit) -> String {
        device::state_of(&k.env.device).await.firmware
    }

    #[tokio::test]
    async fn slot_write_verify_and_switch() {
        let bytes = image("2.0");
        let a = signed(&bytes, "2.0", &signing_key());
        let mut k = kit(sim(SimSettings::default()), Some(publisher()));
        let r = relay(&mut k, bytes);
        let step = run(&mut k, &a, 1, Phase::Instruction).await;
        assert_eq!(step, Step::Reported(JobStatus::Succeeded));
        let u = updates(&mut k);
        assert_eq!(
            statuses(&u),
            [
                JobStatus::Delivered,
                JobStatus::Staged,
                JobStatus::InProgress,
                JobStatus::Succeeded
            ]
        );
        assert_eq!(u[3].note.as_deref(), Some("slot b active, version 2.0"));
        assert_eq!(firmware_of(&k).await, "2.0");
        let slots = device::call(&k.env.device, |d| d.slots()).await.unwrap();
        assert_eq!(slots.active, Slot::B);
        assert!(
            k.env
                .store
                .write_intent(k.env.serial())
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            !download::part_path(&k.env.home, &a.id).exists(),
            "the download is removed once written"
        );
        drop(k);
        assert_eq!(r.log.await.unwrap(), ["suspend", "resume"]);
    }

    #[tokio::test]
    async fn a_job_with_a_later_execution_time_parks_after_staging() {
        let bytes = image("2.0");
        let a = signed(&bytes, "2.0", &signing_key());
        let mut k = kit(sim(SimSettings::default()), Some(publisher()));
        let _r = relay(&mut k, bytes.clone());
        let later = chrono::Utc::now() + chrono::Duration::hours(3);
        let mut o = order(JobSpec::Firmware {
            artifact: a.clone(),
        });
        o.execution_time = Some(later);
        let withdrawn = CancellationToken::new();
        let mut ctx = JobCtx {
            order: &o,
            env: &k.env,
            inbox: &mut k.inbox,
            withdrawn: &withdrawn,
        };
        let step = Firmware::new(a.clone())
            .run(&mut ctx, Phase::Instruction)
            .await;
        assert_eq!(step, Step::Park { until: later });
        assert_eq!(
            statuses(&updates(&mut k)),
            [JobStatus::Delivered, JobStatus::Staged]
        );
        assert_eq!(
            firmware_of(&k).await,
            crate::sim::DEFAULT_FIRMWARE,
            "not written yet"
        );
        assert_eq!(
            std::fs::read(download::part_path(&k.env.home, &a.id)).unwrap(),
            bytes,
            "the image waits on disk"
        );
    }

    #[tokio::test]
    async fn tampered_image_wrong_signature_and_missing_key_are_refused() {
        let bytes = image("2.0");
        let good = signed(&bytes, "2.0", &signing_key());
        // The relay serves other bytes under the signed id.
        let mut tampered_bytes = bytes.clone();
        tampered_bytes[10] ^= 1;
        let other_key = SigningKey::from_bytes(&[8; 32]);
        let cases: [(ArtifactRef, Vec<u8>, Option<PublisherKey>, &str); 4] = [
            (
                good.clone(),
                tampered_bytes,
                Some(publisher()),
                "digest mismatch",
            ),
            (
                signed(&bytes, "2.0", &other_key),
                bytes.clone(),
                Some(publisher()),
                "signature does not verify with the provisioned publisher key",
            ),
            (
                ArtifactRef {
                    version: "2.1".into(), // signed for 2.0: no replay as another version
                    ..good.clone()
                },
                bytes.clone(),
                Some(publisher()),
                "signature does not verify",
            ),
            (
                good.clone(),
                bytes.clone(),
                None,
                "no publisher key is provisioned",
            ),
        ];
        for (a, served, key, want) in cases {
            let mut k = kit(sim(SimSettings::default()), key);
            let _r = relay(&mut k, served);
            let Step::Done(out) = run(&mut k, &a, 1, Phase::Instruction).await else {
                panic!("{want}: not done")
            };
            assert_eq!(out.status, JobStatus::Failed, "{want}");
            let note = out.note.unwrap();
            assert!(note.contains(want), "want {want:?} in {note:?}");
            assert_eq!(
                firmware_of(&k).await,
                crate::sim::DEFAULT_FIRMWARE,
                "{want}"
            );
            assert!(
                !updates(&mut k)
                    .iter()
                    .any(|u| u.status == JobStatus::Staged),
                "{want}: never staged"
            );
            assert!(!download::part_path(&k.env.home, &a.id).exists(), "{want}");
        }
    }

    #[tokio::test]
    async fn failed_health_check_rolls_back() {
        let bytes = image("2.0");
        let a = signed(&bytes, "2.0", &signing_key());
        let settings = SimSettings {
            fail_health_check_versions: vec!["2.0".into()],
            ..SimSettings::default()
        };
        let mut k = kit(sim(settings), Some(publisher()));
        let _r = relay(&mut k, bytes);
        let step = run(&mut k, &a, 1, Phase::Instruction).await;
        assert_eq!(step, Step::Reported(JobStatus::Failed));
        let u = updates(&mut k);
        let note = u.last().unwrap().note.clone().unwrap();
        assert!(
            note.starts_with(
                "health check failed on version 2.0; rolled back to slot a (version 1.0.0)"
            ),
            "{note}"
        );
        assert_eq!(firmware_of(&k).await, "1.0.0");
    }

    #[tokio::test]
    async fn a_bad_write_is_retried_up_to_max_attempts() {
        let bytes = image("2.0");
        let a = signed(&bytes, "2.0", &signing_key());
        for (fail_writes, max, want) in [(1, 2, JobStatus::Succeeded), (2, 2, JobStatus::Failed)] {
            let settings = SimSettings {
                fail_writes,
                ..SimSettings::default()
            };
            let mut k = kit(sim(settings), Some(publisher()));
            let _r = relay(&mut k, bytes.clone());
            let step = run(&mut k, &a, max, Phase::Instruction).await;
            assert_eq!(
                step,
                Step::Reported(want),
                "{fail_writes} bad writes of {max}"
            );
            if want == JobStatus::Failed {
                let note = updates(&mut k).pop().unwrap().note.unwrap();
                assert!(
                    note.contains("writing slot b failed 2 time(s)")
                        && note.contains("slot a still active (version 1.0.0)"),
                    "{note}"
                );
            }
        }
    }

    /// Leaves things as a power cut during attempt `attempt` would: the image downloaded, the
    /// write-intent committed, slot b torn, slot a active.
    async fn power_cut(k: &mut Kit, bytes: &[u8], a: &ArtifactRef, attempt: u32, max: u32) {
        let path = download::part_path(&k.env.home, &a.id);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let torn = k.env.home.join("torn.img");
        std::fs::write(&torn, &bytes[..100]).unwrap();
        device::call(&k.env.device, move |d| d.write_image(Slot::B, &torn, "2.0"))
            .await
            .unwrap();
        let mut o = order(JobSpec::Firmware {
            artifact: a.clone(),
        });
        o.max_attempts = max;
        let intent = WriteIntent {
            order: o,
            attempt,
            slot: Slot::B,
            old_version: "1.0.0".into(),
            step: WriteStep::Write,
        };
        k.env
            .store
            .set_write_intent(k.env.serial(), &intent)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_interrupted_write_is_retried_when_attempts_remain() {
        let bytes = image("2.0");
        let a = signed(&bytes, "2.0", &signing_key());
        let mut k = kit(sim(SimSettings::default()), Some(publisher()));
        let r = relay(&mut k, bytes.clone());
        power_cut(&mut k, &bytes, &a, 1, 2).await;
        let intent = k
            .env
            .store
            .write_intent(k.env.serial())
            .await
            .unwrap()
            .unwrap();
        let step = run(&mut k, &a, 2, Phase::Recover(Box::new(intent))).await;
        assert_eq!(step, Step::Reported(JobStatus::Succeeded));
        assert_eq!(firmware_of(&k).await, "2.0");
        assert!(
            k.env
                .store
                .write_intent(k.env.serial())
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(statuses(&updates(&mut k)), [JobStatus::Succeeded]);
        drop(k);
        assert_eq!(r.log.await.unwrap(), ["suspend", "resume"]);
    }

    #[tokio::test]
    async fn an_interrupted_write_without_attempts_left_fails_with_the_old_slot_active() {
        let bytes = image("2.0");
        let a = signed(&bytes, "2.0", &signing_key());
        let mut k = kit(sim(SimSettings::default()), Some(publisher()));
        let _r = relay(&mut k, bytes.clone());
        power_cut(&mut k, &bytes, &a, 1, 1).await;
        let intent = k
            .env
            .store
            .write_intent(k.env.serial())
            .await
            .unwrap()
            .unwrap();
        let step = run(&mut k, &a, 1, Phase::Recover(Box::new(intent))).await;
        assert_eq!(step, Step::Reported(JobStatus::Failed));
        let u = updates(&mut k);
        assert_eq!(
            u[0].note.as_deref(),
            Some("interrupted during write; slot a still active (version 1.0.0)")
        );
        assert_eq!(firmware_of(&k).await, "1.0.0");
        assert!(
            k.env
                .store
                .write_intent(k.env.serial())
                .await
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn publisher_keys_parse_from_the_host_format() {
        let text = format!("{}\n", hex(signing_key().verifying_key().as_bytes()));
        assert_eq!(PublisherKey::parse(&text).unwrap(), publisher());
        let e = PublisherKey::parse("abc").unwrap_err();
        assert!(e.contains("expected 64 hex digits"), "{e}");
        assert!(PublisherKey::parse(&"zz".repeat(32)).is_err());
    }
}
