//! The `dense` strategy: GEMM (the `gemm` crate) on the compacted weight matrix, i.e. with
//! the all-zero rows and columns of the pattern (empty output and input channels) dropped;
//! and the dense weight gradient, which every strategy computes with GEMM.
//!
//! The compact matrix `Wc` (`nr × nc`) keeps its zeros between runs (the pattern, and so the
//! positions of the nonzeros, never changes), so a run only scatters the `nnz` values into it.
//! Inputs whose rows are not all used are gathered into a contiguous scratch matrix, outputs
//! of a compacted shape are computed into scratch and scattered back.

use std::sync::Mutex;

use sparse_ir::Pattern;

use crate::pool::Pool;

/// A strided read-only matrix view on a slice: element `(i, j)` at `i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl View<'_> {
    /// Whether every element lies inside `data`.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1)
                .checked_mul(self.rs)
                .zip((self.cols - 1).checked_mul(self.cs))
                .and_then(|(a, b)| a.checked_add(b))
                .is_some_and(|last| last < self.data.len())
    }

    /// Rows `a..b` of this view.
    fn rows(self, a: usize, b: usize) -> Self {
        let data = if a == b {
            &self.data[..0]
        } else {
            &self.data[a * self.rs..]
        };
        View {
            data,
            rows: b - a,
            ..self
        }
    }
}

/// `dst[i·dst_rs + j] (=|+=) Σ_l lhs(i, l)·rhs(l, j)` for an `m × n` result; one call of the
/// `gemm` crate without its own threading. `accumulate` adds to what `dst` holds.
///
/// # Panics
///
/// If a view or the destination does not fit its slice (a bug of the callers here).
fn gemm_f32(dst: &mut [f32], dst_rs: usize, lhs: View<'_>, rhs: View<'_>, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions");
    assert!(lhs.fits() && rhs.fits(), "operand views");
    let dst_view = View {
        data: dst,
        rows: m,
        cols: n,
        rs: dst_rs,
        cs: 1,
    };
    assert!(dst_view.fits(), "destination view");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every element the call reads or writes is inside its slice (checked by `fits`
    // above, with `m, n, k ≥ 1`); `dst` is borrowed mutably and does not overlap the inputs;
    // all strides are below `isize::MAX` because they index into live slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// A pool and the work (multiply-adds) below which a GEMM stays on one thread.
#[derive(Clone, Copy)]
pub(crate) struct Par<'a> {
    /// The threads.
    pub pool: &'a Pool,
    /// The threshold.
    pub min_fmas: usize,
}

/// [`gemm_f32`] with the rows of the result split over the pool's threads.
pub(crate) fn gemm_par(
    par: Par<'_>,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let parts = par.pool.threads().min(m);
    if parts <= 1 || m * n * k < par.min_fmas.max(1) {
        gemm_f32(dst, dst_rs, lhs, rhs, accumulate);
        return;
    }
    let mut items = Vec::with_capacity(parts);
    let mut rest = dst;
    for p in 0..parts {
        let (a, b) = (m * p / parts, m * (p + 1) / parts);
        let chunk = if p + 1 == parts {
            std::mem::take(&mut rest)
        } else {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut((b - a) * dst_rs);
            rest = tail;
            head
        };
        items.push((a, b, chunk));
    }
    par.pool.for_each_mut(&mut items, &|(a, b, chunk)| {
        gemm_f32(chunk, dst_rs, lhs.rows(*a, *b), rhs, accumulate)
    });
}

/// `G[r·cols + c] = Σ_b dY[r, b]·X[c, b]`: the dense weight gradient.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_grad(
    par: Par<'_>,
    rows: usize,
    cols: usize,
    batch: usize,
    ld: usize,
    dy: &[f32],
    x: &[f32],
    grad: &mut [f32],
) {
    let lhs = View {
        data: dy,
        rows,
        cols: batch,
        rs: ld,
        cs: 1,
    };
    let rhs = View {
        data: x,
        rows: batch,
        cols,
        rs: 1,
        cs: ld,
    };
    gemm_par(par, grad, cols, lhs, rhs, false);
}

/// Scratch matrices of a dense kernel, reused between runs.
#[derive(Default)]
struct Scratch {
    /// The compact weights `nr × nc`, zero except at the pattern's positions.
    w: Vec<f32>,
    /// A gathered input.
    a: Vec<f32>,
    /// A compact output (or a second gathered input).
    b: Vec<f32>,
}

/// The compiled `dense` strategy of one pattern.
pub(crate) struct DenseKernel {
    /// Rows with at least one nonzero.
    live_rows: Vec<u32>,
    /// Columns with at least one nonzero.
    live_cols: Vec<u32>,
    /// Position of nonzero `k` in the compact `nr × nc` matrix.
    pos: Vec<u32>,
    rows: usize,
    cols: usize,
    scratch: Mutex<Scratch>,
}

impl std::fmt::Debug for DenseKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenseKernel")
            .field("live_rows", &self.live_rows.len())
            .field("live_cols", &self.live_cols.len())
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// The operands of one dense run.
pub(crate) enum DenseArgs<'a> {
    /// `Y = W·X (+ bias) (ReLU)`.
    Spmm {
        values: &'a [f32],
        x: &'a [f32],
        bias: Option<&'a [f32]>,
        relu: bool,
        y: &'a mut [f32],
    },
    /// `dX = Wᵀ·dY`.
    SpmmT {
        values: &'a [f32],
        dy: &'a [f32],
        dx: &'a mut [f32],
    },
    /// `dW[k] = Σ_b dY[r_k, b]·X[c_k, b]`.
    Sddmm {
        dy: &'a [f32],
        x: &'a [f32],
        dw: &'a mut [f32],
    },
}

impl DenseKernel {
    /// Compacts `p`: which rows and columns are live and where each nonzero goes. `None` if
    /// the compact matrix would not be addressable with `u32` positions.
    pub(crate) fn new(p: &Pattern) -> Option<DenseKernel> {
        let live_rows: Vec<u32> = (0..p.rows())
            .filter(|&r| !p.row_range(r).is_empty())
            .map(|r| r as u32)
            .collect();
        let counts = p.col_counts();
        let live_cols: Vec<u32> = (0..p.cols())
            .filter(|&c| counts[c] > 0)
            .map(|c| c as u32)
            .collect();
        let nc = live_cols.len();
        if live_rows.len().checked_mul(nc)? > u32::MAX as usize {
            return None;
        }
        let mut col_slot = vec![u32::MAX; p.cols()];
        for (j, &c) in live_cols.iter().enumerate() {
            col_slot[c as usize] = j as u32;
        }
        let mut pos = Vec::with_capacity(p.nnz());
        for (i, &r) in live_rows.iter().enumerate() {
            for &c in p.row(r as usize) {
                pos.push((i * nc) as u32 + col_slot[c as usize]);
            }
        }
        Some(DenseKernel {
            live_rows,
            live_cols,
            pos,
            rows: p.rows(),
            cols: p.cols(),
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// Live rows and columns of the pattern.
    pub(crate) fn live(&self) -> (usize, usize) {
        (self.live_rows.len(), self.live_cols.len())
    }

    /// Runs `op` (`spmm`, `spmm_t` or `sddmm`); the arguments were checked by the caller.
    pub(crate) fn run(&self, par: Par<'_>, batch: usize, ld: usize, args: DenseArgs<'_>) {
        match self.scratch.try_lock() {
            Ok(mut g) => self.run_with(par, batch, ld, args, &mut g),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                // A previous run panicked; the scratch holds nothing that must be intact.
                self.run_with(par, batch, ld, args, &mut p.into_inner())
            }
            // Another thread runs this kernel now: use fresh scratch.
            Err(std::sync::TryLockError::WouldBlock) => {
                self.run_with(par, batch, ld, args, &mut Scratch::default())
            }
        }
    }

    fn compact_weights(&self, values: &[f32], w: &mut Vec<f32>) {
        let (nr, nc) = self.live();
        if w.len() != nr * nc {
            *w = vec![0.0; nr * nc];
        }
        for (&p, &v) in self.pos.iter().zip(values) {
            w[p as usize] = v;
        }
    }

    /// Rows `live` of the feature-major matrix `src` (row stride `ld`), as a `live × batch`
    /// view (`transposed`: the `batch × live` view of the same numbers). `src` itself when every
    /// row is live (`all`), else the rows gathered into `scratch`.
    fn live_operand<'a>(
        src: &'a [f32],
        live: &[u32],
        all: bool,
        (batch, ld): (usize, usize),
        scratch: &'a mut Vec<f32>,
        transposed: bool,
    ) -> View<'a> {
        let (data, stride) = if all {
            (src, ld)
        } else {
            scratch.clear();
            for &r in live {
                let s = r as usize * ld;
                scratch.extend_from_slice(&src[s..s + batch]);
            }
            (&scratch[..], batch)
        };
        let rows = live.len();
        if transposed {
            View {
                data,
                rows: batch,
                cols: rows,
                rs: 1,
                cs: stride,
            }
        } else {
            View {
                data,
                rows,
                cols: batch,
                rs: stride,
                cs: 1,
            }
        }
    }

    /// Scatters a compact `live × batch` result back into the `total`-row matrix `dst` (row
    /// stride `ld`): row `live[i]` gets `fin` of compact row `i`, every other row `other(r)`.
    fn scatter_rows(
        dst: &mut [f32],
        (batch, ld): (usize, usize),
        total: usize,
        live: &[u32],
        compact: &[f32],
        fin: impl Fn(f32) -> f32,
        other: impl Fn(usize) -> f32,
    ) {
        let mut next = live.iter().enumerate().peekable();
        for r in 0..total {
            let out = &mut dst[r * ld..r * ld + batch];
            match next.next_if(|(_, &lr)| lr as usize == r) {
                Some((i, _)) => {
                    for (o, v) in out.iter_mut().zip(&compact[i * batch..(i + 1) * batch]) {
                        *o = fin(*v);
                    }
                }
                None => out.fill(other(r)),
            }
        }
    }

    fn run_with(
        &self,
        par: Par<'_>,
        batch: usize,
        ld: usize,
        args: DenseArgs<'_>,
        s: &mut Scratch,
    ) {
        let (nr, nc) = self.live();
        let all_rows = nr == self.rows;
        let all_cols = nc == self.cols;
        let shape = (batch, ld);
        match args {
            DenseArgs::Spmm {
                values,
                x,
                bias,
                relu,
                y,
            } => {
                self.compact_weights(values, &mut s.w);
                let lhs = View {
                    data: &s.w,
                    rows: nr,
                    cols: nc,
                    rs: nc,
                    cs: 1,
                };
                let rhs = Self::live_operand(x, &self.live_cols, all_cols, shape, &mut s.a, false);
                let fin = |v: f32| if relu { v.max(0.0) } else { v };
                if all_rows {
                    if let Some(bias) = bias {
                        for (r, &b) in bias.iter().enumerate() {
                            y[r * ld..r * ld + batch].fill(b);
                        }
                    }
                    gemm_par(par, y, ld, lhs, rhs, bias.is_some());
                    if relu {
                        for r in 0..self.rows {
                            y[r * ld..r * ld + batch]
                                .iter_mut()
                                .for_each(|v| *v = fin(*v));
                        }
                    }
                } else {
                    s.b.clear();
                    match bias {
                        Some(bias) => {
                            for &r in &self.live_rows {
                                s.b.extend(std::iter::repeat_n(bias[r as usize], batch));
                            }
                        }
                        None => s.b.resize(nr * batch, 0.0),
                    }
                    gemm_par(par, &mut s.b, batch, lhs, rhs, bias.is_some());
                    let other = |r: usize| fin(bias.map_or(0.0, |b| b[r]));
                    Self::scatter_rows(y, shape, self.rows, &self.live_rows, &s.b, fin, other);
                }
            }
            DenseArgs::SpmmT { values, dy, dx } => {
                self.compact_weights(values, &mut s.w);
                // Wcᵀ: element (j, i) = Wc[i·nc + j].
                let lhs = View {
                    data: &s.w,
                    rows: nc,
                    cols: nr,
                    rs: 1,
                    cs: nc,
                };
                let rhs = Self::live_operand(dy, &self.live_rows, all_rows, shape, &mut s.a, false);
                if all_cols {
                    gemm_par(par, dx, ld, lhs, rhs, false);
                } else {
                    s.b.clear();
                    s.b.resize(nc * batch, 0.0);
                    gemm_par(par, &mut s.b, batch, lhs, rhs, false);
                    let (keep, zero) = (|v: f32| v, |_: usize| 0.0);
                    Self::scatter_rows(dx, shape, self.cols, &self.live_cols, &s.b, keep, zero);
                }
            }
            DenseArgs::Sddmm { dy, x, dw } => {
                let lhs = Self::live_operand(dy, &self.live_rows, all_rows, shape, &mut s.a, false);
                let rhs = Self::live_operand(x, &self.live_cols, all_cols, shape, &mut s.b, true);
                if s.w.len() != nr * nc {
                    s.w = vec![0.0; nr * nc];
                }
                gemm_par(par, &mut s.w, nc, lhs, rhs, false);
                for (o, &p) in dw.iter_mut().zip(&self.pos) {
                    *o = s.w[p as usize];
                }
            }
        }
    }
}
