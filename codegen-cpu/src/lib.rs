//! # codegen-cpu
//!
//! The CPU backend of sparsejit ([`CpuBackend`], implementing
//! [`sparse_ir::backend::Backend`]) with three strategies:
//!
//! - `generic`: index-array kernels for every op that take any pattern at run time,
//!   register-blocked over the batch, in AVX-512, AVX2 + FMA and portable variants chosen at
//!   run time ([`IsaLevel`]; `SPARSEJIT_ISA` forces a lower level);
//! - `dense`: GEMM (the `gemm` crate) on the weight matrix without its all-zero rows and
//!   columns;
//! - `jit`: Cranelift code with the pattern baked in ([`jit`]).
//!
//! `Strategy::Auto` lets the [`planner`] choose from a cost model; where its best candidates
//! are close, the backend times them on the real shape and keeps the measured fastest
//! ([`PlanTiming`]; off for deterministic plans), caching the decision per cache key. Every
//! [`CpuKernel`] exposes the [`Plan`]: predicted and measured times, the generic kernel
//! variant, and the reasons. Kernels run on the backend's thread pool, split over rows, with
//! a fork-join cost well under a microsecond.

mod backend;
mod cache;
mod conv;
mod conv_dense;
mod dense;
mod generic;
mod isa;
pub mod jit;
pub mod planner;
mod pool;
mod simd;
pub mod swap;

pub use backend::{
    CpuBackend, CpuError, CpuKernel, CpuOptions, PlanTiming, DEFAULT_TIMING_BUDGET,
    TIMING_MAX_ROUNDS, TIMING_MIN_ROUNDS, TIMING_SAMPLE_MIN,
};
pub use isa::{IsaLevel, ISA_ENV};
pub use planner::{Features, Measurement, Plan, Prediction, Timed};
pub use pool::Pool;
