//! A simulated copier, for the demo, the tests and the fleet simulator.
//!
//! Its counters are a function of the time since it started: `pages = base + elapsed × rate`, so
//! they grow while it runs without a background task per device (a fleet holds thousands). Every
//! constant that makes one copier differ from another — its age, its mix of paper sizes and
//! functions, its options — is drawn from a random generator seeded by the serial, so a given
//! serial always looks the same and two serials look different.
//!
//! It also takes settings (typed, with ranges: [`crate::settings::SIM_SETTINGS`]) and firmware in
//! A/B slots ([`slots`]). Given a home directory it keeps both there (`settings.json`, `slots/`),
//! so what a job changed survives a restart of the agent, as it would on a real machine. A few
//! knobs make it misbehave on purpose for tests: a slow write, writes that fail their read-back,
//! versions that fail their health check.

mod faults;
mod slots;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::SecondsFormat;

use protocol::data::{DeviceData, Section, SectionData, Value};
use protocol::device::DeviceState;
use protocol::{Serial, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::device::{ApplyError, Device, DeviceError, Slot, Slots};
use crate::settings::{self, SIM_SETTINGS};
use slots::{SlotStore, replace_file};

/// Pages a simulated copier prints per minute unless configured otherwise.
pub const DEFAULT_PAGES_PER_MINUTE: f64 = 30.0;
/// The firmware a simulated copier reports unless configured otherwise.
pub const DEFAULT_FIRMWARE: &str = "1.0.0";

const MODELS: [&str; 4] = [
    "SimCopier C-300",
    "SimCopier C-450",
    "SimCopier C-600",
    "SimCopier P-7000",
];
const JAM_LOCATIONS: [&str; 6] = [
    "tray 1 feed",
    "tray 2 feed",
    "registration",
    "fuser exit",
    "duplex unit",
    "ADF",
];
const SC_CODES: [&str; 4] = [
    "SC-321 laser unit",
    "SC-542 fuser thermistor",
    "SC-670 engine",
    "SC-899 software",
];
const OPTIONS: [&str; 4] = ["ADF", "finisher", "fax board", "large capacity tray"];
/// Pages between periodic maintenance visits, and the drum's life.
const PM_INTERVAL: i64 = 60_000;
const DRUM_LIFE: i64 = 120_000;
/// Roughly one paper jam every this many pages, one service call every this many.
const PAGES_PER_JAM: i64 = 4_000;
const PAGES_PER_SC: i64 = 150_000;

/// What can be tuned about the simulated copiers (the `[sim]` table of the config file).
#[derive(Debug, Clone, PartialEq)]
pub struct SimSettings {
    /// None: each copier picks one of a few models from its serial.
    pub model: Option<String>,
    /// The factory firmware in slot a, until an update replaces it.
    pub firmware: String,
    pub pages_per_minute: f64,
    /// How long writing a firmware image takes (a real flash takes minutes).
    pub write_delay: Duration,
    /// Firmware versions whose health check fails after the switch, forcing a rollback.
    pub fail_health_check_versions: Vec<String>,
    /// The first this many image writes fail their read-back (as a bad flash write would).
    pub fail_writes: u32,
    /// This share of copiers (chosen by serial, the same each run) fail every firmware write:
    /// for seeing a rollout abort.
    pub fail_firmware_percent: u8,
    /// Factory firmware versions to spread over the copiers (by serial, the same each run)
    /// instead of `firmware` for all: a fleet on mixed versions, for rollout targets such as
    /// `firmware<2.0.0`.
    pub firmware_mix: Vec<String>,
}

impl Default for SimSettings {
    fn default() -> Self {
        Self {
            model: None,
            firmware: DEFAULT_FIRMWARE.to_owned(),
            pages_per_minute: DEFAULT_PAGES_PER_MINUTE,
            write_delay: Duration::ZERO,
            fail_health_check_versions: Vec::new(),
            fail_writes: 0,
            fail_firmware_percent: 0,
            firmware_mix: Vec::new(),
        }
    }
}

/// The fixed traits of one simulated copier, drawn from its serial.
#[derive(Debug, Clone)]
struct Profile {
    base_pages: i64,
    base_scans: i64,
    /// Percentages: copy, print (fax is the rest); a4, a3 (letter is the rest); duplex; scans per page.
    copy_pct: i64,
    print_pct: i64,
    a4_pct: i64,
    a3_pct: i64,
    duplex_pct: i64,
    scan_pct: i64,
    options: Vec<&'static str>,
    option_serial: u32,
    speed_dials: i64,
    density: i64,
}

impl Profile {
    fn draw(rng: &mut StdRng) -> Profile {
        let copy_pct = rng.gen_range(20..50);
        let print_pct = rng.gen_range(30..(95 - copy_pct));
        let a4_pct = rng.gen_range(60..85);
        let a3_pct = rng.gen_range(5..(100 - a4_pct));
        let options = OPTIONS
            .iter()
            .copied()
            .filter(|_| rng.gen_bool(0.5))
            .collect();
        Profile {
            base_pages: rng.gen_range(1_000..400_000),
            base_scans: rng.gen_range(100..50_000),
            copy_pct,
            print_pct,
            a4_pct,
            a3_pct,
            duplex_pct: rng.gen_range(10..60),
            scan_pct: rng.gen_range(5..30),
            options,
            option_serial: rng.gen_range(100_000..999_999),
            speed_dials: rng.gen_range(0..100),
            density: rng.gen_range(3..=7),
        }
    }
}

/// A simulated copier.
pub struct SimCopier {
    serial: Serial,
    model: String,
    pages_per_minute: f64,
    profile: Profile,
    started: Instant,
    started_at: Timestamp,
    sim: SimSettings,
    /// Values set by update-data jobs, over the copier's factory settings ("section.name" → value).
    values: BTreeMap<String, Value>,
    /// Where `values` are kept (`HOME/settings.json`); `None`: in memory only.
    settings_file: Option<PathBuf>,
    slots: SlotStore,
    writes: u32,
    /// Faults reported to it (Fig. 5), added to its JAM/SC data.
    faults: faults::FaultLog,
}

/// FNV-1a: a stable hash of the serial, so a serial's profile does not change between builds
/// (std's hasher is allowed to).
fn seed_of(serial: &Serial) -> u64 {
    serial.as_str().bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `whole × pct / 100`, in integers so the parts of a counter add up exactly.
fn share(whole: i64, pct: i64) -> i64 {
    whole * pct / 100
}

impl SimCopier {
    /// A copier that keeps everything in memory (tests).
    pub fn new(serial: &Serial, settings: &SimSettings) -> SimCopier {
        let mut rng = StdRng::seed_from_u64(seed_of(serial));
        let profile = Profile::draw(&mut rng);
        let model = settings
            .model
            .clone()
            .unwrap_or_else(|| MODELS[rng.gen_range(0..MODELS.len())].to_owned());
        let mut sim = settings.clone();
        if !settings.firmware_mix.is_empty() {
            let pick = (seed_of(serial) >> 16) as usize % settings.firmware_mix.len();
            sim.firmware = settings.firmware_mix[pick].clone();
        }
        SimCopier {
            serial: serial.clone(),
            model,
            pages_per_minute: settings.pages_per_minute.max(0.0),
            profile,
            started: Instant::now(),
            started_at: chrono::Utc::now(),
            slots: SlotStore::memory(&sim.firmware),
            sim,
            values: BTreeMap::new(),
            settings_file: None,
            writes: 0,
            faults: faults::FaultLog::default(),
        }
    }

    /// A copier that keeps its settings and firmware slots under `home`, which is created when
    /// first written. Unreadable saved settings are ignored (and replaced at the next update).
    pub fn with_home(serial: &Serial, settings: &SimSettings, home: &Path) -> SimCopier {
        let mut copier = SimCopier::new(serial, settings);
        let file = home.join("settings.json");
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(values) = serde_json::from_str::<BTreeMap<String, Value>>(&text)
        {
            copier.values = values;
        }
        copier.settings_file = Some(file);
        copier.slots = SlotStore::in_dir(home);
        copier
    }

    /// A setting's value: what a job set, else the factory value.
    fn setting(&self, section: Section, name: &str, factory: Value) -> Value {
        self.values
            .get(&settings::key(section, name))
            .cloned()
            .unwrap_or(factory)
    }

    /// Pages printed `elapsed` after the simulation started.
    fn pages_at(&self, elapsed: Duration) -> i64 {
        // Truncation is the point: whole pages only. The float cannot overflow i64 in any
        // realistic run (it would take ~10^13 years at 1,000 pages a minute).
        self.profile.base_pages + (elapsed.as_secs_f64() * self.pages_per_minute / 60.0) as i64
    }

    /// Every section of the copier's data as it stands `elapsed` after the start. Pure, so tests
    /// can look into the future without waiting for it.
    pub fn snapshot(&self, elapsed: Duration) -> DeviceData {
        let now = self.started_at + chrono::Duration::from_std(elapsed).unwrap_or_default();
        Section::ALL
            .into_iter()
            .map(|s| (s, self.section(s, elapsed, now)))
            .collect()
    }

    fn section(&self, section: Section, elapsed: Duration, now: Timestamp) -> SectionData {
        let p = &self.profile;
        let pages = self.pages_at(elapsed);
        let jams = pages / PAGES_PER_JAM;
        let scs = pages / PAGES_PER_SC;
        // Last events placed in the past in proportion to how long ago the counter last ticked over.
        let ago = |every: i64| {
            chrono::Duration::minutes((pages % every) / self.pages_per_minute.max(1.0) as i64)
        };
        let mut out = SectionData::new();
        let mut put = |k: &str, v: Value| {
            out.insert(k.to_owned(), v);
        };
        match section {
            Section::Counters => {
                let copy = share(pages, p.copy_pct);
                let print = share(pages, p.print_pct);
                let a4 = share(pages, p.a4_pct);
                let a3 = share(pages, p.a3_pct);
                let duplex = share(pages, p.duplex_pct);
                let scan = p.base_scans + share(pages, p.scan_pct);
                put("total", pages.into());
                put("sheets", (pages - duplex / 2).into());
                put("a4", a4.into());
                put("a3", a3.into());
                put("letter", (pages - a4 - a3).into());
                put("copy", copy.into());
                put("print", print.into());
                put("fax", (pages - copy - print).into());
                put("scan", scan.into());
                put("duplex", duplex.into());
                put("simplex", (pages - duplex).into());
                put("adf", (scan + share(copy, 60)).into());
                put("pm", (pages % PM_INTERVAL).into());
                put("drum", (pages % DRUM_LIFE).into());
            }
            Section::Identification => {
                let slots = self.slots.slots(&self.sim.firmware);
                put("serial", self.serial.as_str().into());
                put("model", self.model.as_str().into());
                put("rom_version", slots.active_version().into());
                put("active_slot", slots.active.as_str().into());
                put("slot_a", slots.version(Slot::A).unwrap_or("").into());
                put("slot_b", slots.version(Slot::B).unwrap_or("").into());
                put("options", p.options.join(",").into());
                put("option_serials", format!("OPT-{}", p.option_serial).into());
                put("option_rom_version", "2.3.1".into());
            }
            Section::Calls => {
                let last = now - ago(PM_INTERVAL / 4);
                put("call_count", (pages / (PM_INTERVAL / 4)).into());
                put(
                    "last_call_at",
                    last.to_rfc3339_opts(SecondsFormat::Secs, true).into(),
                );
                put(
                    "last_call_total",
                    (pages - pages % (PM_INTERVAL / 4)).into(),
                );
                put("last_call_content", "periodic counter report".into());
            }
            Section::CallSettings => {
                let s = Section::CallSettings;
                put(
                    "every_counts",
                    self.setting(s, "every_counts", (PM_INTERVAL / 4).into()),
                );
                put("at", self.setting(s, "at", "02:00".into()));
                put(
                    "interval_minutes",
                    self.setting(s, "interval_minutes", 15.into()),
                );
            }
            Section::Jams => {
                put("jam_count", jams.into());
                put("sc_count", scs.into());
                let spot = usize::try_from(jams).unwrap_or(0) % JAM_LOCATIONS.len();
                put("last_jam_location", JAM_LOCATIONS[spot].into());
                put(
                    "last_jam_at",
                    (now - ago(PAGES_PER_JAM))
                        .to_rfc3339_opts(SecondsFormat::Secs, true)
                        .into(),
                );
                let code = usize::try_from(scs).unwrap_or(0) % SC_CODES.len();
                put("last_sc", if scs > 0 { SC_CODES[code] } else { "" }.into());
                let history: Vec<&str> = (0..jams.min(3))
                    .map(|i| {
                        JAM_LOCATIONS
                            [(spot + JAM_LOCATIONS.len() - i as usize) % JAM_LOCATIONS.len()]
                    })
                    .collect();
                put("history", history.join(";").into());
                self.faults.apply(&mut out);
            }
            Section::Adjustment => {
                let s = Section::Adjustment;
                put("density", self.setting(s, "density", p.density.into()));
                put("toner_save", self.setting(s, "toner_save", false.into()));
                put(
                    "fax_resolution",
                    self.setting(s, "fax_resolution", "fine".into()),
                );
                put("fax_ecm", self.setting(s, "fax_ecm", true.into()));
                put(
                    "remote_diagnosis",
                    self.setting(s, "remote_diagnosis", true.into()),
                );
            }
            Section::Comms => {
                put("comm_count", (pages / 500).into());
                put(
                    "last_comm_at",
                    (now - ago(500))
                        .to_rfc3339_opts(SecondsFormat::Secs, true)
                        .into(),
                );
                put("last_comm_result", "ok".into());
                put("speed_dials", p.speed_dials.into());
            }
            Section::Settings => {
                put(
                    "host_url",
                    self.setting(
                        Section::Settings,
                        "host_url",
                        "mqtts://relay.example.com:8883".into(),
                    ),
                );
                put("host_selection", "relay".into());
                // The identification password is never sent in clear (Fig. 3); say only whether one is set.
                put("password_set", true.into());
                put("pages_per_minute", (self.pages_per_minute as i64).into());
            }
        }
        out
    }
}

impl Device for SimCopier {
    fn state(&self) -> DeviceState {
        DeviceState {
            site: String::new(),
            model: self.model.clone(),
            firmware: self
                .slots
                .slots(&self.sim.firmware)
                .active_version()
                .to_owned(),
        }
    }

    fn read(&mut self, sections: &[Section]) -> Result<DeviceData, DeviceError> {
        let elapsed = self.started.elapsed();
        let now = chrono::Utc::now();
        Ok(sections
            .iter()
            .map(|&s| (s, self.section(s, elapsed, now)))
            .collect())
    }

    fn check(&self, values: &DeviceData) -> BTreeMap<String, String> {
        settings::check(SIM_SETTINGS, values)
    }

    fn apply(&mut self, values: &DeviceData) -> Result<(), ApplyError> {
        let refused = self.check(values);
        if !refused.is_empty() {
            return Err(ApplyError::Refused(refused));
        }
        let mut next = self.values.clone();
        for (&section, kv) in values {
            for (name, v) in kv {
                next.insert(settings::key(section, name), v.clone());
            }
        }
        if let Some(file) = &self.settings_file {
            let text = serde_json::to_vec_pretty(&next)
                .map_err(|e| ApplyError::Failed(DeviceError::Failed(e.to_string())))?;
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    ApplyError::Failed(DeviceError::Failed(format!(
                        "creating {}: {e}",
                        dir.display()
                    )))
                })?;
            }
            replace_file(file, &text).map_err(ApplyError::Failed)?;
        }
        self.values = next;
        Ok(())
    }

    fn slots(&self) -> Result<Slots, DeviceError> {
        Ok(self.slots.slots(&self.sim.firmware))
    }

    fn write_image(&mut self, slot: Slot, image: &Path, version: &str) -> Result<(), DeviceError> {
        if seed_of(&self.serial) % 100 < u64::from(self.sim.fail_firmware_percent) {
            return Err(DeviceError::Failed(format!(
                "simulated flash failure: this copier is among the {}% set to fail every firmware write (fail_firmware_percent)",
                self.sim.fail_firmware_percent
            )));
        }
        self.writes += 1;
        let corrupt = self.writes <= self.sim.fail_writes;
        self.slots
            .write(slot, image, version, self.sim.write_delay, corrupt)
    }

    fn image_digest(&mut self, slot: Slot) -> Result<[u8; 32], DeviceError> {
        self.slots.digest(slot)
    }

    fn activate(&mut self, slot: Slot) -> Result<(), DeviceError> {
        self.slots.activate(slot)
    }

    fn health_check(&mut self) -> Result<(), DeviceError> {
        let slots = self.slots.slots(&self.sim.firmware);
        let version = slots.active_version();
        if self
            .sim
            .fail_health_check_versions
            .iter()
            .any(|v| v == version)
        {
            return Err(DeviceError::Failed(format!(
                "the engine did not come up on version {version}"
            )));
        }
        Ok(())
    }

    fn record_fault(&mut self, code: &str, detail: &str, fatal: bool) {
        self.faults.record(code, detail, fatal, chrono::Utc::now());
    }

    fn clear_fault(&mut self, code: &str) {
        self.faults.clear(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copier(serial: &str) -> SimCopier {
        SimCopier::new(&Serial::parse(serial).unwrap(), &SimSettings::default())
    }

    fn int(data: &DeviceData, section: Section, key: &str) -> i64 {
        data[&section][key]
            .as_int()
            .unwrap_or_else(|| panic!("{section}.{key} is not a number"))
    }

    #[test]
    fn counters_grow_while_the_copier_runs() {
        let c = copier("C1");
        let before = c.snapshot(Duration::ZERO);
        let after = c.snapshot(Duration::from_secs(600));
        let grown =
            int(&after, Section::Counters, "total") - int(&before, Section::Counters, "total");
        assert_eq!(grown, 300, "10 minutes at 30 pages a minute");
        for key in ["sheets", "a4", "copy", "print", "scan", "duplex", "adf"] {
            assert!(
                int(&after, Section::Counters, key) > int(&before, Section::Counters, key),
                "{key} did not grow"
            );
        }
    }

    #[test]
    fn counters_add_up() {
        let data = copier("C7").snapshot(Duration::from_secs(3600));
        let n = |k| int(&data, Section::Counters, k);
        assert_eq!(n("a4") + n("a3") + n("letter"), n("total"));
        assert_eq!(n("copy") + n("print") + n("fax"), n("total"));
        assert_eq!(n("duplex") + n("simplex"), n("total"));
        assert!(n("sheets") <= n("total"));
        assert!(n("pm") < PM_INTERVAL && n("drum") < DRUM_LIFE);
    }

    #[test]
    fn every_section_is_filled() {
        let mut c = copier("C1");
        let data = c.read(&Section::ALL).unwrap();
        for s in Section::ALL {
            assert!(
                data.get(&s).is_some_and(|d| !d.is_empty()),
                "section {s} is empty"
            );
        }
        assert_eq!(data[&Section::Identification]["serial"], Value::from("C1"));
        for key in [
            "total", "sheets", "a4", "a3", "letter", "copy", "print", "fax", "scan", "duplex",
            "adf", "pm", "drum",
        ] {
            assert!(
                data[&Section::Counters].contains_key(key),
                "counters lack {key}"
            );
        }
        for key in ["jam_count", "sc_count", "last_jam_location"] {
            assert!(data[&Section::Jams].contains_key(key), "jams lack {key}");
        }
    }

    #[test]
    fn read_returns_only_what_was_asked() {
        let mut c = copier("C1");
        let data = c.read(&[Section::Jams]).unwrap();
        assert_eq!(
            data.keys().copied().collect::<Vec<_>>(),
            vec![Section::Jams]
        );
    }

    #[test]
    fn serials_differ_and_a_serial_is_stable() {
        let total = |s| {
            int(
                &copier(s).snapshot(Duration::ZERO),
                Section::Counters,
                "total",
            )
        };
        assert_eq!(total("SIM-00001"), total("SIM-00001"));
        assert_ne!(total("SIM-00001"), total("SIM-00002"));
    }

    fn values(pairs: &[(Section, &str, Value)]) -> DeviceData {
        let mut data = DeviceData::new();
        for (section, name, v) in pairs {
            data.entry(*section)
                .or_default()
                .insert((*name).to_owned(), v.clone());
        }
        data
    }

    #[test]
    fn applied_settings_read_back_and_survive_a_restart() {
        let home = tempfile::tempdir().unwrap();
        let serial = Serial::parse("C1").unwrap();
        let mut c = SimCopier::with_home(&serial, &SimSettings::default(), home.path());
        c.apply(&values(&[
            (Section::Adjustment, "density", 8.into()),
            (Section::CallSettings, "at", "03:15".into()),
        ]))
        .unwrap();
        let mut again = SimCopier::with_home(&serial, &SimSettings::default(), home.path());
        let data = again
            .read(&[Section::Adjustment, Section::CallSettings])
            .unwrap();
        assert_eq!(data[&Section::Adjustment]["density"], Value::Int(8));
        assert_eq!(data[&Section::CallSettings]["at"], Value::from("03:15"));
    }

    #[test]
    fn one_refused_value_means_nothing_is_applied() {
        let mut c = copier("C1");
        let before = c.read(&[Section::Adjustment]).unwrap();
        let Err(ApplyError::Refused(refused)) = c.apply(&values(&[
            (Section::Adjustment, "toner_save", true.into()),
            (Section::Adjustment, "density", 12.into()),
        ])) else {
            panic!("a density of 12 must be refused")
        };
        assert_eq!(
            refused.get("adjustment.density").map(String::as_str),
            Some("12 is out of range 1..=9")
        );
        assert_eq!(c.read(&[Section::Adjustment]).unwrap(), before);
    }

    #[test]
    fn firmware_knobs_fail_writes_and_health_checks_on_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fw.bin");
        std::fs::write(&img, b"image 2.0").unwrap();
        let want: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(b"image 2.0").into()
        };
        let sim = SimSettings {
            fail_writes: 1,
            fail_health_check_versions: vec!["2.0".into()],
            ..SimSettings::default()
        };
        let mut c = SimCopier::new(&Serial::parse("C1").unwrap(), &sim);
        assert_eq!(c.state().firmware, DEFAULT_FIRMWARE);
        c.write_image(Slot::B, &img, "2.0").unwrap();
        assert_ne!(c.image_digest(Slot::B).unwrap(), want, "first write is bad");
        c.write_image(Slot::B, &img, "2.0").unwrap();
        assert_eq!(c.image_digest(Slot::B).unwrap(), want);
        c.activate(Slot::B).unwrap();
        assert_eq!(c.state().firmware, "2.0");
        assert!(c.health_check().is_err());
        c.activate(Slot::A).unwrap();
        assert!(c.health_check().is_ok());
        let id = c.read(&[Section::Identification]).unwrap();
        assert_eq!(
            id[&Section::Identification]["active_slot"],
            Value::from("a")
        );
        assert_eq!(id[&Section::Identification]["slot_b"], Value::from("2.0"));
    }

    #[test]
    fn a_share_of_copiers_chosen_by_serial_fails_every_firmware_write() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fw.bin");
        std::fs::write(&img, b"image 2.0").unwrap();
        let sim = |p| SimSettings {
            fail_firmware_percent: p,
            ..SimSettings::default()
        };
        let serials: Vec<Serial> = (0..200)
            .map(|i| Serial::parse(&format!("SIM-{i:05}")).unwrap())
            .collect();
        let failing = |p| {
            serials
                .iter()
                .filter(|s| {
                    SimCopier::new(s, &sim(p))
                        .write_image(Slot::B, &img, "2.0")
                        .is_err()
                })
                .count()
        };
        assert_eq!(failing(0), 0);
        assert_eq!(failing(100), 200);
        let some = failing(30);
        assert!((30..=90).contains(&some), "{some} of 200 at 30%");
        // The same copiers each time: a failing one fails again.
        assert_eq!(failing(30), some);
        let e = SimCopier::new(&serials[0], &sim(100))
            .write_image(Slot::B, &img, "2.0")
            .unwrap_err();
        assert!(e.to_string().contains("simulated flash failure"), "{e}");
    }

    #[test]
    fn a_firmware_mix_spreads_factory_versions_by_serial() {
        let sim = SimSettings {
            firmware_mix: vec!["1.0.0".into(), "1.2.0".into(), "2.0.0".into()],
            ..SimSettings::default()
        };
        let versions: Vec<String> = (0..60)
            .map(|i| {
                let s = Serial::parse(&format!("SIM-{i:05}")).unwrap();
                SimCopier::new(&s, &sim).state().firmware
            })
            .collect();
        for v in ["1.0.0", "1.2.0", "2.0.0"] {
            assert!(versions.iter().any(|x| x == v), "{v} missing: {versions:?}");
        }
        let again = SimCopier::new(&Serial::parse("SIM-00007").unwrap(), &sim);
        assert_eq!(
            again.state().firmware,
            versions[7],
            "the same copier, the same version"
        );
    }
}
