//! Differential tests on the first OpenCL device (PoCL here): every op and every strategy
//! against the interpreter (`sparse_ir::interp`), on named edge cases and random patterns.
//!
//! Inputs carry NaN in their padding columns (`batch..ld`) and outputs start as NaN, so a
//! kernel that reads past the batch or leaves an element unwritten fails the comparison.
//! Each case builds programs (PoCL: a fraction of a second each), so case counts are small.
#![cfg(feature = "opencl")]

mod common;

use std::sync::Arc;

use codegen_opencl::{DeviceBuffer, DeviceKind, OpenClBackend, OpenClKernel};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::interp::{compare, reference};
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

/// A pattern with about `density` of its entries, from `seed`.
fn random_pattern(rows: usize, cols: usize, density: f64, seed: u64) -> Pattern {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mask: Vec<u8> = (0..rows * cols)
        .map(|_| u8::from(rng.random_bool(density)))
        .collect();
    Pattern::from_dense_mask(rows, cols, &mask).unwrap()
}

/// The named edge cases: (name, pattern).
fn named_patterns() -> Vec<(&'static str, Pattern)> {
    // empty rows 0 and 4, empty columns 2 and 10
    let base = random_pattern(9, 11, 0.5, 1);
    let mut mask = base.to_dense_mask();
    for r in [0, 4] {
        mask[r * 11..(r + 1) * 11].fill(0);
    }
    for r in 0..9 {
        mask[r * 11 + 2] = 0;
        mask[r * 11 + 10] = 0;
    }
    let empty_rows_cols = Pattern::from_dense_mask(9, 11, &mask).unwrap();
    // a fully dense row 2 among sparse ones
    let mut mask = random_pattern(6, 40, 0.1, 2).to_dense_mask();
    mask[2 * 40..3 * 40].fill(1);
    let dense_row = Pattern::from_dense_mask(6, 40, &mask).unwrap();
    vec![
        ("empty rows and columns", empty_rows_cols),
        ("one nonzero", Pattern::from_coo(5, 6, &[(2, 3)]).unwrap()),
        ("all-zero", Pattern::empty(4, 5).unwrap()),
        ("fully dense row", dense_row),
        ("7x96", random_pattern(7, 96, 0.2, 3)),
    ]
}

/// Host data: `rows × ld` with values in the batch columns and NaN in the padding.
fn matrix(rng: &mut ChaCha8Rng, rows: usize, launch: Launch) -> Vec<f32> {
    (0..rows * launch.ld)
        .map(|i| {
            if i % launch.ld < launch.batch {
                rng.random_range(-1.0f32..1.0)
            } else {
                f32::NAN
            }
        })
        .collect()
}

fn vector(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn upload(backend: &OpenClBackend, data: &[f32]) -> DeviceBuffer {
    let mut buffer = backend.alloc(data.len()).unwrap();
    backend.upload(data, &mut buffer).unwrap();
    buffer
}

fn download(backend: &OpenClBackend, buffer: &DeviceBuffer) -> Vec<f32> {
    let mut out = vec![0.0; buffer.len()];
    backend.download(buffer, &mut out).unwrap();
    out
}

/// Runs `kernel` on random data at `launch` and compares with the interpreter.
fn check_kernel(backend: &OpenClBackend, kernel: &OpenClKernel, launch: Launch, seed: u64) {
    let spec = kernel.spec();
    let p = spec.pattern();
    let what = format!(
        "layer {} {} {} on {}x{} nnz {} batch {} ld {}",
        spec.layer(),
        spec.op(),
        kernel.strategy(),
        p.rows(),
        p.cols(),
        p.nnz(),
        launch.batch,
        launch.ld
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (rows, cols, nnz) = (p.rows(), p.cols(), p.nnz());
    let (want, got) = match spec.op() {
        Op::Spmm { bias, .. } => {
            let values = vector(&mut rng, nnz);
            let x = matrix(&mut rng, cols, launch);
            let b = bias.then(|| vector(&mut rng, rows));
            let mut scratch = vec![0.0; rows * launch.ld];
            let want = reference(
                spec,
                launch,
                &Args::Spmm {
                    values: &values,
                    x: &x,
                    bias: b.as_deref(),
                    y: &mut scratch,
                },
            )
            .unwrap();
            let (dv, dx) = (upload(backend, &values), upload(backend, &x));
            let db = b.as_deref().map(|b| upload(backend, b));
            let mut dy = upload(backend, &vec![f32::NAN; rows * launch.ld]);
            let args = Args::Spmm {
                values: &dv,
                x: &dx,
                bias: db.as_ref(),
                y: &mut dy,
            };
            kernel
                .run(launch, args)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            (want, download(backend, &dy))
        }
        Op::SpmmT => {
            let values = vector(&mut rng, nnz);
            let dy = matrix(&mut rng, rows, launch);
            let mut scratch = vec![0.0; cols * launch.ld];
            let want = reference(
                spec,
                launch,
                &Args::SpmmT {
                    values: &values,
                    dy: &dy,
                    dx: &mut scratch,
                },
            )
            .unwrap();
            let (dv, ddy) = (upload(backend, &values), upload(backend, &dy));
            let mut ddx = upload(backend, &vec![f32::NAN; cols * launch.ld]);
            let args = Args::SpmmT {
                values: &dv,
                dy: &ddy,
                dx: &mut ddx,
            };
            kernel
                .run(launch, args)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            (want, download(backend, &ddx))
        }
        Op::Sddmm | Op::DenseGrad => {
            let dy = matrix(&mut rng, rows, launch);
            let x = matrix(&mut rng, cols, launch);
            let out_len = if spec.op() == Op::Sddmm {
                nnz
            } else {
                rows * cols
            };
            let mut scratch = vec![0.0; out_len];
            let host: Args<'_, [f32]> = if spec.op() == Op::Sddmm {
                Args::Sddmm {
                    dy: &dy,
                    x: &x,
                    dw: &mut scratch,
                }
            } else {
                Args::DenseGrad {
                    dy: &dy,
                    x: &x,
                    grad: &mut scratch,
                }
            };
            let want = reference(spec, launch, &host).unwrap();
            let (ddy, dx) = (upload(backend, &dy), upload(backend, &x));
            let mut out = upload(backend, &vec![f32::NAN; out_len]);
            let args = if spec.op() == Op::Sddmm {
                Args::Sddmm {
                    dy: &ddy,
                    x: &dx,
                    dw: &mut out,
                }
            } else {
                Args::DenseGrad {
                    dy: &ddy,
                    x: &dx,
                    grad: &mut out,
                }
            };
            kernel
                .run(launch, args)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            (want, download(backend, &out))
        }
    };
    if let Err(m) = compare(&want, &got, launch.ld) {
        panic!("{what}: {m}");
    }
}

fn compile(backend: &OpenClBackend, spec: &KernelSpec, strategy: Strategy) -> OpenClKernel {
    let kernel = backend.compile(spec, strategy).unwrap_or_else(|e| {
        panic!(
            "compiling layer {} {} with {strategy}: {e}",
            spec.layer(),
            spec.op()
        )
    });
    if strategy != Strategy::Auto {
        assert_eq!(kernel.strategy(), strategy);
    }
    kernel
}

/// Every op of `pattern` with `strategy`, compiled for any batch and run at each launch; and
/// every other op (which ones alternates with `seed`) also compiled for the first launch's
/// fixed batch and `ld` (every build costs PoCL a fraction of a second).
fn check_pattern(
    backend: &OpenClBackend,
    name: &str,
    pattern: Pattern,
    strategy: Strategy,
    launches: &[Launch],
    seed: u64,
) {
    let pattern = Arc::new(pattern);
    let layer = name.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    for (i, op) in Op::ALL.into_iter().enumerate() {
        let spec = KernelSpec::any_batch(format!("l{layer}"), op, pattern.clone()).unwrap();
        let kernel = compile(backend, &spec, strategy);
        for (j, &launch) in launches.iter().enumerate() {
            check_kernel(backend, &kernel, launch, seed ^ (i * 100 + j) as u64);
        }
        if (i as u64 + seed) % 2 == 1 {
            continue;
        }
        let l = launches[0];
        let fixed = KernelSpec::new(
            format!("f{layer}"),
            op,
            pattern.clone(),
            Dim::Fixed(l.batch),
            Dim::Fixed(l.ld),
        )
        .unwrap();
        let kernel = compile(backend, &fixed, strategy);
        check_kernel(backend, &kernel, l, seed ^ (i * 100 + 99) as u64);
    }
}

fn small_launches() -> Vec<Launch> {
    vec![Launch::new(3, 16), Launch::new(1, 1), Launch::new(17, 32)]
}

fn named_cases(strategy: Strategy) {
    let Some(backend) = common::backend() else {
        return;
    };
    for (i, (name, pattern)) in named_patterns().into_iter().enumerate() {
        check_pattern(
            backend,
            name,
            pattern,
            strategy,
            &small_launches(),
            i as u64,
        );
    }
}

#[test]
fn csr_named_cases() {
    named_cases(Strategy::Csr);
}

#[test]
fn table_named_cases() {
    named_cases(Strategy::Table);
}

#[test]
fn unrolled_named_cases() {
    named_cases(Strategy::Unrolled);
}

#[test]
fn auto_named_cases() {
    named_cases(Strategy::Auto);
}

/// The largest LeNet-300-100 layer, 300 x 784 at 5 %, at batch 100 (ld 112) and 128.
fn lenet_fc1(strategies: &[Strategy], ops: &[Op]) {
    let Some(backend) = common::backend() else {
        return;
    };
    let pattern = Arc::new(random_pattern(300, 784, 0.05, 42));
    for &strategy in strategies {
        for &op in ops {
            let spec = KernelSpec::any_batch("fc1", op, pattern.clone()).unwrap();
            let kernel = compile(backend, &spec, strategy);
            check_kernel(backend, &kernel, Launch::new(100, 112), 7);
            check_kernel(backend, &kernel, Launch::new(128, 128), 8);
        }
    }
}

#[test]
fn lenet_fc1_csr_and_table() {
    lenet_fc1(&[Strategy::Csr, Strategy::Table], &Op::ALL);
}

#[test]
fn lenet_fc1_unrolled_spmm() {
    // unrolled code for 11 760 nonzeros takes a while to build on PoCL: one op
    lenet_fc1(
        &[Strategy::Unrolled],
        &[Op::Spmm {
            bias: true,
            relu: true,
        }],
    );
}

/// A table split into several programs (a small constant-buffer budget) and an unrolled
/// pattern split into several kernels give the same results.
#[test]
fn chunked_table_and_unrolled() {
    let Some(shared) = common::backend() else {
        return;
    };
    let backend = shared
        .with_options(codegen_opencl::EmitOptions {
            unroll_chunk_nnz: 16,
            ..Default::default()
        })
        .unwrap();
    let pattern = random_pattern(20, 30, 0.2, 9);
    for op in [
        Op::Spmm {
            bias: true,
            relu: true,
        },
        Op::SpmmT,
        Op::Sddmm,
    ] {
        let spec = KernelSpec::any_batch("chunked", op, Arc::new(pattern.clone())).unwrap();
        let kernel = compile(&backend, &spec, Strategy::Unrolled);
        assert!(kernel.report().kernels >= 3, "{op}: {:?}", kernel.report());
        check_kernel(&backend, &kernel, Launch::new(5, 8), 1);
    }
    // a device with a 1 KiB + 200-byte constant buffer: 200 bytes of table per program
    let mut info = shared.info().clone();
    info.max_constant_buffer_size = 1024 + 200;
    let small = OpenClBackend::new(&info).unwrap();
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        let spec = KernelSpec::any_batch("chunked", op, Arc::new(pattern.clone())).unwrap();
        let kernel = compile(&small, &spec, Strategy::Table);
        assert!(kernel.report().programs >= 2, "{op}: {:?}", kernel.report());
        check_kernel(&small, &kernel, Launch::new(5, 8), 2);
    }
}

fn random_cases(strategy: Strategy, cases: u32) {
    let Some(backend) = common::backend() else {
        return;
    };
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        rows in 1usize..24,
        cols in 1usize..24,
        density in 0.0f64..0.6,
        batch in 1usize..20,
        pad in 0usize..5,
        seed in any::<u64>(),
    )| {
        let pattern = random_pattern(rows, cols, density, seed);
        let launches = [Launch::new(batch, batch + pad)];
        check_pattern(backend, "random", pattern, strategy, &launches, seed);
    });
}

#[test]
fn csr_random_patterns() {
    random_cases(Strategy::Csr, 16);
}

#[test]
fn table_random_patterns() {
    random_cases(Strategy::Table, 3);
}

#[test]
fn unrolled_random_patterns() {
    random_cases(Strategy::Unrolled, 3);
}

/// The code shaped for a GPU (one batch column per work-item, local-memory reductions and
/// tiles, a switch per row in unrolled kernels, 64 KiB constant tables) runs on this device
/// too: a backend that takes it for an NVIDIA GPU checks those code paths here.
#[test]
fn gpu_shaped_code() {
    let Some(shared) = common::backend() else {
        return;
    };
    let mut info = shared.info().clone();
    info.kind = DeviceKind::Gpu;
    info.max_constant_buffer_size = 64 << 10;
    info.max_work_group_size = info.max_work_group_size.min(1024);
    let gpu = OpenClBackend::new(&info).unwrap();
    assert!(gpu.profile().work_groups().dense_tiled);
    let launches = [Launch::new(17, 32), Launch::new(1, 1)];
    for strategy in [Strategy::Csr, Strategy::Table, Strategy::Unrolled] {
        for (i, (name, pattern)) in named_patterns().into_iter().enumerate().take(2) {
            check_pattern(&gpu, name, pattern, strategy, &launches, 50 + i as u64);
        }
    }
    // 1024 x 1024 at 5 %: tables over several 64 KiB programs
    let big = Arc::new(random_pattern(1024, 1024, 0.05, 12));
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        let spec = KernelSpec::any_batch("big", op, big.clone()).unwrap();
        let kernel = compile(&gpu, &spec, Strategy::Table);
        assert!(kernel.report().programs >= 2, "{op}: {:?}", kernel.report());
        check_kernel(&gpu, &kernel, Launch::new(40, 48), 3);
    }
}
