//! The JIT's convolutions: `conv` (with its bias/ReLU epilogue), `conv_t` and `conv_grad`
//! with every nonzero's input offset baked in.
//!
//! The written channels (output channels of `conv`/`conv_grad`, input channels of `conv_t`)
//! are split into chunks of about [`JitOptions::chunk_nnz`] nonzeros, their nonzeros grouped
//! by tap as in [`crate::conv`]. Each chunk's function covers one *tile* of written
//! positions: given the tile's output pointer and its input *base* (where tap `(0, 0)` of
//! plane 0 would read, possibly outside the buffer), it reads each nonzero at the immediate
//! offset `plane·plane_len ± tap shift`, its weight at a baked index of the value array. The
//! Rust side walks the tiles (fixed at compile time: batch and `ld` are) and calls every
//! chunk on one tile before the next, so the tile's input stays in cache.
//!
//! Tiles come in three kinds ([`ConvTile`]):
//! - a run of consecutive positions of one row at `ld = batch` and stride 1 where every tap
//!   is inside: one contiguous span of floats, vectorised across positions (batch 1 too);
//! - one position whose taps are all inside: no checks;
//! - one position with a tap outside (the zero padding, and `conv_t`'s borders): every tap
//!   group is guarded by a branch on the mask argument (bit `kw` and bit `32 + kh` set when
//!   that tap row and column are inside), so taps outside are skipped.
//!
//! `conv_t` at stride `s > 1` reads output position `((h + p − kh)/s, (w + p − kw)/s)` only
//! where that divides: positions fall into `s²` classes by `((h + p) mod s, (w + p) mod s)`,
//! each class reads only the taps congruent to it, at `(⌊(h+p)/s⌋ − ⌊kh/s⌋, …)`, so each
//! class has functions of its own with those taps baked in.
//!
//! `conv_grad` keeps one `f32x4` of partial sums per nonzero (scratch), which every tile's
//! code adds its products to; the lanes are summed into `dW` at the end.

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sparse_ir::{Args, BackendError, ConvGeometry, KernelSpec, Op};

use super::code::{self, ChunkCode, ChunkKey, CodegenConfig, Job};
use super::emit::{self, ChunkOp, ChunkSource, ConvSource, ConvTile, Shape};
use super::{parallel_map, ChunkRun, CompileStats, JitKernel, JitOptions};

/// The signature of a convolution function: `(a, b, out, bias, mask)`.
///
/// | op | `a` | `b` | `out` | `bias` |
/// | --- | --- | --- | --- | --- |
/// | `conv`/`conv_t` | all values | input base of the tile | output of the chunk's first channel at the tile | `bias + first channel` or null |
/// | `conv_grad` | `dY` of the chunk's first channel at the tile | `X` base of the tile | the chunk's partial sums | null |
type ConvFn = unsafe extern "C" fn(*const f32, *const f32, *mut f32, *const f32, u64);

/// One call per chunk: a tile, the function variant that runs it, where it reads and writes.
#[derive(Debug, Clone, Copy)]
struct Call {
    /// Index of the (class, tile kind) variant.
    variant: usize,
    /// Offset (floats) of the tile within a written plane.
    out_off: usize,
    /// Offset (floats, may be negative) of the tile's input base from the input's start.
    in_base: isize,
    /// The tap mask (checked tiles).
    mask: u64,
}

/// A convolution chunk: its written channels, its entries (table order) and the index in
/// the kernel's function list of its code for each variant.
struct Chunk {
    rows: Range<usize>,
    entries: Range<usize>,
    functions: Vec<usize>,
}

/// What a convolution JIT kernel runs: the calls over the tiles and the chunks.
pub(crate) struct ConvPlan {
    grad: bool,
    calls: Vec<Call>,
    chunks: Vec<Chunk>,
    /// Floats of one written plane.
    out_plane: usize,
    /// `conv_grad`: each entry's value index (table order), and the partial sums scratch.
    value_of: Vec<u32>,
    scratch: Mutex<Vec<f32>>,
}

/// The geometry seen from the written side.
struct View {
    g: ConvGeometry,
    backward: bool,
    /// Written and read plane dimensions.
    out_dims: (usize, usize),
    in_dims: (usize, usize),
}

impl View {
    /// The read coordinate for written coordinate `at` under tap offset `tap` along an
    /// axis of length `len`, where it exists (as `crate::conv::Sides`).
    fn axis(&self, at: usize, tap: usize, len: usize) -> Option<usize> {
        let (s, p) = (self.g.stride, self.g.padding);
        let i = if self.backward {
            let shifted = (at + p).checked_sub(tap)?;
            if shifted % s != 0 {
                return None;
            }
            shifted / s
        } else {
            (at * s + tap).checked_sub(p)?
        };
        (i < len).then_some(i)
    }

    /// Classes per axis (`s` for a strided `conv_t`, else 1).
    fn classes(&self) -> usize {
        if self.backward {
            self.g.stride
        } else {
            1
        }
    }

    /// The class of written coordinate `at`, and the read coordinate of its base (tap 0 of
    /// the class shifted out), possibly negative.
    fn class_base(&self, at: usize) -> (usize, isize) {
        let (s, p) = (self.g.stride, self.g.padding);
        if self.backward {
            ((at + p) % s, ((at + p) / s) as isize)
        } else {
            (0, (at * s) as isize - p as isize)
        }
    }

    /// The taps of an axis in class `c`, with their shift from the base.
    fn class_taps(&self, c: usize) -> impl Iterator<Item = (usize, isize)> + '_ {
        let s = self.g.stride;
        (0..self.g.kernel).filter_map(move |t| {
            if self.backward {
                (t % s == c).then_some((t, -((t / s) as isize)))
            } else {
                Some((t, t as isize))
            }
        })
    }

    /// Along one axis at written coordinate `at`: its class, base, the bits of the taps
    /// inside, and whether every tap of its class is inside.
    fn axis_info(&self, at: usize, len: usize) -> (usize, isize, u32, bool) {
        let (c, base) = self.class_base(at);
        let mut bits = 0u32;
        let mut all = true;
        for (t, _) in self.class_taps(c) {
            if self.axis(at, t, len).is_some() {
                bits |= 1 << t;
            } else {
                all = false;
            }
        }
        (c, base, bits, all)
    }
}

/// Compiles a convolution spec (`conv`, `conv_t`, `conv_grad`) at fixed `batch` and `ld`.
pub(super) fn compile(
    spec: &KernelSpec,
    options: &JitOptions,
    cancel: Option<&AtomicBool>,
    batch: usize,
    ld: usize,
    start: Instant,
) -> Result<JitKernel, BackendError> {
    let (unsupported, compile_err) = super::spec_errors(spec);
    let g = *spec.geometry().expect("a convolution spec has a geometry");
    let (backward, grad, bias, relu) = match spec.op() {
        Op::Conv { bias, relu } => (false, false, bias, relu),
        Op::ConvT => (true, false, false, false),
        Op::ConvGrad => (false, true, false, false),
        _ => unreachable!("only conv, conv_t and conv_grad compile here"),
    };
    if g.kernel > 32 {
        return Err(unsupported(format!(
            "a {0}x{0} window does not fit the 32-bit tap masks",
            g.kernel
        )));
    }
    let view = View {
        g,
        backward,
        out_dims: if backward {
            (g.height, g.width)
        } else {
            (g.out_height(), g.out_width())
        },
        in_dims: if backward {
            (g.out_height(), g.out_width())
        } else {
            (g.height, g.width)
        },
    };
    let (oh_n, ow_n) = view.out_dims;
    let (ih_n, iw_n) = view.in_dims;
    let out_plane = oh_n * ow_n * ld;
    let in_plane = ih_n * iw_n * ld;
    let p = spec.pattern();
    let taps = g.kernel * g.kernel;
    let k = g.kernel;

    // The entries (row, tap, plane, value index), sorted: the order of `crate::conv`'s table.
    let rows_n = if backward { g.in_channels } else { p.rows() };
    let mut entries: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(p.nnz());
    for o in 0..p.rows() {
        for e in p.row_range(o) {
            let col = p.col_idx()[e] as usize;
            let (c, t) = (col / taps, col % taps);
            entries.push(if backward { (c, t, o, e) } else { (o, t, c, e) });
        }
    }
    entries.sort_unstable();
    let mut row_start = vec![0usize; rows_n + 1];
    for &(r, ..) in &entries {
        row_start[r + 1] += 1;
    }
    for r in 0..rows_n {
        row_start[r + 1] += row_start[r];
    }

    // The tiles, in the generic kernels' order: row by row, runs where they can be.
    let classes = view.classes();
    let runs_ok = g.stride == 1 && ld == batch;
    // variant = (class_h, class_w, tile); indexed on first use.
    let mut variants: Vec<(usize, usize, ConvTile)> = Vec::new();
    let mut variant_of = |key: (usize, usize, ConvTile)| -> usize {
        match variants.iter().position(|&v| v == key) {
            Some(i) => i,
            None => {
                variants.push(key);
                variants.len() - 1
            }
        }
    };
    let mut calls = Vec::new();
    for h in 0..oh_n {
        let (ch, bh, bits_h, all_h) = view.axis_info(h, ih_n);
        let mut w = 0;
        while w < ow_n {
            let (cw, bw, bits_w, all_w) = view.axis_info(w, iw_n);
            let in_base = (bh * iw_n as isize + bw) * ld as isize;
            let out_off = (h * ow_n + w) * ld;
            if all_h && all_w {
                let mut end = w + 1;
                if runs_ok {
                    while end < ow_n && view.axis_info(end, iw_n).3 {
                        end += 1;
                    }
                }
                let tile = if end - w > 1 {
                    ConvTile::Run {
                        floats: (end - w) * batch,
                    }
                } else {
                    ConvTile::Position { checked: false }
                };
                calls.push(Call {
                    variant: variant_of((ch, cw, tile)),
                    out_off,
                    in_base,
                    mask: 0,
                });
                w = end;
            } else {
                calls.push(Call {
                    variant: variant_of((ch, cw, ConvTile::Position { checked: true })),
                    out_off,
                    in_base,
                    mask: u64::from(bits_w) | (u64::from(bits_h) << 32),
                });
                w += 1;
            }
        }
    }

    // Per entry: its offset from the base in each class (only the class's taps are read).
    let shift_h: Vec<Vec<Option<isize>>> = (0..classes)
        .map(|c| {
            let mut v = vec![None; k];
            for (t, s) in view.class_taps(c) {
                v[t] = Some(s);
            }
            v
        })
        .collect();

    // Chunks of about chunk_nnz entries (plus a little per row), covering every row.
    let mut chunk_rows: Vec<Range<usize>> = Vec::new();
    let mut r0 = 0;
    for r in 0..rows_n {
        let cost = row_start[r + 1] - row_start[r0] + 2 * (r + 1 - r0);
        if cost >= options.chunk_nnz || r + 1 == rows_n {
            chunk_rows.push(r0..r + 1);
            r0 = r + 1;
        }
    }

    // The largest offset the code uses must fit a 32-bit displacement.
    let span = (batch.max(ld) + ow_n * batch) as u128;
    let max_rows = (rows_n.max(g.in_channels).max(p.rows()) + 1) as u128;
    let bound = max_rows * (out_plane.max(in_plane) as u128) + span + 4 * p.nnz() as u128;
    if bound * 4 >= i32::MAX as u128 {
        return Err(unsupported(format!(
            "offsets of this convolution with ld {ld} do not fit 32-bit immediates"
        )));
    }

    let config = CodegenConfig {
        opt_level: options.opt_level,
        regalloc: options.regalloc,
        verifier: options.verifier,
    };
    let isa = code::isa_for(config).map_err(&compile_err)?;
    let shape = Shape {
        batch,
        ld,
        accumulators: options.accumulators,
        block_vectors: options.block_vectors,
        fma: code::has_fma(&*isa),
    };

    // Per (chunk, variant): the source arrays, then the jobs.
    struct Owned {
        row_ptr: Vec<u32>,
        offset: Vec<i64>,
        value: Vec<u32>,
        tap: Vec<(u32, u32)>,
        nnz: usize,
        op: ChunkOp,
    }
    let mut owned: Vec<Owned> = Vec::new();
    let mut chunks: Vec<Chunk> = Vec::new();
    for rows in &chunk_rows {
        let mut functions = Vec::with_capacity(variants.len());
        for &(ch, cw, tile) in &variants {
            let mut o = Owned {
                row_ptr: vec![0],
                offset: Vec::new(),
                value: Vec::new(),
                tap: Vec::new(),
                nnz: 0,
                op: if grad {
                    ChunkOp::ConvGrad { tile }
                } else {
                    ChunkOp::ConvGather { bias, relu, tile }
                },
            };
            for r in rows.clone() {
                for (i, &(_, t, plane, value)) in
                    entries[row_start[r]..row_start[r + 1]].iter().enumerate()
                {
                    let (kh, kw) = (t / k, t % k);
                    let (Some(sh), Some(sw)) = (shift_h[ch][kh], shift_h[cw][kw]) else {
                        continue;
                    };
                    let e = row_start[r] + i;
                    o.offset.push(
                        (plane * in_plane) as i64 + (sh * iw_n as isize + sw) as i64 * ld as i64,
                    );
                    // conv_grad: the entry's partial sums, local to the chunk.
                    o.value.push(if grad {
                        (e - row_start[rows.start]) as u32
                    } else {
                        value as u32
                    });
                    o.tap.push((kh as u32, kw as u32));
                }
                o.row_ptr.push(o.offset.len() as u32);
            }
            o.nnz = o.offset.len();
            functions.push(owned.len());
            owned.push(o);
        }
        chunks.push(Chunk {
            rows: rows.clone(),
            entries: row_start[rows.start]..row_start[rows.end],
            functions,
        });
    }
    let jobs: Vec<Job<'_>> = owned
        .iter()
        .map(|o| {
            let mut content: Vec<u32> = o.row_ptr.clone();
            content.extend(o.offset.iter().flat_map(|&v| [v as u32, (v >> 32) as u32]));
            content.extend_from_slice(&o.value);
            content.extend(o.tap.iter().flat_map(|&(a, b)| [a, b]));
            content.push(out_plane as u32);
            content.push((out_plane >> 32) as u32);
            let hash = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                content.hash(&mut h);
                h.finish()
            };
            Job {
                key: ChunkKey {
                    op: o.op,
                    shape,
                    opt_level: options.opt_level,
                    regalloc: options.regalloc,
                    hash,
                    rows: o.row_ptr.len() - 1,
                    cols: out_plane,
                    nnz: o.nnz,
                },
                content,
                src: ChunkSource {
                    row_ptr: &[],
                    col_idx: &[],
                    value_pos: None,
                    cols: 0,
                    conv: Some(ConvSource {
                        row_ptr: &o.row_ptr,
                        offset: &o.offset,
                        value: &o.value,
                        tap: &o.tap,
                        out_plane,
                    }),
                },
            }
        })
        .collect();

    // Compile (or reuse live code of the same content).
    let mut resolved: Vec<Option<Arc<ChunkCode>>> = jobs
        .iter()
        .map(|j| {
            options
                .use_cache
                .then(|| code::lookup(&j.key, &j.content))
                .flatten()
        })
        .collect();
    let reused: Vec<bool> = resolved.iter().map(Option::is_some).collect();
    let to_compile: Vec<usize> = (0..jobs.len()).filter(|&i| !reused[i]).collect();
    let threads = options.threads.min(to_compile.len()).max(1);
    let capture = code::Capture {
        clif: options.capture_clif,
        disasm: options.capture_disasm,
    };
    let results = parallel_map(&to_compile, threads, |fctx, ctx, i| {
        if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            return Err("cancelled".to_string());
        }
        code::compile_job(&*isa, fctx, ctx, i as u32, &jobs[i], capture)
    });
    for (&i, result) in to_compile.iter().zip(results) {
        let c = result.map_err(|m| compile_err(format!("function {i}: {m}")))?;
        resolved[i] = Some(if options.use_cache {
            code::publish(c)
        } else {
            c
        });
    }
    let compiled_nnz = to_compile.iter().map(|&i| jobs[i].key.nnz).sum();
    let mut runs: Vec<ChunkRun> = Vec::with_capacity(jobs.len());
    for chunk in &chunks {
        for &f in &chunk.functions {
            runs.push(ChunkRun {
                code: resolved[f].clone().expect("every function resolved"),
                rows: chunk.rows.clone(),
                nnz: chunk.entries.clone(),
                a_off: 0,
                out_off: 0,
                bias_off: 0,
                reused: reused[f],
            });
        }
    }
    let stats = CompileStats {
        functions: runs.len(),
        compiled: to_compile.len(),
        reused: reused.iter().filter(|&&r| r).count(),
        shared: 0,
        nnz: p.nnz(),
        compiled_nnz,
        code_bytes: runs.iter().map(|c| c.code.code_len()).sum(),
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
        threads,
    };
    // A gather's single-position code stores whole blocks, over the padding where `ld`
    // leaves room for it (as `spmm`'s); runs exist only at `ld = batch`.
    let writes_padding = !grad
        && variants
            .iter()
            .any(|v| matches!(v.2, ConvTile::Position { .. }))
        && emit::plan_passes(batch, ld, options.block_vectors)
            .iter()
            .any(|p| p.start + p.count * 4 * p.vectors + p.scalars > batch);
    Ok(JitKernel {
        spec: spec.clone(),
        chunks: runs,
        stats,
        writes_padding,
        conv: Some(ConvPlan {
            grad,
            calls,
            chunks,
            out_plane,
            value_of: entries.iter().map(|e| e.3 as u32).collect(),
            scratch: Mutex::new(Vec::new()),
        }),
    })
}

impl ConvPlan {
    /// Runs every call on arguments that `Args::check` accepted for the kernel's spec.
    pub(super) fn run(&self, functions: &[ChunkRun], args: Args<'_, [f32]>) {
        let entry = |chunk: &Chunk, variant: usize| -> ConvFn {
            let code = &functions[chunk.functions[variant]].code;
            // SAFETY: the code was generated with the convolution signature (`ChunkOp::
            // is_conv`: five arguments, pointers and a u64, C calling convention) and is
            // alive as long as `functions`, which outlives every call below.
            unsafe { std::mem::transmute::<*const u8, ConvFn>(code.entry()) }
        };
        let gather = match args {
            Args::Spmm { values, x, bias, y } => Ok((values, x, bias, y)),
            Args::SpmmT { values, dy, dx } => Ok((values, dy, None, dx)),
            other => Err(other),
        };
        match gather {
            Ok((values, input, bias, out)) => {
                debug_assert!(!self.grad);
                let bias = bias.map_or(std::ptr::null(), <[f32]>::as_ptr);
                for call in &self.calls {
                    for chunk in &self.chunks {
                        let f = entry(chunk, call.variant);
                        let out_off = chunk.rows.start * self.out_plane + call.out_off;
                        let y = out[out_off..].as_mut_ptr();
                        // SAFETY: `Args::check` proved every buffer as long as the spec says
                        // (values `nnz`, input `in_features·ld`, output `out_features·ld`,
                        // bias one per written channel). The code reads the values at baked
                        // indices < nnz; the input at `base + offset + column` only for taps
                        // inside the input (the tile's kind or its mask guarantees it), which
                        // is `plane·plane_len + position·ld + column` with the column below
                        // `ld` (or a run's span): inside the input, although the base itself
                        // may not be, hence `wrapping_offset`; the output at
                        // `r·out_plane + column` for the chunk's rows, inside the output from
                        // `out_off` (sliced above); the bias at the chunk's rows.
                        unsafe {
                            f(
                                values.as_ptr(),
                                input.as_ptr().wrapping_offset(call.in_base),
                                y,
                                if bias.is_null() {
                                    bias
                                } else {
                                    bias.add(chunk.rows.start)
                                },
                                call.mask,
                            );
                        }
                    }
                }
            }
            Err(Args::Sddmm { dy, x, dw }) => {
                debug_assert!(self.grad);
                let mut fresh = Vec::new();
                let mut guard = self.scratch.try_lock();
                let partial = match guard.as_deref_mut() {
                    Ok(s) => s,
                    Err(_) => &mut fresh,
                };
                partial.clear();
                partial.resize(4 * self.value_of.len(), 0.0);
                for call in &self.calls {
                    for chunk in &self.chunks {
                        let f = entry(chunk, call.variant);
                        let dy_off = chunk.rows.start * self.out_plane + call.out_off;
                        let part = partial[4 * chunk.entries.start..].as_mut_ptr();
                        // SAFETY: as for the gather: `dy` (sliced) holds the chunk's rows at
                        // the tile, `x` is read only at taps inside, at columns of the tile
                        // (never the padding); `part` holds four floats per entry of the
                        // chunk (the scratch has four per entry of the kernel).
                        unsafe {
                            f(
                                dy[dy_off..].as_ptr(),
                                x.as_ptr().wrapping_offset(call.in_base),
                                part,
                                std::ptr::null(),
                                call.mask,
                            );
                        }
                    }
                }
                for (e, &v) in self.value_of.iter().enumerate() {
                    dw[v as usize] = partial[4 * e..4 * e + 4].iter().sum();
                }
            }
            _ => unreachable!("Args::check matched the op"),
        }
    }
}
