//! Where what comes in goes: the relay's job orders to the worker, merged data and firmware
//! chunks to the running job's inbox, acks to the outgoing queue; and a running job's requests
//! (publish a fetch, wait for an ack, suspend relay access, set the schedule, a fault seen) to
//! the part of the session that answers them.

use protocol::artifact::{ArtifactId, Chunk};
use protocol::device::Merged;
use protocol::job::JobOrder;
use protocol::topic::Topic;
use protocol::{Envelope, JobId};
use rumqttc::Publish;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::Session;
use crate::jobs::JobEnv;
use crate::relay::{self, Control, Incoming};
use crate::store::WriteIntent;
use crate::worker::{Worker, WorkerMsg};

/// The session's ends of the worker.
pub(super) struct WorkerEnds {
    pub(super) orders: mpsc::UnboundedSender<WorkerMsg>,
    /// Merged data and chunks, for the running job.
    pub(super) inbox: mpsc::UnboundedSender<Incoming>,
    /// Jobs queued or running in the worker.
    pub(super) busy: watch::Receiver<usize>,
}

/// Starts the worker; it first concludes the firmware write `intent` names, if any.
pub(super) fn spawn_worker(
    env: JobEnv,
    intent: Option<WriteIntent>,
) -> (WorkerEnds, JoinHandle<()>) {
    let (orders, orders_rx) = mpsc::unbounded_channel();
    let (inbox, inbox_rx) = relay::inbox();
    let (busy_tx, busy) = watch::channel(0usize);
    let worker = Worker::new(env, inbox_rx, orders_rx, busy_tx, intent);
    let ends = WorkerEnds {
        orders,
        inbox,
        busy,
    };
    (ends, tokio::spawn(worker.run()))
}

impl Session {
    pub(super) async fn on_publish(&mut self, p: Publish) {
        match Topic::parse(&p.topic) {
            Ok(Topic::DevAck { serial }) if serial == self.serial => self.on_acks(&p).await,
            Ok(Topic::DevJob { serial, job }) if serial == self.serial => {
                if p.payload.is_empty() {
                    self.on_job_cleared(job);
                } else {
                    self.on_job_order(job, &p);
                }
            }
            Ok(Topic::DevMerged { serial, job }) if serial == self.serial => {
                if !p.payload.is_empty() {
                    self.on_merged(&job, &p); // empty: cleared when the job ended
                }
            }
            Ok(Topic::DevBlob { serial, artifact }) if serial == self.serial => {
                self.on_chunk(&artifact, &p);
            }
            _ => debug!(serial = %self.serial, topic = %p.topic, "unexpected message ignored"),
        }
    }

    /// The relay emptied the retained order: the job ended there.
    fn on_job_cleared(&mut self, job: JobId) {
        debug!(serial = %self.serial, job = %job, "job cleared by broker");
        if self.relay.as_ref().map(|r| &r.url) == self.out.origins.get(&job) {
            self.out.origins.remove(&job);
        }
        let _ = self.worker.orders.send(WorkerMsg::Ended(job));
    }

    /// A job order goes to the worker; the relay it came from is remembered, for its reports.
    fn on_job_order(&mut self, job: JobId, p: &Publish) {
        match Envelope::<JobOrder>::from_cbor(&p.payload, self.settings.max_packet_bytes) {
            Ok(env) => {
                // One tree keeps one job list: any relay of it takes the job's reports.
                if let Some(relay) = self.relay.as_ref().filter(|_| !self.settings.one_tree) {
                    self.out
                        .origins
                        .entry(job.clone())
                        .or_insert_with(|| relay.url.clone());
                }
                let _ = self.worker.orders.send(WorkerMsg::Order {
                    order: env.body,
                    in_topic: job,
                });
            }
            Err(e) => {
                warn!(serial = %self.serial, topic = %p.topic, error = %e, "malformed job order ignored");
            }
        }
    }

    fn on_merged(&self, job: &JobId, p: &Publish) {
        let merged = self.for_running_job(
            p,
            "merged data",
            "merged data for another job",
            |m: &Merged| m.job == *job,
        );
        if let Some(merged) = merged {
            let _ = self.worker.inbox.send(Incoming::Merged(merged));
        }
    }

    fn on_chunk(&self, artifact: &ArtifactId, p: &Publish) {
        let chunk = self.for_running_job(p, "chunk", "chunk of another artifact", |c: &Chunk| {
            c.artifact == *artifact
        });
        if let Some(chunk) = chunk {
            let _ = self.worker.inbox.send(Incoming::Chunk(chunk));
        }
    }

    /// Decodes what the running job asked for; one that is malformed (`what`), or that `ours`
    /// says is not what its topic names (`other`), is logged and dropped.
    fn for_running_job<T: DeserializeOwned>(
        &self,
        p: &Publish,
        what: &str,
        other: &str,
        ours: impl FnOnce(&T) -> bool,
    ) -> Option<T> {
        match Envelope::<T>::from_cbor(&p.payload, self.settings.max_packet_bytes) {
            Ok(env) if ours(&env.body) => Some(env.body),
            Ok(_) => {
                warn!(serial = %self.serial, topic = %p.topic, "{other} ignored");
                None
            }
            Err(e) => {
                warn!(serial = %self.serial, topic = %p.topic, error = %e, "malformed {what} ignored");
                None
            }
        }
    }

    /// A running job's request.
    pub(super) fn on_control(&mut self, c: Control) {
        match c {
            Control::Publish {
                topic,
                payload,
                reply,
            } => {
                let _ = reply.send(self.send_loose(topic, payload));
            }
            Control::WhenAcked { id, reply } => self.when_acked(id, reply),
            Control::Suspend { reply } => self.suspend(reply),
            Control::Resume => self.resume(),
            Control::Schedule(schedule) => self.apply_schedule(schedule),
            Control::FaultSeen(code) => self.on_fault_seen(code),
        }
    }
}
