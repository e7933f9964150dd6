//! `kernel-bench`: every strategy of a backend on the cases of a suite, with dense GEMM of
//! the same shape beside each, timed interleaved in one process; prints a table and the
//! planner's standing, and optionally writes the JSON of CONTRACTS.md.
//!
//! The planner's choice is what `Strategy::Auto` gives a user (cost model, confirmed by
//! timing where close); its ratio is the fastest strategy's median over the chosen one's,
//! both from the same interleaved run. The JSON adds a `planner` object (CONTRACTS.md).
//!
//! ```text
//! kernel-bench --suite quick|full|gpu|conv [--json PATH] [--threads N] [--backend cpu|opencl|all]
//! ```
//!
//! `--backend opencl|all` (a build with the feature `opencl`) adds the OpenCL strategies
//! `csr`, `table` and `unrolled` (up to `--unrolled-max-nnz`) on the device
//! `SPARSEJIT_OPENCL_DEVICE` names (else the first GPU, else the first device): kernel
//! times are device times from profiling events, without transfers; compile time is emit +
//! build + first launch. A table of specialised vs `csr` ends the output.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use benches::{case_spec, full_suite, quick_suite, BenchReport, BenchResult, Case, Operands};
use clap::{Parser, ValueEnum};
use codegen_cpu::{CpuBackend, CpuOptions};
use serde::Serialize;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{BackendError, Launch, Pattern, Strategy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    Quick,
    Full,
    /// `spmm` on 1024² and 4096² at 5 % and 10 % density, batch 128 (the GPU table).
    Gpu,
    /// Convolutions: WRN-16-8's 3×3 layers, two of VGG16-D's and LeNet-5's two, at 1, 5, 10
    /// and 20 %, batch 128 (LeNet-5: 100), `conv`, `conv_t`, `conv_grad` and
    /// `conv_dense_grad`.
    Conv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendName {
    Cpu,
    Opencl,
    /// Both.
    All,
}

/// Benchmarks sparsejit's kernels against each other and dense GEMM.
#[derive(Debug, Parser)]
#[command(name = "kernel-bench", version)]
struct Cli {
    /// Which cases: `quick` (< 2 minutes) or `full`.
    #[arg(long, value_enum, default_value = "quick")]
    suite: Suite,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Threads of the backend: explicit strategies split over all of them; `auto` chooses
    /// one thread or all per kernel.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Which backend's strategies to measure.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendName,
    /// Only cases whose label contains this text (e.g. `spmm_t`, `300x784`).
    #[arg(long)]
    filter: Option<String>,
    /// Measuring time per case, in milliseconds.
    #[arg(long, default_value_t = benches::BUDGET_MS)]
    budget_ms: u64,
    /// OpenCL: skip `unrolled` above this many nonzeros (its build time grows with them)
    /// [default: 4000 on a CPU device, 60000 on a GPU].
    #[arg(long)]
    unrolled_max_nnz: Option<usize>,
}

/// JIT compile cost assumed when deciding to skip a case (µs per nonzero, measured upper end).
const JIT_US_PER_NNZ_ESTIMATE: f64 = 10.0;
/// The longest compilation `full` attempts.
const MAX_COMPILE_S: f64 = 30.0;
/// Convolutions: the JIT is timed at batches up to this, or on layers of at most
/// [`JIT_CONV_MAX_FMAS`] useful multiply-adds (docs/MEASUREMENTS.md: at batch 100 and 128 its
/// `f32x4` code ran 2–5× behind the generic kernel on every layer measured).
const JIT_CONV_MAX_BATCH: usize = 16;
/// See [`JIT_CONV_MAX_BATCH`].
const JIT_CONV_MAX_FMAS: usize = 100_000_000;

fn main() {
    // `kernel-bench … | head` ends quietly; an error is one line and exit status 1, without a
    // backtrace even with RUST_BACKTRACE set.
    sigpipe::reset();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if cli.backend != BackendName::Cpu && !cfg!(feature = "opencl") {
        bail!(
            "this kernel-bench was built without OpenCL; rebuild with \
             `cargo build --release -p benches --features opencl` (links libOpenCL: Debian \
             ocl-icd-opencl-dev) for --backend opencl|all"
        );
    }
    if let Some(warning) = sparse_ir::limits::threads_beyond_cores(cli.threads) {
        eprintln!("warning: {warning}: the times will measure threads waiting for each other");
    }
    let backend = CpuBackend::new(CpuOptions {
        threads: cli.threads,
        isa: None,
    })
    .context("creating the CPU backend")?;
    let mut cases = match cli.suite {
        Suite::Quick => quick_suite(),
        Suite::Full => full_suite(),
        Suite::Gpu => benches::gpu_suite(),
        Suite::Conv => benches::conv_suite(),
    };
    if let Some(filter) = &cli.filter {
        cases.retain(|c| c.label().contains(filter.as_str()));
    }
    #[cfg(feature = "opencl")]
    let ocl_cases = cases.clone();
    if cli.backend == BackendName::Opencl {
        cases.clear(); // no CPU rows
    }
    if !cases.is_empty() {
        println!(
            "kernel-bench: {} cases, backend cpu ({}), {} thread(s); medians of interleaved rounds",
            cases.len(),
            backend.device(),
            cli.threads
        );
        println!(
            "{:<32} {:>8} {:>11} {:>9} {:>8} {:>10}  pick",
            "case", "strategy", "median µs", "GFLOP/s", "% GEMM", "compile ms"
        );
    }
    let started = Instant::now();
    let mut results = Vec::new();
    let mut pick_ratios = Vec::new();
    let mut planner_cases = Vec::new();
    let mut worst: Option<(f64, String)> = None;
    let mut dense_rows_done = std::collections::HashSet::new();
    for case in &cases {
        let outcome = bench_case(
            &backend,
            case,
            cli.budget_ms,
            cli.suite == Suite::Full,
            cli.filter.is_some(),
        )?;
        for line in &outcome.notes {
            println!("{:<32} note: {line}", case.label());
        }
        let best = outcome
            .rows
            .iter()
            .map(|r| r.median_us)
            .fold(f64::INFINITY, f64::min);
        let gemm_us = outcome.gemm.median_us;
        for row in &outcome.rows {
            println!(
                "{:<32} {:>8} {:>11.2} {:>9.2} {:>7.0}% {:>10.1}  {}",
                case.label(),
                row.strategy,
                row.median_us,
                row.gflops,
                100.0 * gemm_us / row.median_us,
                row.compile_ms,
                if row.selected { "<- auto" } else { "" }
            );
        }
        println!(
            "{:<32} {:>8} {:>11.2} {:>9.2} {:>7}% {:>10}",
            case.label(),
            "gemm",
            gemm_us,
            outcome.gemm.dense_gflops,
            100,
            "-"
        );
        if let Some(sel) = outcome.rows.iter().find(|r| r.selected) {
            let ratio = best / sel.median_us;
            println!(
                "{:<32} planner: {} ({}) {:.3}x the fastest",
                case.label(),
                sel.strategy,
                outcome.how,
                ratio
            );
            planner_cases.push(PlannerCase {
                label: case.label().trim().to_string(),
                op: case.op.name().into(),
                rows: case.rows,
                cols: case.cols,
                batch: case.batch,
                density: case.density,
                strategy: sel.strategy.clone(),
                model_strategy: outcome.model.name().into(),
                timed: outcome.timed,
                ratio,
            });
            pick_ratios.push(ratio);
            if worst.as_ref().is_none_or(|(w, _)| ratio < *w) {
                worst = Some((ratio, case.label()));
            }
        }
        results.extend(outcome.rows);
        if dense_rows_done.insert((case.op, case.rows, case.cols, case.batch, case.geometry)) {
            results.push(outcome.gemm);
        }
    }
    if !pick_ratios.is_empty() {
        let (w, label) = worst.unwrap_or_default();
        println!(
            "planner: fastest/picked over {} cases: geomean {:.3}, worst {:.3} ({}), {} cases below 0.9",
            pick_ratios.len(),
            kernel_timing::geomean(&pick_ratios),
            w,
            label.trim(),
            pick_ratios.iter().filter(|&&r| r < 0.9).count()
        );
    }
    #[cfg(feature = "opencl")]
    if cli.backend != BackendName::Cpu {
        opencl::run(&cli, &ocl_cases, &mut results)?;
    }
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = &cli.json {
        let report = Report {
            report: BenchReport {
                version: 1,
                results,
            },
            planner: (!pick_ratios.is_empty()).then(|| PlannerSummary {
                geomean_ratio: kernel_timing::geomean(&pick_ratios),
                min_ratio: pick_ratios.iter().copied().fold(f64::INFINITY, f64::min),
                cases: planner_cases,
            }),
        };
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The JSON file: CONTRACTS.md's fields plus the planner's standing.
#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    report: BenchReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    planner: Option<PlannerSummary>,
}

/// How `Strategy::Auto` did over the suite.
#[derive(Serialize)]
struct PlannerSummary {
    /// Geometric mean over the cases of `ratio`.
    geomean_ratio: f64,
    /// The smallest `ratio`.
    min_ratio: f64,
    /// One entry per case.
    cases: Vec<PlannerCase>,
}

/// The planner's choice on one case.
#[derive(Serialize)]
struct PlannerCase {
    /// The case in words (a convolution's geometry included).
    label: String,
    op: String,
    rows: usize,
    cols: usize,
    batch: usize,
    density: f64,
    /// What `Strategy::Auto` chose.
    strategy: String,
    /// What the cost model alone chose.
    model_strategy: String,
    /// Whether close predictions were confirmed by timing.
    timed: bool,
    /// Fastest strategy's median / the chosen strategy's median (same interleaved run).
    ratio: f64,
}

struct CaseOutcome {
    rows: Vec<BenchResult>,
    gemm: BenchResult,
    notes: Vec<String>,
    /// The cost model's pick, whether timing confirmed it, and in words.
    model: Strategy,
    timed: bool,
    how: String,
}

/// Measures every CPU strategy on `case`; `filtered` (the user picked cases with `--filter`)
/// also times a convolution's JIT where it is known to be slow.
fn bench_case(
    backend: &CpuBackend,
    case: &Case,
    budget_ms: u64,
    full: bool,
    filtered: bool,
) -> Result<CaseOutcome> {
    let pattern = Arc::new(case.pattern());
    let spec = case_spec(case, pattern.clone());
    let mut notes = Vec::new();
    let mut kernels = Vec::new();
    for strategy in [Strategy::Generic, Strategy::Dense, Strategy::Jit] {
        if strategy == Strategy::Jit && full {
            let estimate_s = pattern.nnz() as f64 * JIT_US_PER_NNZ_ESTIMATE * 1e-6;
            if estimate_s > MAX_COMPILE_S {
                notes.push(format!(
                    "jit skipped: {} nonzeros would take about {estimate_s:.0} s to compile (limit {MAX_COMPILE_S} s)",
                    pattern.nnz()
                ));
                continue;
            }
        }
        if strategy == Strategy::Jit && case.geometry.is_some() && !filtered {
            let fmas = pattern.nnz() * case.positions() * case.batch;
            if case.batch > JIT_CONV_MAX_BATCH && fmas > JIT_CONV_MAX_FMAS {
                notes.push(format!(
                    "jit skipped: {:.0}M multiply-adds at batch {} (its f32x4 convolution code ran \
                     2-5x behind the generic kernel at batch 100 and 128 on every layer measured, \
                     and a run here would take seconds; with --filter it is timed)",
                    fmas as f64 / 1e6,
                    case.batch
                ));
                continue;
            }
        }
        let start = Instant::now();
        match backend.compile(&spec, strategy) {
            Ok(kernel) => kernels.push((strategy, kernel, start.elapsed().as_secs_f64() * 1e3)),
            Err(BackendError::Unsupported { reason, .. }) => {
                notes.push(format!("{strategy} unsupported: {reason}"))
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("compiling {} with {strategy}", case.label()))
            }
        }
    }
    // What a user gets: the planner with timing, after the candidates above are compiled
    // (it reuses their code through the kernel cache).
    let auto = backend.compile(&spec, Strategy::Auto)?;
    let selected = auto.strategy();
    let plan = auto.plan();
    let model = backend.predict(&spec).strategy;
    let timed = !plan.measured_us.is_empty();
    let how = if timed {
        let m: Vec<String> = plan
            .measured_us
            .iter()
            .map(|m| format!("{} {:.2}", m.strategy, m.us))
            .collect();
        format!("model {model}, timed {} µs", m.join(" / "))
    } else {
        format!("model {model}, clear")
    };
    drop(auto);
    let dense_pattern = Arc::new(Pattern::dense(case.rows, case.cols)?);
    let gemm = backend.compile(&case_spec(case, dense_pattern.clone()), Strategy::Dense)?;

    let launch = Launch::new(case.batch, case.ld());
    let mut operands = Vec::new();
    for _ in &kernels {
        operands.push(Operands::new(backend, case, &pattern, case.seed())?);
    }
    let mut gemm_operands = Operands::new(backend, case, &dense_pattern, case.seed())?;
    let mut closures: Vec<Box<dyn FnMut() -> Result<(), BackendError> + '_>> = Vec::new();
    for ((_, kernel, _), ops) in kernels.iter().zip(operands.iter_mut()) {
        closures.push(Box::new(move || ops.run(kernel, launch)));
    }
    closures.push(Box::new(|| gemm_operands.run(&gemm, launch)));
    let mut refs: Vec<&mut dyn FnMut() -> Result<(), BackendError>> = closures
        .iter_mut()
        .map(|c| &mut **c as &mut dyn FnMut() -> Result<(), BackendError>)
        .collect();
    let medians = kernel_timing::interleaved(&mut refs, &benches::case_timing(budget_ms))?.us;
    drop(refs);
    drop(closures);

    let rows = kernels
        .iter()
        .zip(&medians)
        .map(|((strategy, kernel, compile_ms), &us)| {
            let compile_ms = if *strategy == Strategy::Generic {
                0.0
            } else {
                *compile_ms
            };
            debug_assert_eq!(kernel.strategy(), *strategy);
            BenchResult::measured(
                "cpu",
                case,
                *strategy,
                &pattern,
                us,
                compile_ms,
                *strategy == selected,
            )
        })
        .collect();
    let gemm = BenchResult::measured(
        "cpu",
        case,
        Strategy::Dense,
        &dense_pattern,
        *medians.last().expect("gemm measured"),
        0.0,
        false,
    );
    Ok(CaseOutcome {
        rows,
        gemm,
        notes,
        model,
        timed,
        how,
    })
}

/// The OpenCL rows (`--backend opencl|all`).
#[cfg(feature = "opencl")]
mod opencl {
    use anyhow::{Context, Result};
    use benches::opencl::{bench_case, speedup_table, warm_up, Limits};
    use benches::{BenchResult, Case};
    use codegen_opencl::OpenClBackend;
    use kernel_timing::geomean;
    use sparse_ir::backend::Backend;

    /// Measures every case on the preferred OpenCL device, prints its rows, the planner's
    /// standing and the specialised-vs-csr table, and adds the rows to `results`.
    pub(super) fn run(
        cli: &super::Cli,
        cases: &[Case],
        results: &mut Vec<BenchResult>,
    ) -> Result<()> {
        let backend = OpenClBackend::preferred().context("opening the OpenCL device")?;
        warm_up(&backend).context("building the generic csr programs")?;
        println!(
            "opencl: {} cases on {} ({} compute units); device times of interleaved rounds, no transfers; POCL_KERNEL_CACHE={}",
            cases.len(),
            backend.device(),
            backend.info().compute_units,
            std::env::var("POCL_KERNEL_CACHE").unwrap_or_else(|_| "unset".into())
        );
        println!(
            "{:<32} {:>8} {:>11} {:>9} {:>8} {:>10}  pick",
            "case", "strategy", "median µs", "GFLOP/s", "% GEMM", "compile ms"
        );
        let limits = Limits {
            unrolled_max_nnz: cli
                .unrolled_max_nnz
                .unwrap_or(Limits::default_unrolled_max_nnz(backend.info().kind)),
            budget: std::time::Duration::from_millis(cli.budget_ms),
            ..Limits::default()
        };
        let (mut ratios, mut worst) = (Vec::new(), None::<(f64, String)>);
        let mut ocl_rows = Vec::new();
        for case in cases.iter() {
            let outcome = bench_case(&backend, case, &limits)
                .with_context(|| format!("opencl {}", case.label()))?;
            for line in &outcome.notes {
                println!("{:<32} note: {line}", case.label());
            }
            // % of the CPU's dense GEMM on the same shape, when the CPU rows ran
            let gemm = results.iter().find(|r| {
                r.backend == "cpu"
                    && r.density == 1.0
                    && (r.op.as_str(), r.rows, r.cols, r.batch)
                        == (case.op.name(), case.rows, case.cols, case.batch)
            });
            for row in &outcome.rows {
                println!(
                    "{:<32} {:>8} {:>11.2} {:>9.2} {:>8} {:>10.1}  {}",
                    case.label(),
                    row.strategy,
                    row.median_us,
                    row.gflops,
                    gemm.map_or("-".into(), |g| format!(
                        "{:.0}%",
                        100.0 * g.median_us / row.median_us
                    )),
                    row.compile_ms,
                    if row.selected { "<- auto" } else { "" }
                );
            }
            let best = outcome
                .rows
                .iter()
                .map(|r| r.median_us)
                .fold(f64::INFINITY, f64::min);
            if let Some(sel) = outcome.rows.iter().find(|r| r.selected) {
                let ratio = best / sel.median_us;
                ratios.push(ratio);
                if worst.as_ref().is_none_or(|(w, _)| ratio < *w) {
                    worst = Some((ratio, case.label()));
                }
            }
            ocl_rows.extend(outcome.rows);
        }
        if let Some((w, label)) = worst {
            println!(
                "opencl planner: fastest/picked over {} cases: geomean {:.3}, worst {:.3} ({}), picks the fastest in {} (within 5 % in {}), {} cases below 0.9",
                ratios.len(),
                geomean(&ratios),
                w,
                label.trim(),
                ratios.iter().filter(|&&r| r >= 1.0).count(),
                ratios.iter().filter(|&&r| r >= 0.95).count(),
                ratios.iter().filter(|&&r| r < 0.9).count()
            );
        }
        println!("\nspecialised vs csr (×csr = csr time / its time; >1: faster than csr)");
        print!("{}", speedup_table(&ocl_rows));
        results.extend(ocl_rows);
        Ok(())
    }
}
