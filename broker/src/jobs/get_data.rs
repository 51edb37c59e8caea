//! GET DATA (Fig. 2): the device sends the listed sections of its data (S111); the broker keeps
//! them as the job's report, which `jobs show` and the JSON mirror display (S118).

use protocol::data::Section;
use protocol::device::JobUpdate;

use super::Staged;
use crate::store::{StoreError, Txn};

#[derive(Debug, Clone, PartialEq)]
pub struct GetData {
    sections: Vec<Section>,
}

impl GetData {
    pub fn new(sections: Vec<Section>) -> GetData {
        GetData { sections }
    }

    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// Merges the sections the device sent into the job's report; a section sent again replaces
    /// the earlier copy. Sections nobody asked for are kept too: the device knows what it has, and
    /// the payload limit already bounds the size.
    pub(super) fn stage(
        &self,
        txn: &dyn Txn,
        n: u64,
        update: &JobUpdate,
    ) -> Result<Staged, StoreError> {
        super::stage_report(txn, n, update)
    }
}
