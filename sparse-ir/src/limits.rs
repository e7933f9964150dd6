//! Limits before allocation: the machine's memory, and the byte budget that every size an
//! input declares (a shape, a batch, a nonzero count, an IDX header) is checked against
//! before anything is allocated or any work starts.
//!
//! The limits are not fixed caps: a WRN step at batch 128 rightly needs gigabytes, and a
//! machine with more memory may do more. [`MemoryBudget::machine`] allows one request
//! [`MemoryBudget::FRACTION`] of the machine's memory ([`machine_memory`]), or of
//! [`ASSUMED_MEMORY`] where that is unknown. A request over the budget is a [`LimitError`]
//! that names what was asked for, how many bytes it needs and how much memory the machine
//! has, instead of an abort on a failed allocation.
//!
//! The machine's memory is, in this order: the environment variable [`MEMORY_ENV`] (bytes;
//! for tests, and for a machine whose memory the system misreports); else the physical
//! memory (`MemTotal` of `/proc/meminfo`), or the control group's limit where that is
//! smaller (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`), as in a container.
//!
//! Sizes are multiplied with checked arithmetic ([`bytes_of`]): a product that overflows 64
//! bits is over any budget.
//!
//! The cores ([`cores`]) bound the useful threads: [`threads_beyond_cores`] is the warning
//! every tool gives for more.

use std::sync::OnceLock;

use thiserror::Error;

/// The memory assumed where it cannot be read (8 GiB).
pub const ASSUMED_MEMORY: u64 = 8 << 30;

/// The environment variable that sets the machine's memory in bytes, overriding what the
/// system reports (`SPARSEJIT_MEMORY_BYTES=17179869184` for 16 GiB).
pub const MEMORY_ENV: &str = "SPARSEJIT_MEMORY_BYTES";

/// Where the machine's memory figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource {
    /// The system's physical memory, or its control group's limit where smaller.
    System,
    /// The environment variable [`MEMORY_ENV`].
    Environment,
    /// Unknown: [`ASSUMED_MEMORY`] stands in.
    Assumed,
}

/// The machine's memory in bytes and where the figure came from (see the module doc). Read
/// once per process.
pub fn machine_memory() -> (u64, MemorySource) {
    static MEMORY: OnceLock<(u64, MemorySource)> = OnceLock::new();
    *MEMORY.get_or_init(|| {
        if let Some(bytes) = std::env::var(MEMORY_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&b| b > 0)
        {
            return (bytes, MemorySource::Environment);
        }
        match physical_memory() {
            Some(bytes) => (bytes, MemorySource::System),
            None => (ASSUMED_MEMORY, MemorySource::Assumed),
        }
    })
}

/// The memory the system gives this process: `MemTotal` of `/proc/meminfo` on Linux, or the
/// control group's limit where that is smaller; `None` where it cannot be read (other
/// systems, a missing or malformed file).
pub fn physical_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo(&text))?;
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|f| std::fs::read_to_string(f).ok())
    .filter_map(|text| text.trim().parse::<u64>().ok()) // `max`: no limit
    .filter(|&b| b > 0)
    .min();
    Some(cgroup.map_or(total, |c| c.min(total)))
}

/// `MemTotal` of a `/proc/meminfo` text (`MemTotal:  16318208 kB`), in bytes.
fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let unit = match words.next() {
        None => 1,
        Some("kB") => 1024,
        Some(_) => return None,
    };
    value.checked_mul(unit).filter(|&b| b > 0)
}

/// The cores this process may run on (`std::thread::available_parallelism`; 1 where unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The warning for `--threads threads` beyond [`cores`] (threads would wait for each other),
/// `None` within them.
pub fn threads_beyond_cores(threads: usize) -> Option<String> {
    let cores = cores();
    (threads > cores)
        .then(|| format!("--threads {threads} is more than this machine's {cores} cores"))
}

/// The number of bytes of `counts` multiplied together and by `element_bytes`; `None` when the
/// product overflows 64 bits.
pub fn bytes_of(counts: &[usize], element_bytes: usize) -> Option<u64> {
    counts
        .iter()
        .try_fold(element_bytes as u64, |n, &c| n.checked_mul(c as u64))
}

/// How many bytes one request (one pattern, one set of operands, one data file) may allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    bytes: u64,
    memory: u64,
    source: MemorySource,
}

impl MemoryBudget {
    /// The share of the machine's memory one request may take: a half, which leaves room for
    /// what else the process and the machine hold.
    pub const FRACTION: f64 = 0.5;

    /// The budget of this machine: [`Self::FRACTION`] of [`machine_memory`].
    pub fn machine() -> MemoryBudget {
        let (memory, source) = machine_memory();
        MemoryBudget::of_memory(memory, source)
    }

    /// The budget of a machine with `memory` bytes, the figure from `source`.
    pub fn of_memory(memory: u64, source: MemorySource) -> MemoryBudget {
        MemoryBudget {
            bytes: (memory as f64 * Self::FRACTION) as u64,
            memory,
            source,
        }
    }

    /// The bytes one request may allocate.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The machine's memory the budget derives from, and where that figure came from.
    pub fn memory(&self) -> (u64, MemorySource) {
        (self.memory, self.source)
    }

    /// Checks that `what` (e.g. `"--random 1000x1000: the pattern"`), needing `bytes` (`None`:
    /// more than 64 bits can count), fits the budget; returns the bytes.
    pub fn check(&self, what: &str, bytes: Option<u64>) -> Result<u64, LimitError> {
        match bytes {
            Some(b) if b <= self.bytes => Ok(b),
            _ => Err(LimitError {
                what: what.to_string(),
                bytes,
                budget: *self,
            }),
        }
    }
}

/// A request larger than the memory budget.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{what} needs {}, more than the {} one request may take on this machine ({})",
    needs(*.bytes), human(.budget.bytes), machine(.budget))]
pub struct LimitError {
    /// What was asked for, naming the flag, file or shape it came from.
    pub what: String,
    /// The bytes it needs; `None` where the size overflows 64 bits.
    pub bytes: Option<u64>,
    /// The budget it exceeds.
    pub budget: MemoryBudget,
}

fn needs(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) => human(b),
        None => "more than 2^64 bytes".to_string(),
    }
}

fn machine(budget: &MemoryBudget) -> String {
    let share = format!("{:.0} %", MemoryBudget::FRACTION * 100.0);
    let memory = human(budget.memory);
    match budget.source {
        MemorySource::System => format!("{share} of its {memory} of memory"),
        MemorySource::Environment => format!("{share} of the {memory} that {MEMORY_ENV} sets"),
        MemorySource::Assumed => {
            format!("{share} of {memory}: its memory is unknown, {memory} assumed")
        }
    }
}

/// `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #[test]
    fn threads_beyond_the_cores_are_warned_about() {
        let n = cores();
        assert!(n >= 1);
        assert_eq!(threads_beyond_cores(n), None);
        assert_eq!(threads_beyond_cores(1), None);
        let w = threads_beyond_cores(n + 1).expect("a warning");
        assert_eq!(
            w,
            format!("--threads {} is more than this machine's {n} cores", n + 1)
        );
    }

    use super::*;

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemFree:  1000 kB\nMemTotal:       16318208 kB\nSwapTotal: 0 kB\n";
        assert_eq!(parse_meminfo(text), Some(16_318_208 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 12\n"), Some(12));
        assert_eq!(parse_meminfo("MemTotal: lots kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 5 MB\n"), None);
        assert_eq!(parse_meminfo("MemFree: 5 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 0 kB\n"), None);
    }

    #[test]
    fn the_machine_budget_is_a_share_of_its_memory() {
        let b = MemoryBudget::machine();
        let (memory, source) = machine_memory();
        assert_eq!(b.bytes(), memory / 2);
        assert!(b.bytes() > 0);
        if cfg!(target_os = "linux") && std::env::var_os(MEMORY_ENV).is_none() {
            assert_eq!(source, MemorySource::System);
            assert!(physical_memory().is_some());
        }
    }

    #[test]
    fn checks_name_the_request_and_the_machine() {
        let b = MemoryBudget::of_memory(2 << 30, MemorySource::System);
        assert_eq!(b.check("x", Some(1 << 30)), Ok(1 << 30));
        let e = b
            .check("--batch 100000000: the operands", Some(3 << 30))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--batch 100000000: the operands needs 3.0 GiB, more than the 1.0 GiB one \
             request may take on this machine (50 % of its 2.0 GiB of memory)"
        );
        let e = b
            .check("an IDX header", bytes_of(&[usize::MAX, 2], 1))
            .unwrap_err();
        assert!(e.to_string().contains("more than 2^64 bytes"), "{e}");
        let e = MemoryBudget::of_memory(20, MemorySource::Assumed)
            .check("y", Some(11))
            .unwrap_err();
        assert!(e.to_string().contains("its memory is unknown"), "{e}");
        let e = MemoryBudget::of_memory(20, MemorySource::Environment)
            .check("y", Some(11))
            .unwrap_err();
        assert!(e.to_string().contains(MEMORY_ENV), "{e}");
    }

    #[test]
    fn sizes_multiply_checked() {
        assert_eq!(bytes_of(&[3, 4], 4), Some(48));
        assert_eq!(bytes_of(&[], 4), Some(4));
        assert_eq!(bytes_of(&[1 << 40, 1 << 30], 1), None);
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
