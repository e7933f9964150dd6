//! Compile-fail tests of `sparse_kernel!`: every bad input is a compile error pointing at the
//! offending token. Expected messages are in `tests/ui/*.stderr`; to update them after an
//! intended change run `TRYBUILD=overwrite cargo test -p macros --test compile_fail`.
//!
//! trybuild compiles each case as a binary of its own crate in
//! `<target dir>/tests/trybuild/macros/`, so that is the `CARGO_MANIFEST_DIR` a case's
//! `mask_file = "masks/…"` is relative to. The fixtures are copied there first; the target
//! dir is the parent of `CARGO_TARGET_TMPDIR` (what cargo gives integration tests), so this
//! holds wherever `CARGO_TARGET_DIR` points. The macro names files as written, so the
//! expected messages do not depend on that location either.

use std::path::Path;

/// Copies `tests/masks/*` into the trybuild crate's `masks/` folder.
fn copy_fixtures() {
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent (the target dir)");
    let dest = target_dir.join("tests/trybuild/macros/masks");
    std::fs::create_dir_all(&dest).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/masks");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dest.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn compile_errors() {
    copy_fixtures();
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
