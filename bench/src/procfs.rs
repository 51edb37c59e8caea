//! What /proc says about a process and the machine: resident memory, CPU time, cores, memory.

use std::time::Instant;

use serde_json::{Value, json};

/// Resident set size of `pid` in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User + system CPU seconds `pid` has used so far.
pub fn cpu_secs(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may itself hold spaces and parentheses.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (tick(11) + tick(12)) as f64 / clock_ticks()
}

/// Busy and total jiffies of the whole machine, from the first line of /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let nums: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = nums.iter().sum();
    let idle = nums.get(3).copied().unwrap_or(0) + nums.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // The parent is the second field after the command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}

/// CPU use of some processes (together) and of the whole machine over an interval.
pub struct CpuMeter {
    pids: Vec<u32>,
    at: Instant,
    proc_secs: f64,
    machine: (u64, u64),
}

impl CpuMeter {
    pub fn start(pid: u32) -> CpuMeter {
        CpuMeter::of(vec![pid])
    }

    /// A meter over every process of `pids`, added up.
    pub fn of(pids: Vec<u32>) -> CpuMeter {
        CpuMeter {
            proc_secs: pids.iter().map(|p| cpu_secs(*p)).sum(),
            pids,
            at: Instant::now(),
            machine: machine_jiffies(),
        }
    }

    /// (CPU seconds the processes used, their share of one core in %, the machine's busy share
    /// in %).
    pub fn read(&self) -> (f64, f64, f64) {
        let now: f64 = self.pids.iter().map(|p| cpu_secs(*p)).sum();
        let secs = (now - self.proc_secs).max(0.0);
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let (busy, total) = machine_jiffies();
        let machine = if total > self.machine.1 {
            (busy - self.machine.0) as f64 / (total - self.machine.1) as f64 * 100.0
        } else {
            0.0
        };
        (secs, secs / wall * 100.0, machine)
    }
}

/// The machine the figures come from.
pub fn machine() -> Value {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": model,
        "memory_mib": mem_kib / 1024,
        "kernel": kernel.trim(),
        "open_files_limit": limit.rlim_max,
    })
}

/// Round to two decimals for the JSON.
pub fn r2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// `v` to three decimals: for ratios near 1, where the second decimal is the whole difference.
pub fn r3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
