//! Shared by the OpenCL tests: the backend, or a visible skip.

use std::io::Write;
use std::sync::OnceLock;

use codegen_opencl::{probe, select_device, OpenClBackend, DEVICE_ENV};
use sparse_ir::BackendError;

/// The message a test prints when it has no platform (CONTRACTS.md).
pub const SKIP: &[u8] = b"skipped: no OpenCL platform\n";

/// Whether the environment demands a platform (`REQUIRE_OPENCL=1`, as `.ci/run` sets).
pub fn required() -> bool {
    std::env::var("REQUIRE_OPENCL").is_ok_and(|v| v == "1")
}

/// The backend on the first OpenCL device, shared by the tests of one binary; `None` (after
/// printing `skipped: no OpenCL platform` past cargo's capture) when there is no platform,
/// and a failure instead when `REQUIRE_OPENCL=1`.
pub fn backend() -> Option<&'static OpenClBackend> {
    static BACKEND: OnceLock<Option<OpenClBackend>> = OnceLock::new();
    let backend = BACKEND
        .get_or_init(|| match probe() {
            Ok(devices) => {
                // the device a program would use: SPARSEJIT_OPENCL_DEVICE, else a GPU
                let choice = std::env::var(DEVICE_ENV).ok();
                let info = select_device(&devices, choice.as_deref())
                    .unwrap_or_else(|e| panic!("choosing an OpenCL device: {e}"));
                let backend = OpenClBackend::new(info)
                    .unwrap_or_else(|e| panic!("opening {}: {e}", info.describe()));
                let _ = writeln!(std::io::stderr(), "OpenCL device: {}", info.describe());
                Some(backend)
            }
            Err(BackendError::NoPlatform) => None,
            Err(e) => panic!("probing OpenCL failed: {e}"),
        })
        .as_ref();
    if backend.is_none() {
        assert!(
            !required(),
            "REQUIRE_OPENCL=1 but no OpenCL platform was found (Debian: pocl-opencl-icd)"
        );
        let _ = std::io::stderr().write_all(SKIP);
    }
    backend
}
