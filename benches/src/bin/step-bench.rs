//! `step-bench`: the training step of a whole model (forward, loss, backward, SGD) at given
//! densities on CIFAR-shaped synthetic data, each row in a child process of its own (so its
//! peak RSS is its own), reported as the mean step over an epoch.
//!
//! ```text
//! step-bench --model wrn-16-8 --batch 128 --density 0.05,0.1,0.2,1 --threads 1,2 \
//!     [--steps S] [--init uniform|erk] [--masks-from CHECKPOINT] [--flops-budget F]
//!     [--pytorch PYTHON] --json FILE
//! ```
//!
//! An epoch is E = ⌈45,000 / batch⌉ steps (CIFAR-10's training split after the reference's
//! 10 % validation split: 352 at batch 128). Its last K = 64 steps (the dense-momentum
//! window) compute the dense weight gradient, and it ends with one mask update and the
//! recompilation of the changed layers. The bench times S ordinary steps, S window steps and
//! one update, and reports `step_ms_mean = (ordinary·(E − K) + window·K + update) / E` with
//! the means of each kind (default S: an epoch's worth, E − K and K). A dense run (density 1)
//! has neither window steps nor updates. `step_ms_median` is the median ordinary step.
//!
//! With `--flops-budget F` the initial masks are drawn to cost at most `F` times the dense
//! network's forward multiply-adds, and the update keeps them there. Every row reports its
//! masks' `flops_fraction` (the timed steps' multiply-adds relative to dense).
//!
//! Each row also has a per-layer breakdown (median of 3 passes): the forward and backward
//! pass of every layer; the sums over the layers with masked weights (`forward_ms`,
//! `backward_ms`: the input gradient and the weight gradient together) and over the others
//! (`elementwise_ms`: batch normalisation, ReLU, dropout, pooling, residual additions).
//!
//! `--pytorch PYTHON` runs `benches/pytorch/conv_step.py` with that interpreter after each
//! model's rows, on the same batch size and threads: the dense PyTorch step, back to back.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;
use runtime::masking::InitMode;
use runtime::{Dataset, ModelKind, TrainConfig, Trainer, WeightGradMode};
use serde::{Deserialize, Serialize};

/// The training split of CIFAR-10 after the reference's validation split.
const CIFAR_TRAIN: usize = 45_000;
/// The dense-momentum window (the trainer's default `window:64`).
const WINDOW: usize = 64;

/// Times the training step of a whole model at several densities.
#[derive(Debug, Parser)]
#[command(name = "step-bench", version)]
struct Cli {
    /// The model (vgg-d, wrn-16-8, wrn-16-10, wrn-16-2, wrn-28-2, lenet5, …); several,
    /// comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    model: Vec<ModelKind>,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Densities in (0, 1], comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.2,1")]
    density: Vec<f64>,
    /// Threads, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    threads: Vec<usize>,
    /// Ordinary and window steps timed per row [default: an epoch's worth].
    #[arg(long)]
    steps: Option<usize>,
    /// Initial masks: uniform or erk.
    #[arg(long, default_value = "uniform")]
    init: InitMode,
    /// Take the masks from a trained run's checkpoint (its folder, or its directory's
    /// latest) instead of drawing them; --density then only labels the row.
    #[arg(long, value_name = "CHECKPOINT")]
    masks_from: Option<PathBuf>,
    /// Compute budget of the sparse rows: the masks' forward multiply-adds at most F times the
    /// dense network's (as sparse-train's --flops-budget).
    #[arg(long, value_name = "F")]
    flops_budget: Option<f64>,
    /// Also time PyTorch's dense step with this Python (see benches/pytorch/conv_step.py).
    #[arg(long, value_name = "PYTHON")]
    pytorch: Option<PathBuf>,
    /// Write the results here: {"version":1,"results":[…]}.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run one row and print it as JSON (what the parent runs in a child process).
    #[arg(long, hide = true)]
    child: bool,
}

/// One layer's share of a step.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerTime {
    name: String,
    /// Whether the layer has masked weights.
    sparse: bool,
    forward_ms: f64,
    backward_ms: f64,
}

/// One row of the JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    model: String,
    /// `sparsejit`, or `pytorch` for the peer's dense step.
    framework: String,
    density: f64,
    batch: usize,
    threads: usize,
    steps: usize,
    /// The compute budget the masks were drawn under, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    flops_budget: Option<f64>,
    /// The timed masks' forward multiply-adds relative to dense.
    #[serde(default)]
    flops_fraction: f64,
    step_ms_mean: f64,
    step_ms_median: f64,
    peak_rss_mb: f64,
    #[serde(default)]
    ordinary_ms_mean: f64,
    #[serde(default)]
    window_ms_mean: f64,
    #[serde(default)]
    update_ms: f64,
    #[serde(default)]
    compile_ms: f64,
    #[serde(default)]
    forward_ms: f64,
    #[serde(default)]
    backward_ms: f64,
    #[serde(default)]
    elementwise_ms: f64,
    #[serde(default)]
    layers: Vec<LayerTime>,
}

#[derive(Debug, Serialize)]
struct Report {
    version: u32,
    cpu: String,
    results: Vec<Row>,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The peak resident set of this process, in MB (`VmHWM`).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// One row, in this process.
fn run_row(cli: &Cli, model: ModelKind, density: f64, threads: usize) -> Result<Row> {
    let batch = cli.batch;
    let epoch = CIFAR_TRAIN.div_ceil(batch);
    let dense = density >= 1.0 && cli.masks_from.is_none();
    let window = if dense { 0 } else { WINDOW.min(epoch) };
    let ordinary_steps = cli.steps.unwrap_or(epoch - window);
    let window_steps = if dense {
        0
    } else {
        cli.steps.unwrap_or(window)
    };
    // Enough samples for two batches: the steps cycle over them.
    let samples = (2 * batch * 10).div_ceil(9) + 1;
    let data = Dataset::synthetic(samples, 1, 17)?;
    let config = TrainConfig {
        model,
        density,
        batch_size: batch,
        threads,
        init: cli.init,
        flops_budget: if dense { None } else { cli.flops_budget },
        epochs: 1,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(config, data)?;
    if let Some(ck) = &cli.masks_from {
        let folder = runtime::checkpoint::resolve(ck)?;
        t.load_weights(&folder.join("model.safetensors"))
            .with_context(|| format!("masks from {}", folder.display()))?;
    }
    let flops_fraction = t.flops_fraction()?;
    // Compilation and one step of each kind first, untimed.
    t.bench_steps(1, WeightGradMode::Active)?;
    if !dense {
        t.bench_steps(1, WeightGradMode::Dense)?;
    }
    let ordinary = t.bench_steps(ordinary_steps, WeightGradMode::Active)?;
    let windowed = t.bench_steps(window_steps, WeightGradMode::Dense)?;
    let (update_ms, compile_ms) = if dense {
        (0.0, 0.0)
    } else {
        t.bench_mask_update()?
    };
    let step_ms_mean = (mean(&ordinary) * (epoch - window) as f64
        + mean(&windowed) * window as f64
        + update_ms
        + compile_ms)
        / epoch as f64;
    let profile = t.model_mut().profile_layers(3, WeightGradMode::Active)?;
    let sparse: std::collections::HashSet<String> = t
        .model()
        .sparse_layers()
        .map(|w| w.name().to_string())
        .collect();
    let layers: Vec<LayerTime> = profile
        .into_iter()
        .map(|(name, f, b)| LayerTime {
            sparse: sparse.contains(&name),
            name,
            forward_ms: f / 1e3,
            backward_ms: b / 1e3,
        })
        .collect();
    let sum = |sp: bool, f: fn(&LayerTime) -> f64| -> f64 {
        layers.iter().filter(|l| l.sparse == sp).map(f).sum()
    };
    Ok(Row {
        model: model.name().to_string(),
        framework: "sparsejit".into(),
        density,
        batch,
        threads,
        steps: ordinary.len() + windowed.len(),
        flops_budget: t.config().flops_budget,
        flops_fraction,
        step_ms_mean,
        step_ms_median: median(&ordinary),
        peak_rss_mb: peak_rss_mb(),
        ordinary_ms_mean: mean(&ordinary),
        window_ms_mean: mean(&windowed),
        update_ms,
        compile_ms,
        forward_ms: sum(true, |l| l.forward_ms),
        backward_ms: sum(true, |l| l.backward_ms),
        elementwise_ms: sum(false, |l| l.forward_ms + l.backward_ms),
        layers,
    })
}

/// One row in a child process of its own.
fn child_row(cli: &Cli, model: ModelKind, density: f64, threads: usize) -> Result<Row> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--child",
        "--model",
        model.name(),
        "--batch",
        &cli.batch.to_string(),
        "--density",
        &density.to_string(),
        "--threads",
        &threads.to_string(),
        "--init",
        &cli.init.to_string(),
    ]);
    if let Some(s) = cli.steps {
        cmd.args(["--steps", &s.to_string()]);
    }
    if let Some(m) = &cli.masks_from {
        cmd.arg("--masks-from").arg(m);
    }
    if let Some(f) = cli.flops_budget {
        cmd.args(["--flops-budget", &f.to_string()]);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "{} at density {density} on {threads} threads: {}",
            model.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the child's row")
}

/// PyTorch's dense step of the same model, by `benches/pytorch/conv_step.py`.
fn pytorch_row(python: &PathBuf, cli: &Cli, model: ModelKind, threads: usize) -> Result<Row> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/pytorch/conv_step.py");
    let steps = cli.steps.unwrap_or(20).to_string();
    let out = Command::new(python)
        .args([script, "--model", model.name(), "--batch"])
        .arg(cli.batch.to_string())
        .args([
            "--threads",
            &threads.to_string(),
            "--steps",
            &steps,
            "--json",
        ])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!("{script}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).context("reading conv_step.py's row")
}

fn main() {
    sigpipe::reset();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Some(d) = cli.density.iter().find(|d| !(**d > 0.0 && **d <= 1.0)) {
        bail!("--density {d} is not in (0, 1]");
    }
    if cli.batch == 0 || cli.threads.contains(&0) || cli.steps == Some(0) {
        bail!("--batch, --threads and --steps must be at least 1");
    }
    if let Some(f) = cli.flops_budget {
        if !(f > 0.0 && f <= 1.0) {
            bail!("--flops-budget {f} is not in (0, 1]");
        }
        if cli.masks_from.is_some() {
            bail!("--flops-budget draws the masks: it excludes --masks-from");
        }
    }
    if cli.child {
        let row = run_row(&cli, cli.model[0], cli.density[0], cli.threads[0])?;
        println!("{}", serde_json::to_string(&row)?);
        return Ok(());
    }
    let mut results = Vec::new();
    println!(
        "{:<10} {:>9} {:>7} {:>7} {:>7} {:>12} {:>12} {:>10} {:>10} {:>10} {:>9}",
        "model",
        "framework",
        "density",
        "flops",
        "threads",
        "mean ms",
        "median ms",
        "fwd ms",
        "bwd ms",
        "elem ms",
        "rss MB"
    );
    for &model in &cli.model {
        for &threads in &cli.threads {
            let mut rows = Vec::new();
            for &density in &cli.density {
                rows.push(child_row(&cli, model, density, threads)?);
            }
            if let Some(py) = &cli.pytorch {
                rows.push(pytorch_row(py, &cli, model, threads)?);
            }
            for r in rows {
                println!(
                    "{:<10} {:>9} {:>7} {:>7.4} {:>7} {:>12.1} {:>12.1} {:>10.1} {:>10.1} {:>10.1} {:>9.0}",
                    r.model,
                    r.framework,
                    r.density,
                    r.flops_fraction,
                    r.threads,
                    r.step_ms_mean,
                    r.step_ms_median,
                    r.forward_ms,
                    r.backward_ms,
                    r.elementwise_ms,
                    r.peak_rss_mb
                );
                results.push(r);
            }
        }
    }
    if let Some(path) = &cli.json {
        let report = Report {
            version: 1,
            cpu: cpu_model(),
            results,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
