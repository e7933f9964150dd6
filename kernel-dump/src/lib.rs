//! `kernel-dump`: the tool a user opens to see, and trust, what sparsejit generates for a mask
//! — in the spirit of TACO's `-print-*` flags and Cranelift's `clif-util`.
//!
//! Input: `--mask FILE` (`.npy`; `.safetensors` with `--tensor NAME`; `.sir` with
//! `--pattern NAME` where it holds several), `--checkpoint PATH --layer NAME` (a checkpoint
//! folder, or a `--checkpoint-dir` meaning its latest), or `--random RxC --density D
//! [--seed S]`. Choice: `--op`, `--batch` (repeatable), `--backend`, `--strategy`. Output:
//! repeatable `--emit ir|clif|vcode|asm|opencl|rust|plan|stats` (default `plan` and `stats`),
//! to stdout or one file per artefact under `--out DIR`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use codegen_cpu::jit::{JitKernel, JitOptions};
use codegen_cpu::{CpuBackend, CpuOptions, PlanTiming};
use codegen_opencl::{DeviceProfile, EmitOptions, KernelLifetime};
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::rust_emit::{emit_spmm, RustKernel};
use sparse_ir::text::Module;
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern, Role, Strategy};

/// What to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Emit {
    /// The `.sir` text of the pattern and the kernels.
    Ir,
    /// Cranelift IR of every JIT function.
    Clif,
    /// Cranelift's listing of the final machine instructions (VCode).
    Vcode,
    /// x86-64 assembly of the JIT code.
    Asm,
    /// The emitted OpenCL C.
    Opencl,
    /// What `sparse_kernel!` expands to for this mask.
    Rust,
    /// The planner's choice per op and batch, with predicted and measured times.
    Plan,
    /// Shape, nonzeros, empty rows/columns, row lengths, chunks, code bytes, compile time.
    Stats,
}

/// An op as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OpArg {
    /// Forward product.
    Spmm,
    /// Backward-data product.
    SpmmT,
    /// Weight gradient on the pattern.
    Sddmm,
    /// Dense weight gradient.
    DenseGrad,
    /// Every op.
    All,
}

/// The backend whose code to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The CPU backend (JIT, generic, dense).
    Cpu,
    /// The OpenCL emitters (no OpenCL platform needed).
    Opencl,
}

/// The device an OpenCL dump is emitted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// PoCL on a CPU.
    Pocl,
    /// An NVIDIA GPU.
    Nvidia,
}

/// Shows what sparsejit generates for a mask.
#[derive(Debug, Parser)]
#[command(name = "kernel-dump", version)]
pub struct Cli {
    /// A mask file: `.npy`, `.safetensors` (with `--tensor`) or `.sir` (with `--pattern`).
    #[arg(long, conflicts_with_all = ["checkpoint", "random"])]
    pub mask: Option<PathBuf>,
    /// The tensor of a safetensors mask file.
    #[arg(long)]
    pub tensor: Option<String>,
    /// The pattern of a `.sir` file holding several.
    #[arg(long)]
    pub pattern: Option<String>,
    /// A checkpoint folder (or a checkpoint directory, meaning its latest); needs `--layer`.
    #[arg(long, requires = "layer", conflicts_with = "random")]
    pub checkpoint: Option<PathBuf>,
    /// The layer of the checkpoint; also the layer name used in dumps.
    #[arg(long)]
    pub layer: Option<String>,
    /// A random mask of this shape, e.g. `300x784`.
    #[arg(long, requires = "density")]
    pub random: Option<String>,
    /// Density of the random mask, in (0, 1].
    #[arg(long)]
    pub density: Option<f64>,
    /// Seed of the random mask.
    #[arg(long, default_value_t = 17)]
    pub seed: u64,
    /// Which op.
    #[arg(long, value_enum, default_value = "all")]
    pub op: OpArg,
    /// `spmm` with a bias epilogue.
    #[arg(long)]
    pub bias: bool,
    /// `spmm` with a ReLU epilogue.
    #[arg(long)]
    pub relu: bool,
    /// `--emit rust`: also emit the fused multiply-add version (`sparse_kernel!`'s `fma = true`).
    #[arg(long)]
    pub fma: bool,
    /// Batch size (repeatable).
    #[arg(long = "batch", default_values_t = [100])]
    pub batches: Vec<usize>,
    /// Row stride; default: the batch rounded up to 16 floats, as the runtime pads it.
    #[arg(long)]
    pub ld: Option<usize>,
    /// Which backend.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendArg,
    /// Which strategy: `auto` (the planner), or `jit|generic|dense` (cpu), `csr|table|unrolled` (opencl).
    #[arg(long, default_value = "auto")]
    pub strategy: Strategy,
    /// The device OpenCL code is emitted for.
    #[arg(long, value_enum, default_value = "pocl")]
    pub device: DeviceArg,
    /// What to print (repeatable); default `plan` and `stats`.
    #[arg(long = "emit", value_enum)]
    pub emit: Vec<Emit>,
    /// Write one file per artefact here instead of printing.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Don't time anything in `plan`: the planner's choice from its cost model alone (no
    /// confirmation by timing), and no measured line.
    #[arg(long)]
    pub no_measure: bool,
    /// Threads of the CPU backend whose plan `plan` shows (the training loop's default is 2).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// One piece of output: a file name (under `--out`) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artefact {
    /// File name under `--out`, e.g. `fc1.spmm.b100.clif`.
    pub file: String,
    /// The text.
    pub text: String,
}

/// The mask to dump and the layer name it goes by.
#[derive(Debug, Clone)]
pub struct Input {
    /// Layer name (for specs, comments and file names).
    pub layer: String,
    /// The pattern.
    pub pattern: Arc<Pattern>,
    /// Where it came from, in words.
    pub source: String,
}

/// Runs the command line: computes every artefact, then prints or writes them.
pub fn run(cli: &Cli) -> Result<()> {
    let artefacts = artefacts(cli)?;
    match &cli.out {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for a in &artefacts {
                let path = dir.join(&a.file);
                std::fs::write(&path, &a.text)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
        None => {
            for a in &artefacts {
                println!(";; ===== {} =====", a.file);
                print!("{}", a.text);
                if !a.text.ends_with('\n') {
                    println!();
                }
            }
        }
    }
    Ok(())
}

/// Reads the input the command line names.
pub fn load_input(cli: &Cli) -> Result<Input> {
    if let Some(path) = &cli.mask {
        return load_mask(path, cli);
    }
    if let Some(dir) = &cli.checkpoint {
        let layer = cli
            .layer
            .as_deref()
            .ok_or_else(|| anyhow!("--checkpoint needs --layer NAME"))?;
        return load_checkpoint_layer(dir, layer);
    }
    if let Some(shape) = &cli.random {
        let (rows, cols) = parse_shape(shape)?;
        let density = cli
            .density
            .ok_or_else(|| anyhow!("--random needs --density D"))?;
        if !(density > 0.0 && density <= 1.0) {
            bail!("--density {density} is outside (0, 1]");
        }
        let pattern = Pattern::random(rows, cols, density, cli.seed)?;
        return Ok(Input {
            layer: cli.layer.clone().unwrap_or_else(|| "random".into()),
            pattern: Arc::new(pattern),
            source: format!("random {rows}x{cols}, density {density}, seed {}", cli.seed),
        });
    }
    bail!("no input: give --mask FILE, --checkpoint PATH --layer NAME, or --random RxC --density D")
}

fn parse_shape(shape: &str) -> Result<(usize, usize)> {
    let (r, c) = shape
        .split_once('x')
        .ok_or_else(|| anyhow!("--random {shape:?}: expected ROWSxCOLS, e.g. 300x784"))?;
    let parse = |s: &str| -> Result<usize> {
        s.trim()
            .parse::<usize>()
            .map_err(|_| anyhow!("--random {shape:?}: {s:?} is not a whole number"))
    };
    let (rows, cols) = (parse(r)?, parse(c)?);
    if rows == 0 || cols == 0 {
        bail!("--random {shape:?}: rows and columns must be at least 1");
    }
    Ok((rows, cols))
}

fn sanitize_layer(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        s.insert(0, '_');
    }
    s
}

fn load_mask(path: &Path, cli: &Cli) -> Result<Input> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "sir" {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let module: Module =
            sparse_ir::text::parse(&text).map_err(|e| anyhow!("{}:{e}", path.display()))?;
        let names: Vec<&str> = module.patterns().map(|(n, _)| n).collect();
        let name = match (&cli.pattern, names.as_slice()) {
            (Some(n), _) => n.clone(),
            (None, [one]) => one.to_string(),
            (None, []) => bail!("{}: holds no pattern", path.display()),
            (None, many) => bail!(
                "{}: holds {} patterns ({}); choose one with --pattern NAME",
                path.display(),
                many.len(),
                many.join(", ")
            ),
        };
        let pattern = module.pattern(&name).cloned().ok_or_else(|| {
            anyhow!(
                "{}: no pattern {name:?}; it holds: {}",
                path.display(),
                names.join(", ")
            )
        })?;
        return Ok(Input {
            layer: cli.layer.clone().unwrap_or_else(|| name.clone()),
            pattern,
            source: format!("{} pattern {name}", path.display()),
        });
    }
    let loaded = sparse_ir::mask_io::read_mask(path, cli.tensor.as_deref())?;
    let default_layer = cli
        .tensor
        .as_deref()
        .map(|t| t.strip_suffix(".mask").unwrap_or(t).to_string())
        .or_else(|| {
            path.file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "mask".into());
    Ok(Input {
        layer: cli
            .layer
            .clone()
            .unwrap_or_else(|| sanitize_layer(&default_layer)),
        pattern: Arc::new(loaded.pattern),
        source: format!("{} (shape {:?})", path.display(), loaded.shape),
    })
}

/// Finds the checkpoint folder of `path` (a checkpoint folder, or a `--checkpoint-dir` meaning
/// the folder its `latest` pointer names) by the rule of
/// [`sparse_ir::mask_io::resolve_checkpoint`], which the runtime's resume uses too.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    Ok(sparse_ir::mask_io::resolve_checkpoint(path)?)
}

fn load_checkpoint_layer(path: &Path, layer: &str) -> Result<Input> {
    let folder = resolve_checkpoint(path)?;
    let file = folder.join(sparse_ir::mask_io::MODEL_FILE);
    let tensor = format!("{layer}.mask");
    let loaded = sparse_ir::mask_io::read_mask(&file, Some(&tensor))
        .map_err(|e| anyhow!("layer {layer}: {e}"))?;
    Ok(Input {
        layer: sanitize_layer(layer),
        pattern: Arc::new(loaded.pattern),
        source: format!(
            "{} tensor {tensor} (shape {:?})",
            file.display(),
            loaded.shape
        ),
    })
}

fn ops(cli: &Cli) -> Vec<Op> {
    let spmm = Op::Spmm {
        bias: cli.bias,
        relu: cli.relu,
    };
    match cli.op {
        OpArg::Spmm => vec![spmm],
        OpArg::SpmmT => vec![Op::SpmmT],
        OpArg::Sddmm => vec![Op::Sddmm],
        OpArg::DenseGrad => vec![Op::DenseGrad],
        OpArg::All => vec![spmm, Op::SpmmT, Op::Sddmm, Op::DenseGrad],
    }
}

fn ld_for(cli: &Cli, batch: usize) -> Result<usize> {
    match cli.ld {
        Some(ld) if ld < batch => bail!("--ld {ld} is smaller than --batch {batch}"),
        Some(ld) => Ok(ld),
        None => Ok(batch.div_ceil(16) * 16),
    }
}

/// Computes every artefact the command line asks for.
pub fn artefacts(cli: &Cli) -> Result<Vec<Artefact>> {
    let input = load_input(cli)?;
    let mut emits = cli.emit.clone();
    if emits.is_empty() {
        emits = vec![Emit::Plan, Emit::Stats];
    }
    emits.sort();
    emits.dedup();
    for &b in &cli.batches {
        if b == 0 {
            bail!("--batch must be at least 1");
        }
    }
    let cpu_only = [Strategy::Jit, Strategy::Generic, Strategy::Dense];
    let cl_only = [Strategy::Csr, Strategy::Table, Strategy::Unrolled];
    match cli.backend {
        BackendArg::Cpu if cl_only.contains(&cli.strategy) => {
            bail!(
                "strategy {} belongs to the opencl backend (cpu: auto, jit, generic, dense)",
                cli.strategy
            )
        }
        BackendArg::Opencl if cpu_only.contains(&cli.strategy) => {
            bail!(
                "strategy {} belongs to the cpu backend (opencl: auto, csr, table, unrolled)",
                cli.strategy
            )
        }
        _ => {}
    }
    let mut specs = Vec::new();
    for op in ops(cli) {
        for &batch in &cli.batches {
            let ld = ld_for(cli, batch)?;
            let spec = KernelSpec::new(
                &input.layer,
                op,
                input.pattern.clone(),
                Dim::Fixed(batch),
                Dim::Fixed(ld),
            )
            .map_err(|e| anyhow!("{e}"))?;
            specs.push(spec);
        }
    }
    let mut out = Vec::new();
    for emit in emits {
        match emit {
            Emit::Ir => out.push(Artefact {
                file: format!("{}.sir", input.layer),
                text: ir_text(&input, &specs)?,
            }),
            Emit::Clif | Emit::Vcode | Emit::Asm => {
                out.extend(jit_artefacts(&input, &specs, emit)?)
            }
            Emit::Opencl => out.extend(opencl_artefacts(cli, &input, &specs)?),
            Emit::Rust => out.push(rust_artefact(&input, cli)?),
            Emit::Plan => out.push(Artefact {
                file: format!("{}.plan.txt", input.layer),
                text: plan_text(cli, &input, &specs)?,
            }),
            Emit::Stats => out.push(Artefact {
                file: format!("{}.stats.txt", input.layer),
                text: stats_text(cli, &input, &specs)?,
            }),
        }
    }
    Ok(out)
}

fn spec_tag(spec: &KernelSpec) -> String {
    format!("{}.{}.b{}", spec.layer(), spec.op().name(), spec.batch())
}

/// The `.sir` text: the pattern and one kernel line per op and batch.
pub fn ir_text(input: &Input, specs: &[KernelSpec]) -> Result<String> {
    let mut module = Module::new();
    module.add_pattern(&input.layer, input.pattern.clone())?;
    for spec in specs {
        module.add_kernel(
            spec.layer(),
            spec.op(),
            &input.layer,
            spec.batch(),
            spec.ld(),
        )?;
    }
    Ok(sparse_ir::text::print(&module))
}

fn jit_artefacts(input: &Input, specs: &[KernelSpec], emit: Emit) -> Result<Vec<Artefact>> {
    let mut out = Vec::new();
    let options = JitOptions {
        capture_clif: emit == Emit::Clif,
        capture_disasm: emit != Emit::Clif,
        use_cache: false,
        ..JitOptions::default()
    };
    let ext = match emit {
        Emit::Clif => "clif",
        Emit::Vcode => "vcode",
        _ => "s",
    };
    for spec in specs {
        let file = format!("{}.{ext}", spec_tag(spec));
        let kernel = match JitKernel::compile_with(spec, &options) {
            Ok(k) => k,
            Err(sparse_ir::BackendError::Unsupported { reason, .. }) => {
                out.push(Artefact {
                    file,
                    text: format!(";; no JIT code for {}: {reason}\n", spec.op()),
                });
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut text = format!(
            ";; layer {}, {}, batch {}, ld {}, pattern {}x{} nnz={} hash={:016x} ({})\n",
            spec.layer(),
            spec.op(),
            spec.batch(),
            spec.ld(),
            input.pattern.rows(),
            input.pattern.cols(),
            input.pattern.nnz(),
            input.pattern.hash(),
            input.source
        );
        for f in kernel.functions() {
            let _ = writeln!(
                text,
                ";; function {}: rows {:?}, nonzeros {:?}, {} code bytes",
                f.index, f.rows, f.nnz, f.code_bytes
            );
            let body = match emit {
                Emit::Clif => f.clif,
                Emit::Vcode => f.vcode,
                _ => f.disasm,
            };
            text.push_str(body.unwrap_or(";; (not captured)\n"));
            if !text.ends_with('\n') {
                text.push('\n');
            }
        }
        out.push(Artefact { file, text });
    }
    Ok(out)
}

fn cl_profile(cli: &Cli) -> DeviceProfile {
    match cli.device {
        DeviceArg::Pocl => DeviceProfile::pocl_cpu(),
        DeviceArg::Nvidia => DeviceProfile::nvidia_gpu(),
    }
}

fn opencl_artefacts(cli: &Cli, _input: &Input, specs: &[KernelSpec]) -> Result<Vec<Artefact>> {
    let profile = cl_profile(cli);
    let opts = EmitOptions::default();
    let mut out = Vec::new();
    for spec in specs {
        let strategy = match cli.strategy {
            Strategy::Csr | Strategy::Table | Strategy::Unrolled => cli.strategy,
            _ => {
                codegen_opencl::plan::plan(spec, &profile, &opts, KernelLifetime::Lasting).strategy
            }
        };
        let emitted = codegen_opencl::emit::emit(spec, strategy, &profile, &opts)?;
        out.push(Artefact {
            file: format!("{}.{}.cl", spec_tag(spec), strategy),
            text: emitted.listing(),
        });
    }
    Ok(out)
}

/// What `sparse_kernel!` expands to for this mask (spmm with the chosen epilogue, batch `any`).
pub fn rust_artefact(input: &Input, cli: &Cli) -> Result<Artefact> {
    let name = input.layer.replace(['-', '.'], "_");
    let batch = match cli.batches.as_slice() {
        [one] => Some(*one),
        _ => None,
    };
    let tokens = emit_spmm(&RustKernel {
        name: &name,
        pattern: &input.pattern,
        bias: cli.bias,
        relu: cli.relu,
        batch,
        values: None,
        fma: cli.fma,
    })?;
    let file: syn::File = syn::parse2(tokens).context("the generated Rust does not parse")?;
    Ok(Artefact {
        file: format!("{}.rs", input.layer),
        text: prettyplease::unparse(&file),
    })
}

fn plan_text(cli: &Cli, input: &Input, specs: &[KernelSpec]) -> Result<String> {
    let mut text = format!("layer {} ({})\n", input.layer, input.source);
    match cli.backend {
        BackendArg::Opencl => {
            let profile = cl_profile(cli);
            for spec in specs {
                let plan = codegen_opencl::plan::plan(
                    spec,
                    &profile,
                    &EmitOptions::default(),
                    KernelLifetime::Lasting,
                );
                let _ = writeln!(
                    text,
                    "{} batch {}: {} ({})",
                    spec.op(),
                    spec.batch(),
                    plan.strategy,
                    plan.reason
                );
            }
        }
        BackendArg::Cpu => {
            let mut backend = CpuBackend::new(CpuOptions {
                threads: cli.threads.max(1),
                isa: None,
            })?;
            if cli.no_measure {
                // Predictions only: the planner does not time close candidates either.
                backend.set_plan_timing(PlanTiming::Off);
            }
            let _ = writeln!(text, "backend cpu, {}", backend.device());
            for spec in specs {
                let plan = backend
                    .plan(spec)
                    .with_context(|| format!("planning {} batch {}", spec.op(), spec.batch()))?;
                let _ = writeln!(
                    text,
                    "\n{} batch {} ld {}: {plan}",
                    spec.op(),
                    spec.batch(),
                    spec.ld()
                );
                if cli.strategy != Strategy::Auto {
                    let _ = writeln!(
                        text,
                        "  (--strategy {} overrides the planner)",
                        cli.strategy
                    );
                }
                if !cli.no_measure {
                    let _ = write!(text, "  measured (every strategy, median of 21 runs):");
                    for strategy in [Strategy::Generic, Strategy::Dense, Strategy::Jit] {
                        match measure(&backend, spec, strategy) {
                            Ok(us) => {
                                let _ = write!(text, " {strategy} {us:.2} µs;");
                            }
                            Err(e) => {
                                let _ = write!(text, " {strategy} n/a ({e});");
                            }
                        }
                    }
                    text.push('\n');
                    if cfg!(debug_assertions) {
                        let _ = writeln!(
                            text,
                            "  (a debug build: the generic and dense kernels run without full \
                             optimisation, the JIT code does not; build with --release for \
                             representative times)"
                        );
                    }
                }
            }
        }
    }
    Ok(text)
}

/// The median time of one run of `spec` with `strategy`, over 21 runs after a warm-up.
fn measure(backend: &CpuBackend, spec: &KernelSpec, strategy: Strategy) -> Result<f64> {
    let kernel = backend.compile(spec, strategy)?;
    let p = spec.pattern();
    let (batch, ld) = match (spec.batch(), spec.ld()) {
        (Dim::Fixed(b), Dim::Fixed(l)) => (b, l),
        _ => bail!("needs a fixed batch and ld"),
    };
    let launch = Launch::new(batch, ld);
    let values = vec![0.5f32; p.nnz()];
    let (x_len, y_len) = (spec.in_features() * ld, spec.out_features() * ld);
    let x = vec![0.25f32; x_len];
    let dy = vec![0.125f32; y_len];
    let bias = vec![0.0f32; p.rows()];
    let mut out = vec![0.0f32; (p.rows() * p.cols()).max(y_len).max(x_len)];
    let mut once = || -> Result<()> {
        let args: Args<'_, [f32]> = match spec.op().role() {
            Role::Forward => Args::Spmm {
                values: &values[..],
                x: &x[..],
                bias: spec.op().has_bias().then_some(&bias[..]),
                y: &mut out[..y_len],
            },
            Role::BackwardData => Args::SpmmT {
                values: &values[..],
                dy: &dy[..],
                dx: &mut out[..x_len],
            },
            Role::WeightGrad => Args::Sddmm {
                dy: &dy[..],
                x: &x[..],
                dw: &mut out[..p.nnz()],
            },
            Role::DenseGrad => Args::DenseGrad {
                dy: &dy[..],
                x: &x[..],
                grad: &mut out[..p.rows() * p.cols()],
            },
        };
        kernel.run(launch, args)?;
        Ok(())
    };
    once()?;
    let mut samples = Vec::with_capacity(21);
    for _ in 0..21 {
        let t = Instant::now();
        once()?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// Pattern statistics, and per op the JIT code size and compile time.
pub fn stats_text(cli: &Cli, input: &Input, specs: &[KernelSpec]) -> Result<String> {
    let p = &input.pattern;
    let mut text = String::new();
    let _ = writeln!(text, "layer {} ({})", input.layer, input.source);
    let _ = writeln!(
        text,
        "rows {}  cols {}  nnz {}  density {:.4}",
        p.rows(),
        p.cols(),
        p.nnz(),
        p.density()
    );
    let counts: Vec<usize> = p.row_counts().collect();
    let empty_rows = counts.iter().filter(|&&c| c == 0).count();
    let empty_cols = p.col_counts().iter().filter(|&&c| c == 0).count();
    let _ = writeln!(text, "empty rows {empty_rows}  empty columns {empty_cols}");
    let max = counts.iter().copied().max().unwrap_or(0);
    let _ = writeln!(
        text,
        "row length: min {}  max {max}  mean {:.2}",
        counts.iter().copied().min().unwrap_or(0),
        p.nnz() as f64 / p.rows().max(1) as f64
    );
    let _ = writeln!(text, "row-length histogram:");
    let mut lo = 0usize;
    let mut hi = 0usize;
    while lo <= max {
        let n = counts.iter().filter(|&&c| c >= lo && c <= hi).count();
        if n > 0 {
            let label = if lo == hi {
                format!("{lo}")
            } else {
                format!("{lo}-{hi}")
            };
            let _ = writeln!(text, "  {label:>11}: {n}");
        }
        lo = hi + 1;
        hi = (hi + 1) * 2 - 1;
    }
    let chunks = p.chunks(JitOptions::default().chunk_nnz);
    let _ = writeln!(
        text,
        "chunks of ~{} nonzeros: {}",
        JitOptions::default().chunk_nnz,
        chunks.len()
    );
    if cli.backend == BackendArg::Cpu {
        for spec in specs {
            let options = JitOptions {
                use_cache: false,
                ..JitOptions::default()
            };
            match JitKernel::compile_with(spec, &options) {
                Ok(k) => {
                    let s = k.stats();
                    let _ = writeln!(
                        text,
                        "jit {} batch {}: {} functions, {} code bytes, compiled in {:.2} ms ({:.2} µs/nnz, {} thread(s))",
                        spec.op(),
                        spec.batch(),
                        s.functions,
                        s.code_bytes,
                        s.compile_ms,
                        s.us_per_compiled_nnz(),
                        s.threads
                    );
                }
                Err(e) => {
                    let _ = writeln!(text, "jit {} batch {}: {e}", spec.op(), spec.batch());
                }
            }
        }
    } else {
        let profile = cl_profile(cli);
        for spec in specs {
            let plan = codegen_opencl::plan::plan(
                spec,
                &profile,
                &EmitOptions::default(),
                KernelLifetime::Lasting,
            );
            let emitted =
                codegen_opencl::emit::emit(spec, plan.strategy, &profile, &EmitOptions::default())?;
            let _ = writeln!(
                text,
                "opencl {} batch {}: {} ({} programs, {} kernels, {} source bytes)",
                spec.op(),
                spec.batch(),
                plan.strategy,
                emitted.programs.len(),
                emitted.kernels().count(),
                emitted.source_bytes()
            );
        }
    }
    Ok(text)
}
