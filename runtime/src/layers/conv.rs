//! [`Conv2d`]: a direct sparse convolution: the weights unrolled over the output positions
//! into one sparse matrix, so forward and backward data are one `spmm` and one `spmm_t`;
//! im2col only for the dense weight gradient.

use rand::Rng;
use sparse_ir::Launch;

use super::{batch_of, check_matrix, Layer, Shape};
use crate::error::{Result, RuntimeError};
use crate::tensor::Matrix;
use crate::weights::{ConvGeometry, SparseWeights, WeightGradMode};

/// A 2-D convolution with a masked `[out, in, k, k]` weight, flattened to the
/// `[out × in·k·k]` mask the masking sees.
///
/// The kernels run a direct sparse convolution: the weights unrolled over the `P = OH·OW`
/// output positions into one sparse `[out·P × C·H·W]` matrix (built again whenever the mask
/// changes), so `Y = U·X (+ bias)(ReLU)` is a single `spmm` on the feature-major input and
/// output, `dX = Uᵀ·dY` a single `spmm_t`, and the weight gradient of active entries the
/// `sddmm` on `U` summed over positions. Only the dense gradient of every entry (needed in the
/// steps before a mask update) unfolds the input (im2col) into `Xc = [C·k·k × P·ld]`, whose
/// column `p·ld + b` holds the receptive field of position `p` of sample `b`, and runs
/// `dense_grad` on `(dY, Xc)` with `P·ld` columns: `dY` `[out·P × ld]` is `[out × P·ld]` in
/// memory. Padding columns of `Xc` and `dY` are kept at zero there so they never reach a
/// gradient.
#[derive(Debug)]
pub struct Conv2d {
    w: SparseWeights,
    input: Shape,
    output: Shape,
    k: usize,
    stride: usize,
    padding: usize,
    dims: Option<(usize, usize)>,
    xcol: Option<Matrix>,
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
            xcol: None,
        })
    }

    /// Kaiming-uniform initialisation (PyTorch's default for `Conv2d`, fan-in `in·k·k`).
    pub fn init<R: Rng>(&mut self, rng: &mut R) -> Result<()> {
        self.w.init_kaiming_uniform(rng)
    }

    fn positions(&self) -> usize {
        self.output.height * self.output.width
    }

    /// Calls `f(xcol_row, position, input_row)` for every in-bounds pair of the unfolding.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (h, w) = (self.input.height, self.input.width);
        let (oh_n, ow_n) = (self.output.height, self.output.width);
        let (k, s, pad) = (self.k, self.stride, self.padding);
        for c in 0..self.input.channels {
            for ki in 0..k {
                for kj in 0..k {
                    let q = (c * k + ki) * k + kj;
                    for oh in 0..oh_n {
                        let ih = (oh * s + ki) as isize - pad as isize;
                        if ih < 0 || ih >= h as isize {
                            continue;
                        }
                        for ow in 0..ow_n {
                            let iw = (ow * s + kj) as isize - pad as isize;
                            if iw < 0 || iw >= w as isize {
                                continue;
                            }
                            let row = (c * h + ih as usize) * w + iw as usize;
                            f(q, oh * ow_n + ow, row);
                        }
                    }
                }
            }
        }
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
        let width = self.positions() * ld;
        self.dims = Some((batch, ld));
        self.xcol = Some(Matrix::with_ld(self.w.cols(), width, width));
        self.w.set_launch(Launch::new(batch, ld));
        let geometry = ConvGeometry {
            channels: self.input.channels,
            height: self.input.height,
            width: self.input.width,
            k: self.k,
            stride: self.stride,
            padding: self.padding,
            out_h: self.output.height,
            out_w: self.output.width,
        };
        self.w.set_unroll(geometry, Launch::new(width, width))
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
        let mut xcol = None;
        if mode == WeightGradMode::Dense {
            // im2col, for the dense gradient only. Out-of-bounds taps (zero padding) and
            // padding columns stay zero: they are never written after allocation.
            let mut xc = self.xcol.take().expect("set_batch allocates xcol");
            let width = xc.ld();
            {
                let xcs = xc.as_mut_slice();
                let xs = x.as_slice();
                self.for_each_tap(|q, p, row| {
                    let dst = q * width + p * ld;
                    xcs[dst..dst + batch].copy_from_slice(&xs[row * ld..row * ld + batch]);
                });
            }
            dy.zero_columns_from(batch);
            xcol = Some(xc);
        }
        let result = self.w.backward(
            x.as_slice(),
            xcol.as_ref().map(Matrix::as_slice),
            y.as_slice(),
            dy.as_mut_slice(),
            dx.map(|m| m.as_mut_slice()),
            mode,
        );
        if let Some(xc) = xcol {
            self.xcol = Some(xc);
        }
        result
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
