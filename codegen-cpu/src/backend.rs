//! [`CpuBackend`]: the CPU implementation of the backend contract, its options, its kernels
//! and its kernel cache.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sparse_ir::backend::{Backend, CacheKey, Kernel};
use sparse_ir::{
    AlignedVec, Args, BackendError, KernelSpec, Launch, Op, Pattern, Role, Strategy, Transposed,
};
use thiserror::Error;

use crate::conv::{self, ConvGather, Direction, GatherJob, GradJob};
use crate::conv_dense::{DenseConv, DenseConvArgs};
use crate::dense::{self, DenseArgs, DenseKernel};
use crate::generic::{self, MatJob, Panels, SddmmJob, Walk};
use crate::isa::IsaLevel;
use crate::planner::{self, Features, Measurement, Plan, Timed, PARALLEL_MIN_FMAS};
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

/// Whether the planner confirms close predictions by timing (see [`CpuBackend::set_plan_timing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanTiming {
    /// Plans come from the cost model alone: the same spec always gets the same strategy
    /// (tests, and `--deterministic` training, where the plan must not depend on timing).
    Off,
    /// Where the model's best candidates are within [`planner::CONFIRM_RATIO`] (usually
    /// two), build them and keep the measured fastest: a warm-up of each, then up to
    /// [`TIMING_MAX_ROUNDS`] interleaved rounds (at least [`TIMING_MIN_ROUNDS`] when the
    /// budget allows), within `budget` per decision.
    On {
        /// Wall time one decision may spend measuring.
        budget: Duration,
    },
}

/// The shape a measured decision is kept under: op, shape, batch, `ld`, threads, ISA level,
/// and a convolution's geometry (two layers of the same pattern shape on other input sizes
/// do different work).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DecisionKey {
    /// The strategy whose thread count was raced (`Auto` for a race between strategies).
    strategy: Strategy,
    op: Op,
    rows: usize,
    cols: usize,
    batch: usize,
    ld: usize,
    threads: usize,
    isa: IsaLevel,
    geometry: Option<sparse_ir::ConvGeometry>,
}

/// The size of the pattern a decision was measured on: nonzeros, live rows, live columns.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PatternSize([usize; 3]);

impl DecisionKey {
    fn of(f: &Features) -> (DecisionKey, PatternSize) {
        let key = DecisionKey {
            strategy: Strategy::Auto,
            op: f.op,
            rows: f.rows,
            cols: f.cols,
            batch: f.batch,
            ld: f.ld,
            threads: f.threads,
            isa: f.isa,
            geometry: f.geometry,
        };
        (key, PatternSize([f.nnz, f.live_rows, f.live_cols]))
    }
}

impl PatternSize {
    /// How far apart two sizes are: the largest relative difference of their counts.
    fn distance(self, other: PatternSize) -> f64 {
        self.0
            .iter()
            .zip(other.0)
            .map(|(&a, b)| a.abs_diff(b) as f64 / a.max(b).max(1) as f64)
            .fold(0.0, f64::max)
    }
}

/// A measured decision is reused for a pattern of the same [`DecisionKey`] whose counts each
/// lie within this fraction of the measured pattern's (the nearest such one). Sparse momentum
/// changes a layer's pattern at every mask update but its size only slowly, and the
/// candidates' speeds follow the size, not the positions, and timing every new pattern again
/// took a sizeable share of a training run (docs/MEASUREMENTS.md).
const SAME_SIZE: f64 = 0.15;

/// A measured thread count serves patterns within this fraction of the measured one's size:
/// whether a split pays follows the amount of work, which must change by far more than a
/// mask update's reshuffle to move the break-even (a 10-epoch LeNet-300-100 run raced its
/// thread counts 23 times within [`SAME_SIZE`]; see docs/MEASUREMENTS.md).
const THREADS_SAME_SIZE: f64 = 0.5;

/// Measured decisions by shape: the size of each pattern measured and what was measured on
/// it (the candidates' times, or one strategy's time per thread count).
type Decisions<T> = HashMap<DecisionKey, Vec<(PatternSize, T)>>;

/// The measurement kept for the nearest pattern size within `tolerance` of `size`
/// ([`SAME_SIZE`], [`THREADS_SAME_SIZE`]).
fn recall<T: Clone>(
    decisions: &Mutex<Decisions<T>>,
    key: &DecisionKey,
    size: PatternSize,
    tolerance: f64,
) -> Option<T> {
    let decisions = decisions.lock().unwrap_or_else(|e| e.into_inner());
    decisions.get(key).and_then(|sizes| {
        sizes
            .iter()
            .map(|(s, m)| (s.distance(size), m))
            .filter(|(d, _)| *d <= tolerance)
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, m)| m.clone())
    })
}

/// Keeps a measurement (forgetting the oldest beyond [`SIZES_MAX`] sizes a shape and
/// [`DECISIONS_MAX`] shapes).
fn remember<T>(decisions: &Mutex<Decisions<T>>, key: DecisionKey, size: PatternSize, measured: T) {
    let mut decisions = decisions.lock().unwrap_or_else(|e| e.into_inner());
    if decisions.len() >= DECISIONS_MAX {
        decisions.clear();
    }
    let sizes = decisions.entry(key).or_default();
    if sizes.len() >= SIZES_MAX {
        sizes.remove(0);
    }
    sizes.push((size, measured));
}

/// Most pattern sizes kept per shape (the oldest goes first).
const SIZES_MAX: usize = 64;

/// The default timing budget of one planner decision.
pub const DEFAULT_TIMING_BUDGET: Duration = Duration::from_millis(10);
/// The shortest sample of a planner race: shorter runs are repeated within one sample.
pub const TIMING_SAMPLE_MIN: Duration = Duration::from_micros(250);
/// Most interleaved rounds (samples per candidate) of one decision.
pub const TIMING_MAX_ROUNDS: usize = 15;
/// Rounds a decision takes even over its budget (as long as the budget allows at least
/// three); the median of fewer is too noisy on a shared machine.
pub const TIMING_MIN_ROUNDS: usize = 9;
/// A kernel the cost model predicts to take at least this long on one thread (µs) runs on
/// every thread without a race (see `decide_threads`).
const LONG_KERNEL_US: f64 = 5_000.0;
/// Decisions kept per backend before the oldest are forgotten (a training run makes a few
/// per mask update).
const DECISIONS_MAX: usize = 4096;

impl Default for PlanTiming {
    /// On, with [`DEFAULT_TIMING_BUDGET`].
    fn default() -> Self {
        PlanTiming::On {
            budget: DEFAULT_TIMING_BUDGET,
        }
    }
}

/// The CPU backend: generic kernels for every ISA level, dense GEMM, the Cranelift JIT, a
/// planner, a thread pool shared by its kernels, and a kernel cache.
pub struct CpuBackend {
    isa: IsaLevel,
    pool: Arc<Pool>,
    parallel_min_fmas: usize,
    cache: Mutex<HashMap<CacheKey, Weak<Compiled>>>,
    timing: PlanTiming,
    /// Measured strategy decisions, by shape, with the size of the pattern each was
    /// measured on.
    decisions: Mutex<Decisions<Vec<Measurement>>>,
    /// Measured thread counts, by shape and strategy (`(threads, µs)`).
    thread_decisions: Mutex<Decisions<Vec<(usize, f64)>>>,
    timings_run: AtomicUsize,
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
            timing: PlanTiming::default(),
            decisions: Mutex::new(HashMap::new()),
            thread_decisions: Mutex::new(HashMap::new()),
            timings_run: AtomicUsize::new(0),
        })
    }

    /// Sets whether `Strategy::Auto` confirms close predictions by timing (on by default,
    /// [`PlanTiming::default`]). [`PlanTiming::Off`] makes plans deterministic.
    pub fn set_plan_timing(&mut self, timing: PlanTiming) {
        self.timing = timing;
    }

    /// Whether `Strategy::Auto` confirms close predictions by timing.
    pub fn plan_timing(&self) -> PlanTiming {
        self.timing
    }

    /// How many planner decisions this backend has timed (decisions found in its cache of
    /// measured decisions are not timed again).
    pub fn plan_timings_run(&self) -> usize {
        self.timings_run.load(Ordering::Relaxed)
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

    /// What `Strategy::Auto` chooses for `spec`, and why: the cost model, confirmed by timing
    /// where its two best candidates are close and timing is on (this compiles and runs
    /// both). Errors only where compiling a timed candidate fails for another reason than
    /// the JIT being unable to compile.
    pub fn plan(&self, spec: &KernelSpec) -> Result<Plan, BackendError> {
        self.decide(spec, &|_| Duration::ZERO).map(|(plan, _)| plan)
    }

    /// The cost model's plan for `spec`, without timing.
    pub fn predict(&self, spec: &KernelSpec) -> Plan {
        planner::plan(&Features::of(spec, self.threads(), self.isa))
    }

    /// The `Auto` decision and, when timing built it, the chosen kernel. `delay` adds a wait
    /// to every timed run of a strategy (tests make one candidate artificially slow).
    fn decide(
        &self,
        spec: &KernelSpec,
        delay: &dyn Fn(Strategy) -> Duration,
    ) -> Result<(Plan, Option<Arc<Compiled>>), BackendError> {
        let features = Features::of(spec, self.threads(), self.isa);
        let mut plan = planner::plan(&features);
        let mut chosen = self.decide_strategy(spec, &features, &mut plan, delay)?;
        self.decide_threads(spec, &features, &mut plan, &mut chosen)?;
        Ok((plan, chosen))
    }

    /// The strategy of `plan`: the model's, or where its best candidates are close and
    /// timing is on, the measured fastest. Returns the chosen kernel where timing built it.
    fn decide_strategy(
        &self,
        spec: &KernelSpec,
        features: &Features,
        plan: &mut Plan,
        delay: &dyn Fn(Strategy) -> Duration,
    ) -> Result<Option<Arc<Compiled>>, BackendError> {
        let Some(close) = plan.close_candidates() else {
            return Ok(None);
        };
        let budget = match self.timing {
            PlanTiming::Off => {
                let names: Vec<String> = close.iter().map(|s| s.to_string()).collect();
                plan.reasons.push(format!(
                    "{} predicted within {}x, but timing is off: kept the model's choice",
                    names.join(" and "),
                    planner::CONFIRM_RATIO
                ));
                return Ok(None);
            }
            PlanTiming::On { budget } => budget,
        };
        let (key, size) = DecisionKey::of(features);
        if let Some(measured) = recall(&self.decisions, &key, size, SAME_SIZE) {
            plan.confirm(measured, Timed::Cached);
            return Ok(None);
        }
        let mut candidates = Vec::with_capacity(close.len());
        for strategy in close {
            match self.compiled(spec, strategy) {
                Ok(c) => candidates.push((strategy, c)),
                Err(e) if strategy == Strategy::Jit => plan
                    .reasons
                    .push(format!("jit failed to compile ({e}): not timed")),
                Err(e) => return Err(e),
            }
        }
        if candidates.len() < 2 {
            // Only one candidate compiled (the JIT failed): it is the choice.
            return Ok(candidates.pop().map(|(s, c)| {
                plan.strategy = s;
                c
            }));
        }
        let (measured, rounds) = self.time_candidates(spec, &candidates, budget, delay)?;
        self.timings_run.fetch_add(1, Ordering::Relaxed);
        remember(&self.decisions, key, size, measured.clone());
        plan.confirm(measured, Timed::Now { rounds });
        Ok(candidates
            .into_iter()
            .find(|(s, _)| *s == plan.strategy)
            .map(|(_, c)| c))
    }

    /// The thread count of `plan`'s strategy: 1 where the kernel would not split a launch;
    /// else the model's, or with timing on, the measured faster of one thread and the
    /// backend's count, on operands the calling thread writes before every run (as the
    /// previous layer leaves them in a training step). Builds the kernel into `chosen`
    /// where it times it.
    fn decide_threads(
        &self,
        spec: &KernelSpec,
        features: &Features,
        plan: &mut Plan,
        chosen: &mut Option<Arc<Compiled>>,
    ) -> Result<(), BackendError> {
        let n = self.threads();
        plan.set_threads(planner::model_threads(features, plan.strategy));
        if n < 2
            || matches!(spec.op(), Op::DenseGrad | Op::ConvDenseGrad)
            || !self.splits(features, plan.strategy)
        {
            return Ok(());
        }
        let budget = match self.timing {
            PlanTiming::Off => return Ok(()),
            PlanTiming::On { budget } => budget,
        };
        // A kernel this long on one thread gains from every thread, and racing the two
        // counts would cost each recompilation seconds (a 128->128 3x3 convolution at 5 %,
        // batch 128: 77.7 ms on one thread, 37.1 ms on two; racing WRN-16-8's kernels took
        // 71 s a mask update).
        let single = planner::predict_one(
            &Features {
                threads: 1,
                ..features.clone()
            },
            plan.strategy,
        );
        if single >= LONG_KERNEL_US {
            plan.set_threads(n);
            return Ok(());
        }
        let (mut key, size) = DecisionKey::of(features);
        key.strategy = plan.strategy;
        if let Some(measured) = recall(&self.thread_decisions, &key, size, THREADS_SAME_SIZE) {
            plan.confirm_threads(measured, Timed::Cached);
            return Ok(());
        }
        let compiled = match chosen {
            Some(c) => Arc::clone(c),
            None => {
                let c = self.compiled(spec, plan.strategy)?;
                *chosen = Some(Arc::clone(&c));
                c
            }
        };
        let counts = [1, n];
        let kernels: Vec<CpuKernel> = counts
            .iter()
            .map(|&t| {
                let mut fixed = Plan::fixed(plan.strategy, features);
                fixed.threads = t;
                self.kernel(spec, fixed, Arc::clone(&compiled))
            })
            .collect();
        let launch = Launch::new(features.batch, features.ld);
        let mut operands: Vec<TimingOperands> = kernels
            .iter()
            .map(|_| TimingOperands::new(spec, launch, 0x5eed, true))
            .collect();
        // The inputs' write is timed with the kernel: a split kernel makes its producer pay
        // for taking the lines back from the other cores, as the step's gather or the
        // previous layer does in training.
        let mut runs: Vec<RaceRun<'_>> = kernels
            .iter()
            .zip(operands.iter_mut())
            .map(|(k, ops)| {
                Box::new(move || {
                    ops.refresh_inputs(k.spec.op());
                    ops.run(k, launch)
                }) as RaceRun<'_>
            })
            .collect();
        let timings = race(&mut runs, budget)?;
        drop(runs);
        self.timings_run.fetch_add(1, Ordering::Relaxed);
        let measured: Vec<(usize, f64)> = counts.iter().copied().zip(timings.us).collect();
        remember(&self.thread_decisions, key, size, measured.clone());
        plan.confirm_threads(
            measured,
            Timed::Now {
                rounds: timings.rounds,
            },
        );
        Ok(())
    }

    /// Whether a kernel of `strategy` would split a launch of this spec over the threads
    /// (the threshold this backend's kernels use, see [`CpuBackend::set_parallel_min_fmas`]).
    fn splits(&self, f: &Features, strategy: Strategy) -> bool {
        self.threads() > 1
            && planner::split_fmas(f, strategy).is_some_and(|fmas| fmas >= self.parallel_min_fmas)
    }

    /// Times compiled candidates of `spec` on random operands of its shape (the spec's batch
    /// and `ld`, or the nominal ones): warm-up runs, then interleaved rounds, each sample
    /// long enough to read a clock against; returns the medians and the rounds taken.
    fn time_candidates(
        &self,
        spec: &KernelSpec,
        candidates: &[(Strategy, Arc<Compiled>)],
        budget: Duration,
        delay: &dyn Fn(Strategy) -> Duration,
    ) -> Result<(Vec<Measurement>, usize), BackendError> {
        let features = Features::of(spec, self.threads(), self.isa);
        let launch = Launch::new(features.batch, features.ld);
        let kernels: Vec<CpuKernel> = candidates
            .iter()
            .map(|(s, c)| {
                // Each strategy on the model's thread count for it (the thread race that
                // follows settles the winner's).
                let mut fixed = Plan::fixed(*s, &features);
                fixed.threads = planner::model_threads(&features, *s);
                self.kernel(spec, fixed, Arc::clone(c))
            })
            .collect();
        // One set of operands for every candidate: they run one after the other, and a
        // convolution's operands at a training batch are tens of megabytes each.
        let operands = std::cell::RefCell::new(TimingOperands::new(spec, launch, 0x5eed, false));
        let mut runs: Vec<RaceRun<'_>> = kernels
            .iter()
            .map(|k| {
                let wait = delay(k.strategy());
                let ops = &operands;
                Box::new(move || {
                    let r = ops.borrow_mut().run(k, launch);
                    if !wait.is_zero() {
                        kernel_timing::spin(wait);
                    }
                    r
                }) as RaceRun<'_>
            })
            .collect();
        let timings = race(&mut runs, budget)?;
        let (medians, rounds) = (timings.us, timings.rounds);
        let measured = candidates
            .iter()
            .zip(medians)
            .map(|((strategy, _), us)| Measurement {
                strategy: *strategy,
                us,
            })
            .collect();
        Ok((measured, rounds))
    }

    fn kernel(&self, spec: &KernelSpec, plan: Plan, compiled: Arc<Compiled>) -> CpuKernel {
        CpuKernel {
            threads: plan.threads.clamp(1, self.threads()),
            spec: spec.clone(),
            strategy: plan.strategy,
            plan,
            compiled,
            pool: Arc::clone(&self.pool),
            isa: self.isa,
            parallel_min_fmas: self.parallel_min_fmas,
        }
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
    /// 64-byte aligned ([`AlignedVec`]): rows of a padded `ld` start on cache lines, which
    /// the vector loads of the generic kernels need to run at full speed.
    type Buffer = AlignedVec;

    fn name(&self) -> &'static str {
        "cpu"
    }

    /// The ISA level and thread count, e.g. `avx512x2`.
    fn device(&self) -> String {
        format!("{}x{}", self.isa, self.threads())
    }

    fn alloc(&self, len: usize) -> Result<AlignedVec, BackendError> {
        Ok(AlignedVec::zeros(len))
    }

    fn upload(&self, data: &[f32], buffer: &mut AlignedVec) -> Result<(), BackendError> {
        copy_checked("upload", data, buffer)
    }

    fn download(&self, buffer: &AlignedVec, out: &mut [f32]) -> Result<(), BackendError> {
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
                let (mut plan, built) = self.decide(spec, &|_| Duration::ZERO)?;
                match built.map_or_else(|| self.compiled(spec, plan.strategy), Ok) {
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
        Ok(self.kernel(spec, plan, compiled))
    }
}

/// A timed run of one competitor of a planner race.
type RaceRun<'a> = Box<dyn FnMut() -> Result<(), BackendError> + 'a>;

/// Times the competitors of a planner race with `kernel_timing`: 250 µs samples,
/// [`TIMING_MIN_ROUNDS`] to [`TIMING_MAX_ROUNDS`] rounds within `budget`.
fn race(
    runs: &mut [RaceRun<'_>],
    budget: Duration,
) -> Result<kernel_timing::Timings, BackendError> {
    let mut refs: Vec<kernel_timing::Run<'_, BackendError>> =
        runs.iter_mut().map(|r| &mut **r as _).collect();
    let config = kernel_timing::Config {
        sample_min: TIMING_SAMPLE_MIN,
        budget,
        min_rounds: TIMING_MIN_ROUNDS,
        max_rounds: TIMING_MAX_ROUNDS,
    };
    kernel_timing::interleaved(&mut refs, &config)
}

/// Random operands of one spec at one launch shape, for timing: 64-byte aligned, as the
/// runtime's matrices are (a misaligned `X` runs slower and would decide the race; see
/// docs/MEASUREMENTS.md). Only the inputs the op reads are allocated (a convolution's at
/// batch 128 can take 84 MB each), and their copies for
/// [`refresh_inputs`](TimingOperands::refresh_inputs) only where asked for.
struct TimingOperands {
    values: AlignedVec,
    x: AlignedVec,
    dy: AlignedVec,
    bias: Option<AlignedVec>,
    out: AlignedVec,
    /// What [`TimingOperands::refresh_inputs`] writes into `x` and `dy` (empty unless asked
    /// for).
    x_source: AlignedVec,
    dy_source: AlignedVec,
}

impl TimingOperands {
    /// Operands for `spec`'s op; `refresh`: keep copies of the inputs for
    /// [`refresh_inputs`](Self::refresh_inputs).
    fn new(spec: &KernelSpec, launch: Launch, seed: u64, refresh: bool) -> TimingOperands {
        let p = spec.pattern();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut random = |n: usize| -> AlignedVec {
            let mut v = AlignedVec::zeros(n);
            for x in v.iter_mut() {
                // xorshift64*: uniform in [-1, 1)
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
                *x = bits as f32 / (1u64 << 23) as f32 - 1.0;
            }
            v
        };
        let ld = launch.ld;
        let (x_len, y_len) = (spec.in_features() * ld, spec.out_features() * ld);
        let out_len = match spec.op().role() {
            Role::Forward => y_len,
            Role::BackwardData => x_len,
            Role::WeightGrad => p.nnz(),
            Role::DenseGrad => p.rows() * p.cols(),
        };
        let role = spec.op().role();
        let x = random(if role == Role::BackwardData { 0 } else { x_len });
        let dy = random(if role == Role::Forward { 0 } else { y_len });
        let copy = |v: &AlignedVec| {
            if refresh {
                v.clone()
            } else {
                AlignedVec::zeros(0)
            }
        };
        TimingOperands {
            values: random(p.nnz()),
            bias: spec.op().has_bias().then(|| random(p.rows())),
            out: AlignedVec::zeros(out_len),
            x_source: copy(&x),
            dy_source: copy(&dy),
            x,
            dy,
        }
    }

    /// Writes the inputs anew from the calling thread, as the previous layer of a training
    /// step leaves them: a kernel that splits over threads then pays for moving them to the
    /// other cores, as it does in training.
    fn refresh_inputs(&mut self, op: Op) {
        if op.role() != Role::BackwardData {
            self.x.copy_from_slice(&self.x_source);
        }
        if op.role() != Role::Forward {
            self.dy.copy_from_slice(&self.dy_source);
        }
    }

    fn run(&mut self, kernel: &CpuKernel, launch: Launch) -> Result<(), BackendError> {
        let args: Args<'_, [f32]> = match kernel.spec.op().role() {
            Role::Forward => Args::Spmm {
                values: &self.values[..],
                x: &self.x[..],
                bias: self.bias.as_deref(),
                y: &mut self.out[..],
            },
            Role::BackwardData => Args::SpmmT {
                values: &self.values[..],
                dy: &self.dy[..],
                dx: &mut self.out[..],
            },
            Role::WeightGrad => Args::Sddmm {
                dy: &self.dy[..],
                x: &self.x[..],
                dw: &mut self.out[..],
            },
            Role::DenseGrad => Args::DenseGrad {
                dy: &self.dy[..],
                x: &self.x[..],
                grad: &mut self.out[..],
            },
        };
        kernel.run(launch, args)
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
    /// The generic convolution kernels.
    Conv(ConvData),
    /// The dense convolution (im2col + GEMM).
    ConvDense(DenseConv),
}

/// The compiled generic convolution and its scratch (`conv_grad`'s partial sums).
struct ConvData {
    gather: ConvGather,
    scratch: Mutex<ConvScratch>,
}

#[derive(Default)]
struct ConvScratch {
    partial: Vec<f32>,
    totals: Vec<(u32, f32)>,
}

impl ConvData {
    fn new(gather: ConvGather) -> ConvData {
        ConvData {
            gather,
            scratch: Mutex::new(ConvScratch::default()),
        }
    }
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
        if let Some(g) = spec.geometry() {
            let imp = match (strategy, spec.op().role()) {
                (Strategy::Jit, _) => Imp::Jit(crate::jit::JitKernel::compile(spec)?),
                (Strategy::Generic, Role::Forward | Role::WeightGrad) => Imp::Conv(ConvData::new(
                    ConvGather::new(p, g, Direction::Forward, threads),
                )),
                (Strategy::Generic, Role::BackwardData) => Imp::Conv(ConvData::new(
                    ConvGather::new(p, g, Direction::Backward, threads),
                )),
                (Strategy::Generic | Strategy::Dense, Role::DenseGrad) => {
                    Imp::ConvDense(DenseConv::all_channels(p.rows(), g))
                }
                (Strategy::Dense, _) => Imp::ConvDense(DenseConv::new(p, g)),
                _ => unreachable!("only concrete CPU strategies are compiled"),
            };
            return Ok(Compiled {
                pattern: Arc::clone(p),
                imp,
            });
        }
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
    balanced_ranges(walk.rows(), parts, |r| walk.nnz_range(0..r).len() + 4 * r)
}

/// Splits `rows` rows into `parts` consecutive ranges of about equal cost, where `cost(r)` is
/// the cost of rows `0..r` (non-decreasing).
pub(crate) fn balanced_ranges(
    rows: usize,
    parts: usize,
    cost: impl Fn(usize) -> usize,
) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, rows.max(1));
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

/// Splits `out` into the consecutive row ranges `parts`, `plane` floats per row.
fn split_rows<'a>(
    parts: &[Range<usize>],
    plane: usize,
    out: &'a mut [f32],
) -> Vec<(Range<usize>, &'a mut [f32])> {
    let mut items = Vec::with_capacity(parts.len());
    let mut rest = out;
    for r in parts {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(r.len() * plane);
        items.push((r.clone(), head));
        rest = tail;
    }
    items
}

/// A compiled CPU kernel: one spec, the strategy that runs it and the plan that chose it.
#[derive(Clone)]
pub struct CpuKernel {
    /// Threads a launch may split over (1 up to the pool's).
    threads: usize,
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

    /// Threads a launch may split over: 1, or the backend's count where the plan chose to
    /// split (launches below the size threshold still run on one).
    pub fn threads(&self) -> usize {
        self.threads
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
        self.threads > 1 && fmas >= self.parallel_min_fmas
    }

    /// The pool dense GEMMs split over, with this kernel's threshold (never, on one thread).
    fn par_pool(&self) -> dense::Par<'_> {
        dense::Par {
            pool: &self.pool,
            min_fmas: if self.threads > 1 {
                self.parallel_min_fmas
            } else {
                usize::MAX
            },
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

    /// Runs the generic convolution kernels, split over output (or, for `conv_t`, input)
    /// channels where the launch is large enough.
    fn run_conv(&self, c: &ConvData, launch: Launch, args: Args<'_, [f32]>) {
        let Launch { batch, ld } = launch;
        let g = &c.gather;
        let rows = g.rows();
        let all_rows = 0..rows;
        let whole = std::slice::from_ref(&all_rows);
        let parts: &[Range<usize>] =
            if self.parallel(self.spec.useful_fmas(batch)) && g.parts.len() > 1 {
                &g.parts
            } else {
                whole
            };
        let isa = self.isa;
        let plane = g.out_plane_len(ld);
        let gather = |values, input, bias, relu, out: &mut [f32]| {
            let job = GatherJob {
                gather: g,
                values,
                input,
                bias,
                relu,
                batch,
                ld,
            };
            let out = &mut out[..rows * plane];
            if parts.len() == 1 {
                // One part: no list of parts (a training step allocates nothing).
                return conv::gather_part(isa, &job, 0..rows, out);
            }
            let mut items = split_rows(parts, plane, out);
            self.pool.for_each_mut(&mut items, &|(r, o)| {
                conv::gather_part(isa, &job, r.clone(), o)
            });
        };
        match args {
            Args::Spmm { values, x, bias, y } => {
                gather(values, x, bias, self.spec.op().has_relu(), y)
            }
            Args::SpmmT { values, dy, dx } => gather(values, dy, None, false, dx),
            Args::Sddmm { dy, x, dw } => {
                let job = GradJob {
                    gather: g,
                    dy,
                    x,
                    batch,
                    ld,
                };
                let lanes = conv::grad_lanes(isa);
                let mut fresh = ConvScratch::default();
                let mut guard = c.scratch.try_lock();
                let scratch = match guard.as_deref_mut() {
                    Ok(s) => s,
                    Err(_) => &mut fresh,
                };
                scratch.partial.resize(g.entries() * lanes, 0.0);
                scratch.totals.resize(g.entries(), (0, 0.0));
                if parts.len() == 1 {
                    let (p, t) = (&mut scratch.partial[..], &mut scratch.totals[..]);
                    conv::grad_part(isa, &job, 0..rows, p, t);
                } else {
                    self.grad_parts(&job, parts, scratch, lanes);
                }
                for &(k, v) in &scratch.totals {
                    dw[k as usize] = v;
                }
            }
            Args::DenseGrad { .. } => unreachable!("conv_dense_grad runs dense"),
        }
    }

    /// `conv_grad` split over the parts' rows, each part with its share of the scratch.
    fn grad_parts(
        &self,
        job: &GradJob<'_>,
        parts: &[Range<usize>],
        scratch: &mut ConvScratch,
        lanes: usize,
    ) {
        let isa = self.isa;
        let g = job.gather;
        let mut items = Vec::with_capacity(parts.len());
        let (mut partial, mut totals) = (&mut scratch.partial[..], &mut scratch.totals[..]);
        for r in parts {
            let n = g.entries_of(r.clone());
            let (p_head, p_tail) = std::mem::take(&mut partial).split_at_mut(n * lanes);
            let (t_head, t_tail) = std::mem::take(&mut totals).split_at_mut(n);
            items.push((r.clone(), p_head, t_head));
            partial = p_tail;
            totals = t_tail;
        }
        self.pool.for_each_mut(&mut items, &|(r, p, t)| {
            conv::grad_part(isa, job, r.clone(), p, t)
        });
    }

    fn run_conv_dense(&self, d: &DenseConv, launch: Launch, args: Args<'_, [f32]>) {
        let args = match args {
            Args::Spmm { values, x, bias, y } => DenseConvArgs::Forward {
                values,
                x,
                bias,
                relu: self.spec.op().has_relu(),
                y,
            },
            Args::SpmmT { values, dy, dx } => DenseConvArgs::BackwardData { values, dy, dx },
            Args::Sddmm { dy, x, dw } => DenseConvArgs::WeightGrad { dy, x, dw },
            Args::DenseGrad { dy, x, grad } => DenseConvArgs::DenseGrad { dy, x, grad },
        };
        d.run(self.par_pool(), launch.batch, launch.ld, args);
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
            Imp::Conv(c) => self.run_conv(c, launch, args),
            Imp::ConvDense(d) => self.run_conv_dense(d, launch, args),
        }
        Ok(())
    }

    /// The generic and dense kernels write columns `0..batch` only; the JIT's `spmm` and
    /// `spmm_t` store whole `f32x4` blocks, which at a batch above 1 that is not a multiple
    /// of 4 run over the padding ([`crate::jit::JitKernel`]'s `writes_padding`).
    fn writes_padding(&self) -> bool {
        match &self.compiled.imp {
            Imp::Generic(_) | Imp::Dense(_) | Imp::ConvDense(_) => false,
            // The gathers compute whole rows where the padding is small (`conv::padded_rows`).
            Imp::Conv(_) => {
                matches!(self.spec.op().role(), Role::Forward | Role::BackwardData)
                    && match (self.spec.batch(), self.spec.ld()) {
                        (sparse_ir::Dim::Fixed(b), sparse_ir::Dim::Fixed(l)) => {
                            conv::padded_rows(b, l)
                        }
                        _ => true,
                    }
            }
            Imp::Jit(j) => j.writes_padding(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparse_ir::Dim;

    fn spec(op: Op, rows: usize, cols: usize, density: f64, batch: usize) -> KernelSpec {
        let p = Arc::new(Pattern::random(rows, cols, density, 11).unwrap());
        let ld = if batch == 1 {
            1
        } else {
            batch.div_ceil(16) * 16
        };
        KernelSpec::new("fc", op, p, Dim::Fixed(batch), Dim::Fixed(ld)).unwrap()
    }

    /// A small spec whose two best predictions are close (so `Auto` times them).
    fn close_spec(backend: &CpuBackend) -> (KernelSpec, Vec<Strategy>) {
        let candidates = [
            (Op::SPMM, 30, 200, 0.2, 8),
            (Op::SPMM, 30, 200, 0.2, 16),
            (Op::SPMM, 30, 200, 0.02, 16),
            (Op::Sddmm, 30, 200, 0.05, 32),
            (Op::SpmmT, 30, 200, 0.05, 32),
            (Op::SPMM, 10, 100, 0.2, 16),
            (Op::SPMM, 100, 300, 0.2, 1),
            (Op::Sddmm, 100, 300, 0.2, 1),
        ];
        candidates
            .iter()
            .map(|&(op, r, c, d, b)| spec(op, r, c, d, b))
            .find_map(|s| backend.predict(&s).close_candidates().map(|c| (s, c)))
            .expect("one of the small specs has close predictions")
    }

    fn backend(timing: PlanTiming) -> CpuBackend {
        let mut b = CpuBackend::new(CpuOptions::default()).unwrap();
        b.set_plan_timing(timing);
        b
    }

    const GENEROUS: PlanTiming = PlanTiming::On {
        budget: Duration::from_millis(60),
    };

    /// A 2-thread backend chooses per kernel: with timing off the model's count; with
    /// timing on, both counts are measured (the split threshold lowered to 0 so that a tiny
    /// kernel may split) and a split must win by more than the tie margin; a one-thread
    /// backend races nothing. Which count wins on a loaded machine is not asserted.
    #[test]
    fn thread_count_is_chosen_per_kernel() {
        let two = |timing| {
            let mut b = CpuBackend::new(CpuOptions {
                threads: 2,
                isa: None,
            })
            .unwrap();
            b.set_plan_timing(timing);
            b.set_parallel_min_fmas(0);
            b
        };
        // Batch and ld given at run time: no JIT, and generic far ahead of dense.
        let p = Arc::new(Pattern::random(10, 100, 0.05, 11).unwrap());
        let tiny = KernelSpec::new("fc", Op::SPMM, p, Dim::Any, Dim::Any).unwrap();
        let off = two(PlanTiming::Off);
        let k = off.compile(&tiny, Strategy::Auto).unwrap();
        assert_eq!(k.plan().strategy, Strategy::Generic, "{}", k.plan());
        let features = Features::of(&tiny, 2, off.isa());
        assert_eq!(
            k.threads(),
            planner::model_threads(&features, Strategy::Generic).min(2)
        );
        assert!(k.plan().measured_threads_us.is_empty());

        let on = two(GENEROUS);
        let k = on.compile(&tiny, Strategy::Auto).unwrap();
        let m = &k.plan().measured_threads_us;
        assert_eq!(
            m.iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![1, 2],
            "{}",
            k.plan()
        );
        // The model says 1 here (below PARALLEL_MIN_FMAS): 2 must win by the tie margin.
        assert_eq!(planner::model_threads(&features, Strategy::Generic), 1);
        let want = if m[1].1 * planner::TIE_MARGIN < m[0].1 {
            2
        } else {
            1
        };
        assert_eq!(k.threads(), want, "{}", k.plan());
        assert!(k.plan().reasons.iter().any(|r| r.contains("threads timed")));
        // The decision is kept for patterns of the same size: no second race.
        let timed = on.plan_timings_run();
        let again = on.compile(&tiny, Strategy::Auto).unwrap();
        assert_eq!(on.plan_timings_run(), timed, "{}", again.plan());
        assert_eq!(again.threads(), k.threads());
        // An explicit strategy splits as the backend does; the JIT never.
        assert_eq!(on.compile(&tiny, Strategy::Generic).unwrap().threads(), 2);
        let fixed = spec(Op::SPMM, 10, 100, 0.05, 8);
        assert_eq!(on.compile(&fixed, Strategy::Jit).unwrap().threads(), 1);
        // A one-thread backend races nothing.
        let one = backend(GENEROUS);
        let k = one.compile(&tiny, Strategy::Auto).unwrap();
        assert_eq!(k.threads(), 1);
        assert!(k.plan().measured_threads_us.is_empty());
    }

    /// Timing picks the truly faster kernel: whichever close candidate is made 1 ms slower
    /// per run loses, whatever the model predicted.
    #[test]
    fn timing_picks_the_measured_faster_kernel() {
        let b = backend(GENEROUS);
        let (spec, close) = close_spec(&b);
        let model = b.predict(&spec).strategy;
        assert_eq!(close[0], model);
        for slow in [close[0], close[1]] {
            let fresh = backend(GENEROUS);
            let delay = |s: Strategy| {
                if s == slow {
                    Duration::from_millis(1)
                } else {
                    Duration::ZERO
                }
            };
            let (plan, built) = fresh.decide(&spec, &delay).unwrap();
            assert_ne!(plan.strategy, slow, "{plan}");
            assert!(close.contains(&plan.strategy), "{plan}");
            assert_eq!(plan.measured_us.len(), close.len(), "{plan}");
            let slow_us = plan.measured(slow).unwrap();
            let chosen_us = plan.measured(plan.strategy).unwrap();
            assert!(slow_us > 1000.0 && chosen_us < slow_us, "{plan}");
            assert!(
                plan.reasons
                    .iter()
                    .any(|r| r.contains("interleaved rounds")),
                "{plan}"
            );
            if slow == model {
                assert!(
                    plan.reasons.iter().any(|r| r.contains("overruled")),
                    "{plan}"
                );
            } else {
                assert!(
                    plan.reasons.iter().any(|r| r.contains("confirmed")),
                    "{plan}"
                );
            }
            // The chosen kernel comes back compiled, and it computes the right thing.
            let built = built.expect("timing built the chosen kernel");
            let k = fresh.kernel(&spec, plan.clone(), built);
            check_against_interp(&k);
            assert_eq!(fresh.plan_timings_run(), 1);
        }
    }

    fn check_against_interp(k: &CpuKernel) {
        let spec = k.spec().clone();
        let (Dim::Fixed(batch), Dim::Fixed(ld)) = (spec.batch(), spec.ld()) else {
            unreachable!()
        };
        let launch = Launch::new(batch, ld);
        let mut ops = TimingOperands::new(&spec, launch, 3, false);
        ops.run(k, launch).unwrap();
        let args: Args<'_, [f32]> = match spec.op().role() {
            Role::Forward => Args::Spmm {
                values: &ops.values[..],
                x: &ops.x[..],
                bias: ops.bias.as_deref(),
                y: &mut ops.out[..],
            },
            Role::BackwardData => Args::SpmmT {
                values: &ops.values[..],
                dy: &ops.dy[..],
                dx: &mut ops.out[..],
            },
            Role::WeightGrad => Args::Sddmm {
                dy: &ops.dy[..],
                x: &ops.x[..],
                dw: &mut ops.out[..],
            },
            Role::DenseGrad => Args::DenseGrad {
                dy: &ops.dy[..],
                x: &ops.x[..],
                grad: &mut ops.out[..],
            },
        };
        let got = match &args {
            Args::Spmm { y, .. } => y.to_vec(),
            Args::SpmmT { dx, .. } => dx.to_vec(),
            Args::Sddmm { dw, .. } => dw.to_vec(),
            Args::DenseGrad { grad, .. } => grad.to_vec(),
        };
        let want = sparse_ir::interp::reference(&spec, launch, &args).unwrap();
        sparse_ir::interp::compare(&want, &got, ld)
            .unwrap_or_else(|e| panic!("{} vs the interpreter: {e}", k.strategy()));
    }

    /// A measured decision is cached per cache key: compiling the same spec again does not
    /// time again, and says so.
    #[test]
    fn measured_decisions_are_cached() {
        let b = backend(GENEROUS);
        let (spec, close) = close_spec(&b);
        let first = b.compile(&spec, Strategy::Auto).unwrap();
        assert_eq!(b.plan_timings_run(), 1);
        assert_eq!(first.plan().measured_us.len(), close.len());
        let again = b.compile(&spec, Strategy::Auto).unwrap();
        assert_eq!(b.plan_timings_run(), 1, "{}", again.plan());
        assert_eq!(again.strategy(), first.strategy());
        assert_eq!(again.plan().measured_us, first.plan().measured_us);
        assert!(
            again.plan().reasons.iter().any(|r| r.contains("cached")),
            "{}",
            again.plan()
        );
        // A different batch is a different key.
        let other = KernelSpec::new(
            "fc",
            spec.op(),
            Arc::clone(spec.pattern()),
            Dim::Fixed(3),
            Dim::Fixed(16),
        )
        .unwrap();
        let _ = b.compile(&other, Strategy::Auto).unwrap();
        assert!(b.plan_timings_run() <= 2);
    }

    /// A measured decision also serves the next pattern of the same shape and about the
    /// same size (a layer after a sparse-momentum update), but not a much denser one.
    /// A measured decision for a convolution is kept under its geometry: a layer with the
    /// same pattern on another input size is timed anew, not given the first one's choice.
    #[test]
    fn conv_decisions_are_kept_per_geometry() {
        let b = backend(GENEROUS);
        let p = Arc::new(Pattern::dense(8, 72).unwrap());
        let spec = |hw: usize| {
            let g = sparse_ir::ConvGeometry {
                in_channels: 8,
                height: hw,
                width: hw,
                kernel: 3,
                stride: 1,
                padding: 1,
            };
            KernelSpec::conv("c", Op::CONV, p.clone(), g, Dim::Fixed(16), Dim::Fixed(16)).unwrap()
        };
        let first = b.compile(&spec(8), Strategy::Auto).unwrap();
        assert!(
            first.plan().close_candidates().is_some(),
            "a dense 8->8 convolution should be close between generic and dense: {}",
            first.plan()
        );
        let timed = b.plan_timings_run();
        assert!(timed >= 1, "{}", first.plan());
        let again = b.compile(&spec(8), Strategy::Auto).unwrap();
        assert_eq!(b.plan_timings_run(), timed, "{}", again.plan());
        let other = b.compile(&spec(12), Strategy::Auto).unwrap();
        assert!(b.plan_timings_run() > timed, "{}", other.plan());
    }

    #[test]
    fn decisions_carry_over_to_patterns_of_the_same_size() {
        let b = backend(GENEROUS);
        let (spec, _) = close_spec(&b);
        let p = spec.pattern();
        let with = |pattern: Pattern| {
            KernelSpec::new("fc", spec.op(), Arc::new(pattern), spec.batch(), spec.ld()).unwrap()
        };
        let first = b.compile(&spec, Strategy::Auto).unwrap();
        assert_eq!(b.plan_timings_run(), 1);
        // The same nonzeros, each moved one column along: a different pattern, the same size.
        let entries: Vec<(usize, usize)> = (0..p.rows())
            .flat_map(|r| p.row(r).iter().map(move |&c| (r, c as usize)))
            .map(|(r, c)| (r, (c + 1) % p.cols()))
            .collect();
        let moved = with(Pattern::from_coo(p.rows(), p.cols(), &entries).unwrap());
        assert_ne!(moved.pattern().hash(), p.hash());
        let again = b.compile(&moved, Strategy::Auto).unwrap();
        assert_eq!(b.plan_timings_run(), 1, "{}", again.plan());
        assert_eq!(again.strategy(), first.strategy());
        assert!(
            again.plan().reasons.iter().any(|r| r.contains("cached")),
            "{}",
            again.plan()
        );
        check_against_interp(&again);
        // Twice the density is another size: planned afresh (timed if still close).
        let denser = with(Pattern::random(p.rows(), p.cols(), 2.0 * p.density(), 5).unwrap());
        let k = b.compile(&denser, Strategy::Auto).unwrap();
        let timed = b.plan_timings_run();
        assert!(
            timed == 2 || b.predict(&denser).close_candidates().is_none(),
            "{}",
            k.plan()
        );
        assert!(
            !k.plan().reasons.iter().any(|r| r.contains("cached")),
            "{}",
            k.plan()
        );
    }

    /// With timing off the plan is the cost model's, every time, and says why it was not
    /// timed; explicit strategies are never timed.
    #[test]
    fn timing_off_gives_the_model_plan() {
        let b = backend(PlanTiming::Off);
        let (spec, _) = close_spec(&b);
        let k = b.compile(&spec, Strategy::Auto).unwrap();
        assert_eq!(k.strategy(), b.predict(&spec).strategy);
        assert!(k.plan().measured_us.is_empty());
        assert!(
            k.plan().reasons.iter().any(|r| r.contains("timing is off")),
            "{}",
            k.plan()
        );
        assert_eq!(b.plan_timings_run(), 0);
        let on = backend(GENEROUS);
        let g = on.compile(&spec, Strategy::Generic).unwrap();
        assert!(g.plan().measured_us.is_empty());
        assert_eq!(on.plan_timings_run(), 0);
        // A clear prediction is not timed either (and no JIT code is built for it).
        let clear = spec_clear();
        let k = on.compile(&clear, Strategy::Auto).unwrap();
        assert!(k.plan().close_candidates().is_none(), "{}", k.plan());
        assert!(k.plan().measured_us.is_empty());
        assert_eq!(on.plan_timings_run(), 0);
    }

    /// 1024×1024 at 5 %, batch 128: generic by far (the JIT is not even a candidate).
    fn spec_clear() -> KernelSpec {
        spec(Op::SPMM, 1024, 1024, 0.05, 128)
    }

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
