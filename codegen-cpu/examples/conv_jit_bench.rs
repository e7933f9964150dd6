//! The JIT's convolutions against the generic convolution kernels, single thread: medians of
//! interleaved runs (`kernel_timing::interleaved`, ~0.5 s per comparison).
//!
//! `cargo run --release -p codegen-cpu --example conv_jit_bench`

use std::sync::Arc;
use std::time::Duration;

use codegen_cpu::{CpuBackend, CpuOptions};
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{Args, ConvGeometry, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

fn main() {
    let backend = CpuBackend::new(CpuOptions {
        threads: 1,
        isa: None,
    })
    .expect("backend");
    let layers = [
        (
            "lenet conv2 6->16 5x5 12x12 5%",
            16,
            ConvGeometry {
                in_channels: 6,
                height: 12,
                width: 12,
                kernel: 5,
                stride: 1,
                padding: 0,
            },
        ),
        (
            "64->64 3x3 32x32 p1 5%",
            64,
            ConvGeometry {
                in_channels: 64,
                height: 32,
                width: 32,
                kernel: 3,
                stride: 1,
                padding: 1,
            },
        ),
    ];
    println!("layer | op | batch | ld | generic us | jit us | generic/jit | jit compile ms | jit code KiB");
    for (name, out, g) in layers {
        let cols = g.in_channels * g.kernel * g.kernel;
        let pattern = Arc::new(Pattern::random(out, cols, 0.05, 7).expect("pattern"));
        for op in [
            Op::Conv {
                bias: true,
                relu: true,
            },
            Op::ConvT,
            Op::ConvGrad,
        ] {
            for (batch, ld) in [(1, 1), (8, 16), (100, 112), (128, 128)] {
                let spec = KernelSpec::conv(
                    "bench",
                    op,
                    Arc::clone(&pattern),
                    g,
                    Dim::Fixed(batch),
                    Dim::Fixed(ld),
                )
                .expect("spec");
                let generic = backend.compile(&spec, Strategy::Generic).expect("generic");
                let jit = backend.compile(&spec, Strategy::Jit).expect("jit");
                let stats = jit.jit().expect("a JIT kernel").stats().clone();
                let x: Vec<f32> = (0..spec.in_features() * ld)
                    .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                    .collect();
                let dy: Vec<f32> = (0..spec.out_features() * ld)
                    .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
                    .collect();
                let values: Vec<f32> = (0..pattern.nnz()).map(|i| (i % 13) as f32 * 0.1).collect();
                let bias: Vec<f32> = (0..out).map(|i| i as f32 * 0.01).collect();
                let launch = Launch::new(batch, ld);
                let out_len = match op {
                    Op::ConvGrad => pattern.nnz(),
                    Op::ConvT => spec.in_features() * ld,
                    _ => spec.out_features() * ld,
                };
                let mut out_g = vec![0.0f32; out_len];
                let mut out_j = vec![0.0f32; out_len];
                let run = |k: &codegen_cpu::CpuKernel, o: &mut [f32]| -> Result<(), String> {
                    let args = match op {
                        Op::Conv { .. } => Args::Spmm {
                            values: &values[..],
                            x: &x[..],
                            bias: Some(&bias[..]),
                            y: o,
                        },
                        Op::ConvT => Args::SpmmT {
                            values: &values[..],
                            dy: &dy[..],
                            dx: o,
                        },
                        _ => Args::Sddmm {
                            dy: &dy[..],
                            x: &x[..],
                            dw: o,
                        },
                    };
                    k.run(launch, args).map_err(|e| e.to_string())
                };
                let mut rg = || run(&generic, &mut out_g);
                let mut rj = || run(&jit, &mut out_j);
                let t = kernel_timing::interleaved(
                    &mut [&mut rg, &mut rj],
                    &kernel_timing::Config::benchmark(Duration::from_millis(500), 5),
                )
                .expect("runs");
                println!(
                    "{name} | {} | {batch} | {ld} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1}",
                    op.name(),
                    t.us[0],
                    t.us[1],
                    t.us[0] / t.us[1],
                    stats.compile_ms,
                    stats.code_bytes as f64 / 1024.0
                );
            }
        }
    }
}
