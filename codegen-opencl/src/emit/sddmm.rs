//! `sddmm`: `dW[k] = Σ_b dY[r_k, b]·X[c_k, b]`, one reduction over the batch per nonzero.
//!
//! On a CPU one work-item reduces a nonzero eight lanes at a time (`sj_dot`); on a GPU
//! `sddmm_lanes` work-items share a nonzero and combine their partial sums in local memory.

use sparse_ir::{BackendError, Strategy};

use super::text::{constant_table, index_type, HELPERS, LAYOUT_COMMENT};
use super::{Ctx, Extent, Grid, KernelArg, KernelEntry, Operand, ProgramSource};
use crate::device::WorkGroups;

/// The reduction body. `setup` defines the pointers `a` (row of `dY`) and `c` (row of `X`) of
/// item `i`; `n` bounds `i`; `k` is the output position of item `i`; `batch` the batch.
fn body(wg: &WorkGroups, setup: &str, n: &str, k: &str, batch: &str) -> String {
    if wg.sddmm_lanes == 1 {
        format!(
            "    const int i = get_global_id(1);
    if (i >= {n}) return;
{setup}    dw[{k}] = sj_dot(a, c, {batch});
"
        )
    } else {
        let setup: String = setup.lines().map(|l| format!("    {l}\n")).collect();
        format!(
            "    __local float part[{items}][{lanes}];
    const int lane = get_local_id(0);
    const int slot = get_local_id(1);
    const int i = get_global_id(1);
    float acc = 0.0f;
    if (i < {n}) {{
{setup}        for (int b = lane; b < {batch}; b += {lanes})
            acc += a[b] * c[b];
    }}
    part[slot][lane] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = {half}; s > 0; s >>= 1) {{
        if (lane < s)
            part[slot][lane] += part[slot][lane + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }}
    if (lane == 0 && i < {n})
        dw[{k}] = part[slot][0];
",
            items = wg.sddmm_items,
            lanes = wg.sddmm_lanes,
            half = wg.sddmm_lanes / 2,
        )
    }
}

fn attributes(wg: &WorkGroups) -> String {
    if wg.sddmm_lanes == 1 {
        String::new()
    } else {
        format!(
            "__attribute__((reqd_work_group_size({}, {}, 1)))\n",
            wg.sddmm_lanes, wg.sddmm_items
        )
    }
}

fn grid(wg: &WorkGroups, items: usize) -> Grid {
    Grid {
        extent: [Extent::Items(wg.sddmm_lanes), Extent::Items(items)],
        local: [wg.sddmm_lanes, wg.sddmm_items],
    }
}

const PARAMS: &str = "__global const float* restrict dy,
    __global const float* restrict x,
    __global float* restrict dw";

/// The generic kernel of [`super::csr_library`].
pub(super) fn csr_kernel(wg: &WorkGroups) -> String {
    format!(
        "
// dW[k] = sum_b dY[row_of[k], b] * X[col_idx[k], b]
__kernel {attr}void sddmm_csr(
    {PARAMS},
    __global const uint* restrict row_of,
    __global const uint* restrict col_idx,
    const int nnz,
    const int batch,
    const int ld)
{{
{body}}}
",
        attr = attributes(wg),
        body = body(
            wg,
            "    const __global float* a = dy + (int)row_of[i] * ld;\n    \
             const __global float* c = x + (int)col_idx[i] * ld;\n",
            "nnz",
            "i",
            "batch"
        ),
    )
}

/// The `table` or `unrolled` programs of a `sddmm` spec.
pub(super) fn emit(ctx: &Ctx) -> Result<Vec<ProgramSource>, BackendError> {
    let p = ctx.pattern();
    if p.nnz() == 0 {
        return Ok(Vec::new()); // nothing to write
    }
    let wg = ctx.profile.work_groups();
    let (dim_params, dim_args) = ctx.dim_params();
    let args: Vec<KernelArg> = [Operand::Dy, Operand::X, Operand::Dw]
        .into_iter()
        .map(KernelArg::Operand)
        .chain(dim_args)
        .collect();
    let row_of: Vec<u32> = (0..p.rows())
        .flat_map(|r| std::iter::repeat_n(r as u32, p.row_range(r).len()))
        .collect();
    let kernel = |name: &str, body: &str| {
        format!(
            "
__kernel {attr}void {name}(
    {PARAMS}{dim_params})
{{
{body}}}
",
            attr = attributes(&wg)
        )
    };
    match ctx.strategy {
        Strategy::Table => {
            let budget = ctx.profile.table_budget();
            let (row_ty, row_bytes) = index_type(p.rows());
            let (col_ty, col_bytes) = index_type(p.cols());
            let per_chunk = budget / (row_bytes + col_bytes);
            if per_chunk == 0 {
                return Err(ctx.unsupported(format!(
                    "the constant-buffer budget of {budget} bytes holds no nonzero"
                )));
            }
            let n = p.nnz().div_ceil(per_chunk);
            if n > ctx.opts.table_max_programs {
                return Err(ctx.unsupported(format!(
                    "the pattern needs {n} constant tables of at most {budget} bytes, more than \
                     table_max_programs = {}",
                    ctx.opts.table_max_programs
                )));
            }
            let mut programs = Vec::with_capacity(n);
            for i in 0..n {
                let (k0, k1) = (i * per_chunk, ((i + 1) * per_chunk).min(p.nnz()));
                let mut s = ctx.header();
                s.push_str(&format!(
                    "// table {}/{n}: nonzeros {k0}..{k1}, {} bytes of __constant\n",
                    i + 1,
                    (k1 - k0) * (row_bytes + col_bytes)
                ));
                s.push_str(LAYOUT_COMMENT);
                s.push_str(&ctx.dim_defines());
                s.push_str(HELPERS);
                s.push_str("\n// ROW, COL: the row and column of each nonzero\n");
                s.push_str(&constant_table("ROW", row_ty, &row_of[k0..k1]));
                s.push_str(&constant_table("COL", col_ty, &p.col_idx()[k0..k1]));
                let name = ctx.kernel_name(i);
                s.push_str(&kernel(
                    &name,
                    &body(
                        &wg,
                        "    const __global float* a = dy + (int)ROW[i] * LD;\n    \
                         const __global float* c = x + (int)COL[i] * LD;\n",
                        &(k1 - k0).to_string(),
                        &format!("{k0} + i"),
                        "BATCH",
                    ),
                ));
                programs.push(ProgramSource {
                    source: s,
                    kernels: vec![KernelEntry {
                        name,
                        args: args.clone(),
                        grid: grid(&wg, k1 - k0),
                    }],
                });
            }
            Ok(programs)
        }
        _ => {
            if p.nnz() > ctx.opts.unroll_max_nnz {
                return Err(ctx.unsupported(format!(
                    "{} nonzeros exceed unroll_max_nnz = {} (the build would take too long)",
                    p.nnz(),
                    ctx.opts.unroll_max_nnz
                )));
            }
            let chunk = ctx.opts.unroll_chunk_nnz.max(1);
            let n = p.nnz().div_ceil(chunk);
            let mut s = ctx.header();
            s.push_str(&format!(
                "// unrolled: {n} kernel(s) of at most {chunk} nonzeros; the row and column \
                 offsets of each nonzero are literals\n"
            ));
            s.push_str(LAYOUT_COMMENT);
            s.push_str(&ctx.dim_defines());
            s.push_str(HELPERS);
            let mut kernels = Vec::with_capacity(n);
            for i in 0..n {
                let (k0, k1) = (i * chunk, ((i + 1) * chunk).min(p.nnz()));
                let mut setup = String::from("    int ro = 0, co = 0;\n    switch (i) {\n");
                let rows_cols = row_of[k0..k1].iter().zip(&p.col_idx()[k0..k1]);
                for (i, (r, c)) in rows_cols.enumerate() {
                    setup.push_str(&format!(
                        "    case {i}: ro = {r} * LD; co = {c} * LD; break; // nonzero {}\n",
                        k0 + i
                    ));
                }
                setup.push_str(
                    "    default: break;\n    }\n    const __global float* a = dy + ro;\n    \
                     const __global float* c = x + co;\n",
                );
                let name = ctx.kernel_name(i);
                s.push_str(&format!("\n// kernel {}/{n}: nonzeros {k0}..{k1}", i + 1));
                s.push_str(&kernel(
                    &name,
                    &body(
                        &wg,
                        &setup,
                        &(k1 - k0).to_string(),
                        &format!("{k0} + i"),
                        "BATCH",
                    ),
                ));
                kernels.push(KernelEntry {
                    name,
                    args: args.clone(),
                    grid: grid(&wg, k1 - k0),
                });
            }
            Ok(vec![ProgramSource { source: s, kernels }])
        }
    }
}
