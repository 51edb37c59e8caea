//! How anything a device says reaches the relay: committed to the outbox first, then handed to the
//! session, which publishes it and resends it until the relay acks it.

use protocol::data::DeviceData;
use protocol::device::JobUpdate;
use protocol::job::JobStatus;
use protocol::topic::{self, UpKind};
use protocol::{JobId, MsgId, Serial};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::outbox::{Outbox, OutboxError, Pending};

/// One device's way to send. Cheap to clone.
#[derive(Clone)]
pub struct Reporter {
    serial: Serial,
    outbox: Outbox,
    /// To the session, which publishes now if connected, else on the next connect.
    session: mpsc::UnboundedSender<Pending>,
}

impl Reporter {
    pub fn new(
        serial: Serial,
        outbox: Outbox,
        session: mpsc::UnboundedSender<Pending>,
    ) -> Reporter {
        Reporter {
            serial,
            outbox,
            session,
        }
    }

    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// Commits `body` to the outbox under the next message id, then queues it for publishing.
    /// Returns once it is durable: from then on it reaches the relay even if this process dies.
    pub async fn send<T: Serialize + Send + 'static>(
        &self,
        kind: UpKind,
        body: T,
        finished: Option<JobId>,
    ) -> Result<MsgId, OutboxError> {
        let topic = topic::dev_up(&self.serial, kind);
        let pending = self
            .outbox
            .enqueue(&self.serial, topic, body, finished)
            .await?;
        let id = pending.id;
        // The session being gone means we are shutting down; the message waits in the outbox.
        let _ = self.session.send(pending);
        Ok(id)
    }

    /// Reports a job's progress. A final status also records the job as finished, in the same commit.
    pub async fn job(
        &self,
        job: &JobId,
        status: JobStatus,
        note: Option<String>,
        data: Option<DeviceData>,
    ) -> Result<MsgId, OutboxError> {
        let finished = status.is_terminal().then(|| job.clone());
        let update = JobUpdate {
            job: job.clone(),
            status,
            note,
            data,
            errors: Default::default(),
        };
        self.send(UpKind::Job, update, finished).await
    }
}
