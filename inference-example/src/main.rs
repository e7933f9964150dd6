//! `lenet-infer`: MNIST test accuracy and per-image latency of LeNet-300-100 with every layer
//! baked in by `sparse_kernel!` (see the crate's library).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use inference_example::{
    accuracy, argmax, fc1, fc2, fc3, Biases, Lenet, TestSet, CLASSES, INPUTS, MNIST_DIR, MODEL_FILE,
};

/// Evaluate the baked LeNet-300-100 on the MNIST test set and time it at batch 1.
#[derive(Parser)]
struct Cli {
    /// Directory holding t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz].
    #[arg(long, default_value = MNIST_DIR)]
    data_dir: PathBuf,
    /// Model file to read the biases from (the weights are baked in).
    #[arg(long, default_value = MODEL_FILE)]
    model: PathBuf,
    /// Batch size of the accuracy pass.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Passes over the test set for the batch-1 latency measurement.
    #[arg(long, default_value_t = 3)]
    latency_passes: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.batch >= 1, "--batch must be at least 1");
    let biases = Biases::load(&cli.model)?;
    let test = TestSet::load(&cli.data_dir)?;
    println!(
        "baked layers: fc1 {}x{} nnz {}, fc2 {}x{} nnz {}, fc3 {}x{} nnz {}",
        fc1::ROWS,
        fc1::COLS,
        fc1::NNZ,
        fc2::ROWS,
        fc2::COLS,
        fc2::NNZ,
        fc3::ROWS,
        fc3::COLS,
        fc3::NNZ
    );

    let mut net = Lenet::new(biases.clone(), cli.batch);
    let acc = accuracy(&mut net, &test, test.len()).context("accuracy pass")?;
    println!(
        "test accuracy: {:.2} % ({} images, batch {})",
        acc * 100.0,
        test.len(),
        cli.batch
    );

    // Batch 1, ld 1: one image at a time, as an online service would see them. Each sample
    // is timed alone (gather excluded); the median over all of them is reported.
    let mut net1 = Lenet::new(biases, 1);
    let mut x = vec![0.0; INPUTS];
    let mut logits = vec![0.0; CLASSES];
    let mut times = Vec::with_capacity(test.len() * cli.latency_passes);
    let mut correct = 0usize;
    for pass in 0..cli.latency_passes.max(1) {
        for i in 0..test.len() {
            test.gather(i, 1, &mut x, 1);
            let t = Instant::now();
            net1.forward(&x, 1, &mut logits)?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
            if pass == 0 && argmax(&logits, 0, 1) == test.labels[i] as usize {
                correct += 1;
            }
        }
    }
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!(
        "batch-1 accuracy: {:.2} % (same network, ld 1)",
        100.0 * correct as f64 / test.len() as f64
    );
    println!(
        "latency per image at batch 1: median {:.2} us, p10 {:.2} us, p90 {:.2} us, p99 {:.2} us ({} runs)",
        q(0.5),
        q(0.1),
        q(0.9),
        q(0.99),
        times.len()
    );
    Ok(())
}
