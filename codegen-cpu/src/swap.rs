//! Hot swap: after a mask update a layer runs on the generic kernel (nothing to compile)
//! while its JIT code compiles on a background thread, and switches to the JIT code once it
//! is ready.
//!
//! [`SwapKernel::start`] compiles the generic kernel (a few microseconds of set-up) and hands
//! the JIT compilation to a new thread. Until that thread publishes its [`JitKernel`],
//! [`SwapKernel::run`] runs the generic kernel; from then on every run takes the JIT code.
//! Both compute the same op on the same arguments (within the kernel tolerance), so the
//! kernel is correct at every moment; `run` is safe and checks every length (both kernels
//! run [`Args::check`] before any `unsafe`). The JIT kernel is published once, through a
//! [`OnceLock`], so a run sees either no JIT code or all of it. If the JIT compilation fails,
//! the kernel keeps running the generic code and [`SwapKernel::error`] says why. Dropping the
//! kernel before the code is ready stops the compilation at the next chunk.
//!
//! [`compile_hot`] is the strategy selection with hot swap: `Auto` asks the planner, and where
//! the plan is the JIT the result is a [`SwapKernel`]; every other choice compiles as
//! [`CpuBackend::compile`] does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{Args, BackendError, KernelSpec, Launch, Strategy};

use crate::backend::{CpuBackend, CpuKernel};
use crate::jit::{CompileStats, JitKernel, JitOptions};
use crate::planner::{self, Features, Plan};

/// What the background thread and the kernel share.
#[derive(Default)]
struct Shared {
    /// The compiled JIT kernel, or why there is none; set once.
    jit: OnceLock<Result<JitKernel, BackendError>>,
    /// Set when the kernel is dropped: the compilation stops at its next chunk.
    cancel: AtomicBool,
}

/// A kernel that runs the generic code until its JIT code is ready, then the JIT code.
pub struct SwapKernel {
    spec: KernelSpec,
    writes_padding: bool,
    plan: Plan,
    generic: CpuKernel,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SwapKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapKernel")
            .field("layer", &self.spec.layer())
            .field("op", &self.spec.op())
            .field("active", &self.active())
            .finish()
    }
}

impl SwapKernel {
    /// Compiles the generic kernel of `spec` on `backend` now and starts compiling its JIT
    /// code with `options` on a background thread. `plan` is the plan to report (the
    /// planner's, which chose the JIT).
    ///
    /// Errors: those of compiling the generic kernel, and `Unsupported` where the JIT cannot
    /// compile the spec at all (`dense_grad`, a batch or `ld` that is not fixed). A failure
    /// to start the thread or to compile is not an error here: the kernel then stays generic
    /// ([`SwapKernel::error`]).
    pub fn start(
        backend: &CpuBackend,
        spec: &KernelSpec,
        plan: Plan,
        options: JitOptions,
    ) -> Result<SwapKernel, BackendError> {
        Self::start_with(backend, spec, plan, options, || {})
    }

    /// [`SwapKernel::start`], with `before` run on the background thread before it compiles
    /// (tests hold the compilation with it, to run the kernel before the swap for sure).
    pub fn start_with(
        backend: &CpuBackend,
        spec: &KernelSpec,
        plan: Plan,
        options: JitOptions,
        before: impl FnOnce() + Send + 'static,
    ) -> Result<SwapKernel, BackendError> {
        if crate::jit::estimate(spec).is_none() {
            return Err(BackendError::Unsupported {
                layer: spec.layer().to_string(),
                op: spec.op().name(),
                strategy: Strategy::Jit,
                reason: format!(
                    "the JIT needs a fixed batch and ld, has no dense_grad, and compiles no row \
                     of more than {} nonzeros",
                    crate::jit::MAX_ROW_NNZ
                ),
            });
        }
        let writes_padding = match (spec.batch(), spec.ld()) {
            (sparse_ir::Dim::Fixed(batch), sparse_ir::Dim::Fixed(ld)) => {
                crate::jit::code_writes_padding(spec.op(), batch, ld, options.block_vectors)
            }
            _ => false,
        };
        let generic = backend.compile(spec, Strategy::Generic)?;
        let shared = Arc::new(Shared::default());
        let job = (Arc::clone(&shared), spec.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("jit {} {}", spec.layer(), spec.op().name()))
            .spawn(move || {
                let (shared, spec) = job;
                before();
                let result = crate::jit::compile_cancellable(&spec, &options, Some(&shared.cancel));
                let _ = shared.jit.set(result);
            });
        if let Err(e) = spawned {
            let _ = shared.jit.set(Err(BackendError::Compile {
                layer: spec.layer().to_string(),
                op: spec.op().name(),
                message: format!("starting the background compilation thread: {e}"),
            }));
        }
        Ok(SwapKernel {
            writes_padding,
            spec: spec.clone(),
            plan,
            generic,
            shared,
        })
    }

    /// The plan that chose the JIT.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The strategy running now: `Generic` until the JIT code is ready, then `Jit`.
    pub fn active(&self) -> Strategy {
        match self.shared.jit.get() {
            Some(Ok(_)) => Strategy::Jit,
            _ => Strategy::Generic,
        }
    }

    /// Whether the JIT code is ready (and runs from now on).
    pub fn is_swapped(&self) -> bool {
        self.active() == Strategy::Jit
    }

    /// Blocks until the background compilation has finished; returns whether the JIT code
    /// runs from now on (`false`: it failed, see [`SwapKernel::error`]).
    pub fn wait(&self) -> bool {
        self.shared.jit.wait().is_ok()
    }

    /// Why the JIT code did not come, once the compilation has failed.
    pub fn error(&self) -> Option<&BackendError> {
        self.shared.jit.get().and_then(|r| r.as_ref().err())
    }

    /// The JIT compilation's statistics, once it is ready.
    pub fn jit_stats(&self) -> Option<&CompileStats> {
        match self.shared.jit.get() {
            Some(Ok(j)) => Some(j.stats()),
            _ => None,
        }
    }

    /// Runs the JIT code if it is ready, the generic kernel otherwise; every length is
    /// checked first.
    pub fn run(&self, launch: Launch, args: Args<'_, [f32]>) -> Result<(), BackendError> {
        match self.shared.jit.get() {
            Some(Ok(jit)) => jit.run(launch, args),
            _ => self.generic.run(launch, args),
        }
    }
}

impl Drop for SwapKernel {
    fn drop(&mut self) {
        self.shared.cancel.store(true, Ordering::Relaxed);
    }
}

impl Kernel for SwapKernel {
    type Buffer = [f32];

    fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    /// `Jit`, the strategy the plan chose (the kernel runs the generic code only until the
    /// JIT code is ready; [`SwapKernel::active`] says which runs now).
    fn strategy(&self) -> Strategy {
        Strategy::Jit
    }

    fn run(&self, launch: Launch, args: Args<'_, [f32]>) -> Result<(), BackendError> {
        SwapKernel::run(self, launch, args)
    }

    /// Whether the JIT code it swaps to may write the padding (the generic code it runs
    /// until then never does).
    fn writes_padding(&self) -> bool {
        self.writes_padding
    }
}

/// A kernel from [`compile_hot`]: compiled now, or swapping to JIT code when it is ready.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per layer and op, run on every step: boxing would add an indirection per run to save a few hundred bytes"
)]
pub enum HotKernel {
    /// Compiled as [`CpuBackend::compile`] compiles it.
    Ready(CpuKernel),
    /// The planner chose the JIT: generic code until the JIT code is ready.
    Swap(SwapKernel),
}

impl HotKernel {
    /// The strategy chosen (`Jit` for a swap kernel, even before it swapped).
    pub fn strategy(&self) -> Strategy {
        match self {
            HotKernel::Ready(k) => k.strategy(),
            HotKernel::Swap(s) => Kernel::strategy(s),
        }
    }

    /// Runs the kernel; every length is checked first.
    pub fn run(&self, launch: Launch, args: Args<'_, [f32]>) -> Result<(), BackendError> {
        match self {
            HotKernel::Ready(k) => k.run(launch, args),
            HotKernel::Swap(s) => s.run(launch, args),
        }
    }
}

/// Options of the background compilation: one thread, so that the training loop keeps the
/// others; the rest of [`JitOptions::default`].
pub fn background_options() -> JitOptions {
    JitOptions {
        threads: 1,
        ..JitOptions::default()
    }
}

/// Compiles `spec` like [`CpuBackend::compile`], except where `strategy` is `Auto` and the
/// planner picks the JIT: then the kernel runs the generic code at once and the JIT code from
/// when [`background_options`] compiled it on a background thread.
pub fn compile_hot(
    backend: &CpuBackend,
    spec: &KernelSpec,
    strategy: Strategy,
) -> Result<HotKernel, BackendError> {
    if strategy == Strategy::Auto {
        // The cost model's choice: timing the candidates would compile the JIT code now.
        let plan = planner::plan(&Features::of(spec, backend.threads(), backend.isa()));
        if plan.strategy == Strategy::Jit {
            return SwapKernel::start(backend, spec, plan, background_options())
                .map(HotKernel::Swap);
        }
    }
    backend.compile(spec, strategy).map(HotKernel::Ready)
}
