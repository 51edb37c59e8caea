//! Hints for a store across a network: what a batch is about to read, named before it is
//! handled, so that the store reads it in a few trips instead of one per message.

use protocol::Identity;
use protocol::alarm::{AlarmReport, FaultEvent};
use protocol::device::JobUpdate;
use protocol::host::HostRequest;
use protocol::topic::{Topic, UpKind};

use super::{Inbound, decode};
use crate::store::{Hints, StoreError, Txn, job_number};

/// Tells the store what `batch` is about to read ([`Txn::warm`]), so that a store across a
/// network reads it together: the devices that sent or are named by a submission, the jobs
/// devices report on, the hosts' request ids, the active alarms of devices that sent an alarm.
/// Only a hint: a message this misreads is handled as usual, its rows read when needed.
pub(super) fn warm(txn: &mut dyn Txn, batch: &[Inbound], max: usize) -> Result<(), StoreError> {
    if !txn.wants_hints() {
        return Ok(());
    }
    let mut hints = Hints::default();
    for msg in batch {
        match Topic::parse(&msg.topic) {
            Ok(Topic::DevUp { serial, kind }) => {
                if kind == UpKind::Job
                    && let Ok(env) = decode::<JobUpdate>(&msg.payload, max)
                    && let Some(n) = job_number(env.body.job.as_str())
                {
                    hints.jobs.push(n);
                }
                if kind == UpKind::Alarm {
                    hints.alarms.push(serial.as_str().to_owned());
                    hints.raises_alarms |= decode::<AlarmReport>(&msg.payload, max)
                        .is_ok_and(|env| env.body.event != FaultEvent::Cleared);
                }
                hints.devices.push(serial.as_str().to_owned());
            }
            Ok(Topic::HostReq { host }) => {
                if let Ok(env) = decode::<HostRequest>(&msg.payload, max) {
                    if let HostRequest::Submit(submit) = &env.body {
                        hints.devices.push(submit.serial.clone());
                    }
                    hints
                        .journal
                        .entry(Identity::host(&host).to_string())
                        .or_default()
                        .push(env.id);
                }
            }
            _ => {}
        }
    }
    txn.warm(&hints)
}
