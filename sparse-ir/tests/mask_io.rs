//! Mask and tensor files: the fixtures written by NumPy and safetensors
//! (`tests/fixtures/make_fixtures.py`) load to the expected patterns, writes read back, and
//! every kind of bad input gives an error naming the file and the problem.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use sparse_ir::mask_io::{
    encode_npy, encode_safetensors, expect_shape, parse_npy, parse_safetensors, read_array,
    read_f32_tensor, read_mask, read_npy, read_safetensors, read_safetensors_all, write_f32_npy,
    write_mask_npy, write_mask_safetensors, write_npy, write_safetensors, write_safetensors_f32,
    ArrayData, FormatError, MaskIoError, NdArray,
};
use sparse_ir::Pattern;

/// The 3x4 mask of the fixtures (row 1 empty).
const MASK_3X4: [u8; 12] = [1, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 1];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("mask_io")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mask_3x4() -> Pattern {
    Pattern::from_dense_mask(3, 4, &MASK_3X4).unwrap()
}

/// The fixtures' conv mask, `[2, 3, 2, 2]`: 1 where `(7o + 3i + 2y + x) % 3 == 0`.
fn conv_values() -> Vec<u8> {
    let mut v = Vec::new();
    for o in 0..2 {
        for i in 0..3 {
            for y in 0..2 {
                for x in 0..2 {
                    v.push(u8::from((7 * o + 3 * i + 2 * y + x) % 3 == 0));
                }
            }
        }
    }
    v
}

fn conv_pattern() -> Pattern {
    Pattern::from_dense_mask(2, 12, &conv_values()).unwrap()
}

fn weight_3x4() -> Vec<f32> {
    (0..12).map(|i| (i as f32 - 5.5) * 0.25).collect()
}

/// Asserts that `err` names `path` first and contains every one of `parts`.
#[track_caller]
fn assert_names(err: &MaskIoError, path: &Path, parts: &[&str]) {
    let msg = err.to_string();
    let prefix = format!("{}: ", path.display());
    assert!(
        msg.starts_with(&prefix),
        "{msg:?} does not start with {prefix:?}"
    );
    assert_eq!(err.path(), path);
    for part in parts {
        assert!(msg.contains(part), "{msg:?} does not contain {part:?}");
    }
}

// ---------------------------------------------------------------- fixtures

#[test]
fn npy_fixtures_load_to_the_3x4_mask() {
    for (file, dtype) in [
        ("mask_bool_3x4.npy", "bool"),
        ("mask_u8_3x4.npy", "uint8"),
        ("mask_f32_3x4.npy", "float32"),
        ("mask_u8_3x4_v2.npy", "uint8"),
        ("mask_u8_3x4_v3.npy", "uint8"),
        ("mask_u8_fortran_3x4.npy", "uint8"),
    ] {
        let path = fixture(file);
        let mask = read_mask(&path, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mask.pattern, mask_3x4(), "{file}");
        assert_eq!(mask.shape, vec![3, 4], "{file}");
        assert_eq!(mask.tensor, None);
        assert_eq!(mask.path, path);
        mask.expect_shape("fc1", &[3, 4]).unwrap();
        assert_eq!(read_npy(&path).unwrap().data.dtype_name(), dtype, "{file}");
    }
}

#[test]
fn npy_conv_fixtures_flatten_row_major() {
    for file in [
        "mask_bool_conv_2x3x2x2.npy",
        "mask_f32_fortran_conv_2x3x2x2.npy",
    ] {
        let mask = read_mask(fixture(file), None).unwrap();
        assert_eq!(mask.shape, vec![2, 3, 2, 2], "{file}");
        assert_eq!(mask.pattern, conv_pattern(), "{file}");
        assert_eq!((mask.pattern.rows(), mask.pattern.cols()), (2, 12));
    }
    // the Fortran-order file holds the same values as the C-order one
    let c = read_npy(fixture("mask_bool_conv_2x3x2x2.npy")).unwrap();
    let f = read_npy(fixture("mask_f32_fortran_conv_2x3x2x2.npy")).unwrap();
    let ArrayData::F32(fv) = f.data else {
        panic!("not f32")
    };
    let ArrayData::Bool(cv) = c.data else {
        panic!("not bool")
    };
    assert_eq!(fv, cv.iter().map(|&b| b as u8 as f32).collect::<Vec<_>>());
}

#[test]
fn dense_f32_fixtures_load() {
    for file in ["weight_f32_3x4.npy", "weight_f32_be_3x4.npy"] {
        let t = read_f32_tensor(fixture(file), None).unwrap();
        assert_eq!(t.shape, vec![3, 4], "{file}");
        assert_eq!(t.data, weight_3x4(), "{file}");
    }
    let path = fixture("model.safetensors");
    let w = read_f32_tensor(&path, Some("fc1.weight")).unwrap();
    assert_eq!((w.shape, w.data), (vec![3, 4], weight_3x4()));
    let b = read_f32_tensor(&path, Some("fc1.bias")).unwrap();
    assert_eq!((b.shape, b.data), (vec![3], vec![0.5, -1.0, 2.25]));
}

#[test]
fn pytorch_save_file_one_liner_loads() {
    // safetensors.torch.save_file({"fc1.mask": m}, "fc1_mask.safetensors"), m a bool tensor
    let path = fixture("fc1_mask.safetensors");
    let mask = read_mask(&path, Some("fc1.mask")).unwrap();
    assert_eq!(mask.pattern, mask_3x4());
    assert_eq!(mask.tensor.as_deref(), Some("fc1.mask"));
    // a file with one tensor needs no name
    assert_eq!(read_mask(&path, None).unwrap().pattern, mask_3x4());
    // and our writer produces the very same bytes
    let bools = NdArray::new(
        vec![3, 4],
        ArrayData::Bool(MASK_3X4.iter().map(|&v| v == 1).collect()),
    )
    .unwrap();
    let ours = encode_safetensors(&[("fc1.mask", &bools)]).unwrap();
    assert_eq!(ours, std::fs::read(&path).unwrap());
}

#[test]
fn our_npy_bytes_equal_numpys() {
    let u8s = NdArray::new(vec![3, 4], ArrayData::U8(MASK_3X4.to_vec())).unwrap();
    assert_eq!(
        encode_npy(&u8s).unwrap(),
        std::fs::read(fixture("mask_u8_3x4.npy")).unwrap()
    );
    let w = NdArray::new(vec![3, 4], ArrayData::F32(weight_3x4())).unwrap();
    assert_eq!(
        encode_npy(&w).unwrap(),
        std::fs::read(fixture("weight_f32_3x4.npy")).unwrap()
    );
}

#[test]
fn safetensors_with_several_tensors() {
    let path = fixture("model.safetensors");
    let fc1 = read_mask(&path, Some("fc1.mask")).unwrap();
    assert_eq!(fc1.pattern, mask_3x4());
    let fc2 = read_mask(&path, Some("fc2.mask")).unwrap();
    let fc2_want: Vec<u8> = [&MASK_3X4[0..3], &MASK_3X4[4..7]].concat();
    assert_eq!(
        fc2.pattern,
        Pattern::from_dense_mask(2, 3, &fc2_want).unwrap()
    );
    assert!(matches!(
        read_safetensors(&path, "fc2.mask").unwrap().data,
        ArrayData::U8(_)
    ));
    let conv = read_mask(&path, Some("conv1.mask")).unwrap();
    assert_eq!(conv.shape, vec![2, 3, 2, 2]);
    assert_eq!(conv.pattern, conv_pattern());
    conv.expect_shape("conv1", &[2, 3, 2, 2]).unwrap();
    assert!(matches!(
        read_safetensors(&path, "fc1.mask").unwrap().data,
        ArrayData::Bool(_)
    ));

    // no name, several tensors: the error lists them
    let e = read_mask(&path, None).unwrap_err();
    assert_names(
        &e,
        &path,
        &[
            "holds 6 tensors",
            "\"conv1.mask\", \"fc1.bias\", \"fc1.float64\", \"fc1.mask\", \"fc1.weight\", \"fc2.mask\"",
            "name the one to read",
        ],
    );
    // a missing name: the error lists what is there
    let e = read_mask(&path, Some("fc3.mask")).unwrap_err();
    assert_names(
        &e,
        &path,
        &[
            "tensor \"fc3.mask\" not found",
            "\"fc1.mask\", \"fc1.weight\"",
        ],
    );
    // an unsupported dtype, named, in the tensor named
    let e = read_mask(&path, Some("fc1.float64")).unwrap_err();
    assert_names(
        &e,
        &path,
        &[
            "tensor \"fc1.float64\"",
            "unsupported dtype F64",
            "BOOL, U8, F32",
        ],
    );
    let e = read_safetensors_all(&path).unwrap_err();
    assert_names(&e, &path, &["fc1.float64", "unsupported dtype F64"]);
    // a weight is not a mask: the first value other than 0/1 is named with its position
    let e = read_mask(&path, Some("fc1.weight")).unwrap_err();
    assert_names(
        &e,
        &path,
        &[
            "tensor \"fc1.weight\"",
            "mask value at [0, 0] is -1.375, expected 0 or 1",
        ],
    );
    // and a mask is not an f32 tensor
    let e = read_f32_tensor(&path, Some("fc2.mask")).unwrap_err();
    assert_names(&e, &path, &["fc2.mask", "dtype is uint8, expected float32"]);
}

// ---------------------------------------------------------------- round trips

#[test]
fn masks_round_trip_through_both_formats() {
    let dir = scratch("masks_round_trip");
    let fc = mask_3x4();
    let conv = conv_pattern();
    let npy = dir.join("fc1.npy");
    write_mask_npy(&npy, &fc, &[3, 4]).unwrap();
    let back = read_mask(&npy, None).unwrap();
    assert_eq!((back.pattern, back.shape), (fc.clone(), vec![3, 4]));
    let npy_conv = dir.join("conv1.npy");
    write_mask_npy(&npy_conv, &conv, &[2, 3, 2, 2]).unwrap();
    let back = read_mask(&npy_conv, None).unwrap();
    assert_eq!((back.pattern, back.shape), (conv.clone(), vec![2, 3, 2, 2]));
    // masks are written as u8, like a checkpoint's NAME.mask
    assert!(matches!(read_npy(&npy).unwrap().data, ArrayData::U8(_)));

    let st = dir.join("masks.safetensors");
    write_mask_safetensors(
        &st,
        &[
            ("fc1.mask", &fc, &[3, 4]),
            ("conv1.mask", &conv, &[2, 3, 2, 2]),
        ],
    )
    .unwrap();
    assert_eq!(read_mask(&st, Some("fc1.mask")).unwrap().pattern, fc);
    let back = read_mask(&st, Some("conv1.mask")).unwrap();
    assert_eq!((back.pattern, back.shape), (conv, vec![2, 3, 2, 2]));
    assert!(matches!(
        read_safetensors(&st, "fc1.mask").unwrap().data,
        ArrayData::U8(_)
    ));
}

#[test]
fn f32_tensors_and_arrays_round_trip() {
    let dir = scratch("f32_round_trip");
    let st = dir.join("model.safetensors");
    let w = weight_3x4();
    let bias = [1.5f32, -0.0, f32::MIN_POSITIVE];
    write_safetensors_f32(
        &st,
        &[("fc1.weight", &[3, 4], &w), ("fc1.bias", &[3], &bias)],
    )
    .unwrap();
    assert_eq!(read_f32_tensor(&st, Some("fc1.weight")).unwrap().data, w);
    let b = read_f32_tensor(&st, Some("fc1.bias")).unwrap();
    assert_eq!(
        b.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        bias.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let all = read_safetensors_all(&st).unwrap();
    assert_eq!(
        all.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["fc1.bias", "fc1.weight"]
    );

    let npy = dir.join("w.npy");
    write_f32_npy(&npy, &[3, 4], &w).unwrap();
    assert_eq!(read_f32_tensor(&npy, None).unwrap().data, w);

    // every dtype and rank, including a scalar and an empty array, through write_npy
    let arrays = [
        NdArray::new(vec![], ArrayData::F32(vec![3.5])).unwrap(),
        NdArray::new(vec![0, 5], ArrayData::U8(vec![])).unwrap(),
        NdArray::new(
            vec![2, 1, 3],
            ArrayData::Bool(vec![true, false, true, true, false, false]),
        )
        .unwrap(),
        NdArray::new(vec![7], ArrayData::U8((0..7).collect())).unwrap(),
    ];
    for (i, a) in arrays.iter().enumerate() {
        let p = dir.join(format!("a{i}.npy"));
        write_npy(&p, a).unwrap();
        assert_eq!(&read_npy(&p).unwrap(), a);
        let (back, name) = read_array(&p, Some("ignored for npy")).unwrap();
        assert_eq!((&back, name), (a, None));
    }
    let st2 = dir.join("arrays.safetensors");
    let named: Vec<(String, &NdArray)> = arrays
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("t{i}"), a))
        .collect();
    let named_ref: Vec<(&str, &NdArray)> = named.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    write_safetensors(&st2, &named_ref).unwrap();
    for (name, a) in &named {
        assert_eq!(&read_safetensors(&st2, name).unwrap(), *a);
    }
}

fn arb_mask() -> impl Strategy<Value = (Vec<usize>, Vec<u8>)> {
    prop_oneof![
        (1usize..9, 1usize..9).prop_map(|(r, c)| vec![r, c]),
        (1usize..4, 1usize..4, 1usize..4, 1usize..4).prop_map(|(a, b, c, d)| vec![a, b, c, d]),
    ]
    .prop_flat_map(|shape| {
        let n = shape.iter().product::<usize>();
        (Just(shape), proptest::collection::vec(0u8..=1, n))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_masks_round_trip((shape, values) in arb_mask(), f32_data in any::<bool>()) {
        let rows = shape[0];
        let cols = values.len() / rows;
        let pattern = Pattern::from_dense_mask(rows, cols, &values).unwrap();
        let array = NdArray::from_pattern(&pattern, &shape).unwrap();
        prop_assert_eq!(&array.data, &ArrayData::U8(values.clone()));
        let npy = parse_npy(&encode_npy(&array).unwrap()).unwrap();
        prop_assert_eq!(npy.to_pattern().unwrap(), pattern.clone());
        let floats = NdArray::new(
            shape.clone(),
            ArrayData::F32(values.iter().map(|&v| v as f32).collect()),
        ).unwrap();
        let stored = if f32_data { &floats } else { &array };
        let bytes = encode_safetensors(&[("m", stored), ("other", &floats)]).unwrap();
        let st = parse_safetensors(&bytes, "m").unwrap();
        prop_assert_eq!(&st, stored);
        prop_assert_eq!(st.to_pattern().unwrap(), pattern);
    }
}

// ---------------------------------------------------------------- bad input

/// Writes `bytes` to `dir/name` and returns the path.
fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn good_npy() -> Vec<u8> {
    std::fs::read(fixture("mask_u8_3x4.npy")).unwrap()
}

#[test]
fn missing_file() {
    let p = fixture("no_such_mask.npy");
    assert_names(&read_mask(&p, None).unwrap_err(), &p, &["no such file"]);
    let p = fixture("no_such.safetensors");
    assert_names(
        &read_f32_tensor(&p, Some("w")).unwrap_err(),
        &p,
        &["no such file"],
    );
}

#[test]
fn npy_wrong_magic_version_and_truncation() {
    let dir = scratch("npy_structure");
    let good = good_npy();
    assert_eq!(good.len(), 140); // 128 header bytes + 12 data bytes

    let mut bad = good.clone();
    bad[1..6].copy_from_slice(b"NUMPX");
    let p = put(&dir, "magic.npy", &bad);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["wrong magic", "\\x93NUMPX"],
    );
    let p = put(&dir, "text.npy", b"hello world, not an array");
    assert_names(&read_npy(&p).unwrap_err(), &p, &["wrong magic", "\"hello "]);

    let mut bad = good.clone();
    bad[6] = 4;
    let p = put(&dir, "version.npy", &bad);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["unsupported .npy format version 4.0"],
    );

    for (cut, what) in [
        (0, "needs 10 bytes, the file has 0"),
        (7, "needs 10 bytes"),
        (9, "needs 10 bytes"),
        (64, "needs 128 bytes, the file has 64"),
    ] {
        let p = put(&dir, &format!("header{cut}.npy"), &good[..cut]);
        assert_names(
            &read_mask(&p, None).unwrap_err(),
            &p,
            &["truncated header", what],
        );
    }
    let p = put(&dir, "data.npy", &good[..135]);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &[
            "truncated data",
            "shape 3x4 of uint8 needs 12 bytes, the file has 7",
        ],
    );
    let mut long = good.clone();
    long.extend_from_slice(&[0, 0, 0]);
    let p = put(&dir, "long.npy", &long);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["3 unexpected bytes after the data"],
    );
}

/// `good` with its header dict text replaced (padded to the same length).
fn with_header(dict: &str) -> Vec<u8> {
    let good = good_npy();
    let mut header = dict.as_bytes().to_vec();
    assert!(header.len() <= 117, "header too long for the fixture");
    header.resize(117, b' ');
    header.push(b'\n');
    [&good[..10], &header[..], &good[128..]].concat()
}

#[test]
fn npy_bad_header_dict() {
    let dir = scratch("npy_header");
    for (i, (dict, what)) in [
        (
            "{'descr': '|u1', 'fortran_order': False}",
            "no \"shape\" key",
        ),
        (
            "{'descr': '|u1', 'fortran_order': False, 'shape': (3, 4), 'x': 1}",
            "unexpected key \"x\"",
        ),
        (
            "{'descr': '|u1', 'fortran_order': 'no', 'shape': (3, 4)}",
            "fortran_order must be True or False",
        ),
        (
            "{'descr': '|u1', 'fortran_order': False, 'shape': [3, 4]}",
            "expected a string, True, False or a tuple",
        ),
        (
            "{'descr': '|u1', 'fortran_order': False, 'shape': (3, -4)}",
            "expected a non-negative integer",
        ),
        (
            "['descr', '|u1']",
            "at byte 0 of the header dict: expected '{'",
        ),
        (
            "{'descr': '|u1' 'fortran_order': False}",
            "expected ',' or '}'",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let p = put(&dir, &format!("h{i}.npy"), &with_header(dict));
        assert_names(&read_mask(&p, None).unwrap_err(), &p, &["bad header", what]);
    }
    let structured = "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3, 4)}";
    let p = put(&dir, "structured.npy", &with_header(structured));
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["unsupported dtype (a structured dtype)"],
    );
}

#[test]
fn npy_unsupported_dtype_rank_and_values() {
    let dir = scratch("npy_content");
    // float64, from numpy
    let p = fixture("mask_f64_3x4.npy");
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &[
            "unsupported dtype \"<f8\"",
            "'|b1' bool, '|u1' uint8, '<f4' float32",
        ],
    );
    // int32, by editing the header
    let p = put(
        &dir,
        "i4.npy",
        &with_header("{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }"),
    );
    assert_names(
        &read_npy(&p).unwrap_err(),
        &p,
        &["unsupported dtype \"<i4\""],
    );

    // 3-D, 1-D and 0-D masks: wrong rank
    for (i, shape) in [vec![2usize, 2, 3], vec![12], vec![]]
        .into_iter()
        .enumerate()
    {
        let n = shape.iter().product();
        let a = NdArray::new(shape.clone(), ArrayData::U8(vec![1; n])).unwrap();
        let p = put(&dir, &format!("rank{i}.npy"), &encode_npy(&a).unwrap());
        let e = read_mask(&p, None).unwrap_err();
        assert_names(
            &e,
            &p,
            &["wrong rank", &format!("this one is {}-D", shape.len())],
        );
    }
    let p = put(
        &dir,
        "rank3.npy",
        &encode_npy(&NdArray::new(vec![2, 2, 3], ArrayData::U8(vec![1; 12])).unwrap()).unwrap(),
    );
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["3-D with shape 2x2x3"],
    );

    // an empty dimension
    let a = NdArray::new(vec![0, 4], ArrayData::U8(vec![])).unwrap();
    let p = put(&dir, "empty.npy", &encode_npy(&a).unwrap());
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["mask shape 0x4 has an empty dimension"],
    );

    // a value 2 in a u8 mask, 0.5 in an f32 conv mask, byte 2 in a bool mask
    let mut bad = good_npy();
    bad[128 + 6] = 2; // row 1, column 2
    let p = put(&dir, "two.npy", &bad);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["mask value at [1, 2] is 2, expected 0 or 1"],
    );
    let mut values: Vec<f32> = conv_values().iter().map(|&v| v as f32).collect();
    values[15] = 0.5; // [1, 0, 1, 1] = 12 + 2 + 1
    let a = NdArray::new(vec![2, 3, 2, 2], ArrayData::F32(values)).unwrap();
    let p = put(&dir, "half.npy", &encode_npy(&a).unwrap());
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["mask value at [1, 0, 1, 1] is 0.5"],
    );
    let mut bad = std::fs::read(fixture("mask_bool_3x4.npy")).unwrap();
    bad[128 + 11] = 2;
    let p = put(&dir, "bool.npy", &bad);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["bool value at [2, 3] is stored as byte 2"],
    );
    // a NaN is not 0 or 1 either
    let nan = NdArray::new(vec![1, 2], ArrayData::F32(vec![1.0, f32::NAN])).unwrap();
    let p = put(&dir, "nan.npy", &encode_npy(&nan).unwrap());
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["mask value at [0, 1] is NaN"],
    );
}

#[test]
fn fortran_order_value_errors_use_the_logical_position() {
    let dir = scratch("npy_fortran_value");
    // the Fortran fixture with one data byte set to 2: stored column-major, byte k holds
    // element (k % 3, k / 3); byte 7 is element [1, 2]
    let mut bad = std::fs::read(fixture("mask_u8_fortran_3x4.npy")).unwrap();
    bad[128 + 7] = 2;
    let p = put(&dir, "f.npy", &bad);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["mask value at [1, 2] is 2"],
    );
}

fn st_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    [
        &(header.len() as u64).to_le_bytes()[..],
        header.as_bytes(),
        data,
    ]
    .concat()
}

#[test]
fn safetensors_bad_input() {
    let dir = scratch("st_bad");
    let good = std::fs::read(fixture("fc1_mask.safetensors")).unwrap();
    let n = good.len();

    let p = put(&dir, "short.safetensors", &good[..5]);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["truncated header", "needs 8 bytes, the file has 5"],
    );
    let p = put(&dir, "cut_header.safetensors", &good[..40]);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["truncated header", "the file has 40"],
    );
    let p = put(&dir, "cut_data.safetensors", &good[..n - 3]);
    let e = read_mask(&p, Some("fc1.mask")).unwrap_err();
    assert_names(
        &e,
        &p,
        &[
            "tensor \"fc1.mask\"",
            "data offset 12 lies beyond the 9 data bytes",
        ],
    );
    let mut long = good.clone();
    long.push(0);
    let p = put(&dir, "long.safetensors", &long);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["invalid safetensors file", "incomplete metadata"],
    );
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = put(&dir, "huge.safetensors", &huge);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["truncated header", "needs 18446744073709551615 bytes"],
    );

    let p = put(&dir, "json.safetensors", &st_bytes("{\"a\": ", &[]));
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["bad header", "not a JSON object"],
    );
    let mut not_utf8 = st_bytes("{\"m\"", &[]);
    not_utf8[9] = 0xff;
    let p = put(&dir, "utf8.safetensors", &not_utf8);
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["bad header", "not UTF-8"],
    );
    let p = put(
        &dir,
        "dtype.safetensors",
        &st_bytes(
            r#"{"m":{"dtype":"F128","shape":[1,1],"data_offsets":[0,16]}}"#,
            &[0; 16],
        ),
    );
    assert_names(
        &read_mask(&p, Some("m")).unwrap_err(),
        &p,
        &["invalid safetensors file", "F128"],
    );
    let p = put(
        &dir,
        "overflow.safetensors",
        &st_bytes(
            r#"{"m":{"dtype":"U8","shape":[1,1],"data_offsets":[0,18446744073709551615]}}"#,
            &[1],
        ),
    );
    assert_names(
        &read_mask(&p, Some("m")).unwrap_err(),
        &p,
        &["data offset 18446744073709551615 lies beyond the 1 data bytes"],
    );
    let p = put(
        &dir,
        "size.safetensors",
        &st_bytes(
            r#"{"m":{"dtype":"U8","shape":[2,2],"data_offsets":[0,3]}}"#,
            &[1, 0, 1],
        ),
    );
    assert_names(
        &read_mask(&p, Some("m")).unwrap_err(),
        &p,
        &["invalid safetensors file"],
    );

    // the content of a well-formed file
    let p = put(
        &dir,
        "f64.safetensors",
        &st_bytes(
            r#"{"m":{"dtype":"F64","shape":[1,1],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    );
    assert_names(
        &read_mask(&p, Some("m")).unwrap_err(),
        &p,
        &["tensor \"m\"", "unsupported dtype F64"],
    );
    let p = put(
        &dir,
        "rank.safetensors",
        &st_bytes(
            r#"{"m":{"dtype":"U8","shape":[2,1,2],"data_offsets":[0,4]}}"#,
            &[1, 0, 1, 1],
        ),
    );
    assert_names(
        &read_mask(&p, Some("m")).unwrap_err(),
        &p,
        &["tensor \"m\"", "wrong rank", "3-D with shape 2x1x2"],
    );
    let p = put(
        &dir,
        "two.safetensors",
        &st_bytes(
            r#"{"m":{"dtype":"U8","shape":[2,2],"data_offsets":[0,4]}}"#,
            &[1, 0, 2, 1],
        ),
    );
    assert_names(
        &read_mask(&p, Some("m")).unwrap_err(),
        &p,
        &["tensor \"m\"", "mask value at [1, 0] is 2"],
    );
    let p = put(
        &dir,
        "bool.safetensors",
        &st_bytes(
            r#"{"m":{"dtype":"BOOL","shape":[2,2],"data_offsets":[0,4]}}"#,
            &[1, 0, 7, 1],
        ),
    );
    assert_names(
        &read_mask(&p, Some("m")).unwrap_err(),
        &p,
        &["tensor \"m\"", "bool value at [1, 0] is stored as byte 7"],
    );
    let p = put(&dir, "none.safetensors", &st_bytes("{}", &[]));
    assert_names(
        &read_mask(&p, None).unwrap_err(),
        &p,
        &["holds 0 tensors (none)"],
    );
}

#[test]
fn shape_mismatch_names_file_and_layer() {
    let dir = scratch("shape");
    let p = dir.join("fc1.npy");
    let pattern = Pattern::from_dense_mask(300, 700, &vec![1u8; 300 * 700]).unwrap();
    write_mask_npy(&p, &pattern, &[300, 700]).unwrap();
    let mask = read_mask(&p, None).unwrap();
    let e = mask.expect_shape("fc1", &[300, 784]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: fc1: mask has shape 300x700, layer is 300x784",
            p.display()
        )
    );
    let e = expect_shape("m.safetensors", "conv1", &[6, 1, 5, 5], &[6, 3, 5, 5]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "m.safetensors: conv1: mask has shape 6x1x5x5, layer is 6x3x5x5"
    );
    // the same flattening is not the same shape
    let e = expect_shape("m.npy", "conv1", &[6, 25], &[6, 1, 5, 5]).unwrap_err();
    assert!(matches!(e, MaskIoError::ShapeMismatch { .. }));
}

#[test]
fn bad_writes_are_errors() {
    let dir = scratch("bad_writes");
    let p = dir.join("m.npy");
    let e = write_mask_npy(&p, &mask_3x4(), &[4, 3]).unwrap_err();
    assert_names(&e, &p, &["shape 4x3 does not hold a 3x4 pattern"]);
    let e = write_mask_npy(&p, &mask_3x4(), &[3, 2, 3]).unwrap_err();
    assert_names(&e, &p, &["wrong rank"]);
    let e = write_mask_npy(&p, &Pattern::empty(0, 4).unwrap(), &[0, 4]).unwrap_err();
    assert_names(&e, &p, &["empty dimension"]);
    assert!(!p.exists());
    let p = dir.join("m.safetensors");
    let fc = mask_3x4();
    let e = write_mask_safetensors(&p, &[("a", &fc, &[3, 4]), ("a", &fc, &[3, 4])]).unwrap_err();
    assert_names(&e, &p, &["tensor name \"a\" appears more than once"]);
    let e = write_safetensors_f32(&p, &[("w", &[2, 2], &[1.0, 2.0, 3.0])]).unwrap_err();
    assert_names(
        &e,
        &p,
        &["tensor \"w\"", "shape 2x2 needs 4 values, the array has 3"],
    );
    let e = write_f32_npy(&p, &[usize::MAX, 2], &[]).unwrap_err();
    assert_names(&e, &p, &["too large"]);
    let inconsistent = NdArray {
        shape: vec![5],
        data: ArrayData::U8(vec![1]),
    };
    assert!(matches!(
        encode_npy(&inconsistent),
        Err(FormatError::DataLength { .. })
    ));
    let e = write_npy(
        dir.join("no/such/dir/x.npy"),
        &NdArray::new(vec![1], ArrayData::U8(vec![1])).unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cannot write"), "{e}");
    assert!(!p.exists());
}

#[test]
fn parse_errors_are_values_not_panics() {
    // a few hostile headers straight at the byte parsers
    let huge = with_header(
        "{'descr': '<f4', 'fortran_order': True, 'shape': (4294967296, 4294967296, 16)}",
    );
    assert!(matches!(
        parse_npy(&huge),
        Err(FormatError::TooLarge { .. })
    ));
    let big = with_header("{'descr': '<f4', 'fortran_order': True, 'shape': (100000, 100000)}");
    assert!(matches!(
        parse_npy(&big),
        Err(FormatError::TruncatedData { .. })
    ));
    let mut v2 = good_npy();
    v2[6] = 2;
    v2[8..10].copy_from_slice(&[0xff, 0xff]); // u32 header length 0x????ffff: far past the end
    assert!(matches!(
        parse_npy(&v2),
        Err(FormatError::TruncatedHeader { .. })
    ));
    assert!(matches!(
        parse_safetensors(&[], "m"),
        Err(FormatError::TruncatedHeader { .. })
    ));
}
