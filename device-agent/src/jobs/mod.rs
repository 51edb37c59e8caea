//! Jobs on the device side: whether an order that arrived is ours to run and when ([`gate`]), and
//! how each kind runs (one file per kind, like mini-redis's commands).

pub mod download;
pub mod firmware;
pub mod get_data;
pub mod set_schedule;
pub mod update_data;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use protocol::data::DeviceData;
use protocol::device::JobUpdate;
use protocol::job::{JobOrder, JobSpec, JobStatus};
use protocol::{JobId, Serial, Timestamp};
use tokio_util::sync::CancellationToken;

use crate::device::SharedDevice;
use crate::outbox::Outbox;
use crate::relay::{Inbox, RelayHandle};
use crate::report::Reporter;
use crate::store::{AgentStore, WriteIntent};

pub use firmware::{Firmware, PublisherKey};
pub use get_data::GetData;
pub use set_schedule::SetSchedule;
pub use update_data::UpdateData;

/// What the agent already knows about a job id, from its own memory and its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Never seen.
    New,
    /// Waiting for its time, queued or running right now (the retained order was redelivered,
    /// e.g. after a reconnect).
    Taken,
    /// Finished here; its final report is in the outbox or already acked.
    Finished,
}

/// Why an order is not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// Claims 8–9: the order names another device. The relay should never send one; if it does,
    /// the device keeps away from it.
    ForeignSerial {
        theirs: Serial,
    },
    /// The order's job id is not the one in its topic: a corrupt or forged order.
    TopicMismatch {
        in_topic: JobId,
    },
    AlreadyTaken,
    AlreadyFinished,
}

impl Ignored {
    pub fn describe(&self) -> String {
        match self {
            Ignored::ForeignSerial { theirs } => format!("the order is for device {theirs}"),
            Ignored::TopicMismatch { in_topic } => {
                format!("the order's job id differs from its topic's ({in_topic})")
            }
            Ignored::AlreadyTaken => "the job is already waiting or running".to_owned(),
            Ignored::AlreadyFinished => "the job already finished here".to_owned(),
        }
    }
}

/// What to do with an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Its instruction time has come: queue it for the worker.
    RunNow,
    /// S108–S109: report `delivered`, then run it at its instruction time.
    Wait {
        until: Timestamp,
    },
    Ignore(Ignored),
}

/// Decides what to do with `order`, which arrived on the topic of job `in_topic`, for device `ours`.
pub fn gate(
    order: &JobOrder,
    ours: &Serial,
    in_topic: &JobId,
    known: Known,
    now: Timestamp,
) -> Gate {
    if &order.serial != ours {
        return Gate::Ignore(Ignored::ForeignSerial {
            theirs: order.serial.clone(),
        });
    }
    if &order.job != in_topic {
        return Gate::Ignore(Ignored::TopicMismatch {
            in_topic: in_topic.clone(),
        });
    }
    match known {
        Known::Taken => Gate::Ignore(Ignored::AlreadyTaken),
        Known::Finished => Gate::Ignore(Ignored::AlreadyFinished),
        Known::New if order.instruction_time > now => Gate::Wait {
            until: order.instruction_time,
        },
        Known::New => Gate::RunNow,
    }
}

/// How a job ended: its final report.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: JobStatus,
    pub note: Option<String>,
    pub data: Option<DeviceData>,
    /// Per-key refusals of an update-data job ("section.name" → reason).
    pub errors: BTreeMap<String, String>,
}

impl Outcome {
    pub fn succeeded(data: Option<DeviceData>) -> Outcome {
        Outcome {
            status: JobStatus::Succeeded,
            note: None,
            data,
            errors: BTreeMap::new(),
        }
    }

    pub fn failed(note: impl Into<String>) -> Outcome {
        Outcome {
            status: JobStatus::Failed,
            note: Some(note.into()),
            data: None,
            errors: BTreeMap::new(),
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Outcome {
        self.note = Some(note.into());
        self
    }

    /// The report that carries it.
    pub fn into_update(self, job: &JobId) -> JobUpdate {
        JobUpdate {
            job: job.clone(),
            status: self.status,
            note: self.note,
            data: self.data,
            errors: self.errors,
        }
    }
}

/// Where a run of a job got to.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// It ended; the worker reports the outcome.
    Done(Outcome),
    /// Firmware downloaded and `staged`: run [`Phase::Execution`] at `until`, taking other jobs
    /// meanwhile (Fig. 6: the device resumes polling and waits for the execution time, S420).
    Park { until: Timestamp },
    /// It ended and already reported its end itself (a firmware job reports before it reconnects).
    Reported(JobStatus),
    /// The relay withdrew the order (canceled, timed out) while the job waited for it: nothing to
    /// report.
    Dropped,
}

/// Which part of a job to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// At the instruction time: the whole job, or a firmware job's download.
    Instruction,
    /// At the execution time: a staged firmware job's write.
    Execution,
    /// At start: a firmware write that a power cut interrupted.
    Recover(Box<WriteIntent>),
}

/// What every job of one device may use; lives as long as the worker.
pub struct JobEnv {
    pub device: SharedDevice,
    pub report: Reporter,
    pub relay: RelayHandle,
    pub store: AgentStore,
    pub outbox: Outbox,
    /// The device's own directory: downloads, and the simulated copier's slots.
    pub home: PathBuf,
    /// The key firmware must be signed with; `None` refuses every firmware job.
    pub publisher: Option<PublisherKey>,
    /// A download asks again for chunks that have not come after this long.
    pub fetch_timeout: Duration,
    pub stop: CancellationToken,
}

impl JobEnv {
    pub fn serial(&self) -> &Serial {
        self.report.serial()
    }
}

/// What a running job may use.
pub struct JobCtx<'a> {
    pub order: &'a JobOrder,
    pub env: &'a JobEnv,
    pub inbox: &'a mut Inbox,
    /// Cancelled when the relay empties the job's order while it runs.
    pub withdrawn: &'a CancellationToken,
}

impl JobCtx<'_> {
    pub fn job(&self) -> &JobId {
        &self.order.job
    }

    pub fn serial(&self) -> &Serial {
        self.env.serial()
    }
}

/// A job, by kind. Each kind lives in its own file with its own `run`.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    GetData(GetData),
    UpdateData(UpdateData),
    Firmware(Firmware),
    SetSchedule(SetSchedule),
}

impl Job {
    pub fn from_spec(spec: &JobSpec) -> Job {
        match spec {
            JobSpec::GetData { sections } => Job::GetData(GetData::new(sections.clone())),
            JobSpec::UpdateData { values, merge } => {
                Job::UpdateData(UpdateData::new(values.clone(), *merge))
            }
            JobSpec::Firmware { artifact } => Job::Firmware(Firmware::new(artifact.clone())),
            JobSpec::SetSchedule { schedule } => {
                Job::SetSchedule(SetSchedule::new(schedule.clone()))
            }
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Job::GetData(_) => "get-data",
            Job::UpdateData(_) => "update-data",
            Job::Firmware(_) => "firmware",
            Job::SetSchedule(_) => "set-schedule",
        }
    }

    /// Whether the worker reports `in-progress` before running it. A firmware job reports its
    /// own steps: `delivered` while it downloads, `staged`, then `in-progress` when it writes.
    pub fn worker_reports_start(&self, phase: &Phase) -> bool {
        !matches!(self, Job::Firmware(_)) && *phase == Phase::Instruction
    }

    /// Runs the job (or the given phase of it).
    pub async fn run(self, ctx: &mut JobCtx<'_>, phase: Phase) -> Step {
        match self {
            Job::GetData(job) => Step::Done(job.run(ctx).await),
            Job::UpdateData(job) => job.run(ctx).await,
            Job::Firmware(job) => job.run(ctx, phase).await,
            Job::SetSchedule(job) => Step::Done(job.run(ctx).await),
        }
    }
}

/// Helpers for the job kinds' unit tests: a job environment over a temp dir, with a relay
/// handle whose session side the test plays.
#[cfg(test)]
pub(crate) mod testkit {
    use super::*;
    use crate::outbox::Pending;
    use crate::relay::{self, Incoming, SessionEnds};
    use tokio::sync::mpsc;

    pub struct Kit {
        pub env: JobEnv,
        pub inbox: Inbox,
        pub to_inbox: mpsc::UnboundedSender<Incoming>,
        pub session: SessionEnds,
        pub sent: mpsc::UnboundedReceiver<Pending>,
        pub dir: tempfile::TempDir,
    }

    pub fn kit(device: SharedDevice, publisher: Option<PublisherKey>) -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("agent.redb")).unwrap();
        let (to_session, sent) = mpsc::unbounded_channel();
        let report = Reporter::new(Serial::parse("C1").unwrap(), outbox.clone(), to_session);
        let (relay, session) = relay::pair();
        let (to_inbox, inbox) = relay::inbox();
        let env = JobEnv {
            device,
            report,
            relay,
            store: outbox.store(),
            outbox,
            home: dir.path().to_owned(),
            publisher,
            fetch_timeout: Duration::from_millis(300),
            stop: CancellationToken::new(),
        };
        Kit {
            env,
            inbox,
            to_inbox,
            session,
            sent,
            dir,
        }
    }

    pub fn order(spec: JobSpec) -> JobOrder {
        JobOrder {
            job: JobId::parse("J1").unwrap(),
            serial: Serial::parse("C1").unwrap(),
            spec,
            instruction_time: chrono::Utc::now(),
            execution_time: None,
            deadline: None,
            max_attempts: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use protocol::data::Section;

    fn now() -> Timestamp {
        chrono::Utc.with_ymd_and_hms(2026, 11, 26, 9, 0, 0).unwrap()
    }

    fn order(serial: &str, job: &str, at: Timestamp) -> JobOrder {
        JobOrder {
            job: JobId::parse(job).unwrap(),
            serial: Serial::parse(serial).unwrap(),
            spec: JobSpec::GetData {
                sections: vec![Section::Counters],
            },
            instruction_time: at,
            execution_time: None,
            deadline: None,
            max_attempts: 1,
        }
    }

    #[test]
    fn gate_table() {
        let c1 = Serial::parse("C1").unwrap();
        let j1 = JobId::parse("J1").unwrap();
        let later = now() + chrono::Duration::hours(2);
        let earlier = now() - chrono::Duration::minutes(5);
        let cases = [
            (order("C1", "J1", now()), Known::New, Gate::RunNow),
            (order("C1", "J1", earlier), Known::New, Gate::RunNow),
            (
                order("C1", "J1", later),
                Known::New,
                Gate::Wait { until: later },
            ),
            (
                order("C2", "J1", now()),
                Known::New,
                Gate::Ignore(Ignored::ForeignSerial {
                    theirs: Serial::parse("C2").unwrap(),
                }),
            ),
            (
                order("C1", "J2", now()),
                Known::New,
                Gate::Ignore(Ignored::TopicMismatch {
                    in_topic: j1.clone(),
                }),
            ),
            (
                order("C1", "J1", now()),
                Known::Finished,
                Gate::Ignore(Ignored::AlreadyFinished),
            ),
            (
                order("C1", "J1", later),
                Known::Finished,
                Gate::Ignore(Ignored::AlreadyFinished),
            ),
            (
                order("C1", "J1", now()),
                Known::Taken,
                Gate::Ignore(Ignored::AlreadyTaken),
            ),
            // A foreign order is refused before anything else is looked at.
            (
                order("C2", "J1", now()),
                Known::Finished,
                Gate::Ignore(Ignored::ForeignSerial {
                    theirs: Serial::parse("C2").unwrap(),
                }),
            ),
        ];
        for (o, known, want) in cases {
            assert_eq!(
                gate(&o, &c1, &j1, known, now()),
                want,
                "{} {} {known:?}",
                o.serial,
                o.job
            );
        }
    }
}
