//! Measurements of the Cranelift JIT: compile time per nonzero and kernel time against
//! generic kernels.
//!
//! ```sh
//! cargo run --release -p codegen-cpu --example jit_bench -- compile   # µs per nonzero
//! cargo run --release -p codegen-cpu --example jit_bench -- compile-options
//! cargo run --release -p codegen-cpu --example jit_bench -- incremental  # chunks recompiled
//! cargo run --release -p codegen-cpu --example jit_bench -- regalloc  # kernel speed bt vs sp
//! cargo run --release -p codegen-cpu --example jit_bench -- kernel    # JIT vs generic
//! cargo run --release -p codegen-cpu --example jit_bench -- shapes    # code-shape options
//! ```
//!
//! Kernel times are medians over interleaved rounds (every variant runs once per round, in
//! turn), single-threaded. `csr` is a plain scalar CSR loop (the simplest generic kernel);
//! `generic` is the backend's generic kernel (`Strategy::Generic`, widest ISA, 1 thread).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use codegen_cpu::jit::{JitKernel, JitOptions, OptLevel, Regalloc};
use codegen_cpu::{CpuBackend, CpuOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spec(p: &Arc<Pattern>, op: Op, batch: usize, ld: usize) -> KernelSpec {
    KernelSpec::new("bench", op, p.clone(), Dim::Fixed(batch), Dim::Fixed(ld)).unwrap()
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // the fields after the command name (which is in parentheses)
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ
}

/// Compile-time of `options` on a spec, compiling without the cache: the median wall time
/// per nonzero, and the CPU time per nonzero (all threads, over at least a second of CPU time:
/// robust to other processes competing for the cores).
fn compile_us_per_nnz(spec: &KernelSpec, options: &JitOptions, reps: usize) -> (f64, f64, usize) {
    let options = JitOptions {
        use_cache: false,
        ..options.clone()
    };
    let mut times = Vec::new();
    let mut bytes = 0;
    let cpu0 = cpu_seconds();
    let mut nnz = 0;
    while times.len() < reps || cpu_seconds() - cpu0 < 1.0 {
        let k = JitKernel::compile_with(spec, &options).unwrap();
        times.push(k.stats().us_per_compiled_nnz());
        nnz += k.stats().compiled_nnz;
        bytes = k.stats().code_bytes;
    }
    let cpu_us = (cpu_seconds() - cpu0) * 1e6 / nnz as f64;
    (median(&mut times), cpu_us, bytes)
}

/// `compile`: the acceptance matrix — µs per nonzero for `spmm`, `spmm_t` and `sddmm` on
/// 300x784 and 1024x1024 at 5 %, batch 1 and 8, with the backtracking and the single-pass
/// register allocators on 1 and 2 threads (verifier off, `opt_level` none, no cache).
fn compile() {
    let shapes = [(300, 784), (1024, 1024)];
    println!(
        "compile time, µs per nonzero: median wall time of 3+ compiles, and CPU time of all \
         threads over them (load average now {})",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for (rows, cols) in shapes {
        let p = Arc::new(Pattern::random(rows, cols, 0.05, 1).expect("a valid random pattern"));
        for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
            for batch in [1, 8] {
                let s = spec(&p, op, batch, 16);
                let mut line = format!(
                    "{rows:4}x{cols:<4} nnz {:5} {:7} b{batch}:",
                    p.nnz(),
                    op.to_string()
                );
                for (name, regalloc) in
                    [("bt", Regalloc::Backtracking), ("sp", Regalloc::SinglePass)]
                {
                    for threads in [1, 2] {
                        let o = JitOptions {
                            threads,
                            regalloc,
                            ..JitOptions::default()
                        };
                        let (us, cpu, _) = compile_us_per_nnz(&s, &o, 3);
                        line += &format!("  {name} {threads}t {us:5.2} (cpu {cpu:5.2})");
                    }
                }
                println!("{line}");
            }
        }
    }
}

/// `compile-options`: compile time of other code generator options (verifier, `opt_level`,
/// chunk size) on 300x784 at 5 %.
fn compile_options() {
    let p = Arc::new(Pattern::random(300, 784, 0.05, 1).expect("a valid random pattern"));
    println!(
        "compile time, 300x784 at 5 % ({} nonzeros), µs per nonzero: median wall time of 5+ \
         compiles, and CPU time of all threads over them; code bytes",
        p.nnz()
    );
    let base = JitOptions::default();
    let variants: Vec<(&str, JitOptions)> = vec![
        ("defaults", base.clone()),
        (
            "1 thread",
            JitOptions {
                threads: 1,
                ..base.clone()
            },
        ),
        (
            "single_pass, 2 threads",
            JitOptions {
                regalloc: Regalloc::SinglePass,
                ..base.clone()
            },
        ),
        (
            "single_pass, 1 thread",
            JitOptions {
                regalloc: Regalloc::SinglePass,
                threads: 1,
                ..base.clone()
            },
        ),
        (
            "verifier on, 1 thread",
            JitOptions {
                verifier: true,
                threads: 1,
                ..base.clone()
            },
        ),
        (
            "opt speed, 1 thread",
            JitOptions {
                opt_level: OptLevel::Speed,
                threads: 1,
                ..base.clone()
            },
        ),
        (
            "chunk 250, 2 threads",
            JitOptions {
                chunk_nnz: 250,
                ..base.clone()
            },
        ),
        (
            "chunk 4000, 2 threads",
            JitOptions {
                chunk_nnz: 4000,
                ..base.clone()
            },
        ),
    ];
    for (op, batch, ld) in [
        (Op::SPMM, 1, 16),
        (Op::SPMM, 8, 16),
        (Op::SPMM, 100, 112),
        (Op::SpmmT, 1, 16),
        (Op::SpmmT, 8, 16),
        (Op::Sddmm, 8, 16),
        (Op::Sddmm, 100, 112),
    ] {
        let s = spec(&p, op, batch, ld);
        // every variant for the forward op at batch 1 and 8, the main ones for the rest
        let all = op == Op::SPMM && batch <= 8;
        for (name, o) in variants.iter().filter(|(n, _)| all || n.contains("thread")) {
            let (us, cpu, bytes) = compile_us_per_nnz(&s, o, 5);
            println!(
                "  {:7} batch {batch:3} ld {ld:3}  {name:24} wall {us:6.2} µs/nnz  cpu {cpu:6.2} µs/nnz  {bytes:7} B",
                op.to_string()
            );
        }
    }
}

/// A plain scalar CSR `spmm` (no epilogue): the simplest generic kernel.
fn csr_spmm(p: &Pattern, values: &[f32], x: &[f32], y: &mut [f32], batch: usize, ld: usize) {
    let (rp, ci) = (p.row_ptr(), p.col_idx());
    for r in 0..p.rows() {
        let out = &mut y[r * ld..r * ld + batch];
        out.fill(0.0);
        for k in rp[r] as usize..rp[r + 1] as usize {
            let w = values[k];
            let xr = &x[ci[k] as usize * ld..ci[k] as usize * ld + batch];
            for (o, &xv) in out.iter_mut().zip(xr) {
                *o += w * xv;
            }
        }
    }
}

type Runner<'a> = Box<dyn FnMut() + 'a>;

/// Times every runner in interleaved rounds; returns median µs per call.
fn interleaved(runners: &mut [(String, Runner<'_>)], rounds: usize, target_us: f64) -> Vec<f64> {
    // calibrate iterations per round on the first runner
    let mut iters = 1usize;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            (runners[0].1)();
        }
        let us = t.elapsed().as_secs_f64() * 1e6;
        if us > target_us || iters > 1 << 20 {
            break;
        }
        iters *= 2;
    }
    let mut samples = vec![Vec::new(); runners.len()];
    for _ in 0..rounds {
        for (i, (_, r)) in runners.iter_mut().enumerate() {
            let t = Instant::now();
            for _ in 0..iters {
                r();
            }
            samples[i].push(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
        }
    }
    samples.iter_mut().map(|s| median(s)).collect()
}

/// The arguments of `op` over these buffers (`inp` is `x` for `spmm`, `dy` otherwise; `inp2`
/// is `x` for `sddmm`).
fn args<'a>(
    op: Op,
    values: &'a [f32],
    inp: &'a [f32],
    inp2: &'a [f32],
    out: &'a mut [f32],
) -> Args<'a, [f32]> {
    match op {
        Op::Spmm { .. } => Args::Spmm {
            values,
            x: inp,
            bias: None,
            y: out,
        },
        Op::SpmmT => Args::SpmmT {
            values,
            dy: inp,
            dx: out,
        },
        Op::Sddmm => Args::Sddmm {
            dy: inp,
            x: inp2,
            dw: out,
        },
        Op::DenseGrad | Op::Conv { .. } | Op::ConvT | Op::ConvGrad | Op::ConvDenseGrad => {
            unreachable!("the JIT benchmark runs spmm, spmm_t and sddmm")
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn kernel_case(
    op: Op,
    rows: usize,
    cols: usize,
    batch: usize,
    ld: usize,
    variants: &[(&str, JitOptions)],
) {
    let p = Arc::new(Pattern::random(rows, cols, 0.05, 7).expect("a valid random pattern"));
    let s = spec(&p, op, batch, ld);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let values: Vec<f32> = (0..p.nnz()).map(|_| rng.random_range(-1.0..1.0)).collect();
    let inp: Vec<f32> = (0..rows.max(cols) * ld)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let inp2: Vec<f32> = (0..cols * ld)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let out_len = match op {
        Op::Spmm { .. } => rows * ld,
        Op::SpmmT => cols * ld,
        _ => p.nnz(),
    };
    let launch = Launch::new(batch, ld);
    let kernels: Vec<JitKernel> = variants
        .iter()
        .map(|(_, o)| JitKernel::compile_with(&s, o).unwrap())
        .collect();
    let backend = CpuBackend::new(CpuOptions::default()).unwrap();
    let generic = backend.compile(&s, Strategy::Generic).unwrap();
    let mut outs: Vec<Vec<f32>> = vec![vec![0.0; out_len]; kernels.len() + 2];
    let (out_csr, rest) = outs.split_first_mut().unwrap();
    let (out_gen, out_jit) = rest.split_first_mut().unwrap();
    let (p, values, inp, inp2, generic) = (&p, &values, &inp, &inp2, &generic);
    let mut runners: Vec<(String, Runner<'_>)> = Vec::new();
    if op == Op::SPMM {
        runners.push((
            "csr".into(),
            Box::new(move || csr_spmm(p, values, black_box(inp), out_csr, batch, ld)),
        ));
    }
    runners.push((
        "generic".into(),
        Box::new(move || {
            generic
                .run(launch, args(op, values, black_box(inp), inp2, out_gen))
                .unwrap()
        }),
    ));
    for ((k, out), (name, _)) in kernels.iter().zip(out_jit.iter_mut()).zip(variants) {
        runners.push((
            format!("jit {name}"),
            Box::new(move || {
                k.run(launch, args(op, values, black_box(inp), inp2, out))
                    .unwrap()
            }),
        ));
    }
    let times = interleaved(&mut runners, 31, 2000.0);
    let first_jit = runners.len() - kernels.len();
    let generic_us = times[first_jit - 1];
    println!(
        "{op} {rows}x{cols} 5 % (nnz {}), batch {batch}, ld {ld}:",
        p.nnz()
    );
    for (i, ((name, _), t)) in runners.iter().zip(&times).enumerate() {
        let code = if i >= first_jit {
            format!("  code {:7} B", kernels[i - first_jit].stats().code_bytes)
        } else {
            String::new()
        };
        println!(
            "  {name:28} {t:9.3} µs   {:5.2}x generic{code}",
            generic_us / t
        );
    }
    drop(runners);
    // every kernel agrees with the generic one
    let stride = if matches!(op, Op::Sddmm) { out_len } else { ld };
    for out in outs.iter().skip(2) {
        let bad = out
            .iter()
            .zip(&outs[1])
            .enumerate()
            .filter(|(i, _)| i % stride < batch || stride == out_len)
            .any(|(_, (a, b))| (a - b).abs() > 1e-3 * (1.0 + b.abs()));
        assert!(!bad, "a JIT kernel disagrees with the generic kernel");
    }
}

fn kernel() {
    let variants = [("defaults", JitOptions::default())];
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        for (batch, ld) in [(1, 1), (1, 16), (8, 16)] {
            if op == Op::Sddmm && batch == 1 {
                continue;
            }
            for (rows, cols) in [(100, 300), (10, 100), (300, 784)] {
                kernel_case(op, rows, cols, batch, ld, &variants);
            }
        }
    }
}

/// `regalloc`: kernel time with the backtracking (default) and the single-pass allocator.
fn regalloc() {
    let variants = [
        ("backtracking", JitOptions::default()),
        (
            "single_pass",
            JitOptions {
                regalloc: Regalloc::SinglePass,
                ..JitOptions::default()
            },
        ),
    ];
    for (rows, cols) in [(100, 300), (300, 784), (1024, 1024)] {
        for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
            for batch in [1, 8] {
                kernel_case(op, rows, cols, batch, 16, &variants);
            }
        }
    }
}

fn shapes() {
    let base = JitOptions::default();
    let mut variants: Vec<(String, JitOptions)> = vec![("defaults".into(), base.clone())];
    for acc in [1, 2] {
        variants.push((
            format!("acc {acc}"),
            JitOptions {
                accumulators: acc,
                ..base.clone()
            },
        ));
    }
    for g in [2, 4] {
        variants.push((
            format!("vectors {g}"),
            JitOptions {
                block_vectors: g,
                ..base.clone()
            },
        ));
    }
    variants.push((
        "single_pass".into(),
        JitOptions {
            regalloc: Regalloc::SinglePass,
            ..base.clone()
        },
    ));
    variants.push((
        "opt speed".into(),
        JitOptions {
            opt_level: OptLevel::Speed,
            ..base.clone()
        },
    ));
    let named: Vec<(&str, JitOptions)> = variants
        .iter()
        .map(|(n, o)| (n.as_str(), o.clone()))
        .collect();
    for batch in [1, 8, 100] {
        for (rows, cols) in [(100, 300), (10, 100), (300, 784)] {
            kernel_case(
                Op::SPMM,
                rows,
                cols,
                batch,
                batch.next_multiple_of(16),
                &named,
            );
        }
    }
}

/// `compile-loop OP BATCH REPS THREADS`: compiles 300x784 at 5 % again and again (for
/// profiling the compiler).
fn compile_loop() {
    let a: Vec<String> = std::env::args().skip(2).collect();
    let op: Op = a.first().map_or("spmm", |s| s.as_str()).parse().unwrap();
    let batch: usize = a.get(1).map_or(1, |s| s.parse().unwrap());
    let reps: usize = a.get(2).map_or(10, |s| s.parse().unwrap());
    let threads: usize = a.get(3).map_or(1, |s| s.parse().unwrap());
    let p = Arc::new(Pattern::random(300, 784, 0.05, 1).expect("a valid random pattern"));
    let s = spec(&p, op, batch, batch.next_multiple_of(16).min(batch.max(16)));
    let o = JitOptions {
        threads,
        use_cache: false,
        ..JitOptions::default()
    };
    let mut t = Vec::new();
    for _ in 0..reps {
        t.push(
            JitKernel::compile_with(&s, &o)
                .unwrap()
                .stats()
                .us_per_compiled_nnz(),
        );
    }
    println!("{op} batch {batch}: median {:.2} µs/nnz", median(&mut t));
}

/// A chunk's structure (local row pointers, columns): equal structure means reusable code.
fn chunk_content(p: &Pattern, rows: std::ops::Range<usize>) -> Vec<u32> {
    let rp = &p.row_ptr()[rows.start..=rows.end];
    let mut c: Vec<u32> = rp.iter().map(|&x| x - rp[0]).collect();
    c.extend_from_slice(&p.col_idx()[rp[0] as usize..rp[rp.len() - 1] as usize]);
    c
}

/// `incremental`: how many chunks an update gives new content (and so compiles), with the
/// JIT's content-defined chunking (`jit::chunk_rows`) and with greedy chunking by count
/// (`Pattern::chunks`), over random updates that change `k` rows (each loses 2 nonzeros and
/// gains 3) or prune and regrow a fraction of the whole layer (as sparse momentum does).
fn incremental() {
    use std::collections::HashSet;
    let target = JitOptions::default().chunk_nnz;
    let new_chunks = |old: &Pattern, new: &Pattern, greedy: bool| -> (usize, usize) {
        let ranges = |p: &Pattern| -> Vec<std::ops::Range<usize>> {
            if greedy {
                p.chunks(target).into_iter().map(|c| c.rows).collect()
            } else {
                codegen_cpu::jit::chunk_rows(p, target)
            }
        };
        let seen: HashSet<Vec<u32>> = ranges(old)
            .into_iter()
            .map(|r| chunk_content(old, r))
            .collect();
        let now = ranges(new);
        let n = now.len();
        (
            now.into_iter()
                .filter(|r| !seen.contains(&chunk_content(new, r.clone())))
                .count(),
            n,
        )
    };
    for (rows, cols) in [(300, 784), (1024, 1024)] {
        for change in ["1 row", "4 rows", "16 rows", "prune 1 %", "prune 20 %"] {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let (mut worst, mut sum_c, mut sum_g, mut chunks) = (0, 0, 0, 0);
            let trials = 100;
            for _ in 0..trials {
                let mut mask = Pattern::random(rows, cols, 0.05, rng.random())
                    .expect("a valid random pattern")
                    .to_dense_mask();
                let old = Pattern::from_dense_mask(rows, cols, &mask).unwrap();
                let flip = |mask: &mut [u8],
                            rng: &mut ChaCha8Rng,
                            lo: usize,
                            hi: usize,
                            from: u8,
                            n: usize| {
                    let mut left = n;
                    while left > 0 {
                        let i = rng.random_range(lo..hi);
                        if mask[i] == from {
                            mask[i] = 1 - from;
                            left -= 1;
                        }
                    }
                };
                let rows_changed = match change {
                    "1 row" => 1,
                    "4 rows" => 4,
                    "16 rows" => 16,
                    _ => 0,
                };
                if rows_changed > 0 {
                    for _ in 0..rows_changed {
                        let r = rng.random_range(0..rows);
                        flip(&mut mask, &mut rng, r * cols, (r + 1) * cols, 1, 2);
                        flip(&mut mask, &mut rng, r * cols, (r + 1) * cols, 0, 3);
                    }
                } else {
                    let frac = if change == "prune 1 %" { 0.01 } else { 0.2 };
                    let n = (old.nnz() as f64 * frac) as usize;
                    flip(&mut mask, &mut rng, 0, rows * cols, 1, n);
                    flip(&mut mask, &mut rng, 0, rows * cols, 0, n);
                }
                let new = Pattern::from_dense_mask(rows, cols, &mask).unwrap();
                let (c, n) = new_chunks(&old, &new, false);
                let (g, _) = new_chunks(&old, &new, true);
                worst = worst.max(c);
                sum_c += c;
                sum_g += g;
                chunks += n;
            }
            println!(
                "{rows}x{cols} 5 %, {change:10}: content-defined {:5.1} of {:5.1} chunks compile (worst {worst}), greedy {:5.1}",
                sum_c as f64 / trials as f64,
                chunks as f64 / trials as f64,
                sum_g as f64 / trials as f64
            );
        }
    }
}

/// `sizes`: machine code bytes per row and per nonzero of every op and batch class, fitted
/// by least squares over a few random layers (the constants of `jit::estimate`).
fn sizes() {
    let layers: Vec<Arc<Pattern>> = [
        (300, 784, 0.05),
        (100, 300, 0.05),
        (300, 784, 0.2),
        (1000, 100, 0.02),
        (64, 2000, 0.1),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(r, c, d))| {
        Arc::new(Pattern::random(r, c, d, i as u64).expect("a valid random pattern"))
    })
    .collect();
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        for (batch, ld) in (1..16).map(|b| (b, 16)).chain([(16, 16), (100, 112)]) {
            // least squares of bytes = a·rows + b·nnz (rows of the code's own pattern)
            let (mut srr, mut srn, mut snn, mut srb, mut snb) = (0.0, 0.0, 0.0, 0.0, 0.0);
            let mut samples = Vec::new();
            for p in &layers {
                let k = JitKernel::compile(&spec(p, op, batch, ld)).unwrap();
                let rows = if op == Op::SpmmT { p.cols() } else { p.rows() } as f64;
                let (n, b) = (p.nnz() as f64, k.stats().code_bytes as f64);
                srr += rows * rows;
                srn += rows * n;
                snn += n * n;
                srb += rows * b;
                snb += n * b;
                samples.push((rows, n, b));
            }
            let det = srr * snn - srn * srn;
            let a = (srb * snn - snb * srn) / det;
            let bn = (snb * srr - srb * srn) / det;
            let worst = samples
                .iter()
                .map(|&(r, n, b)| ((a * r + bn * n) / b - 1.0).abs())
                .fold(0.0, f64::max);
            println!(
                "{:7} batch {batch:3} ld {ld:3}: {a:7.1} B/row + {bn:6.2} B/nnz   (worst fit error {:.1} %)",
                op.to_string(),
                100.0 * worst
            );
        }
    }
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    match what.as_str() {
        "compile" => compile(),
        "compile-options" => compile_options(),
        "regalloc" => regalloc(),
        "kernel" => kernel(),
        "shapes" => shapes(),
        "compile-loop" => compile_loop(),
        "sizes" => sizes(),
        "incremental" => incremental(),
        "case" => {
            // case OP ROWS COLS BATCH LD
            let a: Vec<String> = std::env::args().skip(2).collect();
            let n = |i: usize| a[i].parse::<usize>().expect("a whole number");
            let op: Op = a[0].parse().unwrap();
            kernel_case(
                op,
                n(1),
                n(2),
                n(3),
                n(4),
                &[("defaults", JitOptions::default())],
            );
        }
        "all" => {
            compile();
            kernel();
        }
        other => {
            eprintln!("unknown measurement {other:?}: expected compile, kernel, shapes or all");
            std::process::exit(2);
        }
    }
}
