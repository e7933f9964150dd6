//! The first planner: a cost model over `(op, nnz, rows, cols, batch, density)` that predicts
//! each strategy's run time and picks the fastest, recording why.
//!
//! The constants were fitted to medians measured on the 2-core AVX-512 development machine
//! (`examples/spmm_bench.rs`, single-threaded); they are per ISA level where the generic
//! kernels differ. Where the batch is not fixed at compile time, the planner predicts for a
//! nominal batch ([`NOMINAL_BATCH`]) and says so in the reasons.

use std::fmt;

use sparse_ir::{Dim, KernelSpec, Op, Strategy};

use crate::isa::IsaLevel;

/// The batch the planner assumes when the spec's batch is given only at run time.
pub const NOMINAL_BATCH: usize = 100;

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
    /// Whether the spec fixes batch and `ld` (the JIT needs both).
    pub fixed_shape: bool,
    /// Threads of the backend.
    pub threads: usize,
    /// ISA level of the generic kernels.
    pub isa: IsaLevel,
}

impl Features {
    /// The features of `spec` on a backend with `threads` threads and `isa`.
    pub fn of(spec: &KernelSpec, threads: usize, isa: IsaLevel) -> Features {
        let p = spec.pattern();
        let live_rows = p.row_counts().filter(|&n| n > 0).count();
        let live_cols = p.col_counts().iter().filter(|&&n| n > 0).count();
        let batch = match spec.batch() {
            Dim::Fixed(b) => b,
            Dim::Any => NOMINAL_BATCH,
        };
        Features {
            op: spec.op(),
            rows: p.rows(),
            cols: p.cols(),
            nnz: p.nnz(),
            live_rows,
            live_cols,
            batch,
            fixed_shape: matches!((spec.batch(), spec.ld()), (Dim::Fixed(_), Dim::Fixed(_))),
            threads: threads.max(1),
            isa,
        }
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
}

/// One strategy's predicted run time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// The strategy.
    pub strategy: Strategy,
    /// Predicted median run time in microseconds.
    pub us: f64,
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
}

impl Plan {
    /// A plan that records that `strategy` was asked for explicitly.
    pub fn fixed(strategy: Strategy, features: &Features) -> Plan {
        let predicted_us = predict_all(features);
        Plan {
            strategy,
            reasons: vec![format!("strategy {strategy} requested explicitly")],
            predicted_us,
        }
    }

    /// The predicted time of `strategy`, if it was a candidate.
    pub fn predicted(&self, strategy: Strategy) -> Option<f64> {
        self.predicted_us
            .iter()
            .find(|p| p.strategy == strategy)
            .map(|p| p.us)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "strategy {}", self.strategy)?;
        for p in &self.predicted_us {
            write!(f, "; {} ≈ {:.1} µs", p.strategy, p.us)?;
        }
        for r in &self.reasons {
            write!(f, "\n  - {r}")?;
        }
        Ok(())
    }
}

/// Chooses a strategy for `features` from the predicted times.
pub fn plan(features: &Features) -> Plan {
    let f = features;
    let predicted_us = predict_all(f);
    let mut reasons =
        vec![format!(
        "{} {}x{} nnz {} (density {:.3}), batch {}{}, {} live rows, {} live cols, {} thread(s), {}",
        f.op,
        f.rows,
        f.cols,
        f.nnz,
        f.density(),
        f.batch,
        if f.fixed_shape { "" } else { " (nominal: batch not fixed)" },
        f.live_rows,
        f.live_cols,
        f.threads,
        f.isa
    )];
    if f.op == Op::DenseGrad {
        reasons.push("dense_grad is one GEMM whichever strategy runs it: chose dense".into());
        return Plan {
            strategy: Strategy::Dense,
            reasons,
            predicted_us,
        };
    }
    let best = predicted_us
        .iter()
        .min_by(|a, b| a.us.total_cmp(&b.us))
        .copied()
        .unwrap_or(Prediction {
            strategy: Strategy::Generic,
            us: 0.0,
        });
    for p in &predicted_us {
        if p.strategy != best.strategy {
            reasons.push(format!(
                "{} predicted {:.1} µs, {:.2}x the {} time",
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
        "chose {} ({:.1} µs predicted)",
        best.strategy, best.us
    ));
    Plan {
        strategy: best.strategy,
        reasons,
        predicted_us,
    }
}

/// Every candidate's prediction: generic and dense always, the JIT where it may win.
pub fn predict_all(f: &Features) -> Vec<Prediction> {
    let mut out = vec![
        Prediction {
            strategy: Strategy::Generic,
            us: generic_us(f),
        },
        Prediction {
            strategy: Strategy::Dense,
            us: dense_us(f),
        },
    ];
    if let Some(us) = jit_us(f) {
        out.push(Prediction {
            strategy: Strategy::Jit,
            us,
        });
    }
    out
}

/// Per-call overhead of any kernel (argument checks, dispatch), µs.
const CALL_US: f64 = 0.15;
/// Fork-join overhead of a 2-part job on the pool, µs.
const FORK_US: f64 = 0.6;
/// Work (multiply-adds of one launch) below which the kernels stay on one thread: about
/// 2 µs of generic-kernel work, several times the pool's fork-join cost.
pub const PARALLEL_MIN_FMAS: usize = 64 * 1024;

/// Costs of the generic kernels at one ISA level, in nanoseconds: per vector multiply-add
/// with the input in L1, L2 or beyond (large layers run in input panels); per nonzero and
/// batch-block pass (index, value, broadcast); per output row and pass (epilogue, stores);
/// per nonzero at batch 1 for `spmm`, `spmm_t` (a scatter) and `sddmm`; per `sddmm`
/// reduction. Fitted to `examples/spmm_bench.rs` medians (2-core AVX-512 machine).
struct GenericCosts {
    lanes: usize,
    vec_l1: f64,
    vec_l2: f64,
    vec_l3: f64,
    nz: f64,
    row: f64,
    b1_spmm: f64,
    b1_spmm_t: f64,
    b1_sddmm: f64,
    reduce: f64,
}

fn generic_costs(isa: IsaLevel) -> GenericCosts {
    match isa {
        IsaLevel::Avx512 => GenericCosts {
            lanes: 16,
            vec_l1: 0.29,
            vec_l2: 0.45,
            vec_l3: 1.0,
            nz: 0.35,
            row: 3.0,
            b1_spmm: 0.5,
            b1_spmm_t: 0.9,
            b1_sddmm: 0.5,
            reduce: 1.0,
        },
        IsaLevel::Avx2Fma => GenericCosts {
            lanes: 8,
            vec_l1: 0.2,
            vec_l2: 0.33,
            vec_l3: 0.6,
            nz: 0.35,
            row: 3.0,
            b1_spmm: 0.45,
            b1_spmm_t: 0.9,
            b1_sddmm: 0.95,
            reduce: 1.0,
        },
        IsaLevel::Portable => GenericCosts {
            lanes: 8,
            vec_l1: 1.2,
            vec_l2: 1.4,
            vec_l3: 1.8,
            nz: 0.4,
            row: 5.0,
            b1_spmm: 0.5,
            b1_spmm_t: 0.9,
            b1_sddmm: 0.95,
            reduce: 2.0,
        },
    }
}

/// Splits a single-threaded time over the backend's threads when the kernels would.
fn threaded(f: &Features, single_us: f64, fmas: usize) -> f64 {
    if f.threads > 1 && fmas >= PARALLEL_MIN_FMAS {
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
    let passes = b.div_ceil(8 * c.lanes) as f64;
    let (out_rows, in_rows) = match f.op {
        Op::SpmmT => (f.cols, f.rows),
        _ => (f.rows, f.cols),
    };
    // Where one batch block of the input lives.
    let input_bytes = in_rows * b.min(8 * c.lanes) * 4;
    let vec_ns = if input_bytes <= 40 * 1024 {
        c.vec_l1
    } else if input_bytes <= 1 << 20 {
        c.vec_l2
    } else {
        c.vec_l3
    };
    let ns = match f.op {
        Op::Spmm { .. } if b == 1 => nnz * c.b1_spmm + out_rows as f64 * c.row,
        Op::SpmmT if b == 1 => nnz * c.b1_spmm_t + out_rows as f64 * c.row,
        Op::Sddmm if b == 1 => nnz * c.b1_sddmm + f.rows as f64 * c.row,
        Op::Spmm { .. } => {
            nnz * (passes * c.nz + vectors * vec_ns) + out_rows as f64 * passes * c.row
        }
        // The transposed walk reads each weight through the value index.
        Op::SpmmT => {
            1.15 * nnz * (passes * c.nz + vectors * vec_ns) + out_rows as f64 * passes * c.row
        }
        Op::Sddmm => {
            nnz * (passes * (c.nz + c.reduce) + vectors * vec_ns) + f.rows as f64 * passes * c.row
        }
        Op::DenseGrad => return dense_us(f),
    };
    CALL_US + threaded(f, ns / 1000.0, f.nnz * b)
}

/// Sustained single-thread GEMM rate of the `gemm` crate (AVX-512) for an `m × n × k`
/// product, in multiply-adds per ns: ~70 on large products (1024×128×1024: 72), far less
/// when a dimension is thin (300×1×784: 2.5, 300×8×784: 10).
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

/// The JIT's predicted time, where it may win — the hook for the JIT's own cost model.
///
/// The JIT bakes the pattern into code, so it needs a fixed batch and `ld` and has nothing
/// to offer `dense_grad`. Until the JIT module publishes its measured model, this encodes
/// the prototype's figures from the issue: at batch 1 a constant-offset scalar kernel ran
/// 1.39–1.56× the generic gather kernel on 100×300 at 5 %, but lost on 300×784 (~200 KB of
/// code overflows the instruction cache) and at batch 8. So: batch 1, `spmm`/`spmm_t`, at
/// most ~3000 nonzeros, predicted at the generic time / 1.3.
pub fn jit_us(f: &Features) -> Option<f64> {
    if !f.fixed_shape || f.op == Op::DenseGrad || f.op == Op::Sddmm {
        return None;
    }
    if f.batch == 1 && f.nnz <= 3000 {
        let single = Features {
            threads: 1,
            ..f.clone()
        };
        Some(generic_us(&single) / 1.3)
    } else {
        None
    }
}

fn jit_note(f: &Features) -> Option<String> {
    if jit_us(f).is_some() {
        return None;
    }
    Some(if !f.fixed_shape {
        "jit not considered: batch and ld are not fixed".to_string()
    } else if matches!(f.op, Op::DenseGrad | Op::Sddmm) {
        format!("jit not considered for {}: no win measured", f.op)
    } else if f.batch > 1 {
        "jit not considered: it wins only at batch 1 (prototype figures)".to_string()
    } else {
        format!(
            "jit not considered: {} nonzeros give more code than the instruction cache holds",
            f.nnz
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparse_ir::Pattern;
    use std::sync::Arc;

    fn features(op: Op, rows: usize, cols: usize, every: usize, batch: usize) -> Features {
        let entries: Vec<(usize, usize)> = (0..rows * cols)
            .filter(|i| i % every == 0)
            .map(|i| (i / cols, i % cols))
            .collect();
        let p = Arc::new(Pattern::from_coo(rows, cols, &entries).unwrap());
        let spec = KernelSpec::new("fc", op, p, Dim::Fixed(batch), Dim::Fixed(batch)).unwrap();
        Features::of(&spec, 1, IsaLevel::Avx512)
    }

    #[test]
    fn sparse_layers_go_generic_dense_layers_go_dense() {
        let sparse = plan(&features(Op::SPMM, 300, 784, 20, 100));
        assert_eq!(sparse.strategy, Strategy::Generic, "{sparse}");
        let dense = plan(&features(Op::SPMM, 256, 256, 1, 128));
        assert_eq!(dense.strategy, Strategy::Dense, "{dense}");
        assert!(dense.reasons.iter().any(|r| r.contains("chose dense")));
        assert_eq!(
            plan(&features(Op::DenseGrad, 30, 40, 3, 16)).strategy,
            Strategy::Dense
        );
        // Measured: at 50 % the GEMM beats the generic kernel on 300×784, batch 100.
        let half = plan(&features(Op::SPMM, 300, 784, 2, 100));
        assert_eq!(half.strategy, Strategy::Dense, "{half}");
        let b1 = plan(&features(Op::SPMM, 300, 784, 2, 1));
        assert_eq!(b1.strategy, Strategy::Generic, "{b1}");
    }

    #[test]
    fn jit_only_where_the_shape_is_fixed_and_small() {
        let f = features(Op::SPMM, 100, 300, 20, 1);
        assert!(jit_us(&f).is_some());
        let mut any = f.clone();
        any.fixed_shape = false;
        assert!(jit_us(&any).is_none());
        assert!(plan(&any).reasons.iter().any(|r| r.contains("not fixed")));
        assert!(jit_us(&features(Op::SPMM, 300, 784, 20, 8)).is_none());
    }
}
