//! Each rule of the mask update on small hand-made layers: the cap, the overflow loop and its
//! 1000-pass limit, the correction term, pruned-and-regrown entries keeping their value,
//! zero-momentum entries never growing, the dense-layer rule, global-magnitude pruning, the
//! growth variants keeping the budget, ERK and the initial masks, state round trips and errors.

use proptest::prelude::*;
use runtime::masking::{
    GrowthMode, InitMode, LayerSpec, LayerView, Masking, MaskingConfig, MaskingError, PruneMode,
    RedistributionMode, UpdateReport, MASKING_STATE_VERSION,
};

/// An owned layer for the tests.
#[derive(Debug, Clone)]
struct Layer {
    name: String,
    rows: usize,
    cols: usize,
    weight: Vec<f32>,
    mask: Vec<u8>,
    momentum: Vec<f32>,
    grad: Option<Vec<f32>>,
}

impl Layer {
    /// A `rows × cols` layer; `active` lists the active entries with their weights, `momentum` is
    /// the momentum of every entry.
    fn new(
        name: &str,
        rows: usize,
        cols: usize,
        active: &[(usize, f32)],
        momentum: &[f32],
    ) -> Self {
        let n = rows * cols;
        assert_eq!(momentum.len(), n);
        let mut weight = vec![0.0; n];
        let mut mask = vec![0; n];
        for &(i, w) in active {
            weight[i] = w;
            mask[i] = 1;
        }
        Layer {
            name: name.to_string(),
            rows,
            cols,
            weight,
            mask,
            momentum: momentum.to_vec(),
            grad: None,
        }
    }

    fn spec(&self) -> LayerSpec {
        LayerSpec::new(&self.name, &[self.rows, self.cols]).unwrap()
    }

    fn nnz(&self) -> usize {
        self.mask.iter().filter(|&&m| m == 1).count()
    }
}

fn masking(config: MaskingConfig, layers: &[Layer]) -> Masking {
    Masking::new(config, layers.iter().map(Layer::spec).collect()).unwrap()
}

fn try_update(m: &mut Masking, layers: &mut [Layer], p: f64) -> Result<UpdateReport, MaskingError> {
    let mut views: Vec<LayerView<'_>> = layers
        .iter_mut()
        .map(|l| LayerView {
            name: &l.name,
            rows: l.rows,
            cols: l.cols,
            weight: &mut l.weight,
            mask: &mut l.mask,
            momentum: &l.momentum,
            grad: l.grad.as_deref(),
        })
        .collect();
    m.update(&mut views, p)
}

fn update(m: &mut Masking, layers: &mut [Layer], p: f64) -> UpdateReport {
    try_update(m, layers, p).unwrap()
}

/// Invariants every update keeps.
fn check_invariants(before: &[Layer], after: &[Layer], r: &UpdateReport) {
    let mut total = 0;
    for ((b, a), lr) in before.iter().zip(after).zip(&r.layers) {
        for i in 0..a.mask.len() {
            assert!(a.mask[i] <= 1);
            if a.mask[i] == 0 {
                assert_eq!(a.weight[i], 0.0, "{}: masked weight {i}", a.name);
            }
        }
        for &i in &lr.pruned {
            assert_eq!(b.mask[i], 1, "{}: pruned inactive {i}", a.name);
        }
        for &i in &lr.grown {
            let was_pruned = lr.pruned.binary_search(&i).is_ok();
            assert!(b.mask[i] == 0 || was_pruned, "{}: grew active {i}", a.name);
            assert_eq!(a.mask[i], 1);
            if was_pruned {
                assert_eq!(a.weight[i].to_bits(), b.weight[i].to_bits(), "kept value");
            } else {
                assert_eq!(a.weight[i], 0.0, "new entry starts at 0");
            }
        }
        for i in 0..a.mask.len() {
            let touched = lr.pruned.binary_search(&i).is_ok() || lr.grown.binary_search(&i).is_ok();
            if !touched {
                assert_eq!(a.mask[i], b.mask[i]);
                if a.mask[i] == 1 {
                    assert_eq!(a.weight[i].to_bits(), b.weight[i].to_bits());
                }
            }
        }
        assert_eq!(lr.nonzeros_before, b.nnz());
        assert_eq!(lr.nonzeros_after, a.nnz());
        assert_eq!(
            lr.nonzeros_after,
            lr.nonzeros_before - lr.num_pruned + lr.num_regrown
        );
        assert!(lr.num_regrown <= lr.regrowth_applied);
        assert_eq!(lr.changed, a.mask != b.mask);
        total += a.nnz();
    }
    assert_eq!(r.total_nonzero_after, total);
}

fn seq(n: usize, f: impl Fn(usize) -> f32) -> Vec<f32> {
    (0..n).map(f).collect()
}

#[test]
fn overflow_of_a_capped_layer_is_spread_over_all_layers() {
    // Three 1×10 layers; `c` has by far the largest momentum but few free slots.
    let small = seq(10, |i| 0.01 + i as f32 * 1e-3);
    let a = Layer::new(
        "a",
        1,
        10,
        &[(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.4)],
        &small,
    );
    let b = Layer::new(
        "b",
        1,
        10,
        &[(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.4)],
        &small,
    );
    let c_mom = seq(10, |i| if i < 7 { 8.0 } else { 1.0 + i as f32 });
    let c = Layer::new(
        "c",
        1,
        10,
        &(0..7)
            .map(|i| (i, 0.1 * (i + 1) as f32))
            .collect::<Vec<_>>(),
        &c_mom,
    );
    let mut layers = vec![a, b, c];
    let before = layers.clone();
    let mut m = masking(MaskingConfig::new(0.5), &layers);
    let r = update(&mut m, &mut layers, 0.5);
    check_invariants(&before, &layers, &r);

    // n = ceil(0.5·4) = 2, 2, ceil(0.5·7) = 4: R = 8. c's cap is 0.99·(3 + 4) = 6.93.
    assert_eq!(r.total_removed, 8.0);
    let lc = &r.layers[2];
    assert_eq!(lc.max_regrowth, 7.0);
    assert_eq!(lc.regrowth_cap, 0.99 * 7.0);
    assert!(lc.regrowth_target_initial > lc.regrowth_cap);
    assert_eq!(lc.regrowth_target_final, lc.regrowth_cap);
    assert_eq!(lc.regrowth_applied, 6);
    // The first pass's excess is split equally over all three layers (capped one included).
    let first = &r.redistribution_trace[0];
    assert_eq!(first.residual, lc.regrowth_target_initial - lc.regrowth_cap);
    assert_eq!(first.mean_residual, first.residual / 3.0);
    // The loop converges (c's cap absorbs nothing more), and a and b share the whole excess.
    assert!(r.redistribution_iterations > 2 && r.redistribution_iterations < 1000);
    assert_eq!(r.redistribution_final_residual, 0.0);
    assert_eq!(r.redistribution_trace.len(), r.redistribution_iterations);
    let excess = first.residual;
    for l in &r.layers[..2] {
        let got = l.regrowth_target_final - l.regrowth_target_initial;
        assert!(
            (got - excess / 2.0).abs() < 1e-9,
            "{got} vs {}",
            excess / 2.0
        );
    }
    let init: f64 = r.layers.iter().map(|l| l.regrowth_target_initial).sum();
    let fin: f64 = r.layers.iter().map(|l| l.regrowth_target_final).sum();
    assert!((init - fin).abs() < 1e-9);
}

#[test]
fn the_loop_stops_after_1000_passes() {
    // Two layers; `d` is fully dense with the higher score, so its rate is 0, its cap is 0 and
    // every pass sends half of the remaining excess back to it: the residual halves each pass
    // and would need ~1075 passes to underflow.
    let d = Layer::new(
        "d",
        1,
        8,
        &(0..8).map(|i| (i, 1.0 + i as f32)).collect::<Vec<_>>(),
        &[5.0; 8],
    );
    let s = Layer::new(
        "s",
        2,
        8,
        &(0..6).map(|i| (i, 0.5 + i as f32)).collect::<Vec<_>>(),
        &seq(16, |i| 0.5 + i as f32 * 0.01),
    );
    let mut layers = vec![d, s];
    let before = layers.clone();
    let mut m = masking(MaskingConfig::new(0.5), &layers);
    let r = update(&mut m, &mut layers, 0.5);
    check_invariants(&before, &layers, &r);
    let ld = &r.layers[0];
    assert!(ld.dense_rule_fired);
    assert_eq!(ld.prune_rate, 0.0);
    assert_eq!(
        (ld.num_remove, ld.regrowth_cap, ld.regrowth_target_final),
        (0, 0.0, 0.0)
    );
    assert_eq!(r.redistribution_iterations, 1000);
    assert_eq!(r.redistribution_trace.len(), 1000);
    assert!(r.redistribution_final_residual > 0.0);
    assert!(r.redistribution_final_residual < 1e-290);
    // s: n = 3, R = 3, targets ceil(s_d·3) and ceil(s_s·3) all end up in s.
    let ls = &r.layers[1];
    let total_init = ld.regrowth_target_initial + ls.regrowth_target_initial;
    assert!((ls.regrowth_target_final - total_init).abs() < 1e-9);
}

#[test]
fn correction_term_accumulates_the_shortfall() {
    // One 2×5 layer at density 0.5: B = 5. Zero-momentum entries make the update fall short.
    let mut mom = vec![0.0f32; 10];
    mom[0] = 1.0;
    mom[1] = 1.0;
    mom[5] = 0.3; // the only inactive entry with momentum
    let layer = Layer::new(
        "fc",
        2,
        5,
        &[(0, 0.9), (1, 0.8), (2, 0.01), (3, 0.02), (4, 0.03)],
        &mom,
    );
    let mut layers = vec![layer];
    let mut m = masking(MaskingConfig::new(0.5), &layers);
    assert_eq!(m.baseline_nonzero(), 5.0);
    let r1 = update(&mut m, &mut layers, 0.5);
    // 3 pruned (2, 3, 4: zero momentum), target 3, only index 5 can grow: N = 3, B − N = 2.
    assert_eq!(r1.layers[0].pruned, vec![2, 3, 4]);
    assert_eq!(r1.layers[0].regrowth_applied, 3);
    assert_eq!(r1.layers[0].grown, vec![5]);
    assert_eq!(r1.total_nonzero_after, 3);
    assert_eq!(r1.shortfall, 2.0);
    // A = 0.25·0 + 0.75·2 + mean([2]) = 3.5
    assert_eq!(m.adjusted_growth(), 3.5);
    assert_eq!(m.adjustments(), &[2.0]);

    // The second update's budget is R + A.
    layers[0].momentum = seq(10, |i| 0.1 + i as f32 * 0.05);
    layers[0].weight[5] = 0.4;
    let r2 = update(&mut m, &mut layers, 0.5);
    // nnz 3 → n = 2, budget 2 + 3.5 = 5.5, target 6, cap 0.99·(7 + 2) = 8.91.
    assert_eq!(r2.total_removed, 2.0);
    assert_eq!(r2.layers[0].regrowth_target_initial, 6.0);
    assert_eq!(r2.total_nonzero_after, 7);
    let s2 = 5.0 - 7.0;
    assert_eq!(r2.shortfall, s2);
    let want = 0.25 * 3.5 + 0.75 * s2 + (2.0 + s2) / 2.0;
    assert_eq!(m.adjusted_growth().to_bits(), f64::to_bits(want));
    assert_eq!(m.adjustments(), &[2.0, s2]);
    assert_eq!(m.updates(), 2);
}

#[test]
fn pruned_and_regrown_entries_keep_their_value() {
    // Index 0 has the smallest |w| (pruned) and the largest momentum (regrown at once).
    let mom = [5.0, 0.05, 1.0, 1.0, 0.1, 0.2];
    let mut layer = Layer::new(
        "fc",
        1,
        6,
        &[(0, 0.01), (1, 0.5), (2, -0.6), (3, 0.7)],
        &mom,
    );
    layer.weight[5] = 9.0; // a stale value under the mask: a grown entry still starts at 0
    let mut layers = vec![layer];
    let mut m = masking(MaskingConfig::new(0.5), &layers);
    let r = update(&mut m, &mut layers, 0.5);
    let l = &r.layers[0];
    assert_eq!(l.pruned, vec![0, 1]);
    assert_eq!(l.grown, vec![0, 5]);
    assert_eq!(l.num_pruned_then_regrown, 1);
    assert_eq!(layers[0].mask, vec![1, 0, 1, 1, 0, 1]);
    assert_eq!(layers[0].weight, vec![0.01, 0.0, -0.6, 0.7, 0.0, 0.0]);
    assert!(l.changed);
    // Momentum is never touched.
    assert_eq!(layers[0].momentum, mom.to_vec());
}

#[test]
fn zero_momentum_entries_never_grow() {
    // Targets exceed the candidates with nonzero momentum: the layer grows fewer.
    let mut mom = vec![0.0f32; 12];
    mom[0] = 2.0;
    mom[1] = 2.0;
    mom[2] = 2.0;
    mom[9] = 0.7;
    mom[10] = -0.9;
    let layer = Layer::new(
        "fc",
        3,
        4,
        &[(0, 1.0), (1, 2.0), (2, 3.0), (3, 0.1), (4, 0.2), (5, 0.3)],
        &mom,
    );
    let mut layers = vec![layer];
    let before = layers.clone();
    let mut m = masking(MaskingConfig::new(0.5), &layers);
    let r = update(&mut m, &mut layers, 0.5);
    check_invariants(&before, &layers, &r);
    let l = &r.layers[0];
    assert_eq!(l.pruned, vec![3, 4, 5]);
    assert_eq!(l.regrowth_applied, 3);
    assert_eq!(l.grown, vec![9, 10]);
    assert_eq!(l.nonzeros_after, 5);
    // Gradient growth follows the same rule with the gradient.
    let mut layers = before.clone();
    let mut g = vec![0.0f32; 12];
    g[7] = -3.0;
    layers[0].grad = Some(g);
    let mut cfg = MaskingConfig::new(0.5);
    cfg.growth = GrowthMode::Gradient;
    let mut m = masking(cfg, &layers);
    let r = update(&mut m, &mut layers, 0.5);
    assert_eq!(r.layers[0].grown, vec![7]);
}

fn dense_rule_layers(dense_momentum: f32) -> Vec<Layer> {
    // `d`: 9 of 10 active (sparsity 0.1 < 0.2); `s`: 2 of 10 active with momentum 1.
    let d = Layer::new(
        "d",
        1,
        10,
        &(0..9)
            .map(|i| (i, 0.1 * (i + 1) as f32))
            .collect::<Vec<_>>(),
        &[dense_momentum; 10],
    );
    let s = Layer::new(
        "s",
        1,
        10,
        &[(0, 0.5), (1, 0.6)],
        &seq(10, |i| 1.0 + i as f32 * 0.01),
    );
    vec![d, s]
}

#[test]
fn dense_rule_fires_for_a_dense_layer_with_a_high_score() {
    let mut layers = dense_rule_layers(3.0);
    let mut m = masking(MaskingConfig::new(0.5), &layers);
    let r = update(&mut m, &mut layers, 0.5);
    let d = &r.layers[0];
    assert!(d.score > 0.5);
    assert!(d.dense_rule_fired);
    assert_eq!(d.prune_rate.to_bits(), (1.0f64 / 10.0).to_bits());
    assert_eq!(d.num_remove, 1); // ceil(0.1 · 9)
    assert!(!r.layers[1].dense_rule_fired);
    assert_eq!(r.layers[1].prune_rate, 0.5);

    // The rule takes the smaller rate: at p = 0.05 < sparsity it keeps p.
    let mut layers = dense_rule_layers(3.0);
    let mut m = masking(MaskingConfig::new(0.5), &layers);
    let r = update(&mut m, &mut layers, 0.05);
    assert!(r.layers[0].dense_rule_fired);
    assert_eq!(r.layers[0].prune_rate, 0.05);
}

#[test]
fn dense_rule_does_not_fire_for_a_low_score_or_density_080() {
    let mut layers = dense_rule_layers(0.5);
    let mut m = masking(MaskingConfig::new(0.5), &layers);
    let r = update(&mut m, &mut layers, 0.5);
    let d = &r.layers[0];
    assert!(d.score < 0.5);
    assert!(!d.dense_rule_fired);
    assert_eq!(d.prune_rate, 0.5);
    assert_eq!(d.num_remove, 5); // ceil(0.5 · 9)

    // Density exactly 0.8 (sparsity 0.2, not < 0.2) keeps the global rate.
    let mut layers = dense_rule_layers(3.0);
    layers[0].mask[8] = 0;
    layers[0].weight[8] = 0.0;
    let mut m = masking(MaskingConfig::new(0.5), &layers);
    let r = update(&mut m, &mut layers, 0.5);
    assert!(!r.layers[0].dense_rule_fired);
    assert_eq!(r.layers[0].num_remove, 4);
}

#[test]
fn global_magnitude_uses_one_threshold() {
    // a has small weights, b large ones: a global threshold takes most from a.
    let a = Layer::new(
        "a",
        1,
        6,
        &[(0, 0.01), (1, -0.02), (2, 0.03), (3, 0.5)],
        &[1.0; 6],
    );
    let b = Layer::new(
        "b",
        1,
        6,
        &[(0, 0.9), (1, -0.8), (2, 0.04), (3, 0.7)],
        &[1.0; 6],
    );
    let mut layers = vec![a, b];
    let before = layers.clone();
    let mut cfg = MaskingConfig::new(0.5);
    cfg.prune = PruneMode::GlobalMagnitude;
    let mut m = masking(cfg, &layers);
    let r = update(&mut m, &mut layers, 0.5);
    check_invariants(&before, &layers, &r);
    // k = ceil(0.5 · 8) = 4 smallest |w| overall: 0.01, 0.02, 0.03 (a) and 0.04 (b).
    assert_eq!(r.layers[0].pruned, vec![0, 1, 2]);
    assert_eq!(r.layers[1].pruned, vec![2]);
    assert_eq!((r.layers[0].num_remove, r.layers[1].num_remove), (3, 1));
    assert_eq!(r.total_removed, 4.0);
    assert!(r.layers.iter().all(|l| !l.dense_rule_fired));
    // Regrowth still follows the scores: equal momentum, so 2 and 2.
    assert_eq!(r.layers[0].regrowth_applied, 2);
    assert_eq!(r.layers[1].regrowth_applied, 2);
}

/// Two layers with plenty of candidates (every momentum nonzero).
fn budget_layers() -> Vec<Layer> {
    let a = Layer::new(
        "a",
        4,
        6,
        &(0..8)
            .map(|i| (i * 3, 0.1 + i as f32 * 0.07))
            .collect::<Vec<_>>(),
        &seq(24, |i| 0.05 + ((i * 7) % 24) as f32 * 0.01),
    );
    let b = Layer::new(
        "b",
        3,
        5,
        &(0..5)
            .map(|i| (i * 2 + 1, -0.2 - i as f32 * 0.05))
            .collect::<Vec<_>>(),
        &seq(15, |i| 0.3 + ((i * 4) % 15) as f32 * 0.02),
    );
    vec![a, b]
}

#[test]
fn every_growth_mode_keeps_the_budget() {
    for growth in [
        GrowthMode::Momentum,
        GrowthMode::Random,
        GrowthMode::Gradient,
        GrowthMode::MomentumNeuron,
    ] {
        for redistribution in RedistributionMode::ALL {
            let mut layers = budget_layers();
            for l in &mut layers {
                l.grad = Some(l.momentum.iter().map(|m| m * -2.0 + 0.01).collect());
            }
            let before = layers.clone();
            let mut cfg = MaskingConfig::new(0.4);
            cfg.growth = growth;
            cfg.redistribution = *redistribution;
            cfg.seed = 11;
            let mut m = masking(cfg, &layers);
            let r = update(&mut m, &mut layers, 0.5);
            check_invariants(&before, &layers, &r);
            for l in &r.layers {
                assert_eq!(
                    l.num_regrown, l.regrowth_applied,
                    "{growth}/{redistribution}: {} grew {} of {}",
                    l.name, l.num_regrown, l.regrowth_applied
                );
            }
            let applied: usize = r.layers.iter().map(|l| l.regrowth_applied).sum();
            assert_eq!(r.total_nonzero_after, 13 - 7 + applied, "{growth}");
            let score_sum: f64 = r.layers.iter().map(|l| l.score).sum();
            assert!((score_sum - 1.0).abs() < 1e-12);
        }
    }
}

#[test]
fn random_growth_is_reproducible_from_the_seed() {
    let run = |seed: u64| {
        let mut layers = budget_layers();
        let mut cfg = MaskingConfig::new(0.4);
        cfg.growth = GrowthMode::Random;
        cfg.seed = seed;
        let mut m = masking(cfg, &layers);
        update(&mut m, &mut layers, 0.5);
        layers.into_iter().map(|l| l.mask).collect::<Vec<_>>()
    };
    assert_eq!(run(3), run(3));
    assert!((0..8).any(|s| run(s) != run(3)));
}

#[test]
fn gradient_growth_needs_the_gradient() {
    let mut layers = budget_layers();
    let before = layers.clone();
    let mut cfg = MaskingConfig::new(0.4);
    cfg.growth = GrowthMode::Gradient;
    let mut m = masking(cfg, &layers);
    assert!(m.needs_gradient());
    let e = try_update(&mut m, &mut layers, 0.5).unwrap_err();
    assert_eq!(
        e,
        MaskingError::MissingGradient {
            layer: "a".to_string()
        }
    );
    assert!(e.to_string().contains("`a`"));
    // Nothing changed.
    assert_eq!(layers[0].mask, before[0].mask);
    assert_eq!(m.updates(), 0);
}

#[test]
fn momentum_neuron_growth_favours_rows_with_large_momentum() {
    // Row 0 has ten times the momentum of row 1: it gets most of the budget.
    let mut mom = vec![1.0f32; 8];
    mom.extend(vec![0.1f32; 8]);
    let layer = Layer::new(
        "fc",
        2,
        8,
        &[(0, 0.5), (1, 0.01), (8, 0.6), (9, 0.02)],
        &mom,
    );
    let mut layers = vec![layer];
    let mut cfg = MaskingConfig::new(0.25);
    cfg.growth = GrowthMode::MomentumNeuron;
    let mut m = masking(cfg, &layers);
    let r = update(&mut m, &mut layers, 0.5);
    let l = &r.layers[0];
    assert_eq!(l.pruned, vec![1, 9]);
    assert_eq!(l.regrowth_applied, 2);
    // Row 0 gets floor(10/11 · 2) = 1 and the leftover goes to the largest remaining momentum
    // (row 0 again): both in row 0 (ties to the lower index).
    assert_eq!(l.grown, vec![1, 2]);
}

#[test]
fn a_negative_target_grows_nothing() {
    let mut layers = budget_layers();
    let m0 = masking(MaskingConfig::new(0.4), &layers);
    let mut state = m0.state();
    state.adjusted_growth = -100.0;
    state.adjustments = vec![-100.0];
    let mut m = Masking::from_state(state).unwrap();
    let r = update(&mut m, &mut layers, 0.5);
    assert!(r.layers.iter().all(|l| l.regrowth_target_final < 0.0));
    assert!(r
        .layers
        .iter()
        .all(|l| l.regrowth_applied == 0 && l.grown.is_empty()));
    assert_eq!(r.total_nonzero_after, 13 - 7);
}

#[test]
fn static_sparse_and_dense_do_not_change_anything() {
    for cfg in [
        MaskingConfig {
            growth: GrowthMode::None,
            ..MaskingConfig::new(0.4)
        },
        MaskingConfig::new(1.0),
    ] {
        let mut layers = budget_layers();
        let before = layers.clone();
        let mut m = masking(cfg, &layers);
        assert!(m.is_static());
        let r = update(&mut m, &mut layers, 0.5);
        assert!(r.skipped);
        assert!(r.layers.iter().all(|l| !l.changed));
        assert_eq!(r.total_nonzero_after, r.total_nonzero_before);
        for (a, b) in layers.iter().zip(&before) {
            assert_eq!(a.mask, b.mask);
            assert_eq!(a.weight, b.weight);
        }
        assert_eq!(m.updates(), 0);
        assert!(m.adjustments().is_empty());
    }
}

#[test]
fn init_masks_are_reproducible_and_have_the_density() {
    let specs = || {
        vec![
            LayerSpec::new("fc1", &[300, 784]).unwrap(),
            LayerSpec::new("fc2", &[100, 300]).unwrap(),
            LayerSpec::new("fc3", &[10, 100]).unwrap(),
        ]
    };
    let mut cfg = MaskingConfig::new(0.05);
    cfg.seed = 17;
    let a = Masking::new(cfg, specs()).unwrap().init_masks();
    let b = Masking::new(cfg, specs()).unwrap().init_masks();
    assert_eq!(a, b);
    cfg.seed = 18;
    let c = Masking::new(cfg, specs()).unwrap().init_masks();
    assert_ne!(a, c);
    for (mask, n) in a.iter().zip([235_200usize, 30_000, 1000]) {
        assert_eq!(mask.len(), n);
        assert!(mask.iter().all(|&m| m <= 1));
        let nnz = mask.iter().filter(|&&m| m == 1).count() as f64;
        // Binomial(n, 0.05): within 5 standard deviations.
        let sd = (n as f64 * 0.05 * 0.95).sqrt();
        assert!((nnz - 0.05 * n as f64).abs() < 5.0 * sd, "{nnz} of {n}");
    }
}

#[test]
fn erk_init_keeps_the_global_budget() {
    let specs = vec![
        LayerSpec::new("conv1", &[20, 1, 5, 5]).unwrap(),
        LayerSpec::new("conv2", &[50, 20, 5, 5]).unwrap(),
        LayerSpec::new("fc3", &[500, 800]).unwrap(),
        LayerSpec::new("fc4", &[10, 500]).unwrap(),
    ];
    let mut cfg = MaskingConfig::new(0.05);
    cfg.init = InitMode::Erk;
    let mut m = Masking::new(cfg, specs.clone()).unwrap();
    let d = m.init_densities();
    let budget: f64 = specs
        .iter()
        .zip(&d)
        .map(|(s, d)| s.numel() as f64 * d)
        .sum();
    assert!((budget - m.baseline_nonzero()).abs() < 1e-6);
    assert!(d.iter().all(|&x| x > 0.0 && x <= 1.0));
    assert_ne!(d[0], d[2]);
    let masks = m.init_masks();
    assert_eq!(masks[1].len(), 25_000);
    let nnz: usize = masks.iter().flatten().map(|&x| x as usize).sum();
    let total = 430_500.0f64;
    let sd = (total * 0.05).sqrt();
    assert!((nnz as f64 - 0.05 * total).abs() < 6.0 * sd, "{nnz}");
    // fc4 is dense under ERK at 5 %.
    assert!(masks[3].iter().all(|&x| x == 1));
}

#[test]
fn state_round_trips_and_resumes_exactly() {
    let mut cfg = MaskingConfig::new(0.4);
    cfg.growth = GrowthMode::Random;
    cfg.seed = 99;
    let mut layers = budget_layers();
    let mut m = masking(cfg, &layers);
    let _ = m.init_masks(); // advance the stream
    update(&mut m, &mut layers, 0.5);
    let json = serde_json::to_string_pretty(&m.state()).unwrap();
    assert!(json.contains("\"version\": 1"), "{json}");
    let state: runtime::masking::MaskingState = serde_json::from_str(&json).unwrap();
    assert_eq!(state, m.state());
    let mut resumed = Masking::from_state(state).unwrap();

    let mut l1 = layers.clone();
    let mut l2 = layers;
    for list in [&mut l1, &mut l2] {
        for (k, l) in list.iter_mut().enumerate() {
            l.momentum = seq(l.momentum.len(), |i| 0.2 + ((i + k) % 5) as f32 * 0.1);
        }
    }
    let r1 = update(&mut m, &mut l1, 0.3);
    let r2 = update(&mut resumed, &mut l2, 0.3);
    assert_eq!(r1, r2);
    for (a, b) in l1.iter().zip(&l2) {
        assert_eq!(a.mask, b.mask);
    }
    assert_eq!(m.state(), resumed.state());
}

#[test]
fn corrupt_states_are_rejected() {
    let layers = budget_layers();
    let m = masking(MaskingConfig::new(0.4), &layers);
    let mut s = m.state();
    s.version = MASKING_STATE_VERSION + 1;
    assert!(matches!(
        Masking::from_state(s),
        Err(MaskingError::State(_))
    ));
    let mut s = m.state();
    s.baseline_nonzero += 1.0;
    let e = Masking::from_state(s).unwrap_err();
    assert!(e.to_string().contains("baseline_nonzero"), "{e}");
    let mut s = m.state();
    s.rng.seed = "zz".to_string();
    assert!(Masking::from_state(s).is_err());
    let mut s = m.state();
    s.adjusted_growth = f64::NAN;
    assert!(Masking::from_state(s).is_err());
}

#[test]
fn bad_input_gives_clear_errors() {
    let mut layers = budget_layers();
    let mut m = masking(MaskingConfig::new(0.4), &layers);

    let e = try_update(&mut m, &mut layers[..1], 0.5).unwrap_err();
    assert_eq!(
        e,
        MaskingError::LayerCount {
            expected: 2,
            got: 1
        }
    );

    let mut swapped = vec![layers[1].clone(), layers[0].clone()];
    let e = try_update(&mut m, &mut swapped, 0.5).unwrap_err();
    assert!(matches!(e, MaskingError::LayerName { index: 0, .. }), "{e}");

    let mut short = layers.clone();
    short[1].momentum.pop();
    let e = try_update(&mut m, &mut short, 0.5).unwrap_err();
    assert!(
        e.to_string().contains("`b`") && e.to_string().contains("momentum"),
        "{e}"
    );

    let mut bad = layers.clone();
    bad[0].mask[4] = 2;
    let e = try_update(&mut m, &mut bad, 0.5).unwrap_err();
    assert_eq!(
        e,
        MaskingError::MaskValue {
            layer: "a".into(),
            index: 4,
            value: 2
        }
    );

    let mut nan = layers.clone();
    nan[1].momentum[1] = f32::NAN; // an active entry
    let e = try_update(&mut m, &mut nan, 0.5).unwrap_err();
    assert!(matches!(e, MaskingError::NonFinite { .. }), "{e}");

    assert!(try_update(&mut m, &mut layers, 1.5).is_err());
    assert!(try_update(&mut m, &mut layers, f64::NAN).is_err());
    assert!(Masking::new(MaskingConfig::new(0.0), vec![layers[0].spec()]).is_err());
    assert!(Masking::new(MaskingConfig::new(0.5), vec![]).is_err());
    assert!(LayerSpec::new("x", &[3]).is_err());
    assert!(LayerSpec::new("x", &[3, 0]).is_err());
    let dup = vec![layers[0].spec(), layers[0].spec()];
    assert!(Masking::new(MaskingConfig::new(0.5), dup).is_err());
    // Nothing was applied by the failed calls.
    assert_eq!(m.updates(), 0);
}

/// Random layers: any mode keeps the invariants, the budget and the correction formula.
fn arb_layers() -> impl Strategy<Value = Vec<Layer>> {
    prop::collection::vec((1usize..6, 1usize..12, any::<u64>()), 1..4).prop_map(|shapes| {
        shapes
            .into_iter()
            .enumerate()
            .map(|(li, (rows, cols, seed))| {
                let n = rows * cols;
                // A cheap deterministic generator: distinct magnitudes, some zero momentum.
                let mut x = seed | 1;
                let mut next = || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut layer = Layer::new(&format!("l{li}"), rows, cols, &[], &vec![0.0; n]);
                for i in 0..n {
                    let r = next();
                    if r % 3 == 0 {
                        layer.mask[i] = 1;
                        let sign = if r % 2 == 0 { 1.0 } else { -1.0 };
                        layer.weight[i] = sign * (0.01 + (i as f32) * 0.013 + (li as f32) * 1e-4);
                    }
                    layer.momentum[i] = if r % 7 == 0 {
                        0.0
                    } else {
                        ((r >> 8) % 1000) as f32 * 1e-3 - 0.5
                    };
                }
                layer.grad = Some(layer.momentum.iter().rev().copied().collect());
                layer
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn updates_keep_their_invariants(
        layers in arb_layers(),
        p in 0.0f64..=1.0,
        density in 0.05f64..0.95,
        prune in prop::sample::select(PruneMode::ALL.to_vec()),
        growth in prop::sample::select(vec![
            GrowthMode::Momentum, GrowthMode::Random, GrowthMode::Gradient, GrowthMode::MomentumNeuron,
        ]),
        redistribution in prop::sample::select(RedistributionMode::ALL.to_vec()),
        a0 in -5.0f64..5.0,
    ) {
        let mut cfg = MaskingConfig::new(density);
        cfg.prune = prune;
        cfg.growth = growth;
        cfg.redistribution = redistribution;
        let m0 = masking(cfg, &layers);
        let mut state = m0.state();
        state.adjusted_growth = a0;
        state.adjustments = vec![a0];
        let mut m = Masking::from_state(state).unwrap();
        let before = layers.clone();
        let mut after = layers;
        let r = match try_update(&mut m, &mut after, p) {
            Ok(r) => r,
            // Every momentum of a layer's active entries may be zero, or all weights: fine.
            Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
        };
        check_invariants(&before, &after, &r);
        // The capping loop conserves the total target unless it hit its pass limit.
        if r.redistribution_iterations < 1000 {
            let init: f64 = r.layers.iter().map(|l| l.regrowth_target_initial).sum();
            let fin: f64 = r.layers.iter().map(|l| l.regrowth_target_final).sum();
            prop_assert!((init - fin).abs() <= 1e-9 * init.abs().max(1.0), "{init} vs {fin}");
        }
        for l in &r.layers {
            // Never more than the cap, so never more than the free slots.
            prop_assert!(l.regrowth_target_final <= l.regrowth_cap);
            prop_assert!(l.regrowth_applied <= l.zeros_before + l.num_remove);
            if growth == GrowthMode::Random {
                let free = l.zeros_before + l.num_pruned;
                prop_assert_eq!(l.num_regrown, l.regrowth_applied.min(free));
            }
        }
        let s = m.baseline_nonzero() - r.total_nonzero_after as f64;
        prop_assert_eq!(r.shortfall, s);
        let want = 0.25 * a0 + 0.75 * s + (a0 + s) / 2.0;
        prop_assert_eq!(m.adjusted_growth().to_bits(), want.to_bits());
    }
}
