//! How far `--dense-momentum window:K` is from `exact` at the first mask update: trains one
//! epoch of LeNet-300-100 on MNIST (the update runs at its end) under both modes from the
//! same seed, and compares the inactive momentum before the update and the masks after it.
//! A third run, `exact` with every op on the `dense` strategy, gives the floor that rounding
//! alone produces (same algorithm, other kernels).
//!
//! The two modes differ mostly by rounding, not by the window's truncation: the window's
//! steps take the active gradient from the SDDMM instead of the dense GEMM, and a few ReLUs
//! flip on those differences. The recorded results are in `docs/MEASUREMENTS.md`.
//!
//! `cargo run --release -p runtime --example window_vs_exact -- [seed] [K] [density]`

use std::num::NonZeroU64;
use std::sync::atomic::AtomicBool;

use runtime::{Dataset, DenseMomentum, TrainConfig, Trainer};
use sparse_ir::Strategy;

struct Snapshot {
    masks: Vec<Vec<u8>>,
    momentum: Vec<Vec<f32>>,
    weights: Vec<Vec<f32>>,
    loss: f64,
}

fn first_update(cfg: TrainConfig, data: &Dataset) -> Result<(Vec<Vec<u8>>, Snapshot), String> {
    let mut t = Trainer::new(cfg, data.clone()).map_err(|e| e.to_string())?;
    let before: Vec<Vec<u8>> = t
        .model()
        .sparse_layers()
        .map(|w| w.mask().to_vec())
        .collect();
    let stop = AtomicBool::new(false);
    let end = t.run_epoch(&stop, &mut |_| {}).map_err(|e| e.to_string())?;
    let loss = match end {
        runtime::EpochEnd::Completed(m) => {
            assert!(m.mask_updated, "the first epoch ends with a mask update");
            m.train_loss
        }
        runtime::EpochEnd::Interrupted => return Err("interrupted".into()),
    };
    let layers: Vec<_> = t.model().sparse_layers().collect();
    Ok((
        before,
        Snapshot {
            masks: layers.iter().map(|w| w.mask().to_vec()).collect(),
            momentum: layers.iter().map(|w| w.dense_momentum().to_vec()).collect(),
            weights: layers.iter().map(|w| w.dense_weight().to_vec()).collect(),
            loss,
        },
    ))
}

fn compare(name: &str, before: &[Vec<u8>], a: &Snapshot, b: &Snapshot) {
    println!("{name}: train loss {:.6} vs {:.6}", a.loss, b.loss);
    for (l, m0) in before.iter().enumerate() {
        // Momentum of entries inactive before the update (what growth ranks).
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for i in (0..m0.len()).filter(|&i| m0[i] == 0) {
            let (x, y) = (a.momentum[l][i] as f64, b.momentum[l][i] as f64);
            num += (x - y) * (x - y);
            den += y * y;
        }
        let (mut wn, mut wd) = (0.0f64, 0.0f64);
        for (x, y) in a.weights[l].iter().zip(&b.weights[l]) {
            wn += ((x - y) as f64).powi(2);
            wd += (*y as f64).powi(2);
        }
        let diff = a.masks[l]
            .iter()
            .zip(&b.masks[l])
            .filter(|(x, y)| x != y)
            .count();
        let changed = m0.iter().zip(&b.masks[l]).filter(|(x, y)| x != y).count();
        let nnz = b.masks[l].iter().filter(|&&m| m != 0).count();
        println!(
            "  layer {l}: inactive momentum rel. L2 diff {:.2e}, weight rel. L2 diff {:.2e}, \
             masks differ in {diff} entries (the update changed {changed}; nnz {nnz})",
            (num / den.max(1e-300)).sqrt(),
            (wn / wd.max(1e-300)).sqrt(),
        );
    }
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let seed: u64 = args
        .get(1)
        .map_or(Ok(17), |s| s.parse())
        .map_err(|e| format!("{e}"))?;
    let k: u64 = args
        .get(2)
        .map_or(Ok(64), |s| s.parse())
        .map_err(|e| format!("{e}"))?;
    let density: f64 = args
        .get(3)
        .map_or(Ok(0.05), |s| s.parse())
        .map_err(|e| format!("{e}"))?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
    let data = Dataset::load_dir(&dir).map_err(|e| e.to_string())?;
    let base = TrainConfig {
        seed,
        density,
        epochs: 2,
        threads: 1,
        deterministic: true,
        strategy: Strategy::Generic,
        eval_limit: Some(1000),
        ..TrainConfig::default()
    };
    let window = DenseMomentum::Window(NonZeroU64::new(k).ok_or("K must be ≥ 1")?);
    let (before, exact) = first_update(
        TrainConfig {
            dense_momentum: DenseMomentum::Exact,
            ..base.clone()
        },
        &data,
    )?;
    let (_, win) = first_update(
        TrainConfig {
            dense_momentum: window,
            ..base.clone()
        },
        &data,
    )?;
    let (_, dense) = first_update(
        TrainConfig {
            dense_momentum: DenseMomentum::Exact,
            strategy: Strategy::Dense,
            ..base
        },
        &data,
    )?;
    println!("seed {seed}, density {density}, window:{k}");
    compare(&format!("window:{k} vs exact"), &before, &win, &exact);
    compare(
        "exact/dense kernels vs exact/generic (rounding only)",
        &before,
        &dense,
        &exact,
    );
    Ok(())
}
