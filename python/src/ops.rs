//! [`SparseOps`]: one sparse layer's kernels for `sparsejit.torch`'s modules.

use std::collections::HashMap;
use std::sync::Arc;

use numpy::{PyArray1, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use runtime::Kernel;
use sparse_ir::{Args, ConvGeometry, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

use crate::arrays::{self, Operand};

/// How many batch sizes / input sizes keep their kernels at once (a training loop meets one or
/// two: the training batch and the last, smaller one; evaluation may add a third).
const CACHED_LAUNCHES: usize = 8;

/// What one set of kernels is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct LaunchKey {
    batch: usize,
    height: usize,
    width: usize,
    threads: usize,
}

/// The kernels of one launch.
struct Compiled {
    forward: Kernel,
    backward_data: Kernel,
    weight_grad: Kernel,
    /// Compiled at the first dense-gradient call (only mask updates need it).
    dense_grad: Option<Kernel>,
}

/// A convolution's window: `k × k`, stride and padding (the input size comes with each call).
#[derive(Debug, Clone, Copy)]
struct Window {
    kernel: usize,
    stride: usize,
    padding: usize,
}

/// One sparse layer's pattern and kernels: `y = W·x + b` for a linear layer (`[out, in]`
/// weights) or a convolution (`[out, in, k, k]` weights), with its backward ops.
///
/// Activations are feature-major and C-contiguous: `[features, batch]` for a linear layer,
/// `[channels, height, width, batch]` for a convolution (torch's `[batch, …]` tensors seen
/// through a transposed view). The weights are the pattern's nonzero values in CSR order
/// (row-major order of the mask's nonzeros). Kernels are compiled for the current pattern and
/// each batch (and input size) at its first call, with the planner's choice among the
/// pattern-specialised JIT, generic SIMD and dense kernels.
#[pyclass(module = "sparsejit._native")]
pub(crate) struct SparseOps {
    name: String,
    shape: Vec<usize>,
    pattern: Arc<Pattern>,
    window: Option<Window>,
    bias: bool,
    strategy: Strategy,
    kernels: HashMap<LaunchKey, Compiled>,
}

impl SparseOps {
    fn rows(&self) -> usize {
        self.shape[0]
    }

    fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }

    /// The geometry of a convolution on `height × width` inputs.
    fn geometry(&self, height: usize, width: usize) -> PyResult<Option<ConvGeometry>> {
        let Some(w) = self.window else {
            return Ok(None);
        };
        let g = ConvGeometry {
            in_channels: self.shape[1],
            height,
            width,
            kernel: w.kernel,
            stride: w.stride,
            padding: w.padding,
        };
        g.check(self.rows(), self.cols())
            .map_err(|e| PyValueError::new_err(format!("{}: {e}", self.name)))?;
        Ok(Some(g))
    }

    /// The input's `(height, width)` from an activation's shape (`(1, 1)` for a linear layer).
    fn input_size(&self, name: &str, x: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
        if self.window.is_none() {
            return Ok((1, 1));
        }
        let array = x.cast::<numpy::PyUntypedArray>().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!("{name} must be a numpy array"))
        })?;
        match array.shape() {
            &[c, h, w, _] if c == self.shape[1] => Ok((h, w)),
            shape => Err(PyValueError::new_err(format!(
                "{}: {name} has shape {shape:?}; expected [{}, height, width, batch] \
                 (channels, height, width, batch)",
                self.name, self.shape[1]
            ))),
        }
    }

    /// The kernels for a launch, compiled at the first call.
    fn compiled(&mut self, key: LaunchKey) -> PyResult<&mut Compiled> {
        if !self.kernels.contains_key(&key) {
            if self.kernels.len() >= CACHED_LAUNCHES {
                self.kernels.clear();
            }
            let exec = crate::executor(key.threads)?;
            let geometry = self.geometry(key.height, key.width)?;
            let (forward, backward_data, weight_grad) = if geometry.is_some() {
                let fwd = Op::Conv {
                    bias: self.bias,
                    relu: false,
                };
                (fwd, Op::ConvT, Op::ConvGrad)
            } else {
                let fwd = Op::Spmm {
                    bias: self.bias,
                    relu: false,
                };
                (fwd, Op::SpmmT, Op::Sddmm)
            };
            let compile = |op: Op| -> PyResult<Kernel> {
                let spec = KernelSpec::with_geometry(
                    self.name.clone(),
                    op,
                    self.pattern.clone(),
                    geometry,
                    Dim::Fixed(key.batch),
                    Dim::Fixed(key.batch),
                )
                .map_err(|e| PyValueError::new_err(format!("{}: {e}", self.name)))?;
                exec.compile(&spec, self.strategy)
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))
            };
            let compiled = Compiled {
                forward: compile(forward)?,
                backward_data: compile(backward_data)?,
                weight_grad: compile(weight_grad)?,
                dense_grad: None,
            };
            self.kernels.insert(key, compiled);
        }
        Ok(self.kernels.get_mut(&key).expect("inserted above"))
    }

    /// The launch key of an operand whose batch is its last dimension.
    fn key(&self, name: &str, x: &Bound<'_, PyAny>) -> PyResult<LaunchKey> {
        let batch = arrays::batch_of(name, x)?;
        let (height, width) = self.input_size(name, x)?;
        Ok(LaunchKey {
            batch,
            height,
            width,
            threads: crate::threads(),
        })
    }

    /// The weight gradient into `out`: the nonzero weights' (`dense` false, `nnz` elements)
    /// or the dense one (`rows · cols` elements).
    fn gradient(
        &mut self,
        py: Python<'_>,
        dy: &Bound<'_, PyAny>,
        x: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        dense: bool,
    ) -> PyResult<()> {
        let key = self.key("x", x)?;
        let (fin, fout) = self.features(key)?;
        let (name, len) = if dense {
            ("grad", self.rows() * self.cols())
        } else {
            ("dw", self.pattern.nnz())
        };
        let dy = arrays::readonly("dy", dy)?;
        let x = arrays::readonly("x", x)?;
        let mut out = arrays::writable(name, out)?;
        let batch = key.batch;
        let dy = arrays::slice(&Operand::new("dy", fout, batch), &dy)?;
        let x = arrays::slice(&Operand::new("x", fin, batch), &x)?;
        let out = arrays::vector_mut(name, len, &mut out)?;
        let launch = Launch::new(batch, batch);
        if dense {
            let kernel = self.dense_grad_kernel(key)?;
            py.detach(|| kernel.run(launch, Args::DenseGrad { dy, x, grad: out }))
        } else {
            let kernel = &self.compiled(key)?.weight_grad;
            py.detach(|| kernel.run(launch, Args::Sddmm { dy, x, dw: out }))
        }
        .map_err(run_error)
    }

    /// The dense-gradient kernel of a launch, compiled at its first use (only the steps
    /// before a mask update need it). The JIT has none: the planner's pick stands in.
    fn dense_grad_kernel(&mut self, key: LaunchKey) -> PyResult<&Kernel> {
        let geometry = self.geometry(key.height, key.width)?;
        let (name, rows, cols, strategy) =
            (self.name.clone(), self.rows(), self.cols(), self.strategy);
        let compiled = self.compiled(key)?;
        if compiled.dense_grad.is_none() {
            let op = if geometry.is_some() {
                Op::ConvDenseGrad
            } else {
                Op::DenseGrad
            };
            let full = Arc::new(
                Pattern::dense(rows, cols).map_err(|e| PyValueError::new_err(e.to_string()))?,
            );
            let spec = KernelSpec::with_geometry(
                name,
                op,
                full,
                geometry,
                Dim::Fixed(key.batch),
                Dim::Fixed(key.batch),
            )
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
            let exec = crate::executor(key.threads)?;
            let kernel = match exec.compile(&spec, strategy) {
                Ok(k) => k,
                Err(_) => exec.compile(&spec, Strategy::Auto).map_err(run_error)?,
            };
            compiled.dense_grad = Some(kernel);
        }
        Ok(compiled.dense_grad.as_ref().expect("compiled above"))
    }

    /// The operand shapes of a launch: input-side and output-side features per batch column.
    fn features(&self, key: LaunchKey) -> PyResult<(usize, usize)> {
        Ok(match self.geometry(key.height, key.width)? {
            Some(g) => (
                g.in_channels * g.in_positions(),
                self.rows() * g.out_positions(),
            ),
            None => (self.cols(), self.rows()),
        })
    }
}

fn run_error(e: sparse_ir::BackendError) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

#[pymethods]
impl SparseOps {
    /// A layer named `name` with weights of `shape` (`[out, in]` or `[out, in, k, k]`) and the
    /// 0/1 `mask` of that shape; `bias` adds a bias in the forward op. A convolution takes
    /// `stride` and `padding`. `strategy` is `auto` (the planner) or `jit`, `generic`,
    /// `dense`.
    #[new]
    #[pyo3(signature = (name, shape, mask, bias=true, stride=1, padding=0, strategy="auto"))]
    #[allow(
        clippy::too_many_arguments,
        reason = "the Python constructor's keywords"
    )]
    fn new(
        py: Python<'_>,
        name: String,
        shape: Vec<usize>,
        mask: &Bound<'_, PyAny>,
        bias: bool,
        stride: usize,
        padding: usize,
        strategy: &str,
    ) -> PyResult<Self> {
        let window = match shape.as_slice() {
            [_, _] => None,
            [_, _, kh, kw] if kh == kw => Some(Window {
                kernel: *kh,
                stride,
                padding,
            }),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "{name}: weight shape {shape:?} is neither [out, in] nor [out, in, k, k] \
                     (square windows only)"
                )))
            }
        };
        if shape.contains(&0) {
            return Err(PyValueError::new_err(format!(
                "{name}: weight shape {shape:?} has a zero dimension"
            )));
        }
        if window.is_some() && stride == 0 {
            return Err(PyValueError::new_err(format!(
                "{name}: stride must be at least 1"
            )));
        }
        let strategy: Strategy = strategy.parse().map_err(PyValueError::new_err)?;
        if !matches!(
            strategy,
            Strategy::Auto | Strategy::Jit | Strategy::Generic | Strategy::Dense
        ) {
            return Err(PyValueError::new_err(format!(
                "{name}: strategy {strategy} is not a CPU strategy (auto, jit, generic, dense)"
            )));
        }
        let mut ops = SparseOps {
            name,
            pattern: Arc::new(
                Pattern::empty(1, 1).map_err(|e| PyValueError::new_err(e.to_string()))?,
            ),
            shape,
            window,
            bias,
            strategy,
            kernels: HashMap::new(),
        };
        ops.set_mask(py, mask)?;
        Ok(ops)
    }

    /// Replaces the mask (same shape); returns whether the pattern changed. Kernels of a
    /// changed pattern compile again at their next call.
    fn set_mask(&mut self, py: Python<'_>, mask: &Bound<'_, PyAny>) -> PyResult<bool> {
        let (shape, bytes) = arrays::mask_bytes(py, mask)?;
        if shape.iter().product::<usize>() != self.shape.iter().product::<usize>()
            || shape[0] != self.shape[0]
        {
            return Err(PyValueError::new_err(format!(
                "{}: mask has shape {shape:?}, the weights {:?}",
                self.name, self.shape
            )));
        }
        let pattern = Pattern::from_dense_mask(self.rows(), self.cols(), &bytes)
            .map_err(|e| PyValueError::new_err(format!("{}: {e}", self.name)))?;
        let changed = pattern.hash() != self.pattern.hash()
            || pattern.rows() != self.pattern.rows()
            || pattern.cols() != self.pattern.cols();
        if changed {
            self.pattern = Arc::new(pattern);
            self.kernels.clear();
        }
        Ok(changed)
    }

    /// The mask as a uint8 array of the weight's shape.
    fn mask<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let flat = PyArray1::from_vec(py, self.pattern.to_dense_mask());
        Ok(flat.reshape(self.shape.clone())?.into_any())
    }

    /// The flat (row-major) index of each nonzero of the pattern, in CSR order: `values`
    /// holds the weights at these positions of the dense weight.
    fn dense_index<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        let cols = self.pattern.cols();
        let mut index = Vec::with_capacity(self.pattern.nnz());
        for r in 0..self.pattern.rows() {
            index.extend(
                self.pattern
                    .row(r)
                    .iter()
                    .map(|&c| (r * cols + c as usize) as i64),
            );
        }
        PyArray1::from_vec(py, index)
    }

    /// The layer's name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// The weight's shape.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    /// Nonzeros of the pattern.
    #[getter]
    fn nnz(&self) -> usize {
        self.pattern.nnz()
    }

    /// The hash of the pattern (changes with the mask).
    #[getter]
    fn pattern_hash(&self) -> u64 {
        self.pattern.hash()
    }

    /// A convolution's output `(height, width)` on `height × width` inputs.
    fn output_size(&self, height: usize, width: usize) -> PyResult<(usize, usize)> {
        match self.geometry(height, width)? {
            Some(g) => Ok((g.out_height(), g.out_width())),
            None => Err(PyValueError::new_err(format!(
                "{}: a linear layer has no output size",
                self.name
            ))),
        }
    }

    /// `y = W·x (+ bias)`: `x` is `[in, batch]` (`[C, H, W, batch]`), `y` (written) is
    /// `[out, batch]` (`[out, OH, OW, batch]`), `values` the nonzeros, `bias` `[out]` (`None`
    /// without a bias).
    #[pyo3(signature = (values, bias, x, y))]
    fn forward(
        &mut self,
        py: Python<'_>,
        values: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        x: &Bound<'_, PyAny>,
        y: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let key = self.key("x", x)?;
        let (fin, fout) = self.features(key)?;
        let (nnz, rows, has_bias) = (self.pattern.nnz(), self.rows(), self.bias);
        let values = arrays::readonly("values", values)?;
        let x = arrays::readonly("x", x)?;
        let mut y = arrays::writable("y", y)?;
        let bias = match (bias, has_bias) {
            (Some(b), true) => Some(arrays::readonly("bias", b)?),
            (None, false) => None,
            (Some(_), false) => {
                return Err(PyValueError::new_err(format!(
                    "{}: built without a bias, given one",
                    self.name
                )))
            }
            (None, true) => {
                return Err(PyValueError::new_err(format!(
                    "{}: built with a bias, given None",
                    self.name
                )))
            }
        };
        let values = arrays::vector("values", nnz, &values)?;
        let bias = bias
            .as_ref()
            .map(|b| arrays::vector("bias", rows, b))
            .transpose()?;
        let batch = key.batch;
        let x = arrays::slice(&Operand::new("x", fin, batch), &x)?;
        let y = arrays::slice_mut(&Operand::new("y", fout, batch), &mut y)?;
        let kernel = &self.compiled(key)?.forward;
        py.detach(|| kernel.run(Launch::new(batch, batch), Args::Spmm { values, x, bias, y }))
            .map_err(run_error)
    }

    /// `dx = Wᵀ·dy`: `dy` is `[out, batch]` (`[out, OH, OW, batch]`), `dx` (written) `[in,
    /// batch]` (`[C, H, W, batch]`).
    fn backward_data(
        &mut self,
        py: Python<'_>,
        values: &Bound<'_, PyAny>,
        dy: &Bound<'_, PyAny>,
        dx: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let key = self.key("dx", dx)?;
        let (fin, fout) = self.features(key)?;
        let nnz = self.pattern.nnz();
        let values = arrays::readonly("values", values)?;
        let dy = arrays::readonly("dy", dy)?;
        let mut dx = arrays::writable("dx", dx)?;
        let values = arrays::vector("values", nnz, &values)?;
        let batch = key.batch;
        let dy = arrays::slice(&Operand::new("dy", fout, batch), &dy)?;
        let dx = arrays::slice_mut(&Operand::new("dx", fin, batch), &mut dx)?;
        let kernel = &self.compiled(key)?.backward_data;
        py.detach(|| kernel.run(Launch::new(batch, batch), Args::SpmmT { values, dy, dx }))
            .map_err(run_error)
    }

    /// The gradient of the nonzero weights, `dw[k] = Σ dy[r_k, ·]·x[c_k, ·]` (summed over
    /// the batch and, for a convolution, the output positions), written into `dw` (`[nnz]`).
    fn weight_grad(
        &mut self,
        py: Python<'_>,
        dy: &Bound<'_, PyAny>,
        x: &Bound<'_, PyAny>,
        dw: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.gradient(py, dy, x, dw, false)
    }

    /// The dense weight gradient (every entry, masked ones included), written into `grad`
    /// (row-major, `out · in` or `out · in·k·k` elements): what momentum growth needs before
    /// a mask update.
    fn dense_weight_grad(
        &mut self,
        py: Python<'_>,
        dy: &Bound<'_, PyAny>,
        x: &Bound<'_, PyAny>,
        grad: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.gradient(py, dy, x, grad, true)
    }

    /// The strategy of each op compiled for a batch of `batch` (and a convolution's
    /// `height × width` input), compiling them if needed: `{op: strategy}`.
    #[pyo3(signature = (batch, height=1, width=1))]
    fn strategies<'py>(
        &mut self,
        py: Python<'py>,
        batch: usize,
        height: usize,
        width: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        if batch == 0 {
            return Err(PyValueError::new_err("batch must be at least 1"));
        }
        let key = LaunchKey {
            batch,
            height,
            width,
            threads: crate::threads(),
        };
        let c = self.compiled(key)?;
        let dict = PyDict::new(py);
        for k in [&c.forward, &c.backward_data, &c.weight_grad] {
            dict.set_item(k.spec().op().name(), k.active_strategy().name())?;
        }
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!(
            "SparseOps(name={:?}, shape={:?}, nnz={}, density={:.4})",
            self.name,
            self.shape,
            self.pattern.nnz(),
            self.pattern.density()
        )
    }
}
