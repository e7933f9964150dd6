//! [`KernelSpec`]: one kernel a layer needs.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::pattern::Pattern;
use crate::verify::{verify_layer_name, VerifyError};

/// A kernel operation. The interpreter ([`crate::interp`]) defines each one exactly.
///
/// With `W` the `rows × cols` sparse weight matrix of the pattern and feature-major
/// activations (`[features × batch]`, row stride `ld`):
///
/// - `Spmm`: `Y = W·X (+ bias) (ReLU)`, `X` is `cols × batch`, `Y` is `rows × batch`;
/// - `SpmmT`: `dX = Wᵀ·dY`, `dY` is `rows × batch`, `dX` is `cols × batch`;
/// - `Sddmm`: `dW[k] = Σ_b dY[r_k, b]·X[c_k, b]` for each nonzero `k = (r_k, c_k)`;
/// - `DenseGrad`: `G[r, c] = Σ_b dY[r, b]·X[c, b]` for every `(r, c)`, row-major `rows × cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Forward sparse × dense product, with an optional epilogue.
    Spmm {
        /// Add `bias[r]` to every element of output row `r`.
        bias: bool,
        /// Apply `max(0, ·)` after the bias.
        relu: bool,
    },
    /// Backward-data product with the transposed weights.
    SpmmT,
    /// Weight gradient restricted to the pattern (sampled dense-dense product).
    Sddmm,
    /// Dense weight gradient of every entry, masked ones included.
    DenseGrad,
}

impl Op {
    /// `spmm` without epilogue.
    pub const SPMM: Op = Op::Spmm {
        bias: false,
        relu: false,
    };

    /// Every op, each `spmm` epilogue on its own: `spmm`, with bias, with ReLU, with both,
    /// then `spmm_t`, `sddmm` and `dense_grad` (the last).
    pub const ALL: [Op; 7] = [
        Op::SPMM,
        Op::Spmm {
            bias: true,
            relu: false,
        },
        Op::Spmm {
            bias: false,
            relu: true,
        },
        Op::Spmm {
            bias: true,
            relu: true,
        },
        Op::SpmmT,
        Op::Sddmm,
        Op::DenseGrad,
    ];

    /// The IR name: `spmm`, `spmm_t`, `sddmm` or `dense_grad` (epilogue not included).
    pub fn name(self) -> &'static str {
        match self {
            Op::Spmm { .. } => "spmm",
            Op::SpmmT => "spmm_t",
            Op::Sddmm => "sddmm",
            Op::DenseGrad => "dense_grad",
        }
    }

    /// The command-line name: the IR name with hyphens.
    pub fn cli_name(self) -> &'static str {
        match self {
            Op::Spmm { .. } => "spmm",
            Op::SpmmT => "spmm-t",
            Op::Sddmm => "sddmm",
            Op::DenseGrad => "dense-grad",
        }
    }
}

/// Prints the IR form: `spmm`, `spmm(bias)`, `spmm(relu)`, `spmm(bias,relu)`, `spmm_t`,
/// `sddmm`, `dense_grad`.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::Spmm { bias, relu } if bias || relu => {
                let parts: Vec<&str> = [(bias, "bias"), (relu, "relu")]
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| *n)
                    .collect();
                write!(f, "spmm({})", parts.join(","))
            }
            op => f.write_str(op.name()),
        }
    }
}

/// Parses the IR form printed by `Display`, and the hyphenated command-line names.
impl FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spmm" => Ok(Op::SPMM),
            "spmm_t" | "spmm-t" => Ok(Op::SpmmT),
            "sddmm" => Ok(Op::Sddmm),
            "dense_grad" | "dense-grad" => Ok(Op::DenseGrad),
            _ => {
                let inner = s
                    .strip_prefix("spmm(")
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| {
                        format!("unknown op {s:?} (expected spmm, spmm(bias,relu), spmm_t, sddmm or dense_grad)")
                    })?;
                let (mut bias, mut relu) = (false, false);
                for part in inner.split(',') {
                    match part.trim() {
                        "bias" if !bias => bias = true,
                        "relu" if !relu => relu = true,
                        other => return Err(format!("unknown or repeated spmm epilogue {other:?} in {s:?} (expected bias, relu)")),
                    }
                }
                Ok(Op::Spmm { bias, relu })
            }
        }
    }
}

/// A batch size or row stride: fixed when the kernel is compiled, or given at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    /// Baked into the kernel; checked when it runs.
    Fixed(usize),
    /// Taken at run time.
    Any,
}

impl Dim {
    /// Whether a run-time value is allowed by this dimension.
    pub fn admits(self, value: usize) -> bool {
        match self {
            Dim::Fixed(v) => v == value,
            Dim::Any => true,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Any => f.write_str("any"),
        }
    }
}

impl FromStr for Dim {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "any" {
            return Ok(Dim::Any);
        }
        s.parse()
            .map(Dim::Fixed)
            .map_err(|_| format!("expected a whole number or `any`, got {s:?}"))
    }
}

/// One kernel a layer needs: the op, the pattern, the layer name (for messages, emitted
/// comments, dumps and metrics), the batch size and row stride `ld`. Data type: `f32`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSpec {
    layer: String,
    op: Op,
    pattern: Arc<Pattern>,
    batch: Dim,
    ld: Dim,
}

impl KernelSpec {
    /// Builds a spec, checking the kernel-spec invariants of [`crate::verify`].
    pub fn new(
        layer: impl Into<String>,
        op: Op,
        pattern: Arc<Pattern>,
        batch: Dim,
        ld: Dim,
    ) -> Result<Self, VerifyError> {
        let layer = layer.into();
        verify_layer_name(&layer)?;
        if batch == Dim::Fixed(0) {
            return Err(VerifyError::BatchZero { layer });
        }
        match (batch, ld) {
            (Dim::Fixed(batch), Dim::Fixed(ld)) if ld < batch => {
                return Err(VerifyError::LdTooSmall { layer, ld, batch })
            }
            (Dim::Any, Dim::Fixed(0)) => {
                return Err(VerifyError::LdTooSmall {
                    layer,
                    ld: 0,
                    batch: 1,
                })
            }
            _ => {}
        }
        Ok(KernelSpec {
            layer,
            op,
            pattern,
            batch,
            ld,
        })
    }

    /// A spec whose batch and `ld` are both given at run time.
    pub fn any_batch(
        layer: impl Into<String>,
        op: Op,
        pattern: Arc<Pattern>,
    ) -> Result<Self, VerifyError> {
        Self::new(layer, op, pattern, Dim::Any, Dim::Any)
    }

    /// The layer name.
    pub fn layer(&self) -> &str {
        &self.layer
    }

    /// The operation.
    pub fn op(&self) -> Op {
        self.op
    }

    /// The weight pattern.
    pub fn pattern(&self) -> &Arc<Pattern> {
        &self.pattern
    }

    /// The batch size.
    pub fn batch(&self) -> Dim {
        self.batch
    }

    /// The row stride of every activation matrix.
    pub fn ld(&self) -> Dim {
        self.ld
    }
}
