//! [`Model`]: a sequence of layers with preallocated activations, and [`ModelBuilder`], the
//! small API to describe one (LeNet-300-100 and LeNet-5 are built with it in
//! [`crate::models`]).
//!
//! ```
//! use runtime::{ModelBuilder, Shape, Executor, ExecOptions, WeightGradMode, Sgd, SgdConfig};
//! use rand::SeedableRng;
//!
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
//! let mut model = ModelBuilder::new("mlp", Shape::flat(4))
//!     .linear("fc1", 8).relu()
//!     .linear("fc2", 3)
//!     .build(2, &mut rng)?;                  // batch 2, Kaiming-uniform init, fully dense
//! let exec = Executor::new(ExecOptions::default())?;
//! model.compile(&exec)?;                     // kernels for the current masks
//! model.input_mut().set(0, 0, 1.0);          // feature-major input [4 × ld]
//! model.labels_mut().copy_from_slice(&[2, 0]);
//! let loss = model.forward_backward(2, WeightGradMode::Active)?;
//! Sgd::new(SgdConfig::default()).step(&mut model, 0.1);
//! assert!(loss.is_finite());
//! # Ok::<(), runtime::RuntimeError>(())
//! ```

use std::time::Duration;

use rand::Rng;
use sparse_ir::limits::{bytes_of, MemoryBudget};

use crate::error::{Result, RuntimeError};
use crate::exec::Executor;
use crate::layers::{Conv2d, Layer, Linear, MaxPool2d, Relu, Shape};
use crate::loss::LogSoftmaxNll;
use crate::tensor::{padded_ld, Matrix};
use crate::weights::{SgdConfig, SparseWeights, WeightGradMode};

/// What a compilation pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompileReport {
    /// Layers whose kernels were compiled, with the time each took.
    pub layers: Vec<(String, Duration)>,
    /// Total time.
    pub total: Duration,
}

/// A feed-forward network ending in log-softmax + NLL, with every buffer preallocated for
/// one batch size: a training step allocates nothing.
pub struct Model {
    name: String,
    input_shape: Shape,
    batch: usize,
    ld: usize,
    input: Matrix,
    labels: Vec<u32>,
    layers: Vec<Box<dyn Layer>>,
    acts: Vec<Matrix>,
    grads: Vec<Matrix>,
    loss: LogSoftmaxNll,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.layers.iter().map(|l| l.name()).collect();
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("input", &self.input_shape)
            .field("batch", &self.batch)
            .field("layers", &names)
            .finish()
    }
}

impl Model {
    /// Builds a model from layers (each one's input shape must be the previous one's
    /// output), for batch `batch`. The last layer's outputs are the class logits.
    pub fn from_layers(name: &str, mut layers: Vec<Box<dyn Layer>>, batch: usize) -> Result<Self> {
        if layers.is_empty() || batch == 0 {
            return Err(RuntimeError::Config(format!(
                "model {name}: needs at least one layer and a batch of at least 1"
            )));
        }
        for pair in layers.windows(2) {
            if pair[0].output_shape().features() != pair[1].input_shape().features() {
                return Err(RuntimeError::Shape(format!(
                    "model {name}: layer {} gives {} features, layer {} takes {}",
                    pair[0].name(),
                    pair[0].output_shape(),
                    pair[1].name(),
                    pair[1].input_shape()
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for l in &layers {
            if !seen.insert(l.name().to_string()) {
                return Err(RuntimeError::Config(format!(
                    "model {name}: two layers are named {}",
                    l.name()
                )));
            }
        }
        check_batch_memory(name, &layers, batch, &MemoryBudget::machine())?;
        let ld = padded_ld(batch);
        for (i, layer) in layers.iter_mut().enumerate() {
            layer.set_needs_input_grad(i > 0);
            layer.set_batch(batch, ld)?;
        }
        let input_shape = layers[0].input_shape();
        let acts: Vec<Matrix> = layers
            .iter()
            .map(|l| Matrix::zeros(l.output_shape().features(), batch))
            .collect();
        let grads = acts.clone();
        let classes = layers.last().expect("non-empty").output_shape().features();
        Ok(Model {
            name: name.to_string(),
            input_shape,
            batch,
            ld,
            input: Matrix::zeros(input_shape.features(), batch),
            labels: vec![0; batch],
            layers,
            acts,
            grads,
            loss: LogSoftmaxNll::new(classes, ld),
        })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shape of one input sample.
    pub fn input_shape(&self) -> Shape {
        self.input_shape
    }

    /// Number of classes (outputs of the last layer).
    pub fn classes(&self) -> usize {
        self.acts.last().map_or(0, Matrix::rows)
    }

    /// The batch every buffer is sized for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The row stride of every activation.
    pub fn ld(&self) -> usize {
        self.ld
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }

    /// The input buffer `[features × ld]`: write a batch here before a pass.
    pub fn input_mut(&mut self) -> &mut Matrix {
        &mut self.input
    }

    /// The input buffer.
    pub fn input(&self) -> &Matrix {
        &self.input
    }

    /// The label buffer (`batch` entries): write the batch's labels here.
    pub fn labels_mut(&mut self) -> &mut [u32] {
        &mut self.labels
    }

    /// The input buffer and the label buffer together (for data loaders).
    pub fn batch_buffers_mut(&mut self) -> (&mut Matrix, &mut [u32]) {
        (&mut self.input, &mut self.labels)
    }

    /// The logits of the last forward pass, `[classes × ld]`.
    pub fn logits(&self) -> &Matrix {
        self.acts.last().expect("non-empty")
    }

    /// The output of layer `i` from the last forward pass.
    pub fn activation(&self, i: usize) -> &Matrix {
        &self.acts[i]
    }

    /// The layers with masked weights, in order.
    pub fn sparse_layers(&self) -> impl Iterator<Item = &SparseWeights> {
        self.layers.iter().filter_map(|l| l.weights())
    }

    /// The layers with masked weights, mutable.
    pub fn sparse_layers_mut(&mut self) -> impl Iterator<Item = &mut SparseWeights> {
        self.layers.iter_mut().filter_map(|l| l.weights_mut())
    }

    /// The masked layer named `name`.
    pub fn sparse_layer_mut(&mut self, name: &str) -> Option<&mut SparseWeights> {
        self.sparse_layers_mut().find(|w| w.name() == name)
    }

    /// Total active weights.
    pub fn nnz(&self) -> usize {
        self.sparse_layers().map(SparseWeights::nnz).sum()
    }

    /// Total maskable weights.
    pub fn maskable(&self) -> usize {
        self.sparse_layers().map(|w| w.rows() * w.cols()).sum()
    }

    /// Compiles the kernels of every layer whose pattern changed (or that has none yet).
    pub fn compile(&mut self, exec: &Executor) -> Result<CompileReport> {
        let mut report = CompileReport::default();
        for w in self.sparse_layers_mut() {
            if w.needs_compile() {
                let t = w.compile(exec)?;
                tracing::debug!(layer = w.name(), ms = t.as_secs_f64() * 1e3, "compiled");
                report.layers.push((w.name().to_string(), t));
                report.total += t;
            }
        }
        Ok(report)
    }

    /// Runs the forward pass on the input buffer; returns the logits.
    pub fn forward(&mut self) -> Result<&Matrix> {
        for i in 0..self.layers.len() {
            let (before, after) = self.acts.split_at_mut(i);
            let x = if i == 0 { &self.input } else { &before[i - 1] };
            self.layers[i].forward(x, &mut after[0])?;
        }
        Ok(self.logits())
    }

    /// Forward pass, loss on the first `n` columns (labels from the label buffer), and the
    /// backward pass computing every parameter's gradient (weights by `mode`). Returns the
    /// mean loss.
    pub fn forward_backward(&mut self, n: usize, mode: WeightGradMode) -> Result<f64> {
        self.forward()?;
        let last = self.layers.len() - 1;
        let loss =
            self.loss
                .loss_and_grad(&self.acts[last], &self.labels, n, &mut self.grads[last])?;
        self.backward(mode)?;
        Ok(loss)
    }

    /// The backward pass from the gradient already in the last layer's gradient buffer
    /// (see [`last_grad_mut`](Self::last_grad_mut)), for users with their own loss.
    pub fn backward(&mut self, mode: WeightGradMode) -> Result<()> {
        for i in (0..self.layers.len()).rev() {
            let (gb, ga) = self.grads.split_at_mut(i);
            let dx = if i == 0 { None } else { Some(&mut gb[i - 1]) };
            let x = if i == 0 {
                &self.input
            } else {
                &self.acts[i - 1]
            };
            self.layers[i].backward(x, &self.acts[i], &mut ga[0], dx, mode)?;
        }
        Ok(())
    }

    /// The gradient buffer of the logits, `[classes × ld]`.
    pub fn last_grad_mut(&mut self) -> &mut Matrix {
        self.grads.last_mut().expect("non-empty")
    }

    /// Forward pass and, over the first `n` columns, the summed loss and the number of
    /// correct predictions.
    pub fn evaluate_batch(&mut self, n: usize) -> Result<(f64, usize)> {
        self.forward()?;
        self.score_logits(n)
    }

    /// The label buffer.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    #[cfg(feature = "opencl")]
    /// The logits buffer, mutable (a device writes its logits here to be scored).
    pub(crate) fn logits_mut(&mut self) -> &mut Matrix {
        self.acts.last_mut().expect("non-empty")
    }

    #[cfg(feature = "opencl")]
    /// Checks the first `n` labels against the classes and `n` against the batch (the
    /// loss's own checks, for a loss computed elsewhere).
    pub(crate) fn check_labels(&self, n: usize) -> Result<()> {
        self.loss.check(self.logits(), &self.labels, n)
    }

    /// Over the first `n` columns of the logits buffer: the summed loss and the number of
    /// correct predictions.
    pub(crate) fn score_logits(&mut self, n: usize) -> Result<(f64, usize)> {
        let last = self.layers.len() - 1;
        let loss = self.loss.loss(&self.acts[last], &self.labels, n)?;
        let correct = self.loss.correct(&self.acts[last], &self.labels, n);
        Ok((loss * n as f64, correct))
    }

    /// Times every layer's forward and backward pass (median over `reps` passes, in
    /// microseconds) on the current input, for profiling: `(name, forward, backward)`.
    pub fn profile_layers(
        &mut self,
        reps: usize,
        mode: WeightGradMode,
    ) -> Result<Vec<(String, f64, f64)>> {
        let reps = reps.max(1);
        let n = self.layers.len();
        let (mut fwd, mut bwd) = (vec![Vec::new(); n], vec![Vec::new(); n]);
        for _ in 0..reps {
            for i in 0..n {
                let t = std::time::Instant::now();
                let (before, after) = self.acts.split_at_mut(i);
                let x = if i == 0 { &self.input } else { &before[i - 1] };
                self.layers[i].forward(x, &mut after[0])?;
                fwd[i].push(t.elapsed().as_secs_f64() * 1e6);
            }
            let last = n - 1;
            self.loss.loss_and_grad(
                &self.acts[last],
                &self.labels,
                self.batch,
                &mut self.grads[last],
            )?;
            for i in (0..n).rev() {
                let t = std::time::Instant::now();
                let (gb, ga) = self.grads.split_at_mut(i);
                let dx = if i == 0 { None } else { Some(&mut gb[i - 1]) };
                let x = if i == 0 {
                    &self.input
                } else {
                    &self.acts[i - 1]
                };
                self.layers[i].backward(x, &self.acts[i], &mut ga[0], dx, mode)?;
                bwd[i].push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Ok((0..n)
            .map(|i| {
                (
                    self.layers[i].name().to_string(),
                    median(&mut fwd[i]),
                    median(&mut bwd[i]),
                )
            })
            .collect())
    }

    /// Writes every layer's active values and momentum into its dense arrays (see
    /// [`SparseWeights::sync_dense`]).
    pub fn sync_dense(&mut self, sgd: &SgdConfig) {
        for w in self.sparse_layers_mut() {
            w.sync_dense(sgd);
        }
    }
}

/// SGD with momentum and weight decay over every parameter of a model.
#[derive(Debug, Clone, Copy)]
pub struct Sgd {
    /// The hyper-parameters.
    pub config: SgdConfig,
}

impl Sgd {
    /// An optimiser with these hyper-parameters.
    pub fn new(config: SgdConfig) -> Self {
        Sgd { config }
    }

    /// One step with learning rate `lr` on every layer (masked entries stay zero).
    pub fn step(&self, model: &mut Model, lr: f32) {
        for w in model.sparse_layers_mut() {
            w.sgd_step(&self.config, lr);
        }
    }
}

#[derive(Debug, Clone)]
enum LayerDesc {
    Linear {
        name: String,
        out: usize,
    },
    Conv {
        name: String,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    },
    Relu,
    MaxPool {
        k: usize,
    },
}

/// Checks, before any buffer sized by the batch is allocated, that the model's input, the
/// activations of every layer and their gradients at `batch` (`ld` floats per feature) fit
/// `budget`; the layers' own scratch comes on top, so this is a lower bound of what the batch
/// needs, enough to refuse a batch no machine could hold with an error naming it.
fn check_batch_memory(
    name: &str,
    layers: &[Box<dyn Layer>],
    batch: usize,
    budget: &MemoryBudget,
) -> Result<()> {
    let ld = batch.checked_next_multiple_of(crate::tensor::LD_ALIGN);
    let features = layers
        .iter()
        .try_fold(layers[0].input_shape().features(), |sum, l| {
            sum.checked_add(l.output_shape().features().checked_mul(2)?)
        });
    let bytes = features
        .zip(ld)
        .and_then(|(features, ld)| bytes_of(&[features, ld], 4));
    budget
        .check(
            &format!("model {name} at batch {batch}: its input, activations and their gradients"),
            bytes,
        )
        .map_err(|e| RuntimeError::Config(e.to_string()))?;
    Ok(())
}

/// Describes a feed-forward model layer by layer; [`build`](Self::build) creates it with
/// Kaiming-uniform weights and full masks. A `relu()` right after a linear or conv layer is
/// fused into its forward kernel.
#[derive(Debug, Clone)]
pub struct ModelBuilder {
    name: String,
    input: Shape,
    layers: Vec<LayerDesc>,
}

impl ModelBuilder {
    /// A model taking samples of shape `input`.
    pub fn new(name: &str, input: Shape) -> Self {
        ModelBuilder {
            name: name.to_string(),
            input,
            layers: Vec::new(),
        }
    }

    /// A sparse fully connected layer with `out` outputs (the input is flattened).
    pub fn linear(mut self, name: &str, out: usize) -> Self {
        self.layers.push(LayerDesc::Linear {
            name: name.to_string(),
            out,
        });
        self
    }

    /// A sparse `k × k` convolution with `out` channels, stride 1, no padding.
    pub fn conv2d(self, name: &str, out: usize, k: usize) -> Self {
        self.conv2d_with(name, out, k, 1, 0)
    }

    /// A sparse `k × k` convolution with stride and zero padding.
    pub fn conv2d_with(
        mut self,
        name: &str,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        self.layers.push(LayerDesc::Conv {
            name: name.to_string(),
            out,
            k,
            stride,
            padding,
        });
        self
    }

    /// A ReLU (fused into a directly preceding linear or conv layer).
    pub fn relu(mut self) -> Self {
        self.layers.push(LayerDesc::Relu);
        self
    }

    /// Max pooling with window and stride `k`.
    pub fn max_pool(mut self, k: usize) -> Self {
        self.layers.push(LayerDesc::MaxPool { k });
        self
    }

    /// Creates the model for batch `batch`, drawing every weight and bias from `rng`
    /// (layer by layer, weights before bias). Masks start full; see [`crate::masking`] for
    /// drawing sparse ones.
    pub fn build<R: Rng>(self, batch: usize, rng: &mut R) -> Result<Model> {
        let mut layers: Vec<Box<dyn Layer>> = Vec::new();
        let mut shape = self.input;
        for (i, desc) in self.layers.iter().enumerate() {
            match desc {
                LayerDesc::Linear { name, out } => {
                    let mut l = Linear::new(name, shape, *out)?;
                    l.init(rng)?;
                    shape = l.output_shape();
                    layers.push(Box::new(l));
                }
                LayerDesc::Conv {
                    name,
                    out,
                    k,
                    stride,
                    padding,
                } => {
                    let mut l = Conv2d::new(name, shape, *out, *k, *stride, *padding)?;
                    l.init(rng)?;
                    shape = l.output_shape();
                    layers.push(Box::new(l));
                }
                LayerDesc::Relu => {
                    let fused = layers.last_mut().is_some_and(|l| l.fuse_relu());
                    if !fused {
                        layers.push(Box::new(Relu::new(&format!("relu{i}"), shape)));
                    }
                }
                LayerDesc::MaxPool { k } => {
                    let mut l = MaxPool2d::new(&format!("pool{i}"), shape, *k)?;
                    shape = l.output_shape();
                    // After a fused ReLU the pool, which reads its input in the backward pass
                    // anyway, applies the ReLU's mask there, and the layer before only sums
                    // the gradient for its bias (one pass over it instead of two and a write).
                    if let Some(w) = layers
                        .last_mut()
                        .and_then(|l| l.weights_mut())
                        .filter(|w| w.relu())
                    {
                        if l.mask_relu_input_grad() {
                            w.set_relu_grad_masked(true);
                        }
                    }
                    layers.push(Box::new(l));
                }
            }
        }
        Model::from_layers(&self.name, layers, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Shape;
    use rand::SeedableRng;

    #[test]
    fn a_batch_too_large_for_the_machine_is_an_error_before_allocating() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let builder = ModelBuilder::new("mlp", Shape::flat(784))
            .linear("fc1", 300)
            .relu()
            .linear("fc2", 10);
        // 2^40 samples: (784 + 2·310) features · 2^40 · 4 bytes, thousands of terabytes.
        let e = builder
            .clone()
            .build(1 << 40, &mut rng)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model mlp at batch 1099511627776: its input, activations")
                && e.contains("needs 5.5 PiB, more than the"),
            "{e}"
        );
        let e = builder
            .clone()
            .build(usize::MAX, &mut rng)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 2^64 bytes"), "{e}");
        assert_eq!(builder.build(100, &mut rng).unwrap().batch(), 100);
    }
}
