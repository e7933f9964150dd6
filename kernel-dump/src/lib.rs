//! `kernel-dump`: the tool a user opens to see, and trust, what sparsejit generates for a mask
//! — in the spirit of TACO's `-print-*` flags and Cranelift's `clif-util`.
//!
//! Input: `--mask FILE` (`.npy`; `.safetensors` with `--tensor NAME`; `.sir` with
//! `--pattern NAME` where it holds several), `--checkpoint PATH --layer NAME` (a checkpoint
//! folder, or a `--checkpoint-dir` meaning its latest), or `--random RxC --density D
//! [--seed S]`. A 4-D mask (`[out, in, k, k]`, or `--random OxCxKxK`) is a convolution: it
//! needs `--input HxW` (and takes `--stride S`, `--padding P`), and its ops are the
//! convolution ops. Choice: `--op`, `--batch` (repeatable), `--backend`, `--strategy`. Output:
//! repeatable `--emit ir|clif|vcode|asm|opencl|rust|plan|stats` (default `plan` and `stats`),
//! to stdout or one file per artefact under `--out DIR`; for a convolution, what has no
//! convolution code (the JIT's `clif`/`vcode`/`asm`, `rust`, OpenCL `table`/`unrolled`) says
//! so in one line.
//!
//! Limits: the pattern `--random` would draw and the operands `--emit plan` would time are
//! checked against the machine's memory budget ([`sparse_ir::limits`]) before anything is
//! allocated; over it is an error naming the flag, the bytes and the machine's memory.

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
use sparse_ir::limits::{bytes_of, MemoryBudget};
use sparse_ir::rust_emit::{emit_spmm, RustKernel};
use sparse_ir::text::Module;
use sparse_ir::{
    Args, BackendError, ConvGeometry, Dim, KernelSpec, Launch, Op, Pattern, Role, Strategy,
};

/// What to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Emit {
    /// The `.sir` text of the pattern and the kernels.
    Ir,
    /// Cranelift IR of every JIT function (convolutions: not `conv_dense_grad`, which has no
    /// pattern to bake in).
    Clif,
    /// Cranelift's listing of the final machine instructions (VCode).
    Vcode,
    /// x86-64 assembly of the JIT code.
    Asm,
    /// The emitted OpenCL C (convolutions: strategy `csr` only).
    Opencl,
    /// What `sparse_kernel!` expands to for this mask (matrices only).
    Rust,
    /// The planner's choice per op and batch, with predicted and measured times.
    Plan,
    /// Shape, nonzeros, empty rows/columns, row lengths, chunks, code bytes, compile time.
    Stats,
}

/// An op as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OpArg {
    /// Forward product (a 2-D mask).
    Spmm,
    /// Backward-data product (a 2-D mask).
    SpmmT,
    /// Weight gradient on the pattern (a 2-D mask).
    Sddmm,
    /// Dense weight gradient (a 2-D mask).
    DenseGrad,
    /// Forward convolution (a 4-D mask).
    Conv,
    /// Backward-data convolution (a 4-D mask).
    ConvT,
    /// Convolution weight gradient on the pattern (a 4-D mask).
    ConvGrad,
    /// Dense convolution weight gradient (a 4-D mask).
    ConvDenseGrad,
    /// Every op of the mask's kind (matrix or convolution).
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

/// Shows what sparsejit generates for a mask: a matrix (2-D `[out, in]`) or a convolution
/// (4-D `[out, in, k, k]`, with `--input HxW`).
#[derive(Debug, Parser)]
#[command(
    name = "kernel-dump",
    version,
    after_help = "Examples:
  kernel-dump --random 300x784 --density 0.05 --op spmm --emit plan
  kernel-dump --random 64x32x3x3 --density 0.1 --input 32x32 --padding 1 --op conv --emit ir --emit plan
  kernel-dump --mask conv1.npy --input 28x28 --stride 2 --op conv --emit opencl"
)]
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
    /// A random mask of this shape: `RxC` for a matrix (e.g. `300x784`), or `OxCxKxK` for a
    /// convolution's `[out, in, k, k]` weights (e.g. `64x32x3x3`; needs `--input`). Its
    /// expected size is checked against the machine's memory before it is drawn, in time
    /// proportional to its nonzeros.
    #[arg(long, requires = "density", value_name = "SHAPE")]
    pub random: Option<String>,
    /// Density of the random mask, in (0, 1].
    #[arg(long)]
    pub density: Option<f64>,
    /// Seed of the random mask.
    #[arg(long, default_value_t = 17)]
    pub seed: u64,
    /// The input of a convolution, `HxW` (height x width, e.g. `32x32`): required for a 4-D
    /// mask, refused for a 2-D one (a `.sir` pattern that a convolution kernel uses takes that
    /// kernel's geometry, which `--input`, `--stride` and `--padding` change).
    #[arg(long, value_name = "HxW")]
    pub input: Option<String>,
    /// The stride of a convolution, in both directions [default: 1].
    #[arg(long, value_name = "S", requires = "input")]
    pub stride: Option<usize>,
    /// The zero padding of a convolution, on every side [default: 0].
    #[arg(long, value_name = "P", requires = "input")]
    pub padding: Option<usize>,
    /// Which op: a matrix op for a 2-D mask, a convolution op for a 4-D one.
    #[arg(long, value_enum, default_value = "all")]
    pub op: OpArg,
    /// `spmm` or `conv` with a bias epilogue.
    #[arg(long)]
    pub bias: bool,
    /// `spmm` or `conv` with a ReLU epilogue.
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
    /// The mask's shape: `[rows, cols]` for a matrix, `[out, in, k, k]` for a convolution
    /// (whose pattern is `out × in·k·k`).
    pub shape: Vec<usize>,
    /// A convolution's geometry (the 4-D shape with `--input`, `--stride` and `--padding`);
    /// `None` for a matrix.
    pub geometry: Option<ConvGeometry>,
}

impl Input {
    /// Whether the mask is a convolution's.
    pub fn is_conv(&self) -> bool {
        self.geometry.is_some()
    }
}

/// Runs the command line: computes every artefact, then prints or writes them.
pub fn run(cli: &Cli) -> Result<()> {
    if let Some(warning) = sparse_ir::limits::threads_beyond_cores(cli.threads) {
        eprintln!("warning: {warning}: the plan would time threads waiting for each other");
    }
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

/// Reads the input the command line names; a 4-D mask gets its geometry from `--input`,
/// `--stride` and `--padding`.
pub fn load_input(cli: &Cli) -> Result<Input> {
    if let Some(path) = &cli.mask {
        return load_mask(path, cli);
    }
    if let Some(dir) = &cli.checkpoint {
        let layer = cli
            .layer
            .as_deref()
            .ok_or_else(|| anyhow!("--checkpoint needs --layer NAME"))?;
        return load_checkpoint_layer(dir, layer, cli);
    }
    if let Some(shape_text) = &cli.random {
        let shape = parse_shape(shape_text)?;
        let density = cli
            .density
            .ok_or_else(|| anyhow!("--random needs --density D"))?;
        if !(density > 0.0 && density <= 1.0) {
            bail!("--density {density} is outside (0, 1]");
        }
        let what = format!("--random {shape_text}");
        // `parse_shape` checked that `rows·cols` fits a `usize`; the size of the pattern and
        // the geometry are checked before anything is drawn.
        let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
        check_random_size(&what, rows, cols, density, &MemoryBudget::machine())?;
        let geometry = geometry_for(cli, &what, &shape, rows, cols, None)?;
        let pattern = Pattern::random(rows, cols, density, cli.seed)?;
        if pattern.nnz() == 0 {
            eprintln!(
                "warning: {what} at --density {density} drew no nonzero (expected {:.3}): every \
                 kernel of it does nothing",
                rows as f64 * cols as f64 * density
            );
        }
        return Ok(Input {
            layer: cli.layer.clone().unwrap_or_else(|| "random".into()),
            pattern: Arc::new(pattern),
            source: format!(
                "random {}, density {density}, seed {}",
                shape_string(&shape),
                cli.seed
            ),
            shape,
            geometry,
        });
    }
    bail!(
        "no input: give --mask FILE, --checkpoint PATH --layer NAME, or --random RxC (or \
         OxCxKxK with --input HxW) --density D"
    )
}

/// `300x784`, `8x4x3x3`.
fn shape_string(shape: &[usize]) -> String {
    shape
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("x")
}

/// Parses `--random`: `RxC` or `OxCxKxK`, every dimension at least 1, the number of entries
/// within a `usize` (what the pattern may hold is [`check_random_size`]'s).
fn parse_shape(shape: &str) -> Result<Vec<usize>> {
    let parts: Vec<&str> = shape.split('x').collect();
    if parts.len() != 2 && parts.len() != 4 {
        bail!(
            "--random {shape:?}: expected ROWSxCOLS (e.g. 300x784) or, for a convolution, \
             OUTxINxKxK (e.g. 64x32x3x3)"
        );
    }
    let dims = parts
        .iter()
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| anyhow!("--random {shape:?}: {s:?} is not a whole number"))
        })
        .collect::<Result<Vec<usize>>>()?;
    if dims.contains(&0) {
        bail!("--random {shape:?}: every dimension must be at least 1");
    }
    if dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_none()
    {
        bail!(
            "--random {shape:?}: the number of entries overflows {} bits",
            usize::BITS
        );
    }
    Ok(dims)
}

/// Checks, before anything is drawn, that a random `rows × cols` pattern at `density` (the
/// mask `what`) holds no more nonzeros than a pattern can (`u32::MAX`), and that the pattern
/// and what the ops derive from it fit `budget`: per expected nonzero its column index (4
/// bytes) and the transpose's row index and value position (8), per row and column their
/// pointers and counts (4 and 12 bytes).
pub fn check_random_size(
    what: &str,
    rows: usize,
    cols: usize,
    density: f64,
    budget: &MemoryBudget,
) -> Result<()> {
    let nnz = (density * rows as f64 * cols as f64).ceil();
    if nnz > u32::MAX as f64 {
        bail!(
            "{what} --density {density}: about {nnz:.0} nonzeros, more than the {} a pattern \
             holds",
            u32::MAX
        );
    }
    let bytes = bytes_of(&[nnz as usize], 12).and_then(|n| {
        n.checked_add(bytes_of(&[rows.checked_add(1)?], 4)?)?
            .checked_add(bytes_of(&[cols.checked_add(1)?], 12)?)
    });
    budget.check(
        &format!(
            "{what} --density {density}: the pattern (about {nnz:.0} nonzeros) and its transpose"
        ),
        bytes,
    )?;
    Ok(())
}

/// Parses `--input HxW`.
fn parse_input(text: &str) -> Result<(usize, usize)> {
    let parse = |s: &str| -> Result<usize> {
        s.trim()
            .parse::<usize>()
            .map_err(|_| anyhow!("--input {text:?}: {s:?} is not a whole number"))
    };
    match text.split_once('x') {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => bail!("--input {text:?}: expected HEIGHTxWIDTH, e.g. 32x32"),
    }
}

/// The geometry of the mask `what` of `shape` (a `rows × cols` pattern): `None` for a 2-D
/// mask (which refuses `--input`), else from the 4-D shape, or from the `.sir` kernel
/// `from_ir`, with `--input`, `--stride` and `--padding`; checked against the pattern.
fn geometry_for(
    cli: &Cli,
    what: &str,
    shape: &[usize],
    rows: usize,
    cols: usize,
    from_ir: Option<ConvGeometry>,
) -> Result<Option<ConvGeometry>> {
    let input = cli.input.as_deref().map(parse_input).transpose()?;
    let mut g = match (shape, from_ir) {
        (_, Some(g)) => g,
        (&[_, _], None) => {
            if let Some(text) = &cli.input {
                bail!(
                    "--input {text} is for a convolution, but {what} is a 2-D mask ({}): a \
                     convolution needs a 4-D [out, in, k, k] mask or --random OxCxKxK",
                    shape_string(shape)
                );
            }
            return Ok(None);
        }
        (&[_, in_channels, kh, kw], None) => {
            if kh != kw {
                bail!(
                    "{what} has shape {}: a convolution's window must be square (kh = kw), \
                     this one is {kh}x{kw}",
                    shape_string(shape)
                );
            }
            let (height, width) = input.ok_or_else(|| {
                anyhow!(
                    "{what} is a 4-D mask ({}), a convolution: give its input size with \
                     --input HxW (and --stride S, --padding P unless they are 1 and 0)",
                    shape_string(shape)
                )
            })?;
            ConvGeometry {
                in_channels,
                height,
                width,
                kernel: kh,
                stride: 1,
                padding: 0,
            }
        }
        _ => bail!(
            "{what} has shape {}: a mask is 2-D [out, in] or 4-D [out, in, k, k]",
            shape_string(shape)
        ),
    };
    if let Some((height, width)) = input {
        (g.height, g.width) = (height, width);
    }
    if let Some(stride) = cli.stride {
        g.stride = stride;
    }
    if let Some(padding) = cli.padding {
        g.padding = padding;
    }
    g.check(rows, cols).map_err(|problem| {
        anyhow!(
            "{what} with --input {}x{} --stride {} --padding {}: {problem}",
            g.height,
            g.width,
            g.stride,
            g.padding
        )
    })?;
    Ok(Some(g))
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
        // A pattern that a convolution kernel of the file uses is a convolution's: its
        // geometry is that kernel's, unless the command line changes it.
        let from_ir = module
            .kernels()
            .iter()
            .filter(|k| k.pattern_name() == name)
            .find_map(|k| k.spec().geometry().copied());
        let shape = match &from_ir {
            Some(g) => vec![pattern.rows(), g.in_channels, g.kernel, g.kernel],
            None => vec![pattern.rows(), pattern.cols()],
        };
        let what = format!("{} pattern {name}", path.display());
        let geometry = geometry_for(cli, &what, &shape, pattern.rows(), pattern.cols(), from_ir)?;
        return Ok(Input {
            layer: cli.layer.clone().unwrap_or_else(|| name.clone()),
            pattern,
            source: what,
            shape,
            geometry,
        });
    }
    let loaded = sparse_ir::mask_io::read_mask(path, cli.tensor.as_deref())?;
    let what = match &loaded.tensor {
        Some(t) => format!("{} tensor {t}", path.display()),
        None => path.display().to_string(),
    };
    let geometry = geometry_for(
        cli,
        &what,
        &loaded.shape,
        loaded.pattern.rows(),
        loaded.pattern.cols(),
        None,
    )?;
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
        shape: loaded.shape,
        geometry,
    })
}

/// Finds the checkpoint folder of `path` (a checkpoint folder, or a `--checkpoint-dir` meaning
/// the folder its `latest` pointer names) by the rule of
/// [`sparse_ir::mask_io::resolve_checkpoint`], which the runtime's resume uses too.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    Ok(sparse_ir::mask_io::resolve_checkpoint(path)?)
}

fn load_checkpoint_layer(path: &Path, layer: &str, cli: &Cli) -> Result<Input> {
    let folder = resolve_checkpoint(path)?;
    let file = folder.join(sparse_ir::mask_io::MODEL_FILE);
    let tensor = format!("{layer}.mask");
    let loaded = sparse_ir::mask_io::read_mask(&file, Some(&tensor))
        .map_err(|e| anyhow!("layer {layer}: {e}"))?;
    let geometry = geometry_for(
        cli,
        &format!("layer {layer}"),
        &loaded.shape,
        loaded.pattern.rows(),
        loaded.pattern.cols(),
        None,
    )?;
    Ok(Input {
        layer: sanitize_layer(layer),
        pattern: Arc::new(loaded.pattern),
        source: format!(
            "{} tensor {tensor} (shape {:?})",
            file.display(),
            loaded.shape
        ),
        shape: loaded.shape,
        geometry,
    })
}

/// The ops `--op` names for `input`: matrix ops for a 2-D mask, convolution ops for a 4-D one.
fn ops(cli: &Cli, input: &Input) -> Result<Vec<Op>> {
    let (bias, relu) = (cli.bias, cli.relu);
    let matrix = [Op::Spmm { bias, relu }, Op::SpmmT, Op::Sddmm, Op::DenseGrad];
    let conv = [
        Op::Conv { bias, relu },
        Op::ConvT,
        Op::ConvGrad,
        Op::ConvDenseGrad,
    ];
    let op = match cli.op {
        OpArg::All if input.is_conv() => return Ok(conv.to_vec()),
        OpArg::All => return Ok(matrix.to_vec()),
        OpArg::Spmm => matrix[0],
        OpArg::SpmmT => matrix[1],
        OpArg::Sddmm => matrix[2],
        OpArg::DenseGrad => matrix[3],
        OpArg::Conv => conv[0],
        OpArg::ConvT => conv[1],
        OpArg::ConvGrad => conv[2],
        OpArg::ConvDenseGrad => conv[3],
    };
    let names = |ops: &[Op]| {
        ops.iter()
            .map(|op| op.cli_name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (op.is_conv(), input.is_conv()) {
        (false, true) => bail!(
            "--op {} is a matrix op, but {} is a convolution ({}): use {} or all",
            op.cli_name(),
            input.layer,
            shape_string(&input.shape),
            names(&conv)
        ),
        (true, false) => bail!(
            "--op {} is a convolution op, but {} is a 2-D mask ({}): use {} or all (a \
             convolution needs a 4-D [out, in, k, k] mask and --input HxW)",
            op.cli_name(),
            input.layer,
            shape_string(&input.shape),
            names(&matrix)
        ),
        _ => Ok(vec![op]),
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
    for op in ops(cli, &input)? {
        for &batch in &cli.batches {
            let ld = ld_for(cli, batch)?;
            let spec = KernelSpec::with_geometry(
                &input.layer,
                op,
                input.pattern.clone(),
                input.geometry,
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

/// ` (input=CxHxW kernel=K stride=S padding=P)` for a convolution, else nothing.
fn geometry_suffix(spec: &KernelSpec) -> String {
    spec.geometry()
        .map(|g| format!(" ({g})"))
        .unwrap_or_default()
}

/// The geometry line of `plan` and `stats`: the geometry and the output's shape.
fn geometry_line(input: &Input) -> Option<String> {
    let g = input.geometry?;
    Some(format!(
        "convolution {g}: output {}x{}x{}, {} input features, {} output features",
        input.pattern.rows(),
        g.out_height(),
        g.out_width(),
        g.in_channels * g.in_positions(),
        input.pattern.rows() * g.out_positions()
    ))
}

/// What one error of a kernel that did not compile says: for a convolution that a strategy
/// cannot run, `not available for convolutions: <reason>`.
fn unavailable(spec: &KernelSpec, e: &anyhow::Error) -> String {
    match e.downcast_ref::<BackendError>() {
        Some(BackendError::Unsupported { reason, .. }) if spec.geometry().is_some() => {
            format!("not available for convolutions: {reason}")
        }
        _ => e.to_string(),
    }
}

/// Checks that the operands `--emit plan` allocates to time `spec` (its inputs, output,
/// values and bias, the dense gradient, a convolution's unfolded input) fit `budget`
/// together, before any of them is allocated.
pub fn check_operand_sizes(spec: &KernelSpec, budget: &MemoryBudget) -> Result<()> {
    let ld = match spec.ld() {
        Dim::Fixed(ld) => ld,
        Dim::Any => return Ok(()),
    };
    let p = spec.pattern();
    let input = spec.in_features().checked_mul(ld);
    let output = spec.out_features().checked_mul(ld);
    let dense = p.rows().checked_mul(p.cols());
    // The input, dY, values and bias, and one output buffer as large as the largest of the
    // output, the input and the dense gradient.
    let mut floats = [input, output, Some(p.nnz()), Some(p.rows())]
        .into_iter()
        .try_fold(0usize, |sum, n| sum.checked_add(n?))
        .and_then(|sum| sum.checked_add(input?.max(output?).max(dense?)));
    if let Some(g) = spec.geometry() {
        // The dense convolution's unfolded input: C·k² rows of OH·OW positions per column.
        let unfolded = p
            .cols()
            .checked_mul(g.out_positions())
            .and_then(|n| n.checked_mul(ld));
        floats = floats.and_then(|sum| sum.checked_add(unfolded?));
    }
    let what = format!(
        "--batch {} (ld {ld}): timing {}{} on a {}x{} pattern",
        spec.batch(),
        spec.op(),
        geometry_suffix(spec),
        p.rows(),
        p.cols()
    );
    budget
        .check(&what, floats.and_then(|n| bytes_of(&[n], 4)))
        .map_err(|e| anyhow!("{e}; use --no-measure, or a smaller --batch or input"))?;
    Ok(())
}

/// The `.sir` text: the pattern and one kernel line per op and batch.
pub fn ir_text(input: &Input, specs: &[KernelSpec]) -> Result<String> {
    let mut module = Module::new();
    module.add_pattern(&input.layer, input.pattern.clone())?;
    for spec in specs {
        match spec.geometry() {
            Some(&g) => module.add_conv_kernel(
                spec.layer(),
                spec.op(),
                &input.layer,
                g,
                spec.batch(),
                spec.ld(),
            )?,
            None => module.add_kernel(
                spec.layer(),
                spec.op(),
                &input.layer,
                spec.batch(),
                spec.ld(),
            )?,
        };
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
            Err(BackendError::Unsupported { reason, .. }) if spec.geometry().is_some() => {
                out.push(Artefact {
                    file,
                    text: format!(
                        ";; {}: not available for convolutions: {reason}\n",
                        spec.op()
                    ),
                });
                continue;
            }
            Err(BackendError::Unsupported { reason, .. }) => {
                out.push(Artefact {
                    file,
                    text: format!(";; no JIT code for {}: {reason}\n", spec.op()),
                });
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut text = format!(
            ";; layer {}, {}{}, batch {}, ld {}, pattern {}x{} nnz={} hash={:016x} ({})\n",
            spec.layer(),
            spec.op(),
            geometry_suffix(spec),
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
        let file = format!("{}.{}.cl", spec_tag(spec), strategy);
        match codegen_opencl::emit::emit(spec, strategy, &profile, &opts) {
            Ok(emitted) => out.push(Artefact {
                file,
                text: emitted.listing(),
            }),
            Err(BackendError::Unsupported { reason, .. }) if spec.geometry().is_some() => {
                out.push(Artefact {
                    file,
                    text: format!(
                        "// {} ({strategy}): not available for convolutions: {reason}\n",
                        spec.op()
                    ),
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// What `sparse_kernel!` expands to for this mask (spmm with the chosen epilogue, batch `any`);
/// for a convolution, a one-line note that it has none.
pub fn rust_artefact(input: &Input, cli: &Cli) -> Result<Artefact> {
    if input.is_conv() {
        return Ok(Artefact {
            file: format!("{}.rs", input.layer),
            text: "// not available for convolutions: sparse_kernel! emits matrix products \
                   (spmm) only\n"
                .into(),
        });
    }
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
    if let Some(line) = geometry_line(input) {
        let _ = writeln!(text, "{line}");
    }
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
            if !cli.no_measure {
                let budget = MemoryBudget::machine();
                for spec in specs {
                    check_operand_sizes(spec, &budget)?;
                }
            }
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
                                let _ =
                                    write!(text, " {strategy} n/a ({});", unavailable(spec, &e));
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
    if let Some(line) = geometry_line(input) {
        let _ = writeln!(text, "{line}");
    }
    let _ = writeln!(
        text,
        "rows {}  cols {}  nnz {}  density {:.4}",
        p.rows(),
        p.cols(),
        p.nnz(),
        p.density()
    );
    if let Some(g) = input.geometry {
        let live_out = p.row_counts().filter(|&c| c > 0).count();
        let mut live_in = vec![false; g.in_channels];
        for &c in p.col_idx() {
            live_in[c as usize / g.taps()] = true;
        }
        let _ = writeln!(
            text,
            "live output channels {live_out} of {}  live input channels {} of {}  \
             useful multiply-adds per batch column {}",
            p.rows(),
            live_in.iter().filter(|&&l| l).count(),
            g.in_channels,
            specs
                .first()
                .map_or(p.nnz() * g.out_positions(), |s| s.useful_fmas(1))
        );
    }
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
                    let _ = writeln!(
                        text,
                        "jit {} batch {}: {}",
                        spec.op(),
                        spec.batch(),
                        unavailable(spec, &e.into())
                    );
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
