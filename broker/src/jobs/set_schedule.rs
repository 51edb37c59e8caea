//! SET SCHEDULE (claims 15, 38): the device persists the new access timing and acts on it. The
//! broker only carries the schedule in the order; the device's `succeeded` is the whole result.

use protocol::device::JobUpdate;
use protocol::schedule::Schedule;

use super::Staged;

#[derive(Debug, Clone, PartialEq)]
pub struct SetSchedule {
    schedule: Schedule,
}

impl SetSchedule {
    pub fn new(schedule: Schedule) -> SetSchedule {
        SetSchedule { schedule }
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Nothing to keep beyond the job's status and timeline.
    pub(super) fn stage(&self, _update: &JobUpdate) -> Staged {
        Staged::default()
    }
}
