//! Tests of the reference interpreter against hand-computed results, for every op, and of its
//! argument checks and of `interp::compare`.
//!
//! The main example is the 3 × 5 pattern
//!
//! ```text
//!        c0 c1 c2 c3 c4
//! row 0:  .  1  .  2  .      values in CSR order: [1, 2, 3, 4, 5]
//! row 1:  .  .  .  .  .      (row 1 is empty, column 4 is empty)
//! row 2:  3  4  5  .  .
//! ```
//!
//! with batch 2 and row stride `ld = 3`, so every activation matrix has one padding column.
//! All inputs and results are exactly representable in `f32`, so results are compared exactly.

use std::sync::Arc;

use proptest::prelude::*;
use sparse_ir::interp::{self, OutputLayout};
use sparse_ir::{Args, BackendError, Dim, KernelSpec, Launch, Op, Pattern};

/// What the padding columns of inputs hold (must never influence a result).
const IN_PAD: f32 = 1.0e6;
/// What output buffers hold before a run (must be overwritten in columns `0..batch` and left
/// alone in the padding columns).
const SENTINEL: f32 = -777.0;

const BIAS: Op = Op::Spmm {
    bias: true,
    relu: false,
};
const RELU: Op = Op::Spmm {
    bias: false,
    relu: true,
};
const BIAS_RELU: Op = Op::Spmm {
    bias: true,
    relu: true,
};

fn example() -> Arc<Pattern> {
    Arc::new(Pattern::from_csr(3, 5, vec![0, 2, 2, 5], vec![1, 3, 0, 1, 2]).unwrap())
}

const VALUES: [f32; 5] = [1.0, 2.0, 3.0, 4.0, 5.0];

/// `X`, 5 × 2: rows x0..x4.
const X: [[f32; 2]; 5] = [
    [1.0, -1.0],
    [2.0, 0.5],
    [-3.0, 1.0],
    [0.25, 4.0],
    [100.0, 100.0],
];

/// `dY`, 3 × 2.
const DY: [[f32; 2]; 3] = [[1.0, 2.0], [5.0, -5.0], [-1.0, 0.5]];

/// A feature-major matrix with row stride `ld`, padding columns set to `pad`.
fn matrix<const B: usize>(rows: &[[f32; B]], ld: usize, pad: f32) -> Vec<f32> {
    assert!(ld >= B);
    let mut out = vec![pad; rows.len() * ld];
    for (f, row) in rows.iter().enumerate() {
        out[f * ld..f * ld + B].copy_from_slice(row);
    }
    out
}

/// Asserts columns `0..B` of each row equal `want` and the padding columns still hold the
/// sentinel.
#[track_caller]
fn assert_matrix<const B: usize>(got: &[f32], want: &[[f32; B]], ld: usize) {
    assert_eq!(got.len(), want.len() * ld, "buffer length");
    for (f, row) in want.iter().enumerate() {
        assert_eq!(&got[f * ld..f * ld + B], row, "row {f}");
        for (b, &v) in got[f * ld + B..(f + 1) * ld].iter().enumerate() {
            assert_eq!(
                v,
                SENTINEL,
                "padding column {} of row {f} was written",
                B + b
            );
        }
    }
}

fn spec(op: Op, p: &Arc<Pattern>) -> KernelSpec {
    KernelSpec::any_batch("fc1", op, Arc::clone(p)).unwrap()
}

fn run_spmm(op: Op, p: &Arc<Pattern>, bias: Option<&[f32]>, ld: usize) -> Vec<f32> {
    let x = matrix(&X, ld, IN_PAD);
    let mut y = vec![SENTINEL; p.rows() * ld];
    interp::run(
        &spec(op, p),
        Launch::new(2, ld),
        Args::Spmm {
            values: &VALUES,
            x: &x,
            bias,
            y: &mut y,
        },
    )
    .unwrap();
    y
}

// W·X by hand:
//   row 0: 1·x1 + 2·x3        = [2 + 0.5, 0.5 + 8]      = [2.5, 8.5]
//   row 1: (empty)            = [0, 0]
//   row 2: 3·x0 + 4·x1 + 5·x2 = [3 + 8 - 15, -3 + 2 + 5] = [-4, 4]
const BIAS_VEC: [f32; 3] = [0.5, -1.0, 1.0];

#[test]
fn spmm_plain() {
    let y = run_spmm(Op::SPMM, &example(), None, 3);
    assert_matrix(&y, &[[2.5, 8.5], [0.0, 0.0], [-4.0, 4.0]], 3);
}

#[test]
fn spmm_bias() {
    let y = run_spmm(BIAS, &example(), Some(&BIAS_VEC), 3);
    // The empty row gives the bias alone.
    assert_matrix(&y, &[[3.0, 9.0], [-1.0, -1.0], [-3.0, 5.0]], 3);
}

#[test]
fn spmm_relu() {
    let y = run_spmm(RELU, &example(), None, 3);
    assert_matrix(&y, &[[2.5, 8.5], [0.0, 0.0], [0.0, 4.0]], 3);
}

#[test]
fn spmm_bias_relu() {
    // ReLU applies after the bias: row 1 is max(0, -1) = 0, row 2 is [max(0, -3), 5].
    let y = run_spmm(BIAS_RELU, &example(), Some(&BIAS_VEC), 3);
    assert_matrix(&y, &[[3.0, 9.0], [0.0, 0.0], [0.0, 5.0]], 3);
}

#[test]
fn spmm_ld_equal_batch_and_wide_ld() {
    // Same result whatever the stride; with ld = 16 fourteen padding columns stay untouched.
    for ld in [2, 16] {
        let y = run_spmm(Op::SPMM, &example(), None, ld);
        assert_matrix(&y, &[[2.5, 8.5], [0.0, 0.0], [-4.0, 4.0]], ld);
    }
}

#[test]
fn spmm_t_by_hand() {
    // dX = Wᵀ·dY:
    //   c0: 3·dy2          = [-3, 1.5]
    //   c1: 1·dy0 + 4·dy2  = [1 - 4, 2 + 2] = [-3, 4]
    //   c2: 5·dy2          = [-5, 2.5]
    //   c3: 2·dy0          = [2, 4]
    //   c4: (empty column) = [0, 0]
    // dy1 meets only the empty row 1, so it contributes nothing.
    let p = example();
    let dy = matrix(&DY, 3, IN_PAD);
    let mut dx = vec![SENTINEL; 5 * 3];
    interp::run(
        &spec(Op::SpmmT, &p),
        Launch::new(2, 3),
        Args::SpmmT {
            values: &VALUES,
            dy: &dy,
            dx: &mut dx,
        },
    )
    .unwrap();
    assert_matrix(
        &dx,
        &[
            [-3.0, 1.5],
            [-3.0, 4.0],
            [-5.0, 2.5],
            [2.0, 4.0],
            [0.0, 0.0],
        ],
        3,
    );
}

#[test]
fn sddmm_by_hand() {
    // dW[k] = dY[r_k]·X[c_k]:
    //   (0,1): [1,2]·[2,0.5]     = 3
    //   (0,3): [1,2]·[0.25,4]    = 8.25
    //   (2,0): [-1,0.5]·[1,-1]   = -1.5
    //   (2,1): [-1,0.5]·[2,0.5]  = -1.75
    //   (2,2): [-1,0.5]·[-3,1]   = 3.5
    let p = example();
    let (dy, x) = (matrix(&DY, 3, IN_PAD), matrix(&X, 3, IN_PAD));
    let mut dw = vec![SENTINEL; 5];
    interp::run(
        &spec(Op::Sddmm, &p),
        Launch::new(2, 3),
        Args::Sddmm {
            dy: &dy,
            x: &x,
            dw: &mut dw,
        },
    )
    .unwrap();
    assert_eq!(dw, [3.0, 8.25, -1.5, -1.75, 3.5]);
}

#[test]
fn dense_grad_by_hand() {
    // G[r, c] = dY[r]·X[c] for every (r, c), masked entries included.
    let p = example();
    let (dy, x) = (matrix(&DY, 3, IN_PAD), matrix(&X, 3, IN_PAD));
    let mut grad = vec![SENTINEL; 15];
    interp::run(
        &spec(Op::DenseGrad, &p),
        Launch::new(2, 3),
        Args::DenseGrad {
            dy: &dy,
            x: &x,
            grad: &mut grad,
        },
    )
    .unwrap();
    #[rustfmt::skip]
    let want = [
        // x0     x1     x2     x3      x4
        -1.0,   3.0,  -1.0,   8.25,  300.0, // dy0 = [1, 2]
        10.0,   7.5, -20.0, -18.75,    0.0, // dy1 = [5, -5]
        -1.5, -1.75,   3.5,   1.75,  -50.0, // dy2 = [-1, 0.5]
    ];
    assert_eq!(grad, want);
}

#[test]
fn all_zero_pattern() {
    let p = Arc::new(Pattern::empty(3, 5).unwrap());
    let x = matrix(&X, 3, IN_PAD);
    let dy = matrix(&DY, 3, IN_PAD);

    // spmm overwrites with zeros; with bias and ReLU it gives relu(bias).
    let mut y = vec![SENTINEL; 9];
    interp::run(
        &spec(Op::SPMM, &p),
        Launch::new(2, 3),
        Args::Spmm {
            values: &[],
            x: &x,
            bias: None,
            y: &mut y,
        },
    )
    .unwrap();
    assert_matrix(&y, &[[0.0; 2]; 3], 3);
    let mut y = vec![SENTINEL; 9];
    interp::run(
        &spec(BIAS_RELU, &p),
        Launch::new(2, 3),
        Args::Spmm {
            values: &[],
            x: &x,
            bias: Some(&BIAS_VEC),
            y: &mut y,
        },
    )
    .unwrap();
    assert_matrix(&y, &[[0.5, 0.5], [0.0, 0.0], [1.0, 1.0]], 3);

    // spmm_t gives zeros.
    let mut dx = vec![SENTINEL; 15];
    interp::run(
        &spec(Op::SpmmT, &p),
        Launch::new(2, 3),
        Args::SpmmT {
            values: &[],
            dy: &dy,
            dx: &mut dx,
        },
    )
    .unwrap();
    assert_matrix(&dx, &[[0.0; 2]; 5], 3);

    // sddmm has nothing to write.
    let mut dw: Vec<f32> = Vec::new();
    interp::run(
        &spec(Op::Sddmm, &p),
        Launch::new(2, 3),
        Args::Sddmm {
            dy: &dy,
            x: &x,
            dw: &mut dw,
        },
    )
    .unwrap();
    assert!(dw.is_empty());

    // dense_grad does not depend on the pattern's nonzeros.
    let mut grad = vec![SENTINEL; 15];
    interp::run(
        &spec(Op::DenseGrad, &p),
        Launch::new(2, 3),
        Args::DenseGrad {
            dy: &dy,
            x: &x,
            grad: &mut grad,
        },
    )
    .unwrap();
    assert_eq!(grad[0..5], [-1.0, 3.0, -1.0, 8.25, 300.0]);
}

#[test]
fn batch_one() {
    // 2 × 3: row 0 = [0.5, ., -2], row 1 = [., 3, .]; x = [4, 1, 0.25] (one column, ld 1).
    let p = Arc::new(Pattern::from_csr(2, 3, vec![0, 2, 3], vec![0, 2, 1]).unwrap());
    let values = [0.5, -2.0, 3.0];
    let x = [4.0, 1.0, 0.25];
    let fixed = |op| KernelSpec::new("b1", op, Arc::clone(&p), Dim::Fixed(1), Dim::Fixed(1));
    let mut y = [SENTINEL; 2];
    interp::run(
        &fixed(BIAS_RELU).unwrap(),
        Launch::new(1, 1),
        Args::Spmm {
            values: &values,
            x: &x,
            bias: Some(&[1.0, -4.0]),
            y: &mut y,
        },
    )
    .unwrap();
    // row 0: 2 - 0.5 + 1 = 2.5; row 1: max(0, 3 - 4) = 0
    assert_eq!(y, [2.5, 0.0]);

    let dy = [2.0, -1.0];
    let mut dx = [SENTINEL; 3];
    interp::run(
        &fixed(Op::SpmmT).unwrap(),
        Launch::new(1, 1),
        Args::SpmmT {
            values: &values,
            dy: &dy,
            dx: &mut dx,
        },
    )
    .unwrap();
    // dx0 = 0.5·2, dx1 = 3·(-1), dx2 = -2·2
    assert_eq!(dx, [1.0, -3.0, -4.0]);

    let mut dw = [SENTINEL; 3];
    interp::run(
        &fixed(Op::Sddmm).unwrap(),
        Launch::new(1, 1),
        Args::Sddmm {
            dy: &dy,
            x: &x,
            dw: &mut dw,
        },
    )
    .unwrap();
    // (0,0): 2·4, (0,2): 2·0.25, (1,1): -1·1
    assert_eq!(dw, [8.0, 0.5, -1.0]);

    let mut grad = [SENTINEL; 6];
    interp::run(
        &fixed(Op::DenseGrad).unwrap(),
        Launch::new(1, 1),
        Args::DenseGrad {
            dy: &dy,
            x: &x,
            grad: &mut grad,
        },
    )
    .unwrap();
    assert_eq!(grad, [8.0, 2.0, 0.5, -4.0, -1.0, -0.25]);
}

/// A deterministic value in [-2, 2) with a few exact binary digits.
fn val(i: usize) -> f32 {
    ((i * 37 + 11) % 64) as f32 / 16.0 - 2.0
}

#[test]
fn odd_sizes_match_a_dense_computation() {
    // 7 × 96 with empty rows and columns, batch 17, ld 19 (odd, padded): the interpreter
    // against a straightforward dense computation written out here.
    let (rows, cols, batch, ld) = (7usize, 96usize, 17usize, 19usize);
    let entries: Vec<(usize, usize)> = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (r, c)))
        .filter(|&(r, c)| (r * 31 + c * 17 + r * c * 5) % 7 == 0 && r != 4)
        .collect();
    let p = Arc::new(Pattern::from_coo(rows, cols, &entries).unwrap());
    let values: Vec<f32> = (0..p.nnz()).map(val).collect();
    let mut dense = vec![0.0f64; rows * cols];
    for r in 0..rows {
        for k in p.row_range(r) {
            dense[r * cols + p.col_idx()[k] as usize] = values[k] as f64;
        }
    }
    let x: Vec<f32> = (0..cols * ld)
        .map(|i| if i % ld < batch { val(i + 5) } else { IN_PAD })
        .collect();
    let dy: Vec<f32> = (0..rows * ld)
        .map(|i| if i % ld < batch { val(i + 9) } else { IN_PAD })
        .collect();
    let bias: Vec<f32> = (0..rows).map(|r| val(r + 3)).collect();
    let close = |got: f32, want: f64, what: &str| {
        assert!(
            (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{what}: got {got}, want {want}"
        );
    };
    let spec =
        |op| KernelSpec::new("odd", op, Arc::clone(&p), Dim::Fixed(batch), Dim::Fixed(ld)).unwrap();
    let launch = Launch::new(batch, ld);

    let mut y = vec![SENTINEL; rows * ld];
    interp::run(
        &spec(BIAS_RELU),
        launch,
        Args::Spmm {
            values: &values,
            x: &x,
            bias: Some(&bias),
            y: &mut y,
        },
    )
    .unwrap();
    for r in 0..rows {
        for b in 0..batch {
            let s: f64 = (0..cols)
                .map(|c| dense[r * cols + c] * x[c * ld + b] as f64)
                .sum();
            close(
                y[r * ld + b],
                (s + bias[r] as f64).max(0.0),
                &format!("y[{r},{b}]"),
            );
        }
        assert!(y[r * ld + batch..(r + 1) * ld]
            .iter()
            .all(|&v| v == SENTINEL));
    }

    let mut dx = vec![SENTINEL; cols * ld];
    interp::run(
        &spec(Op::SpmmT),
        launch,
        Args::SpmmT {
            values: &values,
            dy: &dy,
            dx: &mut dx,
        },
    )
    .unwrap();
    for c in 0..cols {
        for b in 0..batch {
            let s: f64 = (0..rows)
                .map(|r| dense[r * cols + c] * dy[r * ld + b] as f64)
                .sum();
            close(dx[c * ld + b], s, &format!("dx[{c},{b}]"));
        }
        assert!(dx[c * ld + batch..(c + 1) * ld]
            .iter()
            .all(|&v| v == SENTINEL));
    }

    let dot = |r: usize, c: usize| -> f64 {
        (0..batch)
            .map(|b| dy[r * ld + b] as f64 * x[c * ld + b] as f64)
            .sum()
    };
    let mut dw = vec![SENTINEL; p.nnz()];
    interp::run(
        &spec(Op::Sddmm),
        launch,
        Args::Sddmm {
            dy: &dy,
            x: &x,
            dw: &mut dw,
        },
    )
    .unwrap();
    for r in 0..rows {
        for k in p.row_range(r) {
            close(dw[k], dot(r, p.col_idx()[k] as usize), &format!("dw[{k}]"));
        }
    }

    let mut grad = vec![SENTINEL; rows * cols];
    interp::run(
        &spec(Op::DenseGrad),
        launch,
        Args::DenseGrad {
            dy: &dy,
            x: &x,
            grad: &mut grad,
        },
    )
    .unwrap();
    for r in 0..rows {
        for c in 0..cols {
            close(grad[r * cols + c], dot(r, c), &format!("grad[{r},{c}]"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Argument checks: each error names the layer, the op and the operand.

#[track_caller]
fn expect_err(result: Result<(), BackendError>, needles: &[&str]) -> String {
    let msg = result.expect_err("expected an argument error").to_string();
    for n in needles {
        assert!(msg.contains(n), "{msg:?} should contain {n:?}");
    }
    msg
}

#[test]
fn length_errors_name_the_operand() {
    let p = example();
    let x = matrix(&X, 3, IN_PAD);
    let dy = matrix(&DY, 3, IN_PAD);
    let l = Launch::new(2, 3);
    let mut y = vec![SENTINEL; 9];

    let e = expect_err(
        interp::run(
            &spec(Op::SPMM, &p),
            l,
            Args::Spmm {
                values: &VALUES[..4],
                x: &x,
                bias: None,
                y: &mut y,
            },
        ),
        &["layer fc1", "spmm", "values has 4 elements, needs nnz = 5"],
    );
    assert_eq!(e, "layer fc1, spmm: values has 4 elements, needs nnz = 5");
    expect_err(
        interp::run(
            &spec(Op::SPMM, &p),
            l,
            Args::Spmm {
                values: &VALUES,
                x: &x[..14],
                bias: None,
                y: &mut y,
            },
        ),
        &["x has 14 elements, needs cols·ld = 15"],
    );
    expect_err(
        interp::run(
            &spec(Op::SPMM, &p),
            l,
            Args::Spmm {
                values: &VALUES,
                x: &x,
                bias: None,
                y: &mut y[..8],
            },
        ),
        &["y has 8 elements, needs rows·ld = 9"],
    );
    expect_err(
        interp::run(
            &spec(BIAS, &p),
            l,
            Args::Spmm {
                values: &VALUES,
                x: &x,
                bias: Some(&BIAS_VEC[..2]),
                y: &mut y,
            },
        ),
        &["bias has 2 elements, needs rows = 3"],
    );
    // Nothing was written by the failed runs.
    assert!(y.iter().all(|&v| v == SENTINEL));

    let mut dx = vec![SENTINEL; 15];
    expect_err(
        interp::run(
            &spec(Op::SpmmT, &p),
            l,
            Args::SpmmT {
                values: &VALUES[..4],
                dy: &dy,
                dx: &mut dx,
            },
        ),
        &["spmm_t", "values has 4 elements, needs nnz = 5"],
    );
    expect_err(
        interp::run(
            &spec(Op::SpmmT, &p),
            l,
            Args::SpmmT {
                values: &VALUES,
                dy: &dy[..8],
                dx: &mut dx,
            },
        ),
        &["spmm_t", "dy has 8 elements, needs rows·ld = 9"],
    );
    expect_err(
        interp::run(
            &spec(Op::SpmmT, &p),
            l,
            Args::SpmmT {
                values: &VALUES,
                dy: &dy,
                dx: &mut dx[..14],
            },
        ),
        &["dx has 14 elements, needs cols·ld = 15"],
    );
    assert!(dx.iter().all(|&v| v == SENTINEL));

    let mut dw = vec![SENTINEL; 6];
    expect_err(
        interp::run(
            &spec(Op::Sddmm, &p),
            l,
            Args::Sddmm {
                dy: &dy,
                x: &x,
                dw: &mut dw,
            },
        ),
        &["sddmm", "dw has 6 elements, needs nnz = 5"],
    );
    expect_err(
        interp::run(
            &spec(Op::Sddmm, &p),
            l,
            Args::Sddmm {
                dy: &dy[..1],
                x: &x,
                dw: &mut dw[..5],
            },
        ),
        &["dy has 1 elements, needs rows·ld = 9"],
    );
    expect_err(
        interp::run(
            &spec(Op::Sddmm, &p),
            l,
            Args::Sddmm {
                dy: &dy,
                x: &[],
                dw: &mut dw[..5],
            },
        ),
        &["x has 0 elements, needs cols·ld = 15"],
    );

    let mut grad = vec![SENTINEL; 14];
    expect_err(
        interp::run(
            &spec(Op::DenseGrad, &p),
            l,
            Args::DenseGrad {
                dy: &dy,
                x: &x,
                grad: &mut grad,
            },
        ),
        &["dense_grad", "grad has 14 elements, needs rows·cols = 15"],
    );
    expect_err(
        interp::run(
            &spec(Op::DenseGrad, &p),
            l,
            Args::DenseGrad {
                dy: &dy,
                x: &x[..3],
                grad: &mut grad,
            },
        ),
        &["x has 3 elements, needs cols·ld = 15"],
    );
}

#[test]
fn launch_errors() {
    let p = example();
    let x = matrix(&X, 3, IN_PAD);
    let mut y = vec![SENTINEL; 9];
    let mut run = |spec: &KernelSpec, launch| {
        interp::run(
            spec,
            launch,
            Args::Spmm {
                values: &VALUES,
                x: &x,
                bias: None,
                y: &mut y,
            },
        )
    };
    let any = spec(Op::SPMM, &p);
    expect_err(
        run(&any, Launch::new(3, 2)),
        &["layer fc1, spmm: ld = 2 is smaller than batch = 3"],
    );
    expect_err(
        run(&any, Launch::new(0, 3)),
        &["layer fc1, spmm: batch must be at least 1"],
    );
    let fixed = KernelSpec::new(
        "fc1",
        Op::SPMM,
        Arc::clone(&p),
        Dim::Fixed(2),
        Dim::Fixed(3),
    )
    .unwrap();
    expect_err(
        run(&fixed, Launch::new(1, 3)),
        &["compiled for batch 2, launched with 1"],
    );
    expect_err(
        run(&fixed, Launch::new(2, 2)),
        &["compiled for ld 3, launched with 2"],
    );
    run(&fixed, Launch::new(2, 3)).unwrap();
}

#[test]
fn wrong_op_arguments_and_bias_presence() {
    let p = example();
    let x = matrix(&X, 3, IN_PAD);
    let dy = matrix(&DY, 3, IN_PAD);
    let mut out = vec![SENTINEL; 15];
    let l = Launch::new(2, 3);
    let e = expect_err(
        interp::run(
            &spec(Op::SPMM, &p),
            l,
            Args::Sddmm {
                dy: &dy,
                x: &x,
                dw: &mut out[..5],
            },
        ),
        &[],
    );
    assert_eq!(e, "layer fc1: arguments for sddmm given to a spmm kernel");
    expect_err(
        interp::run(
            &spec(Op::DenseGrad, &p),
            l,
            Args::SpmmT {
                values: &VALUES,
                dy: &dy,
                dx: &mut out,
            },
        ),
        &["arguments for spmm_t given to a dense_grad kernel"],
    );
    // A bias is required exactly when the op has the bias epilogue.
    expect_err(
        interp::run(
            &spec(BIAS_RELU, &p),
            l,
            Args::Spmm {
                values: &VALUES,
                x: &x,
                bias: None,
                y: &mut out[..9],
            },
        ),
        &["layer fc1, spmm:", "bias", "none was given"],
    );
    expect_err(
        interp::run(
            &spec(RELU, &p),
            l,
            Args::Spmm {
                values: &VALUES,
                x: &x,
                bias: Some(&BIAS_VEC),
                y: &mut out[..9],
            },
        ),
        &[
            "layer fc1, spmm:",
            "a bias was given to a kernel without bias epilogue",
        ],
    );
    assert!(out.iter().all(|&v| v == SENTINEL));
}

// ---------------------------------------------------------------------------------------------
// reference() and compare()

#[test]
fn reference_packs_values_and_abs_sums() {
    let p = example();
    let x = matrix(&X, 3, IN_PAD);
    let mut y = vec![SENTINEL; 9];
    let args: Args<'_, [f32]> = Args::Spmm {
        values: &VALUES,
        x: &x,
        bias: Some(&BIAS_VEC),
        y: &mut y,
    };
    let r = interp::reference(&spec(BIAS_RELU, &p), Launch::new(2, 3), &args).unwrap();
    assert_eq!(r.layout, OutputLayout::Matrix { batch: 2 });
    assert_eq!(r.values, [3.0, 9.0, 0.0, 0.0, 0.0, 5.0]);
    // Σ|terms| with the bias: row 0, b 0: |1·2| + |2·0.25| + |0.5| = 3;
    // row 2, b 0: |3·1| + |4·2| + |5·(-3)| + |1| = 27; b 1: |-3| + |2| + |5| + |1| = 11.
    assert_eq!(r.abs_sums, [3.0, 9.0, 1.0, 1.0, 27.0, 11.0]);
    assert_eq!(r.buffer_index(3, 3), 4);
    assert_eq!(r.buffer_index(5, 16), 33);
    // reference() does not write the output.
    assert!(y.iter().all(|&v| v == SENTINEL));
}

#[test]
fn compare_accepts_the_run_and_catches_errors() {
    let p = example();
    let s = spec(Op::SPMM, &p);
    let l = Launch::new(2, 3);
    let x = matrix(&X, 3, IN_PAD);
    let mut y = vec![SENTINEL; 9];
    interp::run(
        &s,
        l,
        Args::Spmm {
            values: &VALUES,
            x: &x,
            bias: None,
            y: &mut y,
        },
    )
    .unwrap();
    let mut scratch = vec![0.0; 9];
    let r = interp::reference(
        &s,
        l,
        &Args::Spmm {
            values: &VALUES,
            x: &x,
            bias: None,
            y: &mut scratch,
        },
    )
    .unwrap();
    assert_eq!(interp::compare(&r, &y, 3), Ok(()));

    // Padding columns are not compared, even when they hold NaN.
    let mut padded = y.clone();
    for f in 0..3 {
        padded[f * 3 + 2] = f32::NAN;
    }
    assert_eq!(interp::compare(&r, &padded, 3), Ok(()));

    // Within tolerance: element (2, 1) = 4 with Σ|terms| = |3·-1| + |4·0.5| + |5·1| = 10,
    // allowed error 1e-5·10 + 1e-6.
    let mut close = y.clone();
    close[2 * 3 + 1] = 4.0 + 9.0e-5;
    assert_eq!(interp::compare(&r, &close, 3), Ok(()));

    // A wrong value beyond it.
    let mut wrong = y.clone();
    wrong[2 * 3 + 1] = 4.0 + 2.0e-4;
    let m = interp::compare(&r, &wrong, 3).unwrap_err();
    assert_eq!(m.index, 5, "packed index of (2, 1)");
    assert_eq!(m.want, 4.0);
    assert_eq!(m.got, 4.0 + 2.0e-4);
    assert!((m.allowed - (1e-4 + 1e-6)).abs() < 1e-12, "{}", m.allowed);
    assert!(m.to_string().starts_with("element 5: got "), "{m}");

    // Zero result (empty row): only the absolute 1e-6 is allowed.
    let mut off = y.clone();
    off[3] = 2.0e-6;
    assert_eq!(interp::compare(&r, &off, 3).unwrap_err().index, 2);

    // NaN is always a mismatch; so is infinity.
    let mut nan = y.clone();
    nan[1] = f32::NAN;
    let m = interp::compare(&r, &nan, 3).unwrap_err();
    assert_eq!(m.index, 1);
    assert!(m.got.is_nan());
    let mut inf = y;
    inf[7] = f32::INFINITY;
    assert_eq!(interp::compare(&r, &inf, 3).unwrap_err().index, 5);
}

#[test]
fn compare_flat_outputs() {
    let p = example();
    let s = spec(Op::Sddmm, &p);
    let l = Launch::new(2, 3);
    let (dy, x) = (matrix(&DY, 3, IN_PAD), matrix(&X, 3, IN_PAD));
    let mut dw = vec![0.0; 5];
    let r = interp::reference(
        &s,
        l,
        &Args::Sddmm {
            dy: &dy,
            x: &x,
            dw: &mut dw,
        },
    )
    .unwrap();
    assert_eq!(r.layout, OutputLayout::Flat);
    let good = [3.0, 8.25, -1.5, -1.75, 3.5];
    // For flat outputs ld does not matter.
    assert_eq!(interp::compare(&r, &good, 3), Ok(()));
    assert_eq!(interp::compare(&r, &good, 1), Ok(()));
    let mut bad = good;
    bad[4] = -3.5;
    let m = interp::compare(&r, &bad, 3).unwrap_err();
    assert_eq!((m.index, m.want), (4, 3.5));
    bad[4] = f32::NAN;
    assert_eq!(interp::compare(&r, &bad, 3).unwrap_err().index, 4);
}

// ---------------------------------------------------------------------------------------------
// Random patterns against a dense computation

/// A random pattern with small-integer weights, a batch, an `ld ≥ batch`, and small-integer
/// inputs: every sum is exact in `f32`, so the interpreter must match exactly.
fn arb_case() -> impl Strategy<Value = (Arc<Pattern>, Vec<f32>, usize, usize, Vec<f32>, Vec<f32>)> {
    (0usize..8, 0usize..8, 1usize..5, 0usize..4)
        .prop_flat_map(|(rows, cols, batch, extra)| {
            let ld = batch + extra;
            (
                proptest::collection::vec(any::<bool>(), rows * cols),
                proptest::collection::vec(-4i8..5, rows * cols),
                proptest::collection::vec(-4i8..5, cols * ld),
                proptest::collection::vec(-4i8..5, rows * ld),
                Just((rows, cols, batch, ld)),
            )
        })
        .prop_map(|(mask, w, x, dy, (rows, cols, batch, ld))| {
            let p = Arc::new(Pattern::from_dense_mask(rows, cols, &mask).unwrap());
            let values = (0..rows)
                .flat_map(|r| p.row(r).iter().map(move |&c| (r, c as usize)))
                .map(|(r, c)| f32::from(w[r * cols + c]))
                .collect();
            let to_f32 = |v: Vec<i8>| v.into_iter().map(f32::from).collect();
            (p, values, batch, ld, to_f32(x), to_f32(dy))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_op_matches_dense_math((p, values, batch, ld, x, dy) in arb_case()) {
        let (rows, cols) = (p.rows(), p.cols());
        let mut w = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for k in p.row_range(r) {
                w[r * cols + p.col_idx()[k] as usize] = values[k];
            }
        }
        let l = Launch::new(batch, ld);
        let bias: Vec<f32> = (0..rows).map(|r| r as f32 - 2.0).collect();

        let mut y = vec![SENTINEL; rows * ld];
        interp::run(&spec(BIAS_RELU, &p), l, Args::Spmm { values: &values, x: &x, bias: Some(&bias), y: &mut y }).unwrap();
        let mut dx = vec![SENTINEL; cols * ld];
        interp::run(&spec(Op::SpmmT, &p), l, Args::SpmmT { values: &values, dy: &dy, dx: &mut dx }).unwrap();
        let mut dw = vec![SENTINEL; p.nnz()];
        interp::run(&spec(Op::Sddmm, &p), l, Args::Sddmm { dy: &dy, x: &x, dw: &mut dw }).unwrap();
        let mut grad = vec![SENTINEL; rows * cols];
        interp::run(&spec(Op::DenseGrad, &p), l, Args::DenseGrad { dy: &dy, x: &x, grad: &mut grad }).unwrap();

        for b in 0..ld {
            for r in 0..rows {
                let want = if b < batch {
                    ((0..cols).map(|c| w[r * cols + c] * x[c * ld + b]).sum::<f32>() + bias[r]).max(0.0)
                } else {
                    SENTINEL
                };
                prop_assert_eq!(y[r * ld + b], want, "y[{}, {}]", r, b);
            }
            for c in 0..cols {
                let want = if b < batch {
                    (0..rows).map(|r| w[r * cols + c] * dy[r * ld + b]).sum::<f32>()
                } else {
                    SENTINEL
                };
                prop_assert_eq!(dx[c * ld + b], want, "dx[{}, {}]", c, b);
            }
        }
        let dot = |r: usize, c: usize| (0..batch).map(|b| dy[r * ld + b] * x[c * ld + b]).sum::<f32>();
        for r in 0..rows {
            for k in p.row_range(r) {
                prop_assert_eq!(dw[k], dot(r, p.col_idx()[k] as usize), "dw[{}]", k);
            }
            for c in 0..cols {
                prop_assert_eq!(grad[r * cols + c], dot(r, c), "grad[{}, {}]", r, c);
            }
        }
    }
}
