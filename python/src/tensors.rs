//! safetensors files for `sparsejit.torch.load_safetensors` / `save_safetensors`: the layout of
//! `sparse-train`'s `model.safetensors` (`NAME.weight` dense float32 with zeros where masked,
//! `NAME.mask` uint8, `NAME.bias`, optionally `NAME.momentum`), read and written with the
//! `safetensors` crate.

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::arrays::c_slice;

/// Registers the functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(write_tensors, m)?)?;
    Ok(())
}

/// Every tensor of a safetensors file, by name: float32 tensors as float32 arrays, U8 and
/// BOOL tensors as uint8 arrays; any other dtype is an error naming the tensor.
#[pyfunction]
fn read_tensors<'py>(py: Python<'py>, path: std::path::PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(&path).map_err(|e| PyOSError::new_err(format!("{shown}: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| PyValueError::new_err(format!("{shown}: not a safetensors file: {e}")))?;
    let dict = PyDict::new(py);
    for (name, t) in st.tensors() {
        let shape = t.shape().to_vec();
        let array = match t.dtype() {
            Dtype::F32 => {
                let v: Vec<f32> = t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                PyArray1::from_vec(py, v).reshape(shape)?.into_any()
            }
            Dtype::U8 | Dtype::BOOL => PyArray1::from_slice(py, t.data())
                .reshape(shape)?
                .into_any(),
            other => {
                return Err(PyValueError::new_err(format!(
                    "{shown}: tensor {name} has dtype {other:?}; expected F32, U8 or BOOL"
                )))
            }
        };
        dict.set_item(name, array)?;
    }
    Ok(dict)
}

/// Writes `tensors` (name → float32 or uint8 numpy array) to a safetensors file, through a
/// temporary file renamed into place, so an existing file is never left half-written.
#[pyfunction]
fn write_tensors(path: std::path::PathBuf, tensors: &Bound<'_, PyDict>) -> PyResult<()> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, value) in tensors.iter() {
        let name: String = name.extract()?;
        if let Ok(a) = value.cast::<PyArrayDyn<f32>>() {
            let a = a.readonly();
            let data = c_slice(&name, &a)?;
            let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            owned.push((name, Dtype::F32, a.shape().to_vec(), bytes));
        } else if let Ok(a) = value.cast::<PyArrayDyn<u8>>() {
            let a = a.readonly();
            let data = c_slice(&name, &a)?;
            owned.push((name, Dtype::U8, a.shape().to_vec(), data.to_vec()));
        } else {
            return Err(PyTypeError::new_err(format!(
                "{name} must be a float32 or uint8 numpy array"
            )));
        }
    }
    let views = owned
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| PyValueError::new_err(format!("{n}: {e}")))
        })
        .collect::<PyResult<Vec<_>>>()?;
    let shown = path.display().to_string();
    let data = safetensors::tensor::serialize(views, None)
        .map_err(|e| PyValueError::new_err(format!("{shown}: {e}")))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &data)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| PyOSError::new_err(format!("{shown}: {e}")))
}
