//! The mask update reproduces every recorded output of the golden sparse-momentum cases
//! (`data/golden/sparse-momentum/*.json`, produced by the reference implementation): masks
//! after pruning and at the end, weights, counts, scores, targets, the redistribution trace,
//! the correction term and its history, bit for bit.

use std::path::PathBuf;

use runtime::masking::{LayerSpec, LayerView, Masking, MaskingConfig, UpdateReport};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    case: String,
    inputs: Inputs,
    outputs: Outputs,
}

#[derive(Deserialize)]
struct Inputs {
    density: f64,
    prune_rate: f64,
    baseline_nonzero: f64,
    adjusted_growth: f64,
    adjustments: Vec<f64>,
    layers: Vec<InLayer>,
}

#[derive(Deserialize, Clone)]
struct InLayer {
    name: String,
    shape: Vec<usize>,
    weight: Vec<f64>,
    mask: Vec<u8>,
    momentum: Vec<f64>,
}

#[derive(Deserialize)]
struct Outputs {
    total_variance: f64,
    total_removed: f64,
    total_nonzero_before: f64,
    total_nonzero_after: f64,
    redistribution_iterations: usize,
    redistribution_final_residual: f64,
    redistribution_trace: Vec<Pass>,
    adjusted_growth: f64,
    adjustments: Vec<f64>,
    layers: Vec<OutLayer>,
}

#[derive(Deserialize)]
struct Pass {
    iteration: usize,
    residual: f64,
    mean_residual: f64,
    regrowth: Vec<f64>,
}

#[derive(Deserialize)]
struct OutLayer {
    name: String,
    nonzeros_before: usize,
    zeros_before: usize,
    raw_score: f64,
    score: f64,
    dense_rule_fired: bool,
    prune_rate: f64,
    num_remove: usize,
    mask_after_prune: Vec<u8>,
    num_pruned: usize,
    max_regrowth: f64,
    regrowth_cap: f64,
    regrowth_target_initial: f64,
    regrowth_target_final: f64,
    regrowth_applied: usize,
    num_regrown: usize,
    num_pruned_then_regrown: usize,
    nonzeros_after: usize,
    mask: Vec<u8>,
    weight: Vec<f64>,
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/golden/sparse-momentum")
}

fn load(file: &str) -> Case {
    let path = golden_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read golden case {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("cannot parse golden case {}: {e}", path.display()))
}

/// Same f64, bit for bit (+0 and −0 are both "zero": the reference writes Python ints `0`).
#[track_caller]
fn same(what: &str, got: f64, want: f64) {
    assert!(
        got.to_bits() == want.to_bits() || (got == 0.0 && want == 0.0),
        "{what}: got {got:?} ({:#018x}), want {want:?} ({:#018x})",
        got.to_bits(),
        want.to_bits()
    );
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter()
        .map(|&x| {
            let f = x as f32;
            assert_eq!(f as f64, x, "golden f32 value {x} is not an exact f32");
            f
        })
        .collect()
}

/// The layers' state after the update: (weight, mask) per layer.
type After = Vec<(Vec<f32>, Vec<u8>)>;

/// Runs the update on `layers` with `masking` and checks every recorded output of `case`.
fn run_and_check(masking: &mut Masking, layers: &[InLayer], case: &Case) -> After {
    let inputs = &case.inputs;
    let mut weights: Vec<Vec<f32>> = layers.iter().map(|l| to_f32(&l.weight)).collect();
    let mut masks: Vec<Vec<u8>> = layers.iter().map(|l| l.mask.clone()).collect();
    let momenta: Vec<Vec<f32>> = layers.iter().map(|l| to_f32(&l.momentum)).collect();
    let report: UpdateReport = {
        let mut views: Vec<LayerView<'_>> = layers
            .iter()
            .zip(weights.iter_mut())
            .zip(masks.iter_mut())
            .zip(&momenta)
            .map(|(((l, w), m), mom)| LayerView {
                name: &l.name,
                rows: l.shape[0],
                cols: l.shape[1],
                weight: w,
                mask: m,
                momentum: mom,
                grad: None,
            })
            .collect();
        masking
            .update(&mut views, inputs.prune_rate)
            .unwrap_or_else(|e| panic!("{}: update failed: {e}", case.case))
    };
    let out = &case.outputs;
    let c = &case.case;

    assert!(!report.skipped);
    same(
        &format!("{c}: prune_rate"),
        report.prune_rate,
        inputs.prune_rate,
    );
    same(
        &format!("{c}: total_variance"),
        report.total_variance,
        out.total_variance,
    );
    same(
        &format!("{c}: total_removed"),
        report.total_removed,
        out.total_removed,
    );
    same(
        &format!("{c}: total_nonzero_before"),
        report.total_nonzero_before as f64,
        out.total_nonzero_before,
    );
    same(
        &format!("{c}: total_nonzero_after"),
        report.total_nonzero_after as f64,
        out.total_nonzero_after,
    );
    assert_eq!(
        report.redistribution_iterations, out.redistribution_iterations,
        "{c}: redistribution_iterations"
    );
    same(
        &format!("{c}: redistribution_final_residual"),
        report.redistribution_final_residual,
        out.redistribution_final_residual,
    );
    assert_eq!(
        report.redistribution_trace.len(),
        out.redistribution_trace.len(),
        "{c}: trace length"
    );
    for (got, want) in report
        .redistribution_trace
        .iter()
        .zip(&out.redistribution_trace)
    {
        let i = want.iteration;
        assert_eq!(got.iteration, i, "{c}: trace iteration");
        same(
            &format!("{c}: trace[{i}].residual"),
            got.residual,
            want.residual,
        );
        same(
            &format!("{c}: trace[{i}].mean_residual"),
            got.mean_residual,
            want.mean_residual,
        );
        assert_eq!(got.regrowth.len(), want.regrowth.len());
        for (l, (&g, &w)) in got.regrowth.iter().zip(&want.regrowth).enumerate() {
            same(&format!("{c}: trace[{i}].regrowth[{l}]"), g, w);
        }
    }
    same(
        &format!("{c}: adjusted_growth"),
        report.adjusted_growth,
        out.adjusted_growth,
    );
    same(
        &format!("{c}: adjusted_growth (state)"),
        masking.adjusted_growth(),
        out.adjusted_growth,
    );
    same(
        &format!("{c}: adjusted_growth_before"),
        report.adjusted_growth_before,
        inputs.adjusted_growth,
    );
    assert_eq!(masking.adjustments().len(), out.adjustments.len());
    for (i, (&g, &w)) in masking
        .adjustments()
        .iter()
        .zip(&out.adjustments)
        .enumerate()
    {
        same(&format!("{c}: adjustments[{i}]"), g, w);
    }
    same(
        &format!("{c}: shortfall"),
        report.shortfall,
        *out.adjustments.last().unwrap(),
    );

    assert_eq!(report.layers.len(), out.layers.len());
    for (l, (got, want)) in report.layers.iter().zip(&out.layers).enumerate() {
        let n = format!("{c}: {}", want.name);
        assert_eq!(got.name, want.name);
        assert_eq!(
            got.nonzeros_before, want.nonzeros_before,
            "{n}: nonzeros_before"
        );
        assert_eq!(got.zeros_before, want.zeros_before, "{n}: zeros_before");
        same(&format!("{n}: raw_score"), got.raw_score, want.raw_score);
        same(&format!("{n}: score"), got.score, want.score);
        assert_eq!(
            got.dense_rule_fired, want.dense_rule_fired,
            "{n}: dense_rule_fired"
        );
        same(&format!("{n}: prune_rate"), got.prune_rate, want.prune_rate);
        assert_eq!(got.num_remove, want.num_remove, "{n}: num_remove");
        assert_eq!(got.num_pruned, want.num_pruned, "{n}: num_pruned");
        same(
            &format!("{n}: max_regrowth"),
            got.max_regrowth,
            want.max_regrowth,
        );
        same(
            &format!("{n}: regrowth_cap"),
            got.regrowth_cap,
            want.regrowth_cap,
        );
        same(
            &format!("{n}: regrowth_target_initial"),
            got.regrowth_target_initial,
            want.regrowth_target_initial,
        );
        same(
            &format!("{n}: regrowth_target_final"),
            got.regrowth_target_final,
            want.regrowth_target_final,
        );
        assert_eq!(
            got.regrowth_applied, want.regrowth_applied,
            "{n}: regrowth_applied"
        );
        assert_eq!(got.num_regrown, want.num_regrown, "{n}: num_regrown");
        assert_eq!(
            got.num_pruned_then_regrown, want.num_pruned_then_regrown,
            "{n}: num_pruned_then_regrown"
        );
        assert_eq!(
            got.nonzeros_after, want.nonzeros_after,
            "{n}: nonzeros_after"
        );

        // The mask after pruning: the input mask less the pruned entries.
        let mut after_prune = layers[l].mask.clone();
        for &i in &got.pruned {
            assert_eq!(after_prune[i], 1, "{n}: pruned an inactive entry {i}");
            after_prune[i] = 0;
        }
        assert_eq!(after_prune, want.mask_after_prune, "{n}: mask_after_prune");
        // Growth: exactly the final mask less the mask after pruning.
        let grown: Vec<usize> = (0..after_prune.len())
            .filter(|&i| after_prune[i] == 0 && want.mask[i] == 1)
            .collect();
        assert_eq!(got.grown, grown, "{n}: grown entries");
        assert_eq!(masks[l], want.mask, "{n}: final mask");
        let want_w = to_f32(&want.weight);
        for (i, (&g, &w)) in weights[l].iter().zip(&want_w).enumerate() {
            // By value: the reference's masked entries can be −0.0.
            assert!(g == w, "{n}: weight[{i}] = {g}, want {w}");
        }
        let changed = layers[l].mask != want.mask;
        assert_eq!(got.changed, changed, "{n}: changed");
    }
    weights.into_iter().zip(masks).collect()
}

/// A masking for the case's layers, carrying its input correction term and history.
fn masking_for(case: &Case) -> Masking {
    let specs = case
        .inputs
        .layers
        .iter()
        .map(|l| LayerSpec::new(&l.name, &l.shape).unwrap())
        .collect();
    let masking = Masking::new(MaskingConfig::new(case.inputs.density), specs).unwrap();
    // B = Σ numel·d in layer order is the reference's value to the bit.
    same(
        &format!("{}: baseline_nonzero", case.case),
        masking.baseline_nonzero(),
        case.inputs.baseline_nonzero,
    );
    let mut state = masking.state();
    state.adjusted_growth = case.inputs.adjusted_growth;
    state.adjustments = case.inputs.adjustments.clone();
    Masking::from_state(state).unwrap()
}

fn check_file(file: &str) {
    let case = load(file);
    assert_eq!(format!("{}.json", case.case), file);
    let mut masking = masking_for(&case);
    let layers = case.inputs.layers.clone();
    run_and_check(&mut masking, &layers, &case);
}

#[test]
fn golden_a_density030_basic() {
    check_file("a_density030_basic.json");
}

#[test]
fn golden_b_density010_zero_momentum() {
    check_file("b_density010_zero_momentum.json");
}

#[test]
fn golden_c_dense_layer_rule() {
    check_file("c_dense_layer_rule.json");
}

#[test]
fn golden_d_overflow() {
    check_file("d_overflow.json");
}

#[test]
fn golden_e_dense_low_score_and_overflow() {
    check_file("e_dense_low_score_and_overflow.json");
}

#[test]
fn golden_f_fully_dense_layer() {
    let case = load("f_fully_dense_layer.json");
    // The loop runs until the residual underflows through the subnormals: 683 passes.
    assert_eq!(case.outputs.redistribution_iterations, 683);
    check_file("f_fully_dense_layer.json");
}

#[test]
fn golden_g_chained_after_a() {
    check_file("g_chained_after_a.json");
}

/// Case g continues case a: our own state after a (masks, correction term, history) is g's input.
#[test]
fn golden_a_then_g_chains_through_our_own_state() {
    let a = load("a_density030_basic.json");
    let g = load("g_chained_after_a.json");
    let mut masking = masking_for(&a);
    let after_a = run_and_check(&mut masking, &a.inputs.layers, &a);
    same(
        "a→g: adjusted_growth",
        masking.adjusted_growth(),
        g.inputs.adjusted_growth,
    );
    assert_eq!(masking.adjustments().len(), g.inputs.adjustments.len());
    for (&x, &y) in masking.adjustments().iter().zip(&g.inputs.adjustments) {
        same("a→g: adjustments", x, y);
    }
    for ((_, mask), gl) in after_a.iter().zip(&g.inputs.layers) {
        assert_eq!(mask, &gl.mask, "a→g: {} mask", gl.name);
    }
    // Through a checkpoint, as a resumed run would.
    let json = serde_json::to_string(&masking.state()).unwrap();
    let mut resumed = Masking::from_state(serde_json::from_str(&json).unwrap()).unwrap();
    run_and_check(&mut resumed, &g.inputs.layers, &g);
}

/// Every golden file is covered by a test above (none is skipped silently).
#[test]
fn every_golden_case_is_tested() {
    let mut files: Vec<String> = std::fs::read_dir(golden_dir())
        .expect("golden directory")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".json"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "a_density030_basic.json",
            "b_density010_zero_momentum.json",
            "c_dense_layer_rule.json",
            "d_overflow.json",
            "e_dense_low_score_and_overflow.json",
            "f_fully_dense_layer.json",
            "g_chained_after_a.json",
        ]
    );
}
