//! Sparse momentum (Dettmers & Zettlemoyer 2019) and its peers: the mask update that prunes,
//! redistributes and regrows the weights of every masked layer, the initial masks and the
//! schedules that drive it.
//!
//! The update reproduces the reference implementation (`TimDettmers/sparse_learning` at
//! `e19ff16`, `Masking.truncate_weights`) exactly — masks, counts, regrowth targets, the
//! redistribution loop's trace and the `f64` correction term bit for bit — on the golden cases in
//! `data/golden/sparse-momentum/` (see `docs/SPARSE_MOMENTUM.md` for the algorithm).
//!
//! # How a training loop uses it
//!
//! ```
//! use runtime::masking::{
//!     DecaySchedule, LayerSpec, LayerView, Masking, MaskingConfig, PruneRateSchedule,
//!     UpdateFrequency,
//! };
//!
//! # fn main() -> Result<(), runtime::masking::MaskingError> {
//! // Every masked weight tensor, in model order, with its PyTorch shape ([out, in] or
//! // [out, in, kh, kw]; the mask is [rows = out, cols = in·kh·kw], row-major).
//! let specs = vec![LayerSpec::new("fc1", &[6, 4])?, LayerSpec::new("fc2", &[2, 6])?];
//! let mut masking = Masking::new(MaskingConfig::new(0.3), specs)?;
//! let mut masks = masking.init_masks(); // draw once, before training
//! let mut weights = vec![vec![0.5f32; 24], vec![-0.25f32; 12]];
//! for (w, m) in weights.iter_mut().zip(&masks) {
//!     runtime::masking::apply_mask(w, m)?;
//! }
//! let momenta = vec![vec![0.1f32; 24], vec![0.2f32; 12]];
//!
//! let (epochs, steps_per_epoch) = (3u64, 10u64);
//! let total = epochs * steps_per_epoch;
//! let mut prune_rate = PruneRateSchedule::new(DecaySchedule::Cosine, 0.5, total)?;
//! let frequency = UpdateFrequency::Epoch;
//! let specs = masking.layers().to_vec(); // names and shapes, for building the views
//! for steps_done in 1..=total {
//!     // ... forward, backward, SGD on every entry's momentum, w ⊙ mask ...
//!     prune_rate.step(); // once per optimiser step
//!     if !masking.is_static() && frequency.updates_after(steps_done, steps_per_epoch, total) {
//!         let mut views = Vec::new();
//!         for (i, ((w, m), mom)) in
//!             weights.iter_mut().zip(masks.iter_mut()).zip(&momenta).enumerate()
//!         {
//!             let spec = &specs[i];
//!             views.push(LayerView {
//!                 name: &spec.name,
//!                 rows: spec.rows(),
//!                 cols: spec.cols(),
//!                 weight: w,
//!                 mask: m,
//!                 momentum: mom,
//!                 grad: None, // the dense gradient, needed only by `--growth gradient`
//!             });
//!         }
//!         let report = masking.update(&mut views, prune_rate.rate())?;
//!         for layer in report.layers.iter().filter(|l| l.changed) {
//!             // ... re-plan and recompile this layer's kernels ...
//!             let _ = &layer.name;
//!         }
//!     }
//! }
//! // A checkpoint stores `masking.state()` and `prune_rate` (both serde); a resumed run calls
//! // `Masking::from_state(state)` and continues bit for bit.
//! # Ok(())
//! # }
//! ```
//!
//! # The update, in order (for `L` layers, always processed in model order)
//!
//! 1. **Scores.** `s_l` = mean |momentum| over the active entries (`--redistribution momentum`;
//!    `magnitude`: mean |w| over active entries; `nonzero`: the count of nonzero weights; `none`:
//!    `numel_l / B`), normalised by their `f64` sum taken in layer order. The means are computed
//!    in `f32` in PyTorch's summation order ([`reduce`]), so scores are the reference's to the bit.
//! 2. **Per-layer prune rate.** `r_l = p`; if `zeros_l / numel_l < 0.2` and `(1/L) / s_l < 1`,
//!    `r_l = min(zeros_l / numel_l, p)` (the dense-layer rule).
//! 3. **Prune** `n_l = ceil(r_l · nnz_l)` active entries of smallest |w| (ties: lower flat index
//!    first). If `n_l = 0` the mask becomes `mask ∧ (w ≠ 0)`, as the reference's `weight != 0`.
//!    `R` = the number actually removed over all layers.
//! 4. **Redistribute.** `g_l = ceil(s_l · (R + A))`; the capping loop at
//!    `0.99 · (zeros_l + n_l)` spreads the overflow equally over all `L` layers, at most 1000
//!    passes, exactly as the reference (no denormal flushing: Rust never flushes).
//! 5. **Grow** `floor(g_l)` entries among the inactive ones (just-pruned included).
//! 6. **Apply.** Grown entries that were inactive start at 0; an entry pruned and regrown keeps
//!    its value; pruned entries become 0. Momentum is not touched.
//! 7. **Correction.** `adjustments.push(B − N)`;
//!    `A = 0.25·A + 0.75·(B − N) + mean(adjustments)` (NumPy's pairwise mean, to the bit).
//!
//! # The deliberate deviation
//!
//! **Entries with zero momentum never grow**, so a layer can grow fewer than `floor(g_l)`
//! entries. The reference takes the top `k` of `|momentum · (mask == 0)|`; when `k` exceeds the
//! inactive entries with nonzero momentum, it activates zero-momentum entries (and, since active
//! entries also score 0 there, possibly "grows" already-active ones) in the unspecified order of
//! `torch.sort`. Taking only nonzero-momentum entries makes the update deterministic; the
//! correction term then sees the shortfall and adds it back to the next update's budget. The same
//! holds for `--growth gradient` (zero gradient never grows). NaN scores never grow either.
//! Whenever candidates suffice (every golden case) the result is the reference's.
//!
//! # The compute budget
//!
//! With [`MaskingConfig::flops_budget`] `= Some(F)` the forward multiply-adds of the sparse
//! network, `Σ nnz_l · c_l` with `c_l` the multiply-adds of one weight per sample
//! ([`LayerSpec::macs_per_weight`]: 1 for a linear layer, `oh · ow` for a convolution), stay at
//! or below `F · Σ numel_l · c_l`. Momentum redistribution moves weights into the layers where
//! they reduce the error most, and for convolutions those are the early layers, whose weights
//! cost the most; the budget keeps the arithmetic at the share the user chose.
//!
//! * **Initial masks.** If the initial densities cost more than the budget, all of them are
//!   scaled by one factor to cost exactly the budget, and `B` is scaled with them. The masks
//!   are drawn as without a budget (one coin per entry); if the coins leave them over it,
//!   random active entries of the most expensive layers are removed until they fit.
//! * **Growth.** After pruning and the capping loop, layer `l` asks for `k_l = floor(g_l)`
//!   entries. If they cost more than the room left (`F · dense − Σ kept_l · c_l`), the room is
//!   split over the layers by their scores `s_l`, each layer's share capped at the cost of its
//!   own `k_l`: with `λ` such that `Σ min(k_l · c_l, λ · s_l) = room`, layer `l` grows
//!   `min(k_l, floor(λ · s_l / c_l))`. [`LayerReport::regrowth_withheld`] counts what the
//!   budget held back.
//! * **Correction.** What the budget withheld is taken out of the shortfall (`B − N −
//!   withheld`), so the correction term does not chase weights the next update could not grow
//!   either. When the budget does not bind, the update is exactly the unconstrained one.
//!
//! # Decisions where the spec leaves something open
//!
//! * **Ties** in |w| (pruning) or |momentum| (growth) go to the lower flat index.
//! * **A layer with no active entries** scores 0 under `momentum`/`magnitude` redistribution (the
//!   reference's mean is NaN and its update fails). If all scores are 0 the budget is split in
//!   proportion to layer size, as `--redistribution none`.
//! * **Non-finite scores** (NaN or infinite momentum or weights in the mean) are an error naming
//!   the layer: training has diverged.
//! * **Negative targets** (a large negative correction with little pruned) grow nothing; the
//!   reference would slice `idx[:-k]` and activate almost the whole layer.
//! * **`global-magnitude`** removes the `ceil(p · Σ nnz_l)` active entries of smallest |w| over
//!   all layers (one exact threshold, instead of the reference's iterative threshold search with a
//!   tolerance); the dense-layer rule does not apply, and each layer's `n_l` (for its cap) is what
//!   it actually lost. Regrowth then follows the chosen redistribution and growth as usual.
//! * **`random` growth** activates exactly `floor(g_l)` inactive entries drawn uniformly without
//!   replacement (the reference draws each with probability `g_l / zeros` and leaves the count to
//!   the correction term).
//! * **`momentum-neuron` growth** gives row `i` `floor(v_i · k)` of the layer's `k`, with `v_i`
//!   the row's mean |momentum| normalised to sum 1, grows the row's largest |momentum|, and gives
//!   what rows could not take (and the floors' leftovers) to the layer's largest remaining
//!   |momentum|, so it keeps the budget like the other modes (the reference skips rows with fewer
//!   than 10 and leaves the rest to the correction term).
//! * **`--growth none`** (static sparse) and **density 1** (the dense baseline) make
//!   [`Masking::update`] a no-op that reports nothing changed.
//! * **ERK** keeps `B = d · Σ numel` as the budget (it equals `Σ d_l · numel_l`).
//! * **Randomness** (initial masks, `random` growth) comes from one ChaCha8 stream seeded by
//!   [`MaskingConfig::seed`], saved in the state, so a resumed run draws the same numbers.

mod budget;
mod growth;
mod init;
pub mod options;
pub mod reduce;
pub mod schedule;
mod update;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use init::erk_densities;
pub use options::{
    DecaySchedule, GrowthMode, InitMode, ParseOptionError, PruneMode, RedistributionMode,
    UpdateFrequency,
};
pub use schedule::{PruneRateSchedule, StepLr, DEFAULT_MIN_PRUNE_RATE};

/// The version of [`MaskingState`]'s serialised form.
pub const MASKING_STATE_VERSION: u32 = 1;

/// What can go wrong in the masking code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MaskingError {
    /// An option or parameter has a value outside its range.
    #[error("masking: invalid --{option}: {reason}")]
    InvalidOption {
        /// The option (command-line name without `--`).
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A layer's description is unusable.
    #[error("masking: layer `{layer}`: {reason}")]
    BadLayer {
        /// The layer's name.
        layer: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The update got a different number of layers than the masking was built for.
    #[error("masking: expected {expected} layers, got {got}")]
    LayerCount {
        /// Layers the masking knows.
        expected: usize,
        /// Layers passed in.
        got: usize,
    },
    /// A layer arrived out of order or under another name.
    #[error("masking: layer {index} is `{got}`, expected `{expected}`")]
    LayerName {
        /// Position in the list.
        index: usize,
        /// The name the masking knows.
        expected: String,
        /// The name passed in.
        got: String,
    },
    /// A tensor of a layer has the wrong shape or length.
    #[error(
        "masking: layer `{layer}`: {field} has {got} entries, expected {expected} ({rows}x{cols})"
    )]
    Length {
        /// The layer's name.
        layer: String,
        /// Which tensor (`weight`, `mask`, `momentum`, `grad`).
        field: &'static str,
        /// Its length.
        got: usize,
        /// The length its shape requires.
        expected: usize,
        /// The layer's rows.
        rows: usize,
        /// The layer's columns.
        cols: usize,
    },
    /// A mask entry other than 0 or 1.
    #[error("masking: layer `{layer}`: mask entry {index} is {value}, expected 0 or 1")]
    MaskValue {
        /// The layer's name.
        layer: String,
        /// The flat (row-major) index.
        index: usize,
        /// The value found.
        value: u8,
    },
    /// A layer's redistribution score is NaN or infinite (training has diverged).
    #[error("masking: layer `{layer}`: its {what} is not finite ({value})")]
    NonFinite {
        /// The layer's name.
        layer: String,
        /// What was being computed.
        what: &'static str,
        /// The value.
        value: f64,
    },
    /// `--growth gradient` needs the dense weight gradient, and a layer came without it.
    #[error("masking: layer `{layer}`: --growth gradient needs the layer's dense gradient")]
    MissingGradient {
        /// The layer's name.
        layer: String,
    },
    /// A saved masking state cannot be restored.
    #[error("masking state: {0}")]
    State(String),
}

/// A masked weight tensor: its name, its PyTorch weight shape and what one of its weights
/// costs in the forward pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// The layer's name (`fc1`, `conv2`, …), as the views passed to [`Masking::update`] carry it.
    pub name: String,
    /// `[out, in]` for a linear layer, `[out, in, kh, kw]` for a convolution.
    pub shape: Vec<usize>,
    /// Forward multiply-adds one active weight costs per sample: 1 for a linear layer, the
    /// output positions `oh · ow` for a convolution. The compute budget
    /// ([`MaskingConfig::flops_budget`]) and [`Masking::flops_fraction`] read it.
    #[serde(default = "one_mac")]
    pub macs_per_weight: u64,
}

/// The cost of a weight of a linear layer (and of specs saved before costs were recorded).
fn one_mac() -> u64 {
    1
}

impl LayerSpec {
    /// A layer of the given shape, each weight costing one multiply-add per sample; errors on an
    /// empty shape or a zero dimension.
    pub fn new(name: &str, shape: &[usize]) -> Result<Self, MaskingError> {
        let spec = LayerSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
            macs_per_weight: 1,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The same layer with each weight costing `macs` forward multiply-adds per sample (a
    /// convolution's output positions); errors on 0.
    pub fn with_macs_per_weight(mut self, macs: u64) -> Result<Self, MaskingError> {
        self.macs_per_weight = macs;
        self.validate()?;
        Ok(self)
    }

    fn validate(&self) -> Result<(), MaskingError> {
        if self.macs_per_weight == 0 {
            return Err(MaskingError::BadLayer {
                layer: self.name.clone(),
                reason: "a weight must cost at least one multiply-add".to_string(),
            });
        }
        if self.shape.len() < 2 || self.shape.contains(&0) {
            return Err(MaskingError::BadLayer {
                layer: self.name.clone(),
                reason: format!(
                    "weight shape {:?} must have at least two dimensions, none of them 0",
                    self.shape
                ),
            });
        }
        if self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_none()
        {
            return Err(MaskingError::BadLayer {
                layer: self.name.clone(),
                reason: format!("weight shape {:?} overflows", self.shape),
            });
        }
        Ok(())
    }

    /// Rows of the mask: the output features (channels).
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Columns of the mask: the product of the other dimensions.
    pub fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }

    /// Number of weights.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One layer's state as the update sees it, dense and row-major `[rows × cols]`.
#[derive(Debug)]
pub struct LayerView<'a> {
    /// The layer's name; must match the [`LayerSpec`] at the same position.
    pub name: &'a str,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features · kernel size).
    pub cols: usize,
    /// The weights, 0 where masked. The update zeroes pruned entries and starts grown ones at 0.
    pub weight: &'a mut [f32],
    /// The mask, 0 or 1 per entry; the update rewrites it.
    pub mask: &'a mut [u8],
    /// The optimiser's momentum buffer of every entry, masked ones included.
    pub momentum: &'a [f32],
    /// The dense weight gradient at the update step; needed only by `--growth gradient`.
    pub grad: Option<&'a [f32]>,
}

/// The masking options that shape the update and the initial masks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MaskingConfig {
    /// The global density `d` in (0, 1]: the network keeps `B = d · Σ numel` nonzeros.
    pub density: f64,
    /// `--prune`.
    pub prune: PruneMode,
    /// `--growth`.
    pub growth: GrowthMode,
    /// `--redistribution`.
    pub redistribution: RedistributionMode,
    /// `--init`.
    pub init: InitMode,
    /// Seed of the masking's random stream (initial masks, random growth).
    pub seed: u64,
    /// `--flops-budget F`: the forward multiply-adds of the sparse network stay at or below
    /// `F` times the dense network's, at initialisation and after every update (see
    /// the [compute budget](self#the-compute-budget)). `None`: no budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flops_budget: Option<f64>,
}

impl MaskingConfig {
    /// The reference's defaults (magnitude / momentum / momentum, uniform init, seed 0) at the
    /// given density.
    pub fn new(density: f64) -> Self {
        MaskingConfig {
            density,
            prune: PruneMode::default(),
            growth: GrowthMode::default(),
            redistribution: RedistributionMode::default(),
            init: InitMode::default(),
            seed: 0,
            flops_budget: None,
        }
    }

    fn validate(&self) -> Result<(), MaskingError> {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(MaskingError::InvalidOption {
                option: "density",
                reason: format!("{} is not in (0, 1]", self.density),
            });
        }
        if let Some(f) = self.flops_budget {
            if !(f > 0.0 && f <= 1.0) {
                return Err(MaskingError::InvalidOption {
                    option: "flops-budget",
                    reason: format!("{f} is not in (0, 1]"),
                });
            }
        }
        Ok(())
    }
}

/// The state of the masking's random stream, for checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The ChaCha8 key, 64 hex digits.
    pub seed: String,
    /// The ChaCha stream number.
    pub stream: u64,
    /// The position in the stream in 32-bit words, as a decimal string (it is a 68-bit number).
    pub word_pos: String,
}

impl RngState {
    fn of(rng: &ChaCha8Rng) -> Self {
        RngState {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    fn restore(&self) -> Result<ChaCha8Rng, MaskingError> {
        let bad = |what: &str| MaskingError::State(format!("rng {what} is malformed"));
        if self.seed.len() != 64 || !self.seed.is_ascii() {
            return Err(bad("seed"));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad("seed"))?;
        }
        let pos: u128 = self.word_pos.parse().map_err(|_| bad("word_pos"))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// Everything a checkpoint must save to resume the masking exactly (serde).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskingState {
    /// [`MASKING_STATE_VERSION`].
    pub version: u32,
    /// The options.
    pub config: MaskingConfig,
    /// The masked layers, in model order.
    pub layers: Vec<LayerSpec>,
    /// `B = Σ numel_l · d`, summed in layer order.
    pub baseline_nonzero: f64,
    /// The correction term `A` carried to the next update.
    pub adjusted_growth: f64,
    /// The shortfall history `B − N` of every update so far.
    pub adjustments: Vec<f64>,
    /// Mask updates done.
    pub updates: u64,
    /// The random stream.
    pub rng: RngState,
}

/// One pass of the redistribution loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedistributionPass {
    /// 0-based pass number.
    pub iteration: usize,
    /// Total excess over the caps in this pass.
    pub residual: f64,
    /// `residual / L`, added to every layer's target in the next pass.
    pub mean_residual: f64,
    /// Every layer's target at the end of the pass.
    pub regrowth: Vec<f64>,
}

/// What one update did to one layer (the field names are the golden data's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// The layer's name.
    pub name: String,
    /// Its number of weights.
    pub numel: usize,
    /// Active entries before the update.
    pub nonzeros_before: usize,
    /// Inactive entries before the update.
    pub zeros_before: usize,
    /// The unnormalised redistribution score (e.g. mean |momentum| over active entries).
    pub raw_score: f64,
    /// The normalised score `s_l` (scores sum to 1).
    pub score: f64,
    /// Whether the dense-layer rule applied.
    pub dense_rule_fired: bool,
    /// The prune rate `r_l` used for this layer.
    pub prune_rate: f64,
    /// `n_l = ceil(r_l · nnz_l)`, the number planned for removal.
    pub num_remove: usize,
    /// Entries actually pruned.
    pub num_pruned: usize,
    /// `zeros_before + num_remove`.
    pub max_regrowth: f64,
    /// `0.99 · max_regrowth`.
    pub regrowth_cap: f64,
    /// `ceil(s_l · (R + A))`, before capping.
    pub regrowth_target_initial: f64,
    /// The target after the capping loop.
    pub regrowth_target_final: f64,
    /// The number growth was asked for: `floor(regrowth_target_final)` (0 if negative), less
    /// what the compute budget withheld.
    pub regrowth_applied: usize,
    /// Entries of `floor(regrowth_target_final)` the compute budget did not let grow (0
    /// without a budget).
    #[serde(default)]
    pub regrowth_withheld: usize,
    /// Entries activated by growth (pruned-and-regrown included).
    pub num_regrown: usize,
    /// Entries pruned and grown back in this update (they keep their value).
    pub num_pruned_then_regrown: usize,
    /// Active entries after the update.
    pub nonzeros_after: usize,
    /// Flat indices pruned, ascending.
    pub pruned: Vec<usize>,
    /// Flat indices grown, ascending.
    pub grown: Vec<usize>,
    /// Whether the mask changed (the layer's kernels must be rebuilt).
    pub changed: bool,
}

impl LayerReport {
    /// Density after the update.
    pub fn density_after(&self) -> f64 {
        self.nonzeros_after as f64 / self.numel as f64
    }
}

/// What one update did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// True when nothing ran (static sparse or dense training).
    pub skipped: bool,
    /// The global prune rate `p` passed in.
    pub prune_rate: f64,
    /// `B`.
    pub baseline_nonzero: f64,
    /// Sum of the raw scores (`f64`, layer order).
    pub total_variance: f64,
    /// `R`, entries pruned over all layers.
    pub total_removed: f64,
    /// Active entries before.
    pub total_nonzero_before: usize,
    /// Active entries after (`N`).
    pub total_nonzero_after: usize,
    /// Passes of the redistribution loop.
    pub redistribution_iterations: usize,
    /// The residual when the loop stopped (0 unless it hit 1000 passes).
    pub redistribution_final_residual: f64,
    /// Every pass of the loop.
    pub redistribution_trace: Vec<RedistributionPass>,
    /// `A` before the update.
    pub adjusted_growth_before: f64,
    /// `A` after the update.
    pub adjusted_growth: f64,
    /// `B − N − regrowth_withheld`, the entry appended to the history (`B − N` without a
    /// compute budget).
    pub shortfall: f64,
    /// Entries the compute budget kept from growing, over all layers.
    #[serde(default)]
    pub regrowth_withheld: usize,
    /// Per layer, in model order.
    pub layers: Vec<LayerReport>,
}

/// The masking: its options, its layers and the state it carries from update to update.
#[derive(Debug, Clone)]
pub struct Masking {
    config: MaskingConfig,
    layers: Vec<LayerSpec>,
    baseline_nonzero: f64,
    adjusted_growth: f64,
    adjustments: Vec<f64>,
    updates: u64,
    rng: ChaCha8Rng,
}

/// `B = Σ numel_l · d`, summed from 0 in layer order as the reference does; under a compute
/// budget that the initial densities exceed, scaled with them.
fn baseline_nonzero(layers: &[LayerSpec], config: &MaskingConfig) -> f64 {
    let mut b = 0.0;
    for l in layers {
        b += l.numel() as f64 * config.density;
    }
    let scale = budget_scale(layers, config);
    if scale < 1.0 {
        b * scale
    } else {
        b
    }
}

/// The initial densities of `config.init`, before any budget.
fn unbudgeted_densities(layers: &[LayerSpec], config: &MaskingConfig) -> Vec<f64> {
    match config.init {
        InitMode::Uniform => vec![config.density; layers.len()],
        InitMode::Erk => erk_densities(layers, config.density).expect("density validated"),
    }
}

/// The factor the compute budget applies to the initial densities (1: none).
fn budget_scale(layers: &[LayerSpec], config: &MaskingConfig) -> f64 {
    match config.flops_budget {
        Some(f) if config.density < 1.0 => {
            budget::init_scale(layers, &unbudgeted_densities(layers, config), f)
        }
        _ => 1.0,
    }
}

impl Masking {
    /// A masking for the given layers (model order), with no update done yet.
    pub fn new(config: MaskingConfig, layers: Vec<LayerSpec>) -> Result<Self, MaskingError> {
        config.validate()?;
        validate_layers(&layers)?;
        Ok(Masking {
            baseline_nonzero: baseline_nonzero(&layers, &config),
            config,
            layers,
            adjusted_growth: 0.0,
            adjustments: Vec::new(),
            updates: 0,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
        })
    }

    /// The carried state, for a checkpoint.
    pub fn state(&self) -> MaskingState {
        MaskingState {
            version: MASKING_STATE_VERSION,
            config: self.config,
            layers: self.layers.clone(),
            baseline_nonzero: self.baseline_nonzero,
            adjusted_growth: self.adjusted_growth,
            adjustments: self.adjustments.clone(),
            updates: self.updates,
            rng: RngState::of(&self.rng),
        }
    }

    /// Restores a masking from [`state`](Self::state); the next update continues exactly where
    /// the saved one would have.
    pub fn from_state(state: MaskingState) -> Result<Self, MaskingError> {
        if state.version != MASKING_STATE_VERSION {
            return Err(MaskingError::State(format!(
                "format version {} is not supported (expected {MASKING_STATE_VERSION})",
                state.version
            )));
        }
        state.config.validate()?;
        validate_layers(&state.layers)?;
        let b = baseline_nonzero(&state.layers, &state.config);
        if b.to_bits() != state.baseline_nonzero.to_bits() {
            return Err(MaskingError::State(format!(
                "baseline_nonzero {} does not match density {} over the layers ({b})",
                state.baseline_nonzero, state.config.density
            )));
        }
        if !state.adjusted_growth.is_finite() || !state.adjustments.iter().all(|a| a.is_finite()) {
            return Err(MaskingError::State(
                "the correction term or its history is not finite".to_string(),
            ));
        }
        Ok(Masking {
            rng: state.rng.restore()?,
            config: state.config,
            layers: state.layers,
            baseline_nonzero: state.baseline_nonzero,
            adjusted_growth: state.adjusted_growth,
            adjustments: state.adjustments,
            updates: state.updates,
        })
    }

    /// The options.
    pub fn config(&self) -> &MaskingConfig {
        &self.config
    }

    /// The masked layers, in model order.
    pub fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }

    /// `B`, the global nonzero budget.
    pub fn baseline_nonzero(&self) -> f64 {
        self.baseline_nonzero
    }

    /// The correction term `A` the next update adds to the regrowth budget.
    pub fn adjusted_growth(&self) -> f64 {
        self.adjusted_growth
    }

    /// The shortfall history.
    pub fn adjustments(&self) -> &[f64] {
        &self.adjustments
    }

    /// Mask updates done so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// True when the mask never changes (`--growth none`, or density 1).
    pub fn is_static(&self) -> bool {
        self.config.growth == GrowthMode::None || self.config.density >= 1.0
    }

    /// Whether [`update`](Self::update) needs [`LayerView::grad`] (`--growth gradient`).
    pub fn needs_gradient(&self) -> bool {
        !self.is_static() && self.config.growth == GrowthMode::Gradient
    }

    /// Each layer's initial density: `d` everywhere (`uniform`) or ERK's, all scaled down by
    /// one factor where they would cost more than the compute budget.
    pub fn init_densities(&self) -> Vec<f64> {
        let densities = unbudgeted_densities(&self.layers, &self.config);
        let scale = budget_scale(&self.layers, &self.config);
        if scale < 1.0 {
            densities.into_iter().map(|d| d * scale).collect()
        } else {
            densities
        }
    }

    /// Draws the initial masks (layer order, row-major `[rows × cols]`): every entry active
    /// independently with its layer's initial density. Under a compute budget, random active
    /// entries of the most expensive layers are then removed until the masks fit it (masks
    /// within it are left as drawn). Reproducible from the seed. Multiply the weights by them
    /// with [`apply_mask`].
    pub fn init_masks(&mut self) -> Vec<Vec<u8>> {
        let densities = self.init_densities();
        let mut masks: Vec<Vec<u8>> = self
            .layers
            .iter()
            .zip(densities)
            .map(|(l, d)| {
                let mut mask = vec![0u8; l.numel()];
                init::draw_mask(&mut self.rng, d, &mut mask);
                mask
            })
            .collect();
        if let Some(f) = self.config.flops_budget {
            budget::trim_to_budget(&self.layers, &mut masks, f, &mut self.rng);
        }
        masks
    }

    /// The dense network's forward multiply-adds per sample, `Σ numel_l · c_l` (see
    /// [`LayerSpec::macs_per_weight`]).
    pub fn dense_macs(&self) -> f64 {
        budget::dense_macs(&self.layers)
    }

    /// The forward multiply-adds of the network with `nonzeros[l]` active weights in layer `l`,
    /// relative to the dense network's: the `flops_fraction` of the training metrics. Errors if
    /// `nonzeros` does not have one count per layer.
    pub fn flops_fraction(&self, nonzeros: &[usize]) -> Result<f64, MaskingError> {
        if nonzeros.len() != self.layers.len() {
            return Err(MaskingError::LayerCount {
                expected: self.layers.len(),
                got: nonzeros.len(),
            });
        }
        let macs = budget::macs_of(&self.layers, nonzeros.iter().map(|&n| n as f64));
        Ok(macs / self.dense_macs())
    }

    /// Checks that `views` match the layers, lengths and mask values.
    fn check_views(&self, views: &[LayerView<'_>]) -> Result<(), MaskingError> {
        if views.len() != self.layers.len() {
            return Err(MaskingError::LayerCount {
                expected: self.layers.len(),
                got: views.len(),
            });
        }
        for (index, (v, spec)) in views.iter().zip(&self.layers).enumerate() {
            if v.name != spec.name {
                return Err(MaskingError::LayerName {
                    index,
                    expected: spec.name.clone(),
                    got: v.name.to_string(),
                });
            }
            let (rows, cols) = (spec.rows(), spec.cols());
            if v.rows != rows || v.cols != cols {
                return Err(MaskingError::BadLayer {
                    layer: spec.name.clone(),
                    reason: format!(
                        "view is {}x{}, the layer's mask is {rows}x{cols}",
                        v.rows, v.cols
                    ),
                });
            }
            let expected = spec.numel();
            let length = |field: &'static str, got: usize| {
                if got == expected {
                    Ok(())
                } else {
                    Err(MaskingError::Length {
                        layer: spec.name.clone(),
                        field,
                        got,
                        expected,
                        rows,
                        cols,
                    })
                }
            };
            length("weight", v.weight.len())?;
            length("mask", v.mask.len())?;
            length("momentum", v.momentum.len())?;
            if let Some(g) = v.grad {
                length("grad", g.len())?;
            } else if self.needs_gradient() {
                return Err(MaskingError::MissingGradient {
                    layer: spec.name.clone(),
                });
            }
            if let Some(index) = v.mask.iter().position(|&m| m > 1) {
                return Err(MaskingError::MaskValue {
                    layer: spec.name.clone(),
                    index,
                    value: v.mask[index],
                });
            }
        }
        Ok(())
    }

    /// One mask update at global prune rate `prune_rate` (the schedule's current rate): prune,
    /// redistribute, regrow, apply, correct. Rewrites every view's mask and weights and returns
    /// what happened. A no-op report when [`is_static`](Self::is_static).
    pub fn update(
        &mut self,
        views: &mut [LayerView<'_>],
        prune_rate: f64,
    ) -> Result<UpdateReport, MaskingError> {
        self.check_views(views)?;
        if !(0.0..=1.0).contains(&prune_rate) {
            return Err(MaskingError::InvalidOption {
                option: "prune-rate",
                reason: format!("{prune_rate} is not in [0, 1]"),
            });
        }
        if self.is_static() {
            return Ok(self.static_report(views, prune_rate));
        }
        update::run(self, views, prune_rate)
    }

    fn static_report(&self, views: &[LayerView<'_>], prune_rate: f64) -> UpdateReport {
        let layers: Vec<LayerReport> = views
            .iter()
            .map(|v| {
                let nnz = v.mask.iter().filter(|&&m| m == 1).count();
                LayerReport {
                    name: v.name.to_string(),
                    numel: v.mask.len(),
                    nonzeros_before: nnz,
                    zeros_before: v.mask.len() - nnz,
                    raw_score: 0.0,
                    score: 0.0,
                    dense_rule_fired: false,
                    prune_rate: 0.0,
                    num_remove: 0,
                    num_pruned: 0,
                    max_regrowth: 0.0,
                    regrowth_cap: 0.0,
                    regrowth_target_initial: 0.0,
                    regrowth_target_final: 0.0,
                    regrowth_applied: 0,
                    regrowth_withheld: 0,
                    num_regrown: 0,
                    num_pruned_then_regrown: 0,
                    nonzeros_after: nnz,
                    pruned: Vec::new(),
                    grown: Vec::new(),
                    changed: false,
                }
            })
            .collect();
        let total = layers.iter().map(|l| l.nonzeros_before).sum();
        UpdateReport {
            skipped: true,
            prune_rate,
            baseline_nonzero: self.baseline_nonzero,
            total_variance: 0.0,
            total_removed: 0.0,
            total_nonzero_before: total,
            total_nonzero_after: total,
            redistribution_iterations: 0,
            redistribution_final_residual: 0.0,
            redistribution_trace: Vec::new(),
            adjusted_growth_before: self.adjusted_growth,
            adjusted_growth: self.adjusted_growth,
            shortfall: 0.0,
            regrowth_withheld: 0,
            layers,
        }
    }
}

fn validate_layers(layers: &[LayerSpec]) -> Result<(), MaskingError> {
    if layers.is_empty() {
        return Err(MaskingError::InvalidOption {
            option: "density",
            reason: "there are no masked layers".to_string(),
        });
    }
    for (i, l) in layers.iter().enumerate() {
        l.validate()?;
        if layers[..i].iter().any(|o| o.name == l.name) {
            return Err(MaskingError::BadLayer {
                layer: l.name.clone(),
                reason: "two masked layers have this name".to_string(),
            });
        }
    }
    Ok(())
}

/// `w = w ⊙ mask`: zeroes every weight whose mask entry is 0. Errors if the lengths differ.
pub fn apply_mask(weight: &mut [f32], mask: &[u8]) -> Result<(), MaskingError> {
    if weight.len() != mask.len() {
        return Err(MaskingError::BadLayer {
            layer: "(apply_mask)".to_string(),
            reason: format!("{} weights but {} mask entries", weight.len(), mask.len()),
        });
    }
    for (w, &m) in weight.iter_mut().zip(mask) {
        if m == 0 {
            *w = 0.0;
        }
    }
    Ok(())
}
