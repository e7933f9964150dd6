//! [`Pattern`]: the CSR structure of a layer's weight mask.
//!
//! A pattern holds only structure (`row_ptr`, `col_idx`); the weight values live in a separate
//! `f32` array in the same CSR order, because values change every training step and patterns
//! only when the mask is updated. A pattern is immutable and can only be built through the
//! validated constructors, so every `Pattern` satisfies the invariants of [`crate::verify`].
//!
//! ## The content hash
//!
//! [`Pattern::hash`] is XXH3-64 (seed 0, as specified by the xxHash project and implemented by
//! the `xxhash-rust` crate) of this byte string, all integers little-endian:
//!
//! ```text
//! b"sparsejit-pattern-v1"  rows:u64  cols:u64  nnz:u64  row_ptr[0..=rows]:u32…  col_idx[0..nnz]:u32…
//! ```
//!
//! It depends on nothing but the structure, so it is identical on every platform and in every
//! process; tests pin it to fixed values. A [`RowChunk`]'s hash is the same function applied to
//! the chunk's rows as a pattern of their own (`row_ptr` rebased to 0), so it depends on the
//! chunk's content and not on where the chunk sits in the layer.

use std::ops::Range;

use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

use crate::verify::{verify_csr, VerifyError};

/// Why a pattern could not be built.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PatternError {
    /// The CSR arrays break an invariant of [`crate::verify`].
    #[error(transparent)]
    Invalid(#[from] VerifyError),
    /// A dense mask has the wrong number of elements for its shape.
    #[error("mask of shape {rows}x{cols} needs {expected} values, got {got}")]
    MaskLength {
        /// Rows of the declared shape.
        rows: usize,
        /// Columns of the declared shape.
        cols: usize,
        /// `rows · cols`.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A dense mask holds a value other than 0 or 1.
    #[error("mask value at row {row}, column {col} is {value}, expected 0 or 1")]
    MaskValue {
        /// Row of the bad value.
        row: usize,
        /// Column of the bad value.
        col: usize,
        /// The value, printed.
        value: String,
    },
    /// A COO coordinate lies outside the shape.
    #[error("COO entry {index}: ({row}, {col}) is outside the {rows}x{cols} shape")]
    CooOutOfRange {
        /// Position in the input list.
        index: usize,
        /// Its row.
        row: usize,
        /// Its column.
        col: usize,
        /// Rows of the shape.
        rows: usize,
        /// Columns of the shape.
        cols: usize,
    },
    /// The same COO coordinate appears twice.
    #[error("COO entry ({row}, {col}) appears more than once")]
    CooDuplicate {
        /// Its row.
        row: usize,
        /// Its column.
        col: usize,
    },
}

/// A value that a dense 0/1 mask can hold: `bool`, `u8` or `f32`.
pub trait MaskValue: Copy {
    /// `Some(true)` for 1, `Some(false)` for 0, `None` for anything else.
    fn as_bit(self) -> Option<bool>;
    /// The value as text, for error messages.
    fn describe(self) -> String;
}

impl MaskValue for bool {
    fn as_bit(self) -> Option<bool> {
        Some(self)
    }
    fn describe(self) -> String {
        self.to_string()
    }
}

impl MaskValue for u8 {
    fn as_bit(self) -> Option<bool> {
        match self {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
    fn describe(self) -> String {
        self.to_string()
    }
}

impl MaskValue for f32 {
    fn as_bit(self) -> Option<bool> {
        if self == 0.0 {
            Some(false) // -0.0 too
        } else if self == 1.0 {
            Some(true)
        } else {
            None
        }
    }
    fn describe(self) -> String {
        format!("{self:?}")
    }
}

/// The immutable CSR structure of a `rows × cols` mask.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    rows: usize,
    cols: usize,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    hash: u64,
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pattern")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("nnz", &self.nnz())
            .field("hash", &format_args!("{:016x}", self.hash))
            .finish()
    }
}

impl Pattern {
    /// Builds a pattern from CSR arrays, checking every invariant of [`crate::verify`].
    pub fn from_csr(
        rows: usize,
        cols: usize,
        row_ptr: Vec<u32>,
        col_idx: Vec<u32>,
    ) -> Result<Self, PatternError> {
        verify_csr(rows, cols, &row_ptr, &col_idx)?;
        let hash = content_hash(rows, cols, &row_ptr, &col_idx);
        Ok(Pattern {
            rows,
            cols,
            row_ptr,
            col_idx,
            hash,
        })
    }

    /// Builds a pattern from a dense row-major `rows × cols` mask of 0/1 values
    /// (`bool`, `u8` or `f32`); any other value is an error naming its position.
    pub fn from_dense_mask<T: MaskValue>(
        rows: usize,
        cols: usize,
        mask: &[T],
    ) -> Result<Self, PatternError> {
        let expected = rows.checked_mul(cols).ok_or(VerifyError::Size {
            what: "rows·cols",
            value: usize::MAX,
        })?;
        if mask.len() != expected {
            return Err(PatternError::MaskLength {
                rows,
                cols,
                expected,
                got: mask.len(),
            });
        }
        let mut row_ptr = Vec::with_capacity(rows + 1);
        let mut col_idx = Vec::new();
        row_ptr.push(0u32);
        for row in 0..rows {
            for col in 0..cols {
                let value = mask[row * cols + col];
                match value.as_bit() {
                    Some(true) => col_idx.push(col as u32),
                    Some(false) => {}
                    None => {
                        return Err(PatternError::MaskValue {
                            row,
                            col,
                            value: value.describe(),
                        })
                    }
                }
            }
            let nnz = u32::try_from(col_idx.len()).map_err(|_| VerifyError::Size {
                what: "nnz",
                value: col_idx.len(),
            })?;
            row_ptr.push(nnz);
        }
        Self::from_csr(rows, cols, row_ptr, col_idx)
    }

    /// Builds a pattern from `(row, col)` coordinates in any order; duplicates and
    /// out-of-range coordinates are errors.
    pub fn from_coo(
        rows: usize,
        cols: usize,
        entries: &[(usize, usize)],
    ) -> Result<Self, PatternError> {
        for (index, &(row, col)) in entries.iter().enumerate() {
            if row >= rows || col >= cols {
                return Err(PatternError::CooOutOfRange {
                    index,
                    row,
                    col,
                    rows,
                    cols,
                });
            }
        }
        let mut sorted = entries.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(PatternError::CooDuplicate {
                row: w[0].0,
                col: w[0].1,
            });
        }
        let mut row_ptr = vec![0u32; rows + 1];
        for &(row, _) in &sorted {
            row_ptr[row + 1] += 1;
        }
        for row in 0..rows {
            row_ptr[row + 1] += row_ptr[row];
        }
        let col_idx = sorted.iter().map(|&(_, col)| col as u32).collect();
        Self::from_csr(rows, cols, row_ptr, col_idx)
    }

    /// The all-zero pattern of a shape.
    pub fn empty(rows: usize, cols: usize) -> Result<Self, PatternError> {
        Self::from_csr(rows, cols, vec![0; rows + 1], Vec::new())
    }

    /// The fully dense pattern of a shape.
    pub fn dense(rows: usize, cols: usize) -> Result<Self, PatternError> {
        let row_ptr = (0..=rows).map(|r| (r * cols) as u32).collect();
        let col_idx = (0..rows).flat_map(|_| 0..cols as u32).collect();
        Self::from_csr(rows, cols, row_ptr, col_idx)
    }

    /// A random pattern: each entry present independently with probability `density`, drawn
    /// from ChaCha8 seeded with `seed`, so the same arguments give the same pattern
    /// everywhere. `density` is clamped to `[0, 1]`.
    ///
    /// Up to [`RANDOM_DENSE_DRAW_MAX`] entries (`rows·cols`, 2²⁶) one number is drawn per entry,
    /// row by row, column by column: the patterns every test, benchmark and published figure
    /// of the project were made with. Above, the gaps between consecutive nonzeros (in
    /// row-major order) are drawn instead, from the geometric distribution of the same
    /// process, so the time is proportional to the nonzeros (and the rows), not to
    /// `rows·cols`: a `10⁶ × 10⁶` pattern at density `10⁻⁹` draws about a thousand numbers.
    ///
    /// The caller bounds the memory: the pattern holds about `density·rows·cols` nonzeros of
    /// 4 bytes each (see [`crate::limits`]). More than `u32::MAX` expected nonzeros is an
    /// error before anything is drawn.
    pub fn random(rows: usize, cols: usize, density: f64, seed: u64) -> Result<Self, PatternError> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let density = if density.is_nan() {
            0.0
        } else {
            density.clamp(0.0, 1.0)
        };
        let entries = rows.checked_mul(cols).ok_or(VerifyError::Size {
            what: "rows·cols",
            value: usize::MAX,
        })?;
        let expected = density * entries as f64;
        if expected > u32::MAX as f64 {
            return Err(VerifyError::Size {
                what: "nnz",
                value: expected as usize,
            }
            .into());
        }
        let (row_ptr, col_idx) = if entries <= RANDOM_DENSE_DRAW_MAX {
            random_per_entry(rows, cols, density, &mut rng)?
        } else {
            random_by_gaps(rows, cols, density, &mut rng)?
        };
        Self::from_csr(rows, cols, row_ptr, col_idx)
    }

    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// CSR row pointers, `rows + 1` entries starting at 0.
    pub fn row_ptr(&self) -> &[u32] {
        &self.row_ptr
    }

    /// CSR column indices, sorted and unique within each row.
    pub fn col_idx(&self) -> &[u32] {
        &self.col_idx
    }

    /// Number of nonzeros.
    pub fn nnz(&self) -> usize {
        self.col_idx.len()
    }

    /// `nnz / (rows · cols)`; 0 for an empty shape.
    pub fn density(&self) -> f64 {
        let size = self.rows * self.cols;
        if size == 0 {
            0.0
        } else {
            self.nnz() as f64 / size as f64
        }
    }

    /// The positions in the value array of row `row`'s nonzeros.
    pub fn row_range(&self, row: usize) -> Range<usize> {
        self.row_ptr[row] as usize..self.row_ptr[row + 1] as usize
    }

    /// The column indices of row `row`.
    pub fn row(&self, row: usize) -> &[u32] {
        &self.col_idx[self.row_range(row)]
    }

    /// The number of nonzeros of each row.
    pub fn row_counts(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.row_ptr.windows(2).map(|w| (w[1] - w[0]) as usize)
    }

    /// The number of nonzeros of each column.
    pub fn col_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.cols];
        for &c in &self.col_idx {
            counts[c as usize] += 1;
        }
        counts
    }

    /// The stable 64-bit content hash (see the module doc for the exact definition).
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// The mask as a dense row-major `rows × cols` array of 0/1 bytes.
    pub fn to_dense_mask(&self) -> Vec<u8> {
        let mut mask = vec![0u8; self.rows * self.cols];
        for row in 0..self.rows {
            for &col in self.row(row) {
                mask[row * self.cols + col as usize] = 1;
            }
        }
        mask
    }

    /// The transposed pattern (the CSC view of this one), for the backward-data kernel.
    pub fn transpose(&self) -> Transposed {
        let mut col_ptr = vec![0u32; self.cols + 1];
        for &c in &self.col_idx {
            col_ptr[c as usize + 1] += 1;
        }
        for c in 0..self.cols {
            col_ptr[c + 1] += col_ptr[c];
        }
        let mut next = col_ptr.clone();
        let mut row_idx = vec![0u32; self.nnz()];
        let mut value_index = vec![0u32; self.nnz()];
        for row in 0..self.rows {
            for k in self.row_range(row) {
                let c = self.col_idx[k] as usize;
                let slot = next[c] as usize;
                row_idx[slot] = row as u32;
                value_index[slot] = k as u32;
                next[c] += 1;
            }
        }
        let hash = content_hash(self.cols, self.rows, &col_ptr, &row_idx);
        Transposed {
            pattern: Pattern {
                rows: self.cols,
                cols: self.rows,
                row_ptr: col_ptr,
                col_idx: row_idx,
                hash,
            },
            value_index,
        }
    }

    /// Splits the rows into consecutive chunks of about `target_nnz` nonzeros each.
    ///
    /// Rows are taken greedily until a chunk holds at least `target_nnz` nonzeros; a row is
    /// never split, so a row longer than the target is a chunk of its own. Every row belongs
    /// to exactly one chunk (empty rows included); a pattern with no rows has no chunks.
    pub fn chunks(&self, target_nnz: usize) -> Vec<RowChunk> {
        let target = target_nnz.max(1);
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < self.rows {
            let base = self.row_ptr[start] as usize;
            let mut end = start;
            while end < self.rows && (self.row_ptr[end] as usize - base) < target {
                end += 1;
            }
            if end == start {
                end += 1; // a single row that reaches the target alone
            }
            chunks.push(self.chunk(start..end));
            start = end;
        }
        chunks
    }

    fn chunk(&self, rows: Range<usize>) -> RowChunk {
        let base = self.row_ptr[rows.start];
        let local_ptr: Vec<u32> = self.row_ptr[rows.start..=rows.end]
            .iter()
            .map(|&p| p - base)
            .collect();
        let nnz = self.row_ptr[rows.start] as usize..self.row_ptr[rows.end] as usize;
        let hash = content_hash(
            rows.len(),
            self.cols,
            &local_ptr,
            &self.col_idx[nnz.clone()],
        );
        RowChunk { rows, nnz, hash }
    }
}

/// The most entries (`rows·cols`) for which [`Pattern::random`] draws one number per entry;
/// larger shapes draw the gaps between nonzeros. It is the cap `kernel-dump --random` had
/// before it drew by gaps, so every pattern that could be drawn then is drawn the same now.
pub const RANDOM_DENSE_DRAW_MAX: usize = 1 << 26;

type Csr = (Vec<u32>, Vec<u32>);

fn nnz_u32(n: usize) -> Result<u32, PatternError> {
    u32::try_from(n).map_err(|_| {
        VerifyError::Size {
            what: "nnz",
            value: n,
        }
        .into()
    })
}

/// One draw per entry, row by row, column by column.
fn random_per_entry(
    rows: usize,
    cols: usize,
    density: f64,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<Csr, PatternError> {
    use rand::Rng;
    let mut row_ptr = Vec::with_capacity(rows + 1);
    let mut col_idx = Vec::new();
    row_ptr.push(0u32);
    for _ in 0..rows {
        for c in 0..cols {
            if rng.random::<f64>() < density {
                col_idx.push(c as u32);
            }
        }
        row_ptr.push(nnz_u32(col_idx.len())?);
    }
    Ok((row_ptr, col_idx))
}

/// The same Bernoulli process as [`random_per_entry`], drawn by its gaps: the number of
/// absent entries before the next present one is geometric,
/// `⌊ln(1 − u) / ln(1 − density)⌋` for a uniform `u ∈ [0, 1)`.
fn random_by_gaps(
    rows: usize,
    cols: usize,
    density: f64,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<Csr, PatternError> {
    use rand::Rng;
    let total = (rows as u64) * (cols as u64); // rows·cols fits usize, checked by the caller
    let mut row_ptr = Vec::with_capacity(rows + 1);
    let mut col_idx =
        Vec::with_capacity(((density * total as f64 * 1.01) as usize + 16).min(1 << 24));
    row_ptr.push(0u32);
    let ln_absent = (-density).ln_1p(); // ln(1 − density): −∞ at 1, 0 at 0
    let mut pos = 0u64;
    while pos < total && density > 0.0 {
        let gap = if density >= 1.0 {
            0.0
        } else {
            (-rng.random::<f64>()).ln_1p() / ln_absent
        };
        // NaN or beyond the end: no more nonzeros.
        if gap.is_nan() || gap >= (total - pos) as f64 {
            break;
        }
        pos += gap as u64;
        let (row, col) = ((pos / cols as u64) as usize, (pos % cols as u64) as u32);
        while row_ptr.len() <= row {
            row_ptr.push(nnz_u32(col_idx.len())?);
        }
        col_idx.push(col);
        pos += 1;
    }
    let nnz = nnz_u32(col_idx.len())?;
    row_ptr.resize(rows + 1, nnz);
    Ok((row_ptr, col_idx))
}

/// A run of consecutive rows of a pattern, the unit that generated code is owned by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowChunk {
    /// The rows it covers.
    pub rows: Range<usize>,
    /// The positions of its nonzeros in the layer's value array.
    pub nnz: Range<usize>,
    /// The content hash of these rows as a pattern of their own.
    pub hash: u64,
}

/// The transpose of a pattern: the CSR structure of `Wᵀ` (a `cols × rows` pattern) and, for
/// each of its nonzeros, the position of the same weight in the original CSR value array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transposed {
    /// The `cols × rows` pattern of `Wᵀ`.
    pub pattern: Pattern,
    /// `value_index[k]` is where the `k`-th nonzero of `Wᵀ` sits in `W`'s value array.
    pub value_index: Vec<u32>,
}

fn content_hash(rows: usize, cols: usize, row_ptr: &[u32], col_idx: &[u32]) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(b"sparsejit-pattern-v1");
    hasher.update(&(rows as u64).to_le_bytes());
    hasher.update(&(cols as u64).to_le_bytes());
    hasher.update(&(col_idx.len() as u64).to_le_bytes());
    let mut buf = Vec::with_capacity(4096);
    for part in [row_ptr, col_idx] {
        for block in part.chunks(1024) {
            buf.clear();
            buf.extend(block.iter().flat_map(|v| v.to_le_bytes()));
            hasher.update(&buf);
        }
    }
    hasher.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Pattern {
        // 3 x 4:  row 0: cols 1, 3; row 1: empty; row 2: cols 0, 1, 2
        Pattern::from_csr(3, 4, vec![0, 2, 2, 5], vec![1, 3, 0, 1, 2]).unwrap()
    }

    #[test]
    fn constructors_agree() {
        let p = example();
        let mask: Vec<u8> = vec![0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0];
        assert_eq!(Pattern::from_dense_mask(3, 4, &mask).unwrap(), p);
        let bools: Vec<bool> = mask.iter().map(|&m| m == 1).collect();
        assert_eq!(Pattern::from_dense_mask(3, 4, &bools).unwrap(), p);
        let floats: Vec<f32> = mask.iter().map(|&m| m as f32).collect();
        assert_eq!(Pattern::from_dense_mask(3, 4, &floats).unwrap(), p);
        let coo = [(2, 2), (0, 3), (2, 0), (0, 1), (2, 1)];
        assert_eq!(Pattern::from_coo(3, 4, &coo).unwrap(), p);
        assert_eq!(p.to_dense_mask(), mask);
    }

    #[test]
    fn derived_quantities() {
        let p = example();
        assert_eq!(p.nnz(), 5);
        assert!((p.density() - 5.0 / 12.0).abs() < 1e-15);
        assert_eq!(p.row_counts().collect::<Vec<_>>(), vec![2, 0, 3]);
        assert_eq!(p.col_counts(), vec![1, 2, 1, 1]);
        assert_eq!(p.row(2), &[0, 1, 2]);
        assert_eq!(Pattern::empty(0, 5).unwrap().density(), 0.0);
        assert_eq!(Pattern::dense(2, 3).unwrap().nnz(), 6);
    }

    #[test]
    fn bad_masks_are_named() {
        let e = Pattern::from_dense_mask(2, 2, &[0u8, 1, 2, 0]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mask value at row 1, column 0 is 2, expected 0 or 1"
        );
        let e = Pattern::from_dense_mask(2, 2, &[0.0f32, 0.5, 1.0, 0.0]).unwrap_err();
        assert!(e.to_string().contains("row 0, column 1 is 0.5"), "{e}");
        let e = Pattern::from_dense_mask(2, 2, &[0u8, 1, 1]).unwrap_err();
        assert!(e.to_string().contains("needs 4 values, got 3"), "{e}");
        let e = Pattern::from_coo(2, 2, &[(0, 1), (0, 1)]).unwrap_err();
        assert_eq!(e, PatternError::CooDuplicate { row: 0, col: 1 });
        let e = Pattern::from_coo(2, 2, &[(0, 1), (2, 0)]).unwrap_err();
        assert!(e.to_string().contains("entry 1: (2, 0)"), "{e}");
        let e = Pattern::from_csr(1, 3, vec![0, 2], vec![2, 1]).unwrap_err();
        assert!(e.to_string().contains("col_sorted_unique"), "{e}");
    }

    #[test]
    fn transpose_maps_values() {
        let p = example();
        let t = p.transpose();
        assert_eq!(t.pattern.rows(), 4);
        assert_eq!(t.pattern.cols(), 3);
        assert_eq!(t.pattern.row_ptr(), &[0, 1, 3, 4, 5]);
        assert_eq!(t.pattern.col_idx(), &[2, 0, 2, 2, 0]);
        assert_eq!(t.value_index, vec![2, 0, 3, 4, 1]);
        assert_eq!(t.pattern.transpose().pattern, p);
    }

    #[test]
    fn chunks_cover_every_row_once() {
        let p = example();
        let chunks = p.chunks(2);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].rows, 0..1);
        assert_eq!(chunks[1].rows, 1..3);
        assert_eq!(chunks[1].nnz, 2..5);
        // content-only hash: the chunk {row 1: empty, row 2: 0 1 2} equals that pattern alone
        let alone = Pattern::from_csr(2, 4, vec![0, 0, 3], vec![0, 1, 2]).unwrap();
        assert_eq!(chunks[1].hash, alone.hash());
        assert_eq!(Pattern::empty(0, 3).unwrap().chunks(10), vec![]);
        assert_eq!(Pattern::empty(5, 3).unwrap().chunks(10).len(), 1);
    }

    #[test]
    fn random_is_seeded_and_near_its_density() {
        let a = Pattern::random(300, 784, 0.05, 7).unwrap();
        assert_eq!(a, Pattern::random(300, 784, 0.05, 7).unwrap());
        assert_ne!(a, Pattern::random(300, 784, 0.05, 8).unwrap());
        assert!((a.density() - 0.05).abs() < 0.005, "{}", a.density());
        assert_eq!(
            Pattern::random(3, 4, 1.0, 1).unwrap(),
            Pattern::dense(3, 4).unwrap()
        );
        assert_eq!(Pattern::random(3, 4, 0.0, 1).unwrap().nnz(), 0);
    }

    #[test]
    fn random_pins_the_per_entry_draw() {
        // Shapes up to RANDOM_DENSE_DRAW_MAX entries keep the per-entry draw every test and
        // published figure was made with: pinned by hash.
        let p = Pattern::random(300, 784, 0.05, 42).unwrap();
        assert_eq!((p.nnz(), p.hash()), (11_594, 0x7091_6a50_c7b1_21b2));
    }

    #[test]
    fn large_random_patterns_draw_in_time_of_their_nonzeros() {
        // 10^12 entries: one draw per entry would never end; by gaps it is ~1000 draws.
        let t = std::time::Instant::now();
        let p = Pattern::random(1_000_000, 1_000_000, 1e-9, 17).unwrap();
        assert!(t.elapsed().as_secs_f64() < 5.0, "{:?}", t.elapsed());
        assert_eq!(p.rows(), 1_000_000);
        assert!((800..1200).contains(&p.nnz()), "{}", p.nnz());
        assert_eq!(p, Pattern::random(1_000_000, 1_000_000, 1e-9, 17).unwrap());
        assert_ne!(p, Pattern::random(1_000_000, 1_000_000, 1e-9, 18).unwrap());
        // The same Bernoulli process: density and spread over rows and columns as expected.
        let (rows, cols) = (10_000, 10_000); // above RANDOM_DENSE_DRAW_MAX
        let q = Pattern::random(rows, cols, 0.01, 5).unwrap();
        assert!((q.density() - 0.01).abs() < 0.0005, "{}", q.density());
        let counts: Vec<usize> = q.row_counts().collect();
        let mean = counts.iter().sum::<usize>() as f64 / rows as f64;
        let var = counts
            .iter()
            .map(|&c| (c as f64 - mean).powi(2))
            .sum::<f64>()
            / rows as f64;
        // binomial(10000, 0.01): variance 99
        assert!((80.0..120.0).contains(&var), "{var}");
        let cc = q.col_counts(); // binomial(10000, 0.01) too: mean 100
        let (lo, hi) = (cc.iter().min().unwrap(), cc.iter().max().unwrap());
        assert!(*lo > 50 && *hi < 160, "{lo} {hi}");
        assert_eq!(Pattern::random(1 << 13, 1 << 14, 0.0, 1).unwrap().nnz(), 0);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
        let (row_ptr, col_idx) = random_by_gaps(3, 4, 1.0, &mut rng).unwrap();
        let dense = Pattern::dense(3, 4).unwrap();
        assert_eq!(
            (&row_ptr[..], &col_idx[..]),
            (dense.row_ptr(), dense.col_idx())
        );
        let (row_ptr, col_idx) = random_by_gaps(3, 4, 0.0, &mut rng).unwrap();
        assert_eq!((row_ptr, col_idx), (vec![0; 4], vec![]));
        // More nonzeros than a pattern holds: refused before drawing.
        let e = Pattern::random(100_000, 100_000, 0.9, 1).unwrap_err();
        assert!(e.to_string().contains("nnz"), "{e}");
    }

    #[test]
    fn hash_is_pinned() {
        // Fixed values: the hash must never change across platforms or versions. They were
        // computed independently by `scripts/pattern_hash.py` (Python's `xxhash` package).
        assert_eq!(example().hash(), 0x922b_d22f_dfa5_1d8c, "example");
        assert_eq!(
            Pattern::empty(0, 0).unwrap().hash(),
            0x75d8_fd1c_9b61_0372,
            "empty"
        );
    }
}
