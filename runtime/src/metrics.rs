//! What `sparse-train --metrics-out` writes: one JSON line per epoch (format version 1).
//!
//! Fields (CONTRACTS.md): `version, epoch, train_loss, val_acc, test_acc` (null until the
//! last epoch), `lr, prune_rate, epoch_seconds, step_ms_median, compile_ms, nnz_total`, and
//! `layers` (`name, nnz, density, strategies` as a map from op to strategy). Accuracies and
//! densities are fractions. Beside them: `steps` (optimiser steps so far), `val_loss`,
//! `dense_steps` (steps of the epoch that computed the dense weight gradient), `update_ms`
//! (the mask update, without compilation) and `mask_updated`.
//!
//! `lr` is the learning rate of the epoch's last step; `prune_rate` the rate the epoch's mask
//! update used (the schedule's current rate when there was none); `layers` describe the masks
//! after that update, which the next epoch trains; `compile_ms` is the compilation time
//! charged to the epoch (the initial compilation in the first, then every recompilation after
//! its mask updates).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The format version of a metrics line.
pub const METRICS_VERSION: u32 = 1;

/// One layer's state at the end of an epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerMetrics {
    /// The layer name.
    pub name: String,
    /// Active weights.
    pub nnz: usize,
    /// `nnz / (rows · cols)`.
    pub density: f64,
    /// The strategy of each compiled op (IR op names).
    pub strategies: BTreeMap<String, String>,
}

/// One epoch's line of `--metrics-out`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// [`METRICS_VERSION`].
    pub version: u32,
    /// The epoch, from 1.
    pub epoch: u32,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f64,
    /// Validation accuracy (fraction), if there is a validation set.
    pub val_acc: Option<f64>,
    /// Test accuracy (fraction), only after the last epoch.
    pub test_acc: Option<f64>,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Prune rate of the epoch's mask update.
    pub prune_rate: f64,
    /// Wall time of the epoch (training, validation, mask update, compilation).
    pub epoch_seconds: f64,
    /// Median wall time of one training step (batch gathering included), milliseconds.
    pub step_ms_median: f64,
    /// Compilation time charged to this epoch, milliseconds.
    pub compile_ms: f64,
    /// Active weights over all layers after the epoch.
    pub nnz_total: usize,
    /// Forward multiply-adds of the masked layers after the epoch, relative to the dense
    /// network's (`Σ nnz_l · c_l / Σ numel_l · c_l`, with `c_l` one weight's multiply-adds per
    /// sample). Absent in metrics written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flops_fraction: Option<f64>,
    /// Per masked layer, in model order.
    pub layers: Vec<LayerMetrics>,
    /// Optimiser steps taken since the start of training.
    pub steps: u64,
    /// Mean validation loss.
    pub val_loss: Option<f64>,
    /// Steps of this epoch that computed the dense weight gradient.
    pub dense_steps: u64,
    /// Time of the mask update itself (without compilation), milliseconds.
    pub update_ms: f64,
    /// Whether the mask was updated at the end of this epoch.
    pub mask_updated: bool,
    /// Data-parallel runs only: the payload bytes this rank passed to all-reduce in the
    /// epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_bytes: Option<u64>,
    /// Data-parallel runs only: the payload an all-reduce of every parameter (weights dense,
    /// biases) at every step of the epoch would have passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_bytes_dense_equivalent: Option<u64>,
}

impl EpochMetrics {
    /// The line without its timings, for comparing runs that must agree bit for bit.
    pub fn without_timings(&self) -> EpochMetrics {
        EpochMetrics {
            epoch_seconds: 0.0,
            step_ms_median: 0.0,
            compile_ms: 0.0,
            update_ms: 0.0,
            ..self.clone()
        }
    }
}

/// The median of some durations in milliseconds (0 for none).
pub fn median_ms(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}
