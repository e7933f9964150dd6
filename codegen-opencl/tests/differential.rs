//! Differential tests on the first OpenCL device (PoCL here): every op and every strategy
//! against the interpreter (`sparse_ir::interp`), on named edge cases and random patterns;
//! the convolution ops (`csr` only) on `test_support::conv_cases` and random geometries.
//!
//! The shared harness (`test-support`) builds the operands: inputs carry NaN in their
//! padding columns (`batch..ld`), outputs start as NaN with a sentinel in their padding, and
//! every buffer that may be longer than its operand has a trailing guard zone, so a kernel
//! that reads past the batch, leaves an element unwritten, writes padding or writes past an
//! operand fails. The patterns are the named edge cases of `test-support`.
//! Each case builds programs (PoCL: a fraction of a second each), so case counts are small.
#![cfg(feature = "opencl")]

mod common;

use std::io::Write;
use std::sync::Arc;

use codegen_opencl::{DeviceKind, OpenClBackend, OpenClKernel};
use proptest::prelude::*;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{BackendError, Dim, KernelSpec, Launch, Op, Pattern, Strategy};
use test_support::{
    check, check_compiled, conv_cases, geometry, named_patterns, random, strides, ConvCase, Device,
    Run,
};

/// Runs `kernel` on guarded operands from `seed` at `launch` and checks it against the
/// interpreter (`test_support::check_compiled` through `Device`: every operand in a device
/// buffer of its own, trailing guard zones, inputs unchanged, padding untouched).
fn check_kernel(backend: &OpenClBackend, kernel: &OpenClKernel, launch: Launch, seed: u64) {
    let run = Run::new(launch.batch, launch.ld, seed);
    if let Err(e) = check_compiled(&Device(backend), kernel, run) {
        panic!("{e}");
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
    pattern: Arc<Pattern>,
    strategy: Strategy,
    launches: &[Launch],
    seed: u64,
) {
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
            &name,
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
    let pattern = test_support::lenet_fc1();
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
    let pattern = random(20, 30, 0.2, 9);
    for op in [
        Op::Spmm {
            bias: true,
            relu: true,
        },
        Op::SpmmT,
        Op::Sddmm,
    ] {
        let spec = KernelSpec::any_batch("chunked", op, pattern.clone()).unwrap();
        let kernel = compile(&backend, &spec, Strategy::Unrolled);
        assert!(kernel.report().kernels >= 3, "{op}: {:?}", kernel.report());
        check_kernel(&backend, &kernel, Launch::new(5, 8), 1);
    }
    // a device with a 1 KiB + 200-byte constant buffer: 200 bytes of table per program
    let mut info = shared.info().clone();
    info.max_constant_buffer_size = 1024 + 200;
    let small = OpenClBackend::new(&info).unwrap();
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        let spec = KernelSpec::any_batch("chunked", op, pattern.clone()).unwrap();
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
        let pattern = random(rows, cols, density, seed);
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
            check_pattern(&gpu, &name, pattern, strategy, &launches, 50 + i as u64);
        }
    }
    // 1024 x 1024 at 5 %: tables over several 64 KiB programs
    let big = random(1024, 1024, 0.05, 12);
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        let spec = KernelSpec::any_batch("big", op, big.clone()).unwrap();
        let kernel = compile(&gpu, &spec, Strategy::Table);
        assert!(kernel.report().programs >= 2, "{op}: {:?}", kernel.report());
        check_kernel(&gpu, &kernel, Launch::new(40, 48), 3);
    }
}

/// The batches of the convolution cases; each runs at `ld = batch`, `ld` padded to 16 and
/// `ld = batch + 3` (`test_support::strides`).
const CONV_BATCHES: [usize; 3] = [1, 3, 8];

/// Every convolution op of `case` (`conv` with each epilogue, `conv_t`, `conv_grad`,
/// `conv_dense_grad`) with `strategy` on `backend`: compiled for any batch and run at every
/// launch, and compiled for each launch's fixed batch and `ld`. Returns the checks run.
fn check_conv_case(
    backend: &OpenClBackend,
    case: &ConvCase,
    strategy: Strategy,
    launches: &[Launch],
    seed: u64,
) -> usize {
    let target = Device(backend);
    let mut checks = 0;
    for (i, op) in Op::CONV_ALL.into_iter().enumerate() {
        let spec = case.spec(op, launches[0], false);
        let kernel = compile(backend, &spec, strategy);
        assert_eq!(kernel.strategy(), Strategy::Csr, "{}: {op}", case.name);
        assert!(!kernel.writes_padding());
        for (j, &launch) in launches.iter().enumerate() {
            let run = Run::new(launch.batch, launch.ld, seed ^ (i * 1000 + j) as u64);
            if let Err(e) = check_compiled(&target, &kernel, run) {
                panic!("convolution case {:?}: {e}", case.name);
            }
            let fixed = case.spec(op, launch, true);
            let run = Run::new(launch.batch, launch.ld, seed ^ (i * 1000 + j + 500) as u64);
            if let Err(e) = check(&target, &fixed, strategy, run.offset(j)) {
                panic!("convolution case {:?}: {e}", case.name);
            }
            checks += 2;
        }
    }
    checks
}

fn conv_launches() -> Vec<Launch> {
    CONV_BATCHES
        .into_iter()
        .flat_map(|b| strides(b).into_iter().map(move |ld| Launch::new(b, ld)))
        .collect()
}

fn conv_named(strategy: Strategy) {
    let Some(backend) = common::backend() else {
        return;
    };
    let cases = conv_cases();
    let mut checks = 0;
    for (i, case) in cases.iter().enumerate() {
        checks += check_conv_case(backend, case, strategy, &conv_launches(), 100 + i as u64);
    }
    let _ = writeln!(
        std::io::stderr(),
        "conv ({strategy}): {} named cases x {} ops x {} launches passed ({checks} checks)",
        cases.len(),
        Op::CONV_ALL.len(),
        conv_launches().len()
    );
}

#[test]
fn conv_csr_named_cases() {
    conv_named(Strategy::Csr);
}

#[test]
fn conv_auto_named_cases() {
    conv_named(Strategy::Auto);
}

/// `table` and `unrolled` refuse convolutions with a reason, and the planner picks `csr`.
#[test]
fn conv_specialised_strategies_refuse() {
    let Some(backend) = common::backend() else {
        return;
    };
    let case = &conv_cases()[1];
    for op in Op::CONV_ALL {
        let spec = case.spec(op, Launch::new(3, 16), true);
        for strategy in [Strategy::Table, Strategy::Unrolled] {
            match backend.compile(&spec, strategy) {
                Err(BackendError::Unsupported { reason, .. }) => {
                    assert!(reason.contains("csr"), "{op} {strategy}: {reason}")
                }
                other => panic!("{op} {strategy}: expected Unsupported, got {other:?}"),
            }
        }
        let plan = backend.plan(&spec);
        assert_eq!(plan.strategy, Strategy::Csr, "{op}: {}", plan.reason);
    }
}

/// Random geometries and patterns (`ConvCase::random`), every convolution op, `csr`.
#[test]
fn conv_random_cases() {
    let Some(backend) = common::backend() else {
        return;
    };
    let config = ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        out in 1usize..6,
        c in 1usize..4,
        h in 1usize..11,
        w in 1usize..11,
        k in 1usize..6,
        s in 1usize..4,
        p in 0usize..3,
        density in 0.0f64..0.7,
        batch in 1usize..12,
        pad in 0usize..5,
        seed in any::<u64>(),
    )| {
        prop_assume!(h + 2 * p >= k && w + 2 * p >= k);
        let case = ConvCase::random("random", out, geometry(c, h, w, k, s, p), density, seed);
        check_conv_case(backend, &case, Strategy::Csr, &[Launch::new(batch, batch + pad)], seed);
    });
}

/// The convolution kernels shaped for a GPU (one batch column per work-item, local-memory
/// reductions over positions and batch) on this device.
#[test]
fn conv_gpu_shaped_code() {
    let Some(shared) = common::backend() else {
        return;
    };
    let mut info = shared.info().clone();
    info.kind = DeviceKind::Gpu;
    info.max_constant_buffer_size = 64 << 10;
    info.max_work_group_size = info.max_work_group_size.min(1024);
    let gpu = OpenClBackend::new(&info).unwrap();
    assert!(gpu.profile().work_groups().sddmm_lanes > 1);
    let launches = [Launch::new(1, 1), Launch::new(3, 16), Launch::new(8, 11)];
    for (i, case) in conv_cases().iter().enumerate() {
        check_conv_case(&gpu, case, Strategy::Csr, &launches, 200 + i as u64);
    }
}
