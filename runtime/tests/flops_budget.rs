//! The compute budget (`MaskingConfig::flops_budget`): the initial masks and every update keep
//! the forward multiply-adds within it, growth is cut by the redistribution scores, and a budget
//! that does not bind changes nothing.

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use runtime::masking::{
    GrowthMode, InitMode, LayerSpec, LayerView, Masking, MaskingConfig, MaskingError, MaskingState,
    UpdateReport,
};

/// LeNet-5's masked layers with their multiply-adds per weight: conv1's 24×24 and conv2's 8×8
/// output positions, 1 for the linear layers.
fn lenet5() -> Vec<LayerSpec> {
    [
        ("conv1", vec![20, 1, 5, 5], 576),
        ("conv2", vec![50, 20, 5, 5], 64),
        ("fc3", vec![500, 800], 1),
        ("fc4", vec![10, 500], 1),
    ]
    .into_iter()
    .map(|(n, s, c)| {
        LayerSpec::new(n, &s)
            .unwrap()
            .with_macs_per_weight(c)
            .unwrap()
    })
    .collect()
}

/// One layer's state, owned.
#[derive(Debug, Clone, PartialEq)]
struct State {
    weight: Vec<f32>,
    mask: Vec<u8>,
    momentum: Vec<f32>,
}

/// Masks from `masking`'s initial draw, random weights on them, and momenta that make the
/// convolutions the layers redistribution favours (as momentum redistribution does on LeNet-5).
fn start(masking: &mut Masking, rng: &mut ChaCha8Rng) -> Vec<State> {
    masking
        .init_masks()
        .into_iter()
        .map(|mask| State {
            weight: mask
                .iter()
                .map(|&m| f32::from(m) * rng.random_range(-1.0f32..1.0))
                .collect(),
            momentum: vec![0.0; mask.len()],
            mask,
        })
        .collect()
}

/// Fresh momenta (larger in the convolutions) and a perturbation of the active weights, as a
/// stretch of training would leave them.
fn train_a_little(specs: &[LayerSpec], states: &mut [State], rng: &mut ChaCha8Rng) {
    for (spec, s) in specs.iter().zip(states) {
        let scale = if spec.shape.len() == 4 { 1.0 } else { 0.05 };
        for m in &mut s.momentum {
            *m = scale * rng.random_range(-1.0f32..1.0);
        }
        for (w, &m) in s.weight.iter_mut().zip(&s.mask) {
            if m == 1 {
                *w += rng.random_range(-0.1f32..0.1);
            }
        }
    }
}

fn update(
    masking: &mut Masking,
    specs: &[LayerSpec],
    states: &mut [State],
    rate: f64,
) -> UpdateReport {
    let mut views: Vec<LayerView<'_>> = specs
        .iter()
        .zip(states.iter_mut())
        .map(|(spec, s)| LayerView {
            name: &spec.name,
            rows: spec.rows(),
            cols: spec.cols(),
            weight: &mut s.weight,
            mask: &mut s.mask,
            momentum: &s.momentum,
            grad: None,
        })
        .collect();
    masking.update(&mut views, rate).unwrap()
}

fn nnz(states: &[State]) -> Vec<usize> {
    states
        .iter()
        .map(|s| s.mask.iter().filter(|&&m| m == 1).count())
        .collect()
}

fn config(density: f64, budget: Option<f64>) -> MaskingConfig {
    let mut c = MaskingConfig::new(density);
    c.seed = 5;
    c.flops_budget = budget;
    c
}

/// Runs `updates` updates of LeNet-5 at 5 % under `budget`; the flops fraction after the
/// initial masks and after each update, and the reports.
fn run(budget: Option<f64>, updates: usize) -> (Vec<f64>, Vec<UpdateReport>) {
    let specs = lenet5();
    let mut masking = Masking::new(config(0.05, budget), specs.clone()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut states = start(&mut masking, &mut rng);
    let mut fractions = vec![masking.flops_fraction(&nnz(&states)).unwrap()];
    let mut reports = Vec::new();
    for k in 0..updates {
        train_a_little(&specs, &mut states, &mut rng);
        let rate = 0.5 - 0.04 * k as f64;
        reports.push(update(&mut masking, &specs, &mut states, rate));
        fractions.push(masking.flops_fraction(&nnz(&states)).unwrap());
    }
    (fractions, reports)
}

#[test]
fn every_update_keeps_the_budget_that_momentum_would_break() {
    let (free, _) = run(None, 8);
    assert!(
        free.iter().any(|&f| f > 0.08),
        "without a budget momentum moves the weights into the convolutions: {free:?}"
    );
    let (kept, reports) = run(Some(0.05), 8);
    for f in &kept {
        assert!(*f <= 0.05 + 1e-12, "{kept:?}");
    }
    // The budget binds, and it is the convolutions' growth it cuts.
    let withheld: usize = reports.iter().map(|r| r.regrowth_withheld).sum();
    assert!(withheld > 0);
    for r in &reports {
        let per_layer: usize = r.layers.iter().map(|l| l.regrowth_withheld).sum();
        assert_eq!(per_layer, r.regrowth_withheld);
        for l in &r.layers {
            assert!(l.num_regrown <= l.regrowth_applied);
        }
        // The correction does not chase what the budget withheld.
        let shortfall = r.baseline_nonzero - r.total_nonzero_after as f64;
        assert!((r.shortfall - (shortfall - r.regrowth_withheld as f64)).abs() < 1e-9);
    }
    assert!(reports.iter().any(|r| r.layers[0].regrowth_withheld > 0));
    // It still uses the room: the network stays close to its budget.
    assert!(kept[1..].iter().all(|&f| f > 0.04), "{kept:?}");
}

#[test]
fn a_budget_that_does_not_bind_changes_nothing() {
    // From the same masks and momenta, updates under `budget` and without one.
    let specs = lenet5();
    let run_from_same_start = |budget: Option<f64>| {
        let mut draw = Masking::new(config(0.05, None), specs.clone()).unwrap();
        let mut m = Masking::new(config(0.05, budget), specs.clone()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut states = start(&mut draw, &mut rng);
        let mut reports = Vec::new();
        let mut fractions = Vec::new();
        for rate in [0.5, 0.4, 0.3, 0.2, 0.1] {
            train_a_little(&specs, &mut states, &mut rng);
            reports.push(update(&mut m, &specs, &mut states, rate));
            fractions.push(m.flops_fraction(&nnz(&states)).unwrap());
        }
        (reports, states, fractions, m.adjusted_growth())
    };
    let free = run_from_same_start(None);
    let highest = free.2.iter().cloned().fold(0.0, f64::max);
    assert!(highest > 0.05 && highest < 0.9, "{:?}", free.2);
    // Budget 1 never binds (growth takes only free slots), nor does one just above the
    // unconstrained run's highest fraction: both give that run exactly.
    for budget in [1.0, highest + 1e-6] {
        let with = run_from_same_start(Some(budget));
        assert_eq!(with, free, "budget {budget}");
    }
    // Just below it, the budget binds and the run differs.
    let cut = run_from_same_start(Some(highest - 0.01));
    assert!(cut.0.iter().any(|r| r.regrowth_withheld > 0));
    assert!(cut.2.iter().all(|&f| f <= highest - 0.01));
}

fn counts(masks: &[Vec<u8>]) -> Vec<usize> {
    masks
        .iter()
        .map(|x| x.iter().filter(|&&v| v == 1).count())
        .collect()
}

#[test]
fn initial_masks_within_the_budget_are_the_unconstrained_ones() {
    let specs = lenet5();
    let free = Masking::new(config(0.05, None), specs.clone())
        .unwrap()
        .init_masks();
    let free_fraction = Masking::new(config(0.05, None), specs.clone())
        .unwrap()
        .flops_fraction(&counts(&free))
        .unwrap();
    // A budget at or above both the densities' cost and the drawn masks' cost.
    let budget = free_fraction.max(0.05) + 1e-9;
    let mut m = Masking::new(config(0.05, Some(budget)), specs.clone()).unwrap();
    assert_eq!(m.init_densities(), vec![0.05; 4]);
    assert_eq!(m.init_masks(), free);
    let mut m = Masking::new(config(0.05, Some(1.0)), specs).unwrap();
    assert_eq!(m.init_masks(), free);
}

#[test]
fn drawn_masks_over_the_budget_lose_entries_of_the_costliest_layer() {
    let specs = lenet5();
    // Uniform 5 % under a 5 % budget: the coins leave some seeds' masks over it.
    let mut over = 0;
    for seed in 0..40 {
        let mut c = config(0.05, None);
        c.seed = seed;
        let free = Masking::new(c, specs.clone()).unwrap().init_masks();
        c.flops_budget = Some(0.05);
        let mut m = Masking::new(c, specs.clone()).unwrap();
        let kept = m.init_masks();
        let f_free = m.flops_fraction(&counts(&free)).unwrap();
        let f_kept = m.flops_fraction(&counts(&kept)).unwrap();
        assert!(f_kept <= 0.05, "seed {seed}: {f_kept}");
        if f_free <= 0.05 {
            assert_eq!(kept, free, "seed {seed}");
            continue;
        }
        over += 1;
        // Only conv1 (576 multiply-adds a weight) lost entries, and no more than needed.
        for l in 1..4 {
            assert_eq!(kept[l], free[l], "seed {seed}");
        }
        assert!(kept[0].iter().zip(&free[0]).all(|(k, f)| k <= f));
        let removed = counts(&free)[0] - counts(&kept)[0];
        let excess = (f_free - 0.05) * m.dense_macs();
        assert_eq!(removed, (excess / 576.0).ceil() as usize, "seed {seed}");
    }
    assert!(over > 5, "{over} of 40 seeds drew masks over the budget");
}

#[test]
fn initial_densities_over_the_budget_are_scaled_to_it() {
    let specs = lenet5();
    // ERK puts conv1 at a high density: the densities are scaled to cost the budget.
    let mut erk = config(0.05, Some(0.05));
    erk.init = InitMode::Erk;
    let unbudgeted = {
        let mut c = erk;
        c.flops_budget = None;
        Masking::new(c, specs.clone()).unwrap()
    };
    let raw = unbudgeted.init_densities();
    let mut m = Masking::new(erk, specs.clone()).unwrap();
    let d = m.init_densities();
    let cost_of = |d: &[f64]| -> f64 {
        specs
            .iter()
            .zip(d)
            .map(|(s, d)| d * s.numel() as f64 * s.macs_per_weight as f64)
            .sum()
    };
    assert!(
        cost_of(&raw) / m.dense_macs() > 0.05,
        "ERK exceeds the budget"
    );
    let scale = d[0] / raw[0];
    assert!(scale < 1.0);
    for (a, b) in d.iter().zip(&raw) {
        assert!((a / b - scale).abs() < 1e-12);
    }
    assert!((cost_of(&d) / m.dense_macs() - 0.05).abs() < 1e-12);
    assert!((m.baseline_nonzero() - unbudgeted.baseline_nonzero() * scale).abs() < 1e-6);
    let masks = m.init_masks();
    let n = counts(&masks);
    let f = m.flops_fraction(&n).unwrap();
    assert!(f <= 0.05 && f > 0.045, "{f}");
    // fc3's 400,000 coins land near its scaled density.
    let expected = d[2] * 400_000.0;
    assert!(
        (n[2] as f64 - expected).abs() < 5.0 * expected.sqrt(),
        "{n:?}"
    );
}

#[test]
fn every_growth_mode_keeps_the_budget() {
    for growth in [
        GrowthMode::Momentum,
        GrowthMode::Random,
        GrowthMode::MomentumNeuron,
    ] {
        let specs = lenet5();
        let mut c = config(0.05, Some(0.04));
        c.growth = growth;
        let mut masking = Masking::new(c, specs.clone()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut states = start(&mut masking, &mut rng);
        for _ in 0..4 {
            train_a_little(&specs, &mut states, &mut rng);
            update(&mut masking, &specs, &mut states, 0.4);
            let f = masking.flops_fraction(&nnz(&states)).unwrap();
            assert!(f <= 0.04 + 1e-12, "{growth}: {f}");
        }
    }
}

#[test]
fn the_budget_round_trips_and_old_states_load() {
    let mut m = Masking::new(config(0.05, Some(0.1)), lenet5()).unwrap();
    let _ = m.init_masks();
    let json = serde_json::to_string(&m.state()).unwrap();
    assert!(json.contains("\"flops_budget\":0.1"), "{json}");
    assert!(json.contains("\"macs_per_weight\":576"), "{json}");
    let back: MaskingState = serde_json::from_str(&json).unwrap();
    assert_eq!(Masking::from_state(back).unwrap().state(), m.state());

    // A state saved before budgets existed: no flops_budget, no costs.
    let plain = Masking::new(
        config(0.05, None),
        vec![LayerSpec::new("fc1", &[30, 20]).unwrap()],
    )
    .unwrap();
    let json = serde_json::to_string(&plain.state())
        .unwrap()
        .replace(",\"macs_per_weight\":1", "");
    assert!(!json.contains("macs_per_weight") && !json.contains("flops_budget"));
    let old: MaskingState = serde_json::from_str(&json).unwrap();
    assert_eq!(old.layers[0].macs_per_weight, 1);
    assert_eq!(old.config.flops_budget, None);
    Masking::from_state(old).unwrap();
}

#[test]
fn bad_budgets_and_costs_are_errors_naming_them() {
    for f in [0.0, -0.5, 1.5, f64::NAN] {
        let e = Masking::new(config(0.05, Some(f)), lenet5()).unwrap_err();
        assert!(
            matches!(
                e,
                MaskingError::InvalidOption {
                    option: "flops-budget",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("--flops-budget"), "{e}");
    }
    let e = LayerSpec::new("conv1", &[2, 1, 3, 3])
        .unwrap()
        .with_macs_per_weight(0)
        .unwrap_err();
    assert!(e.to_string().contains("conv1"), "{e}");
    let m = Masking::new(config(0.05, None), lenet5()).unwrap();
    assert!(matches!(
        m.flops_fraction(&[1, 2]),
        Err(MaskingError::LayerCount {
            expected: 4,
            got: 2
        })
    ));
    // Dense is 1, nothing is 0.
    assert_eq!(
        m.flops_fraction(&[500, 25_000, 400_000, 5000]).unwrap(),
        1.0
    );
    assert_eq!(m.flops_fraction(&[0, 0, 0, 0]).unwrap(), 0.0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random layer shapes, costs, densities, budgets and momenta: every update stays within
    /// the budget.
    #[test]
    fn random_networks_stay_within_the_budget(
        seed in any::<u64>(),
        shapes in prop::collection::vec((1usize..12, 1usize..40, 1u64..300), 1..5),
        density in 0.05f64..0.6,
        budget in 0.02f64..0.6,
    ) {
        let specs: Vec<LayerSpec> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, c, cost))| {
                LayerSpec::new(&format!("l{i}"), &[r, c])
                    .unwrap()
                    .with_macs_per_weight(cost)
                    .unwrap()
            })
            .collect();
        let mut masking = Masking::new(config(density, Some(budget)), specs.clone()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut states = start(&mut masking, &mut rng);
        let f0 = masking.flops_fraction(&nnz(&states)).unwrap();
        prop_assert!(f0 <= budget * (1.0 + 1e-9), "initial {}", f0);
        for k in 0..4 {
            for s in &mut states {
                for m in &mut s.momentum {
                    *m = rng.random_range(-1.0f32..1.0);
                }
            }
            update(&mut masking, &specs, &mut states, 0.5 - 0.1 * k as f64);
            let f = masking.flops_fraction(&nnz(&states)).unwrap();
            prop_assert!(f <= budget * (1.0 + 1e-9), "after update {}: {} > {}", k, f, budget);
        }
    }
}
