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
//! `sddmm` computes one dot product per nonzero over the batch and never reads padding columns
//! (they would pollute the sums). Below 16 columns the `dY` row stays in registers for the
//! row, each nonzero is one FMA chain, and the sums of four consecutive nonzeros are reduced
//! together (a 4×4 transpose folded into the additions) and stored as one vector. From 16
//! columns on, each row runs a loop over 16-column blocks whose body holds the `dY` block in
//! registers and adds four products per nonzero to a partial sum in a stack slot, so the
//! row's code stays small and hot in the instruction cache.
//!
//! Cranelift merges a load into the instruction using it only if the loaded value, and every
//! value computed from it, is used once; the generators keep to that (ReLU is an integer
//! maximum rather than a sign mask, for instance) wherever the shape allows.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64, I8X16};
use cranelift_codegen::ir::{
    AbiParam, Block, ConstantData, Endianness, Function, InstBuilder, MemFlagsData, Signature,
    StackSlotData, StackSlotKind, UserFuncName, Value,
};
use cranelift_codegen::isa::TargetIsa;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

/// Which op a chunk function computes (with the `spmm` epilogue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ChunkOp {
    /// `Y = W·X (+ bias) (ReLU)` over the chunk's rows.
    Spmm { bias: bool, relu: bool },
    /// `dX = Wᵀ·dY` over the chunk's rows of `Wᵀ` (values at baked positions).
    SpmmT,
    /// `dW[k] = Σ_b dY[r_k, b]·X[c_k, b]` over the chunk's nonzeros.
    Sddmm,
    /// `conv`/`conv_t` over one tile of written positions: every written channel of the
    /// chunk `= Σ w · input at a baked offset` (+ bias) (ReLU).
    ConvGather {
        bias: bool,
        relu: bool,
        tile: ConvTile,
    },
    /// `conv_grad` over one tile of written positions: every entry's partial sums (one
    /// `f32x4` each) `+= dY tile · X tile at the entry's baked offset`.
    ConvGrad { tile: ConvTile },
}

impl ChunkOp {
    /// Whether the function takes the fifth argument, the tap mask (the convolutions).
    pub(crate) fn is_conv(self) -> bool {
        matches!(self, ChunkOp::ConvGather { .. } | ChunkOp::ConvGrad { .. })
    }
}

/// The written positions a convolution function covers per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ConvTile {
    /// One position (`batch` floats of row stride `ld`). `checked`: each tap group runs
    /// only where the mask argument says the tap is inside the input (bit `kw` and bit
    /// `32 + kh`); unchecked code runs every tap.
    Position { checked: bool },
    /// A run of consecutive positions at `ld = batch`, `floats` contiguous floats, every
    /// tap inside for each of them.
    Run { floats: usize },
}

/// One convolution chunk: consecutive written channels and their entries, grouped by tap.
pub(crate) struct ConvSource<'a> {
    /// Local row pointers into the entries (`rows + 1`, from 0).
    pub row_ptr: &'a [u32],
    /// Per entry: element offset of what it reads from the position's input base (the read
    /// plane's start plus the tap's shift; may be negative).
    pub offset: &'a [i64],
    /// Per entry: `conv`/`conv_t`: position of its weight in the value array.
    pub value: &'a [u32],
    /// Per entry: its tap `(kh, kw)`.
    pub tap: &'a [(u32, u32)],
    /// Floats of one written plane (the row stride of the output).
    pub out_plane: usize,
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
    /// The convolution chunk (the fields above are then empty).
    pub conv: Option<ConvSource<'a>>,
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
/// Matrix ops take four pointers; convolutions also take the tap mask (a `u64`).
pub(crate) fn signature(isa: &dyn TargetIsa, op: ChunkOp) -> Signature {
    let mut sig = Signature::new(isa.default_call_conv());
    for _ in 0..if op.is_conv() { 5 } else { 4 } {
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
    let mut func = Function::with_name_signature(UserFuncName::user(0, index), signature(isa, op));
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
            ChunkOp::Sddmm if shape.batch >= 16 => {
                e.sddmm_wide(src, params[0], params[1], params[2])
            }
            ChunkOp::Sddmm => e.sddmm(src, params[0], params[1], params[2]),
            ChunkOp::ConvGather { bias, relu, tile } => {
                let cs = src.conv.as_ref().expect("a convolution chunk");
                let epi = Epilogue {
                    bias: bias.then_some(params[3]),
                    relu,
                };
                let mask =
                    matches!(tile, ConvTile::Position { checked: true }).then_some(params[4]);
                let passes = e.conv_passes(tile, true);
                let ptrs = [params[0], params[1], params[2]];
                e.conv_loop(&passes, ptrs, [false, true, true], |e, p, pass| {
                    e.conv_rows(cs, p[0], p[1], p[2], epi, mask, pass)
                });
            }
            ChunkOp::ConvGrad { tile } => {
                let cs = src.conv.as_ref().expect("a convolution chunk");
                let mask =
                    matches!(tile, ConvTile::Position { checked: true }).then_some(params[4]);
                let passes = e.conv_passes(tile, false);
                let ptrs = [params[0], params[1], params[2]];
                e.conv_loop(&passes, ptrs, [true, true, false], |e, p, pass| {
                    e.conv_grad_rows(cs, p[0], p[1], p[2], mask, pass)
                });
            }
        }
        e.b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(isa.frontend_config());
    }
    func
}

/// Nonzeros of a row whose partial sums `sddmm` keeps on the stack at a time (2 KiB).
const SDDMM_SEGMENT: usize = 128;

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

fn off_signed(elems: i64) -> i32 {
    i32::try_from(elems * 4).expect("offsets checked by conv_offsets_fit")
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

    /// `acc + a·b`, or `a·b` when there is no accumulator yet. x64 writes an FMA's result
    /// over `a`'s register (Cranelift uses the 213 and 132 forms), so `a` should be the
    /// operand used once (a freshly loaded input) and `b` the one kept in a register:
    /// otherwise every FMA needs a register copy first (`sddmm` at batch 8 had one per
    /// nonzero, 9 % of its code).
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

    fn load_at(&mut self, ty: cranelift_codegen::ir::Type, base: Value, elems: i64) -> Value {
        self.b.ins().load(ty, self.flags, base, off_signed(elems))
    }

    /// The passes of a convolution tile: one position at (`batch`, `ld`) (a gather's last
    /// block may run over the padding, as `spmm`'s; the gradient's never reads it), or a
    /// run's contiguous floats.
    fn conv_passes(&self, tile: ConvTile, gather: bool) -> Vec<Pass> {
        let Shape { batch, ld, .. } = self.shape;
        match tile {
            ConvTile::Position { .. } if gather => plan_passes(batch, ld, self.shape.block_vectors),
            ConvTile::Position { .. } => plan_passes(batch, batch, 1),
            ConvTile::Run { floats } if gather => {
                plan_passes(floats, floats, self.shape.block_vectors)
            }
            ConvTile::Run { floats } => plan_passes(floats, floats, 1),
        }
    }

    /// Runs `body` once per pass; a pass of several blocks loops, advancing the pointers
    /// that move with the columns (`moving`) by a block each time.
    fn conv_loop(
        &mut self,
        passes: &[Pass],
        ptrs: [Value; 3],
        moving: [bool; 3],
        mut body: impl FnMut(&mut Self, [Value; 3], Pass),
    ) {
        for &pass in passes {
            if pass.count == 1 {
                body(self, ptrs, pass);
                continue;
            }
            // do { body(p) } while (p += 4·vectors floats, for the moving ones) != the end
            let step = 16 * pass.vectors as i64;
            let blk = self.b.create_block();
            let exit = self.b.create_block();
            let mut p = ptrs;
            for (i, v) in p.iter_mut().enumerate() {
                if moving[i] {
                    *v = self.b.append_block_param(blk, I64);
                }
            }
            let lead = moving.iter().position(|&m| m).expect("a moving pointer");
            let end = self
                .b
                .ins()
                .iadd_imm_s(ptrs[lead], step * pass.count as i64);
            let args: Vec<_> = (0..3)
                .filter(|&i| moving[i])
                .map(|i| ptrs[i].into())
                .collect();
            self.b.ins().jump(blk, &args);
            self.b.switch_to_block(blk);
            body(self, p, pass);
            let next: Vec<Value> = (0..3)
                .filter(|&i| moving[i])
                .map(|i| self.b.ins().iadd_imm_s(p[i], step))
                .collect();
            let more = self.b.ins().icmp(IntCC::NotEqual, next[0], end);
            let args: Vec<_> = next.iter().map(|&v| v.into()).collect();
            self.b.ins().brif(more, blk, &args, exit, &[]);
            self.b.switch_to_block(exit);
        }
    }

    /// Opens the code of a tap group: with a mask, a block entered only when both of the
    /// tap's bits are set; returns the block that follows (to jump to after the group).
    fn conv_group_open(&mut self, mask: Option<Value>, (kh, kw): (u32, u32)) -> Option<Block> {
        let mask = mask?;
        let bits = (1i64 << kw) | (1i64 << (32 + kh));
        let t = self.b.ins().band_imm_s(mask, bits);
        let inside = self.b.ins().icmp_imm_s(IntCC::Equal, t, bits);
        let then = self.b.create_block();
        let next = self.b.create_block();
        self.b.ins().brif(inside, then, &[], next, &[]);
        self.b.switch_to_block(then);
        Some(next)
    }

    fn conv_group_close(&mut self, next: Option<Block>) {
        if let Some(next) = next {
            self.b.ins().jump(next, &[]);
            self.b.switch_to_block(next);
        }
    }

    /// The entries of local row `r` in groups of one tap.
    fn tap_groups(cs: &ConvSource<'_>, r: usize) -> Vec<std::ops::Range<usize>> {
        let (a, b) = (cs.row_ptr[r] as usize, cs.row_ptr[r + 1] as usize);
        let mut groups = Vec::new();
        let mut g = a;
        for e in a..b {
            if cs.tap[e] != cs.tap[g] {
                groups.push(g..e);
                g = e;
            }
        }
        if g < b {
            groups.push(g..b);
        }
        groups
    }

    /// One pass of a convolution gather over every written channel of the chunk: `y` at
    /// `r·out_plane + column` gets the sum over the row's entries of `w · x[offset + column]`.
    /// Accumulators are variables so that checked tap groups can be skipped.
    #[allow(clippy::too_many_arguments)]
    fn conv_rows(
        &mut self,
        cs: &ConvSource<'_>,
        values: Value,
        x: Value,
        y: Value,
        epi: Epilogue,
        mask: Option<Value>,
        pass: Pass,
    ) {
        let lanes = pass.vectors + pass.scalars;
        let sets = self.shape.accumulators.clamp(1, 4).min((12 / lanes).max(1));
        let col = |l: usize| {
            if l < pass.vectors {
                pass.start + 4 * l
            } else {
                pass.start + 4 * pass.vectors + (l - pass.vectors)
            }
        };
        for r in 0..cs.row_ptr.len() - 1 {
            // acc[set][lane]; defined lazily without a mask (no branch can skip the first
            // definition), as zero up front with one.
            let vars: Vec<Vec<Variable>> = (0..sets)
                .map(|_| {
                    (0..lanes)
                        .map(|l| {
                            self.b
                                .declare_var(if l < pass.vectors { F32X4 } else { F32 })
                        })
                        .collect()
                })
                .collect();
            let mut defined = vec![vec![mask.is_some(); lanes]; sets];
            if mask.is_some() {
                for set in &vars {
                    for (l, &v) in set.iter().enumerate() {
                        let z = self.zero(l < pass.vectors);
                        self.b.def_var(v, z);
                    }
                }
            }
            let mut j = 0;
            for group in Self::tap_groups(cs, r) {
                let next = self.conv_group_open(mask, cs.tap[group.start]);
                for e in group {
                    let w = self.load(F32, values, cs.value[e] as usize);
                    let set = j % sets;
                    j += 1;
                    let wv = (pass.vectors > 0).then(|| self.b.ins().splat(F32X4, w));
                    for l in 0..lanes {
                        let vector = l < pass.vectors;
                        let ty = if vector { F32X4 } else { F32 };
                        let xv = self.load_at(ty, x, cs.offset[e] + col(l) as i64);
                        let acc = defined[set][l].then(|| self.b.use_var(vars[set][l]));
                        let a = if vector { wv.expect("vectors") } else { w };
                        let v = self.mul_add(a, xv, acc);
                        self.b.def_var(vars[set][l], v);
                        defined[set][l] = true;
                    }
                }
                self.conv_group_close(next);
            }
            let bias = epi.bias.map(|bias_ptr| self.load(F32, bias_ptr, r));
            for l in 0..lanes {
                let vector = l < pass.vectors;
                let parts: Vec<Value> = (0..sets)
                    .filter(|&s| defined[s][l])
                    .map(|s| self.b.use_var(vars[s][l]))
                    .collect();
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
                self.store(v, y, r * cs.out_plane + col(l));
            }
        }
    }

    /// One pass of `conv_grad` over the chunk: per written channel, its `dY` columns stay in
    /// registers and each entry adds its products to its partial sums (`partial + 4·e`, the
    /// scalar columns into lane 0). Never reads columns outside the pass.
    fn conv_grad_rows(
        &mut self,
        cs: &ConvSource<'_>,
        dy: Value,
        x: Value,
        partial: Value,
        mask: Option<Value>,
        pass: Pass,
    ) {
        for r in 0..cs.row_ptr.len() - 1 {
            if cs.row_ptr[r] == cs.row_ptr[r + 1] {
                continue;
            }
            let base = r * cs.out_plane + pass.start;
            let dv: Vec<Value> = (0..pass.vectors)
                .map(|l| self.load(F32X4, dy, base + 4 * l))
                .collect();
            let ds: Vec<Value> = (0..pass.scalars)
                .map(|s| self.load(F32, dy, base + 4 * pass.vectors + s))
                .collect();
            for group in Self::tap_groups(cs, r) {
                let next = self.conv_group_open(mask, cs.tap[group.start]);
                for e in group {
                    let xo = cs.offset[e] + pass.start as i64;
                    if !dv.is_empty() {
                        let mut acc = self.load(F32X4, partial, 4 * e);
                        for (l, &d) in dv.iter().enumerate() {
                            let xv = self.load_at(F32X4, x, xo + 4 * l as i64);
                            acc = self.mul_add(xv, d, Some(acc));
                        }
                        self.store(acc, partial, 4 * e);
                    }
                    if !ds.is_empty() {
                        let mut acc = self.load(F32, partial, 4 * e);
                        for (s, &d) in ds.iter().enumerate() {
                            let xs = self.load_at(F32, x, xo + (4 * pass.vectors + s) as i64);
                            acc = self.mul_add(xs, d, Some(acc));
                        }
                        self.store(acc, partial, 4 * e);
                    }
                }
                self.conv_group_close(next);
            }
        }
    }

    fn hsum(&mut self, v: Value) -> Value {
        let lanes: Vec<Value> = (0..4).map(|i| self.b.ins().extractlane(v, i)).collect();
        self.sum_tree(lanes).expect("four lanes")
    }

    /// `[Σa₀, Σa₁, Σa₂, Σa₃]`: the lane sums of four vectors as one vector (a 4×4 transpose
    /// folded into the additions: four unpacks, three additions, two 64-bit unpacks).
    fn transpose_sum(&mut self, a: [Value; 4]) -> Value {
        let le = MemFlagsData::new().with_endianness(Endianness::Little);
        let bytes: Vec<Value> = a
            .iter()
            .map(|&v| self.b.ins().bitcast(I8X16, le, v))
            .collect();
        let lo01 = self.shuffle_lanes(bytes[0], bytes[1], [0, 4, 1, 5]);
        let hi01 = self.shuffle_lanes(bytes[0], bytes[1], [2, 6, 3, 7]);
        let lo23 = self.shuffle_lanes(bytes[2], bytes[3], [0, 4, 1, 5]);
        let hi23 = self.shuffle_lanes(bytes[2], bytes[3], [2, 6, 3, 7]);
        let mut f = |v| self.b.ins().bitcast(F32X4, le, v);
        let (lo01, hi01, lo23, hi23) = (f(lo01), f(hi01), f(lo23), f(hi23));
        // u01 = [a0.0+a0.2, a1.0+a1.2, a0.1+a0.3, a1.1+a1.3], likewise u23
        let u01 = self.b.ins().fadd(lo01, hi01);
        let u23 = self.b.ins().fadd(lo23, hi23);
        let u01 = self.b.ins().bitcast(I8X16, le, u01);
        let u23 = self.b.ins().bitcast(I8X16, le, u23);
        let lo = self.shuffle_lanes(u01, u23, [0, 1, 4, 5]);
        let hi = self.shuffle_lanes(u01, u23, [2, 3, 6, 7]);
        let lo = self.b.ins().bitcast(F32X4, le, lo);
        let hi = self.b.ins().bitcast(F32X4, le, hi);
        self.b.ins().fadd(lo, hi)
    }

    /// A shuffle of 32-bit lanes (`0..4` from `a`, `4..8` from `b`) of two `i8x16` values.
    fn shuffle_lanes(&mut self, a: Value, b: Value, lanes: [u8; 4]) -> Value {
        let bytes: Vec<u8> = lanes
            .iter()
            .flat_map(|&l| (0..4).map(move |i| 4 * l + i))
            .collect();
        let imm = self.b.func.dfg.immediates.push(ConstantData::from(bytes));
        self.b.ins().shuffle(a, b, imm)
    }

    /// Stores the lane sums of pending vectors: four at a time as one vector, the rest (at
    /// the end of the chunk, `flush`) one by one.
    fn store_sums(&mut self, pending: &mut Vec<(usize, Value)>, dws: &mut Rebased, flush: bool) {
        if pending.len() == 4 {
            let sums = self.transpose_sum([pending[0].1, pending[1].1, pending[2].1, pending[3].1]);
            let (ptr, disp) = self.rebased(dws, pending[0].0);
            self.b.ins().store(self.flags, sums, ptr, disp);
            pending.clear();
        } else if flush {
            for (k, v) in std::mem::take(pending) {
                let sum = self.hsum(v);
                let (ptr, disp) = self.rebased(dws, k);
                self.b.ins().store(self.flags, sum, ptr, disp);
            }
        }
    }

    /// `sddmm` for batches of 16 and more: per row, a loop over 16-column blocks whose body
    /// holds the block of `dY` in four registers and, per nonzero, adds four products to the
    /// nonzero's partial sum kept in a stack slot. The row's code stays small and hot across
    /// the blocks; the columns after the last block start the partial sums.
    fn sddmm_wide(&mut self, src: &ChunkSource<'_>, dy: Value, x: Value, dw: Value) {
        let Shape { batch, ld, .. } = self.shape;
        let blocks16 = batch / 16;
        let tail = 16 * blocks16;
        let rest_vectors = (batch - tail) / 4;
        let scalars = batch % 4;
        // Long rows run in segments, so the frame stays far below a stack guard page (the
        // code has no stack probes).
        let max_row = (0..src.rows())
            .map(|r| src.row_range(r).len())
            .max()
            .unwrap_or(0)
            .min(SDDMM_SEGMENT);
        if max_row == 0 {
            return;
        }
        let slot = self.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            16 * max_row as u32,
            4,
        ));
        let partial = self.b.ins().stack_addr(I64, slot, 0);
        let mut dws = Rebased::new(dw);
        let mut pending: Vec<(usize, Value)> = Vec::with_capacity(4);
        let segments = (0..src.rows()).flat_map(|r| {
            let range = src.row_range(r);
            range
                .clone()
                .step_by(SDDMM_SEGMENT)
                .map(move |s| (r, s..(s + SDDMM_SEGMENT).min(range.end)))
        });
        for (r, range) in segments {
            let dy_row = r * ld;
            // start: the vector columns after the blocks, or zero
            let dy_rest: Vec<Value> = (0..rest_vectors)
                .map(|l| self.load(F32X4, dy, dy_row + tail + 4 * l))
                .collect();
            let zero = (rest_vectors == 0).then(|| self.zero(true));
            for (j, k) in range.clone().enumerate() {
                let x_row = src.col_idx[k] as usize * ld;
                let mut acc = None;
                for (l, &d) in dy_rest.iter().enumerate() {
                    let xv = self.load(F32X4, x, x_row + tail + 4 * l);
                    acc = Some(self.mul_add(xv, d, acc));
                }
                let v = acc.or(zero).expect("rest or zero");
                self.b.ins().store(self.flags, v, partial, (16 * j) as i32);
            }
            // the 16-column blocks
            let body = self.b.create_block();
            let exit = self.b.create_block();
            let dyp = self.b.append_block_param(body, I64);
            let xp = self.b.append_block_param(body, I64);
            let dy_end = self.b.ins().iadd_imm_s(dy, 64 * blocks16 as i64);
            self.b.ins().jump(body, &[dy.into(), x.into()]);
            self.b.switch_to_block(body);
            let d: Vec<Value> = (0..4)
                .map(|l| self.load(F32X4, dyp, dy_row + 4 * l))
                .collect();
            for (j, k) in range.clone().enumerate() {
                let x_row = src.col_idx[k] as usize * ld;
                let mut a = self
                    .b
                    .ins()
                    .load(F32X4, self.flags, partial, (16 * j) as i32);
                for (l, &dl) in d.iter().enumerate() {
                    let xv = self.load(F32X4, xp, x_row + 4 * l);
                    a = self.mul_add(xv, dl, Some(a));
                }
                self.b.ins().store(self.flags, a, partial, (16 * j) as i32);
            }
            let dy_next = self.b.ins().iadd_imm_s(dyp, 64);
            let x_next = self.b.ins().iadd_imm_s(xp, 64);
            let more = self.b.ins().icmp(IntCC::NotEqual, dy_next, dy_end);
            self.b
                .ins()
                .brif(more, body, &[dy_next.into(), x_next.into()], exit, &[]);
            self.b.switch_to_block(exit);
            // finish: the scalar columns, then the sums
            let dy_scalars: Vec<Value> = (0..scalars)
                .map(|s| self.load(F32, dy, dy_row + tail + 4 * rest_vectors + s))
                .collect();
            for (j, k) in range.enumerate() {
                let x_row = src.col_idx[k] as usize * ld;
                let mut v = self
                    .b
                    .ins()
                    .load(F32X4, self.flags, partial, (16 * j) as i32);
                let mut parts = Vec::new();
                for (s, &d) in dy_scalars.iter().enumerate() {
                    let xs = self.load(F32, x, x_row + tail + 4 * rest_vectors + s);
                    parts.push(self.b.ins().fmul(d, xs));
                }
                if let Some(sc) = self.sum_tree(parts) {
                    let sv = self.b.ins().scalar_to_vector(F32X4, sc);
                    v = self.b.ins().fadd(v, sv);
                }
                pending.push((k, v));
                self.store_sums(&mut pending, &mut dws, false);
            }
        }
        self.store_sums(&mut pending, &mut dws, true);
    }

    /// `sddmm` for batches under 16: the `dY` row stays in registers for the whole row, each
    /// nonzero is one short dot product (one FMA chain over the vector columns, scalar
    /// columns folded into lane 0), and the sums are reduced four nonzeros at a time.
    fn sddmm(&mut self, src: &ChunkSource<'_>, dy: Value, x: Value, dw: Value) {
        let Shape { batch, ld, .. } = self.shape;
        debug_assert!(batch < 16);
        let vectors = batch / 4;
        let scalars = batch % 4;
        let mut dws = Rebased::new(dw);
        // Vector sums of consecutive nonzeros waiting to be reduced four at a time.
        let mut pending: Vec<(usize, Value)> = Vec::with_capacity(4);
        for r in 0..src.rows() {
            let range = src.row_range(r);
            if range.is_empty() {
                continue;
            }
            let dy_row = r * ld;
            let dy_v: Vec<Value> = (0..vectors)
                .map(|l| self.load(F32X4, dy, dy_row + 4 * l))
                .collect();
            let dy_s: Vec<Value> = (0..scalars)
                .map(|s| self.load(F32, dy, dy_row + 4 * vectors + s))
                .collect();
            for k in range {
                let x_row = src.col_idx[k] as usize * ld;
                let mut vector = None;
                for (l, &d) in dy_v.iter().enumerate() {
                    let xv = self.load(F32X4, x, x_row + 4 * l);
                    vector = Some(self.mul_add(xv, d, vector));
                }
                let mut parts = Vec::new();
                for (s, &d) in dy_s.iter().enumerate() {
                    let xs = self.load(F32, x, x_row + 4 * vectors + s);
                    parts.push(self.b.ins().fmul(d, xs));
                }
                let scalar = self.sum_tree(parts);
                match (vector, scalar) {
                    (Some(v), scalar) => {
                        // fold the scalar columns into lane 0, reduce later
                        let v = match scalar {
                            Some(s) => {
                                let sv = self.b.ins().scalar_to_vector(F32X4, s);
                                self.b.ins().fadd(v, sv)
                            }
                            None => v,
                        };
                        debug_assert!(pending.last().is_none_or(|&(last, _)| last + 1 == k));
                        pending.push((k, v));
                        self.store_sums(&mut pending, &mut dws, false);
                    }
                    (None, Some(s)) => {
                        let (ptr, disp) = self.rebased(&mut dws, k);
                        self.b.ins().store(self.flags, s, ptr, disp);
                    }
                    (None, None) => unreachable!("batch ≥ 1"),
                }
            }
        }
        self.store_sums(&mut pending, &mut dws, true);
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
