//! [`TrainingKernels`] (feature `opencl`): the training program of
//! [`crate::emit::training`] built on one device, with a safe function per kernel that
//! checks every buffer length before it launches. With these and the sparse kernels of
//! [`crate::OpenClBackend`], a whole SGD step runs on device buffers: only the batch goes up
//! and the per-sample losses come back.

use std::sync::Mutex;

use ocl::{Event, Kernel, Program};
use sparse_ir::backend::BackendError;

use crate::emit::training::{
    training_library, GATHER, MOMENTUM_ACCUMULATE, NLL_GRAD, RELU_BIAS_GRAD, SGD,
    TRAINING_LOCAL_SIZE,
};
use crate::exec::{DeviceBuffer, IndexBuffer, OpenClBackend};

/// The hyper-parameters of one SGD update ([`TrainingKernels::sgd`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    /// Learning rate.
    pub lr: f32,
    /// Momentum μ.
    pub momentum: f32,
    /// Weight decay λ.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// The kernels of the training program on one backend's device.
pub struct TrainingKernels {
    backend: OpenClBackend,
    /// The kernels, by name; the lock makes setting arguments and enqueueing one launch
    /// atomic.
    kernels: Mutex<Kernels>,
    _program: Program,
}

struct Kernels {
    relu_bias_grad: Kernel,
    nll_grad: Kernel,
    sgd: Kernel,
    momentum_accumulate: Kernel,
    gather: Kernel,
}

impl std::fmt::Debug for TrainingKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingKernels")
            .field("backend", &self.backend)
            .finish()
    }
}

/// An error naming the kernel and the operand whose length is wrong.
fn length(kernel: &str, operand: &str, expected: usize, got: usize) -> BackendError {
    BackendError::Device(format!(
        "training kernel {kernel}: {operand} has {got} elements, expected {expected}"
    ))
}

fn at_least(kernel: &str, operand: &str, need: usize, got: usize) -> Result<(), BackendError> {
    if got < need {
        return Err(BackendError::Device(format!(
            "training kernel {kernel}: {operand} has {got} elements, needs at least {need}"
        )));
    }
    Ok(())
}

fn exactly(kernel: &str, operand: &str, expected: usize, got: usize) -> Result<(), BackendError> {
    if got != expected {
        return Err(length(kernel, operand, expected, got));
    }
    Ok(())
}

/// `v` as an OpenCL `int`, or an error naming what it counts.
fn int(kernel: &str, what: &str, v: usize) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| {
        BackendError::Device(format!(
            "training kernel {kernel}: {what} = {v} does not fit an int"
        ))
    })
}

impl TrainingKernels {
    /// Builds the training program on `backend`'s device (once per training run: its source
    /// does not depend on any pattern).
    pub fn new(backend: &OpenClBackend) -> Result<Self, BackendError> {
        let program = backend.build_program(&training_library(), "the training program")?;
        // Arguments are declared with placeholders of the right kinds and set per launch.
        let with_args = |name: &str, args: &[ArgKind]| -> Result<Kernel, BackendError> {
            let mut b = Kernel::builder();
            b.program(&program)
                .name(name)
                .queue(backend.queue().clone());
            for a in args {
                match a {
                    ArgKind::Floats => b.arg(None::<&ocl::Buffer<f32>>),
                    ArgKind::Indices => b.arg(None::<&ocl::Buffer<u32>>),
                    ArgKind::Int => b.arg(0i32),
                    ArgKind::Float => b.arg(0f32),
                };
            }
            b.build()
                .map_err(|e| BackendError::Device(format!("creating kernel {name}: {e}")))
        };
        use ArgKind::{Float, Floats, Indices, Int};
        let kernels = Kernels {
            relu_bias_grad: with_args(
                RELU_BIAS_GRAD,
                &[Floats, Floats, Floats, Int, Int, Int, Int],
            )?,
            nll_grad: with_args(
                NLL_GRAD,
                &[Floats, Indices, Floats, Floats, Int, Int, Int, Int],
            )?,
            sgd: with_args(
                SGD,
                &[Floats, Floats, Floats, Int, Float, Float, Float, Int],
            )?,
            momentum_accumulate: with_args(MOMENTUM_ACCUMULATE, &[Floats, Floats, Int, Float])?,
            gather: with_args(GATHER, &[Floats, Indices, Floats, Int, Int])?,
        };
        Ok(TrainingKernels {
            backend: backend.clone(),
            kernels: Mutex::new(kernels),
            _program: program,
        })
    }

    fn own(&self, kernel: &str, buffers: &[&DeviceBuffer]) -> Result<(), BackendError> {
        for b in buffers {
            self.backend.check_own(b, kernel)?;
        }
        Ok(())
    }

    fn kernels(&self) -> std::sync::MutexGuard<'_, Kernels> {
        // Arguments are set afresh before every launch, so a poisoned lock is still usable.
        self.kernels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues `kernel` over `items` work-items (rounded up to the work-group size), waits
    /// for it and records its device time.
    ///
    /// # Safety
    ///
    /// Every buffer argument of `kernel` must belong to this backend and be long enough for
    /// every index the kernel computes for work-items below `items` (the kernels guard the
    /// rest), and every `int` argument must be the size the buffers were checked against.
    unsafe fn launch(&self, kernel: &Kernel, name: &str, items: usize) -> Result<(), BackendError> {
        if items == 0 {
            return Ok(());
        }
        let global = items.div_ceil(TRAINING_LOCAL_SIZE) * TRAINING_LOCAL_SIZE;
        let mut event = Event::empty();
        // SAFETY: the caller guarantees the buffer lengths and sizes (see above).
        unsafe {
            kernel
                .cmd()
                .global_work_size(global)
                .local_work_size(TRAINING_LOCAL_SIZE)
                .enew(&mut event)
                .enq()
        }
        .map_err(|e| BackendError::Device(format!("launching {name}: {e}")))?;
        self.backend.finish_and_record(&[event], name).map(drop)
    }

    /// The backward step through a layer's fused ReLU and bias, on `[rows × ld]` buffers:
    /// where `relu`, `dy[r,b] = 0` for `y[r,b] ≤ 0`; then `bias_grad[r] = Σ_{b<batch} dy[r,b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn relu_bias_grad(
        &self,
        rows: usize,
        batch: usize,
        ld: usize,
        relu: bool,
        y: &DeviceBuffer,
        dy: &mut DeviceBuffer,
        bias_grad: &mut DeviceBuffer,
    ) -> Result<(), BackendError> {
        let name = RELU_BIAS_GRAD;
        if batch > ld {
            return Err(BackendError::Device(format!(
                "training kernel {name}: batch {batch} > ld {ld}"
            )));
        }
        let cells = rows
            .checked_mul(ld)
            .ok_or_else(|| BackendError::Device(format!("{name}: rows·ld overflows")))?;
        at_least(name, "y", cells, y.len())?;
        at_least(name, "dy", cells, dy.len())?;
        exactly(name, "bias_grad", rows, bias_grad.len())?;
        self.own(name, &[y, dy, bias_grad])?;
        int(name, "rows·ld", cells)?;
        let (rows_i, batch_i, ld_i) = (
            int(name, "rows", rows)?,
            int(name, "batch", batch)?,
            int(name, "ld", ld)?,
        );
        let k = self.kernels();
        let k = &k.relu_bias_grad;
        set(k, name, |k| {
            k.set_arg(0, &y.buffer)?;
            k.set_arg(1, &dy.buffer)?;
            k.set_arg(2, &bias_grad.buffer)?;
            k.set_arg(3, rows_i)?;
            k.set_arg(4, batch_i)?;
            k.set_arg(5, ld_i)?;
            k.set_arg(6, i32::from(relu))
        })?;
        // SAFETY: y and dy hold ≥ rows·ld floats (checked above, and rows·ld fits an int),
        // bias_grad exactly rows; work-item r < rows touches r·ld + b for b < batch ≤ ld and
        // bias_grad[r]. Every buffer belongs to this backend.
        unsafe { self.launch(k, name, rows) }
    }

    /// Log-softmax + NLL on `[classes × ld]` logits for the first `n` of `batch` columns:
    /// `loss[b]` per column (`b < n`; NaN for a label ≥ `classes`) and the gradient
    /// `(softmax − onehot)/n`, zero in the columns `n..batch`.
    #[allow(clippy::too_many_arguments)]
    pub fn nll_grad(
        &self,
        classes: usize,
        n: usize,
        batch: usize,
        ld: usize,
        logits: &DeviceBuffer,
        labels: &IndexBuffer,
        grad: &mut DeviceBuffer,
        loss: &mut DeviceBuffer,
    ) -> Result<(), BackendError> {
        let name = NLL_GRAD;
        if n == 0 || n > batch || batch > ld || classes == 0 {
            return Err(BackendError::Device(format!(
                "training kernel {name}: {n} valid columns of a batch of {batch} (ld {ld}), \
                 {classes} classes"
            )));
        }
        let cells = classes
            .checked_mul(ld)
            .ok_or_else(|| BackendError::Device(format!("{name}: classes·ld overflows")))?;
        at_least(name, "logits", cells, logits.len())?;
        at_least(name, "grad", cells, grad.len())?;
        at_least(name, "labels", n, labels.len())?;
        at_least(name, "loss", n, loss.len())?;
        self.own(name, &[logits, grad, loss])?;
        self.backend.check_own_indices(labels, name)?;
        int(name, "classes·ld", cells)?;
        let (classes_i, n_i, batch_i, ld_i) = (
            int(name, "classes", classes)?,
            int(name, "n", n)?,
            int(name, "batch", batch)?,
            int(name, "ld", ld)?,
        );
        let k = self.kernels();
        let k = &k.nll_grad;
        set(k, name, |k| {
            k.set_arg(0, &logits.buffer)?;
            k.set_arg(1, &labels.buffer)?;
            k.set_arg(2, &grad.buffer)?;
            k.set_arg(3, &loss.buffer)?;
            k.set_arg(4, classes_i)?;
            k.set_arg(5, n_i)?;
            k.set_arg(6, batch_i)?;
            k.set_arg(7, ld_i)
        })?;
        // SAFETY: logits and grad hold ≥ classes·ld floats (which fits an int), labels and
        // loss ≥ n; work-item b < batch ≤ ld touches c·ld + b for c < classes, labels[b] and
        // loss[b] only for b < n, and reads logits[label·ld + b] only for label < classes.
        unsafe { self.launch(k, name, batch) }
    }

    /// One SGD update of `w` from `grad` with the momentum buffer `buf` (all of one length):
    /// `g' = g + λ·w`, `buf = μ·buf + g'`, `w −= lr·(g' + μ·buf)` (Nesterov) or `lr·buf`.
    pub fn sgd(
        &self,
        step: SgdStep,
        w: &mut DeviceBuffer,
        grad: &DeviceBuffer,
        buf: &mut DeviceBuffer,
    ) -> Result<(), BackendError> {
        let name = SGD;
        let n = w.len();
        exactly(name, "grad", n, grad.len())?;
        exactly(name, "momentum", n, buf.len())?;
        self.own(name, &[w, grad, buf])?;
        let n_i = int(name, "n", n)?;
        let k = self.kernels();
        let k = &k.sgd;
        set(k, name, |k| {
            k.set_arg(0, &w.buffer)?;
            k.set_arg(1, &grad.buffer)?;
            k.set_arg(2, &buf.buffer)?;
            k.set_arg(3, n_i)?;
            k.set_arg(4, step.lr)?;
            k.set_arg(5, step.momentum)?;
            k.set_arg(6, step.weight_decay)?;
            k.set_arg(7, i32::from(step.nesterov))
        })?;
        // SAFETY: the three buffers hold exactly n floats; work-item i < n touches index i.
        unsafe { self.launch(k, name, n) }
    }

    /// `m = factor·m + g` over two buffers of one length.
    pub fn momentum_accumulate(
        &self,
        factor: f32,
        m: &mut DeviceBuffer,
        g: &DeviceBuffer,
    ) -> Result<(), BackendError> {
        let name = MOMENTUM_ACCUMULATE;
        let n = m.len();
        exactly(name, "gradient", n, g.len())?;
        self.own(name, &[m, g])?;
        let n_i = int(name, "n", n)?;
        let k = self.kernels();
        let k = &k.momentum_accumulate;
        set(k, name, |k| {
            k.set_arg(0, &m.buffer)?;
            k.set_arg(1, &g.buffer)?;
            k.set_arg(2, n_i)?;
            k.set_arg(3, factor)
        })?;
        // SAFETY: both buffers hold exactly n floats; work-item i < n touches index i.
        unsafe { self.launch(k, name, n) }
    }

    /// `dst[k] = src[index[k]]` for every `k < dst.len()` (`index` as long as `dst`; an index
    /// past `src` gives NaN).
    pub fn gather(
        &self,
        src: &DeviceBuffer,
        index: &IndexBuffer,
        dst: &mut DeviceBuffer,
    ) -> Result<(), BackendError> {
        let name = GATHER;
        let n = dst.len();
        exactly(name, "index", n, index.len())?;
        self.own(name, &[src, dst])?;
        self.backend.check_own_indices(index, name)?;
        let (n_i, src_i) = (int(name, "n", n)?, int(name, "source length", src.len())?);
        let k = self.kernels();
        let k = &k.gather;
        set(k, name, |k| {
            k.set_arg(0, &src.buffer)?;
            k.set_arg(1, &index.buffer)?;
            k.set_arg(2, &dst.buffer)?;
            k.set_arg(3, n_i)?;
            k.set_arg(4, src_i)
        })?;
        // SAFETY: index and dst hold exactly n elements; work-item k < n reads index[k],
        // writes dst[k] and reads src[i] only for i < src.len() (guarded in the kernel).
        unsafe { self.launch(k, name, n) }
    }
}

#[derive(Clone, Copy)]
enum ArgKind {
    Floats,
    Indices,
    Int,
    Float,
}

/// Sets a kernel's arguments, mapping an error to one naming the kernel.
fn set(
    kernel: &Kernel,
    name: &str,
    f: impl FnOnce(&Kernel) -> ocl::Result<()>,
) -> Result<(), BackendError> {
    f(kernel).map_err(|e| BackendError::Device(format!("{name}: setting arguments: {e}")))
}
