//! The one place where the runtime meets a kernel backend.
//!
//! Every kernel the runtime runs is compiled by [`Executor::compile`] and run by
//! [`Kernel::run`]; nothing else in the crate names a backend. `cpu` is `codegen-cpu`'s
//! [`CpuBackend`] (JIT, generic and dense kernels, its planner for `auto`, its thread pool);
//! [`Executor::reference`] runs the reference interpreter [`sparse_ir::interp`] instead, the
//! oracle the tests compare whole training steps against (it reports the strategy it was
//! asked for, `generic` for `auto`).
//!
//! `opencl` (cargo feature `opencl`) is `codegen-opencl`'s `OpenClBackend` on the device
//! `OpenClBackend::preferred` picks (`SPARSEJIT_OPENCL_DEVICE=N`, else the first GPU, else
//! the first device, PoCL here). [`Kernel::run`] works on host slices: each OpenCL kernel
//! owns device buffers for its operands and every run copies its inputs to the device and its
//! output back (what models with convolutions use). Training of linear models keeps its
//! tensors on the device instead (`crate::device::DeviceModel`, which runs the same compiled
//! kernels on device buffers through `Kernel::opencl`, with the `opencl` feature). [`Executor::device_stats`] says how
//! the time splits between kernels and copies. The thread count does not apply: the OpenCL
//! platform has its own (PoCL: `POCL_MAX_PTHREAD_COUNT`).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

#[cfg(feature = "opencl")]
use codegen_opencl::OpenClBackend;

use codegen_cpu::swap::{HotKernel, SwapKernel};
use codegen_cpu::{CpuBackend, CpuKernel, CpuOptions, PlanTiming};
use sparse_ir::backend::{Backend, Kernel as _};
use sparse_ir::{Args, BackendError, KernelSpec, Launch, Strategy};

use crate::error::{Result, RuntimeError};

/// Where kernels run: `cpu` or `opencl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// The CPU backend.
    Cpu,
    /// The OpenCL backend.
    OpenCl,
}

impl BackendKind {
    /// The backend name used on command lines and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::OpenCl => "opencl",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "opencl" => Ok(BackendKind::OpenCl),
            _ => Err(format!("unknown backend {s:?} (expected cpu or opencl)")),
        }
    }
}

/// How the executor is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecOptions {
    /// The backend.
    pub backend: BackendKind,
    /// Threads each kernel may use.
    pub threads: usize,
    /// Hot swap (CPU): where `Auto`'s planner picks the JIT, the kernel runs the generic code
    /// at once and the JIT code from when a background thread has compiled it
    /// ([`codegen_cpu::swap`]); off, such a kernel compiles its JIT code before it returns.
    pub hot_swap: bool,
    /// Let `Auto`'s planner (CPU) confirm close predictions by timing the candidates
    /// ([`PlanTiming`]); off, plans come from the cost model alone and do not depend on the
    /// machine's load (`--deterministic`).
    pub plan_timing: bool,
    /// About how many times each kernel runs before its pattern changes (training: the steps
    /// between mask updates), or `None` when patterns last (inference, fixed masks). The
    /// OpenCL planner builds per-pattern programs only where they repay their build
    /// (`codegen_opencl::KernelLifetime`); the CPU backend does not use it.
    pub launches_per_pattern: Option<u64>,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            backend: BackendKind::Cpu,
            threads: 1,
            hot_swap: false,
            plan_timing: true,
            launches_per_pattern: None,
        }
    }
}

/// Compiles kernels for the runtime on the chosen backend.
#[derive(Debug)]
pub struct Executor {
    options: ExecOptions,
    inner: Inner,
}

#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per executor; the size of the CPU backend does not matter here"
)]
enum Inner {
    Reference,
    Cpu(CpuBackend),
    #[cfg(feature = "opencl")]
    OpenCl(OpenClBackend),
}

/// Where a device backend's time went since the executor was created (OpenCL only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Kernel launches.
    pub launches: u64,
    /// Device time of the kernels (profiling events), without host transfers.
    pub kernel: Duration,
    /// Host time of the copies between host tensors and device buffers.
    pub transfer: Duration,
    /// Bytes copied to the device.
    pub bytes_up: u64,
    /// Bytes copied back.
    pub bytes_down: u64,
    /// Programs built.
    pub programs_built: u64,
    /// Host time of those builds.
    pub build: Duration,
}

impl Executor {
    /// Sets up the backend. `opencl` needs the cargo feature `opencl` (an error saying how to
    /// build with it otherwise) and an OpenCL platform (an error naming what to install).
    pub fn new(options: ExecOptions) -> Result<Self> {
        if options.threads == 0 {
            return Err(RuntimeError::Config("threads must be at least 1".into()));
        }
        match options.backend {
            BackendKind::Cpu => {
                let mut cpu = CpuBackend::new(CpuOptions {
                    threads: options.threads,
                    isa: None,
                })
                .map_err(|e| RuntimeError::Config(format!("backend cpu: {e}")))?;
                if !options.plan_timing {
                    cpu.set_plan_timing(PlanTiming::Off);
                }
                Ok(Executor {
                    options,
                    inner: Inner::Cpu(cpu),
                })
            }
            BackendKind::OpenCl => Self::opencl(options),
        }
    }

    #[cfg(not(feature = "opencl"))]
    fn opencl(_options: ExecOptions) -> Result<Self> {
        Err(RuntimeError::Config(
            "backend opencl: this build has no OpenCL support; rebuild with the cargo feature \
             `opencl`, e.g. `cargo build --release -p runtime --features opencl` (it links \
             libOpenCL: Debian ocl-icd-opencl-dev, plus a platform such as pocl-opencl-icd or \
             a GPU driver), or use --backend cpu"
                .into(),
        ))
    }

    #[cfg(feature = "opencl")]
    fn opencl(options: ExecOptions) -> Result<Self> {
        let backend = OpenClBackend::preferred().map_err(|e| match e {
            BackendError::NoPlatform => RuntimeError::Config(
                "backend opencl: no OpenCL platform found (install one, e.g. Debian \
                 pocl-opencl-icd or a GPU driver's ICD in /etc/OpenCL/vendors), or use \
                 --backend cpu"
                    .into(),
            ),
            e => RuntimeError::Config(format!("backend opencl: {e}")),
        })?;
        backend.set_kernel_lifetime(match options.launches_per_pattern {
            Some(n) => codegen_opencl::KernelLifetime::Launches(n),
            None => codegen_opencl::KernelLifetime::Lasting,
        });
        tracing::info!(device = %backend.device(), "OpenCL backend");
        Ok(Executor {
            options,
            inner: Inner::OpenCl(backend),
        })
    }

    /// The reference interpreter as a backend: slow, accumulating in f64, the oracle.
    pub fn reference() -> Self {
        Executor {
            options: ExecOptions::default(),
            inner: Inner::Reference,
        }
    }

    /// The options it was made with.
    pub fn options(&self) -> ExecOptions {
        self.options
    }

    /// The backend and device, in words.
    pub fn device(&self) -> String {
        match &self.inner {
            Inner::Reference => "reference/interp".into(),
            Inner::Cpu(cpu) => format!("cpu/{}", cpu.device()),
            #[cfg(feature = "opencl")]
            Inner::OpenCl(ocl) => ocl.device(),
        }
    }

    /// The OpenCL backend, when kernels run there.
    #[cfg(feature = "opencl")]
    pub fn opencl_backend(&self) -> Option<&OpenClBackend> {
        match &self.inner {
            Inner::OpenCl(b) => Some(b),
            _ => None,
        }
    }

    /// Kernel and transfer times of a device backend (`None` for the CPU and the reference).
    pub fn device_stats(&self) -> Option<DeviceStats> {
        match &self.inner {
            Inner::Reference | Inner::Cpu(_) => None,
            #[cfg(feature = "opencl")]
            Inner::OpenCl(ocl) => {
                let s = ocl.stats();
                Some(DeviceStats {
                    launches: s.launches,
                    kernel: Duration::from_nanos(s.kernel_ns),
                    transfer: Duration::from_nanos(s.transfer_ns),
                    bytes_up: s.bytes_up,
                    bytes_down: s.bytes_down,
                    programs_built: s.programs_built,
                    build: Duration::from_nanos(s.build_ns),
                })
            }
        }
    }

    /// Compiles `spec` with `strategy` (`Auto` lets the backend's planner choose).
    pub fn compile(&self, spec: &KernelSpec, strategy: Strategy) -> Result<Kernel, BackendError> {
        let start = Instant::now();
        let imp = match &self.inner {
            Inner::Cpu(cpu) if self.options.hot_swap => {
                match codegen_cpu::swap::compile_hot(cpu, spec, strategy)? {
                    HotKernel::Ready(k) => Imp::Cpu(k),
                    HotKernel::Swap(k) => Imp::Swap(k),
                }
            }
            Inner::Cpu(cpu) => {
                let k = cpu.compile(spec, strategy)?;
                if strategy == Strategy::Auto {
                    let plan = k.plan();
                    tracing::debug!(
                        layer = spec.layer(),
                        op = %spec.op(),
                        strategy = %plan.strategy,
                        reasons = ?plan.reasons,
                        "planned"
                    );
                }
                Imp::Cpu(k)
            }
            #[cfg(feature = "opencl")]
            Inner::OpenCl(ocl) => Imp::OpenCl(Box::new(opencl::HostKernel::new(
                ocl.clone(),
                ocl.compile(spec, strategy)?,
            ))),
            Inner::Reference => Imp::Reference(match strategy {
                Strategy::Auto => Strategy::Generic,
                Strategy::Jit | Strategy::Generic | Strategy::Dense => strategy,
                other => {
                    return Err(BackendError::Unsupported {
                        layer: spec.layer().to_string(),
                        op: spec.op().name(),
                        strategy: other,
                        reason: "not a CPU strategy (expected auto, jit, generic or dense)".into(),
                    })
                }
            }),
        };
        Ok(Kernel {
            spec: spec.clone(),
            imp,
            compile_time: start.elapsed(),
        })
    }
}

/// A compiled kernel: what it computes, how, and how long compiling it took.
#[derive(Debug)]
pub struct Kernel {
    spec: KernelSpec,
    imp: Imp,
    compile_time: Duration,
}

// A handful of kernels per layer: their size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Imp {
    Reference(Strategy),
    Cpu(CpuKernel),
    Swap(SwapKernel),
    #[cfg(feature = "opencl")]
    OpenCl(Box<opencl::HostKernel>),
}

impl Kernel {
    /// What this kernel computes.
    pub fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    /// The strategy that runs it (never `Auto`); `jit` for a hot-swap kernel even while it
    /// still runs the generic code ([`Kernel::active_strategy`]).
    pub fn strategy(&self) -> Strategy {
        match &self.imp {
            Imp::Reference(s) => *s,
            Imp::Cpu(k) => k.strategy(),
            Imp::Swap(k) => k.strategy(),
            #[cfg(feature = "opencl")]
            Imp::OpenCl(k) => k.strategy(),
        }
    }

    /// The strategy running now: as [`Kernel::strategy`], except for a hot-swap kernel whose
    /// JIT code is not ready yet (`generic`).
    pub fn active_strategy(&self) -> Strategy {
        match &self.imp {
            Imp::Swap(k) => k.active(),
            _ => self.strategy(),
        }
    }

    /// A hot-swap kernel (see [`ExecOptions::hot_swap`]), if this is one.
    pub fn swap(&self) -> Option<&SwapKernel> {
        match &self.imp {
            Imp::Swap(k) => Some(k),
            _ => None,
        }
    }

    /// The OpenCL kernel, to run on device buffers (`None` on other backends).
    #[cfg(feature = "opencl")]
    pub fn opencl(&self) -> Option<&codegen_opencl::OpenClKernel> {
        match &self.imp {
            Imp::OpenCl(k) => Some(k.kernel()),
            _ => None,
        }
    }

    /// How long compiling it took (for a hot-swap kernel: the generic kernel and starting
    /// the background compilation).
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Whether a run may write the padding columns `batch..ld` of its output on the host
    /// ([`sparse_ir::backend::Kernel::writes_padding`]): the backend kernel says so (the JIT
    /// when its last `f32x4` block runs over them); the interpreter never does; the OpenCL
    /// adapter always may, since it copies the whole device buffer back.
    pub fn writes_padding(&self) -> bool {
        match &self.imp {
            Imp::Reference(_) => false,
            Imp::Cpu(k) => k.writes_padding(),
            Imp::Swap(k) => k.writes_padding(),
            #[cfg(feature = "opencl")]
            Imp::OpenCl(_) => true,
        }
    }

    /// Runs the kernel on host slices; every length is checked first. On OpenCL the inputs
    /// are copied to the device and the output back.
    ///
    /// Kernels may leave the padding columns `batch..ld` of an output unspecified
    /// ([`writes_padding`](Self::writes_padding)); the runtime keeps them at zero, so after
    /// such a kernel the padding of the output is cleared.
    pub fn run(&self, launch: Launch, args: Args<'_, [f32]>) -> Result<(), BackendError> {
        if launch.ld == launch.batch || !self.writes_padding() {
            return self.run_unpadded(launch, args);
        }
        match args {
            Args::Spmm { values, x, bias, y } => {
                let y_args = Args::Spmm {
                    values,
                    x,
                    bias,
                    y: &mut *y,
                };
                self.run_unpadded(launch, y_args)?;
                zero_padding(y, launch);
            }
            Args::SpmmT { values, dy, dx } => {
                self.run_unpadded(
                    launch,
                    Args::SpmmT {
                        values,
                        dy,
                        dx: &mut *dx,
                    },
                )?;
                zero_padding(dx, launch);
            }
            other => self.run_unpadded(launch, other)?,
        }
        Ok(())
    }

    fn run_unpadded(&self, launch: Launch, args: Args<'_, [f32]>) -> Result<(), BackendError> {
        match &self.imp {
            Imp::Reference(_) => sparse_ir::interp::run(&self.spec, launch, args),
            Imp::Cpu(k) => k.run(launch, args),
            Imp::Swap(k) => k.run(launch, args),
            #[cfg(feature = "opencl")]
            Imp::OpenCl(k) => k.run(launch, args),
        }
    }
}

/// Sets columns `batch..ld` of every row of the feature-major matrix `m` to zero.
fn zero_padding(m: &mut [f32], launch: Launch) {
    for row in m.chunks_mut(launch.ld) {
        if let Some(pad) = row.get_mut(launch.batch..) {
            pad.fill(0.0);
        }
    }
}

/// The OpenCL adapter: a compiled OpenCL kernel run on host slices through device buffers
/// of its own.
#[cfg(feature = "opencl")]
mod opencl {
    use std::sync::{Mutex, MutexGuard};

    use codegen_opencl::{DeviceBuffer, OpenClBackend, OpenClKernel};
    use sparse_ir::backend::{Backend as _, Kernel as _};
    use sparse_ir::{Args, BackendError, Launch, Strategy};

    /// A compiled OpenCL kernel and one device buffer per operand slot (in the order of
    /// [`Args`]' fields), reallocated only when a host slice's length changes.
    pub(super) struct HostKernel {
        backend: OpenClBackend,
        kernel: OpenClKernel,
        slots: Mutex<[Option<DeviceBuffer>; 4]>,
    }

    impl std::fmt::Debug for HostKernel {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.kernel.fmt(f)
        }
    }

    /// A device buffer of exactly `len` elements in `slot`.
    fn sized<'a>(
        backend: &OpenClBackend,
        slot: &'a mut Option<DeviceBuffer>,
        len: usize,
    ) -> Result<&'a mut DeviceBuffer, BackendError> {
        if slot.as_ref().is_none_or(|b| b.len() != len) {
            *slot = Some(backend.alloc(len)?);
        }
        Ok(slot.as_mut().expect("just filled"))
    }

    /// `data` copied into the device buffer in `slot`.
    fn filled<'a>(
        backend: &OpenClBackend,
        slot: &'a mut Option<DeviceBuffer>,
        data: &[f32],
    ) -> Result<&'a DeviceBuffer, BackendError> {
        let buffer = sized(backend, slot, data.len())?;
        backend.upload(data, buffer)?;
        Ok(buffer)
    }

    impl HostKernel {
        pub(super) fn new(backend: OpenClBackend, kernel: OpenClKernel) -> Self {
            HostKernel {
                backend,
                kernel,
                slots: Mutex::new([None, None, None, None]),
            }
        }

        pub(super) fn strategy(&self) -> Strategy {
            self.kernel.strategy()
        }

        pub(super) fn kernel(&self) -> &OpenClKernel {
            &self.kernel
        }

        fn slots(&self) -> MutexGuard<'_, [Option<DeviceBuffer>; 4]> {
            // The slots are only ever replaced whole, so a poisoned lock is still usable.
            self.slots.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Checks the host arguments, copies the inputs up, runs, copies the output back.
        pub(super) fn run(
            &self,
            launch: Launch,
            args: Args<'_, [f32]>,
        ) -> Result<(), BackendError> {
            // Checked on the host slices first, so errors name the caller's lengths.
            args.check(self.kernel.spec(), launch)?;
            let b = &self.backend;
            let mut guard = self.slots();
            let [s0, s1, s2, s3] = &mut *guard;
            match args {
                Args::Spmm { values, x, bias, y } => {
                    let values = filled(b, s0, values)?;
                    let x = filled(b, s1, x)?;
                    let bias = match bias {
                        Some(bias) => Some(filled(b, s2, bias)?),
                        None => None,
                    };
                    let out = sized(b, s3, y.len())?;
                    self.kernel.run(
                        launch,
                        Args::Spmm {
                            values,
                            x,
                            bias,
                            y: &mut *out,
                        },
                    )?;
                    b.download(out, y)
                }
                Args::SpmmT { values, dy, dx } => {
                    let values = filled(b, s0, values)?;
                    let dy = filled(b, s1, dy)?;
                    let out = sized(b, s3, dx.len())?;
                    self.kernel.run(
                        launch,
                        Args::SpmmT {
                            values,
                            dy,
                            dx: &mut *out,
                        },
                    )?;
                    b.download(out, dx)
                }
                Args::Sddmm { dy, x, dw } => {
                    let dy = filled(b, s0, dy)?;
                    let x = filled(b, s1, x)?;
                    let out = sized(b, s3, dw.len())?;
                    self.kernel.run(
                        launch,
                        Args::Sddmm {
                            dy,
                            x,
                            dw: &mut *out,
                        },
                    )?;
                    b.download(out, dw)
                }
                Args::DenseGrad { dy, x, grad } => {
                    let dy = filled(b, s0, dy)?;
                    let x = filled(b, s1, x)?;
                    let out = sized(b, s3, grad.len())?;
                    self.kernel.run(
                        launch,
                        Args::DenseGrad {
                            dy,
                            x,
                            grad: &mut *out,
                        },
                    )?;
                    b.download(out, grad)
                }
            }
        }
    }
}
