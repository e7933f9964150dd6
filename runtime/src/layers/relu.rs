//! [`Relu`]: `y = max(x, 0)` as a layer of its own (linear and conv layers fuse it).

use super::{batch_of, check_matrix, Layer, Shape};
use crate::error::Result;
use crate::tensor::Matrix;
use crate::weights::WeightGradMode;

/// Elementwise `max(x, 0)`; the gradient passes where the output is positive.
#[derive(Debug)]
pub struct Relu {
    name: String,
    shape: Shape,
    dims: Option<(usize, usize)>,
}

impl Relu {
    /// A ReLU on samples of `shape`.
    pub fn new(name: &str, shape: Shape) -> Self {
        Relu {
            name: name.to_string(),
            shape,
            dims: None,
        }
    }
}

impl Layer for Relu {
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

    fn forward(&mut self, x: &Matrix, y: &mut Matrix) -> Result<()> {
        let (batch, ld) = batch_of(&self.name, self.dims)?;
        let n = self.shape.features();
        check_matrix(&self.name, "input", x, n, batch, ld)?;
        check_matrix(&self.name, "output", y, n, batch, ld)?;
        for (xr, yr) in x
            .as_slice()
            .chunks_exact(ld)
            .zip(y.as_mut_slice().chunks_exact_mut(ld))
        {
            for (o, &i) in yr[..batch].iter_mut().zip(&xr[..batch]) {
                *o = i.max(0.0);
            }
            yr[batch..].fill(0.0);
        }
        Ok(())
    }

    fn backward(
        &mut self,
        _x: &Matrix,
        y: &Matrix,
        dy: &mut Matrix,
        dx: Option<&mut Matrix>,
        _mode: WeightGradMode,
    ) -> Result<()> {
        let (batch, ld) = batch_of(&self.name, self.dims)?;
        let n = self.shape.features();
        check_matrix(&self.name, "output", y, n, batch, ld)?;
        check_matrix(&self.name, "output gradient", dy, n, batch, ld)?;
        let Some(dx) = dx else { return Ok(()) };
        check_matrix(&self.name, "input gradient", dx, n, batch, ld)?;
        for ((yr, dyr), dxr) in y
            .as_slice()
            .chunks_exact(ld)
            .zip(dy.as_slice().chunks_exact(ld))
            .zip(dx.as_mut_slice().chunks_exact_mut(ld))
        {
            for ((d, &g), &o) in dxr[..batch].iter_mut().zip(&dyr[..batch]).zip(&yr[..batch]) {
                *d = if o > 0.0 { g } else { 0.0 };
            }
            dxr[batch..].fill(0.0);
        }
        Ok(())
    }
}
