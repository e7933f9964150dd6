//! `make test` (scripts/run-tests.sh) ends with one line, `N passed, N failed, N skipped`,
//! summed over every suite, and fails when any suite fails, after running the others. Checked
//! with stand-ins for cargo and the Python suite that print their result lines.

use std::path::Path;
use std::process::Command;

#[cfg(unix)]
#[test]
fn the_test_run_ends_with_one_summary_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("cargo");
    let calls = dir.path().join("calls");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$*\" >> {calls}\n\
             echo 'test result: ok. 7 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out'\n\
             case \"$*\" in *benches*) \
             echo 'test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured'; exit 101;; \
             esac\n",
            calls = calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A stand-in for the Python suite that prints pytest's summary line.
    let python = dir.path().join("python-tests");
    std::fs::write(
        &python,
        "#!/bin/sh\necho '2 failed, 40 passed, 3 skipped, 1 error in 1.25s'\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/run-tests.sh");
    let out = Command::new(&script)
        .env("CARGO", &fake)
        .env("PYTHON_TESTS", &python)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim_end().lines().last(),
        Some("78 passed, 5 failed, 8 skipped"),
        "{stdout}"
    );
    assert!(!out.status.success(), "a failed suite fails the run");
    let runs = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(runs.lines().count(), 5, "every suite ran: {runs}");
    assert!(runs.lines().last().unwrap().contains("benches"));
}
