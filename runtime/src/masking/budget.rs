//! The compute budget (`--flops-budget F`): the forward multiply-adds of the sparse network stay
//! at or below `F` times the dense network's.
//!
//! A weight's cost is the multiply-adds it takes per sample in the forward pass
//! ([`LayerSpec::macs_per_weight`]): one for a linear layer, one per output position
//! (`oh · ow`) for a convolution. The sparse network's cost is `Σ nnz_l · c_l`, the dense
//! network's `Σ numel_l · c_l`.
//!
//! The budget acts in two places:
//!
//! * **Initial masks.** If the initial densities `d_l` cost more than the budget, every `d_l`
//!   is scaled by the same factor so that they cost exactly the budget, and the weight budget
//!   `B` is scaled with them. The masks are drawn as without a budget (one coin per entry);
//!   where the coins leave them over the budget, random active entries of the most expensive
//!   layers are removed until they fit ([`trim_to_budget`]). Masks within the budget are
//!   exactly the unconstrained run's.
//! * **Growth.** After pruning, the room left is `F · dense − Σ kept_l · c_l`. If the
//!   regrowth that redistribution asks for (`k_l` entries per layer) costs more than the room,
//!   the room's multiply-adds are split over the layers by the same redistribution scores
//!   `s_l`, each layer's share capped at the cost of its own `k_l` (a water-fill: find `λ` with
//!   `Σ min(k_l · c_l, λ · s_l) = room`, then grow `min(k_l, floor(λ · s_l / c_l))`). What
//!   the budget withholds is not a shortfall the correction term chases: the next update would
//!   meet the same budget.

use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use super::LayerSpec;

/// Relative slack under which a cost counts as within the budget (rounding of the sums).
const TOLERANCE: f64 = 1e-9;

/// `Σ numel_l · c_l`: the dense network's forward multiply-adds per sample.
pub(crate) fn dense_macs(layers: &[LayerSpec]) -> f64 {
    layers
        .iter()
        .map(|l| l.numel() as f64 * l.macs_per_weight as f64)
        .sum()
}

/// `Σ count_l · c_l` for `count_l` active weights in layer `l` (fractional counts allowed).
pub(crate) fn macs_of(layers: &[LayerSpec], counts: impl IntoIterator<Item = f64>) -> f64 {
    layers
        .iter()
        .zip(counts)
        .map(|(l, n)| n * l.macs_per_weight as f64)
        .sum()
}

/// The factor (at most 1) that brings initial densities within `budget · dense`: 1 when they
/// already fit.
pub(crate) fn init_scale(layers: &[LayerSpec], densities: &[f64], budget: f64) -> f64 {
    let dense = dense_macs(layers);
    let cost = macs_of(
        layers,
        layers
            .iter()
            .zip(densities)
            .map(|(l, d)| d * l.numel() as f64),
    );
    let limit = budget * dense;
    if cost <= limit * (1.0 + TOLERANCE) {
        1.0
    } else {
        limit / cost
    }
}

/// Deactivates random active entries of the most expensive layers (most multiply-adds per
/// weight first; ties: the earlier layer) until `masks` cost at most `budget · dense`. Masks
/// already within the budget are left as they are.
pub(crate) fn trim_to_budget(
    layers: &[LayerSpec],
    masks: &mut [Vec<u8>],
    budget: f64,
    rng: &mut ChaCha8Rng,
) {
    let limit = budget * dense_macs(layers);
    let active = |m: &[u8]| m.iter().filter(|&&v| v == 1).count() as f64;
    let mut cost = macs_of(layers, masks.iter().map(|m| active(m)));
    let mut order: Vec<usize> = (0..layers.len()).collect();
    order.sort_by_key(|&l| (std::cmp::Reverse(layers[l].macs_per_weight), l));
    for l in order {
        if cost <= limit {
            break;
        }
        let c = layers[l].macs_per_weight as f64;
        let on: Vec<usize> = (0..masks[l].len()).filter(|&i| masks[l][i] == 1).collect();
        let n = (((cost - limit) / c).ceil() as usize).min(on.len());
        for j in sample(rng, on.len(), n) {
            masks[l][on[j]] = 0;
        }
        cost -= n as f64 * c;
    }
}

/// The regrowth that fits `room` multiply-adds: `want[l]` entries asked for per layer (whole
/// numbers), `score[l]` the layer's redistribution score, `cost[l]` its multiply-adds per
/// weight. Returns `want` unchanged when it fits; otherwise the water-fill described in the
/// module documentation. The result never costs more than `room`.
pub(crate) fn fit_regrowth(want: &[usize], score: &[f64], cost: &[u64], room: f64) -> Vec<usize> {
    let room = room.max(0.0);
    let wanted = |l: usize| want[l] as f64 * cost[l] as f64;
    let total: f64 = (0..want.len()).map(wanted).sum();
    if total <= room {
        return want.to_vec();
    }
    // Layers that compete for the room: they want something and have a positive score. If none
    // has a score, the room is split in proportion to what each wants.
    let scored = (0..want.len()).any(|l| want[l] > 0 && score[l] > 0.0);
    let weight: Vec<f64> = (0..want.len())
        .map(|l| {
            if want[l] == 0 {
                0.0
            } else if scored {
                score[l].max(0.0)
            } else {
                wanted(l)
            }
        })
        .collect();
    // Breakpoints: a layer is capped at its own want once λ ≥ want·cost / weight.
    let mut order: Vec<usize> = (0..want.len()).filter(|&l| weight[l] > 0.0).collect();
    order.sort_by(|&a, &b| {
        (wanted(a) / weight[a])
            .total_cmp(&(wanted(b) / weight[b]))
            .then(a.cmp(&b))
    });
    let mut fixed = 0.0;
    let mut open: f64 = order.iter().map(|&l| weight[l]).sum();
    let mut capped = vec![false; want.len()];
    for &l in &order {
        let lambda = (room - fixed) / open;
        if lambda * weight[l] < wanted(l) {
            break;
        }
        capped[l] = true;
        fixed += wanted(l);
        open -= weight[l];
    }
    let lambda = if open > 0.0 {
        (room - fixed).max(0.0) / open
    } else {
        0.0
    };
    let mut grow: Vec<usize> = (0..want.len())
        .map(|l| {
            if capped[l] {
                want[l]
            } else if weight[l] > 0.0 {
                let n = (lambda * weight[l] / cost[l] as f64).floor();
                (n.max(0.0) as usize).min(want[l])
            } else {
                0
            }
        })
        .collect();
    // Rounding in the sums can leave the total a hair over the room: take entries back from
    // the most expensive layers until it fits.
    let mut spent: f64 = (0..grow.len())
        .map(|l| grow[l] as f64 * cost[l] as f64)
        .sum();
    while spent > room {
        let Some(l) = (0..grow.len())
            .filter(|&l| grow[l] > 0)
            .max_by_key(|&l| (cost[l], std::cmp::Reverse(l)))
        else {
            break;
        };
        grow[l] -= 1;
        spent -= cost[l] as f64;
    }
    grow
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost_of(grow: &[usize], cost: &[u64]) -> f64 {
        grow.iter()
            .zip(cost)
            .map(|(&g, &c)| g as f64 * c as f64)
            .sum()
    }

    #[test]
    fn regrowth_that_fits_is_unchanged() {
        let want = [10, 0, 7];
        let grow = fit_regrowth(&want, &[0.2, 0.5, 0.3], &[100, 1, 4], 1028.0);
        assert_eq!(grow, want);
    }

    #[test]
    fn the_room_is_split_by_score_and_capped_by_each_want() {
        // Layer 0 wants 10 weights at 100 each (1000), layer 1 wants 50 at 1 (50), layer 2
        // wants 20 at 10 (200). Room 600, scores 0.5 / 0.25 / 0.25: λ = 600 at first, layer 1
        // is capped at 50, then λ = 550 / 0.75 = 733.3: layer 2 gets min(20, 18.3) = 18 and
        // layer 0 floor(366.7 / 100) = 3.
        let grow = fit_regrowth(&[10, 50, 20], &[0.5, 0.25, 0.25], &[100, 1, 10], 600.0);
        assert_eq!(grow, vec![3, 50, 18]);
        assert!(cost_of(&grow, &[100, 1, 10]) <= 600.0);
    }

    #[test]
    fn no_room_grows_nothing_and_zero_scores_share_by_want() {
        assert_eq!(fit_regrowth(&[4, 5], &[0.5, 0.5], &[3, 2], 0.0), vec![0, 0]);
        assert_eq!(
            fit_regrowth(&[4, 5], &[0.5, 0.5], &[3, 2], -7.0),
            vec![0, 0]
        );
        // No scores: each layer gets half of what it asked for (costs 12 and 10, room 11).
        let grow = fit_regrowth(&[4, 5], &[0.0, 0.0], &[3, 2], 11.0);
        assert_eq!(grow, vec![2, 2]);
    }

    #[test]
    fn a_layer_without_score_grows_nothing_when_the_budget_binds() {
        let grow = fit_regrowth(&[4, 5], &[0.0, 1.0], &[3, 2], 9.0);
        assert_eq!(grow, vec![0, 4]);
    }

    #[test]
    fn the_result_never_exceeds_the_room() {
        // A small deterministic sweep over awkward rooms and costs.
        let mut x = 12345u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let n = 1 + (next() % 6) as usize;
            let want: Vec<usize> = (0..n).map(|_| (next() % 50) as usize).collect();
            let score: Vec<f64> = (0..n).map(|_| (next() % 7) as f64 / 7.0).collect();
            let cost: Vec<u64> = (0..n).map(|_| 1 + next() % 900).collect();
            let room = (next() % 40_000) as f64 / 3.0;
            let grow = fit_regrowth(&want, &score, &cost, room);
            let total = cost_of(&want, &cost);
            assert!(grow.iter().zip(&want).all(|(g, w)| g <= w));
            if total <= room {
                assert_eq!(grow, want);
            } else {
                assert!(cost_of(&grow, &cost) <= room, "{want:?} {cost:?} {room}");
            }
        }
    }

    #[test]
    fn init_scale_is_one_when_the_densities_fit() {
        let layers = vec![
            LayerSpec::new("conv", &[4, 2, 3, 3])
                .unwrap()
                .with_macs_per_weight(64)
                .unwrap(),
            LayerSpec::new("fc", &[10, 256]).unwrap(),
        ];
        assert_eq!(init_scale(&layers, &[0.05, 0.05], 0.05), 1.0);
        assert_eq!(init_scale(&layers, &[0.05, 0.05], 0.2), 1.0);
        // Conv at 0.5 and fc at 0.05: cost 72·64·0.5 + 2560·0.05 = 2432 of 7168 dense.
        let s = init_scale(&layers, &[0.5, 0.05], 0.1);
        assert!((s - 716.8 / 2432.0).abs() < 1e-12, "{s}");
    }
}
