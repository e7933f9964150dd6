//! safetensors files, through the `safetensors` crate.
//!
//! ```text
//! header_len:u64 little-endian | JSON header {"NAME": {"dtype": "U8", "shape": [3, 4],
//!   "data_offsets": [begin, end]}, ..., "__metadata__": {...}} | data (C order, little-endian)
//! ```

use std::collections::BTreeSet;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::{element_count, unravel, ArrayData, FormatError, Names, NdArray, Shape};

const SUPPORTED: &str = "BOOL, U8, F32";

/// Checks the header length and every tensor's `data_offsets` against the size of `bytes`, so
/// that the `safetensors` crate only ever sees offsets within the file. Returns the tensor
/// names, sorted.
fn precheck(bytes: &[u8]) -> Result<Vec<String>, FormatError> {
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(FormatError::TruncatedHeader {
            needed: 8,
            got: bytes.len(),
        });
    };
    let mut len = [0u8; 8];
    len.copy_from_slice(len_bytes);
    let header_len = u64::from_le_bytes(len);
    let available = (bytes.len() - 8) as u64;
    if header_len > available {
        return Err(FormatError::TruncatedHeader {
            needed: header_len.saturating_add(8),
            got: bytes.len(),
        });
    }
    let header = &bytes[8..8 + header_len as usize];
    let data_len = (available - header_len) as usize;
    let header = std::str::from_utf8(header)
        .map_err(|e| FormatError::BadHeader(format!("the JSON header is not UTF-8: {e}")))?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(header)
        .map_err(|e| FormatError::BadHeader(format!("the header is not a JSON object: {e}")))?;
    let mut names = Vec::new();
    for (name, info) in &map {
        if name == "__metadata__" {
            continue;
        }
        names.push(name.clone());
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .map(|o| o.iter().map(|v| v.as_u64()).collect::<Vec<_>>());
        if let Some(offsets) = offsets {
            for end in offsets.into_iter().flatten() {
                if end > data_len as u64 {
                    return Err(FormatError::InTensor {
                        name: name.clone(),
                        problem: Box::new(FormatError::BadHeader(format!(
                            "data offset {end} lies beyond the {data_len} data bytes of the file"
                        ))),
                    });
                }
            }
        }
    }
    names.sort();
    Ok(names)
}

fn deserialize(bytes: &[u8]) -> Result<SafeTensors<'_>, FormatError> {
    precheck(bytes)?;
    SafeTensors::deserialize(bytes).map_err(|e| FormatError::Safetensors(e.to_string()))
}

/// The names of the tensors in a safetensors file, sorted.
pub fn safetensors_names(bytes: &[u8]) -> Result<Vec<String>, FormatError> {
    let names = precheck(bytes)?;
    deserialize(bytes)?;
    Ok(names)
}

fn convert(view: &TensorView<'_>) -> Result<NdArray, FormatError> {
    let shape = view.shape().to_vec();
    let data = view.data();
    // the crate has checked data.len() == product(shape) · size; check again, cheaply
    let count = element_count(&shape).ok_or_else(|| FormatError::TooLarge {
        shape: Shape(shape.clone()),
    })?;
    let (size, dtype) = match view.dtype() {
        Dtype::BOOL => (1, "bool"),
        Dtype::U8 => (1, "uint8"),
        Dtype::F32 => (4, "float32"),
        other => {
            return Err(FormatError::UnsupportedDtype {
                dtype: format!("{other:?}"),
                supported: SUPPORTED,
            })
        }
    };
    if count.checked_mul(size) != Some(data.len()) {
        return Err(FormatError::TruncatedData {
            shape: Shape(shape),
            dtype,
            expected: count.saturating_mul(size),
            got: data.len(),
        });
    }
    let data = match view.dtype() {
        Dtype::BOOL => ArrayData::Bool(
            data.iter()
                .enumerate()
                .map(|(i, &b)| match b {
                    0 => Ok(false),
                    1 => Ok(true),
                    _ => Err(FormatError::BadBool {
                        index: unravel(i, &shape),
                        byte: b,
                    }),
                })
                .collect::<Result<_, _>>()?,
        ),
        Dtype::U8 => ArrayData::U8(data.to_vec()),
        _ => ArrayData::F32(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
    };
    Ok(NdArray { shape, data })
}

/// Parses the bytes of a safetensors file and returns the tensor called `name` (dtype
/// `BOOL`, `U8` or `F32`). A missing name is an error listing the names present.
pub fn parse_safetensors(bytes: &[u8], name: &str) -> Result<NdArray, FormatError> {
    let names = precheck(bytes)?;
    let file = deserialize(bytes)?;
    let view = file.tensor(name).map_err(|_| FormatError::TensorNotFound {
        name: name.to_string(),
        available: Names(names),
    })?;
    convert(&view).map_err(|problem| FormatError::InTensor {
        name: name.to_string(),
        problem: Box::new(problem),
    })
}

/// Parses every tensor of a safetensors file, sorted by name.
pub fn parse_safetensors_all(bytes: &[u8]) -> Result<Vec<(String, NdArray)>, FormatError> {
    let file = deserialize(bytes)?;
    let mut tensors = file
        .iter()
        .map(|(name, view)| {
            convert(&view)
                .map(|a| (name.to_string(), a))
                .map_err(|problem| FormatError::InTensor {
                    name: name.to_string(),
                    problem: Box::new(problem),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// Encodes named arrays as a safetensors file, with the dtypes `BOOL`, `U8` and `F32` — the
/// bytes `safetensors.torch.save_file` writes for `torch.bool`, `torch.uint8` and
/// `torch.float32` tensors. Names must be distinct.
pub fn encode_safetensors(tensors: &[(&str, &NdArray)]) -> Result<Vec<u8>, FormatError> {
    let mut seen = BTreeSet::new();
    let mut buffers = Vec::with_capacity(tensors.len());
    for &(name, array) in tensors {
        if !seen.insert(name) {
            return Err(FormatError::DuplicateName(name.to_string()));
        }
        if name == "__metadata__" {
            return Err(FormatError::BadHeader(
                "\"__metadata__\" cannot name a tensor".into(),
            ));
        }
        array.check_len().map_err(|problem| FormatError::InTensor {
            name: name.to_string(),
            problem: Box::new(problem),
        })?;
        let (dtype, bytes) = match &array.data {
            ArrayData::Bool(v) => (Dtype::BOOL, v.iter().map(|&b| b as u8).collect()),
            ArrayData::U8(v) => (Dtype::U8, v.clone()),
            ArrayData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        buffers.push((name, dtype, array.shape.clone(), bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.to_string(), v))
                .map_err(|e| FormatError::Safetensors(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| FormatError::Safetensors(e.to_string()))
}
