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
///
/// The convolution ops take the same pattern as the `[out × C·k·k]` weight mask of a 2-D
/// convolution (column `c·k² + kh·k + kw`), never unrolled over positions, and a
/// [`ConvGeometry`] that the [`KernelSpec`] carries. Each channel is a plane of `H·W`
/// positions, each position a row of the feature-major matrix (row `c·H·W + h·W + w`):
///
/// - `Conv`: `Y[o, oh, ow, b] = Σ w[o, c, kh, kw]·X[c, oh·s + kh − p, ow·s + kw − p, b]`
///   (taps outside the input read 0), then the optional bias and ReLU as for `Spmm`;
/// - `ConvT`: the transpose of `Conv` without epilogue (backward-data), `dX` from `dY`;
/// - `ConvGrad`: `dW[k] = Σ_{oh, ow, b} dY[o, oh, ow, b]·X[c, oh·s + kh − p, ow·s + kw − p, b]`
///   for each nonzero `k = (o, c·k² + kh·k + kw)`;
/// - `ConvDenseGrad`: the same sum for every `(o, c, kh, kw)`, row-major `out × C·k·k`.
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
    /// Forward 2-D convolution, with an optional epilogue.
    Conv {
        /// Add `bias[o]` to every element of output channel `o`.
        bias: bool,
        /// Apply `max(0, ·)` after the bias.
        relu: bool,
    },
    /// Backward-data convolution (the transpose of `Conv`).
    ConvT,
    /// Convolution weight gradient restricted to the pattern.
    ConvGrad,
    /// Dense convolution weight gradient of every entry, masked ones included.
    ConvDenseGrad,
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

    /// `conv` without epilogue.
    pub const CONV: Op = Op::Conv {
        bias: false,
        relu: false,
    };

    /// Every convolution op, in the order of [`Op::ALL`]: `conv` and its epilogues, then
    /// `conv_t`, `conv_grad` and `conv_dense_grad`.
    pub const CONV_ALL: [Op; 7] = [
        Op::CONV,
        Op::Conv {
            bias: true,
            relu: false,
        },
        Op::Conv {
            bias: false,
            relu: true,
        },
        Op::Conv {
            bias: true,
            relu: true,
        },
        Op::ConvT,
        Op::ConvGrad,
        Op::ConvDenseGrad,
    ];

    /// The IR name: `spmm`, `spmm_t`, `sddmm`, `dense_grad`, `conv`, `conv_t`, `conv_grad` or
    /// `conv_dense_grad` (epilogue not included).
    pub fn name(self) -> &'static str {
        match self {
            Op::Spmm { .. } => "spmm",
            Op::SpmmT => "spmm_t",
            Op::Sddmm => "sddmm",
            Op::DenseGrad => "dense_grad",
            Op::Conv { .. } => "conv",
            Op::ConvT => "conv_t",
            Op::ConvGrad => "conv_grad",
            Op::ConvDenseGrad => "conv_dense_grad",
        }
    }

    /// The command-line name: the IR name with hyphens.
    pub fn cli_name(self) -> &'static str {
        match self {
            Op::Spmm { .. } => "spmm",
            Op::SpmmT => "spmm-t",
            Op::Sddmm => "sddmm",
            Op::DenseGrad => "dense-grad",
            Op::Conv { .. } => "conv",
            Op::ConvT => "conv-t",
            Op::ConvGrad => "conv-grad",
            Op::ConvDenseGrad => "conv-dense-grad",
        }
    }

    /// Whether this is a convolution op (its spec carries a [`ConvGeometry`]).
    pub fn is_conv(self) -> bool {
        matches!(
            self,
            Op::Conv { .. } | Op::ConvT | Op::ConvGrad | Op::ConvDenseGrad
        )
    }

    /// The role of the op in a layer, shared by the matrix and the convolution op that play
    /// it (and that take the same [`crate::Args`] variant).
    pub fn role(self) -> Role {
        match self {
            Op::Spmm { .. } | Op::Conv { .. } => Role::Forward,
            Op::SpmmT | Op::ConvT => Role::BackwardData,
            Op::Sddmm | Op::ConvGrad => Role::WeightGrad,
            Op::DenseGrad | Op::ConvDenseGrad => Role::DenseGrad,
        }
    }

    /// Whether the op adds a bias (a `spmm` or `conv` bias epilogue).
    pub fn has_bias(self) -> bool {
        matches!(
            self,
            Op::Spmm { bias: true, .. } | Op::Conv { bias: true, .. }
        )
    }

    /// Whether the op applies ReLU (a `spmm` or `conv` ReLU epilogue).
    pub fn has_relu(self) -> bool {
        matches!(
            self,
            Op::Spmm { relu: true, .. } | Op::Conv { relu: true, .. }
        )
    }
}

/// The role of an op in a layer's training step: what it computes from what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The layer's output from its input (`spmm`, `conv`).
    Forward,
    /// The input's gradient from the output's (`spmm_t`, `conv_t`).
    BackwardData,
    /// The gradient of the pattern's weights (`sddmm`, `conv_grad`).
    WeightGrad,
    /// The gradient of every weight, masked ones included (`dense_grad`, `conv_dense_grad`).
    DenseGrad,
}

/// Prints the IR form: `spmm`, `spmm(bias)`, `spmm(relu)`, `spmm(bias,relu)`, `spmm_t`,
/// `sddmm`, `dense_grad`, and the same for `conv`, `conv_t`, `conv_grad`, `conv_dense_grad`.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::Spmm { bias, relu } | Op::Conv { bias, relu } if bias || relu => {
                let parts: Vec<&str> = [(bias, "bias"), (relu, "relu")]
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| *n)
                    .collect();
                write!(f, "{}({})", self.name(), parts.join(","))
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
            "conv" => Ok(Op::CONV),
            "conv_t" | "conv-t" => Ok(Op::ConvT),
            "conv_grad" | "conv-grad" => Ok(Op::ConvGrad),
            "conv_dense_grad" | "conv-dense-grad" => Ok(Op::ConvDenseGrad),
            _ => {
                let (conv, inner) = match (s.strip_prefix("spmm("), s.strip_prefix("conv(")) {
                    (Some(rest), _) => (false, rest.strip_suffix(')')),
                    (None, Some(rest)) => (true, rest.strip_suffix(')')),
                    (None, None) => (false, None),
                };
                let inner = inner.ok_or_else(|| {
                    format!("unknown op {s:?} (expected spmm, spmm(bias,relu), spmm_t, sddmm, dense_grad, conv, conv(bias,relu), conv_t, conv_grad or conv_dense_grad)")
                })?;
                let (mut bias, mut relu) = (false, false);
                for part in inner.split(',') {
                    match part.trim() {
                        "bias" if !bias => bias = true,
                        "relu" if !relu => relu = true,
                        other => {
                            return Err(format!(
                            "unknown or repeated epilogue {other:?} in {s:?} (expected bias, relu)"
                        ))
                        }
                    }
                }
                Ok(if conv {
                    Op::Conv { bias, relu }
                } else {
                    Op::Spmm { bias, relu }
                })
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

/// The geometry of a 2-D convolution: input channels, input height and width, a square
/// `kernel × kernel` window, and the same stride and zero padding in both directions.
///
/// The output is `out_height × out_width` with `out_height = (height + 2·padding − kernel) /
/// stride + 1` (and the same for the width). Its text form, in `.sir` kernel lines and
/// messages, is `input=CxHxW kernel=K stride=S padding=P`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    /// Input channels `C`.
    pub in_channels: usize,
    /// Input height `H`.
    pub height: usize,
    /// Input width `W`.
    pub width: usize,
    /// Window size `k` (the window is `k × k`).
    pub kernel: usize,
    /// Stride `s`, the same in both directions.
    pub stride: usize,
    /// Zero padding `p` on every side.
    pub padding: usize,
}

/// The largest value of any one [`ConvGeometry`] field (so that no index computed from them
/// overflows before the size checks).
pub const CONV_DIM_MAX: usize = 1 << 16;

impl ConvGeometry {
    /// Output height: `(H + 2p − k) / s + 1`.
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Output width: `(W + 2p − k) / s + 1`.
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Positions of one input plane, `H·W`.
    pub fn in_positions(&self) -> usize {
        self.height * self.width
    }

    /// Positions of one output plane, `OH·OW`.
    pub fn out_positions(&self) -> usize {
        self.out_height() * self.out_width()
    }

    /// Taps of the window, `k²`.
    pub fn taps(&self) -> usize {
        self.kernel * self.kernel
    }

    /// Columns of the weight pattern, `C·k²`.
    pub fn pattern_cols(&self) -> usize {
        self.in_channels * self.taps()
    }

    /// Checks the `conv_geometry` invariant against a pattern of `out_channels × cols`:
    /// every field at least 1 (padding at least 0) and at most [`CONV_DIM_MAX`], the window
    /// fits the padded input, `cols = C·k²`, and the input and output feature counts
    /// (`C·H·W`, `out·OH·OW`) fit in a `u32`. Returns the problem in words.
    pub fn check(&self, out_channels: usize, cols: usize) -> Result<(), String> {
        let g = self;
        for (name, v, min) in [
            ("input channels", g.in_channels, 1),
            ("height", g.height, 1),
            ("width", g.width, 1),
            ("kernel", g.kernel, 1),
            ("stride", g.stride, 1),
            ("padding", g.padding, 0),
        ] {
            if v < min || v > CONV_DIM_MAX {
                return Err(format!("{name} = {v} is outside {min}..={CONV_DIM_MAX}"));
            }
        }
        if g.height + 2 * g.padding < g.kernel || g.width + 2 * g.padding < g.kernel {
            return Err(format!(
                "a {k}x{k} window does not fit the {h}x{w} input with padding {p}",
                k = g.kernel,
                h = g.height,
                w = g.width,
                p = g.padding
            ));
        }
        if cols != g.pattern_cols() {
            return Err(format!(
                "the pattern has {cols} columns, but {c} input channels of a {k}x{k} window need {}",
                g.pattern_cols(),
                c = g.in_channels,
                k = g.kernel
            ));
        }
        let fits = |n: Option<usize>| n.is_some_and(|n| u32::try_from(n).is_ok());
        if !fits(g.in_channels.checked_mul(g.in_positions())) {
            return Err("the input has more than 2^32 features".into());
        }
        if !fits(out_channels.checked_mul(g.out_positions())) {
            return Err("the output has more than 2^32 features".into());
        }
        Ok(())
    }
}

impl fmt::Display for ConvGeometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "input={}x{}x{} kernel={} stride={} padding={}",
            self.in_channels, self.height, self.width, self.kernel, self.stride, self.padding
        )
    }
}

/// One kernel a layer needs: the op, the pattern, the layer name (for messages, emitted
/// comments, dumps and metrics), the batch size and row stride `ld`, and for a convolution op
/// its [`ConvGeometry`]. Data type: `f32`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSpec {
    layer: String,
    op: Op,
    pattern: Arc<Pattern>,
    batch: Dim,
    ld: Dim,
    conv: Option<ConvGeometry>,
}

impl KernelSpec {
    /// Builds a spec of a matrix op (`spmm`, `spmm_t`, `sddmm`, `dense_grad`), checking the
    /// kernel-spec invariants of [`crate::verify`]. A convolution op needs
    /// [`KernelSpec::conv`].
    pub fn new(
        layer: impl Into<String>,
        op: Op,
        pattern: Arc<Pattern>,
        batch: Dim,
        ld: Dim,
    ) -> Result<Self, VerifyError> {
        Self::build(layer.into(), op, pattern, None, batch, ld)
    }

    /// Builds a spec of a convolution op (`conv`, `conv_t`, `conv_grad`, `conv_dense_grad`)
    /// with its geometry, checking the kernel-spec invariants of [`crate::verify`]
    /// (`conv_geometry` included).
    pub fn conv(
        layer: impl Into<String>,
        op: Op,
        pattern: Arc<Pattern>,
        geometry: ConvGeometry,
        batch: Dim,
        ld: Dim,
    ) -> Result<Self, VerifyError> {
        Self::build(layer.into(), op, pattern, Some(geometry), batch, ld)
    }

    /// [`KernelSpec::new`] or [`KernelSpec::conv`], by whether `geometry` is given.
    pub fn with_geometry(
        layer: impl Into<String>,
        op: Op,
        pattern: Arc<Pattern>,
        geometry: Option<ConvGeometry>,
        batch: Dim,
        ld: Dim,
    ) -> Result<Self, VerifyError> {
        Self::build(layer.into(), op, pattern, geometry, batch, ld)
    }

    fn build(
        layer: String,
        op: Op,
        pattern: Arc<Pattern>,
        conv: Option<ConvGeometry>,
        batch: Dim,
        ld: Dim,
    ) -> Result<Self, VerifyError> {
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
        match (op.is_conv(), conv) {
            (true, None) | (false, Some(_)) => {
                return Err(VerifyError::ConvOpGeometry {
                    layer,
                    op: op.name(),
                    has_geometry: conv.is_some(),
                })
            }
            (true, Some(g)) => {
                if let Err(problem) = g.check(pattern.rows(), pattern.cols()) {
                    return Err(VerifyError::ConvGeometry { layer, problem });
                }
            }
            (false, None) => {}
        }
        Ok(KernelSpec {
            layer,
            op,
            pattern,
            batch,
            ld,
            conv,
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

    /// The convolution geometry, for a convolution op.
    pub fn geometry(&self) -> Option<&ConvGeometry> {
        self.conv.as_ref()
    }

    /// Feature rows of the layer's input `X` (and of `dX`): the pattern's columns, or `C·H·W`
    /// for a convolution.
    pub fn in_features(&self) -> usize {
        match &self.conv {
            Some(g) => g.in_channels * g.in_positions(),
            None => self.pattern.cols(),
        }
    }

    /// Feature rows of the layer's output `Y` (and of `dY`): the pattern's rows, or
    /// `out·OH·OW` for a convolution.
    pub fn out_features(&self) -> usize {
        match &self.conv {
            Some(g) => self.pattern.rows() * g.out_positions(),
            None => self.pattern.rows(),
        }
    }

    /// Multiply-adds of one launch at `batch` counting only the pattern's nonzeros
    /// (`nnz·batch`, times `OH·OW` for a convolution): the useful work.
    pub fn useful_fmas(&self, batch: usize) -> usize {
        let per_position = self.pattern.nnz().saturating_mul(batch);
        match &self.conv {
            Some(g) => per_position.saturating_mul(g.out_positions()),
            None => per_position,
        }
    }
}
