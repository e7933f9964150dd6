//! The JIT's per-chunk code ownership: live chunks are reused, changed chunks recompile, and
//! code nobody uses is freed. The tests take a lock, because the counters are process-wide.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use codegen_cpu::jit::{live_code, JitKernel, JitOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::interp::{compare, reference};
use sparse_ir::{Args, Dim, KernelSpec, Launch, Op, Pattern};

static SERIAL: Mutex<()> = Mutex::new(());

fn random_mask(rows: usize, cols: usize, density: f64, rng: &mut ChaCha8Rng) -> Vec<u8> {
    (0..rows * cols)
        .map(|_| u8::from(rng.random_bool(density)))
        .collect()
}

fn spec(p: &Arc<Pattern>, op: Op) -> KernelSpec {
    KernelSpec::new("fc1", op, p.clone(), Dim::Fixed(3), Dim::Fixed(16)).unwrap()
}

/// Runs an `spmm` kernel and checks it against the interpreter.
fn check_spmm(kernel: &JitKernel, rng: &mut ChaCha8Rng) {
    let p = kernel.spec().pattern();
    let launch = Launch::new(3, 16);
    let values: Vec<f32> = (0..p.nnz()).map(|_| rng.random_range(-1.0..1.0)).collect();
    let x: Vec<f32> = (0..p.cols() * 16)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut y = vec![f32::NAN; p.rows() * 16];
    let want = reference(
        kernel.spec(),
        launch,
        &Args::Spmm {
            values: &values,
            x: &x,
            bias: None,
            y: &mut y.clone(),
        },
    )
    .unwrap();
    kernel
        .run(
            launch,
            Args::Spmm {
                values: &values,
                x: &x,
                bias: None,
                y: &mut y,
            },
        )
        .unwrap();
    compare(&want, &y, 16).unwrap();
}

#[test]
fn chunks_are_reused_recompiled_and_freed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (rows, cols) = (300, 784);
    let options = JitOptions::default();
    let (chunks_before, bytes_before) = live_code();

    let mut mask = random_mask(rows, cols, 0.05, &mut rng);
    let p1 = Arc::new(Pattern::from_dense_mask(rows, cols, &mask).unwrap());
    let k1 = JitKernel::compile_with(&spec(&p1, Op::SPMM), &options).unwrap();
    let s = k1.stats().clone();
    assert!(s.functions >= 10, "{s:?}");
    assert_eq!(s.compiled + s.shared, s.functions, "{s:?}");
    assert_eq!(s.reused, 0);
    assert_eq!(s.compiled_nnz, p1.nnz());
    assert!(s.code_bytes > 0);
    assert_eq!(live_code().0, chunks_before + s.compiled);
    check_spmm(&k1, &mut rng);

    // The same spec again: every chunk is alive, nothing compiles.
    let k1b = JitKernel::compile_with(&spec(&p1, Op::SPMM), &options).unwrap();
    assert_eq!(k1b.stats().compiled, 0, "{:?}", k1b.stats());
    assert_eq!(k1b.stats().reused, s.functions);
    assert_eq!(live_code().0, chunks_before + s.compiled);
    // Another op or batch is other code.
    let t = JitKernel::compile_with(&spec(&p1, Op::SpmmT), &options).unwrap();
    assert_eq!(t.stats().reused, 0);
    drop(t);

    // Move one nonzero within row 7 and one within row 250 (row counts unchanged, so the
    // chunk boundaries stay): exactly the chunks holding those rows compile.
    for row in [7usize, 250] {
        let line = &mut mask[row * cols..(row + 1) * cols];
        let on = line.iter().position(|&m| m == 1).unwrap();
        let off = line.iter().position(|&m| m == 0).unwrap();
        line.swap(on, off);
    }
    let p2 = Arc::new(Pattern::from_dense_mask(rows, cols, &mask).unwrap());
    let k2 = JitKernel::compile_with(&spec(&p2, Op::SPMM), &options).unwrap();
    let touched: HashSet<usize> = k2
        .functions()
        .filter(|f| f.rows.contains(&7) || f.rows.contains(&250))
        .map(|f| f.index)
        .collect();
    assert_eq!(k2.stats().compiled, touched.len(), "{:?}", k2.stats());
    assert_eq!(k2.stats().reused, k2.stats().functions - touched.len());
    for f in k2.functions() {
        assert_eq!(
            f.reused,
            !touched.contains(&f.index),
            "function {}",
            f.index
        );
    }
    check_spmm(&k2, &mut rng);

    // Add a nonzero to row 100: what compiles is exactly the chunks not seen before.
    let off = (0..cols).find(|&c| mask[100 * cols + c] == 0).unwrap();
    mask[100 * cols + off] = 1;
    let p3 = Arc::new(Pattern::from_dense_mask(rows, cols, &mask).unwrap());
    let old: HashSet<u64> = p2
        .chunks(options.chunk_nnz)
        .iter()
        .map(|c| c.hash)
        .collect();
    let new_chunks = p3
        .chunks(options.chunk_nnz)
        .iter()
        .filter(|c| !old.contains(&c.hash))
        .count();
    let k3 = JitKernel::compile_with(&spec(&p3, Op::SPMM), &options).unwrap();
    assert!(new_chunks >= 1);
    assert_eq!(k3.stats().compiled, new_chunks, "{:?}", k3.stats());
    check_spmm(&k3, &mut rng);

    // Dropping kernels frees the code that no live kernel uses.
    drop(k1);
    drop(k1b);
    let live_k2_k3: HashSet<usize> = k2.functions().map(|f| f.index).collect();
    assert!(!live_k2_k3.is_empty());
    let (chunks_now, _) = live_code();
    assert!(
        chunks_now <= chunks_before + k2.stats().functions + k3.stats().compiled,
        "{chunks_now} live chunks"
    );
    drop(k2);
    drop(k3);
    assert_eq!(live_code(), (chunks_before, bytes_before));

    // Without the cache everything compiles even while equal code is alive.
    let k4 = JitKernel::compile_with(&spec(&p3, Op::SPMM), &options).unwrap();
    let uncached = JitOptions {
        use_cache: false,
        ..options.clone()
    };
    let k5 = JitKernel::compile_with(&spec(&p3, Op::SPMM), &uncached).unwrap();
    assert_eq!(k5.stats().reused, 0);
    assert_eq!(
        k5.stats().compiled + k5.stats().shared,
        k5.stats().functions
    );
    drop((k4, k5));
    assert_eq!(live_code(), (chunks_before, bytes_before));
}

#[test]
fn identical_chunks_compile_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Ten equal rows of 200 nonzeros in chunks of one row each: one function compiled, shared.
    let p = Arc::new(Pattern::from_dense_mask(10, 200, &[1u8; 2000]).unwrap());
    let options = JitOptions {
        chunk_nnz: 200,
        use_cache: false,
        ..JitOptions::default()
    };
    let k = JitKernel::compile_with(&spec(&p, Op::Sddmm), &options).unwrap();
    assert_eq!(k.stats().functions, 10);
    assert_eq!(k.stats().compiled, 1, "{:?}", k.stats());
    assert_eq!(k.stats().shared, 9);
}
