//! A quick look at the generic and dense strategies, their ISA levels and thread counts,
//! beside the planner's pick (not the full `kernel-bench`).
//!
//! ```sh
//! cargo run --release -p benches --example spmm_bench            # spmm cases, 1 thread
//! cargo run --release -p benches --example spmm_bench -- --all   # + ISA levels, 2 threads, other ops, 4096²
//! cargo run --release -p benches --example spmm_bench -- --big   # generic on 4096² only
//! cargo run --release -p benches --example spmm_bench -- --offsets  # 300×784 batch 8, X 0/16/32/48 bytes off a cache line
//! ```
//!
//! It measures as `kernel-bench` does, so the two agree on the cases they share: the case's
//! own pattern and operands ([`Case::pattern`], [`Operands`], 64-byte aligned), one set of
//! operands per variant, and `kernel_timing`'s interleaved rounds of warm samples with
//! paired medians. It prints the useful GFLOP/s `2·nnz·batch / time`.

use std::sync::Arc;

use benches::{case_spec, Case, Operands};
use codegen_cpu::{CpuBackend, CpuKernel, CpuOptions, IsaLevel};
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{AlignedVec, Args, BackendError, Launch, Op, Strategy};

/// One variant of a case: a name, the backend and the strategy it compiles with.
type Variant<'a> = (String, &'a CpuBackend, Strategy);

/// What one variant runs on: the bench operands, or for `--offsets` an `X` moved off its
/// cache line.
enum Inputs {
    Bench(Operands<CpuBackend>),
    Offset {
        values: AlignedVec,
        x: AlignedVec,
        offset: usize,
        out: AlignedVec,
    },
}

impl Inputs {
    fn run(&mut self, kernel: &CpuKernel, launch: Launch) -> Result<(), BackendError> {
        match self {
            Inputs::Bench(ops) => ops.run(kernel, launch),
            Inputs::Offset {
                values,
                x,
                offset,
                out,
            } => kernel.run(
                launch,
                Args::Spmm {
                    values: &values[..],
                    x: &x[*offset..],
                    bias: None,
                    y: &mut out[..],
                },
            ),
        }
    }
}

/// Times `variants` on `case`; with `x_offset`, `X` starts that many floats past a 64-byte
/// boundary.
fn bench_case(case: Case, variants: &[Variant<'_>], x_offset: Option<usize>) {
    let pattern = Arc::new(case.pattern());
    let spec = case_spec(&case, Arc::clone(&pattern));
    let launch = Launch::new(case.batch, case.ld());
    let kernels: Vec<CpuKernel> = variants
        .iter()
        .map(|(_, backend, strategy)| backend.compile(&spec, *strategy).expect("compiles"))
        .collect();
    let mut inputs: Vec<Inputs> = variants
        .iter()
        .map(|(_, backend, _)| {
            let Some(x_offset) = x_offset else {
                return Inputs::Bench(
                    Operands::new(*backend, &case, &pattern, case.seed()).expect("operands"),
                );
            };
            {
                let x_len = case.cols * case.ld();
                let values = benches::random_values(pattern.nnz(), case.seed());
                let x = benches::random_values(x_len + x_offset, case.seed() + 1);
                Inputs::Offset {
                    values: AlignedVec::from_slice(&values),
                    x: AlignedVec::from_slice(&x),
                    offset: x_offset,
                    out: AlignedVec::zeros(case.rows * case.ld()),
                }
            }
        })
        .collect();
    let mut closures: Vec<Box<dyn FnMut() -> Result<(), BackendError> + '_>> = kernels
        .iter()
        .zip(inputs.iter_mut())
        .map(|(k, i)| {
            Box::new(move || i.run(k, launch)) as Box<dyn FnMut() -> Result<(), BackendError> + '_>
        })
        .collect();
    let mut refs: Vec<kernel_timing::Run<'_, BackendError>> =
        closures.iter_mut().map(|c| &mut **c as _).collect();
    let medians = kernel_timing::interleaved(&mut refs, &benches::case_timing(benches::BUDGET_MS))
        .expect("the kernels run")
        .us;
    drop(refs);
    drop(closures);
    let flops = 2.0 * pattern.nnz() as f64 * case.batch as f64;
    println!(
        "{} {}x{} density {} nnz {} batch {} ld {}{}:",
        case.op,
        case.rows,
        case.cols,
        case.density,
        pattern.nnz(),
        case.batch,
        case.ld(),
        match x_offset {
            Some(o) => format!(" (X {o} floats off a cache line)"),
            None => String::new(),
        }
    );
    for (((name, _, strategy), kernel), us) in variants.iter().zip(&kernels).zip(medians) {
        let chose = if *strategy == Strategy::Auto {
            format!(
                " -> {} on {} thread(s)",
                kernel.strategy(),
                kernel.threads()
            )
        } else {
            String::new()
        };
        println!(
            "  {:<24} {:>10.2} µs  {:>7.2} GFLOP/s{chose}",
            name,
            us,
            flops / us / 1e3
        );
    }
}

fn main() {
    let all = std::env::args().any(|a| a == "--all");
    let big = std::env::args().any(|a| a == "--big");
    let mk = |threads, isa| {
        CpuBackend::new(CpuOptions {
            threads,
            isa: Some(isa),
        })
        .expect("the CPU backend")
    };
    let best = IsaLevel::detect();
    let b1 = mk(1, best);
    let b2 = mk(2, best);
    let avx2 = mk(1, IsaLevel::Avx2Fma.min(best));
    let portable = mk(1, IsaLevel::Portable);
    let mut variants: Vec<Variant<'_>> = vec![
        (format!("generic {best} 1t"), &b1, Strategy::Generic),
        ("dense 1t".into(), &b1, Strategy::Dense),
        ("auto 1t".into(), &b1, Strategy::Auto),
    ];
    if all {
        variants.push(("generic avx2 1t".into(), &avx2, Strategy::Generic));
        variants.push(("generic portable 1t".into(), &portable, Strategy::Generic));
        variants.push((format!("generic {best} 2t"), &b2, Strategy::Generic));
        variants.push(("dense 2t".into(), &b2, Strategy::Dense));
        variants.push(("auto 2t".into(), &b2, Strategy::Auto));
    }
    let case = |op, rows, cols, density, batch| Case::matrix(op, rows, cols, batch, density);
    let spmm = Op::SPMM;
    if std::env::args().any(|a| a == "--offsets") {
        // Where X starts within a cache line, twice over.
        for x_offset in [0, 4, 8, 12, 0, 4, 8, 12] {
            bench_case(
                case(spmm, 300, 784, 0.05, 8),
                &variants[..1],
                Some(x_offset),
            );
        }
        return;
    }
    if big {
        bench_case(case(spmm, 4096, 4096, 0.05, 128), &variants[..1], None);
        bench_case(case(Op::SpmmT, 4096, 4096, 0.05, 128), &variants[..1], None);
        bench_case(case(Op::Sddmm, 4096, 4096, 0.05, 128), &variants[..1], None);
        return;
    }
    bench_case(case(spmm, 1024, 1024, 0.05, 128), &variants, None);
    bench_case(case(spmm, 300, 784, 0.05, 1), &variants, None);
    bench_case(case(spmm, 300, 784, 0.05, 8), &variants, None);
    bench_case(case(spmm, 300, 784, 0.05, 100), &variants, None);
    bench_case(case(spmm, 100, 300, 0.05, 100), &variants, None);
    if all {
        bench_case(case(spmm, 10, 100, 0.05, 100), &variants, None);
        bench_case(case(spmm, 100, 300, 0.05, 1), &variants, None);
        bench_case(case(spmm, 300, 784, 0.2, 100), &variants, None);
        bench_case(case(spmm, 300, 784, 0.5, 100), &variants, None);
        for op in [Op::SpmmT, Op::Sddmm] {
            bench_case(case(op, 300, 784, 0.05, 100), &variants, None);
            bench_case(case(op, 100, 300, 0.05, 100), &variants, None);
            bench_case(case(op, 300, 784, 0.05, 1), &variants, None);
            bench_case(case(op, 1024, 1024, 0.05, 128), &variants, None);
        }
        bench_case(
            case(Op::DenseGrad, 300, 784, 0.05, 100),
            &variants[..2],
            None,
        );
        bench_case(case(spmm, 4096, 4096, 0.05, 128), &variants[..3], None);
    }
}
