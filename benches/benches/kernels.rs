//! Criterion benches of the CPU kernels: every op on the LeNet-300-100 layer shapes at 5 %,
//! batch 1, 8 and 100, each strategy (`generic`, `dense`, `jit`, and `auto`, the planner's
//! pick) beside dense GEMM of the same shape (XNNPACK's habit: a sparse kernel's number means
//! little without the dense one next to it), plus `spmm` on 1024×1024 at batch 128.
//!
//! ```sh
//! cargo bench -p benches --bench kernels                 # everything (about 4 minutes)
//! cargo bench -p benches --bench kernels -- 'spmm/300x784'  # a filter
//! ```
//!
//! Throughput is reported as useful floating-point operations (`2·nnz·batch` per run; the
//! GEMM row counts its own `2·rows·cols·batch`). `kernel-bench` is the suite runner with the
//! interleaved medians and the JSON of CONTRACTS.md; these benches are for criterion's
//! statistics and change detection between commits.

use std::sync::Arc;
use std::time::Duration;

use benches::{case_spec, Case, Operands};
use codegen_cpu::{CpuBackend, CpuOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sparse_ir::backend::Backend;
use sparse_ir::{Launch, Pattern, Strategy};

/// The cases: the `quick` suite of `kernel-bench` at 5 % (each op on the three LeNet-300-100
/// layers at batch 1, 8 and 100, and `spmm` on 1024² at batch 128).
fn cases() -> Vec<Case> {
    benches::quick_suite()
        .into_iter()
        .filter(|c| c.density == 0.05)
        .collect()
}

fn kernels(c: &mut Criterion) {
    let backend = CpuBackend::new(CpuOptions {
        threads: 1,
        isa: None,
    })
    .expect("the CPU backend");
    for case in cases() {
        let pattern = Arc::new(case.pattern());
        let launch = Launch::new(case.batch, case.ld());
        let spec = case_spec(&case, Arc::clone(&pattern));
        let mut group = c.benchmark_group(format!(
            "{}/{}x{}/b{}",
            case.op.name(),
            case.rows,
            case.cols,
            case.batch
        ));
        group
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(30);
        group.throughput(Throughput::Elements(
            2 * pattern.nnz() as u64 * case.batch as u64,
        ));
        for strategy in [
            Strategy::Generic,
            Strategy::Dense,
            Strategy::Jit,
            Strategy::Auto,
        ] {
            let kernel = backend
                .compile(&spec, strategy)
                .expect("every CPU strategy compiles a LeNet-sized fixed-shape spec");
            let mut operands =
                Operands::new(&backend, &case, &pattern, case.seed()).expect("operands");
            let name = match strategy {
                Strategy::Auto => {
                    format!("auto ({})", sparse_ir::backend::Kernel::strategy(&kernel))
                }
                s => s.to_string(),
            };
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| operands.run(&kernel, launch).expect("run"))
            });
        }
        let dense = Arc::new(Pattern::dense(case.rows, case.cols).expect("a dense pattern"));
        let gemm = backend
            .compile(&case_spec(&case, Arc::clone(&dense)), Strategy::Dense)
            .expect("dense GEMM");
        let mut operands = Operands::new(&backend, &case, &dense, case.seed()).expect("operands");
        group.throughput(Throughput::Elements(
            2 * (case.rows * case.cols * case.batch) as u64,
        ));
        group.bench_function(BenchmarkId::from_parameter("gemm (dense pattern)"), |b| {
            b.iter(|| operands.run(&gemm, launch).expect("run"))
        });
        group.finish();
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
