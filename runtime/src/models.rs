//! The reference's MNIST models, built with [`ModelBuilder`].

use std::fmt;
use std::str::FromStr;

use crate::layers::Shape;
use crate::model::ModelBuilder;

/// A model the trainer knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// LeNet-300-100: fc1 784→300, ReLU; fc2 300→100, ReLU; fc3 100→10.
    Lenet300100,
    /// LeNet-5, Caffe variant: conv1 1→20 5×5, ReLU, max-pool 2; conv2 20→50 5×5, ReLU,
    /// max-pool 2; fc3 800→500, ReLU; fc4 500→10.
    Lenet5,
}

impl ModelKind {
    /// The command-line name: `lenet300-100` or `lenet5`.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Lenet300100 => "lenet300-100",
            ModelKind::Lenet5 => "lenet5",
        }
    }

    /// The model's description for an input of `input` and `classes` classes.
    pub fn builder(self, input: Shape, classes: usize) -> ModelBuilder {
        match self {
            ModelKind::Lenet300100 => lenet300_100(input, classes),
            ModelKind::Lenet5 => lenet5(input, classes),
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lenet300-100" | "lenet300_100" | "lenet-300-100" => Ok(ModelKind::Lenet300100),
            "lenet5" | "lenet-5" => Ok(ModelKind::Lenet5),
            _ => Err(format!(
                "unknown model {s:?} (expected lenet300-100 or lenet5)"
            )),
        }
    }
}

/// LeNet-300-100 (layers `fc1`, `fc2`, `fc3`).
pub fn lenet300_100(input: Shape, classes: usize) -> ModelBuilder {
    ModelBuilder::new("lenet300-100", input)
        .linear("fc1", 300)
        .relu()
        .linear("fc2", 100)
        .relu()
        .linear("fc3", classes)
}

/// LeNet-5, Caffe variant (layers `conv1`, `conv2`, `fc3`, `fc4`), for `1 × 28 × 28` inputs.
pub fn lenet5(input: Shape, classes: usize) -> ModelBuilder {
    ModelBuilder::new("lenet5", input)
        .conv2d("conv1", 20, 5)
        .relu()
        .max_pool(2)
        .conv2d("conv2", 50, 5)
        .relu()
        .max_pool(2)
        .linear("fc3", 500)
        .relu()
        .linear("fc4", classes)
}
