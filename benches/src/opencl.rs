//! The OpenCL half of `kernel-bench` (feature `opencl`): every OpenCL strategy (`csr`,
//! `table`, `unrolled`) on a case, timed by the device's profiling events (kernel time
//! only, no host transfers: the operands stay on the device), interleaved round by round;
//! compile time is emit + build + first launch (PoCL compiles a kernel only when it is first
//! launched), reported separately.

use std::sync::Arc;
use std::time::{Duration, Instant};

use codegen_opencl::{DeviceKind, OpenClBackend, OpenClKernel};
use sparse_ir::backend::Backend;
use sparse_ir::{BackendError, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

use crate::{case_spec, BenchResult, Case, Operands};
use kernel_timing::median;

/// The OpenCL strategies, in the order they are reported.
pub const STRATEGIES: [Strategy; 3] = [Strategy::Csr, Strategy::Table, Strategy::Unrolled];

/// Limits of one OpenCL case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `unrolled` is skipped (with a note) above this many nonzeros: its code, and the
    /// build time, grow with every nonzero.
    pub unrolled_max_nnz: usize,
    /// Measuring time per case.
    pub budget: Duration,
    /// Rounds at least.
    pub min_rounds: usize,
}

impl Limits {
    /// The default `unrolled` cap on a device: 4,000 nonzeros on a CPU device (PoCL builds
    /// straight-line code slowly: about 35 s for 11,700 nonzeros of `spmm` here), 60,000 on a
    /// GPU.
    pub fn default_unrolled_max_nnz(kind: DeviceKind) -> usize {
        match kind {
            DeviceKind::Cpu => 4_000,
            DeviceKind::Gpu | DeviceKind::Other => 60_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            unrolled_max_nnz: 4_000,
            budget: Duration::from_millis(400),
            min_rounds: 7,
        }
    }
}

/// The outcome of one case: one result per strategy that ran, and notes on those that did
/// not.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// One row per strategy measured.
    pub rows: Vec<BenchResult>,
    /// Why a strategy is missing.
    pub notes: Vec<String>,
}

/// Builds the generic `csr` program of every op once, so that no case's compile time
/// includes it (it is built once per device, not per pattern).
pub fn warm_up(backend: &OpenClBackend) -> Result<(), BackendError> {
    let tiny = Arc::new(Pattern::dense(2, 2).expect("a 2x2 pattern is valid"));
    for op in [
        Op::SPMM,
        Op::Spmm {
            bias: true,
            relu: true,
        },
        Op::SpmmT,
        Op::Sddmm,
        Op::DenseGrad,
    ] {
        let spec = KernelSpec::new("warm", op, tiny.clone(), Dim::Fixed(1), Dim::Fixed(16))
            .expect("a valid spec");
        backend.compile(&spec, Strategy::Csr)?;
    }
    Ok(())
}

/// Measures every OpenCL strategy on `case` (its pattern [`Case::pattern`], the same one
/// the CPU rows of `kernel-bench` use).
pub fn bench_case(
    backend: &OpenClBackend,
    case: &Case,
    limits: &Limits,
) -> Result<Outcome, BackendError> {
    let pattern = Arc::new(case.pattern());
    let spec = case_spec(case, pattern.clone());
    let mut notes = Vec::new();
    let mut kernels: Vec<(Strategy, OpenClKernel)> = Vec::new();
    for strategy in STRATEGIES {
        if strategy == Strategy::Unrolled && pattern.nnz() > limits.unrolled_max_nnz {
            notes.push(format!(
                "unrolled skipped: {} nonzeros > --unrolled-max-nnz {}",
                pattern.nnz(),
                limits.unrolled_max_nnz
            ));
            continue;
        }
        match backend.compile(&spec, strategy) {
            Ok(kernel) => kernels.push((strategy, kernel)),
            Err(e @ (BackendError::Unsupported { .. } | BackendError::Compile { .. })) => {
                notes.push(format!("{strategy} not measured: {e}"))
            }
            Err(e) => return Err(e),
        }
    }
    let selected = backend.plan(&spec).strategy;
    let launch = Launch::new(case.batch, case.ld());
    let mut operands = kernels
        .iter()
        .map(|_| Operands::new(backend, case, &pattern, case.seed()))
        .collect::<Result<Vec<_>, _>>()?;
    let times = interleaved_device_times(&kernels, &mut operands, launch, limits)?;
    let rows = kernels
        .iter()
        .zip(times)
        .map(|((strategy, kernel), us)| {
            BenchResult::measured(
                "opencl",
                case,
                *strategy,
                &pattern,
                us,
                kernel.report().compile_time().as_secs_f64() * 1e3,
                *strategy == selected,
            )
        })
        .collect();
    Ok(Outcome { rows, notes })
}

/// Each kernel's median device time in µs: one warm-up run each, then rounds running every
/// kernel once, until the budget has passed (at least `min_rounds`).
fn interleaved_device_times(
    kernels: &[(Strategy, OpenClKernel)],
    operands: &mut [Operands<OpenClBackend>],
    launch: Launch,
    limits: &Limits,
) -> Result<Vec<f64>, BackendError> {
    for ((_, k), o) in kernels.iter().zip(operands.iter_mut()) {
        o.run(k, launch)?;
    }
    let mut samples = vec![Vec::new(); kernels.len()];
    let start = Instant::now();
    let mut rounds = 0;
    while rounds < limits.min_rounds || start.elapsed() < limits.budget {
        for (((_, k), o), s) in kernels.iter().zip(operands.iter_mut()).zip(&mut samples) {
            o.run(k, launch)?;
            s.push(k.last_kernel_time().as_secs_f64() * 1e6);
        }
        rounds += 1;
    }
    Ok(samples.iter().map(|s| median(s)).collect())
}

/// The table of specialised (`table`, `unrolled`) against generic `csr` kernels, one line
/// per OpenCL case in `results`: the device times, each specialised kernel's speed-up over
/// `csr` (`csr time / its time`), the planner's pick and whether it is the fastest.
pub fn speedup_table(results: &[BenchResult]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:>7} {:>10} {:>10} {:>7} {:>10} {:>7} {:>9} {:>8}",
        "case (opencl, device time)",
        "nnz",
        "csr µs",
        "table µs",
        "×csr",
        "unroll µs",
        "×csr",
        "pick",
        "fastest"
    );
    let ocl: Vec<&BenchResult> = results.iter().filter(|r| r.backend == "opencl").collect();
    let mut seen = Vec::new();
    for r in &ocl {
        // A convolution's geometry tells apart layers of the same pattern shape.
        let key = (
            r.op.clone(),
            r.rows,
            r.cols,
            r.batch,
            r.density.to_bits(),
            r.height,
        );
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        let same: Vec<&&BenchResult> = ocl
            .iter()
            .filter(|o| {
                (
                    o.op.clone(),
                    o.rows,
                    o.cols,
                    o.batch,
                    o.density.to_bits(),
                    o.height,
                ) == key
            })
            .collect();
        let get = |s: &str| same.iter().find(|o| o.strategy == s).map(|o| o.median_us);
        let csr = get("csr");
        let cell = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{t:.1}"));
        let ratio = |t: Option<f64>| match (csr, t) {
            (Some(c), Some(t)) => format!("{:.2}", c / t),
            _ => "-".to_string(),
        };
        let fastest = same
            .iter()
            .min_by(|a, b| a.median_us.total_cmp(&b.median_us))
            .map_or("-", |o| o.strategy.as_str());
        let pick = same
            .iter()
            .find(|o| o.selected)
            .map_or("-", |o| o.strategy.as_str());
        let label = format!(
            "{:<6} {}x{} b={} d={}%",
            r.op,
            r.rows,
            r.cols,
            r.batch,
            r.density * 100.0
        );
        let _ = writeln!(
            out,
            "{:<34} {:>7} {:>10} {:>10} {:>7} {:>10} {:>7} {:>9} {:>8}",
            label,
            r.nnz,
            cell(csr),
            cell(get("table")),
            ratio(get("table")),
            cell(get("unrolled")),
            ratio(get("unrolled")),
            pick,
            if pick == fastest {
                "yes".to_string()
            } else {
                format!("no:{fastest}")
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(strategy: &str, us: f64, selected: bool) -> BenchResult {
        BenchResult {
            backend: "opencl".into(),
            strategy: strategy.into(),
            op: "spmm".into(),
            rows: 1024,
            cols: 1024,
            batch: 128,
            density: 0.1,
            nnz: 104_857,
            median_us: us,
            gflops: 0.0,
            dense_gflops: 0.0,
            compile_ms: 0.0,
            selected,
            in_channels: None,
            height: None,
            width: None,
            kernel: None,
            stride: None,
            padding: None,
        }
    }

    #[test]
    fn speedup_table_reports_ratios_and_the_pick() {
        let mut cpu = result("generic", 1.0, true);
        cpu.backend = "cpu".into();
        let t = speedup_table(&[
            cpu,
            result("csr", 300.0, false),
            result("table", 100.0, true),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cols[4..],
            ["104857", "300.0", "100.0", "3.00", "-", "-", "table", "yes"],
            "{t}"
        );
        let t = speedup_table(&[result("csr", 100.0, true), result("table", 50.0, false)]);
        assert!(t.lines().nth(1).unwrap().ends_with("no:table"), "{t}");
    }
}
