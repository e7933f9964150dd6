//! [`DenseParam`] and [`StatBuffer`]: the dense, unmasked state of layers such as
//! [`BatchNorm`](super::BatchNorm) — trainable parameters with their gradient and momentum,
//! and statistics that are saved but not trained.

use crate::weights::optimiser::{HostSgd, SgdArithmetic};
use crate::weights::SgdConfig;

/// A dense trainable parameter (never masked): its values, the gradient of the last backward
/// pass and the SGD momentum buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseParam {
    /// The checkpoint name, in PyTorch's `state_dict` spelling (`bn1.weight`).
    pub name: String,
    /// The values.
    pub value: Vec<f32>,
    /// The gradient of the last backward pass.
    pub grad: Vec<f32>,
    /// The momentum buffer.
    pub momentum: Vec<f32>,
}

impl DenseParam {
    /// A parameter named `name` with initial values `value`, zero gradient and momentum.
    pub fn new(name: String, value: Vec<f32>) -> Self {
        let n = value.len();
        DenseParam {
            name,
            value,
            grad: vec![0.0; n],
            momentum: vec![0.0; n],
        }
    }

    /// One SGD step with the same arithmetic as the masked weights' (momentum, weight
    /// decay, Nesterov as configured).
    pub fn sgd_step(&mut self, cfg: &SgdConfig, lr: f32) {
        let Ok(()) =
            HostSgd { config: cfg, lr }.sgd(&mut self.value, &self.grad, &mut self.momentum);
    }
}

/// Saved, untrained state of a layer (BatchNorm's running mean and variance).
#[derive(Debug, Clone, PartialEq)]
pub struct StatBuffer {
    /// The checkpoint name, in PyTorch's `state_dict` spelling (`bn1.running_mean`).
    pub name: String,
    /// The values.
    pub value: Vec<f32>,
}
