//! The size of the CPU's per-core L2 cache, which decides how the generic convolution blocks
//! its channel loop.
//!
//! CPUs of the same kind differ here: a Sapphire Rapids core has 2 MiB of L2, a Zen 4 core
//! 1 MiB, and the convolution's best blocking differs with it (docs/MEASUREMENTS.md). Linux
//! publishes the size under `/sys/devices/system/cpu/cpu0/cache/index*/`; elsewhere, or if
//! that cannot be read, the smaller size is assumed.

use std::path::Path;
use std::sync::OnceLock;

/// The L2 size assumed where none can be read: Zen 4's 1 MiB, the smaller of the two kinds
/// this project measured.
pub(crate) const L2_FALLBACK_BYTES: usize = 1 << 20;

/// The per-core L2 cache size in bytes (read once).
pub(crate) fn l2_bytes() -> usize {
    static L2: OnceLock<usize> = OnceLock::new();
    *L2.get_or_init(|| {
        read_l2(Path::new("/sys/devices/system/cpu/cpu0/cache")).unwrap_or(L2_FALLBACK_BYTES)
    })
}

/// The size of the level-2 data or unified cache described under `dir` (sysfs's
/// `index*/level`, `type` and `size` files), if one is.
fn read_l2(dir: &Path) -> Option<usize> {
    let read = |p: &Path, f: &str| std::fs::read_to_string(p.join(f)).ok();
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let p = entry.path();
        let level = read(&p, "level")?;
        let kind = read(&p, "type")?;
        if level.trim() != "2" || kind.trim() == "Instruction" {
            return None;
        }
        parse_size(read(&p, "size")?.trim())
    })
}

/// Parses sysfs's cache size: a number of bytes with an optional `K`, `M` or `G` suffix.
fn parse_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let n: usize = digits.parse().ok()?;
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale).filter(|&b| b > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_sizes() {
        assert_eq!(parse_size("2048K"), Some(2 << 20));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("524288"), Some(512 << 10));
        assert_eq!(parse_size("0K"), None);
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size("K"), None);
    }

    #[test]
    fn reads_the_level_2_data_cache() {
        let dir = std::env::temp_dir().join(format!("sparsejit-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (index, level, kind, size) in [
            ("index0", "1", "Data", "48K"),
            ("index1", "1", "Instruction", "32K"),
            ("index2", "2", "Unified", "2048K"),
            ("index3", "3", "Unified", "105M"),
        ] {
            let p = dir.join(index);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("level"), format!("{level}\n")).unwrap();
            std::fs::write(p.join("type"), format!("{kind}\n")).unwrap();
            std::fs::write(p.join("size"), format!("{size}\n")).unwrap();
        }
        assert_eq!(read_l2(&dir), Some(2 << 20));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read_l2(&dir), None);
    }

    #[test]
    fn this_machine_has_a_plausible_l2() {
        let l2 = l2_bytes();
        assert!((64 << 10..=64 << 20).contains(&l2), "L2 of {l2} bytes");
    }
}
