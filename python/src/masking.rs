//! The runtime's sparse momentum for Python: [`MaskUpdate`] (initial masks and the mask update
//! of `runtime::masking::Masking`) and [`PruneRateSchedule`] (its cosine and linear decay), on
//! dense numpy arrays. `sparsejit.torch.Masking` drives them.

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadwriteArrayDyn};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::arrays::{c_slice, c_slice_mut};
use runtime::masking::{
    self, DecaySchedule, GrowthMode, InitMode, LayerSpec, LayerView, MaskingConfig, PruneMode,
    RedistributionMode,
};

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Registers the classes.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<MaskUpdate>()?;
    m.add_class::<PruneRateSchedule>()?;
    m.add(
        "PRUNE_MODES",
        PruneMode::ALL
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>(),
    )?;
    m.add(
        "GROWTH_MODES",
        GrowthMode::ALL
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>(),
    )?;
    m.add(
        "REDISTRIBUTION_MODES",
        RedistributionMode::ALL
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>(),
    )?;
    m.add(
        "DECAY_SCHEDULES",
        DecaySchedule::ALL
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>(),
    )?;
    Ok(())
}

/// The mask update of sparse momentum and its peers over a list of masked layers (model
/// order): prune, redistribute, regrow, exactly as `sparse-train` does it.
#[pyclass(module = "sparsejit._native")]
pub(crate) struct MaskUpdate {
    masking: masking::Masking,
}

fn writable_list<'py, T: numpy::Element>(
    what: &str,
    list: &Bound<'py, PyList>,
) -> PyResult<Vec<PyReadwriteArrayDyn<'py, T>>> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let a = a.cast_into::<PyArrayDyn<T>>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "{what}[{i}] must be a numpy array of the right dtype"
                ))
            })?;
            a.try_readwrite()
                .map_err(|e| PyValueError::new_err(format!("{what}[{i}] is not writable: {e}")))
        })
        .collect()
}

fn readonly_list<'py>(
    what: &str,
    list: &Bound<'py, PyList>,
) -> PyResult<Vec<numpy::PyReadonlyArrayDyn<'py, f32>>> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let a = a.cast_into::<PyArrayDyn<f32>>().map_err(|_| {
                PyTypeError::new_err(format!("{what}[{i}] must be a float32 numpy array"))
            })?;
            Ok(a.readonly())
        })
        .collect()
}

#[pymethods]
impl MaskUpdate {
    /// `layers`: `(name, weight shape)` of every masked layer, in model order; the modes use
    /// `sparse-train`'s names (`PRUNE_MODES`, `GROWTH_MODES`, `REDISTRIBUTION_MODES`).
    #[new]
    #[pyo3(signature = (layers, density, prune="magnitude", growth="momentum",
                        redistribution="momentum", init="uniform", seed=0))]
    fn new(
        layers: Vec<(String, Vec<usize>)>,
        density: f64,
        prune: &str,
        growth: &str,
        redistribution: &str,
        init: &str,
        seed: u64,
    ) -> PyResult<Self> {
        let config = MaskingConfig {
            density,
            prune: prune.parse().map_err(value_error)?,
            growth: growth.parse().map_err(value_error)?,
            redistribution: redistribution.parse().map_err(value_error)?,
            init: init.parse::<InitMode>().map_err(value_error)?,
            seed,
            flops_budget: None,
        };
        let specs = layers
            .iter()
            .map(|(name, shape)| LayerSpec::new(name, shape))
            .collect::<Result<Vec<_>, _>>()
            .map_err(value_error)?;
        Ok(MaskUpdate {
            masking: masking::Masking::new(config, specs).map_err(value_error)?,
        })
    }

    /// Draws the initial masks: one flat uint8 array per layer (row-major).
    fn init_masks<'py>(&mut self, py: Python<'py>) -> Vec<Bound<'py, PyArray1<u8>>> {
        self.masking
            .init_masks()
            .into_iter()
            .map(|m| PyArray1::from_vec(py, m))
            .collect()
    }

    /// Each layer's initial density.
    fn init_densities(&self) -> Vec<f64> {
        self.masking.init_densities()
    }

    /// True when masks never change (growth `none`, or density 1).
    #[getter]
    fn is_static(&self) -> bool {
        self.masking.is_static()
    }

    /// Whether `update` needs every layer's dense gradient (growth `gradient`).
    #[getter]
    fn needs_gradient(&self) -> bool {
        self.masking.needs_gradient()
    }

    /// Mask updates done so far.
    #[getter]
    fn updates(&self) -> u64 {
        self.masking.updates()
    }

    /// One mask update at global prune rate `prune_rate`. Per layer (model order), flat
    /// row-major arrays of `rows · cols` entries: `weights` (float32, rewritten: pruned
    /// entries 0, grown ones start at 0), `masks` (uint8, rewritten), `momenta` (float32, the
    /// momentum of every entry), `grads` (float32 dense gradients, or `None` unless growth is
    /// `gradient`). Returns the update's report as a JSON string.
    #[pyo3(signature = (weights, masks, momenta, grads, prune_rate))]
    fn update(
        &mut self,
        py: Python<'_>,
        weights: &Bound<'_, PyList>,
        masks: &Bound<'_, PyList>,
        momenta: &Bound<'_, PyList>,
        grads: Option<&Bound<'_, PyList>>,
        prune_rate: f64,
    ) -> PyResult<String> {
        let mut w = writable_list::<f32>("weights", weights)?;
        let mut m = writable_list::<u8>("masks", masks)?;
        let mom = readonly_list("momenta", momenta)?;
        let g = grads.map(|g| readonly_list("grads", g)).transpose()?;
        let n = self.masking.layers().len();
        for (what, len) in [
            ("weights", w.len()),
            ("masks", m.len()),
            ("momenta", mom.len()),
        ]
        .into_iter()
        .chain(g.as_ref().map(|g| ("grads", g.len())))
        {
            if len != n {
                return Err(PyValueError::new_err(format!(
                    "{what} has {len} arrays; the masking has {n} layers"
                )));
            }
        }
        let specs = self.masking.layers().to_vec();
        let mut views = Vec::with_capacity(n);
        let mut grads_iter = g.as_ref().map(|g| g.iter());
        for (i, ((w, m), mom)) in w.iter_mut().zip(m.iter_mut()).zip(&mom).enumerate() {
            let grad = match grads_iter.as_mut() {
                Some(it) => Some(c_slice(
                    &format!("grads[{i}]"),
                    it.next().expect("lengths checked"),
                )?),
                None => None,
            };
            views.push(LayerView {
                name: &specs[i].name,
                rows: specs[i].rows(),
                cols: specs[i].cols(),
                weight: c_slice_mut(&format!("weights[{i}]"), w)?,
                mask: c_slice_mut(&format!("masks[{i}]"), m)?,
                momentum: c_slice(&format!("momenta[{i}]"), mom)?,
                grad,
            });
        }
        let masking = &mut self.masking;
        let report = py
            .detach(|| masking.update(&mut views, prune_rate))
            .map_err(value_error)?;
        serde_json::to_string(&report).map_err(value_error)
    }

    /// The masking's carried state as JSON (for a checkpoint).
    fn state(&self) -> PyResult<String> {
        serde_json::to_string(&self.masking.state()).map_err(value_error)
    }

    /// A masking restored from [`state`](Self::state).
    #[staticmethod]
    fn from_state(state: &str) -> PyResult<Self> {
        let state = serde_json::from_str(state).map_err(value_error)?;
        Ok(MaskUpdate {
            masking: masking::Masking::from_state(state).map_err(value_error)?,
        })
    }
}

/// The prune-rate schedule of `sparse-train` (`cosine`: the reference's `CosineDecay`, bit for
/// bit; `linear`: a straight line), from `initial` down to `min` over `total_steps` steps.
#[pyclass(module = "sparsejit._native")]
pub(crate) struct PruneRateSchedule {
    schedule: masking::PruneRateSchedule,
}

#[pymethods]
impl PruneRateSchedule {
    /// A schedule of `kind` (`cosine` or `linear`).
    #[new]
    #[pyo3(signature = (kind, initial, total_steps, min=masking::DEFAULT_MIN_PRUNE_RATE))]
    fn new(kind: &str, initial: f64, total_steps: u64, min: f64) -> PyResult<Self> {
        let kind: DecaySchedule = kind.parse().map_err(value_error)?;
        Ok(PruneRateSchedule {
            schedule: masking::PruneRateSchedule::with_min(kind, initial, min, total_steps)
                .map_err(value_error)?,
        })
    }

    /// Advances one optimiser step.
    fn step(&mut self) {
        self.schedule.step();
    }

    /// The current rate.
    #[getter]
    fn rate(&self) -> f64 {
        self.schedule.rate()
    }

    /// Steps taken.
    #[getter]
    fn steps(&self) -> u64 {
        self.schedule.steps()
    }

    /// The schedule as JSON (for a checkpoint).
    fn state(&self) -> PyResult<String> {
        serde_json::to_string(&self.schedule).map_err(value_error)
    }

    /// A schedule restored from [`state`](Self::state).
    #[staticmethod]
    fn from_state(state: &str) -> PyResult<Self> {
        Ok(PruneRateSchedule {
            schedule: serde_json::from_str(state).map_err(value_error)?,
        })
    }
}
