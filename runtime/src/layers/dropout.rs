//! [`Dropout`]: in training, zeroes each activation with probability `p` and scales the rest
//! by `1/(1 − p)` (PyTorch's inverted dropout); in evaluation, the identity.

use super::{batch_of, check_matrix, Layer, Shape};
use crate::data::splitmix64;
use crate::error::{Result, RuntimeError};
use crate::tensor::Matrix;
use crate::weights::WeightGradMode;

/// Inverted dropout. Which entries drop depends only on the step's key (see
/// [`Layer::set_step_key`]), the layer and the entry, so nothing is stored between the
/// forward and the backward pass, and a resumed run drops the same entries. A dropout right
/// after a batch normalisation with a fused ReLU is fused into it instead.
#[derive(Debug)]
pub struct Dropout {
    name: String,
    shape: Shape,
    p: f32,
    draw: DropDraw,
    key: u64,
    training: bool,
    dims: Option<(usize, usize)>,
}

impl Dropout {
    /// Dropout with probability `p` in `[0, 1)`.
    pub fn new(name: &str, shape: Shape, p: f32) -> Result<Self> {
        check_probability(name, p)?;
        Ok(Dropout {
            name: name.to_string(),
            shape,
            p,
            draw: DropDraw::new(name, p),
            key: 0,
            training: true,
            dims: None,
        })
    }

    /// Applies the mask and scale of this step to `src` into `dst` (rows `ld` apart, `n`
    /// valid columns; the rest zero).
    fn apply(&self, src: &[f32], dst: &mut [f32], n: usize, ld: usize) {
        for (r, (sr, dr)) in src
            .chunks_exact(ld)
            .zip(dst.chunks_exact_mut(ld))
            .enumerate()
        {
            self.draw.apply_row(self.key, r, &sr[..n], &mut dr[..n]);
            dr[n..].fill(0.0);
        }
    }
}

/// An error unless `p` is a dropout probability, in `[0, 1)`.
pub(crate) fn check_probability(name: &str, p: f32) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(RuntimeError::Config(format!(
            "layer {name}: dropout probability {p} is not in [0, 1)"
        )))
    }
}

/// The random keep-or-drop decisions of dropout with probability `p`: entry `(row, column)`
/// of a step with key `key` is kept where 16 bits of a hash of (key, layer, row, group of
/// four columns) fall below `(1 − p)·2^16`; kept entries are scaled by `1/(1 − p)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropDraw {
    threshold: u32,
    scale: f32,
    salt: u64,
}

impl DropDraw {
    /// The draws of the layer `name` (its name salts them: two layers drop differently).
    pub(crate) fn new(name: &str, p: f32) -> Self {
        let salt = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        DropDraw {
            threshold: ((1.0 - f64::from(p)) * 65_536.0).round() as u32,
            scale: 1.0 / (1.0 - p),
            salt,
        }
    }

    /// `dst = keep · src · scale` over one row.
    pub(crate) fn apply_row(&self, key: u64, row: usize, src: &[f32], dst: &mut [f32]) {
        let base = splitmix64(key ^ self.salt ^ (row as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for (g, (d4, s4)) in dst.chunks_mut(4).zip(src.chunks(4)).enumerate() {
            let h = group_bits(base, g);
            for (k, (d, &s)) in d4.iter_mut().zip(s4).enumerate() {
                *d = f32::from_bits((s * self.scale).to_bits() & self.keep_mask(h, k));
            }
        }
    }

    /// `values = keep · values · scale` over one row, in place (the same draws as
    /// [`apply_row`](Self::apply_row)).
    pub(crate) fn apply_in_place(&self, key: u64, row: usize, values: &mut [f32]) {
        let base = splitmix64(key ^ self.salt ^ (row as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for (g, v4) in values.chunks_mut(4).enumerate() {
            let h = group_bits(base, g);
            for (k, v) in v4.iter_mut().enumerate() {
                *v = f32::from_bits((*v * self.scale).to_bits() & self.keep_mask(h, k));
            }
        }
    }

    /// All ones where entry `k` (0–3) of a group with bits `h` is kept, else 0: integer
    /// arithmetic, no branch (the decisions are random, a branch would mispredict half).
    #[inline(always)]
    fn keep_mask(&self, h: u64, k: usize) -> u32 {
        let bits = ((h >> (16 * k)) & 0xffff) as i32;
        ((bits - self.threshold as i32) >> 31) as u32
    }

    /// The scale of kept entries, `1/(1 − p)`.
    pub(crate) fn scale(&self) -> f32 {
        self.scale
    }
}

/// 64 random bits for group `g` of a row whose draws start from `base`: wyrand's output
/// function on the `g`-th step of its counter (one 64×64→128-bit multiply).
fn group_bits(base: u64, g: usize) -> u64 {
    let s = base.wrapping_add((g as u64).wrapping_mul(0xa076_1d64_78bd_642f));
    let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
    ((t >> 64) as u64) ^ (t as u64)
}

impl Layer for Dropout {
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

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn set_step_key(&mut self, key: u64) {
        self.key = key;
    }

    fn forward(&mut self, x: &Matrix, y: &mut Matrix) -> Result<()> {
        let (batch, ld) = batch_of(&self.name, self.dims)?;
        let f = self.shape.features();
        check_matrix(&self.name, "input", x, f, batch, ld)?;
        check_matrix(&self.name, "output", y, f, batch, ld)?;
        if self.training && self.p > 0.0 {
            self.apply(x.as_slice(), y.as_mut_slice(), batch, ld);
        } else {
            y.as_mut_slice().copy_from_slice(x.as_slice());
        }
        Ok(())
    }

    fn backward(
        &mut self,
        _x: &Matrix,
        _y: &Matrix,
        dy: &mut Matrix,
        dx: Option<&mut Matrix>,
        _mode: WeightGradMode,
    ) -> Result<()> {
        let (batch, ld) = batch_of(&self.name, self.dims)?;
        let f = self.shape.features();
        check_matrix(&self.name, "output gradient", dy, f, batch, ld)?;
        let Some(dx) = dx else { return Ok(()) };
        check_matrix(&self.name, "input gradient", dx, f, batch, ld)?;
        if self.training && self.p > 0.0 {
            self.apply(dy.as_slice(), dx.as_mut_slice(), batch, ld);
        } else {
            dx.as_mut_slice().copy_from_slice(dy.as_slice());
        }
        Ok(())
    }
}
