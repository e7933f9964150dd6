//! Hot swap: a [`SwapKernel`] is correct before, during and after its switch from the
//! generic kernel to the JIT code compiled on a background thread (differential against the
//! interpreter, on the guarded operands of `test-support`), and [`compile_hot`] swaps exactly where the planner's cost model picks the JIT.

use std::sync::mpsc;
use std::sync::Arc;

use codegen_cpu::jit::JitOptions;
use codegen_cpu::swap::{background_options, compile_hot, HotKernel, SwapKernel};
use codegen_cpu::{CpuBackend, CpuOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::backend::Kernel;
use sparse_ir::{Args, BackendError, Dim, KernelSpec, Launch, Op, Pattern, Strategy};
use test_support::{args_of, check_fn, random, Operands, Run};

/// A hot-swap kernel for `s` whose background compilation waits until the returned sender
/// sends (or is dropped).
fn gated(backend: &CpuBackend, s: &KernelSpec) -> (SwapKernel, mpsc::Sender<()>) {
    let (release, gate) = mpsc::channel::<()>();
    let k = SwapKernel::start_with(
        backend,
        s,
        backend.predict(s),
        background_options(),
        move || {
            let _ = gate.recv();
        },
    )
    .unwrap();
    (k, release)
}

fn spec(p: &Arc<Pattern>, op: Op, batch: usize, ld: usize) -> KernelSpec {
    KernelSpec::new("fc", op, p.clone(), Dim::Fixed(batch), Dim::Fixed(ld)).unwrap()
}

/// Runs `run` on guarded operands for `spec` (its fixed launch) from `seed` and checks the
/// result against the interpreter (`test_support::check_fn`); `writes_padding` is the
/// kernel's [`Kernel::writes_padding`].
fn check(
    spec: &KernelSpec,
    seed: u64,
    writes_padding: bool,
    run: impl FnOnce(Launch, Args<'_, [f32]>) -> Result<(), BackendError>,
) {
    let (Dim::Fixed(batch), Dim::Fixed(ld)) = (spec.batch(), spec.ld()) else {
        unreachable!()
    };
    let run_at = Run::new(batch, ld, seed).offset(seed as usize % 16);
    check_fn(spec, run_at, writes_padding, |l, a| {
        run(l, a).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

const OPS: [Op; 4] = [
    Op::SPMM,
    Op::Spmm {
        bias: true,
        relu: true,
    },
    Op::SpmmT,
    Op::Sddmm,
];

/// Before the background compilation may start (held by a channel), the kernel runs the
/// generic code; once released it swaps, and from then on runs the JIT code. Every run is
/// compared with the interpreter.
#[test]
fn runs_generic_until_the_jit_code_is_ready_then_jit() {
    let backend = CpuBackend::new(CpuOptions::default()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let patterns = [
        random(100, 300, 0.05, 2),
        random(7, 96, 0.2, 3),
        Arc::new(Pattern::empty(5, 9).unwrap()),
        Arc::new(Pattern::from_coo(4, 6, &[(2, 3)]).unwrap()),
    ];
    for p in &patterns {
        for op in OPS {
            for (batch, ld) in [(1, 1), (1, 16), (3, 16), (17, 32)] {
                let s = spec(p, op, batch, ld);
                let (k, release) = gated(&backend, &s);
                assert_eq!(k.active(), Strategy::Generic);
                assert!(!k.is_swapped() && k.jit_stats().is_none() && k.error().is_none());
                assert_eq!(sparse_ir::backend::Kernel::strategy(&k), Strategy::Jit);
                for _ in 0..2 {
                    check(&s, rng.random(), k.writes_padding(), |l, a| k.run(l, a));
                }
                release.send(()).unwrap();
                assert!(k.wait(), "{:?}", k.error());
                assert_eq!(k.active(), Strategy::Jit);
                let stats = k.jit_stats().unwrap();
                assert_eq!(stats.nnz, p.nnz());
                assert_eq!(stats.threads, 1);
                for _ in 0..2 {
                    check(&s, rng.random(), k.writes_padding(), |l, a| k.run(l, a));
                }
            }
        }
    }
}

/// Runs from another thread while the swap happens are all correct (each run takes one
/// kernel or the other, never a mix), and the swap is observed by that thread.
#[test]
fn runs_during_the_swap_are_correct() {
    let backend = CpuBackend::new(CpuOptions::default()).unwrap();
    let p = random(300, 784, 0.05, 5);
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        let s = spec(&p, op, 1, 16);
        let (k, release) = gated(&backend, &s);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let seeds: Vec<u64> = (0..4).map(|_| rng.random()).collect();
        let seen = std::thread::scope(|scope| {
            let runner = scope.spawn(|| {
                let mut seen = Vec::new();
                let mut i = 0;
                loop {
                    let before = k.active();
                    let seed = seeds[i % seeds.len()];
                    check(&s, seed, k.writes_padding(), |l, a| k.run(l, a));
                    seen.push(before);
                    i += 1;
                    if before == Strategy::Jit && i > 8 {
                        return seen;
                    }
                }
            });
            // let the runner use the generic kernel a while, then release the compilation
            std::thread::sleep(std::time::Duration::from_millis(5));
            release.send(()).unwrap();
            assert!(k.wait());
            runner.join().unwrap()
        });
        assert_eq!(seen[0], Strategy::Generic, "{op}");
        assert_eq!(*seen.last().unwrap(), Strategy::Jit, "{op}");
        // once swapped, never back
        let first_jit = seen.iter().position(|&s| s == Strategy::Jit).unwrap();
        assert!(
            seen[first_jit..].iter().all(|&s| s == Strategy::Jit),
            "{op}"
        );
    }
}

/// A kernel dropped before its code is ready stops the compilation; a failing compilation
/// leaves a correct generic kernel and says why; `dense_grad` cannot swap at all.
#[test]
fn drop_failure_and_unsupported() {
    let backend = CpuBackend::new(CpuOptions::default()).unwrap();
    let p = random(100, 300, 0.05, 6);
    let s = spec(&p, Op::SPMM, 1, 16);
    let (release, gate) = mpsc::channel::<()>();
    let (done_tx, done) = mpsc::channel::<()>();
    let k = SwapKernel::start_with(
        &backend,
        &s,
        backend.predict(&s),
        background_options(),
        move || {
            let _ = gate.recv();
            let _ = done_tx.send(());
        },
    )
    .unwrap();
    drop(k);
    release.send(()).unwrap();
    done.recv().unwrap(); // the thread went on after the drop without trouble

    // invalid options make the JIT compilation fail: the kernel stays generic and correct
    let bad = JitOptions {
        accumulators: 9,
        ..background_options()
    };
    let k = SwapKernel::start(&backend, &s, backend.predict(&s), bad).unwrap();
    assert!(!k.wait());
    assert_eq!(k.active(), Strategy::Generic);
    assert!(
        k.error().unwrap().to_string().contains("accumulators"),
        "{:?}",
        k.error()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    check(&s, rng.random(), k.writes_padding(), |l, a| k.run(l, a));

    let dense = KernelSpec::new(
        "fc",
        Op::DenseGrad,
        p.clone(),
        Dim::Fixed(1),
        Dim::Fixed(16),
    )
    .unwrap();
    let e = SwapKernel::start(
        &backend,
        &dense,
        backend.predict(&dense),
        background_options(),
    )
    .unwrap_err();
    assert!(matches!(e, BackendError::Unsupported { .. }), "{e}");

    // a wrong launch is an error before and after the swap, never a crash
    let k = SwapKernel::start(&backend, &s, backend.predict(&s), background_options()).unwrap();
    for _ in 0..2 {
        let mut ops = Operands::new(&s, Run::new(1, 16, rng.random()));
        assert!(k.run(Launch::new(2, 16), ops.args()).is_err());
        let mut short = vec![0.0; ops.out.len() - 1];
        let (values, bias, x, dy) = (ops.values.get(), ops.bias.get(), ops.x.get(), ops.dy.get());
        let args = args_of(s.op(), values, bias, x, dy, &mut short);
        assert!(k.run(Launch::new(1, 16), args).is_err());
        k.wait();
    }
}

/// `compile_hot` swaps exactly where the cost model picks the JIT for `Auto` (at batch 1 on
/// a small layer), compiles like `CpuBackend::compile` everywhere else, and every kernel it
/// returns is correct.
#[test]
fn compile_hot_swaps_where_the_plan_is_jit() {
    let backend = CpuBackend::new(CpuOptions::default()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut swaps = 0;
    for (rows, cols) in [(10, 100), (100, 300), (300, 784)] {
        let p = random(rows, cols, 0.05, 7);
        for op in OPS {
            for (batch, ld) in [(1, 16), (8, 16), (100, 112)] {
                let s = spec(&p, op, batch, ld);
                for strategy in [Strategy::Auto, Strategy::Generic] {
                    let hot = compile_hot(&backend, &s, strategy).unwrap();
                    let jit_planned = backend.predict(&s).strategy == Strategy::Jit;
                    let swapped = matches!(hot, HotKernel::Swap(_));
                    assert_eq!(swapped, strategy == Strategy::Auto && jit_planned, "{s:?}");
                    swaps += usize::from(swapped);
                    if let HotKernel::Swap(k) = &hot {
                        assert_eq!(k.plan().strategy, Strategy::Jit);
                        assert!(k.wait(), "{:?}", k.error());
                    }
                    let writes_padding = match &hot {
                        HotKernel::Ready(k) => k.writes_padding(),
                        HotKernel::Swap(k) => k.writes_padding(),
                    };
                    check(&s, rng.random(), writes_padding, |l, a| hot.run(l, a));
                }
            }
        }
    }
    assert!(swaps > 0, "the planner picked the JIT nowhere");
}
