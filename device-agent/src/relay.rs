//! What a running job may ask of the device's session with the relay, and what the session passes
//! back to it. The session ([`crate::agent`]) owns the connection; jobs never touch MQTT:
//!
//! - publish a message that is *not* kept in the outbox (a firmware fetch: a lost one is asked
//!   again), and learn whether it left;
//! - wait until the relay acknowledged a message of the outbox (a firmware job's `in-progress` must
//!   be known at the relay before the device goes quiet);
//! - **suspend** relay access (claims 5, 12: close the MQTT session and take no job while writing
//!   firmware) and resume it;
//! - change the session's schedule (claim 38);
//! - receive what the relay sends for the job: merged data of an update, chunks of a download.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::artifact::Chunk;
use protocol::data::DeviceData;
use protocol::device::{AckOutcome, Merged};
use protocol::schedule::Schedule;
use protocol::{JobId, MsgId};
use tokio::sync::{mpsc, oneshot, watch};

/// A job's request to the session.
#[derive(Debug)]
pub enum Control {
    /// Publish now, QoS 1, not retained, not through the outbox. `reply`: whether it was handed to
    /// the connection (false when offline).
    Publish {
        topic: String,
        payload: Vec<u8>,
        reply: oneshot::Sender<bool>,
    },
    /// Answer once the relay acknowledged message `id` (at once if it already has).
    WhenAcked {
        id: MsgId,
        reply: oneshot::Sender<AckOutcome>,
    },
    /// Close the MQTT session and stay away until [`Control::Resume`]; answer once it is closed.
    Suspend {
        reply: oneshot::Sender<()>,
    },
    Resume,
    /// A set-schedule job's new schedule, already persisted.
    Schedule(Schedule),
    /// The device saw this fault code: a periodic schedule's `fault:CODE` condition checks in.
    FaultSeen(String),
}

/// The worker's side: cheap to clone.
#[derive(Clone)]
pub struct RelayHandle {
    control: mpsc::UnboundedSender<Control>,
    online: watch::Receiver<bool>,
    release: watch::Receiver<bool>,
    /// Set while a fatal fault's alarm is not yet at the relay (Fig. 5, S305): no job starts.
    hold: Arc<watch::Sender<bool>>,
}

/// The session's side of [`pair`].
pub struct SessionEnds {
    pub control: mpsc::UnboundedReceiver<Control>,
    /// Connected and subscribed.
    pub online: watch::Sender<bool>,
    /// Whether jobs waiting for their instruction time may start: always in a persistent session,
    /// only during a check-in in a periodic one ("at the first check-in at or after it").
    pub release: watch::Sender<bool>,
}

/// A connected pair. Both start offline and closed.
pub fn pair() -> (RelayHandle, SessionEnds) {
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (online_tx, online_rx) = watch::channel(false);
    let (release_tx, release_rx) = watch::channel(false);
    (
        RelayHandle {
            control: control_tx,
            online: online_rx,
            release: release_rx,
            hold: Arc::new(watch::channel(false).0),
        },
        SessionEnds {
            control: control_rx,
            online: online_tx,
            release: release_tx,
        },
    )
}

impl RelayHandle {
    /// See [`Control::Publish`]. False also when the session is gone.
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        let (reply, answer) = oneshot::channel();
        if self
            .control
            .send(Control::Publish {
                topic,
                payload,
                reply,
            })
            .is_err()
        {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// See [`Control::WhenAcked`]. `None`: the session is gone (shutting down).
    pub async fn acked(&self, id: MsgId) -> Option<AckOutcome> {
        let (reply, answer) = oneshot::channel();
        self.control.send(Control::WhenAcked { id, reply }).ok()?;
        answer.await.ok()
    }

    /// See [`Control::Suspend`]. Returns when the session is closed (or gone).
    pub async fn suspend(&self) {
        let (reply, answer) = oneshot::channel();
        if self.control.send(Control::Suspend { reply }).is_ok() {
            let _ = answer.await;
        }
    }

    pub fn resume(&self) {
        let _ = self.control.send(Control::Resume);
    }

    pub fn set_schedule(&self, schedule: Schedule) {
        let _ = self.control.send(Control::Schedule(schedule));
    }

    pub fn is_online(&self) -> bool {
        *self.online.borrow()
    }

    /// Waits until connected and subscribed. Returns false if the session is gone.
    pub async fn wait_online(&self) -> bool {
        let mut online = self.online.clone();
        online.wait_for(|on| *on).await.is_ok()
    }

    /// Waits until the connection drops. Returns at once if offline.
    pub async fn wait_offline(&self) {
        let mut online = self.online.clone();
        let _ = online.wait_for(|on| !*on).await;
    }

    /// See [`SessionEnds::release`].
    pub fn release(&self) -> watch::Receiver<bool> {
        self.release.clone()
    }

    /// Holds back (or lets go) every job that has not started: a fatal fault's alarm goes first
    /// (Fig. 5, S305, S311).
    pub fn hold_jobs(&self, on: bool) {
        self.hold.send_if_modified(|h| {
            let changed = *h != on;
            *h = on;
            changed
        });
    }

    /// Waits until jobs may start (at once if they may).
    pub async fn jobs_released(&self) {
        let mut hold = self.hold.subscribe();
        let _ = hold.wait_for(|h| !*h).await;
    }

    pub fn jobs_held(&self) -> bool {
        *self.hold.borrow()
    }

    /// See [`Control::FaultSeen`].
    pub fn fault_seen(&self, code: String) {
        let _ = self.control.send(Control::FaultSeen(code));
    }
}

/// What the relay sent for a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Merged(Merged),
    Chunk(Chunk),
}

/// The job worker's inbox of [`Incoming`]. Merged data is kept by job until that job asks for it
/// (it arrives retained, possibly before the job runs, e.g. after a restart); chunks are for
/// whatever download is running and are dropped otherwise.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Incoming>,
    merged: HashMap<JobId, DeviceData>,
}

pub fn inbox() -> (mpsc::UnboundedSender<Incoming>, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        tx,
        Inbox {
            rx,
            merged: HashMap::new(),
        },
    )
}

impl Inbox {
    /// Files a message that arrived while no job asked for it.
    pub fn stash(&mut self, msg: Incoming) {
        if let Incoming::Merged(m) = msg {
            self.merged.insert(m.job, m.data);
        }
    }

    /// The next message, as the worker's idle loop receives it.
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    /// Waits for the merged data of `job`. `None` if the session is gone.
    pub async fn merged(&mut self, job: &JobId) -> Option<DeviceData> {
        if let Some(data) = self.merged.remove(job) {
            return Some(data);
        }
        loop {
            match self.rx.recv().await? {
                Incoming::Merged(m) if &m.job == job => return Some(m.data),
                other => self.stash(other),
            }
        }
    }

    /// The next chunk. `None` if the session is gone.
    pub async fn chunk(&mut self) -> Option<Chunk> {
        loop {
            match self.rx.recv().await? {
                Incoming::Chunk(c) => return Some(c),
                other => self.stash(other),
            }
        }
    }

    /// A chunk that has already arrived, without waiting.
    pub fn try_chunk(&mut self) -> Option<Chunk> {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Incoming::Chunk(c) => return Some(c),
                other => self.stash(other),
            }
        }
        None
    }

    /// Forgets what was kept for a job that ended.
    pub fn forget(&mut self, job: &JobId) {
        self.merged.remove(job);
    }
}
