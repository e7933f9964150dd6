//! sparsejit: a compiler for sparse neural-network kernels.
//!
//! This facade re-exports the public API of the workspace so that a user depends on one crate:
//! the sparse IR ([`ir`]) and the CPU backend ([`cpu`]).

pub use codegen_cpu as cpu;
pub use sparse_ir as ir;
