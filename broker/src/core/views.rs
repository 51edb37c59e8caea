//! The messages the core publishes: job orders and merged data for devices, firmware chunks, and
//! the views hosts and integrators read, in CBOR (`fleet/…`) and plain JSON (`json/fleet/…`,
//! docs/decisions.md, D4).
//!
//! All of them are a cache of redb (docs/decisions.md, D2): built from committed records,
//! republished at startup.

use protocol::artifact::Chunk;
use protocol::data::DeviceData;
use protocol::device::Merged;
use protocol::job::JobDetail;
use protocol::{Envelope, JobId, Serial, Timestamp, topic};

use super::Outbound;
use crate::store::{JobRecord, StoreError, Txn};

fn encode_error(what: &str, key: impl std::fmt::Display, e: impl std::fmt::Display) -> StoreError {
    StoreError::Encode {
        table: "(published view)",
        key: format!("{what} {key}"),
        reason: e.to_string(),
    }
}

/// A retained view for the router, built elsewhere in the core.
pub(super) fn retained_view(topic: String, payload: Vec<u8>) -> Outbound {
    retained(topic, payload)
}

fn retained(topic: String, payload: Vec<u8>) -> Outbound {
    Outbound {
        topic,
        payload,
        retain: true,
    }
}

/// The retained order on `dev/{serial}/jobs/{job}`, if the job has one.
pub fn order(record: &JobRecord) -> Result<Option<Outbound>, StoreError> {
    let Some(order) = &record.order else {
        return Ok(None);
    };
    let payload = Envelope::new(0, record.view.submitted_at, order.clone())
        .to_cbor()
        .map_err(|e| encode_error("order", &order.job, e))?;
    Ok(Some(retained(
        topic::dev_job(&order.serial, &order.job),
        payload,
    )))
}

/// An empty retained payload on `dev/{serial}/jobs/{job}`: rumqttd deletes the retained order, so
/// a device that connects later is not handed a job that has ended.
pub fn cleared_order(record: &JobRecord) -> Option<Outbound> {
    let order = record.order.as_ref()?;
    Some(retained(
        topic::dev_job(&order.serial, &order.job),
        Vec::new(),
    ))
}

/// The retained `Envelope<Merged>` on `dev/{serial}/merged/{job}`: what an update-data job's
/// device applies (S215). Retained so a device that reconnects mid-job still finds it.
pub fn merged(record: &JobRecord, data: DeviceData) -> Result<Option<Outbound>, StoreError> {
    let Some(order) = &record.order else {
        return Ok(None);
    };
    let body = Merged {
        job: order.job.clone(),
        data,
    };
    let payload = Envelope::new(0, record.view.updated_at, body)
        .to_cbor()
        .map_err(|e| encode_error("merged data", &order.job, e))?;
    Ok(Some(retained(
        topic::dev_merged(&order.serial, &order.job),
        payload,
    )))
}

/// An empty retained payload on `dev/{serial}/merged/{job}`, deleting the merged data of a job
/// that ended.
pub fn cleared_merged(record: &JobRecord) -> Option<Outbound> {
    let order = record.order.as_ref()?;
    Some(retained(
        topic::dev_merged(&order.serial, &order.job),
        Vec::new(),
    ))
}

/// One firmware chunk on `dev/{serial}/blob/{artifact}`, not retained: the device asked for it
/// and is listening; if it missed it, it asks again.
pub fn chunk(serial: &Serial, chunk: Chunk, at: Timestamp) -> Result<Outbound, StoreError> {
    let topic = topic::dev_blob(serial, &chunk.artifact);
    let key = format!("{} #{}", chunk.artifact, chunk.index);
    let payload = Envelope::new(0, at, chunk)
        .to_cbor()
        .map_err(|e| encode_error("chunk", key, e))?;
    Ok(Outbound {
        topic,
        payload,
        retain: false,
    })
}

/// `fleet/{serial}/jobs/{job}` (CBOR `Envelope<JobView>`) and `json/fleet/{serial}/jobs/{job}`
/// (JSON `JobDetail`). None for a job whose serial cannot name a topic (a rejected submission with
/// a bad serial): it is still in the list and `jobs show`.
pub fn job_views(txn: &dyn Txn, n: u64, record: &JobRecord) -> Result<Vec<Outbound>, StoreError> {
    let (Ok(serial), Ok(job)) = (
        Serial::parse(&record.view.serial),
        JobId::parse(&record.view.id),
    ) else {
        return Ok(Vec::new());
    };
    let detail = detail(txn, n, record)?;
    let cbor = Envelope::new(0, record.view.updated_at, record.view.clone())
        .to_cbor()
        .map_err(|e| encode_error("job view", &job, e))?;
    let json = serde_json::to_vec(&detail).map_err(|e| encode_error("job view", &job, e))?;
    Ok(vec![
        retained(topic::fleet_job(&serial, &job), cbor),
        retained(topic::json_fleet_job(&serial, &job), json),
    ])
}

/// A job with its timeline and collected data.
pub fn detail(txn: &dyn Txn, n: u64, record: &JobRecord) -> Result<JobDetail, StoreError> {
    Ok(JobDetail {
        view: record.view.clone(),
        timeline: txn.events(n)?,
        data: txn.report(n)?,
    })
}
