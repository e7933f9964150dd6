//! Mask and tensor files: `.npy` and safetensors.
//!
//! A layer's mask comes from a file that PyTorch or NumPy wrote — `np.save("fc1.npy", m)` or
//! `safetensors.torch.save_file({"fc1.mask": m}, "masks.safetensors")` — and checkpoints store
//! masks and dense `f32` weights in safetensors. This module reads and writes both formats.
//!
//! ## Masks (see `CONTRACTS.md`, "Files")
//!
//! - 2-D `[out, in]` for linear layers; 4-D `[out, in, kh, kw]` for conv layers, flattened
//!   row-major to a `out × (in·kh·kw)` [`Pattern`].
//! - Values `bool`, `u8` or `f32`, each 0 or 1; anything else is an error naming the position
//!   in the file's own shape (e.g. `[2, 0, 1, 1]`). A mask with an empty dimension is rejected:
//!   no layer has zero outputs or inputs.
//! - Written masks are `u8` (NumPy `|u1`, safetensors `U8`), like the checkpoint's `NAME.mask`.
//!
//! ## `.npy`
//!
//! Format versions 1.0, 2.0 and 3.0 are read; [`encode_npy`] writes 1.0 (2.0 when the header
//! would not fit). Supported dtypes: `|b1` (bool), `|u1` (u8) and `<f4` (f32); `>f4` is
//! byte-swapped and the byte order character of the one-byte types is ignored. Both C and
//! Fortran order are read: a Fortran-order array is transposed into C (row-major) order, so
//! `np.asfortranarray(m)` loads as the same mask as `m`. Bytes after the data are an error.
//!
//! The `.npy` header parser is written by hand rather than taken from a crate (`npyz`): the
//! format is a magic string, a length and a Python dict literal with three keys, so the parser
//! is ~200 lines; writing it ourselves gives every failure an exact message (the byte offset
//! in the header, the unsupported dtype by name), lets the reader refuse to allocate anything
//! before the declared size has been checked against the bytes present, and keeps the surface
//! that the `mask_readers` fuzz target exercises entirely in this crate.
//!
//! ## safetensors
//!
//! Read and written with the `safetensors` crate, so files are exactly what
//! `safetensors.torch.save_file` produces (dtypes `BOOL`, `U8`, `F32`; the optional
//! `__metadata__` entry is ignored). A tensor is chosen by name; a name that is missing gives an
//! error listing the names present. Before handing the bytes to the crate the reader checks
//! the header length and every `data_offsets` pair against the file size, so hostile offsets
//! become errors rather than arithmetic overflow.
//!
//! ## Checkpoints
//!
//! [`resolve_checkpoint`] (in [`checkpoint`]) finds a training checkpoint's folder from a
//! folder or a checkpoint directory, by the one rule the runtime and `kernel-dump` share.
//!
//! ## Errors
//!
//! The byte-level functions ([`parse_npy`], [`parse_safetensors`], …) return a
//! [`FormatError`] describing the problem; the file-level functions wrap it in a
//! [`MaskIoError`] whose message starts with the file's path. No input makes any of them
//! panic; the `mask_readers` fuzz target in `fuzz/` checks that.

pub mod checkpoint;
mod npy;
mod st;

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::pattern::{Pattern, PatternError};

pub use checkpoint::{
    checkpoint_order, locate_checkpoint, moved_aside, resolve_checkpoint, CheckpointError,
    CheckpointProblem, LATEST_FILE, MODEL_FILE, STATE_FILE,
};
pub use npy::{encode_npy, parse_npy};
pub use st::{encode_safetensors, parse_safetensors, parse_safetensors_all, safetensors_names};

/// The element type and values of an [`NdArray`], in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayData {
    /// `bool` (NumPy `|b1`, safetensors `BOOL`).
    Bool(Vec<bool>),
    /// `u8` (NumPy `|u1`, safetensors `U8`).
    U8(Vec<u8>),
    /// `f32` (NumPy `<f4`, safetensors `F32`).
    F32(Vec<f32>),
}

impl ArrayData {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            ArrayData::Bool(v) => v.len(),
            ArrayData::U8(v) => v.len(),
            ArrayData::F32(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name as NumPy spells it (`bool`, `uint8`, `float32`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            ArrayData::Bool(_) => "bool",
            ArrayData::U8(_) => "uint8",
            ArrayData::F32(_) => "float32",
        }
    }
}

/// An n-dimensional array as read from or written to a file: its shape and its values in
/// C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray {
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The values, row-major; `data.len()` is the product of `shape`.
    pub data: ArrayData,
}

/// A dense `f32` tensor (weights, biases, momentum): shape and row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
}

/// A mask read from a file: the pattern it describes, the shape it had in the file, and where
/// it came from (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedMask {
    /// The file it was read from.
    pub path: PathBuf,
    /// The tensor's name, for safetensors files.
    pub tensor: Option<String>,
    /// The shape in the file: `[out, in]` or `[out, in, kh, kw]`.
    pub shape: Vec<usize>,
    /// The mask as a `out × (product of the other dimensions)` pattern.
    pub pattern: Pattern,
}

impl LoadedMask {
    /// Checks that the mask's shape in the file is exactly `expected` (the layer's weight
    /// shape, e.g. `[300, 784]` or `[6, 1, 5, 5]`); the error names the file and the layer.
    pub fn expect_shape(&self, layer: &str, expected: &[usize]) -> Result<(), MaskIoError> {
        expect_shape(&self.path, layer, &self.shape, expected)
    }
}

/// The shape of an array, printed as `300x784` (`scalar` for no dimensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape(pub Vec<usize>);

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("scalar");
        }
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("x")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// A position in an array, printed as `[1, 0, 2, 2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position(pub Vec<usize>);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// A list of tensor names, printed as `"a", "b"` (or `none`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names(pub Vec<String>);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n:?}")?;
        }
        Ok(())
    }
}

/// What is wrong with the bytes of a `.npy` or safetensors file (or with an array to write).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum FormatError {
    /// The file does not start with the `.npy` magic string.
    #[error("wrong magic: a .npy file starts with \\x93NUMPY, this one with {found}")]
    NpyMagic {
        /// The first bytes found, escaped.
        found: String,
    },
    /// A `.npy` format version other than 1.0, 2.0 and 3.0.
    #[error("unsupported .npy format version {major}.{minor} (supported: 1.0, 2.0, 3.0)")]
    NpyVersion {
        /// Major version byte.
        major: u8,
        /// Minor version byte.
        minor: u8,
    },
    /// The file ends inside its header.
    #[error("truncated header: it needs {needed} bytes, the file has {got}")]
    TruncatedHeader {
        /// Bytes up to the end of the declared header.
        needed: u64,
        /// Bytes in the file.
        got: usize,
    },
    /// The header is not what the format prescribes.
    #[error("bad header: {0}")]
    BadHeader(String),
    /// An element type this module does not handle.
    #[error("unsupported dtype {dtype} (supported: {supported})")]
    UnsupportedDtype {
        /// The dtype as the file spells it (`'<f8'`, `F64`).
        dtype: String,
        /// The supported dtypes, as the format spells them.
        supported: &'static str,
    },
    /// The element type is supported, but not where it was found (e.g. a `u8` weight).
    #[error("dtype is {got}, expected {expected}")]
    WrongDtype {
        /// What the caller needs.
        expected: &'static str,
        /// What the file holds.
        got: &'static str,
    },
    /// The shape's element count or byte size overflows.
    #[error("shape {shape} is too large")]
    TooLarge {
        /// The declared shape.
        shape: Shape,
    },
    /// Fewer data bytes than the shape and dtype need.
    #[error("truncated data: shape {shape} of {dtype} needs {expected} bytes, the file has {got}")]
    TruncatedData {
        /// The declared shape.
        shape: Shape,
        /// The element type.
        dtype: &'static str,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// More bytes than the header accounts for.
    #[error("{extra} unexpected bytes after the data (shape {shape} of {dtype})")]
    TrailingData {
        /// The declared shape.
        shape: Shape,
        /// The element type.
        dtype: &'static str,
        /// The number of extra bytes.
        extra: usize,
    },
    /// A `bool` element stored as a byte other than 0 or 1.
    #[error("bool value at {index} is stored as byte {byte}, expected 0 or 1")]
    BadBool {
        /// Its position.
        index: Position,
        /// The byte.
        byte: u8,
    },
    /// A mask that is neither 2-D nor 4-D.
    #[error("wrong rank: a mask is 2-D [out, in] or 4-D [out, in, kh, kw], this one is {rank}-D with shape {shape}")]
    Rank {
        /// The number of dimensions.
        rank: usize,
        /// The shape.
        shape: Shape,
    },
    /// A mask with a dimension of size 0.
    #[error("mask shape {shape} has an empty dimension")]
    EmptyDimension {
        /// The shape.
        shape: Shape,
    },
    /// A mask value other than 0 or 1.
    #[error("mask value at {index} is {value}, expected 0 or 1")]
    MaskValue {
        /// Its position in the array's own shape.
        index: Position,
        /// The value, printed.
        value: String,
    },
    /// A safetensors file has no tensor of that name.
    #[error("tensor {name:?} not found; the file holds: {available}")]
    TensorNotFound {
        /// The requested name.
        name: String,
        /// The names present, sorted.
        available: Names,
    },
    /// No tensor name given, and the safetensors file does not hold exactly one tensor.
    #[error("the file holds {} tensors ({available}); name the one to read", available.0.len())]
    TensorNameNeeded {
        /// The names present, sorted.
        available: Names,
    },
    /// The same tensor name twice in a list to write.
    #[error("tensor name {0:?} appears more than once")]
    DuplicateName(String),
    /// The safetensors crate rejected the file.
    #[error("invalid safetensors file: {0}")]
    Safetensors(String),
    /// A problem with one tensor of a safetensors file.
    #[error("tensor {name:?}: {problem}")]
    InTensor {
        /// The tensor's name.
        name: String,
        /// What is wrong with it.
        problem: Box<FormatError>,
    },
    /// An array whose data length does not match its shape.
    #[error("shape {shape} needs {expected} values, the array has {got}")]
    DataLength {
        /// The shape.
        shape: Shape,
        /// Its element count.
        expected: usize,
        /// Values present.
        got: usize,
    },
    /// A shape to write that does not hold the pattern.
    #[error("shape {shape} does not hold a {rows}x{cols} pattern (expected [{rows}, {cols}] or [{rows}, in, kh, kw] with in·kh·kw = {cols})")]
    PatternShape {
        /// The requested shape.
        shape: Shape,
        /// Pattern rows.
        rows: usize,
        /// Pattern columns.
        cols: usize,
    },
    /// The mask does not form a valid pattern (e.g. more than `u32::MAX` nonzeros).
    #[error(transparent)]
    Pattern(#[from] PatternError),
}

/// An error reading or writing a mask or tensor file; every message starts with the path.
#[derive(Debug, Error)]
pub enum MaskIoError {
    /// The file does not exist.
    #[error("{}: no such file", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file could not be written.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file's content (or the array to write) is wrong.
    #[error("{}: {problem}", path.display())]
    Format {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: FormatError,
    },
    /// A mask whose shape does not match its layer.
    #[error("{}: {layer}: mask has shape {got}, layer is {expected}", path.display())]
    ShapeMismatch {
        /// The path.
        path: PathBuf,
        /// The layer's name.
        layer: String,
        /// The mask's shape in the file.
        got: Shape,
        /// The layer's weight shape.
        expected: Shape,
    },
}

impl MaskIoError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            MaskIoError::NotFound { path }
            | MaskIoError::Read { path, .. }
            | MaskIoError::Write { path, .. }
            | MaskIoError::Format { path, .. }
            | MaskIoError::ShapeMismatch { path, .. } => path,
        }
    }

    fn format(path: &Path, problem: FormatError) -> Self {
        MaskIoError::Format {
            path: path.to_path_buf(),
            problem,
        }
    }
}

/// The product of `shape`, or `None` on overflow.
pub(crate) fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The C-order multi-index of flat position `flat` in `shape`.
pub(crate) fn unravel(mut flat: usize, shape: &[usize]) -> Position {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = flat % dim;
            flat /= dim;
        }
    }
    Position(index)
}

impl NdArray {
    /// An array from its shape and row-major data, checking that the lengths agree.
    pub fn new(shape: Vec<usize>, data: ArrayData) -> Result<Self, FormatError> {
        let expected = element_count(&shape).ok_or_else(|| FormatError::TooLarge {
            shape: Shape(shape.clone()),
        })?;
        if data.len() != expected {
            return Err(FormatError::DataLength {
                shape: Shape(shape),
                expected,
                got: data.len(),
            });
        }
        Ok(NdArray { shape, data })
    }

    /// Checks that `data` has as many elements as `shape` says.
    pub(crate) fn check_len(&self) -> Result<(), FormatError> {
        let expected = element_count(&self.shape).ok_or_else(|| FormatError::TooLarge {
            shape: Shape(self.shape.clone()),
        })?;
        if self.data.len() != expected {
            return Err(FormatError::DataLength {
                shape: Shape(self.shape.clone()),
                expected,
                got: self.data.len(),
            });
        }
        Ok(())
    }

    /// The mask this array describes: a 2-D `[out, in]` array becomes an `out × in` pattern,
    /// a 4-D `[out, in, kh, kw]` array an `out × (in·kh·kw)` pattern (row-major flattening).
    /// Every value must be 0 or 1 (`false`/`true`); the error names the first other one by
    /// its position in this array's shape.
    pub fn to_pattern(&self) -> Result<Pattern, FormatError> {
        self.check_len()?;
        let (rows, cols) = mask_dims(&self.shape)?;
        let bits = mask_bits(&self.shape, &self.data)?;
        let mut row_ptr = Vec::with_capacity(rows + 1);
        let mut col_idx = Vec::new();
        row_ptr.push(0u32);
        for row in bits.chunks(cols) {
            col_idx.extend(
                row.iter()
                    .enumerate()
                    .filter(|(_, &b)| b)
                    .map(|(c, _)| c as u32),
            );
            let nnz = u32::try_from(col_idx.len()).map_err(|_| {
                PatternError::Invalid(crate::VerifyError::Size {
                    what: "nnz",
                    value: col_idx.len(),
                })
            })?;
            row_ptr.push(nnz);
        }
        Ok(Pattern::from_csr(rows, cols, row_ptr, col_idx)?)
    }

    /// The `u8` array of 0/1 values holding `pattern` in `shape`: `[rows, cols]`, or
    /// `[rows, in, kh, kw]` with `in·kh·kw = cols` for a conv layer.
    pub fn from_pattern(pattern: &Pattern, shape: &[usize]) -> Result<Self, FormatError> {
        let (rows, cols) = (pattern.rows(), pattern.cols());
        let bad = || FormatError::PatternShape {
            shape: Shape(shape.to_vec()),
            rows,
            cols,
        };
        let (r, c) = match mask_dims(shape) {
            Ok(dims) => dims,
            Err(FormatError::TooLarge { .. }) => return Err(bad()),
            Err(e) => return Err(e),
        };
        if (r, c) != (rows, cols) {
            return Err(bad());
        }
        Ok(NdArray {
            shape: shape.to_vec(),
            data: ArrayData::U8(pattern.to_dense_mask()),
        })
    }

    /// The array as a dense `f32` tensor; any other dtype is an error.
    pub fn into_f32(self) -> Result<F32Tensor, FormatError> {
        self.check_len()?;
        match self.data {
            ArrayData::F32(data) => Ok(F32Tensor {
                shape: self.shape,
                data,
            }),
            other => Err(FormatError::WrongDtype {
                expected: "float32",
                got: other.dtype_name(),
            }),
        }
    }
}

/// `(rows, cols)` of a mask of this shape: rank 2 or 4, no empty dimension.
fn mask_dims(shape: &[usize]) -> Result<(usize, usize), FormatError> {
    if shape.len() != 2 && shape.len() != 4 {
        return Err(FormatError::Rank {
            rank: shape.len(),
            shape: Shape(shape.to_vec()),
        });
    }
    if shape.contains(&0) {
        return Err(FormatError::EmptyDimension {
            shape: Shape(shape.to_vec()),
        });
    }
    let cols = element_count(&shape[1..]).ok_or_else(|| FormatError::TooLarge {
        shape: Shape(shape.to_vec()),
    })?;
    element_count(shape).ok_or_else(|| FormatError::TooLarge {
        shape: Shape(shape.to_vec()),
    })?;
    Ok((shape[0], cols))
}

/// The 0/1 values of a mask as booleans; the first value that is neither is an error.
fn mask_bits(shape: &[usize], data: &ArrayData) -> Result<Vec<bool>, FormatError> {
    fn bad(shape: &[usize], flat: usize, value: String) -> FormatError {
        FormatError::MaskValue {
            index: unravel(flat, shape),
            value,
        }
    }
    match data {
        ArrayData::Bool(v) => Ok(v.clone()),
        ArrayData::U8(v) => v
            .iter()
            .enumerate()
            .map(|(i, &x)| match x {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(bad(shape, i, x.to_string())),
            })
            .collect(),
        ArrayData::F32(v) => v
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if x == 0.0 {
                    Ok(false)
                } else if x == 1.0 {
                    Ok(true)
                } else {
                    Err(bad(shape, i, format!("{x:?}")))
                }
            })
            .collect(),
    }
}

/// Checks that a mask's shape `got` (as in its file) is the layer's weight shape `expected`;
/// the error reads e.g. `masks.npy: fc1: mask has shape 300x700, layer is 300x784`.
pub fn expect_shape(
    path: impl AsRef<Path>,
    layer: &str,
    got: &[usize],
    expected: &[usize],
) -> Result<(), MaskIoError> {
    if got == expected {
        Ok(())
    } else {
        Err(MaskIoError::ShapeMismatch {
            path: path.as_ref().to_path_buf(),
            layer: layer.to_string(),
            got: Shape(got.to_vec()),
            expected: Shape(expected.to_vec()),
        })
    }
}

/// Which format a path holds: by extension (`.npy`, `.safetensors`), else by its first bytes.
fn is_npy(path: &Path, bytes: &[u8]) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("npy") => true,
        Some(ext) if ext.eq_ignore_ascii_case("safetensors") => false,
        _ => bytes.starts_with(npy::MAGIC),
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, MaskIoError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            MaskIoError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            MaskIoError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), MaskIoError> {
    std::fs::write(path, bytes).map_err(|source| MaskIoError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a `.npy` file.
pub fn read_npy(path: impl AsRef<Path>) -> Result<NdArray, MaskIoError> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    parse_npy(&bytes).map_err(|e| MaskIoError::format(path, e))
}

/// Reads the tensor called `tensor` from a safetensors file.
pub fn read_safetensors(path: impl AsRef<Path>, tensor: &str) -> Result<NdArray, MaskIoError> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    parse_safetensors(&bytes, tensor).map_err(|e| MaskIoError::format(path, e))
}

/// Reads every tensor of a safetensors file, sorted by name.
pub fn read_safetensors_all(path: impl AsRef<Path>) -> Result<Vec<(String, NdArray)>, MaskIoError> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    parse_safetensors_all(&bytes).map_err(|e| MaskIoError::format(path, e))
}

/// Reads one array from a `.npy` or safetensors file (chosen by the extension, else by the
/// content). For safetensors, `tensor` names the tensor; it may be `None` when the file holds
/// exactly one. A `.npy` file holds one array, so `tensor` is not consulted for it.
/// Returns the array and the tensor name used (for safetensors).
pub fn read_array(
    path: impl AsRef<Path>,
    tensor: Option<&str>,
) -> Result<(NdArray, Option<String>), MaskIoError> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    parse_array(path, &bytes, tensor)
}

fn parse_array(
    path: &Path,
    bytes: &[u8],
    tensor: Option<&str>,
) -> Result<(NdArray, Option<String>), MaskIoError> {
    let fail = |e| MaskIoError::format(path, e);
    if is_npy(path, bytes) {
        return Ok((parse_npy(bytes).map_err(fail)?, None));
    }
    let name = match tensor {
        Some(name) => name.to_string(),
        None => {
            let names = safetensors_names(bytes).map_err(fail)?;
            match <[String; 1]>::try_from(names) {
                Ok([only]) => only,
                Err(names) => {
                    return Err(fail(FormatError::TensorNameNeeded {
                        available: Names(names),
                    }))
                }
            }
        }
    };
    let array = parse_safetensors(bytes, &name).map_err(fail)?;
    Ok((array, Some(name)))
}

/// Reads a mask (see the module doc) from a `.npy` or safetensors file; `tensor` as in
/// [`read_array`]. Check it against its layer with [`LoadedMask::expect_shape`].
pub fn read_mask(path: impl AsRef<Path>, tensor: Option<&str>) -> Result<LoadedMask, MaskIoError> {
    let path = path.as_ref();
    let (array, name) = read_array(path, tensor)?;
    let pattern = array.to_pattern().map_err(|problem| {
        let problem = match &name {
            Some(name) => FormatError::InTensor {
                name: name.clone(),
                problem: Box::new(problem),
            },
            None => problem,
        };
        MaskIoError::format(path, problem)
    })?;
    Ok(LoadedMask {
        path: path.to_path_buf(),
        tensor: name,
        shape: array.shape,
        pattern,
    })
}

/// Reads a dense `f32` tensor (weights, biases, momentum) from a `.npy` or safetensors file;
/// `tensor` as in [`read_array`]. Any dtype other than `f32` is an error.
pub fn read_f32_tensor(
    path: impl AsRef<Path>,
    tensor: Option<&str>,
) -> Result<F32Tensor, MaskIoError> {
    let path = path.as_ref();
    let (array, name) = read_array(path, tensor)?;
    array.into_f32().map_err(|problem| {
        let problem = match name {
            Some(name) => FormatError::InTensor {
                name,
                problem: Box::new(problem),
            },
            None => problem,
        };
        MaskIoError::format(path, problem)
    })
}

/// Writes an array as a `.npy` file.
pub fn write_npy(path: impl AsRef<Path>, array: &NdArray) -> Result<(), MaskIoError> {
    let path = path.as_ref();
    let bytes = encode_npy(array).map_err(|e| MaskIoError::format(path, e))?;
    write_bytes(path, &bytes)
}

/// Writes named arrays as a safetensors file (names must be distinct).
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(&str, &NdArray)],
) -> Result<(), MaskIoError> {
    let path = path.as_ref();
    let bytes = encode_safetensors(tensors).map_err(|e| MaskIoError::format(path, e))?;
    write_bytes(path, &bytes)
}

/// Writes a mask as a `u8` `.npy` file of the given shape (`[rows, cols]`, or
/// `[rows, in, kh, kw]` for a conv layer).
pub fn write_mask_npy(
    path: impl AsRef<Path>,
    pattern: &Pattern,
    shape: &[usize],
) -> Result<(), MaskIoError> {
    let path = path.as_ref();
    let array = NdArray::from_pattern(pattern, shape).map_err(|e| MaskIoError::format(path, e))?;
    write_npy(path, &array)
}

/// Writes masks as `u8` tensors of a safetensors file: `(name, pattern, shape)` each.
pub fn write_mask_safetensors(
    path: impl AsRef<Path>,
    masks: &[(&str, &Pattern, &[usize])],
) -> Result<(), MaskIoError> {
    let path = path.as_ref();
    let arrays = masks
        .iter()
        .map(|&(name, pattern, shape)| {
            NdArray::from_pattern(pattern, shape).map_err(|problem| FormatError::InTensor {
                name: name.to_string(),
                problem: Box::new(problem),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MaskIoError::format(path, e))?;
    let named: Vec<(&str, &NdArray)> = masks.iter().map(|m| m.0).zip(&arrays).collect();
    write_safetensors(path, &named)
}

/// Writes a dense `f32` tensor as a `.npy` file.
pub fn write_f32_npy(
    path: impl AsRef<Path>,
    shape: &[usize],
    data: &[f32],
) -> Result<(), MaskIoError> {
    let path = path.as_ref();
    let array = NdArray::new(shape.to_vec(), ArrayData::F32(data.to_vec()))
        .map_err(|e| MaskIoError::format(path, e))?;
    write_npy(path, &array)
}

/// Writes dense `f32` tensors as a safetensors file: `(name, shape, row-major data)` each.
pub fn write_safetensors_f32(
    path: impl AsRef<Path>,
    tensors: &[(&str, &[usize], &[f32])],
) -> Result<(), MaskIoError> {
    let path = path.as_ref();
    let arrays = tensors
        .iter()
        .map(|&(name, shape, data)| {
            NdArray::new(shape.to_vec(), ArrayData::F32(data.to_vec())).map_err(|problem| {
                FormatError::InTensor {
                    name: name.to_string(),
                    problem: Box::new(problem),
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MaskIoError::format(path, e))?;
    let named: Vec<(&str, &NdArray)> = tensors.iter().map(|t| t.0).zip(&arrays).collect();
    write_safetensors(path, &named)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unravel_is_row_major() {
        assert_eq!(unravel(0, &[2, 3]).0, vec![0, 0]);
        assert_eq!(unravel(5, &[2, 3]).0, vec![1, 2]);
        assert_eq!(unravel(7, &[2, 2, 2]).0, vec![1, 1, 1]);
        assert_eq!(unravel(0, &[]).0, Vec::<usize>::new());
    }

    #[test]
    fn shapes_print() {
        assert_eq!(Shape(vec![300, 784]).to_string(), "300x784");
        assert_eq!(Shape(vec![]).to_string(), "scalar");
        assert_eq!(Position(vec![1, 0]).to_string(), "[1, 0]");
    }

    #[test]
    fn conv_mask_flattens_row_major() {
        // [2, 1, 2, 2]: out 0 = [[1,0],[0,1]], out 1 = [[0,0],[1,1]]
        let a = NdArray::new(
            vec![2, 1, 2, 2],
            ArrayData::U8(vec![1, 0, 0, 1, 0, 0, 1, 1]),
        )
        .unwrap();
        let p = a.to_pattern().unwrap();
        assert_eq!((p.rows(), p.cols()), (2, 4));
        assert_eq!(p.row(0), &[0, 3]);
        assert_eq!(p.row(1), &[2, 3]);
        let back = NdArray::from_pattern(&p, &[2, 1, 2, 2]).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn bad_mask_value_names_position_in_file_shape() {
        let a = NdArray::new(vec![1, 2, 1, 2], ArrayData::F32(vec![0.0, 1.0, 0.5, 1.0])).unwrap();
        let e = a.to_pattern().unwrap_err();
        assert_eq!(
            e.to_string(),
            "mask value at [0, 1, 0, 0] is 0.5, expected 0 or 1"
        );
    }
}
