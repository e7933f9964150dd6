//! The reference interpreter: the definition of every op and the oracle for every backend.
//!
//! It favours clarity over speed and accumulates every sum in `f64`. Layout: activations are
//! feature-major, element `(f, b)` of a matrix at `f · ld + b`; weights are the CSR value
//! array of the pattern. Outputs are overwritten (columns `0..batch` of each output row;
//! padding columns are left untouched).
//!
//! With `W` the sparse matrix whose nonzero `k` sits at `(r_k, c_k)` with value `values[k]`:
//!
//! - `spmm`: `Y[r, b] = Σ_{k in row r} values[k]·X[c_k, b]`, then `+ bias[r]` if the op has a
//!   bias, then `max(0, ·)` if it has ReLU (an empty row gives `0`, or `bias[r]`);
//! - `spmm_t`: `dX[c, b] = Σ_{k : c_k = c} values[k]·dY[r_k, b]` (an empty column gives 0);
//! - `sddmm`: `dW[k] = Σ_b dY[r_k, b]·X[c_k, b]`;
//! - `dense_grad`: `G[r·cols + c] = Σ_b dY[r, b]·X[c, b]` for every `r`, `c`.
//!
//! The convolution ops (geometry `C, H, W, k, s, p`, output `OH × OW`; nonzero `k` at
//! `(o, c·k² + kh·k + kw)`; the input position of output `(oh, ow)` under tap `(kh, kw)` is
//! `(oh·s + kh − p, ow·s + kw − p)`, and a tap outside the input reads 0):
//!
//! - `conv`: `Y[o, oh, ow, b] = Σ_k values[k]·X[c, ih, iw, b]` over the row's nonzeros, then
//!   the bias and ReLU as for `spmm`;
//! - `conv_t`: `dX[c, ih, iw, b] = Σ values[k]·dY[o, oh, ow, b]` over every nonzero and output
//!   position whose tap reads `(ih, iw)`;
//! - `conv_grad`: `dW[k] = Σ_{oh, ow, b} dY[o, oh, ow, b]·X[c, ih, iw, b]`;
//! - `conv_dense_grad`: the same sum for every `(o, c, kh, kw)`, at `o·C·k² + c·k² + kh·k + kw`.
//!
//! [`reference()`] also returns, per output element, the sum of the absolute values of the terms
//! that make it up, from which [`compare`] applies the tolerance of CONTRACTS.md:
//! `|got − want| ≤ 1e-5 · Σ|terms| + 1e-6`.

use crate::backend::{Args, BackendError, Launch};
use crate::spec::{ConvGeometry, KernelSpec, Op};

/// Runs `spec` on host slices, after the same argument checks every backend makes.
pub fn run(spec: &KernelSpec, launch: Launch, args: Args<'_, [f32]>) -> Result<(), BackendError> {
    args.check(spec, launch)?;
    let out = evaluate(spec, launch, &args);
    match args {
        Args::Spmm { y: out_buf, .. } | Args::SpmmT { dx: out_buf, .. } => {
            scatter_rows(out_buf, &out.values, launch)
        }
        Args::Sddmm { dw: out_buf, .. } | Args::DenseGrad { grad: out_buf, .. } => {
            for (o, v) in out_buf.iter_mut().zip(&out.values) {
                *o = *v as f32;
            }
        }
    }
    Ok(())
}

/// The exact result of an op and the bound used to compare against it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// The output, densely packed: `features × batch` for `spmm`/`spmm_t` (row stride
    /// `batch`, not `ld`), `nnz` for `sddmm`, `rows · cols` for `dense_grad`.
    pub values: Vec<f64>,
    /// For each output element, `Σ|terms|` (bias included).
    pub abs_sums: Vec<f64>,
    /// How `values` maps onto the output buffer.
    pub layout: OutputLayout,
}

/// How a reference output maps onto a kernel's output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputLayout {
    /// A `features × batch` matrix (`spmm`, `spmm_t`): packed with row stride `batch` in
    /// [`Reference::values`], with row stride `ld` in the buffer.
    Matrix {
        /// Columns per row.
        batch: usize,
    },
    /// A flat array (`sddmm`, `dense_grad`), the same in both.
    Flat,
}

/// Computes the reference result of `spec` for these arguments (their outputs are ignored),
/// checking the arguments first.
pub fn reference(
    spec: &KernelSpec,
    launch: Launch,
    args: &Args<'_, [f32]>,
) -> Result<Reference, BackendError> {
    args.check(spec, launch)?;
    Ok(evaluate(spec, launch, args))
}

fn evaluate(spec: &KernelSpec, launch: Launch, args: &Args<'_, [f32]>) -> Reference {
    if let Some(g) = spec.geometry() {
        return evaluate_conv(spec, g, launch, args);
    }
    let p = spec.pattern();
    let Launch { batch, ld } = launch;
    match (spec.op(), args) {
        (
            Op::Spmm { relu, .. },
            Args::Spmm {
                values, x, bias, ..
            },
        ) => {
            let mut out = Reference::zeros(p.rows() * batch, OutputLayout::Matrix { batch });
            for r in 0..p.rows() {
                for b in 0..batch {
                    let (mut acc, mut abs) = (0.0f64, 0.0f64);
                    for k in p.row_range(r) {
                        let term = values[k] as f64 * x[p.col_idx()[k] as usize * ld + b] as f64;
                        acc += term;
                        abs += term.abs();
                    }
                    if let Some(bias) = bias {
                        acc += bias[r] as f64;
                        abs += (bias[r] as f64).abs();
                    }
                    if relu {
                        acc = acc.max(0.0);
                    }
                    out.values[r * batch + b] = acc;
                    out.abs_sums[r * batch + b] = abs;
                }
            }
            out
        }
        (Op::SpmmT, Args::SpmmT { values, dy, .. }) => {
            let mut out = Reference::zeros(p.cols() * batch, OutputLayout::Matrix { batch });
            for r in 0..p.rows() {
                for k in p.row_range(r) {
                    let c = p.col_idx()[k] as usize;
                    for b in 0..batch {
                        let term = values[k] as f64 * dy[r * ld + b] as f64;
                        out.values[c * batch + b] += term;
                        out.abs_sums[c * batch + b] += term.abs();
                    }
                }
            }
            out
        }
        (Op::Sddmm, Args::Sddmm { dy, x, .. }) => {
            let mut out = Reference::zeros(p.nnz(), OutputLayout::Flat);
            for r in 0..p.rows() {
                for k in p.row_range(r) {
                    let c = p.col_idx()[k] as usize;
                    for b in 0..batch {
                        let term = dy[r * ld + b] as f64 * x[c * ld + b] as f64;
                        out.values[k] += term;
                        out.abs_sums[k] += term.abs();
                    }
                }
            }
            out
        }
        (Op::DenseGrad, Args::DenseGrad { dy, x, .. }) => {
            let (rows, cols) = (p.rows(), p.cols());
            let mut out = Reference::zeros(rows * cols, OutputLayout::Flat);
            for r in 0..rows {
                for c in 0..cols {
                    for b in 0..batch {
                        let term = dy[r * ld + b] as f64 * x[c * ld + b] as f64;
                        out.values[r * cols + c] += term;
                        out.abs_sums[r * cols + c] += term.abs();
                    }
                }
            }
            out
        }
        _ => unreachable!("Args::check guarantees the arguments match the op"),
    }
}

/// Every `(output position, input position)` pair a tap `(kh, kw)` connects: calls
/// `f(out_pos, in_pos)` with plane-relative position indices.
fn for_each_tap_position(g: &ConvGeometry, kh: usize, kw: usize, mut f: impl FnMut(usize, usize)) {
    let (oh_n, ow_n) = (g.out_height(), g.out_width());
    for oh in 0..oh_n {
        let ih = (oh * g.stride + kh) as isize - g.padding as isize;
        if ih < 0 || ih >= g.height as isize {
            continue;
        }
        for ow in 0..ow_n {
            let iw = (ow * g.stride + kw) as isize - g.padding as isize;
            if iw < 0 || iw >= g.width as isize {
                continue;
            }
            f(oh * ow_n + ow, ih as usize * g.width + iw as usize);
        }
    }
}

fn evaluate_conv(
    spec: &KernelSpec,
    g: &ConvGeometry,
    launch: Launch,
    args: &Args<'_, [f32]>,
) -> Reference {
    let p = spec.pattern();
    let Launch { batch, ld } = launch;
    let taps = g.taps();
    let (in_plane, out_plane) = (g.in_positions(), g.out_positions());
    // Splits a pattern column into (input channel, kh, kw).
    let split = |col: usize| (col / taps, (col % taps) / g.kernel, col % g.kernel);
    match (spec.op(), args) {
        (
            Op::Conv { relu, .. },
            Args::Spmm {
                values, x, bias, ..
            },
        ) => {
            let mut out =
                Reference::zeros(spec.out_features() * batch, OutputLayout::Matrix { batch });
            for o in 0..p.rows() {
                for k in p.row_range(o) {
                    let (c, kh, kw) = split(p.col_idx()[k] as usize);
                    let w = values[k] as f64;
                    for_each_tap_position(g, kh, kw, |op, ip| {
                        let (yr, xr) = (o * out_plane + op, c * in_plane + ip);
                        for b in 0..batch {
                            let term = w * x[xr * ld + b] as f64;
                            out.values[yr * batch + b] += term;
                            out.abs_sums[yr * batch + b] += term.abs();
                        }
                    });
                }
                for op in 0..out_plane {
                    for b in 0..batch {
                        let i = (o * out_plane + op) * batch + b;
                        if let Some(bias) = bias {
                            out.values[i] += bias[o] as f64;
                            out.abs_sums[i] += (bias[o] as f64).abs();
                        }
                        if relu {
                            out.values[i] = out.values[i].max(0.0);
                        }
                    }
                }
            }
            out
        }
        (Op::ConvT, Args::SpmmT { values, dy, .. }) => {
            let mut out =
                Reference::zeros(spec.in_features() * batch, OutputLayout::Matrix { batch });
            for o in 0..p.rows() {
                for k in p.row_range(o) {
                    let (c, kh, kw) = split(p.col_idx()[k] as usize);
                    let w = values[k] as f64;
                    for_each_tap_position(g, kh, kw, |op, ip| {
                        let (yr, xr) = (o * out_plane + op, c * in_plane + ip);
                        for b in 0..batch {
                            let term = w * dy[yr * ld + b] as f64;
                            out.values[xr * batch + b] += term;
                            out.abs_sums[xr * batch + b] += term.abs();
                        }
                    });
                }
            }
            out
        }
        (Op::ConvGrad, Args::Sddmm { dy, x, .. }) => {
            let mut out = Reference::zeros(p.nnz(), OutputLayout::Flat);
            for o in 0..p.rows() {
                for k in p.row_range(o) {
                    let (c, kh, kw) = split(p.col_idx()[k] as usize);
                    for_each_tap_position(g, kh, kw, |op, ip| {
                        let (yr, xr) = (o * out_plane + op, c * in_plane + ip);
                        for b in 0..batch {
                            let term = dy[yr * ld + b] as f64 * x[xr * ld + b] as f64;
                            out.values[k] += term;
                            out.abs_sums[k] += term.abs();
                        }
                    });
                }
            }
            out
        }
        (Op::ConvDenseGrad, Args::DenseGrad { dy, x, .. }) => {
            let cols = p.cols();
            let mut out = Reference::zeros(p.rows() * cols, OutputLayout::Flat);
            for o in 0..p.rows() {
                for col in 0..cols {
                    let (c, kh, kw) = split(col);
                    let i = o * cols + col;
                    for_each_tap_position(g, kh, kw, |op, ip| {
                        let (yr, xr) = (o * out_plane + op, c * in_plane + ip);
                        for b in 0..batch {
                            let term = dy[yr * ld + b] as f64 * x[xr * ld + b] as f64;
                            out.values[i] += term;
                            out.abs_sums[i] += term.abs();
                        }
                    });
                }
            }
            out
        }
        _ => unreachable!("Args::check guarantees the arguments match the op"),
    }
}

impl Reference {
    fn zeros(len: usize, layout: OutputLayout) -> Self {
        Reference {
            values: vec![0.0; len],
            abs_sums: vec![0.0; len],
            layout,
        }
    }

    /// Where packed element `i` sits in an output buffer with row stride `ld`.
    pub fn buffer_index(&self, i: usize, ld: usize) -> usize {
        match self.layout {
            OutputLayout::Matrix { batch } => (i / batch) * ld + i % batch,
            OutputLayout::Flat => i,
        }
    }
}

fn scatter_rows(out: &mut [f32], packed: &[f64], launch: Launch) {
    if launch.batch == 0 {
        return;
    }
    for (f, row) in packed.chunks(launch.batch).enumerate() {
        for (b, v) in row.iter().enumerate() {
            out[f * launch.ld + b] = *v as f32;
        }
    }
}

/// Where a backend's output disagrees with the reference beyond the tolerance.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// Position in the packed output (`feature · batch + b`, or the element index).
    pub index: usize,
    /// The backend's value.
    pub got: f32,
    /// The reference value.
    pub want: f64,
    /// The allowed error at that element.
    pub allowed: f64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "element {}: got {}, want {} (error {:e} > allowed {:e})",
            self.index,
            self.got,
            self.want,
            (self.got as f64 - self.want).abs(),
            self.allowed
        )
    }
}

/// Compares a backend's output with the reference under the tolerance of CONTRACTS.md.
///
/// `got` is the output buffer as the kernel wrote it: for `spmm`/`spmm_t` a matrix with row
/// stride `ld` (only columns `0..batch` are compared), otherwise the flat output. Returns the
/// first element out of tolerance (NaN anywhere is a mismatch).
pub fn compare(reference: &Reference, got: &[f32], ld: usize) -> Result<(), Mismatch> {
    for (i, (&want, &abs)) in reference.values.iter().zip(&reference.abs_sums).enumerate() {
        let g = got[reference.buffer_index(i, ld)];
        let allowed = 1e-5 * abs + 1e-6;
        let err = (g as f64 - want).abs();
        if err.is_nan() || err > allowed {
            return Err(Mismatch {
                index: i,
                got: g,
                want,
                allowed,
            });
        }
    }
    Ok(())
}
