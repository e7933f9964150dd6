//! Where a model's memory goes: the resident set (VmRSS) and its peak (VmHWM) after each phase
//! of a training run on synthetic CIFAR-shaped data.
//!
//! ```text
//! cargo run --release -p runtime --example memory_phases -- wrn-16-10 128 0.05 [deterministic]
//! ```

use anyhow::Result;
use runtime::{Dataset, ModelKind, TrainConfig, Trainer, WeightGradMode};

fn status(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn report(phase: &str) {
    println!(
        "{phase:<28} rss {:>8.0} MB   peak {:>8.0} MB",
        status("VmRSS:"),
        status("VmHWM:")
    );
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model: ModelKind = args
        .get(1)
        .map_or("wrn-16-2", String::as_str)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let batch: usize = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let density: f64 = args.get(3).map_or(Ok(0.05), |s| s.parse())?;
    // `deterministic`: plans without timing (the planner times no candidates).
    let deterministic = args.get(4).is_some_and(|a| a == "deterministic");
    report("start");
    let data = Dataset::synthetic(2 * batch + batch / 4 + 1, 1, 17)?;
    report("data");
    let config = TrainConfig {
        model,
        density,
        batch_size: batch,
        epochs: 1,
        deterministic,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(config, data)?;
    report("built and compiled");
    t.bench_steps(1, WeightGradMode::Active)?;
    report("one ordinary step");
    t.bench_steps(1, WeightGradMode::Dense)?;
    report("one window step");
    t.bench_mask_update()?;
    report("mask update and recompile");
    t.bench_steps(1, WeightGradMode::Active)?;
    report("one more ordinary step");
    Ok(())
}
