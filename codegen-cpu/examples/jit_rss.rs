//! Memory over many recompilations: a 300×784 layer at 5 % whose mask changes every
//! iteration (10 % of the nonzeros pruned and regrown elsewhere, as sparse momentum does),
//! recompiled each time while the previous kernel is still alive (as during a hot swap).
//! Prints the resident set size (`/proc/self/statm`) and the live JIT code as it goes.
//!
//! ```sh
//! cargo run --release -p codegen-cpu --example jit_rss -- [ITERATIONS] [all-ops]
//! ```
//!
//! With `all-ops`, each iteration compiles `spmm(bias,relu)` at batch 1, and `spmm_t` and
//! `sddmm` at batch 8; otherwise only `spmm(bias,relu)` at batch 1. With `swap`, each kernel
//! is a hot-swap kernel ([`codegen_cpu::swap::SwapKernel`]): it runs once on the generic
//! code at once, its JIT code compiles on a background thread, and it runs again once
//! swapped (a thread and a generic kernel per iteration and op, on top of the JIT code).

use std::sync::Arc;
use std::time::Instant;

use codegen_cpu::jit::{live_code, JitKernel};
use codegen_cpu::planner::{self, Features};
use codegen_cpu::swap::{background_options, SwapKernel};
use codegen_cpu::{CpuBackend, CpuOptions};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern};

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("resident pages");
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// A kernel kept alive until the next generation exists.
#[allow(dead_code)] // held only for its lifetime
enum Compiled {
    Jit(Box<JitKernel>),
    Swap(Box<SwapKernel>),
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let iterations: usize = args
        .first()
        .map_or(1000, |s| s.parse().expect("ITERATIONS"));
    let all_ops = args.iter().any(|a| a == "all-ops");
    let swap = args.iter().any(|a| a == "swap");
    let backend = CpuBackend::new(CpuOptions::default()).unwrap();
    let (rows, cols) = (300, 784);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut mask = Pattern::random(rows, cols, 0.05, rng.random())
        .expect("a valid random pattern")
        .to_dense_mask();
    let ops: Vec<(Op, usize, usize)> = if all_ops {
        vec![
            (
                Op::Spmm {
                    bias: true,
                    relu: true,
                },
                1,
                16,
            ),
            (Op::SpmmT, 8, 16),
            (Op::Sddmm, 8, 16),
        ]
    } else {
        vec![(
            Op::Spmm {
                bias: true,
                relu: true,
            },
            1,
            16,
        )]
    };
    let x = vec![0.5f32; cols * 16];
    let bias = vec![0.1f32; rows];
    let mut y = vec![0.0f32; rows * 16];
    let mut previous: Vec<Compiled> = Vec::new();
    let start_rss = rss_mib();
    let start = Instant::now();
    let mut compile_ms = 0.0;
    let mut compiled_functions = 0;
    println!("iteration  rss_mib  live_functions  live_code_kib  compile_ms_total");
    println!("{:9}  {start_rss:7.1}  {:14}  {:13}  {:16}", 0, 0, 0, 0);
    for it in 1..=iterations {
        // prune 10 % of the nonzeros, regrow as many at random empty positions
        let on: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] == 1).collect();
        let n = on.len() / 10;
        for &i in on.choose_multiple(&mut rng, n) {
            mask[i] = 0;
        }
        let mut grown = 0;
        while grown < n {
            let i = rng.random_range(0..mask.len());
            if mask[i] == 0 {
                mask[i] = 1;
                grown += 1;
            }
        }
        let pattern = Arc::new(Pattern::from_dense_mask(rows, cols, &mask).unwrap());
        let values = vec![0.01f32; pattern.nnz()];
        let mut current = Vec::new();
        for &(op, batch, ld) in &ops {
            let spec = KernelSpec::new(
                "fc1",
                op,
                pattern.clone(),
                Dim::Fixed(batch),
                Dim::Fixed(ld),
            )
            .unwrap();
            let launch = Launch::new(batch, ld);
            let mut run = |k: &dyn Fn(Launch, Args<'_, [f32]>)| {
                if let Op::Spmm { .. } = op {
                    k(
                        launch,
                        Args::Spmm {
                            values: &values,
                            x: &x,
                            bias: Some(&bias),
                            y: &mut y,
                        },
                    );
                }
            };
            let k = if swap {
                let plan = planner::plan(&Features::of(&spec, 1, backend.isa()));
                let k = SwapKernel::start(&backend, &spec, plan, background_options()).unwrap();
                run(&|l, a| k.run(l, a).unwrap());
                assert!(k.wait(), "{:?}", k.error());
                run(&|l, a| k.run(l, a).unwrap());
                let s = k.jit_stats().unwrap();
                compile_ms += s.compile_ms;
                compiled_functions += s.compiled;
                Compiled::Swap(Box::new(k))
            } else {
                let k = JitKernel::compile(&spec).unwrap();
                compile_ms += k.stats().compile_ms;
                compiled_functions += k.stats().compiled;
                run(&|l, a| k.run(l, a).unwrap());
                Compiled::Jit(Box::new(k))
            };
            current.push(k);
        }
        // the previous generation is dropped only once the new one exists
        let old = std::mem::replace(&mut previous, current);
        drop(old);
        if [1, 10, 100, 250, 500, 750, 1000].contains(&it) || it == iterations {
            let (functions, bytes) = live_code();
            println!(
                "{it:9}  {:7.1}  {functions:14}  {:13.0}  {compile_ms:16.0}",
                rss_mib(),
                bytes as f64 / 1024.0
            );
        }
    }
    println!(
        "{iterations} iterations in {:.1} s, {compiled_functions} functions compiled, \
         RSS {start_rss:.1} → {:.1} MiB",
        start.elapsed().as_secs_f64(),
        rss_mib()
    );
}
