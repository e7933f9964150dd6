//! The generic (index-array) kernels: one implementation per op, written once against
//! [`Simd`] and instantiated for AVX-512, AVX2 + FMA and portable code.
//!
//! ## Code shape
//!
//! `spmm` and `spmm_t` walk output rows; every nonzero `(r, c)` adds `w · X[c, block]` to the
//! row's accumulators. The batch is cut into blocks of up to eight vectors (nine with AVX-512; 128 columns with
//! AVX-512); each block is one pass over the row's nonzeros with `NV` vector accumulators
//! held in registers, and blocks narrower than five vectors keep several independent
//! accumulator sets (`NACC`) so the FMA latency is hidden. Batch blocks are aligned to the
//! vector width of `X` when every row shares one alignment (`ld` a multiple of the lanes): the
//! first vector of a row then starts before column 0 and its leading lanes are masked off, so
//! no load of `X` splits a cache line (split loads cost the most when `X` streams from L2;
//! `docs/MEASUREMENTS.md`). `spmm_t` walks the transposed pattern (computed once when the
//! kernel is compiled), reading each weight through the transpose's value index, so it needs
//! no atomics. Batch 1 has its own shape: a gather of 16 (or 8) `X` elements per step.
//!
//! `sddmm` keeps a block of the `dY` row in registers and takes a dot product per nonzero.
//!
//! ## Safety
//!
//! The kernels read and write through raw pointers. Each public entry point (`*_part`) checks,
//! in O(1), every length the pointer arithmetic relies on; the per-nonzero indices are
//! guaranteed in range by the [`Walk`] invariants, which hold by construction (they come from a
//! validated [`Pattern`] or [`Transposed`], whose value index is checked when the walk is made).

use std::ops::Range;

use sparse_ir::{Pattern, Transposed};

use crate::isa::IsaLevel;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::simd::{Portable, Simd};

/// The nonzeros a kernel walks, row by row: the CSR structure of `W` (`spmm`, `sddmm`) or of
/// `Wᵀ` (`spmm_t`).
///
/// Invariants (established by the constructors): `row_ptr` is non-decreasing, starts at 0 and
/// ends at `idx.len()`; every `idx[k] < in_rows`; `vidx`, when present, has `idx.len()`
/// entries, each `< values_len`; without `vidx`, `values_len == idx.len()`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Walk<'a> {
    row_ptr: &'a [u32],
    idx: &'a [u32],
    vidx: Option<&'a [u32]>,
    in_rows: usize,
    values_len: usize,
}

impl<'a> Walk<'a> {
    /// The rows of a pattern; nonzero `k` reads input row `col_idx[k]` and value `k`.
    pub(crate) fn of_pattern(p: &'a Pattern) -> Walk<'a> {
        Walk {
            row_ptr: p.row_ptr(),
            idx: p.col_idx(),
            vidx: None,
            in_rows: p.cols(),
            values_len: p.nnz(),
        }
    }

    /// The rows of a transposed pattern; nonzero `k` reads input row `col_idx[k]` (a row of
    /// the original) and value `value_index[k]`. `None` if the value index is inconsistent.
    pub(crate) fn of_transposed(t: &'a Transposed) -> Option<Walk<'a>> {
        let nnz = t.pattern.nnz();
        let ok = t.value_index.len() == nnz && t.value_index.iter().all(|&v| (v as usize) < nnz);
        ok.then_some(Walk {
            row_ptr: t.pattern.row_ptr(),
            idx: t.pattern.col_idx(),
            vidx: Some(&t.value_index),
            in_rows: t.pattern.cols(),
            values_len: nnz,
        })
    }

    /// The rows of a transposed pattern reading value `k` for its nonzero `k`: for values
    /// already permuted into the transpose's order.
    pub(crate) fn of_transposed_permuted(t: &'a Transposed) -> Walk<'a> {
        Walk {
            row_ptr: t.pattern.row_ptr(),
            idx: t.pattern.col_idx(),
            vidx: None,
            in_rows: t.pattern.cols(),
            values_len: t.pattern.nnz(),
        }
    }

    /// Number of input rows.
    pub(crate) fn in_rows(&self) -> usize {
        self.in_rows
    }

    /// Number of output rows.
    pub(crate) fn rows(&self) -> usize {
        self.row_ptr.len() - 1
    }

    /// Nonzeros of rows `rows`, as positions in walk order.
    pub(crate) fn nnz_range(&self, rows: Range<usize>) -> Range<usize> {
        self.row_ptr[rows.start] as usize..self.row_ptr[rows.end] as usize
    }
}

/// A walk's nonzeros split by panels of input rows, so that one panel of the input stays in
/// L2 while every output row takes its contribution from it (large layers: the input of
/// 4096² at batch 128 is 2 MB). Each panel is a walk of its own whose value index points
/// into the original value array.
#[derive(Debug)]
pub(crate) struct Panels {
    panels: Vec<PanelData>,
    in_rows: usize,
    values_len: usize,
}

#[derive(Debug)]
struct PanelData {
    row_ptr: Vec<u32>,
    idx: Vec<u32>,
    vidx: Vec<u32>,
}

/// Input rows per panel: 512 KB of input at 128 columns, the fastest of the panel heights
/// tried on 4096² at batch 128 (figures in `docs/MEASUREMENTS.md`).
pub(crate) const PANEL_ROWS: usize = 1024;

impl Panels {
    /// Splits `w` into panels of `width` input rows; `None` if there would be one panel.
    pub(crate) fn new(w: &Walk<'_>, width: usize) -> Option<Panels> {
        let width = width.max(1);
        let n = w.in_rows.div_ceil(width);
        if n <= 1 {
            return None;
        }
        let mut panels: Vec<PanelData> = (0..n)
            .map(|_| PanelData {
                row_ptr: vec![0],
                idx: Vec::new(),
                vidx: Vec::new(),
            })
            .collect();
        for r in 0..w.rows() {
            for k in w.nnz_range(r..r + 1) {
                let c = w.idx[k];
                let p = &mut panels[c as usize / width];
                p.idx.push(c);
                p.vidx.push(w.vidx.map_or(k as u32, |v| v[k]));
            }
            for p in &mut panels {
                p.row_ptr.push(p.idx.len() as u32);
            }
        }
        Some(Panels {
            panels,
            in_rows: w.in_rows,
            values_len: w.values_len,
        })
    }

    /// The panels as walks, in input order.
    pub(crate) fn walks(&self) -> impl ExactSizeIterator<Item = Walk<'_>> {
        // The walk invariants hold: each panel's row pointers count its entries, which are
        // entries of the original walk (input rows and value positions unchanged).
        self.panels.iter().map(|p| Walk {
            row_ptr: &p.row_ptr,
            idx: &p.idx,
            vidx: Some(&p.vidx),
            in_rows: self.in_rows,
            values_len: self.values_len,
        })
    }
}

/// Elements a `rows × batch` matrix with row stride `ld` spans.
fn span(rows: usize, batch: usize, ld: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * ld + batch
    }
}

/// Whether `level` may be entered on this CPU.
pub(crate) fn usable(level: IsaLevel) -> IsaLevel {
    if level.is_supported() {
        level
    } else {
        IsaLevel::Portable
    }
}

/// `Y[rows] = W·X (+ bias) (ReLU)` over the walk's rows (`spmm`), or `dX = Wᵀ·dY` (`spmm_t`,
/// with the transposed walk, no bias and no ReLU).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatJob<'a> {
    /// The nonzeros of every output row.
    pub walk: Walk<'a>,
    /// The weight values.
    pub values: &'a [f32],
    /// The input matrix, `walk.in_rows × ld`.
    pub x: &'a [f32],
    /// Bias per output row.
    pub bias: Option<&'a [f32]>,
    /// Apply ReLU after the bias.
    pub relu: bool,
    /// Add to what the output holds (a later input panel) instead of overwriting it.
    pub acc_in: bool,
    /// Columns per row.
    pub batch: usize,
    /// Row stride of `x` and of the output.
    pub ld: usize,
}

/// Computes output rows `rows` of `job` into `out`, which starts at row `rows.start` (row
/// stride `job.ld`; columns `0..batch` written).
///
/// # Panics
///
/// If a length is inconsistent (the backend checks every buffer before, so this is a bug).
pub(crate) fn mat_part(level: IsaLevel, job: &MatJob<'_>, rows: Range<usize>, out: &mut [f32]) {
    let w = &job.walk;
    assert!(rows.start <= rows.end && rows.end <= w.rows(), "row range");
    assert!(job.batch >= 1 && job.batch <= job.ld, "batch/ld");
    assert!(
        out.len() >= span(rows.len(), job.batch, job.ld),
        "output length"
    );
    assert!(
        job.x.len() >= span(w.in_rows, job.batch, job.ld),
        "input length"
    );
    assert!(job.values.len() >= w.values_len, "values length");
    assert!(job.bias.is_none_or(|b| b.len() >= rows.end), "bias length");
    let out = out.as_mut_ptr();
    let ind = w.vidx.is_some();
    // Gathers index `X` with `i32` offsets `c·ld` (and values with `i32` positions).
    let gather_ok = job.batch == 1
        && w.in_rows.saturating_mul(job.ld) <= i32::MAX as usize
        && job.values.len() <= i32::MAX as usize;
    // Every call below relies on the same facts: the asserts above checked every length
    // against the walk; the walk's invariants keep every nonzero's input row and value
    // position in range; `out` points at row `rows.start` of the output.
    match usable(level) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned AVX-512, so the CPU has `avx512f`, `avx2` and `fma`
        // (`IsaLevel::detect` requires all three); the lengths hold (above); the gather
        // kernels run only when `gather_ok` says their `i32` offsets fit.
        IsaLevel::Avx512 => unsafe {
            match (gather_ok, ind) {
                // 8-wide gathers beat 16-wide ones at batch 1 (docs/MEASUREMENTS.md).
                (true, false) => spmv_avx2::<false>(job, rows, out),
                (true, true) => spmv_avx2::<true>(job, rows, out),
                (false, false) => mat_avx512::<false>(job, rows, out),
                (false, true) => mat_avx512::<true>(job, rows, out),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned AVX2+FMA, so the CPU has `avx2` and `fma`; the lengths
        // hold (above); the gather kernels run only when `gather_ok` says their `i32` offsets
        // fit.
        IsaLevel::Avx2Fma => unsafe {
            match (gather_ok, ind) {
                (true, false) => spmv_avx2::<false>(job, rows, out),
                (true, true) => spmv_avx2::<true>(job, rows, out),
                (false, false) => mat_avx2::<false>(job, rows, out),
                (false, true) => mat_avx2::<true>(job, rows, out),
            }
        },
        // SAFETY: the portable kernels need no target feature (`Portable`'s `Simd` methods are
        // plain Rust); the lengths hold (above).
        _ => unsafe {
            match (job.batch == 1, ind) {
                (true, false) => spmv_scalar::<false>(job, rows, out),
                (true, true) => spmv_scalar::<true>(job, rows, out),
                (false, false) => mat_body::<Portable, false>(job, rows, out),
                (false, true) => mat_body::<Portable, true>(job, rows, out),
            }
        },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn mat_avx512<const IND: bool>(job: &MatJob<'_>, rows: Range<usize>, out: *mut f32) {
    // SAFETY: forwarded contract of `mat_body`; AVX-512F is enabled here.
    unsafe { mat_body::<Avx512, IND>(job, rows, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mat_avx2<const IND: bool>(job: &MatJob<'_>, rows: Range<usize>, out: *mut f32) {
    // SAFETY: forwarded contract of `mat_body`; AVX2 and FMA are enabled here.
    unsafe { mat_body::<Avx2, IND>(job, rows, out) }
}

/// Bytes of an input panel (`in_rows ×` block width) that stay in L2 while a block pass
/// walks it.
pub(crate) const L2_BLOCK_BYTES: usize = 1 << 20;

/// Vectors per batch block: eight (sixteen registers of AVX2 hold eight accumulators and
/// the operands), nine with AVX-512's 32 registers so that a batch of 128 whose blocks start
/// 1–15 columns early for alignment still takes one pass (two passes were
/// measurably slower; `docs/MEASUREMENTS.md`).
fn max_vectors<S: Simd>() -> usize {
    if S::LANES >= 16 {
        9
    } else {
        8
    }
}

/// How far (in floats) to start batch blocks before column 0 so that vector loads of `X`
/// are aligned to the vector width: only when every row has the same alignment and the
/// shift adds no vector to a narrow batch.
fn align_shift<S: Simd>(x: *const f32, batch: usize, ld: usize) -> usize {
    let l = S::LANES;
    if l == 1 || !ld.is_multiple_of(l) {
        return 0;
    }
    let k = (x as usize / 4) % l;
    if k == 0 {
        return 0;
    }
    // An extra pass for the last few columns still beats loads that split cache lines
    // (`docs/MEASUREMENTS.md`).
    let more_vectors = (batch + k).div_ceil(l) > batch.div_ceil(l);
    if more_vectors && batch < 4 * l {
        0
    } else {
        k
    }
}

/// One batch block: columns `s .. s + width` (`s` may be negative for an aligned head), `nv`
/// vectors, masks of the first and last vector, and whether any mask is partial.
struct Block<M> {
    s: isize,
    nv: usize,
    first: M,
    last: M,
    masked: bool,
}

/// Splits columns `-shift .. batch` into blocks of at most `max_nv ≤ 9` vectors.
#[inline(always)]
unsafe fn blocks<S: Simd>(
    batch: usize,
    shift: usize,
    max_nv: usize,
) -> impl Iterator<Item = Block<S::M>> {
    let l = S::LANES as isize;
    let b = batch as isize;
    let mut s = -(shift as isize);
    std::iter::from_fn(move || {
        if s >= b {
            return None;
        }
        let end = (s + max_nv as isize * l).min(b);
        let nv = ((end - s) as usize).div_ceil(l as usize);
        let lo = (-s).max(0) as usize;
        let hi = (end - (s + (nv as isize - 1) * l)) as usize;
        let l = l as usize;
        // SAFETY: `0 ≤ lo < hi ≤ l` for one vector, `lo < l` and `1 ≤ hi ≤ l` otherwise;
        // building a mask touches no memory.
        let (first, last) = unsafe {
            if nv == 1 {
                (S::mask(lo, hi), S::mask(lo, hi))
            } else {
                (S::mask(lo, l), S::mask(0, hi))
            }
        };
        let block = Block {
            s,
            nv,
            first,
            last,
            masked: lo > 0 || hi < l,
        };
        s = end;
        Some(block)
    })
}

/// Dispatches a block kernel on `(nv, masked)` to its monomorphised instance, choosing the
/// number of independent accumulator sets per width.
macro_rules! dispatch_nv {
    ($f:ident, $S:ty, [$($pre:tt)*], $nv:expr, $masked:expr, ($($arg:expr),*)) => {
        match ($nv, $masked) {
            (1, false) => $f::<$S, 1, 4, false, $($pre)*>($($arg),*),
            (1, true) => $f::<$S, 1, 4, true, $($pre)*>($($arg),*),
            (2, false) => $f::<$S, 2, 4, false, $($pre)*>($($arg),*),
            (2, true) => $f::<$S, 2, 4, true, $($pre)*>($($arg),*),
            (3, false) => $f::<$S, 3, 2, false, $($pre)*>($($arg),*),
            (3, true) => $f::<$S, 3, 2, true, $($pre)*>($($arg),*),
            (4, false) => $f::<$S, 4, 2, false, $($pre)*>($($arg),*),
            (4, true) => $f::<$S, 4, 2, true, $($pre)*>($($arg),*),
            (5, false) => $f::<$S, 5, 1, false, $($pre)*>($($arg),*),
            (5, true) => $f::<$S, 5, 1, true, $($pre)*>($($arg),*),
            (6, false) => $f::<$S, 6, 1, false, $($pre)*>($($arg),*),
            (6, true) => $f::<$S, 6, 1, true, $($pre)*>($($arg),*),
            (7, false) => $f::<$S, 7, 1, false, $($pre)*>($($arg),*),
            (7, true) => $f::<$S, 7, 1, true, $($pre)*>($($arg),*),
            (8, false) => $f::<$S, 8, 1, false, $($pre)*>($($arg),*),
            (8, true) => $f::<$S, 8, 1, true, $($pre)*>($($arg),*),
            (9, false) => $f::<$S, 9, 1, false, $($pre)*>($($arg),*),
            (9, true) => $f::<$S, 9, 1, true, $($pre)*>($($arg),*),
            _ => unreachable!("blocks have 1 to 9 vectors"),
        }
    };
}

/// # Safety
///
/// The CPU supports `S`; the lengths checked by [`mat_part`] hold; `out` points at row
/// `rows.start` of the output.
#[inline(always)]
unsafe fn mat_body<S: Simd, const IND: bool>(job: &MatJob<'_>, rows: Range<usize>, out: *mut f32) {
    let max_nv = max_vectors::<S>();
    let shift = align_shift::<S>(job.x.as_ptr(), job.batch, job.ld);
    // SAFETY: `blocks` builds masks only.
    for b in unsafe { blocks::<S>(job.batch, shift, max_nv) } {
        // SAFETY: forwarded; each block stays within columns `0..batch` except for lanes
        // masked off.
        unsafe {
            dispatch_nv!(
                mat_block,
                S,
                [IND],
                b.nv,
                b.masked,
                (job, rows.clone(), out, b.s, b.first, b.last)
            )
        }
    }
}

/// Value and input row of nonzero `k`.
#[inline(always)]
unsafe fn nonzero<const IND: bool>(
    idx: *const u32,
    vidx: *const u32,
    vals: *const f32,
    k: usize,
) -> (usize, f32) {
    // SAFETY: `k < idx.len()` and the walk invariants bound both indices.
    unsafe {
        let c = *idx.add(k) as usize;
        let w = if IND {
            *vals.add(*vidx.add(k) as usize)
        } else {
            *vals.add(k)
        };
        (c, w)
    }
}

/// Loads vector `v` of a block row at `p` (column `s`), masked at the block's ends.
#[inline(always)]
unsafe fn load_v<S: Simd, const NV: usize, const MASKED: bool>(
    p: *const f32,
    v: usize,
    first: S::M,
    last: S::M,
) -> S::V {
    // SAFETY: unmasked vectors lie within columns `0..batch` of the row; the masks of the
    // first and last vectors cover exactly the lanes within `0..batch` (masked lanes are not
    // accessed).
    unsafe {
        let q = p.wrapping_add(v * S::LANES);
        if MASKED && v == 0 {
            S::load_masked(q, first)
        } else if MASKED && v == NV - 1 {
            S::load_masked(q, last)
        } else {
            S::load(q)
        }
    }
}

/// Stores vector `v` of a block row at `p`, masked like [`load_v`].
#[inline(always)]
unsafe fn store_v<S: Simd, const NV: usize, const MASKED: bool>(
    p: *mut f32,
    v: usize,
    x: S::V,
    first: S::M,
    last: S::M,
) {
    // SAFETY: as in `load_v`.
    unsafe {
        let q = p.wrapping_add(v * S::LANES);
        if MASKED && v == 0 {
            S::store_masked(q, x, first)
        } else if MASKED && v == NV - 1 {
            S::store_masked(q, x, last)
        } else {
            S::store(q, x)
        }
    }
}

/// One batch block of `spmm`/`spmm_t` over rows `rows`: `NV` vectors per row, `NACC`
/// independent accumulator sets.
#[inline(always)]
unsafe fn mat_block<
    S: Simd,
    const NV: usize,
    const NACC: usize,
    const MASKED: bool,
    const IND: bool,
>(
    job: &MatJob<'_>,
    rows: Range<usize>,
    out: *mut f32,
    s: isize,
    first: S::M,
    last: S::M,
) {
    let ld = job.ld;
    let rp = job.walk.row_ptr.as_ptr();
    let idx = job.walk.idx.as_ptr();
    let vidx = job.walk.vidx.map_or(std::ptr::null(), |v| v.as_ptr());
    let vals = job.values.as_ptr();
    let xb = job.x.as_ptr().wrapping_offset(s);
    let row0 = rows.start;
    // SAFETY: (the whole loop) the caller guarantees the CPU supports `S`. `r < walk.rows()`,
    // so `r + 1 < row_ptr.len()`; nonzero positions lie in `row_ptr[r]..row_ptr[r+1] ⊆
    // 0..idx.len()`; `c < in_rows` and the input spans `in_rows` rows; output row `r - row0`
    // lies in `out`; see `load_v` for the columns.
    unsafe {
        let zero = S::zero();
        for r in rows {
            let start = *rp.add(r) as usize;
            let end = *rp.add(r + 1) as usize;
            let yp = out.wrapping_add((r - row0) * ld).wrapping_offset(s);
            let mut acc = [[zero; NV]; NACC];
            if job.acc_in {
                for (v, acc_v) in acc[0].iter_mut().enumerate() {
                    *acc_v = load_v::<S, NV, MASKED>(yp, v, first, last);
                }
            }
            let mut k = start;
            while k + NACC <= end {
                for (a, acc_a) in acc.iter_mut().enumerate() {
                    let (c, w) = nonzero::<IND>(idx, vidx, vals, k + a);
                    let xp = xb.wrapping_add(c * ld);
                    let w = S::splat(w);
                    for (v, acc_v) in acc_a.iter_mut().enumerate() {
                        *acc_v = S::fma(w, load_v::<S, NV, MASKED>(xp, v, first, last), *acc_v);
                    }
                }
                k += NACC;
            }
            while k < end {
                let (c, w) = nonzero::<IND>(idx, vidx, vals, k);
                let xp = xb.wrapping_add(c * ld);
                let w = S::splat(w);
                for (v, acc_v) in acc[0].iter_mut().enumerate() {
                    *acc_v = S::fma(w, load_v::<S, NV, MASKED>(xp, v, first, last), *acc_v);
                }
                k += 1;
            }
            let mut res = acc[0];
            for acc_a in &acc[1..] {
                for (rv, av) in res.iter_mut().zip(acc_a) {
                    *rv = S::add(*rv, *av);
                }
            }
            if let Some(bias) = job.bias {
                let b = S::splat(*bias.as_ptr().add(r));
                for rv in res.iter_mut() {
                    *rv = S::add(*rv, b);
                }
            }
            if job.relu {
                for rv in res.iter_mut() {
                    *rv = S::max(*rv, zero);
                }
            }
            for (v, rv) in res.iter().enumerate() {
                store_v::<S, NV, MASKED>(yp, v, *rv, first, last);
            }
        }
    }
}

/// Applies the epilogue to a finished output element.
#[inline(always)]
fn epilogue(v: f32, bias: Option<&[f32]>, r: usize, relu: bool) -> f32 {
    let v = match bias {
        Some(b) => v + b[r],
        None => v,
    };
    if relu {
        v.max(0.0)
    } else {
        v
    }
}

/// `spmm_t` at batch 1 as a scatter over the rows of `W` (`dX[c_k] += w_k·dY[r]`), which
/// reads the values in order instead of gathering them through the transpose's value index,
/// which was slower (`docs/MEASUREMENTS.md`). One thread: the outputs of
/// different rows collide.
///
/// `walk` is the walk of `W`; `dx` holds `walk.in_rows` rows of stride `ld`.
pub(crate) fn spmv_t_scatter(
    walk: &Walk<'_>,
    values: &[f32],
    dy: &[f32],
    ld: usize,
    dx: &mut [f32],
) {
    assert!(walk.vidx.is_none(), "the walk of W itself");
    assert!(values.len() >= walk.values_len, "values length");
    assert!(dy.len() >= span(walk.rows(), 1, ld), "dy length");
    assert!(dx.len() >= span(walk.in_rows, 1, ld), "dx length");
    for c in 0..walk.in_rows {
        dx[c * ld] = 0.0;
    }
    for r in 0..walk.rows() {
        let d = dy[r * ld];
        let nz = walk.nnz_range(r..r + 1);
        for (&c, &w) in walk.idx[nz.clone()].iter().zip(&values[nz]) {
            dx[c as usize * ld] += w * d;
        }
    }
}

/// Batch 1 with scalar loads and four accumulators.
///
/// # Safety
///
/// As [`mat_body`].
unsafe fn spmv_scalar<const IND: bool>(job: &MatJob<'_>, rows: Range<usize>, out: *mut f32) {
    let ld = job.ld;
    let idx = job.walk.idx.as_ptr();
    let vidx = job.walk.vidx.map_or(std::ptr::null(), |v| v.as_ptr());
    let vals = job.values.as_ptr();
    let x = job.x.as_ptr();
    let row0 = rows.start;
    for r in rows {
        let nz = job.walk.nnz_range(r..r + 1);
        let mut acc = [0.0f32; 4];
        let mut k = nz.start;
        // SAFETY: as in `mat_block`; only column 0 of each row is read and written.
        unsafe {
            while k + 4 <= nz.end {
                for (a, acc_a) in acc.iter_mut().enumerate() {
                    let (c, w) = nonzero::<IND>(idx, vidx, vals, k + a);
                    *acc_a += w * *x.add(c * ld);
                }
                k += 4;
            }
            while k < nz.end {
                let (c, w) = nonzero::<IND>(idx, vidx, vals, k);
                acc[0] += w * *x.add(c * ld);
                k += 1;
            }
            let o = out.add((r - row0) * ld);
            let v = (acc[0] + acc[1]) + (acc[2] + acc[3]) + if job.acc_in { *o } else { 0.0 };
            *o = epilogue(v, job.bias, r, job.relu);
        }
    }
}

/// Batch 1 with AVX2 gathers, 8 nonzeros a step.
///
/// # Safety
///
/// As [`mat_body`], and `in_rows · ld` and the values' length fit in `i32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn spmv_avx2<const IND: bool>(job: &MatJob<'_>, rows: Range<usize>, out: *mut f32) {
    use std::arch::x86_64::*;
    let ld = job.ld;
    let idx = job.walk.idx.as_ptr();
    let vidx = job.walk.vidx.map_or(std::ptr::null(), |v| v.as_ptr());
    let vals = job.values.as_ptr();
    let x = job.x.as_ptr();
    let ldv = _mm256_set1_epi32(ld as i32);
    let row0 = rows.start;
    for r in rows {
        let nz = job.walk.nnz_range(r..r + 1);
        let mut acc = _mm256_setzero_ps();
        let mut k = nz.start;
        // SAFETY: positions `k..k+8` (or the masked tail) lie in this row's nonzeros; the
        // gathered offsets `c·ld` and value positions are in range and fit in `i32`.
        unsafe {
            let offsets = |ci: __m256i| {
                if ld == 1 {
                    ci
                } else {
                    _mm256_mullo_epi32(ci, ldv)
                }
            };
            while k + 8 <= nz.end {
                let ci = _mm256_loadu_si256(idx.add(k) as *const __m256i);
                let xv = _mm256_i32gather_ps::<4>(x, offsets(ci));
                let wv = if IND {
                    let vi = _mm256_loadu_si256(vidx.add(k) as *const __m256i);
                    _mm256_i32gather_ps::<4>(vals, vi)
                } else {
                    _mm256_loadu_ps(vals.add(k))
                };
                acc = _mm256_fmadd_ps(wv, xv, acc);
                k += 8;
            }
            if k < nz.end {
                let mi = Avx2::mask(0, nz.end - k);
                let mf = _mm256_castsi256_ps(mi);
                let zero = _mm256_setzero_ps();
                let ci = _mm256_maskload_epi32(idx.add(k) as *const i32, mi);
                let xv = _mm256_mask_i32gather_ps::<4>(zero, x, offsets(ci), mf);
                let wv = if IND {
                    let vi = _mm256_maskload_epi32(vidx.add(k) as *const i32, mi);
                    _mm256_mask_i32gather_ps::<4>(zero, vals, vi, mf)
                } else {
                    _mm256_maskload_ps(vals.add(k), mi)
                };
                acc = _mm256_fmadd_ps(wv, xv, acc);
            }
            let o = out.add((r - row0) * ld);
            let v = Avx2::reduce_add(acc) + if job.acc_in { *o } else { 0.0 };
            *o = epilogue(v, job.bias, r, job.relu);
        }
    }
}

/// `dW[k] = Σ_b dY[r_k, b]·X[c_k, b]` over the walk's rows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SddmmJob<'a> {
    /// The nonzeros of `W` (no value index).
    pub walk: Walk<'a>,
    /// `dY`, `walk.rows() × ld`.
    pub dy: &'a [f32],
    /// `X`, `walk.in_rows × ld`.
    pub x: &'a [f32],
    /// Columns per row.
    pub batch: usize,
    /// Row stride of `dy` and `x`.
    pub ld: usize,
}

/// Computes the nonzeros of rows `rows` into `dw`, which holds the output positions
/// `base .. base + dw.len()`: position `k` for a walk of `W`, `vidx[k]` for a panel of it.
///
/// # Panics
///
/// If a length or position is inconsistent (a bug: the backend checks every buffer first).
pub(crate) fn sddmm_part(
    level: IsaLevel,
    job: &SddmmJob<'_>,
    rows: Range<usize>,
    dw: &mut [f32],
    base: usize,
) {
    let w = &job.walk;
    assert!(rows.start <= rows.end && rows.end <= w.rows(), "row range");
    assert!(job.batch >= 1 && job.batch <= job.ld, "batch/ld");
    let nz = w.nnz_range(rows.clone());
    if w.vidx.is_none() {
        assert!(
            nz.start >= base && nz.end <= base + dw.len(),
            "output range"
        );
    }
    assert!(
        job.dy.len() >= span(w.rows(), job.batch, job.ld),
        "dy length"
    );
    assert!(
        job.x.len() >= span(w.in_rows, job.batch, job.ld),
        "x length"
    );
    if job.batch == 1 {
        #[cfg(target_arch = "x86_64")]
        if w.vidx.is_none()
            && usable(level) == IsaLevel::Avx512
            && w.in_rows.saturating_mul(job.ld) <= i32::MAX as usize
        {
            let start = nz.start - base;
            // SAFETY: AVX-512F is supported (`usable`); the rows' nonzeros lie in `dw` from
            // `start` (checked above); `x` spans `in_rows` rows and the offsets `c·ld` fit
            // in `i32`.
            unsafe { sddmm1_avx512(job, rows, dw.as_mut_ptr().add(start)) };
            return;
        }
        for r in rows {
            let d = job.dy[r * job.ld];
            for k in w.nnz_range(r..r + 1) {
                let pos = w.vidx.map_or(k, |v| v[k] as usize);
                dw[pos - base] = d * job.x[w.idx[k] as usize * job.ld];
            }
        }
        return;
    }
    let out = Out {
        ptr: dw.as_mut_ptr(),
        base,
        len: dw.len(),
    };
    let ind = w.vidx.is_some();
    // Every call below relies on the same facts: the lengths were checked above, the walk's
    // invariants bound the indices, and a panel's output positions are checked one by one
    // (`Out`).
    match (usable(level), ind) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned AVX-512, so the CPU has `avx512f`; the lengths hold.
        (IsaLevel::Avx512, false) => unsafe { sddmm_avx512::<false>(job, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the arm above.
        (IsaLevel::Avx512, true) => unsafe { sddmm_avx512::<true>(job, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned AVX2+FMA, so the CPU has `avx2` and `fma`; the lengths hold.
        (IsaLevel::Avx2Fma, false) => unsafe { sddmm_avx2::<false>(job, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the arm above.
        (IsaLevel::Avx2Fma, true) => unsafe { sddmm_avx2::<true>(job, rows, out) },
        // SAFETY: the portable body needs no target feature; the lengths hold.
        (_, false) => unsafe { sddmm_body::<Portable, false>(job, rows, out) },
        // SAFETY: as the arm above.
        (_, true) => unsafe { sddmm_body::<Portable, true>(job, rows, out) },
    }
}

/// `sddmm` at batch 1 with AVX-512 gathers: `dw[k] = dY[r]·X[c_k]`, 16 nonzeros a step.
///
/// # Safety
///
/// AVX-512F is available; `dw` points at the output of the first nonzero of `rows` and holds
/// all of their nonzeros; the lengths of `sddmm_part` hold and `in_rows · ld` fits in `i32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sddmm1_avx512(job: &SddmmJob<'_>, rows: Range<usize>, dw: *mut f32) {
    use std::arch::x86_64::*;
    let ld = job.ld;
    let idx = job.walk.idx.as_ptr();
    let x = job.x.as_ptr();
    let ldv = _mm512_set1_epi32(ld as i32);
    let base = job.walk.nnz_range(rows.clone()).start;
    for r in rows {
        let nz = job.walk.nnz_range(r..r + 1);
        // SAFETY: `r` is a row of the walk, `dy` spans its rows; positions `k..k+16` (or
        // the masked tail) lie in the row's nonzeros; offsets are in range (see above).
        unsafe {
            let d = _mm512_set1_ps(*job.dy.as_ptr().add(r * ld));
            let offsets = |ci: __m512i| {
                if ld == 1 {
                    ci
                } else {
                    _mm512_mullo_epi32(ci, ldv)
                }
            };
            let mut k = nz.start;
            while k + 16 <= nz.end {
                let ci = _mm512_loadu_si512(idx.add(k) as *const __m512i);
                let xv = _mm512_i32gather_ps::<4>(offsets(ci), x);
                _mm512_storeu_ps(dw.add(k - base), _mm512_mul_ps(d, xv));
                k += 16;
            }
            if k < nz.end {
                let m: __mmask16 = ((1u32 << (nz.end - k)) - 1) as __mmask16;
                let ci = _mm512_maskz_loadu_epi32(m, idx.add(k) as *const i32);
                let xv = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, offsets(ci), x);
                _mm512_mask_storeu_ps(dw.add(k - base), m, _mm512_mul_ps(d, xv));
            }
        }
    }
}

/// The `sddmm` output: positions `base .. base + len` at `ptr`.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    base: usize,
    len: usize,
}

#[cold]
#[inline(never)]
fn position_out_of_range(pos: usize, out: Out) -> ! {
    panic!(
        "sddmm output position {pos} outside {}..{}",
        out.base,
        out.base + out.len
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sddmm_avx512<const IND: bool>(job: &SddmmJob<'_>, rows: Range<usize>, out: Out) {
    // SAFETY: forwarded contract; AVX-512F is enabled here.
    unsafe { sddmm_body::<Avx512, IND>(job, rows, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sddmm_avx2<const IND: bool>(job: &SddmmJob<'_>, rows: Range<usize>, out: Out) {
    // SAFETY: forwarded contract; AVX2 and FMA are enabled here.
    unsafe { sddmm_body::<Avx2, IND>(job, rows, out) }
}

/// # Safety
///
/// The CPU supports `S`; the lengths checked by [`sddmm_part`] hold.
#[inline(always)]
unsafe fn sddmm_body<S: Simd, const IND: bool>(job: &SddmmJob<'_>, rows: Range<usize>, out: Out) {
    let max_nv = max_vectors::<S>();
    let shift = align_shift::<S>(job.x.as_ptr(), job.batch, job.ld);
    // SAFETY: `blocks` builds masks only.
    for (i, b) in unsafe { blocks::<S>(job.batch, shift, max_nv) }.enumerate() {
        let first = i == 0;
        // SAFETY: forwarded.
        unsafe {
            dispatch_nv!(
                sddmm_block,
                S,
                [IND],
                b.nv,
                b.masked,
                (job, rows.clone(), out, b.s, b.first, b.last, first)
            )
        }
    }
}

/// One batch block of `sddmm`: the block of the `dY` row stays in registers, one dot
/// product per nonzero (two FMA chains), added to `dw` unless this is the first block.
#[inline(always)]
unsafe fn sddmm_block<
    S: Simd,
    const NV: usize,
    const NACC: usize,
    const MASKED: bool,
    const IND: bool,
>(
    job: &SddmmJob<'_>,
    rows: Range<usize>,
    out: Out,
    s: isize,
    first_mask: S::M,
    last_mask: S::M,
    first_block: bool,
) {
    let _ = NACC;
    let ld = job.ld;
    let rp = job.walk.row_ptr.as_ptr();
    let idx = job.walk.idx.as_ptr();
    let xb = job.x.as_ptr().wrapping_offset(s);
    let dyb = job.dy.as_ptr().wrapping_offset(s);
    let vidx = job.walk.vidx.map_or(std::ptr::null(), |v| v.as_ptr());
    // SAFETY: (the whole loop) as in `mat_block`; output positions lie in `out` (checked for
    // the rows by `sddmm_part`, or one by one for a panel).
    unsafe {
        for r in rows {
            let start = *rp.add(r) as usize;
            let end = *rp.add(r + 1) as usize;
            let dp = dyb.wrapping_add(r * ld);
            let mut d = [S::zero(); NV];
            for (v, dv) in d.iter_mut().enumerate() {
                *dv = load_v::<S, NV, MASKED>(dp, v, first_mask, last_mask);
            }
            for k in start..end {
                let c = *idx.add(k) as usize;
                let xp = xb.wrapping_add(c * ld);
                let mut a0 = S::mul(d[0], load_v::<S, NV, MASKED>(xp, 0, first_mask, last_mask));
                let mut a1 = S::zero();
                for (v, dv) in d.iter().enumerate().skip(1) {
                    let xv = load_v::<S, NV, MASKED>(xp, v, first_mask, last_mask);
                    if v % 2 == 1 {
                        a1 = S::fma(*dv, xv, a1);
                    } else {
                        a0 = S::fma(*dv, xv, a0);
                    }
                }
                let sum = S::reduce_add(if NV > 1 { S::add(a0, a1) } else { a0 });
                let pos = if IND { *vidx.add(k) as usize } else { k };
                if IND && pos.wrapping_sub(out.base) >= out.len {
                    position_out_of_range(pos, out);
                }
                let o = out.ptr.add(pos - out.base);
                *o = if first_block { sum } else { *o + sum };
            }
        }
    }
}
