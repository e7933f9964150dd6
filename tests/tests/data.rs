//! The vendored test data is intact: the MNIST files match `data/mnist/SHA256SUMS`, and the
//! seven golden sparse-momentum cases exist and hold the documented fields
//! (`data/golden/sparse-momentum/README.md`).

use std::path::PathBuf;

use serde_json::Value;
use sha2::{Digest, Sha256};

fn repo_root() -> PathBuf {
    // this crate lives in `<root>/tests`
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate has a parent folder")
        .to_path_buf();
    assert!(
        root.join("data").is_dir(),
        "{}: no data/ folder",
        root.display()
    );
    root
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn mnist_files_match_their_sha256_sums() {
    let dir = repo_root().join("data/mnist");
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join("SHA256SUMS").display()));
    let mut files = Vec::new();
    for (n, line) in sums
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        // `sha256sum` format: 64 hex digits, two spaces (or " *" for binary mode), file name
        let (sum, name) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("SHA256SUMS line {}: {line:?}", n + 1));
        let name = name.trim_start_matches([' ', '*']);
        assert_eq!(sum.len(), 64, "SHA256SUMS line {}: {line:?}", n + 1);
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let got = hex(&Sha256::digest(&bytes));
        assert_eq!(
            got,
            sum.to_ascii_lowercase(),
            "{}: sha256 mismatch",
            path.display()
        );
        files.push(name.to_string());
    }
    files.sort();
    assert_eq!(
        files,
        [
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
        ],
        "SHA256SUMS must cover the four MNIST files"
    );
}

#[test]
fn sha256_is_the_standard_one() {
    // FIPS 180-2 test vector, so a passing checksum test means what it says
    assert_eq!(
        hex(&Sha256::digest(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

const GOLDEN_CASES: [&str; 7] = [
    "a_density030_basic",
    "b_density010_zero_momentum",
    "c_dense_layer_rule",
    "d_overflow",
    "e_dense_low_score_and_overflow",
    "f_fully_dense_layer",
    "g_chained_after_a",
];

#[track_caller]
fn field<'a>(v: &'a Value, key: &str, file: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("{file}: missing field {key:?}"))
}

#[track_caller]
fn number(v: &Value, key: &str, file: &str) -> f64 {
    field(v, key, file)
        .as_f64()
        .unwrap_or_else(|| panic!("{file}: {key:?} is not a number"))
}

#[track_caller]
fn list<'a>(v: &'a Value, key: &str, file: &str) -> &'a Vec<Value> {
    field(v, key, file)
        .as_array()
        .unwrap_or_else(|| panic!("{file}: {key:?} is not a list"))
}

#[test]
fn golden_sparse_momentum_cases_parse_with_their_fields() {
    let dir = repo_root().join("data/golden/sparse-momentum");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    found.sort();
    let expected: Vec<String> = GOLDEN_CASES.iter().map(|c| format!("{c}.json")).collect();
    assert_eq!(found, expected);

    for case in GOLDEN_CASES {
        let path = dir.join(format!("{case}.json"));
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let top: Vec<&str> = v
            .as_object()
            .unwrap_or_else(|| panic!("{file}: not a JSON object"))
            .keys()
            .map(String::as_str)
            .collect();
        for key in ["meta", "case", "description", "inputs", "outputs"] {
            assert!(
                top.contains(&key),
                "{file}: missing top-level field {key:?}"
            );
        }
        assert_eq!(
            field(&v, "case", &file).as_str(),
            Some(case),
            "{file}: case id"
        );
        assert!(field(&v, "meta", &file).is_object(), "{file}: meta");

        let inputs = field(&v, "inputs", &file);
        for key in [
            "density",
            "prune_rate",
            "baseline_nonzero",
            "adjusted_growth",
        ] {
            number(inputs, key, &file);
        }
        list(inputs, "adjustments", &file);
        let layers = list(inputs, "layers", &file);
        let names: Vec<&str> = layers
            .iter()
            .map(|l| field(l, "name", &file).as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            ["fc1.weight", "fc2.weight", "fc3.weight"],
            "{file}: layer order"
        );
        for layer in layers {
            let shape: Vec<u64> = list(layer, "shape", &file)
                .iter()
                .map(|d| d.as_u64().expect("shape entries are integers"))
                .collect();
            assert_eq!(shape.len(), 2, "{file}: shape");
            let numel = (shape[0] * shape[1]) as usize;
            for key in ["weight", "mask", "momentum"] {
                assert_eq!(list(layer, key, &file).len(), numel, "{file}: {key} length");
            }
            assert!(
                list(layer, "mask", &file)
                    .iter()
                    .all(|m| m.as_u64() == Some(0) || m.as_u64() == Some(1)),
                "{file}: mask values are 0/1"
            );
        }

        let outputs = field(&v, "outputs", &file);
        for key in [
            "total_variance",
            "total_removed",
            "total_nonzero_before",
            "total_nonzero_after",
            "redistribution_iterations",
            "redistribution_final_residual",
            "adjusted_growth",
        ] {
            number(outputs, key, &file);
        }
        list(outputs, "redistribution_trace", &file);
        assert_eq!(
            list(outputs, "adjustments", &file).len(),
            list(inputs, "adjustments", &file).len() + 1,
            "{file}: one new adjustments entry"
        );
        let out_layers = list(outputs, "layers", &file);
        assert_eq!(out_layers.len(), 3, "{file}: output layers");
        for (layer, input) in out_layers.iter().zip(layers) {
            let numel = list(input, "mask", &file).len();
            assert_eq!(
                list(layer, "mask", &file).len(),
                numel,
                "{file}: final mask"
            );
            assert_eq!(
                list(layer, "weight", &file).len(),
                numel,
                "{file}: final weight"
            );
            for key in [
                "nonzeros_before",
                "nonzeros_after",
                "raw_score",
                "score",
                "prune_rate",
            ] {
                number(layer, key, &file);
            }
        }
    }
}
