//! When the device is connected. A **persistent** session always is; a **periodic** one only
//! for a check-in — on its interval or calendar, at power-on, for an operator action (SIGUSR1),
//! when a condition holds (a counter reached, a fault seen), or because a job is running — and
//! each check-in ends once it is drained: the relay's orders have had time to arrive, the jobs
//! are run and nothing is unacked. Either way the device stays off the relay while a firmware
//! write has **suspended** relay access (claims 5, 12).

use protocol::schedule::{Condition, Moment, Schedule};
use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};
use tracing::{debug, info};

use super::Session;
use super::outgoing::FLUSH_RETRY;
use crate::checkin::{self, Planner, Reason};
use crate::device;
use crate::jobs::set_schedule::describe;

/// How often counters are read when a schedule has a count condition.
const CONDITION_POLL: Duration = Duration::from_secs(5);

/// A periodic check-in in progress.
struct CheckIn {
    reason: Reason,
    started: Instant,
}

/// When to be connected: the schedule, the check-in in progress, a suspension.
pub(super) struct Plan {
    pub(super) planner: Planner,
    checkin: Option<CheckIn>,
    /// A firmware write holds relay access suspended.
    suspended: bool,
    /// The link reported it is offline and not trying to connect.
    pub(super) parked: bool,
    suspend_waiters: Vec<oneshot::Sender<()>>,
    /// The last time the relay sent something; a check-in ends only after a quiet spell.
    pub(super) last_activity: Instant,
    next_condition_poll: Option<Instant>,
}

impl Plan {
    /// `suspended` if a firmware write was cut off: relay access stays suspended until the
    /// worker has concluded it.
    pub(super) fn new(planner: Planner, suspended: bool) -> Plan {
        Plan {
            planner,
            checkin: None,
            suspended,
            parked: false,
            suspend_waiters: Vec::new(),
            last_activity: Instant::now(),
            next_condition_poll: None,
        }
    }
}

impl Session {
    /// A firmware write asks to be off the relay; answered when the link reports it is parked.
    pub(super) fn suspend(&mut self, reply: oneshot::Sender<()>) {
        self.plan.suspended = true;
        self.plan.suspend_waiters.push(reply);
    }

    pub(super) fn resume(&mut self) {
        self.plan.suspended = false;
        // A periodic device reconnects to send the result, as the seed's S423 does.
        if self.is_periodic() {
            self.begin_checkin(Reason::Job);
        }
    }

    /// A fault was seen: a periodic device whose schedule watches that code checks in.
    pub(super) fn on_fault_seen(&mut self, code: String) {
        let watched = self
            .plan
            .planner
            .conditions()
            .iter()
            .any(|c| matches!(c, Condition::FaultSeen { code: w } if *w == code));
        if watched && self.is_periodic() {
            self.begin_checkin(Reason::Condition(format!("fault:{code}")));
        }
    }

    pub(super) fn apply_schedule(&mut self, schedule: Schedule) {
        info!(
            serial = %self.serial, mode = %schedule.mode, interval_secs = schedule.interval_secs,
            schedule = %describe(&schedule), "schedule applied"
        );
        let was_periodic = self.is_periodic();
        self.plan.planner = Planner::new(schedule, Instant::now(), chrono::Utc::now());
        self.plan_conditions();
        if self.is_periodic() {
            if !was_periodic || self.plan.checkin.is_some() {
                // The connection in use counts as a check-in: it ends once this job's report is
                // acked, and the interval counts from now.
                self.plan.checkin = None;
                self.begin_checkin(Reason::Job);
            }
        } else {
            self.plan.checkin = None;
        }
        self.publish_online();
    }

    pub(super) fn on_operator(&mut self) {
        if self.is_periodic() && self.plan.planner.honours(Moment::OperatorAction) {
            self.begin_checkin(Reason::OperatorAction);
        } else {
            debug!(serial = %self.serial, "operator action: no check-in (not in the schedule's moments)");
        }
    }

    pub(super) fn begin_checkin(&mut self, reason: Reason) {
        if self.plan.checkin.is_some() {
            return;
        }
        let now = Instant::now();
        info!(serial = %self.serial, reason = %reason, "periodic check-in");
        self.plan.planner.started(now);
        self.plan.checkin = Some(CheckIn {
            reason,
            started: now,
        });
        self.plan.last_activity = now;
    }

    /// Whether the link should be connected.
    fn wants_link(&self) -> bool {
        !self.plan.suspended && (!self.is_periodic() || self.plan.checkin.is_some())
    }

    /// No job queued or running, nothing unacked that may go to this relay, no job waiting on an
    /// ack, no fetch waiting to go out.
    fn all_done(&self) -> bool {
        self.busy() == 0
            && !self.has_deliverable()
            && self.out.ack_waiters.is_empty()
            && self.out.loose.is_empty()
    }

    /// Whether a periodic check-in has done its work: connected long enough for the relay's
    /// retained orders to arrive, nothing received for a quiet spell, no job queued or running,
    /// nothing unacked.
    fn drained(&self) -> bool {
        let quiet = self.settings.drain_quiet;
        let now = Instant::now();
        self.online()
            && self
                .subscribed_at
                .is_some_and(|at| now.duration_since(at) >= quiet)
            && now.duration_since(self.plan.last_activity) >= quiet
            && self.all_done()
    }

    /// Decides whether to be connected, and acts on it.
    pub(super) fn settle(&mut self) {
        self.publish_idle();
        if self.is_periodic() && !self.plan.suspended {
            self.pace_checkin();
        }
        let want = self.wants_link();
        self.link.want.send_if_modified(|w| {
            let changed = *w != want;
            *w = want;
            changed
        });
        if want {
            self.plan.parked = false;
        } else {
            self.go_offline();
            if self.plan.parked && self.plan.suspended {
                for w in self.plan.suspend_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        }
    }

    /// Tells the link whether the device is idle, so it may return to a preferred relay. Reports
    /// held for a preferred relay do not keep the device here: they are why it goes back.
    fn publish_idle(&self) {
        let idle = self.busy() == 0 && !self.has_deliverable() && self.out.ack_waiters.is_empty();
        self.link.idle.send_if_modified(|v| {
            let changed = *v != idle;
            *v = idle;
            changed
        });
    }

    /// A periodic device checks in while there is work, and ends a check-in once drained.
    fn pace_checkin(&mut self) {
        if self.plan.checkin.is_none() && (self.busy() > 0 || !self.out.ack_waiters.is_empty()) {
            self.begin_checkin(Reason::Job);
        }
        if let Some(c) = &self.plan.checkin
            && self.drained()
        {
            info!(
                serial = %self.serial, reason = %c.reason,
                duration_ms = c.started.elapsed().as_millis() as u64,
                "check-in drained; disconnecting"
            );
            self.plan.checkin = None;
        }
    }

    /// Asks the link to close the connection, if one is open. A full request channel is tried
    /// again at the next wake.
    fn go_offline(&mut self) {
        if self.connected && !self.disconnect_requested && self.link.client.try_disconnect().is_ok()
        {
            self.disconnect_requested = true;
            self.publish_online();
        }
    }

    /// Timers: the next timed check-in, condition polls.
    pub(super) async fn on_timers(&mut self) {
        let utc = chrono::Utc::now();
        if self.plan.checkin.is_none()
            && let Some((at, reason)) = self.plan.planner.next(utc)
            && at <= Instant::now()
        {
            if let Reason::Calendar(_) = reason {
                self.plan.planner.calendar_done(utc);
            }
            self.begin_checkin(reason);
        }
        if let Some(at) = self.plan.next_condition_poll
            && at <= Instant::now()
        {
            self.plan.next_condition_poll = Some(Instant::now() + CONDITION_POLL);
            self.poll_conditions().await;
        }
    }

    /// Reads the counters and checks in if a count condition holds.
    async fn poll_conditions(&mut self) {
        let read =
            device::read_sections(&self.device, vec![protocol::data::Section::Counters]).await;
        if let Ok(data) = read
            && let Some(counters) = data.get(&protocol::data::Section::Counters)
        {
            let conditions = self.plan.planner.conditions().to_vec();
            if let Some(fired) = self.plan.planner.marks.check(&conditions, counters)
                && self.is_periodic()
            {
                self.begin_checkin(Reason::Condition(fired));
            }
        }
    }

    pub(super) fn plan_conditions(&mut self) {
        let watches = self.is_periodic()
            && self
                .plan
                .planner
                .conditions()
                .iter()
                .any(|c| matches!(c, Condition::CountReached { .. }));
        self.plan.next_condition_poll = watches.then(Instant::now);
    }

    /// When the schedule needs the session: a DISCONNECT still to send, the end of a check-in's
    /// quiet spell, the next timed check-in, the next condition poll.
    pub(super) fn next_plan_wake(&self, now: Instant) -> Option<Instant> {
        let mut wakes: Vec<Instant> = Vec::new();
        if !self.wants_link() && self.connected && !self.disconnect_requested {
            wakes.push(now + FLUSH_RETRY); // a DISCONNECT that did not fit yet
        }
        if self.plan.checkin.is_some() {
            // The end of the quiet spell, when the check-in may be drained. Only worth a timer
            // when nothing else holds it open: a job's end or an ack wakes the session anyway.
            if let Some(at) = self.subscribed_at
                && self.online()
                && self.all_done()
            {
                let quiet = self.settings.drain_quiet;
                let t = (self.plan.last_activity + quiet).max(at + quiet);
                wakes.push(t.max(now + FLUSH_RETRY));
            }
        } else if let Some((at, _)) = self.plan.planner.next(chrono::Utc::now()) {
            wakes.push(at.min(now + checkin::MAX_NAP));
        }
        if let Some(t) = self.plan.next_condition_poll {
            wakes.push(t);
        }
        wakes.into_iter().min()
    }
}
