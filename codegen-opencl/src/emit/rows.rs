//! `spmm` and `spmm_t`: one output row is a gather over a CSR row.
//!
//! `spmm` gathers rows of `X` along the pattern; `spmm_t` gathers rows of `dY` along the
//! transposed pattern, reading each weight through `value_index`, so every output element is
//! written by exactly one work-item and no atomics are needed.

use std::ops::Range;

use sparse_ir::{BackendError, Op, Pattern};

use super::text::{constant_table, float_param, index_type, vector_helpers, LAYOUT_COMMENT};
use super::{csr_kernel_name, Ctx, Extent, Grid, KernelArg, KernelEntry, Operand, ProgramSource};
use crate::device::WorkGroups;
use sparse_ir::Strategy;

/// The gather a `spmm` or `spmm_t` kernel performs.
struct Gather {
    /// The gathered pattern: `W` for `spmm`, `Wᵀ` for `spmm_t`.
    pattern: Pattern,
    /// `spmm_t`: where each nonzero of `Wᵀ` sits in `W`'s value array.
    value_index: Option<Vec<u32>>,
    /// Name of the gathered input (`x` or `dy`).
    input: &'static str,
    /// Name of the output (`y` or `dx`).
    output: &'static str,
    bias: bool,
    relu: bool,
    /// Buffer operands in parameter order.
    operands: Vec<Operand>,
}

impl Gather {
    fn of(ctx: &Ctx) -> Self {
        match ctx.spec.op() {
            Op::Spmm { bias, relu } => {
                let mut operands = vec![Operand::Values, Operand::X];
                if bias {
                    operands.push(Operand::Bias);
                }
                operands.push(Operand::Y);
                Gather {
                    pattern: (**ctx.pattern()).clone(),
                    value_index: None,
                    input: "x",
                    output: "y",
                    bias,
                    relu,
                    operands,
                }
            }
            _ => {
                let t = ctx.pattern().transpose();
                Gather {
                    pattern: t.pattern,
                    value_index: Some(t.value_index),
                    input: "dy",
                    output: "dx",
                    bias: false,
                    relu: false,
                    operands: vec![Operand::Values, Operand::Dy, Operand::Dx],
                }
            }
        }
    }

    fn params(&self) -> String {
        let mut params = vec![float_param("values", false), float_param(self.input, false)];
        if self.bias {
            params.push(float_param("bias", false));
        }
        params.push(float_param(self.output, true));
        params.join(",\n    ")
    }

    fn args(&self, dims: &[KernelArg]) -> Vec<KernelArg> {
        self.operands
            .iter()
            .map(|&o| KernelArg::Operand(o))
            .chain(dims.iter().copied())
            .collect()
    }

    /// `acc` with the epilogue (bias of output row `row`, ReLU) applied.
    fn value(&self, row: &str) -> String {
        let mut value = "acc".to_string();
        if self.bias {
            value = format!("acc + bias[{row}]");
        }
        if self.relu {
            value = format!("fmax({value}, 0.0f)");
        }
        value
    }

    /// The value read for nonzero `k` of the gathered pattern (an absolute position).
    fn value_at(&self, k: usize) -> usize {
        match &self.value_index {
            Some(vi) => vi[k] as usize,
            None => k,
        }
    }
}

/// How one work-item covers the batch: one column (`w = 1`, GPUs) or `w` columns as one
/// `float{w}` vector (CPUs), with `sj_load`/`sj_store` for a partial last vector.
#[derive(Clone, Copy)]
pub(super) struct Lanes {
    /// Batch columns per work-item.
    pub(super) w: usize,
}

impl Lanes {
    pub(super) fn ty(self) -> String {
        if self.w == 1 {
            "float".into()
        } else {
            format!("float{}", self.w)
        }
    }

    pub(super) fn zero(self) -> String {
        if self.w == 1 {
            "0.0f".into()
        } else {
            format!("(float{})(0.0f)", self.w)
        }
    }

    /// Defines `b` (the first batch column of the work-item), the index `var` along
    /// dimension 1 (if any) and, for vectors, `n` (the columns this work-item covers);
    /// returns early for work-items past `batch` or `bound`.
    pub(super) fn prologue(self, batch: &str, dim1: Option<(&str, &str)>) -> String {
        let mut s = if self.w == 1 {
            "    const int b = get_global_id(0);\n".to_string()
        } else {
            format!("    const int b = get_global_id(0) * {};\n", self.w)
        };
        let mut guard = format!("b >= {batch}");
        if let Some((var, bound)) = dim1 {
            s.push_str(&format!("    const int {var} = get_global_id(1);\n"));
            guard.push_str(&format!(" || {var} >= {bound}"));
        }
        s.push_str(&format!("    if ({guard}) return;\n"));
        if self.w > 1 {
            s.push_str(&format!(
                "    const int n = min({}, {batch} - b);\n",
                self.w
            ));
        }
        s
    }

    /// The batch columns of the work-item at `base + off`.
    pub(super) fn load(self, base: &str, off: &str) -> String {
        if self.w == 1 {
            format!("{base}[{off}]")
        } else {
            format!("sj_load({base} + {off}, n)")
        }
    }

    /// Stores `value` to the work-item's batch columns at `base + off`.
    pub(super) fn store(self, base: &str, off: &str, value: &str) -> String {
        if self.w == 1 {
            format!("{base}[{off}] = {value};")
        } else {
            format!("sj_store({value}, {base} + {off}, n);")
        }
    }
}

/// The forward epilogue of a generic kernel: the bias parameter (empty without a bias) and
/// the stored value, `acc` plus `bias[row]` where asked, through ReLU where asked (`row` is
/// the kernel's variable for the bias index).
pub(super) fn epilogue_text(bias: bool, relu: bool, row: &str) -> (&'static str, String) {
    let bias_param = if bias {
        "\n    __global const float* restrict bias,"
    } else {
        ""
    };
    let mut value = "acc".to_string();
    if bias {
        value = format!("acc + bias[{row}]");
    }
    if relu {
        value = format!("fmax({value}, 0.0f)");
    }
    (bias_param, value)
}

/// The generic kernel of [`super::csr_library`]: `Some((bias, relu))` for `spmm`, `None` for
/// `spmm_t`.
pub(super) fn csr_kernel(wg: &WorkGroups, epilogue: Option<(bool, bool)>) -> String {
    let lanes = Lanes { w: wg.batch_vector };
    let per = if lanes.w == 1 {
        "batch column b".to_string()
    } else {
        format!("{} batch columns from b", lanes.w)
    };
    let (ty, zero) = (lanes.ty(), lanes.zero());
    match epilogue {
        Some((bias, relu)) => {
            let name = csr_kernel_name(Op::Spmm { bias, relu });
            let (bias_param, value) = epilogue_text(bias, relu, "r");
            format!(
                "
// Y = W X{bias_doc}{relu_doc}: one work-item per ({per}, row r)
__kernel void {name}(
    __global const float* restrict values,
    __global const float* restrict x,{bias_param}
    __global float* restrict y,
    __global const uint* restrict row_ptr,
    __global const uint* restrict col_idx,
    const int rows,
    const int batch,
    const int ld)
{{
{prologue}    const __global float* xb = x + b;
    __global float* yb = y + b;
    {ty} acc = {zero};
    const uint end = row_ptr[r + 1];
    for (uint k = row_ptr[r]; k < end; ++k)
        acc += values[k] * {load};
    {store}
}}
",
                bias_doc = if bias { " + bias" } else { "" },
                relu_doc = if relu { ", ReLU" } else { "" },
                prologue = lanes.prologue("batch", Some(("r", "rows"))),
                load = lanes.load("xb", "(int)col_idx[k] * ld"),
                store = lanes.store("yb", "r * ld", &value),
            )
        }
        None => format!(
            "
// dX = W^T dY over the transposed pattern (no atomics): one work-item per ({per}, column c)
__kernel void spmm_t_csr(
    __global const float* restrict values,
    __global const float* restrict dy,
    __global float* restrict dx,
    __global const uint* restrict t_row_ptr,
    __global const uint* restrict t_row_idx,
    __global const uint* restrict value_index,
    const int cols,
    const int batch,
    const int ld)
{{
{prologue}    const __global float* dyb = dy + b;
    __global float* dxb = dx + b;
    {ty} acc = {zero};
    const uint end = t_row_ptr[c + 1];
    for (uint k = t_row_ptr[c]; k < end; ++k)
        acc += values[value_index[k]] * {load};
    {store}
}}
",
            prologue = lanes.prologue("batch", Some(("c", "cols"))),
            load = lanes.load("dyb", "(int)t_row_idx[k] * ld"),
            store = lanes.store("dxb", "c * ld", "acc"),
        ),
    }
}

/// The `table` or `unrolled` programs of a `spmm`/`spmm_t` spec.
pub(super) fn emit(ctx: &Ctx) -> Result<Vec<ProgramSource>, BackendError> {
    let g = Gather::of(ctx);
    match ctx.strategy {
        Strategy::Table => table(ctx, &g),
        _ => unrolled(ctx, &g),
    }
}

/// Splits rows greedily into runs whose tables fit `budget` bytes: 4 bytes per row pointer
/// plus `per_nnz` per nonzero. Err: a row that alone does not fit, and its table size.
fn table_chunks(
    p: &Pattern,
    per_nnz: usize,
    budget: usize,
) -> Result<Vec<Range<usize>>, (usize, usize)> {
    let bytes = |rows: Range<usize>| {
        let nnz = (p.row_ptr()[rows.end] - p.row_ptr()[rows.start]) as usize;
        (rows.len() + 1) * 4 + nnz * per_nnz
    };
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < p.rows() {
        let mut end = start;
        while end < p.rows() && bytes(start..end + 1) <= budget {
            end += 1;
        }
        if end == start {
            return Err((start, bytes(start..start + 1)));
        }
        chunks.push(start..end);
        start = end;
    }
    Ok(chunks)
}

fn table(ctx: &Ctx, g: &Gather) -> Result<Vec<ProgramSource>, BackendError> {
    let p = &g.pattern;
    let budget = ctx.profile.table_budget();
    let (col_ty, col_bytes) = index_type(p.cols());
    let (vi_ty, vi_bytes) = match g.value_index {
        Some(_) => index_type(p.nnz()),
        None => ("", 0),
    };
    let which = if g.value_index.is_some() {
        "transposed pattern"
    } else {
        "pattern"
    };
    let chunks = table_chunks(p, col_bytes + vi_bytes, budget).map_err(|(row, bytes)| {
        ctx.unsupported(format!(
            "row {row} of the {which} has {} nonzeros: its table of {bytes} bytes exceeds the \
             constant-buffer budget of {budget} bytes",
            p.row_range(row).len()
        ))
    })?;
    if chunks.len() > ctx.opts.table_max_programs {
        return Err(ctx.unsupported(format!(
            "the {which} needs {} constant tables of at most {budget} bytes, more than \
             table_max_programs = {}",
            chunks.len(),
            ctx.opts.table_max_programs
        )));
    }
    let wg = ctx.profile.work_groups();
    let lanes = Lanes { w: wg.batch_vector };
    let (dim_params, dim_args) = ctx.dim_params();
    let n = chunks.len();
    let mut programs = Vec::with_capacity(n);
    for (i, rows) in chunks.into_iter().enumerate() {
        let k0 = p.row_ptr()[rows.start] as usize;
        let k1 = p.row_ptr()[rows.end] as usize;
        let (rp_ty, rp_bytes) = index_type(k1 - k0 + 1);
        let mut s = ctx.header();
        s.push_str(&format!(
            "// table {}/{n}: {which} rows {}..{}, nonzeros {k0}..{k1}, {} bytes of __constant\n",
            i + 1,
            rows.start,
            rows.end,
            (rows.len() + 1) * rp_bytes + (k1 - k0) * (col_bytes + vi_bytes)
        ));
        s.push_str(LAYOUT_COMMENT);
        s.push_str(&ctx.dim_defines());
        s.push_str(&vector_helpers(lanes.w));
        s.push_str("\n// ROW_PTR: row pointers of these rows, relative to their first nonzero\n");
        s.push_str(&constant_table(
            "ROW_PTR",
            rp_ty,
            &p.row_ptr()[rows.start..=rows.end]
                .iter()
                .map(|&v| v - k0 as u32)
                .collect::<Vec<_>>(),
        ));
        s.push_str("// COL: the gathered input row of each nonzero\n");
        s.push_str(&constant_table("COL", col_ty, &p.col_idx()[k0..k1]));
        let value = match &g.value_index {
            Some(vi) => {
                s.push_str("// VIDX: where each nonzero's weight sits in the value array\n");
                s.push_str(&constant_table("VIDX", vi_ty, &vi[k0..k1]));
                "values[VIDX[k]]".to_string()
            }
            None => format!("values[{k0} + k]"),
        };
        let name = ctx.kernel_name(i);
        s.push_str(&format!(
            "
__kernel void {name}(
    {params}{dim_params})
{{
{prologue}    const int r = {r0} + i;
    const __global float* inb = {input} + b;
    __global float* outb = {output} + b;
    {ty} acc = {zero};
    const uint end = ROW_PTR[i + 1];
    for (uint k = ROW_PTR[i]; k < end; ++k)
        acc += {value} * {load};
    {store}
}}
",
            params = g.params(),
            prologue = lanes.prologue("BATCH", Some(("i", &rows.len().to_string()))),
            r0 = rows.start,
            input = g.input,
            output = g.output,
            ty = lanes.ty(),
            zero = lanes.zero(),
            load = lanes.load("inb", "(int)COL[k] * LD"),
            store = lanes.store("outb", "r * LD", &g.value("r")),
        ));
        programs.push(ProgramSource {
            source: s,
            kernels: vec![KernelEntry {
                name,
                args: g.args(&dim_args),
                grid: Grid {
                    extent: [
                        Extent::Batch { per_item: lanes.w },
                        Extent::Items(rows.len()),
                    ],
                    local: wg.rows,
                },
            }],
        });
    }
    Ok(programs)
}

fn unrolled(ctx: &Ctx, g: &Gather) -> Result<Vec<ProgramSource>, BackendError> {
    let p = &g.pattern;
    if p.nnz() > ctx.opts.unroll_max_nnz {
        return Err(ctx.unsupported(format!(
            "{} nonzeros exceed unroll_max_nnz = {} (the build would take too long)",
            p.nnz(),
            ctx.opts.unroll_max_nnz
        )));
    }
    let wg = ctx.profile.work_groups();
    // One batch column per work-item: straight-line code without loops, which PoCL
    // vectorises across the work-items of a group (explicit vectors with a guarded partial
    // last vector made the build several times slower).
    let lanes = Lanes { w: 1 };
    // GPUs: one row per work-item (a switch over the chunk's rows), so a warp runs one row
    // for 32 batch columns. CPUs: one work-item runs every row of the chunk for its column.
    let per_row = ctx.profile.kind.is_gpu_like();
    let (dim_params, dim_args) = ctx.dim_params();
    let chunks = p.chunks(ctx.opts.unroll_chunk_nnz);
    if chunks.is_empty() {
        return Ok(Vec::new()); // no output rows
    }
    let mut s = ctx.header();
    s.push_str(&format!(
        "// unrolled: {} kernel(s) of about {} nonzeros; {}\n",
        chunks.len(),
        ctx.opts.unroll_chunk_nnz,
        match (per_row, lanes.w) {
            (true, 1) => "one work-item per (batch column, row)".to_string(),
            (true, w) => format!("one work-item per ({w} batch columns, row)"),
            (false, 1) => "one work-item per batch column runs every row of its kernel".into(),
            (false, w) =>
                format!("one work-item per {w} batch columns runs every row of its kernel"),
        }
    ));
    if g.value_index.is_some() {
        s.push_str(
            "// spmm_t gathers rows of dY along the transposed pattern; each weight is read at\n\
             // its position in the layer's value array.\n",
        );
    }
    s.push_str(LAYOUT_COMMENT);
    s.push_str(&ctx.dim_defines());
    let mut kernels = Vec::with_capacity(chunks.len());
    let ind = if per_row { "        " } else { "    " };
    for (i, chunk) in chunks.iter().enumerate() {
        let name = ctx.kernel_name(i);
        s.push_str(&format!(
            "
// kernel {}/{}: rows {}..{}, nonzeros {}..{}, chunk hash {:016x}
__kernel void {name}(
    {params}{dim_params})
{{
{prologue}    const __global float* inb = {input} + b;
    __global float* outb = {output} + b;
    {ty} acc;
",
            i + 1,
            chunks.len(),
            chunk.rows.start,
            chunk.rows.end,
            chunk.nnz.start,
            chunk.nnz.end,
            chunk.hash,
            params = g.params(),
            prologue = lanes.prologue("BATCH", None),
            input = g.input,
            output = g.output,
            ty = lanes.ty(),
        ));
        if per_row {
            s.push_str("    switch (get_global_id(1)) {\n");
        }
        for (local, r) in chunk.rows.clone().enumerate() {
            let range = p.row_range(r);
            if per_row {
                s.push_str(&format!("    case {local}: // row {r}\n"));
            } else {
                s.push_str(&format!("    // row {r}\n"));
            }
            if range.is_empty() {
                s.push_str(&format!("{ind}acc = {};\n", lanes.zero()));
            }
            for (j, k) in range.enumerate() {
                let op = if j == 0 { "=" } else { "+=" };
                s.push_str(&format!(
                    "{ind}acc {op} values[{}] * {};\n",
                    g.value_at(k),
                    lanes.load("inb", &format!("{} * LD", p.col_idx()[k]))
                ));
            }
            s.push_str(&format!(
                "{ind}{}\n",
                lanes.store("outb", &format!("{r} * LD"), &g.value(&r.to_string()))
            ));
            if per_row {
                s.push_str(&format!("{ind}break;\n"));
            }
        }
        if per_row {
            s.push_str("    default:\n        break;\n    }\n");
        }
        s.push_str("}\n");
        let batch = Extent::Batch { per_item: lanes.w };
        let grid = if per_row {
            Grid {
                extent: [batch, Extent::Items(chunk.rows.len())],
                local: wg.unrolled,
            }
        } else {
            Grid {
                extent: [batch, Extent::Items(1)],
                local: [wg.unrolled[0], 1],
            }
        };
        kernels.push(KernelEntry {
            name,
            args: g.args(&dim_args),
            grid,
        });
    }
    Ok(vec![ProgramSource { source: s, kernels }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_chunks_respect_the_budget() {
        // rows with 3, 0, 5, 1 nonzeros
        let p =
            Pattern::from_csr(4, 8, vec![0, 3, 3, 8, 9], vec![0, 1, 2, 0, 1, 2, 3, 4, 7]).unwrap();
        // everything: 5 row pointers · 4 + 9 · 2 = 38 bytes
        assert_eq!(table_chunks(&p, 2, 38).unwrap(), vec![0..4]);
        // 20 bytes: rows 0..2 need 3·4 + 3·2 = 18, row 2 alone 8 + 10 = 18, row 3 alone 10
        assert_eq!(table_chunks(&p, 2, 20).unwrap(), vec![0..2, 2..3, 3..4]);
        // row 2 alone needs 18 bytes
        assert_eq!(table_chunks(&p, 2, 17), Err((2, 18)));
        assert_eq!(
            table_chunks(&Pattern::empty(0, 3).unwrap(), 2, 100).unwrap(),
            vec![]
        );
    }
}
