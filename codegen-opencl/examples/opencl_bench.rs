//! Measures the OpenCL strategies on the first OpenCL device (PoCL here): the compile time
//! (emit + build + first launch) of `table` for 50k-nonzero patterns, and the median kernel
//! time (profiling events, no transfers) of `spmm` with each strategy.
//!
//! ```text
//! POCL_KERNEL_CACHE=0 cargo run --release -p codegen-opencl --features opencl \
//!     --example opencl_bench [-- --unrolled] [--reps N]
//! ```
//!
//! `POCL_KERNEL_CACHE=0` keeps PoCL from answering a build from its on-disk cache;
//! `POCL_MAX_PTHREAD_COUNT=1` gives single-threaded figures. `--unrolled` adds the unrolled
//! strategy (its build takes minutes on PoCL), up to 60k nonzeros.

use std::sync::Arc;
use std::time::Duration;

use codegen_opencl::{OpenClBackend, OpenClKernel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Device buffers for one `spmm` launch.
struct Operands {
    values: codegen_opencl::DeviceBuffer,
    x: codegen_opencl::DeviceBuffer,
    bias: codegen_opencl::DeviceBuffer,
    y: codegen_opencl::DeviceBuffer,
}

fn operands(backend: &OpenClBackend, p: &Pattern, launch: Launch) -> Operands {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut fill = |n: usize| {
        let host: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut buf = backend.alloc(n).unwrap();
        backend.upload(&host, &mut buf).unwrap();
        buf
    };
    Operands {
        values: fill(p.nnz()),
        x: fill(p.cols() * launch.ld),
        bias: fill(p.rows()),
        y: backend.alloc(p.rows() * launch.ld).unwrap(),
    }
}

/// One run; returns the device time in microseconds.
fn run(kernel: &OpenClKernel, o: &mut Operands, launch: Launch) -> f64 {
    let has_bias = matches!(kernel.spec().op(), Op::Spmm { bias: true, .. });
    let args = Args::Spmm {
        values: &o.values,
        x: &o.x,
        bias: has_bias.then_some(&o.bias),
        y: &mut o.y,
    };
    kernel.run(launch, args).unwrap();
    kernel.last_kernel_time().as_secs_f64() * 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let unrolled = args.iter().any(|a| a == "--unrolled");
    let reps: usize = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse().expect("--reps N"))
        .unwrap_or(50);
    let backend = OpenClBackend::first().expect("an OpenCL device");
    println!(
        "device: {} ({} compute units); POCL_KERNEL_CACHE={:?} POCL_MAX_PTHREAD_COUNT={:?}",
        backend.info().describe(),
        backend.info().compute_units,
        std::env::var("POCL_KERNEL_CACHE").ok(),
        std::env::var("POCL_MAX_PTHREAD_COUNT").ok(),
    );
    // the platform's one-time start-up is not part of any kernel's build
    let warm = KernelSpec::any_batch("warm", Op::SPMM, Arc::new(Pattern::dense(2, 2).unwrap()));
    backend.compile(&warm.unwrap(), Strategy::Table).unwrap();

    println!("\n== table compile time, 50k nonzeros (1000 x 1000 at 5 %, batch 128) ==");
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        let mut totals = Vec::new();
        for seed in 0..3 {
            let big = Arc::new(
                Pattern::random(1000, 1000, 0.05, 100 + seed).expect("a valid random pattern"),
            );
            let spec =
                KernelSpec::new("big", op, big.clone(), Dim::Fixed(128), Dim::Fixed(128)).unwrap();
            let k = backend.compile(&spec, Strategy::Table).unwrap();
            let r = k.report();
            println!(
                "table {:<8} nnz {:>6}: compile {:>7.1} ms = emit {:>5.1} + build {:>6.1} + first launch {:>6.1} ({} program, {} KB source)",
                op.to_string(),
                big.nnz(),
                ms(r.compile_time()),
                ms(r.emit),
                ms(r.build),
                ms(r.first_launch),
                r.programs,
                r.source_bytes / 1024
            );
            totals.push(ms(r.compile_time()));
        }
        println!(
            "table {:<8} median compile {:.1} ms",
            op.to_string(),
            median(totals)
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
    println!("\n== spmm(bias,relu): median kernel time of {reps} interleaved runs ==");
    println!(
        "{:<20} {:<9} {:>7} {:>11} {:>10} {:>7} {:>9}",
        "case", "strategy", "nnz", "compile_ms", "median_us", "gflops", "vs_csr"
    );
    for (name, rows, cols, density, batch, ld) in cases {
        let p = Arc::new(Pattern::random(rows, cols, density, 7).expect("a valid random pattern"));
        let op = Op::Spmm {
            bias: true,
            relu: true,
        };
        let spec = KernelSpec::new("fc", op, p.clone(), Dim::Fixed(batch), Dim::Fixed(ld)).unwrap();
        let launch = Launch::new(batch, ld);
        // unrolled builds take minutes on PoCL: not beyond 60k nonzeros
        let kernels: Vec<OpenClKernel> = strategies
            .iter()
            .filter(|&&s| s != Strategy::Unrolled || p.nnz() <= 60_000)
            .map(|&s| backend.compile(&spec, s).unwrap())
            .collect();
        let mut o = operands(&backend, &p, launch);
        let mut times = vec![Vec::new(); kernels.len()];
        for _ in 0..reps {
            for (k, t) in kernels.iter().zip(&mut times) {
                t.push(run(k, &mut o, launch));
            }
        }
        let medians: Vec<f64> = times.into_iter().map(median).collect();
        for (k, &us) in kernels.iter().zip(&medians) {
            println!(
                "{name:<20} {:<9} {:>7} {:>11.1} {:>10.1} {:>7.2} {:>8.2}x",
                k.strategy().name(),
                p.nnz(),
                ms(k.report().compile_time()),
                us,
                2.0 * p.nnz() as f64 * batch as f64 / (us * 1e3),
                medians[0] / us
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
