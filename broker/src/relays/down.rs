//! What the parent sends down to a child (`relay/{id}/down/dev/…`): orders and merged data for
//! the child's devices, kept on its disk before they go to its hub, and jobs for the child itself.

use std::sync::atomic::Ordering;

use protocol::topic::UpKind;
use protocol::{Envelope, RelayId};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::store::{Store, StoreError};
use crate::telemetry::CoreStats;

/// Whether `dev_topic` is a job order for this child itself (`jobs submit --relay R1`: the job's
/// serial is the child's id).
pub(super) fn own_job(relay: &RelayId, dev_topic: &str) -> bool {
    let mut levels = dev_topic.split('/');
    levels.next() == Some("dev")
        && levels.next() == Some(relay.as_str())
        && levels.next() == Some("jobs")
}

/// Runs a job the parent filed for this child itself, and queues its answer as its own device
/// would (the job's number is the message id: one answer per job, deduplicated at the parent
/// like any). A get-data job reads the child's own status: its program, version and devices;
/// any other kind fails with the reason (a child's own program is not replaced yet).
pub(super) fn answer_own_job(
    store: &dyn Store,
    relay: &RelayId,
    stats: &CoreStats,
    payload: &[u8],
    wake: &Notify,
) {
    use protocol::data::{DeviceData, Section, SectionData, Value};
    use protocol::device::JobUpdate;
    use protocol::job::{JobOrder, JobSpec, JobStatus};
    if payload.is_empty() {
        return; // the job ended: its retained order was emptied
    }
    let Ok(order) = Envelope::<JobOrder>::from_cbor(payload, 1 << 20).map(|e| e.body) else {
        warn!(relay = %relay, "unreadable job order for this relay itself; ignored");
        return;
    };
    let Some(n) = crate::store::job_number(order.job.as_str()) else {
        return;
    };
    let get = |c: &std::sync::atomic::AtomicU64| {
        Value::Int(i64::try_from(c.load(Ordering::Relaxed)).unwrap_or(i64::MAX))
    };
    let update = match &order.spec {
        JobSpec::GetData { .. } => {
            let identification = SectionData::from([
                ("model".to_owned(), Value::Text("chukei child relay".into())),
                ("firmware".to_owned(), Value::Text(env!("CARGO_PKG_VERSION").into())),
                ("relay".to_owned(), Value::Text(relay.to_string())),
            ]);
            let comms = SectionData::from([
                ("devices_online".to_owned(), get(&stats.devices_online)),
                ("uplink_waiting".to_owned(), waiting(store)),
                ("uplink_acked".to_owned(), get(&stats.uplink_acked)),
            ]);
            JobUpdate {
                job: order.job.clone(),
                status: JobStatus::Succeeded,
                note: Some("the child relay's own status".into()),
                data: Some(DeviceData::from([
                    (Section::Identification, identification),
                    (Section::Comms, comms),
                ])),
                errors: Default::default(),
            }
        }
        _ => JobUpdate {
            job: order.job.clone(),
            status: JobStatus::Failed,
            note: Some(
                "a child relay runs get-data for itself; replacing its own program is not supported yet"
                    .into(),
            ),
            data: None,
            errors: Default::default(),
        },
    };
    let queued = Envelope::new(n, chrono::Utc::now(), update)
        .to_cbor()
        .map_err(|e| StoreError::Encode {
            table: "uplink",
            key: order.job.to_string(),
            reason: e.to_string(),
        })
        .and_then(|bytes| {
            let mut txn = store.begin()?;
            txn.push_uplink(&order.serial, UpKind::Job.as_str(), &bytes)?;
            txn.commit()
        });
    match queued {
        Ok(_) => {
            info!(relay = %relay, job = %order.job, "answered a job for this relay itself");
            wake.notify_one();
        }
        Err(e) => {
            warn!(relay = %relay, job = %order.job, error = %e, "could not queue the answer to a job for this relay; the parent resends the order on the next connection")
        }
    }
}

/// Messages queued for the parent, as the store counts them (-1 if it cannot be read).
fn waiting(store: &dyn Store) -> protocol::data::Value {
    let n = store.begin().and_then(|txn| txn.uplink_count());
    protocol::data::Value::Int(n.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)))
}

/// Keeps an order or merged data the parent sent a device on this child's disk, and tells the
/// parent (through the queue) that a new job order is here: the job is `forwarded` (Fig. 8,
/// S508). Failing to keep it is logged; the device gets it anyway.
pub(super) fn keep(
    store: &dyn Store,
    relay: &RelayId,
    dev_topic: &str,
    payload: &[u8],
    wake: &Notify,
) {
    let mut levels = dev_topic.split('/');
    let (Some("dev"), Some(serial), Some(kind)) = (levels.next(), levels.next(), levels.next())
    else {
        return;
    };
    if !matches!(kind, "jobs" | "merged") {
        return;
    }
    let job = levels.next().unwrap_or_default();
    let kept = store.begin().and_then(|mut txn| {
        if payload.is_empty() {
            txn.remove_mirrored(dev_topic)?;
        } else if txn.put_mirrored(dev_topic, payload)?
            && kind == "jobs"
            && let Ok(serial) = protocol::Serial::parse(serial)
        {
            txn.push_uplink(&serial, crate::core::relay::FORWARDED, job.as_bytes())?;
        }
        txn.commit()
    });
    match kept {
        Ok(_) => wake.notify_one(),
        Err(e) => {
            warn!(relay = %relay, topic = %protocol::Shown(dev_topic), error = %e, "could not keep an order from the parent relay on disk")
        }
    }
}
