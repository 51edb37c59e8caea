//! SET SCHEDULE (claims 15, 38): change when the device reaches the relay. The schedule is
//! committed to the agent's store first, so it outlives a restart (and wins over the flags the
//! agent is started with: a service unit restarts it with the same flags at every boot, which
//! would otherwise undo the relay's instruction), then handed to the session, which acts on it
//! once the job's report is out.

use protocol::schedule::{Schedule, SessionMode};
use tracing::info;

use super::{JobCtx, Outcome};
use crate::store::StoredSchedule;

#[derive(Debug, Clone, PartialEq)]
pub struct SetSchedule {
    schedule: Schedule,
}

/// "periodic, every 900 s, daily:02:00" — for notes and logs.
pub fn describe(s: &Schedule) -> String {
    let mut parts = vec![s.mode.to_string()];
    if s.mode == SessionMode::Periodic {
        if let Some(secs) = s.interval_secs {
            parts.push(format!("every {secs} s"));
        }
        parts.extend(s.calendar.iter().map(ToString::to_string));
    }
    parts.join(", ")
}

impl SetSchedule {
    pub fn new(schedule: Schedule) -> SetSchedule {
        SetSchedule { schedule }
    }

    pub async fn run(self, ctx: &mut JobCtx<'_>) -> Outcome {
        if let Err(e) = self.schedule.check() {
            return Outcome::failed(format!("schedule refused: {e}"));
        }
        let stored = StoredSchedule {
            job: ctx.job().clone(),
            schedule: self.schedule.clone(),
        };
        if let Err(e) = ctx.env.store.set_schedule(ctx.serial(), &stored).await {
            return Outcome::failed(format!("could not store the schedule: {e}"));
        }
        info!(serial = %ctx.serial(), job = %ctx.job(), schedule = %describe(&self.schedule), "schedule stored");
        ctx.env.relay.set_schedule(self.schedule.clone());
        Outcome::succeeded(None).with_note(format!("schedule set: {}", describe(&self.schedule)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::shared;
    use crate::jobs::testkit::{kit, order};
    use crate::relay::Control;
    use crate::sim::{SimCopier, SimSettings};
    use protocol::Serial;
    use protocol::job::{JobSpec, JobStatus};
    use tokio_util::sync::CancellationToken;

    async fn run(schedule: Schedule) -> (Outcome, crate::jobs::testkit::Kit) {
        let mut k = kit(
            shared(SimCopier::new(
                &Serial::parse("C1").unwrap(),
                &SimSettings::default(),
            )),
            None,
        );
        let order = order(JobSpec::SetSchedule {
            schedule: schedule.clone(),
        });
        let withdrawn = CancellationToken::new();
        let mut ctx = JobCtx {
            order: &order,
            env: &k.env,
            inbox: &mut k.inbox,
            withdrawn: &withdrawn,
        };
        let out = SetSchedule::new(schedule).run(&mut ctx).await;
        (out, k)
    }

    #[tokio::test]
    async fn a_schedule_is_stored_and_handed_to_the_session() {
        let schedule = Schedule {
            mode: SessionMode::Periodic,
            interval_secs: Some(120),
            ..Schedule::default()
        };
        let (out, mut k) = run(schedule.clone()).await;
        assert_eq!(out.status, JobStatus::Succeeded);
        assert_eq!(
            out.note.as_deref(),
            Some("schedule set: periodic, every 120 s")
        );
        let stored = k.env.store.schedule(k.env.serial()).await.unwrap().unwrap();
        assert_eq!(stored.schedule, schedule);
        assert_eq!(stored.job.as_str(), "J1");
        match k.session.control.try_recv() {
            Ok(Control::Schedule(s)) => assert_eq!(s, schedule),
            other => panic!("the session was not told: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_schedule_that_never_connects_is_refused_and_not_stored() {
        let (out, k) = run(Schedule {
            mode: SessionMode::Periodic,
            ..Schedule::default()
        })
        .await;
        assert_eq!(out.status, JobStatus::Failed);
        assert!(out.note.unwrap().contains("never connect"));
        assert!(
            k.env
                .store
                .schedule(k.env.serial())
                .await
                .unwrap()
                .is_none()
        );
    }
}
