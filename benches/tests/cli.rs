//! How `kernel-bench` starts and ends: a warning for more threads than cores, one-line errors
//! with exit status 1 and no backtrace.

use std::process::Command;

fn kernel_bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kernel-bench"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

#[test]
fn more_threads_than_cores_is_warned_about() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = (cores + 1).to_string();
    // A filter that matches no case: nothing is timed.
    let out = kernel_bench(&["--threads", &threads, "--filter", "no such case"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "--threads {threads} is more than this machine's {cores} cores"
        )),
        "{err}"
    );
}

#[test]
fn an_error_is_one_line_and_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("a-file");
    std::fs::write(&json, b"").unwrap();
    let target = json.join("out.json");
    let out = kernel_bench(&[
        "--filter",
        "no such case",
        "--json",
        target.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && !err.contains("backtrace"),
        "{err}"
    );
}
