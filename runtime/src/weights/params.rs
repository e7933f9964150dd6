//! [`WeightParams`]: the trainable parameters of one layer, the masked weight matrix (as its
//! pattern and the values of its active entries, plus dense views) and the bias.

use std::sync::Arc;

use sparse_ir::Pattern;

use crate::error::Result;

/// The parameters of one layer: the weights of active entries as one `f32` array in the CSR
/// order of `pattern` (what every kernel reads), the mask also kept dense, the row-major
/// index of every active entry, a dense copy of the weights (complete after
/// [`SparseWeights::sync_dense`](super::SparseWeights::sync_dense)) and the bias.
#[derive(Debug, Clone)]
pub(crate) struct WeightParams {
    /// Rows of the weight matrix (output features or channels).
    pub rows: usize,
    /// Columns of the weight matrix (`in` or `in·kh·kw`).
    pub cols: usize,
    /// The current pattern (the CSR structure of `mask`).
    pub pattern: Arc<Pattern>,
    /// The dense row-major 0/1 mask.
    pub mask: Vec<u8>,
    /// Weight values of the active entries, in CSR order.
    pub values: Vec<f32>,
    /// The row-major index of every active entry, in CSR order.
    pub dense_index: Vec<u32>,
    /// The weights, row-major, zero where masked; the active entries are stale between
    /// syncs.
    pub dense_weight: Vec<f32>,
    /// The bias, one per row.
    pub bias: Vec<f32>,
}

impl WeightParams {
    /// A fully dense, zero `rows × cols` matrix and a zero bias (the pattern is built by the
    /// first [`rebuild_pattern`](Self::rebuild_pattern)).
    pub(crate) fn zeros(rows: usize, cols: usize) -> Result<Self> {
        let size = rows * cols;
        Ok(WeightParams {
            rows,
            cols,
            pattern: Arc::new(Pattern::empty(rows, cols)?),
            mask: vec![1; size],
            values: Vec::new(),
            dense_index: Vec::new(),
            dense_weight: vec![0.0; size],
            bias: vec![0.0; rows],
        })
    }

    /// Active entries.
    pub(crate) fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Rebuilds the pattern, the index and the active values from the dense mask and
    /// weights, calling `active(i)` for every active entry in CSR order with its row-major
    /// index `i`; zeroes the dense weights at masked entries. Returns whether the pattern
    /// changed.
    pub(crate) fn rebuild_pattern(&mut self, mut active: impl FnMut(usize)) -> Result<bool> {
        let pattern = Pattern::from_dense_mask(self.rows, self.cols, &self.mask)?;
        let changed = pattern != *self.pattern;
        self.dense_index.clear();
        self.values.clear();
        for r in 0..self.rows {
            for &c in pattern.row(r) {
                let i = r * self.cols + c as usize;
                self.dense_index.push(i as u32);
                self.values.push(self.dense_weight[i]);
                active(i);
            }
        }
        for (i, w) in self.dense_weight.iter_mut().enumerate() {
            if self.mask[i] == 0 {
                *w = 0.0;
            }
        }
        self.pattern = Arc::new(pattern);
        Ok(changed)
    }
}
