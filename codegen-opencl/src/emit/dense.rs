//! `dense_grad`: `G[r·cols + c] = Σ_b dY[r, b]·X[c, b]` for every `(r, c)`.
//!
//! It reads no pattern. GPUs stage square tiles of `dY` and `X` in local memory; CPUs let one
//! work-item reduce one gradient element eight lanes at a time (`sj_dot`).

use sparse_ir::Pattern;

use super::text::{HELPERS, LAYOUT_COMMENT};
use super::{Ctx, Extent, Grid, KernelArg, KernelEntry, Operand, ProgramSource};
use crate::device::WorkGroups;

/// The names under which the body sees the sizes: parameters or macros.
struct Sizes<'a> {
    rows: &'a str,
    cols: &'a str,
    batch: &'a str,
    ld: &'a str,
}

const PARAMS: &str = "__global const float* restrict dy,
    __global const float* restrict x,
    __global float* restrict grad";

fn kernel(wg: &WorkGroups, name: &str, extra_params: &str, z: &Sizes) -> String {
    let Sizes {
        rows,
        cols,
        batch,
        ld,
    } = z;
    if wg.dense_tiled {
        let ts = wg.dense[0];
        format!(
            "
// G = dY X^T in {ts}x{ts} tiles staged in local memory
__kernel __attribute__((reqd_work_group_size({ts}, {ts}, 1)))
void {name}(
    {PARAMS}{extra_params})
{{
    __local float tdy[{ts}][{ts} + 1];
    __local float tx[{ts}][{ts} + 1];
    const int tc = get_local_id(0);
    const int tr = get_local_id(1);
    const int c0 = get_group_id(0) * {ts};
    const int r0 = get_group_id(1) * {ts};
    float acc = 0.0f;
    for (int b0 = 0; b0 < {batch}; b0 += {ts}) {{
        const int bb = b0 + tc;
        tdy[tr][tc] = (r0 + tr < {rows} && bb < {batch}) ? dy[(r0 + tr) * {ld} + bb] : 0.0f;
        tx[tr][tc] = (c0 + tr < {cols} && bb < {batch}) ? x[(c0 + tr) * {ld} + bb] : 0.0f;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int j = 0; j < {ts}; ++j)
            acc += tdy[tr][j] * tx[tc][j];
        barrier(CLK_LOCAL_MEM_FENCE);
    }}
    if (r0 + tr < {rows} && c0 + tc < {cols})
        grad[(r0 + tr) * {cols} + c0 + tc] = acc;
}}
"
        )
    } else {
        format!(
            "
// G = dY X^T: one work-item per gradient element (column c, row r)
__kernel void {name}(
    {PARAMS}{extra_params})
{{
    const int c = get_global_id(0);
    const int r = get_global_id(1);
    if (c >= {cols} || r >= {rows}) return;
    grad[r * {cols} + c] = sj_dot(dy + r * {ld}, x + c * {ld}, {batch});
}}
"
        )
    }
}

/// The launch entry of a dense-gradient kernel over `p`'s shape.
pub(super) fn entry(
    wg: &WorkGroups,
    name: String,
    args: Vec<KernelArg>,
    p: &Pattern,
) -> KernelEntry {
    KernelEntry {
        name,
        args,
        grid: Grid {
            extent: [Extent::Items(p.cols()), Extent::Items(p.rows())],
            local: wg.dense,
        },
    }
}

/// The generic kernel of [`super::csr_library`].
pub(super) fn csr_kernel(wg: &WorkGroups) -> String {
    kernel(
        wg,
        "dense_grad_csr",
        ",\n    const int rows,\n    const int cols,\n    const int batch,\n    const int ld",
        &Sizes {
            rows: "rows",
            cols: "cols",
            batch: "batch",
            ld: "ld",
        },
    )
}

/// The `table` or `unrolled` program: the dense kernel with the shape baked in.
pub(super) fn emit(ctx: &Ctx) -> ProgramSource {
    let p = ctx.pattern();
    let wg = ctx.profile.work_groups();
    let (dim_params, dim_args) = ctx.dim_params();
    let mut s = ctx.header();
    s.push_str(
        "// dense_grad reads no pattern: this is the dense kernel with the shape (and a fixed\n\
         // batch and ld) baked in as literals.\n",
    );
    s.push_str(LAYOUT_COMMENT);
    s.push_str(&format!(
        "#define ROWS {}\n#define COLS {}\n",
        p.rows(),
        p.cols()
    ));
    s.push_str(&ctx.dim_defines());
    if !wg.dense_tiled {
        s.push_str(HELPERS);
    }
    let name = ctx.kernel_name(0);
    s.push_str(&kernel(
        &wg,
        &name,
        &dim_params,
        &Sizes {
            rows: "ROWS",
            cols: "COLS",
            batch: "BATCH",
            ld: "LD",
        },
    ));
    let args = [Operand::Dy, Operand::X, Operand::Grad]
        .into_iter()
        .map(KernelArg::Operand)
        .chain(dim_args)
        .collect();
    ProgramSource {
        source: s,
        kernels: vec![entry(&wg, name, args, p)],
    }
}
