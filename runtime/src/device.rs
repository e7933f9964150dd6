//! [`DeviceModel`] (feature `opencl`): training steps whose weights, momentum, gradients and
//! activations stay on the OpenCL device.
//!
//! The host [`Model`] stays the description of the network and the owner of its state
//! between epochs; within an epoch the device holds the newest parameters. The protocol:
//!
//! - before a step or an evaluation, a device that is not current gets every layer's
//!   parameters and optimiser state uploaded ([`DeviceModel::push`]);
//! - a step uploads only the batch (input and labels) and downloads only the per-sample
//!   losses; everything else runs on the device: the sparse kernels of each layer (the same
//!   compiled [`crate::Kernel`]s as the host adapter, run on device buffers) and the training
//!   program of [`codegen_opencl::TrainingKernels`] (loss gradient, ReLU mask and bias
//!   gradient, SGD, momentum of inactive entries);
//! - whenever the host needs the state (a mask update, the end of an epoch, a checkpoint, an
//!   interruption) [`DeviceModel::pull`] downloads it into the host arrays, exactly as the
//!   host's own SGD would have left them, and makes the host the owner again (the next step
//!   pushes).
//!
//! Supported models are those of sparse linear layers (ReLU fused), such as LeNet-300-100;
//! [`DeviceModel::supports`] says why another model is not, and the trainer then runs it
//! with the host adapter of [`crate::exec`] (each kernel copies its operands).

use codegen_opencl::{DeviceBuffer, IndexBuffer, OpenClBackend, SgdStep, TrainingKernels};
use sparse_ir::backend::{Backend as _, Kernel as _};
use sparse_ir::{Args, BackendError, Launch};

use crate::error::{Result, RuntimeError};
use crate::exec::Executor;
use crate::model::Model;
use crate::weights::optimiser::{SgdArithmetic, SgdState};
use crate::weights::{CompiledOps, SgdConfig, SparseWeights, WeightGradMode};

/// One layer's parameters and optimiser state on the device.
struct DeviceLayer {
    name: String,
    rows: usize,
    cols: usize,
    relu: bool,
    /// The weight pattern the buffers were pushed for.
    pattern_hash: u64,
    /// Weight values of the active entries, in CSR order.
    values: DeviceBuffer,
    /// The bias.
    bias: DeviceBuffer,
    /// The row-major index of every active entry.
    dense_index: IndexBuffer,
    /// Gradients, momentum and the lazy decay, as on the host.
    sgd: SgdState<DeviceBuffer>,
}

/// [`SgdArithmetic`] on device buffers: the training program's kernels.
struct DeviceSgd<'a> {
    kernels: &'a TrainingKernels,
    step: SgdStep,
}

impl SgdArithmetic<DeviceBuffer> for DeviceSgd<'_> {
    type Error = BackendError;

    fn sgd(
        &self,
        w: &mut DeviceBuffer,
        grad: &DeviceBuffer,
        buf: &mut DeviceBuffer,
    ) -> std::result::Result<(), BackendError> {
        self.kernels.sgd(self.step, w, grad, buf)
    }

    fn accumulate(
        &self,
        factor: f32,
        buf: &mut DeviceBuffer,
        grad: &DeviceBuffer,
    ) -> std::result::Result<(), BackendError> {
        self.kernels.momentum_accumulate(factor, buf, grad)
    }
}

/// A model's training state on an OpenCL device (see the module documentation).
pub struct DeviceModel {
    backend: OpenClBackend,
    kernels: TrainingKernels,
    launch: Launch,
    classes: usize,
    layers: Vec<DeviceLayer>,
    input: DeviceBuffer,
    labels: IndexBuffer,
    /// Output of every layer, `[rows × ld]`.
    acts: Vec<DeviceBuffer>,
    /// Gradient of every layer's output, `[rows × ld]`.
    grads: Vec<DeviceBuffer>,
    losses: DeviceBuffer,
    losses_host: Vec<f32>,
    labels_host: Vec<u32>,
    /// Whether the device holds the newest parameters (false: the host's are newer).
    current: bool,
    /// Whether the device has taken steps the host has not seen.
    ahead: bool,
}

impl std::fmt::Debug for DeviceModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceModel")
            .field("device", &self.backend.device())
            .field("layers", &self.layers.len())
            .field("current", &self.current)
            .field("ahead", &self.ahead)
            .finish()
    }
}

impl DeviceModel {
    /// Why `model` cannot train on the device, or `None` when it can: every layer must be a
    /// sparse linear layer (ReLU fused).
    pub fn supports(model: &Model) -> Option<String> {
        for layer in model.layers() {
            match layer.weights() {
                None => {
                    return Some(format!(
                        "layer {} has no weights (only linear layers with fused ReLU run on \
                         the device)",
                        layer.name()
                    ))
                }
                Some(w) if w.is_conv() => {
                    return Some(format!(
                        "layer {} is a convolution (only linear layers run on the device)",
                        layer.name()
                    ))
                }
                Some(_) => {}
            }
        }
        None
    }

    /// Device buffers for `model` on the executor's OpenCL backend, and the training program
    /// built there; `Ok(None)` when the executor is not OpenCL or the model is not supported.
    /// Nothing is uploaded yet: the first step pushes the model.
    pub fn new(exec: &Executor, model: &Model) -> Result<Option<Self>> {
        let Some(backend) = exec.opencl_backend() else {
            return Ok(None);
        };
        if let Some(why) = Self::supports(model) {
            tracing::info!(
                model = model.name(),
                why,
                "training with host copies per kernel"
            );
            return Ok(None);
        }
        let kernels = TrainingKernels::new(backend)?;
        let (batch, ld) = (model.batch(), model.ld());
        let launch = Launch::new(batch, ld);
        let mut layers = Vec::new();
        let (mut acts, mut grads) = (Vec::new(), Vec::new());
        for w in model.sparse_layers() {
            let (rows, cols) = (w.rows(), w.cols());
            layers.push(DeviceLayer {
                name: w.name().to_string(),
                rows,
                cols,
                relu: w.relu(),
                pattern_hash: 0,
                values: backend.alloc(0)?,
                bias: backend.alloc(rows)?,
                dense_index: backend.alloc_indices(0)?,
                sgd: SgdState {
                    grad: backend.alloc(0)?,
                    bias_grad: backend.alloc(rows)?,
                    dense_grad: backend.alloc(rows * cols)?,
                    momentum: backend.alloc(0)?,
                    bias_momentum: backend.alloc(rows)?,
                    dense_momentum: backend.alloc(rows * cols)?,
                    decay: Default::default(),
                },
            });
            acts.push(backend.alloc(rows * ld)?);
            grads.push(backend.alloc(rows * ld)?);
        }
        Ok(Some(DeviceModel {
            backend: backend.clone(),
            kernels,
            launch,
            classes: model.classes(),
            input: backend.alloc(model.input().as_slice().len())?,
            labels: backend.alloc_indices(batch)?,
            layers,
            acts,
            grads,
            losses: backend.alloc(batch)?,
            losses_host: vec![0.0; batch],
            labels_host: vec![0; batch],
            current: false,
            ahead: false,
        }))
    }

    /// Whether the device holds the newest parameters.
    pub fn is_current(&self) -> bool {
        self.current
    }

    /// Whether the device has taken steps that [`pull`](Self::pull) has not brought back.
    pub fn is_ahead(&self) -> bool {
        self.ahead
    }

    /// Marks the host's parameters as the newest (after the host changed them): the next step
    /// or evaluation pushes them. Steps the device took since the last
    /// [`pull`](Self::pull) are dropped; the trainer pulls whenever an epoch returns, so that
    /// happens only after a failed step.
    pub fn invalidate(&mut self) {
        if self.ahead {
            tracing::warn!("dropping device steps the host has not seen");
        }
        self.current = false;
        self.ahead = false;
    }

    fn check_layers(&self, model: &Model) -> Result<()> {
        let same = model.sparse_layers().count() == self.layers.len()
            && model
                .sparse_layers()
                .zip(&self.layers)
                .all(|(w, d)| w.name() == d.name && w.rows() == d.rows && w.cols() == d.cols);
        if !same || model.batch() != self.launch.batch || model.ld() != self.launch.ld {
            return Err(RuntimeError::Config(format!(
                "model {}: not the model the device buffers were made for",
                model.name()
            )));
        }
        Ok(())
    }

    /// Uploads every layer's parameters and optimiser state; the device becomes current.
    pub fn push(&mut self, model: &Model) -> Result<()> {
        self.check_layers(model)?;
        let b = &self.backend;
        for (w, d) in model.sparse_layers().zip(&mut self.layers) {
            let nnz = w.nnz();
            if d.values.len() != nnz {
                d.values = b.alloc(nnz)?;
                d.sgd.momentum = b.alloc(nnz)?;
                d.sgd.grad = b.alloc(nnz)?;
                d.dense_index = b.alloc_indices(nnz)?;
            }
            let (p, s) = w.training_state();
            b.upload(&p.values, &mut d.values)?;
            b.upload(&s.momentum, &mut d.sgd.momentum)?;
            b.upload(&p.bias, &mut d.bias)?;
            b.upload(&s.bias_momentum, &mut d.sgd.bias_momentum)?;
            b.upload(&s.dense_momentum, &mut d.sgd.dense_momentum)?;
            b.upload_indices(&p.dense_index, &mut d.dense_index)?;
            d.sgd.decay = s.decay;
            d.relu = w.relu();
            d.pattern_hash = w.pattern().hash();
        }
        self.current = true;
        self.ahead = false;
        Ok(())
    }

    /// Downloads what the steps since the last push changed into the host arrays (active
    /// values and momentum, bias and its momentum, the dense momentum with its pending decay,
    /// the last dense gradient), so the host model is as its own steps would have left it.
    /// The host owns the state afterwards: the next step pushes.
    pub fn pull(&mut self, model: &mut Model) -> Result<()> {
        if self.ahead {
            self.check_layers(model)?;
            let b = &self.backend;
            for (w, d) in model.sparse_layers_mut().zip(&self.layers) {
                if w.pattern().hash() != d.pattern_hash {
                    return Err(stale(w));
                }
                let (p, s) = w.training_state_mut();
                b.download(&d.values, &mut p.values)?;
                b.download(&d.sgd.momentum, &mut s.momentum)?;
                b.download(&d.bias, &mut p.bias)?;
                b.download(&d.sgd.bias_momentum, &mut s.bias_momentum)?;
                b.download(&d.sgd.dense_momentum, &mut s.dense_momentum)?;
                if d.sgd.decay.dense_grad_fresh() {
                    b.download(&d.sgd.dense_grad, &mut s.dense_grad)?;
                }
                s.decay = d.sgd.decay;
            }
            self.ahead = false;
        }
        self.current = false;
        Ok(())
    }

    fn ensure_current(&mut self, model: &Model) -> Result<()> {
        if !self.current {
            self.push(model)?;
        }
        Ok(())
    }

    /// Uploads the model's input buffer and its first `n` labels (checked against the
    /// classes first).
    fn upload_batch(&mut self, model: &Model, n: usize) -> Result<()> {
        model.check_labels(n)?;
        self.backend
            .upload(model.input().as_slice(), &mut self.input)?;
        self.labels_host[..n].copy_from_slice(&model.labels()[..n]);
        self.labels_host[n..].fill(0);
        self.backend
            .upload_indices(&self.labels_host, &mut self.labels)?;
        Ok(())
    }

    /// The forward pass on the device, from the uploaded input.
    fn forward(&mut self, model: &Model) -> Result<()> {
        for (i, w) in model.sparse_layers().enumerate() {
            let k = compiled(w)?;
            let d = &self.layers[i];
            if w.pattern().hash() != d.pattern_hash {
                return Err(stale(w));
            }
            let (before, after) = self.acts.split_at_mut(i);
            let x = if i == 0 { &self.input } else { &before[i - 1] };
            opencl(w, k.spmm)?.run(
                self.launch,
                Args::Spmm {
                    values: &d.values,
                    x,
                    bias: Some(&d.bias),
                    y: &mut after[0],
                },
            )?;
        }
        Ok(())
    }

    /// One training step on the batch in the model's input and label buffers (the first `n`
    /// columns valid): forward, loss, backward (weight gradient by `mode`) and the SGD update
    /// with learning rate `lr`, all on the device. Returns the mean loss.
    pub fn train_step(
        &mut self,
        model: &Model,
        n: usize,
        mode: WeightGradMode,
        sgd: &SgdConfig,
        lr: f32,
    ) -> Result<f64> {
        self.ensure_current(model)?;
        self.upload_batch(model, n)?;
        self.ahead = true;
        self.forward(model)?;
        let last = self.layers.len() - 1;
        let (batch, ld) = (self.launch.batch, self.launch.ld);
        self.kernels.nll_grad(
            self.classes,
            n,
            batch,
            ld,
            &self.acts[last],
            &self.labels,
            &mut self.grads[last],
            &mut self.losses,
        )?;
        self.backend.download(&self.losses, &mut self.losses_host)?;
        let loss = self.losses_host[..n]
            .iter()
            .map(|&l| f64::from(l))
            .sum::<f64>()
            / n as f64;
        let step = SgdStep {
            lr,
            momentum: sgd.momentum,
            weight_decay: sgd.weight_decay,
            nesterov: sgd.nesterov,
        };
        // Every layer has weights (`supports`), so layer i is sparse layer i.
        for i in (0..self.layers.len()).rev() {
            let w = model.layers()[i].weights().ok_or_else(|| {
                RuntimeError::Config(format!("layer {}: no weights", model.layers()[i].name()))
            })?;
            let k = compiled(w)?;
            let (gb, ga) = self.grads.split_at_mut(i);
            let dy = &mut ga[0];
            let x = if i == 0 {
                &self.input
            } else {
                &self.acts[i - 1]
            };
            let d = &mut self.layers[i];
            self.kernels.relu_bias_grad(
                d.rows,
                batch,
                ld,
                d.relu,
                &self.acts[i],
                dy,
                &mut d.sgd.bias_grad,
            )?;
            match mode {
                WeightGradMode::Active => {
                    opencl(w, k.sddmm)?.run(
                        self.launch,
                        Args::Sddmm {
                            dy,
                            x,
                            dw: &mut d.sgd.grad,
                        },
                    )?;
                }
                WeightGradMode::Dense => {
                    let kernel = k.dense_grad.ok_or_else(|| {
                        RuntimeError::Config(format!("layer {}: dense_grad not compiled", d.name))
                    })?;
                    opencl(w, kernel)?.run(
                        self.launch,
                        Args::DenseGrad {
                            dy,
                            x,
                            grad: &mut d.sgd.dense_grad,
                        },
                    )?;
                    self.kernels
                        .gather(&d.sgd.dense_grad, &d.dense_index, &mut d.sgd.grad)?;
                }
            }
            d.sgd.decay.record_backward(mode);
            if i > 0 {
                let t = k.spmm_t.ok_or_else(|| {
                    RuntimeError::Config(format!("layer {}: spmm_t not compiled", d.name))
                })?;
                opencl(w, t)?.run(
                    self.launch,
                    Args::SpmmT {
                        values: &d.values,
                        dy,
                        dx: &mut gb[i - 1],
                    },
                )?;
            }
        }
        let arith = DeviceSgd {
            kernels: &self.kernels,
            step,
        };
        for d in &mut self.layers {
            d.sgd
                .step(&arith, sgd.momentum, &mut d.values, &mut d.bias)?;
        }
        Ok(loss)
    }

    /// The forward pass on the device for the batch in the model's buffers; the logits come
    /// back into the model's logits buffer, and the summed loss and correct predictions over
    /// the first `n` columns are returned.
    pub fn evaluate_batch(&mut self, model: &mut Model, n: usize) -> Result<(f64, usize)> {
        self.ensure_current(model)?;
        self.upload_batch(model, n)?;
        self.forward(model)?;
        let last = self.layers.len() - 1;
        self.backend
            .download(&self.acts[last], model.logits_mut().as_mut_slice())?;
        model.score_logits(n)
    }
}

/// The layer's kernels for its current pattern, or an error naming it.
fn compiled(w: &SparseWeights) -> Result<CompiledOps<'_>> {
    w.compiled_ops().ok_or_else(|| {
        RuntimeError::Config(format!(
            "layer {}: kernels are not compiled for the current pattern",
            w.name()
        ))
    })
}

/// The OpenCL kernel of a compiled runtime kernel.
fn opencl<'a>(
    w: &SparseWeights,
    k: &'a crate::exec::Kernel,
) -> Result<&'a codegen_opencl::OpenClKernel> {
    k.opencl().ok_or_else(|| {
        RuntimeError::Config(format!(
            "layer {}: {} was not compiled for OpenCL",
            w.name(),
            k.spec().op()
        ))
    })
}

fn stale(w: &SparseWeights) -> RuntimeError {
    RuntimeError::Config(format!(
        "layer {}: the device holds another pattern than the host (push after a mask update)",
        w.name()
    ))
}
