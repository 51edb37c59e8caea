//! GET DATA (Fig. 2, claims 6–7): read the requested sections of the device's data and send them
//! with the job's final report (S111).

use protocol::data::Section;

use super::{JobCtx, Outcome};
use crate::device;

#[derive(Debug, Clone, PartialEq)]
pub struct GetData {
    sections: Vec<Section>,
}

impl GetData {
    /// No sections means all of them, as a host's submission without `--sections` does.
    pub fn new(sections: Vec<Section>) -> GetData {
        let sections = if sections.is_empty() {
            Section::ALL.to_vec()
        } else {
            sections
        };
        GetData { sections }
    }

    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    pub async fn run(self, ctx: &mut JobCtx<'_>) -> Outcome {
        match device::read_sections(&ctx.env.device, self.sections).await {
            Ok(data) => Outcome::succeeded(Some(data)),
            Err(e) => Outcome::failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Device, DeviceError, shared};
    use crate::jobs::testkit::{kit, order};
    use crate::sim::{SimCopier, SimSettings};
    use protocol::Serial;
    use protocol::data::DeviceData;
    use protocol::device::DeviceState;
    use protocol::job::{JobSpec, JobStatus};
    use tokio_util::sync::CancellationToken;

    struct Broken;
    impl Device for Broken {
        fn state(&self) -> DeviceState {
            DeviceState::default()
        }
        fn read(&mut self, _: &[Section]) -> Result<DeviceData, DeviceError> {
            Err(DeviceError::Busy("toner door open".into()))
        }
    }

    async fn run(device: crate::device::SharedDevice, sections: Vec<Section>) -> Outcome {
        let mut k = kit(device, None);
        let order = order(JobSpec::GetData {
            sections: sections.clone(),
        });
        let withdrawn = CancellationToken::new();
        let mut ctx = JobCtx {
            order: &order,
            env: &k.env,
            inbox: &mut k.inbox,
            withdrawn: &withdrawn,
        };
        GetData::new(sections).run(&mut ctx).await
    }

    fn sim() -> crate::device::SharedDevice {
        shared(SimCopier::new(
            &Serial::parse("C1").unwrap(),
            &SimSettings::default(),
        ))
    }

    #[tokio::test]
    async fn reads_the_requested_sections() {
        let out = run(sim(), vec![Section::Counters, Section::Jams]).await;
        assert_eq!(out.status, JobStatus::Succeeded);
        let data = out.data.unwrap();
        assert_eq!(
            data.keys().copied().collect::<Vec<_>>(),
            vec![Section::Counters, Section::Jams]
        );
    }

    #[tokio::test]
    async fn no_sections_means_all() {
        let out = run(sim(), vec![]).await;
        assert_eq!(out.data.unwrap().len(), Section::ALL.len());
    }

    #[tokio::test]
    async fn a_device_error_fails_the_job_with_its_reason() {
        let out = run(shared(Broken), vec![Section::Counters]).await;
        assert_eq!(out.status, JobStatus::Failed);
        assert!(out.note.unwrap().contains("toner door open"));
        assert!(out.data.is_none());
    }
}
