//! The executor on the first OpenCL device: caches, compile reports, timing, buffers that
//! stay on the device, and errors before anything is enqueued.
#![cfg(feature = "opencl")]

mod common;

use std::sync::Arc;

use codegen_opencl::{DeviceBuffer, OpenClBackend};
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::interp;
use sparse_ir::{Args, BackendError, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

/// A fresh backend on the shared backend's device (own caches and counters).
fn fresh() -> Option<OpenClBackend> {
    common::backend().map(|b| OpenClBackend::new(b.info()).unwrap())
}

fn pattern(seed: usize) -> Arc<Pattern> {
    let coo: Vec<(usize, usize)> = (0..40)
        .map(|i| ((i * 7 + seed) % 12, (i * 13 + seed * 3) % 20))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    Arc::new(Pattern::from_coo(12, 20, &coo).unwrap())
}

fn spmm_spec(layer: &str, p: Arc<Pattern>) -> KernelSpec {
    KernelSpec::any_batch(layer, Op::SPMM, p).unwrap()
}

fn upload(b: &OpenClBackend, data: &[f32]) -> DeviceBuffer {
    let mut buf = b.alloc(data.len()).unwrap();
    b.upload(data, &mut buf).unwrap();
    buf
}

#[test]
fn csr_program_is_built_once_per_device() {
    let Some(b) = fresh() else { return };
    for seed in 0..3 {
        for op in [Op::SPMM, Op::SpmmT, Op::Sddmm, Op::DenseGrad] {
            let spec = KernelSpec::any_batch("fc", op, pattern(seed)).unwrap();
            b.compile(&spec, Strategy::Csr).unwrap();
        }
    }
    assert_eq!(b.stats().programs_built, 1);
}

#[test]
fn kernels_are_cached_by_key_and_freed_with_their_last_user() {
    let Some(b) = fresh() else { return };
    let first = b
        .compile(&spmm_spec("fc1", pattern(1)), Strategy::Table)
        .unwrap();
    assert!(!first.report().cached);
    assert_eq!(first.report().programs_built, 1);
    let built = b.stats().programs_built;
    // same key (the layer name is not part of it): from the cache, under the new name
    let again = b
        .compile(&spmm_spec("other", pattern(1)), Strategy::Table)
        .unwrap();
    assert!(again.report().cached);
    assert_eq!(again.spec().layer(), "other");
    assert_eq!(b.stats().programs_built, built);
    // another batch is another key
    let fixed = KernelSpec::new("fc1", Op::SPMM, pattern(1), Dim::Fixed(4), Dim::Fixed(4)).unwrap();
    assert!(!b.compile(&fixed, Strategy::Table).unwrap().report().cached);
    assert_eq!(b.cached_programs(), 1, "the fixed-batch kernel was dropped");
    // dropping every user frees the kernel and its program
    drop(first);
    drop(again);
    assert_eq!(b.cached_programs(), 0);
    let rebuilt = b
        .compile(&spmm_spec("fc1", pattern(1)), Strategy::Table)
        .unwrap();
    assert!(!rebuilt.report().cached);
}

#[test]
fn compile_reports_build_and_first_launch() {
    let Some(b) = fresh() else { return };
    let k = b
        .compile(&spmm_spec("fc1", pattern(2)), Strategy::Unrolled)
        .unwrap();
    let r = k.report();
    assert_eq!(r.strategy, Strategy::Unrolled);
    assert_eq!(r.reason, "asked for");
    assert!(r.build > std::time::Duration::ZERO);
    assert!(r.first_launch > std::time::Duration::ZERO);
    assert_eq!(r.compile_time(), r.emit + r.build + r.first_launch);
    assert_eq!(r.kernels, 1);
    assert!(r.source_bytes > 0);
    // auto: the planner's choice and its reason
    let auto = b
        .compile(&spmm_spec("fc1", pattern(2)), Strategy::Auto)
        .unwrap();
    let plan = b.plan(auto.spec());
    assert_eq!(auto.strategy(), plan.strategy);
    assert_eq!(auto.report().reason, plan.reason);
    assert!(!plan.reason.is_empty());
}

/// Two layers chained on the device, nothing downloaded in between; kernel time and transfer
/// time are counted apart.
#[test]
fn activations_stay_on_the_device() {
    let Some(b) = fresh() else { return };
    let p1 = pattern(3); // 12 x 20
    let p2 = Arc::new(Pattern::dense(5, 12).unwrap());
    let fc1 = KernelSpec::any_batch(
        "fc1",
        Op::Spmm {
            bias: true,
            relu: true,
        },
        p1.clone(),
    )
    .unwrap();
    let fc2 = KernelSpec::any_batch("fc2", Op::SPMM, p2.clone()).unwrap();
    let (k1, k2) = (
        b.compile(&fc1, Strategy::Table).unwrap(),
        b.compile(&fc2, Strategy::Csr).unwrap(),
    );
    let launch = Launch::new(6, 8);
    let x: Vec<f32> = (0..20 * 8)
        .map(|i| ((i * 37) % 17) as f32 / 8.0 - 1.0)
        .collect();
    let w1: Vec<f32> = (0..p1.nnz()).map(|i| (i % 5) as f32 / 4.0 - 0.5).collect();
    let bias1: Vec<f32> = (0..12).map(|i| i as f32 / 10.0 - 0.6).collect();
    let w2: Vec<f32> = (0..p2.nnz()).map(|i| (i % 7) as f32 / 6.0 - 0.5).collect();
    let before = b.stats();
    let (dx, dw1, db1, dw2) = (
        upload(&b, &x),
        upload(&b, &w1),
        upload(&b, &bias1),
        upload(&b, &w2),
    );
    let mut h = b.alloc(12 * 8).unwrap();
    let mut y = b.alloc(5 * 8).unwrap();
    let after_upload = b.stats();
    assert!(after_upload.transfer_ns > before.transfer_ns);
    assert_eq!(
        after_upload.bytes_up - before.bytes_up,
        4 * (x.len() + w1.len() + bias1.len() + w2.len()) as u64
    );
    for _ in 0..2 {
        k1.run(
            launch,
            Args::Spmm {
                values: &dw1,
                x: &dx,
                bias: Some(&db1),
                y: &mut h,
            },
        )
        .unwrap();
        k2.run(
            launch,
            Args::Spmm {
                values: &dw2,
                x: &h,
                bias: None,
                y: &mut y,
            },
        )
        .unwrap();
    }
    let after_runs = b.stats();
    assert_eq!(after_runs.transfer_ns, after_upload.transfer_ns);
    assert!(after_runs.kernel_ns > after_upload.kernel_ns);
    assert!(k1.last_kernel_time() > std::time::Duration::ZERO);
    let mut got = vec![0.0; 5 * 8];
    b.download(&y, &mut got).unwrap();
    assert!(b.stats().bytes_down - after_runs.bytes_down == 4 * 40);
    // the same two layers through the interpreter
    let mut h_ref = vec![0.0; 12 * 8];
    interp::run(
        &fc1,
        launch,
        Args::Spmm {
            values: &w1,
            x: &x,
            bias: Some(&bias1),
            y: &mut h_ref,
        },
    )
    .unwrap();
    let mut scratch = vec![0.0; 5 * 8];
    let want = interp::reference(
        &fc2,
        launch,
        &Args::Spmm {
            values: &w2,
            x: &h_ref,
            bias: None,
            y: &mut scratch,
        },
    )
    .unwrap();
    interp::compare(&want, &got, launch.ld).unwrap();
}

#[test]
fn bad_arguments_are_refused_before_launch() {
    let Some(b) = fresh() else { return };
    let p = pattern(4);
    let spec = KernelSpec::new("fc3", Op::SPMM, p.clone(), Dim::Fixed(4), Dim::Fixed(8)).unwrap();
    let k = b.compile(&spec, Strategy::Table).unwrap();
    let launches = b.stats().launches;
    let values = b.alloc(p.nnz()).unwrap();
    let x = b.alloc(20 * 8).unwrap();
    let mut y = b.alloc(12 * 8).unwrap();
    let short = b.alloc(20 * 8 - 1).unwrap();
    let err = k
        .run(
            Launch::new(4, 8),
            Args::Spmm {
                values: &values,
                x: &short,
                bias: None,
                y: &mut y,
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, BackendError::Length { operand: "x", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("fc3"), "{err}");
    let err = k
        .run(
            Launch::new(3, 8),
            Args::Spmm {
                values: &values,
                x: &x,
                bias: None,
                y: &mut y,
            },
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("compiled for batch 4, launched with 3"),
        "{err}"
    );
    let mut dw = b.alloc(p.nnz()).unwrap();
    let err = k
        .run(
            Launch::new(4, 8),
            Args::Sddmm {
                dy: &y,
                x: &x,
                dw: &mut dw,
            },
        )
        .unwrap_err();
    assert!(matches!(err, BackendError::WrongArgs { .. }), "{err}");
    // a buffer of another backend (another context)
    let other = fresh().unwrap();
    let foreign = other.alloc(20 * 8).unwrap();
    let err = k
        .run(
            Launch::new(4, 8),
            Args::Spmm {
                values: &values,
                x: &foreign,
                bias: None,
                y: &mut y,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("another OpenCL backend"), "{err}");
    assert_eq!(b.stats().launches, launches, "nothing was launched");
    // transfers check lengths too
    let mut buf = b.alloc(3).unwrap();
    let err = b.upload(&[1.0, 2.0], &mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Length {
                expected: 3,
                got: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = b.download(&buf, &mut [0.0; 4]).unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Length {
                expected: 3,
                got: 4,
                ..
            }
        ),
        "{err}"
    );
    let err = other.upload(&[1.0, 2.0, 3.0], &mut buf).unwrap_err();
    assert!(err.to_string().contains("another OpenCL backend"), "{err}");
}

#[test]
fn unsupported_strategies_name_the_layer() {
    let Some(b) = fresh() else { return };
    for strategy in [Strategy::Jit, Strategy::Generic, Strategy::Dense] {
        let err = b
            .compile(&spmm_spec("conv1", pattern(5)), strategy)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("conv1") && msg.contains(strategy.name()),
            "{msg}"
        );
    }
}

#[test]
fn empty_buffers_and_empty_outputs() {
    let Some(b) = fresh() else { return };
    let buf = b.alloc(0).unwrap();
    assert!(buf.is_empty());
    b.download(&buf, &mut []).unwrap();
    // all-zero sddmm: nothing to write, nothing launched, still Ok
    let spec =
        KernelSpec::any_batch("z", Op::Sddmm, Arc::new(Pattern::empty(3, 4).unwrap())).unwrap();
    for strategy in [Strategy::Csr, Strategy::Table, Strategy::Unrolled] {
        let k = b.compile(&spec, strategy).unwrap();
        let (dy, x) = (b.alloc(3 * 2).unwrap(), b.alloc(4 * 2).unwrap());
        let mut dw = b.alloc(0).unwrap();
        k.run(
            Launch::new(2, 2),
            Args::Sddmm {
                dy: &dy,
                x: &x,
                dw: &mut dw,
            },
        )
        .unwrap();
    }
}
