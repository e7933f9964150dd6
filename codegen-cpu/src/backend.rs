//! [`CpuBackend`]: the CPU implementation of the backend contract, its options, its kernels
//! and its kernel cache.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};

use sparse_ir::backend::{Backend, CacheKey, Kernel};
use sparse_ir::{Args, BackendError, KernelSpec, Launch, Op, Pattern, Strategy, Transposed};
use thiserror::Error;

use crate::dense::{self, DenseArgs, DenseKernel};
use crate::generic::{self, MatJob, Panels, SddmmJob, Walk};
use crate::isa::IsaLevel;
use crate::planner::{self, Features, Plan, PARALLEL_MIN_FMAS};
use crate::pool::Pool;

/// Options of a [`CpuBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuOptions {
    /// Threads every kernel runs on (the caller plus `threads - 1` workers); `0` means one per
    /// available core.
    pub threads: usize,
    /// The ISA level of the generic kernels; `None` detects the widest this CPU supports.
    /// The environment variable [`ISA_ENV`](crate::ISA_ENV) (`avx512`, `avx2`, `portable`) caps either.
    pub isa: Option<IsaLevel>,
}

impl Default for CpuOptions {
    /// One thread, detected ISA level.
    fn default() -> Self {
        CpuOptions {
            threads: 1,
            isa: None,
        }
    }
}

/// Errors of creating a [`CpuBackend`].
#[derive(Debug, Error)]
pub enum CpuError {
    /// The requested ISA level is wider than this CPU supports.
    #[error("ISA level {requested} requested, but this CPU supports at most {detected}")]
    IsaUnavailable {
        /// What was asked for.
        requested: IsaLevel,
        /// The widest level this CPU supports.
        detected: IsaLevel,
    },
    /// The environment variable [`ISA_ENV`](crate::ISA_ENV) holds something else than a level name.
    #[error("{0}")]
    BadEnv(String),
    /// The worker threads could not be started.
    #[error("starting {threads} kernel threads failed: {source}")]
    Threads {
        /// How many were asked for.
        threads: usize,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// The CPU backend: generic kernels for every ISA level, dense GEMM, the Cranelift JIT, a
/// planner, a thread pool shared by its kernels, and a kernel cache.
pub struct CpuBackend {
    isa: IsaLevel,
    pool: Arc<Pool>,
    parallel_min_fmas: usize,
    cache: Mutex<HashMap<CacheKey, Weak<Compiled>>>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("isa", &self.isa)
            .field("threads", &self.pool.threads())
            .finish()
    }
}

impl CpuBackend {
    /// A backend with `options` (see [`CpuOptions`] for the ISA level and thread count).
    pub fn new(options: CpuOptions) -> Result<CpuBackend, CpuError> {
        let detected = IsaLevel::detect();
        let mut isa = match options.isa {
            Some(requested) if requested > detected => {
                return Err(CpuError::IsaUnavailable {
                    requested,
                    detected,
                })
            }
            Some(requested) => requested,
            None => detected,
        };
        if let Some(cap) = IsaLevel::from_env().map_err(CpuError::BadEnv)? {
            isa = isa.min(cap);
        }
        let threads = match options.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let pool = Pool::new(threads).map_err(|source| CpuError::Threads { threads, source })?;
        Ok(CpuBackend {
            isa,
            pool: Arc::new(pool),
            parallel_min_fmas: PARALLEL_MIN_FMAS,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The ISA level the generic kernels run at.
    pub fn isa(&self) -> IsaLevel {
        self.isa
    }

    /// Threads every kernel runs on.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Sets the work (multiply-adds of one launch) below which kernels compiled from now on
    /// run on one thread; tests set 0 to exercise the parallel paths on small shapes. The
    /// default, [`planner::PARALLEL_MIN_FMAS`], was measured.
    pub fn set_parallel_min_fmas(&mut self, fmas: usize) {
        self.parallel_min_fmas = fmas;
    }

    /// What the planner would choose for `spec` (`Strategy::Auto`), and why.
    pub fn plan(&self, spec: &KernelSpec) -> Plan {
        planner::plan(&Features::of(spec, self.threads(), self.isa))
    }

    /// Compiled kernels alive in the cache (held by at least one [`CpuKernel`]).
    pub fn cached_kernels(&self) -> usize {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, w| w.strong_count() > 0);
        cache.len()
    }

    fn cache_key(&self, spec: &KernelSpec, strategy: Strategy) -> CacheKey {
        CacheKey::new(format!("{}/{}", self.name(), self.device()), spec, strategy)
    }

    /// Compiles (or finds in the cache) `spec` with a concrete strategy.
    fn compiled(
        &self,
        spec: &KernelSpec,
        strategy: Strategy,
    ) -> Result<Arc<Compiled>, BackendError> {
        let key = self.cache_key(spec, strategy);
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.get(&key).and_then(Weak::upgrade) {
                // Guard against hash collisions: the pattern must be the same.
                if Arc::ptr_eq(&c.pattern, spec.pattern()) || *c.pattern == **spec.pattern() {
                    return Ok(c);
                }
            }
        }
        let compiled = Arc::new(Compiled::new(spec, strategy, self.threads())?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, w| w.strong_count() > 0);
        cache.insert(key, Arc::downgrade(&compiled));
        Ok(compiled)
    }
}

impl Backend for CpuBackend {
    type Kernel = CpuKernel;
    type Buffer = Vec<f32>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    /// The ISA level and thread count, e.g. `avx512x2`.
    fn device(&self) -> String {
        format!("{}x{}", self.isa, self.threads())
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, data: &[f32], buffer: &mut Vec<f32>) -> Result<(), BackendError> {
        copy_checked("upload", data, buffer)
    }

    fn download(&self, buffer: &Vec<f32>, out: &mut [f32]) -> Result<(), BackendError> {
        copy_checked("download", buffer, out)
    }

    /// Compiles `spec`. `Auto` asks the planner; `Jit` compiles with Cranelift (it needs a
    /// fixed batch and `ld`, and has no `dense_grad`); `Generic` and `Dense` run any spec.
    /// Strategies of other backends are `Unsupported`.
    fn compile(&self, spec: &KernelSpec, strategy: Strategy) -> Result<CpuKernel, BackendError> {
        let features = Features::of(spec, self.threads(), self.isa);
        let (plan, compiled) = match strategy {
            Strategy::Generic | Strategy::Dense | Strategy::Jit => {
                let plan = Plan::fixed(strategy, &features);
                (plan, self.compiled(spec, strategy)?)
            }
            Strategy::Auto => {
                let mut plan = planner::plan(&features);
                match self.compiled(spec, plan.strategy) {
                    Ok(c) => (plan, c),
                    Err(e) if plan.strategy == Strategy::Jit => {
                        plan.reasons
                            .push(format!("jit failed ({e}); fell back to generic"));
                        plan.strategy = Strategy::Generic;
                        (plan, self.compiled(spec, Strategy::Generic)?)
                    }
                    Err(e) => return Err(e),
                }
            }
            other => {
                return Err(BackendError::Unsupported {
                    layer: spec.layer().to_string(),
                    op: spec.op().name(),
                    strategy: other,
                    reason: "not a CPU strategy (the CPU has jit, generic and dense)".into(),
                })
            }
        };
        Ok(CpuKernel {
            spec: spec.clone(),
            strategy: plan.strategy,
            plan,
            compiled,
            pool: Arc::clone(&self.pool),
            isa: self.isa,
            parallel_min_fmas: self.parallel_min_fmas,
        })
    }
}

fn copy_checked(what: &'static str, src: &[f32], dst: &mut [f32]) -> Result<(), BackendError> {
    if src.len() != dst.len() {
        return Err(BackendError::Length {
            layer: "-".into(),
            op: what,
            operand: "buffer",
            rule: "source length",
            expected: src.len(),
            got: dst.len(),
        });
    }
    dst.copy_from_slice(src);
    Ok(())
}

/// What a strategy compiled: shared by every [`CpuKernel`] with the same cache key.
struct Compiled {
    pattern: Arc<Pattern>,
    imp: Imp,
}

enum Imp {
    Generic(GenericData),
    Dense(DenseKernel),
    Jit(crate::jit::JitKernel),
}

/// The compiled form of the generic kernels: the transposed pattern for `spmm_t` and the
/// rows of each thread's part, balanced by nonzeros.
struct GenericData {
    transposed: Option<Transposed>,
    parts: Vec<Range<usize>>,
    /// The walk split by input panels, for inputs larger than L2.
    panels: Option<Panels>,
    /// `spmm_t` permutes the values into the transpose's order before it runs.
    permute: bool,
    /// The permuted values.
    scratch: Mutex<Vec<f32>>,
}

impl GenericData {
    /// The panels, when the input's 8-vector block does not stay in L2 at this batch.
    fn panels_for(&self, in_rows: usize, batch: usize) -> Option<&Panels> {
        let width = batch.min(128);
        self.panels
            .as_ref()
            .filter(|_| in_rows * width * 4 > generic::L2_BLOCK_BYTES)
    }
}

impl Compiled {
    fn new(
        spec: &KernelSpec,
        strategy: Strategy,
        threads: usize,
    ) -> Result<Compiled, BackendError> {
        let p = spec.pattern();
        let imp = match strategy {
            Strategy::Generic => {
                let transposed = (spec.op() == Op::SpmmT).then(|| p.transpose());
                let walk = match &transposed {
                    Some(t) => Walk::of_transposed(t).ok_or_else(|| BackendError::Compile {
                        layer: spec.layer().to_string(),
                        op: spec.op().name(),
                        message: "inconsistent transposed pattern".into(),
                    })?,
                    None => Walk::of_pattern(p),
                };
                let parts = balanced_parts(&walk, threads);
                // With more values than L2 holds, spmm_t reads them through the transpose's
                // value index at random: permute them into walk order first.
                let permute = transposed.is_some() && p.nnz() * 4 > generic::L2_BLOCK_BYTES;
                let walk = match &transposed {
                    Some(t) if permute => Walk::of_transposed_permuted(t),
                    _ => walk,
                };
                // Panels pay off once a 128-column block of the input exceeds L2's share.
                let panels = (spec.op() != Op::DenseGrad
                    && walk.in_rows() * 128 * 4 > generic::L2_BLOCK_BYTES)
                    .then(|| Panels::new(&walk, generic::PANEL_ROWS))
                    .flatten();
                Imp::Generic(GenericData {
                    transposed,
                    parts,
                    panels,
                    permute,
                    scratch: Mutex::new(Vec::new()),
                })
            }
            Strategy::Dense => {
                Imp::Dense(
                    DenseKernel::new(p).ok_or_else(|| BackendError::Unsupported {
                        layer: spec.layer().to_string(),
                        op: spec.op().name(),
                        strategy,
                        reason: "the compacted matrix has more than 2^32 entries".into(),
                    })?,
                )
            }
            Strategy::Jit => Imp::Jit(crate::jit::JitKernel::compile(spec)?),
            _ => unreachable!("only concrete CPU strategies are compiled"),
        };
        Ok(Compiled {
            pattern: Arc::clone(p),
            imp,
        })
    }
}

/// Splits the walk's rows into `parts` consecutive ranges of about equal cost (nonzeros plus
/// a few per row).
fn balanced_parts(walk: &Walk<'_>, parts: usize) -> Vec<Range<usize>> {
    let rows = walk.rows();
    let parts = parts.clamp(1, rows.max(1));
    const ROW_COST: usize = 4;
    let cost = |r: usize| walk.nnz_range(0..r).len() + ROW_COST * r;
    let total = cost(rows);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 1..=parts {
        let target = total * p / parts;
        let mut end = start;
        while end < rows && (p == parts || cost(end + 1) <= target) {
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// A compiled CPU kernel: one spec, the strategy that runs it and the plan that chose it.
#[derive(Clone)]
pub struct CpuKernel {
    spec: KernelSpec,
    strategy: Strategy,
    plan: Plan,
    compiled: Arc<Compiled>,
    pool: Arc<Pool>,
    isa: IsaLevel,
    parallel_min_fmas: usize,
}

impl std::fmt::Debug for CpuKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuKernel")
            .field("layer", &self.spec.layer())
            .field("op", &self.spec.op())
            .field("strategy", &self.strategy)
            .field("isa", &self.isa)
            .field("threads", &self.pool.threads())
            .finish()
    }
}

impl CpuKernel {
    /// The planner's decision (for `Auto`) or the explicit choice, with the predicted time of
    /// every candidate.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The ISA level of the generic kernels.
    pub fn isa(&self) -> IsaLevel {
        self.isa
    }

    /// Threads the kernel runs on.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// The JIT kernel, when the strategy is `Jit`.
    pub fn jit(&self) -> Option<&crate::jit::JitKernel> {
        match &self.compiled.imp {
            Imp::Jit(j) => Some(j),
            _ => None,
        }
    }

    /// Whether a launch of `fmas` multiply-adds is worth splitting over the threads.
    fn parallel(&self, fmas: usize) -> bool {
        self.pool.threads() > 1 && fmas >= self.parallel_min_fmas
    }

    /// The pool dense GEMMs split over, with this kernel's threshold.
    fn par_pool(&self) -> dense::Par<'_> {
        dense::Par {
            pool: &self.pool,
            min_fmas: self.parallel_min_fmas,
        }
    }

    fn run_generic(&self, g: &GenericData, launch: Launch, args: Args<'_, [f32]>) {
        let p = self.spec.pattern();
        let Launch { batch, ld } = launch;
        // One part means "all rows on this thread" (`mat_parts`, `sddmm` below).
        let parts: &[Range<usize>] = if self.parallel(p.nnz() * batch) && g.parts.len() > 1 {
            &g.parts
        } else {
            &g.parts[..1]
        };
        let isa = self.isa;
        match args {
            Args::Spmm { values, x, bias, y } => {
                let relu = matches!(self.spec.op(), Op::Spmm { relu: true, .. });
                let job = MatJob {
                    walk: Walk::of_pattern(p),
                    values,
                    x,
                    bias,
                    relu,
                    acc_in: false,
                    batch,
                    ld,
                };
                let panels = g.panels_for(job.walk.in_rows(), batch);
                self.mat_parts(&job, panels, parts, y);
            }
            Args::SpmmT { values, dy, dx } if batch == 1 => {
                generic::spmv_t_scatter(&Walk::of_pattern(p), values, dy, ld, dx)
            }
            Args::SpmmT { values, dy, dx } => {
                let t = g
                    .transposed
                    .as_ref()
                    .expect("spmm_t kernels keep the transpose");
                let mut guard;
                let mut fresh;
                let (walk, values): (Walk<'_>, &[f32]) = if g.permute {
                    let buf: &mut Vec<f32> = match g.scratch.try_lock() {
                        Ok(s) => {
                            guard = s;
                            &mut guard
                        }
                        Err(_) => {
                            fresh = Vec::new();
                            &mut fresh
                        }
                    };
                    buf.resize(t.value_index.len(), 0.0);
                    self.permute_values(values, &t.value_index, parts, t, buf);
                    (Walk::of_transposed_permuted(t), &buf[..])
                } else {
                    (
                        Walk::of_transposed(t).expect("checked when compiled"),
                        values,
                    )
                };
                let job = MatJob {
                    walk,
                    values,
                    x: dy,
                    bias: None,
                    relu: false,
                    acc_in: false,
                    batch,
                    ld,
                };
                let panels = g.panels_for(job.walk.in_rows(), batch);
                self.mat_parts(&job, panels, parts, dx);
            }
            Args::Sddmm { dy, x, dw } => {
                let job = SddmmJob {
                    walk: Walk::of_pattern(p),
                    dy,
                    x,
                    batch,
                    ld,
                };
                let panels = g.panels_for(p.cols(), batch);
                // One part's rows: every panel in turn, or the rows at once.
                let part = |r: Range<usize>, out: &mut [f32], base: usize| match panels {
                    None => generic::sddmm_part(isa, &job, r, out, base),
                    Some(panels) => {
                        for walk in panels.walks() {
                            let pj = SddmmJob { walk, ..job };
                            generic::sddmm_part(isa, &pj, r.clone(), out, base);
                        }
                    }
                };
                if parts.len() == 1 {
                    part(0..p.rows(), dw, 0);
                } else {
                    let mut items = Vec::with_capacity(parts.len());
                    let mut rest = dw;
                    for r in parts {
                        let nz = job.walk.nnz_range(r.clone());
                        let (head, tail) = std::mem::take(&mut rest).split_at_mut(nz.len());
                        items.push((r.clone(), head, nz.start));
                        rest = tail;
                    }
                    self.pool
                        .for_each_mut(&mut items, &|(r, out, base)| part(r.clone(), out, *base));
                }
            }
            Args::DenseGrad { dy, x, grad } => {
                dense::dense_grad(self.par_pool(), p.rows(), p.cols(), batch, ld, dy, x, grad)
            }
        }
    }

    /// `out[k] = values[value_index[k]]`, split over the parts' nonzeros.
    fn permute_values(
        &self,
        values: &[f32],
        value_index: &[u32],
        parts: &[Range<usize>],
        t: &Transposed,
        out: &mut [f32],
    ) {
        let walk = Walk::of_transposed_permuted(t);
        let fill = |o: &mut [f32], vi: &[u32]| {
            for (o, &v) in o.iter_mut().zip(vi) {
                *o = values[v as usize];
            }
        };
        if parts.len() == 1 {
            fill(out, value_index);
            return;
        }
        let mut items = Vec::with_capacity(parts.len());
        let mut rest = out;
        for r in parts {
            let nz = walk.nnz_range(r.clone());
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(nz.len());
            items.push((head, &value_index[nz]));
            rest = tail;
        }
        self.pool.for_each_mut(&mut items, &|(o, vi)| fill(o, vi));
    }

    fn mat_parts(
        &self,
        job: &MatJob<'_>,
        panels: Option<&Panels>,
        parts: &[Range<usize>],
        out: &mut [f32],
    ) {
        let rows = job.walk.rows();
        let isa = self.isa;
        // One part's rows: all panels in input order, the epilogue with the last.
        let part = |r: Range<usize>, o: &mut [f32]| match panels {
            None => generic::mat_part(isa, job, r, o),
            Some(panels) => {
                let n = panels.walks().len();
                for (i, walk) in panels.walks().enumerate() {
                    let last = i + 1 == n;
                    let pj = MatJob {
                        walk,
                        acc_in: i > 0,
                        bias: if last { job.bias } else { None },
                        relu: last && job.relu,
                        ..*job
                    };
                    generic::mat_part(isa, &pj, r.clone(), o);
                }
            }
        };
        if parts.len() == 1 {
            part(0..rows, out);
            return;
        }
        let mut items = Vec::with_capacity(parts.len());
        let mut rest = out;
        for (i, r) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                items.push((r.clone(), std::mem::take(&mut rest)));
            } else {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(r.len() * job.ld);
                items.push((r.clone(), head));
                rest = tail;
            }
        }
        self.pool
            .for_each_mut(&mut items, &|(r, o)| part(r.clone(), o));
    }

    fn run_dense(&self, d: &DenseKernel, launch: Launch, args: Args<'_, [f32]>) {
        let p = self.spec.pattern();
        let Launch { batch, ld } = launch;
        let args = match args {
            Args::Spmm { values, x, bias, y } => DenseArgs::Spmm {
                values,
                x,
                bias,
                relu: matches!(self.spec.op(), Op::Spmm { relu: true, .. }),
                y,
            },
            Args::SpmmT { values, dy, dx } => DenseArgs::SpmmT { values, dy, dx },
            Args::Sddmm { dy, x, dw } => DenseArgs::Sddmm { dy, x, dw },
            Args::DenseGrad { dy, x, grad } => {
                return dense::dense_grad(
                    self.par_pool(),
                    p.rows(),
                    p.cols(),
                    batch,
                    ld,
                    dy,
                    x,
                    grad,
                )
            }
        };
        d.run(self.par_pool(), batch, ld, args);
    }
}

impl Kernel for CpuKernel {
    type Buffer = [f32];

    fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    fn strategy(&self) -> Strategy {
        self.strategy
    }

    fn run(&self, launch: Launch, args: Args<'_, [f32]>) -> Result<(), BackendError> {
        args.check(&self.spec, launch)?;
        match &self.compiled.imp {
            Imp::Generic(g) => self.run_generic(g, launch, args),
            Imp::Dense(d) => self.run_dense(d, launch, args),
            Imp::Jit(j) => return j.run(launch, args),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_rows_in_order() {
        let entries: Vec<(usize, usize)> = (0..50).map(|i| (i % 7, i)).collect();
        let p = Pattern::from_coo(10, 50, &entries).unwrap();
        for n in 1..=4 {
            let parts = balanced_parts(&Walk::of_pattern(&p), n);
            assert_eq!(parts.len(), n);
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[n - 1].end, 10);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
        }
        let empty = Pattern::empty(0, 3).unwrap();
        assert_eq!(balanced_parts(&Walk::of_pattern(&empty), 2), vec![0..0]);
    }
}
