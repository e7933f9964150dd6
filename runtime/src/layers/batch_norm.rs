//! [`BatchNorm`]: batch normalisation over each channel (2-D: a channel's plane of positions
//! × the batch; 1-D: a flat feature × the batch), PyTorch's `BatchNorm2d`/`BatchNorm1d`, with
//! an optional fused ReLU.

use super::params::{DenseParam, StatBuffer};
use super::{batch_of, check_matrix, Layer, Shape};
use crate::error::{Result, RuntimeError};
use crate::tensor::Matrix;
use crate::weights::WeightGradMode;

/// PyTorch's defaults.
const EPS: f32 = 1e-5;
const MOMENTUM: f32 = 0.1;

/// Batch normalisation of every channel: in training, `y = γ·(x − mean)/√(var + ε) + β` with
/// the batch's mean and (biased) variance over the channel's positions and the valid
/// samples, updating the running statistics (PyTorch's momentum 0.1, unbiased variance); in
/// evaluation, the running statistics instead. `γ` starts at 1 and `β` at 0; both are dense
/// parameters (`NAME.weight`, `NAME.bias`), the statistics `NAME.running_mean` and
/// `NAME.running_var`.
///
/// A following ReLU fuses into it (`y = max(0, …)`, and the backward pass masks the gradient
/// by `y > 0`): one pass over the activation instead of two.
#[derive(Debug)]
pub struct BatchNorm {
    name: String,
    shape: Shape,
    params: [DenseParam; 2],
    stats: [StatBuffer; 2],
    relu: bool,
    training: bool,
    valid: Option<usize>,
    dims: Option<(usize, usize)>,
    /// Per channel, the mean and 1/√(var + ε) of the last training forward pass.
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl BatchNorm {
    /// Batch normalisation of the channels of `shape` (for a flat shape, of each feature).
    pub fn new(name: &str, shape: Shape) -> Self {
        let c = shape.channels;
        let p = |s: &str, v: f32| DenseParam::new(format!("{name}.{s}"), vec![v; c]);
        let b = |s: &str, v: f32| StatBuffer {
            name: format!("{name}.{s}"),
            value: vec![v; c],
        };
        BatchNorm {
            name: name.to_string(),
            shape,
            params: [p("weight", 1.0), p("bias", 0.0)],
            stats: [b("running_mean", 0.0), b("running_var", 1.0)],
            relu: false,
            training: true,
            valid: None,
            dims: None,
            mean: vec![0.0; c],
            inv_std: vec![1.0; c],
        }
    }

    /// Positions per channel.
    fn plane(&self) -> usize {
        self.shape.height * self.shape.width
    }

    /// Each channel's `(scale, shift)` of the evaluation mode.
    fn eval_affine(&self, c: usize) -> (f32, f32) {
        let inv = 1.0 / (self.stats[1].value[c] + EPS).sqrt();
        let scale = self.params[0].value[c] * inv;
        (
            scale,
            self.params[1].value[c] - self.stats[0].value[c] * scale,
        )
    }
}

impl Layer for BatchNorm {
    fn name(&self) -> &str {
        &self.name
    }

    fn input_shape(&self) -> Shape {
        self.shape
    }

    fn output_shape(&self) -> Shape {
        self.shape
    }

    fn set_batch(&mut self, batch: usize, ld: usize) -> Result<()> {
        self.dims = Some((batch, ld));
        Ok(())
    }

    fn set_valid(&mut self, n: usize) {
        self.valid = Some(n);
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn fuse_relu(&mut self) -> bool {
        !std::mem::replace(&mut self.relu, true)
    }

    fn params(&self) -> &[DenseParam] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [DenseParam] {
        &mut self.params
    }

    fn stats(&self) -> &[StatBuffer] {
        &self.stats
    }

    fn stats_mut(&mut self) -> &mut [StatBuffer] {
        &mut self.stats
    }

    fn forward(&mut self, x: &Matrix, y: &mut Matrix) -> Result<()> {
        let (batch, ld) = batch_of(&self.name, self.dims)?;
        let f = self.shape.features();
        check_matrix(&self.name, "input", x, f, batch, ld)?;
        check_matrix(&self.name, "output", y, f, batch, ld)?;
        let n = self.valid.unwrap_or(batch).min(batch);
        let plane = self.plane();
        let count = n * plane;
        if self.training && count < 2 {
            return Err(RuntimeError::Shape(format!(
                "layer {}: batch normalisation in training needs more than one value per \
                 channel, the batch gives {count}",
                self.name
            )));
        }
        let relu = self.relu;
        for (c, (xs, ys)) in x
            .as_slice()
            .chunks_exact(plane * ld)
            .zip(y.as_mut_slice().chunks_exact_mut(plane * ld))
            .enumerate()
        {
            let (scale, shift) = if self.training {
                // Two passes (mean, then squared deviations) in f64: no cancellation.
                let sum: f64 = xs
                    .chunks_exact(ld)
                    .map(|r| r[..n].iter().map(|&v| f64::from(v)).sum::<f64>())
                    .sum();
                let mean = sum / count as f64;
                let sq: f64 = xs
                    .chunks_exact(ld)
                    .map(|r| {
                        r[..n]
                            .iter()
                            .map(|&v| (f64::from(v) - mean).powi(2))
                            .sum::<f64>()
                    })
                    .sum();
                let var = sq / count as f64;
                let inv = 1.0 / (var + f64::from(EPS)).sqrt();
                self.mean[c] = mean as f32;
                self.inv_std[c] = inv as f32;
                let rm = &mut self.stats[0].value[c];
                *rm = (1.0 - MOMENTUM) * *rm + MOMENTUM * mean as f32;
                let rv = &mut self.stats[1].value[c];
                let unbiased = sq / (count - 1) as f64;
                *rv = (1.0 - MOMENTUM) * *rv + MOMENTUM * unbiased as f32;
                let scale = self.params[0].value[c] * inv as f32;
                (scale, self.params[1].value[c] - mean as f32 * scale)
            } else {
                self.eval_affine(c)
            };
            for (xr, yr) in xs.chunks_exact(ld).zip(ys.chunks_exact_mut(ld)) {
                if relu {
                    for (o, &i) in yr[..n].iter_mut().zip(&xr[..n]) {
                        *o = (i * scale + shift).max(0.0);
                    }
                } else {
                    for (o, &i) in yr[..n].iter_mut().zip(&xr[..n]) {
                        *o = i * scale + shift;
                    }
                }
                yr[n..].fill(0.0);
            }
        }
        Ok(())
    }

    fn backward(
        &mut self,
        x: &Matrix,
        y: &Matrix,
        dy: &mut Matrix,
        dx: Option<&mut Matrix>,
        _mode: WeightGradMode,
    ) -> Result<()> {
        let (batch, ld) = batch_of(&self.name, self.dims)?;
        let f = self.shape.features();
        check_matrix(&self.name, "input", x, f, batch, ld)?;
        check_matrix(&self.name, "output", y, f, batch, ld)?;
        check_matrix(&self.name, "output gradient", dy, f, batch, ld)?;
        let n = self.valid.unwrap_or(batch).min(batch);
        let plane = self.plane();
        let count = (n * plane) as f32;
        if self.relu {
            for (yr, dr) in y
                .as_slice()
                .chunks_exact(ld)
                .zip(dy.as_mut_slice().chunks_exact_mut(ld))
            {
                for (d, &o) in dr[..n].iter_mut().zip(&yr[..n]) {
                    if o <= 0.0 {
                        *d = 0.0;
                    }
                }
            }
        }
        let mut dx = dx;
        if let Some(dx) = &dx {
            check_matrix(&self.name, "input gradient", dx, f, batch, ld)?;
        }
        for c in 0..self.shape.channels {
            let rows = c * plane * ld..(c + 1) * plane * ld;
            let (xs, ds) = (&x.as_slice()[rows.clone()], &dy.as_slice()[rows.clone()]);
            let (mean, inv) = if self.training {
                (self.mean[c], self.inv_std[c])
            } else {
                (
                    self.stats[0].value[c],
                    1.0 / (self.stats[1].value[c] + EPS).sqrt(),
                )
            };
            // dβ = Σ dy, dγ = Σ dy·x̂.
            let (mut db, mut dg) = (0f64, 0f64);
            for (xr, dr) in xs.chunks_exact(ld).zip(ds.chunks_exact(ld)) {
                for (&xv, &d) in xr[..n].iter().zip(&dr[..n]) {
                    db += f64::from(d);
                    dg += f64::from(d) * f64::from((xv - mean) * inv);
                }
            }
            self.params[0].grad[c] = dg as f32;
            self.params[1].grad[c] = db as f32;
            let Some(dx) = dx.as_deref_mut() else {
                continue;
            };
            let gamma = self.params[0].value[c];
            let dxs = &mut dx.as_mut_slice()[rows];
            if self.training {
                // dx = γ/σ · (dy − dβ/N − x̂·dγ/N).
                let (db, dg) = (db as f32 / count, dg as f32 / count);
                let k = gamma * inv;
                for ((xr, dr), or) in xs
                    .chunks_exact(ld)
                    .zip(ds.chunks_exact(ld))
                    .zip(dxs.chunks_exact_mut(ld))
                {
                    for ((o, &xv), &d) in or[..n].iter_mut().zip(&xr[..n]).zip(&dr[..n]) {
                        *o = k * (d - db - (xv - mean) * inv * dg);
                    }
                    or[n..].fill(0.0);
                }
            } else {
                let k = gamma * inv;
                for (dr, or) in ds.chunks_exact(ld).zip(dxs.chunks_exact_mut(ld)) {
                    for (o, &d) in or[..n].iter_mut().zip(&dr[..n]) {
                        *o = k * d;
                    }
                    or[n..].fill(0.0);
                }
            }
        }
        Ok(())
    }
}
