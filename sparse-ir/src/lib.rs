//! # sparse-ir
//!
//! The foundation of sparsejit: what a layer's mask *is* and what kernels it needs.
//!
//! - [`Pattern`]: the immutable, validated CSR structure of a `rows × cols` mask, with its
//!   stable content hash, transposed (CSC) view and row chunks.
//! - [`KernelSpec`]: one kernel a layer needs ([`Op`]), for a pattern, batch size and row stride.
//! - [`backend`]: the contract every backend implements ([`backend::Backend`],
//!   [`backend::Kernel`], [`Strategy`]) and the argument checks they all share.
//! - [`interp`]: the reference interpreter, the oracle every backend is tested against.
//! - [`limits`]: the machine's physical memory and the [`MemoryBudget`] every declared size
//!   is checked against before allocation.
//! - [`AlignedVec`]: an `f32` buffer whose rows start on cache lines (what the CPU kernels
//!   are fastest on).
//!
//! Layout (see `CONTRACTS.md`): activations are feature-major `[features × batch]` with row
//! stride `ld ≥ batch`; weight values are one `f32` array in the pattern's CSR order.

pub mod aligned;
pub mod backend;
pub mod interp;
pub mod limits;
pub mod mask_io;
pub mod pattern;
pub mod rust_emit;
pub mod spec;
pub mod text;
pub mod verify;

pub use aligned::AlignedVec;
pub use backend::{Args, BackendError, Launch, Strategy};
pub use limits::{LimitError, MemoryBudget};
pub use mask_io::{read_mask, LoadedMask, MaskIoError, NdArray};
pub use pattern::{Pattern, PatternError, RowChunk, Transposed};
pub use spec::{ConvGeometry, Dim, KernelSpec, Op, Role};
pub use text::{Module, ParseError};
pub use verify::VerifyError;
