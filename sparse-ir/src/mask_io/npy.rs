//! The `.npy` format (NumPy's `numpy.lib.format`), versions 1.0, 2.0 and 3.0.
//!
//! ```text
//! \x93NUMPY  major:u8 minor:u8  header_len:u16 (1.0) | u32 (2.0, 3.0), little-endian
//! header: a Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
//!         padded with spaces and ended by '\n' (latin-1 in 1.0/2.0, UTF-8 in 3.0)
//! data:   the elements, C or Fortran order
//! ```

use super::{element_count, unravel, ArrayData, FormatError, NdArray, Shape};

/// The magic string every `.npy` file starts with.
pub(crate) const MAGIC: &[u8] = b"\x93NUMPY";

const SUPPORTED: &str = "'|b1' bool, '|u1' uint8, '<f4' float32";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    Bool,
    U8,
    F32 { big_endian: bool },
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 => 1,
            Dtype::F32 { .. } => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "bool",
            Dtype::U8 => "uint8",
            Dtype::F32 { .. } => "float32",
        }
    }

    fn from_descr(descr: &str) -> Result<Self, FormatError> {
        match descr {
            "|b1" | "<b1" | ">b1" | "=b1" => Ok(Dtype::Bool),
            "|u1" | "<u1" | ">u1" | "=u1" => Ok(Dtype::U8),
            "<f4" => Ok(Dtype::F32 { big_endian: false }),
            ">f4" => Ok(Dtype::F32 { big_endian: true }),
            _ => Err(FormatError::UnsupportedDtype {
                dtype: format!("{descr:?}"),
                supported: SUPPORTED,
            }),
        }
    }
}

fn escape(bytes: &[u8]) -> String {
    let escaped: String = bytes
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    format!("\"{escaped}\"")
}

/// Parses the bytes of a `.npy` file into an array in C order (a Fortran-order array is
/// transposed). Never panics; see the module doc of [`crate::mask_io`] for what is accepted.
pub fn parse_npy(bytes: &[u8]) -> Result<NdArray, FormatError> {
    let prefix = &bytes[..bytes.len().min(MAGIC.len())];
    if prefix != &MAGIC[..prefix.len()] {
        return Err(FormatError::NpyMagic {
            found: escape(prefix),
        });
    }
    let truncated = |needed: usize| FormatError::TruncatedHeader {
        needed: needed as u64,
        got: bytes.len(),
    };
    if bytes.len() < 8 {
        return Err(truncated(10));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let len_size = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => return Err(FormatError::NpyVersion { major, minor }),
    };
    let prelude = 8 + len_size;
    let Some(len_bytes) = bytes.get(8..prelude) else {
        return Err(truncated(prelude));
    };
    let header_len = len_bytes
        .iter()
        .rev()
        .fold(0usize, |acc, &b| (acc << 8) | b as usize);
    let Some(header_end) = prelude.checked_add(header_len) else {
        return Err(truncated(usize::MAX));
    };
    let Some(header) = bytes.get(prelude..header_end) else {
        return Err(truncated(header_end));
    };
    if major == 3 && std::str::from_utf8(header).is_err() {
        return Err(FormatError::BadHeader(
            "a version 3.0 header must be UTF-8".into(),
        ));
    }
    let header = parse_header(header)?;
    let dtype = Dtype::from_descr(&header.descr)?;
    let shape = header.shape;
    let count = element_count(&shape).ok_or_else(|| FormatError::TooLarge {
        shape: Shape(shape.clone()),
    })?;
    let expected = count
        .checked_mul(dtype.size())
        .ok_or_else(|| FormatError::TooLarge {
            shape: Shape(shape.clone()),
        })?;
    let data = &bytes[header_end..];
    if data.len() < expected {
        return Err(FormatError::TruncatedData {
            shape: Shape(shape),
            dtype: dtype.name(),
            expected,
            got: data.len(),
        });
    }
    if data.len() > expected {
        return Err(FormatError::TrailingData {
            shape: Shape(shape),
            dtype: dtype.name(),
            extra: data.len() - expected,
        });
    }
    let fortran = header.fortran_order;
    let data = match dtype {
        Dtype::Bool => {
            let bytes = to_c_order(data.to_vec(), &shape, fortran);
            let bools = bytes
                .iter()
                .enumerate()
                .map(|(i, &b)| match b {
                    0 => Ok(false),
                    1 => Ok(true),
                    _ => Err(FormatError::BadBool {
                        index: unravel(i, &shape),
                        byte: b,
                    }),
                })
                .collect::<Result<Vec<bool>, _>>()?;
            ArrayData::Bool(bools)
        }
        Dtype::U8 => ArrayData::U8(to_c_order(data.to_vec(), &shape, fortran)),
        Dtype::F32 { big_endian } => {
            let values = data
                .chunks_exact(4)
                .map(|c| {
                    let b = [c[0], c[1], c[2], c[3]];
                    if big_endian {
                        f32::from_be_bytes(b)
                    } else {
                        f32::from_le_bytes(b)
                    }
                })
                .collect();
            ArrayData::F32(to_c_order(values, &shape, fortran))
        }
    };
    Ok(NdArray { shape, data })
}

/// Reorders Fortran-order (first index fastest) values into C order (last index fastest).
fn to_c_order<T: Copy>(values: Vec<T>, shape: &[usize], fortran: bool) -> Vec<T> {
    if !fortran || shape.len() < 2 || values.is_empty() {
        return values;
    }
    // Fortran strides: stride[k] = product of shape[..k].
    let mut strides = Vec::with_capacity(shape.len());
    let mut s = 1usize;
    for &d in shape {
        strides.push(s);
        s *= d; // bounded by values.len(), checked by the caller
    }
    let mut index = vec![0usize; shape.len()];
    let mut offset = 0usize;
    let mut out = Vec::with_capacity(values.len());
    for _ in 0..values.len() {
        out.push(values[offset]);
        // advance the C-order multi-index (last dimension fastest)
        for k in (0..shape.len()).rev() {
            index[k] += 1;
            offset += strides[k];
            if index[k] < shape[k] {
                break;
            }
            offset -= strides[k] * shape[k];
            index[k] = 0;
        }
    }
    out
}

/// The three entries of a `.npy` header.
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// A recursive-descent parser of the header dict; errors give the byte offset in the header.
struct HeaderParser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl HeaderParser<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> FormatError {
        FormatError::BadHeader(format!("at byte {} of the header dict: {msg}", self.pos))
    }

    fn skip_ws(&mut self) {
        while matches!(self.bytes.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), FormatError> {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(format_args!("expected '{}'", c as char)))
        }
    }

    fn string(&mut self) -> Result<String, FormatError> {
        self.skip_ws();
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(self.err("expected a quoted string")),
        };
        self.pos += 1;
        let start = self.pos;
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(b'\\') => return Err(self.err("escape sequences are not supported")),
                Some(c) if c == quote => break,
                Some(_) => self.pos += 1,
            }
        }
        // latin-1 (1.0, 2.0) or UTF-8 (3.0): keys and dtypes are ASCII; others show lossily
        let s = String::from_utf8_lossy(&self.bytes[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }

    fn int(&mut self) -> Result<usize, FormatError> {
        self.skip_ws();
        let start = self.pos;
        let mut value = 0usize;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add((c - b'0') as usize))
                .ok_or_else(|| self.err("dimension too large"))?;
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.err("expected a non-negative integer"));
        }
        if self.peek() == Some(b'L') {
            self.pos += 1; // Python 2 long literal, as very old NumPy wrote
        }
        Ok(value)
    }

    fn tuple(&mut self) -> Result<Vec<usize>, FormatError> {
        self.expect(b'(')?;
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            if self.peek() == Some(b')') {
                self.pos += 1;
                break;
            }
            items.push(self.int()?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b')') if items.len() > 1 => {}
                Some(b')') => {
                    return Err(self.err("a one-element shape needs a trailing comma: (n,)"))
                }
                _ => return Err(self.err("expected ',' or ')' in the shape")),
            }
        }
        Ok(items)
    }

    fn value(&mut self) -> Result<Value, FormatError> {
        self.skip_ws();
        let rest = &self.bytes[self.pos..];
        if rest.starts_with(b"True") {
            self.pos += 4;
            Ok(Value::Bool(true))
        } else if rest.starts_with(b"False") {
            self.pos += 5;
            Ok(Value::Bool(false))
        } else {
            match self.peek() {
                Some(b'\'' | b'"') => Ok(Value::Str(self.string()?)),
                Some(b'(') => Ok(Value::Tuple(self.tuple()?)),
                _ => Err(self.err("expected a string, True, False or a tuple")),
            }
        }
    }
}

fn parse_header(bytes: &[u8]) -> Result<Header, FormatError> {
    let mut p = HeaderParser { bytes, pos: 0 };
    let mut descr = None;
    let mut fortran_order = None;
    let mut shape = None;
    p.expect(b'{')?;
    loop {
        p.skip_ws();
        if p.peek() == Some(b'}') {
            p.pos += 1;
            break;
        }
        let key_pos = p.pos;
        let key = p.string()?;
        if !matches!(key.as_str(), "descr" | "fortran_order" | "shape") {
            p.pos = key_pos;
            return Err(p.err(format_args!("unexpected key {key:?}")));
        }
        p.expect(b':')?;
        p.skip_ws();
        if key == "descr" && p.peek() == Some(b'[') {
            return Err(FormatError::UnsupportedDtype {
                dtype: "(a structured dtype)".into(),
                supported: SUPPORTED,
            });
        }
        let value = p.value()?;
        let duplicate = match (key.as_str(), value) {
            ("descr", Value::Str(s)) => descr.replace(s).is_some(),
            ("fortran_order", Value::Bool(b)) => fortran_order.replace(b).is_some(),
            ("fortran_order", _) => return Err(p.err("fortran_order must be True or False")),
            (_, Value::Tuple(t)) if key == "shape" => shape.replace(t).is_some(),
            _ => return Err(p.err(format_args!("{key} has a value of the wrong type"))),
        };
        if duplicate {
            return Err(FormatError::BadHeader(format!(
                "at byte {key_pos} of the header dict: key {key:?} appears twice"
            )));
        }
        p.skip_ws();
        match p.peek() {
            Some(b',') => p.pos += 1,
            Some(b'}') => {}
            _ => return Err(p.err("expected ',' or '}'")),
        }
    }
    p.skip_ws();
    if p.pos != bytes.len() {
        return Err(p.err("unexpected text after the dict"));
    }
    let missing = |key: &str| FormatError::BadHeader(format!("the header dict has no {key:?} key"));
    Ok(Header {
        descr: descr.ok_or_else(|| missing("descr"))?,
        fortran_order: fortran_order.ok_or_else(|| missing("fortran_order"))?,
        shape: shape.ok_or_else(|| missing("shape"))?,
    })
}

/// Encodes an array as a `.npy` file (version 1.0, or 2.0 for a header over 64 KiB), C order,
/// with the dtype `|b1`, `|u1` or `<f4`, laid out exactly as `numpy.save` does.
pub fn encode_npy(array: &NdArray) -> Result<Vec<u8>, FormatError> {
    array.check_len()?;
    let descr = match array.data {
        ArrayData::Bool(_) => "|b1",
        ArrayData::U8(_) => "|u1",
        ArrayData::F32(_) => "<f4",
    };
    let shape = match array.shape.as_slice() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        dims => {
            let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // pad so that magic + version + length + header is a multiple of 64, ending in '\n'
    let padded = |len_size: usize| {
        let unpadded = 8 + len_size + dict.len() + 1;
        dict.len() + (64 - unpadded % 64) % 64 + 1
    };
    let (version, header_len) = match u16::try_from(padded(2)) {
        Ok(_) => (1u8, padded(2)),
        Err(_) => (2u8, padded(4)),
    };
    let len_field: Vec<u8> = if version == 1 {
        (header_len as u16).to_le_bytes().to_vec()
    } else {
        u32::try_from(header_len)
            .map_err(|_| FormatError::TooLarge {
                shape: Shape(array.shape.clone()),
            })?
            .to_le_bytes()
            .to_vec()
    };
    dict.extend(std::iter::repeat_n(' ', header_len - dict.len() - 1));
    dict.push('\n');
    let mut out = Vec::with_capacity(8 + len_field.len() + dict.len() + array.data.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    out.extend_from_slice(&len_field);
    out.extend_from_slice(dict.as_bytes());
    match &array.data {
        ArrayData::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        ArrayData::U8(v) => out.extend_from_slice(v),
        ArrayData::F32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_forms() {
        let h = parse_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }   \n")
            .unwrap();
        assert_eq!(
            (h.descr.as_str(), h.fortran_order, h.shape),
            ("<f4", false, vec![3, 4])
        );
        let h = parse_header(b"{\"shape\":(5,),\"fortran_order\":True,\"descr\":\"|u1\"}").unwrap();
        assert_eq!(h.shape, vec![5]);
        assert!(h.fortran_order);
        let h =
            parse_header(b"{'descr': '|b1', 'fortran_order': False, 'shape': (2L, 3L)}").unwrap();
        assert_eq!(h.shape, vec![2, 3]);
        assert_eq!(
            parse_header(b"{'descr':'|b1','fortran_order':False,'shape':()}")
                .unwrap()
                .shape,
            Vec::<usize>::new()
        );
    }

    #[test]
    fn header_errors() {
        let e = |h: &[u8]| match parse_header(h) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted {:?}", String::from_utf8_lossy(h)),
        };
        assert!(e(b"{'descr': '<f4', 'shape': (3,)}").contains("no \"fortran_order\" key"));
        assert!(
            e(b"{'descr': '<f4', 'fortran_order': False, 'shape': (3)}").contains("trailing comma")
        );
        assert!(e(b"{'descr': '<f4', 'fortran_order': 0, 'shape': (3,)}")
            .contains("expected a string, True"));
        assert!(
            e(b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': 'y'}")
                .contains("unexpected key \"x\"")
        );
        assert!(e(b"{'descr': '<f4', 'descr': '<f4'}").contains("appears twice"));
        assert_eq!(
            e(b"{'descr': '<f4'"),
            "bad header: at byte 15 of the header dict: expected ',' or '}'"
        );
        assert!(e(b"{'descr': 'abc").contains("unterminated string"));
        assert!(e(b"{'descr': 'a\\b'}").contains("escape sequences"));
        assert!(e(b"{'shape': (99999999999999999999999,)}").contains("dimension too large"));
        assert!(e(b"{} x").contains("unexpected text after the dict"));
    }

    #[test]
    fn fortran_to_c() {
        // the 2x3 matrix [[0,1,2],[3,4,5]] stored column-major is 0 3 1 4 2 5
        assert_eq!(
            to_c_order(vec![0, 3, 1, 4, 2, 5], &[2, 3], true),
            vec![0, 1, 2, 3, 4, 5]
        );
        // 2x2x2: element (i,j,k) = 4i+2j+k; Fortran offset = i + 2j + 4k
        let mut f = vec![0; 8];
        for i in 0..2 {
            for j in 0..2 {
                for k in 0..2 {
                    f[i + 2 * j + 4 * k] = 4 * i + 2 * j + k;
                }
            }
        }
        assert_eq!(to_c_order(f, &[2, 2, 2], true), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn encode_is_aligned_and_parses_back() {
        for shape in [vec![], vec![3], vec![2, 3], vec![1, 2, 1, 2]] {
            let n: usize = shape.iter().product();
            let a = NdArray::new(
                shape,
                ArrayData::F32((0..n).map(|i| i as f32 * 0.5).collect()),
            )
            .unwrap();
            let bytes = encode_npy(&a).unwrap();
            let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!((10 + header_len) % 64, 0);
            assert_eq!(bytes[10 + header_len - 1], b'\n');
            assert_eq!(parse_npy(&bytes).unwrap(), a);
        }
    }
}
