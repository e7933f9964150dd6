//! CLIF generators: one function per row chunk, with the chunk's pattern baked in.
//!
//! Every generated function has the signature
//! `extern "C" fn(a: *const f32, b: *const f32, out: *mut f32, bias: *const f32)` and reads
//! and writes only through these pointers at immediate offsets computed from the pattern, the
//! batch and the row stride `ld` it was compiled for:
//!
//! | op | `a` | `b` | `out` | `bias` |
//! | --- | --- | --- | --- | --- |
//! | `spmm` | values of the chunk (`values + nnz.start`) | `x` | `y + rows.start·ld` | `bias + rows.start` or null |
//! | `spmm_t` | all values (positions from `value_index`) | `dy` | `dx + rows.start·ld` (rows of `Wᵀ`) | null |
//! | `sddmm` | `dy + rows.start·ld` | `x` | `dw + nnz.start` | null |
//!
//! ## Code shapes
//!
//! `spmm` and `spmm_t` walk the chunk row by row in straight-line code: the nonzeros of a row
//! feed `accumulators` independent accumulator sets (round robin) that are summed at the end
//! of the row, so the FMA latency chains interleave. The batch is covered by *passes*
//! ([`plan_passes`]): batch 1 is a single scalar pass; wider batches run the chunk's code in a
//! loop over blocks of up to `block_vectors` `f32x4` vectors (each weight is loaded once and
//! splatted per block), and when `ld` leaves room the last block simply runs over the padding
//! columns `batch..ld` (allowed: kernels leave padding unspecified), so no scalar tail is
//! needed; otherwise the remainder gets a pass of its own (vectors, then scalars).
//!
//! `sddmm` computes one dot product per nonzero over the batch: batch 1 is a scalar product;
//! batches under 16 keep the `dY` row in registers for the whole row; wider batches run a loop
//! over 16-float blocks per nonzero with four vector accumulators. It never reads padding
//! columns (they would pollute the sums).

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{
    AbiParam, BlockArg, ConstantData, Function, InstBuilder, MemFlagsData, Signature, UserFuncName,
    Value,
};
use cranelift_codegen::isa::TargetIsa;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

/// Which op a chunk function computes (with the `spmm` epilogue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ChunkOp {
    /// `Y = W·X (+ bias) (ReLU)` over the chunk's rows.
    Spmm { bias: bool, relu: bool },
    /// `dX = Wᵀ·dY` over the chunk's rows of `Wᵀ` (values at baked positions).
    SpmmT,
    /// `dW[k] = Σ_b dY[r_k, b]·X[c_k, b]` over the chunk's nonzeros.
    Sddmm,
}

/// The parameters that shape the generated code (all part of the chunk cache key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    /// Batch size the code is compiled for.
    pub batch: usize,
    /// Row stride of every activation matrix.
    pub ld: usize,
    /// Accumulator sets per row (`spmm`, `spmm_t`), 1 to 4.
    pub accumulators: usize,
    /// `f32x4` vectors per batch block, 1 to 4.
    pub block_vectors: usize,
    /// Whether the target has FMA (otherwise multiply and add).
    pub fma: bool,
}

/// One chunk's structure as the generator sees it.
pub(crate) struct ChunkSource<'a> {
    /// The chunk's row pointers (`rows + 1` entries) into the layer's arrays.
    pub row_ptr: &'a [u32],
    /// Column indices of the chunk's nonzeros.
    pub col_idx: &'a [u32],
    /// For `spmm_t`: the position in the value array of each nonzero; otherwise the values are
    /// read in order from the chunk's own start.
    pub value_pos: Option<&'a [u32]>,
    /// Columns of the (possibly transposed) pattern: bounds the input offsets.
    pub cols: usize,
}

impl ChunkSource<'_> {
    /// Rows of the chunk.
    pub fn rows(&self) -> usize {
        self.row_ptr.len() - 1
    }

    /// Positions in `col_idx` (and `value_pos`) of local row `r`.
    pub fn row_range(&self, r: usize) -> std::ops::Range<usize> {
        let base = self.row_ptr[0];
        (self.row_ptr[r] - base) as usize..(self.row_ptr[r + 1] - base) as usize
    }
}

/// A run of batch columns processed by one copy of the chunk's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pass {
    /// First batch column.
    pub start: usize,
    /// `f32x4` vectors per iteration.
    pub vectors: usize,
    /// Scalar columns per iteration, after the vectors.
    pub scalars: usize,
    /// Iterations (each advances by `4·vectors` columns when more than one).
    pub count: usize,
}

#[cfg(test)]
impl Pass {
    fn width(&self) -> usize {
        4 * self.vectors + self.scalars
    }
}

/// Splits `batch` columns into passes for `spmm`/`spmm_t` (see the module doc).
pub(crate) fn plan_passes(batch: usize, ld: usize, block_vectors: usize) -> Vec<Pass> {
    if batch == 1 {
        return vec![Pass {
            start: 0,
            vectors: 0,
            scalars: 1,
            count: 1,
        }];
    }
    let g = block_vectors.clamp(1, 4).min(batch.div_ceil(4));
    let w = 4 * g;
    let n = batch.div_ceil(w);
    if n * w <= ld {
        return vec![Pass {
            start: 0,
            vectors: g,
            scalars: 0,
            count: n,
        }];
    }
    let mut passes = Vec::new();
    let full = batch / w;
    if full > 0 {
        passes.push(Pass {
            start: 0,
            vectors: g,
            scalars: 0,
            count: full,
        });
    }
    let start = full * w;
    let rem = batch - start;
    if rem > 0 {
        let v = rem.div_ceil(4);
        passes.push(if start + 4 * v <= ld {
            Pass {
                start,
                vectors: v,
                scalars: 0,
                count: 1,
            }
        } else {
            Pass {
                start,
                vectors: rem / 4,
                scalars: rem % 4,
                count: 1,
            }
        });
    }
    passes
}

/// The largest byte offset the code may use must fit a 32-bit immediate.
pub(crate) fn offsets_fit(src: &ChunkSource<'_>, shape: &Shape, out_rows: usize) -> bool {
    let max_elems = (src.cols.max(out_rows) as u128 + 1) * shape.ld as u128 + 64;
    let nnz_bound = src.value_pos.map_or(src.col_idx.len(), |p| {
        p.iter().map(|&v| v as usize + 1).max().unwrap_or(0)
    }) as u128;
    max_elems.max(nnz_bound) * 4 < i32::MAX as u128
}

/// The signature every chunk function has.
pub(crate) fn signature(isa: &dyn TargetIsa) -> Signature {
    let mut sig = Signature::new(isa.default_call_conv());
    for _ in 0..4 {
        sig.params.push(AbiParam::new(I64));
    }
    sig
}

/// Builds the CLIF function of one chunk.
pub(crate) fn build_function(
    isa: &dyn TargetIsa,
    fctx: &mut FunctionBuilderContext,
    index: u32,
    op: ChunkOp,
    src: &ChunkSource<'_>,
    shape: &Shape,
) -> Function {
    let mut func = Function::with_name_signature(UserFuncName::user(0, index), signature(isa));
    {
        let mut b = FunctionBuilder::new(&mut func, fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let params = b.block_params(entry).to_vec();
        let mut e = Emitter {
            b: &mut b,
            shape: *shape,
            flags: mem_flags(),
        };
        match op {
            ChunkOp::Spmm { bias, relu } => {
                let epi = Epilogue {
                    bias: bias.then_some(params[3]),
                    relu,
                };
                e.spmm(src, params[0], params[1], params[2], epi);
            }
            ChunkOp::SpmmT => {
                e.spmm(src, params[0], params[1], params[2], Epilogue::NONE);
            }
            ChunkOp::Sddmm => e.sddmm(src, params[0], params[1], params[2]),
        }
        e.b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(isa.frontend_config());
    }
    func
}

/// Accesses never trap (every offset is in bounds once `Args::check` passed) and are only
/// element-aligned.
fn mem_flags() -> MemFlagsData {
    let mut f = MemFlagsData::new();
    f.set_notrap();
    f
}

/// A pointer walked through in order, with its current base (see [`Emitter::rebased`]).
#[derive(Clone, Copy)]
struct Rebased {
    /// The current base: `origin + 4·base`.
    ptr: Value,
    /// Element index of `ptr`.
    base: usize,
}

impl Rebased {
    fn new(origin: Value) -> Self {
        Rebased {
            ptr: origin,
            base: 0,
        }
    }
}

#[derive(Clone, Copy)]
struct Epilogue {
    bias: Option<Value>,
    relu: bool,
}

impl Epilogue {
    const NONE: Epilogue = Epilogue {
        bias: None,
        relu: false,
    };
}

struct Emitter<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    shape: Shape,
    flags: MemFlagsData,
}

fn off(elems: usize) -> i32 {
    i32::try_from(elems * 4).expect("offsets checked by offsets_fit")
}

impl Emitter<'_, '_> {
    fn load(&mut self, ty: cranelift_codegen::ir::Type, base: Value, elems: usize) -> Value {
        self.b.ins().load(ty, self.flags, base, off(elems))
    }

    fn store(&mut self, v: Value, base: Value, elems: usize) {
        self.b.ins().store(self.flags, v, base, off(elems));
    }

    /// The base register and byte offset for element `elems` of the array `rb` walks through
    /// in order: the base moves forward whenever the offset would leave the range of a one-byte
    /// displacement, which saves three bytes of code per access. The new base is computed with
    /// `isub` of a negative constant, which instruction selection does not fold back into a
    /// 32-bit displacement (it folds `iadd`).
    fn rebased(&mut self, rb: &mut Rebased, elems: usize) -> (Value, i32) {
        let rel = elems as i64 - rb.base as i64;
        if (-32..32).contains(&rel) {
            return (rb.ptr, (rel * 4) as i32);
        }
        let base = elems + 32;
        let minus = self
            .b
            .ins()
            .iconst(I64, -4 * (base as i64 - rb.base as i64));
        let ptr = self.b.ins().isub(rb.ptr, minus);
        *rb = Rebased { ptr, base };
        (ptr, -128)
    }

    /// `acc + a·b`, or `a·b` when there is no accumulator yet.
    fn mul_add(&mut self, a: Value, b: Value, acc: Option<Value>) -> Value {
        match acc {
            None => self.b.ins().fmul(a, b),
            Some(acc) if self.shape.fma => self.b.ins().fma(a, b, acc),
            Some(acc) => {
                let p = self.b.ins().fmul(a, b);
                self.b.ins().fadd(acc, p)
            }
        }
    }

    fn zero(&mut self, vector: bool) -> Value {
        if vector {
            self.zero_vector(F32X4)
        } else {
            self.b.ins().f32const(0.0)
        }
    }

    /// An all-zero vector (`pxor`).
    fn zero_vector(&mut self, ty: cranelift_codegen::ir::Type) -> Value {
        let c = self
            .b
            .func
            .dfg
            .constants
            .insert(ConstantData::from(vec![0u8; 16]));
        self.b.ins().vconst(ty, c)
    }

    /// `max(v, 0)` without branches, as a signed integer maximum with 0 of the bits: a float
    /// with the sign bit set is a negative integer. Written so that `v` has a single use:
    /// Cranelift stops merging loads into instructions anywhere upstream of a value that is
    /// used twice.
    fn relu(&mut self, v: Value, vector: bool) -> Value {
        let (ity, fty) = if vector { (I32X4, F32X4) } else { (I32, F32) };
        let i = self.b.ins().bitcast(ity, MemFlagsData::new(), v);
        let zero = if vector {
            self.zero_vector(I32X4)
        } else {
            self.b.ins().iconst(I32, 0)
        };
        let r = self.b.ins().smax(i, zero);
        self.b.ins().bitcast(fty, MemFlagsData::new(), r)
    }

    fn sum_tree(&mut self, mut vals: Vec<Value>) -> Option<Value> {
        while vals.len() > 1 {
            let mut next = Vec::with_capacity(vals.len().div_ceil(2));
            for pair in vals.chunks(2) {
                next.push(if pair.len() == 2 {
                    self.b.ins().fadd(pair[0], pair[1])
                } else {
                    pair[0]
                });
            }
            vals = next;
        }
        vals.pop()
    }

    fn spmm(&mut self, src: &ChunkSource<'_>, values: Value, x: Value, y: Value, epi: Epilogue) {
        let Shape { batch, ld, .. } = self.shape;
        for pass in plan_passes(batch, ld, self.shape.block_vectors) {
            if pass.count == 1 {
                self.spmm_rows(src, values, x, y, epi, pass);
                continue;
            }
            // do { rows at (xp, yp) } while (xp, yp += 4·vectors floats) != the end
            let step = 16 * pass.vectors as i64;
            let body = self.b.create_block();
            let exit = self.b.create_block();
            let xp = self.b.append_block_param(body, I64);
            let yp = self.b.append_block_param(body, I64);
            let x_end = self.b.ins().iadd_imm_s(x, step * pass.count as i64);
            self.b.ins().jump(body, &[x.into(), y.into()]);
            self.b.switch_to_block(body);
            self.spmm_rows(src, values, xp, yp, epi, pass);
            let x_next = self.b.ins().iadd_imm_s(xp, step);
            let y_next = self.b.ins().iadd_imm_s(yp, step);
            let more = self.b.ins().icmp(IntCC::NotEqual, x_next, x_end);
            self.b
                .ins()
                .brif(more, body, &[x_next.into(), y_next.into()], exit, &[]);
            self.b.switch_to_block(exit);
        }
    }

    /// One pass over every row of the chunk, at batch columns `pass.start..+width`.
    fn spmm_rows(
        &mut self,
        src: &ChunkSource<'_>,
        values: Value,
        x: Value,
        y: Value,
        epi: Epilogue,
        pass: Pass,
    ) {
        let ld = self.shape.ld;
        let lanes = pass.vectors + pass.scalars;
        let sets = self.shape.accumulators.clamp(1, 4).min((12 / lanes).max(1));
        let mut vals = Rebased::new(values);
        for r in 0..src.rows() {
            let range = src.row_range(r);
            // acc[set][lane]
            let mut acc: Vec<Vec<Option<Value>>> = vec![vec![None; lanes]; sets];
            for (j, k) in range.enumerate() {
                let c = src.col_idx[k] as usize;
                let pos = src.value_pos.map_or(k, |p| p[k] as usize);
                let w = match src.value_pos {
                    // values in CSR order: walk through them with short displacements
                    None => {
                        let (ptr, disp) = self.rebased(&mut vals, pos);
                        self.b.ins().load(F32, self.flags, ptr, disp)
                    }
                    Some(_) => self.load(F32, values, pos),
                };
                let set = j % sets;
                if pass.vectors > 0 {
                    let wv = self.b.ins().splat(F32X4, w);
                    for (l, a) in acc[set][..pass.vectors].iter_mut().enumerate() {
                        let xv = self.load(F32X4, x, c * ld + pass.start + 4 * l);
                        *a = Some(self.mul_add(wv, xv, *a));
                    }
                }
                for s in 0..pass.scalars {
                    let xs = self.load(F32, x, c * ld + pass.start + 4 * pass.vectors + s);
                    let l = pass.vectors + s;
                    acc[set][l] = Some(self.mul_add(w, xs, acc[set][l]));
                }
            }
            let bias = epi.bias.map(|bias_ptr| self.load(F32, bias_ptr, r));
            for l in 0..lanes {
                let vector = l < pass.vectors;
                let parts: Vec<Value> = acc.iter().filter_map(|set| set[l]).collect();
                let mut v = match self.sum_tree(parts) {
                    Some(v) => v,
                    None => self.zero(vector),
                };
                if let Some(bv) = bias {
                    let bv = if vector {
                        self.b.ins().splat(F32X4, bv)
                    } else {
                        bv
                    };
                    v = self.b.ins().fadd(v, bv);
                }
                if epi.relu {
                    v = self.relu(v, vector);
                }
                let col = if vector {
                    pass.start + 4 * l
                } else {
                    pass.start + 4 * pass.vectors + (l - pass.vectors)
                };
                self.store(v, y, r * ld + col);
            }
        }
    }

    fn hsum(&mut self, v: Value) -> Value {
        let lanes: Vec<Value> = (0..4).map(|i| self.b.ins().extractlane(v, i)).collect();
        self.sum_tree(lanes).expect("four lanes")
    }

    fn sddmm(&mut self, src: &ChunkSource<'_>, dy: Value, x: Value, dw: Value) {
        let Shape { batch, ld, .. } = self.shape;
        let blocks16 = batch / 16;
        let rest_vectors = (batch % 16) / 4;
        let scalars = batch % 4;
        let tail = 16 * blocks16; // first column after the 16-float blocks
        let mut dws = Rebased::new(dw);
        for r in 0..src.rows() {
            let range = src.row_range(r);
            if range.is_empty() {
                continue;
            }
            let dy_row = r * ld;
            // Below 16 columns the whole dY row lives in registers for the row.
            let cached: Option<Vec<Value>> = (blocks16 == 0).then(|| {
                let mut v: Vec<Value> = (0..rest_vectors)
                    .map(|l| self.load(F32X4, dy, dy_row + 4 * l))
                    .collect();
                v.extend((0..scalars).map(|s| self.load(F32, dy, dy_row + 4 * rest_vectors + s)));
                v
            });
            for k in range {
                let x_row = src.col_idx[k] as usize * ld;
                let mut accs: Vec<Option<Value>> = vec![None; 4];
                if blocks16 == 1 {
                    for (l, acc) in accs.iter_mut().enumerate() {
                        let d = self.load(F32X4, dy, dy_row + 4 * l);
                        let xv = self.load(F32X4, x, x_row + 4 * l);
                        *acc = Some(self.mul_add(d, xv, None));
                    }
                } else if blocks16 > 1 {
                    let body = self.b.create_block();
                    let exit = self.b.create_block();
                    let o = self.b.append_block_param(body, I64);
                    let mut params = vec![o];
                    for _ in 0..4 {
                        params.push(self.b.append_block_param(body, F32X4));
                    }
                    for _ in 0..4 {
                        self.b.append_block_param(exit, F32X4);
                    }
                    let zero = self.b.ins().iconst(I64, 0);
                    let zv = self.zero(true);
                    self.b.ins().jump(
                        body,
                        &[zero.into(), zv.into(), zv.into(), zv.into(), zv.into()],
                    );
                    self.b.switch_to_block(body);
                    let dyo = self.b.ins().iadd(dy, o);
                    let xo = self.b.ins().iadd(x, o);
                    let mut next_accs = Vec::with_capacity(4);
                    for l in 0..4 {
                        let d = self.load(F32X4, dyo, dy_row + 4 * l);
                        let xv = self.load(F32X4, xo, x_row + 4 * l);
                        next_accs.push(self.mul_add(d, xv, Some(params[1 + l])));
                    }
                    let next = self.b.ins().iadd_imm_s(o, 64);
                    let more = self
                        .b
                        .ins()
                        .icmp_imm_s(IntCC::NotEqual, next, 64 * blocks16 as i64);
                    let mut args: Vec<BlockArg> = vec![next.into()];
                    args.extend(next_accs.iter().map(|&v| BlockArg::from(v)));
                    let exit_args: Vec<BlockArg> = next_accs.iter().map(|&v| v.into()).collect();
                    self.b.ins().brif(more, body, &args, exit, &exit_args);
                    self.b.switch_to_block(exit);
                    let out = self.b.block_params(exit).to_vec();
                    for (acc, v) in accs.iter_mut().zip(out) {
                        *acc = Some(v);
                    }
                }
                // the remaining vectors, then scalars
                for l in 0..rest_vectors {
                    let d = match &cached {
                        Some(c) => c[l],
                        None => self.load(F32X4, dy, dy_row + tail + 4 * l),
                    };
                    let xv = self.load(F32X4, x, x_row + tail + 4 * l);
                    accs[l] = Some(self.mul_add(d, xv, accs[l]));
                }
                let vec_parts: Vec<Value> = accs.iter().flatten().copied().collect();
                let mut parts = Vec::new();
                if let Some(v) = self.sum_tree(vec_parts) {
                    parts.push(self.hsum(v));
                }
                for s in 0..scalars {
                    let d = match &cached {
                        Some(c) => c[rest_vectors + s],
                        None => self.load(F32, dy, dy_row + tail + 4 * rest_vectors + s),
                    };
                    let xs = self.load(F32, x, x_row + tail + 4 * rest_vectors + s);
                    parts.push(self.b.ins().fmul(d, xs));
                }
                let v = self.sum_tree(parts).expect("batch ≥ 1");
                let (ptr, disp) = self.rebased(&mut dws, k);
                self.b.ins().store(self.flags, v, ptr, disp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cover(batch: usize, ld: usize, g: usize) -> Vec<bool> {
        let mut seen = vec![false; ld];
        for p in plan_passes(batch, ld, g) {
            let stride = if p.count > 1 { 4 * p.vectors } else { 0 };
            for i in 0..p.count {
                for c in 0..p.width() {
                    let col = p.start + i * stride + c;
                    assert!(col < ld, "batch {batch} ld {ld}: column {col} beyond ld");
                    assert!(!seen[col], "batch {batch} ld {ld}: column {col} twice");
                    seen[col] = true;
                }
            }
        }
        seen
    }

    #[test]
    fn passes_cover_the_batch_within_ld() {
        for batch in 1..70 {
            for ld in batch..batch + 20 {
                for g in 1..=4 {
                    let seen = cover(batch, ld, g);
                    assert!(
                        seen[..batch].iter().all(|&s| s),
                        "batch {batch} ld {ld} g {g}"
                    );
                }
            }
        }
        assert_eq!(plan_passes(100, 112, 4).len(), 1);
        assert_eq!(plan_passes(17, 17, 4).len(), 2);
    }
}
