//! `sparse-train`: sparse-momentum training of LeNet-300-100 or LeNet-5 on MNIST (or any IDX
//! data set), with kernels compiled for every layer's current mask.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use runtime::masking::{
    DecaySchedule, GrowthMode, InitMode, PruneMode, RedistributionMode, UpdateFrequency,
};
use runtime::{
    BackendKind, CheckpointWriter, Dataset, DenseMomentum, EpochMetrics, ModelKind,
    ResumeOverrides, Split, StepInfo, TrainConfig, Trainer,
};
use sparse_ir::Strategy;

/// Train a network that stays sparse from the first step (sparse momentum, Dettmers &
/// Zettlemoyer 2019) on kernels compiled for each layer's mask. Defaults: LeNet-300-100 at
/// 5 % density on the vendored MNIST, the reference's settings.
#[derive(Debug, Parser)]
#[command(name = "sparse-train", version)]
struct Cli {
    /// The model: lenet300-100, lenet5, vgg-d, wrn-16-2, wrn-16-8, wrn-16-10 or wrn-28-2
    /// [default: lenet300-100].
    #[arg(long)]
    model: Option<ModelKind>,
    /// The data: mnist (IDX files: MNIST or a drop-in such as Fashion-MNIST), cifar10
    /// (CIFAR-10's binary version, from --data-dir) or synthetic (CIFAR-shaped random
    /// images, for timing). With cifar10 the training images are randomly cropped (4-pixel
    /// zero padding) and flipped, and the batch size defaults to 128 [default: mnist].
    #[arg(long, value_enum)]
    data: Option<DataKind>,
    /// The data's directory: for mnist the IDX files (train-/t10k-images/labels, raw or .gz)
    /// [default: data/mnist]; for cifar10 data_batch_1.bin … data_batch_5.bin and
    /// test_batch.bin.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Global density of the masked weights, in (0, 1]; 1 trains dense [default: 0.05].
    #[arg(long)]
    density: Option<f64>,
    /// Epochs (100 is the paper's run) [default: 10].
    #[arg(long)]
    epochs: Option<u32>,
    /// Batch size [default: 100].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Initial learning rate (×0.1 every 25,000 steps) [default: 0.1].
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of every random stream [default: 17].
    #[arg(long)]
    seed: Option<u64>,
    /// Most threads a kernel uses [default: 2, or the cores if fewer]: the planner runs each kernel on one thread or
    /// on this many, whichever measured faster in a training step's conditions (with
    /// --deterministic, whichever its cost model predicts).
    #[arg(long)]
    threads: Option<usize>,
    /// Where kernels run: cpu or opencl [default: cpu]. opencl needs a build with the cargo
    /// feature `opencl` and an OpenCL platform; SPARSEJIT_OPENCL_DEVICE=N picks the device
    /// (default: the first GPU, else the first device).
    #[arg(long)]
    backend: Option<BackendKind>,
    /// How every op runs: auto (the planner chooses); on cpu generic, dense or jit, on
    /// opencl csr, table or unrolled [default: auto].
    #[arg(long)]
    strategy: Option<Strategy>,
    /// Momentum of inactive weights: exact (dense gradient every step) or window:K (only the
    /// last K steps before each mask update) [default: window:64].
    #[arg(long)]
    dense_momentum: Option<DenseMomentum>,
    /// Pruning: magnitude or global-magnitude [default: magnitude].
    #[arg(long)]
    prune: Option<PruneMode>,
    /// Growth: momentum, random, gradient, momentum-neuron or none (static sparse)
    /// [default: momentum].
    #[arg(long)]
    growth: Option<GrowthMode>,
    /// Redistribution: momentum, magnitude, nonzero or none [default: momentum].
    #[arg(long)]
    redistribution: Option<RedistributionMode>,
    /// Initial prune rate [default: 0.5].
    #[arg(long)]
    prune_rate: Option<f64>,
    /// Prune-rate schedule: cosine or linear [default: cosine].
    #[arg(long)]
    decay_schedule: Option<DecaySchedule>,
    /// Mask updates: every epoch, or every K steps [default: epoch].
    #[arg(long)]
    update_frequency: Option<UpdateFrequency>,
    /// Initial masks: uniform or erk [default: uniform].
    #[arg(long)]
    init: Option<InitMode>,
    /// Compute budget: keep the forward multiply-adds of the masked layers at or below F
    /// times the dense network's, in (0, 1] (growth is cut to fit; the metrics' flops_fraction
    /// reports it) [default: no budget].
    #[arg(long, value_name = "F")]
    flops_budget: Option<f64>,
    /// Start from a user's weights (and masks) in a safetensors file: NAME.weight,
    /// optionally NAME.mask and NAME.bias per layer.
    #[arg(long, value_name = "FILE.safetensors")]
    init_from: Option<PathBuf>,
    /// Append one JSON line per epoch to this file (version 1).
    #[arg(long, value_name = "FILE.jsonl")]
    metrics_out: Option<PathBuf>,
    /// Write DIR/epoch-NNN/ after every epoch (and on Ctrl-C, SIGTERM or SIGHUP) and DIR/latest.
    /// A resumed run goes on writing where it resumed from unless this names another folder.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Keep the newest N checkpoints [default: 3, or as many as the resumed run kept].
    #[arg(long, value_name = "N")]
    keep: Option<usize>,
    /// Resume from a checkpoint folder (DIR/epoch-NNN) or directory (DIR, meaning its latest),
    /// and go on checkpointing into DIR. --metrics-out is rewritten with the run's history.
    #[arg(long, value_name = "PATH")]
    resume: Option<PathBuf>,
    /// Only evaluate (a checkpoint with --resume, or --init-from weights) and exit.
    #[arg(long)]
    eval_only: bool,
    /// Choose the plan once per epoch and keep it, so a resumed run repeats the
    /// uninterrupted one bit for bit.
    #[arg(long)]
    deterministic: bool,
    /// Hot swap (cpu): after a mask update, a layer whose plan is the JIT runs the generic
    /// kernel until a background thread has compiled its JIT code (ignored with
    /// --deterministic).
    #[arg(long)]
    hot_swap: bool,
    /// Draw accuracy and per-layer density over epochs into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Data-parallel training over MPI, one rank per process (`mpirun -np N sparse-train
    /// --distributed …`): each rank trains on its share of every global batch of
    /// --batch-size; only the nonzero weights' gradients (and the dense ones before a mask
    /// update) are summed. Rank 0 writes checkpoints, metrics and the plot. Needs a build
    /// with the cargo feature `mpi`.
    #[arg(long)]
    distributed: bool,
    /// With --distributed: a rank waiting longer than this in a collective operation (a rank
    /// that died or hangs) ends the job.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 300,
        requires = "distributed"
    )]
    mpi_timeout: u64,
    /// Use only the first N training images (tests and quick runs).
    #[arg(long, hide = true)]
    train_limit: Option<usize>,
    /// Use only the first N validation and test images.
    #[arg(long, hide = true)]
    eval_limit: Option<usize>,
    /// Stop (as if interrupted) after this epoch, once its checkpoint is written.
    #[arg(long, hide = true)]
    stop_after_epoch: Option<u32>,
    /// Abort half-way through writing the checkpoint of this epoch (tests atomicity).
    #[arg(long, hide = true)]
    crash_in_checkpoint: Option<u32>,
    /// Where --crash-in-checkpoint aborts: `write` (half-way through the model file) or
    /// `rename` (after moving a folder of the same name aside, before its replacement is
    /// renamed into place).
    #[arg(long, hide = true, default_value = "write")]
    crash_at: runtime::CrashPoint,
}

/// Checkpoints kept when neither --keep nor a resumed run says how many.
const DEFAULT_KEEP: usize = 3;

/// What `--data` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DataKind {
    /// IDX files.
    Mnist,
    /// CIFAR-10's binary version.
    Cifar10,
    /// CIFAR-shaped random images.
    Synthetic,
}

/// Samples of `--data synthetic` (CIFAR-10's numbers): training file and test file.
const SYNTHETIC_SAMPLES: (usize, usize) = (50_000, 10_000);

impl Cli {
    fn config(&self) -> TrainConfig {
        let d = TrainConfig::default();
        TrainConfig {
            model: self.model.unwrap_or(d.model),
            density: self.density.unwrap_or(d.density),
            epochs: self.epochs.unwrap_or(d.epochs),
            batch_size: self.batch_size.unwrap_or(match self.data {
                Some(DataKind::Cifar10 | DataKind::Synthetic) => 128,
                _ => d.batch_size,
            }),
            lr: self.lr.unwrap_or(d.lr),
            seed: self.seed.unwrap_or(d.seed),
            threads: self.threads.unwrap_or(d.threads),
            backend: self.backend.unwrap_or(d.backend),
            strategy: self.strategy.unwrap_or(d.strategy),
            dense_momentum: self.dense_momentum.unwrap_or(d.dense_momentum),
            prune: self.prune.unwrap_or(d.prune),
            growth: self.growth.unwrap_or(d.growth),
            redistribution: self.redistribution.unwrap_or(d.redistribution),
            prune_rate: self.prune_rate.unwrap_or(d.prune_rate),
            decay_schedule: self.decay_schedule.unwrap_or(d.decay_schedule),
            update_frequency: self.update_frequency.unwrap_or(d.update_frequency),
            init: self.init.unwrap_or(d.init),
            flops_budget: self.flops_budget,
            deterministic: self.deterministic,
            hot_swap: self.hot_swap,
            train_limit: self.train_limit,
            eval_limit: self.eval_limit,
            augmentation: match self.data {
                Some(DataKind::Cifar10) => Some(runtime::Augmentation::CIFAR),
                _ => None,
            },
            ..d
        }
    }

    /// Options a resumed run takes from its checkpoint: an explicit different value is an
    /// error.
    fn check_against(&self, saved: &TrainConfig) -> Result<()> {
        fn same<T: PartialEq + std::fmt::Display>(
            name: &str,
            given: Option<T>,
            saved: T,
        ) -> Result<()> {
            match given {
                Some(g) if g != saved => bail!(
                    "--{name} {g} differs from the checkpoint's {saved}; a resumed run keeps the configuration it was started with"
                ),
                _ => Ok(()),
            }
        }
        same("model", self.model, saved.model)?;
        same("density", self.density, saved.density)?;
        same("batch-size", self.batch_size, saved.batch_size)?;
        same("lr", self.lr, saved.lr)?;
        same("seed", self.seed, saved.seed)?;
        same("dense-momentum", self.dense_momentum, saved.dense_momentum)?;
        same("prune", self.prune, saved.prune)?;
        same("growth", self.growth, saved.growth)?;
        same("redistribution", self.redistribution, saved.redistribution)?;
        same("prune-rate", self.prune_rate, saved.prune_rate)?;
        same("decay-schedule", self.decay_schedule, saved.decay_schedule)?;
        same(
            "update-frequency",
            self.update_frequency,
            saved.update_frequency,
        )?;
        same("init", self.init, saved.init)?;
        if self.flops_budget.is_some() && self.flops_budget != saved.flops_budget {
            bail!(
                "--flops-budget {} differs from the checkpoint's ({}); a resumed run keeps the configuration it was started with",
                self.flops_budget.unwrap_or_default(),
                saved
                    .flops_budget
                    .map_or_else(|| "no budget".to_string(), |f| f.to_string())
            );
        }
        if self.deterministic && !saved.deterministic {
            bail!("--deterministic was not set when the checkpoint's run started");
        }
        Ok(())
    }
}

/// `--data-dir`, or `data/mnist` relative to the working directory, or else to the
/// repository.
fn mnist_dir(cli: &Cli) -> PathBuf {
    let default = Path::new("data/mnist");
    match &cli.data_dir {
        Some(d) => d.clone(),
        None if default.is_dir() => default.to_path_buf(),
        None => {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(default);
            if repo.is_dir() {
                repo
            } else {
                default.to_path_buf()
            }
        }
    }
}

/// Loads what `--data` and `--data-dir` name; a description of it for the first line.
fn load_data(cli: &Cli) -> Result<(Dataset, String)> {
    match cli.data.unwrap_or(DataKind::Mnist) {
        DataKind::Mnist => {
            let dir = mnist_dir(cli);
            let data = Dataset::load_dir(&dir).with_context(|| "loading the data set")?;
            Ok((data, dir.display().to_string()))
        }
        DataKind::Cifar10 => {
            let Some(dir) = &cli.data_dir else {
                bail!(
                    "--data cifar10 needs --data-dir DIR, a folder with CIFAR-10's binary \
                     version (data_batch_1.bin … data_batch_5.bin, test_batch.bin; the \
                     README says where to get it)"
                );
            };
            let data = Dataset::load_cifar10(dir).with_context(|| "loading CIFAR-10")?;
            Ok((data, dir.display().to_string()))
        }
        DataKind::Synthetic => {
            if cli.data_dir.is_some() {
                bail!("--data synthetic makes its own images: it takes no --data-dir");
            }
            let (train, test) = SYNTHETIC_SAMPLES;
            let data = Dataset::synthetic(train, test, cli.seed.unwrap_or(17))?;
            Ok((data, "synthetic data".to_string()))
        }
    }
}

fn percent(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn epoch_line(m: &EpochMetrics, epochs: u32) -> String {
    let layers: Vec<String> = m
        .layers
        .iter()
        .map(|l| format!("{} {:.1}%", l.name, l.density * 100.0))
        .collect();
    let mut line = format!(
        "epoch {:>3}/{epochs}  loss {:.4}  val {}  lr {}  prune {:.4}  nnz {}  flops {}  [{}]  {:.2} s  step {:.3} ms  compile {:.1} ms",
        m.epoch,
        m.train_loss,
        m.val_acc.map_or("-".into(), percent),
        m.lr,
        m.prune_rate,
        m.nnz_total,
        m.flops_fraction.map_or("-".into(), percent),
        layers.join(", "),
        m.epoch_seconds,
        m.step_ms_median,
        m.compile_ms
    );
    if let Some(t) = m.test_acc {
        line.push_str(&format!("  test {}", percent(t)));
    }
    line
}

fn main() {
    // `sparse-train … | head` ends quietly when `head` exits, instead of panicking on the
    // closed pipe.
    sigpipe::reset();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let interactive = std::io::stderr().is_terminal();
    // Warnings only by default (RUST_LOG=info shows mask updates, recompilations and
    // checkpoints); colours only on a terminal.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(interactive)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if cli.init_from.is_some() && cli.resume.is_some() {
        bail!("--init-from and --resume exclude each other");
    }
    // A data-parallel run: rank 0 leads (checkpoints, metrics, plot, output); the others
    // train beside it.
    let comm = if cli.distributed {
        Some(communicator(cli.mpi_timeout)?)
    } else {
        None
    };
    let lead = comm.as_ref().is_none_or(|c| c.rank() == 0);
    macro_rules! say {
        ($($arg:tt)*) => {
            if lead {
                println!($($arg)*);
            }
        };
    }

    // The checkpoint folder's lock comes first: a second run on the same folder stops here,
    // before it reads any data. A resumed run goes on in the folder it resumed from.
    let checkpoint_dir = match (&cli.checkpoint_dir, &cli.resume) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(r)) => Some(runtime::checkpoint::resume_dir(r)),
        (None, None) => None,
    };
    let mut writer = match &checkpoint_dir {
        Some(d) if !cli.eval_only && lead => Some(
            CheckpointWriter::new(d, cli.keep.unwrap_or(DEFAULT_KEEP))?
                .crash_in_epoch(cli.crash_in_checkpoint, cli.crash_at),
        ),
        _ => None,
    };
    // Output files that cannot be written are errors now, not after the first epoch. Only
    // the leading rank writes them.
    let plot = cli.plot.as_ref().filter(|_| lead);
    let metrics_out = cli.metrics_out.as_ref().filter(|_| lead);
    if let Some(path) = plot {
        check_writable(path)?;
    }
    if let Some(path) = metrics_out {
        check_writable(path)?;
    }
    let (data, dir) = load_data(&cli)?;
    let started = Instant::now();
    let mut trainer = match &cli.resume {
        Some(path) => {
            let folder = runtime::checkpoint::resolve(path)?;
            let saved = runtime::checkpoint::read_state(&folder)?;
            cli.check_against(&saved.config)?;
            if let Some(w) = &mut writer {
                let keep = cli.keep.or(saved.keep).unwrap_or(DEFAULT_KEEP);
                w.set_keep(keep);
                if cli.checkpoint_dir.is_none() {
                    say!(
                        "checkpoints go on into {} (keeping the newest {keep})",
                        w.dir().display()
                    );
                }
            }
            if let Some(e) = cli.epochs.filter(|&e| e != saved.config.epochs) {
                say!(
                    "the run was set to {} epochs and now runs {e}: it keeps the prune-rate \
                     schedule it started with (decaying over its first {} steps) and its \
                     learning-rate schedule, so it differs from a straight {e}-epoch run",
                    saved.config.epochs,
                    saved.prune_rate_schedule.total_steps()
                );
            }
            let overrides = ResumeOverrides {
                epochs: cli.epochs,
                threads: cli.threads,
                backend: cli.backend,
                strategy: cli.strategy,
            };
            let t = match comm {
                Some(c) => Trainer::resume_distributed(&folder, data, &overrides, c)?,
                None => Trainer::resume(&folder, data, &overrides)?,
            };
            say!(
                "resumed {} from {} (epoch {}, step {})",
                t.config().model,
                folder.display(),
                t.epoch(),
                t.steps_done()
            );
            t
        }
        None => {
            let mut t = match comm {
                Some(c) => Trainer::new_distributed(cli.config(), data, c)?,
                None => Trainer::new(cli.config(), data)?,
            };
            if let Some(file) = &cli.init_from {
                t.load_weights(file)?;
                say!("weights and masks from {}", file.display());
            }
            t
        }
    };
    let cfg = trainer.config().clone();
    for w in trainer.model().sparse_layers() {
        if w.nnz() == 0 {
            eprintln!(
                "warning: layer {} has no nonzero weight at density {}: it passes nothing on \
                 (raise --density)",
                w.name(),
                cfg.density
            );
        }
    }
    if let Some(budget) = cfg.flops_budget {
        let now = trainer.flops_fraction()?;
        if now > budget * (1.0 + 1e-9) {
            eprintln!(
                "warning: the masks cost {} of the dense network's multiply-adds, above \
                 --flops-budget {budget}: nothing grows back until pruning brings them within it",
                percent(now)
            );
        }
    }
    if let Some(warning) = sparse_ir::limits::threads_beyond_cores(cfg.threads) {
        eprintln!("warning: {warning}: kernels will wait for each other");
    }
    let d = trainer.data();
    say!(
        "{} on {} ({} train / {} validation / {} test, {} classes), density {}, {} epochs, batch {}, lr {}, {} threads, backend {}, strategy {}, dense momentum {}",
        cfg.model,
        dir,
        d.len(Split::Train),
        d.len(Split::Validation),
        d.len(Split::Test),
        d.classes(),
        cfg.density,
        cfg.epochs,
        cfg.batch_size,
        cfg.lr,
        cfg.threads,
        cfg.backend,
        cfg.strategy,
        cfg.dense_momentum
    );
    if cfg.backend == BackendKind::OpenCl {
        say!("device {}", trainer.executor().device());
    }

    if cli.eval_only {
        if cli.resume.is_none() && cli.init_from.is_none() {
            bail!("--eval-only evaluates a checkpoint (--resume) or weights (--init-from)");
        }
        let val = trainer.evaluate(Split::Validation)?;
        let test = trainer.evaluate(Split::Test)?;
        let layers: Vec<String> = trainer
            .model()
            .sparse_layers()
            .map(|w| format!("{} {} ({:.2}%)", w.name(), w.nnz(), w.density() * 100.0))
            .collect();
        say!(
            "validation {} (loss {:.4}), test {} (loss {:.4}); {}",
            percent(val.accuracy),
            val.loss,
            percent(test.accuracy),
            test.loss,
            layers.join(", ")
        );
        let line = serde_json::json!({
            "version": 1,
            "eval_only": true,
            "epoch": trainer.epoch(),
            "val_acc": val.accuracy,
            "test_acc": test.accuracy,
            "nnz_total": trainer.model().nnz(),
        });
        if let Some(path) = metrics_out {
            append_line(path, &line.to_string())?;
        }
        return Ok(());
    }

    // The metrics file holds the run's epochs once each: a new run starts it empty, a resumed
    // run rewrites it with the epochs its checkpoint holds (a line written after the
    // checkpoint it belongs to, by a run killed in between, goes; none is repeated).
    if let Some(path) = metrics_out {
        let mut text = String::new();
        for m in trainer.history() {
            text.push_str(&serde_json::to_string(m).context("serialising the metrics")?);
            text.push('\n');
        }
        replace_file(path, text.as_bytes())?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let (stop, interrupted) = (stop.clone(), interrupted.clone());
        ctrlc::set_handler(move || {
            if interrupted.swap(true, Ordering::SeqCst) {
                eprintln!("second interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            stop.store(true, Ordering::SeqCst);
        })
        .context("installing the handler of Ctrl-C, SIGTERM and SIGHUP")?;
    }

    let mut bar: Option<ProgressBar> = None;
    let style = ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {pos}/{len} steps  loss {msg}  {elapsed}<{eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let mut on_step = |s: &StepInfo| {
        if !interactive {
            return;
        }
        let pb = bar.get_or_insert_with(|| {
            let pb = ProgressBar::new(s.steps_in_epoch);
            pb.set_style(style.clone());
            pb.set_prefix(format!("{}/{}", s.epoch, cfg.epochs));
            pb
        });
        pb.set_position(s.step_in_epoch);
        if s.step_in_epoch.is_multiple_of(10) {
            pb.set_message(format!("{:.4}", s.loss));
        }
        if s.step_in_epoch == s.steps_in_epoch {
            pb.finish_and_clear();
            bar = None;
        }
    };
    let stop_for_epochs = stop.clone();
    // An epoch's checkpoint first, then its metrics line and plot: a run killed in between
    // resumes from that checkpoint and writes the line then.
    let mut on_epoch = |t: &mut Trainer, m: &EpochMetrics| -> runtime::Result<()> {
        say!("{}", epoch_line(m, t.config().epochs));
        if let Some(w) = &writer {
            let folder = w.write(t)?;
            tracing::info!(checkpoint = %folder.display(), "checkpoint written");
        }
        if let Some(path) = metrics_out {
            let line = serde_json::to_string(m)
                .map_err(|e| runtime::RuntimeError::Config(format!("serialising metrics: {e}")))?;
            append_line(path, &line)
                .map_err(|e| runtime::RuntimeError::Config(format!("{e:#}")))?;
        }
        if let Some(path) = plot {
            write_plot(path, t).map_err(|e| runtime::RuntimeError::Config(format!("{e:#}")))?;
        }
        if cli.stop_after_epoch == Some(m.epoch) {
            stop_for_epochs.store(true, Ordering::SeqCst);
        }
        Ok(())
    };
    let finished = trainer.run(&stop, &mut on_step, &mut on_epoch)?;
    if let Some(pb) = bar.take() {
        pb.finish_and_clear();
    }

    if !finished {
        if interrupted.load(Ordering::SeqCst) {
            if let Some(w) = &writer {
                if trainer.partial_epoch().is_some() {
                    let folder = w.write(&mut trainer)?;
                    say!("interrupted: checkpoint written to {}", folder.display());
                } else {
                    say!("interrupted after epoch {}", trainer.epoch());
                }
            } else {
                say!("interrupted (no --checkpoint-dir: nothing saved)");
            }
            std::process::exit(130);
        }
        say!("stopped after epoch {} as asked", trainer.epoch());
        return Ok(());
    }
    if lead {
        summary(&trainer, started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The MPI communicator of a `--distributed` run.
#[cfg(feature = "mpi")]
fn communicator(timeout_s: u64) -> Result<Box<dyn runtime::distributed::Communicator>> {
    let comm =
        runtime::distributed::MpiCommunicator::init(std::time::Duration::from_secs(timeout_s))?;
    Ok(Box::new(comm))
}

/// Without MPI support, `--distributed` is an error that says how to build with it.
#[cfg(not(feature = "mpi"))]
fn communicator(_timeout_s: u64) -> Result<Box<dyn runtime::distributed::Communicator>> {
    bail!(
        "--distributed needs a build with MPI: cargo build --release -p runtime --features mpi \
         (Debian: libopenmpi-dev, openmpi-bin and libclang-dev), then mpirun -np N \
         target/release/sparse-train --distributed ..."
    )
}

/// Fails unless `path` can be created and written (tried with a scratch file beside it, so
/// an existing file is left alone).
fn check_writable(path: &Path) -> Result<()> {
    let probe = scratch_path(path);
    std::fs::write(&probe, b"").with_context(|| format!("{} cannot be written", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A scratch file beside `path`: `path` with `.tmp` added to its name.
fn scratch_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path`'s contents at once (a scratch file renamed over it).
fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = scratch_path(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_plot(path: &Path, t: &Trainer) -> Result<()> {
    let c = t.config();
    let title = format!(
        "{} at density {} ({}, seed {})",
        c.model, c.density, c.dense_momentum, c.seed
    );
    replace_file(path, runtime::plot::svg(&title, t.history()).as_bytes())
}

fn summary(t: &Trainer, wall: f64) {
    let h = t.history();
    let Some(last) = h.last() else { return };
    let mut steps: Vec<f64> = h.iter().map(|m| m.step_ms_median).collect();
    let step_median = runtime::metrics::median_ms(&mut steps);
    let epoch_secs: f64 = h.iter().map(|m| m.epoch_seconds).sum::<f64>() / h.len() as f64;
    let compile: f64 = h.iter().map(|m| m.compile_ms).sum();
    println!("---");
    println!(
        "{} at density {}: test accuracy {}, validation {} after {} epochs",
        t.config().model,
        t.config().density,
        last.test_acc.map_or("-".into(), percent),
        last.val_acc.map_or("-".into(), percent),
        last.epoch
    );
    for l in &last.layers {
        let strategies: Vec<String> = l
            .strategies
            .iter()
            .map(|(op, s)| format!("{op}={s}"))
            .collect();
        println!(
            "  {:<6} nnz {:>7}  density {:>7.3}%  {}",
            l.name,
            l.nnz,
            l.density * 100.0,
            strategies.join(" ")
        );
    }
    println!(
        "  step median {:.3} ms, epoch mean {:.3} s, compilation {:.1} ms in total ({:.2}% of {:.1} s)",
        step_median,
        epoch_secs,
        compile,
        compile / 1e3 / wall.max(1e-9) * 100.0,
        wall
    );
    if let Some(d) = t.executor().device_stats() {
        let train: f64 = h.iter().map(|m| m.epoch_seconds).sum();
        println!(
            "  {} ({}): {} launches, kernels {:.2} s (device time), host<->device copies {:.2} s ({:.1}% of {:.1} s training; {:.0} MB up, {:.0} MB down), {} programs built in {:.0} ms",
            t.executor().device(),
            if t.device_resident() {
                "tensors stay on the device"
            } else {
                "operands copied per kernel"
            },
            d.launches,
            d.kernel.as_secs_f64(),
            d.transfer.as_secs_f64(),
            d.transfer.as_secs_f64() / train.max(1e-9) * 100.0,
            train,
            d.bytes_up as f64 / 1e6,
            d.bytes_down as f64 / 1e6,
            d.programs_built,
            d.build.as_secs_f64() * 1e3
        );
    }
}
