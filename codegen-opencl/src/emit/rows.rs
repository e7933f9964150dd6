//! `spmm` and `spmm_t`: one output row is a gather over a CSR row.
//!
//! `spmm` gathers rows of `X` along the pattern; `spmm_t` gathers rows of `dY` along the
//! transposed pattern, reading each weight through `value_index`, so every output element is
//! written by exactly one work-item and no atomics are needed.

use std::ops::Range;

use sparse_ir::{BackendError, Op, Pattern};

use super::text::{constant_table, float_param, index_type, LAYOUT_COMMENT};
use super::{csr_kernel_name, Ctx, Extent, Grid, KernelArg, KernelEntry, Operand, ProgramSource};
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

    /// The statement storing `acc` (plus bias, ReLU) at output row `row` (an expression).
    fn store(&self, target: &str, row: &str) -> String {
        let mut value = "acc".to_string();
        if self.bias {
            value = format!("acc + bias[{row}]");
        }
        if self.relu {
            value = format!("fmax({value}, 0.0f)");
        }
        format!("{target} = {value};")
    }

    /// The value read for nonzero `k` of the gathered pattern (an absolute position).
    fn value_at(&self, k: usize) -> usize {
        match &self.value_index {
            Some(vi) => vi[k] as usize,
            None => k,
        }
    }
}

/// The generic kernel of [`super::csr_library`]: `Some((bias, relu))` for `spmm`, `None` for
/// `spmm_t`.
pub(super) fn csr_kernel(epilogue: Option<(bool, bool)>) -> String {
    match epilogue {
        Some((bias, relu)) => {
            let name = csr_kernel_name(Op::Spmm { bias, relu });
            let bias_param = if bias {
                "\n    __global const float* restrict bias,"
            } else {
                ""
            };
            let mut epi = String::new();
            if bias {
                epi.push_str("    acc += bias[r];\n");
            }
            if relu {
                epi.push_str("    acc = fmax(acc, 0.0f);\n");
            }
            format!(
                "
// Y = W X{bias_doc}{relu_doc}: one work-item per (batch column b, row r)
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
    const int b = get_global_id(0);
    const int r = get_global_id(1);
    if (b >= batch || r >= rows) return;
    const __global float* xb = x + b;
    float acc = 0.0f;
    const uint end = row_ptr[r + 1];
    for (uint k = row_ptr[r]; k < end; ++k)
        acc += values[k] * xb[(int)col_idx[k] * ld];
{epi}    y[r * ld + b] = acc;
}}
",
                bias_doc = if bias { " + bias" } else { "" },
                relu_doc = if relu { ", ReLU" } else { "" },
            )
        }
        None => "
// dX = W^T dY over the transposed pattern (no atomics): one work-item per (b, column c)
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
{
    const int b = get_global_id(0);
    const int c = get_global_id(1);
    if (b >= batch || c >= cols) return;
    const __global float* dyb = dy + b;
    float acc = 0.0f;
    const uint end = t_row_ptr[c + 1];
    for (uint k = t_row_ptr[c]; k < end; ++k)
        acc += values[value_index[k]] * dyb[(int)t_row_idx[k] * ld];
    dx[c * ld + b] = acc;
}
"
        .to_string(),
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
    const int b = get_global_id(0);
    const int i = get_global_id(1);
    if (b >= BATCH || i >= {nrows}) return;
    const int r = {r0} + i;
    const __global float* inb = {input} + b;
    float acc = 0.0f;
    const uint end = ROW_PTR[i + 1];
    for (uint k = ROW_PTR[i]; k < end; ++k)
        acc += {value} * inb[(int)COL[k] * LD];
    {store}
}}
",
            params = g.params(),
            nrows = rows.len(),
            r0 = rows.start,
            input = g.input,
            store = g.store(&format!("{}[r * LD + b]", g.output), "r"),
        ));
        programs.push(ProgramSource {
            source: s,
            kernels: vec![KernelEntry {
                name,
                args: g.args(&dim_args),
                grid: Grid {
                    extent: [Extent::Batch, Extent::Items(rows.len())],
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
        if per_row {
            "one work-item per (batch column, row)"
        } else {
            "one work-item per batch column runs every row of its kernel"
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
    const int b = get_global_id(0);
    if (b >= BATCH) return;
    const __global float* inb = {input} + b;
    __global float* outb = {output} + b;
    float acc;
",
            i + 1,
            chunks.len(),
            chunk.rows.start,
            chunk.rows.end,
            chunk.nnz.start,
            chunk.nnz.end,
            chunk.hash,
            params = g.params(),
            input = g.input,
            output = g.output,
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
                s.push_str(&format!("{ind}acc = 0.0f;\n"));
            }
            for (j, k) in range.enumerate() {
                let op = if j == 0 { "=" } else { "+=" };
                s.push_str(&format!(
                    "{ind}acc {op} values[{}] * inb[{} * LD];\n",
                    g.value_at(k),
                    p.col_idx()[k]
                ));
            }
            s.push_str(&format!(
                "{ind}{}\n",
                g.store(&format!("outb[{r} * LD]"), &r.to_string())
            ));
            if per_row {
                s.push_str(&format!("{ind}break;\n"));
            }
        }
        if per_row {
            s.push_str("    default:\n        break;\n    }\n");
        }
        s.push_str("}\n");
        let grid = if per_row {
            Grid {
                extent: [Extent::Batch, Extent::Items(chunk.rows.len())],
                local: wg.rows,
            }
        } else {
            Grid {
                extent: [Extent::Batch, Extent::Items(1)],
                local: [wg.rows[0], 1],
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
