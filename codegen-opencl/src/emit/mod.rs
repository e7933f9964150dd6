//! OpenCL C emitters: plain string generation, no OpenCL needed.
//!
//! [`emit`] turns a [`KernelSpec`] and a strategy into [`Emitted`] code: one or more OpenCL C
//! programs, the kernels in them with their arguments and launch grids, and the index arrays
//! that the host uploads for the generic strategy. The executor (feature `opencl`) builds and
//! runs exactly this; `kernel-dump` can print [`Emitted::listing`].
//!
//! ## Strategies
//!
//! - `csr`: generic kernels that take the pattern arrays as arguments. Their source depends
//!   only on the device kind, never on the pattern, so it is built once per device
//!   ([`csr_library`]: one program holding every op).
//! - `table`: the pattern as `__constant` arrays in the source, each program within the
//!   device's constant buffer ([`DeviceProfile::table_budget`]); a larger pattern is split
//!   into row chunks, one program each, up to [`EmitOptions::table_max_programs`]; beyond,
//!   an [`BackendError::Unsupported`] error (the planner then takes `csr`).
//! - `unrolled`: straight-line code with every column offset and value index a literal, in
//!   kernels of about [`EmitOptions::unroll_chunk_nnz`] nonzeros (the row chunks of
//!   [`Pattern::chunks`]), for patterns up to [`EmitOptions::unroll_max_nnz`].
//!
//! `dense_grad` reads no pattern: its `table` and `unrolled` forms are the dense kernel with
//! the shape (and a fixed batch and `ld`) baked in as literals.
//!
//! The convolution ops (`conv`, `conv_t`, `conv_grad`, `conv_dense_grad`) have `csr` kernels
//! only (`conv` module: the geometry as `int` arguments, the `[out × C·k²]` pattern as index
//! arrays); `table` and `unrolled` refuse them with [`BackendError::Unsupported`].
//!
//! ## Layout
//!
//! Activations are feature-major `[features × batch]` with row stride `ld`: element `(f, b)` at
//! `f·ld + b`. Dimension 0 of every `spmm`/`spmm_t` grid runs along the batch, so neighbouring
//! work-items read neighbouring floats. `spmm_t` gathers over the transposed pattern
//! ([`Pattern::transpose`]) and reads the weights through its `value_index`, so it needs no
//! atomics. `sddmm` writes `nnz` values, `dense_grad` `rows·cols`.

mod conv;
mod dense;
mod rows;
mod sddmm;
mod text;
pub mod training;

use std::sync::Arc;

use sparse_ir::{BackendError, Dim, KernelSpec, Op, Pattern, Strategy, Transposed};
use xxhash_rust::xxh3::xxh3_64;

use crate::device::DeviceProfile;

/// Limits that shape the emitted code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmitOptions {
    /// Nonzeros per `unrolled` kernel (approximate: a row is never split).
    pub unroll_chunk_nnz: usize,
    /// The largest pattern `unrolled` accepts (its build time grows with the code).
    pub unroll_max_nnz: usize,
    /// The most programs (constant-buffer chunks) `table` may split a pattern into.
    pub table_max_programs: usize,
}

impl Default for EmitOptions {
    fn default() -> Self {
        EmitOptions {
            unroll_chunk_nnz: 1024,
            unroll_max_nnz: 1 << 17,
            table_max_programs: 64,
        }
    }
}

/// A buffer operand of a kernel, by its role in [`sparse_ir::Args`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operand {
    /// Weight values (`nnz`).
    Values,
    /// Layer input `X`.
    X,
    /// Bias (`rows`).
    Bias,
    /// Output `Y` of `spmm`.
    Y,
    /// Upstream gradient `dY`.
    Dy,
    /// Output `dX` of `spmm_t`.
    Dx,
    /// Output of `sddmm` (`nnz`).
    Dw,
    /// Output of `dense_grad` (`rows·cols`).
    Grad,
}

/// One argument of an emitted kernel, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelArg {
    /// A float buffer from the launch's arguments.
    Operand(Operand),
    /// An index array of [`Emitted::arrays`] (uploaded once, `uint` on the device).
    Array(usize),
    /// The launch's batch, as `int`.
    Batch,
    /// The launch's row stride, as `int`.
    Ld,
    /// An `int` known when emitting (a row or nonzero count).
    Int(i32),
}

/// The global size along one grid dimension, before rounding up to the work-group size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// The launch's batch, `per_item` columns per work-item (rounded up).
    Batch {
        /// Batch columns per work-item.
        per_item: usize,
    },
    /// A count known when emitting.
    Items(usize),
}

/// The launch grid of a kernel: two dimensions, each rounded up to its work-group size
/// (kernels guard the excess work-items).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    /// Global extent per dimension.
    pub extent: [Extent; 2],
    /// Work-group size per dimension.
    pub local: [usize; 2],
}

impl Grid {
    /// The global work size for a launch of `batch` columns; `None` when a dimension is empty
    /// (nothing to launch).
    pub fn global(&self, batch: usize) -> Option<[usize; 2]> {
        let mut out = [0; 2];
        for ((o, extent), local) in out.iter_mut().zip(self.extent).zip(self.local) {
            let n = match extent {
                Extent::Batch { per_item } => batch.div_ceil(per_item),
                Extent::Items(n) => n,
            };
            if n == 0 {
                return None;
            }
            *o = n.div_ceil(local) * local;
        }
        Some(out)
    }
}

/// One kernel of a program and how to launch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    /// The kernel's name in the program.
    pub name: String,
    /// Its arguments, in order.
    pub args: Vec<KernelArg>,
    /// Its launch grid.
    pub grid: Grid,
}

/// The source of one OpenCL program and the kernels to run from it, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramSource {
    /// OpenCL C source.
    pub source: String,
    /// Kernels to launch, in order.
    pub kernels: Vec<KernelEntry>,
}

impl ProgramSource {
    /// XXH3-64 of the source: the program cache key on a device.
    pub fn hash(&self) -> u64 {
        xxh3_64(self.source.as_bytes())
    }
}

/// An index array that the host uploads once per compiled kernel (`csr` only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexArray {
    /// Its name in the kernels' parameter lists.
    pub name: &'static str,
    /// The data.
    pub data: Vec<u32>,
}

/// Everything the executor needs to build and run one [`KernelSpec`] with one strategy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// The strategy the code implements (never `Auto`).
    pub strategy: Strategy,
    /// A comment block naming the layer, op, strategy, pattern hash, shape and nnz.
    pub header: String,
    /// Programs to build; their kernels run in order, programs in order.
    pub programs: Vec<ProgramSource>,
    /// Index arrays referenced by [`KernelArg::Array`].
    pub arrays: Vec<IndexArray>,
}

impl Emitted {
    /// Every kernel, in launch order.
    pub fn kernels(&self) -> impl Iterator<Item = &KernelEntry> {
        self.programs.iter().flat_map(|p| p.kernels.iter())
    }

    /// Total bytes of source.
    pub fn source_bytes(&self) -> usize {
        self.programs.iter().map(|p| p.source.len()).sum()
    }

    /// The readable listing: each program (the header first where the programs do not start
    /// with it, as the generic `csr` program does not).
    pub fn listing(&self) -> String {
        let headed = !self.programs.is_empty()
            && self
                .programs
                .iter()
                .all(|p| p.source.starts_with(&self.header));
        let mut out = String::new();
        if !headed {
            out.push_str(&self.header);
        }
        if self.programs.is_empty() {
            out.push_str("// nothing to launch: the output is empty\n");
        }
        for (i, p) in self.programs.iter().enumerate() {
            out.push_str(&format!(
                "// ===== program {}/{} ({} kernel(s), source hash {:016x}) =====\n",
                i + 1,
                self.programs.len(),
                p.kernels.len(),
                p.hash()
            ));
            out.push_str(&p.source);
        }
        out
    }
}

/// Emits `spec` with `strategy` (`Csr`, `Table` or `Unrolled`) for a device.
///
/// Errors: [`BackendError::Unsupported`] for a strategy of another backend (or `Auto`, which
/// the planner resolves first), for a `table` that would need more than
/// [`EmitOptions::table_max_programs`] programs or whose single row exceeds the constant
/// buffer, and for an `unrolled` pattern over [`EmitOptions::unroll_max_nnz`] nonzeros.
pub fn emit(
    spec: &KernelSpec,
    strategy: Strategy,
    profile: &DeviceProfile,
    opts: &EmitOptions,
) -> Result<Emitted, BackendError> {
    let ctx = Ctx::new(spec, strategy, profile, opts)?;
    if let Some(g) = spec.geometry() {
        if strategy != Strategy::Csr {
            return Err(ctx.unsupported(
                "convolutions have only the generic kernel on OpenCL (use csr or auto)".into(),
            ));
        }
        let (entry, arrays) = conv::csr_entry(&ctx, g)?;
        return Ok(Emitted {
            strategy,
            header: ctx.header(),
            programs: vec![ProgramSource {
                source: csr_library(profile),
                kernels: vec![entry],
            }],
            arrays,
        });
    }
    let programs = match (strategy, spec.op()) {
        (Strategy::Csr, _) => {
            let (entry, arrays) = csr_entry(&ctx)?;
            let emitted = Emitted {
                strategy,
                header: ctx.header(),
                programs: vec![ProgramSource {
                    source: csr_library(profile),
                    kernels: vec![entry],
                }],
                arrays,
            };
            return Ok(emitted);
        }
        (_, Op::Spmm { .. }) | (_, Op::SpmmT) => rows::emit(&ctx)?,
        (_, Op::Sddmm) => sddmm::emit(&ctx)?,
        (_, Op::DenseGrad) => vec![dense::emit(&ctx)],
        (_, Op::Conv { .. } | Op::ConvT | Op::ConvGrad | Op::ConvDenseGrad) => {
            return Err(ctx.unsupported("a convolution op needs a geometry".into()))
        }
    };
    Ok(Emitted {
        strategy,
        header: ctx.header(),
        programs,
        arrays: Vec::new(),
    })
}

/// The generic (`csr`) program of a device: every op's kernel, taking the pattern as index
/// arrays and every size at run time. Its source depends only on the device kind and
/// work-group shapes, so one build serves every layer.
pub fn csr_library(profile: &DeviceProfile) -> String {
    let wg = profile.work_groups();
    let mut s = String::new();
    s.push_str("// sparsejit OpenCL C: the generic CSR kernels (strategy csr) of every op.\n");
    s.push_str("// The pattern arrives as index arrays and every size as an argument, so this\n");
    s.push_str("// program is built once per device and serves every layer.\n");
    s.push_str(&format!(
        "// device kind {}; work-groups: spmm {:?}, sddmm {} lane(s) x {}, dense_grad {:?}{}\n",
        profile.kind,
        wg.rows,
        wg.sddmm_lanes,
        wg.sddmm_items,
        wg.dense,
        if wg.dense_tiled { " tiled" } else { "" }
    ));
    s.push_str(text::LAYOUT_COMMENT);
    s.push_str(text::HELPERS);
    s.push_str(&text::vector_helpers(wg.batch_vector));
    for (bias, relu) in [(false, false), (true, false), (false, true), (true, true)] {
        s.push_str(&rows::csr_kernel(&wg, Some((bias, relu))));
    }
    s.push_str(&rows::csr_kernel(&wg, None));
    s.push_str(&sddmm::csr_kernel(&wg));
    s.push_str(&dense::csr_kernel(&wg));
    s.push_str(&conv::csr_kernels(&wg));
    s
}

/// The kernel name in [`csr_library`] of an op.
pub fn csr_kernel_name(op: Op) -> &'static str {
    match op {
        Op::Spmm {
            bias: false,
            relu: false,
        } => "spmm_csr",
        Op::Spmm {
            bias: true,
            relu: false,
        } => "spmm_bias_csr",
        Op::Spmm {
            bias: false,
            relu: true,
        } => "spmm_relu_csr",
        Op::Spmm {
            bias: true,
            relu: true,
        } => "spmm_bias_relu_csr",
        Op::SpmmT => "spmm_t_csr",
        Op::Sddmm => "sddmm_csr",
        Op::DenseGrad => "dense_grad_csr",
        Op::Conv {
            bias: false,
            relu: false,
        } => "conv_csr",
        Op::Conv {
            bias: true,
            relu: false,
        } => "conv_bias_csr",
        Op::Conv {
            bias: false,
            relu: true,
        } => "conv_relu_csr",
        Op::Conv {
            bias: true,
            relu: true,
        } => "conv_bias_relu_csr",
        Op::ConvT => "conv_t_csr",
        Op::ConvGrad => "conv_grad_csr",
        Op::ConvDenseGrad => "conv_dense_grad_csr",
    }
}

/// The most feature rows any operand of `spec` has (and at least the pattern's rows and
/// columns): an index into an activation matrix is below this times `ld`.
pub(crate) fn largest_features(spec: &KernelSpec) -> usize {
    let p = spec.pattern();
    spec.out_features()
        .max(spec.in_features())
        .max(p.rows())
        .max(p.cols())
}

fn to_i32(ctx: &Ctx, what: &str, n: usize) -> Result<i32, BackendError> {
    i32::try_from(n).map_err(|_| ctx.unsupported(format!("{what} = {n} does not fit an int")))
}

/// The entry and index arrays of the generic kernel for `ctx.spec` (a matrix op; a
/// convolution's comes from [`conv::csr_entry`]).
fn csr_entry(ctx: &Ctx) -> Result<(KernelEntry, Vec<IndexArray>), BackendError> {
    let p = ctx.pattern();
    let wg = ctx.profile.work_groups();
    let name = csr_kernel_name(ctx.spec.op()).to_string();
    let int = |n: usize| KernelArg::Int(n as i32); // sizes checked in Ctx::new
    use KernelArg::{Array, Batch, Ld, Operand as Op_};
    match ctx.spec.op() {
        Op::Spmm { bias, .. } => {
            let mut args = vec![Op_(Operand::Values), Op_(Operand::X)];
            if bias {
                args.push(Op_(Operand::Bias));
            }
            args.extend([
                Op_(Operand::Y),
                Array(0),
                Array(1),
                int(p.rows()),
                Batch,
                Ld,
            ]);
            let arrays = csr_arrays(p);
            let grid = Grid {
                extent: [
                    Extent::Batch {
                        per_item: wg.batch_vector,
                    },
                    Extent::Items(p.rows()),
                ],
                local: wg.rows,
            };
            Ok((KernelEntry { name, args, grid }, arrays))
        }
        Op::SpmmT => {
            let t = p.transpose();
            let args = vec![
                Op_(Operand::Values),
                Op_(Operand::Dy),
                Op_(Operand::Dx),
                Array(0),
                Array(1),
                Array(2),
                int(p.cols()),
                Batch,
                Ld,
            ];
            let grid = Grid {
                extent: [
                    Extent::Batch {
                        per_item: wg.batch_vector,
                    },
                    Extent::Items(p.cols()),
                ],
                local: wg.rows,
            };
            let arrays = transposed_arrays(t);
            Ok((KernelEntry { name, args, grid }, arrays))
        }
        Op::Sddmm => {
            let row_of: Vec<u32> = (0..p.rows())
                .flat_map(|r| std::iter::repeat_n(r as u32, p.row_range(r).len()))
                .collect();
            let args = vec![
                Op_(Operand::Dy),
                Op_(Operand::X),
                Op_(Operand::Dw),
                Array(0),
                Array(1),
                int(p.nnz()),
                Batch,
                Ld,
            ];
            let grid = Grid {
                extent: [Extent::Items(wg.sddmm_lanes), Extent::Items(p.nnz())],
                local: [wg.sddmm_lanes, wg.sddmm_items],
            };
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
            Ok((KernelEntry { name, args, grid }, arrays))
        }
        Op::DenseGrad => {
            let args = vec![
                Op_(Operand::Dy),
                Op_(Operand::X),
                Op_(Operand::Grad),
                int(p.rows()),
                int(p.cols()),
                Batch,
                Ld,
            ];
            Ok((dense::entry(&wg, name, args, p), Vec::new()))
        }
        Op::Conv { .. } | Op::ConvT | Op::ConvGrad | Op::ConvDenseGrad => {
            Err(ctx.unsupported("a convolution op needs a geometry".into()))
        }
    }
}

/// The index arrays of a generic kernel that walks the pattern's rows: `row_ptr`, `col_idx`.
fn csr_arrays(p: &Pattern) -> Vec<IndexArray> {
    vec![
        IndexArray {
            name: "row_ptr",
            data: p.row_ptr().to_vec(),
        },
        IndexArray {
            name: "col_idx",
            data: p.col_idx().to_vec(),
        },
    ]
}

/// The index arrays of a generic kernel that walks the transpose's rows (the pattern's
/// columns): `t_row_ptr`, `t_row_idx`, and the weight position of each entry, `value_index`.
fn transposed_arrays(t: Transposed) -> Vec<IndexArray> {
    vec![
        IndexArray {
            name: "t_row_ptr",
            data: t.pattern.row_ptr().to_vec(),
        },
        IndexArray {
            name: "t_row_idx",
            data: t.pattern.col_idx().to_vec(),
        },
        IndexArray {
            name: "value_index",
            data: t.value_index,
        },
    ]
}

/// What every emitter needs: the spec, the strategy, the device and the limits.
struct Ctx<'a> {
    spec: &'a KernelSpec,
    strategy: Strategy,
    profile: &'a DeviceProfile,
    opts: &'a EmitOptions,
    /// The layer name as a C identifier.
    ident: String,
}

impl<'a> Ctx<'a> {
    fn new(
        spec: &'a KernelSpec,
        strategy: Strategy,
        profile: &'a DeviceProfile,
        opts: &'a EmitOptions,
    ) -> Result<Self, BackendError> {
        let ident: String = spec
            .layer()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let ctx = Ctx {
            spec,
            strategy,
            profile,
            opts,
            ident,
        };
        if !matches!(
            strategy,
            Strategy::Csr | Strategy::Table | Strategy::Unrolled
        ) {
            return Err(ctx.unsupported(match strategy {
                Strategy::Auto => "auto is resolved by the planner before emitting".to_string(),
                _ => "not an OpenCL strategy (expected csr, table or unrolled)".to_string(),
            }));
        }
        // Every index the kernels compute is an `int`: the largest is below rows·ld, cols·ld,
        // rows·cols or nnz, and for a convolution out·OH·OW·ld or C·H·W·ld (the executor
        // checks the launch's ld the same way, `largest_features`).
        let p = spec.pattern();
        to_i32(&ctx, "rows·cols", p.rows().saturating_mul(p.cols()))?;
        let features = largest_features(spec);
        if spec.geometry().is_some() {
            to_i32(&ctx, "max(out·OH·OW, C·H·W)", features)?;
        }
        for dim in [spec.batch(), spec.ld()] {
            if let Dim::Fixed(v) = dim {
                let what = if spec.geometry().is_some() {
                    "max(out·OH·OW, C·H·W)·ld"
                } else {
                    "max(rows, cols)·ld"
                };
                to_i32(&ctx, what, features.saturating_mul(v))?;
            }
        }
        Ok(ctx)
    }

    fn pattern(&self) -> &Arc<Pattern> {
        self.spec.pattern()
    }

    fn unsupported(&self, reason: String) -> BackendError {
        BackendError::Unsupported {
            layer: self.spec.layer().to_string(),
            op: self.spec.op().name(),
            strategy: self.strategy,
            reason,
        }
    }

    /// `{layer}_{op}_{strategy}_{index}`.
    fn kernel_name(&self, index: usize) -> String {
        format!(
            "{}_{}_{}_{}",
            self.ident,
            self.spec.op().name(),
            self.strategy.name(),
            index
        )
    }

    /// The comment block at the top of every listing and specialised program.
    fn header(&self) -> String {
        let p = self.pattern();
        let wg = self.profile.work_groups();
        let mut s = String::new();
        s.push_str(&format!(
            "// sparsejit OpenCL C | layer {} | op {} | strategy {}\n",
            self.spec.layer(),
            self.spec.op(),
            self.strategy
        ));
        s.push_str(&format!(
            "// pattern {:016x} | shape {}x{} | nnz {} | density {:.3} %\n",
            p.hash(),
            p.rows(),
            p.cols(),
            p.nnz(),
            100.0 * p.density()
        ));
        s.push_str(&format!(
            "// batch {} | ld {} (\"any\": given at run time)\n",
            self.spec.batch(),
            self.spec.ld()
        ));
        s.push_str(&format!(
            "// device kind {} | work-group spmm {:?}, sddmm {}x{}, dense_grad {:?}\n",
            self.profile.kind, wg.rows, wg.sddmm_lanes, wg.sddmm_items, wg.dense
        ));
        s
    }

    /// `#define BATCH …` and `#define LD …`: literals when fixed, the parameters otherwise.
    fn dim_defines(&self) -> String {
        let def = |name: &str, param: &str, d: Dim| match d {
            Dim::Fixed(v) => format!("#define {name} {v}\n"),
            Dim::Any => format!("#define {name} {param}\n"),
        };
        def("BATCH", "batch", self.spec.batch()) + &def("LD", "ld", self.spec.ld())
    }

    /// The trailing `batch`/`ld` parameters (only those not fixed) and their arguments.
    fn dim_params(&self) -> (String, Vec<KernelArg>) {
        let mut params = String::new();
        let mut args = Vec::new();
        if self.spec.batch() == Dim::Any {
            params.push_str(",\n    const int batch");
            args.push(KernelArg::Batch);
        }
        if self.spec.ld() == Dim::Any {
            params.push_str(",\n    const int ld");
            args.push(KernelArg::Ld);
        }
        (params, args)
    }
}

#[cfg(test)]
mod tests;
