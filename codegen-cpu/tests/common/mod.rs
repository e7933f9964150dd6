//! What the CPU backend's differential tests share.

use codegen_cpu::{CpuBackend, CpuOptions, IsaLevel};

/// Every (ISA level this CPU supports, 1 or 2 threads) backend, with parallel splitting on
/// even for tiny launches.
pub fn backends() -> Vec<CpuBackend> {
    let mut out = Vec::new();
    for isa in IsaLevel::supported() {
        for threads in [1, 2] {
            let mut b = CpuBackend::new(CpuOptions {
                threads,
                isa: Some(isa),
            })
            .expect("backend");
            b.set_parallel_min_fmas(0);
            out.push(b);
        }
    }
    out
}
