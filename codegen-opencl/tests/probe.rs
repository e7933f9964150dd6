//! Probing: devices are listed, and with no platform `NoPlatform` comes back at once.
#![cfg(feature = "opencl")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use codegen_opencl::{probe, DeviceKind, OpenClBackend};
use sparse_ir::BackendError;

const CHILD: &str = "SPARSEJIT_PROBE_CHILD";

/// Runs in a child process whose ICD loader finds no vendor (`OCL_ICD_VENDORS` points
/// nowhere), where `probe` must say `NoPlatform` quickly, without panicking or retrying.
#[test]
fn no_platform_is_reported_at_once() {
    if std::env::var_os(CHILD).is_some() {
        let t = Instant::now();
        let r = probe();
        assert!(matches!(r, Err(BackendError::NoPlatform)), "{r:?}");
        assert!(matches!(
            OpenClBackend::first(),
            Err(BackendError::NoPlatform)
        ));
        let elapsed = t.elapsed();
        assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
        assert_eq!(
            BackendError::NoPlatform.to_string(),
            "no OpenCL platform found"
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "no_platform_is_reported_at_once",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("OCL_ICD_VENDORS", "/nonexistent")
        .env_remove("OCL_ICD_FILENAMES")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "child ran no test:\n{stdout}");
}

/// Without a platform the shared helper skips visibly, or fails under `REQUIRE_OPENCL=1`.
#[test]
fn skip_notice_or_failure_without_platform() {
    if std::env::var_os(CHILD).is_some() {
        // child: no platform here; this must skip (REQUIRE_OPENCL unset) or panic (set)
        assert!(common::backend().is_none());
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let run = |require: &str| {
        Command::new(&exe)
            .args([
                "--exact",
                "skip_notice_or_failure_without_platform",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("OCL_ICD_VENDORS", "/nonexistent")
            .env_remove("OCL_ICD_FILENAMES")
            .env("REQUIRE_OPENCL", require)
            .output()
            .unwrap()
    };
    let skipped = run("0");
    assert!(skipped.status.success());
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(
        stderr.contains("skipped: no OpenCL platform"),
        "no notice in:\n{stderr}"
    );
    let required = run("1");
    assert!(!required.status.success(), "REQUIRE_OPENCL=1 must fail");
    let stdout = String::from_utf8_lossy(&required.stdout);
    assert!(
        stdout.contains("REQUIRE_OPENCL=1 but no OpenCL platform"),
        "{stdout}"
    );
}

#[test]
fn devices_are_described() {
    let Some(backend) = common::backend() else {
        return;
    };
    let devices = probe().unwrap();
    assert!(!devices.is_empty());
    let info = backend.info();
    assert!(!info.name.is_empty() && !info.platform.is_empty());
    assert!(info.max_work_group_size >= 1);
    assert!(info.max_constant_buffer_size >= 1024, "{info:?}");
    assert!(info.compute_units >= 1);
    assert!(backend.profile().max_constant_buffer_size == info.max_constant_buffer_size);
    if info.platform.contains("Portable Computing Language") {
        assert_eq!(info.kind, DeviceKind::Cpu);
    }
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("OpenCL device: {} ({})\n", info.describe(), info.version).as_bytes(),
    );
}
