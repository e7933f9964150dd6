//! `planner-fit`: measures the CPU strategies over a grid of shapes, densities, batches and
//! ops, next to the planner's predictions, to fit and check the cost model of
//! `codegen_cpu::planner` (medians of interleaved rounds, 1 thread).
//!
//! ```text
//! planner-fit [--ops spmm,spmm_t,sddmm] [--batches 1,8,100] [--budget-ms 60] [--csv PATH]
//! ```
//!
//! Prints one CSV line per case: `op,rows,cols,density,nnz,batch,ld,code_bytes`, then per
//! strategy the measured and predicted µs (`generic,jit,dense`), and the planner's pick with
//! cost-model timing off.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use benches::{case_spec, Case, Operands};
use clap::Parser;
use codegen_cpu::planner::{self, Features};
use codegen_cpu::{CpuBackend, CpuOptions};
use sparse_ir::backend::Backend;
use sparse_ir::{BackendError, Launch, Op, Strategy};

/// Measures every CPU strategy over a grid, beside the planner's predictions.
#[derive(Debug, Parser)]
#[command(name = "planner-fit")]
struct Cli {
    /// Ops (IR names), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "spmm,spmm_t,sddmm")]
    ops: Vec<String>,
    /// Batches, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,32,100")]
    batches: Vec<usize>,
    /// Shapes `RxC`, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10x100,30x200,100x300,200x500,300x784"
    )]
    shapes: Vec<String>,
    /// Densities, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.02,0.05,0.2")]
    densities: Vec<f64>,
    /// Measuring time per case, milliseconds.
    #[arg(long, default_value_t = 60)]
    budget_ms: u64,
    /// Skip the JIT where its estimated compile time exceeds this many milliseconds.
    #[arg(long, default_value_t = 1500.0)]
    max_compile_ms: f64,
    /// Also write the CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Instead of measuring, re-predict the cases of a CSV this tool wrote and report how
    /// the planner (with timing of close pairs simulated from the measured times) fares.
    #[arg(long)]
    replay: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(path) = &cli.replay {
        return replay(path);
    }
    let backend = CpuBackend::new(CpuOptions {
        threads: 1,
        isa: None,
    })?;
    let mut csv = String::from(
        "op,rows,cols,density,nnz,batch,ld,code_bytes,generic,jit,dense,pred_generic,pred_jit,pred_dense,model_pick\n",
    );
    print!("{csv}");
    for shape in &cli.shapes {
        let (r, c) = shape.split_once('x').context("shape RxC")?;
        let (rows, cols): (usize, usize) = (r.parse()?, c.parse()?);
        for &density in &cli.densities {
            for &batch in &cli.batches {
                for op in &cli.ops {
                    let op: Op = op.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
                    let case = Case::matrix(op, rows, cols, batch, density);
                    let line = measure(&backend, &case, &cli)?;
                    print!("{line}");
                    csv.push_str(&line);
                }
            }
        }
    }
    if let Some(path) = &cli.csv {
        std::fs::write(path, csv)?;
    }
    Ok(())
}

fn measure(backend: &CpuBackend, case: &Case, cli: &Cli) -> Result<String> {
    let pattern = Arc::new(case.pattern());
    let spec = case_spec(case, pattern.clone());
    let features = Features::of(&spec, 1, backend.isa());
    let estimate = codegen_cpu::jit::estimate(&spec);
    let code_bytes = estimate.map_or(0, |e| e.code_bytes);
    let mut strategies = vec![Strategy::Generic, Strategy::Dense];
    if estimate.is_some_and(|e| e.compile_us / 1e3 <= cli.max_compile_ms) {
        strategies.push(Strategy::Jit);
    }
    let mut kernels = Vec::new();
    for &s in &strategies {
        kernels.push(backend.compile(&spec, s)?);
    }
    let mut operands = Vec::new();
    for _ in &kernels {
        operands.push(Operands::new(backend, case, &pattern, case.seed())?);
    }
    let launch = Launch::new(case.batch, case.ld());
    let mut closures: Vec<Box<dyn FnMut() -> Result<(), BackendError> + '_>> = Vec::new();
    for (k, ops) in kernels.iter().zip(operands.iter_mut()) {
        closures.push(Box::new(move || ops.run(k, launch)));
    }
    let mut refs: Vec<&mut dyn FnMut() -> Result<(), BackendError>> = closures
        .iter_mut()
        .map(|c| &mut **c as &mut dyn FnMut() -> Result<(), BackendError>)
        .collect();
    let medians = kernel_timing::interleaved(&mut refs, &benches::case_timing(cli.budget_ms))?.us;
    let measured = |s: Strategy| {
        strategies
            .iter()
            .position(|&x| x == s)
            .map_or(f64::NAN, |i| medians[i])
    };
    let predicted = planner::predict_all(&features);
    let pred = |s: Strategy| {
        predicted
            .iter()
            .find(|p| p.strategy == s)
            .map_or(f64::NAN, |p| p.us)
    };
    let pick = planner::plan(&features).strategy;
    let mut line = String::new();
    let _ = writeln!(
        line,
        "{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{}",
        case.op.name(),
        case.rows,
        case.cols,
        case.density,
        pattern.nnz(),
        case.batch,
        case.ld(),
        code_bytes,
        measured(Strategy::Generic),
        measured(Strategy::Jit),
        measured(Strategy::Dense),
        pred(Strategy::Generic),
        pred(Strategy::Jit),
        pred(Strategy::Dense),
        pick
    );
    Ok(line)
}

/// Re-predicts measured cases: per case the model's pick, the pick after timing the close
/// pair (simulated with the measured medians), and its ratio to the measured fastest.
fn replay(path: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut ratios = Vec::new();
    let mut model_ratios = Vec::new();
    let mut timed = 0;
    // Per confirmation ratio: (cases timed, worst ratio, sum of log ratios).
    let sweep = [1.0, 1.2, 1.3, 1.5, 1.75, 2.0];
    let mut swept = vec![(0usize, f64::INFINITY, 0.0f64); sweep.len()];
    println!(
        "{:<7} {:>9} {:>5} {:>6} {:>4}  {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}  pick   ratio",
        "op", "shape", "dens", "nnz", "b", "gen", "jit", "dense", "p_gen", "p_jit", "p_dense"
    );
    for line in text.lines().skip(1) {
        let v: Vec<&str> = line.split(',').collect();
        if v.len() < 11 {
            continue;
        }
        let op: Op = v[0].parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let n = |i: usize| v[i].parse::<usize>().unwrap_or(0);
        let x = |i: usize| v[i].parse::<f64>().unwrap_or(f64::NAN);
        let (rows, cols, nnz, batch, ld, code) = (n(1), n(2), n(4), n(5), n(6), n(7));
        let features = Features {
            op,
            rows,
            cols,
            nnz,
            live_rows: rows,
            live_cols: cols,
            batch,
            ld,
            fixed_shape: true,
            jit_code_bytes: Some(code),
            threads: 1,
            isa: codegen_cpu::IsaLevel::Avx512,
            geometry: None,
        };
        let measured = |s: Strategy| {
            let t = match s {
                Strategy::Generic => x(8),
                Strategy::Jit => x(9),
                _ => x(10),
            };
            if t.is_nan() {
                f64::INFINITY
            } else {
                t
            }
        };
        let mut plan = planner::plan(&features);
        let model_pick = plan.strategy;
        let best_of = |set: &[Strategy]| {
            set.iter()
                .copied()
                .min_by(|a, b| measured(*a).total_cmp(&measured(*b)))
        };
        let all_best = [Strategy::Generic, Strategy::Jit, Strategy::Dense]
            .into_iter()
            .map(measured)
            .fold(f64::INFINITY, f64::min);
        for (i, &r) in sweep.iter().enumerate() {
            let pick = match plan.close_candidates_within(r) {
                Some(close) => {
                    swept[i].0 += 1;
                    best_of(&close).unwrap_or(model_pick)
                }
                None => model_pick,
            };
            let ratio = all_best / measured(pick);
            swept[i].1 = swept[i].1.min(ratio);
            swept[i].2 += ratio.ln();
        }
        if let Some(close) = plan.close_candidates() {
            timed += 1;
            plan.confirm(
                close
                    .iter()
                    .map(|&s| codegen_cpu::Measurement {
                        strategy: s,
                        us: measured(s),
                    })
                    .collect(),
                codegen_cpu::Timed::Cached,
            );
        }
        let best = [Strategy::Generic, Strategy::Jit, Strategy::Dense]
            .into_iter()
            .map(measured)
            .fold(f64::INFINITY, f64::min);
        let ratio = best / measured(plan.strategy);
        ratios.push(ratio);
        model_ratios.push(best / measured(model_pick));
        let p = |s: Strategy| plan.predicted(s).unwrap_or(f64::NAN);
        println!(
            "{:<7} {:>9} {:>5} {:>6} {:>4}  {:>8.3} {:>8.3} {:>8.3}  {:>8.3} {:>8.3} {:>8.3}  {:<6} {:.3}{}",
            v[0],
            format!("{rows}x{cols}"),
            v[3],
            nnz,
            batch,
            x(8),
            x(9),
            x(10),
            p(Strategy::Generic),
            p(Strategy::Jit),
            p(Strategy::Dense),
            plan.strategy.to_string(),
            ratio,
            if ratio < 0.9 { "  <-- miss" } else { "" }
        );
    }
    for (r, (t, worst, logs)) in sweep.iter().zip(&swept) {
        println!(
            "confirm within {r:.2}x: {t} timed, worst {worst:.3}, geomean {:.3}",
            (logs / ratios.len().max(1) as f64).exp()
        );
    }
    println!(
        "{} cases, {} timed; with timing: geomean {:.3}, min {:.3}; model alone: geomean {:.3}, min {:.3}",
        ratios.len(),
        timed,
        kernel_timing::geomean(&ratios),
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        kernel_timing::geomean(&model_ratios),
        model_ratios.iter().copied().fold(f64::INFINITY, f64::min),
    );
    Ok(())
}
