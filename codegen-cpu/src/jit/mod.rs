//! The Cranelift JIT: machine code specialised to one exact nonzero pattern.
//!
//! [`JitKernel::compile`] turns a [`KernelSpec`] (`spmm` with its epilogue, `spmm_t` or
//! `sddmm`, with a fixed batch and row stride) into one function per row chunk
//! ([`chunk_rows`]: boundaries chosen by the rows' content, about [`JitOptions::chunk_nnz`]
//! nonzeros each on average) in which the column
//! offsets are immediates; the weight values are read from the value array passed at run
//! time. `spmm_t` compiles the transposed pattern ([`Pattern::transpose`]) with the value
//! positions of its `value_index` baked in. `dense_grad` and `conv_dense_grad` have no
//! pattern to bake in and are left to the generic and dense strategies. The convolutions
//! `conv`, `conv_t` and `conv_grad` compile in the `conv` module: functions per chunk of
//! written channels over one tile of positions, the Rust side walking the tiles.
//!
//! Code is owned per chunk: chunks compile in parallel, and a chunk whose code is alive in any
//! kernel (same op, batch, `ld`, code shape and structure) is reused rather than compiled, so
//! after a mask update only the chunks whose rows changed compile (for `spmm` and `sddmm`,
//! whose code does not depend on where the chunk sits in the layer; `spmm_t` bakes in absolute
//! value positions, which shift whenever an earlier row of `W` changes its nonzero count). A
//! chunk's machine code is unmapped when the last kernel using it is dropped. [`CompileStats`]
//! tells what happened. An update that prunes and regrows a share of the whole layer, as
//! sparse momentum does, touches every chunk and recompiles everything; hot swap
//! ([`crate::swap`]) takes that compilation off the training thread.
//!
//! The code shapes are described in the `emit` module. The defaults of [`JitOptions`] were
//! chosen by measurement (`examples/jit_bench.rs`, single thread, medians of interleaved
//! runs; the figures are in `docs/MEASUREMENTS.md`):
//!
//! - `opt_level` `none`: `speed` compiles slower and its kernels run slower (it hoists the
//!   weight loads out of the rows and spills them);
//! - one `f32x4` per batch block (`block_vectors = 1`), looping over the blocks: half the code
//!   of two vectors, and code size is what decides;
//! - four accumulator sets per row: one set hides too little FMA latency, two are within
//!   noise of four;
//! - chunks of ~1000 nonzeros: smaller and larger chunks compile slower per nonzero;
//! - the backtracking register allocator with the verifier off: the verifier doubles the
//!   compile time; `single_pass` ([`Regalloc::SinglePass`]) halves it but costs kernel speed,
//!   most for `sddmm`, whose code it makes larger.
//!
//! Compile time follows the machine instructions emitted: `spmm` at batch 8 emits ~2.5 per
//! nonzero (the batch blocks loop over one copy of the code), `sddmm` at batch 8 ~6.5 (the
//! batch unrolled per nonzero, two loads and two multiplies, plus a quarter of a 4×4
//! transpose-and-add per nonzero), which is why `sddmm` compiles several times slower.

mod code;
mod conv;
mod emit;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cranelift_codegen::Context;
use cranelift_frontend::FunctionBuilderContext;
use sparse_ir::backend::Kernel;
use sparse_ir::{Args, BackendError, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

use code::{ChunkCode, ChunkKey, CodegenConfig, Job};
use emit::{ChunkOp, ChunkSource, Shape};

/// Cranelift's optimisation level for the generated code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OptLevel {
    /// No optimisation passes (the fastest compile; also the fastest kernels measured here:
    /// `speed` hoists the weight loads out of the rows and spills).
    None,
    /// Cranelift's `speed`.
    Speed,
}

impl OptLevel {
    fn name(self) -> &'static str {
        match self {
            OptLevel::None => "none",
            OptLevel::Speed => "speed",
        }
    }
}

/// Cranelift's register allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Regalloc {
    /// The backtracking allocator (slower to compile, better code).
    Backtracking,
    /// The single-pass allocator (about half the compile time, slower code).
    SinglePass,
}

impl Regalloc {
    fn name(self) -> &'static str {
        match self {
            Regalloc::Backtracking => "backtracking",
            Regalloc::SinglePass => "single_pass",
        }
    }
}

/// How to compile: code shape, code generator settings, parallelism and text capture.
#[derive(Debug, Clone, PartialEq)]
pub struct JitOptions {
    /// Threads compiling chunks in parallel (at least 1).
    pub threads: usize,
    /// Average nonzeros per chunk function (a row is never split; see [`chunk_rows`]).
    pub chunk_nnz: usize,
    /// Independent accumulator sets per row in `spmm`/`spmm_t` (1 to 4).
    pub accumulators: usize,
    /// `f32x4` vectors per batch block in `spmm`/`spmm_t` (1 to 4).
    pub block_vectors: usize,
    /// Cranelift optimisation level.
    pub opt_level: OptLevel,
    /// Cranelift register allocator.
    pub regalloc: Regalloc,
    /// Run Cranelift's IR verifier (slow; for debugging the generator).
    pub verifier: bool,
    /// Reuse live chunk code from the global cache (off: always compile, for measurements).
    pub use_cache: bool,
    /// Keep the CLIF text of every function ([`FunctionInfo::clif`]).
    pub capture_clif: bool,
    /// Keep the machine code listing of every function ([`FunctionInfo::disasm`]).
    pub capture_disasm: bool,
}

impl Default for JitOptions {
    fn default() -> Self {
        JitOptions {
            threads: 2,
            chunk_nnz: 1000,
            accumulators: 4,
            block_vectors: 1,
            opt_level: OptLevel::None,
            regalloc: Regalloc::Backtracking,
            verifier: false,
            use_cache: true,
            capture_clif: false,
            capture_disasm: false,
        }
    }
}

/// What one compilation did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompileStats {
    /// Chunk functions of the kernel.
    pub functions: usize,
    /// Functions compiled by this call.
    pub compiled: usize,
    /// Functions whose live code was taken from the global cache.
    pub reused: usize,
    /// Functions identical to another chunk of the same kernel (compiled once).
    pub shared: usize,
    /// Nonzeros of the kernel's pattern.
    pub nnz: usize,
    /// Nonzeros in the chunks compiled by this call.
    pub compiled_nnz: usize,
    /// Machine code bytes of all the kernel's functions.
    pub code_bytes: usize,
    /// Wall time of the whole compilation, milliseconds.
    pub compile_ms: f64,
    /// Threads used.
    pub threads: usize,
}

impl CompileStats {
    /// Compile time per compiled nonzero, microseconds (0 when nothing compiled).
    pub fn us_per_compiled_nnz(&self) -> f64 {
        if self.compiled_nnz == 0 {
            0.0
        } else {
            self.compile_ms * 1e3 / self.compiled_nnz as f64
        }
    }
}

/// Chunk functions alive in this process and their machine code bytes (diagnostics: shows
/// that code is freed when no kernel uses it).
pub fn live_code() -> (usize, usize) {
    code::live()
}

/// What compiling a spec would give, predicted without compiling (for planners).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JitEstimate {
    /// Machine code bytes of all the kernel's functions (a fit of measured sizes, within 4 %).
    pub code_bytes: usize,
    /// Single-thread compile time, microseconds: a fixed rate per byte of code with the
    /// default options, fitted on the development machine (`docs/MEASUREMENTS.md`).
    pub compile_us: f64,
    /// Whether the code fits the 32 KiB L1 instruction cache with room to spare (24 KiB):
    /// the measured region where the JIT beats the generic kernels (batch 1 and small
    /// layers at batch 8); above it the code streams from L2 on every call.
    pub fits_l1i: bool,
}

/// Measured `sddmm` code bytes per row and per nonzero for batches 1 to 15 (scalar columns
/// cost more than vector ones).
const SDDMM_ROW_BYTES: [f64; 15] = [
    6.9, 13.8, 20.7, 6.9, 13.8, 20.1, 24.3, 10.3, 17.0, 22.1, 25.3, 13.7, 19.3, 23.1, 26.3,
];
const SDDMM_NNZ_BYTES: [f64; 15] = [
    13.1, 25.1, 37.1, 22.4, 46.4, 63.1, 82.1, 39.4, 63.6, 81.6, 102.1, 56.4, 81.9, 101.6, 122.1,
];

/// The most nonzeros of one row (a row of the pattern the code walks: `W`'s for `spmm`,
/// `sddmm`, `conv` and `conv_grad`, `Wᵀ`'s for `spmm_t`, an input channel's entries for
/// `conv_t`) that the JIT compiles.
///
/// A row is never split across functions, so the row bounds the size of one function, and
/// one function compiles on one thread: a row of 400,000 nonzeros took 2 s (`spmm`) and 14 s
/// (`sddmm`) at batch 100 and 2.9 GB of compiler memory. Compile time is linear in the
/// nonzeros (~5 µs per nonzero for `spmm`, ~33 µs for `sddmm` at batch 100), so a row at the
/// bound compiles in under 0.3 s. Above it the JIT refuses with `Unsupported`, and the
/// planner does not consider it ([`estimate`] gives `None`): the generic or dense kernels
/// run such a layer, where the JIT's code would not fit the instruction cache anyway.
pub const MAX_ROW_NNZ: usize = 8192;

/// The longest row of the pattern the JIT's code for `spec` walks (see [`MAX_ROW_NNZ`]).
pub fn longest_code_row(spec: &KernelSpec) -> usize {
    let p = spec.pattern();
    match (spec.op(), spec.geometry()) {
        (Op::SpmmT, _) => p.col_counts().into_iter().max().unwrap_or(0),
        (Op::ConvT, Some(g)) => {
            let mut per_channel = vec![0usize; g.in_channels];
            for &c in p.col_idx() {
                if let Some(n) = per_channel.get_mut(c as usize / g.taps().max(1)) {
                    *n += 1;
                }
            }
            per_channel.into_iter().max().unwrap_or(0)
        }
        _ => p.row_counts().max().unwrap_or(0),
    }
}

/// The `Unsupported` reason for a spec whose longest code row is over [`MAX_ROW_NNZ`].
fn row_bound_reason(spec: &KernelSpec) -> Option<String> {
    let longest = longest_code_row(spec);
    (longest > MAX_ROW_NNZ).then(|| {
        format!(
            "a row of {longest} nonzeros is more than the {MAX_ROW_NNZ} one JIT function \
             compiles (a row is one function, compiled on one thread); the generic and dense \
             strategies run it"
        )
    })
}

/// L1 instruction cache budget for [`JitEstimate::fits_l1i`].
const L1I_BUDGET: usize = 24 * 1024;

/// Predicts the code size and compile time of `JitKernel::compile(spec)` with the default
/// options, without compiling; `None` where the JIT does not compile the spec (`dense_grad`,
/// a batch or `ld` not fixed, a row longer than [`MAX_ROW_NNZ`]).
///
/// Bytes per row and per nonzero were fitted by least squares on five random layers
/// (`jit_bench sizes`); they depend on the op and on the batch only through its shape class.
pub fn estimate(spec: &KernelSpec) -> Option<JitEstimate> {
    let (Dim::Fixed(batch), Dim::Fixed(_)) = (spec.batch(), spec.ld()) else {
        return None;
    };
    let p = spec.pattern();
    // (bytes per row of the code's pattern, bytes per nonzero)
    let (per_row, per_nnz, rows) = match spec.op() {
        Op::Spmm { .. } if batch == 1 => (11.0, 14.1, p.rows()),
        Op::Spmm { .. } => (11.0, 15.2, p.rows()),
        Op::SpmmT if batch == 1 => (15.0, 17.0, p.cols()),
        Op::SpmmT => (15.0, 18.0, p.cols()),
        Op::Sddmm if batch < 16 => (
            SDDMM_ROW_BYTES[batch - 1],
            SDDMM_NNZ_BYTES[batch - 1],
            p.rows(),
        ),
        Op::Sddmm => (24.0, 106.0, p.rows()),
        Op::DenseGrad | Op::Conv { .. } | Op::ConvT | Op::ConvGrad | Op::ConvDenseGrad => {
            return None
        }
    };
    if longest_code_row(spec) > MAX_ROW_NNZ {
        return None;
    }
    let code_bytes = (per_row * rows as f64 + per_nnz * p.nnz() as f64).round() as usize;
    Some(JitEstimate {
        code_bytes,
        compile_us: 0.2 * code_bytes as f64,
        fits_l1i: code_bytes <= L1I_BUDGET,
    })
}

/// A chunk's rows and the positions of its nonzeros.
struct ChunkRange {
    rows: Range<usize>,
    nnz: Range<usize>,
}

/// Splits the rows of `pattern` into the chunks the JIT compiles one function each for:
/// runs of consecutive rows of about `target_nnz` nonzeros on average, whose boundaries are
/// chosen by the rows' content, so that a change to a few rows moves no boundary elsewhere.
///
/// A chunk ends after row `r` when a hash of that row's columns falls below the fraction
/// `nnz(r) / target` of the hash range (so a chunk ends, on average, every `target`
/// nonzeros whatever the row lengths, and a row of `target` nonzeros or more always ends
/// its chunk); a chunk that reaches `4·target` nonzeros ends anyway (about 2 % of chunks), and
/// so does one that reaches `4·target` rows (each row costs code, empty ones too: a
/// `10⁶`-row layer at density `10⁻⁹` was one function of 12 MB). A row is never split. Whether a row ends a chunk depends on that row alone (except for the
/// size cap), so after an update that changes a few rows the chunking agrees with the old
/// one from the first boundary after each changed row on: only the chunk holding a changed
/// row gets new content (two chunks where the row's own boundary appeared, one where it
/// went), and the rest of the kernel's code is reused. Greedy chunking by count
/// ([`Pattern::chunks`]), by contrast, moves every later boundary once a row gains or loses
/// enough nonzeros to move one.
pub fn chunk_rows(pattern: &Pattern, target_nnz: usize) -> Vec<Range<usize>> {
    let target = target_nnz.max(1) as u128;
    let max = 4 * target;
    let row_ptr = pattern.row_ptr();
    let col_idx = pattern.col_idx();
    let mut chunks = Vec::new();
    let mut start = 0;
    for r in 0..pattern.rows() {
        let (a, b) = (row_ptr[r] as usize, row_ptr[r + 1] as usize);
        let len = (b - a) as u128;
        let end_here = if len >= target
            || (b - row_ptr[start] as usize) as u128 >= max
            || (r + 1 - start) as u128 >= max
        {
            true
        } else if len == 0 {
            false
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            col_idx[a..b].hash(&mut h);
            // P(end) = len / target, in 64-bit fixed point
            (h.finish() as u128) < (len << 64) / target
        };
        if end_here || r + 1 == pattern.rows() {
            chunks.push(start..r + 1);
            start = r + 1;
        }
    }
    chunks
}

/// One chunk function of a kernel, for dumps.
#[derive(Debug, Clone)]
pub struct FunctionInfo<'a> {
    /// Position in the kernel.
    pub index: usize,
    /// Rows it covers: rows of `W` (`spmm`, `sddmm`) or of `Wᵀ`, i.e. columns of `W` (`spmm_t`).
    pub rows: Range<usize>,
    /// Its nonzeros (positions in the CSR arrays of the pattern it covers).
    pub nnz: Range<usize>,
    /// Machine code bytes.
    pub code_bytes: usize,
    /// Whether its code was reused from the global cache.
    pub reused: bool,
    /// CLIF text, when captured.
    pub clif: Option<&'a str>,
    /// Machine code listing, when captured.
    pub disasm: Option<&'a str>,
    /// Cranelift's VCode listing, captured with the disassembly.
    pub vcode: Option<&'a str>,
}

struct ChunkRun {
    code: Arc<ChunkCode>,
    rows: Range<usize>,
    nnz: Range<usize>,
    /// Offset (elements) of the first pointer argument.
    a_off: usize,
    /// Offset (elements) of the output pointer.
    out_off: usize,
    /// Offset (elements) of the bias pointer.
    bias_off: usize,
    reused: bool,
}

/// A compiled JIT kernel: one function per row chunk, with the pattern baked in.
pub struct JitKernel {
    spec: KernelSpec,
    chunks: Vec<ChunkRun>,
    stats: CompileStats,
    writes_padding: bool,
    /// A convolution's calls over its tiles (its functions are `chunks`).
    conv: Option<conv::ConvPlan>,
}

impl std::fmt::Debug for JitKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitKernel")
            .field("layer", &self.spec.layer())
            .field("op", &self.spec.op())
            .field("stats", &self.stats)
            .finish()
    }
}

/// The signature of every chunk function (see the `emit` module for the arguments).
type ChunkFn = unsafe extern "C" fn(*const f32, *const f32, *mut f32, *const f32);

impl JitKernel {
    /// Compiles `spec` with the default options.
    pub fn compile(spec: &KernelSpec) -> Result<JitKernel, BackendError> {
        Self::compile_with(spec, &JitOptions::default())
    }

    /// Compiles `spec` with `options`.
    ///
    /// Errors: `Unsupported` for `dense_grad`, `conv_dense_grad`, for a batch or `ld`
    /// that is not fixed, and for a row longer than [`MAX_ROW_NNZ`] nonzeros;
    /// `Compile` for invalid options or a code generator failure.
    pub fn compile_with(
        spec: &KernelSpec,
        options: &JitOptions,
    ) -> Result<JitKernel, BackendError> {
        compile_cancellable(spec, options, None)
    }

    /// The spec this kernel computes.
    pub fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    /// What the compilation did.
    pub fn stats(&self) -> &CompileStats {
        &self.stats
    }

    /// The chunk functions, in row order.
    pub fn functions(&self) -> impl ExactSizeIterator<Item = FunctionInfo<'_>> {
        self.chunks
            .iter()
            .enumerate()
            .map(|(index, c)| FunctionInfo {
                index,
                rows: c.rows.clone(),
                nnz: c.nnz.clone(),
                code_bytes: c.code.code_len(),
                reused: c.reused,
                clif: c.code.clif(),
                disasm: c.code.disasm(),
                vcode: c.code.vcode(),
            })
    }

    /// Runs the kernel on host slices, after checking them with [`Args::check`].
    pub fn run(&self, launch: Launch, args: Args<'_, [f32]>) -> Result<(), BackendError> {
        args.check(&self.spec, launch)?;
        if let Some(plan) = &self.conv {
            plan.run(&self.chunks, args);
            return Ok(());
        }
        // After the check: the op matches, batch and ld equal the compiled ones, and every
        // buffer has the length of the table in `sparse_ir::backend`.
        let (a, b, out, bias) = match args {
            Args::Spmm { values, x, bias, y } => (values, x, y, bias),
            Args::SpmmT { values, dy, dx } => (values, dy, dx, None),
            Args::Sddmm { dy, x, dw } => (dy, x, dw, None),
            Args::DenseGrad { .. } => unreachable!("no JIT kernel is compiled for dense_grad"),
        };
        for c in &self.chunks {
            let a_ptr = a[c.a_off..].as_ptr();
            let out_ptr = out[c.out_off..].as_mut_ptr();
            let bias_ptr = bias.map_or(std::ptr::null(), |bias| bias[c.bias_off..].as_ptr());
            // SAFETY: the chunk's code was generated for this spec's op, batch and ld (its
            // cache key holds them and its structure was compared on reuse), and reads and
            // writes only: `a` at the chunk's value positions (< nnz) or its dY rows
            // (< rows·ld), `b` at `c·ld + j` for a column `c < cols` and `j < ld`, `out` within
            // the chunk's output rows (`< rows·ld` from its start) or its `dw` range, `bias`
            // within the chunk's rows. `Args::check` proved every one of those ranges lies
            // inside its slice, and the offsets above are inside them too (slicing checks).
            // The output does not alias the inputs (`&mut`). The code is alive (`Arc`).
            unsafe {
                let f: ChunkFn = std::mem::transmute::<*const u8, ChunkFn>(c.code.entry());
                f(a_ptr, b.as_ptr(), out_ptr, bias_ptr);
            }
        }
        Ok(())
    }
}

/// The two errors a JIT compilation of `spec` reports: `Unsupported` (with the reason) and
/// `Compile` (with the compiler's message), both naming the layer and op.
pub(crate) fn spec_errors(
    spec: &KernelSpec,
) -> (
    impl Fn(String) -> BackendError,
    impl Fn(String) -> BackendError,
) {
    let (layer, op) = (spec.layer().to_string(), spec.op().name());
    let layer2 = layer.clone();
    (
        move |reason| BackendError::Unsupported {
            layer: layer.clone(),
            op,
            strategy: Strategy::Jit,
            reason,
        },
        move |message| BackendError::Compile {
            layer: layer2.clone(),
            op,
            message,
        },
    )
}

/// [`JitKernel::compile_with`], stopping with a `Compile` error before the next chunk once
/// `cancel` is set (the background compilation of a hot-swap kernel nobody waits for).
pub(crate) fn compile_cancellable(
    spec: &KernelSpec,
    options: &JitOptions,
    cancel: Option<&AtomicBool>,
) -> Result<JitKernel, BackendError> {
    let start = Instant::now();
    let op_name = spec.op().name();
    let (unsupported, compile_err) = spec_errors(spec);
    let op = match spec.op() {
        Op::Spmm { bias, relu } => ChunkOp::Spmm { bias, relu },
        Op::SpmmT => ChunkOp::SpmmT,
        Op::Sddmm => ChunkOp::Sddmm,
        Op::DenseGrad | Op::ConvDenseGrad => {
            return Err(unsupported(format!(
                "{op_name} covers every entry, so there is no pattern to bake in \
                 (use the generic or dense strategy)"
            )))
        }
        Op::Conv { .. } | Op::ConvT | Op::ConvGrad => {
            let (Dim::Fixed(batch), Dim::Fixed(ld)) = (spec.batch(), spec.ld()) else {
                return Err(unsupported(format!(
                    "the code bakes in the batch and row stride, so both must be fixed \
                     (got batch {}, ld {})",
                    spec.batch(),
                    spec.ld()
                )));
            };
            check_options(options).map_err(&compile_err)?;
            if let Some(reason) = row_bound_reason(spec) {
                return Err(unsupported(reason));
            }
            return conv::compile(spec, options, cancel, batch, ld, start);
        }
    };
    let (batch, ld) = match (spec.batch(), spec.ld()) {
        (Dim::Fixed(b), Dim::Fixed(l)) => (b, l),
        (b, l) => {
            return Err(unsupported(format!(
                "the code bakes in the batch and row stride, so both must be fixed \
                 (got batch {b}, ld {l})"
            )))
        }
    };
    check_options(options).map_err(&compile_err)?;
    if let Some(reason) = row_bound_reason(spec) {
        return Err(unsupported(reason));
    }
    let config = CodegenConfig {
        opt_level: options.opt_level,
        regalloc: options.regalloc,
        verifier: options.verifier,
    };
    let isa = code::isa_for(config).map_err(&compile_err)?;
    let shape = Shape {
        batch,
        ld,
        accumulators: options.accumulators,
        block_vectors: options.block_vectors,
        fma: code::has_fma(&*isa),
    };

    let transposed;
    let (pattern, value_index): (&Pattern, Option<&[u32]>) = if op == ChunkOp::SpmmT {
        transposed = spec.pattern().transpose();
        (&transposed.pattern, Some(&transposed.value_index))
    } else {
        (spec.pattern(), None)
    };
    let out_rows = match op {
        ChunkOp::Sddmm => 0,
        _ => pattern.rows(),
    };

    // Describe every chunk.
    let chunks = chunk_rows(pattern, options.chunk_nnz);
    let mut jobs = Vec::with_capacity(chunks.len());
    let mut runs = Vec::with_capacity(chunks.len());
    for rows in &chunks {
        let nnz = pattern.row_ptr()[rows.start] as usize..pattern.row_ptr()[rows.end] as usize;
        let ch = ChunkRange {
            rows: rows.clone(),
            nnz,
        };
        let src = ChunkSource {
            row_ptr: &pattern.row_ptr()[ch.rows.start..=ch.rows.end],
            col_idx: &pattern.col_idx()[ch.nnz.clone()],
            value_pos: value_index.map(|vi| &vi[ch.nnz.clone()]),
            cols: pattern.cols(),
            conv: None,
        };
        if !emit::offsets_fit(&src, &shape, out_rows.max(pattern.rows())) {
            return Err(unsupported(format!(
                "offsets of a {}x{} pattern with ld {ld} do not fit 32-bit immediates",
                pattern.rows(),
                pattern.cols()
            )));
        }
        // The chunk's own structure (local row pointers, columns, value positions): what
        // its code depends on, whatever rows of the layer it sits at.
        let base = src.row_ptr[0];
        let mut content: Vec<u32> = src.row_ptr.iter().map(|&p| p - base).collect();
        content.extend_from_slice(src.col_idx);
        if let Some(pos) = src.value_pos {
            content.extend_from_slice(pos);
        }
        let hash = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            pattern.cols().hash(&mut h);
            content.hash(&mut h);
            h.finish()
        };
        let key = ChunkKey {
            op,
            shape,
            opt_level: options.opt_level,
            regalloc: options.regalloc,
            hash,
            rows: ch.rows.len(),
            cols: pattern.cols(),
            nnz: ch.nnz.len(),
        };
        let (a_off, out_off, bias_off) = match op {
            ChunkOp::Spmm { .. } => (ch.nnz.start, ch.rows.start * ld, ch.rows.start),
            ChunkOp::SpmmT => (0, ch.rows.start * ld, 0),
            ChunkOp::Sddmm => (ch.rows.start * ld, ch.nnz.start, 0),
            ChunkOp::ConvGather { .. } | ChunkOp::ConvGrad { .. } => {
                unreachable!("convolutions compile in jit::conv")
            }
        };
        runs.push((ch.rows.clone(), ch.nnz.clone(), a_off, out_off, bias_off));
        jobs.push(Job { key, content, src });
    }

    // Resolve from the global cache, and share identical chunks within the kernel.
    let mut resolved: Vec<Option<Arc<ChunkCode>>> = Vec::with_capacity(jobs.len());
    let mut reused = vec![false; jobs.len()];
    let mut first_of: HashMap<&ChunkKey, usize> = HashMap::new();
    let mut same_as: Vec<Option<usize>> = vec![None; jobs.len()];
    let mut to_compile = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let hit = if options.use_cache {
            code::lookup(&job.key, &job.content)
        } else {
            None
        };
        if hit.is_some() {
            reused[i] = true;
        } else if let Some(&j) = first_of.get(&job.key) {
            if jobs[j].content == job.content {
                same_as[i] = Some(j);
            } else {
                to_compile.push(i);
            }
        } else {
            first_of.insert(&job.key, i);
            to_compile.push(i);
        }
        resolved.push(hit);
    }

    let threads = options.threads.min(to_compile.len()).max(1);
    let capture = code::Capture {
        clif: options.capture_clif,
        disasm: options.capture_disasm,
    };
    let results = parallel_map(&to_compile, threads, |fctx, ctx, i| {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err("cancelled".to_string());
        }
        code::compile_job(&*isa, fctx, ctx, i as u32, &jobs[i], capture)
    });
    for (&i, result) in to_compile.iter().zip(results) {
        let chunk = result.map_err(|m| compile_err(format!("chunk {i}: {m}")))?;
        resolved[i] = Some(if options.use_cache {
            code::publish(chunk)
        } else {
            chunk
        });
    }
    for i in 0..jobs.len() {
        if let Some(j) = same_as[i] {
            resolved[i] = resolved[j].clone();
        }
    }
    let resolved: Vec<Arc<ChunkCode>> = resolved
        .into_iter()
        .map(|c| c.expect("every chunk resolved"))
        .collect();

    // Text for reused chunks compiled earlier without it.
    if capture.clif || capture.disasm {
        let missing: Vec<usize> = (0..jobs.len())
            .filter(|&i| {
                (capture.clif && resolved[i].clif().is_none())
                    || (capture.disasm && resolved[i].disasm().is_none())
            })
            .collect();
        let results = parallel_map(&missing, threads, |fctx, ctx, i| {
            code::fill_text(&*isa, fctx, ctx, i as u32, &jobs[i], &resolved[i], capture)
        });
        for (&i, r) in missing.iter().zip(results) {
            r.map_err(|m| compile_err(format!("chunk {i}: {m}")))?;
        }
    }

    let compiled_nnz = to_compile.iter().map(|&i| jobs[i].key.nnz).sum();
    let chunks: Vec<ChunkRun> = runs
        .into_iter()
        .zip(resolved)
        .zip(reused)
        .map(
            |(((rows, nnz, a_off, out_off, bias_off), code), reused)| ChunkRun {
                code,
                rows,
                nnz,
                a_off,
                out_off,
                bias_off,
                reused,
            },
        )
        .collect();
    let stats = CompileStats {
        functions: chunks.len(),
        compiled: to_compile.len(),
        reused: chunks.iter().filter(|c| c.reused).count(),
        shared: same_as.iter().flatten().count(),
        nnz: pattern.nnz(),
        compiled_nnz,
        code_bytes: chunks.iter().map(|c| c.code.code_len()).sum(),
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
        threads,
    };
    Ok(JitKernel {
        spec: spec.clone(),
        writes_padding: !chunks.is_empty()
            && code_writes_padding(spec.op(), batch, ld, options.block_vectors),
        chunks,
        stats,
        conv: None,
    })
}

/// Whether `spmm`/`spmm_t` code for this batch and `ld` with `block_vectors` stores into the
/// padding columns `batch..ld`: its passes ([`emit::plan_passes`]) store whole `f32x4`
/// vectors, and when `ld` leaves room the last block runs over the padding instead of a
/// scalar tail. `sddmm` writes the value array only. Batch 1 is one scalar pass.
pub(crate) fn code_writes_padding(op: Op, batch: usize, ld: usize, block_vectors: usize) -> bool {
    matches!(op, Op::Spmm { .. } | Op::SpmmT)
        && emit::plan_passes(batch, ld, block_vectors)
            .iter()
            .any(|p| p.start + p.count * 4 * p.vectors + p.scalars > batch)
}

impl Kernel for JitKernel {
    type Buffer = [f32];

    fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    fn strategy(&self) -> Strategy {
        Strategy::Jit
    }

    fn run(&self, launch: Launch, args: Args<'_, [f32]>) -> Result<(), BackendError> {
        JitKernel::run(self, launch, args)
    }

    /// True for `spmm`/`spmm_t` whose last `f32x4` block runs over the padding: a batch
    /// above 1 that is not a multiple of the block width (4 floats times the
    /// [`JitOptions::block_vectors`] the batch uses), where `ld` leaves room for the block.
    fn writes_padding(&self) -> bool {
        self.writes_padding
    }
}

fn check_options(o: &JitOptions) -> Result<(), String> {
    if o.threads == 0 {
        return Err("invalid JitOptions: threads must be at least 1".into());
    }
    if o.chunk_nnz == 0 {
        return Err("invalid JitOptions: chunk_nnz must be at least 1".into());
    }
    if !(1..=4).contains(&o.accumulators) {
        return Err(format!(
            "invalid JitOptions: accumulators must be 1 to 4, got {}",
            o.accumulators
        ));
    }
    if !(1..=4).contains(&o.block_vectors) {
        return Err(format!(
            "invalid JitOptions: block_vectors must be 1 to 4, got {}",
            o.block_vectors
        ));
    }
    Ok(())
}

/// Runs `f` on every item with `threads` workers (the calling thread is one of them), each
/// with its own builder and compilation contexts; results in item order.
fn parallel_map<T: Send>(
    items: &[usize],
    threads: usize,
    f: impl Fn(&mut FunctionBuilderContext, &mut Context, usize) -> T + Sync,
) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<T>>> = items.iter().map(|_| Mutex::new(None)).collect();
    let work = || {
        let mut fctx = FunctionBuilderContext::new();
        let mut ctx = Context::new();
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            let Some(&item) = items.get(n) else { break };
            let value = f(&mut fctx, &mut ctx, item);
            *slots[n].lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
        }
    };
    if threads <= 1 || items.len() <= 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(work);
            }
            work();
        });
    }
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item processed")
        })
        .collect()
}
