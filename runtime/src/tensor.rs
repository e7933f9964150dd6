//! [`Matrix`]: a feature-major activation matrix, `[features × batch]`; [`Shape`]: the shape
//! of one sample.
//!
//! Element `(f, b)` sits at `f · ld + b`. The row stride `ld` is the batch rounded up to a
//! multiple of [`LD_ALIGN`] (16 floats, 64 bytes), and the first element is 64-byte aligned,
//! so every row starts on a cache line. Batch 1 is the exception: a plain vector (`ld = 1`). The padding columns `batch..ld` are kept at zero by
//! every layer of this crate that writes them (kernels may leave them unspecified).

use std::fmt;

use sparse_ir::AlignedVec;

/// Row strides are padded to a multiple of this many `f32` (64 bytes).
pub const LD_ALIGN: usize = 16;

/// The row stride the runtime uses for a batch: `batch` rounded up to [`LD_ALIGN`], except
/// that batch 1 is a plain vector (`ld = 1`): padding one column to 16 puts every feature on
/// a cache line of its own, and the batch-1 kernels ran slower that way
/// (`docs/MEASUREMENTS.md`).
pub fn padded_ld(batch: usize) -> usize {
    if batch <= 1 {
        1
    } else {
        batch.div_ceil(LD_ALIGN) * LD_ALIGN
    }
}

/// A feature-major `[rows × batch]` matrix of `f32` with row stride `ld`, 64-byte aligned.
#[derive(Clone)]
pub struct Matrix {
    rows: usize,
    batch: usize,
    ld: usize,
    buf: AlignedVec,
}

impl fmt::Debug for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Matrix")
            .field("rows", &self.rows)
            .field("batch", &self.batch)
            .field("ld", &self.ld)
            .finish()
    }
}

impl Matrix {
    /// A zero matrix of `rows × batch` with the padded row stride [`padded_ld`]`(batch)`.
    pub fn zeros(rows: usize, batch: usize) -> Self {
        Self::with_ld(rows, batch, padded_ld(batch))
    }

    /// A zero matrix with an explicit row stride; panics if `ld < batch`.
    pub fn with_ld(rows: usize, batch: usize, ld: usize) -> Self {
        assert!(ld >= batch, "ld {ld} < batch {batch}");
        Matrix {
            rows,
            batch,
            ld,
            buf: AlignedVec::zeros(rows * ld),
        }
    }

    /// Builds a matrix from sample-major data (`batch` samples of `rows` features each, one
    /// after the other), transposing it into the feature-major layout.
    pub fn from_samples(rows: usize, batch: usize, samples: &[f32]) -> Self {
        assert_eq!(samples.len(), rows * batch, "samples length");
        let mut m = Self::zeros(rows, batch);
        for b in 0..batch {
            for f in 0..rows {
                m.set(f, b, samples[b * rows + f]);
            }
        }
        m
    }

    /// The most rows [`set_rows`](Self::set_rows) accepts.
    pub fn row_capacity(&self) -> usize {
        self.buf.capacity().checked_div(self.ld).unwrap_or(0)
    }

    /// Reuses the buffer for `rows` feature rows (at most [`row_capacity`](Self::row_capacity);
    /// panics beyond it), without allocating: the elements keep whatever they held.
    pub fn set_rows(&mut self, rows: usize) {
        self.buf.set_len(rows * self.ld);
        self.rows = rows;
    }

    /// Number of feature rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of batch columns.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Row stride in elements.
    pub fn ld(&self) -> usize {
        self.ld
    }

    /// The whole buffer, `rows · ld` elements.
    pub fn as_slice(&self) -> &[f32] {
        &self.buf
    }

    /// The whole buffer, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf
    }

    /// Row `f` including its padding (`ld` elements).
    pub fn row(&self, f: usize) -> &[f32] {
        &self.as_slice()[f * self.ld..(f + 1) * self.ld]
    }

    /// Row `f` including its padding, mutable.
    pub fn row_mut(&mut self, f: usize) -> &mut [f32] {
        let ld = self.ld;
        &mut self.as_mut_slice()[f * ld..(f + 1) * ld]
    }

    /// Element `(f, b)`.
    pub fn get(&self, f: usize, b: usize) -> f32 {
        self.as_slice()[f * self.ld + b]
    }

    /// Sets element `(f, b)`.
    pub fn set(&mut self, f: usize, b: usize, value: f32) {
        let ld = self.ld;
        self.as_mut_slice()[f * ld + b] = value;
    }

    /// Sets every element, padding included, to zero.
    pub fn fill_zero(&mut self) {
        self.as_mut_slice().fill(0.0);
    }

    /// Sets columns `from..ld` of every row to zero.
    pub fn zero_columns_from(&mut self, from: usize) {
        let ld = self.ld;
        if from >= ld {
            return;
        }
        for row in self.as_mut_slice().chunks_exact_mut(ld) {
            row[from..].fill(0.0);
        }
    }

    /// Copies the matrix into sample-major order (`batch` samples of `rows` features).
    pub fn to_samples(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.batch];
        for f in 0..self.rows {
            for b in 0..self.batch {
                out[b * self.rows + f] = self.get(f, b);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_alignment() {
        assert_eq!(padded_ld(100), 112);
        assert_eq!(padded_ld(16), 16);
        assert_eq!(padded_ld(1), 1);
        assert_eq!(padded_ld(2), 16);
        for rows in [1, 3, 7] {
            let m = Matrix::zeros(rows, 100);
            assert_eq!(m.as_slice().as_ptr() as usize % 64, 0);
            assert_eq!(m.as_slice().len(), rows * 112);
            // A clone is a new allocation, aligned anew.
            assert_eq!(m.clone().as_slice().as_ptr() as usize % 64, 0);
        }
        let samples: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let m = Matrix::from_samples(3, 2, &samples);
        assert_eq!(m.get(2, 1), 5.0);
        assert_eq!(m.get(0, 1), 3.0);
        assert_eq!(m.to_samples(), samples);
    }
}

/// The shape of one sample: `channels × height × width` (a flat vector is `n × 1 × 1`).
/// In the feature-major layout, feature `(c, h, w)` is row `(c·height + h)·width + w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Channels (or features of a flat vector).
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
}

impl Shape {
    /// A flat vector of `n` features.
    pub fn flat(n: usize) -> Self {
        Shape {
            channels: n,
            height: 1,
            width: 1,
        }
    }

    /// An image of `channels × height × width`.
    pub fn image(channels: usize, height: usize, width: usize) -> Self {
        Shape {
            channels,
            height,
            width,
        }
    }

    /// Number of features per sample.
    pub fn features(&self) -> usize {
        self.channels * self.height * self.width
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.height == 1 && self.width == 1 {
            write!(f, "{}", self.channels)
        } else {
            write!(f, "{}x{}x{}", self.channels, self.height, self.width)
        }
    }
}
