//! Differential tests of the CPU backend's generic and dense strategies against the
//! reference interpreter, for every op, every ISA level this CPU supports, and 1 and 2
//! threads: random patterns, batches and strides (proptest), and the named edge cases.
//!
//! Input padding columns hold NaN (a kernel that reads them fails the comparison), outputs
//! start as garbage (a kernel must overwrite every element), and every buffer is a window
//! into a larger one whose guard zones must stay untouched. Buffers start at varying offsets
//! so that the aligned-block paths meet every alignment.

use std::sync::Arc;

use codegen_cpu::{CpuBackend, CpuOptions, IsaLevel};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::interp::{compare, reference};
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

const GUARD: usize = 37;
const GUARD_VALUE: f32 = -7777.0;
const GARBAGE: f32 = 1.0e30;

/// Every (ISA level, threads) backend, with parallel splitting on even for tiny launches.
fn backends() -> Vec<CpuBackend> {
    let mut out = Vec::new();
    for isa in IsaLevel::supported() {
        for threads in [1, 2] {
            let mut b = CpuBackend::new(CpuOptions {
                threads,
                isa: Some(isa),
            })
            .expect("backend");
            b.set_parallel_min_fmas(0);
            out.push(b);
        }
    }
    out
}

/// A buffer window: `len` elements at `offset` inside guard zones.
struct Guarded {
    data: Vec<f32>,
    start: usize,
    len: usize,
}

impl Guarded {
    fn new(len: usize, offset: usize, fill: f32) -> Guarded {
        let mut data = vec![GUARD_VALUE; offset + GUARD + len + GUARD];
        let start = offset + GUARD;
        data[start..start + len].fill(fill);
        Guarded { data, start, len }
    }
    fn get(&self) -> &[f32] {
        &self.data[self.start..self.start + self.len]
    }
    fn get_mut(&mut self) -> &mut [f32] {
        &mut self.data[self.start..self.start + self.len]
    }
    fn guards_intact(&self) -> bool {
        self.data[..self.start]
            .iter()
            .chain(&self.data[self.start + self.len..])
            .all(|&v| v == GUARD_VALUE)
    }
}

/// A `rows × batch` matrix with stride `ld`: random values, NaN padding.
fn matrix(rng: &mut ChaCha8Rng, rows: usize, batch: usize, ld: usize, offset: usize) -> Guarded {
    let mut g = Guarded::new(rows * ld, offset, f32::NAN);
    let m = g.get_mut();
    for r in 0..rows {
        for v in &mut m[r * ld..r * ld + batch] {
            *v = rng.random_range(-1.0f32..1.0);
        }
    }
    g
}

fn vector(rng: &mut ChaCha8Rng, len: usize, offset: usize) -> Guarded {
    let mut g = Guarded::new(len, offset, 0.0);
    for v in g.get_mut() {
        *v = rng.random_range(-1.0f32..1.0);
    }
    g
}

/// One case: a spec and its inputs, checked on every backend and strategy.
struct Case {
    pattern: Arc<Pattern>,
    batch: usize,
    ld: usize,
    offset: usize,
    seed: u64,
}

impl Case {
    fn run(
        &self,
        backends: &[CpuBackend],
        ops: &[Op],
        strategies: &[Strategy],
    ) -> Result<(), String> {
        for &op in ops {
            self.run_op(backends, op, strategies)?;
        }
        Ok(())
    }

    fn run_op(
        &self,
        backends: &[CpuBackend],
        op: Op,
        strategies: &[Strategy],
    ) -> Result<(), String> {
        let p = &self.pattern;
        let (batch, ld) = (self.batch, self.ld);
        let launch = Launch::new(batch, ld);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let off = |k: usize| (self.offset * (k + 1)) % 16;
        let values = vector(&mut rng, p.nnz(), off(0));
        let bias = vector(&mut rng, p.rows(), off(1));
        let x = matrix(&mut rng, p.cols(), batch, ld, off(2));
        let dy = matrix(&mut rng, p.rows(), batch, ld, off(3));
        // Both a spec with batch and ld fixed and one that takes them at run time.
        let specs = [
            KernelSpec::new("fc1", op, Arc::clone(p), Dim::Fixed(batch), Dim::Fixed(ld)),
            KernelSpec::any_batch("fc1", op, Arc::clone(p)),
        ];
        let out_len = match op {
            Op::Spmm { .. } => p.rows() * ld,
            Op::SpmmT => p.cols() * ld,
            Op::Sddmm => p.nnz(),
            Op::DenseGrad => p.rows() * p.cols(),
        };
        let mut scratch = vec![0.0f32; out_len];
        let args = make_args(op, &values, &bias, &x, &dy, &mut scratch);
        let spec0 = specs[0].as_ref().map_err(|e| e.to_string())?;
        let want = reference(spec0, launch, &args).map_err(|e| e.to_string())?;
        for (si, spec) in specs.iter().enumerate() {
            let spec = spec.as_ref().map_err(|e| e.to_string())?;
            for backend in backends {
                for &strategy in strategies {
                    let kernel = match backend.compile(spec, strategy) {
                        Ok(k) => k,
                        // The JIT needs a fixed batch; the planner never picks it otherwise.
                        Err(e) => return Err(format!("compile {strategy}: {e}")),
                    };
                    let mut out = Guarded::new(out_len, off(4), GARBAGE);
                    kernel
                        .run(
                            launch,
                            make_args(op, &values, &bias, &x, &dy, out.get_mut()),
                        )
                        .map_err(|e| format!("run: {e}"))?;
                    let what = || {
                        format!(
                            "{op} {}x{} nnz {} batch {batch} ld {ld} offset {} spec#{si}, \
                             {} ({}), isa {}, {} thread(s)",
                            p.rows(),
                            p.cols(),
                            p.nnz(),
                            self.offset,
                            strategy,
                            kernel.strategy(),
                            backend.isa(),
                            backend.threads()
                        )
                    };
                    compare(&want, out.get(), ld).map_err(|m| format!("{}: {m}", what()))?;
                    if !out.guards_intact() {
                        return Err(format!("{}: wrote outside the output", what()));
                    }
                }
            }
        }
        for g in [&values, &bias, &x, &dy] {
            if !g.guards_intact() {
                return Err("an input's guard zone changed".into());
            }
        }
        Ok(())
    }
}

fn make_args<'a>(
    op: Op,
    values: &'a Guarded,
    bias: &'a Guarded,
    x: &'a Guarded,
    dy: &'a Guarded,
    out: &'a mut [f32],
) -> Args<'a, [f32]> {
    match op {
        Op::Spmm { bias: b, .. } => Args::Spmm {
            values: values.get(),
            x: x.get(),
            bias: b.then(|| bias.get()),
            y: out,
        },
        Op::SpmmT => Args::SpmmT {
            values: values.get(),
            dy: dy.get(),
            dx: out,
        },
        Op::Sddmm => Args::Sddmm {
            dy: dy.get(),
            x: x.get(),
            dw: out,
        },
        Op::DenseGrad => Args::DenseGrad {
            dy: dy.get(),
            x: x.get(),
            grad: out,
        },
    }
}

fn random_pattern(rng: &mut ChaCha8Rng, rows: usize, cols: usize, density: f64) -> Pattern {
    let mask: Vec<u8> = (0..rows * cols)
        .map(|_| u8::from(rng.random_bool(density)))
        .collect();
    Pattern::from_dense_mask(rows, cols, &mask).unwrap()
}

const BOTH: [Strategy; 2] = [Strategy::Generic, Strategy::Dense];

fn check(pattern: Pattern, batch: usize, ld: usize, offset: usize, seed: u64) {
    let case = Case {
        pattern: Arc::new(pattern),
        batch,
        ld,
        offset,
        seed,
    };
    if let Err(e) = case.run(&backends(), &Op::ALL, &BOTH) {
        panic!("{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_patterns_batches_and_strides(
        rows in 1usize..40,
        cols in 1usize..40,
        density in prop_oneof![Just(0.0), 0.01f64..0.3, Just(1.0)],
        batch in 1usize..=130,
        pad in prop_oneof![Just(0usize), 1usize..20],
        offset in 0usize..16,
        seed in any::<u64>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let p = random_pattern(&mut rng, rows, cols, density);
        let case = Case { pattern: Arc::new(p), batch, ld: batch + pad, offset, seed };
        let r = case.run(&backends(), &Op::ALL, &BOTH);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// The batches of the named cases with strides: exact, padded to 16, odd.
fn strides(batch: usize) -> Vec<usize> {
    let mut v = vec![batch, batch.next_multiple_of(16), batch + 3];
    v.dedup();
    v
}

#[test]
fn named_batches_on_a_random_layer() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let p = random_pattern(&mut rng, 33, 45, 0.2);
    for batch in [1, 3, 17, 100, 128] {
        for ld in strides(batch) {
            check(p.clone(), batch, ld, batch % 16, batch as u64);
        }
    }
}

#[test]
fn empty_rows_and_columns() {
    // Rows 0, 3, 4 and columns 1, 5, 6 empty; the rest 50 % dense.
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (rows, cols) = (9, 11);
    let mask: Vec<u8> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let empty = [0, 3, 4].contains(&r) || [1, 5, 6].contains(&c);
            u8::from(!empty && rng.random_bool(0.5))
        })
        .collect();
    let p = Pattern::from_dense_mask(rows, cols, &mask).unwrap();
    for batch in [1, 17, 100] {
        check(p.clone(), batch, batch + 1, 3, 7);
    }
}

#[test]
fn one_nonzero_dense_row_and_all_zero() {
    let one = Pattern::from_coo(5, 6, &[(3, 2)]).unwrap();
    let dense_row = Pattern::from_coo(4, 70, &(0..70).map(|c| (2, c)).collect::<Vec<_>>()).unwrap();
    let zero = Pattern::empty(6, 5).unwrap();
    let full = Pattern::dense(12, 20).unwrap();
    for p in [one, dense_row, zero, full] {
        for batch in [1, 3, 128] {
            check(p.clone(), batch, batch.next_multiple_of(16), 0, 3);
        }
    }
}

#[test]
fn seven_by_ninety_six() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let p = random_pattern(&mut rng, 7, 96, 0.3);
    for batch in [1, 3, 17] {
        for ld in strides(batch) {
            check(p.clone(), batch, ld, 5, 11);
        }
    }
}

#[test]
fn wide_inputs_run_in_l2_panels() {
    // More than 2048 input rows at batch ≥ 64: spmm (and spmm_t of the transposed shape)
    // walk the pattern in panels of input rows, accumulating into the output.
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for (rows, cols) in [(3, 4200), (4200, 3)] {
        let p = random_pattern(&mut rng, rows, cols, 0.3);
        for (batch, ld) in [(100, 112), (130, 133), (64, 64)] {
            check(p.clone(), batch, ld, 5, 13);
        }
    }
}

#[test]
fn spmm_t_with_more_values_than_l2_permutes_them_first() {
    // 270 000 nonzeros (over 1 MiB of values): spmm_t gathers them into the transpose's
    // order before it runs.
    let p = Arc::new(Pattern::dense(300, 900).unwrap());
    for (batch, ld) in [(3, 5), (17, 32)] {
        let case = Case {
            pattern: Arc::clone(&p),
            batch,
            ld,
            offset: 1,
            seed: 14,
        };
        case.run(&backends(), &[Op::SpmmT], &[Strategy::Generic])
            .unwrap();
    }
}

#[test]
fn largest_lenet_layer_300x784() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let p = Arc::new(random_pattern(&mut rng, 300, 784, 0.05));
    // The spmm-family ops on every batch; dense_grad (O(rows·cols·batch) in the oracle)
    // once.
    let ops = &Op::ALL[..6];
    for (batch, ld) in [(1, 1), (8, 16), (100, 112), (100, 100), (128, 128)] {
        let case = Case {
            pattern: Arc::clone(&p),
            batch,
            ld,
            offset: batch % 7,
            seed: 9,
        };
        case.run(&backends(), ops, &BOTH).unwrap();
    }
    let case = Case {
        pattern: p,
        batch: 100,
        ld: 112,
        offset: 0,
        seed: 10,
    };
    case.run(&backends(), &[Op::DenseGrad], &BOTH).unwrap();
}

#[test]
fn auto_plans_record_reasons_and_run_correctly() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let sparse = random_pattern(&mut rng, 64, 80, 0.05);
    let dense = Pattern::dense(48, 40).unwrap();
    for p in [sparse, dense] {
        let case = Case {
            pattern: Arc::new(p),
            batch: 64,
            ld: 64,
            offset: 0,
            seed: 12,
        };
        case.run(&backends(), &Op::ALL, &[Strategy::Auto]).unwrap();
    }
    // At batch 1 with a fixed shape the planner may pick the JIT: still exact.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let case = Case {
        pattern: Arc::new(random_pattern(&mut rng, 100, 300, 0.05)),
        batch: 1,
        ld: 1,
        offset: 0,
        seed: 13,
    };
    case.run(&backends(), &Op::ALL, &[Strategy::Auto]).unwrap();
    let b = CpuBackend::new(CpuOptions::default()).unwrap();
    let p = Arc::new(Pattern::dense(48, 40).unwrap());
    let spec = KernelSpec::new("fc2", Op::SPMM, p, Dim::Fixed(128), Dim::Fixed(128)).unwrap();
    let k = b.compile(&spec, Strategy::Auto).unwrap();
    assert_ne!(k.strategy(), Strategy::Auto);
    assert_eq!(k.plan().strategy, k.strategy());
    assert!(
        k.plan().reasons.iter().any(|r| r.contains("chose")),
        "{}",
        k.plan()
    );
    assert!(k.plan().predicted(Strategy::Generic).is_some());
    assert!(k.plan().predicted(Strategy::Dense).is_some());
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let b = CpuBackend::new(CpuOptions {
        threads: 2,
        isa: None,
    })
    .unwrap();
    let p = Arc::new(Pattern::from_coo(3, 4, &[(0, 1), (2, 3)]).unwrap());
    let spec = KernelSpec::any_batch("fc3", Op::SPMM, p).unwrap();
    for strategy in BOTH {
        let k = b.compile(&spec, strategy).unwrap();
        let (values, x) = (vec![1.0; 2], vec![1.0; 4 * 8]);
        let mut y = vec![0.0; 3 * 8 - 1];
        let e = k
            .run(
                Launch::new(8, 8),
                Args::Spmm {
                    values: &values,
                    x: &x,
                    bias: None,
                    y: &mut y,
                },
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("fc3") && e.to_string().contains('y'),
            "{e}"
        );
        let mut y = vec![0.0; 3 * 8];
        let e = k
            .run(
                Launch::new(9, 8),
                Args::Spmm {
                    values: &values,
                    x: &x,
                    bias: None,
                    y: &mut y,
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("ld = 8"), "{e}");
    }
    let e = b.compile(&spec, Strategy::Csr).unwrap_err();
    assert!(e.to_string().contains("csr"), "{e}");
}

#[test]
fn kernels_are_cached_while_alive() {
    let b = CpuBackend::new(CpuOptions::default()).unwrap();
    let p = Arc::new(Pattern::from_coo(3, 4, &[(0, 1), (2, 3)]).unwrap());
    let spec = KernelSpec::any_batch("fc1", Op::SpmmT, Arc::clone(&p)).unwrap();
    let other = KernelSpec::any_batch("fc1", Op::Sddmm, p).unwrap();
    let k1 = b.compile(&spec, Strategy::Generic).unwrap();
    let k2 = b.compile(&spec, Strategy::Generic).unwrap();
    assert_eq!(b.cached_kernels(), 1);
    let k3 = b.compile(&other, Strategy::Generic).unwrap();
    assert_eq!(b.cached_kernels(), 2);
    drop((k1, k2, k3));
    assert_eq!(b.cached_kernels(), 0);
}

#[test]
fn isa_levels_can_be_forced_and_unsupported_ones_are_refused() {
    for isa in IsaLevel::supported() {
        let b = CpuBackend::new(CpuOptions {
            threads: 1,
            isa: Some(isa),
        })
        .unwrap();
        // The environment variable may cap the level further, never raise it.
        assert!(b.isa() <= isa);
    }
    if IsaLevel::detect() < IsaLevel::Avx512 {
        let e = CpuBackend::new(CpuOptions {
            threads: 1,
            isa: Some(IsaLevel::Avx512),
        })
        .unwrap_err();
        assert!(e.to_string().contains("avx512"), "{e}");
    }
}
