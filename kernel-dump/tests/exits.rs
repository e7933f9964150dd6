//! How `kernel-dump` ends: a user error is one line on stderr and exit status 1 (2 for a
//! command-line usage error), never a backtrace, even with `RUST_BACKTRACE=1`; a reader that
//! closes the output early (`| head`) ends it quietly.

use std::process::{Command, Stdio};

fn kernel_dump() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kernel-dump"));
    c.env("RUST_BACKTRACE", "1");
    c
}

#[test]
fn a_user_error_is_one_line_and_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.npy");
    for args in [
        vec!["--mask", missing.to_str().unwrap()],
        vec!["--random", "3x3x3", "--density", "0.5"],
        vec!["--random", "30x30", "--density", "1.5"],
    ] {
        let out = kernel_dump().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(
            !err.contains("backtrace") && !err.contains("panicked"),
            "{err}"
        );
    }
    let out = kernel_dump().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_it_quietly() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = kernel_dump()
        .args(["--random", "300x784", "--density", "0.5", "--emit", "ir"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 64];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.status.success() || out.status.signal() == Some(13),
        "{:?}: {err}",
        out.status
    );
}

/// Warnings, on stderr, for more threads than cores and for a random pattern that drew
/// nothing; the dump still runs.
#[test]
fn warnings_for_threads_and_an_empty_pattern() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = (cores + 1).to_string();
    let out = kernel_dump()
        .args(["--random", "10x10", "--density", "0.001", "--emit", "stats"])
        .args(["--no-measure", "--threads", &threads])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("--threads {threads} is more than")),
        "{err}"
    );
    assert!(err.contains("drew no nonzero"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nnz 0"));
}
