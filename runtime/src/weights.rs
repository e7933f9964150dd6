//! [`SparseWeights`]: the masked weight matrix of one linear or conv layer, its bias, their
//! gradients and momentum buffers, and the kernels compiled for its current pattern.
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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sparse_ir::{Args, BackendError, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

use crate::error::{Result, RuntimeError};
use crate::exec::{Executor, Kernel};

/// Which weight gradient a backward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightGradMode {
    /// Only active entries (an SDDMM on the pattern); inactive momentum decays lazily.
    Active,
    /// Every entry (the dense weight gradient), feeding the momentum of inactive entries.
    Dense,
}

/// The strategy each op of one layer runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerPlan {
    /// Forward (`spmm` with its epilogue).
    pub spmm: Strategy,
    /// Backward data (`spmm_t`).
    pub spmm_t: Strategy,
    /// Weight gradient of active entries (`sddmm`).
    pub sddmm: Strategy,
    /// Dense weight gradient (`dense_grad`).
    pub dense_grad: Strategy,
}

impl LayerPlan {
    /// The same strategy for every op.
    pub fn uniform(strategy: Strategy) -> Self {
        LayerPlan {
            spmm: strategy,
            spmm_t: strategy,
            sddmm: strategy,
            dense_grad: strategy,
        }
    }

    /// The plan as a map from IR op name to strategy name.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        [
            ("spmm", self.spmm),
            ("spmm_t", self.spmm_t),
            ("sddmm", self.sddmm),
            ("dense_grad", self.dense_grad),
        ]
        .into_iter()
        .map(|(op, s)| (op.to_string(), s.name().to_string()))
        .collect()
    }

    /// Reads a map written by [`LayerPlan::to_map`]; missing ops take `auto`.
    pub fn from_map(map: &BTreeMap<String, String>) -> std::result::Result<Self, String> {
        let get = |op: &str| -> std::result::Result<Strategy, String> {
            map.get(op).map_or(Ok(Strategy::Auto), |s| s.parse())
        };
        for op in map.keys() {
            if !["spmm", "spmm_t", "sddmm", "dense_grad"].contains(&op.as_str()) {
                return Err(format!("unknown op {op:?} in plan"));
            }
        }
        Ok(LayerPlan {
            spmm: get("spmm")?,
            spmm_t: get("spmm_t")?,
            sddmm: get("sddmm")?,
            dense_grad: get("dense_grad")?,
        })
    }
}

impl Default for LayerPlan {
    fn default() -> Self {
        LayerPlan::uniform(Strategy::Auto)
    }
}

/// Hyper-parameters of SGD with (Nesterov) momentum and weight decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Momentum μ (0.9).
    pub momentum: f32,
    /// Weight decay λ (5e-4), applied to weights and biases.
    pub weight_decay: f32,
    /// Nesterov momentum (true).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: true,
        }
    }
}

/// The geometry of a convolution whose weight matrix is unrolled (see [`Unroll`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    /// Input channels, height, width.
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Kernel size, stride, zero padding.
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    /// Output height and width.
    pub out_h: usize,
    pub out_w: usize,
}

/// A convolution as one sparse matrix on the feature-major activations (a direct sparse
/// convolution): the unrolled pattern `U` of `[out·P × C·H·W]` (`P = OH·OW` output
/// positions) has, in row `(o, p)`, one entry per active weight `(o, c, ki, kj)` whose tap
/// falls inside the input, at input row `(c, ih, iw)`. Then `Y = U·X` is the convolution with
/// no im2col buffer, `dX = Uᵀ·dY` needs no col2im, and the weight gradient is the SDDMM on `U`
/// summed over positions. `U`'s values and bias are gathered from the weights before each
/// forward pass. Only the dense gradient (window steps) goes through im2col.
struct Unroll {
    geometry: ConvGeometry,
    /// Launch of the dense gradient on `[out × C·k·k]` with the im2col matrix (`P·ld` columns).
    dense_launch: Launch,
    /// Weight-pattern hash `U` was built for.
    built_for: Option<u64>,
    pattern: Arc<Pattern>,
    /// Weight index (CSR position in the weight values) of every entry of `U`.
    src: Vec<u32>,
    values: Vec<f32>,
    bias: Vec<f32>,
    grad: Vec<f32>,
}

impl Unroll {
    fn positions(&self) -> usize {
        self.geometry.out_h * self.geometry.out_w
    }

    /// Builds `U` for `weights` (rows = output channels, cols = `C·k·k`).
    fn build(&mut self, weights: &Pattern) -> Result<()> {
        let g = self.geometry;
        let p_count = self.positions();
        let rows = weights.rows() * p_count;
        let cols = g.channels * g.height * g.width;
        let mut row_ptr = Vec::with_capacity(rows + 1);
        let mut col_idx = Vec::with_capacity(weights.nnz() * p_count);
        let mut src = Vec::with_capacity(weights.nnz() * p_count);
        row_ptr.push(0u32);
        for o in 0..weights.rows() {
            let range = weights.row_range(o);
            for oh in 0..g.out_h {
                for ow in 0..g.out_w {
                    // Taps in (c, ki, kj) order have increasing input rows: sorted CSR.
                    for k in range.clone() {
                        let q = weights.col_idx()[k] as usize;
                        let (c, ki, kj) = (q / (g.k * g.k), (q / g.k) % g.k, q % g.k);
                        let ih = (oh * g.stride + ki) as isize - g.padding as isize;
                        let iw = (ow * g.stride + kj) as isize - g.padding as isize;
                        if ih < 0 || iw < 0 || ih >= g.height as isize || iw >= g.width as isize {
                            continue;
                        }
                        col_idx.push(((c * g.height + ih as usize) * g.width + iw as usize) as u32);
                        src.push(k as u32);
                    }
                    row_ptr.push(col_idx.len() as u32);
                }
            }
        }
        self.pattern = Arc::new(Pattern::from_csr(rows, cols, row_ptr, col_idx)?);
        self.values.clear();
        self.values.resize(src.len(), 0.0);
        self.grad.clear();
        self.grad.resize(src.len(), 0.0);
        self.bias.clear();
        self.bias.resize(rows, 0.0);
        self.src = src;
        self.built_for = Some(weights.hash());
        Ok(())
    }

    /// Copies the weights and bias into `U`'s value and bias arrays.
    fn refresh(&mut self, values: &[f32], bias: &[f32]) {
        for (u, &k) in self.values.iter_mut().zip(&self.src) {
            *u = values[k as usize];
        }
        let p = self.positions();
        for (chunk, &b) in self.bias.chunks_exact_mut(p).zip(bias) {
            chunk.fill(b);
        }
    }
}

struct CompiledKernels {
    pattern_hash: u64,
    spmm: Kernel,
    spmm_t: Option<Kernel>,
    sddmm: Kernel,
}

#[cfg(feature = "opencl")]
/// The kernels of one layer for its current pattern.
pub(crate) struct LayerKernels<'a> {
    pub spmm: &'a Kernel,
    pub spmm_t: Option<&'a Kernel>,
    pub sddmm: &'a Kernel,
    pub dense_grad: Option<&'a Kernel>,
}

#[cfg(feature = "opencl")]
/// What [`SparseWeights::sgd_step`] updates: active values and momentum (CSR order), bias and
/// its momentum, the dense momentum with its pending decay, and the last dense gradient.
pub(crate) struct OptimiserState<'a> {
    pub values: &'a mut [f32],
    pub momentum: &'a mut [f32],
    pub bias: &'a mut [f32],
    pub bias_momentum: &'a mut [f32],
    pub dense_momentum: &'a mut [f32],
    pub dense_grad: &'a mut [f32],
    pub lazy_steps: &'a mut u32,
    pub dense_grad_fresh: &'a mut bool,
}

/// The masked weights of one layer and everything that goes with them.
pub struct SparseWeights {
    name: String,
    shape: Vec<usize>,
    rows: usize,
    cols: usize,
    relu: bool,
    needs_dx: bool,
    pattern: Arc<Pattern>,
    mask: Vec<u8>,
    values: Vec<f32>,
    dense_index: Vec<u32>,
    grad: Vec<f32>,
    momentum: Vec<f32>,
    dense_weight: Vec<f32>,
    dense_momentum: Vec<f32>,
    dense_grad: Vec<f32>,
    dense_grad_fresh: bool,
    lazy_steps: u32,
    bias: Vec<f32>,
    bias_grad: Vec<f32>,
    bias_momentum: Vec<f32>,
    launch: Option<Launch>,
    plan: LayerPlan,
    kernels: Option<CompiledKernels>,
    dense_grad_kernel: Option<Kernel>,
    unroll: Option<Box<Unroll>>,
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
            rows,
            cols,
            relu: false,
            needs_dx: true,
            pattern: Arc::new(Pattern::empty(rows, cols)?),
            mask: vec![1; size],
            values: Vec::new(),
            dense_index: Vec::new(),
            grad: Vec::new(),
            momentum: Vec::new(),
            dense_weight: vec![0.0; size],
            dense_momentum: vec![0.0; size],
            dense_grad: vec![0.0; size],
            dense_grad_fresh: false,
            lazy_steps: 0,
            bias: vec![0.0; rows],
            bias_grad: vec![0.0; rows],
            bias_momentum: vec![0.0; rows],
            launch: None,
            plan: LayerPlan::default(),
            kernels: None,
            dense_grad_kernel: None,
            unroll: None,
        };
        w.rebuild_from_dense()?;
        Ok(w)
    }

    /// Kaiming-uniform initialisation as PyTorch's `Linear`/`Conv2d` defaults: every weight
    /// and bias drawn from `U(−1/√fan_in, 1/√fan_in)` with `fan_in = cols`; masked entries are
    /// then zero (the mask is not changed).
    pub fn init_kaiming_uniform<R: Rng>(&mut self, rng: &mut R) -> Result<()> {
        let bound = 1.0 / (self.cols as f32).sqrt();
        for w in &mut self.dense_weight {
            *w = rng.random_range(-bound..bound);
        }
        for b in &mut self.bias {
            *b = rng.random_range(-bound..bound);
        }
        self.rebuild_from_dense().map(|_| ())
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
        self.rows
    }

    /// Columns of the weight matrix (`in` or `in·kh·kw`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The current pattern.
    pub fn pattern(&self) -> &Arc<Pattern> {
        &self.pattern
    }

    /// Active entries.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// `nnz / (rows · cols)`.
    pub fn density(&self) -> f64 {
        self.nnz() as f64 / (self.rows * self.cols) as f64
    }

    /// The dense row-major 0/1 mask.
    pub fn mask(&self) -> &[u8] {
        &self.mask
    }

    /// Weight values of active entries, in CSR order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Weight values of active entries, mutable (the pattern does not change).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Gradient of the active entries from the last backward pass, in CSR order.
    pub fn grad(&self) -> &[f32] {
        &self.grad
    }

    /// The dense gradient of the last backward pass that computed it (row-major).
    pub fn dense_grad(&self) -> &[f32] {
        &self.dense_grad
    }

    /// Whether the last backward pass computed the dense gradient.
    pub fn dense_grad_fresh(&self) -> bool {
        self.dense_grad_fresh
    }

    /// Momentum of active entries, in CSR order.
    pub fn momentum(&self) -> &[f32] {
        &self.momentum
    }

    /// The bias.
    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// The bias, mutable.
    pub fn bias_mut(&mut self) -> &mut [f32] {
        &mut self.bias
    }

    /// The bias gradient of the last backward pass.
    pub fn bias_grad(&self) -> &[f32] {
        &self.bias_grad
    }

    /// The bias momentum buffer.
    pub fn bias_momentum(&self) -> &[f32] {
        &self.bias_momentum
    }

    /// Whether the forward kernel applies ReLU after the bias.
    pub fn relu(&self) -> bool {
        self.relu
    }

    pub(crate) fn set_relu(&mut self, relu: bool) {
        self.relu = relu;
        self.kernels = None;
    }

    pub(crate) fn set_needs_dx(&mut self, needs_dx: bool) {
        self.needs_dx = needs_dx;
        self.kernels = None;
    }

    /// The plan the layer asks the backend for.
    pub fn requested_plan(&self) -> LayerPlan {
        self.plan
    }

    /// The strategies the compiled kernels actually run with (`None` before compiling).
    pub fn compiled_plan(&self) -> Option<LayerPlan> {
        let k = self.kernels.as_ref()?;
        Some(LayerPlan {
            spmm: k.spmm.strategy(),
            spmm_t: k.spmm_t.as_ref().map_or(Strategy::Auto, Kernel::strategy),
            sddmm: k.sddmm.strategy(),
            dense_grad: self
                .dense_grad_kernel
                .as_ref()
                .map_or(Strategy::Auto, Kernel::strategy),
        })
    }

    /// The strategies as a map from op name to strategy name (ops that are not compiled,
    /// such as `spmm_t` of a first layer, are left out).
    pub fn strategies(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        if let Some(k) = &self.kernels {
            map.insert("spmm".into(), k.spmm.strategy().name().into());
            if let Some(t) = &k.spmm_t {
                map.insert("spmm_t".into(), t.strategy().name().into());
            }
            map.insert("sddmm".into(), k.sddmm.strategy().name().into());
        }
        if let Some(d) = &self.dense_grad_kernel {
            map.insert("dense_grad".into(), d.strategy().name().into());
        }
        map
    }

    /// Writes the active values and momentum into the dense arrays and applies the pending
    /// decay of inactive momentum, so that [`dense_weight`](Self::dense_weight) and
    /// [`dense_momentum`](Self::dense_momentum) are complete.
    pub fn sync_dense(&mut self, sgd: &SgdConfig) {
        self.flush_lazy_decay(sgd.momentum);
        self.dense_weight.fill(0.0);
        for (k, &i) in self.dense_index.iter().enumerate() {
            self.dense_weight[i as usize] = self.values[k];
            self.dense_momentum[i as usize] = self.momentum[k];
        }
    }

    fn flush_lazy_decay(&mut self, mu: f32) {
        if self.lazy_steps > 0 {
            let factor = mu.powi(self.lazy_steps as i32);
            for m in &mut self.dense_momentum {
                *m *= factor;
            }
            self.lazy_steps = 0;
        }
    }

    /// The dense row-major weights (zeros where masked); complete after
    /// [`sync_dense`](Self::sync_dense).
    pub fn dense_weight(&self) -> &[f32] {
        &self.dense_weight
    }

    /// The dense momentum; complete after [`sync_dense`](Self::sync_dense).
    pub fn dense_momentum(&self) -> &[f32] {
        &self.dense_momentum
    }

    /// The view of the dense arrays a mask update works on: weights, mask, momentum and the
    /// last dense gradient (if the last step computed it). Call
    /// [`sync_dense`](Self::sync_dense) first and
    /// [`rebuild_from_dense`](Self::rebuild_from_dense) after the update.
    pub fn masking_view(&mut self) -> crate::masking::LayerView<'_> {
        crate::masking::LayerView {
            name: &self.name,
            rows: self.rows,
            cols: self.cols,
            weight: &mut self.dense_weight,
            mask: &mut self.mask,
            momentum: &self.dense_momentum,
            grad: self.dense_grad_fresh.then_some(&self.dense_grad[..]),
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
        let size = self.rows * self.cols;
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
            check("bias", b.len(), self.rows)?;
        }
        if let Some((m, bm)) = momentum {
            check("momentum", m.len(), size)?;
            check("bias momentum", bm.len(), self.rows)?;
        }
        if let Some((row, col, v)) = mask
            .iter()
            .enumerate()
            .find(|(_, &v)| v > 1)
            .map(|(i, &v)| (i / self.cols, i % self.cols, v))
        {
            return Err(RuntimeError::Shape(format!(
                "layer {}: mask value at row {row}, column {col} is {v}, expected 0 or 1",
                self.name
            )));
        }
        self.dense_weight.copy_from_slice(weight);
        self.mask.copy_from_slice(mask);
        if let Some(b) = bias {
            self.bias.copy_from_slice(b);
        }
        if let Some((m, bm)) = momentum {
            self.dense_momentum.copy_from_slice(m);
            self.bias_momentum.copy_from_slice(bm);
        }
        self.lazy_steps = 0;
        self.dense_grad_fresh = false;
        self.rebuild_from_dense().map(|_| ())
    }

    /// Rebuilds the pattern, the active values and momentum from the dense arrays (after a
    /// mask update). Returns whether the pattern changed; kernels of a changed pattern must
    /// be recompiled ([`compile`](Self::compile)) before the next step.
    pub fn rebuild_from_dense(&mut self) -> Result<bool> {
        let pattern = Pattern::from_dense_mask(self.rows, self.cols, &self.mask)?;
        let changed = pattern != *self.pattern;
        let nnz = pattern.nnz();
        self.dense_index.clear();
        self.values.clear();
        self.momentum.clear();
        for r in 0..self.rows {
            for &c in pattern.row(r) {
                let i = r * self.cols + c as usize;
                self.dense_index.push(i as u32);
                self.values.push(self.dense_weight[i]);
                self.momentum.push(self.dense_momentum[i]);
            }
        }
        for (i, w) in self.dense_weight.iter_mut().enumerate() {
            if self.mask[i] == 0 {
                *w = 0.0;
            }
        }
        self.grad.clear();
        self.grad.resize(nnz, 0.0);
        self.pattern = Arc::new(pattern);
        Ok(changed)
    }

    /// Sets the batch launch of every kernel: `batch` columns with row stride `ld`.
    pub(crate) fn set_launch(&mut self, launch: Launch) {
        if self.launch != Some(launch) {
            self.launch = Some(launch);
            self.kernels = None;
            self.dense_grad_kernel = None;
        }
    }

    /// Runs the layer as a direct sparse convolution of this geometry (see [`Unroll`]): the
    /// kernels get the batch launch of [`set_launch`](Self::set_launch), the dense gradient
    /// `dense_launch` (im2col columns).
    pub(crate) fn set_unroll(
        &mut self,
        geometry: ConvGeometry,
        dense_launch: Launch,
    ) -> Result<()> {
        self.unroll = Some(Box::new(Unroll {
            geometry,
            dense_launch,
            built_for: None,
            pattern: Arc::new(Pattern::empty(0, 0)?),
            src: Vec::new(),
            values: Vec::new(),
            bias: Vec::new(),
            grad: Vec::new(),
        }));
        self.kernels = None;
        self.dense_grad_kernel = None;
        Ok(())
    }

    /// The pattern the kernels run on: the weights', or the unrolled convolution's.
    pub fn kernel_pattern(&self) -> &Arc<Pattern> {
        match &self.unroll {
            Some(u) if u.built_for == Some(self.pattern.hash()) => &u.pattern,
            _ => &self.pattern,
        }
    }

    /// Sets the plan to ask for at the next compilation (kernels already compiled stay until
    /// the pattern changes or [`invalidate_kernels`](Self::invalidate_kernels) is called).
    pub fn set_plan(&mut self, plan: LayerPlan) {
        self.plan = plan;
    }

    /// Drops the compiled kernels, so the next [`compile`](Self::compile) compiles afresh.
    pub fn invalidate_kernels(&mut self) {
        self.kernels = None;
        self.dense_grad_kernel = None;
    }

    /// Whether the kernels are missing or compiled for another pattern.
    pub fn needs_compile(&self) -> bool {
        match &self.kernels {
            None => true,
            Some(k) => k.pattern_hash != self.pattern.hash() || self.dense_grad_kernel.is_none(),
        }
    }

    /// Compiles the kernels of the current pattern if they are missing or stale; returns the
    /// compilation time (zero if nothing was compiled).
    pub fn compile(&mut self, exec: &Executor) -> Result<Duration> {
        if !self.needs_compile() {
            return Ok(Duration::ZERO);
        }
        let launch = self.launch.ok_or_else(|| {
            RuntimeError::Config(format!(
                "layer {}: compiled before its batch was set",
                self.name
            ))
        })?;
        let start = std::time::Instant::now();
        let weight_hash = self.pattern.hash();
        let pattern = match &mut self.unroll {
            Some(u) => {
                if u.built_for != Some(weight_hash) {
                    u.build(&self.pattern)?;
                }
                u.pattern.clone()
            }
            None => self.pattern.clone(),
        };
        let dense_launch = self.unroll.as_ref().map_or(launch, |u| u.dense_launch);
        let spec_at = |op: Op, pattern: Arc<Pattern>, l: Launch| {
            KernelSpec::new(
                self.name.clone(),
                op,
                pattern,
                Dim::Fixed(l.batch),
                Dim::Fixed(l.ld),
            )
        };
        let spec = |op: Op, pattern: Arc<Pattern>| spec_at(op, pattern, launch);
        let fwd = Op::Spmm {
            bias: true,
            relu: self.relu,
        };
        let spmm = compile_with_fallback(exec, &spec(fwd, pattern.clone())?, self.plan.spmm)?;
        let spmm_t = if self.needs_dx {
            Some(compile_with_fallback(
                exec,
                &spec(Op::SpmmT, pattern.clone())?,
                self.plan.spmm_t,
            )?)
        } else {
            None
        };
        let sddmm =
            compile_with_fallback(exec, &spec(Op::Sddmm, pattern.clone())?, self.plan.sddmm)?;
        if self.dense_grad_kernel.is_none() {
            // The dense gradient does not depend on the mask: compiled once per layer, on the
            // full pattern of the shape.
            let empty = Arc::new(Pattern::dense(self.rows, self.cols)?);
            self.dense_grad_kernel = Some(compile_with_fallback(
                exec,
                &spec_at(Op::DenseGrad, empty, dense_launch)?,
                self.plan.dense_grad,
            )?);
        }
        self.kernels = Some(CompiledKernels {
            pattern_hash: weight_hash,
            spmm,
            spmm_t,
            sddmm,
        });
        Ok(start.elapsed())
    }

    /// `y = W·x + bias` (ReLU if fused), on `cols × ld` and `rows × ld` buffers (for an
    /// unrolled convolution: `[C·H·W × ld]` and `[out·P × ld]`).
    pub(crate) fn forward(&mut self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (launch, hash) = (self.launch, self.pattern.hash());
        let (k, launch) = match (&self.kernels, launch) {
            (Some(k), Some(l)) if k.pattern_hash == hash => (k, l),
            _ => return Err(self.not_compiled()),
        };
        let (values, bias) = match &mut self.unroll {
            Some(u) => {
                u.refresh(&self.values, &self.bias);
                (&u.values, &u.bias)
            }
            None => (&self.values, &self.bias),
        };
        k.spmm.run(
            launch,
            Args::Spmm {
                values,
                x,
                bias: Some(bias),
                y,
            },
        )?;
        Ok(())
    }

    fn not_compiled(&self) -> RuntimeError {
        RuntimeError::Config(format!(
            "layer {}: kernels are not compiled for the current pattern",
            self.name
        ))
    }

    /// The backward pass given the upstream gradient `dy` (of the layer's output, after the
    /// fused ReLU): masks `dy` by the ReLU (in place), computes the bias gradient, the weight
    /// gradient by `mode`, and `dx = Wᵀ·dy` if asked for. An unrolled convolution needs the
    /// im2col matrix `xcol` for the dense gradient.
    pub(crate) fn backward(
        &mut self,
        x: &[f32],
        xcol: Option<&[f32]>,
        y: &[f32],
        dy: &mut [f32],
        dx: Option<&mut [f32]>,
        mode: WeightGradMode,
    ) -> Result<()> {
        let (launch, hash) = (self.launch, self.pattern.hash());
        let (k, launch) = match (&self.kernels, launch) {
            (Some(k), Some(l)) if k.pattern_hash == hash => (k, l),
            _ => return Err(self.not_compiled()),
        };
        // The ReLU mask and the bias gradient in one pass, row by row (each row is still in
        // L1 when it is summed). Branch-free select: NaN or ≤ 0 means inactive.
        let (ld, batch, relu) = (launch.ld, launch.batch, self.relu);
        let mut sums = dy.chunks_mut(ld).zip(y.chunks(ld)).map(|(d, out)| {
            if relu {
                for (d, &out) in d.iter_mut().zip(out) {
                    *d = if out > 0.0 { *d } else { 0.0 };
                }
            }
            row_sum(&d[..batch.min(d.len())])
        });
        match &self.unroll {
            Some(u) => {
                let p = u.positions();
                for g in self.bias_grad.iter_mut() {
                    *g = sums.by_ref().take(p).sum();
                }
            }
            None => {
                for g in self.bias_grad.iter_mut() {
                    *g = sums.next().unwrap_or(0.0);
                }
            }
        }
        // Rows past the bias (none in a well-formed buffer) still get the ReLU mask.
        sums.for_each(drop);
        match mode {
            WeightGradMode::Active => {
                match &mut self.unroll {
                    Some(u) => {
                        k.sddmm.run(
                            launch,
                            Args::Sddmm {
                                dy,
                                x,
                                dw: &mut u.grad,
                            },
                        )?;
                        self.grad.fill(0.0);
                        for (&g, &w) in u.grad.iter().zip(&u.src) {
                            self.grad[w as usize] += g;
                        }
                    }
                    None => k.sddmm.run(
                        launch,
                        Args::Sddmm {
                            dy,
                            x,
                            dw: &mut self.grad,
                        },
                    )?,
                }
                self.dense_grad_fresh = false;
            }
            WeightGradMode::Dense => {
                let kernel = self.dense_grad_kernel.as_ref().ok_or_else(|| {
                    RuntimeError::Config(format!("layer {}: dense_grad not compiled", self.name))
                })?;
                let (x, dense_launch) = match &self.unroll {
                    Some(u) => (
                        xcol.ok_or_else(|| {
                            RuntimeError::Config(format!(
                                "layer {}: the dense gradient needs the im2col matrix",
                                self.name
                            ))
                        })?,
                        u.dense_launch,
                    ),
                    None => (x, launch),
                };
                kernel.run(
                    dense_launch,
                    Args::DenseGrad {
                        dy,
                        x,
                        grad: &mut self.dense_grad,
                    },
                )?;
                for (g, &i) in self.grad.iter_mut().zip(&self.dense_index) {
                    *g = self.dense_grad[i as usize];
                }
                self.dense_grad_fresh = true;
            }
        }
        if let Some(dx) = dx {
            let t = k.spmm_t.as_ref().ok_or_else(|| {
                RuntimeError::Config(format!(
                    "layer {}: asked for the input gradient of a layer built without it",
                    self.name
                ))
            })?;
            let values = match &self.unroll {
                Some(u) => &u.values,
                None => &self.values,
            };
            t.run(launch, Args::SpmmT { values, dy, dx })?;
        }
        Ok(())
    }

    /// One SGD step on the active weights, the bias and (after a dense backward pass) the
    /// momentum of inactive entries: `g' = g + λ·w`, `buf = μ·buf + g'`,
    /// `w = w − lr·(g' + μ·buf)` (Nesterov) or `w = w − lr·buf`.
    pub fn sgd_step(&mut self, cfg: &SgdConfig, lr: f32) {
        sgd_update(cfg, lr, &mut self.values, &self.grad, &mut self.momentum);
        sgd_update(
            cfg,
            lr,
            &mut self.bias,
            &self.bias_grad,
            &mut self.bias_momentum,
        );
        let mu = cfg.momentum;
        if self.dense_grad_fresh {
            // Inactive entries have w = 0, so g' = g. Entries at active positions are stale
            // and are overwritten by `sync_dense`, so the update runs branch-free over all.
            let factor = mu.powi(self.lazy_steps as i32 + 1);
            for (m, &g) in self.dense_momentum.iter_mut().zip(&self.dense_grad) {
                *m = factor * *m + g;
            }
            self.lazy_steps = 0;
        } else {
            self.lazy_steps += 1;
        }
    }

    #[cfg(feature = "opencl")]
    /// Whether the layer runs as an unrolled convolution (its kernels' pattern is not the
    /// weights').
    pub(crate) fn is_unrolled(&self) -> bool {
        self.unroll.is_some()
    }

    #[cfg(feature = "opencl")]
    /// The kernels compiled for the current pattern (`None` when stale or missing).
    pub(crate) fn compiled_kernels(&self) -> Option<LayerKernels<'_>> {
        let k = self.kernels.as_ref()?;
        if k.pattern_hash != self.pattern.hash() {
            return None;
        }
        Some(LayerKernels {
            spmm: &k.spmm,
            spmm_t: k.spmm_t.as_ref(),
            sddmm: &k.sddmm,
            dense_grad: self.dense_grad_kernel.as_ref(),
        })
    }

    #[cfg(feature = "opencl")]
    /// The row-major index of every active entry, in CSR order.
    pub(crate) fn dense_index(&self) -> &[u32] {
        &self.dense_index
    }

    #[cfg(feature = "opencl")]
    /// The optimiser's state, for a device that keeps it during an epoch (see
    /// `crate::device`): the arrays [`sgd_step`](Self::sgd_step) updates and its counters.
    pub(crate) fn optimiser_state_mut(&mut self) -> OptimiserState<'_> {
        OptimiserState {
            values: &mut self.values,
            momentum: &mut self.momentum,
            bias: &mut self.bias,
            bias_momentum: &mut self.bias_momentum,
            dense_momentum: &mut self.dense_momentum,
            dense_grad: &mut self.dense_grad,
            lazy_steps: &mut self.lazy_steps,
            dense_grad_fresh: &mut self.dense_grad_fresh,
        }
    }

    #[cfg(feature = "opencl")]
    /// The state of [`optimiser_state_mut`](Self::optimiser_state_mut), read-only:
    /// `(lazy_steps, dense_grad_fresh)`.
    pub(crate) fn optimiser_counters(&self) -> (u32, bool) {
        (self.lazy_steps, self.dense_grad_fresh)
    }

    /// Scales the gradient (values and bias) — for users composing their own losses.
    pub fn scale_grad(&mut self, factor: f32) {
        for g in self.grad.iter_mut().chain(self.bias_grad.iter_mut()) {
            *g *= factor;
        }
    }
}

fn sgd_update(cfg: &SgdConfig, lr: f32, w: &mut [f32], grad: &[f32], buf: &mut [f32]) {
    let (mu, wd) = (cfg.momentum, cfg.weight_decay);
    if cfg.nesterov {
        for ((w, &g), m) in w.iter_mut().zip(grad).zip(buf.iter_mut()) {
            let g = g + wd * *w;
            *m = mu * *m + g;
            *w -= lr * (g + mu * *m);
        }
    } else {
        for ((w, &g), m) in w.iter_mut().zip(grad).zip(buf.iter_mut()) {
            let g = g + wd * *w;
            *m = mu * *m + g;
            *w -= lr * *m;
        }
    }
}

fn compile_with_fallback(
    exec: &Executor,
    spec: &KernelSpec,
    strategy: Strategy,
) -> Result<Kernel, BackendError> {
    match exec.compile(spec, strategy) {
        Err(BackendError::Unsupported { reason, .. }) if strategy != Strategy::Auto => {
            tracing::warn!(
                layer = spec.layer(),
                op = spec.op().name(),
                "strategy {strategy} cannot run this op ({reason}); using auto"
            );
            exec.compile(spec, Strategy::Auto)
        }
        other => other,
    }
}

/// Sum of a row with 8 independent accumulators (vectorises; deterministic order).
pub(crate) fn row_sum(row: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut total =
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in rest {
        total += v;
    }
    total
}
