//! Initial masks: uniform (every entry active with probability `d`) or ERK per-layer densities.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{LayerSpec, MaskingError};

/// Erdős–Rényi-kernel densities (RigL's `get_sparsities_erdos_renyi`, power 1) for layers of the
/// given weight shapes, scaled so that `Σ d_l · numel_l = density · Σ numel_l`.
///
/// A layer's raw density is `Σ shape / Π shape` (`(out + in)/(out·in)` for a linear layer,
/// `(out + in + kh + kw)/(out·in·kh·kw)` for a convolution). One factor `ε` scales all of them;
/// layers that would exceed 1 are made dense and `ε` is recomputed for the others, until every
/// density is at most 1.
pub fn erk_densities(layers: &[LayerSpec], density: f64) -> Result<Vec<f64>, MaskingError> {
    if !(density > 0.0 && density <= 1.0) {
        return Err(MaskingError::InvalidOption {
            option: "density",
            reason: format!("{density} is not in (0, 1]"),
        });
    }
    let raw: Vec<f64> = layers
        .iter()
        .map(|l| l.shape.iter().sum::<usize>() as f64 / l.numel() as f64)
        .collect();
    let mut dense = vec![false; layers.len()];
    loop {
        let mut divisor = 0.0;
        let mut rhs = 0.0;
        for (i, l) in layers.iter().enumerate() {
            let n = l.numel() as f64;
            if dense[i] {
                rhs -= n * (1.0 - density);
            } else {
                rhs += n * density;
                divisor += raw[i] * n;
            }
        }
        let max_raw = (0..layers.len())
            .filter(|&i| !dense[i])
            .map(|i| raw[i])
            .fold(f64::NEG_INFINITY, f64::max);
        if divisor <= 0.0 || !max_raw.is_finite() {
            // Every layer is dense.
            return Ok(vec![1.0; layers.len()]);
        }
        let eps = rhs / divisor;
        if max_raw * eps > 1.0 {
            for i in 0..layers.len() {
                if !dense[i] && raw[i] == max_raw {
                    dense[i] = true;
                }
            }
        } else {
            return Ok((0..layers.len())
                .map(|i| if dense[i] { 1.0 } else { eps * raw[i] })
                .collect());
        }
    }
}

/// Draws a mask in which every entry is active independently with probability `p`, in row-major
/// order from `rng`.
pub(crate) fn draw_mask(rng: &mut ChaCha8Rng, p: f64, mask: &mut [u8]) {
    for m in mask.iter_mut() {
        *m = u8::from(rng.random::<f64>() < p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: &[usize]) -> LayerSpec {
        LayerSpec::new(name, shape).unwrap()
    }

    #[test]
    fn erk_keeps_the_global_budget_and_caps_at_one() {
        let lenet5 = [
            spec("conv1", &[20, 1, 5, 5]),
            spec("conv2", &[50, 20, 5, 5]),
            spec("fc3", &[500, 800]),
            spec("fc4", &[10, 500]),
        ];
        for d in [0.01, 0.05, 0.2, 0.5, 0.9] {
            let dens = erk_densities(&lenet5, d).unwrap();
            let total: f64 = lenet5.iter().map(|l| l.numel() as f64).sum();
            let kept: f64 = lenet5
                .iter()
                .zip(&dens)
                .map(|(l, d)| l.numel() as f64 * d)
                .sum();
            assert!(
                (kept - d * total).abs() < 1e-6 * total,
                "d = {d}: {kept} vs {}",
                d * total
            );
            assert!(dens.iter().all(|&x| x > 0.0 && x <= 1.0), "{dens:?}");
        }
        // At 5 %, fc4 ((10 + 500)/5000 = 0.102 raw) would exceed 1 and is made dense; the others
        // share eps = (0.05 · 425,500 − 0.95 · 5000) / (31 + 80 + 1300).
        let dens = erk_densities(&lenet5, 0.05).unwrap();
        assert_eq!(dens[3], 1.0);
        let eps = 16_525.0 / 1411.0;
        for (i, raw) in [
            (0, 31.0 / 500.0),
            (1, 80.0 / 25_000.0),
            (2, 1300.0 / 400_000.0),
        ] {
            assert!((dens[i] - eps * raw).abs() < 1e-12, "{dens:?}");
        }
    }

    #[test]
    fn erk_for_lenet300() {
        let mlp = [
            spec("fc1", &[300, 784]),
            spec("fc2", &[100, 300]),
            spec("fc3", &[10, 100]),
        ];
        let dens = erk_densities(&mlp, 0.05).unwrap();
        // raw densities (out+in)/(out·in), one common factor.
        let ratio = dens[1] / dens[0];
        let want = (400.0 / 30000.0) / (1084.0 / 235200.0);
        assert!((ratio - want).abs() < 1e-12);
        assert!(dens[2] > dens[1] && dens[1] > dens[0]);
        let kept: f64 = [235200.0, 30000.0, 1000.0]
            .iter()
            .zip(&dens)
            .map(|(n, d)| n * d)
            .sum();
        assert!((kept - 0.05 * 266200.0).abs() < 1e-6);
        // Density 1 makes everything dense.
        assert_eq!(erk_densities(&mlp, 1.0).unwrap(), vec![1.0; 3]);
        assert!(erk_densities(&mlp, 0.0).is_err());
        assert!(erk_densities(&mlp, 1.5).is_err());
    }
}
