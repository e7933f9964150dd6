//! The one place where the runtime meets a kernel backend.
//!
//! Every kernel the runtime runs is compiled by [`Executor::compile`] and run by
//! [`Kernel::run`]; nothing else in the crate names a backend. `cpu` is `codegen-cpu`'s
//! [`CpuBackend`] (JIT, generic and dense kernels, its planner for `auto`, its thread pool);
//! [`Executor::reference`] runs the reference interpreter [`sparse_ir::interp`] instead, the
//! oracle the tests compare whole training steps against (it reports the strategy it was
//! asked for, `generic` for `auto`).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use codegen_cpu::swap::{HotKernel, SwapKernel};
use codegen_cpu::{CpuBackend, CpuKernel, CpuOptions};
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
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            backend: BackendKind::Cpu,
            threads: 1,
            hot_swap: false,
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
enum Inner {
    Reference,
    Cpu(CpuBackend),
}

impl Executor {
    /// Sets up the backend. `opencl` is an error until the OpenCL backend is built.
    pub fn new(options: ExecOptions) -> Result<Self> {
        if options.threads == 0 {
            return Err(RuntimeError::Config("threads must be at least 1".into()));
        }
        match options.backend {
            BackendKind::Cpu => {
                let cpu = CpuBackend::new(CpuOptions {
                    threads: options.threads,
                    isa: None,
                })
                .map_err(|e| RuntimeError::Config(format!("backend cpu: {e}")))?;
                Ok(Executor {
                    options,
                    inner: Inner::Cpu(cpu),
                })
            }
            BackendKind::OpenCl => Err(RuntimeError::Config(
                "backend opencl: not built yet (the OpenCL backend of codegen-opencl does not exist yet); use --backend cpu".into(),
            )),
        }
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
            Inner::Cpu(cpu) => Imp::Cpu(cpu.compile(spec, strategy)?),
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

#[derive(Debug)]
enum Imp {
    Reference(Strategy),
    Cpu(CpuKernel),
    Swap(SwapKernel),
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

    /// How long compiling it took (for a hot-swap kernel: the generic kernel and starting
    /// the background compilation).
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Runs the kernel on host slices; every length is checked first.
    pub fn run(&self, launch: Launch, args: Args<'_, [f32]>) -> Result<(), BackendError> {
        match &self.imp {
            Imp::Reference(_) => sparse_ir::interp::run(&self.spec, launch, args),
            Imp::Cpu(k) => k.run(launch, args),
            Imp::Swap(k) => k.run(launch, args),
        }
    }
}
