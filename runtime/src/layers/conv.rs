//! [`Conv2d`]: a direct sparse convolution, run by the convolution ops of the kernel
//! compiler on the layer's `[out × C·k²]` weight pattern.

use rand::Rng;
use sparse_ir::Launch;

use super::{batch_of, check_matrix, Layer, Shape};
use crate::error::{Result, RuntimeError};
use crate::tensor::Matrix;
use crate::weights::{SparseWeights, WeightGradMode};

/// A 2-D convolution with a masked `[out, in, k, k]` weight, flattened to the
/// `[out × in·k·k]` mask the masking sees.
///
/// The kernels are the convolution ops on that pattern (never unrolled over positions, so
/// the kernels' memory grows with the nonzeros, not with nonzeros × positions): `conv` (with
/// the bias and, fused, the following ReLU) forward, `conv_t` for the input gradient,
/// `conv_grad` for the gradient of the active weights and `conv_dense_grad` for every
/// weight's (the steps before a mask update). Activations are feature-major: channel `c` is
/// the rows `c·H·W ..` of a `[C·H·W × ld]` matrix.
#[derive(Debug)]
pub struct Conv2d {
    w: SparseWeights,
    input: Shape,
    output: Shape,
    k: usize,
    stride: usize,
    padding: usize,
    dims: Option<(usize, usize)>,
}

impl Conv2d {
    /// A fully dense, zero-initialised convolution of `input` to `out` channels with a
    /// `k × k` kernel, stride and zero padding as given.
    pub fn new(
        name: &str,
        input: Shape,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (h, w) = (input.height + 2 * padding, input.width + 2 * padding);
        if k == 0 || stride == 0 || h < k || w < k {
            return Err(RuntimeError::Shape(format!(
                "layer {name}: a {k}x{k} kernel with stride {stride} and padding {padding} does not fit a {input} input"
            )));
        }
        let output = Shape::image(out, (h - k) / stride + 1, (w - k) / stride + 1);
        let cols = input.channels * k * k;
        Ok(Conv2d {
            w: SparseWeights::new(name, vec![out, input.channels, k, k], out, cols)?,
            input,
            output,
            k,
            stride,
            padding,
            dims: None,
        })
    }

    /// Kaiming-uniform initialisation (PyTorch's default for `Conv2d`, fan-in `in·k·k`).
    pub fn init<R: Rng>(&mut self, rng: &mut R) -> Result<()> {
        let bias = self.w.has_bias();
        self.w.init_kaiming_uniform(rng)?;
        if !bias {
            self.w.remove_bias();
        }
        Ok(())
    }

    /// Without a bias (PyTorch's `bias=False`).
    pub fn without_bias(mut self) -> Self {
        self.w.remove_bias();
        self
    }
}

impl Layer for Conv2d {
    fn name(&self) -> &str {
        self.w.name()
    }

    fn input_shape(&self) -> Shape {
        self.input
    }

    fn output_shape(&self) -> Shape {
        self.output
    }

    fn set_batch(&mut self, batch: usize, ld: usize) -> Result<()> {
        self.dims = Some((batch, ld));
        self.w.set_launch(Launch::new(batch, ld));
        self.w.set_conv(sparse_ir::ConvGeometry {
            in_channels: self.input.channels,
            height: self.input.height,
            width: self.input.width,
            kernel: self.k,
            stride: self.stride,
            padding: self.padding,
        });
        Ok(())
    }

    fn set_needs_input_grad(&mut self, needs: bool) {
        self.w.set_needs_dx(needs);
    }

    fn forward(&mut self, x: &Matrix, y: &mut Matrix) -> Result<()> {
        let (batch, ld) = batch_of(self.name(), self.dims)?;
        check_matrix(self.name(), "input", x, self.input.features(), batch, ld)?;
        check_matrix(self.name(), "output", y, self.output.features(), batch, ld)?;
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
        let n_out = self.output.features();
        check_matrix(self.name(), "input", x, self.input.features(), batch, ld)?;
        check_matrix(self.name(), "output", y, n_out, batch, ld)?;
        check_matrix(self.name(), "output gradient", dy, n_out, batch, ld)?;
        if let Some(dx) = &dx {
            check_matrix(
                self.name(),
                "input gradient",
                dx,
                self.input.features(),
                batch,
                ld,
            )?;
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
