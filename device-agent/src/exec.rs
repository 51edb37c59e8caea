//! A device driven by commands (the `[exec]` table of the config file), so a real machine joins
//! the relay without anyone writing Rust: the agent runs the device's own tools and reads what
//! they print. `config/exec-hooks/example-device.sh` is a worked example.
//!
//! Every hook is a command line (program and leading arguments) to which the agent appends its
//! own arguments. Hooks run with `CHUKEI_SERIAL` and `CHUKEI_HOME` (the device's directory) in
//! their environment, under a timeout, and succeed by exiting 0; otherwise the last line of their
//! stderr is the reason the job reports.
//!
//! Values travel as lines `section.name=value`, the value a JSON scalar (`5`, `true`,
//! `"text"`; text may also be written bare):
//!
//! | hook | arguments | stdin | stdout |
//! |---|---|---|---|
//! | `get_data` | section names | — | value lines of those sections |
//! | `apply` | — | value lines to set | exit 3 = refused, nothing applied: lines `section.name=reason` |
//! | `write_image` | `SLOT IMAGE VERSION` | — | the SHA-256 (hex) of the slot, read back after writing |
//! | `switch_slot` | `SLOT` | — | — |
//! | `health_check` | `SLOT VERSION` | — | — |
//!
//! The A/B state is read from `get_data identification`: `active_slot`, `slot_a`, `slot_b`
//! (versions), with `model` and `rom_version` for the state the agent announces.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use protocol::Serial;
use protocol::data::{DeviceData, Section, Value};
use protocol::device::DeviceState;

use crate::device::{ApplyError, Device, DeviceError, Slot, Slots};

/// Exit status of `apply` that means "refused, nothing applied" (the refusals are on stdout).
pub const EXIT_REFUSED: i32 = 3;

/// The hooks, as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecSettings {
    pub get_data: Vec<String>,
    pub apply: Option<Vec<String>>,
    pub write_image: Option<Vec<String>>,
    pub switch_slot: Option<Vec<String>>,
    pub health_check: Option<Vec<String>>,
    /// Limit for every hook but `write_image`.
    pub timeout: Duration,
    /// Limit for `write_image` (flashing takes long).
    pub write_timeout: Duration,
}

/// A device behind hook commands.
pub struct ExecDevice {
    hooks: ExecSettings,
    serial: Serial,
    home: PathBuf,
    /// What `write_image` read back, per slot.
    written: BTreeMap<Slot, [u8; 32]>,
}

/// Parses one value as hooks write it.
pub fn parse_value(text: &str) -> Value {
    let t = text.trim();
    match t {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => {
            if let Ok(n) = t.parse::<i64>() {
                Value::Int(n)
            } else if t.starts_with('"') {
                serde_json::from_str::<String>(t)
                    .map(Value::Text)
                    .unwrap_or_else(|_| Value::Text(t.trim_matches('"').to_owned()))
            } else {
                Value::Text(t.to_owned())
            }
        }
    }
}

/// Writes one value as hooks read it.
pub fn format_value(v: &Value) -> String {
    match v {
        Value::Bool(b) => b.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Text(t) => serde_json::to_string(t).unwrap_or_default(),
    }
}

/// Parses `section.name=value` lines; lines of unknown sections, blank lines and `#` comments
/// are skipped.
pub fn parse_lines(text: &str) -> DeviceData {
    let mut out = DeviceData::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let Some((section, name)) = key.trim().split_once('.') else {
            continue;
        };
        let Ok(section) = section.parse::<Section>() else {
            continue;
        };
        out.entry(section)
            .or_default()
            .insert(name.to_owned(), parse_value(value));
    }
    out
}

/// The lines of `data`.
pub fn format_lines(data: &DeviceData) -> String {
    let mut out = String::new();
    for (section, kv) in data {
        for (k, v) in kv {
            out.push_str(&format!("{section}.{k}={}\n", format_value(v)));
        }
    }
    out
}

/// What a hook printed and how it ended.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

impl ExecDevice {
    pub fn new(hooks: ExecSettings, serial: &Serial, home: &Path) -> ExecDevice {
        ExecDevice {
            hooks,
            serial: serial.clone(),
            home: home.to_owned(),
            written: BTreeMap::new(),
        }
    }

    /// Runs `hook` with `args` and `stdin`, under `limit`.
    fn run(
        &self,
        name: &str,
        hook: &[String],
        args: &[&str],
        stdin: Option<&str>,
        limit: Duration,
    ) -> Result<Ran, DeviceError> {
        let Some((program, lead)) = hook.split_first() else {
            return Err(DeviceError::Failed(format!("the {name} hook is empty")));
        };
        let mut child = Command::new(program)
            .args(lead)
            .args(args)
            .env("CHUKEI_SERIAL", self.serial.as_str())
            .env("CHUKEI_HOME", &self.home)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                DeviceError::Failed(format!("could not run the {name} hook {program:?}: {e}"))
            })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let text = text.to_owned();
            // A thread, so a hook that does not read its input cannot block us.
            std::thread::spawn(move || {
                let _ = pipe.write_all(text.as_bytes());
            });
        }
        let reader = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut out = String::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_string(&mut out);
                }
                out
            })
        };
        let out = reader(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let err = reader(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let deadline = Instant::now() + limit;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(DeviceError::Failed(format!(
                        "the {name} hook did not finish within {} s",
                        limit.as_secs()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(DeviceError::Failed(format!("the {name} hook: {e}"))),
            }
        };
        Ok(Ran {
            code: status.code(),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }

    /// Runs a hook that must succeed.
    fn run_ok(
        &self,
        name: &str,
        hook: &[String],
        args: &[&str],
        limit: Duration,
    ) -> Result<String, DeviceError> {
        let ran = self.run(name, hook, args, None, limit)?;
        if ran.code == Some(0) {
            Ok(ran.stdout)
        } else {
            Err(self.failure(name, &ran))
        }
    }

    fn failure(&self, name: &str, ran: &Ran) -> DeviceError {
        let why = last_line(&ran.stderr);
        let status = ran
            .code
            .map_or_else(|| "was killed".to_owned(), |c| format!("exited {c}"));
        DeviceError::Failed(if why.is_empty() {
            format!("the {name} hook {status}")
        } else {
            format!("the {name} hook {status}: {why}")
        })
    }

    fn hook<'a>(&self, hook: &'a Option<Vec<String>>) -> Result<&'a [String], DeviceError> {
        hook.as_deref().ok_or(DeviceError::NotSupported(
            "firmware updates (no exec hook configured)",
        ))
    }

    fn identification(&self) -> Result<BTreeMap<String, Value>, DeviceError> {
        let text = self.run_ok(
            "get_data",
            &self.hooks.get_data,
            &[Section::Identification.as_str()],
            self.hooks.timeout,
        )?;
        Ok(parse_lines(&text)
            .remove(&Section::Identification)
            .unwrap_or_default())
    }
}

fn text_of(map: &BTreeMap<String, Value>, key: &str) -> Option<String> {
    match map.get(key) {
        Some(Value::Text(t)) if !t.is_empty() => Some(t.clone()),
        Some(Value::Int(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let word = text.split_whitespace().next()?;
    if word.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(word.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Device for ExecDevice {
    fn state(&self) -> DeviceState {
        let id = self.identification().unwrap_or_default();
        DeviceState {
            site: String::new(),
            model: text_of(&id, "model").unwrap_or_else(|| "exec device".to_owned()),
            firmware: text_of(&id, "rom_version").unwrap_or_default(),
        }
    }

    fn read(&mut self, sections: &[Section]) -> Result<DeviceData, DeviceError> {
        let args: Vec<&str> = sections.iter().map(|s| s.as_str()).collect();
        let text = self.run_ok("get_data", &self.hooks.get_data, &args, self.hooks.timeout)?;
        let mut data = parse_lines(&text);
        data.retain(|s, _| sections.contains(s));
        Ok(data)
    }

    /// The hook validates as it applies (exit 3 with the refusals); nothing to check first.
    fn check(&self, _values: &DeviceData) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn apply(&mut self, values: &DeviceData) -> Result<(), ApplyError> {
        let hook =
            self.hooks
                .apply
                .as_deref()
                .ok_or(ApplyError::Failed(DeviceError::NotSupported(
                    "settings (no apply hook configured)",
                )))?;
        let ran = self
            .run(
                "apply",
                hook,
                &[],
                Some(&format_lines(values)),
                self.hooks.timeout,
            )
            .map_err(ApplyError::Failed)?;
        match ran.code {
            Some(0) => Ok(()),
            Some(EXIT_REFUSED) => {
                let mut refused = BTreeMap::new();
                for line in ran.stdout.lines() {
                    if let Some((k, why)) = line.split_once('=') {
                        refused.insert(k.trim().to_owned(), why.trim().to_owned());
                    }
                }
                if refused.is_empty() {
                    refused.insert("*".to_owned(), last_line(&ran.stderr).to_owned());
                }
                Err(ApplyError::Refused(refused))
            }
            _ => Err(ApplyError::Failed(self.failure("apply", &ran))),
        }
    }

    fn slots(&self) -> Result<Slots, DeviceError> {
        let id = self.identification()?;
        let active = text_of(&id, "active_slot")
            .and_then(|s| Slot::parse(&s))
            .ok_or_else(|| {
                DeviceError::Failed(
                    "get_data identification printed no identification.active_slot (a or b)".into(),
                )
            })?;
        Ok(Slots {
            active,
            versions: [text_of(&id, "slot_a"), text_of(&id, "slot_b")],
        })
    }

    fn write_image(&mut self, slot: Slot, image: &Path, version: &str) -> Result<(), DeviceError> {
        let hook = self.hook(&self.hooks.write_image)?.to_vec();
        let image = image.to_string_lossy().into_owned();
        let out = self.run_ok(
            "write_image",
            &hook,
            &[slot.as_str(), &image, version],
            self.hooks.write_timeout,
        )?;
        let digest = parse_digest(last_line(&out)).ok_or_else(|| {
            DeviceError::Failed(
                "the write_image hook printed no SHA-256 of the slot it wrote (64 hex digits)"
                    .into(),
            )
        })?;
        self.written.insert(slot, digest);
        Ok(())
    }

    fn image_digest(&mut self, slot: Slot) -> Result<[u8; 32], DeviceError> {
        self.written.get(&slot).copied().ok_or_else(|| {
            DeviceError::Failed(format!("slot {slot} has not been written by this agent"))
        })
    }

    fn activate(&mut self, slot: Slot) -> Result<(), DeviceError> {
        let hook = self.hook(&self.hooks.switch_slot)?.to_vec();
        self.run_ok("switch_slot", &hook, &[slot.as_str()], self.hooks.timeout)
            .map(drop)
    }

    fn health_check(&mut self) -> Result<(), DeviceError> {
        let hook = self.hook(&self.hooks.health_check)?.to_vec();
        let slots = self.slots()?;
        let version = slots.active_version().to_owned();
        self.run_ok(
            "health_check",
            &hook,
            &[slots.active.as_str(), &version],
            self.hooks.timeout,
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_lines_round_trip() {
        let text = "adjustment.density=5\nadjustment.toner_save=true\n# comment\n\nsettings.host_url=\"mqtts://a:1\"\nidentification.model=Example device\nbogus.x=1\nnodot=1\n";
        let data = parse_lines(text);
        assert_eq!(data[&Section::Adjustment]["density"], Value::Int(5));
        assert_eq!(data[&Section::Adjustment]["toner_save"], Value::Bool(true));
        assert_eq!(
            data[&Section::Settings]["host_url"],
            Value::from("mqtts://a:1")
        );
        assert_eq!(
            data[&Section::Identification]["model"],
            Value::from("Example device")
        );
        assert_eq!(data.len(), 3);
        assert_eq!(parse_lines(&format_lines(&data)), data);
        assert_eq!(format_value(&Value::from("a \"b\"")), "\"a \\\"b\\\"\"");
    }

    #[test]
    fn digests_parse_as_sha256sum_prints_them() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_digest(&format!("{hex}  /x/b.img")), Some([0xab; 32]));
        assert_eq!(parse_digest("abc"), None);
    }
}
