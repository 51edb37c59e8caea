//! What the session sends: every message the outbox commits is published as soon as the
//! connection allows (a fatal fault's alarm ahead of the rest), kept until the relay acks it and
//! resent with backoff until then; a job's reports go only to the relay that issued the job.
//! Acks remove messages from the outbox and answer the jobs waiting on them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use protocol::device::{AckBatch, AckOutcome, JobUpdate};
use protocol::topic::{self, Topic, UpKind};
use protocol::url::BrokerUrl;
use protocol::{Envelope, Incarnation, JobId, MsgId};
use rumqttc::{Publish, QoS};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Session;
use crate::outbox::Pending;
use crate::transport::Endpoint;

/// How soon the session tries again when rumqttc's request channel was full.
pub(super) const FLUSH_RETRY: Duration = Duration::from_millis(20);
/// How many recent ack outcomes the session remembers.
const RECENT_ACKS: usize = 64;

/// A message the relay has not acked yet.
pub(super) struct Inflight {
    msg: Pending,
    /// The job a report is about: it goes only to the relay that issued the job (see
    /// [`Outgoing::origins`]).
    job: Option<JobId>,
    next_try: Instant,
    backoff: Duration,
    /// Already waiting in `queue`, so a resend does not queue it twice.
    queued: bool,
}

/// What is unacked or waiting to be published.
#[derive(Default)]
pub(super) struct Outgoing {
    pub(super) pending: BTreeMap<MsgId, Inflight>,
    /// Ids to publish as soon as rumqttc's request channel has room.
    queue: VecDeque<MsgId>,
    /// Messages outside the outbox (fetches) waiting for room in the request channel.
    pub(super) loose: VecDeque<(String, Vec<u8>)>,
    pub(super) ack_waiters: Vec<(MsgId, oneshot::Sender<AckOutcome>)>,
    /// The last few acks, for a job that asks after its message was already acked.
    recent_acks: VecDeque<(MsgId, AckOutcome)>,
    /// Which relay each job came from. Relays keep separate stores and number their jobs
    /// independently, so a job's reports are held while the device is on another relay (after a
    /// failover) and go out when it is back on the one that issued the job: sent elsewhere they
    /// would be refused, or worse, taken for that relay's job of the same id.
    pub(super) origins: HashMap<JobId, BrokerUrl>,
}

impl Outgoing {
    /// The connection is gone: nothing is queued on it any more.
    pub(super) fn unqueue_all(&mut self) {
        self.queue.clear();
        self.loose.clear();
        for m in self.pending.values_mut() {
            m.queued = false;
        }
    }
}

/// Whether a message may go to `relay`: a job's report only to the relay the job came from
/// (see [`Outgoing::origins`]); everything else anywhere.
fn deliverable(
    job: Option<&JobId>,
    origins: &HashMap<JobId, BrokerUrl>,
    relay: Option<&Endpoint>,
) -> bool {
    match (job, relay) {
        (Some(job), Some(relay)) => origins.get(job).is_none_or(|from| *from == relay.url),
        _ => true,
    }
}

impl Session {
    /// A message the outbox committed: publish it now if we can.
    pub(super) fn add(&mut self, msg: Pending) {
        let id = msg.id;
        let backoff = self.settings.resend_min;
        let job = self.job_of(&msg);
        let queued =
            self.connected && deliverable(job.as_ref(), &self.out.origins, self.relay.as_ref());
        self.out.pending.insert(
            id,
            Inflight {
                msg,
                job,
                next_try: Instant::now() + backoff,
                backoff,
                queued,
            },
        );
        if queued {
            // An alarm goes ahead of everything but older alarms (Fig. 5, S306).
            let alarm = topic::dev_up(&self.serial, UpKind::Alarm);
            let out = &mut self.out;
            let is_alarm = |m: Option<&Inflight>| m.is_some_and(|m| m.msg.topic == alarm);
            if is_alarm(out.pending.get(&id)) {
                let at = out
                    .queue
                    .iter()
                    .take_while(|q| is_alarm(out.pending.get(q)))
                    .count();
                out.queue.insert(at, id);
            } else {
                out.queue.push_back(id);
            }
        }
    }

    /// The job a job report (`up/job`) is about.
    fn job_of(&self, msg: &Pending) -> Option<JobId> {
        match Topic::parse(&msg.topic) {
            Ok(Topic::DevUp {
                kind: UpKind::Job, ..
            }) => Envelope::<JobUpdate>::from_cbor(&msg.payload, self.settings.max_packet_bytes)
                .ok()
                .map(|e| e.body.job),
            _ => None,
        }
    }

    /// On a new connection: everything pending that may go to this relay goes out at once, each
    /// with its backoff reset, a fatal fault's alarm ahead of any backlog (Fig. 5, S306).
    pub(super) fn requeue_all(&mut self, now: Instant) {
        let out = &mut self.out;
        out.queue.clear();
        let (origins, relay) = (&out.origins, self.relay.as_ref());
        for (id, m) in &mut out.pending {
            m.backoff = self.settings.resend_min;
            m.next_try = now + m.backoff;
            m.queued = deliverable(m.job.as_ref(), origins, relay);
            if m.queued {
                out.queue.push_back(*id);
            } else {
                debug!(serial = %self.serial, msg_id = *id, "report held for the relay that issued its job");
            }
        }
        let alarm = topic::dev_up(&self.serial, UpKind::Alarm);
        let (mut first, rest): (VecDeque<MsgId>, VecDeque<MsgId>) = out
            .queue
            .drain(..)
            .partition(|id| out.pending.get(id).is_some_and(|m| m.msg.topic == alarm));
        first.extend(rest);
        out.queue = first;
    }

    /// Queues every unacked message whose time has come, and doubles its wait.
    pub(super) fn resend_due(&mut self) {
        if !self.connected {
            return;
        }
        let now = Instant::now();
        let out = &mut self.out;
        let (origins, relay) = (&out.origins, self.relay.as_ref());
        for (id, m) in &mut out.pending {
            if m.next_try <= now && !m.queued && deliverable(m.job.as_ref(), origins, relay) {
                m.backoff = (m.backoff * 2).min(self.settings.resend_max);
                m.next_try = now + m.backoff;
                m.queued = true;
                out.queue.push_back(*id);
                debug!(serial = %self.serial, msg_id = *id, "resending unacked message");
            }
        }
    }

    /// A message outside the outbox (a fetch), sent only while online; whether it will be.
    pub(super) fn send_loose(&mut self, topic: String, payload: Vec<u8>) -> bool {
        let sent = self.online();
        if sent {
            self.out.loose.push_back((topic, payload));
        }
        sent
    }

    /// Publishes queued messages until rumqttc's request channel is full: fetches first, then
    /// the outbox's messages in queue order.
    pub(super) fn flush(&mut self) {
        if !self.connected || self.disconnect_requested {
            return;
        }
        if self.flush_loose() {
            self.flush_queue();
        }
    }

    /// Whether every fetch went out.
    fn flush_loose(&mut self) -> bool {
        while let Some((topic, payload)) = self.out.loose.pop_front() {
            if let Err(e) = self.link.client.try_publish(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                payload.clone(),
            ) {
                debug!(serial = %self.serial, error = %e, "request channel full; fetch waits");
                self.out.loose.push_front((topic, payload));
                return false;
            }
        }
        true
    }

    fn flush_queue(&mut self) {
        let out = &mut self.out;
        while let Some(&id) = out.queue.front() {
            let Some(m) = out.pending.get_mut(&id) else {
                out.queue.pop_front(); // acked meanwhile
                continue;
            };
            match self.link.client.try_publish(
                m.msg.topic.clone(),
                QoS::AtLeastOnce,
                false,
                m.msg.payload.clone(),
            ) {
                Ok(()) => {
                    m.queued = false;
                    out.queue.pop_front();
                }
                Err(_) => break, // full: the link drains it; try again shortly
            }
        }
    }

    pub(super) async fn on_acks(&mut self, p: &Publish) {
        let batch = match Envelope::<AckBatch>::from_cbor(
            &p.payload,
            self.settings.max_packet_bytes,
        ) {
            Ok(env) => env.body,
            Err(e) => {
                warn!(serial = %self.serial, topic = %p.topic, error = %e, "malformed ack ignored");
                return;
            }
        };
        let mut done = Vec::with_capacity(batch.acks.len());
        for ack in batch.acks {
            if let Some(inc) = ack.inc
                && self.is_foreign(ack.id, inc)
            {
                // Meant for a message this numbering never sent (an earlier store of this
                // device's, before it was wiped): deleting ours under that id would lose it.
                debug!(serial = %self.serial, msg_id = ack.id, inc, "ack of another outbox ignored");
                continue;
            }
            self.take_ack(ack.id, ack.outcome);
            done.push(ack.id);
        }
        if let Err(e) = self.outbox.ack(&self.serial, done).await {
            // They stay on disk and are resent after a restart; the relay will answer duplicate.
            warn!(serial = %self.serial, error = %e, "could not remove acked messages from the outbox");
        }
    }

    /// Whether an ack of `id` naming incarnation `inc` is for another outbox than ours.
    fn is_foreign(&self, id: MsgId, inc: Incarnation) -> bool {
        self.out.pending.get(&id).is_none_or(|m| m.msg.inc != inc)
    }

    /// The relay acked message `id`: it is done, and whoever waits on it hears how.
    fn take_ack(&mut self, id: MsgId, outcome: AckOutcome) {
        let shown = match &outcome {
            AckOutcome::Stored => "stored",
            AckOutcome::Duplicate => "duplicate",
            AckOutcome::Rejected { reason } => {
                warn!(serial = %self.serial, msg_id = id, reason = %reason, "broker rejected message");
                "rejected"
            }
        };
        info!(serial = %self.serial, msg_id = id, outcome = %shown, "ack received");
        let out = &mut self.out;
        out.pending.remove(&id);
        if out.recent_acks.len() == RECENT_ACKS {
            out.recent_acks.pop_front();
        }
        out.recent_acks.push_back((id, outcome.clone()));
        let mut i = 0;
        while i < out.ack_waiters.len() {
            if out.ack_waiters[i].0 == id {
                let (_, w) = out.ack_waiters.swap_remove(i);
                let _ = w.send(outcome.clone());
            } else {
                i += 1;
            }
        }
    }

    /// A job waits for the ack of message `id`: answered now if it came already.
    pub(super) fn when_acked(&mut self, id: MsgId, reply: oneshot::Sender<AckOutcome>) {
        // What the job committed just before asking may still be in the channel.
        while let Ok(p) = self.fresh.try_recv() {
            self.add(p);
        }
        if self.out.pending.contains_key(&id) {
            self.out.ack_waiters.push((id, reply));
        } else {
            let outcome = self
                .out
                .recent_acks
                .iter()
                .rev()
                .find(|(acked, _)| *acked == id)
                .map_or(AckOutcome::Stored, |(_, o)| o.clone());
            let _ = reply.send(outcome);
        }
    }

    /// Whether anything unacked may go to the current relay (reports held for another relay
    /// do not count: they wait for that one).
    pub(super) fn has_deliverable(&self) -> bool {
        let relay = self.relay.as_ref();
        self.out
            .pending
            .values()
            .any(|m| deliverable(m.job.as_ref(), &self.out.origins, relay))
    }

    /// When to publish or resend next, while a connection is up.
    pub(super) fn next_send_wake(&self, now: Instant) -> Option<Instant> {
        if !self.connected || self.disconnect_requested {
            return None;
        }
        let retry =
            (!self.out.queue.is_empty() || !self.out.loose.is_empty()).then(|| now + FLUSH_RETRY);
        let resend = self
            .out
            .pending
            .values()
            .filter(|m| !m.queued)
            .map(|m| m.next_try)
            .min();
        retry.into_iter().chain(resend).min()
    }
}
