//! Compile-fail tests of `sparse_kernel!`: every bad input is a compile error pointing at the
//! offending token. Expected messages are in `tests/ui/*.stderr`; to update them after an
//! intended change run `TRYBUILD=overwrite cargo test -p macros --test compile_fail`.

#[test]
fn compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
