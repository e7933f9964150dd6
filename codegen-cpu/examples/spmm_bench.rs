//! A quick measurement of the generic and dense strategies (not the full `kernel-bench`).
//!
//! ```sh
//! cargo run --release -p codegen-cpu --example spmm_bench            # spmm cases, 1 thread
//! cargo run --release -p codegen-cpu --example spmm_bench -- --all   # + ISA levels, 2 threads, other ops, 4096²
//! cargo run --release -p codegen-cpu --example spmm_bench -- --big   # generic on 4096² and misaligned X only
//! cargo run --release -p codegen-cpu --example spmm_bench -- --offsets  # 300×784 batch 8, X 0/16/32/48 bytes off a cache line
//! ```
//!
//! Every variant of a case is timed with `kernel_timing` (the project's one timing loop, as
//! `kernel-bench` times: interleaved rounds of warm samples, paired medians), with the useful
//! GFLOP/s `2·nnz·batch / time`.
//! Patterns are uniformly random; `ld` is the batch rounded up to 16 floats, or 1 at batch 1
//! (as the runtime allocates), buffers are plain `Vec<f32>` (not specially aligned).

use std::sync::Arc;

use codegen_cpu::{CpuBackend, CpuKernel, CpuOptions, IsaLevel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

struct Variant {
    name: String,
    kernel: CpuKernel,
}

/// Each entry present with probability `density` ([`Pattern::random`]).
fn pattern(rows: usize, cols: usize, density: f64, seed: u64) -> Pattern {
    Pattern::random(rows, cols, density, seed).expect("a valid random pattern")
}

struct Buffers {
    values: Vec<f32>,
    bias: Vec<f32>,
    /// `X` lives at `x[x_start..]`, aligned to 64 bytes plus the requested offset.
    x: Vec<f32>,
    x_start: usize,
    dy: Vec<f32>,
    out: Vec<f32>,
}

/// The first index of a `Vec<f32>` at a 64-byte boundary, plus `offset` floats.
fn aligned_start(v: &[f32], offset: usize) -> usize {
    (16 - (v.as_ptr() as usize / 4) % 16) % 16 + offset
}

impl Clone for Buffers {
    /// A copy whose `X` sits at the same offset from a cache line as the original's.
    fn clone(&self) -> Buffers {
        let offset = (self.x[self.x_start..].as_ptr() as usize / 4) % 16;
        let len = self.x.len() - self.x_start;
        let mut x = vec![0.0f32; len + 32];
        let x_start = aligned_start(&x, offset);
        x[x_start..x_start + len].copy_from_slice(&self.x[self.x_start..]);
        Buffers {
            values: self.values.clone(),
            bias: self.bias.clone(),
            x,
            x_start,
            dy: self.dy.clone(),
            out: self.out.clone(),
        }
    }
}

fn run_once(k: &CpuKernel, launch: Launch, b: &mut Buffers) {
    let args: Args<'_, [f32]> = match k.spec().op() {
        Op::Spmm { bias, .. } => Args::Spmm {
            values: &b.values,
            x: &b.x[b.x_start..],
            bias: bias.then_some(&b.bias[..]),
            y: &mut b.out,
        },
        Op::SpmmT => Args::SpmmT {
            values: &b.values,
            dy: &b.dy,
            dx: &mut b.out,
        },
        Op::Sddmm => Args::Sddmm {
            dy: &b.dy,
            x: &b.x[b.x_start..],
            dw: &mut b.out,
        },
        Op::DenseGrad => Args::DenseGrad {
            dy: &b.dy,
            x: &b.x[b.x_start..],
            grad: &mut b.out,
        },
    };
    k.run(launch, args).unwrap();
}

#[allow(clippy::too_many_arguments)]
fn bench_case(
    op: Op,
    rows: usize,
    cols: usize,
    density: f64,
    batch: usize,
    variants: &[(String, &CpuBackend, Strategy)],
    rounds: usize,
    x_offset: usize,
) {
    let p = Arc::new(pattern(rows, cols, density, 42));
    let ld = if batch == 1 {
        1
    } else {
        batch.next_multiple_of(16)
    };
    let launch = Launch::new(batch, ld);
    let spec = KernelSpec::new(
        "bench",
        op,
        Arc::clone(&p),
        Dim::Fixed(batch),
        Dim::Fixed(ld),
    )
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut fill = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let out_len = rows.max(cols) * ld + rows * cols + p.nnz();
    let mut x = vec![0.0f32; cols * ld + 32];
    let x_start = aligned_start(&x, x_offset);
    let x_data = fill(cols * ld);
    x[x_start..x_start + cols * ld].copy_from_slice(&x_data);
    let mut b = Buffers {
        values: fill(p.nnz()),
        bias: fill(rows),
        x,
        x_start,
        dy: fill(rows * ld),
        out: vec![0.0; out_len],
    };
    // `out` must have exactly the op's length for sddmm and dense_grad.
    b.out.truncate(match op {
        Op::Spmm { .. } => rows * ld,
        Op::SpmmT => cols * ld,
        Op::Sddmm => p.nnz(),
        Op::DenseGrad => rows * cols,
    });
    let vs: Vec<Variant> = variants
        .iter()
        .map(|(name, backend, strategy)| Variant {
            name: name.clone(),
            kernel: backend.compile(&spec, *strategy).unwrap(),
        })
        .collect();
    // Every variant on its own operands (as kernel-bench runs them): one variant's output
    // must not be the next one's cache state.
    let mut buffers: Vec<Buffers> = vs.iter().map(|_| b.clone()).collect();
    let mut closures: Vec<Box<dyn FnMut() -> Result<(), ()> + '_>> = vs
        .iter()
        .zip(buffers.iter_mut())
        .map(|(v, b)| {
            let k = &v.kernel;
            Box::new(move || {
                run_once(k, launch, b);
                Ok(())
            }) as Box<dyn FnMut() -> Result<(), ()> + '_>
        })
        .collect();
    let mut refs: Vec<kernel_timing::Run<'_, ()>> =
        closures.iter_mut().map(|c| &mut **c as _).collect();
    let medians = kernel_timing::interleaved(
        &mut refs,
        &kernel_timing::Config::benchmark(std::time::Duration::ZERO, rounds),
    )
    .expect("the runs do not fail")
    .us;
    drop(refs);
    drop(closures);
    let flops = 2.0 * p.nnz() as f64 * batch as f64;
    println!(
        "{op} {rows}x{cols} density {density} nnz {} batch {batch} ld {ld}{}:",
        p.nnz(),
        if x_offset > 0 {
            format!(" (X misaligned by {x_offset} floats)")
        } else {
            String::new()
        }
    );
    for (v, us) in vs.iter().zip(medians) {
        let chose = if v.kernel.strategy() != Strategy::Generic && v.name.starts_with("auto") {
            format!(" -> {}", v.kernel.strategy())
        } else if v.name.starts_with("auto") {
            " -> generic".to_string()
        } else {
            String::new()
        };
        println!(
            "  {:<24} {:>10.2} µs  {:>7.2} GFLOP/s{chose}",
            v.name,
            us,
            flops / us / 1e3
        );
    }
}

fn main() {
    let all = std::env::args().any(|a| a == "--all");
    let big = std::env::args().any(|a| a == "--big");
    let rounds = 15;
    let mk = |threads, isa| {
        CpuBackend::new(CpuOptions {
            threads,
            isa: Some(isa),
        })
        .unwrap()
    };
    let best = IsaLevel::detect();
    let b1 = mk(1, best);
    let b2 = mk(2, best);
    let avx2 = mk(1, IsaLevel::Avx2Fma.min(best));
    let portable = mk(1, IsaLevel::Portable);
    let mut variants: Vec<(String, &CpuBackend, Strategy)> = vec![
        (format!("generic {best} 1t"), &b1, Strategy::Generic),
        ("dense 1t".into(), &b1, Strategy::Dense),
        ("auto 1t".into(), &b1, Strategy::Auto),
    ];
    if all {
        variants.push(("generic avx2 1t".into(), &avx2, Strategy::Generic));
        variants.push(("generic portable 1t".into(), &portable, Strategy::Generic));
        variants.push((format!("generic {best} 2t"), &b2, Strategy::Generic));
        variants.push(("dense 2t".into(), &b2, Strategy::Dense));
    }
    let spmm = Op::SPMM;
    if std::env::args().any(|a| a == "--offsets") {
        // Where a buffer starts within a cache line, twice over.
        for x_offset in [0, 4, 8, 12, 0, 4, 8, 12] {
            bench_case(spmm, 300, 784, 0.05, 8, &variants[..1], rounds, x_offset);
        }
        return;
    }
    if big {
        bench_case(spmm, 1024, 1024, 0.05, 128, &variants[..1], rounds, 4);
        bench_case(spmm, 4096, 4096, 0.05, 128, &variants[..1], 7, 0);
        bench_case(Op::SpmmT, 4096, 4096, 0.05, 128, &variants[..1], 7, 0);
        bench_case(Op::Sddmm, 4096, 4096, 0.05, 128, &variants[..1], 7, 0);
        return;
    }
    bench_case(spmm, 1024, 1024, 0.05, 128, &variants, rounds, 0);
    bench_case(spmm, 300, 784, 0.05, 1, &variants, rounds, 0);
    bench_case(spmm, 300, 784, 0.05, 8, &variants, rounds, 0);
    bench_case(spmm, 300, 784, 0.05, 100, &variants, rounds, 0);
    bench_case(spmm, 100, 300, 0.05, 100, &variants, rounds, 0);
    if all {
        bench_case(spmm, 1024, 1024, 0.05, 128, &variants[..1], rounds, 4);
        bench_case(spmm, 300, 784, 0.05, 100, &variants[..1], rounds, 4);
        bench_case(spmm, 10, 100, 0.05, 100, &variants, rounds, 0);
        bench_case(spmm, 100, 300, 0.05, 1, &variants, rounds, 0);
        bench_case(spmm, 300, 784, 0.2, 100, &variants, rounds, 0);
        bench_case(spmm, 300, 784, 0.5, 100, &variants, rounds, 0);
        for op in [Op::SpmmT, Op::Sddmm] {
            bench_case(op, 300, 784, 0.05, 100, &variants, rounds, 0);
            bench_case(op, 100, 300, 0.05, 100, &variants, rounds, 0);
            bench_case(op, 300, 784, 0.05, 1, &variants, rounds, 0);
            bench_case(op, 1024, 1024, 0.05, 128, &variants, rounds, 0);
        }
        bench_case(
            Op::DenseGrad,
            300,
            784,
            0.05,
            100,
            &variants[..2],
            rounds,
            0,
        );
        bench_case(spmm, 4096, 4096, 0.05, 128, &variants[..3], 7, 0);
    }
}
