//! # codegen-opencl
//!
//! The OpenCL backend of sparsejit: OpenCL C specialised to each layer's nonzero pattern.
//!
//! - [`emit`](mod@emit): the emitters, plain string generation that needs no OpenCL: every op
//!   (`spmm` with its bias/ReLU epilogue, `spmm_t`, `sddmm`, `dense_grad`) with the strategies
//!   `csr` (generic, built once per device), `table` (the pattern as `__constant` arrays) and
//!   `unrolled` (straight-line code), with work-group shapes chosen per device kind; the
//!   convolution ops (`conv` with its epilogue, `conv_t`, `conv_grad`, `conv_dense_grad`) as
//!   generic `csr` kernels only.
//! - [`plan()`]: which strategy `Auto` means on a device, with its reason.
//! - [`device`]: what the emitters and the planner know about a device.
//! - With the cargo feature `opencl` (which links `libOpenCL`): `probe`, which lists the
//!   OpenCL devices and returns [`sparse_ir::BackendError::NoPlatform`] at once when there is
//!   none, and `OpenClBackend`, the executor implementing [`sparse_ir::backend::Backend`]
//!   with device buffers, a program cache and kernel timing, and `TrainingKernels`, the
//!   rest of an SGD step (loss, ReLU and bias gradient, optimiser), so that training keeps
//!   its tensors on the device ([`emit::training`] is their source).

pub mod device;
pub mod emit;
pub mod plan;

#[cfg(feature = "opencl")]
mod exec;
#[cfg(feature = "opencl")]
mod training;

pub use device::{select_device, DeviceInfo, DeviceKind, DeviceProfile, WorkGroups, DEVICE_ENV};
pub use emit::{emit, EmitOptions, Emitted};
pub use plan::{plan, KernelLifetime, Plan};

#[cfg(feature = "opencl")]
pub use exec::{
    probe, CompileReport, DeviceBuffer, IndexBuffer, OpenClBackend, OpenClKernel, Stats,
};
#[cfg(feature = "opencl")]
pub use training::{SgdStep, TrainingKernels};
