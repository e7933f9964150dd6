//! Differential tests of the CPU backend against the reference interpreter, through the
//! shared harness (`test-support`): the generic and dense strategies for every op, every ISA
//! level this CPU supports and 1 and 2 threads; the JIT (compiled by the backend, as the
//! runtime gets it) for every op it has at batches 1, 3, 8 and 100; random patterns, batches
//! and strides (proptest) and the named edge cases.
//!
//! Every operand sits between guard zones at an offset from a cache line (aligned and
//! misaligned), input padding columns hold NaN (a kernel that reads them fails the
//! comparison), outputs start as NaN (a kernel must write every element) and their padding
//! must stay untouched unless the kernel says it may write it (`Kernel::writes_padding`).

use std::sync::Arc;

use codegen_cpu::{CpuBackend, CpuOptions, IsaLevel};
use proptest::prelude::*;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern, Strategy};
use test_support::{check, lenet_fc1, named_patterns, random, specs, strides, Run, BATCHES};

mod common;
use common::backends;

const BOTH: [Strategy; 2] = [Strategy::Generic, Strategy::Dense];

/// Every op of `ops` on `pattern` at `run`, with a fixed-shape and an any-batch spec, on
/// every backend and strategy.
fn check_ops(
    backends: &[CpuBackend],
    pattern: &Arc<Pattern>,
    ops: &[Op],
    strategies: &[Strategy],
    run: Run,
) -> Result<(), String> {
    for &op in ops {
        for spec in specs("fc1", op, pattern, run.launch) {
            for backend in backends {
                for &strategy in strategies {
                    check(backend, &spec, strategy, run).map_err(|e| {
                        format!(
                            "{e} (isa {}, {} thread(s))",
                            backend.isa(),
                            backend.threads()
                        )
                    })?;
                }
            }
        }
    }
    Ok(())
}

fn check_both(pattern: &Arc<Pattern>, batch: usize, ld: usize, offset: usize, seed: u64) {
    let run = Run::new(batch, ld, seed).offset(offset);
    check_ops(&backends(), pattern, &Op::ALL, &BOTH, run).unwrap_or_else(|e| panic!("{e}"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_patterns_batches_and_strides(
        rows in 1usize..40,
        cols in 1usize..40,
        density in prop_oneof![Just(0.0), 0.01f64..0.3, Just(1.0)],
        batch in 1usize..=130,
        pad in prop_oneof![Just(0usize), 1usize..20],
        offset in 0usize..16,
        seed in any::<u64>(),
    ) {
        let p = random(rows, cols, density, seed);
        let run = Run::new(batch, batch + pad, seed).offset(offset);
        let r = check_ops(&backends(), &p, &Op::ALL, &BOTH, run);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    fn random_patterns_through_the_jit(
        rows in 1usize..40,
        cols in 1usize..40,
        density in 0.0f64..0.6,
        batch in prop_oneof![Just(1usize), Just(3), Just(8), Just(100), 2usize..24],
        pad in prop_oneof![Just(0usize), 1usize..20],
        offset in 0usize..16,
        seed in any::<u64>(),
    ) {
        let p = random(rows, cols, density, seed);
        let run = Run::new(batch, batch + pad, seed).offset(offset);
        let b = CpuBackend::new(CpuOptions::default()).unwrap();
        for op in JIT_OPS {
            let spec = test_support::fixed_spec("fc1", op, &p, run.launch);
            let r = check(&b, &spec, Strategy::Jit, run);
            prop_assert!(r.is_ok(), "{}", r.unwrap_err());
        }
    }
}

#[test]
fn named_edge_cases_at_named_batches() {
    let backends = backends();
    for (i, (name, p)) in named_patterns().into_iter().enumerate() {
        for batch in [1, 3, 17, 100] {
            for ld in strides(batch) {
                let run = Run::new(batch, ld, i as u64).offset(batch + i);
                check_ops(&backends, &p, &Op::ALL, &BOTH, run)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }
}

#[test]
fn named_batches_on_a_random_layer() {
    let p = random(33, 45, 0.2, 1);
    for batch in BATCHES {
        for ld in strides(batch) {
            check_both(&p, batch, ld, batch % 16, batch as u64);
        }
    }
}

/// Every op the JIT compiles: all of [`Op::ALL`] but `dense_grad`.
const JIT_OPS: [Op; 6] = {
    let [a, b, c, d, e, f, _dense_grad] = Op::ALL;
    [a, b, c, d, e, f]
};

/// The JIT as the backend compiles it (`Strategy::Jit`): every op it has (`spmm` with and
/// without bias and ReLU, `spmm_t`, `sddmm`) on every named pattern at batches 1, 3, 8 and
/// 100 with every stride, operands aligned and misaligned.
#[test]
fn jit_named_edge_cases_at_batches_1_3_8_100() {
    let b = CpuBackend::new(CpuOptions::default()).unwrap();
    let mut padding_writers = 0;
    for (i, (name, p)) in named_patterns().into_iter().enumerate() {
        for batch in [1, 3, 8, 100] {
            for ld in strides(batch) {
                for (j, op) in JIT_OPS.into_iter().enumerate() {
                    let run = Run::new(batch, ld, (i * 10 + j) as u64).offset(i + j);
                    let spec = test_support::fixed_spec("fc1", op, &p, run.launch);
                    let checked = check(&b, &spec, Strategy::Jit, run)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    padding_writers += usize::from(checked.writes_padding);
                }
            }
        }
    }
    // Batch 3 with ld 16 or 6, and 100 with ld 103, let the last block run over padding.
    assert!(padding_writers > 0);
}

#[test]
fn jit_largest_lenet_layer() {
    let b = CpuBackend::new(CpuOptions::default()).unwrap();
    let p = lenet_fc1();
    for (batch, ld) in [(1, 1), (3, 16), (8, 16), (100, 112), (100, 100)] {
        for op in JIT_OPS {
            let run = Run::new(batch, ld, 5).offset(batch);
            let spec = test_support::fixed_spec("fc1", op, &p, run.launch);
            check(&b, &spec, Strategy::Jit, run).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn wide_inputs_run_in_l2_panels() {
    // More than 2048 input rows at batch ≥ 64: spmm (and spmm_t of the transposed shape)
    // walk the pattern in panels of input rows, accumulating into the output.
    for (rows, cols) in [(3, 4200), (4200, 3)] {
        let p = random(rows, cols, 0.3, 8);
        for (batch, ld) in [(100, 112), (130, 133), (64, 64)] {
            check_both(&p, batch, ld, 5, 13);
        }
    }
}

#[test]
fn spmm_t_with_more_values_than_l2_permutes_them_first() {
    // 270 000 nonzeros (over 1 MiB of values): spmm_t gathers them into the transpose's
    // order before it runs.
    let p = Arc::new(Pattern::dense(300, 900).unwrap());
    for (batch, ld) in [(3, 5), (17, 32)] {
        let run = Run::new(batch, ld, 14).offset(1);
        check_ops(&backends(), &p, &[Op::SpmmT], &[Strategy::Generic], run).unwrap();
    }
}

#[test]
fn largest_lenet_layer_300x784() {
    let p = lenet_fc1();
    // The spmm-family ops on every batch; dense_grad (O(rows·cols·batch) in the oracle)
    // once.
    let ops = &Op::ALL[..6];
    for (batch, ld) in [(1, 1), (8, 16), (100, 112), (100, 100), (128, 128)] {
        let run = Run::new(batch, ld, 9).offset(batch % 7);
        check_ops(&backends(), &p, ops, &BOTH, run).unwrap();
    }
    let run = Run::new(100, 112, 10);
    check_ops(&backends(), &p, &[Op::DenseGrad], &BOTH, run).unwrap();
}

#[test]
fn auto_plans_record_reasons_and_run_correctly() {
    let sparse = random(64, 80, 0.05, 6);
    let dense = Arc::new(Pattern::dense(48, 40).unwrap());
    for p in [sparse, dense] {
        check_ops(
            &backends(),
            &p,
            &Op::ALL,
            &[Strategy::Auto],
            Run::new(64, 64, 12),
        )
        .unwrap();
    }
    // At batch 1 with a fixed shape the planner may pick the JIT: still exact.
    let p = random(100, 300, 0.05, 7);
    check_ops(
        &backends(),
        &p,
        &Op::ALL,
        &[Strategy::Auto],
        Run::new(1, 1, 13),
    )
    .unwrap();
    let b = CpuBackend::new(CpuOptions::default()).unwrap();
    let p = Arc::new(Pattern::dense(48, 40).unwrap());
    let spec = KernelSpec::new("fc2", Op::SPMM, p, Dim::Fixed(128), Dim::Fixed(128)).unwrap();
    let k = b.compile(&spec, Strategy::Auto).unwrap();
    assert_ne!(k.strategy(), Strategy::Auto);
    assert_eq!(k.plan().strategy, k.strategy());
    assert!(
        k.plan().reasons.iter().any(|r| r.contains("chose")),
        "{}",
        k.plan()
    );
    assert!(k.plan().predicted(Strategy::Generic).is_some());
    assert!(k.plan().predicted(Strategy::Dense).is_some());
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let b = CpuBackend::new(CpuOptions {
        threads: 2,
        isa: None,
    })
    .unwrap();
    let p = Arc::new(Pattern::from_coo(3, 4, &[(0, 1), (2, 3)]).unwrap());
    let spec = KernelSpec::any_batch("fc3", Op::SPMM, p).unwrap();
    for strategy in BOTH {
        let k = b.compile(&spec, strategy).unwrap();
        let (values, x) = (vec![1.0; 2], vec![1.0; 4 * 8]);
        let mut y = vec![0.0; 3 * 8 - 1];
        let e = k
            .run(
                Launch::new(8, 8),
                Args::Spmm {
                    values: &values,
                    x: &x,
                    bias: None,
                    y: &mut y,
                },
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("fc3") && e.to_string().contains('y'),
            "{e}"
        );
        let mut y = vec![0.0; 3 * 8];
        let e = k
            .run(
                Launch::new(9, 8),
                Args::Spmm {
                    values: &values,
                    x: &x,
                    bias: None,
                    y: &mut y,
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("ld = 8"), "{e}");
    }
    let e = b.compile(&spec, Strategy::Csr).unwrap_err();
    assert!(e.to_string().contains("csr"), "{e}");
}

#[test]
fn kernels_are_cached_while_alive() {
    let b = CpuBackend::new(CpuOptions::default()).unwrap();
    let p = Arc::new(Pattern::from_coo(3, 4, &[(0, 1), (2, 3)]).unwrap());
    let spec = KernelSpec::any_batch("fc1", Op::SpmmT, Arc::clone(&p)).unwrap();
    let other = KernelSpec::any_batch("fc1", Op::Sddmm, p).unwrap();
    let k1 = b.compile(&spec, Strategy::Generic).unwrap();
    let k2 = b.compile(&spec, Strategy::Generic).unwrap();
    assert_eq!(b.cached_kernels(), 1);
    let k3 = b.compile(&other, Strategy::Generic).unwrap();
    assert_eq!(b.cached_kernels(), 2);
    drop((k1, k2, k3));
    assert_eq!(b.cached_kernels(), 0);
}

#[test]
fn isa_levels_can_be_forced_and_unsupported_ones_are_refused() {
    for isa in IsaLevel::supported() {
        let b = CpuBackend::new(CpuOptions {
            threads: 1,
            isa: Some(isa),
        })
        .unwrap();
        // The environment variable may cap the level further, never raise it.
        assert!(b.isa() <= isa);
    }
    if IsaLevel::detect() < IsaLevel::Avx512 {
        let e = CpuBackend::new(CpuOptions {
            threads: 1,
            isa: Some(IsaLevel::Avx512),
        })
        .unwrap_err();
        assert!(e.to_string().contains("avx512"), "{e}");
    }
}
