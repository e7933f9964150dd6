//! The convolution ops (`conv`, `conv_t`, `conv_grad`, `conv_dense_grad`) as generic `csr`
//! kernels: the `[out × C·k²]` weight pattern as index arrays (column `c·k² + kh·k + kw`), the
//! geometry and every size as `int` arguments, so one build per device serves every layer.
//!
//! Activations are feature-major: row `c·H·W + h·W + w` of the input, row
//! `o·OH·OW + oh·OW + ow` of the output; output `(oh, ow)` reads input
//! `(oh·s + kh − p, ow·s + kw − p)` under tap `(kh, kw)`, and a tap outside the input reads 0.
//!
//! - `conv`: one work-item per (batch columns, output row): a gather over the row `o`'s
//!   nonzeros, skipping taps outside the input, then the bias and ReLU epilogue.
//! - `conv_t`: a gather too (no atomics), one work-item per (batch columns, input row
//!   `c·H·W + ih·W + iw`): for every tap `(kh, kw)` whose output position
//!   `((ih + p − kh)/s, (iw + p − kw)/s)` is whole and inside the output, the nonzeros of
//!   pattern column `c·k² + kh·k + kw` (the transposed pattern, weights through
//!   `value_index`).
//! - `conv_grad`: per nonzero, a reduction over every output position and the batch; on a
//!   GPU `sddmm_lanes` work-items share it and combine their sums in local memory.
//! - `conv_dense_grad`: the same reduction for every `(o, c·k² + kh·k + kw)` entry.
//!
//! Every index is below `max(out·OH·OW, C·H·W)·ld` or `out·C·k²`, which [`super::Ctx::new`]
//! and the executor check against `int` before anything runs.

use sparse_ir::{BackendError, ConvGeometry, Op};

use super::rows::{epilogue_text, Lanes};
use super::{
    csr_arrays, csr_kernel_name, transposed_arrays, Ctx, Extent, Grid, IndexArray, KernelArg,
    KernelEntry, Operand,
};
use crate::device::WorkGroups;

/// The geometry parameters every convolution kernel takes, in this order (after its buffers,
/// index arrays and counts, before `batch` and `ld`).
const GEOMETRY_PARAMS: &str = "const int in_c,
    const int in_h,
    const int in_w,
    const int out_c,
    const int out_h,
    const int out_w,
    const int ksize,
    const int stride,
    const int pad";

/// The arguments matching [`GEOMETRY_PARAMS`] (sizes checked against `int` in `Ctx::new`).
fn geometry_args(g: &ConvGeometry, out_channels: usize) -> Vec<KernelArg> {
    [
        g.in_channels,
        g.height,
        g.width,
        out_channels,
        g.out_height(),
        g.out_width(),
        g.kernel,
        g.stride,
        g.padding,
    ]
    .into_iter()
    .map(|n| KernelArg::Int(n as i32))
    .collect()
}

/// Every convolution kernel of [`super::csr_library`].
pub(super) fn csr_kernels(wg: &WorkGroups) -> String {
    let mut s = String::new();
    for (bias, relu) in [(false, false), (true, false), (false, true), (true, true)] {
        s.push_str(&forward(wg, bias, relu));
    }
    s.push_str(&backward_data(wg));
    s.push_str(&weight_grad(wg, false));
    s.push_str(&weight_grad(wg, true));
    s
}

fn per_item(lanes: Lanes) -> String {
    if lanes.w == 1 {
        "batch column b".to_string()
    } else {
        format!("{} batch columns from b", lanes.w)
    }
}

/// `conv` with its epilogue.
fn forward(wg: &WorkGroups, bias: bool, relu: bool) -> String {
    let lanes = Lanes { w: wg.batch_vector };
    let name = csr_kernel_name(Op::Conv { bias, relu });
    let (bias_param, value) = epilogue_text(bias, relu, "o");
    format!(
        "
// Y = conv(W, X){bias_doc}{relu_doc}: one work-item per ({per}, output row
// f = o*out_h*out_w + oh*out_w + ow); taps outside the input read 0
__kernel void {name}(
    __global const float* restrict values,
    __global const float* restrict x,{bias_param}
    __global float* restrict y,
    __global const uint* restrict row_ptr,
    __global const uint* restrict col_idx,
    {GEOMETRY_PARAMS},
    const int batch,
    const int ld)
{{
{prologue}    const int plane = out_h * out_w;
    const int o = f / plane;
    const int pos = f - o * plane;
    const int oh = pos / out_w;
    const int ih0 = oh * stride - pad;
    const int iw0 = (pos - oh * out_w) * stride - pad;
    const int taps = ksize * ksize;
    const __global float* xb = x + b;
    __global float* yb = y + b;
    {ty} acc = {zero};
    const uint end = row_ptr[o + 1];
    for (uint k = row_ptr[o]; k < end; ++k) {{
        const int col = (int)col_idx[k];
        const int c = col / taps;
        const int t = col - c * taps;
        const int kh = t / ksize;
        const int ih = ih0 + kh;
        const int iw = iw0 + (t - kh * ksize);
        if (ih < 0 || ih >= in_h || iw < 0 || iw >= in_w)
            continue;
        acc += values[k] * {load};
    }}
    {store}
}}
",
        bias_doc = if bias { " + bias" } else { "" },
        relu_doc = if relu { ", ReLU" } else { "" },
        per = per_item(lanes),
        prologue = lanes.prologue("batch", Some(("f", "out_c * out_h * out_w"))),
        ty = lanes.ty(),
        zero = lanes.zero(),
        load = lanes.load("xb", "((c * in_h + ih) * in_w + iw) * ld"),
        store = lanes.store("yb", "f * ld", &value),
    )
}

/// `conv_t`, gathering over the transposed pattern.
fn backward_data(wg: &WorkGroups) -> String {
    let lanes = Lanes { w: wg.batch_vector };
    format!(
        "
// dX = conv^T(W, dY) over the transposed pattern (no atomics): one work-item per
// ({per}, input row c*in_h*in_w + ih*in_w + iw); tap (kh, kw) reaches it from output
// ((ih + pad - kh) / stride, (iw + pad - kw) / stride) when both divide and lie inside
__kernel void {name}(
    __global const float* restrict values,
    __global const float* restrict dy,
    __global float* restrict dx,
    __global const uint* restrict t_row_ptr,
    __global const uint* restrict t_row_idx,
    __global const uint* restrict value_index,
    {GEOMETRY_PARAMS},
    const int batch,
    const int ld)
{{
{prologue}    const int plane = in_h * in_w;
    const int c = xr / plane;
    const int pos = xr - c * plane;
    const int ih = pos / in_w;
    const int iw = pos - ih * in_w;
    const int out_plane = out_h * out_w;
    const __global float* dyb = dy + b;
    __global float* dxb = dx + b;
    {ty} acc = {zero};
    for (int kh = 0; kh < ksize; ++kh) {{
        const int hn = ih + pad - kh;
        if (hn < 0 || hn % stride != 0 || hn / stride >= out_h)
            continue;
        for (int kw = 0; kw < ksize; ++kw) {{
            const int wn = iw + pad - kw;
            if (wn < 0 || wn % stride != 0 || wn / stride >= out_w)
                continue;
            const int opos = (hn / stride) * out_w + wn / stride;
            const int j = (c * ksize + kh) * ksize + kw;
            const uint end = t_row_ptr[j + 1];
            for (uint k = t_row_ptr[j]; k < end; ++k)
                acc += values[value_index[k]] * {load};
        }}
    }}
    {store}
}}
",
        name = csr_kernel_name(Op::ConvT),
        per = per_item(lanes),
        prologue = lanes.prologue("batch", Some(("xr", "in_c * in_h * in_w"))),
        ty = lanes.ty(),
        zero = lanes.zero(),
        load = lanes.load("dyb", "((int)t_row_idx[k] * out_plane + opos) * ld"),
        store = lanes.store("dxb", "xr * ld", "acc"),
    )
}

/// `conv_grad` (`dense = false`: one item per nonzero) or `conv_dense_grad` (one item per
/// entry of the dense `out × C·k²` gradient): a reduction over output positions and batch.
fn weight_grad(wg: &WorkGroups, dense: bool) -> String {
    let (name, out, extra, setup, n) = if dense {
        (
            csr_kernel_name(Op::ConvDenseGrad),
            "grad",
            "",
            "const int cols = in_c * ksize * ksize;\n\
             const int o = i / cols;\n\
             const int col = i - o * cols;\n",
            "out_c * in_c * ksize * ksize",
        )
    } else {
        (
            csr_kernel_name(Op::ConvGrad),
            "dw",
            "\n    __global const uint* restrict row_of,\n    \
             __global const uint* restrict col_idx,\n    const int nnz,",
            "const int o = (int)row_of[i];\nconst int col = (int)col_idx[i];\n",
            "nnz",
        )
    };
    let doc = if dense {
        "// G[o, col] = sum over output positions and b of dY * X under tap col, every entry"
    } else {
        "// dW[k] = sum over output positions and b of dY[row_of[k]] * X under tap col_idx[k]"
    };
    let setup = format!(
        "{setup}const int taps = ksize * ksize;
const int c = col / taps;
const int kh = (col - c * taps) / ksize;
const int kw = col - c * taps - kh * ksize;
const __global float* dyo = dy + o * out_h * out_w * ld;
const __global float* xc = x + c * in_h * in_w * ld;
"
    );
    let indent =
        |s: &str, by: &str| -> String { s.lines().map(|l| format!("{by}{l}\n")).collect() };
    let (attr, body) = if wg.sddmm_lanes == 1 {
        (
            String::new(),
            format!(
                "    const int i = get_global_id(1);
    if (i >= {n}) return;
{setup}    float acc = 0.0f;
    for (int oh = 0; oh < out_h; ++oh) {{
        const int ih = oh * stride + kh - pad;
        if (ih < 0 || ih >= in_h)
            continue;
        for (int ow = 0; ow < out_w; ++ow) {{
            const int iw = ow * stride + kw - pad;
            if (iw < 0 || iw >= in_w)
                continue;
            acc += sj_dot(dyo + (oh * out_w + ow) * ld, xc + (ih * in_w + iw) * ld, batch);
        }}
    }}
    {out}[i] = acc;
",
                setup = indent(&setup, "    "),
            ),
        )
    } else {
        let (lanes, items) = (wg.sddmm_lanes, wg.sddmm_items);
        (
            format!("__attribute__((reqd_work_group_size({lanes}, {items}, 1)))\n"),
            format!(
                "    __local float part[{items}][{lanes}];
    const int lane = get_local_id(0);
    const int slot = get_local_id(1);
    const int i = get_global_id(1);
    float acc = 0.0f;
    if (i < {n}) {{
{setup}        const int total = out_h * out_w * batch;
        for (int j = lane; j < total; j += {lanes}) {{
            const int pos = j / batch;
            const int b = j - pos * batch;
            const int oh = pos / out_w;
            const int ih = oh * stride + kh - pad;
            const int iw = (pos - oh * out_w) * stride + kw - pad;
            if (ih >= 0 && ih < in_h && iw >= 0 && iw < in_w)
                acc += dyo[pos * ld + b] * xc[(ih * in_w + iw) * ld + b];
        }}
    }}
    part[slot][lane] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = {half}; s > 0; s >>= 1) {{
        if (lane < s)
            part[slot][lane] += part[slot][lane + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }}
    if (lane == 0 && i < {n})
        {out}[i] = part[slot][0];
",
                setup = indent(&setup, "        "),
                half = lanes / 2,
            ),
        )
    };
    format!(
        "
{doc}
__kernel {attr}void {name}(
    __global const float* restrict dy,
    __global const float* restrict x,
    __global float* restrict {out},{extra}
    {GEOMETRY_PARAMS},
    const int batch,
    const int ld)
{{
{body}}}
"
    )
}

/// The entry and index arrays of the generic kernel of a convolution spec.
pub(super) fn csr_entry(
    ctx: &Ctx,
    g: &ConvGeometry,
) -> Result<(KernelEntry, Vec<IndexArray>), BackendError> {
    let p = ctx.pattern();
    let wg = ctx.profile.work_groups();
    let name = csr_kernel_name(ctx.spec.op()).to_string();
    let geometry = geometry_args(g, p.rows());
    use KernelArg::{Array, Batch, Ld, Operand as Op_};
    let rows_grid = |items: usize| Grid {
        extent: [
            Extent::Batch {
                per_item: wg.batch_vector,
            },
            Extent::Items(items),
        ],
        local: wg.rows,
    };
    let reduce_grid = |items: usize| Grid {
        extent: [Extent::Items(wg.sddmm_lanes), Extent::Items(items)],
        local: [wg.sddmm_lanes, wg.sddmm_items],
    };
    let (mut args, grid, arrays) = match ctx.spec.op() {
        Op::Conv { bias, .. } => {
            let mut args = vec![Op_(Operand::Values), Op_(Operand::X)];
            if bias {
                args.push(Op_(Operand::Bias));
            }
            args.extend([Op_(Operand::Y), Array(0), Array(1)]);
            (args, rows_grid(ctx.spec.out_features()), csr_arrays(p))
        }
        Op::ConvT => {
            let t = p.transpose();
            let args = vec![
                Op_(Operand::Values),
                Op_(Operand::Dy),
                Op_(Operand::Dx),
                Array(0),
                Array(1),
                Array(2),
            ];
            (
                args,
                rows_grid(ctx.spec.in_features()),
                transposed_arrays(t),
            )
        }
        Op::ConvGrad => {
            let row_of: Vec<u32> = (0..p.rows())
                .flat_map(|r| std::iter::repeat_n(r as u32, p.row_range(r).len()))
                .collect();
            let args = vec![
                Op_(Operand::Dy),
                Op_(Operand::X),
                Op_(Operand::Dw),
                Array(0),
                Array(1),
                KernelArg::Int(p.nnz() as i32),
            ];
            let arrays = vec![
                IndexArray {
                    name: "row_of",
                    data: row_of,
                },
                IndexArray {
                    name: "col_idx",
                    data: p.col_idx().to_vec(),
                },
            ];
            (args, reduce_grid(p.nnz()), arrays)
        }
        Op::ConvDenseGrad => {
            let args = vec![Op_(Operand::Dy), Op_(Operand::X), Op_(Operand::Grad)];
            (args, reduce_grid(p.rows() * p.cols()), Vec::new())
        }
        Op::Spmm { .. } | Op::SpmmT | Op::Sddmm | Op::DenseGrad => {
            return Err(ctx.unsupported("not a convolution op".into()))
        }
    };
    args.extend(geometry);
    args.extend([Batch, Ld]);
    Ok((KernelEntry { name, args, grid }, arrays))
}
