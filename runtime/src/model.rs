//! [`Model`]: a graph of layers with preallocated activations, and [`ModelBuilder`], the
//! small API to describe one (LeNet-300-100, LeNet-5, VGG-D and the wide residual networks
//! are built with it in [`crate::models`]).
//!
//! The graph is a chain in which a layer may also read an earlier layer's output (or the
//! model's input) instead of its predecessor's, and may add an earlier output to its own (a
//! residual connection, fused into the layer's output pass). A value read by several layers
//! gets the sum of their gradients.
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
use crate::layers::{
    BatchNorm, Conv2d, DenseParam, Dropout, GlobalAvgPool, Layer, Linear, MaxPool2d, Relu, Shape,
    StatBuffer,
};
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

/// Where a layer reads from: the model's input, or an earlier layer's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The model's input.
    Input,
    /// The output of layer `i`.
    Layer(usize),
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
    /// What each layer reads.
    inputs: Vec<Source>,
    /// What each layer adds to its output, if anything.
    residuals: Vec<Option<Source>>,
    acts: Vec<Matrix>,
    /// The output-gradient buffers, each shared by layers whose gradients are never live at
    /// the same time in the backward pass (see [`gradient_slots`]).
    grad_pool: Vec<Matrix>,
    /// The buffer of each layer's output gradient.
    grad_slot: Vec<usize>,
    /// The layer each buffer was last handed to.
    grad_owner: Vec<usize>,
    /// For a layer output read by several layers: where a reader's input gradient goes when
    /// another reader's is there already.
    scratch: Vec<Option<Matrix>>,
    /// Which gradients the running backward pass has written (the others are stale).
    grad_written: Vec<bool>,
    /// The valid samples of the passes (set on the layers when it changes).
    valid: usize,
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
    /// Builds a chain of layers (each one's input shape must be the previous one's output),
    /// for batch `batch`. The last layer's outputs are the class logits.
    pub fn from_layers(name: &str, layers: Vec<Box<dyn Layer>>, batch: usize) -> Result<Self> {
        let n = layers.len();
        Self::from_graph(name, layers, chain_inputs(n), vec![None; n], batch)
    }

    /// Builds a graph of layers: layer `i` reads `inputs[i]` and adds `residuals[i]` to its
    /// output, both the model's input or layers before `i`. The last layer's outputs are the
    /// class logits.
    pub fn from_graph(
        name: &str,
        mut layers: Vec<Box<dyn Layer>>,
        inputs: Vec<Source>,
        residuals: Vec<Option<Source>>,
        batch: usize,
    ) -> Result<Self> {
        if layers.is_empty() || batch == 0 {
            return Err(RuntimeError::Config(format!(
                "model {name}: needs at least one layer and a batch of at least 1"
            )));
        }
        if inputs.len() != layers.len() || residuals.len() != layers.len() {
            return Err(RuntimeError::Config(format!(
                "model {name}: {} layers with {} inputs and {} residuals",
                layers.len(),
                inputs.len(),
                residuals.len()
            )));
        }
        let shape_of = |src: Source| match src {
            Source::Input => layers[0].input_shape(),
            Source::Layer(j) => layers[j].output_shape(),
        };
        for (i, (&input, residual)) in inputs.iter().zip(&residuals).enumerate() {
            for src in std::iter::once(input).chain(*residual) {
                if let Source::Layer(j) = src {
                    if j >= i {
                        return Err(RuntimeError::Config(format!(
                            "model {name}: layer {} reads layer {}, which comes after it",
                            layers[i].name(),
                            layers[j].name()
                        )));
                    }
                }
            }
            let given = shape_of(input);
            if given.features() != layers[i].input_shape().features() {
                let from = match input {
                    Source::Input => "the input".to_string(),
                    Source::Layer(j) => format!("layer {}", layers[j].name()),
                };
                return Err(RuntimeError::Shape(format!(
                    "model {name}: {from} gives {given} features, layer {} takes {}",
                    layers[i].name(),
                    layers[i].input_shape()
                )));
            }
            if let Some(r) = *residual {
                let added = shape_of(r);
                if added.features() != layers[i].output_shape().features() {
                    return Err(RuntimeError::Shape(format!(
                        "model {name}: layer {} adds {added} features to its {} outputs",
                        layers[i].name(),
                        layers[i].output_shape()
                    )));
                }
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
        for (layer, &input) in layers.iter_mut().zip(&inputs) {
            layer.set_needs_input_grad(input != Source::Input);
            layer.set_batch(batch, ld)?;
        }
        let mut readers = vec![0usize; layers.len()];
        for src in inputs.iter().chain(residuals.iter().flatten()) {
            if let Source::Layer(j) = *src {
                readers[j] += 1;
            }
        }
        let scratch = readers
            .iter()
            .zip(&layers)
            .map(|(&r, l)| (r > 1).then(|| Matrix::zeros(l.output_shape().features(), batch)))
            .collect();
        let input_shape = layers[0].input_shape();
        let acts: Vec<Matrix> = layers
            .iter()
            .map(|l| Matrix::zeros(l.output_shape().features(), batch))
            .collect();
        let features: Vec<usize> = layers.iter().map(|l| l.output_shape().features()).collect();
        let (grad_slot, slot_rows) = gradient_slots(&inputs, &residuals, &features);
        let grad_pool = slot_rows.iter().map(|&r| Matrix::zeros(r, batch)).collect();
        let grad_owner = vec![usize::MAX; slot_rows.len()];
        let classes = layers.last().expect("non-empty").output_shape().features();
        Ok(Model {
            name: name.to_string(),
            input_shape,
            batch,
            ld,
            input: Matrix::zeros(input_shape.features(), batch),
            labels: vec![0; batch],
            grad_written: vec![false; layers.len()],
            layers,
            inputs,
            residuals,
            acts,
            grad_pool,
            grad_slot,
            grad_owner,
            scratch,
            valid: batch,
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

    /// The forward multiply-adds per sample of one weight of each masked layer, in the order
    /// of [`sparse_layers`](Self::sparse_layers): its output positions (`oh · ow` for a
    /// convolution, 1 for a linear layer).
    pub fn sparse_layer_macs_per_weight(&self) -> impl Iterator<Item = u64> + '_ {
        self.layers
            .iter()
            .filter(|l| l.weights().is_some())
            .map(|l| {
                let out = l.output_shape();
                (out.height * out.width) as u64
            })
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
            self.forward_layer(i)?;
        }
        Ok(self.logits())
    }

    /// Layer `i`'s forward pass, with its residual added.
    fn forward_layer(&mut self, i: usize) -> Result<()> {
        let (before, after) = self.acts.split_at_mut(i);
        let value = |src: Source| match src {
            Source::Input => &self.input,
            Source::Layer(j) => &before[j],
        };
        let y = &mut after[0];
        self.layers[i].forward(value(self.inputs[i]), y)?;
        if let Some(r) = self.residuals[i] {
            let (r, batch, ld) = (value(r).as_slice(), self.batch, self.ld);
            for (yr, rr) in y
                .as_mut_slice()
                .chunks_exact_mut(ld)
                .zip(r.chunks_exact(ld))
            {
                for (o, &a) in yr[..batch].iter_mut().zip(&rr[..batch]) {
                    *o += a;
                }
            }
        }
        Ok(())
    }

    /// Sets the number of valid samples of the next passes on every layer (only layers that
    /// mix samples, batch normalisation, use it).
    pub fn set_valid(&mut self, n: usize) {
        let n = n.min(self.batch);
        if n != self.valid {
            self.valid = n;
            for l in &mut self.layers {
                l.set_valid(n);
            }
        }
    }

    /// Training mode (batch statistics, dropout) or evaluation mode, on every layer.
    pub fn set_training(&mut self, training: bool) {
        for l in &mut self.layers {
            l.set_training(training);
        }
    }

    /// The most threads the layers' own loops (batch normalisation) may use.
    pub fn set_threads(&mut self, threads: usize) {
        for l in &mut self.layers {
            l.set_threads(threads);
        }
    }

    /// The key of the next training step's random draws (dropout), on every layer.
    pub fn set_step_key(&mut self, key: u64) {
        for l in &mut self.layers {
            l.set_step_key(key);
        }
    }

    /// Every layer's dense parameters (batch normalisation's), in layer order.
    pub fn dense_params(&self) -> impl Iterator<Item = &DenseParam> {
        self.layers.iter().flat_map(|l| l.params())
    }

    /// Every layer's dense parameters, mutable.
    pub fn dense_params_mut(&mut self) -> impl Iterator<Item = &mut DenseParam> {
        self.layers.iter_mut().flat_map(|l| l.params_mut())
    }

    /// Every layer's saved statistics (batch normalisation's running mean and variance).
    pub fn stats(&self) -> impl Iterator<Item = &StatBuffer> {
        self.layers.iter().flat_map(|l| l.stats())
    }

    /// Every layer's saved statistics, mutable.
    pub fn stats_mut(&mut self) -> impl Iterator<Item = &mut StatBuffer> {
        self.layers.iter_mut().flat_map(|l| l.stats_mut())
    }

    /// What layer `i` reads, and what it adds to its output.
    pub fn sources(&self, i: usize) -> (Source, Option<Source>) {
        (self.inputs[i], self.residuals[i])
    }

    /// Forward pass, loss on the first `n` columns (labels from the label buffer), and the
    /// backward pass computing every parameter's gradient (weights by `mode`). Returns the
    /// mean loss.
    pub fn forward_backward(&mut self, n: usize, mode: WeightGradMode) -> Result<f64> {
        self.set_valid(n);
        self.forward()?;
        let last = self.layers.len() - 1;
        self.claim_grad(last);
        let loss = self.loss.loss_and_grad(
            &self.acts[last],
            &self.labels,
            n,
            &mut self.grad_pool[self.grad_slot[last]],
        )?;
        self.backward(mode)?;
        Ok(loss)
    }

    /// The backward pass from the gradient already in the last layer's gradient buffer
    /// (see [`last_grad_mut`](Self::last_grad_mut)), for users with their own loss.
    pub fn backward(&mut self, mode: WeightGradMode) -> Result<()> {
        self.grad_written.fill(false);
        for i in (0..self.layers.len()).rev() {
            self.backward_layer(i, mode)?;
        }
        Ok(())
    }

    /// Layer `i`'s backward pass: its output gradient goes to its residual's source and
    /// through the layer to its input's; a gradient that already holds another reader's is
    /// added to.
    fn backward_layer(&mut self, i: usize, mode: WeightGradMode) -> Result<()> {
        let (batch, ld) = (self.batch, self.ld);
        let residual = match self.residuals[i] {
            Some(Source::Layer(j)) => Some(j),
            _ => None,
        };
        let input = match self.inputs[i] {
            Source::Layer(j) => Some(j),
            Source::Input => None,
        };
        self.claim_grad(i);
        for j in residual.into_iter().chain(input) {
            self.claim_grad(j);
        }
        let slots = &self.grad_slot;
        // Distinct by construction: layer j's gradient is live while layer i's is read.
        fn pair<'a>(
            pool: &'a mut [Matrix],
            slots: &[usize],
            i: usize,
            j: usize,
        ) -> Result<[&'a mut Matrix; 2]> {
            pool.get_disjoint_mut([slots[i], slots[j]]).map_err(|_| {
                RuntimeError::Config(format!("layers {i} and {j} share a gradient buffer"))
            })
        }
        if let Some(j) = residual {
            // Before the layer's pass, which may overwrite dy.
            let [dy, g] = pair(&mut self.grad_pool, slots, i, j)?;
            if std::mem::replace(&mut self.grad_written[j], true) {
                add_into(g, dy, batch, ld);
            } else {
                g.as_mut_slice().copy_from_slice(dy.as_slice());
            }
        }
        let x = input.map_or(&self.input, |j| &self.acts[j]);
        match input {
            None => {
                let dy = &mut self.grad_pool[slots[i]];
                self.layers[i].backward(x, &self.acts[i], dy, None, mode)
            }
            Some(j) if !self.grad_written[j] => {
                self.grad_written[j] = true;
                let [dy, g] = pair(&mut self.grad_pool, slots, i, j)?;
                self.layers[i].backward(x, &self.acts[i], dy, Some(g), mode)
            }
            Some(j) => {
                let scratch = self.scratch[j].as_mut().ok_or_else(|| {
                    RuntimeError::Config(format!("layer {j} has one reader but two gradients"))
                })?;
                let [dy, g] = pair(&mut self.grad_pool, slots, i, j)?;
                self.layers[i].backward(x, &self.acts[i], dy, Some(scratch), mode)?;
                add_into(g, scratch, batch, ld);
                Ok(())
            }
        }
    }

    /// Hands layer `i`'s gradient buffer to it: the shared buffer takes the layer's rows. Its
    /// padding columns (`batch..ld`), the same places whatever the rows, are zero from the
    /// start and no layer writes them (a test checks it), so nothing needs clearing.
    fn claim_grad(&mut self, i: usize) {
        let slot = self.grad_slot[i];
        if self.grad_owner[slot] != i {
            self.grad_pool[slot].set_rows(self.acts[i].rows());
            self.grad_owner[slot] = i;
        }
    }

    /// The gradient buffer of the logits, `[classes × ld]`.
    pub fn last_grad_mut(&mut self) -> &mut Matrix {
        let last = self.layers.len() - 1;
        self.claim_grad(last);
        &mut self.grad_pool[self.grad_slot[last]]
    }

    /// Forward pass and, over the first `n` columns, the summed loss and the number of
    /// correct predictions.
    pub fn evaluate_batch(&mut self, n: usize) -> Result<(f64, usize)> {
        self.set_valid(n);
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
            for (i, times) in fwd.iter_mut().enumerate() {
                let t = std::time::Instant::now();
                self.forward_layer(i)?;
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let last = n - 1;
            self.claim_grad(last);
            self.loss.loss_and_grad(
                &self.acts[last],
                &self.labels,
                self.batch,
                &mut self.grad_pool[self.grad_slot[last]],
            )?;
            self.grad_written.fill(false);
            for i in (0..n).rev() {
                let t = std::time::Instant::now();
                self.backward_layer(i, mode)?;
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

    /// One step with learning rate `lr` on every layer (masked entries stay zero) and every
    /// dense parameter.
    pub fn step(&self, model: &mut Model, lr: f32) {
        for w in model.sparse_layers_mut() {
            w.sgd_step(&self.config, lr);
        }
        for p in model.dense_params_mut() {
            p.sgd_step(&self.config, lr);
        }
    }
}

/// What the layers of a chain of `n` read: the input, then each its predecessor's output.
fn chain_inputs(n: usize) -> Vec<Source> {
    (0..n)
        .map(|i| {
            if i == 0 {
                Source::Input
            } else {
                Source::Layer(i - 1)
            }
        })
        .collect()
}

/// Shares output-gradient buffers between layers by liveness: layer `i`'s gradient is live in
/// the backward pass from the pass of its last reader (the loss, for the last layer) down to
/// its own, so two layers may share a buffer when those spans do not meet. Returns each
/// layer's buffer and each buffer's rows (the most of the layers sharing it). Greedy interval
/// colouring in the backward pass's order, preferring the largest free buffer.
fn gradient_slots(
    inputs: &[Source],
    residuals: &[Option<Source>],
    features: &[usize],
) -> (Vec<usize>, Vec<usize>) {
    let n = features.len();
    // The last reader of each layer's output; the loss reads the last layer's.
    let mut last_reader: Vec<usize> = (0..n).collect();
    last_reader[n - 1] = n;
    for (r, src) in inputs.iter().enumerate().chain(
        residuals
            .iter()
            .enumerate()
            .filter_map(|(r, s)| s.as_ref().map(|s| (r, s))),
    ) {
        if let Source::Layer(j) = *src {
            last_reader[j] = last_reader[j].max(r);
        }
    }
    // Live from step last_reader[i] down to step i: take them by start, latest first.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(last_reader[i]), std::cmp::Reverse(i)));
    let mut slot = vec![0; n];
    // Per buffer: its rows, and the step at which its current layer's span ends.
    let mut rows: Vec<usize> = Vec::new();
    let mut free_from: Vec<usize> = Vec::new();
    for i in order {
        let free = (0..rows.len())
            .filter(|&s| free_from[s] > last_reader[i])
            .max_by_key(|&s| (rows[s], std::cmp::Reverse(s)));
        let s = free.unwrap_or_else(|| {
            rows.push(0);
            free_from.push(usize::MAX);
            rows.len() - 1
        });
        rows[s] = rows[s].max(features[i]);
        free_from[s] = i;
        slot[i] = s;
    }
    (slot, rows)
}

/// `dst += src` over the first `batch` columns of every row.
fn add_into(dst: &mut Matrix, src: &Matrix, batch: usize, ld: usize) {
    for (d, s) in dst
        .as_mut_slice()
        .chunks_exact_mut(ld)
        .zip(src.as_slice().chunks_exact(ld))
    {
        for (o, &a) in d[..batch].iter_mut().zip(&s[..batch]) {
            *o += a;
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
        bias: bool,
    },
    Relu {
        name: String,
    },
    MaxPool {
        name: String,
        k: usize,
    },
    BatchNorm {
        name: String,
    },
    Dropout {
        name: String,
        p: f32,
    },
    GlobalAvgPool {
        name: String,
    },
}

/// One layer of a [`ModelBuilder`]'s graph.
#[derive(Debug, Clone)]
struct NodeDesc {
    desc: LayerDesc,
    input: Source,
    residual: Option<Source>,
    /// A ReLU fused into the layer.
    relu: bool,
    /// A dropout fused after the ReLU (batch normalisation only): its name and probability.
    dropout: Option<(String, f32)>,
    /// Its output is read by a layer other than the next (so nothing may fuse into it).
    tapped: bool,
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

/// Describes a model layer by layer; [`build`](Self::build) creates it with Kaiming-uniform
/// weights and full masks. Each layer reads the previous one's output, unless
/// [`from`](Self::from) says otherwise, and [`add_residual`](Self::add_residual) adds an earlier output to the
/// last layer's (a residual connection). A `relu()` right after a linear, conv or batch-norm
/// layer is fused into it.
///
/// ```
/// use runtime::{ModelBuilder, Shape};
/// // A pre-activation residual block: y = x + conv2(relu(bn2(conv1(relu(bn1(x)))))).
/// let mut b = ModelBuilder::new("block", Shape::image(4, 8, 8))
///     .conv2d_with("stem", 8, 3, 1, 1);
/// let x = b.tap();
/// let b = b
///     .batch_norm("bn1").relu()
///     .conv2d_with("conv1", 8, 3, 1, 1)
///     .batch_norm("bn2").relu()
///     .conv2d_with("conv2", 8, 3, 1, 1)
///     .add_residual(x)
///     .global_avg_pool()
///     .linear("fc", 10);
/// let model = b.build(2, &mut rand::rng())?;
/// assert_eq!(model.layers().len(), 7);
/// # Ok::<(), runtime::RuntimeError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ModelBuilder {
    name: String,
    input: Shape,
    nodes: Vec<NodeDesc>,
    cursor: Source,
    /// Calls so far (names unnamed layers: `relu3`, `pool5`).
    calls: usize,
    /// The first misuse, reported by `build`.
    error: Option<String>,
}

impl ModelBuilder {
    /// A model taking samples of shape `input`.
    pub fn new(name: &str, input: Shape) -> Self {
        ModelBuilder {
            name: name.to_string(),
            input,
            nodes: Vec::new(),
            cursor: Source::Input,
            calls: 0,
            error: None,
        }
    }

    fn push(mut self, desc: LayerDesc) -> Self {
        self.nodes.push(NodeDesc {
            desc,
            input: self.cursor,
            residual: None,
            relu: false,
            dropout: None,
            tapped: false,
        });
        self.cursor = Source::Layer(self.nodes.len() - 1);
        self.calls += 1;
        self
    }

    /// The last layer's output (or the input, before any layer), for a later
    /// [`from`](Self::from) or [`add_residual`](Self::add_residual).
    pub fn tap(&mut self) -> Source {
        if let Source::Layer(j) = self.cursor {
            self.nodes[j].tapped = true;
        }
        self.cursor
    }

    /// The next layer reads `source` (from [`tap`](Self::tap)) instead of the last layer's
    /// output.
    pub fn from(mut self, source: Source) -> Self {
        self.cursor = source;
        self
    }

    /// Adds `source`'s output (from [`tap`](Self::tap)) to the last layer's: a residual
    /// connection, fused into that layer's output pass. The last layer must not end in a
    /// fused ReLU or add another residual already.
    pub fn add_residual(mut self, source: Source) -> Self {
        self.calls += 1;
        let ok = match self.cursor {
            Source::Layer(j) if j + 1 == self.nodes.len() => {
                let n = &mut self.nodes[j];
                let free = !n.relu && !n.tapped && n.residual.is_none();
                if free {
                    n.residual = Some(source);
                }
                free
            }
            _ => false,
        };
        if !ok && self.error.is_none() {
            self.error = Some(
                "a residual is added to the layer just described, which must not end in a \
                 ReLU, be read elsewhere or add another residual"
                    .into(),
            );
        }
        self
    }

    /// A sparse fully connected layer with `out` outputs (the input is flattened).
    pub fn linear(self, name: &str, out: usize) -> Self {
        self.push(LayerDesc::Linear {
            name: name.to_string(),
            out,
        })
    }

    /// A sparse `k × k` convolution with `out` channels, stride 1, no padding.
    pub fn conv2d(self, name: &str, out: usize, k: usize) -> Self {
        self.conv2d_with(name, out, k, 1, 0)
    }

    /// A sparse `k × k` convolution with stride and zero padding.
    pub fn conv2d_with(
        self,
        name: &str,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        self.conv(name, out, k, stride, padding, true)
    }

    fn conv(
        self,
        name: &str,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Self {
        self.push(LayerDesc::Conv {
            name: name.to_string(),
            out,
            k,
            stride,
            padding,
            bias,
        })
    }

    /// [`conv2d_with`](Self::conv2d_with) without a bias (PyTorch's `bias=False`).
    pub fn conv2d_without_bias(
        self,
        name: &str,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        self.conv(name, out, k, stride, padding, false)
    }

    /// A ReLU (fused into a directly preceding linear, conv or batch-norm layer).
    pub fn relu(mut self) -> Self {
        let fusable = match self.cursor {
            Source::Layer(j) if j + 1 == self.nodes.len() => {
                let n = &self.nodes[j];
                !n.relu
                    && !n.tapped
                    && n.residual.is_none()
                    && matches!(
                        n.desc,
                        LayerDesc::Linear { .. }
                            | LayerDesc::Conv { .. }
                            | LayerDesc::BatchNorm { .. }
                    )
            }
            _ => false,
        };
        if fusable {
            let j = self.nodes.len() - 1;
            self.nodes[j].relu = true;
            self.calls += 1;
            self
        } else {
            let name = format!("relu{}", self.calls);
            self.push(LayerDesc::Relu { name })
        }
    }

    /// Max pooling with window and stride `k`.
    pub fn max_pool(self, k: usize) -> Self {
        let name = format!("pool{}", self.calls);
        self.push(LayerDesc::MaxPool { name, k })
    }

    /// Batch normalisation of each channel (of each feature, after a linear layer), with
    /// PyTorch's defaults; its tensors are `NAME.weight`, `NAME.bias`, `NAME.running_mean`
    /// and `NAME.running_var`.
    pub fn batch_norm(self, name: &str) -> Self {
        self.push(LayerDesc::BatchNorm {
            name: name.to_string(),
        })
    }

    /// Dropout with probability `p` (in training only); fused into a directly preceding
    /// batch normalisation with a fused ReLU.
    pub fn dropout(mut self, name: &str, p: f32) -> Self {
        let last = self.nodes.len();
        if let Source::Layer(j) = self.cursor {
            let n = &mut self.nodes[j];
            if j + 1 == last
                && matches!(n.desc, LayerDesc::BatchNorm { .. })
                && n.relu
                && n.dropout.is_none()
                && !n.tapped
                && n.residual.is_none()
            {
                n.dropout = Some((name.to_string(), p));
                self.calls += 1;
                return self;
            }
        }
        self.push(LayerDesc::Dropout {
            name: name.to_string(),
            p,
        })
    }

    /// Global average pooling: each channel's mean.
    pub fn global_avg_pool(self) -> Self {
        let name = format!("avgpool{}", self.calls);
        self.push(LayerDesc::GlobalAvgPool { name })
    }

    /// Creates the model for batch `batch`, drawing every weight and bias from `rng`
    /// (layer by layer, weights before bias). Masks start full; see [`crate::masking`] for
    /// drawing sparse ones.
    pub fn build<R: Rng>(self, batch: usize, rng: &mut R) -> Result<Model> {
        if let Some(e) = self.error {
            return Err(RuntimeError::Config(format!("model {}: {e}", self.name)));
        }
        let mut layers: Vec<Box<dyn Layer>> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let shape = match node.input {
                Source::Input => self.input,
                Source::Layer(j) => layers[j].output_shape(),
            };
            let mut layer: Box<dyn Layer> = match &node.desc {
                LayerDesc::Linear { name, out } => {
                    let mut l = Linear::new(name, shape, *out)?;
                    l.init(rng)?;
                    Box::new(l)
                }
                LayerDesc::Conv {
                    name,
                    out,
                    k,
                    stride,
                    padding,
                    bias,
                } => {
                    let mut l = Conv2d::new(name, shape, *out, *k, *stride, *padding)?;
                    if !bias {
                        l = l.without_bias();
                    }
                    l.init(rng)?;
                    Box::new(l)
                }
                LayerDesc::Relu { name } => Box::new(Relu::new(name, shape)),
                LayerDesc::MaxPool { name, k } => {
                    let mut l = MaxPool2d::new(name, shape, *k)?;
                    // After a fused ReLU the pool, which reads its input in the backward pass
                    // anyway, applies the ReLU's mask there, and the layer before only sums
                    // the gradient for its bias (one pass over it instead of two and a write).
                    if let Source::Layer(j) = node.input {
                        let before = &self.nodes[j];
                        if j + 1 == i && before.relu && !before.tapped {
                            if let Some(w) = layers[j].weights_mut() {
                                if l.mask_relu_input_grad() {
                                    w.set_relu_grad_masked(true);
                                }
                            }
                        }
                    }
                    Box::new(l)
                }
                LayerDesc::BatchNorm { name } => {
                    let mut l = BatchNorm::new(name, shape);
                    if node.relu {
                        l.fuse_relu();
                    }
                    if let Some((d, p)) = &node.dropout {
                        l.fuse_dropout(d, *p)?;
                    }
                    Box::new(l)
                }
                LayerDesc::Dropout { name, p } => Box::new(Dropout::new(name, shape, *p)?),
                LayerDesc::GlobalAvgPool { name } => Box::new(GlobalAvgPool::new(name, shape)),
            };
            let fused_already = matches!(node.desc, LayerDesc::BatchNorm { .. });
            if node.relu && !fused_already && !layer.fuse_relu() {
                return Err(RuntimeError::Config(format!(
                    "model {}: layer {} cannot fuse a ReLU",
                    self.name,
                    layer.name()
                )));
            }
            layers.push(layer);
        }
        let inputs = self.nodes.iter().map(|n| n.input).collect();
        let residuals = self.nodes.iter().map(|n| n.residual).collect();
        Model::from_graph(&self.name, layers, inputs, residuals, batch)
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

    /// Every pair of layers whose gradients are live at the same step has its own buffer, and
    /// every buffer holds its layers' rows.
    fn check_slots(inputs: &[Source], residuals: &[Option<Source>], features: &[usize]) -> usize {
        let (slot, rows) = gradient_slots(inputs, residuals, features);
        let n = features.len();
        let mut last = vec![0; n];
        for (i, l) in last.iter_mut().enumerate() {
            *l = if i == n - 1 { n } else { i };
        }
        for r in 0..n {
            for src in std::iter::once(inputs[r]).chain(residuals[r]) {
                if let Source::Layer(j) = src {
                    last[j] = last[j].max(r);
                }
            }
        }
        for a in 0..n {
            assert!(rows[slot[a]] >= features[a]);
            for b in a + 1..n {
                // Spans [a, last[a]] and [b, last[b]] meet.
                if b <= last[a] {
                    assert_ne!(slot[a], slot[b], "layers {a} and {b}");
                }
            }
        }
        rows.len()
    }

    #[test]
    fn a_chain_needs_two_gradient_buffers() {
        let n = 9;
        let inputs = chain_inputs(n);
        let features: Vec<usize> = (0..n).map(|i| 10 + i).collect();
        assert_eq!(check_slots(&inputs, &vec![None; n], &features), 2);
    }

    #[test]
    fn residual_graphs_share_buffers_only_between_disjoint_spans() {
        use rand::Rng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for _ in 0..500 {
            let n = rng.random_range(1..30);
            let pick = |rng: &mut rand_chacha::ChaCha8Rng, i: usize| {
                if i == 0 || rng.random_bool(0.1) {
                    Source::Input
                } else {
                    Source::Layer(rng.random_range(i.saturating_sub(4)..i))
                }
            };
            let inputs: Vec<Source> = (0..n).map(|i| pick(&mut rng, i)).collect();
            let residuals: Vec<Option<Source>> = (0..n)
                .map(|i| rng.random_bool(0.3).then(|| pick(&mut rng, i)))
                .collect();
            let features: Vec<usize> = (0..n).map(|_| rng.random_range(1..100)).collect();
            let buffers = check_slots(&inputs, &residuals, &features);
            assert!(buffers <= n);
        }
    }

    #[test]
    fn a_wide_resnet_keeps_few_gradient_buffers() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let model = crate::models::ModelKind::Wrn16x2
            .builder(Shape::image(3, 32, 32), 10)
            .build(2, &mut rng)
            .unwrap();
        let layers = model.layers.len();
        assert!(layers > 20, "{layers}");
        assert!(
            model.grad_pool.len() <= 4,
            "{} buffers",
            model.grad_pool.len()
        );
        let pooled: usize = model.grad_pool.iter().map(Matrix::row_capacity).sum();
        let own: usize = model.acts.iter().map(Matrix::rows).sum();
        assert!(pooled * 4 < own, "{pooled} of {own} rows");
    }

    /// The shared gradient buffers' padding columns (`batch..ld`) stay zero through training
    /// steps: no layer writes them, so a buffer can pass from one layer to another as it is.
    #[test]
    fn gradient_padding_columns_stay_zero() {
        use rand::Rng;
        let exec = crate::exec::Executor::new(crate::exec::ExecOptions::default()).unwrap();
        for kind in [
            crate::models::ModelKind::Lenet5,
            crate::models::ModelKind::Wrn16x2,
        ] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let mut model = kind
                .builder(Shape::image(1, 28, 28), 10)
                .build(5, &mut rng)
                .unwrap();
            model.compile(&exec).unwrap();
            let (batch, ld) = (model.batch, model.ld);
            assert!(ld > batch);
            for step in 0..3 {
                for v in model.input_mut().as_mut_slice().chunks_exact_mut(ld) {
                    for x in &mut v[..batch] {
                        *x = rng.random_range(-1.0..1.0);
                    }
                }
                for (i, l) in model.labels.iter_mut().enumerate() {
                    *l = ((i + step) % 10) as u32;
                }
                let n = if step == 1 { batch - 2 } else { batch };
                model.forward_backward(n, WeightGradMode::Dense).unwrap();
                for (b, g) in model.grad_pool.iter().enumerate() {
                    for row in g.as_slice().chunks_exact(ld) {
                        assert!(row[batch..].iter().all(|&x| x == 0.0), "{kind}: buffer {b}");
                    }
                }
            }
        }
    }
}
