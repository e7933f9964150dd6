//! Checkpoints (CONTRACTS.md): a folder holding `model.safetensors` and `state.json`, written
//! atomically, and resuming from one.
//!
//! `model.safetensors` holds, per masked layer, `NAME.weight` (dense f32, zeros where masked,
//! in the PyTorch shape `[out, in]` or `[out, in, kh, kw]`), `NAME.mask` (u8, same shape),
//! `NAME.bias`, `NAME.momentum` (dense f32, masked entries included) and `NAME.bias_momentum`;
//! per batch-norm layer `NAME.weight`, `NAME.bias`, `NAME.running_mean`, `NAME.running_var`
//! (PyTorch's `state_dict` names) and the momenta `NAME.weight_momentum`,
//! `NAME.bias_momentum`.
//! `state.json` ([`TrainState`]) holds the format version, the model, the epoch and step, the
//! schedules, the masking state (correction term and the whole shortfall history, its random
//! stream), the shuffle stream, the plan (every layer's strategy per op) and the metrics
//! history.
//!
//! ## Atomicity
//!
//! A checkpoint is written into a temporary folder beside its final place; every file is
//! fsynced, then the folder, then it is renamed into place and the parent fsynced; only then is
//! the `latest` pointer replaced the same way (temporary file, fsync, rename, fsync). A process
//! killed at any point leaves the previous checkpoint intact; leftovers of an interrupted write
//! are tidied by the next writer, and a pointer left naming a folder that is not (yet) in place
//! is recovered from by [`resolve`] (the newest complete checkpoint).
//!
//! ## What a load checks
//!
//! `state.json` carries the xxh3-64 checksum of `model.safetensors` (a flipped bit is an
//! error; checkpoints written without one still load), every layer's count of active weights
//! (checked against its mask), and the epoch and step (checked against each other and the
//! data set). Weights, biases and momenta must be finite.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Split};
use crate::error::{Result, RuntimeError};
use crate::masking::{Masking, MaskingState, PruneRateSchedule, StepLr};
use crate::metrics::EpochMetrics;
use crate::model::Model;
use crate::train::{PartialEpoch, RngSnapshot, RunProgress, TrainConfig, Trainer};
use crate::weights::LayerPlan;

/// The format name in `state.json`.
pub const CHECKPOINT_FORMAT: &str = "sparsejit-checkpoint";
/// The format version of `state.json`.
pub const CHECKPOINT_VERSION: u32 = 1;
// The file names of the checkpoint layout, shared with `kernel-dump` through `sparse-ir`.
pub use sparse_ir::mask_io::checkpoint::{LATEST_FILE, MODEL_FILE, STATE_FILE};
use sparse_ir::mask_io::{checkpoint_order, moved_aside};

/// What the data set looked like (informational, checked on resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// The directory.
    pub dir: String,
    /// Training samples.
    pub train: usize,
    /// Validation samples.
    pub validation: usize,
    /// Test samples.
    pub test: usize,
    /// Classes.
    pub classes: usize,
    /// Normalisation mean.
    pub mean: f32,
    /// Normalisation standard deviation.
    pub std: f32,
    /// Where the samples came from: `mnist`, `idx`, `cifar10`, `synthetic` or `memory`
    /// (absent in checkpoints of older versions, which were IDX data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Each channel's normalisation `(mean, std)` where there are several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<(f32, f32)>>,
}

/// The contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// [`CHECKPOINT_VERSION`].
    pub version: u32,
    /// The model name.
    pub model: String,
    /// Completed epochs.
    pub epoch: u32,
    /// Optimiser steps taken.
    pub step: u64,
    /// Where an interrupted epoch stopped (`null` at an epoch boundary).
    pub partial_epoch: Option<PartialEpoch>,
    /// The run's configuration.
    pub config: TrainConfig,
    /// The prune-rate schedule.
    pub prune_rate_schedule: PruneRateSchedule,
    /// The learning-rate schedule.
    pub lr_schedule: StepLr,
    /// The masking state: options, correction term, shortfall history, random stream.
    pub masking: MaskingState,
    /// The shuffle stream.
    pub shuffle_rng: RngSnapshot,
    /// Every layer's strategy per op.
    pub plan: BTreeMap<String, BTreeMap<String, String>>,
    /// Compilation time not yet charged to an epoch's metrics, ms.
    pub compile_ms_pending: f64,
    /// The metrics of every completed epoch.
    pub history: Vec<EpochMetrics>,
    /// The data set.
    pub data: DataInfo,
    /// Every masked layer's active weights, checked against its mask on load (absent in
    /// checkpoints written before it was kept).
    #[serde(default)]
    pub nonzeros: BTreeMap<String, usize>,
    /// How many checkpoints the writing run kept (`--keep`); a resumed run keeps as many
    /// unless told otherwise.
    #[serde(default)]
    pub keep: Option<usize>,
    /// The checksum of `model.safetensors`, `xxh3-64:` and 16 hex digits (absent in
    /// checkpoints written before it was kept).
    #[serde(default)]
    pub model_checksum: Option<String>,
}

/// The checksum of a `model.safetensors` file's bytes, as [`TrainState::model_checksum`]
/// holds it.
pub fn model_checksum(bytes: &[u8]) -> String {
    format!("xxh3-64:{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

fn ck_err(path: &Path, message: impl Into<String>) -> RuntimeError {
    RuntimeError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The model's tensors in the checkpoint layout, as safetensors bytes. The dense arrays must
/// be synchronised ([`Model::sync_dense`]).
pub fn model_tensors(model: &Model) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for w in model.sparse_layers() {
        let name = w.name();
        let shape = w.shape().to_vec();
        owned.push((
            format!("{name}.weight"),
            Dtype::F32,
            shape.clone(),
            f32_bytes(w.dense_weight()),
        ));
        owned.push((
            format!("{name}.mask"),
            Dtype::U8,
            shape.clone(),
            w.mask().to_vec(),
        ));
        if w.has_bias() {
            owned.push((
                format!("{name}.bias"),
                Dtype::F32,
                vec![w.rows()],
                f32_bytes(w.bias()),
            ));
        }
        owned.push((
            format!("{name}.momentum"),
            Dtype::F32,
            shape,
            f32_bytes(w.dense_momentum()),
        ));
        if w.has_bias() {
            owned.push((
                format!("{name}.bias_momentum"),
                Dtype::F32,
                vec![w.rows()],
                f32_bytes(w.bias_momentum()),
            ));
        }
    }
    for p in model.dense_params() {
        let n = p.value.len();
        owned.push((p.name.clone(), Dtype::F32, vec![n], f32_bytes(&p.value)));
        owned.push((
            dense_momentum_name(&p.name),
            Dtype::F32,
            vec![n],
            f32_bytes(&p.momentum),
        ));
    }
    for b in model.stats() {
        owned.push((
            b.name.clone(),
            Dtype::F32,
            vec![b.value.len()],
            f32_bytes(&b.value),
        ));
    }
    let views = owned
        .iter()
        .map(|(n, dt, shape, data)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), data).map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| RuntimeError::Config(format!("serialising the model: {e}")))?;
    // One metadata entry: safetensors writes a HashMap, whose order would differ between
    // processes and make identical checkpoints differ in their bytes.
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        "format".to_string(),
        format!("{CHECKPOINT_FORMAT} model={}", model.name()),
    );
    safetensors::serialize(views, Some(meta))
        .map_err(|e| RuntimeError::Config(format!("serialising the model: {e}")))
}

/// The checkpoint name of a dense parameter's momentum: `bn1.weight` → `bn1.weight_momentum`.
fn dense_momentum_name(param: &str) -> String {
    format!("{param}_momentum")
}

/// Reads a dense 1-D tensor of `len` finite values into `dst`; `None` when the file lacks it.
fn read_dense(
    st: &SafeTensors<'_>,
    path: &Path,
    name: &str,
    len: usize,
) -> Result<Option<Vec<f32>>> {
    let Some(t) = read_tensor(st, path, name)? else {
        return Ok(None);
    };
    if t.shape != [len] {
        return Err(ck_err(
            path,
            format!(
                "tensor {name} has shape {:?}, the model needs [{len}]",
                t.shape
            ),
        ));
    }
    let v = f32_tensor(path, name, t)?;
    finite(path, name, &v)?;
    Ok(Some(v))
}

/// A tensor read from a safetensors file, as f32 or u8 values.
struct Loaded {
    shape: Vec<usize>,
    f32s: Option<Vec<f32>>,
    bytes: Option<Vec<u8>>,
}

fn read_tensor(st: &SafeTensors<'_>, path: &Path, name: &str) -> Result<Option<Loaded>> {
    let t = match st.tensor(name) {
        Ok(t) => t,
        Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
        Err(e) => return Err(ck_err(path, format!("tensor {name}: {e}"))),
    };
    let shape = t.shape().to_vec();
    let data = t.data();
    Ok(Some(match t.dtype() {
        Dtype::F32 => Loaded {
            shape,
            f32s: Some(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            bytes: None,
        },
        Dtype::U8 | Dtype::BOOL => Loaded {
            shape,
            f32s: None,
            bytes: Some(data.to_vec()),
        },
        other => {
            return Err(ck_err(
                path,
                format!("tensor {name} has dtype {other:?}, expected F32 (or U8/BOOL for masks)"),
            ))
        }
    }))
}

fn expect_shape(
    path: &Path,
    name: &str,
    got: &[usize],
    want: &[usize],
    rows: usize,
    cols: usize,
) -> Result<()> {
    if got == want || got == [rows, cols] {
        Ok(())
    } else {
        Err(ck_err(
            path,
            format!("tensor {name} has shape {got:?}, the model's layer needs {want:?}"),
        ))
    }
}

fn f32_tensor(path: &Path, name: &str, t: Loaded) -> Result<Vec<f32>> {
    t.f32s
        .ok_or_else(|| ck_err(path, format!("tensor {name} must be F32")))
}

fn mask_tensor(path: &Path, name: &str, t: Loaded) -> Result<Vec<u8>> {
    let mask = match (t.bytes, t.f32s) {
        (Some(b), _) => b,
        (None, Some(f)) => f
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if v == 0.0 {
                    Ok(0)
                } else if v == 1.0 {
                    Ok(1)
                } else {
                    Err(ck_err(
                        path,
                        format!("tensor {name}: entry {i} is {v}, expected 0 or 1"),
                    ))
                }
            })
            .collect::<Result<Vec<u8>>>()?,
        (None, None) => unreachable!("read_tensor fills one"),
    };
    if let Some(i) = mask.iter().position(|&m| m > 1) {
        return Err(ck_err(
            path,
            format!("tensor {name}: entry {i} is {}, expected 0 or 1", mask[i]),
        ));
    }
    Ok(mask)
}

/// An error naming the tensor and its first entry that is NaN or infinite.
fn finite(path: &Path, name: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(ck_err(
            path,
            format!(
                "tensor {name}: entry {i} is {}, not a finite number",
                values[i]
            ),
        )),
    }
}

/// How much of a model a safetensors file must provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadMode {
    /// A checkpoint: every tensor of every layer.
    Checkpoint,
    /// A user's weights: `NAME.weight` required, `NAME.mask` and `NAME.bias` optional.
    Weights,
}

fn load_into_model(model: &mut Model, path: &Path, bytes: &[u8], mode: LoadMode) -> Result<()> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| ck_err(path, format!("not a valid safetensors file: {e}")))?;
    let sgd = Default::default();
    for w in model.sparse_layers_mut() {
        let name = w.name().to_string();
        let (rows, cols) = (w.rows(), w.cols());
        let shape = w.shape().to_vec();
        let need = |t: Option<Loaded>, what: &str| {
            t.ok_or_else(|| ck_err(path, format!("no tensor {name}.{what} for layer {name}")))
        };
        let weight_t = need(read_tensor(&st, path, &format!("{name}.weight"))?, "weight")?;
        expect_shape(
            path,
            &format!("{name}.weight"),
            &weight_t.shape,
            &shape,
            rows,
            cols,
        )?;
        let weight = f32_tensor(path, &format!("{name}.weight"), weight_t)?;
        let mask = match read_tensor(&st, path, &format!("{name}.mask"))? {
            Some(t) => {
                expect_shape(path, &format!("{name}.mask"), &t.shape, &shape, rows, cols)?;
                mask_tensor(path, &format!("{name}.mask"), t)?
            }
            None if mode == LoadMode::Checkpoint => {
                return Err(ck_err(
                    path,
                    format!("no tensor {name}.mask for layer {name}"),
                ))
            }
            None => w.mask().to_vec(),
        };
        let has_bias = w.has_bias();
        let bias = match read_tensor(&st, path, &format!("{name}.bias"))? {
            Some(_) if !has_bias => {
                return Err(ck_err(
                    path,
                    format!("tensor {name}.bias for layer {name}, which has no bias"),
                ))
            }
            None if !has_bias => None,
            Some(t) => {
                expect_shape(path, &format!("{name}.bias"), &t.shape, &[rows], rows, 1)?;
                Some(f32_tensor(path, &format!("{name}.bias"), t)?)
            }
            None if mode == LoadMode::Checkpoint => {
                return Err(ck_err(
                    path,
                    format!("no tensor {name}.bias for layer {name}"),
                ))
            }
            None => None,
        };
        let momentum = if mode == LoadMode::Checkpoint {
            let m = need(
                read_tensor(&st, path, &format!("{name}.momentum"))?,
                "momentum",
            )?;
            expect_shape(
                path,
                &format!("{name}.momentum"),
                &m.shape,
                &shape,
                rows,
                cols,
            )?;
            let bias_momentum = if has_bias {
                let bm = need(
                    read_tensor(&st, path, &format!("{name}.bias_momentum"))?,
                    "bias_momentum",
                )?;
                expect_shape(
                    path,
                    &format!("{name}.bias_momentum"),
                    &bm.shape,
                    &[rows],
                    rows,
                    1,
                )?;
                f32_tensor(path, &format!("{name}.bias_momentum"), bm)?
            } else {
                vec![0.0; rows]
            };
            Some((
                f32_tensor(path, &format!("{name}.momentum"), m)?,
                bias_momentum,
            ))
        } else {
            None
        };
        finite(path, &format!("{name}.weight"), &weight)?;
        if let Some(b) = &bias {
            finite(path, &format!("{name}.bias"), b)?;
        }
        if let Some((m, bm)) = &momentum {
            finite(path, &format!("{name}.momentum"), m)?;
            finite(path, &format!("{name}.bias_momentum"), bm)?;
        }
        w.sync_dense(&sgd);
        w.set_dense(
            &weight,
            &mask,
            bias.as_deref(),
            momentum.as_ref().map(|(m, b)| (&m[..], &b[..])),
        )
        .map_err(|e| ck_err(path, e.to_string()))?;
    }
    // Dense parameters and statistics: all of them in a checkpoint; in a user's weights,
    // values where given (momentum starts at zero).
    let checkpoint = mode == LoadMode::Checkpoint;
    for p in model.dense_params_mut() {
        let n = p.value.len();
        match read_dense(&st, path, &p.name, n)? {
            Some(v) => p.value = v,
            None if checkpoint => {
                return Err(ck_err(path, format!("no tensor {}", p.name)));
            }
            None => {}
        }
        let m_name = dense_momentum_name(&p.name);
        match read_dense(&st, path, &m_name, n)? {
            Some(m) if checkpoint => p.momentum = m,
            None if checkpoint => return Err(ck_err(path, format!("no tensor {m_name}"))),
            _ => p.momentum.fill(0.0),
        }
    }
    for b in model.stats_mut() {
        match read_dense(&st, path, &b.name, b.value.len())? {
            Some(v) => b.value = v,
            None if checkpoint => return Err(ck_err(path, format!("no tensor {}", b.name))),
            None => {}
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| RuntimeError::io(path, e))?;
    f.write_all(bytes).map_err(|e| RuntimeError::io(path, e))?;
    f.sync_all().map_err(|e| RuntimeError::io(path, e))
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| RuntimeError::io(path, e))
}

/// Finds the checkpoint folder of `path`: the folder itself if it holds `state.json` and
/// `model.safetensors`, or the folder its `latest` pointer names, or — where an interrupted
/// write left the pointer missing or naming a folder not in place — the newest complete
/// checkpoint, with a warning (the rule of [`sparse_ir::mask_io::locate_checkpoint`]).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let found = sparse_ir::mask_io::locate_checkpoint(path)?;
    if let Some(why) = &found.recovered {
        tracing::warn!("{why}");
    }
    Ok(found.folder)
}

/// The checkpoint directory a resumed run goes on writing into: the directory itself when
/// `path` is one (it has a `latest` pointer or no checkpoint files), the folder above when
/// `path` is a checkpoint folder (`DIR/epoch-002` continues in `DIR`).
pub fn resume_dir(path: &Path) -> PathBuf {
    let is_folder = path.join(STATE_FILE).is_file() && path.join(MODEL_FILE).is_file();
    match path.parent() {
        Some(parent) if is_folder => {
            if parent.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                parent.to_path_buf()
            }
        }
        _ => path.to_path_buf(),
    }
}

/// Reads `state.json` of a checkpoint folder, checking the format and version.
pub fn read_state(folder: &Path) -> Result<TrainState> {
    let path = folder.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|e| RuntimeError::io(&path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ck_err(&path, format!("not valid JSON: {e}")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(CHECKPOINT_FORMAT) {
        return Err(ck_err(
            &path,
            format!("not a {CHECKPOINT_FORMAT} state file"),
        ));
    }
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(CHECKPOINT_VERSION) => {}
        other => {
            return Err(ck_err(
                &path,
                format!(
                    "format version {other:?} is not supported (expected {CHECKPOINT_VERSION})"
                ),
            ))
        }
    }
    serde_json::from_value(value).map_err(|e| ck_err(&path, format!("malformed: {e}")))
}

/// Where the testing aid [`CheckpointWriter::crash_in_epoch`] aborts a checkpoint write.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Half-way through writing the model file into the temporary folder (`write`).
    Write,
    /// After a folder of the same name was moved aside, before its replacement is renamed
    /// into place, so the pointer names a folder that is not there (`rename`).
    Rename,
}

impl std::str::FromStr for CrashPoint {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "write" => Ok(CrashPoint::Write),
            "rename" => Ok(CrashPoint::Rename),
            other => Err(format!("{other:?}: expected write or rename")),
        }
    }
}

/// The lock file of a checkpoint directory: a writer holds an exclusive lock on it for its
/// whole life, so two runs never write into one directory.
pub const LOCK_FILE: &str = ".lock";

/// Writes checkpoints into a directory: `DIR/epoch-NNN/` after every epoch (an interrupted
/// epoch gives `DIR/epoch-NNN-step-SSSSSS/`), the `DIR/latest` pointer, and keeps the newest
/// `keep`.
///
/// The writer holds an exclusive lock on `DIR/.lock` (the operating system releases it when
/// the process ends, however it ends), so a second run on the same directory is refused
/// before it writes anything.
#[derive(Debug, Clone)]
pub struct CheckpointWriter {
    dir: PathBuf,
    keep: usize,
    crash_in_epoch: Option<(u32, CrashPoint)>,
    /// The open lock file; the lock lasts as long as any clone of the writer.
    _lock: Arc<File>,
}

impl CheckpointWriter {
    /// A writer into `dir` (created if missing) keeping the newest `keep` (at least 1).
    ///
    /// Takes the directory's lock (an error naming the directory if another run holds it),
    /// then tidies what interrupted writes left: a checkpoint moved aside (`.old-NAME-PID`)
    /// whose replacement never arrived goes back to `NAME`; unfinished copies (`.tmp-*`) and
    /// pointers (`.latest-*`) are removed.
    pub fn new(dir: &Path, keep: usize) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| RuntimeError::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ck_err(
                    dir,
                    "in use by another run (it holds the lock on .lock in this folder): wait \
                     for it to end or choose another --checkpoint-dir",
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(RuntimeError::io(&lock_path, e)),
        }
        let writer = CheckpointWriter {
            dir: dir.to_path_buf(),
            keep: keep.max(1),
            crash_in_epoch: None,
            _lock: Arc::new(lock),
        };
        writer.tidy()?;
        Ok(writer)
    }

    /// Recovers or removes what interrupted writes left in the directory (see
    /// [`CheckpointWriter::new`]); safe because this writer holds the lock.
    fn tidy(&self) -> Result<()> {
        let entries = fs::read_dir(&self.dir).map_err(|e| RuntimeError::io(&self.dir, e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            if let Some(original) = moved_aside(&name) {
                // `.old-NAME-PID`: NAME was moved aside for its replacement.
                let target = self.dir.join(original);
                if checkpoint_order(original).is_some() && !target.exists() {
                    tracing::info!(from = %path.display(), "restoring a checkpoint moved aside by an interrupted write");
                    fs::rename(&path, &target).map_err(|e| RuntimeError::io(&target, e))?;
                } else {
                    let _ = fs::remove_dir_all(&path);
                }
            } else if name.starts_with(".tmp-") {
                let _ = fs::remove_dir_all(&path);
            } else if name.starts_with(".latest-") {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// Testing aid: abort the process at `point` of writing the checkpoint of `epoch`.
    #[doc(hidden)]
    pub fn crash_in_epoch(mut self, epoch: Option<u32>, point: CrashPoint) -> Self {
        self.crash_in_epoch = epoch.map(|e| (e, point));
        self
    }

    /// Whether the testing aid aborts at `point` of this checkpoint.
    fn crashes_at(&self, trainer: &Trainer, point: CrashPoint) -> bool {
        self.crash_in_epoch == Some((trainer.epoch(), point))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many checkpoints it keeps.
    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Keeps the newest `keep` (at least 1) from now on: a resumed run takes its saved value.
    pub fn set_keep(&mut self, keep: usize) {
        self.keep = keep.max(1);
    }

    /// Writes a checkpoint of the trainer's current state; returns its folder.
    pub fn write(&self, trainer: &mut Trainer) -> Result<PathBuf> {
        trainer.sync_host_model()?;
        let name = match trainer.partial_epoch() {
            None => format!("epoch-{:03}", trainer.epoch()),
            Some(p) => format!(
                "epoch-{:03}-step-{:06}",
                trainer.epoch() + 1,
                p.step_in_epoch
            ),
        };
        let model = model_tensors(trainer.model())?;
        let mut state = trainer.state();
        state.keep = Some(self.keep);
        state.model_checksum = Some(model_checksum(&model));
        let state = serde_json::to_vec_pretty(&state)
            .map_err(|e| RuntimeError::Config(format!("serialising the state: {e}")))?;
        let tmp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| RuntimeError::io(&tmp, e))?;
        }
        fs::create_dir(&tmp).map_err(|e| RuntimeError::io(&tmp, e))?;
        if self.crashes_at(trainer, CrashPoint::Write) {
            let half = &model[..model.len() / 2];
            let p = tmp.join(MODEL_FILE);
            let mut f = File::create(&p).map_err(|e| RuntimeError::io(&p, e))?;
            f.write_all(half).map_err(|e| RuntimeError::io(&p, e))?;
            let _ = f.sync_all();
            eprintln!(
                "crash-in-checkpoint: aborting half-way through {}",
                p.display()
            );
            std::process::abort();
        }
        write_synced(&tmp.join(MODEL_FILE), &model)?;
        write_synced(&tmp.join(STATE_FILE), &state)?;
        sync_dir(&tmp)?;
        let final_dir = self.dir.join(&name);
        let mut old = None;
        if final_dir.exists() {
            let o = self.dir.join(format!(".old-{name}-{}", std::process::id()));
            fs::rename(&final_dir, &o).map_err(|e| RuntimeError::io(&final_dir, e))?;
            old = Some(o);
            if self.crashes_at(trainer, CrashPoint::Rename) {
                let _ = sync_dir(&self.dir);
                eprintln!("crash-in-checkpoint: aborting with {name} moved aside");
                std::process::abort();
            }
        }
        fs::rename(&tmp, &final_dir).map_err(|e| RuntimeError::io(&final_dir, e))?;
        sync_dir(&self.dir)?;
        let latest_tmp = self.dir.join(format!(".latest-{}", std::process::id()));
        write_synced(&latest_tmp, format!("{name}\n").as_bytes())?;
        let latest = self.dir.join(LATEST_FILE);
        fs::rename(&latest_tmp, &latest).map_err(|e| RuntimeError::io(&latest, e))?;
        sync_dir(&self.dir)?;
        if let Some(o) = old {
            let _ = fs::remove_dir_all(o);
        }
        self.prune(&name);
        Ok(final_dir)
    }

    /// Tidies leftovers of interrupted writes ([`CheckpointWriter::tidy`]) and removes all
    /// but the newest `keep` checkpoints.
    fn prune(&self, current: &str) {
        if let Err(e) = self.tidy() {
            tracing::warn!("tidying {}: {e}", self.dir.display());
        }
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut found: Vec<((u32, u64), PathBuf)> = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            if let Some(key) = checkpoint_order(&name) {
                if path.is_dir() && name != current {
                    found.push((key, path));
                }
            }
        }
        found.sort();
        let excess = (found.len() + 1).saturating_sub(self.keep);
        for (_, path) in found.into_iter().take(excess) {
            tracing::debug!(path = %path.display(), "removing old checkpoint");
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// Checks `state.json`'s progress: `epoch` completed epochs of `steps_per_epoch` steps, plus
/// the steps of an interrupted epoch, make `step`; the history has one entry per epoch.
fn check_progress(folder: &Path, state: &TrainState, steps_per_epoch: u64) -> Result<()> {
    let path = folder.join(STATE_FILE);
    let partial = state.partial_epoch.as_ref().map_or(0, |p| p.step_in_epoch);
    if state.partial_epoch.is_some() && (partial == 0 || partial >= steps_per_epoch) {
        return Err(ck_err(
            &path,
            format!(
                "an interrupted epoch at step {partial} cannot be: an epoch has {steps_per_epoch} \
                 steps"
            ),
        ));
    }
    if state.partial_epoch.is_some() && state.epoch >= state.config.epochs {
        return Err(ck_err(
            &path,
            format!(
                "an interrupted epoch after epoch {} cannot be: the run has {} epochs",
                state.epoch, state.config.epochs
            ),
        ));
    }
    let expected = u64::from(state.epoch)
        .checked_mul(steps_per_epoch)
        .and_then(|s| s.checked_add(partial));
    if expected != Some(state.step) || state.epoch > state.config.epochs {
        return Err(ck_err(
            &path,
            format!(
                "epoch {} and step {} cannot be: {} epochs of {steps_per_epoch} steps{} make {} \
                 steps (of a run of {} epochs)",
                state.epoch,
                state.step,
                state.epoch,
                if partial > 0 {
                    format!(" and {partial} steps of the next")
                } else {
                    String::new()
                },
                expected.map_or("too many".to_string(), |e| e.to_string()),
                state.config.epochs
            ),
        ));
    }
    if state.history.len() != state.epoch as usize {
        return Err(ck_err(
            &path,
            format!(
                "epoch {} cannot be: the history holds {} epochs",
                state.epoch,
                state.history.len()
            ),
        ));
    }
    Ok(())
}

/// What a resumed run may change; everything else comes from the checkpoint.
#[derive(Debug, Clone, Default)]
pub struct ResumeOverrides {
    /// A new total of epochs. The prune-rate and learning-rate schedules stay the saved
    /// run's: extending a finished run continues it, it does not redo it as a longer one.
    pub epochs: Option<u32>,
    /// Kernel threads.
    pub threads: Option<usize>,
    /// The backend.
    pub backend: Option<crate::exec::BackendKind>,
    /// The strategy for ops compiled from now on.
    pub strategy: Option<sparse_ir::Strategy>,
}

impl Trainer {
    /// The state to save.
    pub fn state(&self) -> TrainState {
        TrainState {
            format: CHECKPOINT_FORMAT.to_string(),
            version: CHECKPOINT_VERSION,
            model: self.model().name().to_string(),
            epoch: self.epoch(),
            step: self.steps_done(),
            partial_epoch: self.partial_epoch().cloned(),
            config: self.config().clone(),
            prune_rate_schedule: self.prune_schedule().clone(),
            lr_schedule: self.lr_schedule(),
            masking: self.masking().state(),
            shuffle_rng: RngSnapshot::of(self.shuffle_rng()),
            plan: self
                .model()
                .sparse_layers()
                .map(|w| (w.name().to_string(), w.strategies()))
                .collect(),
            compile_ms_pending: self.compile_ms_pending(),
            history: self.history().to_vec(),
            data: DataInfo {
                dir: self.data().dir().display().to_string(),
                train: self.data().len(Split::Train),
                validation: self.data().len(Split::Validation),
                test: self.data().len(Split::Test),
                classes: self.data().classes(),
                mean: self.data().normalization().0,
                std: self.data().normalization().1,
                source: Some(self.data().source().name().to_string()),
                channels: Some(self.data().channel_normalization().to_vec())
                    .filter(|c| c.len() > 1),
            },
            nonzeros: self
                .model()
                .sparse_layers()
                .map(|w| (w.name().to_string(), w.nnz()))
                .collect(),
            keep: None,
            model_checksum: None,
        }
    }

    /// Resumes the run saved at `path` (a checkpoint folder, or a directory whose `latest`
    /// pointer names one) on `data`. With `--deterministic` the saved plan is reused, so the
    /// run continues bit for bit.
    pub fn resume(path: &Path, data: Dataset, overrides: &ResumeOverrides) -> Result<Self> {
        Self::resume_with(path, data, overrides, None)
    }

    /// [`resume`](Self::resume) for one rank of a data-parallel run (see
    /// [`Trainer::new_distributed`]).
    pub fn resume_distributed(
        path: &Path,
        data: Dataset,
        overrides: &ResumeOverrides,
        comm: Box<dyn crate::distributed::Communicator>,
    ) -> Result<Self> {
        Self::resume_with(path, data, overrides, Some(comm))
    }

    fn resume_with(
        path: &Path,
        data: Dataset,
        overrides: &ResumeOverrides,
        comm: Option<Box<dyn crate::distributed::Communicator>>,
    ) -> Result<Self> {
        let folder = resolve(path)?;
        let state = read_state(&folder)?;
        let mut config = state.config.clone();
        if let Some(e) = overrides.epochs {
            if e < state.epoch {
                return Err(ck_err(
                    &folder,
                    format!(
                        "--epochs {e} is fewer than the {} epochs already run",
                        state.epoch
                    ),
                ));
            }
            config.epochs = e;
        }
        if let Some(t) = overrides.threads {
            config.threads = t;
        }
        if let Some(b) = overrides.backend {
            config.backend = b;
        }
        if let Some(s) = overrides.strategy {
            config.strategy = s;
        }
        // Data of another kind (CIFAR-10 for an MNIST run, say) is named before a model is
        // built for it. IDX files of any origin are one kind.
        fn kind(source: &str) -> &str {
            match source {
                "mnist" | "idx" => "IDX",
                other => other,
            }
        }
        if let Some(saved) = &state.data.source {
            let now = data.source().name();
            if kind(saved) != kind(now) {
                return Err(ck_err(
                    &folder,
                    format!(
                        "the checkpoint was trained on {saved} data, the data given now is {now}"
                    ),
                ));
            }
        }
        let mut t = Trainer::build(config, data, comm)?;
        let st = &state.data;
        let data = t.data();
        if st.train != data.len(Split::Train)
            || st.validation != data.len(Split::Validation)
            || st.classes != data.classes()
        {
            return Err(ck_err(
                &folder,
                format!(
                    "the checkpoint was trained on {} training / {} validation samples of {} classes, the data set now gives {} / {} of {}",
                    st.train,
                    st.validation,
                    st.classes,
                    data.len(Split::Train),
                    data.len(Split::Validation),
                    data.classes()
                ),
            ));
        }
        if state.model != t.model().name() {
            return Err(ck_err(
                &folder,
                format!("model {} does not match", state.model),
            ));
        }
        check_progress(&folder, &state, t.steps_per_epoch())?;
        let model_path = folder.join(MODEL_FILE);
        let bytes = fs::read(&model_path).map_err(|e| RuntimeError::io(&model_path, e))?;
        if let Some(want) = &state.model_checksum {
            let got = model_checksum(&bytes);
            if &got != want {
                return Err(ck_err(
                    &model_path,
                    format!(
                        "its checksum is {got}, state.json says {want}: the file is damaged or \
                         was changed after it was written"
                    ),
                ));
            }
        }
        load_into_model(t.model_mut(), &model_path, &bytes, LoadMode::Checkpoint)?;
        if !state.nonzeros.is_empty() {
            for w in t.model().sparse_layers() {
                match state.nonzeros.get(w.name()) {
                    Some(&n) if n == w.nnz() => {}
                    saved => {
                        return Err(ck_err(
                            &model_path,
                            format!(
                                "tensor {}.mask has {} nonzeros, state.json's masking state \
                                 says {}",
                                w.name(),
                                w.nnz(),
                                saved.map_or("nothing about the layer".to_string(), |n| n
                                    .to_string())
                            ),
                        ))
                    }
                }
            }
        }
        let masking = Masking::from_state(state.masking.clone())
            .map_err(|e| ck_err(&folder, e.to_string()))?;
        // The run's schedules go on as they were, also when it is extended to more epochs:
        // they belong to the run (a straight run of the new length would differ).
        let prune_schedule = state.prune_rate_schedule.clone();
        let shuffle_rng = state
            .shuffle_rng
            .restore()
            .map_err(|e| ck_err(&folder, e))?;
        t.restore_progress(RunProgress {
            masking,
            prune_schedule,
            lr_schedule: state.lr_schedule,
            epoch: state.epoch,
            step: state.step,
            partial: state.partial_epoch.clone(),
            shuffle_rng,
            history: state.history.clone(),
            compile_ms_pending: state.compile_ms_pending,
        });
        // The saved plan: reused with --deterministic, so every kernel runs the same code.
        if t.config().deterministic {
            let requested = LayerPlan::uniform(t.config().strategy);
            for w in t.model_mut().sparse_layers_mut() {
                if let Some(map) = state.plan.get(w.name()) {
                    let mut plan = LayerPlan::from_map(map).map_err(|e| ck_err(&folder, e))?;
                    if !map.contains_key("spmm_t") {
                        plan.spmm_t = requested.spmm_t;
                    }
                    w.set_plan(plan);
                }
            }
            t.compile_all_unrecorded()?;
            for w in t.model_mut().sparse_layers_mut() {
                w.set_plan(requested);
            }
        } else {
            t.compile_all_unrecorded()?;
        }
        tracing::info!(
            checkpoint = %folder.display(),
            epoch = t.epoch(),
            step = t.steps_done(),
            "resumed"
        );
        Ok(t)
    }

    /// Loads a user's weights (and masks) from a safetensors file (`--init-from`): per masked
    /// layer `NAME.weight` (f32, `[out, in]` or `[out, in, kh, kw]`, or flattened to
    /// `[rows, cols]`), optionally `NAME.mask` (u8, bool or f32 0/1; without it the layer keeps
    /// its initial mask and the weights are multiplied by it) and `NAME.bias`. Momentum starts
    /// at zero. Recompiles what changed.
    pub fn load_weights(&mut self, file: &Path) -> Result<()> {
        let bytes = fs::read(file).map_err(|e| RuntimeError::io(file, e))?;
        self.pull_device()?;
        load_into_model(self.model_mut(), file, &bytes, LoadMode::Weights)?;
        self.compile_all()
    }
}
