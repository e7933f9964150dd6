//! Measures the OpenCL strategies on the first OpenCL device (PoCL here): compile time
//! (emit + build + first launch) and the median kernel time (profiling events, no
//! transfers) of each strategy, for a few `spmm` cases and a 50k-nonzero `table` build.
//!
//! `cargo run --release -p codegen-opencl --features opencl --example opencl_bench [-- --unrolled]`

use std::sync::Arc;
use std::time::Duration;

use codegen_opencl::{OpenClBackend, OpenClKernel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

fn random_pattern(rows: usize, cols: usize, density: f64, seed: u64) -> Pattern {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mask: Vec<u8> = (0..rows * cols)
        .map(|_| u8::from(rng.random_bool(density)))
        .collect();
    Pattern::from_dense_mask(rows, cols, &mask).unwrap()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median device time of `reps` runs of a `spmm` kernel, in microseconds.
fn time_spmm(backend: &OpenClBackend, kernel: &OpenClKernel, launch: Launch, reps: usize) -> f64 {
    let p = kernel.spec().pattern();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let host: Vec<f32> = (0..p.cols() * launch.ld)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut x = backend.alloc(host.len()).unwrap();
    backend.upload(&host, &mut x).unwrap();
    let mut values = backend.alloc(p.nnz()).unwrap();
    backend.upload(&vec![0.5; p.nnz()], &mut values).unwrap();
    let bias = backend.alloc(p.rows()).unwrap();
    let mut y = backend.alloc(p.rows() * launch.ld).unwrap();
    let has_bias = matches!(kernel.spec().op(), Op::Spmm { bias: true, .. });
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let args = Args::Spmm {
            values: &values,
            x: &x,
            bias: has_bias.then_some(&bias),
            y: &mut y,
        };
        kernel.run(launch, args).unwrap();
        times.push(kernel.last_kernel_time().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let unrolled = std::env::args().any(|a| a == "--unrolled");
    let backend = OpenClBackend::first().expect("an OpenCL device");
    println!("device: {}", backend.info().describe());

    // table build time for a 50k-nonzero pattern (1000 x 1000 at 5 %)
    let big = Arc::new(random_pattern(1000, 1000, 0.05, 5));
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        let spec =
            KernelSpec::new("big", op, big.clone(), Dim::Fixed(128), Dim::Fixed(128)).unwrap();
        let k = backend.compile(&spec, Strategy::Table).unwrap();
        let r = k.report();
        println!(
            "table {op:<8} nnz {:>6}: compile {:>7.1} ms = emit {:.1} + build {:.1} + first launch {:.1} ({} program(s), {} KB source)",
            big.nnz(),
            ms(r.compile_time()),
            ms(r.emit),
            ms(r.build),
            ms(r.first_launch),
            r.programs,
            r.source_bytes / 1024
        );
    }

    let cases = [
        ("300x784 b100 5%", 300, 784, 0.05, 100usize, 112usize),
        ("1024x1024 b128 5%", 1024, 1024, 0.05, 128, 128),
        ("1024x1024 b128 10%", 1024, 1024, 0.10, 128, 128),
    ];
    let mut strategies = vec![Strategy::Csr, Strategy::Table];
    if unrolled {
        strategies.push(Strategy::Unrolled);
    }
    println!(
        "\n{:<20} {:<9} {:>8} {:>12} {:>12} {:>8}",
        "case", "strategy", "nnz", "compile_ms", "median_us", "gflops"
    );
    for (name, rows, cols, density, batch, ld) in cases {
        let p = Arc::new(random_pattern(rows, cols, density, 7));
        let op = Op::Spmm {
            bias: true,
            relu: true,
        };
        let spec = KernelSpec::new("fc", op, p.clone(), Dim::Fixed(batch), Dim::Fixed(ld)).unwrap();
        for &strategy in &strategies {
            let k = backend.compile(&spec, strategy).unwrap();
            let us = time_spmm(&backend, &k, Launch::new(batch, ld), 30);
            println!(
                "{name:<20} {strategy:<9} {:>8} {:>12.1} {:>12.1} {:>8.2}",
                p.nnz(),
                ms(k.report().compile_time()),
                us,
                2.0 * p.nnz() as f64 * batch as f64 / (us * 1e3)
            );
        }
    }
    let s = backend.stats();
    println!(
        "\nstats: {} launches, kernel {:.1} ms, transfers {:.1} ms, {} programs built in {:.1} ms",
        s.launches,
        s.kernel_ns as f64 / 1e6,
        s.transfer_ns as f64 / 1e6,
        s.programs_built,
        s.build_ns as f64 / 1e6
    );
}
