//! [`GlobalAvgPool`]: the mean of each channel's plane, `[C·H·W] → [C]` per sample.

use super::{batch_of, check_matrix, Layer, Shape};
use crate::error::Result;
use crate::tensor::Matrix;
use crate::weights::WeightGradMode;

/// Global average pooling (WRN's `avg_pool2d` over the whole 8×8 map).
#[derive(Debug)]
pub struct GlobalAvgPool {
    name: String,
    input: Shape,
    dims: Option<(usize, usize)>,
}

impl GlobalAvgPool {
    /// Pools each channel of `input` to one value.
    pub fn new(name: &str, input: Shape) -> Self {
        GlobalAvgPool {
            name: name.to_string(),
            input,
            dims: None,
        }
    }
}

impl Layer for GlobalAvgPool {
    fn name(&self) -> &str {
        &self.name
    }

    fn input_shape(&self) -> Shape {
        self.input
    }

    fn output_shape(&self) -> Shape {
        Shape::flat(self.input.channels)
    }

    fn set_batch(&mut self, batch: usize, ld: usize) -> Result<()> {
        self.dims = Some((batch, ld));
        Ok(())
    }

    fn forward(&mut self, x: &Matrix, y: &mut Matrix) -> Result<()> {
        let (batch, ld) = batch_of(&self.name, self.dims)?;
        let plane = self.input.height * self.input.width;
        check_matrix(&self.name, "input", x, self.input.features(), batch, ld)?;
        check_matrix(&self.name, "output", y, self.input.channels, batch, ld)?;
        let inv = 1.0 / plane as f32;
        for (xs, yr) in x
            .as_slice()
            .chunks_exact(plane * ld)
            .zip(y.as_mut_slice().chunks_exact_mut(ld))
        {
            yr.fill(0.0);
            for xr in xs.chunks_exact(ld) {
                for (o, &i) in yr[..batch].iter_mut().zip(&xr[..batch]) {
                    *o += i;
                }
            }
            for o in &mut yr[..batch] {
                *o *= inv;
            }
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
        let plane = self.input.height * self.input.width;
        check_matrix(
            &self.name,
            "output gradient",
            dy,
            self.input.channels,
            batch,
            ld,
        )?;
        let Some(dx) = dx else { return Ok(()) };
        check_matrix(
            &self.name,
            "input gradient",
            dx,
            self.input.features(),
            batch,
            ld,
        )?;
        let inv = 1.0 / plane as f32;
        for (dr, xs) in dy
            .as_slice()
            .chunks_exact(ld)
            .zip(dx.as_mut_slice().chunks_exact_mut(plane * ld))
        {
            for xr in xs.chunks_exact_mut(ld) {
                for (o, &g) in xr[..batch].iter_mut().zip(&dr[..batch]) {
                    *o = g * inv;
                }
                xr[batch..].fill(0.0);
            }
        }
        Ok(())
    }
}
