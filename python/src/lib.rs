//! `sparsejit._native`: the Rust side of the `sparsejit` Python package (PyO3).
//!
//! - `ops::SparseOps`: one sparse layer's kernels (linear or convolution), compiled for its
//!   current pattern and for each batch size it meets, run on numpy views of torch tensors
//!   without copying them; what `sparsejit.torch`'s modules call from their autograd functions.
//! - `masking`: the runtime's sparse-momentum mask update and prune-rate schedules, on dense
//!   numpy arrays, for `sparsejit.torch.Masking`.
//! - `api`: the numpy-level API: `Pattern`, `compile`, `Kernel` and `kernel_dump`.
//! - `tensors`: safetensors files in `sparse-train`'s checkpoint layout.
//!
//! Every array is checked (dtype, contiguity, shape) before a kernel runs; a mismatch is a
//! Python `TypeError` or `ValueError`, never a crash.

mod api;
mod arrays;
mod masking;
mod ops;
mod tensors;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use runtime::{BackendKind, ExecOptions, Executor};

/// Threads the kernels use; 0 until set (then [`default_threads`]).
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// The executors made so far, one per thread count (a CPU backend owns its thread pool).
static EXECUTORS: OnceLock<Mutex<HashMap<usize, Arc<Executor>>>> = OnceLock::new();

/// The thread count when none was set: one per core, at most 2 (as `sparse-train`).
fn default_threads() -> usize {
    sparse_ir::limits::cores().clamp(1, 2)
}

/// The threads kernels compiled now will use.
pub(crate) fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

/// The CPU executor for `threads` threads (made once, then shared).
pub(crate) fn executor(threads: usize) -> PyResult<Arc<Executor>> {
    let map = EXECUTORS.get_or_init(Default::default);
    let mut map = map
        .lock()
        .map_err(|_| PyRuntimeError::new_err("sparsejit: the executor table is poisoned"))?;
    if let Some(e) = map.get(&threads) {
        return Ok(e.clone());
    }
    let exec = Executor::new(ExecOptions {
        backend: BackendKind::Cpu,
        threads,
        ..ExecOptions::default()
    })
    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let exec = Arc::new(exec);
    map.insert(threads, exec.clone());
    Ok(exec)
}

/// Sets the number of threads sparsejit's kernels use (kernels compile again for it at their
/// next call). `sparsejit.torch` sets it to `torch.get_num_threads()` when imported, unless it
/// was set before.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(PyValueError::new_err(
            "set_num_threads: the number of threads must be at least 1",
        ));
    }
    THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

/// The number of threads sparsejit's kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    threads()
}

/// Whether the thread count was set (by `set_num_threads`).
#[pyfunction]
fn _threads_were_set() -> bool {
    THREADS.load(Ordering::Relaxed) != 0
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(_threads_were_set, m)?)?;
    m.add_class::<ops::SparseOps>()?;
    masking::register(m)?;
    api::register(m)?;
    tensors::register(m)?;
    Ok(())
}
