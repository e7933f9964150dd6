//! Numpy arrays in and out of the kernels: dtype, contiguity and shape checked, with errors
//! that name the argument.

use numpy::{
    Element, PyArrayDyn, PyArrayMethods, PyReadonlyArray, PyReadonlyArrayDyn, PyReadwriteArray,
    PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// What an array argument must be: its name and the elements per batch column (the product of
/// every dimension but the last, which is the batch).
pub(crate) struct Operand<'a> {
    /// The argument's name in messages.
    pub name: &'a str,
    /// Elements per batch column (features, or channels·height·width).
    pub features: usize,
    /// The batch (the last dimension).
    pub batch: usize,
}

fn type_error(name: &str, obj: &Bound<'_, PyAny>, what: &str) -> PyErr {
    let got = describe(obj);
    PyTypeError::new_err(format!("{name} must be {what}, got {got}"))
}

/// `ndarray of float64 shape (3, 4)` or the Python type's name.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    if let Ok(a) = obj.cast::<numpy::PyUntypedArray>() {
        let dtype = a
            .dtype()
            .str()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "?".into());
        format!("an array of dtype {dtype} and shape {:?}", a.shape())
    } else {
        obj.get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into())
    }
}

/// A read-only float32 numpy array.
pub(crate) fn readonly<'py>(
    name: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    let array = obj
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| type_error(name, obj, "a float32 numpy array"))?;
    Ok(array.readonly())
}

/// A writable float32 numpy array.
pub(crate) fn writable<'py>(
    name: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    let array = obj
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| type_error(name, obj, "a float32 numpy array"))?;
    array.try_readwrite().map_err(|e| {
        PyValueError::new_err(format!(
            "{name} must be a writable array that no other argument shares ({e})"
        ))
    })
}

impl<'a> Operand<'a> {
    /// The operand `name` of `features` elements per column of a batch of `batch`.
    pub(crate) fn new(name: &'a str, features: usize, batch: usize) -> Self {
        Operand {
            name,
            features,
            batch,
        }
    }
}

/// Checks that `shape` is `[…, batch]` with `features` elements per batch column.
pub(crate) fn check_shape(op: &Operand<'_>, shape: &[usize]) -> PyResult<()> {
    let ok = match shape.split_last() {
        Some((&b, rest)) => b == op.batch && rest.iter().product::<usize>() == op.features,
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "{} has shape {shape:?}; expected {} features (the product of every dimension but \
             the last) by a batch of {} (the last dimension), feature-major",
            op.name, op.features, op.batch
        )))
    }
}

/// The elements of a C-contiguous array of the operand's shape.
pub(crate) fn slice<'a>(
    op: &Operand<'_>,
    array: &'a PyReadonlyArrayDyn<'_, f32>,
) -> PyResult<&'a [f32]> {
    check_shape(op, array.shape())?;
    c_slice(op.name, array)
}

/// The elements of a writable C-contiguous array of the operand's shape.
pub(crate) fn slice_mut<'a>(
    op: &Operand<'_>,
    array: &'a mut PyReadwriteArrayDyn<'_, f32>,
) -> PyResult<&'a mut [f32]> {
    check_shape(op, array.shape())?;
    c_slice_mut(op.name, array)
}

/// A flat C-contiguous float32 vector of exactly `len` elements.
pub(crate) fn vector<'a>(
    name: &str,
    len: usize,
    array: &'a PyReadonlyArrayDyn<'_, f32>,
) -> PyResult<&'a [f32]> {
    if array.len() != len {
        return Err(PyValueError::new_err(format!(
            "{name} has {} elements (shape {:?}); expected {len}",
            array.len(),
            array.shape()
        )));
    }
    c_slice(name, array)
}

/// A writable flat C-contiguous float32 vector of exactly `len` elements.
pub(crate) fn vector_mut<'a>(
    name: &str,
    len: usize,
    array: &'a mut PyReadwriteArrayDyn<'_, f32>,
) -> PyResult<&'a mut [f32]> {
    if array.len() != len {
        return Err(PyValueError::new_err(format!(
            "{name} has {} elements (shape {:?}); expected {len}",
            array.len(),
            array.shape()
        )));
    }
    c_slice_mut(name, array)
}

fn not_contiguous(name: &str) -> PyErr {
    PyValueError::new_err(format!("{name} must be C-contiguous"))
}

/// The elements of a C-contiguous array, in row-major order. (`as_slice` alone also takes a
/// Fortran-ordered array, whose elements would then be read transposed.)
pub(crate) fn c_slice<'a, T: Element, D: numpy::ndarray::Dimension>(
    name: &str,
    array: &'a PyReadonlyArray<'_, T, D>,
) -> PyResult<&'a [T]> {
    if !array.is_c_contiguous() {
        return Err(not_contiguous(name));
    }
    array.as_slice().map_err(|_| not_contiguous(name))
}

/// The elements of a writable C-contiguous array, in row-major order.
pub(crate) fn c_slice_mut<'a, T: Element, D: numpy::ndarray::Dimension>(
    name: &str,
    array: &'a mut PyReadwriteArray<'_, T, D>,
) -> PyResult<&'a mut [T]> {
    if !array.is_c_contiguous() {
        return Err(not_contiguous(name));
    }
    array.as_slice_mut().map_err(|_| not_contiguous(name))
}

/// The batch of an operand: the last dimension of its array.
pub(crate) fn batch_of(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    let array = obj
        .cast::<numpy::PyUntypedArray>()
        .map_err(|_| type_error(name, obj, "a float32 numpy array"))?;
    match array.shape().last() {
        Some(&b) if b > 0 => Ok(b),
        _ => Err(PyValueError::new_err(format!(
            "{name} has shape {:?}; its last dimension is the batch and must be at least 1",
            array.shape()
        ))),
    }
}

/// A 0/1 mask from any array-like (bool, integer or float), as `(rows, cols, bytes)` of a
/// row-major `[rows, cols]` mask (a 4-D `[out, in, k, k]` mask is `out × in·k·k`).
pub(crate) fn mask_bytes(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
) -> PyResult<(Vec<usize>, Vec<u8>)> {
    let np = py.import("numpy")?;
    let array = np.call_method1("asarray", (obj,))?;
    let shape: Vec<usize> = array.getattr("shape")?.extract()?;
    if shape.len() < 2 {
        return Err(PyValueError::new_err(format!(
            "a mask must have at least two dimensions ([out, in] or [out, in, k, k]), got shape \
             {shape:?}"
        )));
    }
    let kind: String = array.getattr("dtype")?.getattr("kind")?.extract()?;
    if !matches!(kind.as_str(), "b" | "i" | "u" | "f") {
        return Err(PyTypeError::new_err(format!(
            "a mask must hold bool or 0/1 numbers, got dtype kind {kind:?}"
        )));
    }
    let nonzero = array.call_method1("__ne__", (0,))?;
    let not_one = array.call_method1("__ne__", (1,))?;
    let bad = nonzero.call_method1("__and__", (not_one,))?;
    if bad.call_method0("any")?.extract::<bool>()? {
        let index: Vec<usize> = np
            .call_method1("argwhere", (bad,))?
            .get_item(0)?
            .call_method0("tolist")?
            .extract()?;
        return Err(PyValueError::new_err(format!(
            "a mask must hold only 0 and 1 (or bool); entry {index:?} is neither"
        )));
    }
    let bytes = np.call_method1(
        "ascontiguousarray",
        (nonzero.call_method1("astype", ("uint8",))?,),
    )?;
    let bytes = bytes
        .cast::<PyArrayDyn<u8>>()
        .map_err(|_| PyTypeError::new_err("a mask did not convert to uint8"))?
        .readonly();
    let bytes = c_slice("mask", &bytes)?.to_vec();
    Ok((shape, bytes))
}
