//! One mask update (`Masking.truncate_weights` of the reference), step by step. The order of
//! every floating-point operation follows the reference; see the module doc of `masking`.

use std::cmp::Ordering;

use super::budget;
use super::growth;
use super::reduce::{numpy_mean, torch_mean_f32};
use super::{
    GrowthMode, LayerReport, LayerView, Masking, MaskingError, PruneMode, RedistributionMode,
    RedistributionPass, UpdateReport,
};

/// The redistribution loop's pass limit (the reference's `i < 1000`).
pub(crate) const MAX_REDISTRIBUTION_PASSES: usize = 1000;

/// The share of a layer's free slots its regrowth may take (the reference's `0.99`).
const CAP_FRACTION: f64 = 0.99;

/// Layers denser than `1 − DENSE_SPARSITY` may get a lower prune rate.
const DENSE_SPARSITY: f64 = 0.2;

/// Orders by |w| ascending, then by index ascending.
fn by_magnitude_asc(a: &(f32, usize), b: &(f32, usize)) -> Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// The unnormalised redistribution score of a layer.
fn raw_score(
    mode: RedistributionMode,
    view: &LayerView<'_>,
    baseline_nonzero: f64,
) -> Result<f64, MaskingError> {
    let active_abs = |values: &[f32]| -> Vec<f32> {
        values
            .iter()
            .zip(view.mask.iter())
            .filter(|(_, &m)| m == 1)
            .map(|(v, _)| v.abs())
            .collect()
    };
    let (what, value) = match mode {
        RedistributionMode::Momentum => ("mean |momentum|", {
            let a = active_abs(view.momentum);
            if a.is_empty() {
                0.0
            } else {
                f64::from(torch_mean_f32(&a))
            }
        }),
        RedistributionMode::Magnitude => ("mean |weight|", {
            let a = active_abs(view.weight);
            if a.is_empty() {
                0.0
            } else {
                f64::from(torch_mean_f32(&a))
            }
        }),
        RedistributionMode::Nonzero => (
            "nonzero count",
            view.weight.iter().filter(|&&w| w != 0.0).count() as f64,
        ),
        RedistributionMode::None => ("size share", view.mask.len() as f64 / baseline_nonzero),
    };
    if value.is_finite() {
        Ok(value)
    } else {
        Err(MaskingError::NonFinite {
            layer: view.name.to_string(),
            what,
            value,
        })
    }
}

/// Number of entries in both ascending index lists.
fn count_common(a: &[usize], b: &[usize]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            Ordering::Less => i += 1,
            Ordering::Greater => j += 1,
            Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// Per-layer magnitude pruning: deactivates the `n` active entries of smallest |w|, or, when
/// `n = 0`, the active entries whose weight is exactly 0. Returns the pruned indices, ascending.
fn prune_layer(mask: &mut [u8], weight: &[f32], n: usize) -> Vec<usize> {
    let mut pruned: Vec<usize> = if n == 0 {
        (0..mask.len())
            .filter(|&i| mask[i] == 1 && weight[i] == 0.0)
            .collect()
    } else {
        let mut active: Vec<(f32, usize)> = (0..mask.len())
            .filter(|&i| mask[i] == 1)
            .map(|i| (weight[i].abs(), i))
            .collect();
        if n < active.len() {
            active.select_nth_unstable_by(n - 1, by_magnitude_asc);
        }
        active.iter().take(n).map(|&(_, i)| i).collect()
    };
    pruned.sort_unstable();
    for &i in &pruned {
        mask[i] = 0;
    }
    pruned
}

/// Global magnitude pruning: deactivates the `k` active entries of smallest |w| over all layers
/// (ties: earlier layer, then lower index). Returns each layer's pruned indices, ascending.
fn prune_global(views: &mut [LayerView<'_>], k: usize) -> Vec<Vec<usize>> {
    let mut all: Vec<(f32, usize, usize)> = Vec::new();
    for (l, v) in views.iter().enumerate() {
        all.extend(
            (0..v.mask.len())
                .filter(|&i| v.mask[i] == 1)
                .map(|i| (v.weight[i].abs(), l, i)),
        );
    }
    let order = |a: &(f32, usize, usize), b: &(f32, usize, usize)| {
        a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
    };
    if k > 0 && k < all.len() {
        all.select_nth_unstable_by(k - 1, order);
    }
    let mut pruned = vec![Vec::new(); views.len()];
    for &(_, l, i) in all.iter().take(k) {
        pruned[l].push(i);
    }
    for (p, v) in pruned.iter_mut().zip(views.iter_mut()) {
        p.sort_unstable();
        for &i in p.iter() {
            v.mask[i] = 0;
        }
    }
    pruned
}

/// The update proper; views are already checked and the masking is not static.
pub(crate) fn run(
    masking: &mut Masking,
    views: &mut [LayerView<'_>],
    prune_rate: f64,
) -> Result<UpdateReport, MaskingError> {
    let l_count = views.len();
    let config = masking.config;
    let b = masking.baseline_nonzero;

    // Statistics before anything changes.
    let numel: Vec<usize> = views.iter().map(|v| v.mask.len()).collect();
    let nnz: Vec<usize> = views
        .iter()
        .map(|v| v.mask.iter().filter(|&&m| m == 1).count())
        .collect();
    let zeros: Vec<usize> = numel.iter().zip(&nnz).map(|(n, z)| n - z).collect();

    // 1. Scores.
    let raw: Vec<f64> = views
        .iter()
        .map(|v| raw_score(config.redistribution, v, b))
        .collect::<Result<_, _>>()?;
    let mut total_variance = 0.0;
    for &r in &raw {
        total_variance += r;
    }
    let score: Vec<f64> = if total_variance > 0.0 {
        raw.iter().map(|&r| r / total_variance).collect()
    } else {
        let total: f64 = numel.iter().map(|&n| n as f64).sum();
        numel.iter().map(|&n| n as f64 / total).collect()
    };

    // 2. Per-layer prune rates (the dense-layer rule), 3. pruning.
    let expected_score = 1.0 / l_count as f64;
    let mut rate = vec![prune_rate; l_count];
    let mut fired = vec![false; l_count];
    let mut num_remove = vec![0usize; l_count];
    let pruned: Vec<Vec<usize>> = match config.prune {
        PruneMode::Magnitude => {
            let mut pruned = Vec::with_capacity(l_count);
            for (l, v) in views.iter_mut().enumerate() {
                let sparsity = zeros[l] as f64 / numel[l] as f64;
                if sparsity < DENSE_SPARSITY && expected_score / score[l] < 1.0 {
                    fired[l] = true;
                    // Python's min(sparsity, rate): the rate if strictly smaller.
                    if rate[l] >= sparsity {
                        rate[l] = sparsity;
                    }
                }
                num_remove[l] = ((rate[l] * nnz[l] as f64).ceil() as usize).min(nnz[l]);
                pruned.push(prune_layer(v.mask, v.weight, num_remove[l]));
            }
            pruned
        }
        PruneMode::GlobalMagnitude => {
            let total_nnz: usize = nnz.iter().sum();
            let k = ((prune_rate * total_nnz as f64).ceil() as usize).min(total_nnz);
            let pruned = prune_global(views, k);
            for (l, p) in pruned.iter().enumerate() {
                num_remove[l] = p.len();
            }
            pruned
        }
    };
    let mut total_removed = 0.0;
    for p in &pruned {
        total_removed += p.len() as f64;
    }

    // 4. Regrowth targets and the capping loop.
    let max_regrowth: Vec<f64> = (0..l_count)
        .map(|l| zeros[l] as f64 + num_remove[l] as f64)
        .collect();
    let cap: Vec<f64> = max_regrowth.iter().map(|&m| CAP_FRACTION * m).collect();
    let budget = total_removed + masking.adjusted_growth;
    let initial: Vec<f64> = score.iter().map(|&s| (s * budget).ceil()).collect();
    let mut target = initial.clone();
    let mut trace = Vec::new();
    let mut residual = 9999.0;
    let mut mean_residual = 0.0;
    let mut passes = 0;
    while residual > 0.0 && passes < MAX_REDISTRIBUTION_PASSES {
        residual = 0.0;
        for l in 0..l_count {
            let r = target[l] + mean_residual;
            if r > cap[l] {
                target[l] = cap[l];
                residual += r - cap[l];
            } else {
                target[l] = r;
            }
        }
        mean_residual = residual / l_count as f64;
        trace.push(RedistributionPass {
            iteration: passes,
            residual,
            mean_residual,
            regrowth: target.clone(),
        });
        passes += 1;
    }
    if residual > 0.0 {
        tracing::warn!(
            residual,
            "masking: the regrowth budget could not be placed within {MAX_REDISTRIBUTION_PASSES} passes (layers are too full)"
        );
    }

    // The entries each layer asks for, and what the compute budget lets it grow.
    let asked: Vec<usize> = target
        .iter()
        .map(|t| {
            let k = t.floor();
            if k > 0.0 {
                k as usize
            } else {
                0
            }
        })
        .collect();
    let allowed = match config.flops_budget {
        Some(f) => {
            let layers = masking.layers();
            let kept = (0..l_count).map(|l| (nnz[l] - pruned[l].len()) as f64);
            let room = f * budget::dense_macs(layers) - budget::macs_of(layers, kept);
            let cost: Vec<u64> = layers.iter().map(|s| s.macs_per_weight).collect();
            budget::fit_regrowth(&asked, &score, &cost, room)
        }
        None => asked.clone(),
    };
    let withheld: usize = asked.iter().zip(&allowed).map(|(a, g)| a - g).sum();

    // 5. Growth, 6. apply.
    let mut reports = Vec::with_capacity(l_count);
    let mut total_after = 0usize;
    for (l, v) in views.iter_mut().enumerate() {
        let k = allowed[l];
        let grown = match config.growth {
            GrowthMode::Momentum => growth::top_k_by_score(v.mask, v.momentum, k),
            GrowthMode::Gradient => {
                let grad = v.grad.ok_or_else(|| MaskingError::MissingGradient {
                    layer: v.name.to_string(),
                })?;
                growth::top_k_by_score(v.mask, grad, k)
            }
            GrowthMode::Random => growth::random(v.mask, k, &mut masking.rng),
            GrowthMode::MomentumNeuron => {
                growth::momentum_neuron(v.mask, v.momentum, v.rows, v.cols, k)
            }
            GrowthMode::None => Vec::new(),
        };
        for &i in &grown {
            v.mask[i] = 1;
        }
        let common = count_common(&pruned[l], &grown);
        // Grown entries that were inactive before the update start at 0; pruned-and-regrown
        // entries keep their value; everything inactive is 0.
        for &i in &grown {
            if pruned[l].binary_search(&i).is_err() {
                v.weight[i] = 0.0;
            }
        }
        for (w, &m) in v.weight.iter_mut().zip(v.mask.iter()) {
            if m == 0 {
                *w = 0.0;
            }
        }
        let nonzeros_after = nnz[l] - pruned[l].len() + grown.len();
        total_after += nonzeros_after;
        reports.push(LayerReport {
            name: v.name.to_string(),
            numel: numel[l],
            nonzeros_before: nnz[l],
            zeros_before: zeros[l],
            raw_score: raw[l],
            score: score[l],
            dense_rule_fired: fired[l],
            prune_rate: rate[l],
            num_remove: num_remove[l],
            num_pruned: pruned[l].len(),
            max_regrowth: max_regrowth[l],
            regrowth_cap: cap[l],
            regrowth_target_initial: initial[l],
            regrowth_target_final: target[l],
            regrowth_applied: k,
            regrowth_withheld: asked[l] - k,
            num_regrown: grown.len(),
            num_pruned_then_regrown: common,
            nonzeros_after,
            changed: common != pruned[l].len() || common != grown.len(),
            pruned: pruned[l].clone(),
            grown,
        });
    }

    // 7. Correction (without what the compute budget withheld).
    let shortfall = b - total_after as f64 - withheld as f64;
    masking.adjustments.push(shortfall);
    let before = masking.adjusted_growth;
    masking.adjusted_growth =
        0.25 * masking.adjusted_growth + 0.75 * shortfall + numpy_mean(&masking.adjustments);
    masking.updates += 1;

    Ok(UpdateReport {
        skipped: false,
        prune_rate,
        baseline_nonzero: b,
        total_variance,
        total_removed,
        total_nonzero_before: nnz.iter().sum(),
        total_nonzero_after: total_after,
        redistribution_iterations: passes,
        redistribution_final_residual: residual,
        redistribution_trace: trace,
        adjusted_growth_before: before,
        adjusted_growth: masking.adjusted_growth,
        shortfall,
        regrowth_withheld: withheld,
        layers: reports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_layer_removes_smallest_magnitudes() {
        let mut mask = [1, 1, 0, 1, 1];
        let weight = [0.5, -0.1, 0.0, 0.3, -0.05];
        let p = prune_layer(&mut mask, &weight, 2);
        assert_eq!(p, vec![1, 4]);
        assert_eq!(mask, [1, 0, 0, 1, 0]);
    }

    #[test]
    fn prune_zero_removes_only_active_zero_weights() {
        let mut mask = [1, 1, 0, 1];
        let weight = [0.5, 0.0, 0.0, -0.0];
        assert_eq!(prune_layer(&mut mask, &weight, 0), vec![1, 3]);
        assert_eq!(mask, [1, 0, 0, 0]);
    }

    #[test]
    fn common_entries() {
        assert_eq!(count_common(&[1, 3, 5, 7], &[2, 3, 7, 9]), 2);
        assert_eq!(count_common(&[], &[1]), 0);
    }
}
