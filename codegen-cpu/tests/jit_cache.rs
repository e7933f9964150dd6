//! The JIT's per-chunk code ownership: live chunks are reused, changed chunks recompile, and
//! code nobody uses is freed. The tests take a lock, because the counters are process-wide.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use codegen_cpu::jit::{chunk_rows, live_code, JitKernel, JitOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::{Dim, KernelSpec, Op, Pattern};
use test_support::{check_kernel, Run};

static SERIAL: Mutex<()> = Mutex::new(());

fn spec(p: &Arc<Pattern>, op: Op) -> KernelSpec {
    KernelSpec::new("fc1", op, p.clone(), Dim::Fixed(3), Dim::Fixed(16)).unwrap()
}

/// A chunk's structure: local row pointers, then columns.
fn chunk_content(p: &Pattern, rows: std::ops::Range<usize>) -> Vec<u32> {
    let rp = &p.row_ptr()[rows.start..=rows.end];
    let mut c: Vec<u32> = rp.iter().map(|&x| x - rp[0]).collect();
    c.extend_from_slice(&p.col_idx()[rp[0] as usize..rp[rp.len() - 1] as usize]);
    c
}

/// Runs a kernel (batch 3, ld 16) on guarded operands and checks it against the
/// interpreter (`test_support::check_kernel`).
fn check_any(kernel: &JitKernel, rng: &mut ChaCha8Rng) {
    let seed: u64 = rng.random();
    check_kernel(kernel, Run::new(3, 16, seed).offset(seed as usize % 16))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn chunks_are_reused_recompiled_and_freed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (rows, cols) = (300, 784);
    let options = JitOptions::default();
    let (chunks_before, bytes_before) = live_code();

    let mut mask = Pattern::random(rows, cols, 0.05, rng.random())
        .unwrap()
        .to_dense_mask();
    let p1 = Arc::new(Pattern::from_dense_mask(rows, cols, &mask).unwrap());
    let k1 = JitKernel::compile_with(&spec(&p1, Op::SPMM), &options).unwrap();
    let s = k1.stats().clone();
    assert!(s.functions >= 10, "{s:?}");
    assert_eq!(s.compiled + s.shared, s.functions, "{s:?}");
    assert_eq!(s.reused, 0);
    assert_eq!(s.compiled_nnz, p1.nnz());
    assert!(s.code_bytes > 0);
    assert_eq!(live_code().0, chunks_before + s.compiled);
    check_any(&k1, &mut rng);

    // The same spec again: every chunk is alive, nothing compiles.
    let k1b = JitKernel::compile_with(&spec(&p1, Op::SPMM), &options).unwrap();
    assert_eq!(k1b.stats().compiled, 0, "{:?}", k1b.stats());
    assert_eq!(k1b.stats().reused, s.functions);
    assert_eq!(live_code().0, chunks_before + s.compiled);
    // Another op or batch is other code.
    let t = JitKernel::compile_with(&spec(&p1, Op::SpmmT), &options).unwrap();
    assert_eq!(t.stats().reused, 0);
    drop(t);

    // Move one nonzero within row 7 and one within row 250: what compiles is the chunks
    // holding those rows, and at most the chunk after each (when the moved nonzero moved a
    // content boundary).
    for row in [7usize, 250] {
        let line = &mut mask[row * cols..(row + 1) * cols];
        let on = line.iter().position(|&m| m == 1).unwrap();
        let off = line.iter().position(|&m| m == 0).unwrap();
        line.swap(on, off);
    }
    let p2 = Arc::new(Pattern::from_dense_mask(rows, cols, &mask).unwrap());
    let k2 = JitKernel::compile_with(&spec(&p2, Op::SPMM), &options).unwrap();
    let near: Vec<usize> = k2
        .functions()
        .filter(|f| f.rows.contains(&7) || f.rows.contains(&250))
        .map(|f| f.index)
        .collect();
    assert_eq!(near.len(), 2);
    for f in k2.functions() {
        if !f.reused {
            assert!(
                near.iter().any(|&i| f.index == i || f.index == i + 1),
                "function {} (rows {:?}) compiled though no changed row is in or before it",
                f.index,
                f.rows
            );
        }
    }
    assert!(
        k2.stats().compiled >= 2 && k2.stats().compiled <= 4,
        "{:?}",
        k2.stats()
    );
    assert_eq!(
        k2.stats().reused,
        k2.stats().functions - k2.stats().compiled
    );
    check_any(&k2, &mut rng);

    // Add a nonzero to row 100: what compiles is exactly the chunks not seen before.
    let off = (0..cols).find(|&c| mask[100 * cols + c] == 0).unwrap();
    mask[100 * cols + off] = 1;
    let p3 = Arc::new(Pattern::from_dense_mask(rows, cols, &mask).unwrap());
    let old: HashSet<Vec<u32>> = chunk_rows(&p2, options.chunk_nnz)
        .iter()
        .map(|r| chunk_content(&p2, r.clone()))
        .collect();
    let new_chunks = chunk_rows(&p3, options.chunk_nnz)
        .iter()
        .filter(|r| !old.contains(&chunk_content(&p3, (*r).clone())))
        .count();
    let k3 = JitKernel::compile_with(&spec(&p3, Op::SPMM), &options).unwrap();
    assert!((1..=2).contains(&new_chunks), "{new_chunks}");
    assert_eq!(k3.stats().compiled, new_chunks, "{:?}", k3.stats());
    check_any(&k3, &mut rng);

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

/// An update that changes a few rows of a large layer (their nonzero counts too) compiles
/// only the chunks holding those rows (at most one more each, where a content boundary
/// moved): the rest of the kernel's code is reused, so recompiling costs in proportion to the
/// change, not to the layer.
#[test]
fn a_few_changed_rows_recompile_only_their_chunks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    let (rows, cols) = (1024, 1024);
    let options = JitOptions::default();
    let mut mask = Pattern::random(rows, cols, 0.05, rng.random())
        .unwrap()
        .to_dense_mask();
    for op in [Op::SPMM, Op::Sddmm] {
        let p = Arc::new(Pattern::from_dense_mask(rows, cols, &mask).unwrap());
        let mut kernel = JitKernel::compile_with(&spec(&p, op), &options).unwrap();
        let functions = kernel.stats().functions;
        assert!(functions >= 30, "{:?}", kernel.stats());
        assert_eq!(kernel.stats().reused, 0);
        for changed in [1usize, 2, 4] {
            // `changed` random rows each lose two nonzeros and gain three elsewhere
            let picked: std::collections::BTreeSet<usize> =
                (0..changed).map(|_| rng.random_range(0..rows)).collect();
            for &row in &picked {
                let line = &mut mask[row * cols..(row + 1) * cols];
                for (from, to, n) in [(1u8, 0u8, 2), (0, 1, 3)] {
                    let mut left = n;
                    while left > 0 {
                        let c = rng.random_range(0..cols);
                        if line[c] == from {
                            line[c] = to;
                            left -= 1;
                        }
                    }
                }
            }
            let p = Arc::new(Pattern::from_dense_mask(rows, cols, &mask).unwrap());
            // the old kernel is alive while the new one compiles (as in training)
            let next = JitKernel::compile_with(&spec(&p, op), &options).unwrap();
            let s = next.stats().clone();
            assert!(
                s.compiled >= 1 && s.compiled <= 2 * picked.len(),
                "{op}: {} changed rows compiled {} of {} chunks",
                picked.len(),
                s.compiled,
                s.functions
            );
            assert_eq!(s.reused + s.compiled + s.shared, s.functions, "{s:?}");
            assert!(s.compiled_nnz * 3 < s.nnz, "{s:?}");
            for f in next.functions().filter(|f| !f.reused) {
                let holds_or_follows = |i: usize| {
                    next.functions()
                        .nth(i)
                        .is_some_and(|g| picked.iter().any(|r| g.rows.contains(r)))
                };
                assert!(
                    holds_or_follows(f.index) || (f.index > 0 && holds_or_follows(f.index - 1)),
                    "{op}: chunk {} (rows {:?}) compiled but holds no changed row",
                    f.index,
                    f.rows
                );
            }
            check_any(&next, &mut rng);
            kernel = next;
        }
        drop(kernel);
    }
}
