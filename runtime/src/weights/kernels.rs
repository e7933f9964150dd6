//! [`LayerKernels`]: the kernels one layer runs, compiled for its current weight pattern
//! (keyed by the pattern's hash) and the plan they are compiled with. A convolution runs the
//! convolution ops (`conv`, `conv_t`, `conv_grad`, `conv_dense_grad`) on its `[out × C·k²]`
//! pattern with its geometry; a linear layer the matrix ops.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sparse_ir::{Args, BackendError, ConvGeometry, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

use super::optimiser::SgdState;
use super::params::WeightParams;
use super::WeightGradMode;
use crate::error::{Result, RuntimeError};
use crate::exec::{Executor, Kernel};

/// The strategy each op of one layer runs with. The fields name the matrix ops; a
/// convolution's ops play the same roles (`conv`, `conv_t`, `conv_grad`,
/// `conv_dense_grad`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerPlan {
    /// Forward (`spmm` or `conv` with its epilogue).
    pub spmm: Strategy,
    /// Backward data (`spmm_t` or `conv_t`).
    pub spmm_t: Strategy,
    /// Weight gradient of active entries (`sddmm` or `conv_grad`).
    pub sddmm: Strategy,
    /// Dense weight gradient (`dense_grad` or `conv_dense_grad`).
    pub dense_grad: Strategy,
}

/// The op names of a plan's four roles: a linear layer's, then a convolution's.
const PLAN_OPS: [[&str; 4]; 2] = [
    ["spmm", "spmm_t", "sddmm", "dense_grad"],
    ["conv", "conv_t", "conv_grad", "conv_dense_grad"],
];

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

    /// The plan as a map from IR op name to strategy name: the matrix ops' names, or the
    /// convolution ops' for a convolution.
    pub fn to_map(&self, conv: bool) -> BTreeMap<String, String> {
        let names = PLAN_OPS[usize::from(conv)];
        [self.spmm, self.spmm_t, self.sddmm, self.dense_grad]
            .into_iter()
            .zip(names)
            .map(|(s, op)| (op.to_string(), s.name().to_string()))
            .collect()
    }

    /// Reads a map written by [`LayerPlan::to_map`] (either op names: a checkpoint written
    /// before convolutions had ops of their own names their roles with the matrix ops');
    /// missing ops take `auto`.
    pub fn from_map(map: &BTreeMap<String, String>) -> std::result::Result<Self, String> {
        let mut roles = [Strategy::Auto; 4];
        for (op, strategy) in map {
            let role = PLAN_OPS
                .iter()
                .find_map(|names| names.iter().position(|n| n == op))
                .ok_or_else(|| format!("unknown op {op:?} in plan"))?;
            roles[role] = strategy.parse()?;
        }
        let [spmm, spmm_t, sddmm, dense_grad] = roles;
        Ok(LayerPlan {
            spmm,
            spmm_t,
            sddmm,
            dense_grad,
        })
    }
}

impl Default for LayerPlan {
    fn default() -> Self {
        LayerPlan::uniform(Strategy::Auto)
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
/// convolution, its geometry. Anything that changes what the kernels compute drops them;
/// [`compile`](Self::compile) builds them again.
pub(crate) struct LayerKernels {
    relu: bool,
    /// The layer after this one applies the fused ReLU's mask to the gradient it passes
    /// back (a max-pool reading the ReLU output), so the backward pass only sums it.
    relu_grad_masked: bool,
    needs_dx: bool,
    launch: Option<Launch>,
    plan: LayerPlan,
    compiled: Option<PatternKernels>,
    dense_grad: Option<Kernel>,
    conv: Option<ConvGeometry>,
}

impl LayerKernels {
    /// Nothing compiled: no ReLU, the input gradient needed, no launch yet, plan `auto`.
    pub(crate) fn new() -> Self {
        LayerKernels {
            relu: false,
            relu_grad_masked: false,
            needs_dx: true,
            launch: None,
            plan: LayerPlan::default(),
            compiled: None,
            dense_grad: None,
            conv: None,
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

    /// Says whether the gradient this layer gets is already zero where its fused ReLU was
    /// inactive (the next layer masks it), so the backward pass skips that mask.
    pub(crate) fn set_relu_grad_masked(&mut self, masked: bool) {
        self.relu_grad_masked = masked;
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

    /// Runs the layer as a convolution of this geometry: the convolution ops on the
    /// `[out × C·k²]` weight pattern.
    pub(crate) fn set_conv(&mut self, geometry: ConvGeometry) {
        self.conv = Some(geometry);
        self.invalidate();
    }

    /// The convolution geometry, for a convolution layer.
    pub(crate) fn conv(&self) -> Option<&ConvGeometry> {
        self.conv.as_ref()
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
        let mut put = |k: &Kernel| {
            map.insert(k.spec().op().name().into(), k.strategy().name().into());
        };
        if let Some(k) = &self.compiled {
            put(&k.spmm);
            if let Some(t) = &k.spmm_t {
                put(t);
            }
            put(&k.sddmm);
        }
        if let Some(d) = &self.dense_grad {
            put(d);
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
        let pattern = weights.clone();
        let conv = self.conv;
        let spec = |op: Op, pattern: Arc<Pattern>| {
            KernelSpec::with_geometry(
                name.to_string(),
                op,
                pattern,
                conv,
                Dim::Fixed(launch.batch),
                Dim::Fixed(launch.ld),
            )
        };
        // The ops of the four roles: a convolution's, or a linear layer's.
        let (fwd, bwd, grad, dense) = if conv.is_some() {
            let fwd = Op::Conv {
                bias: true,
                relu: self.relu,
            };
            (fwd, Op::ConvT, Op::ConvGrad, Op::ConvDenseGrad)
        } else {
            let fwd = Op::Spmm {
                bias: true,
                relu: self.relu,
            };
            (fwd, Op::SpmmT, Op::Sddmm, Op::DenseGrad)
        };
        let spmm = compile_with_fallback(exec, &spec(fwd, pattern.clone())?, self.plan.spmm)?;
        let spmm_t = if self.needs_dx {
            Some(compile_with_fallback(
                exec,
                &spec(bwd, pattern.clone())?,
                self.plan.spmm_t,
            )?)
        } else {
            None
        };
        let sddmm = compile_with_fallback(exec, &spec(grad, pattern.clone())?, self.plan.sddmm)?;
        if self.dense_grad.is_none() {
            // The dense gradient does not depend on the mask: compiled once per layer, on the
            // full pattern of the shape.
            let full = Arc::new(Pattern::dense(weights.rows(), weights.cols())?);
            self.dense_grad = Some(compile_with_fallback(
                exec,
                &spec(dense, full)?,
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
    /// `cols × ld` and `rows × ld` buffers (for a convolution: `[C·H·W × ld]` and
    /// `[out·OH·OW × ld]`).
    pub(crate) fn forward(
        &mut self,
        name: &str,
        params: &WeightParams,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let hash = params.pattern.hash();
        let (k, launch) = current(&self.compiled, self.launch, name, hash)?;
        k.spmm.run(
            launch,
            Args::Spmm {
                values: &params.values,
                x,
                bias: Some(&params.bias),
                y,
            },
        )?;
        Ok(())
    }

    /// The backward pass of layer `name` given the upstream gradient `dy` (of the layer's
    /// output, after the fused ReLU): masks `dy` by the ReLU (in place), writes the bias
    /// gradient and the weight gradient by `mode` into `sgd`, and `dx = Wᵀ·dy` if asked for.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &mut self,
        name: &str,
        params: &WeightParams,
        sgd: &mut SgdState<Vec<f32>>,
        x: &[f32],
        y: &[f32],
        dy: &mut [f32],
        dx: Option<&mut [f32]>,
        mode: WeightGradMode,
    ) -> Result<()> {
        let hash = params.pattern.hash();
        let (k, launch) = current(&self.compiled, self.launch, name, hash)?;
        // The ReLU mask and the bias gradient in one pass, row by row (each row is still in
        // L1 when it is summed). Branch-free select: NaN or ≤ 0 means inactive.
        // Where the next layer masked `dy` already, the pass only reads it.
        let (ld, batch, relu) = (launch.ld, launch.batch, self.relu && !self.relu_grad_masked);
        let mut sums = dy.chunks_mut(ld).zip(y.chunks(ld)).map(|(d, out)| {
            if relu {
                for (d, &out) in d.iter_mut().zip(out) {
                    *d = if out > 0.0 { *d } else { 0.0 };
                }
            }
            row_sum(&d[..batch.min(d.len())])
        });
        // A convolution's bias gradient sums its channel's positions.
        let positions = self.conv.map_or(1, |g| g.out_positions());
        for g in sgd.bias_grad.iter_mut() {
            *g = sums.by_ref().take(positions).sum();
        }
        // Rows past the bias (none in a well-formed buffer) still get the ReLU mask.
        sums.for_each(drop);
        match mode {
            WeightGradMode::Active => k.sddmm.run(
                launch,
                Args::Sddmm {
                    dy,
                    x,
                    dw: &mut sgd.grad,
                },
            )?,
            WeightGradMode::Dense => {
                let kernel = self.dense_grad.as_ref().ok_or_else(|| {
                    RuntimeError::Config(format!("layer {name}: dense_grad not compiled"))
                })?;
                kernel.run(
                    launch,
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
            t.run(
                launch,
                Args::SpmmT {
                    values: &params.values,
                    dy,
                    dx,
                },
            )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_name_a_convolutions_ops_and_read_either_names_by_role() {
        let plan = LayerPlan {
            spmm: Strategy::Generic,
            spmm_t: Strategy::Dense,
            sddmm: Strategy::Jit,
            dense_grad: Strategy::Dense,
        };
        let conv = plan.to_map(true);
        assert_eq!(conv.get("conv_t").map(String::as_str), Some("dense"));
        assert_eq!(conv.get("conv_grad").map(String::as_str), Some("jit"));
        assert!(!conv.contains_key("spmm"));
        assert_eq!(LayerPlan::from_map(&conv).unwrap(), plan);
        assert_eq!(LayerPlan::from_map(&plan.to_map(false)).unwrap(), plan);
        // a convolution's plan saved under the matrix names (before convolutions had ops of
        // their own) reads the same
        let mut old = BTreeMap::new();
        old.insert("spmm".to_string(), "generic".to_string());
        assert_eq!(LayerPlan::from_map(&old).unwrap().spmm, Strategy::Generic);
        assert_eq!(LayerPlan::from_map(&old).unwrap().sddmm, Strategy::Auto);
        old.insert("conv2d".to_string(), "generic".to_string());
        let err = LayerPlan::from_map(&old).unwrap_err();
        assert!(err.contains("conv2d"), "{err}");
    }
}
