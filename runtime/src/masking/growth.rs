//! Growth: which inactive entries a layer activates.
//!
//! Every function takes the mask after pruning and returns the flat indices to activate, in
//! ascending order. None of them touches the mask itself.

use std::cmp::Ordering;

use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

/// Orders by |score| descending, then by index ascending (a total order, so the outcome never
/// depends on a sort's stability).
fn by_score_desc(a: &(f32, usize), b: &(f32, usize)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Whether a score makes an entry a candidate: nonzero and not NaN.
fn is_candidate(s: f32) -> bool {
    s != 0.0 && !s.is_nan()
}

/// The `k` inactive entries with the largest |score| among those whose score is nonzero (entries
/// whose score is 0 or NaN never grow, so fewer than `k` may come back).
pub(crate) fn top_k_by_score(mask: &[u8], score: &[f32], k: usize) -> Vec<usize> {
    let mut cand: Vec<(f32, usize)> = mask
        .iter()
        .zip(score)
        .enumerate()
        .filter(|(_, (&m, &s))| m == 0 && is_candidate(s))
        .map(|(i, (_, &s))| (s.abs(), i))
        .collect();
    let mut chosen = select_top(&mut cand, k);
    chosen.sort_unstable();
    chosen
}

/// The indices of the `k` best of `cand` under [`by_score_desc`] (all of them if fewer).
fn select_top(cand: &mut [(f32, usize)], k: usize) -> Vec<usize> {
    if k == 0 {
        return Vec::new();
    }
    if k < cand.len() {
        cand.select_nth_unstable_by(k - 1, by_score_desc);
    }
    cand.iter().take(k).map(|&(_, i)| i).collect()
}

/// `k` inactive entries drawn uniformly without replacement (all of them if fewer than `k`).
pub(crate) fn random(mask: &[u8], k: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let inactive: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] == 0).collect();
    let k = k.min(inactive.len());
    let mut chosen: Vec<usize> = sample(rng, inactive.len(), k)
        .into_iter()
        .map(|j| inactive[j])
        .collect();
    chosen.sort_unstable();
    chosen
}

/// Momentum growth per output row: row `i` gets `floor(v_i · k)` of the budget, with `v_i` its mean
/// |momentum| over all its entries normalised to sum 1, and grows its entries of largest
/// |momentum| (capped at the candidates the row has). What the rows could not take, and what the
/// floors left over, goes to the largest |momentum| among the remaining candidates of the whole
/// layer, so the layer grows `min(k, candidates)` entries, as the other growth modes do.
pub(crate) fn momentum_neuron(
    mask: &[u8],
    momentum: &[f32],
    rows: usize,
    cols: usize,
    k: usize,
) -> Vec<usize> {
    let row_mean: Vec<f64> = (0..rows)
        .map(|r| {
            let row = &momentum[r * cols..(r + 1) * cols];
            row.iter().map(|&m| f64::from(m.abs())).sum::<f64>() / cols as f64
        })
        .collect();
    let total: f64 = row_mean.iter().sum();
    let mut grown = vec![false; mask.len()];
    let mut chosen = Vec::with_capacity(k);
    if total > 0.0 && total.is_finite() {
        for (r, &v) in row_mean.iter().enumerate() {
            let quota = ((v / total) * k as f64).floor() as usize;
            let start = r * cols;
            let picked = top_k_by_score(
                &mask[start..start + cols],
                &momentum[start..start + cols],
                quota,
            );
            for j in picked {
                grown[start + j] = true;
                chosen.push(start + j);
            }
        }
    }
    let rest = k.saturating_sub(chosen.len());
    if rest > 0 {
        let mut cand: Vec<(f32, usize)> = (0..mask.len())
            .filter(|&i| mask[i] == 0 && !grown[i] && is_candidate(momentum[i]))
            .map(|i| (momentum[i].abs(), i))
            .collect();
        chosen.extend(select_top(&mut cand, rest));
    }
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn top_k_takes_largest_magnitudes_of_inactive_entries() {
        let mask = [1, 0, 0, 0, 0, 1];
        let score = [9.0, -3.0, 0.5, 2.0, -0.25, 8.0];
        assert_eq!(top_k_by_score(&mask, &score, 2), vec![1, 3]);
        assert_eq!(top_k_by_score(&mask, &score, 0), Vec::<usize>::new());
        assert_eq!(top_k_by_score(&mask, &score, 10), vec![1, 2, 3, 4]);
    }

    #[test]
    fn zero_and_nan_scores_never_grow() {
        let mask = [0, 0, 0, 0];
        let score = [0.0, -0.0, f32::NAN, 1e-30];
        assert_eq!(top_k_by_score(&mask, &score, 4), vec![3]);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let mask = [0, 0, 0, 0];
        let score = [1.0, -2.0, 2.0, 1.0];
        assert_eq!(top_k_by_score(&mask, &score, 1), vec![1]);
        assert_eq!(top_k_by_score(&mask, &score, 3), vec![0, 1, 2]);
    }

    #[test]
    fn random_growth_is_exact_and_reproducible() {
        let mask: Vec<u8> = (0..100).map(|i| u8::from(i % 3 == 0)).collect();
        let mut a = ChaCha8Rng::seed_from_u64(5);
        let mut b = ChaCha8Rng::seed_from_u64(5);
        let ga = random(&mask, 20, &mut a);
        assert_eq!(ga, random(&mask, 20, &mut b));
        assert_eq!(ga.len(), 20);
        assert!(ga.iter().all(|&i| mask[i] == 0));
        assert!(ga.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(random(&mask, 1000, &mut a).len(), 66);
    }

    #[test]
    fn momentum_neuron_keeps_the_budget() {
        // 3 rows of 4; row 2 has by far the largest momentum but only two free slots.
        let mask = [0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0];
        let momentum = [
            0.1, 0.2, 0.3, 0.4, //
            0.5, 0.1, 0.2, 0.0, //
            9.0, 9.0, 8.0, 7.0,
        ];
        for k in 0..=9 {
            let g = momentum_neuron(&mask, &momentum, 3, 4, k);
            // 8 candidates: index 7 has zero momentum.
            assert_eq!(g.len(), k.min(8), "k = {k}: {g:?}");
            assert!(g.iter().all(|&i| mask[i] == 0 && momentum[i] != 0.0));
        }
        // Row 2 gets floor(8.25/8.7 · 4) = 3 > its 2 free slots: it takes both, the rest spills to
        // the largest remaining momenta (0.4 and 0.3).
        assert_eq!(
            momentum_neuron(&mask, &momentum, 3, 4, 4),
            vec![2, 3, 10, 11]
        );
    }
}
