//! The machine the agent manages, behind a trait: the agent knows how to talk to the relay, the
//! `Device` knows how to talk to the copier. [`crate::sim::SimCopier`] is the simulated one;
//! [`crate::exec::ExecDevice`] drives a real machine through commands from the config file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use protocol::data::{DeviceData, Section};
use protocol::device::DeviceState;
use serde::{Deserialize, Serialize};

/// Why the device could not do what a job asked. The text becomes the job's failure note, which
/// the service desk reads, so it says what went wrong in the device's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("the device cannot provide section {0}")]
    Unsupported(Section),
    #[error("the device does not support {0}")]
    NotSupported(&'static str),
    #[error("the device is busy: {0}")]
    Busy(String),
    #[error("the device did not answer: {0}")]
    Failed(String),
}

/// Why values of an update-data job were not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// The device refused these keys ("section.name" → reason) and applied nothing.
    Refused(BTreeMap<String, String>),
    /// The device failed while applying.
    Failed(DeviceError),
}

/// One half of an A/B firmware pair: the device runs from one while the other is rewritten, so a
/// write that fails or is cut off never leaves it without a working image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s.trim() {
            "a" | "A" => Some(Slot::A),
            "b" | "B" => Some(Slot::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which slot the device boots and what each holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    pub active: Slot,
    /// The firmware version in slot a and slot b; `None` for a slot never written.
    pub versions: [Option<String>; 2],
}

impl Slots {
    pub fn version(&self, slot: Slot) -> Option<&str> {
        self.versions[slot as usize].as_deref()
    }

    /// The active slot's version, or "unknown".
    pub fn active_version(&self) -> &str {
        self.version(self.active).unwrap_or("unknown")
    }
}

/// One managed machine. Calls may block (a real backend talks to hardware or runs a command), so
/// the agent makes them from a blocking thread, never from the async session loop.
///
/// Only `state` and `read` are required: a device that cannot take settings or firmware keeps the
/// defaults, which refuse those jobs with a reason the service desk can act on.
pub trait Device: Send + 'static {
    /// What the device announces when its session starts. The agent fills in the site it was
    /// configured with; the device knows its model and firmware (its active slot's version).
    fn state(&self) -> DeviceState;

    /// Reads the listed sections of the device's data (Fig. 3), one map of values per section.
    fn read(&mut self, sections: &[Section]) -> Result<DeviceData, DeviceError>;

    /// Checks values an update-data job would apply, without applying anything: returns the
    /// refusals, "section.name" → reason (unknown key, wrong type, out of range). Empty: all fine.
    fn check(&self, values: &DeviceData) -> BTreeMap<String, String> {
        values
            .iter()
            .flat_map(|(section, kv)| kv.keys().map(move |k| format!("{section}.{k}")))
            .map(|key| (key, "this device takes no settings".to_owned()))
            .collect()
    }

    /// Applies values, all or nothing.
    fn apply(&mut self, values: &DeviceData) -> Result<(), ApplyError> {
        let _ = values;
        Err(ApplyError::Failed(DeviceError::NotSupported("settings")))
    }

    /// The A/B firmware slots.
    fn slots(&self) -> Result<Slots, DeviceError> {
        Err(DeviceError::NotSupported("firmware updates"))
    }

    /// Writes the image file into `slot` (never the active one).
    fn write_image(&mut self, slot: Slot, image: &Path, version: &str) -> Result<(), DeviceError> {
        let _ = (slot, image, version);
        Err(DeviceError::NotSupported("firmware updates"))
    }

    /// Reads `slot` back and returns its SHA-256, to verify a write.
    fn image_digest(&mut self, slot: Slot) -> Result<[u8; 32], DeviceError> {
        let _ = slot;
        Err(DeviceError::NotSupported("firmware updates"))
    }

    /// Makes `slot` the one the device boots (and runs) from.
    fn activate(&mut self, slot: Slot) -> Result<(), DeviceError> {
        let _ = slot;
        Err(DeviceError::NotSupported("firmware updates"))
    }

    /// Boots the active slot's image and checks the device works with it.
    fn health_check(&mut self) -> Result<(), DeviceError> {
        Err(DeviceError::NotSupported("firmware updates"))
    }

    /// A fault was detected (Fig. 5, S301): count it in the JAM/SC data (Fig. 3); a fatal one
    /// stays active until [`Device::clear_fault`]. The default keeps nothing: a real machine
    /// keeps its own counts.
    fn record_fault(&mut self, code: &str, detail: &str, fatal: bool) {
        let _ = (code, detail, fatal);
    }

    /// The fault is fixed.
    fn clear_fault(&mut self, code: &str) {
        let _ = code;
    }
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

/// Runs `f` on the device from a blocking thread. A panic in the backend becomes an error.
pub async fn call<T: Send + 'static>(
    device: &SharedDevice,
    f: impl FnOnce(&mut dyn Device) -> Result<T, DeviceError> + Send + 'static,
) -> Result<T, DeviceError> {
    let device = device.clone();
    let run = tokio::task::spawn_blocking(move || {
        let mut guard = device.lock().map_err(|_| {
            DeviceError::Failed("an earlier call to the device panicked".to_owned())
        })?;
        f(guard.as_mut())
    });
    match run.await {
        Ok(result) => result,
        Err(e) => Err(DeviceError::Failed(format!(
            "the device backend panicked: {e}"
        ))),
    }
}

/// Reads sections on a blocking thread.
pub async fn read_sections(
    device: &SharedDevice,
    sections: Vec<Section>,
) -> Result<DeviceData, DeviceError> {
    call(device, move |d| d.read(&sections)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_name_and_flip() {
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::parse("b\n"), Some(Slot::B));
        assert_eq!(Slot::parse("c"), None);
        let s = Slots {
            active: Slot::B,
            versions: [Some("1.0".into()), Some("2.0".into())],
        };
        assert_eq!(s.active_version(), "2.0");
        assert_eq!(s.version(Slot::A), Some("1.0"));
    }
}
