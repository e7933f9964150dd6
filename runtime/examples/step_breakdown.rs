//! Where the time of one training step goes: batch gathering, forward, loss + backward (both
//! weight-gradient modes) and the SGD update, each timed over many repetitions (median), on
//! LeNet-300-100 at 5 % with MNIST, batch 100.
//!
//! `cargo run --release -p runtime --example step_breakdown -- [threads] [density] [model]`
//!
//! It also prints the time of every layer's forward and backward pass.

use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runtime::{Dataset, Split, TrainConfig, Trainer, WeightGradMode};

/// Median and minimum (the minimum shows what a quiet machine would give).
#[derive(Clone, Copy)]
struct Stat(f64, f64);

impl std::fmt::Display for Stat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "median {:8.1} us   min {:8.1} us", self.0, self.1)
    }
}

fn median(mut v: Vec<f64>) -> Stat {
    v.sort_by(f64::total_cmp);
    Stat(v[v.len() / 2], v[0])
}

fn time(reps: usize, mut f: impl FnMut()) -> Stat {
    for _ in 0..10 {
        f();
    }
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    median(v)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).map_or(Ok(2), |s| s.parse())?;
    let density: f64 = args.get(2).map_or(Ok(0.05), |s| s.parse())?;
    let model: runtime::ModelKind = args
        .get(3)
        .map_or(Ok(runtime::ModelKind::Lenet300100), |s| s.parse())?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
    let data = Dataset::load_dir(&dir)?;
    let cfg = TrainConfig {
        threads,
        density,
        model,
        eval_limit: Some(100),
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(cfg, data.clone())?;
    let mut order: Vec<u32> = (0..54_000).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(1));
    let reps = if model == runtime::ModelKind::Lenet5 {
        40
    } else {
        2000
    };
    let mut i = 0;
    let gather = time(reps, || {
        let (input, labels) = t.model_mut().batch_buffers_mut();
        let lo = (i % 540) * 100;
        data.gather(Split::Train, &order[lo..lo + 100], input, labels)
            .unwrap();
        i += 1;
    });
    let model = t.model_mut();
    let fwd = time(reps, || {
        model.forward().unwrap();
    });
    let fb_active = time(reps, || {
        model.forward_backward(100, WeightGradMode::Active).unwrap();
    });
    let fb_dense = time(reps / 4, || {
        model.forward_backward(100, WeightGradMode::Dense).unwrap();
    });
    model.forward_backward(100, WeightGradMode::Active).unwrap();
    let sgd = runtime::Sgd::new(Default::default());
    let step = time(reps, || sgd.step(model, 1e-9));
    // The whole step as the trainer runs it: a fresh batch each time, so the kernels read an
    // input the gather has just written (on this core), not one cached everywhere.
    let mut j = 0;
    let full = time(reps, || {
        let (input, labels) = model.batch_buffers_mut();
        let lo = (j % 540) * 100;
        data.gather(Split::Train, &order[lo..lo + 100], input, labels)
            .unwrap();
        model.forward_backward(100, WeightGradMode::Active).unwrap();
        sgd.step(model, 1e-9);
        j += 1;
    });
    println!("threads {threads}, density {density}: nnz {}", model.nnz());
    println!("gather            {gather}");
    println!("forward           {fwd}");
    println!("fwd+bwd (active)  {fb_active}");
    println!("fwd+bwd (dense)   {fb_dense}");
    println!("sgd               {step}");
    println!(
        "step estimate     median {:8.1} us   min {:8.1} us (gather + fwd/bwd active + sgd)",
        gather.0 + fb_active.0 + step.0,
        gather.1 + fb_active.1 + step.1
    );
    println!("whole step        {full} (timed together, fresh batches)");
    for w in model.sparse_layers() {
        println!("  {} {:?}", w.name(), w.strategies());
    }
    let per_layer = model.profile_layers(reps / 4, WeightGradMode::Active)?;
    for (name, f, b) in per_layer {
        println!("  {name:<8} forward {f:8.1} us   backward {b:8.1} us");
    }
    Ok(())
}
