//! # runtime
//!
//! The training runtime of sparsejit: networks that stay sparse from the first step, trained
//! with sparse momentum on kernels specialised to each layer's current mask.
//!
//! - [`Matrix`]: feature-major activations `[features × batch]`, row stride padded to 16.
//! - [`layers`]: sparse [`Linear`](layers::Linear) and [`Conv2d`](layers::Conv2d), ReLU,
//!   max-pool, each with a hand-written backward pass; [`loss`]: log-softmax + NLL.
//! - [`Model`] and [`ModelBuilder`]: build an MLP or CNN and run it; [`models`]: LeNet-300-100
//!   and LeNet-5. [`Sgd`]: Nesterov SGD with weight decay.
//! - [`exec`]: the one place where kernels are compiled and run; with the feature `opencl`,
//!   `device::DeviceModel` keeps a training run's tensors on the OpenCL device.
//! - [`masking`]: sparse momentum and its peers; [`Trainer`]: the training loop with
//!   windowed dense momentum and recompilation after mask updates; [`data`]: IDX data sets;
//!   [`checkpoint`]: atomic checkpoints and resume; [`metrics`], [`plot`]: what runs report.
//! - [`distributed`]: data-parallel training over ranks that sum the nonzero weights'
//!   gradients each step (MPI with the cargo feature `mpi`).
//! - [`SparseWeights`] ([`weights`]): one layer's parameters, its optimiser state (one SGD
//!   step, with the lazy decay of inactive momentum, for the host and the OpenCL device) and
//!   its kernels.
//!
//! The modules use each other without cycles; each uses only modules before it in this
//! order: `masking`, `metrics`, `tensor` → `error` → `exec` → `weights` → `layers`, `loss`,
//! `data` → `model` → `models`, `device`, `distributed` → `train` → `checkpoint` (and `plot`
//! → `metrics`).
//!
//! See `docs/SPARSE_MOMENTUM.md` and `docs/CONTRACTS.md` for the algorithm and the formats.

pub mod checkpoint;
pub mod data;
#[cfg(feature = "opencl")]
pub mod device;
pub mod distributed;
pub mod error;
pub mod exec;
pub mod layers;
pub mod loss;
pub mod masking;
pub mod metrics;
pub mod model;
pub mod models;
pub mod plot;
pub mod tensor;
pub mod train;
pub mod weights;

pub use checkpoint::{CheckpointWriter, CrashPoint, ResumeOverrides, TrainState};
pub use data::{Augmentation, DataSource, Dataset, Split};
#[cfg(feature = "opencl")]
pub use device::DeviceModel;
pub use error::{Result, RuntimeError};
pub use exec::{BackendKind, DeviceStats, ExecOptions, Executor, Kernel};
pub use layers::{Layer, Shape};
pub use metrics::{EpochMetrics, LayerMetrics};
pub use model::{CompileReport, Model, ModelBuilder, Sgd, Source};
pub use models::ModelKind;
pub use tensor::{padded_ld, Matrix};
pub use train::{DenseMomentum, EpochEnd, Evaluation, StepInfo, TrainConfig, Trainer};
pub use weights::{LayerPlan, SgdConfig, SparseWeights, WeightGradMode};
