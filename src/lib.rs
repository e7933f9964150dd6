//! sparsejit: a compiler for sparse neural-network kernels.
//!
//! This facade re-exports the public API of the workspace so that a user depends on one crate:
//! the sparse IR ([`ir`]: patterns, kernel specs, the backend contract, the `.sir` format, the
//! interpreter, mask files), the CPU backend ([`cpu`]), the OpenCL emitters and executor
//! ([`opencl`]), the training runtime ([`runtime`]) and [`sparse_kernel!`].

pub use codegen_cpu as cpu;
pub use codegen_opencl as opencl;
pub use macros::sparse_kernel;
pub use runtime;
pub use sparse_ir as ir;
