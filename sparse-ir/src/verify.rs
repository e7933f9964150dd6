//! The verifier: the invariants every [`Pattern`](crate::Pattern) and
//! [`KernelSpec`](crate::KernelSpec) satisfy.
//!
//! Constructors run these checks, so a value of either type that exists has passed them; the
//! text parser and the mask readers report the same errors with the file and line added.
//!
//! ## Pattern invariants (CSR structure of a `rows × cols` mask)
//!
//! | name | invariant |
//! | --- | --- |
//! | `size` | `rows`, `cols` and `nnz` each fit in a `u32` |
//! | `row_ptr_len` | `row_ptr.len() == rows + 1` |
//! | `row_ptr_start` | `row_ptr[0] == 0` |
//! | `row_ptr_monotone` | `row_ptr[r] <= row_ptr[r + 1]` for every row `r` |
//! | `row_ptr_end` | `row_ptr[rows] == col_idx.len()` (= `nnz`) |
//! | `col_in_range` | every column index is `< cols` |
//! | `col_sorted_unique` | within a row, column indices strictly increase (sorted, no duplicates) |
//!
//! ## Kernel-spec invariants
//!
//! | name | invariant |
//! | --- | --- |
//! | `layer_name` | the layer name is non-empty, starts with a letter or `_`, and holds only ASCII letters, digits, `_`, `.` and `-` |
//! | `batch_positive` | a fixed batch is at least 1 |
//! | `ld_covers_batch` | a fixed `ld` is at least the fixed batch (and at least 1) |
//! | `conv_op_geometry` | a convolution op has a [`ConvGeometry`](crate::spec::ConvGeometry) and a matrix op has none |
//! | `conv_geometry` | the geometry passes [`ConvGeometry::check`](crate::spec::ConvGeometry::check) against the pattern: sizes in range, the window fits the padded input, `cols = C·k²`, feature counts fit in `u32` |
//!
//! Each [`VerifyError`] names the invariant that broke and where (row, index).

use thiserror::Error;

/// A broken invariant, with the place where it broke.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    /// `size`: a dimension or the nonzero count does not fit in `u32`.
    #[error("invariant `size`: {what} = {value} does not fit in u32")]
    Size {
        /// Which quantity (`rows`, `cols`, `nnz`).
        what: &'static str,
        /// Its value.
        value: usize,
    },
    /// `row_ptr_len`: `row_ptr` does not have `rows + 1` entries.
    #[error("invariant `row_ptr_len`: row_ptr has {got} entries, expected rows + 1 = {expected}")]
    RowPtrLen {
        /// `rows + 1`.
        expected: usize,
        /// The actual length.
        got: usize,
    },
    /// `row_ptr_start`: `row_ptr[0]` is not 0.
    #[error("invariant `row_ptr_start`: row_ptr[0] = {got}, expected 0")]
    RowPtrStart {
        /// The value found.
        got: u32,
    },
    /// `row_ptr_monotone`: a row has a negative length.
    #[error("invariant `row_ptr_monotone`: row {row}: row_ptr[{row}] = {start} > row_ptr[{}] = {end}", row + 1)]
    RowPtrMonotone {
        /// The row whose end precedes its start.
        row: usize,
        /// `row_ptr[row]`.
        start: u32,
        /// `row_ptr[row + 1]`.
        end: u32,
    },
    /// `row_ptr_end`: the last `row_ptr` entry is not the number of column indices.
    #[error("invariant `row_ptr_end`: row_ptr[rows] = {got}, but col_idx has {expected} entries")]
    RowPtrEnd {
        /// `col_idx.len()`.
        expected: usize,
        /// `row_ptr[rows]`.
        got: u32,
    },
    /// `col_in_range`: a column index is not below `cols`.
    #[error("invariant `col_in_range`: row {row}, index {index}: column {col} is out of range for {cols} columns")]
    ColOutOfRange {
        /// The row holding the bad index.
        row: usize,
        /// The position in `col_idx`.
        index: usize,
        /// The column found.
        col: u32,
        /// The number of columns.
        cols: usize,
    },
    /// `col_sorted_unique`: column indices within a row do not strictly increase.
    #[error("invariant `col_sorted_unique`: row {row}, index {index}: column {col} follows column {prev} ({})", if col == prev { "duplicate" } else { "unsorted" })]
    ColNotSortedUnique {
        /// The row.
        row: usize,
        /// The position in `col_idx` of the offending entry.
        index: usize,
        /// The previous column in the row.
        prev: u32,
        /// The offending column.
        col: u32,
    },
    /// `layer_name`: the layer name is not a valid name.
    #[error("invariant `layer_name`: {name:?} is not a valid layer name (letters, digits, `_`, `.`, `-`; not starting with a digit, `.` or `-`)")]
    LayerName {
        /// The rejected name.
        name: String,
    },
    /// `batch_positive`: a fixed batch of 0.
    #[error("invariant `batch_positive`: layer {layer}: batch must be at least 1")]
    BatchZero {
        /// The layer.
        layer: String,
    },
    /// `ld_covers_batch`: a fixed `ld` smaller than the batch.
    #[error(
        "invariant `ld_covers_batch`: layer {layer}: ld = {ld} is smaller than batch = {batch}"
    )]
    LdTooSmall {
        /// The layer.
        layer: String,
        /// The row stride.
        ld: usize,
        /// The batch size.
        batch: usize,
    },
    /// `conv_op_geometry`: a convolution op without geometry, or a matrix op with one.
    #[error("invariant `conv_op_geometry`: layer {layer}: {op} {}", if *has_geometry { "takes no convolution geometry" } else { "needs a convolution geometry (input, kernel, stride, padding)" })]
    ConvOpGeometry {
        /// The layer.
        layer: String,
        /// The op (IR name).
        op: &'static str,
        /// Whether a geometry was given.
        has_geometry: bool,
    },
    /// `conv_geometry`: the geometry does not fit the pattern or is out of range.
    #[error("invariant `conv_geometry`: layer {layer}: {problem}")]
    ConvGeometry {
        /// The layer.
        layer: String,
        /// What is wrong, in words.
        problem: String,
    },
}

/// Checks the CSR invariants of a `rows × cols` pattern (all of the pattern table above).
pub fn verify_csr(
    rows: usize,
    cols: usize,
    row_ptr: &[u32],
    col_idx: &[u32],
) -> Result<(), VerifyError> {
    for (what, value) in [("rows", rows), ("cols", cols), ("nnz", col_idx.len())] {
        if u32::try_from(value).is_err() {
            return Err(VerifyError::Size { what, value });
        }
    }
    if row_ptr.len() != rows + 1 {
        return Err(VerifyError::RowPtrLen {
            expected: rows + 1,
            got: row_ptr.len(),
        });
    }
    if row_ptr[0] != 0 {
        return Err(VerifyError::RowPtrStart { got: row_ptr[0] });
    }
    for row in 0..rows {
        let (start, end) = (row_ptr[row], row_ptr[row + 1]);
        if start > end {
            return Err(VerifyError::RowPtrMonotone { row, start, end });
        }
    }
    if row_ptr[rows] as usize != col_idx.len() {
        return Err(VerifyError::RowPtrEnd {
            expected: col_idx.len(),
            got: row_ptr[rows],
        });
    }
    for row in 0..rows {
        let (start, end) = (row_ptr[row] as usize, row_ptr[row + 1] as usize);
        let mut prev: Option<u32> = None;
        for (index, &col) in col_idx.iter().enumerate().take(end).skip(start) {
            if col as usize >= cols {
                return Err(VerifyError::ColOutOfRange {
                    row,
                    index,
                    col,
                    cols,
                });
            }
            if let Some(prev) = prev {
                if col <= prev {
                    return Err(VerifyError::ColNotSortedUnique {
                        row,
                        index,
                        prev,
                        col,
                    });
                }
            }
            prev = Some(col);
        }
    }
    Ok(())
}

/// Checks the `layer_name` invariant.
pub fn verify_layer_name(name: &str) -> Result<(), VerifyError> {
    let mut chars = name.chars();
    let ok = match chars.next() {
        Some(first) if first.is_ascii_alphabetic() || first == '_' => {
            chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(VerifyError::LayerName {
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_csr() {
        assert_eq!(verify_csr(2, 3, &[0, 2, 2], &[0, 2]), Ok(()));
        assert_eq!(verify_csr(0, 0, &[0], &[]), Ok(()));
    }

    #[test]
    fn names_each_broken_invariant() {
        let e = verify_csr(2, 3, &[0, 2], &[0, 2]).unwrap_err();
        assert!(e.to_string().contains("row_ptr_len"), "{e}");
        let e = verify_csr(1, 3, &[1, 2], &[0, 2]).unwrap_err();
        assert!(e.to_string().contains("row_ptr_start"), "{e}");
        let e = verify_csr(2, 3, &[0, 2, 1], &[0, 2]).unwrap_err();
        assert_eq!(
            e,
            VerifyError::RowPtrMonotone {
                row: 1,
                start: 2,
                end: 1
            }
        );
        let e = verify_csr(1, 3, &[0, 1], &[0, 2]).unwrap_err();
        assert!(e.to_string().contains("row_ptr_end"), "{e}");
        let e = verify_csr(2, 3, &[0, 1, 2], &[0, 3]).unwrap_err();
        assert_eq!(
            e,
            VerifyError::ColOutOfRange {
                row: 1,
                index: 1,
                col: 3,
                cols: 3
            }
        );
        let e = verify_csr(1, 3, &[0, 2], &[2, 1]).unwrap_err();
        assert!(e.to_string().contains("unsorted"), "{e}");
        let e = verify_csr(1, 3, &[0, 2], &[1, 1]).unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
        assert!(e.to_string().contains("row 0, index 1"), "{e}");
    }

    #[test]
    fn layer_names() {
        for good in ["fc1", "conv2", "_x", "fc1.weight", "block-1"] {
            assert_eq!(verify_layer_name(good), Ok(()), "{good}");
        }
        for bad in ["", "1fc", ".a", "a b", "a\n", "é"] {
            assert!(verify_layer_name(bad).is_err(), "{bad}");
        }
    }
}
