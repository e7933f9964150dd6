//! safetensors files for `sparsejit.torch.load_safetensors` / `save_safetensors`: the layout of
//! `sparse-train`'s `model.safetensors` (`NAME.weight` dense float32 with zeros where masked,
//! `NAME.mask` uint8, `NAME.bias`, optionally `NAME.momentum`), read and written by
//! `sparse_ir::mask_io`, the project's reader and writer of tensor files.

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use sparse_ir::mask_io::{encode_safetensors, read_safetensors_all, ArrayData, MaskIoError};
use sparse_ir::NdArray;

use crate::arrays::c_slice;

/// Registers the functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(write_tensors, m)?)?;
    Ok(())
}

/// A file that cannot be read or written is an `OSError`; bad content a `ValueError`.
fn io_error(e: MaskIoError) -> PyErr {
    match e {
        MaskIoError::Format { path, problem } => PyValueError::new_err(format!(
            "{}: not a safetensors file of F32, U8 or BOOL tensors ({problem})",
            path.display()
        )),
        e => PyOSError::new_err(e.to_string()),
    }
}

/// Every tensor of a safetensors file, by name: float32 tensors as float32 arrays, U8 and
/// BOOL tensors as uint8 arrays; any other dtype is an error naming the file.
#[pyfunction]
fn read_tensors<'py>(py: Python<'py>, path: std::path::PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, array) in read_safetensors_all(&path).map_err(io_error)? {
        let value = match array.data {
            ArrayData::F32(v) => PyArray1::from_vec(py, v).reshape(array.shape)?.into_any(),
            ArrayData::U8(v) => PyArray1::from_vec(py, v).reshape(array.shape)?.into_any(),
            ArrayData::Bool(v) => {
                let bytes: Vec<u8> = v.into_iter().map(u8::from).collect();
                PyArray1::from_vec(py, bytes)
                    .reshape(array.shape)?
                    .into_any()
            }
        };
        dict.set_item(name, value)?;
    }
    Ok(dict)
}

/// Writes `tensors` (name → float32 or uint8 numpy array) to a safetensors file, through a
/// temporary file renamed into place, so an existing file is never left half-written.
#[pyfunction]
fn write_tensors(path: std::path::PathBuf, tensors: &Bound<'_, PyDict>) -> PyResult<()> {
    let mut arrays: Vec<(String, NdArray)> = Vec::new();
    for (name, value) in tensors.iter() {
        let name: String = name.extract()?;
        let array = if let Ok(a) = value.cast::<PyArrayDyn<f32>>() {
            let a = a.readonly();
            NdArray {
                shape: a.shape().to_vec(),
                data: ArrayData::F32(c_slice(&name, &a)?.to_vec()),
            }
        } else if let Ok(a) = value.cast::<PyArrayDyn<u8>>() {
            let a = a.readonly();
            NdArray {
                shape: a.shape().to_vec(),
                data: ArrayData::U8(c_slice(&name, &a)?.to_vec()),
            }
        } else {
            return Err(PyTypeError::new_err(format!(
                "{name} must be a float32 or uint8 numpy array"
            )));
        };
        arrays.push((name, array));
    }
    let named: Vec<(&str, &NdArray)> = arrays.iter().map(|(n, a)| (n.as_str(), a)).collect();
    let shown = path.display().to_string();
    let bytes =
        encode_safetensors(&named).map_err(|e| PyValueError::new_err(format!("{shown}: {e}")))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| PyOSError::new_err(format!("{shown}: {e}")))
}
