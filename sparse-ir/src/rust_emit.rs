//! Rust code specialised to a static pattern: what `sparse_kernel!` expands to.
//!
//! This lives in a normal library (not the proc-macro crate) so that both the macro and
//! `kernel-dump --emit rust` use it. [`emit_spmm`] turns a [`Pattern`] into a module of Rust
//! tokens that needs nothing but `core`:
//!
//! ```text
//! pub mod NAME {
//!     pub const ROWS: usize; pub const COLS: usize; pub const NNZ: usize;
//!     pub const BATCH: Option<usize>;            // Some(b) when compiled for one batch
//!     pub static ROW_PTR: [u32; ROWS + 1]; pub static COL_IDX: [u32; NNZ];
//!     pub static VALUES: [f32; NNZ];             // only with values
//!     pub enum KernelError { .. }                // length / batch / ld errors
//!     pub fn run(values: &[f32], x: &[f32], [bias: &[f32],] y: &mut [f32],
//!                batch: usize, ld: usize) -> Result<(), KernelError>;
//!     pub fn infer(x: &[f32], [bias: &[f32],] y: &mut [f32],
//!                  batch: usize, ld: usize) -> Result<(), KernelError>;  // only with values
//! }
//! ```
//!
//! `run` computes `Y = W·X (+ bias) (ReLU)` in the layout of CONTRACTS.md (feature-major,
//! row stride `ld`), with `W`'s nonzeros in CSR order in `values`. It checks every length
//! first; the code behind it has two shapes, chosen by measurement (see
//! `inference-example/RESULTS.md`):
//!
//! - **Batch 1** is unrolled: one short statement per nonzero, `sJ += v[K] * x[C];`, with the
//!   value index and the column as constants into fixed-size arrays (`&[f32; NNZ]`,
//!   `&[f32; COLS]`), so there is no bounds check and no index load. The nonzeros of a row
//!   feed [`CodeShape::accumulators`] chains round robin, combined at the end of the row (odd
//!   chains hold negated sums, which keeps LLVM's SLP vectoriser from packing the chains into
//!   vectors with shuffled `x` lanes). Rows are grouped into functions of about
//!   [`CodeShape::nnz_per_function`] nonzeros, which keeps rustc's time linear in the
//!   nonzeros. With `ld > 1` the input column is first gathered into a local array (when
//!   `COLS` and `ROWS` are at most [`GATHER_MAX`]), so the same code runs; outputs are stored
//!   at `y[r·ld]`.
//! - **Batch ≥ 2** is one loop over the static `ROW_PTR`/`COL_IDX` tables (no code per
//!   nonzero): for each row, fixed-size blocks of [`CodeShape::block`] batch columns are
//!   accumulated in a local `[f32; BLOCK]`, which rustc keeps in vector registers; each
//!   nonzero costs one bounds check per block (`x[o..o + BLOCK]`, then a fixed-size array).
//!   The remaining columns run as one more full block when `ld` leaves room (it reads padding
//!   columns of `x` and writes only columns `< batch` of `y`), else in blocks of 8, 4 and 1.
//!   Padding columns of `y` are never written.
//!
//! The generated code vectorises with the target features the *using* crate is compiled
//! with (SSE2 on plain `x86_64`; `-C target-cpu=native` gives it AVX2/AVX-512).
//!
//! **FMA** ([`RustKernel::fma`], `fma = true` in `sparse_kernel!`). Rust never contracts
//! `a * b + c` into a fused multiply-add, and the only stable, safe way to ask for one is
//! `f32::mul_add`, which lives in `std`; without the `fma` target feature it calls a slow
//! library routine. So with `fma` the module holds two versions of its arithmetic, chosen by
//! `cfg(target_feature = "fma")` when the using crate compiles: `mul_add` in every
//! accumulation where the feature is on (batch 1 with [`CodeShape::fused_accumulators`]
//! chains per row and without the `black_box` on `x`, which measured slower once the
//! products are fused), the plain code otherwise. `FMA` in the
//! module says which one was compiled. The fused code is the faster one at batch 1
//! (`macro-bench` figures in `docs/MEASUREMENTS.md` and `inference-example/RESULTS.md`).

use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::quote;

use crate::pattern::Pattern;

/// The largest pattern [`emit_spmm`] accepts; larger ones are rejected.
pub const MAX_UNROLLED_NNZ: usize = 65_536;

/// Nonzeros per generated batch-1 function by default (rows are never split).
pub const NNZ_PER_FUNCTION: usize = 64;

/// Batch columns per block of the batch loop by default.
pub const BATCH_BLOCK: usize = 16;

/// The largest `COLS` (and `ROWS`) for which batch 1 with `ld > 1` gathers the input column
/// into a local array and runs the unrolled code; larger layers use the batch loop.
pub const GATHER_MAX: usize = 4096;

/// What to generate.
#[derive(Debug, Clone)]
pub struct RustKernel<'a> {
    /// The module name (a Rust identifier).
    pub name: &'a str,
    /// The mask.
    pub pattern: &'a Pattern,
    /// Add a bias per output row.
    pub bias: bool,
    /// Apply ReLU after the bias.
    pub relu: bool,
    /// A fixed batch size, or `None` for any batch given at run time.
    pub batch: Option<usize>,
    /// Weight values baked in (CSR order, `nnz` of them), for pure inference.
    pub values: Option<&'a [f32]>,
    /// Also emit code that multiplies and adds with one rounding (`f32::mul_add`), used where
    /// the using crate is compiled with the `fma` target feature (`-C target-feature=+fma`,
    /// or a `target-cpu` that has it) and the plain code elsewhere. It needs `std` (`core`
    /// has no `mul_add`), so it is opt-in; see the module doc.
    pub fma: bool,
}

/// The knobs of the generated code's shape. [`CodeShape::default`] is the measured choice;
/// the others exist so that benchmarks can compare shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeShape {
    /// Batch columns per block of the batch loop (1 to 256).
    pub block: usize,
    /// Unroll the batch-1 code (one statement per nonzero); `false` runs batch 1 through a
    /// loop over the tables too (no code per nonzero at all).
    pub unroll_batch1: bool,
    /// Accumulators per row in the batch-1 code (1 to 8).
    pub accumulators: usize,
    /// Accumulators per row in the fused (`fma`) version of the batch-1 code (1 to 8).
    pub fused_accumulators: usize,
    /// Nonzeros per generated batch-1 function (at least 1; rows are never split).
    pub nnz_per_function: usize,
    /// Rows whose batch-1 statements are interleaved (1 to 8).
    pub interleave: usize,
    /// Pass `v` and `x` through `core::hint::black_box` before each group of rows.
    pub barrier: bool,
}

impl Default for CodeShape {
    fn default() -> Self {
        CodeShape {
            block: BATCH_BLOCK,
            unroll_batch1: true,
            accumulators: 2,
            fused_accumulators: 3,
            nnz_per_function: NNZ_PER_FUNCTION,
            interleave: 1,
            barrier: true,
        }
    }
}

/// Why code could not be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// The pattern has more nonzeros than [`MAX_UNROLLED_NNZ`].
    #[error("the mask has {nnz} nonzeros, more than the {max} that sparse_kernel! unrolls")]
    TooLarge {
        /// Nonzeros of the pattern.
        nnz: usize,
        /// The limit.
        max: usize,
    },
    /// The name is not a Rust identifier.
    #[error("{0:?} is not a valid Rust identifier")]
    BadName(String),
    /// The baked values do not match the pattern.
    #[error("{got} values given for a pattern with {nnz} nonzeros")]
    ValueCount {
        /// Nonzeros of the pattern.
        nnz: usize,
        /// Values given.
        got: usize,
    },
    /// A fixed batch of zero.
    #[error("batch must be at least 1")]
    ZeroBatch,
    /// A [`CodeShape`] knob outside its range.
    #[error("invalid code shape: {0}")]
    BadShape(&'static str),
}

fn usize_lit(v: usize) -> Literal {
    Literal::usize_unsuffixed(v)
}

/// An `f32` constant: a literal when finite, `f32::from_bits(..)` otherwise (NaN, ±∞).
fn f32_tokens(v: f32) -> TokenStream {
    if v.is_finite() {
        let lit = Literal::f32_suffixed(v);
        quote!(#lit)
    } else {
        let bits = Literal::u32_suffixed(v.to_bits());
        quote!(f32::from_bits(#bits))
    }
}

/// Generates the module described in the module doc, in the default [`CodeShape`].
pub fn emit_spmm(kernel: &RustKernel<'_>) -> Result<TokenStream, EmitError> {
    emit_spmm_with(kernel, &CodeShape::default())
}

/// Generates the module described in the module doc, in the given [`CodeShape`].
pub fn emit_spmm_with(
    kernel: &RustKernel<'_>,
    shape: &CodeShape,
) -> Result<TokenStream, EmitError> {
    let p = kernel.pattern;
    if p.nnz() > MAX_UNROLLED_NNZ {
        return Err(EmitError::TooLarge {
            nnz: p.nnz(),
            max: MAX_UNROLLED_NNZ,
        });
    }
    if syn_like_ident(kernel.name).is_none() {
        return Err(EmitError::BadName(kernel.name.to_string()));
    }
    if let Some(values) = kernel.values {
        if values.len() != p.nnz() {
            return Err(EmitError::ValueCount {
                nnz: p.nnz(),
                got: values.len(),
            });
        }
    }
    if kernel.batch == Some(0) {
        return Err(EmitError::ZeroBatch);
    }
    if !(1..=256).contains(&shape.block) {
        return Err(EmitError::BadShape("block must be 1 to 256"));
    }
    if !(1..=8).contains(&shape.accumulators) || !(1..=8).contains(&shape.fused_accumulators) {
        return Err(EmitError::BadShape("accumulators must be 1 to 8"));
    }
    if !(1..=8).contains(&shape.interleave) {
        return Err(EmitError::BadShape("interleave must be 1 to 8"));
    }
    if shape.nnz_per_function == 0 {
        return Err(EmitError::BadShape("nnz_per_function must be at least 1"));
    }
    let name = Ident::new(kernel.name, Span::call_site());
    let (rows, cols, nnz) = (usize_lit(p.rows()), usize_lit(p.cols()), usize_lit(p.nnz()));
    let row_ptr = p.row_ptr().iter().map(|&v| Literal::u32_unsuffixed(v));
    let col_idx = p.col_idx().iter().map(|&v| Literal::u32_unsuffixed(v));
    let block = usize_lit(shape.block);
    let batch_const = match kernel.batch {
        Some(b) => {
            let b = usize_lit(b);
            quote!(Some(#b))
        }
        None => quote!(None),
    };

    let bias_param = if kernel.bias {
        quote!(bias: &[f32],)
    } else {
        quote!()
    };
    let bias_arg = if kernel.bias { quote!(bias,) } else { quote!() };
    let bias_check = if kernel.bias {
        quote! {
            if bias.len() != ROWS {
                return Err(KernelError::Length { operand: "bias", expected: ROWS, got: bias.len() });
            }
            let bias: &[f32; ROWS] = match bias.try_into() { Ok(b) => b, Err(_) => unreachable!() };
        }
    } else {
        quote!()
    };
    let bias_fn_param = if kernel.bias {
        quote!(bias: &[f32; ROWS],)
    } else {
        quote!()
    };
    // The start of a row's sum: its bias, or -0.0 (the identity of `+`, so rustc folds it).
    let row_init = if kernel.bias {
        quote!(bias[r])
    } else {
        quote!(-0.0f32)
    };
    // The start of a block's accumulators: +0.0 without bias, so that an empty row gives
    // +0.0 like the interpreter.
    let block_init = if kernel.bias {
        quote!(bias[r])
    } else {
        quote!(0.0f32)
    };
    let relu_scalar = if kernel.relu {
        quote!(if t < 0.0 {
            t = 0.0;
        })
    } else {
        quote!()
    };
    let relu_block = if kernel.relu {
        quote!(for a in acc.iter_mut() {
            if *a < 0.0 {
                *a = 0.0;
            }
        })
    } else {
        quote!()
    };

    let wants_batch1 = matches!(kernel.batch, Some(1) | None);
    // Batch 1 with `ld > 1` gathers the input column into a stack array of `COLS` floats.
    let gather_ok = p.cols() <= GATHER_MAX && p.rows() <= GATHER_MAX;
    let wants_blocks = kernel.batch != Some(1) || !shape.unroll_batch1 || !gather_ok;
    let fixed_batch = match kernel.batch {
        Some(b) => {
            let b = usize_lit(b);
            quote!(let batch: usize = #b;)
        }
        None => quote!(),
    };

    // The batch loop over the tables (no code per nonzero).
    let mut widths = vec![shape.block];
    widths.extend([8, 4, 1].into_iter().filter(|&w| w < shape.block));
    let width_loops = widths.iter().map(|&w| {
        let w = usize_lit(w);
        quote! {
            while b0 + #w <= batch {
                let acc = block::<#w>(cols, vals, x, ld, b0, init);
                yr[b0..b0 + #w].copy_from_slice(&acc);
                b0 += #w;
            }
        }
    });
    let block_fns = Arith::variants(kernel.fma).into_iter().map(|arith| {
        let cfg = arith.cfg();
        let step = match arith {
            Arith::Fused => quote!(acc[i] = v.mul_add(xs[i], acc[i]);),
            Arith::Plain | Arith::PlainOnly => quote!(acc[i] += v * xs[i];),
        };
        quote! {
            /// One row's block of `W` batch columns from `b0`: `init + Σ_k v_k·x[c_k·ld + b0..][..W]`
            /// (with ReLU when the kernel has it).
            #cfg
            #[inline(always)]
            fn block<const W: usize>(cols: &[u32], vals: &[f32], x: &[f32], ld: usize, b0: usize, init: f32) -> [f32; W] {
                let mut acc = [init; W];
                for (&c, &v) in cols.iter().zip(vals) {
                    let o = c as usize * ld + b0;
                    let xs: &[f32; W] = match x[o..o + W].try_into() { Ok(s) => s, Err(_) => unreachable!() };
                    for i in 0..W {
                        #step
                    }
                }
                #relu_block
                acc
            }
        }
    });
    let blocks_fn = if wants_blocks {
        quote! {
            #(#block_fns)*

            /// Rows over the CSR tables, `BLOCK` batch columns at a time; the last columns in a
            /// block that reads (never writes) padding when `ld` leaves room, else in narrower
            /// blocks.
            #[inline(never)]
            fn blocks(values: &[f32; NNZ], x: &[f32], #bias_fn_param y: &mut [f32], batch: usize, ld: usize) {
                #fixed_batch
                for r in 0..ROWS {
                    let (lo, hi) = (ROW_PTR[r] as usize, ROW_PTR[r + 1] as usize);
                    let cols = &COL_IDX[lo..hi];
                    let vals = &values[lo..hi];
                    let init: f32 = #block_init;
                    let yr = &mut y[r * ld..r * ld + batch];
                    let mut b0 = 0;
                    while b0 + BLOCK <= batch {
                        let acc = block::<BLOCK>(cols, vals, x, ld, b0, init);
                        yr[b0..b0 + BLOCK].copy_from_slice(&acc);
                        b0 += BLOCK;
                    }
                    if b0 < batch && b0 + BLOCK <= ld {
                        let acc = block::<BLOCK>(cols, vals, x, ld, b0, init);
                        yr[b0..].copy_from_slice(&acc[..batch - b0]);
                        continue;
                    }
                    #(#width_loops)*
                }
            }
        }
    } else {
        quote!()
    };

    // Batch 1: unrolled, one statement per nonzero, or the table loop.
    let mut fns = Vec::new();
    let mut calls = Vec::new();
    if wants_batch1 && shape.unroll_batch1 {
        for (g, chunk) in p.chunks(shape.nnz_per_function).iter().enumerate() {
            let f = Ident::new(&format!("b1_{g}"), Span::call_site());
            let rows: Vec<usize> = chunk.rows.clone().collect();
            for arith in Arith::variants(kernel.fma) {
                let accumulators = match arith {
                    Arith::Fused => shape.fused_accumulators,
                    Arith::Plain | Arith::PlainOnly => shape.accumulators,
                };
                let body: Vec<TokenStream> = rows
                    .chunks(shape.interleave)
                    .map(|group| {
                        batch1_rows(p, group, accumulators, kernel.bias, shape.barrier, arith)
                    })
                    .collect();
                let cfg = arith.cfg();
                fns.push(quote! {
                    #cfg
                    #[inline(never)]
                    fn #f(v: &[f32; NNZ], x: &[f32; COLS], #bias_fn_param y: &mut [f32], ld: usize) {
                        #(#body)*
                    }
                });
            }
            calls.push(quote!(#f(values, x, #bias_arg y, ld);));
        }
    }
    let one_path = if !wants_batch1 {
        quote!()
    } else if shape.unroll_batch1 {
        let gather = if gather_ok {
            quote! {
                let mut xl = [0.0f32; COLS];
                for (d, s) in xl.iter_mut().zip(x.chunks(ld)) {
                    *d = s[0];
                }
                let x = &xl;
                #(#calls)*
                return Ok(());
            }
        } else {
            quote!()
        };
        quote! {
            if batch == 1 {
                if ld == 1 {
                    let x: &[f32; COLS] = match x[..COLS].try_into() { Ok(s) => s, Err(_) => unreachable!() };
                    #(#calls)*
                    return Ok(());
                }
                #gather
            }
        }
    } else {
        quote! {
            if batch == 1 {
                one(values, x, #bias_arg y, ld);
                return Ok(());
            }
        }
    };
    let one_table_fn = if wants_batch1 && !shape.unroll_batch1 {
        quote! {
            /// Batch 1 over the CSR tables, four accumulators per row.
            #[inline(never)]
            fn one(values: &[f32; NNZ], x: &[f32], #bias_fn_param y: &mut [f32], ld: usize) {
                for r in 0..ROWS {
                    let (lo, hi) = (ROW_PTR[r] as usize, ROW_PTR[r + 1] as usize);
                    let cols = &COL_IDX[lo..hi];
                    let vals = &values[lo..hi];
                    let mut s = [-0.0f32; 4];
                    let mut cc = cols.chunks_exact(4);
                    let mut vc = vals.chunks_exact(4);
                    for (c4, v4) in (&mut cc).zip(&mut vc) {
                        for i in 0..4 {
                            s[i] += v4[i] * x[c4[i] as usize * ld];
                        }
                    }
                    for (i, (&c, &v)) in cc.remainder().iter().zip(vc.remainder()).enumerate() {
                        s[i] += v * x[c as usize * ld];
                    }
                    let init: f32 = #row_init;
                    let mut t = (s[0] + s[1]) + (s[2] + s[3]) + init;
                    #relu_scalar
                    y[r * ld] = t;
                }
            }
        }
    } else {
        quote!()
    };
    let fin_fn = if wants_batch1 && shape.unroll_batch1 {
        quote! {
            /// The end of a batch-1 row: ReLU when the kernel has it.
            #[inline(always)]
            fn fin(mut t: f32) -> f32 {
                #relu_scalar
                t
            }
        }
    } else {
        quote!()
    };

    let batch_check = match kernel.batch {
        Some(_) => quote! {
            if Some(batch) != BATCH {
                return Err(KernelError::Batch { expected: BATCH, got: batch });
            }
        },
        None => quote! {
            if batch == 0 {
                return Err(KernelError::Batch { expected: None, got: 0 });
            }
        },
    };
    let general_path = if wants_blocks {
        quote!(blocks(values, x, #bias_arg y, batch, ld);)
    } else {
        quote!()
    };

    let values_items = match kernel.values {
        Some(values) => {
            let vals = values.iter().map(|&v| f32_tokens(v));
            quote! {
                /// The weight values baked in, in CSR order.
                pub static VALUES: [f32; NNZ] = [#(#vals),*];

                /// [`run`] with the baked-in [`VALUES`].
                pub fn infer(x: &[f32], #bias_param y: &mut [f32], batch: usize, ld: usize) -> Result<(), KernelError> {
                    run(&VALUES, x, #bias_arg y, batch, ld)
                }
            }
        }
        None => quote!(),
    };
    let fma_const = if kernel.fma {
        quote!(cfg!(target_feature = "fma"))
    } else {
        quote!(false)
    };
    let doc = format!(
        " Sparse kernel generated by sparsejit for a {}x{} mask with {} nonzeros (pattern hash {:016x}).",
        p.rows(),
        p.cols(),
        p.nnz(),
        p.hash()
    );

    Ok(quote! {
        #[doc = #doc]
        #[allow(clippy::all, clippy::pedantic, unused_variables, unused_mut, unused_assignments, non_upper_case_globals, unreachable_code, dead_code, unused_parens)]
        pub mod #name {
            /// Output features (rows of the mask).
            pub const ROWS: usize = #rows;
            /// Input features (columns of the mask).
            pub const COLS: usize = #cols;
            /// Nonzeros of the mask.
            pub const NNZ: usize = #nnz;
            /// The batch the kernel was generated for, or `None` for any batch.
            pub const BATCH: Option<usize> = #batch_const;
            /// CSR row pointers of the mask.
            pub static ROW_PTR: [u32; ROWS + 1] = [#(#row_ptr),*];
            /// CSR column indices of the mask.
            pub static COL_IDX: [u32; NNZ] = [#(#col_idx),*];
            /// Whether the compiled code multiplies and adds with one rounding (`f32::mul_add`):
            /// generated with `fma = true` and compiled with the `fma` target feature.
            pub const FMA: bool = #fma_const;
            const BLOCK: usize = #block;

            /// Why [`run`] refused its arguments.
            #[derive(Debug, Clone, Copy, PartialEq, Eq)]
            pub enum KernelError {
                /// A slice has the wrong length.
                Length {
                    /// Which argument.
                    operand: &'static str,
                    /// The length it needs (at least, for `x` and `y`).
                    expected: usize,
                    /// Its length.
                    got: usize,
                },
                /// The batch is not the one the kernel was generated for, or is zero.
                Batch {
                    /// The batch the kernel was generated for.
                    expected: Option<usize>,
                    /// The batch given.
                    got: usize,
                },
                /// The row stride is smaller than the batch.
                Ld {
                    /// The row stride given.
                    ld: usize,
                    /// The batch given.
                    batch: usize,
                },
            }

            impl core::fmt::Display for KernelError {
                fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                    match *self {
                        KernelError::Length { operand, expected, got } => write!(f, "{} has {} elements, needs {}", operand, got, expected),
                        KernelError::Batch { expected: Some(e), got } => write!(f, "kernel generated for batch {}, called with {}", e, got),
                        KernelError::Batch { expected: None, got } => write!(f, "batch must be at least 1, got {}", got),
                        KernelError::Ld { ld, batch } => write!(f, "ld = {} is smaller than batch = {}", ld, batch),
                    }
                }
            }

            /// `Y = W·X (+ bias) (ReLU)`: `x` is `COLS × ld`, `y` is `ROWS × ld` (feature-major),
            /// `values` holds the `NNZ` weights in CSR order. Columns `0..batch` of `y` are written.
            pub fn run(values: &[f32], x: &[f32], #bias_param y: &mut [f32], batch: usize, ld: usize) -> Result<(), KernelError> {
                #batch_check
                if ld < batch {
                    return Err(KernelError::Ld { ld, batch });
                }
                if values.len() != NNZ {
                    return Err(KernelError::Length { operand: "values", expected: NNZ, got: values.len() });
                }
                let values: &[f32; NNZ] = match values.try_into() { Ok(v) => v, Err(_) => unreachable!() };
                let need_x = COLS.saturating_mul(ld);
                if x.len() < need_x {
                    return Err(KernelError::Length { operand: "x", expected: need_x, got: x.len() });
                }
                let need_y = ROWS.saturating_mul(ld);
                if y.len() < need_y {
                    return Err(KernelError::Length { operand: "y", expected: need_y, got: y.len() });
                }
                #bias_check
                #one_path
                #general_path
                Ok(())
            }

            #values_items

            #blocks_fn
            #one_table_fn
            #fin_fn
            #(#fns)*
        }
    })
}

/// The batch-1 code of a few rows: the nonzeros of a row feed `accumulators` chains round
/// robin (independent add chains), combined at the end of the row; the statements of the rows
/// given are interleaved.
///
/// Odd chains subtract their products and hold the negated sum (`s0 - s1`): with all chains
/// alike, LLVM's SLP vectoriser packs them into SSE vectors whose `x` lanes it gathers with
/// shuffles, which measured slower than this plain scalar code (`mulss` with a memory operand
/// and `addss`/`subss` per nonzero). With `barrier`, `x` passes through
/// `core::hint::black_box` first, so that rustc does not keep `x` elements loaded for earlier
/// rows in registers for later ones (and spill them).
fn batch1_rows(
    p: &Pattern,
    rows: &[usize],
    accumulators: usize,
    bias: bool,
    barrier: bool,
    arith: Arith,
) -> TokenStream {
    let fused = arith == Arith::Fused;
    let mut per_row: Vec<Vec<TokenStream>> = Vec::new();
    let mut ends = Vec::new();
    for (slot, &r) in rows.iter().enumerate() {
        let rl = usize_lit(r);
        let range = p.row_range(r);
        let used = range.len().min(accumulators);
        let accs: Vec<Ident> = (0..used)
            .map(|j| Ident::new(&format!("s{slot}_{j}"), Span::call_site()))
            .collect();
        let terms = range
            .enumerate()
            .map(|(j, k)| {
                let a = &accs[j % accumulators];
                let kl = usize_lit(k);
                let c = usize_lit(p.col_idx()[k] as usize);
                // odd chains hold the negated sum (see the function doc)
                match (j < used, j % accumulators % 2 == 1, fused) {
                    (true, false, _) => quote!(let mut #a = v[#kl] * x[#c];),
                    (true, true, _) => quote!(let mut #a = -(v[#kl] * x[#c]);),
                    (false, false, false) => quote!(#a += v[#kl] * x[#c];),
                    (false, true, false) => quote!(#a -= v[#kl] * x[#c];),
                    (false, false, true) => quote!(#a = v[#kl].mul_add(x[#c], #a);),
                    (false, true, true) => quote!(#a = (-v[#kl]).mul_add(x[#c], #a);),
                }
            })
            .collect();
        per_row.push(terms);
        let sum = match (used, bias) {
            (0, true) => quote!(bias[#rl]),
            (0, false) => quote!(0.0f32),
            (_, true) => {
                let t = signed_sum(&accs);
                quote!(#t + bias[#rl])
            }
            (_, false) => signed_sum(&accs),
        };
        ends.push(quote!(y[#rl * ld] = fin(#sum);));
    }
    let longest = per_row.iter().map(Vec::len).max().unwrap_or(0);
    let mut terms = Vec::new();
    for i in 0..longest {
        for row in &per_row {
            if let Some(t) = row.get(i) {
                terms.push(t.clone());
            }
        }
    }
    let fence = if barrier && !fused {
        quote!(let x = core::hint::black_box(x);)
    } else {
        quote!()
    };
    quote! {
        {
            #fence
            #(#terms)*
            #(#ends)*
        }
    }
}

/// Which arithmetic a piece of generated code uses, and under which `cfg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arith {
    /// `a * b + c`, the only version (the kernel was not asked for FMA).
    PlainOnly,
    /// `a * b + c` under `cfg(not(target_feature = "fma"))`.
    Plain,
    /// `a.mul_add(b, c)` under `cfg(target_feature = "fma")`.
    Fused,
}

impl Arith {
    /// The versions a kernel needs.
    fn variants(fma: bool) -> Vec<Arith> {
        if fma {
            vec![Arith::Fused, Arith::Plain]
        } else {
            vec![Arith::PlainOnly]
        }
    }

    /// The `cfg` attribute of this version.
    fn cfg(self) -> TokenStream {
        match self {
            Arith::PlainOnly => quote!(),
            Arith::Plain => quote!(#[cfg(not(target_feature = "fma"))]),
            Arith::Fused => quote!(#[cfg(target_feature = "fma")]),
        }
    }
}

/// `(s0 - s1) + (s2 - s3)`: the sum of the chains, odd ones holding negated sums.
fn signed_sum(accs: &[Ident]) -> TokenStream {
    let pairs: Vec<TokenStream> = accs
        .chunks(2)
        .map(|pair| match pair {
            [a, b] => quote!((#a - #b)),
            [a] => quote!(#a),
            _ => unreachable!(),
        })
        .collect();
    pairs
        .into_iter()
        .reduce(|a, b| quote!((#a + #b)))
        .unwrap_or_else(|| quote!(0.0f32))
}

/// `Some(())` when `name` is a plain Rust identifier (ASCII letters, digits, `_`; not a digit
/// first; not a keyword we would trip over).
fn syn_like_ident(name: &str) -> Option<()> {
    let mut chars = name.chars();
    let first = chars.next()?;
    if !(first.is_ascii_alphabetic() || first == '_')
        || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return None;
    }
    const KEYWORDS: [&str; 8] = ["fn", "mod", "pub", "self", "super", "crate", "_", "Self"];
    (!KEYWORDS.contains(&name)).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel<'a>(
        p: &'a Pattern,
        batch: Option<usize>,
        values: Option<&'a [f32]>,
    ) -> RustKernel<'a> {
        RustKernel {
            name: "k",
            pattern: p,
            bias: true,
            relu: true,
            batch,
            values,
            fma: false,
        }
    }

    #[test]
    fn code_size_is_about_one_statement_per_nonzero() {
        let p = Pattern::random(200, 400, 0.05, 3).unwrap();
        let nnz = p.nnz();
        let any = emit_spmm(&kernel(&p, None, None)).unwrap().to_string();
        // one `sJ += v [K] * x [C] ;` (~25 bytes) plus a COL_IDX entry per nonzero
        assert!(
            any.len() < 60 * nnz,
            "{} bytes for {nnz} nonzeros",
            any.len()
        );
        assert_eq!(any.matches("* x [").count(), nnz, "one product per nonzero");
        // a fixed batch above 1 has no code per nonzero, only the tables
        let b100 = emit_spmm(&kernel(&p, Some(100), None)).unwrap().to_string();
        assert!(b100.len() < 12 * nnz + 8000, "{} bytes", b100.len());
        assert_eq!(b100.matches("* x [").count(), 0);
        // batch 1 only: the unrolled code and no batch loop
        let b1 = emit_spmm(&kernel(&p, Some(1), None)).unwrap().to_string();
        assert!(!b1.contains("fn blocks"));
        assert!(any.contains("fn blocks"));
    }

    #[test]
    fn fma_emits_a_fused_and_a_plain_version_of_the_arithmetic() {
        let p = Pattern::random(20, 40, 0.2, 5).unwrap();
        let plain = emit_spmm(&kernel(&p, None, None)).unwrap().to_string();
        assert!(!plain.contains(". mul_add (") && !plain.contains("cfg (target_feature"));
        assert!(plain.contains("pub const FMA : bool = false"));
        let k = RustKernel {
            fma: true,
            ..kernel(&p, None, None)
        };
        let both = emit_spmm(&k).unwrap().to_string();
        assert!(both.contains("pub const FMA : bool = cfg ! (target_feature = \"fma\")"));
        // each batch-1 function and the block function twice, under complementary cfgs
        let functions = p.chunks(NNZ_PER_FUNCTION).len() + 1;
        assert_eq!(
            both.matches("# [cfg (target_feature = \"fma\")]").count(),
            functions
        );
        assert_eq!(
            both.matches("# [cfg (not (target_feature = \"fma\"))]")
                .count(),
            functions
        );
        // the plain version has one product per nonzero, as without `fma`; the fused one
        // multiplies only the first nonzero of each of a row's three chains and fuses the rest
        let fused_chains = CodeShape::default().fused_accumulators;
        let starts: usize = p.row_counts().map(|n| n.min(fused_chains)).sum();
        assert_eq!(both.matches("* x [").count(), p.nnz() + starts);
        assert_eq!(both.matches(". mul_add (x [").count(), p.nnz() - starts);
        assert_eq!(both.matches("v . mul_add (xs [i]").count(), 1);
    }

    #[test]
    fn wide_layers_fall_back_to_the_batch_loop_at_batch_one() {
        let p = Pattern::random(2, GATHER_MAX + 1, 0.01, 4).unwrap();
        let b1 = emit_spmm(&kernel(&p, Some(1), None)).unwrap().to_string();
        assert!(b1.contains("fn blocks"), "ld > 1 needs the batch loop");
        assert!(!b1.contains("xl"), "no stack copy of a wide input");
    }

    #[test]
    fn non_finite_values_are_emitted_as_bits() {
        let p = Pattern::from_dense_mask(1, 3, &[1u8, 1, 1]).unwrap();
        let vals = [f32::NAN, f32::INFINITY, 0.5];
        let code = emit_spmm(&kernel(&p, None, Some(&vals)))
            .unwrap()
            .to_string();
        assert!(code.contains(&format!("f32 :: from_bits ({}u32)", f32::NAN.to_bits())));
        assert!(code.contains(&format!(
            "f32 :: from_bits ({}u32)",
            f32::INFINITY.to_bits()
        )));
        assert!(code.contains("0.5f32"));
    }

    #[test]
    fn bad_requests_are_errors() {
        let p = Pattern::from_dense_mask(1, 2, &[1u8, 0]).unwrap();
        assert_eq!(
            emit_spmm(&kernel(&p, Some(0), None)).unwrap_err(),
            EmitError::ZeroBatch
        );
        assert_eq!(
            emit_spmm(&kernel(&p, None, Some(&[1.0, 2.0]))).unwrap_err(),
            EmitError::ValueCount { nnz: 1, got: 2 }
        );
        let mut k = kernel(&p, None, None);
        k.name = "fn";
        assert_eq!(emit_spmm(&k).unwrap_err(), EmitError::BadName("fn".into()));
        for shape in [
            CodeShape {
                block: 0,
                ..CodeShape::default()
            },
            CodeShape {
                accumulators: 9,
                ..CodeShape::default()
            },
            CodeShape {
                fused_accumulators: 0,
                ..CodeShape::default()
            },
            CodeShape {
                nnz_per_function: 0,
                ..CodeShape::default()
            },
            CodeShape {
                interleave: 0,
                ..CodeShape::default()
            },
        ] {
            assert!(matches!(
                emit_spmm_with(&kernel(&p, None, None), &shape),
                Err(EmitError::BadShape(_))
            ));
        }
        let big = Pattern::dense(300, 300).unwrap();
        assert_eq!(
            emit_spmm(&kernel(&big, None, None)).unwrap_err(),
            EmitError::TooLarge {
                nnz: 90_000,
                max: MAX_UNROLLED_NNZ
            }
        );
    }
}
