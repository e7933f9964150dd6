//! Instruction-set levels of the generic kernels and their run-time detection.

use std::fmt;
use std::str::FromStr;

/// The environment variable that caps the ISA level (`avx512`, `avx2` or `portable`), so that
/// tests and benchmarks can exercise every kernel variant on one machine.
pub const ISA_ENV: &str = "SPARSEJIT_ISA";

/// An instruction-set level the generic kernels are compiled for, from the widest down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IsaLevel {
    /// Plain Rust, no target features beyond the compilation target's baseline.
    Portable,
    /// 256-bit vectors with fused multiply-add (x86-64 `avx2` + `fma`).
    Avx2Fma,
    /// 512-bit vectors with masks (x86-64 `avx512f`).
    Avx512,
}

impl IsaLevel {
    /// Every level, widest first.
    pub const ALL: [IsaLevel; 3] = [IsaLevel::Avx512, IsaLevel::Avx2Fma, IsaLevel::Portable];

    /// The widest level this CPU supports.
    pub fn detect() -> IsaLevel {
        #[cfg(target_arch = "x86_64")]
        {
            // The AVX-512 level also runs the AVX2+FMA batch-1 kernels.
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return IsaLevel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return IsaLevel::Avx2Fma;
            }
        }
        IsaLevel::Portable
    }

    /// Whether this CPU can run kernels of this level.
    pub fn is_supported(self) -> bool {
        self <= IsaLevel::detect()
    }

    /// Every level this CPU supports, widest first.
    pub fn supported() -> Vec<IsaLevel> {
        IsaLevel::ALL
            .into_iter()
            .filter(|l| l.is_supported())
            .collect()
    }

    /// The short name: `avx512`, `avx2` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            IsaLevel::Avx512 => "avx512",
            IsaLevel::Avx2Fma => "avx2",
            IsaLevel::Portable => "portable",
        }
    }

    /// `f32` lanes per vector register of the generic kernels at this level.
    pub fn lanes(self) -> usize {
        match self {
            IsaLevel::Avx512 => 16,
            IsaLevel::Avx2Fma | IsaLevel::Portable => 8,
        }
    }

    /// The level asked for by [`ISA_ENV`], if it is set (and not empty or `auto`).
    pub fn from_env() -> Result<Option<IsaLevel>, String> {
        match std::env::var(ISA_ENV) {
            Ok(v) if v.trim().is_empty() || v.trim() == "auto" => Ok(None),
            Ok(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|e| format!("{ISA_ENV}: {e}")),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(v)) => {
                Err(format!("{ISA_ENV}: not valid UTF-8: {v:?}"))
            }
        }
    }
}

impl fmt::Display for IsaLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for IsaLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "avx512" | "avx512f" => Ok(IsaLevel::Avx512),
            "avx2" | "avx2fma" | "avx2+fma" => Ok(IsaLevel::Avx2Fma),
            "portable" | "scalar" => Ok(IsaLevel::Portable),
            _ => Err(format!(
                "unknown ISA level {s:?} (expected avx512, avx2 or portable)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order() {
        for l in IsaLevel::ALL {
            assert_eq!(l.name().parse::<IsaLevel>().unwrap(), l);
        }
        assert!(IsaLevel::Portable < IsaLevel::Avx2Fma && IsaLevel::Avx2Fma < IsaLevel::Avx512);
        assert!("sse9".parse::<IsaLevel>().unwrap_err().contains("sse9"));
        assert!(IsaLevel::Portable.is_supported());
        assert_eq!(IsaLevel::supported()[0], IsaLevel::detect());
    }
}
