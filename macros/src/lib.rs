//! `sparse_kernel!`: a sparse kernel specialised by rustc to a mask known at compile time.
//!
//! ```text
//! macros::sparse_kernel! {
//!     name = fc2,                       // the generated module
//!     op = spmm(bias, relu),            // spmm, spmm(bias), spmm(relu), spmm(bias, relu)
//!     batch = 1,                        // a constant, or `any`
//!     mask_file = "masks/fc2.npy",      // relative to CARGO_MANIFEST_DIR; or
//!     // mask_file = "model.safetensors", tensor = "fc2.mask",
//!     // mask = [[0, 1, 0], [1, 0, 1]],
//!     values_file = "model.safetensors", values_tensor = "fc2.weight",   // optional
//!     fma = true,                       // optional, needs `std`: see below
//! }
//! ```
//!
//! expands to the module described in `sparse_ir::rust_emit` (`ROWS`, `COLS`, `NNZ`,
//! `ROW_PTR`, `COL_IDX`, `FMA`, `run`, and with values `VALUES` and `infer`). The expansion
//! needs only `core`, and includes the files it read with `include_bytes!` so that the crate is
//! rebuilt when they change. Values (`values_file`) are a dense `f32` `[out, in]` tensor;
//! the entries under the mask become `VALUES` in CSR order.
//!
//! `fma = true` adds a version of the arithmetic that fuses each multiply and add
//! (`f32::mul_add`), compiled instead of the plain one where the using crate is built with the
//! `fma` target feature (`-C target-feature=+fma`, or a `target-cpu` that has it; this
//! workspace's `.cargo/config.toml` sets it). Rust has no fused multiply-add in `core` and
//! never contracts `a * b + c` itself, so this version needs `std`; without the feature the
//! plain, `core`-only code is compiled. The generated `FMA` constant says which one is in
//! the binary.
//!
//! Every problem is a compile error pointing at the offending token: a ragged or non-0/1
//! inline mask, a missing or malformed file, an unknown tensor name, a shape mismatch between
//! mask and values, or a mask with more than `sparse_ir::rust_emit::MAX_UNROLLED_NNZ`
//! (65,536) nonzeros.

use std::path::{Path, PathBuf};

use proc_macro2::{Span, TokenStream};
use quote::quote;
use sparse_ir::rust_emit::{emit_spmm, RustKernel};
use sparse_ir::Pattern;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, ExprArray, Ident, Lit, LitInt, LitStr, Token};

/// Generates a module with a sparse kernel specialised to a static mask (see the crate doc).
#[proc_macro]
pub fn sparse_kernel(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    let args = syn::parse_macro_input!(input as KernelArgs);
    match expand(args) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

/// The `op = …` argument.
struct OpArg {
    bias: bool,
    relu: bool,
}

enum MaskSource {
    Inline(ExprArray),
    File(LitStr),
}

struct KernelArgs {
    name: Ident,
    op: OpArg,
    batch: Option<usize>,
    mask: MaskSource,
    mask_span: Span,
    tensor: Option<LitStr>,
    values_file: Option<LitStr>,
    values_tensor: Option<LitStr>,
    fma: bool,
}

impl Parse for OpArg {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let op: Ident = input.parse()?;
        if op != "spmm" {
            return Err(syn::Error::new(
                op.span(),
                format!("unsupported op `{op}`: sparse_kernel! generates `spmm`, optionally `spmm(bias)`, `spmm(relu)` or `spmm(bias, relu)`"),
            ));
        }
        let (mut bias, mut relu) = (false, false);
        if input.peek(syn::token::Paren) {
            let content;
            syn::parenthesized!(content in input);
            let parts = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
            for part in parts {
                match part.to_string().as_str() {
                    "bias" if !bias => bias = true,
                    "relu" if !relu => relu = true,
                    _ => {
                        return Err(syn::Error::new(
                            part.span(),
                            format!(
                            "unknown or repeated epilogue `{part}`: expected `bias` and/or `relu`"
                        ),
                        ))
                    }
                }
            }
        }
        Ok(OpArg { bias, relu })
    }
}

impl Parse for KernelArgs {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut name = None;
        let mut op = None;
        let mut batch = None;
        let mut mask = None;
        let mut tensor = None;
        let mut values_file = None;
        let mut values_tensor = None;
        let mut fma = None;
        while !input.is_empty() {
            let key: Ident = input.parse()?;
            input.parse::<Token![=]>()?;
            let dup = |present: bool| -> syn::Result<()> {
                if present {
                    Err(syn::Error::new(
                        key.span(),
                        format!("`{key}` is given twice"),
                    ))
                } else {
                    Ok(())
                }
            };
            match key.to_string().as_str() {
                "name" => {
                    dup(name.is_some())?;
                    name = Some(input.parse::<Ident>()?);
                }
                "op" => {
                    dup(op.is_some())?;
                    op = Some(input.parse::<OpArg>()?);
                }
                "batch" => {
                    dup(batch.is_some())?;
                    if input.peek(Ident) {
                        let any: Ident = input.parse()?;
                        if any != "any" {
                            return Err(syn::Error::new(any.span(), "batch must be a whole number or `any`"));
                        }
                        batch = Some(None);
                    } else {
                        let lit: LitInt = input.parse()?;
                        let value: usize = lit.base10_parse()?;
                        if value == 0 {
                            return Err(syn::Error::new(lit.span(), "batch must be at least 1"));
                        }
                        batch = Some(Some(value));
                    }
                }
                "mask" => {
                    dup(mask.is_some())?;
                    let array: ExprArray = input.parse()?;
                    mask = Some((MaskSource::Inline(array), key.span()));
                }
                "mask_file" => {
                    dup(mask.is_some())?;
                    let file: LitStr = input.parse()?;
                    mask = Some((MaskSource::File(file), key.span()));
                }
                "tensor" => {
                    dup(tensor.is_some())?;
                    tensor = Some(input.parse::<LitStr>()?);
                }
                "values_file" => {
                    dup(values_file.is_some())?;
                    values_file = Some(input.parse::<LitStr>()?);
                }
                "values_tensor" => {
                    dup(values_tensor.is_some())?;
                    values_tensor = Some(input.parse::<LitStr>()?);
                }
                "fma" => {
                    dup(fma.is_some())?;
                    let lit: syn::LitBool = input.parse().map_err(|e| {
                        syn::Error::new(e.span(), "fma must be `true` or `false`")
                    })?;
                    fma = Some(lit.value);
                }
                other => {
                    return Err(syn::Error::new(
                        key.span(),
                        format!("unknown argument `{other}`: expected name, op, batch, mask, mask_file, tensor, values_file, values_tensor, fma"),
                    ))
                }
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        let missing = |what: &str| {
            syn::Error::new(
                Span::call_site(),
                format!("sparse_kernel! needs `{what} = …`"),
            )
        };
        let (mask, mask_span) = mask.ok_or_else(|| missing("mask` or `mask_file"))?;
        if let (MaskSource::Inline(_), Some(t)) = (&mask, &tensor) {
            return Err(syn::Error::new(
                t.span(),
                "`tensor` selects a tensor of a `mask_file`; an inline `mask` has none",
            ));
        }
        if let (None, Some(t)) = (&values_file, &values_tensor) {
            return Err(syn::Error::new(
                t.span(),
                "`values_tensor` needs a `values_file`",
            ));
        }
        Ok(KernelArgs {
            name: name.ok_or_else(|| missing("name"))?,
            op: op.ok_or_else(|| missing("op"))?,
            batch: batch.ok_or_else(|| missing("batch"))?,
            mask,
            mask_span,
            tensor,
            values_file,
            values_tensor,
            fma: fma.unwrap_or(false),
        })
    }
}

fn inline_mask(array: &ExprArray) -> syn::Result<Pattern> {
    let mut rows: Vec<Vec<u8>> = Vec::new();
    for row in &array.elems {
        let Expr::Array(row_array) = row else {
            return Err(syn::Error::new_spanned(
                row,
                "each row of `mask` must be an array like `[0, 1, 0]`",
            ));
        };
        let mut values = Vec::new();
        for elem in &row_array.elems {
            let bit = match elem {
                Expr::Lit(syn::ExprLit {
                    lit: Lit::Int(i), ..
                }) => match i.base10_parse::<u64>() {
                    Ok(0) => 0,
                    Ok(1) => 1,
                    _ => {
                        return Err(syn::Error::new_spanned(
                            elem,
                            format!("mask values must be 0 or 1, found `{}`", i),
                        ))
                    }
                },
                Expr::Lit(syn::ExprLit {
                    lit: Lit::Bool(b), ..
                }) => b.value as u8,
                _ => {
                    return Err(syn::Error::new_spanned(
                        elem,
                        "mask values must be the literals 0 or 1",
                    ))
                }
            };
            values.push(bit);
        }
        if let Some(first) = rows.first() {
            if first.len() != values.len() {
                return Err(syn::Error::new_spanned(
                    row,
                    format!(
                        "ragged mask: this row has {} entries, the first row has {}",
                        values.len(),
                        first.len()
                    ),
                ));
            }
        }
        rows.push(values);
    }
    let cols = rows.first().map_or(0, Vec::len);
    let flat: Vec<u8> = rows.concat();
    Pattern::from_dense_mask(rows.len(), cols, &flat)
        .map_err(|e| syn::Error::new_spanned(array, e.to_string()))
}

/// Points an error at the tensor name when the tensor is what is missing, else at the file.
fn error_span(
    error: &sparse_ir::mask_io::MaskIoError,
    file: &LitStr,
    tensor: Option<&LitStr>,
) -> Span {
    use sparse_ir::mask_io::{FormatError, MaskIoError};
    match (error, tensor) {
        (
            MaskIoError::Format {
                problem: FormatError::TensorNotFound { .. },
                ..
            },
            Some(tensor),
        ) => tensor.span(),
        _ => file.span(),
    }
}

/// The reader's message with the file named as written in the macro (relative to
/// `CARGO_MANIFEST_DIR`) rather than by its absolute path, so that the message does not depend
/// on where the crate is built.
fn file_error(error: &sparse_ir::mask_io::MaskIoError, path: &Path, file: &LitStr) -> String {
    use sparse_ir::mask_io::MaskIoError;
    let message = error.to_string();
    let absolute = path.display().to_string();
    let Some(rest) = message.strip_prefix(&absolute) else {
        return message;
    };
    let hint = if matches!(error, MaskIoError::NotFound { .. }) {
        " (the path is relative to the crate's CARGO_MANIFEST_DIR)"
    } else {
        ""
    };
    format!("{}{rest}{hint}", file.value())
}

fn manifest_path(file: &LitStr) -> syn::Result<PathBuf> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| {
        syn::Error::new(
            file.span(),
            "CARGO_MANIFEST_DIR is not set; is this built by cargo?",
        )
    })?;
    Ok(PathBuf::from(dir).join(file.value()))
}

fn expand(args: KernelArgs) -> syn::Result<TokenStream> {
    let mut tracked = Vec::new();
    let (pattern, shape_desc) = match &args.mask {
        MaskSource::Inline(array) => (inline_mask(array)?, None),
        MaskSource::File(file) => {
            let path = manifest_path(file)?;
            let tensor = args.tensor.as_ref().map(LitStr::value);
            let loaded = sparse_ir::mask_io::read_mask(&path, tensor.as_deref()).map_err(|e| {
                syn::Error::new(
                    error_span(&e, file, args.tensor.as_ref()),
                    file_error(&e, &path, file),
                )
            })?;
            tracked.push(path);
            (loaded.pattern, Some(loaded.shape))
        }
    };
    let values = match &args.values_file {
        None => None,
        Some(file) => {
            let path = manifest_path(file)?;
            let tensor = args.values_tensor.as_ref().map(LitStr::value);
            let dense =
                sparse_ir::mask_io::read_f32_tensor(&path, tensor.as_deref()).map_err(|e| {
                    syn::Error::new(
                        error_span(&e, file, args.values_tensor.as_ref()),
                        file_error(&e, &path, file),
                    )
                })?;
            let numel: usize = dense.shape.iter().product();
            let (rows, cols) = (pattern.rows(), pattern.cols());
            if numel != rows * cols || dense.shape.first() != Some(&rows) {
                return Err(syn::Error::new(
                    file.span(),
                    format!(
                        "values have shape {:?}, the mask{} is {rows}x{cols}",
                        dense.shape,
                        shape_desc
                            .map(|s| format!(" (shape {s:?})"))
                            .unwrap_or_default()
                    ),
                ));
            }
            tracked.push(path);
            let mut vals = Vec::with_capacity(pattern.nnz());
            for r in 0..rows {
                for &c in pattern.row(r) {
                    vals.push(dense.data[r * cols + c as usize]);
                }
            }
            Some(vals)
        }
    };
    let name = args.name.to_string();
    let kernel = RustKernel {
        name: &name,
        pattern: &pattern,
        bias: args.op.bias,
        relu: args.op.relu,
        batch: args.batch,
        values: values.as_deref(),
        fma: args.fma,
    };
    let module = emit_spmm(&kernel).map_err(|e| syn::Error::new(args.mask_span, e.to_string()))?;
    let includes = tracked.iter().map(|p| {
        let p = p.to_string_lossy().into_owned();
        quote!(
            const _: &[u8] = include_bytes!(#p);
        )
    });
    Ok(quote! {
        #module
        #(#includes)*
    })
}
