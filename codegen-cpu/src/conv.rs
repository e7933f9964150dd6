//! The generic convolution kernels: `conv`, `conv_t` and `conv_grad` on the pattern of the
//! `[out × C·k²]` weight mask, never unrolled over positions.
//!
//! Every nonzero `(o, c, kh, kw)` reads "plane `o` of `Y` += w · plane `c` of `X` shifted by
//! the tap `(kh, kw)`". The kernels walk *tiles* of output positions; for each tile they work
//! out once which taps fall inside the input (so the inner loop has no branch: taps outside
//! are skipped whole, which is what zero padding means) and where each tap's input starts,
//! then run every output channel over the tile, its nonzeros grouped by tap in a
//! [`TapTable`]. A tile's outputs stay in vector registers across all of a channel's
//! nonzeros (one load and one FMA per nonzero and vector), and the input rows of a tile stay
//! in L1/L2 across channels. With many input planes (64 or more), every channel runs over one
//! block of 32 input planes before the next block, its sums stored and reloaded in between:
//! the input under a tile's taps for all planes (128 channels, 2 positions at batch 128:
//! about 800 KB) would not stay in a 1 MB L2 while the channels reuse it.
//!
//! A tile is one output position (`batch` contiguous floats), or, at stride 1 where every tap
//! of a run of positions lies inside the input and `ld = batch` (no padding columns between
//! positions), the whole run as one contiguous span. Spans are cut into pieces of at most
//! `max_vectors` vectors, the last one masked, so padding columns are never read or written.
//!
//! `conv_t` is the same gather over the transposed table (rows are input channels, planes
//! are output channels) with the tap read backwards: input position `(ih, iw)` takes output
//! position `((ih + p − kh) / s, (iw + p − kw) / s)` where that divides and lies inside.
//! `conv_grad` walks the forward tiles with `dY`'s tile in registers and keeps one vector of
//! partial sums per nonzero, reduced at the end.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use sparse_ir::{ConvGeometry, Pattern};

use crate::generic::usable;
use crate::isa::IsaLevel;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
use crate::simd::{Portable, Simd};

/// The most vectors of a piece held in registers: sixteen with AVX-512's 32 registers (two
/// positions at batch 128: each nonzero's index, value and address serve 16 FMAs), eight
/// with AVX2's 16 (eight accumulators keep two FMA ports busy through a four-cycle latency).
fn max_vectors<S: Simd>() -> usize {
    if S::LANES >= 16 {
        16
    } else {
        8
    }
}

/// The nonzeros of one side of a convolution, grouped by row and tap: the entries of row `r`
/// at tap `t` are `start[r·taps + t] .. start[r·taps + t + 1]`, each with the plane it reads
/// (the other side's channel) and the index of its weight value.
#[derive(Debug, Clone)]
pub(crate) struct TapTable {
    rows: usize,
    taps: usize,
    start: Vec<u32>,
    plane: Vec<u32>,
    value: Vec<u32>,
    /// The non-empty `(tap, entries)` groups, row by row: row `r`'s are
    /// `groups[row_groups[r] .. row_groups[r + 1]]` (a sparse row visits only its taps).
    groups: Vec<(u32, u32, u32)>,
    row_groups: Vec<u32>,
    /// Planes per block of [`TapTable::block_groups_of`] (all planes in one block if 0).
    block: usize,
    /// The groups cut at multiples of `block` planes: block `b` of row `r` is
    /// `block_groups[block_rows[b·rows + r] .. block_rows[b·rows + r + 1]]` (empty without
    /// blocks).
    block_groups: Vec<(u32, u32, u32)>,
    block_rows: Vec<u32>,
    /// The largest plane any entry reads, plus one (0 when empty): the read side must hold
    /// this many planes.
    planes: usize,
    /// The largest value index plus one (0 when empty): the value array must hold this many.
    values_needed: usize,
}

impl TapTable {
    /// Rows are output channels, planes input channels (`conv`, `conv_grad`).
    pub(crate) fn forward(p: &Pattern, g: &ConvGeometry) -> TapTable {
        let taps = g.taps();
        let mut entries = Vec::with_capacity(p.nnz());
        for o in 0..p.rows() {
            for k in p.row_range(o) {
                let col = p.col_idx()[k] as usize;
                entries.push((o, col % taps, col / taps, k));
            }
        }
        Self::from_entries(p.rows(), taps, entries)
    }

    /// Rows are input channels, planes output channels (`conv_t`).
    pub(crate) fn backward(p: &Pattern, g: &ConvGeometry) -> TapTable {
        let taps = g.taps();
        let mut entries = Vec::with_capacity(p.nnz());
        for o in 0..p.rows() {
            for k in p.row_range(o) {
                let col = p.col_idx()[k] as usize;
                entries.push((col / taps, col % taps, o, k));
            }
        }
        Self::from_entries(g.in_channels, taps, entries)
    }

    /// `(row, tap, plane, value index)` entries, any order.
    fn from_entries(
        rows: usize,
        taps: usize,
        mut entries: Vec<(usize, usize, usize, usize)>,
    ) -> TapTable {
        entries.sort_unstable();
        let mut start = vec![0u32; rows * taps + 1];
        for &(r, t, _, _) in &entries {
            start[r * taps + t + 1] += 1;
        }
        for i in 1..start.len() {
            start[i] += start[i - 1];
        }
        let mut groups = Vec::new();
        let mut row_groups = Vec::with_capacity(rows + 1);
        for r in 0..rows {
            row_groups.push(groups.len() as u32);
            for t in 0..taps {
                let (a, b) = (start[r * taps + t], start[r * taps + t + 1]);
                if a < b {
                    groups.push((t as u32, a, b));
                }
            }
        }
        row_groups.push(groups.len() as u32);
        TapTable {
            rows,
            taps,
            start,
            plane: entries.iter().map(|e| e.2 as u32).collect(),
            value: entries.iter().map(|e| e.3 as u32).collect(),
            groups,
            row_groups,
            block: 0,
            block_groups: Vec::new(),
            block_rows: Vec::new(),
            planes: entries.iter().map(|e| e.2 + 1).max().unwrap_or(0),
            values_needed: entries.iter().map(|e| e.3 + 1).max().unwrap_or(0),
        }
    }

    /// The table with its groups also cut into blocks of `block` planes (entries of a group
    /// are sorted by plane, so each block's part of a group is a sub-range); no blocks if
    /// `block` is 0 or holds every plane.
    fn with_blocks(mut self, block: usize) -> TapTable {
        if block == 0 || block >= self.planes {
            return self;
        }
        let blocks = self.planes.div_ceil(block);
        let mut block_groups = Vec::new();
        let mut block_rows = Vec::with_capacity(blocks * self.rows + 1);
        for b in 0..blocks {
            let (lo, hi) = ((b * block) as u32, ((b + 1) * block) as u32);
            for r in 0..self.rows {
                block_rows.push(block_groups.len() as u32);
                for &(tap, first, end) in self.groups_of(r) {
                    let entries = &self.plane[first as usize..end as usize];
                    let from = first + entries.partition_point(|&p| p < lo) as u32;
                    let to = first + entries.partition_point(|&p| p < hi) as u32;
                    if from < to {
                        block_groups.push((tap, from, to));
                    }
                }
            }
        }
        block_rows.push(block_groups.len() as u32);
        self.block = block;
        self.block_groups = block_groups;
        self.block_rows = block_rows;
        self
    }

    /// Row `r`'s non-empty `(tap, first entry, end)` groups.
    fn groups_of(&self, r: usize) -> &[(u32, u32, u32)] {
        &self.groups[self.row_groups[r] as usize..self.row_groups[r + 1] as usize]
    }

    /// Number of plane blocks (1 without blocks).
    fn blocks(&self) -> usize {
        if self.block == 0 {
            1
        } else {
            self.planes.div_ceil(self.block)
        }
    }

    /// Row `r`'s groups restricted to plane block `b` of `blocks` (all its groups for one
    /// block).
    fn block_groups_of(&self, b: usize, blocks: usize, r: usize) -> &[(u32, u32, u32)] {
        if blocks == 1 {
            return self.groups_of(r);
        }
        let i = b * self.rows + r;
        &self.block_groups[self.block_rows[i] as usize..self.block_rows[i + 1] as usize]
    }

    /// The entries of rows `rows`.
    fn rows_range(&self, rows: Range<usize>) -> Range<usize> {
        self.start[rows.start * self.taps] as usize..self.start[rows.end * self.taps] as usize
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.plane.len()
    }
}

/// Which way a gather reads its taps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Output positions read input positions `(h·s + kh − p, w·s + kw − p)`.
    Forward,
    /// Input positions read output positions `((h + p − kh) / s, (w + p − kw) / s)`.
    Backward,
}

/// The position maps of one convolution, seen from the side a kernel writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sides {
    g: ConvGeometry,
    dir: Direction,
}

impl Sides {
    /// The sides of `g` for a kernel that gathers in direction `dir`.
    pub(crate) fn new(g: ConvGeometry, dir: Direction) -> Sides {
        Sides { g, dir }
    }

    /// Height and width of the planes written.
    pub(crate) fn out_dims(&self) -> (usize, usize) {
        match self.dir {
            Direction::Forward => (self.g.out_height(), self.g.out_width()),
            Direction::Backward => (self.g.height, self.g.width),
        }
    }

    /// Height and width of the planes read.
    fn in_dims(&self) -> (usize, usize) {
        match self.dir {
            Direction::Forward => (self.g.height, self.g.width),
            Direction::Backward => (self.g.out_height(), self.g.out_width()),
        }
    }

    /// The coordinate read along one axis by written coordinate `at` under tap offset `tap`,
    /// where it exists (`len` is the read axis's length).
    fn axis(&self, at: usize, tap: usize, len: usize) -> Option<usize> {
        let (s, p) = (self.g.stride, self.g.padding);
        let i = match self.dir {
            Direction::Forward => (at * s + tap).checked_sub(p)?,
            Direction::Backward => {
                let shifted = (at + p).checked_sub(tap)?;
                if shifted % s != 0 {
                    return None;
                }
                shifted / s
            }
        };
        (i < len).then_some(i)
    }

    /// The position (within a plane) read by written position `(h, w)` under tap `t`.
    pub(crate) fn tap(&self, h: usize, w: usize, t: usize) -> Option<usize> {
        let k = self.g.kernel;
        let (ih_n, iw_n) = self.in_dims();
        let ih = self.axis(h, t / k, ih_n)?;
        let iw = self.axis(w, t % k, iw_n)?;
        Some(ih * iw_n + iw)
    }

    /// Whether every tap's column is inside the input at written column `w`, with the
    /// columns read moving one by one with `w` (stride 1).
    fn interior_column(&self, w: usize) -> bool {
        let (_, iw_n) = self.in_dims();
        self.g.stride == 1 && (0..self.g.kernel).all(|kw| self.axis(w, kw, iw_n).is_some())
    }
}

/// A run of written positions in one row: `npos` positions from `(h, w0)`. Runs of more
/// than one position are interior (every tap's column inside, stride 1).
#[derive(Debug, Clone, Copy)]
struct Tile {
    h: u32,
    w0: u32,
    npos: u32,
}

/// The compiled form of a gather (`conv` or `conv_t`) or of `conv_grad`: the table, the
/// tiles of the written side and the rows of each thread's part.
pub(crate) struct ConvGather {
    sides: Sides,
    table: TapTable,
    tiles: Vec<Tile>,
    /// Consecutive row ranges of about equal work, one per thread.
    pub(crate) parts: Vec<Range<usize>>,
    /// The spans of the last launch shape `(batch, ld, lanes)`, kept so that a training
    /// step allocates nothing.
    spans: Mutex<Option<CachedSpans>>,
}

impl ConvGather {
    /// The gather of `p` with geometry `g` in direction `dir`, split into `threads` parts.
    pub(crate) fn new(p: &Pattern, g: &ConvGeometry, dir: Direction, threads: usize) -> ConvGather {
        let sides = Sides::new(*g, dir);
        let table = match dir {
            Direction::Forward => TapTable::forward(p, g),
            Direction::Backward => TapTable::backward(p, g),
        };
        let block = plane_block(table.planes);
        let table = table.with_blocks(block);
        let (oh_n, ow_n) = sides.out_dims();
        let mut tiles = Vec::new();
        for h in 0..oh_n {
            let mut w = 0;
            while w < ow_n {
                let mut end = w + 1;
                if sides.interior_column(w) {
                    while end < ow_n && sides.interior_column(end) {
                        end += 1;
                    }
                }
                tiles.push(Tile {
                    h: h as u32,
                    w0: w as u32,
                    npos: (end - w) as u32,
                });
                w = end;
            }
        }
        let parts = balanced(&table, threads);
        ConvGather {
            sides,
            table,
            tiles,
            parts,
            spans: Mutex::new(None),
        }
    }

    /// The spans at launch shape `(batch, ld)` over `lanes` columns of each position
    /// (`batch`, or `ld` with the padding): the cached list, or a new one (cached).
    fn spans_at(&self, batch: usize, ld: usize, lanes: usize) -> Arc<SpanList> {
        let mut cache = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        match &*cache {
            Some((b, l, n, list)) if (*b, *l, *n) == (batch, ld, lanes) => Arc::clone(list),
            _ => {
                let list = Arc::new(self.span_list(ld, lanes));
                *cache = Some((batch, ld, lanes, Arc::clone(&list)));
                list
            }
        }
    }

    /// Rows written (output channels of `conv`/`conv_grad`, input channels of `conv_t`).
    pub(crate) fn rows(&self) -> usize {
        self.table.rows
    }

    /// Floats of one written plane at row stride `ld`.
    pub(crate) fn out_plane_len(&self, ld: usize) -> usize {
        let (h, w) = self.sides.out_dims();
        h * w * ld
    }

    /// Floats of one read plane at row stride `ld`.
    fn in_plane_len(&self, ld: usize) -> usize {
        let (h, w) = self.sides.in_dims();
        h * w * ld
    }

    /// Number of table entries (nonzeros).
    pub(crate) fn entries(&self) -> usize {
        self.table.len()
    }

    /// Number of table entries of rows `rows`.
    pub(crate) fn entries_of(&self, rows: Range<usize>) -> usize {
        self.table.rows_range(rows).len()
    }

    /// The tiles as spans at row stride `ld` over `lanes` columns of each position: each
    /// span with its first float within a written plane, its length in floats, and per tap
    /// the offset of the span's first float within a read plane ([`OUTSIDE`] where the tap
    /// falls outside the input). Where the lanes are the whole row (`lanes = ld`), an
    /// interior run of positions is one contiguous span.
    fn span_list(&self, ld: usize, lanes: usize) -> SpanList {
        let (_, ow_n) = self.sides.out_dims();
        let taps_n = self.table.taps;
        let mut list = SpanList::default();
        for tile in &self.tiles {
            let (h, w0, npos) = (tile.h as usize, tile.w0 as usize, tile.npos as usize);
            let whole = npos > 1 && lanes == ld;
            let (step, len) = if whole { (npos, npos * ld) } else { (1, lanes) };
            for w in (w0..w0 + npos).step_by(step) {
                let first = list.offsets.len();
                for t in 0..taps_n {
                    let offset = self.sides.tap(h, w, t).map_or(OUTSIDE, |pos| pos * ld);
                    list.offsets.push(offset);
                }
                list.spans.push(Span {
                    out_off: (h * ow_n + w) * ld,
                    len,
                    offsets: first..list.offsets.len(),
                });
            }
        }
        list
    }
}

/// The offset of a tap that falls outside the input.
const OUTSIDE: usize = usize::MAX;

/// Spans cached for one launch shape: `(batch, ld, lanes, spans)`.
type CachedSpans = (usize, usize, usize, Arc<SpanList>);

/// A run of floats of a written plane and where each tap reads it.
struct Span {
    out_off: usize,
    len: usize,
    offsets: Range<usize>,
}

/// The spans of one launch shape ([`ConvGather::span_list`]).
#[derive(Default)]
struct SpanList {
    spans: Vec<Span>,
    offsets: Vec<usize>,
}

/// Splits the table's rows into `parts` consecutive ranges of about equal work (entries plus
/// a few per row).
fn balanced(table: &TapTable, parts: usize) -> Vec<Range<usize>> {
    crate::backend::balanced_ranges(table.rows, parts, |r| table.rows_range(0..r).len() + 2 * r)
}

/// Planes per block of a gather's channel loop ([`TapTable::with_blocks`]), for tables that
/// read enough planes for blocks to pay: 32, or 64 from 256 planes (measured on 128 to 512
/// planes at batch 128, docs/MEASUREMENTS.md); 0 (none) below 96 planes. Whether a launch
/// uses the blocks depends on its batch ([`use_blocks`]).
fn plane_block(planes: usize) -> usize {
    if let Some(block) = forced_block() {
        return block;
    }
    match planes {
        0..96 => 0,
        96..256 => 32,
        _ => 64,
    }
}

/// Planes per block forced by `SPARSEJIT_CONV_BLOCK=N` (0: no blocks), for measuring the
/// choice: blocks are then used at every batch.
fn forced_block() -> Option<usize> {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| {
        std::env::var("SPARSEJIT_CONV_BLOCK")
            .ok()
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Whether a gather at `lanes` floats per position runs the table's plane blocks: when the
/// input under a two-position tile's taps, for every plane, passes half of the core's L2
/// (the input under one tile of 128 planes, 768 KiB, ran faster in blocks with Zen 4's
/// 1 MiB and slower with Sapphire Rapids' 2 MiB), the whole input does not fit in the L2
/// anyway (a 2×2 input of 512 planes ran 1.3–1.8× slower in blocks), and rows average at
/// least 8 entries per block.
fn use_blocks(table: &TapTable, kernel: usize, in_plane: usize, lanes: usize) -> bool {
    if forced_block().is_some() {
        return table.block > 0;
    }
    blocks_pay(table, kernel, in_plane, lanes, crate::cache::l2_bytes())
}

/// [`use_blocks`] for a core with `l2` bytes of L2.
fn blocks_pay(table: &TapTable, kernel: usize, in_plane: usize, lanes: usize, l2: usize) -> bool {
    // A row's sums are stored and reloaded once per block: worth it where a row has a few
    // entries in each block (at 1 % density, 128 planes: 3, and the blocks lost 1.26×).
    const ENTRIES_PER_ROW_BLOCK_MIN: usize = 8;
    let window = kernel * (kernel + 1);
    let tile_input = table.planes * window.min(in_plane / lanes.max(1)) * lanes * 4;
    let row_blocks = table.rows * table.blocks();
    table.block > 0
        && tile_input > l2 / 2
        && table.planes * in_plane * 4 > l2
        && table.len() >= ENTRIES_PER_ROW_BLOCK_MIN * row_blocks
}

/// Whether a gather (`conv`, `conv_t`) at `(batch, ld)` computes whole rows, padding columns
/// included: where the padding is at most a quarter of the batch (the runtime's batch 100 in
/// rows of 112), an interior run of positions is then one contiguous span held in up to 16
/// vectors, instead of one position of `batch` floats (7 vectors and a masked tail) at a
/// time. The padding columns of the output are then written (with what the input's padding
/// gives: the kernel says so, `Kernel::writes_padding`).
pub(crate) fn padded_rows(batch: usize, ld: usize) -> bool {
    ld > batch && (ld - batch) * 4 <= batch
}

/// One gather launch: `out[row] = Σ values · input[plane]` over the tiles, plus `bias[row]`
/// and ReLU where asked.
pub(crate) struct GatherJob<'a> {
    /// The compiled gather.
    pub gather: &'a ConvGather,
    /// The weight values, in the pattern's order.
    pub values: &'a [f32],
    /// The matrix read (`X` for `conv`, `dY` for `conv_t`).
    pub input: &'a [f32],
    /// Bias per written row.
    pub bias: Option<&'a [f32]>,
    /// Apply ReLU after the bias.
    pub relu: bool,
    /// Columns per row.
    pub batch: usize,
    /// Row stride.
    pub ld: usize,
}

/// Writes rows `rows` of `job` into `out`, which holds exactly those rows' planes (row
/// `rows.start` first), columns `0..batch` of each position.
///
/// # Panics
///
/// If a length is inconsistent (the backend checks every buffer before, so this is a bug).
pub(crate) fn gather_part(
    level: IsaLevel,
    job: &GatherJob<'_>,
    rows: Range<usize>,
    out: &mut [f32],
) {
    let g = job.gather;
    let plane_out = g.out_plane_len(job.ld);
    assert!(rows.end <= g.rows(), "row range");
    assert!(job.batch >= 1 && job.batch <= job.ld, "batch/ld");
    assert!(out.len() >= rows.len() * plane_out, "output length");
    assert!(
        job.input.len() >= g.table.planes * g.in_plane_len(job.ld),
        "input length"
    );
    // Every value index is below `values_needed` (counted when the table was built), so
    // this one comparison covers them all.
    assert!(job.values.len() >= g.table.values_needed, "values length");
    assert!(job.bias.is_none_or(|b| b.len() >= rows.end), "bias length");
    match usable(level) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned AVX-512, so the CPU has `avx512f`; the lengths hold
        // (checked above; `gather_body` documents the rest).
        IsaLevel::Avx512 => unsafe { gather_avx512(job, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned AVX2+FMA, so the CPU has `avx2` and `fma`; the lengths
        // hold (above).
        IsaLevel::Avx2Fma => unsafe { gather_avx2(job, rows, out) },
        // SAFETY: the portable level needs no target feature; the lengths hold (above).
        _ => unsafe { gather_body::<Portable>(job, rows, out) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_avx512(job: &GatherJob<'_>, rows: Range<usize>, out: &mut [f32]) {
    // SAFETY: forwarded contract of `gather_body`; AVX-512F is enabled here.
    unsafe { gather_body::<Avx512>(job, rows, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gather_avx2(job: &GatherJob<'_>, rows: Range<usize>, out: &mut [f32]) {
    // SAFETY: forwarded contract of `gather_body`; AVX2 and FMA are enabled here.
    unsafe { gather_body::<Avx2>(job, rows, out) }
}

/// Calls `$f::<$S, NV, MASKED>` for a piece of `$nv` vectors whose last one is `$masked`.
macro_rules! dispatch_piece {
    ($f:ident, $S:ty, $nv:expr, $masked:expr, ($($arg:expr),*)) => {
        match ($nv, $masked) {
            (1, false) => $f::<$S, 1, false>($($arg),*),
            (1, true) => $f::<$S, 1, true>($($arg),*),
            (2, false) => $f::<$S, 2, false>($($arg),*),
            (2, true) => $f::<$S, 2, true>($($arg),*),
            (3, false) => $f::<$S, 3, false>($($arg),*),
            (3, true) => $f::<$S, 3, true>($($arg),*),
            (4, false) => $f::<$S, 4, false>($($arg),*),
            (4, true) => $f::<$S, 4, true>($($arg),*),
            (5, false) => $f::<$S, 5, false>($($arg),*),
            (5, true) => $f::<$S, 5, true>($($arg),*),
            (6, false) => $f::<$S, 6, false>($($arg),*),
            (6, true) => $f::<$S, 6, true>($($arg),*),
            (7, false) => $f::<$S, 7, false>($($arg),*),
            (7, true) => $f::<$S, 7, true>($($arg),*),
            (8, false) => $f::<$S, 8, false>($($arg),*),
            (8, true) => $f::<$S, 8, true>($($arg),*),
            (9, false) => $f::<$S, 9, false>($($arg),*),
            (9, true) => $f::<$S, 9, true>($($arg),*),
            (10, false) => $f::<$S, 10, false>($($arg),*),
            (10, true) => $f::<$S, 10, true>($($arg),*),
            (11, false) => $f::<$S, 11, false>($($arg),*),
            (11, true) => $f::<$S, 11, true>($($arg),*),
            (12, false) => $f::<$S, 12, false>($($arg),*),
            (12, true) => $f::<$S, 12, true>($($arg),*),
            (13, false) => $f::<$S, 13, false>($($arg),*),
            (13, true) => $f::<$S, 13, true>($($arg),*),
            (14, false) => $f::<$S, 14, false>($($arg),*),
            (14, true) => $f::<$S, 14, true>($($arg),*),
            (15, false) => $f::<$S, 15, false>($($arg),*),
            (15, true) => $f::<$S, 15, true>($($arg),*),
            (16, false) => $f::<$S, 16, false>($($arg),*),
            (16, true) => $f::<$S, 16, true>($($arg),*),
            _ => unreachable!("pieces have 1 to 16 vectors"),
        }
    };
}

/// The next piece of a span with `left` floats to go: its floats, vectors (at most
/// `max_vectors`) and the live lanes of its last vector.
#[inline(always)]
fn piece_shape<S: Simd>(left: usize) -> (usize, usize, usize) {
    let n = left.min(max_vectors::<S>() * S::LANES);
    let nv = n.div_ceil(S::LANES);
    (n, nv, n - (nv - 1) * S::LANES)
}

/// # Safety
///
/// The CPU supports `S`; the lengths checked by [`gather_part`] hold. Every pointer formed
/// here stays in bounds: a span's output offset plus its length lies within a written plane
/// (`ConvGather::spans`: a multi-position span is a run of positions of one row at
/// `ld = batch`), each tap's input offset plus the span's length lies within a read plane
/// (the tap positions are checked inside the plane, and a multi-position span's taps stay
/// inside for every position of the run), and every entry's plane is below
/// `table.planes`, whose planes `input` holds.
#[inline(always)]
unsafe fn gather_body<S: Simd>(job: &GatherJob<'_>, rows: Range<usize>, out: &mut [f32]) {
    let g = job.gather;
    let (plane_out, plane_in) = (g.out_plane_len(job.ld), g.in_plane_len(job.ld));
    let out_base = out.as_mut_ptr();
    let input = job.input.as_ptr();
    let lanes = if padded_rows(job.batch, job.ld) {
        job.ld
    } else {
        job.batch
    };
    let list = g.spans_at(job.batch, job.ld, lanes);
    let blocks = if use_blocks(&g.table, g.sides.g.kernel, plane_in, lanes) {
        g.table.blocks()
    } else {
        1
    };
    // Plain loops, no closures: a closure would not inherit the caller's target features,
    // and the intrinsics would turn into calls.
    // Pieces outside rows: a piece's input (every channel's rows under its taps) stays in
    // L2 while every output channel runs over it.
    for span in &list.spans {
        let offsets = &list.offsets[span.offsets.clone()];
        let mut at = 0;
        while at < span.len {
            let (n, nv, tail) = piece_shape::<S>(span.len - at);
            for b in 0..blocks {
                for r in rows.clone() {
                    let init = job.bias.map_or(0.0, |b| b[r]);
                    let row_out = (r - rows.start) * plane_out + span.out_off + at;
                    let piece = Piece {
                        input: input.wrapping_add(at),
                        plane_stride: plane_in,
                        table: &g.table,
                        values: job.values.as_ptr(),
                        groups: g.table.block_groups_of(b, blocks, r),
                        offsets,
                        tail,
                        first: b == 0,
                        last: b + 1 == blocks,
                    };
                    // SAFETY: see the function's contract: `nv` vectors (the last `tail`
                    // lanes) from `row_out` lie in row `r`'s written plane within `out`.
                    unsafe {
                        let y = out_base.add(row_out);
                        dispatch_piece!(
                            gather_piece,
                            S,
                            nv,
                            tail < S::LANES,
                            (&piece, y, init, job.relu)
                        )
                    }
                }
            }
            at += n;
        }
    }
}

/// One piece of a span: where its input starts (plane 0, position 0, shifted by the piece's
/// offset within the span), the table row and taps to walk, and the live lanes of its last
/// vector.
struct Piece<'a> {
    input: *const f32,
    plane_stride: usize,
    table: &'a TapTable,
    values: *const f32,
    /// The `(tap, first entry, end)` groups to walk: a row's, or its part in one plane block.
    groups: &'a [(u32, u32, u32)],
    /// Per tap, where the piece's input starts within a read plane ([`OUTSIDE`] if nowhere).
    offsets: &'a [usize],
    tail: usize,
    /// The first plane block: the sums start from the bias, else from what the previous
    /// block stored.
    first: bool,
    /// The last plane block: the epilogue (ReLU) applies.
    last: bool,
}

/// `y[0..NV vectors] = relu?(init + Σ_taps Σ_entries w · input[plane][tap offset ..])`.
///
/// # Safety
///
/// The CPU supports `S`; `y` has `NV` vectors (the last `tail` lanes when `MASKED`) to
/// write; for every tap and entry, `input + plane·plane_stride + offset` has as many to read;
/// every entry's value index is inside `values`.
#[inline(always)]
unsafe fn gather_piece<S: Simd, const NV: usize, const MASKED: bool>(
    piece: &Piece<'_>,
    y: *mut f32,
    init: f32,
    relu: bool,
) {
    let t = piece.table;
    // SAFETY: the caller's contract covers every load and store below.
    unsafe {
        let mask = S::mask(0, piece.tail);
        let mut acc = [S::splat(init); NV];
        if !piece.first {
            for (i, a) in acc.iter_mut().enumerate() {
                *a = if MASKED && i == NV - 1 {
                    S::load_masked(y.add(i * S::LANES), mask)
                } else {
                    S::load(y.add(i * S::LANES))
                };
            }
        }
        for &(tap, first, end) in piece.groups {
            let offset = *piece.offsets.get_unchecked(tap as usize);
            if offset == OUTSIDE {
                continue;
            }
            for e in first as usize..end as usize {
                let w = S::splat(*piece.values.add(*t.value.get_unchecked(e) as usize));
                let plane = *t.plane.get_unchecked(e) as usize;
                let xp = piece.input.add(plane * piece.plane_stride + offset);
                for (i, a) in acc.iter_mut().enumerate() {
                    let v = if MASKED && i == NV - 1 {
                        S::load_masked(xp.add(i * S::LANES), mask)
                    } else {
                        S::load(xp.add(i * S::LANES))
                    };
                    *a = S::fma(w, v, *a);
                }
            }
        }
        if relu && piece.last {
            let zero = S::zero();
            for a in acc.iter_mut() {
                *a = S::max(*a, zero);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            if MASKED && i == NV - 1 {
                S::store_masked(y.add(i * S::LANES), *a, mask);
            } else {
                S::store(y.add(i * S::LANES), *a);
            }
        }
    }
}

/// One `conv_grad` launch over rows (output channels) `rows`.
pub(crate) struct GradJob<'a> {
    /// The compiled forward gather.
    pub gather: &'a ConvGather,
    /// Upstream gradient `dY`.
    pub dy: &'a [f32],
    /// Layer input `X`.
    pub x: &'a [f32],
    /// Columns per row.
    pub batch: usize,
    /// Row stride.
    pub ld: usize,
}

/// Lanes of the partial sums kept per nonzero by [`grad_part`] at `level`.
pub(crate) fn grad_lanes(level: IsaLevel) -> usize {
    match usable(level) {
        #[cfg(target_arch = "x86_64")]
        IsaLevel::Avx512 => Avx512::LANES,
        #[cfg(target_arch = "x86_64")]
        IsaLevel::Avx2Fma => Avx2::LANES,
        _ => Portable::LANES,
    }
}

/// Sums `dY[row tile] · X[plane tile shifted by the tap]` for the entries of rows `rows`
/// into `partial` (`grad_lanes(level)` floats per entry, in table order, starting at the
/// rows' first entry), then writes each entry's total into `dw` at its value index.
///
/// # Panics
///
/// If a length is inconsistent (a bug of the caller).
pub(crate) fn grad_part(
    level: IsaLevel,
    job: &GradJob<'_>,
    rows: Range<usize>,
    partial: &mut [f32],
    totals: &mut [(u32, f32)],
) {
    let g = job.gather;
    let lanes = grad_lanes(level);
    let entries = g.table.rows_range(rows.clone());
    assert!(rows.end <= g.rows(), "row range");
    assert!(job.batch >= 1 && job.batch <= job.ld, "batch/ld");
    assert!(partial.len() >= entries.len() * lanes, "partial sums");
    assert!(totals.len() >= entries.len(), "totals");
    assert!(
        job.dy.len() >= g.rows() * g.out_plane_len(job.ld),
        "dy length"
    );
    assert!(
        job.x.len() >= g.table.planes * g.in_plane_len(job.ld),
        "x length"
    );
    partial[..entries.len() * lanes].fill(0.0);
    match usable(level) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned AVX-512, so the CPU has `avx512f`; the lengths hold
        // (checked above).
        IsaLevel::Avx512 => unsafe { grad_avx512(job, rows.clone(), partial) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned AVX2+FMA; the lengths hold (above).
        IsaLevel::Avx2Fma => unsafe { grad_avx2(job, rows.clone(), partial) },
        // SAFETY: the portable level needs no target feature; the lengths hold (above).
        _ => unsafe { grad_body::<Portable>(job, rows.clone(), partial) },
    }
    for (i, e) in entries.enumerate() {
        let sum: f32 = partial[i * lanes..(i + 1) * lanes].iter().sum();
        totals[i] = (g.table.value[e], sum);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn grad_avx512(job: &GradJob<'_>, rows: Range<usize>, partial: &mut [f32]) {
    // SAFETY: forwarded contract of `grad_body`; AVX-512F is enabled here.
    unsafe { grad_body::<Avx512>(job, rows, partial) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_avx2(job: &GradJob<'_>, rows: Range<usize>, partial: &mut [f32]) {
    // SAFETY: forwarded contract of `grad_body`; AVX2 and FMA are enabled here.
    unsafe { grad_body::<Avx2>(job, rows, partial) }
}

/// # Safety
///
/// As [`gather_body`], with `dy` the written side (read here) and `partial` holding
/// `S::LANES` floats per entry of `rows`.
#[inline(always)]
unsafe fn grad_body<S: Simd>(job: &GradJob<'_>, rows: Range<usize>, partial: &mut [f32]) {
    let g = job.gather;
    let (plane_out, plane_in) = (g.out_plane_len(job.ld), g.in_plane_len(job.ld));
    let first = g.table.rows_range(rows.clone()).start;
    let partial = partial.as_mut_ptr().wrapping_sub(first * S::LANES);
    // The sums must not see the padding columns: spans of `batch` lanes.
    let list = g.spans_at(job.batch, job.ld, job.batch);
    // The plane blocks of `gather_body`: each row's `dY` tile is loaded once per block.
    let blocks = if use_blocks(&g.table, g.sides.g.kernel, plane_in, job.batch) {
        g.table.blocks()
    } else {
        1
    };
    // Plain loops, as in `gather_body`.
    for span in &list.spans {
        let offsets = &list.offsets[span.offsets.clone()];
        let mut at = 0;
        while at < span.len {
            let (n, nv, tail) = piece_shape::<S>(span.len - at);
            for b in 0..blocks {
                for r in rows.clone() {
                    let piece = Piece {
                        input: job.x.as_ptr().wrapping_add(at),
                        plane_stride: plane_in,
                        table: &g.table,
                        values: std::ptr::null(),
                        groups: g.table.block_groups_of(b, blocks, r),
                        offsets,
                        tail,
                        first: true,
                        last: true,
                    };
                    // SAFETY: as in `gather_body`: the span lies in row `r`'s plane of `dy`,
                    // each tap's input span in its plane of `x`, and every entry `e` of
                    // `rows` has `S::LANES` partial sums at `partial + e·S::LANES`.
                    unsafe {
                        let dy = job.dy.as_ptr().add(r * plane_out + span.out_off + at);
                        dispatch_piece!(grad_piece, S, nv, tail < S::LANES, (&piece, dy, partial))
                    }
                }
            }
            at += n;
        }
    }
}

/// `partial[e] += Σ_vectors dY[..] · input[plane][tap offset ..]` (lane-wise) for every entry
/// of the piece's row and taps.
///
/// # Safety
///
/// As [`gather_piece`], with `dy` read instead of `y` written, and `partial + e·S::LANES`
/// valid for every entry `e` of the row.
#[inline(always)]
unsafe fn grad_piece<S: Simd, const NV: usize, const MASKED: bool>(
    piece: &Piece<'_>,
    dy: *const f32,
    partial: *mut f32,
) {
    let t = piece.table;
    // SAFETY: the caller's contract covers every load and store below.
    unsafe {
        let mask = S::mask(0, piece.tail);
        let mut d = [S::zero(); NV];
        for (i, v) in d.iter_mut().enumerate() {
            *v = if MASKED && i == NV - 1 {
                S::load_masked(dy.add(i * S::LANES), mask)
            } else {
                S::load(dy.add(i * S::LANES))
            };
        }
        for &(tap, first, end) in piece.groups {
            let offset = *piece.offsets.get_unchecked(tap as usize);
            if offset == OUTSIDE {
                continue;
            }
            for e in first as usize..end as usize {
                let plane = *t.plane.get_unchecked(e) as usize;
                let xp = piece.input.add(plane * piece.plane_stride + offset);
                let (mut a0, mut a1) = (S::zero(), S::zero());
                for (i, dv) in d.iter().enumerate() {
                    let v = if MASKED && i == NV - 1 {
                        S::load_masked(xp.add(i * S::LANES), mask)
                    } else {
                        S::load(xp.add(i * S::LANES))
                    };
                    if i % 2 == 0 {
                        a0 = S::fma(*dv, v, a0);
                    } else {
                        a1 = S::fma(*dv, v, a1);
                    }
                }
                let pp = partial.wrapping_add(e * S::LANES);
                S::store(pp, S::add(S::load(pp), S::add(a0, a1)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward table of a random 3×3 `planes → planes` layer at 5 %, with its blocks.
    fn table(planes: usize) -> TapTable {
        let g = ConvGeometry {
            in_channels: planes,
            height: 8,
            width: 8,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let p = Pattern::random(planes, planes * 9, 0.05, 3).unwrap();
        TapTable::forward(&p, &g).with_blocks(plane_block(planes))
    }

    #[test]
    fn blocks_follow_the_l2_size() {
        const MIB: usize = 1 << 20;
        let (t128, t256, t512) = (table(128), table(256), table(512));
        // 128 planes of 32×32 at batch 128: 768 KiB under a tile's taps, blocks only with a
        // 1 MiB L2.
        assert!(blocks_pay(&t128, 3, 1024 * 128, 128, MIB));
        assert!(!blocks_pay(&t128, 3, 1024 * 128, 128, 2 * MIB));
        // 256 planes of 16×16 (1.5 MiB) and 512 of 8×8 (3 MiB): blocks with either.
        for l2 in [MIB, 2 * MIB] {
            assert!(blocks_pay(&t256, 3, 256 * 128, 128, l2));
            assert!(blocks_pay(&t512, 3, 64 * 128, 128, l2));
        }
        // 512 planes of 2×2: the whole input (2 MiB) in about one tile, no blocks.
        assert!(!blocks_pay(&t512, 3, 4 * 128, 128, 4 * MIB));
        // Without blocks in the table (fewer than 96 planes), never.
        assert!(!blocks_pay(&table(64), 3, 1024 * 128, 128, 256 << 10));
    }
}
