//! Runs one generic convolution kernel in a loop and prints its time, for profiling
//! (`perf record`) and for comparing kernel settings across processes:
//! `conv_probe IN OUT HW [STRIDE] [SECONDS] [conv|conv_t|conv_grad] [DENSITY]` runs a 3×3
//! convolution with padding 1 on `IN` planes of `HW`×`HW` into `OUT` planes, batch 128,
//! at `DENSITY` (default 0.05), one thread.

use std::sync::Arc;
use std::time::Instant;

use codegen_cpu::{CpuBackend, CpuOptions};
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{AlignedVec, Args, ConvGeometry, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (c, o, hw): (usize, usize, usize) =
        (arg(&args, 1, 128), arg(&args, 2, 128), arg(&args, 3, 32));
    let stride: usize = arg(&args, 4, 1);
    let seconds: f64 = arg(&args, 5, 2.0);
    let op = match args.get(6).map(String::as_str) {
        Some("conv_t") => Op::ConvT,
        Some("conv_grad") => Op::ConvGrad,
        _ => Op::Conv {
            bias: true,
            relu: true,
        },
    };
    let backend = CpuBackend::new(CpuOptions {
        threads: 1,
        isa: None,
    })
    .expect("backend");
    let g = ConvGeometry {
        in_channels: c,
        height: hw,
        width: hw,
        kernel: 3,
        stride,
        padding: 1,
    };
    let density: f64 = arg(&args, 7, 0.05);
    let pattern = Arc::new(Pattern::random(o, c * 9, density, 7).expect("pattern"));
    let batch = 128;
    let spec = KernelSpec::conv(
        "probe",
        op,
        Arc::clone(&pattern),
        g,
        Dim::Fixed(batch),
        Dim::Fixed(batch),
    )
    .expect("spec");
    let kernel = backend.compile(&spec, Strategy::Generic).expect("kernel");
    let x = AlignedVec::filled(spec.in_features() * batch, 0.5);
    let dy = AlignedVec::filled(spec.out_features() * batch, 0.25);
    let values = vec![0.1f32; pattern.nnz()];
    let bias = vec![0.0f32; o];
    let mut out = AlignedVec::zeros(match op {
        Op::ConvT => spec.in_features() * batch,
        Op::ConvGrad => pattern.nnz(),
        _ => spec.out_features() * batch,
    });
    let launch = Launch::new(batch, batch);
    let mut run = || {
        let args = match op {
            Op::ConvT => Args::SpmmT {
                values: &values[..],
                dy: &dy[..],
                dx: &mut out[..],
            },
            Op::ConvGrad => Args::Sddmm {
                dy: &dy[..],
                x: &x[..],
                dw: &mut out[..],
            },
            _ => Args::Spmm {
                values: &values[..],
                x: &x[..],
                bias: Some(&bias[..]),
                y: &mut out[..],
            },
        };
        kernel.run(launch, args).expect("run");
    };
    run();
    let start = Instant::now();
    let mut runs = 0;
    while start.elapsed().as_secs_f64() < seconds {
        run();
        runs += 1;
    }
    let each = start.elapsed().as_secs_f64() / runs as f64;
    let positions = g.out_height() * g.out_width();
    let flops = 2.0 * pattern.nnz() as f64 * (positions * batch) as f64;
    println!(
        "{runs} runs, {:.1} us each, {:.1} useful GFLOP/s",
        each * 1e6,
        flops / each / 1e9
    );
}
