//! Differential tests of the Cranelift JIT with its own options (code shapes, chunk sizes,
//! register allocators) against the reference interpreter, on guarded operands
//! (`test-support`). The JIT through the CPU backend is tested beside the generic and dense
//! strategies in `differential.rs`.

use std::sync::Arc;

use codegen_cpu::jit::{estimate, JitKernel, JitOptions, Regalloc, MAX_ROW_NNZ};
use proptest::prelude::*;
use sparse_ir::{Args, BackendError, Dim, KernelSpec, Launch, Op, Pattern};
use test_support::{check_kernel, named_patterns, random, strides, Run};

/// Every op the JIT compiles: all of [`Op::ALL`] but `dense_grad`.
const OPS: [Op; 6] = {
    let [a, b, c, d, e, f, _dense_grad] = Op::ALL;
    [a, b, c, d, e, f]
};

/// Compiles `op` on `pattern` for `(batch, ld)` with `options` and checks it on guarded
/// operands (`test_support::check_kernel`): against the interpreter, guard zones, inputs,
/// and the output's padding wherever the kernel says it leaves it alone. The operand offset
/// follows the seed, so runs meet aligned and misaligned operands.
fn check(
    pattern: &Arc<Pattern>,
    op: Op,
    batch: usize,
    ld: usize,
    options: &JitOptions,
    seed: u64,
) -> Result<(), String> {
    let spec = KernelSpec::new("t", op, pattern.clone(), Dim::Fixed(batch), Dim::Fixed(ld))
        .map_err(|e| e.to_string())?;
    let kernel = JitKernel::compile_with(&spec, options).map_err(|e| e.to_string())?;
    let run = Run::new(batch, ld, seed).offset(seed as usize % 16);
    check_kernel(&kernel, run)
        .map(|_| ())
        .map_err(|e| format!("{e}, {options:?}"))
}

fn check_all_ops(pattern: &Arc<Pattern>, batch: usize, ld: usize, options: &JitOptions) {
    for (i, op) in OPS.into_iter().enumerate() {
        check(pattern, op, batch, ld, options, i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn small_chunks() -> JitOptions {
    JitOptions {
        chunk_nnz: 7,
        ..JitOptions::default()
    }
}

#[test]
fn named_edge_cases() {
    for (name, p) in named_patterns() {
        for (batch, ld) in [
            (1, 1),
            (1, 16),
            (3, 3),
            (3, 16),
            (5, 7),
            (8, 8),
            (17, 17),
            (17, 32),
        ] {
            for options in [JitOptions::default(), small_chunks()] {
                for (i, op) in OPS.into_iter().enumerate() {
                    check(&p, op, batch, ld, &options, i as u64)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                }
            }
        }
    }
}

#[test]
fn long_rows_in_small_chunks() {
    // rows of 300 and 129 nonzeros: longer than the chunk target and than sddmm's segment
    let p = test_support::named("long_rows");
    let options = JitOptions {
        chunk_nnz: 100,
        ..JitOptions::default()
    };
    for (batch, ld) in [(1, 1), (7, 8), (16, 16), (37, 40)] {
        check_all_ops(&p, batch, ld, &options);
    }
}

#[test]
fn named_batches() {
    let p = random(23, 41, 0.15, 2);
    for batch in [1usize, 3, 8, 17, 100, 128] {
        for ld in strides(batch) {
            check_all_ops(&p, batch, ld, &small_chunks());
        }
    }
}

#[test]
fn largest_lenet_layer() {
    let p = test_support::lenet_fc1();
    for (batch, ld) in [(1, 1), (8, 16), (100, 112)] {
        check_all_ops(&p, batch, ld, &JitOptions::default());
    }
}

#[test]
fn every_code_shape_option() {
    let p = random(19, 33, 0.3, 4);
    for accumulators in 1..=4 {
        for block_vectors in 1..=4 {
            let options = JitOptions {
                accumulators,
                block_vectors,
                chunk_nnz: 40,
                ..JitOptions::default()
            };
            for (batch, ld) in [(1, 2), (6, 6), (9, 16), (12, 16), (37, 37)] {
                check_all_ops(&p, batch, ld, &options);
            }
        }
    }
    let single_pass = JitOptions {
        regalloc: Regalloc::SinglePass,
        threads: 1,
        verifier: true,
        ..JitOptions::default()
    };
    check_all_ops(&p, 7, 8, &single_pass);
}

#[test]
fn estimates_code_size_without_compiling() {
    let p = random(120, 250, 0.06, 5);
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        for (batch, ld) in [(1, 16), (3, 16), (8, 16), (13, 16), (40, 48)] {
            let spec = KernelSpec::new("fc", op, p.clone(), Dim::Fixed(batch), Dim::Fixed(ld));
            let spec = spec.unwrap();
            let e = estimate(&spec).unwrap();
            let k = JitKernel::compile(&spec).unwrap();
            let actual = k.stats().code_bytes as f64;
            let ratio = e.code_bytes as f64 / actual;
            assert!(
                (0.8..1.25).contains(&ratio),
                "{op} batch {batch}: estimated {} bytes, compiled {actual}",
                e.code_bytes
            );
            assert_eq!(e.fits_l1i, e.code_bytes <= 24 * 1024);
        }
    }
    let any = KernelSpec::any_batch("fc", Op::SPMM, p.clone()).unwrap();
    assert!(estimate(&any).is_none());
    let grad = KernelSpec::new("fc", Op::DenseGrad, p, Dim::Fixed(1), Dim::Fixed(1)).unwrap();
    assert!(estimate(&grad).is_none());
}

#[test]
fn rejects_what_it_cannot_compile() {
    let p = Arc::new(Pattern::dense(3, 4).unwrap());
    let any = KernelSpec::any_batch("fc1", Op::SPMM, p.clone()).unwrap();
    let e = JitKernel::compile(&any).unwrap_err();
    assert!(matches!(e, BackendError::Unsupported { .. }), "{e}");
    assert!(
        e.to_string().contains("fc1") && e.to_string().contains("fixed"),
        "{e}"
    );
    let grad = KernelSpec::new(
        "fc1",
        Op::DenseGrad,
        p.clone(),
        Dim::Fixed(2),
        Dim::Fixed(2),
    );
    let e = JitKernel::compile(&grad.unwrap()).unwrap_err();
    assert!(e.to_string().contains("dense_grad"), "{e}");
    let spec = KernelSpec::new("fc1", Op::SPMM, p, Dim::Fixed(2), Dim::Fixed(4)).unwrap();
    let bad = JitOptions {
        accumulators: 5,
        ..JitOptions::default()
    };
    let e = JitKernel::compile_with(&spec, &bad).unwrap_err();
    assert!(e.to_string().contains("accumulators"), "{e}");
}

#[test]
fn refuses_rows_longer_than_one_function_takes() {
    // One function per row at least, compiled on one thread: a row over the bound is
    // refused at once (a 400,000-nonzero row took 16 s and 2.9 GB to compile).
    let long = MAX_ROW_NNZ + 1;
    let row = Arc::new(Pattern::dense(1, long).unwrap());
    let column = Arc::new(Pattern::dense(long, 1).unwrap());
    for (op, p) in [(Op::SPMM, &row), (Op::Sddmm, &row), (Op::SpmmT, &column)] {
        let spec = KernelSpec::new("wide", op, p.clone(), Dim::Fixed(8), Dim::Fixed(16)).unwrap();
        let start = std::time::Instant::now();
        let e = JitKernel::compile(&spec).unwrap_err();
        assert!(start.elapsed().as_secs_f64() < 1.0, "{:?}", start.elapsed());
        assert!(matches!(e, BackendError::Unsupported { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("wide") && text.contains(&format!("a row of {long} nonzeros")),
            "{text}"
        );
        assert!(estimate(&spec).is_none(), "{op}");
    }
    // The other walk of each pattern has rows of one nonzero, and compiles.
    for (op, p) in [(Op::SpmmT, &row), (Op::SPMM, &column)] {
        let spec = KernelSpec::new("wide", op, p.clone(), Dim::Fixed(8), Dim::Fixed(16)).unwrap();
        assert!(JitKernel::compile(&spec).is_ok(), "{op}");
    }
    // A row at the bound compiles.
    let at = Arc::new(Pattern::dense(1, MAX_ROW_NNZ).unwrap());
    let spec = KernelSpec::new("wide", Op::SPMM, at, Dim::Fixed(8), Dim::Fixed(16)).unwrap();
    assert!(estimate(&spec).is_some());
    assert_eq!(JitKernel::compile(&spec).unwrap().stats().functions, 1);
}

#[test]
fn functions_of_many_empty_rows_are_bounded_too() {
    // Every row costs code, an empty one too: 100,000 rows holding 3 nonzeros were one
    // function; now a chunk ends at 4·chunk_nnz rows as it does at 4·chunk_nnz nonzeros.
    let p = Arc::new(Pattern::from_coo(100_000, 10, &[(5, 1), (50_000, 2), (99_999, 3)]).unwrap());
    let chunks = codegen_cpu::jit::chunk_rows(&p, 1000);
    assert_eq!(chunks.len(), 25);
    assert!(chunks.iter().all(|c| c.len() <= 4000), "{chunks:?}");
    assert_eq!((chunks[0].start, chunks[24].end), (0, 100_000));
    let spec = KernelSpec::new("tall", Op::SPMM, p, Dim::Fixed(4), Dim::Fixed(16)).unwrap();
    assert_eq!(JitKernel::compile(&spec).unwrap().stats().functions, 25);
}

#[test]
fn refuses_convolution_rows_longer_than_one_function_takes() {
    use sparse_ir::ConvGeometry;
    let g = |in_channels| ConvGeometry {
        in_channels,
        height: 3,
        width: 3,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    let long = MAX_ROW_NNZ / 9 + 1; // channels whose 3x3 windows make a row over the bound
    let cases = [
        // conv/conv_grad: one output channel reading `long` input channels.
        (
            Op::Conv {
                bias: false,
                relu: false,
            },
            1,
            g(long),
        ),
        (Op::ConvGrad, 1, g(long)),
        // conv_t: one input channel written from `long` output channels.
        (Op::ConvT, long, g(1)),
    ];
    for (op, out, geometry) in cases {
        let p = Arc::new(Pattern::dense(out, geometry.pattern_cols()).unwrap());
        let spec = KernelSpec::conv("wide", op, p, geometry, Dim::Fixed(1), Dim::Fixed(1)).unwrap();
        let e = JitKernel::compile(&spec).unwrap_err();
        assert!(
            matches!(e, BackendError::Unsupported { .. })
                && e.to_string()
                    .contains(&format!("a row of {} nonzeros", 9 * long)),
            "{op}: {e}"
        );
    }
}

#[test]
fn checks_arguments_before_running() {
    let p = Arc::new(Pattern::dense(3, 4).unwrap());
    let spec = KernelSpec::new("fc2", Op::SPMM, p, Dim::Fixed(2), Dim::Fixed(4)).unwrap();
    let kernel = JitKernel::compile(&spec).unwrap();
    let values = vec![1.0; 12];
    let x = vec![1.0; 16];
    let mut y = vec![0.0; 11]; // needs 3·4
    let e = kernel
        .run(
            Launch::new(2, 4),
            Args::Spmm {
                values: &values,
                x: &x,
                bias: None,
                y: &mut y,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("y has 11 elements"), "{e}");
    let mut y = vec![0.0; 12];
    let e = kernel
        .run(
            Launch::new(2, 5),
            Args::Spmm {
                values: &values,
                x: &x,
                bias: None,
                y: &mut y,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("compiled for ld 4"), "{e}");
    let e = kernel
        .run(
            Launch::new(2, 4),
            Args::Spmm {
                values: &values[..11],
                x: &x,
                bias: None,
                y: &mut y,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("values"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_patterns_match_the_interpreter(
        rows in 1usize..40,
        cols in 1usize..40,
        density in 0.0f64..1.0,
        batch in prop_oneof![Just(1usize), 2usize..24, Just(100)],
        pad in 0usize..9,
        chunk_nnz in 1usize..300,
        accumulators in 1usize..=4,
        block_vectors in 1usize..=4,
        op in 0usize..OPS.len(),
        seed in any::<u64>(),
    ) {
        let pattern = random(rows, cols, density, seed);
        let options = JitOptions { chunk_nnz, accumulators, block_vectors, ..JitOptions::default() };
        let result = check(&pattern, OPS[op], batch, batch + pad, &options, seed);
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

/// `writes_padding` is exact: true exactly where the last `f32x4` block of `spmm`/`spmm_t`
/// runs over the padding, and then a run does write padding (where it is false the guarded
/// checks above prove the padding untouched).
#[test]
fn writes_padding_is_exact() {
    let p = random(9, 13, 0.4, 6);
    // (batch, ld, block_vectors, spmm and spmm_t write padding)
    let cases = [
        (1, 1, 1, false),
        (1, 16, 1, false),
        (3, 3, 1, false),
        (3, 16, 1, true),
        (5, 7, 1, false),
        (5, 8, 1, true),
        (8, 16, 1, false),
        (12, 16, 2, true),
        (12, 12, 2, false),
        (17, 32, 1, true),
        (100, 112, 1, false),
        (100, 112, 2, true),
    ];
    for (batch, ld, block_vectors, writes) in cases {
        let options = JitOptions {
            block_vectors,
            ..JitOptions::default()
        };
        for op in OPS {
            let spec = KernelSpec::new("t", op, p.clone(), Dim::Fixed(batch), Dim::Fixed(ld));
            let kernel = JitKernel::compile_with(&spec.unwrap(), &options).unwrap();
            let want = writes && op != Op::Sddmm;
            let what = format!("{op} batch {batch} ld {ld} block_vectors {block_vectors}");
            assert_eq!(
                sparse_ir::backend::Kernel::writes_padding(&kernel),
                want,
                "{what}"
            );
            if op == Op::Sddmm {
                continue; // its output is the value array: no padding
            }
            let mut operands = test_support::Operands::new(kernel.spec(), Run::new(batch, ld, 1));
            kernel.run(Launch::new(batch, ld), operands.args()).unwrap();
            let written = operands.out.get().chunks(ld).any(|row| {
                row[batch..]
                    .iter()
                    .any(|v| v.to_bits() != test_support::PAD_SENTINEL.to_bits())
            });
            assert_eq!(written, want, "{what}");
        }
    }
}
