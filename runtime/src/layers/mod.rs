//! Layers on feature-major activations, each with a hand-written backward pass.
//!
//! - [`Linear`]: sparse `y = W·x + b` (optionally fused with ReLU), `W` masked;
//! - [`Conv2d`]: a direct sparse convolution (one `spmm` on the weights unrolled over the
//!   output positions), the mask over `[out, in·kh·kw]`;
//! - [`Relu`], [`MaxPool2d`]: elementwise and pooling layers;
//! - [`BatchNorm`] (dense parameters and running statistics, ReLU fused), [`Dropout`] and
//!   [`GlobalAvgPool`], for the conv nets;
//! - the loss, log-softmax + negative log-likelihood, is in [`crate::loss`].
//!
//! Every layer runs on a fixed batch `B` with row stride `ld` (set by
//! [`Layer::set_batch`]); columns `B..ld` of what a layer writes are zero (or, for sparse
//! kernels' outputs, unspecified), and no layer lets them influence columns `0..B` or a
//! gradient.

mod batch_norm;
mod conv;
mod dropout;
mod global_pool;
mod linear;
mod params;
mod pool;
mod relu;

pub use batch_norm::BatchNorm;
pub use conv::Conv2d;
pub use dropout::Dropout;
pub use global_pool::GlobalAvgPool;
pub use linear::Linear;
pub use params::{DenseParam, StatBuffer};
pub use pool::MaxPool2d;
pub use relu::Relu;

pub use crate::tensor::Shape;

use crate::error::{Result, RuntimeError};
use crate::tensor::Matrix;
use crate::weights::{SparseWeights, WeightGradMode};

/// One layer of a [`crate::model::Model`].
pub trait Layer {
    /// The layer's name (`fc1`, `conv2`, `relu3`, …).
    fn name(&self) -> &str;

    /// The shape of one input sample.
    fn input_shape(&self) -> Shape;

    /// The shape of one output sample.
    fn output_shape(&self) -> Shape;

    /// Fixes the batch `B` and row stride `ld`, allocating internal buffers.
    fn set_batch(&mut self, batch: usize, ld: usize) -> Result<()>;

    /// Whether the backward pass must compute the input gradient (false for a first layer).
    fn set_needs_input_grad(&mut self, _needs: bool) {}

    /// `y = f(x)`, on `[in × ld]` and `[out × ld]` matrices.
    fn forward(&mut self, x: &Matrix, y: &mut Matrix) -> Result<()>;

    /// Given `x`, `y = f(x)` and `dy = ∂L/∂y` (which it may overwrite), computes the gradients
    /// of the layer's parameters (by `mode`) and, if `dx` is given, `dx = ∂L/∂x`.
    fn backward(
        &mut self,
        x: &Matrix,
        y: &Matrix,
        dy: &mut Matrix,
        dx: Option<&mut Matrix>,
        mode: WeightGradMode,
    ) -> Result<()>;

    /// The masked weights, for layers that have them.
    fn weights(&self) -> Option<&SparseWeights> {
        None
    }

    /// The masked weights, mutable.
    fn weights_mut(&mut self) -> Option<&mut SparseWeights> {
        None
    }

    /// The number of valid samples (columns) of the next passes, `≤ B`; layers that mix
    /// samples (batch normalisation) use only these. `B` until set.
    fn set_valid(&mut self, _n: usize) {}

    /// Training (batch statistics, dropout) or evaluation mode; training until set.
    fn set_training(&mut self, _training: bool) {}

    /// The key of the next training step's random draws (dropout), the same on every rank
    /// and after a resume.
    fn set_step_key(&mut self, _key: u64) {}

    /// The most threads the layer's own loops may use (the kernels have their plan's).
    fn set_threads(&mut self, _threads: usize) {}

    /// Dense trainable parameters (batch normalisation's scale and shift).
    fn params(&self) -> &[DenseParam] {
        &[]
    }

    /// Dense trainable parameters, mutable.
    fn params_mut(&mut self) -> &mut [DenseParam] {
        &mut []
    }

    /// Saved statistics that are not trained (batch normalisation's running mean and
    /// variance).
    fn stats(&self) -> &[StatBuffer] {
        &[]
    }

    /// Saved statistics, mutable.
    fn stats_mut(&mut self) -> &mut [StatBuffer] {
        &mut []
    }

    /// Absorbs a following ReLU into the forward kernel's epilogue; returns whether it did.
    fn fuse_relu(&mut self) -> bool {
        false
    }

    /// Its input is the output of a ReLU: a layer that reads its input in the backward pass
    /// anyway may apply the ReLU's mask to the gradient it passes back (so the layer before
    /// need not). Returns whether it does.
    fn mask_relu_input_grad(&mut self) -> bool {
        false
    }
}

/// Checks that a matrix has `rows` rows, batch `batch` and stride `ld`.
pub(crate) fn check_matrix(
    layer: &str,
    what: &str,
    m: &Matrix,
    rows: usize,
    batch: usize,
    ld: usize,
) -> Result<()> {
    if m.rows() != rows || m.batch() != batch || m.ld() != ld {
        return Err(RuntimeError::Shape(format!(
            "layer {layer}: {what} is {}x{} (ld {}), expected {rows}x{batch} (ld {ld})",
            m.rows(),
            m.batch(),
            m.ld()
        )));
    }
    Ok(())
}

/// The batch and `ld` a layer was set up with, or an error naming the layer.
pub(crate) fn batch_of(layer: &str, dims: Option<(usize, usize)>) -> Result<(usize, usize)> {
    dims.ok_or_else(|| RuntimeError::Config(format!("layer {layer}: batch not set")))
}
