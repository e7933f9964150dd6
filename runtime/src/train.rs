//! [`Trainer`]: sparse-momentum training of a model on a data set, epoch by epoch.
//!
//! Every step: gather a shuffled batch, forward, log-softmax + NLL, backward (sparse kernels:
//! `spmm` forward, `spmm_t` backward data, `sddmm` for the weights of active entries, and the
//! dense weight gradient only where the momentum of inactive entries is needed — see
//! [`DenseMomentum`]), SGD with Nesterov momentum and weight decay, masked entries staying zero.
//! At the end of every epoch but the last (or every `K` steps): the mask update of
//! [`crate::masking`], then only the layers whose pattern changed are recompiled.
//!
//! Decisions the spec leaves open:
//! - The learning rate of 0-based step `s` is `StepLr::lr_at(s + 1)`: the reference calls
//!   `lr_scheduler.step()` before each batch, so its 25,000th step already uses the decayed rate.
//! - Validation runs before the mask update (as the reference's `main.py`); the test set once,
//!   after the last epoch.
//! - The dense arrays (weights and momentum) are synchronised at the end of every epoch, whether
//!   or not a checkpoint is written, so an interrupted and resumed run computes the same thing.
//! - Random streams: weights from ChaCha8 seeded by `seed` (stream 0), the epoch shuffles from
//!   the same key on stream 1, the masking (initial masks, random growth) from its own key
//!   derived from `seed`.

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sparse_ir::Strategy;

use crate::data::{step_key, Augmentation, Dataset, Split};
use crate::distributed::{
    check_patterns, dense_equivalent_bytes, rank_batch, shard, Communicator, GradientBuffer,
};
use crate::error::{Result, RuntimeError};
use crate::exec::{BackendKind, ExecOptions, Executor};
use crate::masking::{
    DecaySchedule, GrowthMode, InitMode, LayerSpec, Masking, MaskingConfig, PruneMode,
    PruneRateSchedule, RedistributionMode, StepLr, UpdateFrequency,
};
use crate::metrics::{median_ms, EpochMetrics, LayerMetrics, METRICS_VERSION};
use crate::model::{Model, Sgd};
use crate::models::ModelKind;
use crate::weights::{LayerPlan, SgdConfig, WeightGradMode};

/// Where the momentum of inactive entries comes from (`--dense-momentum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenseMomentum {
    /// The dense weight gradient every step, as the reference.
    Exact,
    /// The dense weight gradient only in the last `K` steps before each mask update; in other
    /// steps inactive momentum decays by `μ` per step (applied lazily).
    Window(NonZeroU64),
}

impl Default for DenseMomentum {
    fn default() -> Self {
        DenseMomentum::Window(NonZeroU64::new(64).expect("64 > 0"))
    }
}

impl fmt::Display for DenseMomentum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenseMomentum::Exact => f.write_str("exact"),
            DenseMomentum::Window(k) => write!(f, "window:{k}"),
        }
    }
}

impl FromStr for DenseMomentum {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if s == "exact" {
            return Ok(DenseMomentum::Exact);
        }
        s.strip_prefix("window:")
            .and_then(|k| k.parse::<NonZeroU64>().ok())
            .map(DenseMomentum::Window)
            .ok_or_else(|| {
                format!("invalid dense momentum {s:?} (expected exact or window:K with K ≥ 1)")
            })
    }
}

/// Serde through `Display`/`FromStr`.
mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// Everything that defines a training run (saved in every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model.
    #[serde(with = "as_text")]
    pub model: ModelKind,
    /// Global density `d` in (0, 1]; 1 trains dense.
    pub density: f64,
    /// Epochs.
    pub epochs: u32,
    /// Batch size (training and evaluation).
    pub batch_size: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// Learning-rate decay factor.
    pub lr_gamma: f64,
    /// Steps between learning-rate decays.
    pub lr_step: u64,
    /// SGD momentum μ.
    pub momentum: f32,
    /// Weight decay λ (weights and biases).
    pub weight_decay: f32,
    /// Seed of every random stream.
    pub seed: u64,
    /// Most threads a kernel uses (the CPU planner chooses one or this many per kernel); by
    /// default 2, or 1 on a one-core machine.
    pub threads: usize,
    /// The backend.
    #[serde(with = "as_text")]
    pub backend: BackendKind,
    /// The strategy asked for every op (`auto` lets the planner choose).
    #[serde(with = "as_text")]
    pub strategy: Strategy,
    /// Dense momentum: exact or windowed.
    #[serde(with = "as_text")]
    pub dense_momentum: DenseMomentum,
    /// `--prune`.
    pub prune: PruneMode,
    /// `--growth`.
    pub growth: GrowthMode,
    /// `--redistribution`.
    pub redistribution: RedistributionMode,
    /// Initial prune rate.
    pub prune_rate: f64,
    /// Prune-rate schedule.
    pub decay_schedule: DecaySchedule,
    /// When masks change.
    pub update_frequency: UpdateFrequency,
    /// Initial masks.
    pub init: InitMode,
    /// `--flops-budget F`: the forward multiply-adds stay at or below `F` times the dense
    /// network's (see [`MaskingConfig::flops_budget`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flops_budget: Option<f64>,
    /// Fixed plans within an epoch and bitwise-reproducible resumes.
    pub deterministic: bool,
    /// Hot swap: a recompiled layer whose plan is the JIT runs the generic kernel until a
    /// background thread has compiled its JIT code (`ExecOptions::hot_swap`); not with
    /// `deterministic`, where the kernel that runs must not depend on timing.
    #[serde(default)]
    pub hot_swap: bool,
    /// Use only the first N training images (tests, quick runs).
    pub train_limit: Option<usize>,
    /// Use only the first N validation and test images.
    pub eval_limit: Option<usize>,
    /// Random crops and flips of the training samples (the reference's CIFAR-10
    /// augmentation), drawn from the seed and the step; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<Augmentation>,
}

impl Default for TrainConfig {
    /// The reference's MNIST settings: LeNet-300-100 at 5 %, 10 epochs, batch 100, lr 0.1.
    fn default() -> Self {
        TrainConfig {
            model: ModelKind::Lenet300100,
            density: 0.05,
            epochs: 10,
            batch_size: 100,
            lr: 0.1,
            lr_gamma: 0.1,
            lr_step: 25_000,
            momentum: 0.9,
            weight_decay: 5e-4,
            seed: 17,
            threads: sparse_ir::limits::cores().min(2),
            backend: BackendKind::Cpu,
            strategy: Strategy::Auto,
            dense_momentum: DenseMomentum::default(),
            prune: PruneMode::default(),
            growth: GrowthMode::default(),
            redistribution: RedistributionMode::default(),
            prune_rate: 0.5,
            decay_schedule: DecaySchedule::default(),
            update_frequency: UpdateFrequency::default(),
            init: InitMode::default(),
            flops_budget: None,
            deterministic: false,
            hot_swap: false,
            train_limit: None,
            eval_limit: None,
            augmentation: None,
        }
    }
}

impl TrainConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(RuntimeError::Config(m));
        if !(self.density > 0.0 && self.density <= 1.0) {
            return bad(format!("--density {} is not in (0, 1]", self.density));
        }
        if self.epochs == 0 {
            return bad("--epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr {} must be positive", self.lr));
        }
        if !(0.0..=1.0).contains(&self.prune_rate) {
            return bad(format!("--prune-rate {} is not in [0, 1]", self.prune_rate));
        }
        if self.threads == 0 {
            return bad("--threads must be at least 1".into());
        }
        if self.lr_step == 0 {
            return bad("the learning-rate step must be at least 1".into());
        }
        if let Some(f) = self.flops_budget {
            if !(f > 0.0 && f <= 1.0) {
                return bad(format!("--flops-budget {f} is not in (0, 1]"));
            }
            if self.density >= 1.0 {
                return bad("--flops-budget needs a sparse run: --density must be below 1".into());
            }
        }
        Ok(())
    }

    fn masking_config(&self) -> MaskingConfig {
        MaskingConfig {
            density: self.density,
            prune: self.prune,
            growth: self.growth,
            redistribution: self.redistribution,
            init: self.init,
            seed: self.seed ^ 0x6d61_736b_696e_6721, // "masking!": a key of its own
            flops_budget: self.flops_budget,
        }
    }
}

/// The state of a ChaCha8 stream, for checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngSnapshot {
    /// The key, 64 hex digits.
    pub seed: String,
    /// The stream number.
    pub stream: u64,
    /// The position in 32-bit words, in decimal.
    pub word_pos: String,
}

impl RngSnapshot {
    /// The state of `rng`.
    pub fn of(rng: &ChaCha8Rng) -> Self {
        RngSnapshot {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// The generator in this state.
    pub fn restore(&self) -> std::result::Result<ChaCha8Rng, String> {
        if self.seed.len() != 64 || !self.seed.is_ascii() {
            return Err("rng seed is malformed".into());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16)
                .map_err(|_| "rng seed is malformed".to_string())?;
        }
        let pos: u128 = self
            .word_pos
            .parse()
            .map_err(|_| "rng word_pos is malformed".to_string())?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// Where an interrupted epoch stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// Steps of the epoch already taken.
    pub step_in_epoch: u64,
    /// Sum of their losses.
    pub loss_sum: f64,
    /// How many of them computed the dense gradient.
    pub dense_steps: u64,
    /// Wall time spent on them.
    pub seconds: f64,
    /// The shuffle generator before this epoch's shuffle (to redo the same order).
    pub shuffle_rng: RngSnapshot,
}

/// Progress of one training step, for progress bars.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// The epoch, from 1.
    pub epoch: u32,
    /// Steps of this epoch done, this one included.
    pub step_in_epoch: u64,
    /// Steps in the epoch.
    pub steps_in_epoch: u64,
    /// This step's loss.
    pub loss: f64,
}

/// How [`Trainer::run_epoch`] ended.
#[derive(Debug, Clone)]
pub enum EpochEnd {
    /// The epoch finished; its metrics.
    Completed(Box<EpochMetrics>),
    /// The stop flag was raised inside the epoch; [`Trainer::partial_epoch`] says where.
    Interrupted,
}

/// Accuracy and loss on one split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean loss.
    pub loss: f64,
    /// Fraction correct.
    pub accuracy: f64,
    /// Samples evaluated.
    pub samples: usize,
}

/// A training run: model, data, optimiser, masking, schedules and counters.
pub struct Trainer {
    config: TrainConfig,
    data: Dataset,
    model: Model,
    exec: Executor,
    masking: Masking,
    prune_schedule: PruneRateSchedule,
    lr_schedule: StepLr,
    sgd: Sgd,
    epoch: u32,
    step: u64,
    shuffle_rng: ChaCha8Rng,
    partial: Option<PartialEpoch>,
    history: Vec<EpochMetrics>,
    order: Vec<u32>,
    eval_indices: Vec<u32>,
    step_ms: Vec<f64>,
    compile_ms_pending: f64,
    /// The other ranks of a data-parallel run (see [`crate::distributed`]), if any.
    comm: Option<Box<dyn Communicator>>,
    /// The gradients of a data-parallel step, packed for the all-reduce.
    grad_buf: GradientBuffer,
    /// Bytes this rank passed to all-reduce in the current epoch.
    comm_bytes: u64,
    /// Whether a rank asked to stop at the last data-parallel step.
    peers_stopped: bool,
    /// The model's training state on the OpenCL device, when it runs there (see
    /// [`crate::device`]); `None` on the host backends and for models the device path does
    /// not support.
    #[cfg(feature = "opencl")]
    device: Option<crate::device::DeviceModel>,
}

/// Where a run stands beside its model and configuration: what a checkpoint restores
/// ([`Trainer::restore_progress`]).
pub(crate) struct RunProgress {
    /// The masking with its state (correction term, shortfall history).
    pub masking: Masking,
    /// The prune-rate schedule.
    pub prune_schedule: PruneRateSchedule,
    /// The learning-rate schedule.
    pub lr_schedule: StepLr,
    /// Completed epochs.
    pub epoch: u32,
    /// Optimiser steps taken.
    pub step: u64,
    /// Where an interrupted epoch stopped.
    pub partial: Option<PartialEpoch>,
    /// The shuffling generator.
    pub shuffle_rng: ChaCha8Rng,
    /// The metrics of every completed epoch.
    pub history: Vec<EpochMetrics>,
    /// Compilation time not yet reported in an epoch's metrics.
    pub compile_ms_pending: f64,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &self.model)
            .field("epoch", &self.epoch)
            .field("step", &self.step)
            .finish()
    }
}

impl Trainer {
    /// Sets up a fresh run: the model with Kaiming-uniform weights, the initial masks, the
    /// schedules, and every kernel compiled.
    pub fn new(config: TrainConfig, data: Dataset) -> Result<Self> {
        Self::new_with(config, data, None)
    }

    /// [`new`](Self::new) for one rank of a data-parallel run: the model takes this rank's
    /// share of every global batch of `config.batch_size`, and the gradients are summed over
    /// the ranks of `comm` at every step (see [`crate::distributed`]).
    pub fn new_distributed(
        config: TrainConfig,
        data: Dataset,
        comm: Box<dyn Communicator>,
    ) -> Result<Self> {
        Self::new_with(config, data, Some(comm))
    }

    fn new_with(
        config: TrainConfig,
        data: Dataset,
        comm: Option<Box<dyn Communicator>>,
    ) -> Result<Self> {
        let mut t = Self::build(config, data, comm)?;
        if t.config.density < 1.0 {
            let masks = t.masking.init_masks();
            let sgd = t.sgd.config;
            for (w, mask) in t.model.sparse_layers_mut().zip(masks) {
                w.sync_dense(&sgd);
                let weight = w.dense_weight().to_vec();
                w.set_dense(&weight, &mask, None, None)?;
            }
        }
        t.compile_all()?;
        Ok(t)
    }

    /// Everything but the masks and the compilation; with `comm`, one rank of a data-parallel
    /// run.
    pub(crate) fn build(
        config: TrainConfig,
        mut data: Dataset,
        comm: Option<Box<dyn Communicator>>,
    ) -> Result<Self> {
        config.validate()?;
        data.limit(config.train_limit, config.eval_limit);
        if data.is_empty(Split::Train) {
            return Err(RuntimeError::Config("the training set is empty".into()));
        }
        let samples = data.len(Split::Train);
        if config.batch_size > samples {
            return Err(RuntimeError::Config(format!(
                "--batch-size {} is more than the {samples} training samples: use at most {samples}",
                config.batch_size
            )));
        }
        let exec = Executor::new(ExecOptions {
            backend: config.backend,
            threads: config.threads,
            hot_swap: config.hot_swap && !config.deterministic,
            // With --deterministic the plan must not depend on timing either; nor in a
            // data-parallel run, whose ranks (often on one machine) would time each other's
            // kernels.
            plan_timing: !config.deterministic && comm.is_none(),
            // Sparse masks change after every epoch; a dense run keeps its patterns.
            launches_per_pattern: (config.density < 1.0)
                .then(|| steps_per_epoch(&data, config.batch_size)),
        })?;
        if let Some(c) = &comm {
            if config.batch_size < c.size() {
                return Err(RuntimeError::Config(format!(
                    "--batch-size {} is smaller than the {} ranks: every rank needs a sample",
                    config.batch_size,
                    c.size()
                )));
            }
            if config.backend == BackendKind::OpenCl {
                return Err(RuntimeError::Config(
                    "--distributed runs on the cpu backend only".into(),
                ));
            }
        }
        // Each rank's model holds its share of a global batch.
        let model_batch = comm.as_ref().map_or(config.batch_size, |c| {
            rank_batch(config.batch_size, c.size())
        });
        let mut init_rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut model = config
            .model
            .builder(data.shape(), data.classes())
            .build(model_batch, &mut init_rng)?;
        model.set_threads(config.threads);
        let specs = model
            .sparse_layers()
            .zip(model.sparse_layer_macs_per_weight())
            .map(|(w, macs)| LayerSpec::new(w.name(), w.shape())?.with_macs_per_weight(macs))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let masking = Masking::new(config.masking_config(), specs)?;
        let mut shuffle_rng = ChaCha8Rng::seed_from_u64(config.seed);
        shuffle_rng.set_stream(1);
        let total = u64::from(config.epochs) * steps_per_epoch(&data, config.batch_size);
        let prune_schedule =
            PruneRateSchedule::new(config.decay_schedule, config.prune_rate, total)?;
        let lr_schedule = StepLr {
            base: config.lr,
            gamma: config.lr_gamma,
            step_size: config.lr_step,
        };
        let sgd = Sgd::new(SgdConfig {
            momentum: config.momentum,
            weight_decay: config.weight_decay,
            nesterov: true,
        });
        let batch = config.batch_size;
        let mut t = Trainer {
            config,
            data,
            model,
            exec,
            masking,
            prune_schedule,
            lr_schedule,
            sgd,
            epoch: 0,
            step: 0,
            shuffle_rng,
            partial: None,
            history: Vec::new(),
            order: Vec::new(),
            eval_indices: Vec::with_capacity(batch),
            step_ms: Vec::new(),
            compile_ms_pending: 0.0,
            comm,
            grad_buf: GradientBuffer::default(),
            comm_bytes: 0,
            peers_stopped: false,
            #[cfg(feature = "opencl")]
            device: None,
        };
        #[cfg(feature = "opencl")]
        {
            t.device = crate::device::DeviceModel::new(&t.exec, &t.model)?;
        }
        let plan = LayerPlan::uniform(t.config.strategy);
        for w in t.model.sparse_layers_mut() {
            w.set_plan(plan);
        }
        Ok(t)
    }

    /// Compiles every layer whose kernels are missing or stale; the time counts in the next
    /// epoch's metrics.
    pub(crate) fn compile_all(&mut self) -> Result<()> {
        let report = self.model.compile(&self.exec)?;
        let ms = report.total.as_secs_f64() * 1e3;
        tracing::info!(ms, layers = report.layers.len(), "kernels compiled");
        self.compile_ms_pending += ms;
        Ok(())
    }

    /// [`compile_all`](Self::compile_all) without counting the time (compilation on resume
    /// is not part of the saved run's metrics).
    pub(crate) fn compile_all_unrecorded(&mut self) -> Result<()> {
        let pending = self.compile_ms_pending;
        self.compile_all()?;
        self.compile_ms_pending = pending;
        Ok(())
    }

    /// Replaces where the run stands (after [`build`](Self::build), from a checkpoint).
    pub(crate) fn restore_progress(&mut self, progress: RunProgress) {
        let RunProgress {
            masking,
            prune_schedule,
            lr_schedule,
            epoch,
            step,
            partial,
            shuffle_rng,
            history,
            compile_ms_pending,
        } = progress;
        self.masking = masking;
        self.prune_schedule = prune_schedule;
        self.lr_schedule = lr_schedule;
        self.epoch = epoch;
        self.step = step;
        self.partial = partial;
        self.shuffle_rng = shuffle_rng;
        self.history = history;
        self.compile_ms_pending = compile_ms_pending;
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The executor that compiles and runs this run's kernels (its device, and on OpenCL
    /// its kernel and transfer times).
    pub fn executor(&self) -> &Executor {
        &self.exec
    }

    /// The prune-rate schedule.
    pub(crate) fn prune_schedule(&self) -> &PruneRateSchedule {
        &self.prune_schedule
    }

    /// The learning-rate schedule.
    pub(crate) fn lr_schedule(&self) -> StepLr {
        self.lr_schedule
    }

    /// The shuffling generator.
    pub(crate) fn shuffle_rng(&self) -> &ChaCha8Rng {
        &self.shuffle_rng
    }

    /// Compilation time not yet reported in an epoch's metrics.
    pub(crate) fn compile_ms_pending(&self) -> f64 {
        self.compile_ms_pending
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model, mutable (e.g. to load weights). On a device backend the next step uploads
    /// the host model again.
    pub fn model_mut(&mut self) -> &mut Model {
        self.invalidate_device();
        &mut self.model
    }

    /// Brings the steps a device took back into the host model, which owns the state
    /// afterwards (nothing to do on the host backends).
    pub(crate) fn pull_device(&mut self) -> Result<()> {
        #[cfg(feature = "opencl")]
        if let Some(d) = &mut self.device {
            d.pull(&mut self.model)?;
        }
        Ok(())
    }

    /// [`pull_device`](Self::pull_device), then every layer's dense arrays made complete
    /// ([`Model::sync_dense`]): the host model as a mask update or a checkpoint needs it.
    pub(crate) fn sync_host_model(&mut self) -> Result<()> {
        self.pull_device()?;
        self.model.sync_dense(&self.sgd.config);
        Ok(())
    }

    /// Marks the host model as newer than a device's copy (after the host changed it).
    fn invalidate_device(&mut self) {
        #[cfg(feature = "opencl")]
        if let Some(d) = &mut self.device {
            d.invalidate();
        }
    }

    /// Whether training steps run with every tensor on the device (OpenCL, linear models).
    pub fn device_resident(&self) -> bool {
        #[cfg(feature = "opencl")]
        if self.device.is_some() {
            return true;
        }
        false
    }

    /// The data set (after the limits of the configuration).
    pub fn data(&self) -> &Dataset {
        &self.data
    }

    /// The masking.
    pub fn masking(&self) -> &Masking {
        &self.masking
    }

    /// Completed epochs.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Optimiser steps taken.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Where an interrupted epoch stopped, if it did.
    pub fn partial_epoch(&self) -> Option<&PartialEpoch> {
        self.partial.as_ref()
    }

    /// The metrics of every completed epoch.
    pub fn history(&self) -> &[EpochMetrics] {
        &self.history
    }

    /// Whether every epoch has run.
    pub fn finished(&self) -> bool {
        self.epoch >= self.config.epochs
    }

    /// Steps in one epoch (`⌈training samples / batch⌉`).
    pub fn steps_per_epoch(&self) -> u64 {
        steps_per_epoch(&self.data, self.config.batch_size)
    }

    /// Steps in the whole run.
    pub fn total_steps(&self) -> u64 {
        u64::from(self.config.epochs) * self.steps_per_epoch()
    }

    /// The weight-gradient mode of the next step.
    fn grad_mode(&self) -> WeightGradMode {
        if self.masking.is_static() {
            return WeightGradMode::Active;
        }
        match self.config.dense_momentum {
            DenseMomentum::Exact => WeightGradMode::Dense,
            DenseMomentum::Window(k) => {
                match self.config.update_frequency.next_update_after(
                    self.step,
                    self.steps_per_epoch(),
                    self.total_steps(),
                ) {
                    Some(u) if u - (self.step + 1) < k.get() => WeightGradMode::Dense,
                    _ => WeightGradMode::Active,
                }
            }
        }
    }

    fn updates_after(&self, steps_done: u64) -> bool {
        !self.masking.is_static()
            && self.config.update_frequency.updates_after(
                steps_done,
                self.steps_per_epoch(),
                self.total_steps(),
            )
    }

    /// Gathers the samples `order[range]` into the model's buffers for the next step
    /// (augmented when the run augments, drawn from the seed and the step) and gives the
    /// model the step's key for its dropout; the number of samples.
    fn gather_step(&mut self, range: std::ops::Range<usize>) -> Result<usize> {
        let (input, labels) = self.model.batch_buffers_mut();
        let indices = &self.order[range];
        let n = match &self.config.augmentation {
            Some(a) => {
                let key = step_key(self.config.seed, self.step);
                self.data
                    .gather_augmented(Split::Train, indices, input, labels, a, key)?
            }
            None => self.data.gather(Split::Train, indices, input, labels)?,
        };
        // Dropout's draws (a key of their own, so that they do not repeat the crops').
        self.model
            .set_step_key(step_key(self.config.seed ^ 0xd50f_0000, self.step));
        Ok(n)
    }

    /// One training step on the samples `order[lo..hi]`; returns the loss and whether the
    /// dense gradient was computed.
    fn train_step(&mut self, lo: usize, hi: usize, stop: &AtomicBool) -> Result<(f64, bool)> {
        // A data-parallel rank takes its share of the global batch; a share left empty (a
        // last batch smaller than the ranks) still runs one sample, weighted 0, so that every
        // rank's bookkeeping stays the same.
        let (lo_r, hi_r, weight) = match &self.comm {
            Some(c) => {
                let r = shard(hi - lo, c.rank(), c.size());
                let w = r.len() as f64 / (hi - lo) as f64;
                let (a, b) = (lo + r.start, lo + r.end);
                if a == b {
                    (lo, lo + 1, 0.0)
                } else {
                    (a, b, w)
                }
            }
            None => (lo, hi, 1.0),
        };
        let n = self.gather_step(lo_r..hi_r)?;
        let mode = self.grad_mode();
        let lr = self.lr_schedule.lr_at(self.step + 1) as f32;
        let loss = self.step_on_backend(n, mode, lr, weight, stop)?;
        if !loss.is_finite() {
            return Err(RuntimeError::Config(format!(
                "training diverged: the loss is {loss} at step {} (epoch {})",
                self.step + 1,
                self.epoch + 1
            )));
        }
        self.prune_schedule.step();
        self.step += 1;
        Ok((loss, mode == WeightGradMode::Dense))
    }

    /// Forward, backward and the SGD update with learning rate `lr` on the batch in the
    /// model's buffers (`n` valid columns): on the device where the model lives there, else
    /// through the host model. Returns the mean loss.
    ///
    /// In a data-parallel run, `weight` is this rank's share of the global batch: the
    /// gradients and the loss are weighted by it and summed over the ranks before the step,
    /// and `stop` is summed with them so that every rank stops after the same step.
    fn step_on_backend(
        &mut self,
        n: usize,
        mode: WeightGradMode,
        lr: f32,
        weight: f64,
        stop: &AtomicBool,
    ) -> Result<f64> {
        #[cfg(feature = "opencl")]
        if let Some(d) = &mut self.device {
            return d.train_step(&self.model, n, mode, &self.sgd.config, lr);
        }
        let mut loss = self.model.forward_backward(n, mode)?;
        if let Some(c) = &self.comm {
            let dense = mode == WeightGradMode::Dense;
            let bytes = self.grad_buf.pack(&self.model, weight as f32, dense);
            c.all_reduce_sum(self.grad_buf.as_mut_slice())?;
            self.grad_buf.unpack(&mut self.model, dense)?;
            let mut shared = [
                loss * weight,
                f64::from(u8::from(stop.load(Ordering::SeqCst))),
            ];
            c.all_reduce_sum_f64(&mut shared)?;
            loss = shared[0];
            self.peers_stopped = shared[1] > 0.0;
            self.comm_bytes += (bytes + std::mem::size_of_val(&shared)) as u64;
        }
        if loss.is_finite() {
            self.sgd.step(&mut self.model, lr);
        }
        Ok(loss)
    }

    /// For benchmarks: compiles what is missing, then runs `steps` training steps whose
    /// weight gradient is `mode` (whatever the schedule says), on consecutive batches of the
    /// shuffled training set; returns each step's milliseconds (batch gathering included, as
    /// in an epoch's `step_ms`).
    pub fn bench_steps(&mut self, steps: usize, mode: WeightGradMode) -> Result<Vec<f64>> {
        self.compile_all_unrecorded()?;
        let n_train = self.data.len(Split::Train);
        let batch = self.config.batch_size;
        if self.order.len() != n_train {
            self.order.clear();
            self.order.extend(0..n_train as u32);
            self.order.shuffle(&mut self.shuffle_rng);
        }
        let stop = AtomicBool::new(false);
        let lr = self.lr_schedule.lr_at(self.step + 1) as f32;
        let per_epoch = n_train / batch;
        let mut times = Vec::with_capacity(steps);
        for i in 0..steps {
            let t0 = Instant::now();
            let lo = (i % per_epoch.max(1)) * batch;
            let n = self.gather_step(lo..(lo + batch).min(n_train))?;
            self.step_on_backend(n, mode, lr, 1.0, &stop)?;
            self.step += 1;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(times)
    }

    /// For benchmarks: one mask update at the current prune rate and the recompilation of
    /// the layers whose pattern changed; the update's and the compilation's milliseconds.
    pub fn bench_mask_update(&mut self) -> Result<(f64, f64)> {
        self.compile_all_unrecorded()?;
        self.mask_update(false)
    }

    /// Whether the run stops now: the stop flag, or in a data-parallel run what the ranks
    /// agreed at the last step (so that they all stop after the same step).
    fn stopping(&self, stop: &AtomicBool) -> bool {
        match self.comm {
            Some(_) => self.peers_stopped,
            None => stop.load(Ordering::SeqCst),
        }
    }

    /// This rank and the number of ranks (0 and 1 outside a data-parallel run).
    pub fn rank(&self) -> (usize, usize) {
        self.comm.as_ref().map_or((0, 1), |c| (c.rank(), c.size()))
    }

    /// Runs (the rest of) the next epoch. `stop` is checked after every step: when it is
    /// raised before the epoch's last step, the epoch stops there ([`EpochEnd::Interrupted`]).
    pub fn run_epoch(
        &mut self,
        stop: &AtomicBool,
        on_step: &mut dyn FnMut(&StepInfo),
    ) -> Result<EpochEnd> {
        if self.finished() {
            return Err(RuntimeError::Config(format!(
                "all {} epochs have run",
                self.config.epochs
            )));
        }
        let epoch = self.epoch + 1;
        let spe = self.steps_per_epoch();
        let batch = self.config.batch_size;
        let n_train = self.data.len(Split::Train);
        let (first, mut loss_sum, mut dense_steps, seconds_before) = match self.partial.take() {
            Some(p) => {
                self.shuffle_rng = p.shuffle_rng.restore().map_err(RuntimeError::Config)?;
                (p.step_in_epoch, p.loss_sum, p.dense_steps, p.seconds)
            }
            None => (0, 0.0, 0, 0.0),
        };
        let rng_before = RngSnapshot::of(&self.shuffle_rng);
        self.order.clear();
        self.order.extend(0..n_train as u32);
        self.order.shuffle(&mut self.shuffle_rng);
        self.step_ms.clear();
        self.step_ms.reserve(spe as usize);
        let mut compile_ms = std::mem::take(&mut self.compile_ms_pending);
        let mut update_ms = 0.0;
        self.comm_bytes = 0;
        let started = Instant::now();
        for i in first..spe {
            let t0 = Instant::now();
            let lo = i as usize * batch;
            let hi = (lo + batch).min(n_train);
            let (loss, dense) = self.train_step(lo, hi, stop)?;
            self.step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            loss_sum += loss;
            dense_steps += u64::from(dense);
            on_step(&StepInfo {
                epoch,
                step_in_epoch: i + 1,
                steps_in_epoch: spe,
                loss,
            });
            let last = i + 1 == spe;
            if !last && self.updates_after(self.step) {
                let (u, c) = self.mask_update(true)?;
                update_ms += u;
                compile_ms += c;
            }
            if !last && self.stopping(stop) {
                self.sync_host_model()?;
                self.partial = Some(PartialEpoch {
                    step_in_epoch: i + 1,
                    loss_sum,
                    dense_steps,
                    seconds: seconds_before + started.elapsed().as_secs_f64(),
                    shuffle_rng: rng_before,
                });
                self.compile_ms_pending = compile_ms;
                return Ok(EpochEnd::Interrupted);
            }
        }
        let val = if self.data.is_empty(Split::Validation) {
            None
        } else {
            Some(self.evaluate(Split::Validation)?)
        };
        self.sync_host_model()?;
        let rate = self.prune_schedule.rate();
        let mask_updated = self.updates_after(self.step);
        if mask_updated {
            let (u, c) = self.mask_update(false)?;
            update_ms += u;
            compile_ms += c;
        }
        let epoch_seconds = seconds_before + started.elapsed().as_secs_f64();
        self.epoch = epoch;
        let test = if self.finished() && !self.data.is_empty(Split::Test) {
            Some(self.evaluate(Split::Test)?)
        } else {
            None
        };
        let layers: Vec<LayerMetrics> = self
            .model
            .sparse_layers()
            .map(|w| LayerMetrics {
                name: w.name().to_string(),
                nnz: w.nnz(),
                density: w.density(),
                strategies: w.strategies(),
            })
            .collect();
        let metrics = EpochMetrics {
            version: METRICS_VERSION,
            epoch,
            train_loss: loss_sum / spe as f64,
            val_acc: val.map(|v| v.accuracy),
            test_acc: test.map(|t| t.accuracy),
            lr: self.lr_schedule.lr_at(self.step),
            prune_rate: rate,
            epoch_seconds,
            step_ms_median: median_ms(&mut self.step_ms),
            compile_ms,
            nnz_total: self.model.nnz(),
            flops_fraction: Some(self.flops_fraction()?),
            layers,
            steps: self.step,
            val_loss: val.map(|v| v.loss),
            dense_steps,
            update_ms,
            mask_updated,
            comm_bytes: self.comm.as_ref().map(|_| self.comm_bytes),
            comm_bytes_dense_equivalent: self
                .comm
                .as_ref()
                .map(|_| (dense_equivalent_bytes(&self.model) as u64) * (spe - first)),
        };
        self.history.push(metrics.clone());
        Ok(EpochEnd::Completed(Box::new(metrics)))
    }

    /// The forward multiply-adds of the masked layers relative to dense.
    pub fn flops_fraction(&self) -> Result<f64> {
        let nnz: Vec<usize> = self.model.sparse_layers().map(|w| w.nnz()).collect();
        Ok(self.masking.flops_fraction(&nnz)?)
    }

    /// One mask update and the recompilation of the layers whose pattern changed; returns the
    /// update's and the compilation's milliseconds.
    fn mask_update(&mut self, mid_epoch: bool) -> Result<(f64, f64)> {
        let started = Instant::now();
        self.sync_host_model()?;
        let rate = self.prune_schedule.rate();
        let report = {
            let mut views: Vec<_> = self
                .model
                .sparse_layers_mut()
                .map(|w| w.masking_view())
                .collect();
            self.masking.update(&mut views, rate)?
        };
        let mut changed = Vec::new();
        for w in self.model.sparse_layers_mut() {
            if w.rebuild_from_dense()? {
                changed.push(w.name().to_string());
            }
        }
        if let Some(c) = &self.comm {
            check_patterns(c.as_ref(), &self.model)?;
        }
        let update_ms = started.elapsed().as_secs_f64() * 1e3;
        // With --deterministic the plan holds for the whole epoch: a layer recompiled inside
        // it keeps its strategies.
        let keep_plan = self.config.deterministic && mid_epoch;
        let requested = LayerPlan::uniform(self.config.strategy);
        if keep_plan {
            for w in self.model.sparse_layers_mut() {
                if let Some(p) = w.compiled_plan() {
                    w.set_plan(p);
                }
            }
        }
        let compile = self.model.compile(&self.exec)?;
        if keep_plan {
            for w in self.model.sparse_layers_mut() {
                w.set_plan(requested);
            }
        }
        for l in &report.layers {
            let ms = compile
                .layers
                .iter()
                .find(|(n, _)| *n == l.name)
                .map_or(0.0, |(_, d)| d.as_secs_f64() * 1e3);
            tracing::info!(
                layer = %l.name,
                nnz_before = l.nonzeros_before,
                nnz_after = l.nonzeros_after,
                pruned = l.num_pruned,
                regrown = l.num_regrown,
                changed = l.changed,
                recompile_ms = ms,
                "mask update"
            );
        }
        let compile_ms = compile.total.as_secs_f64() * 1e3;
        tracing::info!(
            step = self.step,
            prune_rate = rate,
            nnz = report.total_nonzero_after,
            changed = ?changed,
            update_ms,
            compile_ms,
            "mask updated; recompiled the changed layers"
        );
        Ok((update_ms, compile_ms))
    }

    /// Accuracy and mean loss on a split (batches of the training batch size).
    pub fn evaluate(&mut self, split: Split) -> Result<Evaluation> {
        let n = self.data.len(split);
        // Batch normalisation by its running statistics, no dropout.
        self.model.set_training(false);
        let result = self.evaluate_batches(split);
        self.model.set_training(true);
        let (mut loss, mut correct) = result?;
        if let Some(c) = &self.comm {
            let mut sums = [loss, correct as f64];
            c.all_reduce_sum_f64(&mut sums)?;
            loss = sums[0];
            correct = sums[1] as usize;
        }
        Ok(Evaluation {
            loss: if n == 0 { 0.0 } else { loss / n as f64 },
            accuracy: if n == 0 {
                0.0
            } else {
                correct as f64 / n as f64
            },
            samples: n,
        })
    }

    /// This rank's summed loss and correct predictions over a split.
    fn evaluate_batches(&mut self, split: Split) -> Result<(f64, usize)> {
        let n = self.data.len(split);
        let (mut loss, mut correct) = (0.0, 0usize);
        // A data-parallel run evaluates every size-th batch on each rank and sums.
        let (rank, size) = self.rank();
        let batch = self.model.batch().min(self.config.batch_size);
        let mut start = 0;
        let mut index = 0;
        while start < n {
            let end = (start + batch).min(n);
            if index % size == rank {
                self.eval_indices.clear();
                self.eval_indices.extend(start as u32..end as u32);
                let (input, labels) = self.model.batch_buffers_mut();
                let count = self.data.gather(split, &self.eval_indices, input, labels)?;
                let (l, c) = self.evaluate_batch_on_backend(count)?;
                loss += l;
                correct += c;
            }
            start = end;
            index += 1;
        }
        Ok((loss, correct))
    }

    /// The summed loss and correct predictions of the first `n` columns of the batch in the
    /// model's buffers, on the device where the model lives there.
    fn evaluate_batch_on_backend(&mut self, n: usize) -> Result<(f64, usize)> {
        #[cfg(feature = "opencl")]
        if let Some(d) = &mut self.device {
            return d.evaluate_batch(&mut self.model, n);
        }
        self.model.evaluate_batch(n)
    }

    /// Runs every remaining epoch, calling `on_epoch` after each.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        on_step: &mut dyn FnMut(&StepInfo),
        on_epoch: &mut dyn FnMut(&mut Trainer, &EpochMetrics) -> Result<()>,
    ) -> Result<bool> {
        while !self.finished() {
            match self.run_epoch(stop, on_step)? {
                EpochEnd::Completed(m) => on_epoch(self, &m)?,
                EpochEnd::Interrupted => return Ok(false),
            }
            if self.stopping(stop) && !self.finished() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Total compilation time so far (from the history), for summaries.
    pub fn total_compile(&self) -> Duration {
        Duration::from_secs_f64(self.history.iter().map(|m| m.compile_ms).sum::<f64>() / 1e3)
    }
}

fn steps_per_epoch(data: &Dataset, batch: usize) -> u64 {
    data.len(Split::Train).div_ceil(batch) as u64
}
