//! The backend contract: what every backend (`cpu`, `opencl`) implements.
//!
//! A [`Backend`] owns its buffers (host memory on the CPU, device buffers for OpenCL, which
//! stay on the device across training steps); copies between host and backend are explicit
//! ([`Backend::upload`], [`Backend::download`]). [`Backend::compile`] turns a
//! [`KernelSpec`] and a [`Strategy`] into a [`Kernel`], and [`Kernel::run`] runs it on the
//! backend's buffers, after checking every length with [`Args::check`].
//!
//! ## Buffer lengths (checked before any kernel runs)
//!
//! With `B` the batch and `ld` the row stride of this launch, a matrix of `f` feature rows
//! needs at least `f · ld` elements; the weight values exactly `nnz`; the bias exactly `rows`;
//! the `sddmm` output exactly `nnz`; the `dense_grad` output exactly `rows · cols`. For the
//! convolution ops, which take the same [`Args`] variants as the matrix op of the same
//! [`Role`], `X` has `C·H·W` feature rows and `Y` has `out·OH·OW`
//! ([`KernelSpec::in_features`], [`KernelSpec::out_features`]); the rest is the same. Kernels
//! overwrite their output (elements `0..B` of each output row); the padding columns
//! `B..ld` of an output keep their contents unless [`Kernel::writes_padding`] says the kernel
//! may write them, in which case they are unspecified afterwards.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::pattern::Pattern;
use crate::spec::{KernelSpec, Op, Role};

/// How one backend runs an op. `Auto` asks the backend's planner to choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    /// Let the planner choose.
    Auto,
    /// CPU: machine code with the pattern baked in (Cranelift).
    Jit,
    /// CPU: index-array kernels that take any pattern at run time.
    Generic,
    /// CPU: dense GEMM on the compacted non-empty rows and columns.
    Dense,
    /// OpenCL: generic CSR kernel, built once per device.
    Csr,
    /// OpenCL: the pattern as `__constant` tables.
    Table,
    /// OpenCL: fully unrolled, pattern-specialised code.
    Unrolled,
}

impl Strategy {
    /// Every strategy, `Auto` first.
    pub const ALL: [Strategy; 7] = [
        Strategy::Auto,
        Strategy::Jit,
        Strategy::Generic,
        Strategy::Dense,
        Strategy::Csr,
        Strategy::Table,
        Strategy::Unrolled,
    ];

    /// The name used in the IR, JSON and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Auto => "auto",
            Strategy::Jit => "jit",
            Strategy::Generic => "generic",
            Strategy::Dense => "dense",
            Strategy::Csr => "csr",
            Strategy::Table => "table",
            Strategy::Unrolled => "unrolled",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                format!("unknown strategy {s:?} (expected auto, jit, generic, dense, csr, table or unrolled)")
            })
    }
}

/// Errors of compiling or running kernels, shared by every backend.
#[derive(Debug, Error)]
pub enum BackendError {
    /// A buffer has the wrong length for the kernel's shapes.
    #[error("layer {layer}, {op}: {operand} has {got} elements, needs {rule} = {expected}")]
    Length {
        /// The layer of the kernel.
        layer: String,
        /// The op (IR name).
        op: &'static str,
        /// Which operand (`x`, `y`, `values`, `bias`, …).
        operand: &'static str,
        /// How the required length is computed, e.g. `cols·ld`.
        rule: &'static str,
        /// The required length.
        expected: usize,
        /// The actual length.
        got: usize,
    },
    /// The launch's batch or `ld` is not what the kernel was compiled for, or is inconsistent.
    #[error("layer {layer}, {op}: {message}")]
    Launch {
        /// The layer of the kernel.
        layer: String,
        /// The op (IR name).
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The arguments are for another op than the kernel's.
    #[error("layer {layer}: arguments for {given} given to a {expected} kernel")]
    WrongArgs {
        /// The layer of the kernel.
        layer: String,
        /// The kernel's op.
        expected: &'static str,
        /// The op the arguments are for.
        given: &'static str,
    },
    /// This backend cannot run this op with this strategy.
    #[error("layer {layer}: strategy {strategy} cannot run {op}: {reason}")]
    Unsupported {
        /// The layer.
        layer: String,
        /// The op.
        op: &'static str,
        /// The strategy asked for.
        strategy: Strategy,
        /// Why not.
        reason: String,
    },
    /// Compilation failed.
    #[error("layer {layer}: compiling {op} failed: {message}")]
    Compile {
        /// The layer.
        layer: String,
        /// The op.
        op: &'static str,
        /// The compiler's message.
        message: String,
    },
    /// No OpenCL platform (or other device runtime) is present.
    #[error("no OpenCL platform found")]
    NoPlatform,
    /// The device or its driver reported an error.
    #[error("device error: {0}")]
    Device(String),
}

/// The batch and row stride of one kernel launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Number of batch columns processed.
    pub batch: usize,
    /// Row stride of every activation matrix (`≥ batch`).
    pub ld: usize,
}

impl Launch {
    /// A launch of `batch` columns with row stride `ld`.
    pub fn new(batch: usize, ld: usize) -> Self {
        Launch { batch, ld }
    }
}

/// The operands of one launch, by op role. `B` is the backend's buffer type (`[f32]` on the
/// host). A convolution op takes the variant of its matrix counterpart: `Spmm` for `conv`,
/// `SpmmT` for `conv_t`, `Sddmm` for `conv_grad`, `DenseGrad` for `conv_dense_grad`.
#[derive(Debug)]
pub enum Args<'a, B: ?Sized> {
    /// `Y = W·X (+ bias) (ReLU)`.
    Spmm {
        /// Weight values, `nnz`.
        values: &'a B,
        /// Input `X`, `cols × ld`.
        x: &'a B,
        /// Bias, `rows`; required exactly when the op has a bias epilogue.
        bias: Option<&'a B>,
        /// Output `Y`, `rows × ld`.
        y: &'a mut B,
    },
    /// `dX = Wᵀ·dY`.
    SpmmT {
        /// Weight values, `nnz`.
        values: &'a B,
        /// Upstream gradient `dY`, `rows × ld`.
        dy: &'a B,
        /// Output `dX`, `cols × ld`.
        dx: &'a mut B,
    },
    /// `dW[k] = Σ_b dY[r_k, b]·X[c_k, b]`.
    Sddmm {
        /// Upstream gradient `dY`, `rows × ld`.
        dy: &'a B,
        /// Layer input `X`, `cols × ld`.
        x: &'a B,
        /// Output, `nnz`.
        dw: &'a mut B,
    },
    /// `G[r, c] = Σ_b dY[r, b]·X[c, b]`, dense row-major.
    DenseGrad {
        /// Upstream gradient `dY`, `rows × ld`.
        dy: &'a B,
        /// Layer input `X`, `cols × ld`.
        x: &'a B,
        /// Output, `rows · cols`.
        grad: &'a mut B,
    },
}

/// Anything with a length in `f32` elements: host slices, vectors, device buffers.
pub trait BufferLen {
    /// Number of `f32` elements.
    fn len_f32(&self) -> usize;
}

impl BufferLen for [f32] {
    fn len_f32(&self) -> usize {
        self.len()
    }
}

impl BufferLen for Vec<f32> {
    fn len_f32(&self) -> usize {
        self.len()
    }
}

impl<B: ?Sized> Args<'_, B> {
    /// The IR name of the matrix op these arguments are for (a convolution op of the same
    /// role takes them too).
    pub fn op_name(&self) -> &'static str {
        match self {
            Args::Spmm { .. } => "spmm",
            Args::SpmmT { .. } => "spmm_t",
            Args::Sddmm { .. } => "sddmm",
            Args::DenseGrad { .. } => "dense_grad",
        }
    }

    /// The role of the ops these arguments are for.
    pub fn role(&self) -> Role {
        match self {
            Args::Spmm { .. } => Role::Forward,
            Args::SpmmT { .. } => Role::BackwardData,
            Args::Sddmm { .. } => Role::WeightGrad,
            Args::DenseGrad { .. } => Role::DenseGrad,
        }
    }
}

impl<B: ?Sized + BufferLen> Args<'_, B> {
    /// Checks that these arguments fit `spec` at this launch: the op matches, batch and `ld`
    /// are admitted by the spec and `ld ≥ batch ≥ 1`, and every buffer has the length of the
    /// table in the module doc. Every backend calls this before running anything.
    pub fn check(&self, spec: &KernelSpec, launch: Launch) -> Result<(), BackendError> {
        let layer = || spec.layer().to_string();
        let op = spec.op().name();
        if self.role() != spec.op().role() {
            return Err(BackendError::WrongArgs {
                layer: layer(),
                expected: op,
                given: self.op_name(),
            });
        }
        let launch_err = |message: String| BackendError::Launch {
            layer: layer(),
            op,
            message,
        };
        if launch.batch == 0 {
            return Err(launch_err("batch must be at least 1".into()));
        }
        if launch.ld < launch.batch {
            return Err(launch_err(format!(
                "ld = {} is smaller than batch = {}",
                launch.ld, launch.batch
            )));
        }
        if !spec.batch().admits(launch.batch) {
            return Err(launch_err(format!(
                "compiled for batch {}, launched with {}",
                spec.batch(),
                launch.batch
            )));
        }
        if !spec.ld().admits(launch.ld) {
            return Err(launch_err(format!(
                "compiled for ld {}, launched with {}",
                spec.ld(),
                launch.ld
            )));
        }
        let p: &Pattern = spec.pattern();
        // Feature rows of the output side (`Y`, `dY`) and the input side (`X`, `dX`).
        let too_big = || {
            launch_err(format!(
                "ld = {} makes the operands larger than memory",
                launch.ld
            ))
        };
        let rows_ld = spec
            .out_features()
            .checked_mul(launch.ld)
            .ok_or_else(too_big)?;
        let cols_ld = spec
            .in_features()
            .checked_mul(launch.ld)
            .ok_or_else(too_big)?;
        let (rows_rule, cols_rule) = if spec.geometry().is_some() {
            ("out·OH·OW·ld", "C·H·W·ld")
        } else {
            ("rows·ld", "cols·ld")
        };
        let at_least = |operand, rule, expected, got: usize| {
            if got < expected {
                Err(BackendError::Length {
                    layer: layer(),
                    op,
                    operand,
                    rule,
                    expected,
                    got,
                })
            } else {
                Ok(())
            }
        };
        let exactly = |operand, rule, expected, got: usize| {
            if got != expected {
                Err(BackendError::Length {
                    layer: layer(),
                    op,
                    operand,
                    rule,
                    expected,
                    got,
                })
            } else {
                Ok(())
            }
        };
        match self {
            Args::Spmm { values, x, bias, y } => {
                exactly("values", "nnz", p.nnz(), values.len_f32())?;
                at_least("x", cols_rule, cols_ld, x.len_f32())?;
                at_least("y", rows_rule, rows_ld, y.len_f32())?;
                let wants_bias = spec.op().has_bias();
                match (bias, wants_bias) {
                    (Some(b), true) => exactly("bias", "rows", p.rows(), b.len_f32())?,
                    (None, false) => {}
                    (Some(_), false) => {
                        return Err(launch_err(
                            "a bias was given to a kernel without bias epilogue".into(),
                        ))
                    }
                    (None, true) => {
                        return Err(launch_err(
                            "the kernel adds a bias but none was given".into(),
                        ))
                    }
                }
            }
            Args::SpmmT { values, dy, dx } => {
                exactly("values", "nnz", p.nnz(), values.len_f32())?;
                at_least("dy", rows_rule, rows_ld, dy.len_f32())?;
                at_least("dx", cols_rule, cols_ld, dx.len_f32())?;
            }
            Args::Sddmm { dy, x, dw } => {
                at_least("dy", rows_rule, rows_ld, dy.len_f32())?;
                at_least("x", cols_rule, cols_ld, x.len_f32())?;
                exactly("dw", "nnz", p.nnz(), dw.len_f32())?;
            }
            Args::DenseGrad { dy, x, grad } => {
                at_least("dy", rows_rule, rows_ld, dy.len_f32())?;
                at_least("x", cols_rule, cols_ld, x.len_f32())?;
                exactly("grad", "rows·cols", p.rows() * p.cols(), grad.len_f32())?;
            }
        }
        Ok(())
    }
}

/// A compiled kernel: one [`KernelSpec`] and the strategy that runs it.
pub trait Kernel {
    /// The backend's buffer type.
    type Buffer: ?Sized + BufferLen;

    /// What this kernel computes.
    fn spec(&self) -> &KernelSpec;

    /// How it computes it (never `Auto`).
    fn strategy(&self) -> Strategy;

    /// Runs the kernel. Checks the arguments with [`Args::check`] before touching memory.
    fn run(&self, launch: Launch, args: Args<'_, Self::Buffer>) -> Result<(), BackendError>;

    /// Whether a run may write the output's padding columns `batch..ld` (leaving them
    /// unspecified). When false, a run leaves every padding column of its output as it found
    /// it, so a buffer shared with other code keeps them; when true, the caller clears them
    /// if it needs them (CONTRACTS.md, "Data layout and kernel semantics").
    fn writes_padding(&self) -> bool;
}

/// A place where kernels run, with its own buffers and compiler.
pub trait Backend {
    /// The kernels this backend compiles.
    type Kernel: Kernel;
    /// An owned buffer of `f32` on this backend; it borrows as the kernels' buffer type
    /// (`Vec<f32>` borrows as `[f32]` on the CPU).
    type Buffer: std::borrow::BorrowMut<<Self::Kernel as Kernel>::Buffer>;

    /// The backend name: `cpu` or `opencl`.
    fn name(&self) -> &'static str;

    /// The device, in words (part of kernel cache keys).
    fn device(&self) -> String;

    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::Buffer, BackendError>;

    /// Copies `data` into `buffer` (lengths must match).
    fn upload(&self, data: &[f32], buffer: &mut Self::Buffer) -> Result<(), BackendError>;

    /// Copies `buffer` into `out` (lengths must match).
    fn download(&self, buffer: &Self::Buffer, out: &mut [f32]) -> Result<(), BackendError>;

    /// Compiles `spec` with `strategy` (`Auto` lets the backend's planner choose).
    fn compile(&self, spec: &KernelSpec, strategy: Strategy) -> Result<Self::Kernel, BackendError>;
}

/// The key of a kernel cache: backend and device, op with its epilogue, pattern hash, batch,
/// `ld`, strategy, and a convolution's geometry (CONTRACTS.md).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Backend name and device, e.g. `cpu/avx512`.
    pub device: String,
    /// The op, epilogue included.
    pub op: Op,
    /// [`Pattern::hash`] of the weight pattern.
    pub pattern_hash: u64,
    /// The batch the kernel was compiled for.
    pub batch: crate::spec::Dim,
    /// The row stride the kernel was compiled for.
    pub ld: crate::spec::Dim,
    /// The strategy (never `Auto`).
    pub strategy: Strategy,
    /// The convolution geometry, for a convolution op.
    pub conv: Option<crate::spec::ConvGeometry>,
}

impl CacheKey {
    /// The key of `spec` compiled with `strategy` on `device`.
    pub fn new(device: impl Into<String>, spec: &KernelSpec, strategy: Strategy) -> Self {
        CacheKey {
            device: device.into(),
            op: spec.op(),
            pattern_hash: spec.pattern().hash(),
            batch: spec.batch(),
            ld: spec.ld(),
            strategy,
            conv: spec.geometry().copied(),
        }
    }
}
