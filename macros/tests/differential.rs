//! Differential tests: the functions `sparse_kernel!` generates against the interpreter.

use std::sync::Arc;

use macros::sparse_kernel;
use proptest::prelude::*;
use sparse_ir::{Args, Dim, KernelSpec, Op, Pattern};
use test_support::{Operands, Run};

sparse_kernel! {
    name = tiny,
    op = spmm,
    batch = any,
    mask = [[0, 1, 0], [1, 0, 1]],
}

sparse_kernel! {
    name = tiny_bias_relu_b3,
    op = spmm(bias, relu),
    batch = 3,
    mask = [[0, 1, 0], [1, 0, 1], [0, 0, 0]],
}

sparse_kernel! {
    name = fc2_any,
    op = spmm(bias, relu),
    batch = any,
    mask_file = "tests/masks/fc2_100x300_5pct.npy",
}

sparse_kernel! {
    name = fc2_b1,
    op = spmm(bias),
    batch = 1,
    mask_file = "tests/masks/fc2_100x300_5pct.npy",
}

sparse_kernel! {
    name = edge_relu,
    op = spmm(relu),
    batch = any,
    mask_file = "tests/masks/edge_7x96.npy",
}

sparse_kernel! {
    name = conv_infer,
    op = spmm(bias),
    batch = any,
    mask_file = "tests/masks/conv_4x2x3x3.safetensors",
    tensor = "conv.mask",
    values_file = "tests/masks/conv_4x2x3x3.safetensors",
    values_tensor = "conv.weight",
}

sparse_kernel! {
    name = empty_column,
    op = spmm(bias),
    batch = any,
    mask = [[1, 0, 1], [0, 0, 1]],
}

sparse_kernel! {
    name = all_zero,
    op = spmm(bias, relu),
    batch = any,
    mask = [[0, 0], [0, 0], [0, 0]],
}

sparse_kernel! {
    name = one_nonzero,
    op = spmm,
    batch = 17,
    mask = [[0, 0, 0, 0], [0, 0, 1, 0]],
}

// The code shape's edge cases: rows of 0, 1, 2, 3, 4, 5 and 9 nonzeros (the batch-1
// accumulators are filled round robin), batch 1 through the unrolled code and every width of
// the batch loop (full blocks, the block that reads padding, 8/4/1-column tails).
sparse_kernel! {
    name = row_lengths,
    op = spmm(bias, relu),
    batch = any,
    mask = [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
        [1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1],
    ],
}

sparse_kernel! {
    name = row_lengths_b1,
    op = spmm,
    batch = 1,
    mask = [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
        [1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1],
    ],
}

sparse_kernel! {
    name = one_nonzero_any,
    op = spmm(bias),
    batch = any,
    mask = [[0, 0, 0], [0, 1, 0]],
}

sparse_kernel! {
    name = edge_b100,
    op = spmm(bias, relu),
    batch = 100,
    mask_file = "tests/masks/edge_7x96.npy",
}

sparse_kernel! {
    name = wide_any,
    op = spmm(relu),
    batch = any,
    mask_file = "tests/masks/wide_3x5000.npy",
}

sparse_kernel! {
    name = wide_b1,
    op = spmm(bias),
    batch = 1,
    mask_file = "tests/masks/wide_3x5000.npy",
}

// `fma = true` versions: the fused code when this crate is built with the `fma` target
// feature (the workspace's `.cargo/config.toml`), the plain code otherwise.
sparse_kernel! {
    name = row_lengths_fma,
    op = spmm(bias, relu),
    batch = any,
    mask = [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
        [1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1],
    ],
    fma = true,
}

sparse_kernel! {
    name = fc2_any_fma,
    op = spmm(bias, relu),
    batch = any,
    mask_file = "tests/masks/fc2_100x300_5pct.npy",
    fma = true,
}

sparse_kernel! {
    name = edge_relu_fma,
    op = spmm(relu),
    batch = any,
    mask_file = "tests/masks/edge_7x96.npy",
    fma = false,
}

sparse_kernel! {
    name = conv_infer_fma,
    op = spmm(bias),
    batch = any,
    mask_file = "tests/masks/conv_4x2x3x3.safetensors",
    tensor = "conv.mask",
    values_file = "tests/masks/conv_4x2x3x3.safetensors",
    values_tensor = "conv.weight",
    fma = true,
}

fn masks_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/masks")
}

fn pattern_of(row_ptr: &[u32], col_idx: &[u32], rows: usize, cols: usize) -> Arc<Pattern> {
    Arc::new(Pattern::from_csr(rows, cols, row_ptr.to_vec(), col_idx.to_vec()).unwrap())
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift), so failures reproduce.
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

type RunFn = fn(&[f32], &[f32], Option<&[f32]>, &mut [f32], usize, usize) -> Result<(), String>;

/// Runs a generated kernel on the guarded operands of `test-support` (with `vals` as the
/// weight values) and checks it against the interpreter: the tolerance, guard zones around
/// every operand (offsets from a cache line follow the seed), inputs unchanged, and the
/// output's padding columns untouched (generated kernels never write them).
fn check(
    pattern: Arc<Pattern>,
    op: Op,
    vals: &[f32],
    run: RunFn,
    batch: usize,
    ld: usize,
    seed: u64,
) {
    let spec = KernelSpec::new("k", op, pattern, Dim::Any, Dim::Any).unwrap();
    let at = Run::new(batch, ld, seed).offset(seed as usize % 16);
    let mut operands = Operands::new(&spec, at).with_values(vals);
    let want = operands.reference(&spec).unwrap();
    let Args::Spmm { values, x, bias, y } = operands.args() else {
        unreachable!("sparse_kernel! generates spmm")
    };
    run(values, x, bias, y, batch, ld)
        .unwrap_or_else(|e| panic!("{}: {e}", test_support::describe(&spec, at)));
    if let Err(e) = operands.verify(&want, false) {
        panic!("{}: {e}", test_support::describe(&spec, at));
    }
}

macro_rules! runner {
    ($m:ident, bias) => {
        |v: &[f32], x: &[f32], b: Option<&[f32]>, y: &mut [f32], batch, ld| {
            $m::run(v, x, b.unwrap(), y, batch, ld).map_err(|e| e.to_string())
        }
    };
    ($m:ident) => {
        |v: &[f32], x: &[f32], _b: Option<&[f32]>, y: &mut [f32], batch, ld| {
            $m::run(v, x, y, batch, ld).map_err(|e| e.to_string())
        }
    };
}

#[test]
fn inline_mask_constants() {
    assert_eq!((tiny::ROWS, tiny::COLS, tiny::NNZ), (2, 3, 3));
    assert_eq!(tiny::ROW_PTR, [0, 1, 3]);
    assert_eq!(tiny::COL_IDX, [1, 0, 2]);
    assert_eq!(tiny::BATCH, None);
    assert_eq!(tiny_bias_relu_b3::BATCH, Some(3));
}

#[test]
fn hand_computed_tiny() {
    // W = [[0, 2, 0], [3, 0, -1]], x = [[1, 2], [10, 20], [100, 200]] (cols × batch 2)
    let w = [2.0, 3.0, -1.0];
    let x = [1.0, 2.0, 10.0, 20.0, 100.0, 200.0];
    let mut y = [0.0; 4];
    tiny::run(&w, &x, &mut y, 2, 2).unwrap();
    assert_eq!(y, [20.0, 40.0, -97.0, -194.0]);
    let mut y = [0.0; 9];
    tiny_bias_relu_b3::run(
        &w,
        &[1.0, 0.0, 0.0, 10.0, 0.0, 0.0, 100.0, 0.0, 0.0],
        &[0.5, 0.5, -2.0],
        &mut y,
        3,
        3,
    )
    .unwrap();
    assert_eq!(y, [20.5, 0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0]);
}

#[test]
fn file_masks_match_the_mask_reader() {
    let fc2 =
        sparse_ir::mask_io::read_mask(masks_dir().join("fc2_100x300_5pct.npy"), None).unwrap();
    assert_eq!(fc2.pattern.row_ptr(), &fc2_any::ROW_PTR[..]);
    assert_eq!(fc2.pattern.col_idx(), &fc2_any::COL_IDX[..]);
    let conv = sparse_ir::mask_io::read_mask(
        masks_dir().join("conv_4x2x3x3.safetensors"),
        Some("conv.mask"),
    )
    .unwrap();
    assert_eq!((conv_infer::ROWS, conv_infer::COLS), (4, 18));
    assert_eq!(conv.pattern.col_idx(), &conv_infer::COL_IDX[..]);
    // baked values are the dense weights under the mask, in CSR order
    let w = sparse_ir::mask_io::read_f32_tensor(
        masks_dir().join("conv_4x2x3x3.safetensors"),
        Some("conv.weight"),
    )
    .unwrap();
    let mut k = 0;
    for r in 0..4 {
        for &c in conv.pattern.row(r) {
            assert_eq!(conv_infer::VALUES[k], w.data[r * 18 + c as usize]);
            k += 1;
        }
    }
}

#[test]
fn named_edge_cases() {
    let p = pattern_of(&edge_relu::ROW_PTR, &edge_relu::COL_IDX, 7, 96);
    assert!(p.row_counts().any(|c| c == 0), "fixture has an empty row");
    assert!(p.row_counts().any(|c| c == 96), "fixture has a full row");
    let v = values(3, p.nnz());
    for (batch, ld) in [
        (1, 1),
        (1, 5),
        (3, 3),
        (17, 17),
        (17, 32),
        (100, 112),
        (128, 128),
    ] {
        check(
            p.clone(),
            Op::Spmm {
                bias: false,
                relu: true,
            },
            &v,
            runner!(edge_relu),
            batch,
            ld,
            7,
        );
    }
    let p = pattern_of(&empty_column::ROW_PTR, &empty_column::COL_IDX, 2, 3);
    assert_eq!(p.col_counts()[1], 0);
    for (batch, ld) in [(1, 1), (3, 4), (17, 17)] {
        check(
            p.clone(),
            Op::Spmm {
                bias: true,
                relu: false,
            },
            &values(1, 3),
            runner!(empty_column, bias),
            batch,
            ld,
            2,
        );
    }
    let p = pattern_of(&all_zero::ROW_PTR, &all_zero::COL_IDX, 3, 2);
    assert_eq!(p.nnz(), 0);
    check(
        p,
        Op::Spmm {
            bias: true,
            relu: true,
        },
        &[],
        runner!(all_zero, bias),
        5,
        8,
        3,
    );
    let p = pattern_of(&one_nonzero::ROW_PTR, &one_nonzero::COL_IDX, 2, 4);
    check(p, Op::SPMM, &[0.75], runner!(one_nonzero), 17, 20, 4);
    let p = pattern_of(&fc2_b1::ROW_PTR, &fc2_b1::COL_IDX, 100, 300);
    let v = values(5, p.nnz());
    for ld in [1, 3, 16] {
        check(
            p.clone(),
            Op::Spmm {
                bias: true,
                relu: false,
            },
            &v,
            runner!(fc2_b1, bias),
            1,
            ld,
            9,
        );
    }
    let p = pattern_of(&conv_infer::ROW_PTR, &conv_infer::COL_IDX, 4, 18);
    let infer = |_v: &[f32], x: &[f32], b: Option<&[f32]>, y: &mut [f32], batch, ld| {
        conv_infer::infer(x, b.unwrap(), y, batch, ld).map_err(|e| e.to_string())
    };
    check(
        p,
        Op::Spmm {
            bias: true,
            relu: false,
        },
        &conv_infer::VALUES,
        infer,
        9,
        9,
        11,
    );
}

#[test]
fn bad_arguments_are_errors() {
    let w = [1.0; 3];
    let mut y = [0.0; 4];
    let e = tiny::run(&w[..2], &[0.0; 6], &mut y, 2, 2).unwrap_err();
    assert_eq!(e.to_string(), "values has 2 elements, needs 3");
    let e = tiny::run(&w, &[0.0; 5], &mut y, 2, 2).unwrap_err();
    assert_eq!(e.to_string(), "x has 5 elements, needs 6");
    let e = tiny::run(&w, &[0.0; 6], &mut y[..3], 2, 2).unwrap_err();
    assert_eq!(e.to_string(), "y has 3 elements, needs 4");
    let e = tiny::run(&w, &[0.0; 6], &mut y, 2, 1).unwrap_err();
    assert_eq!(e.to_string(), "ld = 1 is smaller than batch = 2");
    let e = tiny::run(&w, &[0.0; 6], &mut y, 0, 2).unwrap_err();
    assert_eq!(e.to_string(), "batch must be at least 1, got 0");
    let mut y = [0.0; 9];
    let e = tiny_bias_relu_b3::run(&w, &[0.0; 9], &[0.0; 3], &mut y, 2, 3).unwrap_err();
    assert_eq!(e.to_string(), "kernel generated for batch 3, called with 2");
    let e = tiny_bias_relu_b3::run(&w, &[0.0; 9], &[0.0; 2], &mut y, 3, 3).unwrap_err();
    assert_eq!(e.to_string(), "bias has 2 elements, needs 3");
}

/// Every (batch, ld) the new code shape treats differently: batch 1 contiguous and gathered;
/// batches below, at and above one block; tails of 8, 4 and 1–3 columns; with `ld == batch`
/// (narrow tails) and `ld` with room for the padding-reading last block.
const SHAPE_CASES: [(usize, usize); 14] = [
    (1, 1),
    (1, 2),
    (1, 16),
    (3, 3),
    (3, 16),
    (16, 16),
    (17, 17),
    (17, 32),
    (29, 29),
    (31, 31),
    (100, 100),
    (100, 112),
    (128, 128),
    (130, 133),
];

#[test]
fn code_shape_edge_cases() {
    let p = pattern_of(&row_lengths::ROW_PTR, &row_lengths::COL_IDX, 7, 12);
    let counts: Vec<usize> = p.row_counts().collect();
    assert_eq!(counts, [0, 1, 2, 3, 4, 5, 9]);
    let v = values(21, p.nnz());
    let bias_relu = Op::Spmm {
        bias: true,
        relu: true,
    };
    for (batch, ld) in SHAPE_CASES {
        check(
            p.clone(),
            bias_relu,
            &v,
            runner!(row_lengths, bias),
            batch,
            ld,
            batch as u64,
        );
    }
    for ld in [1, 2, 5] {
        check(
            p.clone(),
            Op::SPMM,
            &v,
            runner!(row_lengths_b1),
            1,
            ld,
            30 + ld as u64,
        );
    }

    let p = pattern_of(&one_nonzero_any::ROW_PTR, &one_nonzero_any::COL_IDX, 2, 3);
    assert_eq!(p.nnz(), 1);
    for (batch, ld) in SHAPE_CASES {
        check(
            p.clone(),
            Op::Spmm {
                bias: true,
                relu: false,
            },
            &[-1.5],
            runner!(one_nonzero_any, bias),
            batch,
            ld,
            40 + batch as u64,
        );
    }

    let p = pattern_of(&edge_b100::ROW_PTR, &edge_b100::COL_IDX, 7, 96);
    let v = values(22, p.nnz());
    for ld in [100, 101, 112, 116] {
        check(
            p.clone(),
            bias_relu,
            &v,
            runner!(edge_b100, bias),
            100,
            ld,
            50 + ld as u64,
        );
    }

    let p = pattern_of(&wide_any::ROW_PTR, &wide_any::COL_IDX, 3, 5000);
    let counts: Vec<usize> = p.row_counts().collect();
    assert!(
        counts[0] > 10 && counts[1] == 0 && counts[2] == 1,
        "{counts:?}"
    );
    let v = values(23, p.nnz());
    for (batch, ld) in [(1, 1), (1, 3), (3, 3), (17, 20)] {
        check(
            p.clone(),
            Op::Spmm {
                bias: false,
                relu: true,
            },
            &v,
            runner!(wide_any),
            batch,
            ld,
            60 + ld as u64,
        );
    }
    for ld in [1, 4] {
        check(
            p.clone(),
            Op::Spmm {
                bias: true,
                relu: false,
            },
            &v,
            runner!(wide_b1, bias),
            1,
            ld,
            70 + ld as u64,
        );
    }
}

#[test]
fn empty_rows_give_positive_zero() {
    // edge_7x96's row 2 is empty; without bias its outputs are exactly +0.0 on every path
    let v = values(5, edge_relu::NNZ);
    for (batch, ld) in [(1, 1), (1, 4), (3, 3), (17, 17), (100, 112)] {
        let x = values(6, 96 * ld);
        let mut y = vec![f32::NAN; 7 * ld];
        edge_relu::run(&v, &x, &mut y, batch, ld).unwrap();
        for b in 0..batch {
            assert_eq!(y[2 * ld + b].to_bits(), 0, "batch {batch}, column {b}");
        }
    }
}

#[test]
fn fused_kernels_match_the_interpreter() {
    // `FMA` says which arithmetic was compiled: fused exactly where it was asked for and the
    // target has the feature.
    const { assert!(!tiny::FMA && !edge_relu_fma::FMA, "not asked for") };
    assert_eq!(row_lengths_fma::FMA, cfg!(target_feature = "fma"));
    assert_eq!(conv_infer_fma::FMA, cfg!(target_feature = "fma"));
    if !row_lengths_fma::FMA {
        eprintln!(
            "note: built without the fma target feature (RUSTFLAGS overriding the workspace's \
             .cargo/config.toml?): the `fma = true` kernels below run their plain code"
        );
    }
    let p = pattern_of(&row_lengths_fma::ROW_PTR, &row_lengths_fma::COL_IDX, 7, 12);
    let v = values(24, p.nnz());
    let bias_relu = Op::Spmm {
        bias: true,
        relu: true,
    };
    for (batch, ld) in SHAPE_CASES {
        check(
            p.clone(),
            bias_relu,
            &v,
            runner!(row_lengths_fma, bias),
            batch,
            ld,
            80 + batch as u64,
        );
    }
    let p = pattern_of(&fc2_any_fma::ROW_PTR, &fc2_any_fma::COL_IDX, 100, 300);
    let v = values(25, p.nnz());
    for (batch, ld) in [(1, 1), (1, 16), (8, 8), (100, 112)] {
        check(
            p.clone(),
            bias_relu,
            &v,
            runner!(fc2_any_fma, bias),
            batch,
            ld,
            90 + ld as u64,
        );
    }
    let p = pattern_of(&edge_relu_fma::ROW_PTR, &edge_relu_fma::COL_IDX, 7, 96);
    check(
        p,
        Op::Spmm {
            bias: false,
            relu: true,
        },
        &values(26, edge_relu_fma::NNZ),
        runner!(edge_relu_fma),
        1,
        1,
        27,
    );
    let p = pattern_of(&conv_infer_fma::ROW_PTR, &conv_infer_fma::COL_IDX, 4, 18);
    let infer = |_v: &[f32], x: &[f32], b: Option<&[f32]>, y: &mut [f32], batch, ld| {
        conv_infer_fma::infer(x, b.unwrap(), y, batch, ld).map_err(|e| e.to_string())
    };
    for (batch, ld) in [(1, 1), (1, 3), (9, 9)] {
        check(
            p.clone(),
            Op::Spmm {
                bias: true,
                relu: false,
            },
            &conv_infer_fma::VALUES,
            infer,
            batch,
            ld,
            28,
        );
    }
}

#[test]
fn huge_ld_is_an_error_not_an_overflow() {
    let mut y = [0.0; 4];
    let e = tiny::run(&[1.0; 3], &[0.0; 6], &mut y, 1, usize::MAX / 2).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("x has 6 elements, needs {}", usize::MAX)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn fc2_any_batch_and_stride(batch in 1usize..=130, pad in 0usize..20, seed in any::<u64>()) {
        let p = pattern_of(&fc2_any::ROW_PTR, &fc2_any::COL_IDX, 100, 300);
        let v = values(seed, p.nnz());
        check(p, Op::Spmm { bias: true, relu: true }, &v, runner!(fc2_any, bias), batch, batch + pad, seed ^ 1);
    }

    #[test]
    fn row_lengths_any_batch_and_stride(batch in 1usize..=140, pad in 0usize..40, seed in any::<u64>()) {
        let p = pattern_of(&row_lengths::ROW_PTR, &row_lengths::COL_IDX, 7, 12);
        let v = values(seed, p.nnz());
        check(p, Op::Spmm { bias: true, relu: true }, &v, runner!(row_lengths, bias), batch, batch + pad, seed ^ 2);
    }

    #[test]
    fn fc2_any_fma_batch_and_stride(batch in 1usize..=130, pad in 0usize..20, seed in any::<u64>()) {
        let p = pattern_of(&fc2_any_fma::ROW_PTR, &fc2_any_fma::COL_IDX, 100, 300);
        let v = values(seed, p.nnz());
        check(p, Op::Spmm { bias: true, relu: true }, &v, runner!(fc2_any_fma, bias), batch, batch + pad, seed ^ 3);
    }
}
