//! [`Dropout`]: in training, zeroes each activation with probability `p` and scales the rest
//! by `1/(1 − p)` (PyTorch's inverted dropout); in evaluation, the identity.

use super::{batch_of, check_matrix, Layer, Shape};
use crate::error::{Result, RuntimeError};
use crate::tensor::Matrix;
use crate::weights::WeightGradMode;

/// Inverted dropout. Which entries drop depends only on the step's key (see
/// [`Layer::set_step_key`]), the layer and the entry, so nothing is stored between the
/// forward and the backward pass, and a resumed run drops the same entries.
#[derive(Debug)]
pub struct Dropout {
    name: String,
    shape: Shape,
    p: f32,
    /// A keep decision is `hash < threshold` (of 2^32).
    threshold: u64,
    salt: u64,
    key: u64,
    training: bool,
    dims: Option<(usize, usize)>,
}

impl Dropout {
    /// Dropout with probability `p` in `[0, 1)`.
    pub fn new(name: &str, shape: Shape, p: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(RuntimeError::Config(format!(
                "layer {name}: dropout probability {p} is not in [0, 1)"
            )));
        }
        // The layer's name salts its draws: two dropout layers differ.
        let salt = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Ok(Dropout {
            name: name.to_string(),
            shape,
            p,
            threshold: ((1.0 - f64::from(p)) * 4_294_967_296.0) as u64,
            salt,
            key: 0,
            training: true,
            dims: None,
        })
    }

    /// Applies the mask and scale of this step to `src` into `dst` (rows `ld` apart, `n`
    /// valid columns; the rest zero).
    fn apply(&self, src: &[f32], dst: &mut [f32], n: usize, ld: usize) {
        let scale = 1.0 / (1.0 - self.p);
        let base = self.key ^ self.salt;
        for (r, (sr, dr)) in src
            .chunks_exact(ld)
            .zip(dst.chunks_exact_mut(ld))
            .enumerate()
        {
            let row = mix(base ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for (b, (o, &i)) in dr[..n].iter_mut().zip(&sr[..n]).enumerate() {
                let keep = (mix(row ^ b as u64) >> 32) < self.threshold;
                *o = if keep { i * scale } else { 0.0 };
            }
            dr[n..].fill(0.0);
        }
    }
}

/// A 64-bit mix (SplitMix64's finaliser).
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
