//! `emit-shapes`: compares shapes of the code `sparse_kernel!` generates
//! (`sparse_ir::rust_emit::CodeShape`) by what they cost and what they give.
//!
//! For each shape it writes one standalone program holding the generated modules of the two
//! random 5 % benchmark masks (`model/bench/fc1_300x784_5pct.npy`, 11,734 nonzeros, and
//! `fc2_100x300_5pct.npy`, 1,472), compiles it with `rustc` as `cargo build --release` would
//! (`-C opt-level=3 -C codegen-units=16 -C debuginfo=line-tables-only`, one `rustc` at a
//! time), reports the wall time of that `rustc`, then runs the program, which checks each
//! kernel against a plain f64 loop and prints the median time per call at batch 1 (ld 1 and
//! 16) and batch 100 (ld 100 and 112): the median and the 10th percentile of short samples
//! (the steadier figure on a loaded machine). `rustc`'s user+sys time is given beside its
//! wall time for the same reason. The macro's own speed against the JIT and the generic
//! kernel is `macro-bench`; this tool only ranks shapes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;
use sparse_ir::rust_emit::{emit_spmm_with, CodeShape, RustKernel};

/// Compile time and speed of generated-code shapes.
#[derive(Parser)]
struct Cli {
    /// Shapes to try, each `block:unroll:accumulators:nnz_per_function:interleave:barrier`
    /// (e.g. `16:1:4:256:1:1`; unroll 0 runs batch 1 through the table loop).
    #[arg(long, value_delimiter = ',', default_value = "16:1:2:64:1:1")]
    shapes: Vec<String>,
    /// Directory for the generated programs.
    #[arg(long, default_value = "target/emit-shapes")]
    dir: PathBuf,
    /// Extra `rustc` flags (e.g. `-C target-cpu=native`), space separated.
    #[arg(long, default_value = "")]
    rustc_flags: String,
    /// Generate the kernels with `fma = true` (its fused version runs when `--rustc-flags`
    /// enable the `fma` target feature, e.g. `-C target-feature=+fma`).
    #[arg(long)]
    fma: bool,
    /// Milliseconds per timed case.
    #[arg(long, default_value_t = 600)]
    budget_ms: u64,
    /// Only generate and compile (no run).
    #[arg(long)]
    compile_only: bool,
}

fn parse_shape(s: &str) -> Result<CodeShape> {
    let parts: Vec<&str> = s.split(':').collect();
    let [block, unroll, acc, per_fn, interleave, barrier] = parts[..] else {
        bail!(
            "shape {s:?}: expected block:unroll:accumulators:nnz_per_function:interleave:barrier"
        );
    };
    Ok(CodeShape {
        block: block.parse().context("block")?,
        unroll_batch1: unroll == "1",
        accumulators: acc.parse().context("accumulators")?,
        // with `--fma`, the chains of the fused version too
        fused_accumulators: acc.parse().context("accumulators")?,
        nnz_per_function: per_fn.parse().context("nnz_per_function")?,
        interleave: interleave.parse().context("interleave")?,
        barrier: barrier == "1",
    })
}

const MAIN: &str = r#"
fn reference(rows: usize, rp: &[u32], ci: &[u32], v: &[f32], x: &[f32], batch: usize, ld: usize) -> Vec<f64> {
    let mut y = vec![0.0f64; rows * ld];
    for r in 0..rows {
        for k in rp[r] as usize..rp[r + 1] as usize {
            for b in 0..batch {
                y[r * ld + b] += v[k] as f64 * x[ci[k] as usize * ld + b] as f64;
            }
        }
    }
    y
}

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 }).collect()
}

/// Median and 10th percentile of the time per call over short samples (~200 µs each): on a
/// loaded machine most short samples still run undisturbed, so the low percentile is the
/// steadier figure.
fn time(budget: std::time::Duration, mut f: impl FnMut()) -> (f64, f64) {
    let mut reps = 1u64;
    loop {
        let t = std::time::Instant::now();
        for _ in 0..reps { f(); }
        if t.elapsed() > std::time::Duration::from_micros(200) { break; }
        reps *= 2;
    }
    let mut samples = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < budget || samples.len() < 21 {
        let t = std::time::Instant::now();
        for _ in 0..reps { f(); }
        samples.push(t.elapsed().as_secs_f64() * 1e6 / reps as f64);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (samples[samples.len() / 2], samples[samples.len() / 10])
}

macro_rules! case {
    ($m:ident, $label:expr, $budget:expr) => {{
        let v = rand_vec($m::NNZ, 1);
        for (batch, ld) in [(1usize, 1usize), (1, 16), (100, 100), (100, 112)] {
            let x = rand_vec($m::COLS * ld, 7);
            let mut y = vec![0.0f32; $m::ROWS * ld];
            $m::run(&v, &x, &mut y, batch, ld).unwrap();
            let want = reference($m::ROWS, &$m::ROW_PTR, &$m::COL_IDX, &v, &x, batch, ld);
            for r in 0..$m::ROWS { for b in 0..batch {
                let (g, w) = (y[r * ld + b] as f64, want[r * ld + b]);
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{} row {r} col {b}: {g} vs {w}", $label);
            } }
            let (med, p10) = time($budget, || { $m::run(std::hint::black_box(&v), std::hint::black_box(&x), &mut y, batch, ld).unwrap(); });
            println!("{:<8} b={:<3} ld={:<3} median {:>9.3} us  p10 {:>9.3} us", $label, batch, ld, med, p10);
        }
    }};
}

fn main() {
    let budget = std::time::Duration::from_millis(BUDGET_MS);
    case!(fc1, "300x784", budget);
    case!(fc2, "100x300", budget);
}
"#;

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let masks = [
        ("fc1", root.join("model/bench/fc1_300x784_5pct.npy")),
        ("fc2", root.join("model/bench/fc2_100x300_5pct.npy")),
    ];
    let patterns = masks
        .iter()
        .map(|(name, path)| {
            sparse_ir::mask_io::read_mask(path, None)
                .map(|m| (*name, m.pattern))
                .with_context(|| format!("reading {}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let nnz: usize = patterns.iter().map(|(_, p)| p.nnz()).sum();
    std::fs::create_dir_all(&cli.dir)?;
    for text in &cli.shapes {
        let shape = parse_shape(text)?;
        let mut src = String::new();
        for (name, pattern) in &patterns {
            let tokens = emit_spmm_with(
                &RustKernel {
                    name,
                    pattern,
                    bias: false,
                    relu: false,
                    batch: None,
                    values: None,
                    fma: cli.fma,
                },
                &shape,
            )?;
            writeln!(src, "{tokens}")?;
        }
        write!(src, "const BUDGET_MS: u64 = {};\n{MAIN}", cli.budget_ms)?;
        let tag = text.replace(':', "-");
        let file = cli.dir.join(format!("shape-{tag}.rs"));
        let exe = cli.dir.join(format!("shape-{tag}"));
        std::fs::write(&file, &src)?;
        let mut cmd = Command::new("/usr/bin/time");
        cmd.args(["-f", "%e %U %S", "rustc"])
            .args([
                "--edition",
                "2021",
                "-C",
                "opt-level=3",
                "-C",
                "codegen-units=16",
            ])
            .args(["-C", "debuginfo=line-tables-only", "-o"])
            .arg(&exe)
            .arg(&file)
            .args(cli.rustc_flags.split_whitespace());
        let out = cmd.output().context("running /usr/bin/time rustc")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("rustc failed on {}: {stderr}", file.display());
        }
        let times: Vec<f64> = stderr
            .lines()
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        let [wall, user, sys] = times[..] else {
            bail!("unexpected output of /usr/bin/time: {stderr}");
        };
        println!(
            "shape {text}: {} KiB of source, {nnz} nonzeros, rustc wall {wall:.1} s, cpu {:.1} s",
            src.len() / 1024,
            user + sys
        );
        if !cli.compile_only {
            let out = Command::new(&exe).output().context("running the program")?;
            if !out.status.success() {
                bail!(
                    "{} failed: {}",
                    exe.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }
    Ok(())
}
