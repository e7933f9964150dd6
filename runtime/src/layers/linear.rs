//! [`Linear`]: a sparse fully connected layer.

use rand::Rng;
use sparse_ir::Launch;

use super::{batch_of, check_matrix, Layer, Shape};
use crate::error::Result;
use crate::tensor::Matrix;
use crate::weights::{SparseWeights, WeightGradMode};

/// `y = W·x + b` with a masked `[out × in]` weight (ReLU optionally fused): forward `spmm`
/// with a bias(+ReLU) epilogue, backward `spmm_t` for the input gradient and `sddmm` (or the
/// dense gradient) for the weights.
#[derive(Debug)]
pub struct Linear {
    w: SparseWeights,
    input: Shape,
    dims: Option<(usize, usize)>,
}

impl Linear {
    /// A fully dense, zero-initialised layer `input.features() → out`.
    pub fn new(name: &str, input: Shape, out: usize) -> Result<Self> {
        let n_in = input.features();
        Ok(Linear {
            w: SparseWeights::new(name, vec![out, n_in], out, n_in)?,
            input,
            dims: None,
        })
    }

    /// Kaiming-uniform initialisation (PyTorch's default for `Linear`).
    pub fn init<R: Rng>(&mut self, rng: &mut R) -> Result<()> {
        self.w.init_kaiming_uniform(rng)
    }
}

impl Layer for Linear {
    fn name(&self) -> &str {
        self.w.name()
    }

    fn input_shape(&self) -> Shape {
        self.input
    }

    fn output_shape(&self) -> Shape {
        Shape::flat(self.w.rows())
    }

    fn set_batch(&mut self, batch: usize, ld: usize) -> Result<()> {
        self.dims = Some((batch, ld));
        self.w.set_launch(Launch::new(batch, ld));
        Ok(())
    }

    fn set_needs_input_grad(&mut self, needs: bool) {
        self.w.set_needs_dx(needs);
    }

    fn forward(&mut self, x: &Matrix, y: &mut Matrix) -> Result<()> {
        let (batch, ld) = batch_of(self.name(), self.dims)?;
        check_matrix(self.name(), "input", x, self.w.cols(), batch, ld)?;
        check_matrix(self.name(), "output", y, self.w.rows(), batch, ld)?;
        self.w.forward(x.as_slice(), y.as_mut_slice())
    }

    fn backward(
        &mut self,
        x: &Matrix,
        y: &Matrix,
        dy: &mut Matrix,
        dx: Option<&mut Matrix>,
        mode: WeightGradMode,
    ) -> Result<()> {
        let (batch, ld) = batch_of(self.name(), self.dims)?;
        check_matrix(self.name(), "input", x, self.w.cols(), batch, ld)?;
        check_matrix(self.name(), "output", y, self.w.rows(), batch, ld)?;
        check_matrix(self.name(), "output gradient", dy, self.w.rows(), batch, ld)?;
        if let Some(dx) = &dx {
            check_matrix(self.name(), "input gradient", dx, self.w.cols(), batch, ld)?;
        }
        self.w.backward(
            x.as_slice(),
            y.as_slice(),
            dy.as_mut_slice(),
            dx.map(|m| m.as_mut_slice()),
            mode,
        )
    }

    fn weights(&self) -> Option<&SparseWeights> {
        Some(&self.w)
    }

    fn weights_mut(&mut self) -> Option<&mut SparseWeights> {
        Some(&mut self.w)
    }

    fn fuse_relu(&mut self) -> bool {
        if self.w.relu() {
            return false;
        }
        self.w.set_relu(true);
        true
    }
}
