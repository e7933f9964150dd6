//! Differential tests of the Cranelift JIT against the reference interpreter.

use std::sync::Arc;

use codegen_cpu::jit::{estimate, JitKernel, JitOptions, Regalloc};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::interp::{compare, reference};
use sparse_ir::{Args, BackendError, Dim, KernelSpec, Launch, Op, Pattern};

/// Every op the JIT compiles: all of [`Op::ALL`] but `dense_grad`.
const OPS: [Op; 6] = {
    let [a, b, c, d, e, f, _dense_grad] = Op::ALL;
    [a, b, c, d, e, f]
};

fn random_pattern(rows: usize, cols: usize, density: f64, rng: &mut ChaCha8Rng) -> Pattern {
    let mask: Vec<u8> = (0..rows * cols)
        .map(|_| u8::from(rng.random_bool(density)))
        .collect();
    Pattern::from_dense_mask(rows, cols, &mask).unwrap()
}

fn random_vec(len: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A `features × ld` matrix with random values in the batch columns and NaN in the padding
/// (a kernel that mixes padding into real outputs fails the comparison).
fn random_matrix(features: usize, batch: usize, ld: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut m = vec![f32::NAN; features * ld];
    for f in 0..features {
        for b in 0..batch {
            m[f * ld + b] = rng.random_range(-1.0f32..1.0);
        }
    }
    m
}

/// Compiles `op` on `pattern` for `(batch, ld)`, runs it on random data and compares every
/// output element with the interpreter. Outputs start as NaN, so unwritten elements fail.
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
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (rows, cols, nnz) = (pattern.rows(), pattern.cols(), pattern.nnz());
    let values = random_vec(nnz, &mut rng);
    let launch = Launch::new(batch, ld);
    let (want, got) = match op {
        Op::Spmm { bias, .. } => {
            let x = random_matrix(cols, batch, ld, &mut rng);
            let b = random_vec(rows, &mut rng);
            let bias = bias.then_some(&b[..]);
            let mut y = vec![f32::NAN; rows * ld];
            let mut dummy = vec![0.0; rows * ld];
            let want = reference(
                &spec,
                launch,
                &Args::Spmm {
                    values: &values,
                    x: &x,
                    bias,
                    y: &mut dummy,
                },
            )
            .map_err(|e| e.to_string())?;
            kernel
                .run(
                    launch,
                    Args::Spmm {
                        values: &values,
                        x: &x,
                        bias,
                        y: &mut y,
                    },
                )
                .map_err(|e| e.to_string())?;
            (want, y)
        }
        Op::SpmmT => {
            let dy = random_matrix(rows, batch, ld, &mut rng);
            let mut dx = vec![f32::NAN; cols * ld];
            let mut dummy = vec![0.0; cols * ld];
            let want = reference(
                &spec,
                launch,
                &Args::SpmmT {
                    values: &values,
                    dy: &dy,
                    dx: &mut dummy,
                },
            )
            .map_err(|e| e.to_string())?;
            kernel
                .run(
                    launch,
                    Args::SpmmT {
                        values: &values,
                        dy: &dy,
                        dx: &mut dx,
                    },
                )
                .map_err(|e| e.to_string())?;
            (want, dx)
        }
        Op::Sddmm => {
            let dy = random_matrix(rows, batch, ld, &mut rng);
            let x = random_matrix(cols, batch, ld, &mut rng);
            let mut dw = vec![f32::NAN; nnz];
            let mut dummy = vec![0.0; nnz];
            let want = reference(
                &spec,
                launch,
                &Args::Sddmm {
                    dy: &dy,
                    x: &x,
                    dw: &mut dummy,
                },
            )
            .map_err(|e| e.to_string())?;
            kernel
                .run(
                    launch,
                    Args::Sddmm {
                        dy: &dy,
                        x: &x,
                        dw: &mut dw,
                    },
                )
                .map_err(|e| e.to_string())?;
            (want, dw)
        }
        Op::DenseGrad => unreachable!(),
    };
    compare(&want, &got, ld).map_err(|m| {
        format!(
            "{op} on {}x{} nnz {nnz}, batch {batch}, ld {ld}, {options:?}: {m}",
            rows, cols
        )
    })
}

fn check_all_ops(pattern: &Pattern, batch: usize, ld: usize, options: &JitOptions) {
    let pattern = Arc::new(pattern.clone());
    for (i, op) in OPS.into_iter().enumerate() {
        check(&pattern, op, batch, ld, options, i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn small_chunks() -> JitOptions {
    JitOptions {
        chunk_nnz: 7,
        ..JitOptions::default()
    }
}

#[test]
fn edge_case_patterns() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // empty rows and empty columns
    let holes = Pattern::from_coo(6, 5, &[(0, 0), (0, 3), (2, 1), (2, 3), (5, 0)]).unwrap();
    let one = Pattern::from_coo(4, 9, &[(2, 7)]).unwrap();
    let mut dense_row = vec![0u8; 5 * 40];
    dense_row[2 * 40..3 * 40].fill(1);
    dense_row[7] = 1;
    let dense_row = Pattern::from_dense_mask(5, 40, &dense_row).unwrap();
    let zero = Pattern::empty(8, 6).unwrap();
    let full = Pattern::dense(5, 6).unwrap();
    let odd = random_pattern(7, 96, 0.2, &mut rng);
    for p in [&holes, &one, &dense_row, &zero, &full, &odd] {
        for (batch, ld) in [(1, 1), (1, 16), (3, 3), (3, 16), (5, 7), (17, 17), (17, 32)] {
            check_all_ops(p, batch, ld, &JitOptions::default());
            check_all_ops(p, batch, ld, &small_chunks());
        }
    }
}

#[test]
fn long_rows() {
    // rows of 300 and 129 nonzeros: longer than the chunk target and than sddmm's segment
    let mut mask = vec![0u8; 4 * 300];
    mask[300..600].fill(1);
    mask[900..1029].fill(1);
    mask[5] = 1;
    let p = Pattern::from_dense_mask(4, 300, &mask).unwrap();
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
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let p = random_pattern(23, 41, 0.15, &mut rng);
    for batch in [1usize, 3, 17, 100, 128] {
        for ld in [batch, batch.next_multiple_of(16), batch + 3] {
            check_all_ops(&p, batch, ld, &small_chunks());
        }
    }
}

#[test]
fn largest_lenet_layer() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let p = random_pattern(300, 784, 0.05, &mut rng);
    for (batch, ld) in [(1, 1), (8, 16), (100, 112)] {
        check_all_ops(&p, batch, ld, &JitOptions::default());
    }
}

#[test]
fn every_code_shape_option() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let p = random_pattern(19, 33, 0.3, &mut rng);
    for accumulators in 1..=4 {
        for block_vectors in 1..=4 {
            let options = JitOptions {
                accumulators,
                block_vectors,
                chunk_nnz: 40,
                ..JitOptions::default()
            };
            for (batch, ld) in [(1, 2), (6, 6), (9, 16), (37, 37)] {
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
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let p = Arc::new(random_pattern(120, 250, 0.06, &mut rng));
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
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let pattern = Arc::new(random_pattern(rows, cols, density, &mut rng));
        let options = JitOptions { chunk_nnz, accumulators, block_vectors, ..JitOptions::default() };
        let result = check(&pattern, OPS[op], batch, batch + pad, &options, seed);
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}
