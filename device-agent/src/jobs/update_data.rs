//! UPDATE DATA (Fig. 4, claims 3–4): set named values on the device.
//!
//! At the instruction time the device takes no other job (S211: the worker runs one at a time),
//! reads its current values of the job's sections and either sends them to the relay, which merges
//! the host's values in (S212–S215, `merge: broker`), or merges them itself (【0083】,
//! `merge: device`). Only values that differ from the current ones are changes; each is checked
//! against the device's settings (unknown key, wrong type, out of range) and a single refusal
//! applies nothing and fails the job with the reason per key. Otherwise the device applies the
//! changes (S216), reads them back (S217) and reports the applied sections (S218).

use std::collections::BTreeMap;

use protocol::data::{DeviceData, Section};
use protocol::device::MergeRequest;
use protocol::job::MergeAt;
use protocol::topic::UpKind;
use tracing::{info, warn};

use super::{JobCtx, Outcome, Step};
use crate::device::{self, ApplyError};
use crate::settings::{self, refusal_note};

#[derive(Debug, Clone, PartialEq)]
pub struct UpdateData {
    values: DeviceData,
    merge: MergeAt,
}

/// `values` laid over `current`, key by key: what the relay's merge does (S213) too.
pub fn merge_over(mut current: DeviceData, values: &DeviceData) -> DeviceData {
    for (&section, kv) in values {
        let into = current.entry(section).or_default();
        for (k, v) in kv {
            into.insert(k.clone(), v.clone());
        }
    }
    current
}

/// The values of `merged` that differ from `current`: what must actually be written.
pub fn changes(current: &DeviceData, merged: &DeviceData) -> DeviceData {
    let mut out = DeviceData::new();
    for (&section, kv) in merged {
        for (k, v) in kv {
            let now = current.get(&section).and_then(|c| c.get(k));
            if now != Some(v) {
                out.entry(section).or_default().insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// Keys whose read-back differs from what was written ("section.name" → what happened).
fn mismatches(written: &DeviceData, read: &DeviceData) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (&section, kv) in written {
        for (k, v) in kv {
            match read.get(&section).and_then(|r| r.get(k)) {
                Some(got) if got == v => {}
                Some(got) => {
                    out.insert(
                        settings::key(section, k),
                        format!("reads {got:?} after writing {v:?}"),
                    );
                }
                None => {
                    out.insert(
                        settings::key(section, k),
                        "is missing when read back".to_owned(),
                    );
                }
            }
        }
    }
    out
}

fn refused(errors: BTreeMap<String, String>) -> Outcome {
    let mut out = Outcome::failed(refusal_note(&errors));
    out.errors = errors;
    out
}

impl UpdateData {
    pub fn new(values: DeviceData, merge: MergeAt) -> UpdateData {
        UpdateData { values, merge }
    }

    pub async fn run(self, ctx: &mut JobCtx<'_>) -> Step {
        let (serial, job) = (ctx.serial().clone(), ctx.job().clone());
        let sections: Vec<Section> = self.values.keys().copied().collect();
        let current = match device::read_sections(&ctx.env.device, sections.clone()).await {
            Ok(d) => d,
            Err(e) => {
                return Step::Done(Outcome::failed(format!(
                    "could not read the current values: {e}"
                )));
            }
        };
        let merged = match self.merge {
            MergeAt::Device => merge_over(current.clone(), &self.values),
            MergeAt::Broker => {
                let request = MergeRequest {
                    job: job.clone(),
                    current: current.clone(),
                };
                if let Err(e) = ctx.env.report.send(UpKind::Merge, request, None).await {
                    return Step::Done(Outcome::failed(format!(
                        "could not store the current values for the relay's merge: {e}"
                    )));
                }
                info!(serial = %serial, job = %job, "current values sent for merging at the relay");
                let deadline = ctx.order.deadline.map(|d| {
                    tokio::time::Instant::now()
                        + (d - chrono::Utc::now()).to_std().unwrap_or_default()
                });
                tokio::select! {
                    got = ctx.inbox.merged(&job) => match got {
                        Some(data) => data,
                        None => return Step::Dropped,
                    },
                    () = ctx.withdrawn.cancelled() => return Step::Dropped,
                    () = ctx.env.stop.cancelled() => return Step::Dropped,
                    () = sleep_until_opt(deadline) => {
                        return Step::Done(Outcome::failed(
                            "the relay sent no merged values before the job's deadline; nothing was applied",
                        ));
                    }
                }
            }
        };

        let todo = changes(&current, &merged);
        let refusals = {
            let todo = todo.clone();
            device::call(&ctx.env.device, move |d| Ok(d.check(&todo))).await
        };
        let outcome = match refusals {
            Ok(errors) if !errors.is_empty() => {
                warn!(serial = %serial, job = %job, errors = ?errors, "update refused");
                return Step::Done(refused(errors));
            }
            Ok(_) => {
                let todo = todo.clone();
                device::call(&ctx.env.device, move |d| Ok(d.apply(&todo))).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(ApplyError::Refused(errors))) => {
                warn!(serial = %serial, job = %job, errors = ?errors, "update refused");
                return Step::Done(refused(errors));
            }
            Ok(Err(ApplyError::Failed(e))) | Err(e) => {
                return Step::Done(Outcome::failed(format!("applying the values failed: {e}")));
            }
        }

        // S217: read back and check every change took.
        let applied = match device::read_sections(&ctx.env.device, sections).await {
            Ok(d) => d,
            Err(e) => {
                return Step::Done(Outcome::failed(format!(
                    "values applied but could not be read back: {e}"
                )));
            }
        };
        let bad = mismatches(&todo, &applied);
        if !bad.is_empty() {
            let parts: Vec<String> = bad.iter().map(|(k, r)| format!("{k} {r}")).collect();
            return Step::Done(Outcome::failed(format!(
                "verification failed: {}",
                parts.join("; ")
            )));
        }
        let keys: Vec<String> = todo
            .iter()
            .flat_map(|(s, kv)| kv.keys().map(move |k| settings::key(*s, k)))
            .collect();
        info!(serial = %serial, job = %job, merge = ?self.merge, keys = ?keys, "update applied");
        let note = if keys.is_empty() {
            "nothing to change: every value was already set".to_owned()
        } else {
            format!("applied {}", keys.join(", "))
        };
        Step::Done(Outcome::succeeded(Some(applied)).with_note(note))
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::shared;
    use crate::jobs::testkit::{Kit, kit, order};
    use crate::relay::Incoming;
    use crate::sim::{SimCopier, SimSettings};
    use protocol::data::Value;
    use protocol::device::Merged;
    use protocol::job::{JobSpec, JobStatus};
    use protocol::{Envelope, Serial};
    use tokio_util::sync::CancellationToken;

    fn values(pairs: &[(Section, &str, Value)]) -> DeviceData {
        let mut data = DeviceData::new();
        for (s, k, v) in pairs {
            data.entry(*s)
                .or_default()
                .insert((*k).to_owned(), v.clone());
        }
        data
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

    async fn run(k: &mut Kit, values: DeviceData, merge: MergeAt) -> Step {
        let order = order(JobSpec::UpdateData {
            values: values.clone(),
            merge,
        });
        let withdrawn = CancellationToken::new();
        let mut ctx = JobCtx {
            order: &order,
            env: &k.env,
            inbox: &mut k.inbox,
            withdrawn: &withdrawn,
        };
        UpdateData::new(values, merge).run(&mut ctx).await
    }

    async fn adjustment(k: &Kit) -> DeviceData {
        device::read_sections(&k.env.device, vec![Section::Adjustment])
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn device_merge_applies_verifies_and_reports_the_sections() {
        let mut k = sim_kit();
        let want = values(&[
            (Section::Adjustment, "density", 9.into()),
            (Section::Adjustment, "toner_save", true.into()),
        ]);
        let Step::Done(out) = run(&mut k, want, MergeAt::Device).await else {
            panic!("not done")
        };
        assert_eq!(out.status, JobStatus::Succeeded, "{:?}", out.note);
        let data = out.data.unwrap();
        assert_eq!(data[&Section::Adjustment]["density"], Value::Int(9));
        assert_eq!(data[&Section::Adjustment]["toner_save"], Value::Bool(true));
        assert!(
            data[&Section::Adjustment].contains_key("fax_resolution"),
            "the whole section is reported"
        );
        assert_eq!(adjustment(&k).await, data);
    }

    #[tokio::test]
    async fn broker_merge_sends_the_current_values_and_applies_the_merged_set() {
        let mut k = sim_kit();
        let before = adjustment(&k).await;
        // The relay's part: answer the merge request with the host's value merged in.
        let to_inbox = k.to_inbox.clone();
        let mut sent = std::mem::replace(&mut k.sent, tokio::sync::mpsc::unbounded_channel().1);
        let relay = tokio::spawn(async move {
            let p = sent.recv().await.unwrap();
            assert!(p.topic.ends_with("/up/merge"), "{}", p.topic);
            let req: Envelope<MergeRequest> = Envelope::from_cbor(&p.payload, 1 << 20).unwrap();
            let merged = merge_over(
                req.body.current.clone(),
                &values(&[(Section::Adjustment, "density", 2.into())]),
            );
            to_inbox
                .send(Incoming::Merged(Merged {
                    job: req.body.job.clone(),
                    data: merged,
                }))
                .unwrap();
            req.body
        });
        let want = values(&[(Section::Adjustment, "density", 2.into())]);
        let Step::Done(out) = run(&mut k, want, MergeAt::Broker).await else {
            panic!("not done")
        };
        let req = relay.await.unwrap();
        assert_eq!(req.current, before, "S212: the device's current values");
        assert_eq!(out.status, JobStatus::Succeeded, "{:?}", out.note);
        assert_eq!(
            adjustment(&k).await[&Section::Adjustment]["density"],
            Value::Int(2)
        );
    }

    #[tokio::test]
    async fn one_refused_value_fails_the_job_per_key_and_applies_nothing() {
        for merge in [MergeAt::Device, MergeAt::Broker] {
            let mut k = sim_kit();
            let before = adjustment(&k).await;
            let bad = values(&[
                (Section::Adjustment, "toner_save", true.into()),
                (Section::Adjustment, "density", 12.into()),
                (Section::Adjustment, "bogus", 1.into()),
            ]);
            if merge == MergeAt::Broker {
                // The relay merged already: hand the merged set in before the job asks.
                let current = adjustment(&k).await;
                k.to_inbox
                    .send(Incoming::Merged(Merged {
                        job: protocol::JobId::parse("J1").unwrap(),
                        data: merge_over(current, &bad),
                    }))
                    .unwrap();
            }
            let Step::Done(out) = run(&mut k, bad, merge).await else {
                panic!("not done")
            };
            assert_eq!(out.status, JobStatus::Failed);
            assert_eq!(
                out.errors.keys().collect::<Vec<_>>(),
                ["adjustment.bogus", "adjustment.density"],
                "{merge:?}"
            );
            assert_eq!(out.errors["adjustment.density"], "12 is out of range 1..=9");
            let note = out.note.unwrap();
            assert!(
                note.contains("refused: ")
                    && note.contains("adjustment.density: 12 is out of range 1..=9"),
                "{note}"
            );
            assert_eq!(adjustment(&k).await, before, "{merge:?}: nothing applied");
        }
    }

    #[test]
    fn changes_are_only_the_values_that_differ() {
        let current = values(&[
            (Section::Settings, "password_set", true.into()),
            (Section::Settings, "host_url", "mqtts://a:1".into()),
        ]);
        let merged = merge_over(
            current.clone(),
            &values(&[(Section::Settings, "host_url", "mqtts://b:1".into())]),
        );
        assert_eq!(
            changes(&current, &merged),
            values(&[(Section::Settings, "host_url", "mqtts://b:1".into())]),
            "a read-only value carried over unchanged is no change"
        );
    }
}
