//! How anything a device says reaches the relay: committed to the outbox first, then handed to the
//! session, which publishes it and resends it until the relay acks it.

use protocol::data::DeviceData;
use protocol::device::JobUpdate;
use protocol::job::JobStatus;
use protocol::topic::{self, UpKind};
use protocol::{JobId, MsgId, Serial};
use serde::Serialize;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::outbox::{Outbox, OutboxError, Pending};

/// Pause between attempts when the outbox cannot commit (disk full, I/O error).
const STORE_RETRY: Duration = Duration::from_secs(5);

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
        self.update(JobUpdate {
            job: job.clone(),
            status,
            note,
            data,
            errors: Default::default(),
        })
        .await
    }

    /// Reports a whole [`JobUpdate`] (with per-key `errors`, say). A final status also records the
    /// job as finished, in the same commit.
    pub async fn update(&self, update: JobUpdate) -> Result<MsgId, OutboxError> {
        let finished = update.status.is_terminal().then(|| update.job.clone());
        self.send(UpKind::Job, update, finished).await
    }

    /// Reports until the store commits it: a report must not be lost. If the store keeps failing,
    /// it tries again every few seconds until `stop` (then the job runs again after the restart,
    /// as it never finished). Returns the message id, `None` if it gave up.
    pub async fn update_until_stored(
        &self,
        update: JobUpdate,
        stop: &CancellationToken,
    ) -> Option<MsgId> {
        loop {
            match self.update(update.clone()).await {
                Ok(id) => return Some(id),
                Err(OutboxError::Closed) => return None,
                Err(e) => {
                    error!(serial = %self.serial, job = %update.job, status = %update.status, error = %e, "could not store a job report; retrying");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(STORE_RETRY) => {}
            }
        }
    }

    /// [`Reporter::update_until_stored`] of a plain status and note.
    pub async fn status_until_stored(
        &self,
        job: &JobId,
        status: JobStatus,
        note: Option<String>,
        stop: &CancellationToken,
    ) -> Option<MsgId> {
        let update = JobUpdate {
            job: job.clone(),
            status,
            note,
            data: None,
            errors: Default::default(),
        };
        self.update_until_stored(update, stop).await
    }
}
