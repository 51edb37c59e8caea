//! UPDATE DATA (Fig. 4): set named values on a device.
//!
//! With `merge: broker` the device, at the instruction time, sends its current values of the job's
//! sections (S212, [`MergeRequest`] on `up/merge`); the relay merges the host's values into them
//! (S213), keeps the merged set in redb and publishes it retained on `dev/{serial}/merged/{job}`
//! until the job ends; the device applies it (S216), checks it (S217) and reports (S218). With
//! `merge: device` the device merges by itself (【0083】) and the relay only records the result.
//! Either way `succeeded` carries the applied sections, kept as the job's report.

use protocol::data::DeviceData;
use protocol::device::{JobUpdate, MergeRequest};
use protocol::job::{JobEvent, JobSpec, MergeAt};
use protocol::{JobId, Serial, Timestamp};

use super::Staged;
use crate::store::{StoreError, Txn};

/// The event note of a relay-side merge, in the job's timeline.
pub const MERGED_NOTE: &str = "merged at the relay";

#[derive(Debug, Clone, PartialEq)]
pub struct UpdateData {
    values: DeviceData,
}

impl UpdateData {
    pub fn new(values: DeviceData) -> UpdateData {
        UpdateData { values }
    }

    pub fn values(&self) -> &DeviceData {
        &self.values
    }

    /// S213: the device's current data of the job's sections with the host's values laid over it.
    /// Only the job's sections are returned: the device is asked to apply what the host changed,
    /// not to rewrite counters it happened to send along.
    pub fn merge_into(&self, current: &DeviceData) -> DeviceData {
        let mut merged = DeviceData::new();
        for (section, values) in &self.values {
            let mut section_data = current.get(section).cloned().unwrap_or_default();
            for (name, value) in values {
                section_data.insert(name.clone(), value.clone());
            }
            merged.insert(*section, section_data);
        }
        merged
    }

    /// The applied sections a `succeeded` carries become the job's report.
    pub(super) fn stage(
        &self,
        txn: &dyn Txn,
        n: u64,
        update: &JobUpdate,
    ) -> Result<Staged, StoreError> {
        super::stage_report(txn, n, update)
    }
}

/// What became of a device's merge request.
#[derive(Debug, Clone, PartialEq)]
pub enum MergeOutcome {
    /// Merged now: publish the merged set.
    Merged { n: u64, job: JobId },
    /// The job was merged by an earlier request; the stored merged set stands (and is published
    /// again, in case the device missed it).
    AlreadyMerged { n: u64, job: JobId },
    /// Refused for good, with the reason sent back to the device.
    Refused(String),
}

/// Handles `MergeRequest` from `serial`: checks that the job is an open update-data job with
/// `merge: broker` addressed to `serial`, then merges and stores the result with a job event.
pub fn merge(
    txn: &mut dyn Txn,
    serial: &Serial,
    req: &MergeRequest,
    now: Timestamp,
) -> Result<MergeOutcome, StoreError> {
    let job = &req.job;
    let Some((n, mut record)) = super::lookup(txn, job.as_str())? else {
        return Ok(MergeOutcome::Refused(format!(
            "no job {job} on this broker"
        )));
    };
    let Some(order) = record.order.as_ref().filter(|o| &o.serial == serial) else {
        return Ok(MergeOutcome::Refused(format!(
            "job {job} is not addressed to {serial}"
        )));
    };
    let JobSpec::UpdateData { values, merge } = &order.spec else {
        return Ok(MergeOutcome::Refused(format!(
            "job {job} is a {} job; only update-data jobs are merged at the relay",
            order.spec.kind_name()
        )));
    };
    if *merge != MergeAt::Broker {
        return Ok(MergeOutcome::Refused(format!(
            "job {job} is merged on the device (merge: device); apply its values without asking the relay"
        )));
    }
    if record.view.status.is_terminal() {
        return Ok(MergeOutcome::Refused(format!(
            "job {job} already ended ({}); nothing to merge",
            record.view.status
        )));
    }
    if txn.merged(n)?.is_some() {
        return Ok(MergeOutcome::AlreadyMerged {
            n,
            job: job.clone(),
        });
    }
    let merged = UpdateData::new(values.clone()).merge_into(&req.current);

    // Reads are done; from here on only writes.
    txn.put_merged(n, &merged)?;
    record.view.updated_at = now;
    let status = record.view.status;
    txn.put_job(n, &record)?;
    txn.push_event(
        n,
        &JobEvent {
            at: now,
            status,
            note: Some(MERGED_NOTE.into()),
        },
    )?;
    Ok(MergeOutcome::Merged {
        n,
        job: job.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::data::{Section, SectionData, Value};

    fn section(pairs: &[(&str, Value)]) -> SectionData {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn host_values_win_and_only_the_jobs_sections_are_returned() {
        let job = UpdateData::new(DeviceData::from([
            (
                Section::Adjustment,
                section(&[("density", Value::Int(7)), ("new_key", Value::Bool(true))]),
            ),
            (
                Section::CallSettings,
                section(&[("every_counts", Value::Int(500))]),
            ),
        ]));
        let current = DeviceData::from([
            (
                Section::Adjustment,
                section(&[
                    ("density", Value::Int(5)),
                    ("toner_save", Value::Bool(false)),
                ]),
            ),
            (Section::Counters, section(&[("total", Value::Int(1234))])),
        ]);
        let merged = job.merge_into(&current);
        assert_eq!(
            merged,
            DeviceData::from([
                (
                    Section::Adjustment,
                    section(&[
                        ("density", Value::Int(7)),
                        ("new_key", Value::Bool(true)),
                        ("toner_save", Value::Bool(false)),
                    ]),
                ),
                (
                    Section::CallSettings,
                    section(&[("every_counts", Value::Int(500))]),
                ),
            ])
        );
    }
}
