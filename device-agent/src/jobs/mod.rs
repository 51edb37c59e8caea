//! Jobs on the device side: whether an order that arrived is ours to run and when ([`gate`]), and
//! how each kind runs (one file per kind, like mini-redis's commands).

pub mod get_data;

use protocol::data::DeviceData;
use protocol::job::{JobOrder, JobSpec, JobStatus};
use protocol::{JobId, Serial, Timestamp};

use crate::device::SharedDevice;
use crate::report::Reporter;

pub use get_data::GetData;

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
}

impl Outcome {
    pub fn succeeded(data: Option<DeviceData>) -> Outcome {
        Outcome {
            status: JobStatus::Succeeded,
            note: None,
            data,
        }
    }

    pub fn failed(note: impl Into<String>) -> Outcome {
        Outcome {
            status: JobStatus::Failed,
            note: Some(note.into()),
            data: None,
        }
    }
}

/// What a running job may use.
pub struct JobCtx<'a> {
    pub job: &'a JobId,
    pub device: &'a SharedDevice,
    /// For kinds that report intermediate steps (an update's `staged`).
    pub report: &'a Reporter,
}

/// A job, by kind. Each kind lives in its own file with its own `run`.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    GetData(GetData),
    /// A kind this agent cannot run: the job fails with a reason the host can act on.
    Unsupported(&'static str),
}

impl Job {
    pub fn from_spec(spec: &JobSpec) -> Job {
        match spec {
            JobSpec::GetData { sections } => Job::GetData(GetData::new(sections.clone())),
            other => Job::Unsupported(other.kind_name()),
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Job::GetData(_) => "get-data",
            Job::Unsupported(kind) => kind,
        }
    }

    /// Runs the job to its end. The caller has reported `in-progress` and reports the outcome.
    pub async fn run(self, ctx: &JobCtx<'_>) -> Outcome {
        match self {
            Job::GetData(job) => job.run(ctx).await,
            Job::Unsupported(kind) => Outcome::failed(format!(
                "this device agent does not run {kind} jobs; upgrade it"
            )),
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
