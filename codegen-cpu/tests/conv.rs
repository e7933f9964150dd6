//! Differential tests of the CPU backend's convolution ops against the interpreter, through
//! the shared harness (`test-support`): every conv op (every `conv` epilogue) on the named
//! convolution cases and on random ones, with the generic and dense strategies, the
//! planner's choice and (for the fixed-shape specs of `conv`, `conv_t` and `conv_grad`) the
//! JIT, every ISA level this CPU supports, 1 and 2 threads, batches 1, 3, 8, 17
//! and 100 at the strides the runtime uses and odd ones, operands in guard zones.

use codegen_cpu::{CpuBackend, CpuOptions};
use proptest::prelude::*;
use sparse_ir::{Launch, Op, Strategy};
use test_support::{check, conv_cases, geometry, strides, ConvCase, Run};

mod common;
use common::backends;

/// The strategies every conv op runs with.
const STRATEGIES: [Strategy; 3] = [Strategy::Generic, Strategy::Dense, Strategy::Auto];

fn check_case(
    backends: &[CpuBackend],
    case: &ConvCase,
    strategies: &[Strategy],
    run: Run,
) -> Result<(), String> {
    for op in Op::CONV_ALL {
        for fixed in [true, false] {
            let spec = case.spec(op, run.launch, fixed);
            for backend in backends {
                // The JIT bakes batch and ld in: fixed specs, every op with a pattern.
                let jit = (fixed && op != Op::ConvDenseGrad).then_some(Strategy::Jit);
                for &strategy in strategies.iter().chain(jit.iter()) {
                    check(backend, &spec, strategy, run).map_err(|e| {
                        format!(
                            "case {:?}: {e} (isa {}, {} thread(s))",
                            case.name,
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

#[test]
fn named_cases_at_every_batch_and_stride() {
    let backends = backends();
    for case in conv_cases() {
        for batch in [1, 3, 8, 17, 100] {
            for (i, ld) in strides(batch).into_iter().enumerate() {
                let run = Run::new(batch, ld, 7 + i as u64).offset(i * 5);
                check_case(&backends, &case, &STRATEGIES, run).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

/// Larger layers, where spans are cut into several pieces and parts hold many channels.
#[test]
fn larger_layers() {
    let backends = backends();
    let cases = [
        ConvCase::random("16x16 3x3", 12, geometry(8, 16, 16, 3, 1, 1), 0.1, 21),
        ConvCase::random("stride 2 wide", 9, geometry(6, 15, 13, 3, 2, 1), 0.15, 22),
        ConvCase::random("lenet conv2", 16, geometry(6, 12, 12, 5, 1, 0), 0.05, 23),
    ];
    for case in &cases {
        for (batch, ld) in [(1, 1), (32, 32), (100, 112), (130, 144)] {
            let run = Run::new(batch, ld, 3);
            check_case(&backends, case, &STRATEGIES, run).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_convolutions(
        out in 1usize..6,
        channels in 1usize..5,
        height in 1usize..11,
        width in 1usize..11,
        kernel in prop_oneof![Just(1usize), Just(3), Just(5), 2usize..5],
        stride in 1usize..4,
        padding in 0usize..3,
        density in prop_oneof![Just(0.0), 0.05f64..0.6, Just(1.0)],
        batch in prop_oneof![Just(1usize), Just(3), 1usize..40],
        pad in prop_oneof![Just(0usize), 1usize..20],
        offset in 0usize..16,
        seed in any::<u64>(),
    ) {
        let g = geometry(channels, height, width, kernel, stride, padding);
        prop_assume!(height + 2 * padding >= kernel && width + 2 * padding >= kernel);
        let case = ConvCase::random("random", out, g, density, seed);
        let run = Run::new(batch, batch + pad, seed).offset(offset);
        let r = check_case(&backends(), &case, &STRATEGIES, run);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// `conv_dense_grad` has no pattern to bake in: asking the JIT for it is a clear error; the
/// other convolution ops compile (and are checked above).
#[test]
fn the_jit_refuses_conv_dense_grad_clearly() {
    let backend = CpuBackend::new(CpuOptions::default()).expect("backend");
    let case = &conv_cases()[1];
    let spec = case.spec(Op::ConvDenseGrad, Launch::new(8, 8), true);
    let err = sparse_ir::backend::Backend::compile(&backend, &spec, Strategy::Jit).unwrap_err();
    assert!(err.to_string().contains("no pattern to bake in"), "{err}");
    for op in [Op::CONV, Op::ConvT, Op::ConvGrad] {
        let spec = case.spec(op, Launch::new(8, 8), true);
        let k = sparse_ir::backend::Backend::compile(&backend, &spec, Strategy::Jit)
            .unwrap_or_else(|e| panic!("{op:?}: {e}"));
        assert_eq!(sparse_ir::backend::Kernel::strategy(&k), Strategy::Jit);
        // A batch given at run time cannot be baked in.
        let any = case.spec(op, Launch::new(8, 8), false);
        let err = sparse_ir::backend::Backend::compile(&backend, &any, Strategy::Jit).unwrap_err();
        assert!(err.to_string().contains("fixed"), "{err}");
    }
}
