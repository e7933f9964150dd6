//! Hot swap in the runtime (`ExecOptions::hot_swap`): where `auto`'s planner picks the JIT,
//! the executor hands out a kernel that runs the generic code until the JIT code is ready;
//! results agree with the reference interpreter before, during and after the swap, for
//! single kernels and for whole training steps across a mask update.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use runtime::models::lenet300_100;
use runtime::{ExecOptions, Executor, Model, Sgd, SgdConfig, Shape, WeightGradMode};
use sparse_ir::{Dim, KernelSpec, Op, Pattern, Strategy};
use test_support::{check_fn, random, Run};

fn hot_exec() -> Executor {
    Executor::new(ExecOptions {
        threads: 2,
        hot_swap: true,
        ..ExecOptions::default()
    })
    .unwrap()
}

/// Runs `spmm` (bias, ReLU) with `kernel` on guarded random operands and checks it against
/// the interpreter (`test_support::check_fn`: tolerance, guard zones, inputs, and padding
/// wherever the kernel leaves it alone).
fn check_spmm(kernel: &runtime::Kernel, rng: &mut ChaCha8Rng) {
    let spec = kernel.spec();
    let (Dim::Fixed(batch), Dim::Fixed(ld)) = (spec.batch(), spec.ld()) else {
        unreachable!()
    };
    let seed: u64 = rng.random();
    let run = Run::new(batch, ld, seed).offset(seed as usize % 16);
    check_fn(spec, run, kernel.writes_padding(), |l, a| {
        kernel.run(l, a).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_executor_swaps_where_the_plan_is_jit() {
    let exec = hot_exec();
    let blocking = Executor::new(ExecOptions {
        threads: 2,
        ..ExecOptions::default()
    })
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let op = Op::Spmm {
        bias: true,
        relu: true,
    };
    // batch 1 on a small layer: the planner's JIT case
    let small = random(10, 100, 0.05, 1);
    let spec = KernelSpec::new("fc3", op, small, Dim::Fixed(1), Dim::Fixed(16)).unwrap();
    let k = exec.compile(&spec, Strategy::Auto).unwrap();
    let planned = blocking.compile(&spec, Strategy::Auto).unwrap().strategy();
    assert_eq!(
        planned,
        Strategy::Jit,
        "the planner no longer picks the JIT here"
    );
    assert_eq!(k.strategy(), Strategy::Jit);
    let swap = k.swap().expect("a hot-swap kernel");
    // correct whichever code runs, now and after the swap
    check_spmm(&k, &mut rng);
    assert!(swap.wait(), "{:?}", swap.error());
    assert_eq!(k.active_strategy(), Strategy::Jit);
    check_spmm(&k, &mut rng);

    // batch 100: the planner's choice is not the JIT, so nothing swaps; explicit strategies
    // never swap
    let large = random(300, 784, 0.05, 2);
    let spec = KernelSpec::new("fc1", op, large, Dim::Fixed(100), Dim::Fixed(112)).unwrap();
    let k = exec.compile(&spec, Strategy::Auto).unwrap();
    assert!(k.swap().is_none());
    assert_eq!(k.active_strategy(), k.strategy());
    check_spmm(&k, &mut rng);
    let spec = KernelSpec::new(
        "fc3",
        op,
        random(10, 100, 0.05, 4),
        Dim::Fixed(1),
        Dim::Fixed(16),
    )
    .unwrap();
    let k = exec.compile(&spec, Strategy::Jit).unwrap();
    assert!(k.swap().is_none());
    assert_eq!(k.active_strategy(), Strategy::Jit);
    check_spmm(&k, &mut rng);
}

/// Two identical LeNet-300-100 models at batch 1 with random 5 % masks and inputs.
fn twins(seed: u64) -> (Model, Model) {
    let build = || {
        let mut m = lenet300_100(Shape::image(1, 28, 28), 10)
            .build(1, &mut ChaCha8Rng::seed_from_u64(seed))
            .unwrap();
        remask(&mut m, seed + 1);
        m
    };
    (build(), build())
}

/// New random 5 % masks (the same for the same seed) and a new input and label.
fn remask(m: &mut Model, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let sgd = SgdConfig::default();
    for w in m.sparse_layers_mut() {
        let mask = Pattern::random(w.rows(), w.cols(), 0.05, rng.random())
            .unwrap()
            .to_dense_mask();
        w.sync_dense(&sgd);
        let weight = w.dense_weight().to_vec();
        w.set_dense(&weight, &mask, None, None).unwrap();
    }
    for f in 0..m.input_shape().features() {
        m.input_mut().set(f, 0, rng.random_range(-0.4..2.8));
    }
    m.labels_mut()[0] = rng.random_range(0..10);
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * scale + 1e-6,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

/// Training steps at batch 1 with hot swap agree with the interpreter right after compiling
/// (JIT code probably not ready), later (ready), and right after a mask update recompiles
/// every layer.
#[test]
fn training_steps_with_hot_swap_match_the_interpreter() {
    let exec = hot_exec();
    let interp = Executor::reference();
    let (mut hot, mut reference) = twins(11);
    let sgd = Sgd::new(SgdConfig::default());
    for round in 0..2 {
        hot.compile(&exec).unwrap();
        reference.compile(&interp).unwrap();
        let plan: Vec<_> = hot.sparse_layers().map(|w| w.strategies()).collect();
        assert!(
            plan.iter().any(|s| s.values().any(|v| v == "jit")),
            "no layer's plan is the JIT at batch 1: {plan:?}"
        );
        for step in 0..6 {
            if step == 3 {
                // give the background compilations time to finish
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            let mode = if step == 0 {
                WeightGradMode::Dense
            } else {
                WeightGradMode::Active
            };
            let lh = hot.forward_backward(1, mode).unwrap();
            let lr = reference.forward_backward(1, mode).unwrap();
            assert!(
                (lh - lr).abs() <= 1e-5 * lr.abs().max(1.0),
                "round {round} step {step}: loss {lh} vs {lr}"
            );
            close(
                "logits",
                hot.logits().as_slice(),
                reference.logits().as_slice(),
            );
            for (a, b) in hot.sparse_layers().zip(reference.sparse_layers()) {
                close(&format!("{} grad", a.name()), a.grad(), b.grad());
                close(&format!("{} values", a.name()), a.values(), b.values());
            }
            sgd.step(&mut hot, 0.05);
            sgd.step(&mut reference, 0.05);
        }
        // a mask update: every layer recompiles (new swap kernels)
        remask(&mut hot, 100 + round);
        remask(&mut reference, 100 + round);
    }
}
