//! [`SparseWeights`]: one linear or conv layer's masked weights, made of three parts:
//!
//! - the parameters (`params::WeightParams`): the pattern and mask, the values of active
//!   entries, their dense index, a dense copy of the weights, the bias;
//! - the optimiser state (`optimiser::SgdState`): the gradients of the last backward pass,
//!   the momentum buffers and the lazy decay of the inactive momentum
//!   (`optimiser::LazyDecay`), with the one SGD step (`SgdState::step`) that both the host
//!   ([`SparseWeights::sgd_step`]) and the OpenCL device step (`crate::device`) run;
//! - the kernels (`kernels::LayerKernels`): those compiled for the current pattern, their
//!   [`LayerPlan`] and launch, and a convolution's unrolling.
//!
//! ## Storage
//!
//! The weights of active entries are one `f32` array in the CSR order of the layer's
//! [`Pattern`] (what every kernel reads); the mask is also kept dense (`rows × cols` bytes).
//! Masked entries are implicitly zero, so `w = w ⊙ mask` after every step holds by
//! construction. The momentum of active entries lives beside the values, in CSR order; the
//! momentum of *inactive* entries (needed only by momentum growth at a mask update) lives in a
//! dense `rows × cols` array. Its entries at active positions are stale until
//! [`SparseWeights::sync_dense`] writes the active values back into it.
//!
//! ## Dense momentum, windowed
//!
//! A step that computes the dense weight gradient (see [`WeightGradMode`]) updates the
//! inactive momentum `buf = μ·buf + g`; a step that computes only the gradient of active
//! entries (an SDDMM) leaves the inactive buffers to decay, `buf = μ·buf`, which is applied
//! lazily as one factor `μ^k` at the next dense step or sync.

pub(crate) mod kernels;
pub(crate) mod optimiser;
pub(crate) mod params;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sparse_ir::{Launch, Pattern};

#[cfg(feature = "opencl")]
pub(crate) use kernels::CompiledOps;
use kernels::LayerKernels;
pub use kernels::LayerPlan;
pub use optimiser::SgdConfig;
use optimiser::{HostSgd, SgdState};
use params::WeightParams;

use crate::error::{Result, RuntimeError};
use crate::exec::Executor;

/// Which weight gradient a backward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightGradMode {
    /// Only active entries (an SDDMM on the pattern); inactive momentum decays lazily.
    Active,
    /// Every entry (the dense weight gradient), feeding the momentum of inactive entries.
    Dense,
}

/// The masked weights of one layer: its parameters, optimiser state and kernels (see the
/// [module](self) documentation).
pub struct SparseWeights {
    name: String,
    shape: Vec<usize>,
    params: WeightParams,
    sgd: SgdState<Vec<f32>>,
    kernels: LayerKernels,
    /// Whether the bias is a parameter (otherwise it stays zero, as PyTorch's `bias=False`).
    has_bias: bool,
}

impl std::fmt::Debug for SparseWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseWeights")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .field("nnz", &self.nnz())
            .finish()
    }
}

impl SparseWeights {
    /// A fully dense, zero layer of `rows × cols` (the weight's tensor shape is `shape`, whose
    /// product must be `rows · cols`: `[out, in]` or `[out, in, kh, kw]`).
    pub fn new(name: &str, shape: Vec<usize>, rows: usize, cols: usize) -> Result<Self> {
        if shape.iter().product::<usize>() != rows * cols || rows == 0 || cols == 0 {
            return Err(RuntimeError::Shape(format!(
                "layer {name}: weight shape {shape:?} does not give a {rows}x{cols} matrix"
            )));
        }
        let size = rows * cols;
        let mut w = SparseWeights {
            name: name.to_string(),
            shape,
            params: WeightParams::zeros(rows, cols)?,
            sgd: SgdState {
                grad: Vec::new(),
                bias_grad: vec![0.0; rows],
                dense_grad: vec![0.0; size],
                momentum: Vec::new(),
                bias_momentum: vec![0.0; rows],
                dense_momentum: vec![0.0; size],
                decay: Default::default(),
            },
            kernels: LayerKernels::new(),
            has_bias: true,
        };
        w.rebuild_from_dense()?;
        Ok(w)
    }

    /// Kaiming-uniform initialisation as PyTorch's `Linear`/`Conv2d` defaults: every weight
    /// and bias drawn from `U(−1/√fan_in, 1/√fan_in)` with `fan_in = cols`; masked entries are
    /// then zero (the mask is not changed).
    pub fn init_kaiming_uniform<R: Rng>(&mut self, rng: &mut R) -> Result<()> {
        let bound = 1.0 / (self.params.cols as f32).sqrt();
        for w in &mut self.params.dense_weight {
            *w = rng.random_range(-bound..bound);
        }
        for b in &mut self.params.bias {
            *b = rng.random_range(-bound..bound);
        }
        self.rebuild_from_dense().map(|_| ())
    }

    /// Makes the bias no parameter (PyTorch's `bias=False`): zero, never trained and not
    /// saved in checkpoints.
    pub fn remove_bias(&mut self) {
        self.has_bias = false;
        self.params.bias.fill(0.0);
        self.sgd.bias_momentum.fill(0.0);
    }

    /// Whether the bias is a parameter (see [`remove_bias`](Self::remove_bias)).
    pub fn has_bias(&self) -> bool {
        self.has_bias
    }

    /// The layer name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight's tensor shape (`[out, in]` or `[out, in, kh, kw]`).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Rows of the weight matrix (output features or channels).
    pub fn rows(&self) -> usize {
        self.params.rows
    }

    /// Columns of the weight matrix (`in` or `in·kh·kw`).
    pub fn cols(&self) -> usize {
        self.params.cols
    }

    /// The current pattern.
    pub fn pattern(&self) -> &Arc<Pattern> {
        &self.params.pattern
    }

    /// Active entries.
    pub fn nnz(&self) -> usize {
        self.params.nnz()
    }

    /// `nnz / (rows · cols)`.
    pub fn density(&self) -> f64 {
        self.nnz() as f64 / (self.params.rows * self.params.cols) as f64
    }

    /// The dense row-major 0/1 mask.
    pub fn mask(&self) -> &[u8] {
        &self.params.mask
    }

    /// Weight values of active entries, in CSR order.
    pub fn values(&self) -> &[f32] {
        &self.params.values
    }

    /// Weight values of active entries, mutable (the pattern does not change).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.params.values
    }

    /// Gradient of the active entries from the last backward pass, in CSR order.
    pub fn grad(&self) -> &[f32] {
        &self.sgd.grad
    }

    /// The dense gradient of the last backward pass that computed it (row-major).
    pub fn dense_grad(&self) -> &[f32] {
        &self.sgd.dense_grad
    }

    /// Whether the last backward pass computed the dense gradient.
    pub fn dense_grad_fresh(&self) -> bool {
        self.sgd.decay.dense_grad_fresh()
    }

    /// Momentum of active entries, in CSR order.
    pub fn momentum(&self) -> &[f32] {
        &self.sgd.momentum
    }

    /// The bias.
    pub fn bias(&self) -> &[f32] {
        &self.params.bias
    }

    /// The bias, mutable.
    pub fn bias_mut(&mut self) -> &mut [f32] {
        &mut self.params.bias
    }

    /// The bias gradient of the last backward pass.
    pub fn bias_grad(&self) -> &[f32] {
        &self.sgd.bias_grad
    }

    /// The bias momentum buffer.
    pub fn bias_momentum(&self) -> &[f32] {
        &self.sgd.bias_momentum
    }

    /// Whether the forward kernel applies ReLU after the bias.
    pub fn relu(&self) -> bool {
        self.kernels.relu()
    }

    /// Fuses (or not) ReLU into the forward kernel; the kernels are compiled again.
    pub(crate) fn set_relu(&mut self, relu: bool) {
        self.kernels.set_relu(relu);
    }

    /// Says whether the gradient of this layer's output comes already masked by its fused
    /// ReLU (the next layer applies the mask), so the backward pass skips it.
    pub(crate) fn set_relu_grad_masked(&mut self, masked: bool) {
        self.kernels.set_relu_grad_masked(masked);
    }

    /// Whether the backward pass computes the input gradient; the kernels are compiled
    /// again.
    pub(crate) fn set_needs_dx(&mut self, needs_dx: bool) {
        self.kernels.set_needs_dx(needs_dx);
    }

    /// The plan the layer asks the backend for.
    pub fn requested_plan(&self) -> LayerPlan {
        self.kernels.requested_plan()
    }

    /// The strategies the compiled kernels actually run with (`None` before compiling).
    pub fn compiled_plan(&self) -> Option<LayerPlan> {
        self.kernels.compiled_plan()
    }

    /// The strategies as a map from op name to strategy name (ops that are not compiled,
    /// such as `spmm_t` of a first layer, are left out).
    pub fn strategies(&self) -> BTreeMap<String, String> {
        self.kernels.strategies()
    }

    /// Writes the active values and momentum into the dense arrays and applies the pending
    /// decay of inactive momentum, so that [`dense_weight`](Self::dense_weight) and
    /// [`dense_momentum`](Self::dense_momentum) are complete.
    pub fn sync_dense(&mut self, sgd: &SgdConfig) {
        self.sgd.flush_decay(sgd.momentum);
        let p = &mut self.params;
        p.dense_weight.fill(0.0);
        for (k, &i) in p.dense_index.iter().enumerate() {
            p.dense_weight[i as usize] = p.values[k];
            self.sgd.dense_momentum[i as usize] = self.sgd.momentum[k];
        }
    }

    /// The dense row-major weights (zeros where masked); complete after
    /// [`sync_dense`](Self::sync_dense).
    pub fn dense_weight(&self) -> &[f32] {
        &self.params.dense_weight
    }

    /// The dense momentum; complete after [`sync_dense`](Self::sync_dense).
    pub fn dense_momentum(&self) -> &[f32] {
        &self.sgd.dense_momentum
    }

    /// The view of the dense arrays a mask update works on: weights, mask, momentum and the
    /// last dense gradient (if the last step computed it). Call
    /// [`sync_dense`](Self::sync_dense) first and
    /// [`rebuild_from_dense`](Self::rebuild_from_dense) after the update.
    pub fn masking_view(&mut self) -> crate::masking::LayerView<'_> {
        crate::masking::LayerView {
            name: &self.name,
            rows: self.params.rows,
            cols: self.params.cols,
            weight: &mut self.params.dense_weight,
            mask: &mut self.params.mask,
            momentum: &self.sgd.dense_momentum,
            grad: self
                .sgd
                .decay
                .dense_grad_fresh()
                .then_some(&self.sgd.dense_grad[..]),
        }
    }

    /// Replaces the weights, mask and (optionally) momentum buffers with dense arrays, e.g.
    /// from a checkpoint or a user's file. Weights at masked entries are dropped.
    pub fn set_dense(
        &mut self,
        weight: &[f32],
        mask: &[u8],
        bias: Option<&[f32]>,
        momentum: Option<(&[f32], &[f32])>,
    ) -> Result<()> {
        let (rows, cols) = (self.params.rows, self.params.cols);
        let size = rows * cols;
        let check = |what: &str, got: usize, want: usize| {
            if got != want {
                Err(RuntimeError::Shape(format!(
                    "layer {}: {what} has {got} elements, expected {want}",
                    self.name
                )))
            } else {
                Ok(())
            }
        };
        check("weight", weight.len(), size)?;
        check("mask", mask.len(), size)?;
        if let Some(b) = bias {
            check("bias", b.len(), rows)?;
        }
        if let Some((m, bm)) = momentum {
            check("momentum", m.len(), size)?;
            check("bias momentum", bm.len(), rows)?;
        }
        if let Some((row, col, v)) = mask
            .iter()
            .enumerate()
            .find(|(_, &v)| v > 1)
            .map(|(i, &v)| (i / cols, i % cols, v))
        {
            return Err(RuntimeError::Shape(format!(
                "layer {}: mask value at row {row}, column {col} is {v}, expected 0 or 1",
                self.name
            )));
        }
        self.params.dense_weight.copy_from_slice(weight);
        self.params.mask.copy_from_slice(mask);
        if let Some(b) = bias {
            self.params.bias.copy_from_slice(b);
        }
        if let Some((m, bm)) = momentum {
            self.sgd.dense_momentum.copy_from_slice(m);
            self.sgd.bias_momentum.copy_from_slice(bm);
        }
        self.sgd.decay.reset();
        self.rebuild_from_dense().map(|_| ())
    }

    /// Rebuilds the pattern, the active values and momentum from the dense arrays (after a
    /// mask update). Returns whether the pattern changed; kernels of a changed pattern must
    /// be recompiled ([`compile`](Self::compile)) before the next step.
    pub fn rebuild_from_dense(&mut self) -> Result<bool> {
        let sgd = &mut self.sgd;
        sgd.momentum.clear();
        let changed = self
            .params
            .rebuild_pattern(|i| sgd.momentum.push(sgd.dense_momentum[i]))?;
        sgd.grad.clear();
        sgd.grad.resize(self.params.nnz(), 0.0);
        Ok(changed)
    }

    /// Sets the batch launch of every kernel: `batch` columns with row stride `ld`.
    pub(crate) fn set_launch(&mut self, launch: Launch) {
        self.kernels.set_launch(launch);
    }

    /// Runs the layer as a convolution of this geometry (the convolution ops on the weight
    /// pattern).
    pub(crate) fn set_conv(&mut self, geometry: sparse_ir::ConvGeometry) {
        self.kernels.set_conv(geometry)
    }

    /// The convolution geometry, for a convolution layer.
    pub fn conv_geometry(&self) -> Option<&sparse_ir::ConvGeometry> {
        self.kernels.conv()
    }

    /// Sets the plan to ask for at the next compilation (kernels already compiled stay until
    /// the pattern changes or [`invalidate_kernels`](Self::invalidate_kernels) is called).
    pub fn set_plan(&mut self, plan: LayerPlan) {
        self.kernels.set_plan(plan);
    }

    /// Drops the compiled kernels, so the next [`compile`](Self::compile) compiles afresh.
    pub fn invalidate_kernels(&mut self) {
        self.kernels.invalidate();
    }

    /// Whether the kernels are missing or compiled for another pattern.
    pub fn needs_compile(&self) -> bool {
        self.kernels.needs_compile(self.params.pattern.hash())
    }

    /// Compiles the kernels of the current pattern if they are missing or stale; returns the
    /// compilation time (zero if nothing was compiled).
    pub fn compile(&mut self, exec: &Executor) -> Result<Duration> {
        self.kernels.compile(&self.name, &self.params.pattern, exec)
    }

    /// `y = W·x + bias` (ReLU if fused), on `cols × ld` and `rows × ld` buffers (for an
    /// unrolled convolution: `[C·H·W × ld]` and `[out·P × ld]`).
    pub(crate) fn forward(&mut self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.kernels.forward(&self.name, &self.params, x, y)
    }

    /// The backward pass given the upstream gradient `dy` (of the layer's output, after the
    /// fused ReLU): masks `dy` by the ReLU (in place), computes the bias gradient, the weight
    /// gradient by `mode`, and `dx = Wᵀ·dy` if asked for.
    pub(crate) fn backward(
        &mut self,
        x: &[f32],
        y: &[f32],
        dy: &mut [f32],
        dx: Option<&mut [f32]>,
        mode: WeightGradMode,
    ) -> Result<()> {
        self.kernels
            .backward(&self.name, &self.params, &mut self.sgd, x, y, dy, dx, mode)
    }

    /// One SGD step on the active weights, the bias and (after a dense backward pass) the
    /// momentum of inactive entries: `g' = g + λ·w`, `buf = μ·buf + g'`,
    /// `w = w − lr·(g' + μ·buf)` (Nesterov) or `w = w − lr·buf`.
    pub fn sgd_step(&mut self, cfg: &SgdConfig, lr: f32) {
        let host = HostSgd { config: cfg, lr };
        if !self.has_bias {
            // A zero bias with a zero gradient stays zero.
            self.sgd.bias_grad.fill(0.0);
        }
        let p = &mut self.params;
        let Ok(()) = self
            .sgd
            .step(&host, cfg.momentum, &mut p.values, &mut p.bias);
    }

    #[cfg(feature = "opencl")]
    /// Whether the layer is a convolution.
    pub(crate) fn is_conv(&self) -> bool {
        self.kernels.conv().is_some()
    }

    #[cfg(feature = "opencl")]
    /// The kernels compiled for the current pattern (`None` when stale or missing).
    pub(crate) fn compiled_ops(&self) -> Option<CompiledOps<'_>> {
        self.kernels.compiled_ops(self.params.pattern.hash())
    }

    #[cfg(feature = "opencl")]
    /// The parameters and the optimiser state, for a device that keeps them during an epoch
    /// (see `crate::device`).
    pub(crate) fn training_state(&self) -> (&WeightParams, &SgdState<Vec<f32>>) {
        (&self.params, &self.sgd)
    }

    #[cfg(feature = "opencl")]
    /// The parameters and the optimiser state, mutable (for a device that brings its steps
    /// back).
    pub(crate) fn training_state_mut(&mut self) -> (&mut WeightParams, &mut SgdState<Vec<f32>>) {
        (&mut self.params, &mut self.sgd)
    }

    /// The gradients of the last backward pass, mutable: the nonzero weights' (CSR order),
    /// the bias's and the dense weight gradient (for data-parallel training, which sums them
    /// over the ranks before the step).
    pub(crate) fn grads_mut(&mut self) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let s = &mut self.sgd;
        (&mut s.grad, &mut s.bias_grad, &mut s.dense_grad)
    }

    /// Sets the nonzero weights' gradient from the dense gradient (after the dense gradient
    /// alone was summed over the ranks of a data-parallel run).
    pub(crate) fn active_grad_from_dense(&mut self) {
        let s = &mut self.sgd;
        for (g, &i) in s.grad.iter_mut().zip(&self.params.dense_index) {
            *g = s.dense_grad[i as usize];
        }
    }

    /// Scales the gradient (values and bias) — for users composing their own losses.
    pub fn scale_grad(&mut self, factor: f32) {
        for g in self
            .sgd
            .grad
            .iter_mut()
            .chain(self.sgd.bias_grad.iter_mut())
        {
            *g *= factor;
        }
    }
}
