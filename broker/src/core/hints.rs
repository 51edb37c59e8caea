//! Hints for a store across a network: what a batch is about to read, named before it is
//! handled, so that the store reads it in a few trips instead of one per message.

use std::collections::BTreeMap;

use protocol::device::JobUpdate;
use protocol::host::HostRequest;
use protocol::topic::{Topic, UpKind};
use protocol::{Identity, MsgId};

use super::{Inbound, decode};
use crate::store::{StoreError, Txn, job_number};

/// Tells the store what `batch` is about to read, so that a store across a network reads it
/// together ([`Txn::warm_devices`], [`Txn::warm_jobs`], [`Txn::warm_journal`]): the devices that
/// sent or are named by a submission, the jobs devices report on, the hosts' request ids. Only a
/// hint: a message this misreads is handled as usual, its rows read when needed.
pub(super) fn warm(txn: &mut dyn Txn, batch: &[Inbound], max: usize) -> Result<(), StoreError> {
    if !txn.wants_hints() {
        return Ok(());
    }
    let mut devices: Vec<String> = Vec::new();
    let mut jobs: Vec<u64> = Vec::new();
    let mut requests: BTreeMap<String, Vec<MsgId>> = BTreeMap::new();
    for msg in batch {
        match Topic::parse(&msg.topic) {
            Ok(Topic::DevUp { serial, kind }) => {
                if kind == UpKind::Job
                    && let Ok(env) = decode::<JobUpdate>(&msg.payload, max)
                    && let Some(n) = job_number(env.body.job.as_str())
                {
                    jobs.push(n);
                }
                devices.push(serial.as_str().to_owned());
            }
            Ok(Topic::HostReq { host }) => {
                if let Ok(env) = decode::<HostRequest>(&msg.payload, max) {
                    if let HostRequest::Submit(submit) = &env.body {
                        devices.push(submit.serial.clone());
                    }
                    requests
                        .entry(Identity::host(&host).to_string())
                        .or_default()
                        .push(env.id);
                }
            }
            _ => {}
        }
    }
    txn.warm_devices(&devices.iter().map(String::as_str).collect::<Vec<_>>())?;
    txn.warm_jobs(&jobs)?;
    for (sender, ids) in &requests {
        txn.warm_journal(sender, ids)?;
    }
    Ok(())
}
