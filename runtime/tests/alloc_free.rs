//! A training step allocates nothing: batch gathering, forward, loss, backward and the SGD
//! update run on preallocated buffers. Counted with a global allocator, on one kernel thread
//! (this file holds a single test, so no other test thread allocates meanwhile).
//!
//! Checked with the `generic` kernels, for the steps that compute the gradient of active
//! entries only (all but the last 64 before each mask update): what `codegen-cpu` runs through
//! the `gemm` crate (the `dense` strategy and the dense gradient) allocates gemm's packing
//! workspace on every call.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use runtime::models::{lenet300_100, lenet5};
use runtime::{
    Dataset, ExecOptions, Executor, LayerPlan, ModelBuilder, Sgd, SgdConfig, Shape, Split,
    WeightGradMode,
};
use sparse_ir::Strategy;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::SeqCst) {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn steps_allocate(builder: ModelBuilder, batch: usize, density: f64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut model = builder.build(batch, &mut rng).unwrap();
    let sgd_cfg = SgdConfig::default();
    for w in model.sparse_layers_mut() {
        let mask = sparse_ir::Pattern::random(w.rows(), w.cols(), density, rng.random())
            .unwrap()
            .to_dense_mask();
        w.sync_dense(&sgd_cfg);
        let weight = w.dense_weight().to_vec();
        w.set_dense(&weight, &mask, None, None).unwrap();
    }
    for w in model.sparse_layers_mut() {
        w.set_plan(LayerPlan::uniform(Strategy::Generic));
    }
    let exec = Executor::new(ExecOptions::default()).unwrap();
    model.compile(&exec).unwrap();
    let n = 3 * batch;
    let images: Vec<u8> = (0..n * 784).map(|_| rng.random_range(0..=255u8)).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let data = Dataset::from_parts(
        Shape::image(1, 28, 28),
        10,
        images.clone(),
        labels.clone(),
        n,
        images,
        labels,
        0.13,
        0.31,
    )
    .unwrap();
    let order: Vec<u32> = (0..n as u32).rev().collect();
    let sgd = Sgd::new(sgd_cfg);
    let step = |model: &mut runtime::Model, i: usize, mode| {
        let (input, labels) = model.batch_buffers_mut();
        let idx = &order[(i % 3) * batch..(i % 3 + 1) * batch];
        let count = data.gather(Split::Train, idx, input, labels).unwrap();
        model.forward_backward(count, mode).unwrap();
        sgd.step(model, 0.01);
    };
    // Warm up every path once (kernels may size scratch on first use).
    step(&mut model, 0, WeightGradMode::Dense);
    step(&mut model, 1, WeightGradMode::Active);
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    for i in 0..6 {
        step(&mut model, i, WeightGradMode::Active);
    }
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst)
}

#[test]
fn training_steps_do_not_allocate() {
    let mnist = Shape::image(1, 28, 28);
    let a = steps_allocate(lenet300_100(mnist, 10), 100, 0.05);
    let b = steps_allocate(lenet5(mnist, 10), 4, 0.2);
    assert_eq!(
        (a, b),
        (0, 0),
        "allocations in 6 steps: LeNet-300-100, LeNet-5"
    );
}
