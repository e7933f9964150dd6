//! Tests of the convolution ops in the IR: the interpreter against the same convolution
//! unrolled into one `[out·OH·OW × C·H·W]` matrix and run through the matrix ops (an
//! independent formulation: the runtime computed convolutions that way before they were ops),
//! the adjoint identity between `conv` and `conv_t`, and the spec checks.

use std::sync::Arc;

use sparse_ir::interp;
use sparse_ir::{Args, ConvGeometry, Dim, KernelSpec, Launch, Op, Pattern, VerifyError};

fn geometry(c: usize, h: usize, w: usize, k: usize, s: usize, p: usize) -> ConvGeometry {
    ConvGeometry {
        in_channels: c,
        height: h,
        width: w,
        kernel: k,
        stride: s,
        padding: p,
    }
}

/// Geometries covering 1×1, stride 1, 2 and 3, padding 0–2, odd sizes and a window larger
/// than the unpadded input.
fn geometries() -> Vec<(usize, ConvGeometry)> {
    vec![
        (3, geometry(2, 5, 6, 1, 1, 0)),
        (4, geometry(3, 6, 6, 3, 1, 1)),
        (2, geometry(2, 7, 5, 3, 2, 1)),
        (3, geometry(2, 8, 7, 3, 2, 0)),
        (2, geometry(1, 9, 9, 5, 1, 0)),
        (2, geometry(2, 3, 3, 5, 1, 1)),
        (2, geometry(2, 10, 11, 3, 3, 2)),
    ]
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The convolution unrolled: entry `(o·OH·OW + pos, c·H·W + in_pos)` for every nonzero and
/// output position whose tap lies inside the input, with the index of the nonzero it came
/// from (each appears once per row, since a row's taps read distinct input positions).
fn unrolled(p: &Pattern, g: &ConvGeometry) -> (Pattern, Vec<usize>) {
    let (oh_n, ow_n) = (g.out_height(), g.out_width());
    let mut entries = Vec::new();
    for o in 0..p.rows() {
        for k in p.row_range(o) {
            let col = p.col_idx()[k] as usize;
            let (c, kh, kw) = (col / g.taps(), col % g.taps() / g.kernel, col % g.kernel);
            for oh in 0..oh_n {
                for ow in 0..ow_n {
                    let ih = (oh * g.stride + kh) as isize - g.padding as isize;
                    let iw = (ow * g.stride + kw) as isize - g.padding as isize;
                    if ih < 0 || iw < 0 || ih >= g.height as isize || iw >= g.width as isize {
                        continue;
                    }
                    let row = o * oh_n * ow_n + oh * ow_n + ow;
                    let col = c * g.height * g.width + ih as usize * g.width + iw as usize;
                    entries.push((row, col, k));
                }
            }
        }
    }
    entries.sort();
    let coo: Vec<(usize, usize)> = entries.iter().map(|&(r, c, _)| (r, c)).collect();
    let pattern = Pattern::from_coo(
        p.rows() * oh_n * ow_n,
        g.in_channels * g.height * g.width,
        &coo,
    )
    .unwrap();
    (pattern, entries.iter().map(|e| e.2).collect())
}

fn spec(op: Op, p: &Arc<Pattern>, g: ConvGeometry) -> KernelSpec {
    KernelSpec::conv("conv", op, Arc::clone(p), g, Dim::Any, Dim::Any).unwrap()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}: element {i}: conv {g}, unrolled {w}"
        );
    }
}

#[test]
fn the_interpreter_agrees_with_the_unrolled_matrix_ops() {
    for (seed, (out, g)) in geometries().into_iter().enumerate() {
        let seed = seed as u64;
        let p = Arc::new(Pattern::random(out, g.pattern_cols(), 0.4, seed).unwrap());
        let (u, from) = unrolled(&p, &g);
        let u = Arc::new(u);
        for (batch, ld) in [(1, 1), (3, 5)] {
            let launch = Launch::new(batch, ld);
            let w = values(p.nnz(), seed + 10);
            let uw: Vec<f32> = from.iter().map(|&k| w[k]).collect();
            let bias = values(p.rows(), seed + 11);
            let ubias: Vec<f32> = (0..u.rows()).map(|r| bias[r / g.out_positions()]).collect();
            let x = values(g.in_channels * g.in_positions() * ld, seed + 12);
            let dy = values(p.rows() * g.out_positions() * ld, seed + 13);
            let what = format!("{g}, batch {batch} ld {ld}");
            let matrix = |op| KernelSpec::any_batch("unrolled", op, Arc::clone(&u)).unwrap();

            // forward, with both epilogues
            let op = Op::Conv {
                bias: true,
                relu: true,
            };
            let (mut got, mut want) = (vec![0.0; dy.len()], vec![0.0; dy.len()]);
            let args = |y| Args::Spmm {
                values: &w[..],
                x: &x[..],
                bias: Some(&bias[..]),
                y,
            };
            interp::run(&spec(op, &p, g), launch, args(&mut got)).unwrap();
            let uop = Op::Spmm {
                bias: true,
                relu: true,
            };
            interp::run(
                &matrix(uop),
                launch,
                Args::Spmm {
                    values: &uw[..],
                    x: &x[..],
                    bias: Some(&ubias[..]),
                    y: &mut want,
                },
            )
            .unwrap();
            close(&got, &want, &format!("conv {what}"));

            // backward-data
            let (mut got, mut want) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            interp::run(
                &spec(Op::ConvT, &p, g),
                launch,
                Args::SpmmT {
                    values: &w[..],
                    dy: &dy[..],
                    dx: &mut got,
                },
            )
            .unwrap();
            interp::run(
                &matrix(Op::SpmmT),
                launch,
                Args::SpmmT {
                    values: &uw[..],
                    dy: &dy[..],
                    dx: &mut want,
                },
            )
            .unwrap();
            close(&got, &want, &format!("conv_t {what}"));

            // weight gradient on the pattern: the unrolled sddmm summed per nonzero
            let mut got = vec![0.0; p.nnz()];
            interp::run(
                &spec(Op::ConvGrad, &p, g),
                launch,
                Args::Sddmm {
                    dy: &dy[..],
                    x: &x[..],
                    dw: &mut got,
                },
            )
            .unwrap();
            let mut unrolled_dw = vec![0.0; u.nnz()];
            interp::run(
                &matrix(Op::Sddmm),
                launch,
                Args::Sddmm {
                    dy: &dy[..],
                    x: &x[..],
                    dw: &mut unrolled_dw,
                },
            )
            .unwrap();
            let mut want = vec![0.0; p.nnz()];
            for (v, &k) in unrolled_dw.iter().zip(&from) {
                want[k] += v;
            }
            close(&got, &want, &format!("conv_grad {what}"));

            // dense gradient: on the pattern it equals conv_grad; the dense pattern's
            // conv_grad gives every entry
            let mut dense = vec![0.0; p.rows() * p.cols()];
            interp::run(
                &spec(Op::ConvDenseGrad, &p, g),
                launch,
                Args::DenseGrad {
                    dy: &dy[..],
                    x: &x[..],
                    grad: &mut dense,
                },
            )
            .unwrap();
            let on_pattern: Vec<f32> = (0..p.rows())
                .flat_map(|o| p.row(o).iter().map(move |&c| (o, c as usize)))
                .map(|(o, c)| dense[o * p.cols() + c])
                .collect();
            close(
                &on_pattern,
                &got,
                &format!("conv_dense_grad on the pattern {what}"),
            );
            let full = Arc::new(Pattern::dense(p.rows(), p.cols()).unwrap());
            let mut want = vec![0.0; full.nnz()];
            interp::run(
                &spec(Op::ConvGrad, &full, g),
                launch,
                Args::Sddmm {
                    dy: &dy[..],
                    x: &x[..],
                    dw: &mut want,
                },
            )
            .unwrap();
            close(&dense, &want, &format!("conv_dense_grad {what}"));
        }
    }
}

/// `⟨conv(X), dY⟩ = ⟨X, conv_t(dY)⟩`: `conv_t` is the transpose of `conv`.
#[test]
fn conv_t_is_the_adjoint_of_conv() {
    for (seed, (out, g)) in geometries().into_iter().enumerate() {
        let seed = seed as u64 + 100;
        let p = Arc::new(Pattern::random(out, g.pattern_cols(), 0.5, seed).unwrap());
        let launch = Launch::new(2, 2);
        let w = values(p.nnz(), seed);
        let x = values(g.in_channels * g.in_positions() * 2, seed + 1);
        let dy = values(p.rows() * g.out_positions() * 2, seed + 2);
        let mut y = vec![0.0; dy.len()];
        let mut dx = vec![0.0; x.len()];
        let plain = spec(Op::CONV, &p, g);
        interp::run(
            &plain,
            launch,
            Args::Spmm {
                values: &w[..],
                x: &x[..],
                bias: None,
                y: &mut y,
            },
        )
        .unwrap();
        interp::run(
            &spec(Op::ConvT, &p, g),
            launch,
            Args::SpmmT {
                values: &w[..],
                dy: &dy[..],
                dx: &mut dx,
            },
        )
        .unwrap();
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
        };
        let (lhs, rhs) = (dot(&y, &dy), dot(&x, &dx));
        assert!(
            (lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()),
            "{g}: {lhs} vs {rhs}"
        );
    }
}

#[test]
fn output_sizes_follow_the_convolution_arithmetic() {
    let g = geometry(3, 32, 32, 3, 1, 1);
    assert_eq!((g.out_height(), g.out_width()), (32, 32));
    let g = geometry(128, 32, 32, 3, 2, 1);
    assert_eq!((g.out_height(), g.out_width()), (16, 16));
    let g = geometry(1, 28, 28, 5, 1, 0);
    assert_eq!((g.out_height(), g.out_width()), (24, 24));
    let g = geometry(2, 7, 8, 3, 2, 0);
    assert_eq!((g.out_height(), g.out_width()), (3, 3));
    let p = Arc::new(Pattern::random(6, 25, 0.2, 1).unwrap());
    let s = spec(Op::CONV, &p, geometry(1, 28, 28, 5, 1, 0));
    assert_eq!(s.in_features(), 28 * 28);
    assert_eq!(s.out_features(), 6 * 24 * 24);
    assert_eq!(s.useful_fmas(10), p.nnz() * 24 * 24 * 10);
}

#[test]
fn specs_reject_a_geometry_that_does_not_fit() {
    let p = Arc::new(Pattern::random(4, 18, 0.3, 2).unwrap());
    let bad = |g: ConvGeometry| {
        KernelSpec::conv("c1", Op::CONV, Arc::clone(&p), g, Dim::Any, Dim::Any).unwrap_err()
    };
    // 18 columns are 2 channels of 3×3, not 3
    let e = bad(geometry(3, 8, 8, 3, 1, 1));
    assert!(matches!(e, VerifyError::ConvGeometry { .. }), "{e}");
    assert!(e.to_string().contains("18 columns"), "{e}");
    for g in [
        geometry(2, 8, 8, 3, 0, 1),
        geometry(2, 0, 8, 3, 1, 1),
        geometry(2, 1, 8, 3, 1, 0),
        geometry(2, 8, 8, 3, 1, 1 << 20),
    ] {
        let e = bad(g);
        assert!(matches!(e, VerifyError::ConvGeometry { .. }), "{g}: {e}");
    }
    // conv ops need a geometry; matrix ops take none
    let e = KernelSpec::any_batch("c1", Op::ConvT, Arc::clone(&p)).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::ConvOpGeometry {
                has_geometry: false,
                ..
            }
        ),
        "{e}"
    );
    let e = KernelSpec::conv(
        "c1",
        Op::SPMM,
        Arc::clone(&p),
        geometry(2, 8, 8, 3, 1, 1),
        Dim::Any,
        Dim::Any,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::ConvOpGeometry {
                has_geometry: true,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn launches_check_the_convolution_operand_lengths() {
    let p = Arc::new(Pattern::random(4, 18, 0.3, 2).unwrap());
    let g = geometry(2, 8, 8, 3, 2, 1); // output 4×4
    let s = spec(Op::CONV, &p, g);
    let launch = Launch::new(2, 2);
    let w = vec![0.0; p.nnz()];
    let x = vec![0.0; 2 * 64 * 2];
    let mut y = vec![0.0; 4 * 16 * 2 - 1];
    let e = interp::run(
        &s,
        launch,
        Args::Spmm {
            values: &w,
            x: &x,
            bias: None,
            y: &mut y,
        },
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("out·OH·OW·ld") && text.contains("128"),
        "{text}"
    );
}

#[test]
fn op_names_round_trip() {
    for op in Op::ALL.into_iter().chain(Op::CONV_ALL) {
        assert_eq!(op.to_string().parse::<Op>().unwrap(), op);
        assert_eq!(op.cli_name().parse::<Op>().unwrap().name(), op.name());
    }
    assert_eq!("conv-dense-grad".parse::<Op>().unwrap(), Op::ConvDenseGrad);
    assert!("conv(bias,bias)".parse::<Op>().is_err());
    assert!(Op::CONV_ALL.iter().all(|op| op.is_conv()));
    assert!(!Op::ALL.iter().any(|op| op.is_conv()));
}
