//! The machine the agent manages, behind a trait: the agent knows how to talk to the relay, the
//! `Device` knows how to talk to the copier. [`crate::sim::SimCopier`] is the simulated one; a
//! backend that calls the device's own commands implements the same trait.

use std::sync::{Arc, Mutex};

use protocol::data::{DeviceData, Section};
use protocol::device::DeviceState;

/// Why the device could not do what a job asked. The text becomes the job's failure note, which
/// the service desk reads, so it says what went wrong in the device's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("the device cannot provide section {0}")]
    Unsupported(Section),
    #[error("the device is busy: {0}")]
    Busy(String),
    #[error("the device did not answer: {0}")]
    Failed(String),
}

/// One managed machine. Calls may block (a real backend talks to hardware or runs a command), so
/// the agent makes them from a blocking thread, never from the async session loop.
pub trait Device: Send + 'static {
    /// What the device announces when its session starts. The agent fills in the site it was
    /// configured with; the device knows its model and firmware.
    fn state(&self) -> DeviceState;

    /// Reads the listed sections of the device's data (Fig. 3), one map of values per section.
    fn read(&mut self, sections: &[Section]) -> Result<DeviceData, DeviceError>;
}

/// A device shared between the session (which asks for its state on every connect) and the job
/// worker (which reads it). A std mutex: every call is made from a blocking thread and none is
/// held across an `.await`.
pub type SharedDevice = Arc<Mutex<Box<dyn Device>>>;

/// Wraps a device for sharing.
pub fn shared(device: impl Device) -> SharedDevice {
    Arc::new(Mutex::new(Box::new(device)))
}

/// The device's state, read on a blocking thread. A device whose lock was poisoned by a panic in
/// an earlier call still answers: its state is plain data.
pub async fn state_of(device: &SharedDevice) -> DeviceState {
    let device = device.clone();
    let read = tokio::task::spawn_blocking(move || {
        let guard = device
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.state()
    });
    read.await.unwrap_or_default()
}

/// Reads sections on a blocking thread.
pub async fn read_sections(
    device: &SharedDevice,
    sections: Vec<Section>,
) -> Result<DeviceData, DeviceError> {
    let device = device.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut guard = device.lock().map_err(|_| {
            DeviceError::Failed("an earlier call to the device panicked".to_owned())
        })?;
        guard.read(&sections)
    });
    match read.await {
        Ok(result) => result,
        Err(e) => Err(DeviceError::Failed(format!(
            "the device backend panicked: {e}"
        ))),
    }
}
