//! `macro-bench`: the `sparse_kernel!` kernel, plain and with `fma = true`, against the
//! Cranelift JIT (`codegen_cpu::jit::JitKernel`) and the generic kernel (`CpuBackend`,
//! `Strategy::Generic`, one thread) on the LeNet shapes. The fused version
//! runs when the binary is built with the `fma` target feature, as this workspace's
//! `.cargo/config.toml` does; the header line says which one ran.
//!
//! Two sets of patterns:
//! - `random5`: two random 5 % masks committed as `model/bench/*.npy` (made by
//!   `scripts/make_bench_masks.py`), plain `spmm`, values given at run time (the same random
//!   values for every competitor). The 300×784 one has ~11.7k nonzeros: it is also the
//!   12k-nonzero macro kernel whose compile time is worth knowing.
//! - `trained`: fc1 and fc2 of the exported model (fc1 3.8 %, fc2 11.7 % after training),
//!   `spmm(bias, relu)`, the macro kernel with its weights baked in.
//!
//! Every competitor's output is first checked against `sparse_ir::interp`; then all four are
//! timed interleaved round by round (`kernel_timing::interleaved`, the project's one timing loop) and the medians reported.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use benches::random_values;
use clap::Parser;
use codegen_cpu::jit::JitKernel;
use codegen_cpu::{CpuBackend, CpuOptions};
use macros::sparse_kernel;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{interp, Args, BackendError, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

sparse_kernel! {
    name = rand_fc1,
    op = spmm,
    batch = any,
    mask_file = "model/bench/fc1_300x784_5pct.npy",
}

sparse_kernel! {
    name = rand_fc2,
    op = spmm,
    batch = any,
    mask_file = "model/bench/fc2_100x300_5pct.npy",
}

sparse_kernel! {
    name = rand_fc1_fma,
    op = spmm,
    batch = any,
    mask_file = "model/bench/fc1_300x784_5pct.npy",
    fma = true,
}

sparse_kernel! {
    name = rand_fc2_fma,
    op = spmm,
    batch = any,
    mask_file = "model/bench/fc2_100x300_5pct.npy",
    fma = true,
}

// The plain versions of the library's baked kernels (which are generated with `fma = true`).
sparse_kernel! {
    name = plain_fc1,
    op = spmm(bias, relu),
    batch = any,
    mask_file = "model/lenet300_5pct.safetensors",
    tensor = "fc1.mask",
    values_file = "model/lenet300_5pct.safetensors",
    values_tensor = "fc1.weight",
}

sparse_kernel! {
    name = plain_fc2,
    op = spmm(bias, relu),
    batch = any,
    mask_file = "model/lenet300_5pct.safetensors",
    tensor = "fc2.mask",
    values_file = "model/lenet300_5pct.safetensors",
    values_tensor = "fc2.weight",
}

/// Macro kernel vs JIT vs generic on the LeNet layer shapes.
#[derive(Parser)]
struct Cli {
    /// Time budget per case, milliseconds.
    #[arg(long, default_value_t = 1500)]
    budget_ms: u64,
    /// Batches to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    batches: Vec<usize>,
}

/// A macro kernel: `(values, x, bias, y, batch, ld)`.
type MacroFn<'a> =
    &'a dyn Fn(&[f32], &[f32], &[f32], &mut [f32], usize, usize) -> Result<(), String>;

struct Case<'a> {
    label: &'static str,
    pattern: Arc<Pattern>,
    op: Op,
    /// Values the macro kernel uses (baked ones for the trained layers).
    values: Vec<f32>,
    /// The kernel generated without `fma`.
    run_plain: MacroFn<'a>,
    /// The kernel generated with `fma = true`.
    run_fused: MacroFn<'a>,
}

fn pattern_of(rows: usize, cols: usize, row_ptr: &[u32], col_idx: &[u32]) -> Result<Arc<Pattern>> {
    Ok(Arc::new(Pattern::from_csr(
        rows,
        cols,
        row_ptr.to_vec(),
        col_idx.to_vec(),
    )?))
}

fn macro_err(message: String) -> BackendError {
    BackendError::Launch {
        layer: "macro".into(),
        op: "spmm",
        message,
    }
}

fn bench(
    backend: &CpuBackend,
    case: &Case<'_>,
    batch: usize,
    ld: usize,
    budget: Duration,
) -> Result<()> {
    let p = &case.pattern;
    let spec = KernelSpec::new(
        "bench",
        case.op,
        p.clone(),
        Dim::Fixed(batch),
        Dim::Fixed(ld),
    )?;
    let jit = JitKernel::compile(&spec).context("JIT compile")?;
    let generic = backend
        .compile(&spec, Strategy::Generic)
        .context("generic compile")?;
    let has_bias = matches!(case.op, Op::Spmm { bias: true, .. });
    let x = random_values(p.cols() * ld, 7);
    let bias = random_values(p.rows(), 8);
    let bias_arg = has_bias.then_some(&bias[..]);
    let values = &case.values;

    let mut y_ref = vec![0.0; p.rows() * ld];
    let reference = interp::reference(
        &spec,
        Launch::new(batch, ld),
        &Args::Spmm {
            values,
            x: &x,
            bias: bias_arg,
            y: &mut y_ref,
        },
    )?;
    let mut y_macro = vec![0.0; p.rows() * ld];
    let mut y_fused = vec![0.0; p.rows() * ld];
    let mut y_jit = vec![0.0; p.rows() * ld];
    let mut y_gen = vec![0.0; p.rows() * ld];
    let launch = Launch::new(batch, ld);
    (case.run_plain)(values, &x, &bias, &mut y_macro, batch, ld).map_err(macro_err)?;
    (case.run_fused)(values, &x, &bias, &mut y_fused, batch, ld).map_err(macro_err)?;
    jit.run(
        launch,
        Args::Spmm {
            values,
            x: &x,
            bias: bias_arg,
            y: &mut y_jit,
        },
    )?;
    generic.run(
        launch,
        Args::Spmm {
            values,
            x: &x,
            bias: bias_arg,
            y: &mut y_gen,
        },
    )?;
    for (name, y) in [
        ("macro", &y_macro),
        ("macro fma", &y_fused),
        ("jit", &y_jit),
        ("generic", &y_gen),
    ] {
        interp::compare(&reference, y, ld).map_err(|m| {
            anyhow::anyhow!("{} {name} disagrees with the interpreter: {m}", case.label)
        })?;
    }

    let mut run_macro =
        || (case.run_plain)(values, &x, &bias, &mut y_macro, batch, ld).map_err(macro_err);
    let mut run_fused =
        || (case.run_fused)(values, &x, &bias, &mut y_fused, batch, ld).map_err(macro_err);
    let mut run_jit = || {
        jit.run(
            launch,
            Args::Spmm {
                values,
                x: &x,
                bias: bias_arg,
                y: &mut y_jit,
            },
        )
    };
    let mut run_gen = || {
        generic.run(
            launch,
            Args::Spmm {
                values,
                x: &x,
                bias: bias_arg,
                y: &mut y_gen,
            },
        )
    };
    let mut competitors: [&mut dyn FnMut() -> Result<(), BackendError>; 4] =
        [&mut run_macro, &mut run_fused, &mut run_jit, &mut run_gen];
    let m = kernel_timing::interleaved(
        &mut competitors,
        &kernel_timing::Config::benchmark(budget, 9),
    )?
    .us;
    println!(
        "{:<8} {:>3}x{:<3} nnz {:>5} ({:>5.2} %) b={:<3} ld={:<3} | macro {:>8.2} us  fma {:>8.2} us  jit {:>8.2} us  generic {:>8.2} us | generic/fma {:>5.2}x  jit/fma {:>5.2}x  macro/fma {:>5.2}x",
        case.label,
        p.rows(),
        p.cols(),
        p.nnz(),
        100.0 * p.density(),
        batch,
        ld,
        m[0],
        m[1],
        m[2],
        m[3],
        m[3] / m[1],
        m[2] / m[1],
        m[0] / m[1]
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let budget = Duration::from_millis(cli.budget_ms);
    let backend = CpuBackend::new(CpuOptions::default())?;
    println!(
        "generic: CpuBackend ISA {:?}, {} thread(s); JIT: JitKernel::compile defaults; macro: sparse_kernel! batch = any; fma: the same with `fma = true` ({})",
        backend.isa(),
        backend.threads(),
        if rand_fc2_fma::FMA {
            "fused: built with the fma target feature"
        } else {
            "built without the fma target feature, so the plain code: see .cargo/config.toml"
        }
    );

    use inference_example::{fc1, fc2};
    let rand1 = |v: &[f32], x: &[f32], _b: &[f32], y: &mut [f32], batch, ld| {
        rand_fc1::run(v, x, y, batch, ld).map_err(|e| e.to_string())
    };
    let rand2 = |v: &[f32], x: &[f32], _b: &[f32], y: &mut [f32], batch, ld| {
        rand_fc2::run(v, x, y, batch, ld).map_err(|e| e.to_string())
    };
    let rand1_fma = |v: &[f32], x: &[f32], _b: &[f32], y: &mut [f32], batch, ld| {
        rand_fc1_fma::run(v, x, y, batch, ld).map_err(|e| e.to_string())
    };
    let rand2_fma = |v: &[f32], x: &[f32], _b: &[f32], y: &mut [f32], batch, ld| {
        rand_fc2_fma::run(v, x, y, batch, ld).map_err(|e| e.to_string())
    };
    let trained1 = |_v: &[f32], x: &[f32], b: &[f32], y: &mut [f32], batch, ld| {
        plain_fc1::infer(x, b, y, batch, ld).map_err(|e| e.to_string())
    };
    let trained2 = |_v: &[f32], x: &[f32], b: &[f32], y: &mut [f32], batch, ld| {
        plain_fc2::infer(x, b, y, batch, ld).map_err(|e| e.to_string())
    };
    let trained1_fma = |_v: &[f32], x: &[f32], b: &[f32], y: &mut [f32], batch, ld| {
        fc1::infer(x, b, y, batch, ld).map_err(|e| e.to_string())
    };
    let trained2_fma = |_v: &[f32], x: &[f32], b: &[f32], y: &mut [f32], batch, ld| {
        fc2::infer(x, b, y, batch, ld).map_err(|e| e.to_string())
    };
    let bias_relu = Op::Spmm {
        bias: true,
        relu: true,
    };
    let cases = [
        Case {
            label: "random5",
            pattern: pattern_of(
                rand_fc1::ROWS,
                rand_fc1::COLS,
                &rand_fc1::ROW_PTR,
                &rand_fc1::COL_IDX,
            )?,
            op: Op::SPMM,
            values: random_values(rand_fc1::NNZ, 1),
            run_plain: &rand1,
            run_fused: &rand1_fma,
        },
        Case {
            label: "random5",
            pattern: pattern_of(
                rand_fc2::ROWS,
                rand_fc2::COLS,
                &rand_fc2::ROW_PTR,
                &rand_fc2::COL_IDX,
            )?,
            op: Op::SPMM,
            values: random_values(rand_fc2::NNZ, 2),
            run_plain: &rand2,
            run_fused: &rand2_fma,
        },
        Case {
            label: "trained",
            pattern: pattern_of(fc1::ROWS, fc1::COLS, &fc1::ROW_PTR, &fc1::COL_IDX)?,
            op: bias_relu,
            values: fc1::VALUES.to_vec(),
            run_plain: &trained1,
            run_fused: &trained1_fma,
        },
        Case {
            label: "trained",
            pattern: pattern_of(fc2::ROWS, fc2::COLS, &fc2::ROW_PTR, &fc2::COL_IDX)?,
            op: bias_relu,
            values: fc2::VALUES.to_vec(),
            run_plain: &trained2,
            run_fused: &trained2_fma,
        },
    ];
    for &batch in &cli.batches {
        // ld = batch (unpadded; ld 1 at batch 1 is the macro's constant-index path) and the
        // runtime's padding to 16 floats.
        let mut lds = vec![batch, batch.div_ceil(16) * 16];
        lds.dedup();
        for ld in lds {
            for case in &cases {
                bench(&backend, case, batch, ld, budget)?;
            }
        }
    }
    Ok(())
}
