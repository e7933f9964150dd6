//! [`BatchNorm`]: batch normalisation over each channel (2-D: a channel's plane of positions
//! × the batch; 1-D: a flat feature × the batch), PyTorch's `BatchNorm2d`/`BatchNorm1d`, with
//! a fused ReLU and, after it, a fused dropout.

use super::dropout::{check_probability, DropDraw};
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
/// A following ReLU fuses into it (`y = max(0, …)`), and a dropout after that too (in
/// training, `y = keep·max(0, …)/(1 − p)`): one pass over the activation instead of three.
/// The backward pass then needs no mask of its own: the gradient passes where `y > 0`. Work is
/// split over the channels on up to [`Layer::set_threads`] threads, each channel's plane read
/// from memory once and reused from the cache.
#[derive(Debug)]
pub struct BatchNorm {
    name: String,
    shape: Shape,
    params: [DenseParam; 2],
    stats: [StatBuffer; 2],
    relu: bool,
    dropout: Option<DropDraw>,
    key: u64,
    training: bool,
    threads: usize,
    valid: Option<usize>,
    dims: Option<(usize, usize)>,
    /// Per channel, the mean, 1/√(var + ε) and unbiased variance of the last training
    /// forward pass.
    moments: Vec<(f32, f32, f32)>,
    /// Per channel, Σ dy and Σ dy·x̂ of the last backward pass.
    sums: Vec<(f32, f32)>,
}

/// What one channel's pass reads.
#[derive(Clone, Copy)]
struct Pass {
    n: usize,
    ld: usize,
    relu: bool,
    dropout: Option<(DropDraw, u64)>,
}

/// Runs `f(channel, xs, ys)` for every channel, over contiguous groups of channels on up to
/// `threads` threads; `x` and `y` hold `channels` blocks of `block` floats each, and `out`
/// one result per channel.
fn per_channel<T: Send>(
    threads: usize,
    block: usize,
    x: &[f32],
    y: &mut [f32],
    out: &mut [T],
    f: impl Fn(usize, &[f32], &mut [f32], &mut T) + Sync,
) {
    let channels = out.len();
    let groups = threads.clamp(1, channels.max(1));
    let per = channels.div_ceil(groups);
    std::thread::scope(|s| {
        let mut rest_y = y;
        let mut rest_out = out;
        let mut c0 = 0;
        let mut handles = Vec::new();
        while c0 < channels {
            let c1 = (c0 + per).min(channels);
            let (ys, ry) = rest_y.split_at_mut((c1 - c0) * block);
            let (os, ro) = rest_out.split_at_mut(c1 - c0);
            rest_y = ry;
            rest_out = ro;
            let xs = &x[c0 * block..c1 * block];
            let f = &f;
            let mut work = move || {
                for (i, ((xc, yc), o)) in xs
                    .chunks_exact(block)
                    .zip(ys.chunks_exact_mut(block))
                    .zip(os.iter_mut())
                    .enumerate()
                {
                    f(c0 + i, xc, yc, o);
                }
            };
            if c1 == channels {
                work();
            } else {
                handles.push(s.spawn(work));
            }
            c0 = c1;
        }
        for h in handles {
            h.join().expect("a batch-norm thread panicked");
        }
    });
}

/// Lanes of the vectorised sums.
const LANES: usize = 8;

/// Σ f(v) over a row, in [`LANES`] partial sums (which the compiler vectorises; one running
/// f32 sum would be a chain of dependent adds).
#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&a| f(a)).sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ over the valid columns of every row of a channel, as f64 (f32 within a row).
fn channel_sum(xs: &[f32], p: Pass, f: impl Fn(f32) -> f32 + Copy) -> f64 {
    xs.chunks_exact(p.ld)
        .map(|r| f64::from(lane_sum(&r[..p.n], f)))
        .sum()
}

/// `(Σ g, Σ g·(x − m)·inv)` over a row, in [`LANES`] partial sums.
#[inline(always)]
fn grad_sums(x: &[f32], g: &[f32], m: f32, inv: f32) -> (f32, f32) {
    let (mut bs, mut gs) = ([0f32; LANES], [0f32; LANES]);
    let n = x.len() / LANES * LANES;
    for (xc, gc) in x[..n].chunks_exact(LANES).zip(g[..n].chunks_exact(LANES)) {
        for i in 0..LANES {
            bs[i] += gc[i];
            gs[i] += gc[i] * ((xc[i] - m) * inv);
        }
    }
    let (mut bt, mut gt) = (0f32, 0f32);
    for (&xv, &gv) in x[n..].iter().zip(&g[n..]) {
        bt += gv;
        gt += gv * ((xv - m) * inv);
    }
    (bs.iter().sum::<f32>() + bt, gs.iter().sum::<f32>() + gt)
}

/// Writes `y = epilogue(x·scale + shift)` for one channel (its first row is `c_rows`): ReLU
/// and dropout as fused.
fn write_channel(c_rows: usize, xs: &[f32], ys: &mut [f32], scale: f32, shift: f32, p: Pass) {
    for (r, (xr, yr)) in xs
        .chunks_exact(p.ld)
        .zip(ys.chunks_exact_mut(p.ld))
        .enumerate()
    {
        let (xv, yv) = (&xr[..p.n], &mut yr[..p.n]);
        if p.relu {
            for (o, &i) in yv.iter_mut().zip(xv) {
                *o = (i * scale + shift).max(0.0);
            }
        } else {
            for (o, &i) in yv.iter_mut().zip(xv) {
                *o = i * scale + shift;
            }
        }
        if let Some((draw, key)) = p.dropout {
            draw.apply_in_place(key, c_rows + r, yv);
        }
        yr[p.n..].fill(0.0);
    }
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
            dropout: None,
            key: 0,
            training: true,
            threads: 1,
            valid: None,
            dims: None,
            moments: vec![(0.0, 1.0, 1.0); c],
            sums: vec![(0.0, 0.0); c],
        }
    }

    /// Fuses a dropout with probability `p` (named `name`, which salts its draws) after the
    /// fused ReLU; an error without a fused ReLU or with a dropout fused already.
    pub fn fuse_dropout(&mut self, name: &str, p: f32) -> Result<()> {
        check_probability(name, p)?;
        if !self.relu || self.dropout.is_some() {
            return Err(RuntimeError::Config(format!(
                "layer {}: a dropout fuses only after a fused ReLU, once",
                self.name
            )));
        }
        if p > 0.0 {
            self.dropout = Some(DropDraw::new(name, p));
        }
        Ok(())
    }

    /// Positions per channel.
    fn plane(&self) -> usize {
        self.shape.height * self.shape.width
    }

    fn pass(&self, n: usize, ld: usize) -> Pass {
        Pass {
            n,
            ld,
            relu: self.relu,
            dropout: self
                .dropout
                .filter(|_| self.training)
                .map(|d| (d, self.key)),
        }
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

    fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    fn set_step_key(&mut self, key: u64) {
        self.key = key;
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
        let pass = self.pass(n, ld);
        let (gamma, beta) = (&self.params[0].value, &self.params[1].value);
        let (rm, rv) = (&self.stats[0].value, &self.stats[1].value);
        let training = self.training;
        // Per channel: (mean, 1/σ, unbiased variance) of the batch in training.
        let mut moments = std::mem::take(&mut self.moments);
        per_channel(
            self.threads,
            plane * ld,
            x.as_slice(),
            y.as_mut_slice(),
            &mut moments,
            |c, xs, ys, m| {
                let (scale, shift) = if training {
                    // Two passes (mean, then squared deviations; the plane is in the cache
                    // for the second): no cancellation.
                    let mean = channel_sum(xs, pass, |v| v) / count as f64;
                    let mf = mean as f32;
                    let sq = channel_sum(xs, pass, |v| (v - mf) * (v - mf));
                    let var = sq / count as f64;
                    let inv = (1.0 / (var + f64::from(EPS)).sqrt()) as f32;
                    *m = (mf, inv, (sq / (count - 1) as f64) as f32);
                    let scale = gamma[c] * inv;
                    (scale, beta[c] - mf * scale)
                } else {
                    let inv = 1.0 / (rv[c] + EPS).sqrt();
                    let scale = gamma[c] * inv;
                    (scale, beta[c] - rm[c] * scale)
                };
                write_channel(c * plane, xs, ys, scale, shift, pass);
            },
        );
        if training {
            for (c, &(mean, _, unbiased)) in moments.iter().enumerate() {
                let rm = &mut self.stats[0].value[c];
                *rm = (1.0 - MOMENTUM) * *rm + MOMENTUM * mean;
                let rv = &mut self.stats[1].value[c];
                *rv = (1.0 - MOMENTUM) * *rv + MOMENTUM * unbiased;
            }
        }
        self.moments = moments;
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
        if let Some(dx) = &dx {
            check_matrix(&self.name, "input gradient", dx, f, batch, ld)?;
        }
        let n = self.valid.unwrap_or(batch).min(batch);
        let plane = self.plane();
        let block = plane * ld;
        let count = (n * plane) as f32;
        let (relu, training) = (self.relu, self.training);
        // A fused dropout scales what passes: the gradient is dy·scale where y > 0.
        let drop_scale = self.dropout.filter(|_| training).map_or(1.0, |d| d.scale());
        // First the gradient that reaches the normalised value, in place: g = dy·scale where
        // it passes (y > 0 after a fused ReLU, everywhere without), 0 elsewhere.
        if relu || drop_scale != 1.0 {
            let thr = if relu { 0.0 } else { f32::NEG_INFINITY };
            let mut unused = vec![(); self.shape.channels];
            per_channel(
                self.threads,
                block,
                y.as_slice(),
                dy.as_mut_slice(),
                &mut unused,
                |_, yc, dc, _| {
                    for (yr, dr) in yc.chunks_exact(ld).zip(dc.chunks_exact_mut(ld)) {
                        for (d, &yv) in dr[..n].iter_mut().zip(&yr[..n]) {
                            // Branch-free (half the entries pass, at random).
                            let pass = f32::from(u8::from(yv > thr));
                            *d *= pass * drop_scale;
                        }
                    }
                },
            );
        }
        let dys = dy.as_slice();
        let gamma = &self.params[0].value;
        let moments = &self.moments;
        let (rm, rv) = (&self.stats[0].value, &self.stats[1].value);
        let stat = |c: usize| {
            if training {
                (moments[c].0, moments[c].1)
            } else {
                (rm[c], 1.0 / (rv[c] + EPS).sqrt())
            }
        };
        let channel = |c: usize, xs: &[f32], dxs: Option<&mut [f32]>, out: &mut (f32, f32)| {
            let dc = &dys[c * block..(c + 1) * block];
            let (m, inv) = stat(c);
            // dβ = Σ g, dγ = Σ g·x̂.
            let (mut db, mut dg) = (0f64, 0f64);
            for (xr, dr) in xs.chunks_exact(ld).zip(dc.chunks_exact(ld)) {
                let (b, g) = grad_sums(&xr[..n], &dr[..n], m, inv);
                db += f64::from(b);
                dg += f64::from(g);
            }
            *out = (db as f32, dg as f32);
            let Some(dxs) = dxs else { return };
            let k = gamma[c] * inv;
            // Training: dx = γ/σ · (g − dβ/N − x̂·dγ/N); evaluation: dx = γ/σ · g.
            let (mb, mg) = if training {
                (db as f32 / count, dg as f32 / count)
            } else {
                (0.0, 0.0)
            };
            for ((xr, dr), or) in xs
                .chunks_exact(ld)
                .zip(dc.chunks_exact(ld))
                .zip(dxs.chunks_exact_mut(ld))
            {
                // k·(g − mb − (x − m)·inv·mg) = k·g + c0 + c1·x.
                let (c0, c1) = (k * (-mb + m * inv * mg), -k * inv * mg);
                for ((o, &xv), &g) in or[..n].iter_mut().zip(&xr[..n]).zip(&dr[..n]) {
                    *o = k * g + c0 + c1 * xv;
                }
                or[n..].fill(0.0);
            }
        };
        let mut sums = std::mem::take(&mut self.sums);
        match dx {
            Some(dx) => per_channel(
                self.threads,
                block,
                x.as_slice(),
                dx.as_mut_slice(),
                &mut sums,
                |c, xs, dxs, out| channel(c, xs, Some(dxs), out),
            ),
            None => {
                for (c, (xs, out)) in x.as_slice().chunks_exact(block).zip(&mut sums).enumerate() {
                    channel(c, xs, None, out);
                }
            }
        }
        for (c, &(db, dg)) in sums.iter().enumerate() {
            self.params[0].grad[c] = dg;
            self.params[1].grad[c] = db;
        }
        self.sums = sums;
        Ok(())
    }
}
