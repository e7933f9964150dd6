//! The numpy-level API: [`PyPattern`] (`sparsejit.Pattern`), [`compile`] returning a
//! [`PyKernel`] (`sparsejit.Kernel`) that runs on numpy arrays, and `kernel_dump`.

use std::sync::Arc;

use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use runtime::{Executor, Kernel};
use sparse_ir::{Args, ConvGeometry, Dim, KernelSpec, Launch, Op, Pattern, Role, Strategy};

use crate::arrays::{self, Operand};

/// Registers the classes and functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPattern>()?;
    m.add_class::<PyKernel>()?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_dump_args, m)?)?;
    Ok(())
}

/// A sparsity pattern: which entries of a `rows × cols` weight matrix are nonzero.
#[pyclass(name = "Pattern", module = "sparsejit", frozen)]
pub(crate) struct PyPattern {
    pattern: Arc<Pattern>,
}

#[pymethods]
impl PyPattern {
    /// The pattern of a 0/1 (or bool) array: `[rows, cols]`, or a convolution's
    /// `[out, in, k, k]` (then `rows = out`, `cols = in·k·k`).
    #[new]
    fn new(py: Python<'_>, mask: &Bound<'_, PyAny>) -> PyResult<Self> {
        let (shape, bytes) = arrays::mask_bytes(py, mask)?;
        let cols = shape[1..].iter().product();
        let pattern = Pattern::from_dense_mask(shape[0], cols, &bytes)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyPattern {
            pattern: Arc::new(pattern),
        })
    }

    /// A random pattern: every entry nonzero with probability `density`, reproducible from
    /// `seed` (the same pattern `kernel-dump --random` draws).
    #[staticmethod]
    #[pyo3(signature = (rows, cols, density, seed=17))]
    fn random(rows: usize, cols: usize, density: f64, seed: u64) -> PyResult<Self> {
        if !(density > 0.0 && density <= 1.0) {
            return Err(PyValueError::new_err(format!(
                "density {density} is not in (0, 1]"
            )));
        }
        kernel_dump::check_random_size(
            &format!("a random {rows}x{cols} pattern"),
            rows,
            cols,
            density,
            &sparse_ir::MemoryBudget::machine(),
        )
        .map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
        let pattern = Pattern::random(rows, cols, density, seed)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyPattern {
            pattern: Arc::new(pattern),
        })
    }

    /// Rows (output features).
    #[getter]
    fn rows(&self) -> usize {
        self.pattern.rows()
    }

    /// Columns (input features, or `in·k·k`).
    #[getter]
    fn cols(&self) -> usize {
        self.pattern.cols()
    }

    /// Nonzeros.
    #[getter]
    fn nnz(&self) -> usize {
        self.pattern.nnz()
    }

    /// `nnz / (rows · cols)`.
    #[getter]
    fn density(&self) -> f64 {
        self.pattern.density()
    }

    /// The CSR row pointers (`rows + 1`).
    #[getter]
    fn row_ptr<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        PyArray1::from_slice(py, self.pattern.row_ptr())
    }

    /// The CSR column indices (`nnz`, row by row): the order of a kernel's `values`.
    #[getter]
    fn col_idx<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        PyArray1::from_slice(py, self.pattern.col_idx())
    }

    /// The mask as a `[rows, cols]` uint8 array.
    fn to_mask<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let flat = PyArray1::from_vec(py, self.pattern.to_dense_mask());
        Ok(flat
            .reshape([self.pattern.rows(), self.pattern.cols()])?
            .into_any())
    }

    fn __repr__(&self) -> String {
        format!(
            "Pattern(rows={}, cols={}, nnz={}, density={:.4})",
            self.pattern.rows(),
            self.pattern.cols(),
            self.pattern.nnz(),
            self.pattern.density()
        )
    }

    fn __eq__(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }

    fn __hash__(&self) -> u64 {
        self.pattern.hash()
    }
}

/// A compiled kernel: one op on one pattern at one batch size, called on numpy arrays.
#[pyclass(name = "Kernel", module = "sparsejit", frozen)]
pub(crate) struct PyKernel {
    kernel: Kernel,
    batch: usize,
}

fn parse_op(op: &str, bias: bool, relu: bool) -> PyResult<Op> {
    let name = op.replace('-', "_");
    let op = match name.as_str() {
        "spmm" => Op::Spmm { bias, relu },
        "conv" => Op::Conv { bias, relu },
        other => Op::ALL
            .into_iter()
            .chain(Op::CONV_ALL)
            .find(|o| o.name() == other)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "unknown op {op:?} (expected spmm, spmm_t, sddmm, dense_grad, conv, conv_t, \
                     conv_grad or conv_dense_grad)"
                ))
            })?,
    };
    if (bias || relu) && op.role() != Role::Forward {
        return Err(PyValueError::new_err(format!(
            "bias and relu belong to the forward ops (spmm, conv), not {}",
            op.name()
        )));
    }
    Ok(op)
}

/// Compiles `op` for `pattern` at batch `batch`. `op` is one of `spmm`, `spmm_t`, `sddmm`,
/// `dense_grad` or, with `input_size=(H, W)` and `kernel_size=k` (the pattern is then the
/// `[out, in·k·k]` mask), `conv`, `conv_t`, `conv_grad`, `conv_dense_grad`. `strategy`: `auto`
/// (the planner), `jit`, `generic` or `dense`; `backend="reference"` runs the interpreter,
/// the oracle every backend is tested against.
#[pyfunction]
#[pyo3(signature = (pattern, op, batch, *, strategy="auto", bias=false, relu=false,
                    input_size=None, kernel_size=None, stride=1, padding=0, backend="cpu"))]
#[allow(clippy::too_many_arguments)]
fn compile(
    py: Python<'_>,
    pattern: &PyPattern,
    op: &str,
    batch: usize,
    strategy: &str,
    bias: bool,
    relu: bool,
    input_size: Option<(usize, usize)>,
    kernel_size: Option<usize>,
    stride: usize,
    padding: usize,
    backend: &str,
) -> PyResult<PyKernel> {
    let op = parse_op(op, bias, relu)?;
    if batch == 0 {
        return Err(PyValueError::new_err("batch must be at least 1"));
    }
    let p = &pattern.pattern;
    let geometry = match (op.is_conv(), input_size, kernel_size) {
        (false, None, None) => None,
        (false, _, _) => {
            return Err(PyValueError::new_err(format!(
                "{} is a matrix op: input_size and kernel_size belong to the conv ops",
                op.name()
            )))
        }
        (true, Some((height, width)), Some(k)) => {
            let taps = k
                .checked_mul(k)
                .filter(|&t| t > 0 && p.cols().is_multiple_of(t));
            let Some(taps) = taps else {
                return Err(PyValueError::new_err(format!(
                    "kernel_size {k}: the pattern's {} columns are not in·{k}·{k}",
                    p.cols()
                )));
            };
            Some(ConvGeometry {
                in_channels: p.cols() / taps,
                height,
                width,
                kernel: k,
                stride,
                padding,
            })
        }
        (true, _, _) => {
            return Err(PyValueError::new_err(format!(
                "{} needs input_size=(height, width) and kernel_size",
                op.name()
            )))
        }
    };
    let strategy: Strategy = strategy.parse().map_err(PyValueError::new_err)?;
    let spec = KernelSpec::with_geometry(
        "kernel",
        op,
        p.clone(),
        geometry,
        Dim::Fixed(batch),
        Dim::Fixed(batch),
    )
    .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let exec = match backend {
        "cpu" => crate::executor(crate::threads())?,
        "reference" => Arc::new(Executor::reference()),
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown backend {other:?} (expected cpu or reference)"
            )))
        }
    };
    // A strategy refusing the op or pattern is a bad argument, as a bad op name is.
    let kernel = py
        .detach(|| exec.compile(&spec, strategy))
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(PyKernel { kernel, batch })
}

#[pymethods]
impl PyKernel {
    /// The op's IR name.
    #[getter]
    fn op(&self) -> &'static str {
        self.kernel.spec().op().name()
    }

    /// The strategy it runs with.
    #[getter]
    fn strategy(&self) -> &'static str {
        self.kernel.active_strategy().name()
    }

    /// The batch it was compiled for.
    #[getter]
    fn batch(&self) -> usize {
        self.batch
    }

    /// Runs the kernel on feature-major float32 arrays (`[features, batch]`, C-contiguous; a
    /// convolution's may be `[C, H, W, batch]`) and returns its output:
    ///
    /// - `spmm`/`conv`: `kernel(values, x, bias=None)` → `y`
    /// - `spmm_t`/`conv_t`: `kernel(values, dy)` → `dx`
    /// - `sddmm`/`conv_grad`: `kernel(dy, x)` → `dw` (one per nonzero, CSR order)
    /// - `dense_grad`/`conv_dense_grad`: `kernel(dy, x)` → `[rows, cols]` gradient
    #[pyo3(signature = (a, b, bias=None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        a: &Bound<'py, PyAny>,
        b: &Bound<'py, PyAny>,
        bias: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let spec = self.kernel.spec();
        let (op, batch) = (spec.op(), self.batch);
        let p = spec.pattern();
        let (fin, fout) = (spec.in_features(), spec.out_features());
        let launch = Launch::new(batch, batch);
        let out_shape = |features: usize, input_side: bool| -> Vec<usize> {
            match spec.geometry() {
                Some(g) if input_side => vec![g.in_channels, g.height, g.width, batch],
                Some(g) => vec![p.rows(), g.out_height(), g.out_width(), batch],
                None => vec![features, batch],
            }
        };
        let run_err = |e: sparse_ir::BackendError| PyRuntimeError::new_err(e.to_string());
        if bias.is_some() && !op.has_bias() {
            return Err(PyValueError::new_err(format!(
                "{} was compiled without a bias",
                op.name()
            )));
        }
        let (out, shape) = match op.role() {
            Role::Forward => {
                let values = arrays::readonly("values", a)?;
                let x = arrays::readonly("x", b)?;
                let values = arrays::vector("values", p.nnz(), &values)?;
                let x = arrays::slice(&Operand::new("x", fin, batch), &x)?;
                let bias = match (bias, op.has_bias()) {
                    (Some(b), _) => Some(arrays::readonly("bias", b)?),
                    (None, true) => {
                        return Err(PyValueError::new_err(format!(
                            "{} was compiled with a bias: pass bias=",
                            op.name()
                        )))
                    }
                    (None, false) => None,
                };
                let bias = bias
                    .as_ref()
                    .map(|b| arrays::vector("bias", p.rows(), b))
                    .transpose()?;
                let mut y = vec![0.0f32; fout * batch];
                let args = Args::Spmm {
                    values,
                    x,
                    bias,
                    y: &mut y,
                };
                py.detach(|| self.kernel.run(launch, args))
                    .map_err(run_err)?;
                (y, out_shape(fout, false))
            }
            Role::BackwardData => {
                let values = arrays::readonly("values", a)?;
                let dy = arrays::readonly("dy", b)?;
                let values = arrays::vector("values", p.nnz(), &values)?;
                let dy = arrays::slice(&Operand::new("dy", fout, batch), &dy)?;
                let mut dx = vec![0.0f32; fin * batch];
                let args = Args::SpmmT {
                    values,
                    dy,
                    dx: &mut dx,
                };
                py.detach(|| self.kernel.run(launch, args))
                    .map_err(run_err)?;
                (dx, out_shape(fin, true))
            }
            Role::WeightGrad | Role::DenseGrad => {
                let dy = arrays::readonly("dy", a)?;
                let x = arrays::readonly("x", b)?;
                let dy = arrays::slice(&Operand::new("dy", fout, batch), &dy)?;
                let x = arrays::slice(&Operand::new("x", fin, batch), &x)?;
                if op.role() == Role::WeightGrad {
                    let mut dw = vec![0.0f32; p.nnz()];
                    let args = Args::Sddmm { dy, x, dw: &mut dw };
                    py.detach(|| self.kernel.run(launch, args))
                        .map_err(run_err)?;
                    (dw, vec![p.nnz()])
                } else {
                    let mut grad = vec![0.0f32; p.rows() * p.cols()];
                    let args = Args::DenseGrad {
                        dy,
                        x,
                        grad: &mut grad,
                    };
                    py.detach(|| self.kernel.run(launch, args))
                        .map_err(run_err)?;
                    (grad, vec![p.rows(), p.cols()])
                }
            }
        };
        Ok(PyArray1::from_vec(py, out).reshape(shape)?.into_any())
    }

    fn __repr__(&self) -> String {
        let spec = self.kernel.spec();
        format!(
            "Kernel(op={:?}, strategy={:?}, rows={}, cols={}, nnz={}, batch={})",
            spec.op().name(),
            self.kernel.active_strategy().name(),
            spec.pattern().rows(),
            spec.pattern().cols(),
            spec.pattern().nnz(),
            self.batch
        )
    }
}

/// What `kernel-dump ARGS…` prints, as one string (`args` without the program name). Errors
/// (a bad option, an unreadable mask) are `ValueError`s with the CLI's message.
#[pyfunction]
fn kernel_dump_args(py: Python<'_>, args: Vec<String>) -> PyResult<String> {
    use clap::Parser;
    let cli =
        kernel_dump::Cli::try_parse_from(std::iter::once("kernel-dump".to_string()).chain(args))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
    if cli.out.is_some() {
        return Err(PyValueError::new_err(
            "kernel_dump returns the texts: --out is for the command line",
        ));
    }
    let artefacts = py
        .detach(|| kernel_dump::artefacts(&cli))
        .map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
    let mut text = String::new();
    for a in artefacts {
        text.push_str(&format!(";; ===== {} =====\n", a.file));
        text.push_str(&a.text);
        if !a.text.ends_with('\n') {
            text.push('\n');
        }
    }
    Ok(text)
}
