//! Fork-join overhead of the kernels' pool against `rayon::join`, and the kernel time of one
//! LeNet-300-100 training step (batch 100, 5 %: 3 forward `spmm`, 2 `spmm_t`, 3 `sddmm`)
//! on 1 and 2 threads.
//!
//! ```sh
//! cargo run --release -p codegen-cpu --example pool_overhead
//! ```
//!
//! Medians over interleaved rounds. On a shared machine whose other core is busy, a worker
//! that is descheduled in the middle of its part delays the whole job: read the 2-thread
//! figures together with the load average printed first.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use codegen_cpu::{CpuBackend, CpuKernel, CpuOptions, Pool};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern, Strategy};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ns per call of `f`, over `rounds` samples of `reps` calls.
fn time_ns(rounds: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        samples.push(t.elapsed().as_secs_f64() * 1e9 / reps as f64);
    }
    median(samples)
}

struct Layer {
    rows: usize,
    cols: usize,
    values: Vec<f32>,
    bias: Vec<f32>,
    fwd: CpuKernel,
    bwd: Option<CpuKernel>,
    grad: CpuKernel,
}

fn main() {
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average: {}", l.trim());
    }
    let pool2 = Pool::new(2).unwrap();
    let pool1 = Pool::new(1).unwrap();
    let rayon2 = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let hits = AtomicUsize::new(0);
    let work = |_: usize| {
        hits.fetch_add(1, Ordering::Relaxed);
    };
    let (rounds, reps) = (31, 20_000);
    let mut ours = Vec::new();
    let mut inline = Vec::new();
    let mut ray = Vec::new();
    for _ in 0..5 {
        ours.push(time_ns(rounds, reps, || pool2.run(2, &work)));
        inline.push(time_ns(rounds, reps, || pool1.run(2, &work)));
        ray.push(time_ns(rounds, reps, || {
            rayon2.install(|| rayon::join(|| work(0), || work(1)));
        }));
    }
    black_box(hits.load(Ordering::Relaxed));
    println!(
        "empty 2-part job: pool(2 threads) {:.0} ns, pool(1 thread) {:.0} ns, rayon::join on 2 threads {:.0} ns",
        median(ours),
        median(inline),
        median(ray)
    );

    // One LeNet-300-100 training step's kernels.
    let batch: usize = 100;
    let ld = batch.next_multiple_of(16);
    let shapes = [(300, 784), (100, 300), (10, 100)];
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut fill = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let acts: Vec<Vec<f32>> = [784, 300, 100, 10].iter().map(|&f| fill(f * ld)).collect();
    let mut outs: Vec<Vec<f32>> = [784, 300, 100, 10]
        .iter()
        .map(|&f| vec![0.0; f * ld])
        .collect();
    for threads in [1, 2] {
        let backend = CpuBackend::new(CpuOptions { threads, isa: None }).unwrap();
        let layers: Vec<Layer> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(rows, cols))| {
                let p = Arc::new(Pattern::random(rows, cols, 0.05, 11 + i as u64).unwrap());
                let spec = |op| {
                    KernelSpec::new(
                        format!("fc{}", i + 1),
                        op,
                        Arc::clone(&p),
                        Dim::Fixed(batch),
                        Dim::Fixed(ld),
                    )
                    .unwrap()
                };
                let fwd_op = Op::Spmm {
                    bias: true,
                    relu: i < 2,
                };
                Layer {
                    rows,
                    cols,
                    values: (0..p.nnz()).map(|k| (k as f32 * 0.37).sin()).collect(),
                    bias: vec![0.1; rows],
                    fwd: backend.compile(&spec(fwd_op), Strategy::Auto).unwrap(),
                    bwd: (i > 0)
                        .then(|| backend.compile(&spec(Op::SpmmT), Strategy::Auto).unwrap()),
                    grad: backend.compile(&spec(Op::Sddmm), Strategy::Auto).unwrap(),
                }
            })
            .collect();
        let mut dws: Vec<Vec<f32>> = layers.iter().map(|l| vec![0.0; l.values.len()]).collect();
        let launch = Launch::new(batch, ld);
        let mut per_kernel = vec![Vec::new(); 8];
        let mut steps = Vec::new();
        for _ in 0..400 {
            let step = Instant::now();
            let mut k = 0;
            let mut timed = |k: &mut usize, f: &mut dyn FnMut()| {
                let t = Instant::now();
                f();
                per_kernel[*k].push(t.elapsed().as_secs_f64() * 1e6);
                *k += 1;
            };
            for (i, l) in layers.iter().enumerate() {
                let (x, y) = (&acts[i], &mut outs[i + 1]);
                timed(&mut k, &mut || {
                    l.fwd
                        .run(
                            launch,
                            Args::Spmm {
                                values: &l.values,
                                x: &x[..l.cols * ld],
                                bias: Some(&l.bias),
                                y: &mut y[..l.rows * ld],
                            },
                        )
                        .unwrap()
                });
            }
            for (i, l) in layers.iter().enumerate().rev() {
                if let Some(bwd) = &l.bwd {
                    let (dy, dx) = (&acts[i + 1], &mut outs[i]);
                    timed(&mut k, &mut || {
                        bwd.run(
                            launch,
                            Args::SpmmT {
                                values: &l.values,
                                dy: &dy[..l.rows * ld],
                                dx: &mut dx[..l.cols * ld],
                            },
                        )
                        .unwrap()
                    });
                }
                let (dy, x) = (&acts[i + 1], &acts[i]);
                let dw = &mut dws[i];
                timed(&mut k, &mut || {
                    l.grad
                        .run(
                            launch,
                            Args::Sddmm {
                                dy: &dy[..l.rows * ld],
                                x: &x[..l.cols * ld],
                                dw,
                            },
                        )
                        .unwrap()
                });
            }
            steps.push(step.elapsed().as_secs_f64() * 1e6);
        }
        let names = [
            "fc1 spmm",
            "fc2 spmm",
            "fc3 spmm",
            "fc3 spmm_t",
            "fc3 sddmm",
            "fc2 spmm_t",
            "fc2 sddmm",
            "fc1 sddmm",
        ];
        let parts: Vec<String> = per_kernel
            .into_iter()
            .zip(names)
            .map(|(v, n)| format!("{n} {:.1}", median(v)))
            .collect();
        println!(
            "LeNet-300-100 step kernels, batch 100, 5 %, {threads} thread(s): {:.1} µs per step (median); per kernel µs: {}",
            median(steps),
            parts.join(", ")
        );
    }
}
