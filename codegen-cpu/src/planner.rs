//! The planner: a cost model over `(op, nnz, rows, cols, batch, density, code size)` that
//! predicts each strategy's run time, picks the fastest and records why; where the best
//! predictions are close ([`CONFIRM_RATIO`]) the backend confirms the choice by timing those
//! kernels on the real shape ([`Plan::close_candidates`], [`Plan::confirm`]), as libxsmm
//! does, and the measured fastest wins unless within [`TIE_MARGIN`] of the model's pick.
//! The thread count is chosen per kernel the same way ([`model_threads`],
//! [`Plan::confirm_threads`]): one thread or the backend's, by timing where timing is on.
//!
//! The constants were fitted to medians measured on one CPU (`benches` binary
//! `planner-fit`, single-threaded, interleaved rounds; docs/MEASUREMENTS.md names it); they
//! are per ISA level where the generic kernels differ. Where the batch is not fixed at
//! compile time, the planner predicts for a nominal batch ([`NOMINAL_BATCH`]) and says so in
//! the reasons.
//!
//! The model is not asked to be exact, and on another CPU it is less so: timing covers its
//! error. A candidate is timed unless even its floor ([`Prediction::floor_us`], the
//! prediction without the terms whose constants belong to one CPU's caches) is far behind,
//! so the choices hold on CPUs the model was not fitted on. Where the JIT cannot win even
//! by its floor, the model predicts no JIT time at all ([`jit_us`] returns `None`), so no
//! JIT code is compiled for that layer.

use std::fmt;

use sparse_ir::{Dim, KernelSpec, Op, Strategy};

use crate::generic::{L2_BLOCK_BYTES, PANEL_ROWS};
use crate::isa::IsaLevel;

/// The batch the planner assumes when the spec's batch is given only at run time.
pub const NOMINAL_BATCH: usize = 100;

/// Candidates whose predictions are within this factor of the best one are close: the backend
/// times the two best on the real shape and keeps the measured faster (when timing is on).
///
/// Chosen by measurement (`planner-fit --replay`, which sweeps this ratio over measured
/// grids): 1.5 was the smallest ratio that left no pick more than 10 % slower than the
/// fastest on the grids of the CPU the model was fitted on; on another CPU the model
/// misjudged a sub-microsecond kernel by 1.6× (docs/MEASUREMENTS.md), so the margin is
/// wider. Decisions are cached by shape, so a training run times each layer's ops a few
/// times, not at every mask update.
pub const CONFIRM_RATIO: f64 = 2.0;

/// Timing overrules the model's choice only when that measured more than this factor slower
/// than the fastest: closer, the two are a tie within the noise of a shared machine, and
/// the model's prior stands.
pub const TIE_MARGIN: f64 = 1.05;

/// What the planner knows about a kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// The op.
    pub op: Op,
    /// Rows of the weight matrix.
    pub rows: usize,
    /// Columns of the weight matrix.
    pub cols: usize,
    /// Nonzeros.
    pub nnz: usize,
    /// Rows with at least one nonzero.
    pub live_rows: usize,
    /// Columns with at least one nonzero.
    pub live_cols: usize,
    /// The batch (the spec's, or [`NOMINAL_BATCH`]).
    pub batch: usize,
    /// The row stride (the spec's, or the batch rounded up to 16 floats).
    pub ld: usize,
    /// Whether the spec fixes batch and `ld` (the JIT needs both).
    pub fixed_shape: bool,
    /// Machine code bytes the JIT would generate ([`crate::jit::estimate`]), where it can
    /// compile the spec.
    pub jit_code_bytes: Option<usize>,
    /// Threads of the backend.
    pub threads: usize,
    /// ISA level of the generic kernels.
    pub isa: IsaLevel,
    /// The convolution geometry, for a convolution op.
    pub geometry: Option<sparse_ir::ConvGeometry>,
}

impl Features {
    /// The features of `spec` on a backend with `threads` threads and `isa`.
    pub fn of(spec: &KernelSpec, threads: usize, isa: IsaLevel) -> Features {
        let p = spec.pattern();
        let live_rows = p.row_counts().filter(|&n| n > 0).count();
        let live_cols = p.col_counts().iter().filter(|&&n| n > 0).count();
        let batch = match (spec.batch(), spec.ld()) {
            (Dim::Fixed(b), _) => b,
            (Dim::Any, Dim::Fixed(ld)) => NOMINAL_BATCH.min(ld),
            (Dim::Any, Dim::Any) => NOMINAL_BATCH,
        };
        let ld = match spec.ld() {
            Dim::Fixed(ld) => ld,
            Dim::Any => batch.div_ceil(16) * 16,
        };
        Features {
            op: spec.op(),
            rows: p.rows(),
            cols: p.cols(),
            nnz: p.nnz(),
            live_rows,
            live_cols,
            batch,
            ld,
            fixed_shape: matches!((spec.batch(), spec.ld()), (Dim::Fixed(_), Dim::Fixed(_))),
            jit_code_bytes: crate::jit::estimate(spec).map(|e| e.code_bytes),
            threads: threads.max(1),
            isa,
            geometry: spec.geometry().copied(),
        }
    }

    /// Output positions per channel (`OH·OW`; 1 for a matrix op).
    pub fn out_positions(&self) -> usize {
        self.geometry.map_or(1, |g| g.out_positions())
    }

    /// Fraction of the entries that are nonzero.
    pub fn density(&self) -> f64 {
        let n = self.rows * self.cols;
        if n == 0 {
            0.0
        } else {
            self.nnz as f64 / n as f64
        }
    }

    /// Rows of the output and of the input of the walk the kernels run (`spmm_t` walks the
    /// transpose).
    fn out_in_rows(&self) -> (usize, usize) {
        match self.op {
            Op::SpmmT | Op::ConvT => (self.cols, self.rows),
            _ => (self.rows, self.cols),
        }
    }
}

/// One strategy's predicted run time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// The strategy.
    pub strategy: Strategy,
    /// Predicted median run time in microseconds.
    pub us: f64,
    /// The least the model can promise this strategy takes on any x86 CPU: the prediction
    /// without the terms whose constants depend on the machine's caches (the JIT's code
    /// fetch from L2 and beyond); `us` where there are none. A candidate is timed unless
    /// even this floor is far behind the best prediction ([`Plan::close_candidates`]).
    pub floor_us: f64,
}

impl Prediction {
    /// A prediction whose floor is the prediction itself.
    pub fn exact(strategy: Strategy, us: f64) -> Prediction {
        Prediction {
            strategy,
            us,
            floor_us: us,
        }
    }
}

/// One strategy's measured run time on the real shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// The strategy.
    pub strategy: Strategy,
    /// Median run time in microseconds, over interleaved rounds.
    pub us: f64,
}

/// Where the measured times of a [`Plan`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timed {
    /// Measured now, `rounds` interleaved rounds.
    Now {
        /// Samples per candidate.
        rounds: usize,
    },
    /// A decision measured earlier on a pattern of the same shape and about the same size
    /// (the same op, batch, `ld` and threads; nonzeros, live rows and columns within 5 %).
    Cached,
}

/// The planner's decision for one kernel, with its reasons.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The chosen strategy (never `Auto`).
    pub strategy: Strategy,
    /// Why, in words, one line each.
    pub reasons: Vec<String>,
    /// The predicted time of every candidate considered.
    pub predicted_us: Vec<Prediction>,
    /// The measured times of the candidates timed on the real shape (empty where the
    /// prediction was clear, timing is off, or the strategy was requested explicitly).
    pub measured_us: Vec<Measurement>,
    /// The generic kernel that runs for this spec: ISA level and code shape, e.g.
    /// `avx512 level, batch-1 8-wide gather (8 nonzeros per ymm, one reduction per row)`.
    pub generic_variant: String,
    /// Whether the strategy came from the cost model (`Auto`) rather than a request.
    pub auto: bool,
    /// Threads the kernel may split a launch over: 1, or the backend's count (a launch
    /// still runs on one thread below [`PARALLEL_MIN_FMAS`]). The JIT runs on one.
    pub threads: usize,
    /// The chosen strategy's measured time per thread count, where timing chose
    /// [`Plan::threads`] (`(threads, µs)`).
    pub measured_threads_us: Vec<(usize, f64)>,
}

impl Plan {
    /// A plan that records that `strategy` was asked for explicitly.
    pub fn fixed(strategy: Strategy, features: &Features) -> Plan {
        let predicted_us = predict_all(features);
        Plan {
            strategy,
            reasons: vec![format!("strategy {strategy} requested explicitly")],
            predicted_us,
            measured_us: Vec::new(),
            generic_variant: generic_variant(features),
            auto: false,
            threads: if strategy == Strategy::Jit {
                1
            } else {
                features.threads
            },
            measured_threads_us: Vec::new(),
        }
    }

    /// The predicted time of `strategy`, if it was a candidate.
    pub fn predicted(&self, strategy: Strategy) -> Option<f64> {
        self.predicted_us
            .iter()
            .find(|p| p.strategy == strategy)
            .map(|p| p.us)
    }

    /// The measured time of `strategy`, if it was timed.
    pub fn measured(&self, strategy: Strategy) -> Option<f64> {
        self.measured_us
            .iter()
            .find(|p| p.strategy == strategy)
            .map(|p| p.us)
    }

    /// The candidates predicted within [`CONFIRM_RATIO`] of the best, best first, when there
    /// are at least two: what timing should decide between (usually the two best; all three
    /// where all three are that close). `None` for an explicit strategy, a clear prediction,
    /// or `dense_grad` (one GEMM whatever runs it).
    pub fn close_candidates(&self) -> Option<Vec<Strategy>> {
        self.close_candidates_within(CONFIRM_RATIO)
    }

    /// [`Plan::close_candidates`] with another ratio than [`CONFIRM_RATIO`] (for fitting it).
    /// A candidate is close when its floor ([`Prediction::floor_us`]) is within `ratio` of
    /// the best prediction.
    pub fn close_candidates_within(&self, ratio: f64) -> Option<Vec<Strategy>> {
        if !self.auto {
            return None;
        }
        let mut sorted = self.predicted_us.clone();
        sorted.sort_by(|a, b| a.us.total_cmp(&b.us));
        let best = sorted.first()?.us.max(1e-9);
        let close: Vec<Strategy> = sorted
            .iter()
            .filter(|p| p.floor_us.min(p.us) <= best * ratio)
            .map(|p| p.strategy)
            .collect();
        (close.len() >= 2).then_some(close)
    }

    /// Takes the measured faster of the timed candidates, records the times next to the
    /// predictions and says so in the reasons.
    pub fn confirm(&mut self, measured: Vec<Measurement>, timed: Timed) {
        let Some(best) = measured
            .iter()
            .copied()
            .min_by(|a, b| a.us.total_cmp(&b.us))
        else {
            return;
        };
        let list = measured
            .iter()
            .map(|m| format!("{} {:.2} µs", m.strategy, m.us))
            .collect::<Vec<_>>()
            .join(", ");
        let how = match timed {
            Timed::Now { rounds } => {
                format!(
                    "{rounds} interleaved rounds on random operands of this shape, paired medians"
                )
            }
            Timed::Cached => "measured earlier on a pattern of this shape and size (cached)".into(),
        };
        self.reasons.push(format!(
            "predictions within {CONFIRM_RATIO}x: timed {list} ({how})"
        ));
        let predicted = self.strategy;
        // The model's pick measured this much slower than the fastest (∞ if not timed).
        let slow = measured
            .iter()
            .find(|m| m.strategy == predicted)
            .map_or(f64::INFINITY, |m| m.us / best.us.max(1e-9));
        if best.strategy == predicted {
            self.reasons
                .push(format!("timing confirmed {predicted} (measured fastest)"));
        } else if slow <= TIE_MARGIN {
            self.reasons.push(format!(
                "timing found {} and {predicted} within {:.0} % (a tie on this machine): kept the model's {predicted}",
                best.strategy,
                (TIE_MARGIN - 1.0) * 100.0
            ));
        } else {
            self.reasons.push(format!(
                "timing overruled the model: chose {} ({predicted} measured {slow:.2}x slower)",
                best.strategy
            ));
            self.strategy = best.strategy;
        }
        self.measured_us = measured;
    }
}

impl Plan {
    /// Takes the thread count from times of the chosen strategy measured on each count
    /// (`(threads, µs)`: the calling thread writes the inputs and the kernel runs, timed
    /// together, as a training step runs them). As with strategies, the measured fastest
    /// overrules the model's count only when the model's measured more than [`TIE_MARGIN`]
    /// slower.
    pub fn confirm_threads(&mut self, measured: Vec<(usize, f64)>, timed: Timed) {
        let mut sorted = measured.clone();
        sorted.sort_by_key(|m| m.0);
        let Some(&(fastest, best)) = sorted.iter().min_by(|a, b| a.1.total_cmp(&b.1)) else {
            return;
        };
        let model = sorted
            .iter()
            .find(|m| m.0 == self.threads)
            .map_or(f64::INFINITY, |m| m.1);
        let threads = if model <= best * TIE_MARGIN {
            self.threads
        } else {
            fastest
        };
        let list = sorted
            .iter()
            .map(|(t, us)| format!("{t} thread(s) {us:.2} µs"))
            .collect::<Vec<_>>()
            .join(", ");
        let how = match timed {
            Timed::Now { rounds } => format!("{rounds} interleaved rounds"),
            Timed::Cached => "cached".into(),
        };
        self.reasons.push(format!(
            "threads timed: {list} ({how}, inputs written by the caller): {threads} thread(s)"
        ));
        self.set_threads(threads);
        self.measured_threads_us = measured;
    }

    /// Sets [`Plan::threads`], and the generic variant's note on splitting rows with it.
    pub fn set_threads(&mut self, threads: usize) {
        if let Some(at) = self.generic_variant.find(", rows split over ") {
            self.generic_variant.truncate(at);
        }
        if threads > 1 && self.strategy == Strategy::Generic {
            self.generic_variant
                .push_str(&format!(", rows split over {threads} threads"));
        }
        self.threads = threads;
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "strategy {}", self.strategy)?;
        if self.threads > 1 {
            write!(f, " on {} threads", self.threads)?;
        }
        if self.strategy == Strategy::Generic {
            write!(f, " ({})", self.generic_variant)?;
        }
        write!(f, "\n  predicted:")?;
        for (i, p) in self.predicted_us.iter().enumerate() {
            let sep = if i == 0 { "" } else { ";" };
            write!(f, "{sep} {} {:.2} µs", p.strategy, p.us)?;
        }
        if !self.measured_us.is_empty() {
            write!(f, "\n  measured by the planner:")?;
            for (i, p) in self.measured_us.iter().enumerate() {
                let sep = if i == 0 { "" } else { ";" };
                write!(f, "{sep} {} {:.2} µs", p.strategy, p.us)?;
            }
        }
        if !self.measured_threads_us.is_empty() {
            write!(f, "\n  measured per thread count:")?;
            for (i, (t, us)) in self.measured_threads_us.iter().enumerate() {
                let sep = if i == 0 { "" } else { ";" };
                write!(f, "{sep} {t} thread(s) {us:.2} µs")?;
            }
        }
        write!(f, "\n  generic variant: {}", self.generic_variant)?;
        for r in &self.reasons {
            write!(f, "\n  - {r}")?;
        }
        Ok(())
    }
}

/// Chooses a strategy for `features` from the predicted times (no timing: the backend
/// confirms close choices, see [`Plan::close_candidates`]).
pub fn plan(features: &Features) -> Plan {
    let f = features;
    let predicted_us = predict_all(f);
    let mut reasons =
        vec![format!(
        "{} {}x{} nnz {} (density {:.3}), batch {} ld {}{}, {} live rows, {} live cols, {} thread(s), {}",
        f.op,
        f.rows,
        f.cols,
        f.nnz,
        f.density(),
        f.batch,
        f.ld,
        if f.fixed_shape { "" } else { " (nominal: batch not fixed)" },
        f.live_rows,
        f.live_cols,
        f.threads,
        f.isa
    )];
    let generic_variant = generic_variant(f);
    if matches!(f.op, Op::DenseGrad | Op::ConvDenseGrad) {
        reasons.push(format!(
            "{} is one GEMM whichever strategy runs it: chose dense",
            f.op.name()
        ));
        return Plan {
            strategy: Strategy::Dense,
            reasons,
            predicted_us,
            measured_us: Vec::new(),
            generic_variant,
            auto: false,
            threads: f.threads,
            measured_threads_us: Vec::new(),
        };
    }
    let best = predicted_us
        .iter()
        .min_by(|a, b| a.us.total_cmp(&b.us))
        .copied()
        .unwrap_or(Prediction::exact(Strategy::Generic, 0.0));
    for p in &predicted_us {
        if p.strategy != best.strategy {
            reasons.push(format!(
                "{} predicted {:.2} µs, {:.2}x the {} time",
                p.strategy,
                p.us,
                p.us / best.us.max(1e-9),
                best.strategy
            ));
        }
    }
    if let Some(why) = jit_note(f) {
        reasons.push(why);
    }
    reasons.push(format!(
        "model chose {} ({:.2} µs predicted)",
        best.strategy, best.us
    ));
    let threads = model_threads(f, best.strategy);
    if let Some((single, split)) = thread_predictions(f, best.strategy) {
        reasons.push(format!(
            "model: {} on 1 thread {single:.2} µs, on {} {split:.2} µs: {threads} thread(s)",
            best.strategy, f.threads,
        ));
    }
    let mut plan = Plan {
        strategy: best.strategy,
        reasons,
        predicted_us,
        measured_us: Vec::new(),
        generic_variant,
        auto: true,
        threads,
        measured_threads_us: Vec::new(),
    };
    plan.set_threads(threads);
    plan
}

/// The prediction of one concrete strategy (∞ for a JIT that cannot compile the spec).
pub fn predict_one(f: &Features, strategy: Strategy) -> f64 {
    match strategy {
        Strategy::Generic => generic_us(f),
        Strategy::Dense => dense_us(f),
        Strategy::Jit => jit_us(f).unwrap_or(f64::INFINITY),
        _ => f64::INFINITY,
    }
}

/// The multiply-adds by which `strategy`'s kernel decides whether to split a launch over
/// threads (the nonzeros' work for the generic kernels, the compact GEMM's for dense);
/// `None` for the JIT, which never splits.
pub fn split_fmas(f: &Features, strategy: Strategy) -> Option<usize> {
    match strategy {
        Strategy::Generic => Some(f.nnz * f.batch),
        Strategy::Dense => Some(f.live_rows * f.live_cols * f.batch),
        _ => None,
    }
}

/// Whether `strategy` would split a launch of this spec over the backend's threads: the
/// generic and dense kernels do from [`PARALLEL_MIN_FMAS`] on, the JIT never.
pub fn splits(f: &Features, strategy: Strategy) -> bool {
    split_fmas(f, strategy).is_some_and(|fmas| parallel(f, fmas))
}

/// The predicted time of `strategy` on one thread and split over the backend's, µs, where
/// it would split.
fn thread_predictions(f: &Features, strategy: Strategy) -> Option<(f64, f64)> {
    splits(f, strategy).then(|| {
        let single = predict_one(
            &Features {
                threads: 1,
                ..f.clone()
            },
            strategy,
        );
        (single, predict_one(f, strategy))
    })
}

/// The model's thread count for `strategy`: the backend's where the split is predicted
/// faster than one thread, else 1.
pub fn model_threads(f: &Features, strategy: Strategy) -> usize {
    if matches!(f.op, Op::DenseGrad | Op::ConvDenseGrad) {
        return f.threads;
    }
    match thread_predictions(f, strategy) {
        Some((single, split)) if split < single => f.threads,
        _ => 1,
    }
}

/// Every candidate's prediction: generic and dense always, the JIT where it may win.
pub fn predict_all(f: &Features) -> Vec<Prediction> {
    let mut out = vec![
        Prediction::exact(Strategy::Generic, generic_us(f)),
        Prediction::exact(Strategy::Dense, dense_us(f)),
    ];
    if let Some((us, floor_us)) = jit_prediction(f) {
        out.push(Prediction {
            strategy: Strategy::Jit,
            us,
            floor_us,
        });
    }
    out
}

/// Per-call overhead of a generic or dense kernel (argument checks, dispatch), µs.
const CALL_US: f64 = 0.05;
/// Per-call overhead of a JIT kernel (argument checks, one call per chunk), µs.
const JIT_CALL_US: f64 = 0.02;
/// Fork-join overhead of a 2-part job on the pool, µs.
const FORK_US: f64 = 0.6;
/// Work (multiply-adds of one launch) below which the kernels stay on one thread: about
/// 2 µs of generic-kernel work, several times the pool's fork-join cost.
pub const PARALLEL_MIN_FMAS: usize = 64 * 1024;

/// Costs of the generic kernels at one ISA level, in nanoseconds: per vector multiply-add
/// with the input in L1, L2 or beyond (large layers run in input panels), and at least
/// `l2_floor` per nonzero whose input row comes from L2 (one or two vectors a nonzero wait on
/// L2's latency: 300×784 at batch 8 runs at 1.1–1.6 ns per nonzero); per nonzero and
/// batch-block pass (index, value, broadcast); per output row and pass (loop, epilogue), and
/// per output row and vector (zeroing, stores); per nonzero at batch 1 for `spmm`, `spmm_t` (a scatter) and `sddmm`; per `sddmm`
/// reduction. Fitted to `planner-fit` medians (2-core AVX-512 machine).
struct GenericCosts {
    lanes: usize,
    max_vectors: usize,
    vec_l1: f64,
    vec_l2: f64,
    vec_l3: f64,
    l2_floor: f64,
    nz: f64,
    row: f64,
    row_vec: f64,
    b1_spmm: f64,
    b1_spmm_t: f64,
    b1_sddmm: f64,
    reduce: f64,
}

fn generic_costs(isa: IsaLevel) -> GenericCosts {
    match isa {
        IsaLevel::Avx512 => GenericCosts {
            lanes: 16,
            max_vectors: 9,
            vec_l1: 0.29,
            vec_l2: 0.45,
            vec_l3: 1.0,
            l2_floor: 1.0,
            nz: 0.35,
            row: 3.0,
            row_vec: 1.2,
            b1_spmm: 0.35,
            b1_spmm_t: 0.9,
            b1_sddmm: 0.38,
            reduce: 1.0,
        },
        IsaLevel::Avx2Fma => GenericCosts {
            lanes: 8,
            max_vectors: 8,
            vec_l1: 0.2,
            vec_l2: 0.33,
            vec_l3: 0.6,
            l2_floor: 1.0,
            nz: 0.35,
            row: 3.0,
            row_vec: 1.2,
            b1_spmm: 0.45,
            b1_spmm_t: 0.9,
            b1_sddmm: 0.95,
            reduce: 1.0,
        },
        IsaLevel::Portable => GenericCosts {
            lanes: 8,
            max_vectors: 8,
            vec_l1: 1.2,
            vec_l2: 1.4,
            vec_l3: 1.8,
            l2_floor: 1.2,
            nz: 0.4,
            row: 5.0,
            row_vec: 1.5,
            b1_spmm: 0.5,
            b1_spmm_t: 0.9,
            b1_sddmm: 0.95,
            reduce: 2.0,
        },
    }
}

/// Whether the kernels split a launch of `fmas` multiply-adds over the threads.
fn parallel(f: &Features, fmas: usize) -> bool {
    f.threads > 1 && fmas >= PARALLEL_MIN_FMAS
}

/// Splits a single-threaded time over the backend's threads when the kernels would.
fn threaded(f: &Features, single_us: f64, fmas: usize) -> f64 {
    if parallel(f, fmas) {
        single_us / f.threads as f64 * 1.1 + FORK_US
    } else {
        single_us
    }
}

/// Predicted time of the generic kernels, µs.
pub fn generic_us(f: &Features) -> f64 {
    let c = generic_costs(f.isa);
    let b = f.batch;
    let nnz = f.nnz as f64;
    let vectors = b.div_ceil(c.lanes) as f64;
    let passes = b.div_ceil(c.max_vectors * c.lanes) as f64;
    let (out_rows, in_rows) = f.out_in_rows();
    // Where one batch block of the input lives: its rows are `ld` floats apart, so a block
    // occupies whole rows up to `ld` (batch 8 with `ld` 16 fills cache lines half).
    let input_bytes = in_rows * f.ld.max(b).min(c.max_vectors * c.lanes) * 4;
    let vec_ns = if input_bytes <= 40 * 1024 {
        c.vec_l1
    } else if input_bytes <= 1 << 20 {
        c.vec_l2
    } else {
        c.vec_l3
    };
    // Vector work per nonzero, with the latency floor for the share of input rows that
    // miss L1.
    let l1_miss = (1.0 - 40.0 * 1024.0 / input_bytes.max(1) as f64).max(0.0);
    let per_nz = |vectors: f64| (vectors * vec_ns).max(c.l2_floor * l1_miss * passes);
    let ns = match f.op {
        Op::Spmm { .. } if b == 1 => nnz * c.b1_spmm + out_rows as f64 * c.row,
        // The scatter runs on one thread; its values and indices stream from L2 once they
        // outgrow 256 KiB (1.2–1.3 ns per nonzero on 300×784 at 20–30 %, 0.9 below).
        Op::SpmmT if b == 1 => {
            let per_nz = if f.nnz * 8 > 256 * 1024 {
                c.b1_spmm_t * 1.4
            } else {
                c.b1_spmm_t
            };
            return CALL_US + (nnz * per_nz + f.rows as f64 * c.row) / 1000.0;
        }
        Op::Sddmm if b == 1 => nnz * c.b1_sddmm + f.rows as f64 * c.row,
        Op::Spmm { .. } => {
            nnz * (passes * c.nz + per_nz(vectors))
                + out_rows as f64 * (passes * c.row + vectors * c.row_vec)
        }
        // The transposed walk reads each weight through the value index (a dependent load:
        // cheap while the values sit in L1, about a nanosecond from L2), or permutes the
        // values into its order first where they outgrow L2.
        Op::SpmmT => {
            let values_bytes = f.nnz * 4;
            let ind = if values_bytes > L2_BLOCK_BYTES {
                1.0 / passes
            } else if values_bytes <= 32 * 1024 {
                0.3
            } else {
                1.0
            };
            1.15 * nnz * (passes * (c.nz + ind) + per_nz(vectors))
                + out_rows as f64 * (passes * c.row + vectors * c.row_vec)
        }
        Op::Sddmm => {
            nnz * (passes * (c.nz + c.reduce) + per_nz(vectors)) + f.rows as f64 * passes * c.row
        }
        Op::DenseGrad | Op::ConvDenseGrad => return dense_us(f),
        Op::Conv { .. } | Op::ConvT | Op::ConvGrad => return conv_generic_us(f),
    };
    CALL_US + threaded(f, ns / 1000.0, f.nnz * b)
}

/// Sustained single-thread GEMM rate of the `gemm` crate (AVX-512) for an `m × n × k`
/// product, in multiply-adds per ns: high on large products, far less when a dimension is
/// thin (fitted to `planner-fit` medians).
fn gemm_fma_per_ns(m: usize, n: usize, k: usize) -> f64 {
    let eff = |d: usize, half: f64| d as f64 / (d as f64 + half);
    let peak = 80.0;
    let thin = (m.min(n)).min(k);
    let n_eff = if n == 1 || thin == 1 {
        0.035
    } else {
        eff(n.min(m), 24.0)
    };
    peak * n_eff * eff(m.max(n), 8.0) * eff(k, 16.0)
}

/// Predicted time of the dense strategy, µs: scattering the values into the compact matrix,
/// gathering and scattering compacted operands, and the GEMM.
pub fn dense_us(f: &Features) -> f64 {
    if f.geometry.is_some() {
        return conv_dense_us(f);
    }
    let b = f.batch;
    let (nr, nc) = (f.live_rows, f.live_cols);
    let gather_in = |live: usize, all: usize| if live < all { live * b } else { 0 };
    let (m, n, k, moved) = match f.op {
        Op::Spmm { .. } => (nr, b, nc, gather_in(nc, f.cols) + gather_in(nr, f.rows)),
        Op::SpmmT => (nc, b, nr, gather_in(nr, f.rows) + gather_in(nc, f.cols)),
        Op::Sddmm => (
            nr,
            nc,
            b,
            gather_in(nr, f.rows) + gather_in(nc, f.cols) + f.nnz,
        ),
        Op::DenseGrad => (f.rows, f.cols, b, 0),
        Op::Conv { .. } | Op::ConvT | Op::ConvGrad | Op::ConvDenseGrad => {
            unreachable!("convolutions returned above")
        }
    };
    let fmas = m * n * k;
    let gemm_ns = if fmas == 0 {
        0.0
    } else {
        fmas as f64 / gemm_fma_per_ns(m, n, k) + 1500.0
    };
    let scatter_ns = match f.op {
        Op::Spmm { .. } | Op::SpmmT => f.nnz as f64 * 0.3,
        _ => 0.0,
    };
    let ns = gemm_ns + scatter_ns + moved as f64 * 0.3;
    CALL_US + threaded(f, ns / 1000.0, fmas)
}

/// Code bytes the L1 instruction cache holds for a JIT kernel without misses worth counting.
const JIT_L1I_BYTES: f64 = 16.0 * 1024.0;
/// Bytes of JIT code fetched at the L2 rate (measured: 300 KB still ran at it, 620 KB and
/// more at about a third of it).
const JIT_L2_BYTES: f64 = 512.0 * 1024.0;
/// Rate at which code beyond L1i is fetched from L2, bytes per ns.
const JIT_FETCH_L2: f64 = 32.0;
/// Rate at which code beyond [`JIT_L2_BYTES`] is fetched, bytes per ns.
const JIT_FETCH_L3: f64 = 10.0;
/// JIT cost per nonzero and 4-float batch block (scalar at batch 1), ns.
const JIT_NZ_BLOCK: f64 = 0.27;
/// JIT cost per output row and batch block of `spmm`/`spmm_t` (zeroing, store), ns.
const JIT_ROW_BLOCK: f64 = 0.5;

/// The JIT's predicted time, µs, where it may win; `None` where it cannot (no JIT code is
/// compiled for such a layer).
///
/// The JIT bakes the pattern into code, so it needs a fixed batch and `ld` and has nothing
/// to offer `dense_grad`. Its code runs one `f32x4` batch block at a time (scalar at batch
/// 1), so it does about 0.27 ns of work per nonzero and block, plus 0.5 ns per output row
/// and block; its code (about 14–18 bytes per nonzero for
/// `spmm`/`spmm_t`, 13–120 for `sddmm`) streams from L2 once it outgrows L1i, at about 32
/// bytes per ns, and at a third of that beyond 512 KiB; `spmm`/`spmm_t` stream it once per
/// batch block. The JIT wins at small batches on small layers and loses by 2–3× at batches
/// of 64 and more, where the generic kernels keep eight or nine 512-bit accumulators per
/// row (the measurements are in docs/MEASUREMENTS.md).
pub fn jit_us(f: &Features) -> Option<f64> {
    jit_prediction(f).map(|(us, _)| us)
}

/// The JIT's prediction and its floor (at batches up to [`JIT_FLOOR_MAX_BATCH`], the work
/// alone, as if every byte of code came from L1i), µs, where it may win.
///
/// The code-fetch constants were fitted on one CPU and are the model's weakest part across
/// CPUs (their caches differ: docs/MEASUREMENTS.md has a case where the model put the JIT
/// at 1.9× the generic time and it ran 1.5× faster). So the JIT stays a candidate, and is
/// timed where close, while its floor is within [`JIT_HOPELESS`] of the generic
/// prediction.
fn jit_prediction(f: &Features) -> Option<(f64, f64)> {
    if !f.fixed_shape
        || f.op == Op::DenseGrad
        || f.op.is_conv()
        || f.nnz == 0
        || jit_writes_padding(f)
    {
        return None;
    }
    let code = f.jit_code_bytes? as f64;
    let b = f.batch;
    let nnz = f.nnz as f64;
    let blocks = b.div_ceil(4) as f64;
    // Work per nonzero, and how often the code streams per call: spmm/spmm_t loop over
    // the batch blocks outside the rows (the whole code runs once per block); sddmm keeps a
    // row's blocks inside.
    let out_rows = f.out_in_rows().0 as f64;
    let (work_ns, code_passes) = match f.op {
        Op::Spmm { .. } | Op::SpmmT => (
            (nnz * JIT_NZ_BLOCK + out_rows * JIT_ROW_BLOCK) * blocks,
            blocks,
        ),
        Op::Sddmm if b == 1 => (nnz * JIT_NZ_BLOCK, 1.0),
        Op::Sddmm if b < 16 => (nnz * (0.26 + 0.045 * b as f64), 1.0),
        Op::Sddmm => (nnz * JIT_NZ_BLOCK * blocks, 1.0),
        Op::DenseGrad | Op::Conv { .. } | Op::ConvT | Op::ConvGrad | Op::ConvDenseGrad => {
            return None
        }
    };
    let l2_bytes = (code.min(JIT_L2_BYTES) - JIT_L1I_BYTES).max(0.0);
    let l3_bytes = (code - JIT_L2_BYTES).max(0.0);
    // Fetching from L2 overlaps the work; from L3 it does not.
    let ns =
        work_ns.max(code_passes * l2_bytes / JIT_FETCH_L2) + code_passes * l3_bytes / JIT_FETCH_L3;
    let us = JIT_CALL_US + ns / 1000.0;
    // Up to four batch blocks the code's fetch is most of the time, and its constants are
    // the CPU's; beyond, the work is (at batch 64–100 the JIT ran 2–3× behind the generic
    // kernel on both CPUs measured), and the prediction stands.
    let floor_us = if b <= JIT_FLOOR_MAX_BATCH {
        JIT_CALL_US + work_ns / 1000.0
    } else {
        us
    };
    // Where even the floor puts the JIT clearly behind the generic kernel it cannot win: no
    // candidate, so nothing is compiled.
    let generic = generic_us(&Features {
        threads: 1,
        ..f.clone()
    });
    (floor_us <= generic * JIT_HOPELESS).then_some((us, floor_us))
}

/// The largest batch at which the JIT's floor leaves out its code fetch.
const JIT_FLOOR_MAX_BATCH: usize = 16;

/// The JIT is a candidate while its floor is within this factor of the generic prediction
/// (beyond, its work alone is too much: at batch 64–100 it is 2–3× behind on every machine
/// measured).
const JIT_HOPELESS: f64 = 2.0;

/// Whether the JIT's `spmm`/`spmm_t` code would write the padding columns `batch..ld` of the
/// output: it stores whole `f32x4` blocks, so a batch above 1 that is not a multiple of 4
/// spills into the padding (measured: batch 3, `ld` 16 writes column 3; batch 17, `ld` 32
/// columns 17–19), which buffers shared with other code must keep. Until the JIT masks its
/// last block, the planner does not offer it there (an explicit `Strategy::Jit` still
/// compiles it).
fn jit_writes_padding(f: &Features) -> bool {
    matches!(f.op, Op::Spmm { .. } | Op::SpmmT) && f.batch > 1 && !f.batch.is_multiple_of(4)
}

fn jit_note(f: &Features) -> Option<String> {
    if jit_us(f).is_some() {
        return None;
    }
    Some(if !f.fixed_shape {
        "jit not considered: batch and ld are not fixed".to_string()
    } else if matches!(f.op, Op::DenseGrad | Op::ConvDenseGrad) {
        format!(
            "jit not considered for {}: no pattern to bake in",
            f.op.name()
        )
    } else if f.op.is_conv() {
        "jit not considered: no cost model for the JIT's convolutions yet (Strategy::Jit compiles them)"
            .to_string()
    } else if f.nnz == 0 {
        "jit not considered: no nonzeros".to_string()
    } else if f.jit_code_bytes.is_none() {
        format!(
            "jit not considered: a row has more than the {} nonzeros one JIT function compiles",
            crate::jit::MAX_ROW_NNZ
        )
    } else if jit_writes_padding(f) {
        format!(
            "jit not considered: its 4-float blocks would write the padding columns {}..{} (batch not a multiple of 4)",
            f.batch,
            f.batch.next_multiple_of(4)
        )
    } else {
        format!(
            "jit not considered (nothing compiled): even without code fetch predicted over {JIT_HOPELESS}x the generic time ({} B of code, batch {})",
            f.jit_code_bytes.unwrap_or(0),
            f.batch
        )
    })
}

/// The generic kernel that runs for these features: ISA level and code shape, as the
/// generic module dispatches (batch-1 kernels, row-blocked batch kernels with up to 9 zmm /
/// 8 ymm accumulators per row, input panels for inputs beyond L2, value permutation for
/// large `spmm_t`, threads).
pub fn generic_variant(f: &Features) -> String {
    let c = generic_costs(f.isa);
    let isa = f.isa.name();
    let (_, in_rows) = f.out_in_rows();
    let b = f.batch;
    let reg = match f.isa {
        IsaLevel::Avx512 => "zmm",
        IsaLevel::Avx2Fma => "ymm",
        IsaLevel::Portable => "8-float vector",
    };
    let threads = if f.threads > 1 && parallel(f, f.nnz * b) {
        format!(", rows split over {} threads", f.threads)
    } else {
        String::new()
    };
    let gather_ok = in_rows.saturating_mul(f.ld) <= i32::MAX as usize;
    let mut s = match f.op {
        Op::DenseGrad => return "gemm (dense_grad is one GEMM at every ISA level)".into(),
        Op::ConvDenseGrad => {
            return "im2col + gemm (conv_dense_grad is one GEMM per chunk of positions at every ISA level)".into()
        }
        Op::Conv { .. } | Op::ConvT | Op::ConvGrad => {
            return format!(
                "{} level, direct convolution: nonzeros grouped by channel and tap, pieces of up to {} vectors of output positions in registers{}",
                f.isa,
                if f.isa == IsaLevel::Avx512 { 16 } else { 8 },
                if f.threads > 1 { format!(", channels split over {} threads", f.threads) } else { String::new() }
            )
        }
        Op::SpmmT if b == 1 => {
            return "scalar batch-1 scatter over the rows of W (values in order, one thread, any ISA level)".into()
        }
        Op::Spmm { .. } if b == 1 => match f.isa {
            // The AVX-512 level runs the 8-wide gathers at batch 1 (measured faster).
            IsaLevel::Avx512 if gather_ok => {
                "avx512 level, batch-1 8-wide gather (8 nonzeros per ymm, one reduction per row)"
                    .to_string()
            }
            IsaLevel::Avx2Fma if gather_ok => {
                "avx2 batch-1 gather (8 nonzeros per ymm, one reduction per row)".to_string()
            }
            _ => format!("{isa} batch-1 scalar (4 accumulators per row)"),
        },
        Op::Sddmm if b == 1 => match f.isa {
            IsaLevel::Avx512 if gather_ok => {
                "avx512 batch-1 gather (16 products per zmm)".to_string()
            }
            _ => format!("{isa} batch-1 scalar (one product per nonzero)"),
        },
        _ => {
            let vectors = b.div_ceil(c.lanes);
            let passes = vectors.div_ceil(c.max_vectors);
            let per_pass = vectors.div_ceil(passes);
            let accs = match per_pass {
                1 | 2 => 4,
                3 | 4 => 2,
                _ => 1,
            };
            let what = if matches!(f.op, Op::Sddmm) {
                format!(
                    "{isa} row-blocked sddmm: dY block of {per_pass} {reg} kept in registers, one dot product per nonzero"
                )
            } else {
                format!(
                    "{isa} row-blocked: {per_pass} {reg} per row block, {accs} accumulator set{}",
                    if accs > 1 { "s" } else { "" }
                )
            };
            let pass_note = if passes > 1 {
                format!(", {passes} batch passes")
            } else {
                String::new()
            };
            let masked = if !b.is_multiple_of(c.lanes) {
                ", last vector masked"
            } else {
                ""
            };
            let pad = if f.isa != IsaLevel::Portable && f.ld.is_multiple_of(c.lanes) {
                format!(", X padded (ld {} = {} B rows): aligned loads", f.ld, f.ld * 4)
            } else {
                format!(", ld {}: unaligned loads", f.ld)
            };
            format!("{what}{pass_note}{masked}{pad}")
        }
    };
    if f.op == Op::SpmmT {
        if f.nnz * 4 > L2_BLOCK_BYTES {
            s.push_str(", over the transpose with values permuted into its order");
        } else {
            s.push_str(", over the transpose, values through its value index");
        }
    }
    let width = b.min(128);
    if f.op != Op::DenseGrad
        && b > 1
        && in_rows * 128 * 4 > L2_BLOCK_BYTES
        && in_rows * width * 4 > L2_BLOCK_BYTES
    {
        s.push_str(&format!(", input in panels of {PANEL_ROWS} rows"));
    }
    s.push_str(&threads);
    s
}

/// Sustained rate of the generic convolution kernels, multiply-adds per ns and thread (one
/// vector FMA per nonzero, position and batch vector, its input from L1 or L2).
const CONV_FMA_PER_NS: f64 = 12.0;

/// Predicted time of the generic convolution kernels, µs: the useful multiply-adds
/// (`nnz·OH·OW·batch`) at `CONV_FMA_PER_NS` multiply-adds per ns, with the batch's last
/// vector counted whole.
pub fn conv_generic_us(f: &Features) -> f64 {
    let lanes = generic_costs(f.isa).lanes;
    let b = f.batch.div_ceil(lanes) * lanes;
    let fmas = f.nnz * f.out_positions() * b;
    let rows = f.out_in_rows().0 * f.out_positions();
    let ns = fmas as f64 / CONV_FMA_PER_NS + rows as f64 * 2.0;
    CALL_US + threaded(f, ns / 1000.0, fmas)
}

/// Predicted time of the dense convolution, µs: im2col of the live input channels and a GEMM
/// over the live output channels (all channels for `conv_dense_grad`).
pub fn conv_dense_us(f: &Features) -> f64 {
    let Some(g) = f.geometry else {
        return dense_us(f);
    };
    let columns = g.out_positions() * f.batch;
    let (m, k) = match f.op {
        Op::ConvDenseGrad => (f.rows, f.cols),
        _ => (f.live_rows, f.live_cols),
    };
    let fmas = m * k * columns;
    let gemm_ns = if fmas == 0 {
        0.0
    } else {
        fmas as f64 / gemm_fma_per_ns(m, columns.min(4096), k)
    };
    let im2col_ns = (k * columns) as f64 * 0.3;
    CALL_US + threaded(f, (gemm_ns + im2col_ns) / 1000.0, fmas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparse_ir::Pattern;
    use std::sync::Arc;

    fn spec(op: Op, rows: usize, cols: usize, density: f64, batch: usize) -> KernelSpec {
        let p = Arc::new(Pattern::random(rows, cols, density, 7).unwrap());
        let ld = batch.div_ceil(16) * 16;
        KernelSpec::new("fc", op, p, Dim::Fixed(batch), Dim::Fixed(ld)).unwrap()
    }

    fn features(op: Op, rows: usize, cols: usize, density: f64, batch: usize) -> Features {
        Features::of(&spec(op, rows, cols, density, batch), 1, IsaLevel::Avx512)
    }

    fn pick(op: Op, rows: usize, cols: usize, density: f64, batch: usize) -> Plan {
        plan(&features(op, rows, cols, density, batch))
    }

    fn conv_features(op: Op, out: usize, c: usize, hw: usize, density: f64) -> Features {
        let g = sparse_ir::ConvGeometry {
            in_channels: c,
            height: hw,
            width: hw,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let p = std::sync::Arc::new(
            sparse_ir::Pattern::random(out, g.pattern_cols(), density, 3).unwrap(),
        );
        let spec = KernelSpec::conv("c", op, p, g, Dim::Fixed(128), Dim::Fixed(128)).unwrap();
        Features::of(&spec, 1, IsaLevel::Avx512)
    }

    #[test]
    fn convolutions_go_generic_when_sparse_and_never_jit() {
        for op in [Op::CONV, Op::ConvT, Op::ConvGrad] {
            let f = conv_features(op, 64, 64, 16, 0.05);
            assert_eq!(f.out_positions(), 256);
            let p = plan(&f);
            assert_eq!(p.strategy, Strategy::Generic, "{p}");
            assert!(p.predicted(Strategy::Jit).is_none(), "{p}");
            assert!(p.generic_variant.contains("direct convolution"), "{p}");
            // the generic time scales with the positions: a 4x larger plane is about 4x
            let big = conv_features(op, 64, 64, 32, 0.05);
            let ratio = generic_us(&big) / generic_us(&f);
            assert!((3.0..5.0).contains(&ratio), "{ratio}");
        }
        // dense enough, the dense convolution is predicted at least close
        let f = conv_features(Op::CONV, 64, 64, 16, 1.0);
        assert!(
            dense_us(&f) < 2.0 * generic_us(&f),
            "{} {}",
            dense_us(&f),
            generic_us(&f)
        );
        let grad = plan(&conv_features(Op::ConvDenseGrad, 64, 64, 16, 0.05));
        assert_eq!(grad.strategy, Strategy::Dense, "{grad}");
        assert!(grad.close_candidates().is_none());
    }

    #[test]
    fn sparse_layers_go_generic_dense_layers_go_dense() {
        let sparse = pick(Op::SPMM, 300, 784, 0.05, 100);
        assert_eq!(sparse.strategy, Strategy::Generic, "{sparse}");
        let dense = pick(Op::SPMM, 256, 256, 1.0, 128);
        assert_eq!(dense.strategy, Strategy::Dense, "{dense}");
        assert!(dense.reasons.iter().any(|r| r.contains("chose dense")));
        assert_eq!(
            pick(Op::DenseGrad, 30, 40, 0.3, 16).strategy,
            Strategy::Dense
        );
        // At 50 % on 300×784, batch 100, GEMM and the generic kernel are close: timing
        // decides between them (and the JIT is no candidate).
        let half = pick(Op::SPMM, 300, 784, 0.5, 100);
        let close = half.close_candidates().expect("close at 50 %");
        assert!(
            close.contains(&Strategy::Dense) && close.contains(&Strategy::Generic),
            "{half}"
        );
        assert!(!close.contains(&Strategy::Jit), "{half}");
        let big = pick(Op::SPMM, 1024, 1024, 0.05, 128);
        assert_eq!(big.strategy, Strategy::Generic, "{big}");
    }

    /// The named shapes of the measurements: the JIT where it won by 1.5–4× (batch 1 and 8
    /// on the small LeNet layers), generic at batch 100, and no JIT candidate at all where it
    /// lost by 2× or more (nothing would be compiled).
    #[test]
    fn jit_where_it_won_and_no_candidate_where_it_lost() {
        for (op, rows, cols, batch) in [
            (Op::SPMM, 100, 300, 1),
            (Op::SPMM, 10, 100, 1),
            (Op::SpmmT, 10, 100, 1),
            (Op::SpmmT, 100, 300, 8),
            (Op::Sddmm, 100, 300, 8),
        ] {
            let p = pick(op, rows, cols, 0.05, batch);
            assert_eq!(p.strategy, Strategy::Jit, "{p}");
            assert!(p.predicted(Strategy::Jit).unwrap() < p.predicted(Strategy::Generic).unwrap());
        }
        for (op, rows, cols, density, batch) in [
            (Op::SPMM, 300, 784, 0.05, 100),
            (Op::SpmmT, 300, 784, 0.2, 100),
            (Op::Sddmm, 300, 784, 0.05, 100),
            (Op::SPMM, 1024, 1024, 0.05, 128),
        ] {
            let p = pick(op, rows, cols, density, batch);
            assert_eq!(p.strategy, Strategy::Generic, "{p}");
            // Not timed, so never compiled: its work alone is too far behind.
            let close = p.close_candidates().unwrap_or_default();
            assert!(!close.contains(&Strategy::Jit), "{p}");
        }
        let far = pick(Op::SPMM, 1024, 1024, 0.05, 128);
        assert!(far.predicted(Strategy::Jit).is_none(), "{far}");
        assert!(
            far.reasons.iter().any(|r| r.contains("nothing compiled")),
            "{far}"
        );
    }

    /// Where the JIT's code outgrows L2 the model's code-fetch term depends on the CPU: the
    /// two cases where it mispredicted on AMD EPYC (docs/MEASUREMENTS.md) are timed.
    #[test]
    fn the_jit_is_timed_where_only_code_fetch_puts_it_behind() {
        for (op, batch) in [(Op::Sddmm, 8), (Op::SPMM, 1)] {
            let p = pick(op, 300, 784, 0.2, batch);
            let jit = p.predicted_us.iter().find(|c| c.strategy == Strategy::Jit);
            let jit = jit.expect("a jit candidate");
            assert!(jit.floor_us < jit.us, "{p}");
            let close = p.close_candidates().expect("close candidates");
            assert!(close.contains(&Strategy::Jit), "{p}");
        }
    }

    #[test]
    fn no_jit_for_rows_longer_than_one_function_takes() {
        // A row over the JIT's bound: not a candidate, the reason says so, nothing compiles.
        let long = crate::jit::MAX_ROW_NNZ + 1;
        for op in [Op::SPMM, Op::Sddmm] {
            let p = pick(op, 1, long, 1.0, 1);
            assert!(p.predicted(Strategy::Jit).is_none(), "{p}");
            assert_ne!(p.strategy, Strategy::Jit, "{p}");
            assert!(
                p.reasons
                    .iter()
                    .any(|r| r.contains("nonzeros one JIT function")),
                "{p}"
            );
        }
        // `spmm_t` walks the transpose: one long column.
        let p = pick(Op::SpmmT, long, 1, 1.0, 1);
        assert!(p.predicted(Strategy::Jit).is_none(), "{p}");
        // At the bound, the JIT is still predicted.
        let p = pick(Op::SPMM, 1, crate::jit::MAX_ROW_NNZ, 1.0, 1);
        assert!(p.predicted(Strategy::Jit).is_some(), "{p}");
    }

    #[test]
    fn jit_only_where_the_shape_is_fixed() {
        let f = features(Op::SPMM, 100, 300, 0.05, 1);
        assert!(jit_us(&f).is_some());
        let mut any = f.clone();
        any.fixed_shape = false;
        assert!(jit_us(&any).is_none());
        assert!(plan(&any).reasons.iter().any(|r| r.contains("not fixed")));
        let grad = features(Op::DenseGrad, 100, 300, 0.05, 1);
        assert!(jit_us(&grad).is_none());
        // Batches whose JIT blocks would spill into the padding: not offered.
        for batch in [3, 17] {
            let p = pick(Op::SPMM, 10, 100, 0.05, batch);
            assert!(p.predicted(Strategy::Jit).is_none(), "{p}");
            assert!(p.reasons.iter().any(|r| r.contains("padding")), "{p}");
        }
        assert!(pick(Op::Sddmm, 10, 100, 0.05, 3)
            .predicted(Strategy::Jit)
            .is_some());
    }

    #[test]
    fn close_pairs_and_confirmation() {
        let mut p = pick(Op::SPMM, 100, 300, 0.05, 1);
        // Force two close predictions.
        p.predicted_us = vec![
            Prediction::exact(Strategy::Generic, 1.0),
            Prediction::exact(Strategy::Dense, 9.0),
            Prediction::exact(Strategy::Jit, 0.8),
        ];
        p.strategy = Strategy::Jit;
        assert_eq!(
            p.close_candidates(),
            Some(vec![Strategy::Jit, Strategy::Generic])
        );
        p.confirm(
            vec![
                Measurement {
                    strategy: Strategy::Jit,
                    us: 2.0,
                },
                Measurement {
                    strategy: Strategy::Generic,
                    us: 1.0,
                },
            ],
            Timed::Now { rounds: 9 },
        );
        assert_eq!(p.strategy, Strategy::Generic);
        assert_eq!(p.measured(Strategy::Jit), Some(2.0));
        // Within the tie margin the model's pick stands.
        let mut tie = p.clone();
        tie.strategy = Strategy::Jit;
        tie.confirm(
            vec![
                Measurement {
                    strategy: Strategy::Jit,
                    us: 1.03,
                },
                Measurement {
                    strategy: Strategy::Generic,
                    us: 1.0,
                },
            ],
            Timed::Cached,
        );
        assert_eq!(tie.strategy, Strategy::Jit, "{tie}");
        assert!(tie.reasons.iter().any(|r| r.contains("tie")), "{tie}");
        assert!(p.reasons.iter().any(|r| r.contains("overruled")), "{p}");
        let text = p.to_string();
        assert!(
            text.contains("measured by the planner: jit 2.00 µs; generic 1.00 µs"),
            "{text}"
        );
        // Far apart: nothing to confirm; an explicit strategy is never confirmed.
        p.predicted_us[1].us = 1.1;
        assert_eq!(
            p.close_candidates(),
            Some(vec![Strategy::Jit, Strategy::Generic, Strategy::Dense])
        );
        p.predicted_us[0] = Prediction::exact(Strategy::Generic, 5.0);
        p.predicted_us[1] = Prediction::exact(Strategy::Dense, 9.0);
        assert_eq!(p.close_candidates(), None);
        // A candidate whose floor is close is timed, whatever its full prediction.
        p.predicted_us[1].floor_us = 1.0;
        assert_eq!(
            p.close_candidates(),
            Some(vec![Strategy::Jit, Strategy::Dense])
        );
        let fixed = Plan::fixed(Strategy::Generic, &features(Op::SPMM, 10, 10, 0.5, 1));
        assert_eq!(fixed.close_candidates(), None);
    }

    #[test]
    fn generic_variants_are_named() {
        let v = |op, batch, isa| {
            let mut f = features(op, 300, 784, 0.05, batch);
            f.isa = isa;
            generic_variant(&f)
        };
        assert_eq!(
            v(Op::SPMM, 1, IsaLevel::Avx512),
            "avx512 level, batch-1 8-wide gather (8 nonzeros per ymm, one reduction per row)"
        );
        assert!(v(Op::SPMM, 1, IsaLevel::Avx2Fma).starts_with("avx2 batch-1 gather"));
        assert!(v(Op::SPMM, 1, IsaLevel::Portable).starts_with("portable batch-1 scalar"));
        assert!(v(Op::SpmmT, 1, IsaLevel::Avx512).contains("scatter"));
        let b100 = v(Op::SPMM, 100, IsaLevel::Avx512);
        assert!(
            b100.starts_with("avx512 row-blocked: 7 zmm per row block, 1 accumulator set"),
            "{b100}"
        );
        assert!(b100.contains("X padded (ld 112"), "{b100}");
        let b8 = v(Op::SPMM, 8, IsaLevel::Avx2Fma);
        assert!(
            b8.starts_with("avx2 row-blocked: 1 ymm per row block, 4 accumulator sets"),
            "{b8}"
        );
        let big = v(Op::SPMM, 128, IsaLevel::Avx512);
        assert!(big.contains("8 zmm") && !big.contains("passes"), "{big}");
        assert!(v(Op::SpmmT, 100, IsaLevel::Avx512).contains("transpose"));
        assert!(v(Op::Sddmm, 100, IsaLevel::Avx512).contains("sddmm"));
        let mut wide = features(Op::SPMM, 64, 4096, 0.01, 128);
        wide.isa = IsaLevel::Avx512;
        assert!(generic_variant(&wide).contains("panels of 1024 rows"));
        let mut two = features(Op::SPMM, 300, 784, 0.05, 100);
        two.threads = 2;
        assert!(generic_variant(&two).ends_with("rows split over 2 threads"));
    }
}
