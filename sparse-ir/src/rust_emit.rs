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
//! first and then runs straight-line code: every nonzero is a statement with its column offset
//! and value index as constants. Rows are grouped into functions of about
//! [`NNZ_PER_FUNCTION`] nonzeros; the batch is processed in blocks of [`BATCH_BLOCK`] columns
//! held in a local array, which rustc vectorises, with a scalar tail. Batch 1 gets its own
//! shape (one scalar accumulator per row, and constant indices into `x` when `ld == 1`).

use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::quote;

use crate::pattern::Pattern;

/// The largest pattern [`emit_spmm`] unrolls; larger ones are rejected.
pub const MAX_UNROLLED_NNZ: usize = 65_536;

/// Nonzeros per generated function (rows are never split).
pub const NNZ_PER_FUNCTION: usize = 512;

/// Batch columns per register block in the generated code.
pub const BATCH_BLOCK: usize = 8;

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
}

fn usize_lit(v: usize) -> Literal {
    Literal::usize_unsuffixed(v)
}

/// Generates the module described in the module doc.
pub fn emit_spmm(kernel: &RustKernel<'_>) -> Result<TokenStream, EmitError> {
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
    let name = Ident::new(kernel.name, Span::call_site());
    let (rows, cols, nnz) = (usize_lit(p.rows()), usize_lit(p.cols()), usize_lit(p.nnz()));
    let row_ptr = p.row_ptr().iter().map(|&v| Literal::u32_unsuffixed(v));
    let col_idx = p.col_idx().iter().map(|&v| Literal::u32_unsuffixed(v));
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

    // One function per group of rows.
    let groups = p.chunks(NNZ_PER_FUNCTION);
    let mut fns = Vec::new();
    let mut calls_general = Vec::new();
    let mut calls_one = Vec::new();
    let mut calls_one_contig = Vec::new();
    for (g, chunk) in groups.iter().enumerate() {
        let general = Ident::new(&format!("rows_{g}"), Span::call_site());
        let one = Ident::new(&format!("rows_{g}_b1"), Span::call_site());
        let one_contig = Ident::new(&format!("rows_{g}_b1_contig"), Span::call_site());
        let mut block_rows = Vec::new();
        let mut one_rows = Vec::new();
        let mut contig_rows = Vec::new();
        for r in chunk.rows.clone() {
            let rl = usize_lit(r);
            let init_block = if kernel.bias {
                quote!([bias[#rl]; BLOCK])
            } else {
                quote!([0.0f32; BLOCK])
            };
            let init_scalar = if kernel.bias {
                quote!(bias[#rl])
            } else {
                quote!(0.0f32)
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
            let relu_scalar = if kernel.relu {
                quote!(if acc < 0.0 {
                    acc = 0.0;
                })
            } else {
                quote!()
            };
            let mut block_terms = Vec::new();
            let mut scalar_terms = Vec::new();
            let mut contig_terms = Vec::new();
            for k in p.row_range(r) {
                let c = usize_lit(p.col_idx()[k] as usize);
                let kl = usize_lit(k);
                block_terms.push(quote! {
                    let xs: &[f32; BLOCK] = match x[#c * ld + b0..#c * ld + b0 + BLOCK].try_into() { Ok(s) => s, Err(_) => unreachable!() };
                    for i in 0..BLOCK { acc[i] += values[#kl] * xs[i]; }
                });
                scalar_terms.push(quote!(acc += values[#kl] * x[#c * ld + b];));
                contig_terms.push(quote!(acc += values[#kl] * x[#c];));
            }
            block_rows.push(quote! {
                let mut b0 = 0;
                while b0 + BLOCK <= batch {
                    let mut acc = #init_block;
                    #(#block_terms)*
                    #relu_block
                    y[#rl * ld + b0..#rl * ld + b0 + BLOCK].copy_from_slice(&acc);
                    b0 += BLOCK;
                }
                for b in b0..batch {
                    let mut acc = #init_scalar;
                    #(#scalar_terms)*
                    #relu_scalar
                    y[#rl * ld + b] = acc;
                }
            });
            one_rows.push(quote! {
                {
                    let b = 0;
                    let mut acc = #init_scalar;
                    #(#scalar_terms)*
                    #relu_scalar
                    y[#rl * ld] = acc;
                }
            });
            contig_rows.push(quote! {
                {
                    let mut acc = #init_scalar;
                    #(#contig_terms)*
                    #relu_scalar
                    y[#rl] = acc;
                }
            });
        }
        fns.push(quote! {
            #[inline(never)]
            fn #general(values: &[f32; NNZ], x: &[f32], #bias_fn_param y: &mut [f32], batch: usize, ld: usize) {
                #(#block_rows)*
            }
            #[inline(never)]
            fn #one(values: &[f32; NNZ], x: &[f32], #bias_fn_param y: &mut [f32], ld: usize) {
                #(#one_rows)*
            }
            #[inline(never)]
            fn #one_contig(values: &[f32; NNZ], x: &[f32; COLS], #bias_fn_param y: &mut [f32; ROWS]) {
                #(#contig_rows)*
            }
        });
        calls_general.push(quote!(#general(values, x, #bias_arg y, batch, ld);));
        calls_one.push(quote!(#one(values, x, #bias_arg y, ld);));
        calls_one_contig.push(quote!(#one_contig(values, x, #bias_arg y);));
    }

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
    let one_path = if matches!(kernel.batch, Some(1) | None) {
        quote! {
            if batch == 1 {
                if ld == 1 {
                    let x: &[f32; COLS] = match x[..COLS].try_into() { Ok(s) => s, Err(_) => unreachable!() };
                    let y: &mut [f32; ROWS] = match (&mut y[..ROWS]).try_into() { Ok(s) => s, Err(_) => unreachable!() };
                    #(#calls_one_contig)*
                } else {
                    #(#calls_one)*
                }
                return Ok(());
            }
        }
    } else {
        quote!()
    };
    let general_path = if kernel.batch == Some(1) {
        quote!()
    } else {
        quote!(#(#calls_general)*)
    };

    let values_items = match kernel.values {
        Some(values) => {
            let vals = values.iter().map(|&v| Literal::f32_suffixed(v));
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
    let doc = format!(
        " Sparse kernel generated by sparsejit for a {}x{} mask with {} nonzeros (pattern hash {:016x}).",
        p.rows(),
        p.cols(),
        p.nnz(),
        p.hash()
    );

    Ok(quote! {
        #[doc = #doc]
        #[allow(clippy::all, clippy::pedantic, unused_variables, unused_mut, unused_assignments, non_upper_case_globals, unreachable_code)]
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
            const BLOCK: usize = 8;

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
                if x.len() < COLS * ld {
                    return Err(KernelError::Length { operand: "x", expected: COLS * ld, got: x.len() });
                }
                if y.len() < ROWS * ld {
                    return Err(KernelError::Length { operand: "y", expected: ROWS * ld, got: y.len() });
                }
                #bias_check
                #one_path
                #general_path
                Ok(())
            }

            #values_items

            #(#fns)*
        }
    })
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
