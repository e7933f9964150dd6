//! Benchmark support for sparsejit: the cases of the `kernel-bench` suites, their operands,
//! and the JSON result format of CONTRACTS.md. Kernels are timed with `kernel_timing`, the
//! one timing loop of the project (interleaved rounds, warm samples, paired medians).
//! Results are read as ratios between competitors measured in the same process.

use std::borrow::{Borrow, BorrowMut};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::{
    Args, BackendError, ConvGeometry, KernelSpec, Launch, Op, Pattern, Role, Strategy,
};

#[cfg(feature = "opencl")]
pub mod opencl;

/// Measuring time per case of `kernel-bench` (its `--budget-ms` default) and `spmm_bench`,
/// milliseconds.
pub const BUDGET_MS: u64 = 400;

/// The fewest interleaved rounds a case takes, whatever the budget.
pub const MIN_ROUNDS: usize = 7;

/// The timing of one case: `budget_ms` of measuring (see [`BUDGET_MS`]), at least
/// [`MIN_ROUNDS`] rounds.
pub fn case_timing(budget_ms: u64) -> kernel_timing::Config {
    kernel_timing::Config::benchmark(std::time::Duration::from_millis(budget_ms), MIN_ROUNDS)
}

/// One benchmark case: an op on a random pattern of a shape and density, at a batch size;
/// for a convolution op, with its geometry (`rows` output channels, `cols` = `C·k²`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    /// The op.
    pub op: Op,
    /// Rows of the weight matrix (output features, or output channels).
    pub rows: usize,
    /// Columns (input features, or `C·k²`).
    pub cols: usize,
    /// Batch size.
    pub batch: usize,
    /// Fraction of nonzero weights.
    pub density: f64,
    /// The convolution geometry, for a convolution op.
    pub geometry: Option<ConvGeometry>,
}

impl Case {
    /// A case of a matrix op.
    pub fn matrix(op: Op, rows: usize, cols: usize, batch: usize, density: f64) -> Case {
        Case {
            op,
            rows,
            cols,
            batch,
            density,
            geometry: None,
        }
    }

    /// A case of a convolution op: `out` output channels over `geometry`.
    pub fn conv(op: Op, out: usize, geometry: ConvGeometry, batch: usize, density: f64) -> Case {
        Case {
            op,
            rows: out,
            cols: geometry.pattern_cols(),
            batch,
            density,
            geometry: Some(geometry),
        }
    }

    /// Feature rows of the input `X` (`cols`, or `C·H·W`).
    pub fn in_features(&self) -> usize {
        self.geometry
            .map_or(self.cols, |g| g.in_channels * g.in_positions())
    }

    /// Feature rows of the output `Y` (`rows`, or `out·OH·OW`).
    pub fn out_features(&self) -> usize {
        self.rows * self.positions()
    }

    /// Output positions per channel (`OH·OW`; 1 for a matrix op): the useful work is
    /// `nnz·positions·batch` multiply-adds.
    pub fn positions(&self) -> usize {
        self.geometry.map_or(1, |g| g.out_positions())
    }

    /// The row stride the runtime uses (`runtime::padded_ld`): the batch padded to 16
    /// floats, or 1 at batch 1 (a plain vector).
    pub fn ld(&self) -> usize {
        if self.batch <= 1 {
            1
        } else {
            self.batch.div_ceil(16) * 16
        }
    }

    /// The seed of this case's pattern and operands, a function of the case alone: every
    /// tool that measures the case (`kernel-bench`, `spmm_bench`, `planner-fit`, the
    /// criterion benches) runs the same pattern on the same data.
    pub fn seed(&self) -> u64 {
        // FNV-1a over the label.
        self.label().bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// The case's random pattern ([`Pattern::random`] with [`Case::seed`]).
    pub fn pattern(&self) -> Pattern {
        Pattern::random(self.rows, self.cols, self.density, self.seed())
            .expect("a density in [0, 1] gives a valid pattern")
    }

    /// `op rows×cols b=batch d=density`, for tables; a convolution as
    /// `op C→out HxW kK sS pP b=batch d=density`.
    pub fn label(&self) -> String {
        match self.geometry {
            None => format!(
                "{:<6} {}x{} b={} d={}%",
                self.op.name(),
                self.rows,
                self.cols,
                self.batch,
                self.density * 100.0
            ),
            Some(g) => format!(
                "{:<9} {}->{} {}x{} k{} s{} p{} b={} d={}%",
                self.op.name(),
                g.in_channels,
                self.rows,
                g.height,
                g.width,
                g.kernel,
                g.stride,
                g.padding,
                self.batch,
                self.density * 100.0
            ),
        }
    }
}

/// The three LeNet shapes (batch 1, 8, 100) and the two large ones (batch 1, 8, 128).
pub const SHAPES: [(usize, usize); 5] = [
    (300, 784),
    (100, 300),
    (10, 100),
    (1024, 1024),
    (4096, 4096),
];

/// The ops `kernel-bench` measures.
pub const OPS: [Op; 3] = [Op::SPMM, Op::SpmmT, Op::Sddmm];

/// Batches measured for a shape: 1, 8 and 100 for the LeNet shapes, 1, 8 and 128 otherwise.
pub fn batches(rows: usize, cols: usize) -> [usize; 3] {
    if rows * cols <= 300 * 784 {
        [1, 8, 100]
    } else {
        [1, 8, 128]
    }
}

/// The `quick` suite: every op on the three LeNet shapes at batch 1, 8, 100 and density 5 %
/// and 20 %, plus `spmm` on 1024×1024, batch 128, 5 %.
pub fn quick_suite() -> Vec<Case> {
    let mut cases = Vec::new();
    for &(rows, cols) in &SHAPES[..3] {
        for batch in batches(rows, cols) {
            for density in [0.05, 0.2] {
                for op in OPS {
                    cases.push(Case::matrix(op, rows, cols, batch, density));
                }
            }
        }
    }
    cases.push(Case::matrix(Op::SPMM, 1024, 1024, 128, 0.05));
    cases
}

/// The `full` suite: every shape, batch, density (1, 2, 5, 10, 20, 50 %) and op.
pub fn full_suite() -> Vec<Case> {
    let mut cases = Vec::new();
    for &(rows, cols) in &SHAPES {
        for batch in batches(rows, cols) {
            for density in [0.01, 0.02, 0.05, 0.1, 0.2, 0.5] {
                for op in OPS {
                    cases.push(Case::matrix(op, rows, cols, batch, density));
                }
            }
        }
    }
    cases
}

/// The `gpu` suite (the GPU acceptance table of the OpenCL backend): `spmm` on 1024×1024
/// and 4096×4096 at 90 % and 95 % sparsity, batch 128.
pub fn gpu_suite() -> Vec<Case> {
    let mut cases = Vec::new();
    for n in [1024, 4096] {
        for density in [0.1, 0.05] {
            cases.push(Case::matrix(Op::SPMM, n, n, 128, density));
        }
    }
    cases
}

/// A convolution layer of the `conv` suite: name, output channels and geometry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvLayer {
    /// Network and layer, e.g. `wrn-16-8 128->128`.
    pub name: &'static str,
    /// Output channels.
    pub out: usize,
    /// Geometry.
    pub geometry: ConvGeometry,
    /// Batch (128; LeNet-5's 100).
    pub batch: usize,
}

const fn geometry(c: usize, hw: usize, k: usize, s: usize, p: usize) -> ConvGeometry {
    ConvGeometry {
        in_channels: c,
        height: hw,
        width: hw,
        kernel: k,
        stride: s,
        padding: p,
    }
}

/// The convolution layers of the `conv` suite: WRN-16-8's 3×3 layers, two of VGG16-D's and
/// the two of `sparse-train`'s LeNet-5 (Caffe's: 1→20 and 20→50, 5×5).
pub const CONV_LAYERS: [ConvLayer; 9] = [
    ConvLayer {
        name: "wrn-16-8 16->128",
        out: 128,
        geometry: geometry(16, 32, 3, 1, 1),
        batch: 128,
    },
    ConvLayer {
        name: "wrn-16-8 128->128",
        out: 128,
        geometry: geometry(128, 32, 3, 1, 1),
        batch: 128,
    },
    ConvLayer {
        name: "wrn-16-8 128->256 s2",
        out: 256,
        geometry: geometry(128, 32, 3, 2, 1),
        batch: 128,
    },
    ConvLayer {
        name: "wrn-16-8 256->256",
        out: 256,
        geometry: geometry(256, 16, 3, 1, 1),
        batch: 128,
    },
    ConvLayer {
        name: "wrn-16-8 512->512",
        out: 512,
        geometry: geometry(512, 8, 3, 1, 1),
        batch: 128,
    },
    ConvLayer {
        name: "vgg16-d 64->64",
        out: 64,
        geometry: geometry(64, 32, 3, 1, 1),
        batch: 128,
    },
    ConvLayer {
        name: "vgg16-d 512->512 2x2",
        out: 512,
        geometry: geometry(512, 2, 3, 1, 1),
        batch: 128,
    },
    ConvLayer {
        name: "lenet-5 conv1",
        out: 20,
        geometry: geometry(1, 28, 5, 1, 0),
        batch: 100,
    },
    ConvLayer {
        name: "lenet-5 conv2",
        out: 50,
        geometry: geometry(20, 12, 5, 1, 0),
        batch: 100,
    },
];

/// The ops the `conv` suite measures at every density (`conv_dense_grad`, which reads no
/// pattern, is measured once per layer).
pub const CONV_OPS: [Op; 3] = [Op::CONV, Op::ConvT, Op::ConvGrad];

/// The `conv` suite: every layer of [`CONV_LAYERS`] at densities 1, 5, 10 and 20 %, each op
/// of [`CONV_OPS`], plus `conv_dense_grad` once per layer.
pub fn conv_suite() -> Vec<Case> {
    let mut cases = Vec::new();
    for layer in CONV_LAYERS {
        for density in [0.01, 0.05, 0.1, 0.2] {
            for op in CONV_OPS {
                cases.push(Case::conv(
                    op,
                    layer.out,
                    layer.geometry,
                    layer.batch,
                    density,
                ));
            }
        }
        cases.push(Case::conv(
            Op::ConvDenseGrad,
            layer.out,
            layer.geometry,
            layer.batch,
            0.05,
        ));
    }
    cases
}

/// Uniform random values in [-1, 1).
pub fn random_values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// One result row of `kernel-bench --json` (CONTRACTS.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchResult {
    /// `cpu` or `opencl`.
    pub backend: String,
    /// The strategy measured.
    pub strategy: String,
    /// The op (IR name).
    pub op: String,
    /// Rows of the weight matrix.
    pub rows: usize,
    /// Columns of the weight matrix.
    pub cols: usize,
    /// Batch size.
    pub batch: usize,
    /// Nominal density of the case (1.0 for the dense GEMM row).
    pub density: f64,
    /// Actual nonzeros.
    pub nnz: usize,
    /// Median time of one run, microseconds.
    pub median_us: f64,
    /// Useful work: `2·nnz·batch / time` (`2·nnz·OH·OW·batch` for a convolution).
    pub gflops: f64,
    /// `2·rows·cols·batch / time` (times `OH·OW` for a convolution).
    pub dense_gflops: f64,
    /// Compile time in milliseconds (0 where nothing compiles).
    pub compile_ms: f64,
    /// Whether the planner (`auto`) picks this strategy for the case.
    pub selected: bool,
    /// Convolution cases: input channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_channels: Option<usize>,
    /// Convolution cases: input height.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    /// Convolution cases: input width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// Convolution cases: window size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<usize>,
    /// Convolution cases: stride.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<usize>,
    /// Convolution cases: padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding: Option<usize>,
}

impl BenchResult {
    /// The row of `strategy` on `backend` (`cpu` or `opencl`) for `case` run on `pattern`,
    /// with its median time; the density is 1 where the pattern is full (the dense GEMM row).
    pub fn measured(
        backend: &str,
        case: &Case,
        strategy: Strategy,
        pattern: &Pattern,
        median_us: f64,
        compile_ms: f64,
        selected: bool,
    ) -> BenchResult {
        let secs = median_us * 1e-6;
        let g = case.geometry;
        // Columns of work per weight: the batch, times the output positions of a convolution.
        let work = (case.batch * case.positions()) as f64;
        BenchResult {
            backend: backend.into(),
            strategy: strategy.name().into(),
            op: case.op.name().into(),
            rows: case.rows,
            cols: case.cols,
            batch: case.batch,
            density: if pattern.nnz() == case.rows * case.cols {
                1.0
            } else {
                case.density
            },
            nnz: pattern.nnz(),
            median_us,
            gflops: 2.0 * pattern.nnz() as f64 * work / secs / 1e9,
            dense_gflops: 2.0 * case.rows as f64 * case.cols as f64 * work / secs / 1e9,
            compile_ms,
            selected,
            in_channels: g.map(|g| g.in_channels),
            height: g.map(|g| g.height),
            width: g.map(|g| g.width),
            kernel: g.map(|g| g.kernel),
            stride: g.map(|g| g.stride),
            padding: g.map(|g| g.padding),
        }
    }
}

/// The file `kernel-bench --json` writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchReport {
    /// Format version (1).
    pub version: u32,
    /// One result per (case, backend, strategy).
    pub results: Vec<BenchResult>,
}

/// Buffers for one case on one backend, filled with random data.
pub struct Operands<B: Backend> {
    values: B::Buffer,
    bias_free_x: B::Buffer,
    dy: B::Buffer,
    out: B::Buffer,
}

impl<B: Backend> Operands<B> {
    /// Allocates and fills the operands of `case` for `pattern` on `backend`.
    pub fn new(
        backend: &B,
        case: &Case,
        pattern: &Pattern,
        seed: u64,
    ) -> Result<Self, BackendError> {
        let ld = case.ld();
        let upload = |data: Vec<f32>| -> Result<B::Buffer, BackendError> {
            let mut buf = backend.alloc(data.len())?;
            backend.upload(&data, &mut buf)?;
            Ok(buf)
        };
        let (x_len, y_len) = (case.in_features() * ld, case.out_features() * ld);
        let out_len = match case.op.role() {
            Role::Forward => y_len,
            Role::BackwardData => x_len,
            Role::WeightGrad => pattern.nnz(),
            Role::DenseGrad => pattern.rows() * pattern.cols(),
        };
        Ok(Operands {
            values: upload(random_values(pattern.nnz(), seed))?,
            bias_free_x: upload(random_values(x_len, seed + 1))?,
            dy: upload(random_values(y_len, seed + 2))?,
            out: backend.alloc(out_len)?,
        })
    }

    /// Runs `kernel` once on these operands.
    pub fn run(&mut self, kernel: &B::Kernel, launch: Launch) -> Result<(), BackendError> {
        let args = match kernel.spec().op().role() {
            Role::Forward => Args::Spmm {
                values: self.values.borrow(),
                x: self.bias_free_x.borrow(),
                bias: None,
                y: self.out.borrow_mut(),
            },
            Role::BackwardData => Args::SpmmT {
                values: self.values.borrow(),
                dy: self.dy.borrow(),
                dx: self.out.borrow_mut(),
            },
            Role::WeightGrad => Args::Sddmm {
                dy: self.dy.borrow(),
                x: self.bias_free_x.borrow(),
                dw: self.out.borrow_mut(),
            },
            Role::DenseGrad => Args::DenseGrad {
                dy: self.dy.borrow(),
                x: self.bias_free_x.borrow(),
                grad: self.out.borrow_mut(),
            },
        };
        kernel.run(launch, args)
    }
}

/// A fixed-shape spec for a case (`batch` and `ld` fixed, as the runtime compiles them).
pub fn case_spec(case: &Case, pattern: Arc<Pattern>) -> KernelSpec {
    KernelSpec::with_geometry(
        "bench",
        case.op,
        pattern,
        case.geometry,
        sparse_ir::Dim::Fixed(case.batch),
        sparse_ir::Dim::Fixed(case.ld()),
    )
    .expect("bench specs are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_have_the_required_cases() {
        let quick = quick_suite();
        assert_eq!(quick.len(), 3 * 3 * 2 * 3 + 1);
        assert!(quick.contains(&Case::matrix(Op::SPMM, 1024, 1024, 128, 0.05)));
        let conv = conv_suite();
        assert_eq!(conv.len(), 9 * (4 * 3 + 1));
        let wrn = Case::conv(Op::CONV, 128, geometry(128, 32, 3, 1, 1), 128, 0.05);
        assert!(conv.contains(&wrn));
        assert_eq!(wrn.cols, 1152);
        assert_eq!(wrn.out_features(), 128 * 32 * 32);
        let result = BenchResult::measured(
            "cpu",
            &wrn,
            Strategy::Generic,
            &wrn.pattern(),
            1e6,
            0.0,
            true,
        );
        let nnz = wrn.pattern().nnz() as f64;
        assert!((result.gflops - 2.0 * nnz * 1024.0 * 128.0 / 1e9).abs() < 1e-6);
        assert_eq!(result.in_channels, Some(128));
        assert_eq!(result.stride, Some(1));
        assert_eq!(full_suite().len(), 5 * 3 * 6 * 3);
        let gpu = gpu_suite();
        assert_eq!(gpu.len(), 4);
        assert!(gpu.iter().all(|c| c.op == Op::SPMM && c.batch == 128));
        assert!(gpu.iter().any(|c| c.rows == 4096 && c.density == 0.05));
    }
}
