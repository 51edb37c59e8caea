//! The agent's durable store (`DATA_DIR/agent.redb`): the outbox of messages not yet acknowledged
//! by the broker, each serial's message counter, and the jobs already finished.
//!
//! Why an outbox (claims 13–14; docs/decisions.md, D3): an MQTT PUBACK only says the broker's
//! router took the packet, not that anything is durable. So every message gets the next id of its
//! serial, is committed here, and only then published; it stays until the broker acks that id on
//! `dev/{serial}/ack` after its own commit. A message therefore survives a broker crash, a lost
//! connection and this agent's own restart, and since the broker deduplicates by (serial, id) a
//! resend never stores anything twice.
//!
//! Each serial's numbering has an **incarnation**: a random number chosen when this file first
//! numbers a message of that serial, carried in every envelope. A device whose store is lost (a
//! replaced board, a reflash, a wiped disk) counts from 1 again under a new incarnation, so the
//! relay serves it as a new sender instead of answering "duplicate" to all it sends.
//!
//! One file holds every serial, keyed by serial, because the fleet simulator runs thousands of
//! devices in one process and a process may hold only so many open files. Writes go to one writer
//! thread that groups whatever has queued up into a single transaction: one fsync for a burst of
//! thousands of devices, so durability does not cap throughput.

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread;

use protocol::{Envelope, EnvelopeError, Incarnation, JobId, MsgId, Serial};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use tokio::sync::oneshot;

/// serial → the id the next message of that serial gets. Ids start at 1 (0 is the broker's own).
const NEXT_ID: TableDefinition<&str, u64> = TableDefinition::new("next_msg_id");
/// serial → the incarnation of its numbering (never 0, which means "none").
const INCARNATION: TableDefinition<&str, u64> = TableDefinition::new("incarnation");
/// (serial, msg id) → (topic, the encoded envelope). The bytes are kept as sent, so a resend is
/// byte-for-byte the original.
const PENDING: TableDefinition<(&str, u64), (&str, &[u8])> = TableDefinition::new("pending");
/// (serial, job) → when it finished (Unix seconds), so a redelivered retained order is not run twice.
const FINISHED: TableDefinition<(&str, &str), i64> = TableDefinition::new("finished_jobs");

/// How long a finished job is remembered. The broker clears a job's retained order as soon as it
/// ends, so redeliveries stop within seconds; a month is ample.
const REMEMBER_FINISHED_SECS: i64 = 30 * 24 * 3600;
/// Most operations one transaction groups.
const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "could not open the agent's store {}: {reason}; check that the data directory is writable and that no other device-agent uses it",
        .path.display()
    )]
    Open { path: PathBuf, reason: String },
    /// Written by a newer device-agent: its records may mean something else, so it is not opened.
    #[error(
        "the agent's store {} has format version {found}, newer than this device-agent reads \
         ({supported}): run the newer device-agent that wrote it, or move the data directory aside \
         and start this one with an empty one (the old file keeps its unsent reports)",
        .path.display()
    )]
    NewerFormat {
        path: PathBuf,
        found: u64,
        supported: u64,
    },
    #[error("the agent's store failed: {0}")]
    Store(String),
    #[error("could not encode a message: {0}")]
    Encode(String),
    #[error("the agent's store is closed")]
    Closed,
}

fn store_err(e: impl std::fmt::Display) -> OutboxError {
    OutboxError::Store(e.to_string())
}

/// A committed message waiting for its ack.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// The incarnation of the numbering that gave `id` (0 for a message numbered before
    /// incarnations existed).
    pub inc: Incarnation,
    pub id: MsgId,
    pub topic: String,
    pub payload: Vec<u8>,
}

type Encoder = Box<dyn FnOnce(Incarnation, MsgId) -> Result<Vec<u8>, EnvelopeError> + Send>;

enum Op {
    Enqueue {
        serial: Serial,
        topic: String,
        encode: Encoder,
        finished: Option<JobId>,
        reply: oneshot::Sender<Result<Pending, OutboxError>>,
    },
    Ack {
        serial: Serial,
        ids: Vec<MsgId>,
        reply: oneshot::Sender<Result<usize, OutboxError>>,
    },
}

/// A handle on the store; cheap to clone. The file closes when the last clone is dropped.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    /// Dropped first on close, which ends the writer thread once it has drained its queue.
    tx: Option<mpsc::Sender<Op>>,
    writer: Option<thread::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            // The writer only ends when its queue is drained, so nothing acknowledged to a
            // caller is lost; joining also releases the file for the next open.
            let _ = writer.join();
        }
    }
}

impl Outbox {
    /// Opens (or creates) the store at `path` and forgets finished jobs older than a month.
    pub fn open(path: &Path) -> Result<Outbox, OutboxError> {
        let open_err = |reason: String| OutboxError::Open {
            path: path.to_owned(),
            reason,
        };
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(open_err("it is already open in this process".to_owned()));
            }
            Err(e) => return Err(open_err(e.to_string())),
        };
        // Read before anything is written: a newer agent's file is refused untouched.
        let found = crate::format::found(&db).map_err(|e| open_err(e.to_string()))?;
        crate::format::refuse_newer(path, found)?;
        let db = Arc::new(db);
        init_tables(&db, path, found).map_err(|e| open_err(e.to_string()))?;
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer = thread::Builder::new()
            .name("outbox-writer".to_owned())
            .spawn(move || writer_loop(&writer_db, &rx))
            .map_err(|e| open_err(format!("could not start the writer thread: {e}")))?;
        Ok(Outbox {
            inner: Arc::new(Inner {
                db,
                tx: Some(tx),
                writer: Some(writer),
            }),
        })
    }

    fn send(&self, op: Op) -> Result<(), OutboxError> {
        let tx = self.inner.tx.as_ref().ok_or(OutboxError::Closed)?;
        tx.send(op).map_err(|_| OutboxError::Closed)
    }

    /// Gives `body` the next id of `serial`, wraps it in an envelope and commits it. When
    /// `finished` names a job, that job is recorded as finished in the same transaction, so a
    /// crash can never leave a job marked finished without its final report, or the reverse.
    pub async fn enqueue<T: Serialize + Send + 'static>(
        &self,
        serial: &Serial,
        topic: String,
        body: T,
        finished: Option<JobId>,
    ) -> Result<Pending, OutboxError> {
        let at = chrono::Utc::now();
        let encode: Encoder =
            Box::new(move |inc, id| Envelope::from_outbox(inc, id, at, body).to_cbor());
        let (reply, answer) = oneshot::channel();
        self.send(Op::Enqueue {
            serial: serial.clone(),
            topic,
            encode,
            finished,
            reply,
        })?;
        answer.await.map_err(|_| OutboxError::Closed)?
    }

    /// Removes acknowledged messages; returns how many were still pending.
    pub async fn ack(&self, serial: &Serial, ids: Vec<MsgId>) -> Result<usize, OutboxError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Ack {
            serial: serial.clone(),
            ids,
            reply,
        })?;
        answer.await.map_err(|_| OutboxError::Closed)?
    }

    /// Every message of `serial` still waiting for its ack, oldest first.
    pub async fn pending(&self, serial: &Serial) -> Result<Vec<Pending>, OutboxError> {
        let db = self.inner.db.clone();
        let serial = serial.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(store_err)?;
            let table = txn.open_table(PENDING).map_err(store_err)?;
            let key = serial.as_str();
            let mut out = Vec::new();
            for row in table
                .range((key, 0u64)..=(key, u64::MAX))
                .map_err(store_err)?
            {
                let (k, v) = row.map_err(store_err)?;
                let (topic, payload) = v.value();
                out.push(Pending {
                    // Read back from the envelope itself: what it was sent with is what counts.
                    inc: Envelope::peek_seq(payload).map_or(0, |seq| seq.inc),
                    id: k.value().1,
                    topic: topic.to_owned(),
                    payload: payload.to_vec(),
                });
            }
            Ok(out)
        })
        .await
    }

    /// The other tables of the same file: downloads, write-intents, schedules.
    pub fn store(&self) -> crate::store::AgentStore {
        crate::store::AgentStore::new(self.inner.db.clone())
    }

    /// Whether `job` already finished on `serial` (its final report is committed).
    pub async fn is_finished(&self, serial: &Serial, job: &JobId) -> Result<bool, OutboxError> {
        let db = self.inner.db.clone();
        let (serial, job) = (serial.clone(), job.clone());
        blocking(move || {
            let txn = db.begin_read().map_err(store_err)?;
            let table = txn.open_table(FINISHED).map_err(store_err)?;
            Ok(table
                .get((serial.as_str(), job.as_str()))
                .map_err(store_err)?
                .is_some())
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, OutboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OutboxError::Store(format!("store read panicked: {e}")))?
}

/// Creates the tables so readers never meet a missing one, and prunes old finished jobs.
fn init_tables(db: &Database, path: &Path, found: Option<u64>) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        crate::format::record(&txn, path, found)?;
        txn.open_table(NEXT_ID)?;
        txn.open_table(INCARNATION)?;
        txn.open_table(PENDING)?;
        let mut finished = txn.open_table(FINISHED)?;
        let horizon = chrono::Utc::now().timestamp() - REMEMBER_FINISHED_SECS;
        finished.retain(|_, at| at >= horizon)?;
        crate::store::init(&txn)?;
    }
    txn.commit()?;
    Ok(())
}

/// A fresh incarnation: random, so that no two stores of one serial are likely ever to share one,
/// whatever happened to the first; never 0, which means "none".
fn new_incarnation() -> Incarnation {
    loop {
        let inc: Incarnation = rand::random();
        if inc != 0 {
            return inc;
        }
    }
}

/// Replies owed once the batch's transaction has committed.
enum Reply {
    Enqueued(
        oneshot::Sender<Result<Pending, OutboxError>>,
        Result<Pending, OutboxError>,
    ),
    Acked(
        oneshot::Sender<Result<usize, OutboxError>>,
        Result<usize, OutboxError>,
    ),
}

fn writer_loop(db: &Database, rx: &mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let replies = match apply_batch(db, batch) {
            Ok(replies) => replies,
            Err((e, replies)) => replies
                .into_iter()
                .map(|r| match r {
                    Reply::Enqueued(tx, _) => Reply::Enqueued(tx, Err(e.clone())),
                    Reply::Acked(tx, _) => Reply::Acked(tx, Err(e.clone())),
                })
                .collect(),
        };
        for reply in replies {
            // A caller that gave up waiting is no reason to stop.
            match reply {
                Reply::Enqueued(tx, r) => drop(tx.send(r)),
                Reply::Acked(tx, r) => drop(tx.send(r)),
            }
        }
    }
}

/// Applies a batch in one transaction. On a store failure every caller in the batch gets the error,
/// since nothing of it was committed.
fn apply_batch(db: &Database, batch: Vec<Op>) -> Result<Vec<Reply>, (OutboxError, Vec<Reply>)> {
    let mut replies = Vec::with_capacity(batch.len());
    let mut ops = batch.into_iter();
    let result = (|| -> Result<(), OutboxError> {
        let txn = db.begin_write().map_err(store_err)?;
        {
            let mut next_ids = txn.open_table(NEXT_ID).map_err(store_err)?;
            let mut incarnations = txn.open_table(INCARNATION).map_err(store_err)?;
            let mut pending = txn.open_table(PENDING).map_err(store_err)?;
            let mut finished = txn.open_table(FINISHED).map_err(store_err)?;
            let now = chrono::Utc::now().timestamp();
            for op in ops.by_ref() {
                match op {
                    Op::Enqueue {
                        serial,
                        topic,
                        encode,
                        finished: job,
                        reply,
                    } => {
                        let key = serial.as_str();
                        let id = next_ids
                            .get(key)
                            .map_err(store_err)?
                            .map_or(1, |v| v.value());
                        let known = incarnations
                            .get(key)
                            .map_err(store_err)?
                            .map(|inc| inc.value());
                        let inc = match known {
                            Some(inc) => inc,
                            None => {
                                let inc = new_incarnation();
                                incarnations.insert(key, inc).map_err(store_err)?;
                                inc
                            }
                        };
                        match encode(inc, id) {
                            Ok(payload) => {
                                next_ids.insert(key, id + 1).map_err(store_err)?;
                                pending
                                    .insert((key, id), (topic.as_str(), payload.as_slice()))
                                    .map_err(store_err)?;
                                if let Some(job) = job {
                                    finished
                                        .insert((key, job.as_str()), now)
                                        .map_err(store_err)?;
                                }
                                replies.push(Reply::Enqueued(
                                    reply,
                                    Ok(Pending {
                                        inc,
                                        id,
                                        topic,
                                        payload,
                                    }),
                                ));
                            }
                            Err(e) => replies.push(Reply::Enqueued(
                                reply,
                                Err(OutboxError::Encode(e.to_string())),
                            )),
                        }
                    }
                    Op::Ack { serial, ids, reply } => {
                        let mut removed = 0;
                        for id in ids {
                            if pending
                                .remove((serial.as_str(), id))
                                .map_err(store_err)?
                                .is_some()
                            {
                                removed += 1;
                            }
                        }
                        replies.push(Reply::Acked(reply, Ok(removed)));
                    }
                }
            }
        }
        txn.commit().map_err(store_err)
    })();
    match result {
        Ok(()) => Ok(replies),
        Err(e) => {
            // Ops not reached before the failure still need an answer.
            for op in ops {
                match op {
                    Op::Enqueue { reply, .. } => {
                        replies.push(Reply::Enqueued(reply, Err(e.clone())))
                    }
                    Op::Ack { reply, .. } => replies.push(Reply::Acked(reply, Err(e.clone()))),
                }
            }
            Err((e, replies))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::device::DeviceState;

    fn serial(s: &str) -> Serial {
        Serial::parse(s).unwrap()
    }

    fn state(model: &str) -> DeviceState {
        DeviceState {
            site: "Osaka".into(),
            model: model.into(),
            firmware: "1".into(),
        }
    }

    #[tokio::test]
    async fn pending_messages_survive_a_reopen_and_ids_keep_increasing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let c1 = serial("C1");
        let outbox = Outbox::open(&path).unwrap();
        let a = outbox
            .enqueue(&c1, "dev/C1/up/state".into(), state("a"), None)
            .await
            .unwrap();
        let b = outbox
            .enqueue(&c1, "dev/C1/up/state".into(), state("b"), None)
            .await
            .unwrap();
        assert_eq!((a.id, b.id), (1, 2));
        drop(outbox);

        let outbox = Outbox::open(&path).unwrap();
        let pending = outbox.pending(&c1).await.unwrap();
        assert_eq!(
            pending,
            vec![a.clone(), b.clone()],
            "both messages must still be pending, byte for byte"
        );
        let env: Envelope<DeviceState> = Envelope::from_cbor(&pending[1].payload, 1 << 20).unwrap();
        assert_eq!((env.id, env.body), (2, state("b")));

        let c = outbox
            .enqueue(&c1, "dev/C1/up/state".into(), state("c"), None)
            .await
            .unwrap();
        assert_eq!(c.id, 3, "ids never repeat across restarts");
        assert_eq!(
            (a.inc, b.inc),
            (c.inc, c.inc),
            "one numbering, one incarnation, across restarts"
        );
        assert_ne!(c.inc, 0);
        let env: Envelope<DeviceState> = Envelope::from_cbor(&c.payload, 1 << 20).unwrap();
        assert_eq!(env.seq(), protocol::Seq { inc: c.inc, id: 3 });
    }

    #[tokio::test]
    async fn a_store_created_anew_numbers_under_a_new_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let c1 = serial("C1");
        let first = Outbox::open(&dir.path().join("a.redb")).unwrap();
        let old = first
            .enqueue(&c1, "dev/C1/up/state".into(), state("a"), None)
            .await
            .unwrap();
        let other = first
            .enqueue(&serial("C2"), "dev/C2/up/state".into(), state("a"), None)
            .await
            .unwrap();
        assert_ne!(
            old.inc, other.inc,
            "each serial of a fleet numbers on its own"
        );
        // The board is replaced: an empty store, ids from 1 again, but not the same numbering.
        let wiped = Outbox::open(&dir.path().join("b.redb")).unwrap();
        let new = wiped
            .enqueue(&c1, "dev/C1/up/state".into(), state("a"), None)
            .await
            .unwrap();
        assert_eq!((old.id, new.id), (1, 1));
        assert_ne!(old.inc, new.inc);
    }

    #[tokio::test]
    async fn an_ack_removes_the_message_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let c1 = serial("C1");
        let outbox = Outbox::open(&path).unwrap();
        let a = outbox
            .enqueue(&c1, "t".into(), state("a"), None)
            .await
            .unwrap();
        let b = outbox
            .enqueue(&c1, "t".into(), state("b"), None)
            .await
            .unwrap();
        assert_eq!(
            outbox.ack(&c1, vec![a.id, 99]).await.unwrap(),
            1,
            "unknown ids are ignored"
        );
        assert_eq!(
            outbox.ack(&c1, vec![a.id]).await.unwrap(),
            0,
            "a repeated ack is harmless"
        );
        drop(outbox);
        let outbox = Outbox::open(&path).unwrap();
        assert_eq!(outbox.pending(&c1).await.unwrap(), vec![b]);
    }

    #[tokio::test]
    async fn serials_have_their_own_ids_and_messages() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("agent.redb")).unwrap();
        let (c1, c2) = (serial("C1"), serial("C2"));
        // Many at once from many tasks: they share transactions but never ids.
        let mut tasks = Vec::new();
        for i in 0..50 {
            let (o, s) = (
                outbox.clone(),
                if i % 2 == 0 { c1.clone() } else { c2.clone() },
            );
            tasks.push(tokio::spawn(async move {
                o.enqueue(&s, "t".into(), state("x"), None)
                    .await
                    .unwrap()
                    .id
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for s in [&c1, &c2] {
            let ids: Vec<MsgId> = outbox
                .pending(s)
                .await
                .unwrap()
                .iter()
                .map(|p| p.id)
                .collect();
            assert_eq!(ids, (1..=25).collect::<Vec<_>>(), "{s}");
        }
        outbox.ack(&c1, vec![1]).await.unwrap();
        assert_eq!(
            outbox.pending(&c2).await.unwrap().len(),
            25,
            "acking C1 must not touch C2"
        );
    }

    #[tokio::test]
    async fn a_final_report_marks_its_job_finished_in_the_same_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let c1 = serial("C1");
        let job = JobId::parse("J1").unwrap();
        let outbox = Outbox::open(&path).unwrap();
        assert!(!outbox.is_finished(&c1, &job).await.unwrap());
        outbox
            .enqueue(&c1, "t".into(), state("x"), Some(job.clone()))
            .await
            .unwrap();
        drop(outbox);
        let outbox = Outbox::open(&path).unwrap();
        assert!(outbox.is_finished(&c1, &job).await.unwrap());
        assert!(!outbox.is_finished(&serial("C2"), &job).await.unwrap());
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let _first = Outbox::open(&path).unwrap();
        let Err(e) = Outbox::open(&path) else {
            panic!("opened twice")
        };
        assert!(e.to_string().contains("no other device-agent"), "{e}");
    }
}
