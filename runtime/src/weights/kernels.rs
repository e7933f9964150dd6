//! [`LayerKernels`]: the kernels one layer runs, compiled for its current weight pattern
//! (keyed by the pattern's hash), the plan they are compiled with, and, for a convolution,
//! the unrolled pattern they run on ([`ConvUnrolling`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sparse_ir::{Args, BackendError, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

use super::optimiser::SgdState;
use super::params::WeightParams;
use super::WeightGradMode;
use crate::error::{Result, RuntimeError};
use crate::exec::{Executor, Kernel};

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

/// The geometry of a convolution whose weight matrix is unrolled (see [`ConvUnrolling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    /// Input channels.
    pub channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Kernel size (`k × k`).
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding.
    pub padding: usize,
    /// Output height.
    pub out_h: usize,
    /// Output width.
    pub out_w: usize,
}

/// A convolution as one sparse matrix on the feature-major activations (a direct sparse
/// convolution): the unrolled pattern `U` of `[out·P × C·H·W]` (`P = OH·OW` output
/// positions) has, in row `(o, p)`, one entry per active weight `(o, c, ki, kj)` whose tap
/// falls inside the input, at input row `(c, ih, iw)`. Then `Y = U·X` is the convolution with
/// no im2col buffer, `dX = Uᵀ·dY` needs no col2im, and the weight gradient is the SDDMM on `U`
/// summed over positions. `U`'s values and bias are gathered from the weights before each
/// forward pass. Only the dense gradient (window steps) goes through im2col.
struct ConvUnrolling {
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

impl ConvUnrolling {
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

/// The kernels compiled for one weight pattern.
struct PatternKernels {
    /// Hash of the weight pattern they were compiled for.
    pattern_hash: u64,
    spmm: Kernel,
    spmm_t: Option<Kernel>,
    sddmm: Kernel,
}

#[cfg(feature = "opencl")]
/// The kernels of one layer for its current pattern, borrowed (for the OpenCL device step).
pub(crate) struct CompiledOps<'a> {
    /// Forward.
    pub spmm: &'a Kernel,
    /// Backward data (`None` for a layer that does not need it).
    pub spmm_t: Option<&'a Kernel>,
    /// Weight gradient of active entries.
    pub sddmm: &'a Kernel,
    /// Dense weight gradient.
    pub dense_grad: Option<&'a Kernel>,
}

/// The kernels of one layer: what they compute (fused ReLU, whether the input gradient is
/// needed), the batch launch and plan they are compiled for, the kernels of the current
/// weight pattern, the dense-gradient kernel (which does not depend on the mask) and, for a
/// convolution, its unrolling. Anything that changes what the kernels compute drops them;
/// [`compile`](Self::compile) builds them again.
pub(crate) struct LayerKernels {
    relu: bool,
    needs_dx: bool,
    launch: Option<Launch>,
    plan: LayerPlan,
    compiled: Option<PatternKernels>,
    dense_grad: Option<Kernel>,
    unroll: Option<Box<ConvUnrolling>>,
}

impl LayerKernels {
    /// Nothing compiled: no ReLU, the input gradient needed, no launch yet, plan `auto`.
    pub(crate) fn new() -> Self {
        LayerKernels {
            relu: false,
            needs_dx: true,
            launch: None,
            plan: LayerPlan::default(),
            compiled: None,
            dense_grad: None,
            unroll: None,
        }
    }

    /// Whether the forward kernel applies ReLU after the bias.
    pub(crate) fn relu(&self) -> bool {
        self.relu
    }

    /// Fuses (or not) ReLU into the forward kernel.
    pub(crate) fn set_relu(&mut self, relu: bool) {
        self.relu = relu;
        self.compiled = None;
    }

    /// Whether the backward pass computes the input gradient (`spmm_t`).
    pub(crate) fn set_needs_dx(&mut self, needs_dx: bool) {
        self.needs_dx = needs_dx;
        self.compiled = None;
    }

    /// Sets the batch launch of every kernel: `batch` columns with row stride `ld`.
    pub(crate) fn set_launch(&mut self, launch: Launch) {
        if self.launch != Some(launch) {
            self.launch = Some(launch);
            self.invalidate();
        }
    }

    /// Runs the layer as a direct sparse convolution of this geometry (see
    /// [`ConvUnrolling`]): the kernels get the batch launch of
    /// [`set_launch`](Self::set_launch), the dense gradient `dense_launch` (im2col columns).
    pub(crate) fn set_unroll(
        &mut self,
        geometry: ConvGeometry,
        dense_launch: Launch,
    ) -> Result<()> {
        self.unroll = Some(Box::new(ConvUnrolling {
            geometry,
            dense_launch,
            built_for: None,
            pattern: Arc::new(Pattern::empty(0, 0)?),
            src: Vec::new(),
            values: Vec::new(),
            bias: Vec::new(),
            grad: Vec::new(),
        }));
        self.invalidate();
        Ok(())
    }

    #[cfg(feature = "opencl")]
    /// Whether the layer runs as an unrolled convolution.
    pub(crate) fn is_unrolled(&self) -> bool {
        self.unroll.is_some()
    }

    /// The pattern the kernels run on: `weights`, or the unrolled convolution's.
    pub(crate) fn kernel_pattern<'a>(&'a self, weights: &'a Arc<Pattern>) -> &'a Arc<Pattern> {
        match &self.unroll {
            Some(u) if u.built_for == Some(weights.hash()) => &u.pattern,
            _ => weights,
        }
    }

    /// The plan asked for at the next compilation.
    pub(crate) fn requested_plan(&self) -> LayerPlan {
        self.plan
    }

    /// Sets the plan to ask for at the next compilation.
    pub(crate) fn set_plan(&mut self, plan: LayerPlan) {
        self.plan = plan;
    }

    /// Drops the compiled kernels.
    pub(crate) fn invalidate(&mut self) {
        self.compiled = None;
        self.dense_grad = None;
    }

    /// Whether the kernels are missing or compiled for another weight pattern than the one
    /// of hash `pattern_hash`.
    pub(crate) fn needs_compile(&self, pattern_hash: u64) -> bool {
        match &self.compiled {
            None => true,
            Some(k) => k.pattern_hash != pattern_hash || self.dense_grad.is_none(),
        }
    }

    /// The strategies the compiled kernels run with (`None` before compiling).
    pub(crate) fn compiled_plan(&self) -> Option<LayerPlan> {
        let k = self.compiled.as_ref()?;
        Some(LayerPlan {
            spmm: k.spmm.strategy(),
            spmm_t: k.spmm_t.as_ref().map_or(Strategy::Auto, Kernel::strategy),
            sddmm: k.sddmm.strategy(),
            dense_grad: self
                .dense_grad
                .as_ref()
                .map_or(Strategy::Auto, Kernel::strategy),
        })
    }

    /// The strategies as a map from op name to strategy name (ops not compiled left out).
    pub(crate) fn strategies(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        if let Some(k) = &self.compiled {
            map.insert("spmm".into(), k.spmm.strategy().name().into());
            if let Some(t) = &k.spmm_t {
                map.insert("spmm_t".into(), t.strategy().name().into());
            }
            map.insert("sddmm".into(), k.sddmm.strategy().name().into());
        }
        if let Some(d) = &self.dense_grad {
            map.insert("dense_grad".into(), d.strategy().name().into());
        }
        map
    }

    /// Compiles the kernels of layer `name` for the weight pattern `weights` if they are
    /// missing or stale; returns the compilation time (zero if nothing was compiled).
    pub(crate) fn compile(
        &mut self,
        name: &str,
        weights: &Arc<Pattern>,
        exec: &Executor,
    ) -> Result<Duration> {
        let weight_hash = weights.hash();
        if !self.needs_compile(weight_hash) {
            return Ok(Duration::ZERO);
        }
        let launch = self.launch.ok_or_else(|| {
            RuntimeError::Config(format!("layer {name}: compiled before its batch was set"))
        })?;
        let start = std::time::Instant::now();
        let pattern = match &mut self.unroll {
            Some(u) => {
                if u.built_for != Some(weight_hash) {
                    u.build(weights)?;
                }
                u.pattern.clone()
            }
            None => weights.clone(),
        };
        let dense_launch = self.unroll.as_ref().map_or(launch, |u| u.dense_launch);
        let spec_at = |op: Op, pattern: Arc<Pattern>, l: Launch| {
            KernelSpec::new(
                name.to_string(),
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
        if self.dense_grad.is_none() {
            // The dense gradient does not depend on the mask: compiled once per layer, on the
            // full pattern of the shape.
            let empty = Arc::new(Pattern::dense(weights.rows(), weights.cols())?);
            self.dense_grad = Some(compile_with_fallback(
                exec,
                &spec_at(Op::DenseGrad, empty, dense_launch)?,
                self.plan.dense_grad,
            )?);
        }
        self.compiled = Some(PatternKernels {
            pattern_hash: weight_hash,
            spmm,
            spmm_t,
            sddmm,
        });
        Ok(start.elapsed())
    }

    /// `y = W·x + bias` (ReLU if fused) of layer `name` with parameters `params`, on
    /// `cols × ld` and `rows × ld` buffers (for an unrolled convolution: `[C·H·W × ld]` and
    /// `[out·P × ld]`).
    pub(crate) fn forward(
        &mut self,
        name: &str,
        params: &WeightParams,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let hash = params.pattern.hash();
        let (k, launch) = current(&self.compiled, self.launch, name, hash)?;
        let (values, bias) = match &mut self.unroll {
            Some(u) => {
                u.refresh(&params.values, &params.bias);
                (&u.values, &u.bias)
            }
            None => (&params.values, &params.bias),
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

    /// The backward pass of layer `name` given the upstream gradient `dy` (of the layer's
    /// output, after the fused ReLU): masks `dy` by the ReLU (in place), writes the bias
    /// gradient and the weight gradient by `mode` into `sgd`, and `dx = Wᵀ·dy` if asked for.
    /// An unrolled convolution needs the im2col matrix `xcol` for the dense gradient.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &mut self,
        name: &str,
        params: &WeightParams,
        sgd: &mut SgdState<Vec<f32>>,
        x: &[f32],
        xcol: Option<&[f32]>,
        y: &[f32],
        dy: &mut [f32],
        dx: Option<&mut [f32]>,
        mode: WeightGradMode,
    ) -> Result<()> {
        let hash = params.pattern.hash();
        let (k, launch) = current(&self.compiled, self.launch, name, hash)?;
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
                for g in sgd.bias_grad.iter_mut() {
                    *g = sums.by_ref().take(p).sum();
                }
            }
            None => {
                for g in sgd.bias_grad.iter_mut() {
                    *g = sums.next().unwrap_or(0.0);
                }
            }
        }
        // Rows past the bias (none in a well-formed buffer) still get the ReLU mask.
        sums.for_each(drop);
        match mode {
            WeightGradMode::Active => match &mut self.unroll {
                Some(u) => {
                    k.sddmm.run(
                        launch,
                        Args::Sddmm {
                            dy,
                            x,
                            dw: &mut u.grad,
                        },
                    )?;
                    sgd.grad.fill(0.0);
                    for (&g, &w) in u.grad.iter().zip(&u.src) {
                        sgd.grad[w as usize] += g;
                    }
                }
                None => k.sddmm.run(
                    launch,
                    Args::Sddmm {
                        dy,
                        x,
                        dw: &mut sgd.grad,
                    },
                )?,
            },
            WeightGradMode::Dense => {
                let kernel = self.dense_grad.as_ref().ok_or_else(|| {
                    RuntimeError::Config(format!("layer {name}: dense_grad not compiled"))
                })?;
                let (x, dense_launch) = match &self.unroll {
                    Some(u) => (
                        xcol.ok_or_else(|| {
                            RuntimeError::Config(format!(
                                "layer {name}: the dense gradient needs the im2col matrix"
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
                        grad: &mut sgd.dense_grad,
                    },
                )?;
                for (g, &i) in sgd.grad.iter_mut().zip(&params.dense_index) {
                    *g = sgd.dense_grad[i as usize];
                }
            }
        }
        sgd.decay.record_backward(mode);
        if let Some(dx) = dx {
            let t = k.spmm_t.as_ref().ok_or_else(|| {
                RuntimeError::Config(format!(
                    "layer {name}: asked for the input gradient of a layer built without it"
                ))
            })?;
            let values = match &self.unroll {
                Some(u) => &u.values,
                None => &params.values,
            };
            t.run(launch, Args::SpmmT { values, dy, dx })?;
        }
        Ok(())
    }

    #[cfg(feature = "opencl")]
    /// The kernels compiled for the weight pattern of hash `pattern_hash` (`None` when stale
    /// or missing).
    pub(crate) fn compiled_ops(&self, pattern_hash: u64) -> Option<CompiledOps<'_>> {
        let k = self.compiled.as_ref()?;
        if k.pattern_hash != pattern_hash {
            return None;
        }
        Some(CompiledOps {
            spmm: &k.spmm,
            spmm_t: k.spmm_t.as_ref(),
            sddmm: &k.sddmm,
            dense_grad: self.dense_grad.as_ref(),
        })
    }
}

/// The kernels of the weight pattern of hash `pattern_hash` and the launch they run with, or
/// the error that says they are not compiled.
fn current<'a>(
    compiled: &'a Option<PatternKernels>,
    launch: Option<Launch>,
    name: &str,
    pattern_hash: u64,
) -> Result<(&'a PatternKernels, Launch)> {
    match (compiled, launch) {
        (Some(k), Some(l)) if k.pattern_hash == pattern_hash => Ok((k, l)),
        _ => Err(RuntimeError::Config(format!(
            "layer {name}: kernels are not compiled for the current pattern"
        ))),
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
fn row_sum(row: &[f32]) -> f32 {
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
