//! Helpers of the tests that run the `sparse-train` binary.

#![allow(dead_code)] // each test binary uses its share

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use runtime::EpochMetrics;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `sparse-train` in the repository's root with warnings-only logging.
pub fn sparse_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparse-train"))
        .args(args)
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .output()
        .expect("sparse-train runs")
}

/// Runs `sparse-train`, asserts it succeeded; its stdout and stderr.
pub fn ok(args: &[&str]) -> String {
    let out = sparse_train(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "sparse-train {args:?} failed:\n{text}"
    );
    text
}

/// The epochs of a `--metrics-out` file.
pub fn metrics(path: &Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
        .collect()
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
