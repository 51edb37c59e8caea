//! What a device must remember across a restart besides its outbox, kept in the same file
//! (`DATA_DIR/agent.redb`, see [`crate::outbox`]):
//!
//! - which chunks of a firmware download it holds, so a restarted or reconnected agent asks only
//!   for the missing ones;
//! - the **write-intent** of a firmware write in progress, committed before the first byte is
//!   written: a power cut mid-write is found at the next start, with the old slot still active;
//! - the schedule a set-schedule job gave it (claim 38), which outlives the flags it was started
//!   with.
//!
//! Each table is keyed by serial, like the outbox, so a fleet shares the file.

use std::sync::Arc;

use protocol::artifact::ArtifactId;
use protocol::job::JobOrder;
use protocol::schedule::Schedule;
use protocol::{JobId, Serial};
use redb::{
    Database, ReadableDatabase, TableDefinition, TableError, TableHandle, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::device::Slot;
use crate::outbox::OutboxError;

/// (serial, artifact) → bitmap of the chunks held in `downloads/{artifact}.part`.
const DOWNLOADS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("downloads");
/// serial → the firmware write in progress (JSON [`WriteIntent`]).
const WRITE_INTENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("write_intents");
/// serial → the schedule set by a job (JSON [`StoredSchedule`]).
const SCHEDULES: TableDefinition<&str, &[u8]> = TableDefinition::new("schedules");

/// The step of a firmware write a power cut can interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteStep {
    /// Writing and verifying the inactive slot; the old slot is active.
    Write,
    /// The new slot is verified; switching to it and checking its health.
    Boot,
    /// The health check failed; switching back to the old slot.
    Rollback,
}

/// A firmware write in progress: enough to resume or conclude it after a power cut without the
/// relay (the job's order is kept whole).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteIntent {
    pub order: JobOrder,
    /// 1-based attempt of the write.
    pub attempt: u32,
    /// The slot being written.
    pub slot: Slot,
    /// The version of the other slot, the one running before the update.
    pub old_version: String,
    pub step: WriteStep,
}

/// The schedule a set-schedule job set, and which job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSchedule {
    pub job: JobId,
    pub schedule: Schedule,
}

/// Creates the tables, inside the outbox's opening transaction, so readers never meet a missing one.
pub(crate) fn init(txn: &WriteTransaction) -> Result<(), TableError> {
    txn.open_table(DOWNLOADS)?;
    txn.open_table(WRITE_INTENTS)?;
    txn.open_table(SCHEDULES)?;
    Ok(())
}

fn err(e: impl std::fmt::Display) -> OutboxError {
    OutboxError::Store(e.to_string())
}

/// A handle on these tables; cheap to clone. Every call runs on a blocking thread.
#[derive(Clone)]
pub struct AgentStore {
    db: Arc<Database>,
}

impl AgentStore {
    pub(crate) fn new(db: Arc<Database>) -> AgentStore {
        AgentStore { db }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| OutboxError::Store(format!("store call panicked: {e}")))?
    }

    /// The bitmap of chunks held of `artifact`, if a download was started.
    pub async fn held_chunks(
        &self,
        serial: &Serial,
        artifact: &ArtifactId,
    ) -> Result<Option<Vec<u8>>, OutboxError> {
        let (serial, artifact) = (serial.clone(), artifact.clone());
        self.run(move |db| {
            let txn = db.begin_read().map_err(err)?;
            let table = txn.open_table(DOWNLOADS).map_err(err)?;
            Ok(table
                .get((serial.as_str(), artifact.as_str()))
                .map_err(err)?
                .map(|v| v.value().to_vec()))
        })
        .await
    }

    /// Records the bitmap of chunks held. The caller has synced the chunks to disk first.
    pub async fn set_held_chunks(
        &self,
        serial: &Serial,
        artifact: &ArtifactId,
        bitmap: Vec<u8>,
    ) -> Result<(), OutboxError> {
        let (serial, artifact) = (serial.clone(), artifact.clone());
        self.run(move |db| {
            let txn = db.begin_write().map_err(err)?;
            {
                let mut table = txn.open_table(DOWNLOADS).map_err(err)?;
                table
                    .insert((serial.as_str(), artifact.as_str()), bitmap.as_slice())
                    .map_err(err)?;
            }
            txn.commit().map_err(err)
        })
        .await
    }

    pub async fn forget_download(
        &self,
        serial: &Serial,
        artifact: &ArtifactId,
    ) -> Result<(), OutboxError> {
        let (serial, artifact) = (serial.clone(), artifact.clone());
        self.run(move |db| {
            let txn = db.begin_write().map_err(err)?;
            {
                let mut table = txn.open_table(DOWNLOADS).map_err(err)?;
                table
                    .remove((serial.as_str(), artifact.as_str()))
                    .map_err(err)?;
            }
            txn.commit().map_err(err)
        })
        .await
    }

    async fn get_json<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        serial: &Serial,
    ) -> Result<Option<T>, OutboxError> {
        let serial = serial.clone();
        self.run(move |db| {
            let txn = db.begin_read().map_err(err)?;
            let t = txn.open_table(table).map_err(err)?;
            let Some(v) = t.get(serial.as_str()).map_err(err)? else {
                return Ok(None);
            };
            serde_json::from_slice(v.value()).map(Some).map_err(|e| {
                OutboxError::Store(format!("{} of {serial} is unreadable: {e}", table.name()))
            })
        })
        .await
    }

    async fn put_json<T: Serialize>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        serial: &Serial,
        value: Option<&T>,
    ) -> Result<(), OutboxError> {
        let bytes = value
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| OutboxError::Encode(e.to_string()))?;
        let serial = serial.clone();
        self.run(move |db| {
            let txn = db.begin_write().map_err(err)?;
            {
                let mut t = txn.open_table(table).map_err(err)?;
                match &bytes {
                    Some(b) => drop(t.insert(serial.as_str(), b.as_slice()).map_err(err)?),
                    None => drop(t.remove(serial.as_str()).map_err(err)?),
                }
            }
            txn.commit().map_err(err)
        })
        .await
    }

    pub async fn write_intent(&self, serial: &Serial) -> Result<Option<WriteIntent>, OutboxError> {
        self.get_json(WRITE_INTENTS, serial).await
    }

    /// Commits the intent; returns once it is durable.
    pub async fn set_write_intent(
        &self,
        serial: &Serial,
        intent: &WriteIntent,
    ) -> Result<(), OutboxError> {
        self.put_json(WRITE_INTENTS, serial, Some(intent)).await
    }

    pub async fn clear_write_intent(&self, serial: &Serial) -> Result<(), OutboxError> {
        self.put_json::<WriteIntent>(WRITE_INTENTS, serial, None)
            .await
    }

    pub async fn schedule(&self, serial: &Serial) -> Result<Option<StoredSchedule>, OutboxError> {
        self.get_json(SCHEDULES, serial).await
    }

    pub async fn set_schedule(
        &self,
        serial: &Serial,
        stored: &StoredSchedule,
    ) -> Result<(), OutboxError> {
        self.put_json(SCHEDULES, serial, Some(stored)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;
    use protocol::job::JobSpec;
    use protocol::schedule::SessionMode;

    #[tokio::test]
    async fn intents_schedules_and_bitmaps_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let c1 = Serial::parse("C1").unwrap();
        let artifact = ArtifactId::from_digest(&[3; 32]);
        let intent = WriteIntent {
            order: JobOrder {
                job: JobId::parse("J1").unwrap(),
                serial: c1.clone(),
                spec: JobSpec::GetData { sections: vec![] },
                instruction_time: chrono::Utc::now(),
                execution_time: None,
                deadline: None,
                max_attempts: 2,
            },
            attempt: 1,
            slot: Slot::B,
            old_version: "1.0".into(),
            step: WriteStep::Write,
        };
        let schedule = StoredSchedule {
            job: JobId::parse("J2").unwrap(),
            schedule: Schedule {
                mode: SessionMode::Periodic,
                interval_secs: Some(60),
                ..Schedule::default()
            },
        };
        {
            let outbox = Outbox::open(&path).unwrap();
            let store = outbox.store();
            store.set_write_intent(&c1, &intent).await.unwrap();
            store.set_schedule(&c1, &schedule).await.unwrap();
            store
                .set_held_chunks(&c1, &artifact, vec![0b101])
                .await
                .unwrap();
        }
        let outbox = Outbox::open(&path).unwrap();
        let store = outbox.store();
        assert_eq!(store.write_intent(&c1).await.unwrap(), Some(intent));
        assert_eq!(store.schedule(&c1).await.unwrap(), Some(schedule));
        assert_eq!(
            store.held_chunks(&c1, &artifact).await.unwrap(),
            Some(vec![0b101])
        );
        let c2 = Serial::parse("C2").unwrap();
        assert_eq!(store.write_intent(&c2).await.unwrap(), None);
        store.clear_write_intent(&c1).await.unwrap();
        store.forget_download(&c1, &artifact).await.unwrap();
        assert_eq!(store.write_intent(&c1).await.unwrap(), None);
        assert_eq!(store.held_chunks(&c1, &artifact).await.unwrap(), None);
    }
}
