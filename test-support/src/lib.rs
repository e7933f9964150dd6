//! # test-support
//!
//! One differential test harness for every sparsejit backend (a dev-dependency only). A test
//! body written against it runs unchanged on the CPU backend (generic, dense, JIT), on a
//! bare [`Kernel`] such as a `JitKernel` with its own options, on OpenCL (through
//! [`Device`]) and on any function with the shape of a kernel (`sparse_kernel!`'s, through
//! [`check_fn`]):
//!
//! - [`Guarded`]: a buffer window with canary guard zones before and after it and a start
//!   offset of 0–15 floats from a 64-byte boundary, so operands are aligned and misaligned;
//! - [`Operands`]: the arguments of every op ([`Op::ALL`]) for one launch — inputs with NaN in
//!   their padding columns `batch..ld`, outputs starting as NaN (an element a kernel does not
//!   write fails the comparison) with a sentinel in their padding columns;
//! - [`named_patterns`]: the named edge cases, one `.sir` file (`patterns/edge_cases.sir`),
//!   with [`lenet_fc1`] (the largest LeNet layer), [`BATCHES`] and [`strides`];
//! - [`check`]: compile a spec on a [`Target`], run it on guarded operands and compare it
//!   with the interpreter ([`sparse_ir::interp`]) under the tolerance of CONTRACTS.md
//!   (`|got − want| ≤ 1e-5·Σ|terms| + 1e-6`, applied by [`sparse_ir::interp::compare`], its
//!   one definition), then assert the guards intact, the inputs unchanged and — unless
//!   [`Kernel::writes_padding`] allows otherwise — the output's padding untouched.
//!
//! Random patterns come from [`Pattern::random`] only, so one seed means one pattern in every
//! crate.

use std::borrow::{Borrow, BorrowMut};
use std::sync::{Arc, OnceLock};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::backend::{Backend, Kernel};
use sparse_ir::interp::{self, Reference};
use sparse_ir::{
    AlignedVec, Args, BackendError, ConvGeometry, Dim, KernelSpec, Launch, Op, Pattern, Role,
    Strategy,
};

/// Floats of guard zone before and after every operand (a multiple of 16, so a window at
/// offset 0 starts on a 64-byte boundary).
pub const GUARD: usize = 32;

/// What guard zones hold; compared bit for bit after every run.
pub const GUARD_VALUE: f32 = -7777.25;

/// What an output's padding columns hold before a run; compared bit for bit afterwards
/// unless the kernel [`Kernel::writes_padding`].
pub const PAD_SENTINEL: f32 = 31337.5;

/// The batches of the named cases: 1 (a vector), 3 and 17 (odd, below and above a 16-column
/// block), 8 (whole `f32x4` blocks), 100 (LeNet's training batch), 128.
pub const BATCHES: [usize; 6] = [1, 3, 8, 17, 100, 128];

/// The row strides every named batch is tested with: exactly the batch, padded to a multiple
/// of 16 floats (what the runtime allocates), and the batch plus 3 (odd).
pub fn strides(batch: usize) -> Vec<usize> {
    let mut v = vec![batch, batch.next_multiple_of(16), batch + 3];
    v.sort_unstable();
    v.dedup();
    v
}

/// The text of the named edge-case patterns.
pub const EDGE_CASES_SIR: &str = include_str!("../patterns/edge_cases.sir");

/// The named edge-case patterns of `patterns/edge_cases.sir`, in file order: empty rows and
/// columns, a single nonzero, a fully dense row, an all-zero layer, a dense layer, odd sizes
/// (7×96), rows of every short length, long rows, a single row and a single column.
pub fn named_patterns() -> Vec<(String, Arc<Pattern>)> {
    static MODULE: OnceLock<sparse_ir::Module> = OnceLock::new();
    let module = MODULE.get_or_init(|| {
        sparse_ir::text::parse(EDGE_CASES_SIR)
            .unwrap_or_else(|e| panic!("patterns/edge_cases.sir:{e}"))
    });
    module
        .patterns()
        .map(|(name, p)| (name.to_string(), Arc::clone(p)))
        .collect()
}

/// The named pattern `name` of [`named_patterns`]; panics if there is none.
pub fn named(name: &str) -> Arc<Pattern> {
    named_patterns()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("no pattern {name:?} in patterns/edge_cases.sir"))
}

/// [`Pattern::random`] (each entry present with probability `density`) in an `Arc`, the
/// form specs take; the one random pattern generator of every test, so one seed means one
/// pattern in every crate.
pub fn random(rows: usize, cols: usize, density: f64, seed: u64) -> Arc<Pattern> {
    Arc::new(Pattern::random(rows, cols, density, seed).expect("a random pattern is valid"))
}

/// The largest LeNet-300-100 layer: 300×784 at 5 %, seed 42.
pub fn lenet_fc1() -> Arc<Pattern> {
    random(300, 784, 0.05, 42)
}

/// The specs of `op` on `pattern` for `launch`: one with batch and `ld` fixed, and one that
/// takes them at run time (`Dim::Any`), both for layer `layer`.
pub fn specs(layer: &str, op: Op, pattern: &Arc<Pattern>, launch: Launch) -> [KernelSpec; 2] {
    let fixed = KernelSpec::new(
        layer,
        op,
        Arc::clone(pattern),
        Dim::Fixed(launch.batch),
        Dim::Fixed(launch.ld),
    )
    .expect("a valid fixed spec");
    let any = KernelSpec::any_batch(layer, op, Arc::clone(pattern)).expect("a valid spec");
    [fixed, any]
}

/// A fixed-shape spec of `op` on `pattern` for `launch`.
pub fn fixed_spec(layer: &str, op: Op, pattern: &Arc<Pattern>, launch: Launch) -> KernelSpec {
    let [fixed, _] = specs(layer, op, pattern, launch);
    fixed
}

/// A convolution case of the differential tests: a name, the `[out × C·k²]` pattern and its
/// geometry.
#[derive(Debug, Clone)]
pub struct ConvCase {
    /// What the case covers, e.g. `3x3 stride 2 padding 1`.
    pub name: String,
    /// The weight pattern.
    pub pattern: Arc<Pattern>,
    /// The geometry.
    pub geometry: ConvGeometry,
}

impl ConvCase {
    /// A case with a random pattern of `out` output channels at `density` (seeded).
    pub fn random(
        name: &str,
        out: usize,
        geometry: ConvGeometry,
        density: f64,
        seed: u64,
    ) -> ConvCase {
        ConvCase {
            name: name.to_string(),
            pattern: random(out, geometry.pattern_cols(), density, seed),
            geometry,
        }
    }

    /// The spec of `op` (a convolution op) for this case at `launch`, batch and `ld` fixed
    /// when `fixed`, else given at run time.
    pub fn spec(&self, op: Op, launch: Launch, fixed: bool) -> KernelSpec {
        let (batch, ld) = if fixed {
            (Dim::Fixed(launch.batch), Dim::Fixed(launch.ld))
        } else {
            (Dim::Any, Dim::Any)
        };
        KernelSpec::conv(
            format!("conv_{}", self.name.replace(' ', "_")),
            op,
            Arc::clone(&self.pattern),
            self.geometry,
            batch,
            ld,
        )
        .expect("a valid convolution spec")
    }
}

/// A geometry: `c` input channels of `h × w`, a `k × k` window, stride `s`, padding `p`.
pub fn geometry(c: usize, h: usize, w: usize, k: usize, s: usize, p: usize) -> ConvGeometry {
    ConvGeometry {
        in_channels: c,
        height: h,
        width: w,
        kernel: k,
        stride: s,
        padding: p,
    }
}

/// The named convolution cases every backend's convolution ops are tested on: 1×1; 3×3 at
/// stride 1 and 2 with padding 0 and 1; 5×5 (LeNet-5's); odd sizes; an empty output channel;
/// an empty input channel; a window larger than the unpadded input; every tap of a dense
/// pattern; an empty pattern. Random patterns are seeded, so each case is the same every run.
pub fn conv_cases() -> Vec<ConvCase> {
    let mut cases = vec![
        ConvCase::random("1x1", 5, geometry(4, 6, 7, 1, 1, 0), 0.5, 1),
        ConvCase::random("3x3 s1 p1", 6, geometry(3, 8, 8, 3, 1, 1), 0.3, 2),
        ConvCase::random("3x3 s1 p0 odd", 4, geometry(3, 7, 9, 3, 1, 0), 0.3, 3),
        ConvCase::random("3x3 s2 p1", 5, geometry(3, 9, 8, 3, 2, 1), 0.3, 4),
        ConvCase::random("3x3 s2 p0", 3, geometry(2, 8, 7, 3, 2, 0), 0.4, 5),
        ConvCase::random("5x5 s1 p0", 4, geometry(2, 12, 12, 5, 1, 0), 0.2, 6),
        ConvCase::random("3x3 s1 p2", 3, geometry(2, 5, 5, 3, 1, 2), 0.5, 7),
        ConvCase::random("5x5 on 3x3 p1", 3, geometry(2, 3, 3, 5, 1, 1), 0.5, 8),
        ConvCase::random("1x1 s2", 3, geometry(3, 7, 6, 1, 2, 0), 0.6, 9),
        ConvCase::random("3x3 s3 p1", 3, geometry(2, 10, 11, 3, 3, 1), 0.5, 10),
        // Enough planes on the read side of `conv` (128 inputs) and of `conv_t` (256 outputs)
        // for the CPU kernels' plane blocks at batch 100 (blocks of 32 and 64 planes): rows
        // with nothing in some block.
        ConvCase::random("128 inputs", 4, geometry(128, 6, 6, 3, 1, 1), 0.1, 11),
        ConvCase::random("256 outputs", 256, geometry(3, 6, 6, 3, 1, 1), 0.1, 12),
    ];
    // An empty output channel (row 1) and an empty input channel (channel 2 of 3).
    let g = geometry(3, 6, 5, 3, 1, 1);
    let mut mask = vec![0u8; 4 * g.pattern_cols()];
    for (i, m) in mask.iter_mut().enumerate() {
        let (o, col) = (i / g.pattern_cols(), i % g.pattern_cols());
        let channel = col / g.taps();
        if o != 1 && channel != 2 && (i * 7) % 3 == 0 {
            *m = 1;
        }
    }
    let pattern = Pattern::from_dense_mask(4, g.pattern_cols(), &mask).expect("a valid mask");
    cases.push(ConvCase {
        name: "empty channels".into(),
        pattern: Arc::new(pattern),
        geometry: g,
    });
    let g = geometry(2, 5, 6, 3, 1, 1);
    cases.push(ConvCase {
        name: "dense".into(),
        pattern: Arc::new(Pattern::dense(3, g.pattern_cols()).expect("a dense pattern")),
        geometry: g,
    });
    cases.push(ConvCase {
        name: "empty".into(),
        pattern: Arc::new(Pattern::empty(3, g.pattern_cols()).expect("an empty pattern")),
        geometry: g,
    });
    cases
}

/// A buffer window of `len` elements at `offset` floats past a 64-byte boundary, with
/// [`GUARD`] floats of [`GUARD_VALUE`] before and after it.
#[derive(Debug, Clone)]
pub struct Guarded {
    data: AlignedVec,
    start: usize,
    len: usize,
}

impl Guarded {
    /// A window of `len` copies of `fill` at `offset % 16` floats past a 64-byte boundary.
    pub fn new(len: usize, offset: usize, fill: f32) -> Guarded {
        let start = GUARD + offset % 16;
        let mut data = AlignedVec::filled(start + len + GUARD, GUARD_VALUE);
        data[start..start + len].fill(fill);
        Guarded { data, start, len }
    }

    /// The window.
    pub fn get(&self) -> &[f32] {
        &self.data[self.start..self.start + self.len]
    }

    /// The window, mutable.
    pub fn get_mut(&mut self) -> &mut [f32] {
        &mut self.data[self.start..self.start + self.len]
    }

    /// Number of elements in the window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The window's offset in floats from a 64-byte boundary (0 = aligned).
    pub fn offset(&self) -> usize {
        self.start - GUARD
    }

    /// Checks that both guard zones (and the alignment gap before the window) still hold
    /// [`GUARD_VALUE`], bit for bit; the error names the first changed element.
    pub fn check_guards(&self) -> Result<(), String> {
        let bits = GUARD_VALUE.to_bits();
        if let Some(i) = self.data[..self.start]
            .iter()
            .rposition(|v| v.to_bits() != bits)
        {
            return Err(format!(
                "wrote {} elements before its start (found {})",
                self.start - i,
                self.data[i]
            ));
        }
        let end = self.start + self.len;
        if let Some(i) = self.data[end..].iter().position(|v| v.to_bits() != bits) {
            return Err(format!(
                "wrote element {} past its end (found {})",
                i,
                self.data[end + i]
            ));
        }
        Ok(())
    }
}

/// Where one run's operands start: `offset` shifts every operand by a different amount
/// (`offset · (k + 1) mod 16` floats for operand `k`), 0 puts them all on 64-byte boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The launch.
    pub launch: Launch,
    /// Seeds the operand values.
    pub seed: u64,
    /// The operand offsets (see the type's doc).
    pub offset: usize,
}

impl Run {
    /// A launch of `batch` columns with row stride `ld`, values from `seed`, every operand
    /// aligned.
    pub fn new(batch: usize, ld: usize, seed: u64) -> Run {
        Run {
            launch: Launch::new(batch, ld),
            seed,
            offset: 0,
        }
    }

    /// The same run with operands shifted by `offset` (see [`Run`]).
    pub fn offset(self, offset: usize) -> Run {
        Run { offset, ..self }
    }
}

/// The operands of one launch of one op, each [`Guarded`]: values (`nnz`), bias (`rows`, for
/// every op; passed only to `spmm` with a bias), `x` (`cols × ld`), `dy` (`rows × ld`) and the
/// output. Inputs hold values in [-1, 1) and NaN in their padding columns; the output holds
/// NaN in the elements a kernel must write and [`PAD_SENTINEL`] in its padding columns.
#[derive(Debug, Clone)]
pub struct Operands {
    op: Op,
    launch: Launch,
    /// Weight values, `nnz`.
    pub values: Guarded,
    /// Bias, `rows`.
    pub bias: Guarded,
    /// Layer input `X`, `cols × ld`.
    pub x: Guarded,
    /// Upstream gradient `dY`, `rows × ld`.
    pub dy: Guarded,
    /// The output of the op.
    pub out: Guarded,
    inputs: [Vec<f32>; 4],
}

/// Number of elements of `spec`'s output with row stride `ld`.
pub fn output_len(spec: &KernelSpec, ld: usize) -> usize {
    let p = spec.pattern();
    match spec.op().role() {
        Role::Forward => spec.out_features() * ld,
        Role::BackwardData => spec.in_features() * ld,
        Role::WeightGrad => p.nnz(),
        Role::DenseGrad => p.rows() * p.cols(),
    }
}

/// Whether `op`'s output is a feature-major matrix with padding columns.
pub fn output_is_matrix(op: Op) -> bool {
    matches!(op.role(), Role::Forward | Role::BackwardData)
}

fn random_vector(rng: &mut ChaCha8Rng, len: usize, offset: usize) -> Guarded {
    let mut g = Guarded::new(len, offset, 0.0);
    for v in g.get_mut() {
        *v = rng.random_range(-1.0f32..1.0);
    }
    g
}

fn random_matrix(rng: &mut ChaCha8Rng, rows: usize, launch: Launch, offset: usize) -> Guarded {
    let mut g = Guarded::new(rows * launch.ld, offset, f32::NAN);
    let m = g.get_mut();
    for r in 0..rows {
        for v in &mut m[r * launch.ld..r * launch.ld + launch.batch] {
            *v = rng.random_range(-1.0f32..1.0);
        }
    }
    g
}

impl Operands {
    /// Operands for `spec`'s op at `run` (the spec's batch and `ld` are not checked here;
    /// the kernel and the interpreter check them).
    pub fn new(spec: &KernelSpec, run: Run) -> Operands {
        let (p, op, launch) = (spec.pattern(), spec.op(), run.launch);
        let mut rng = ChaCha8Rng::seed_from_u64(run.seed);
        let off = |k: usize| (run.offset * (k + 1)) % 16;
        let values = random_vector(&mut rng, p.nnz(), off(0));
        let bias = random_vector(&mut rng, p.rows(), off(1));
        let x = random_matrix(&mut rng, spec.in_features(), launch, off(2));
        let dy = random_matrix(&mut rng, spec.out_features(), launch, off(3));
        let mut out = Guarded::new(output_len(spec, launch.ld), off(4), f32::NAN);
        if output_is_matrix(op) {
            let ld = launch.ld;
            for row in out.get_mut().chunks_mut(ld.max(1)) {
                let batch = launch.batch.min(row.len());
                row[batch..].fill(PAD_SENTINEL);
            }
        }
        let inputs = [&values, &bias, &x, &dy].map(|g| g.get().to_vec());
        Operands {
            op,
            launch,
            values,
            bias,
            x,
            dy,
            out,
            inputs,
        }
    }

    /// The same operands with the weight values replaced by `values` (a kernel with its
    /// values baked in); panics unless `values` has `nnz` elements.
    pub fn with_values(mut self, values: &[f32]) -> Operands {
        self.values.get_mut().copy_from_slice(values);
        self.inputs[0] = values.to_vec();
        self
    }

    /// The same operands with the bias replaced by `bias` (a layer's real bias); panics
    /// unless `bias` has `rows` elements.
    pub fn with_bias(mut self, bias: &[f32]) -> Operands {
        self.bias.get_mut().copy_from_slice(bias);
        self.inputs[1] = bias.to_vec();
        self
    }

    /// The op these operands are for.
    pub fn op(&self) -> Op {
        self.op
    }

    /// The launch these operands are for.
    pub fn launch(&self) -> Launch {
        self.launch
    }

    /// The arguments of the op: every operand's window, the output mutable.
    pub fn args(&mut self) -> Args<'_, [f32]> {
        args_of(
            self.op,
            self.values.get(),
            self.bias.get(),
            self.x.get(),
            self.dy.get(),
            self.out.get_mut(),
        )
    }

    /// The interpreter's result for these inputs.
    pub fn reference(&self, spec: &KernelSpec) -> Result<Reference, String> {
        let mut scratch = vec![0.0f32; self.out.len()];
        let args = args_of(
            self.op,
            self.values.get(),
            self.bias.get(),
            self.x.get(),
            self.dy.get(),
            &mut scratch,
        );
        interp::reference(spec, self.launch, &args).map_err(|e| format!("interpreter: {e}"))
    }

    /// Checks a finished run: the output against `want` under the tolerance, every guard
    /// zone intact, the inputs unchanged and — unless `writes_padding` — the output's padding
    /// columns still [`PAD_SENTINEL`].
    pub fn verify(&self, want: &Reference, writes_padding: bool) -> Result<(), String> {
        let ld = self.launch.ld;
        interp::compare(want, self.out.get(), ld).map_err(|m| m.to_string())?;
        self.out
            .check_guards()
            .map_err(|e| format!("output: {e}"))?;
        for (name, g, before) in [
            ("values", &self.values, &self.inputs[0]),
            ("bias", &self.bias, &self.inputs[1]),
            ("x", &self.x, &self.inputs[2]),
            ("dy", &self.dy, &self.inputs[3]),
        ] {
            g.check_guards().map_err(|e| format!("input {name}: {e}"))?;
            let same = g
                .get()
                .iter()
                .zip(before)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                return Err(format!("input {name} was modified"));
            }
        }
        if output_is_matrix(self.op) && !writes_padding {
            let batch = self.launch.batch;
            for (r, row) in self.out.get().chunks(ld.max(1)).enumerate() {
                if let Some(j) = row[batch.min(row.len())..]
                    .iter()
                    .position(|v| v.to_bits() != PAD_SENTINEL.to_bits())
                {
                    return Err(format!(
                        "padding column {} of output row {r} was written ({}), and the \
                         kernel says it leaves padding alone",
                        batch + j,
                        row[batch + j]
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The arguments of `op` on these slices (`bias` passed only to an op with a bias).
pub fn args_of<'a>(
    op: Op,
    values: &'a [f32],
    bias: &'a [f32],
    x: &'a [f32],
    dy: &'a [f32],
    out: &'a mut [f32],
) -> Args<'a, [f32]> {
    match op.role() {
        Role::Forward => Args::Spmm {
            values,
            x,
            bias: op.has_bias().then_some(bias),
            y: out,
        },
        Role::BackwardData => Args::SpmmT {
            values,
            dy,
            dx: out,
        },
        Role::WeightGrad => Args::Sddmm { dy, x, dw: out },
        Role::DenseGrad => Args::DenseGrad { dy, x, grad: out },
    }
}

/// Where [`check`] compiles and runs kernels.
///
/// Every [`Backend`] whose kernels run on host slices is a target as it is: operands stay in
/// their guarded windows, so a kernel that strays outside an operand hits a guard zone. A
/// backend with buffers of its own (OpenCL) is a target through [`Device`].
pub trait Target {
    /// The kernels this target compiles.
    type Kernel: Kernel;

    /// The backend and device, in words (for messages).
    fn describe(&self) -> String;

    /// Compiles `spec` with `strategy`.
    fn compile(&self, spec: &KernelSpec, strategy: Strategy) -> Result<Self::Kernel, BackendError>;

    /// Runs `kernel` on `operands` (output written into `operands.out`).
    fn run(&self, kernel: &Self::Kernel, operands: &mut Operands) -> Result<(), String>;
}

impl<B> Target for B
where
    B: Backend,
    B::Kernel: Kernel<Buffer = [f32]>,
{
    type Kernel = B::Kernel;

    fn describe(&self) -> String {
        format!("{} ({})", self.name(), self.device())
    }

    fn compile(&self, spec: &KernelSpec, strategy: Strategy) -> Result<B::Kernel, BackendError> {
        Backend::compile(self, spec, strategy)
    }

    fn run(&self, kernel: &B::Kernel, operands: &mut Operands) -> Result<(), String> {
        let launch = operands.launch();
        kernel
            .run(launch, operands.args())
            .map_err(|e| format!("run: {e}"))
    }
}

/// A backend with buffers of its own, as a [`Target`]: every operand is uploaded into a
/// buffer of its own, inputs and matrix outputs with a trailing guard zone (the argument
/// checks accept longer buffers there), the output is downloaded into its guarded window and
/// its trailing guard and the inputs are checked on the device.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a, B>(pub &'a B);

impl<B: Backend> Device<'_, B> {
    fn upload(&self, data: &[f32], guard: bool) -> Result<B::Buffer, String> {
        let mut host = data.to_vec();
        if guard {
            host.extend(std::iter::repeat_n(GUARD_VALUE, GUARD));
        }
        let mut buffer = self
            .0
            .alloc(host.len())
            .map_err(|e| format!("alloc: {e}"))?;
        self.0
            .upload(&host, &mut buffer)
            .map_err(|e| format!("upload: {e}"))?;
        Ok(buffer)
    }

    fn download(&self, buffer: &B::Buffer, len: usize) -> Result<Vec<f32>, String> {
        let mut host = vec![0.0; len];
        self.0
            .download(buffer, &mut host)
            .map_err(|e| format!("download: {e}"))?;
        Ok(host)
    }
}

impl<B: Backend> Target for Device<'_, B> {
    type Kernel = B::Kernel;

    fn describe(&self) -> String {
        format!("{} ({})", self.0.name(), self.0.device())
    }

    fn compile(&self, spec: &KernelSpec, strategy: Strategy) -> Result<B::Kernel, BackendError> {
        self.0.compile(spec, strategy)
    }

    fn run(&self, kernel: &B::Kernel, operands: &mut Operands) -> Result<(), String> {
        let (op, launch) = (operands.op(), operands.launch());
        let matrix_out = output_is_matrix(op);
        let values = self.upload(operands.values.get(), false)?;
        let bias = self.upload(operands.bias.get(), false)?;
        let x = self.upload(operands.x.get(), true)?;
        let dy = self.upload(operands.dy.get(), true)?;
        let mut out = self.upload(operands.out.get(), matrix_out)?;
        let n = operands.out.len();
        let args = match op.role() {
            Role::Forward => Args::Spmm {
                values: values.borrow(),
                x: x.borrow(),
                bias: op.has_bias().then(|| bias.borrow()),
                y: out.borrow_mut(),
            },
            Role::BackwardData => Args::SpmmT {
                values: values.borrow(),
                dy: dy.borrow(),
                dx: out.borrow_mut(),
            },
            Role::WeightGrad => Args::Sddmm {
                dy: dy.borrow(),
                x: x.borrow(),
                dw: out.borrow_mut(),
            },
            Role::DenseGrad => Args::DenseGrad {
                dy: dy.borrow(),
                x: x.borrow(),
                grad: out.borrow_mut(),
            },
        };
        kernel.run(launch, args).map_err(|e| format!("run: {e}"))?;
        let got = self.download(&out, n + if matrix_out { GUARD } else { 0 })?;
        if let Some(i) = got[n..]
            .iter()
            .position(|v| v.to_bits() != GUARD_VALUE.to_bits())
        {
            return Err(format!(
                "output: wrote element {i} past its end on the device"
            ));
        }
        operands.out.get_mut().copy_from_slice(&got[..n]);
        for (name, buffer, host, guard) in [
            ("values", &values, operands.values.get(), false),
            ("bias", &bias, operands.bias.get(), false),
            ("x", &x, operands.x.get(), true),
            ("dy", &dy, operands.dy.get(), true),
        ] {
            let len = host.len() + if guard { GUARD } else { 0 };
            let now = self.download(buffer, len)?;
            let same = now[..host.len()]
                .iter()
                .zip(host)
                .all(|(a, b)| a.to_bits() == b.to_bits())
                && now[host.len()..]
                    .iter()
                    .all(|v| v.to_bits() == GUARD_VALUE.to_bits());
            if !same {
                return Err(format!("input {name} (or its guard) changed on the device"));
            }
        }
        Ok(())
    }
}

/// What one successful [`check`] ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// The strategy that ran (the planner's choice for `Auto`).
    pub strategy: Strategy,
    /// Whether the kernel said it may write the output's padding.
    pub writes_padding: bool,
}

/// Compiles `spec` with `strategy` on `target`, runs it on guarded [`Operands`] at `run` and
/// checks the result against the interpreter ([`Operands::verify`]). The error describes the
/// case (layer, op, shape, launch, offset, strategy, target) and what went wrong.
pub fn check<T: Target>(
    target: &T,
    spec: &KernelSpec,
    strategy: Strategy,
    run: Run,
) -> Result<Checked, String> {
    let kernel = target
        .compile(spec, strategy)
        .map_err(|e| format!("{}: compiling with {strategy}: {e}", describe(spec, run)))?;
    if strategy != Strategy::Auto && kernel.strategy() != strategy {
        return Err(format!(
            "{}: asked for {strategy}, compiled {}",
            describe(spec, run),
            kernel.strategy()
        ));
    }
    check_compiled(target, &kernel, run)
}

/// [`check`] for a kernel `target` compiled already (one compilation, several runs).
pub fn check_compiled<T: Target>(
    target: &T,
    kernel: &T::Kernel,
    run: Run,
) -> Result<Checked, String> {
    let spec = kernel.spec();
    let what = || {
        format!(
            "{}, {} on {}",
            describe(spec, run),
            kernel.strategy(),
            target.describe()
        )
    };
    let mut operands = Operands::new(spec, run);
    let want = operands
        .reference(spec)
        .map_err(|e| format!("{}: {e}", what()))?;
    target
        .run(kernel, &mut operands)
        .map_err(|e| format!("{}: {e}", what()))?;
    operands
        .verify(&want, kernel.writes_padding())
        .map_err(|e| format!("{}: {e}", what()))?;
    Ok(Checked {
        strategy: kernel.strategy(),
        writes_padding: kernel.writes_padding(),
    })
}

/// [`check_compiled`] for a kernel on host slices that no backend compiled (a `JitKernel`
/// with its own options, for instance).
pub fn check_kernel<K: Kernel<Buffer = [f32]>>(kernel: &K, run: Run) -> Result<Checked, String> {
    check_fn(
        kernel.spec(),
        run,
        kernel.writes_padding(),
        |launch, args| kernel.run(launch, args).map_err(|e| e.to_string()),
    )
    .map_err(|e| format!("{e}, {}", kernel.strategy()))?;
    Ok(Checked {
        strategy: kernel.strategy(),
        writes_padding: kernel.writes_padding(),
    })
}

/// The check for anything that runs `spec` on host slices (`sparse_kernel!`'s functions):
/// `f` gets the launch and the guarded arguments; `writes_padding` says whether it may write
/// the output's padding columns.
pub fn check_fn(
    spec: &KernelSpec,
    run: Run,
    writes_padding: bool,
    f: impl FnOnce(Launch, Args<'_, [f32]>) -> Result<(), String>,
) -> Result<(), String> {
    let what = || describe(spec, run);
    let mut operands = Operands::new(spec, run);
    let want = operands
        .reference(spec)
        .map_err(|e| format!("{}: {e}", what()))?;
    f(run.launch, operands.args()).map_err(|e| format!("{}: run: {e}", what()))?;
    operands
        .verify(&want, writes_padding)
        .map_err(|e| format!("{}: {e}", what()))
}

/// A case in words: layer, op, shape (and convolution geometry), nonzeros, launch, spec dims
/// and operand offset.
pub fn describe(spec: &KernelSpec, run: Run) -> String {
    let p = spec.pattern();
    let geometry = spec.geometry().map_or(String::new(), |g| format!(" ({g})"));
    format!(
        "layer {} {} on {}x{}{geometry} nnz {}, batch {} ld {} (spec batch {} ld {}), offset {}, seed {}",
        spec.layer(),
        spec.op(),
        p.rows(),
        p.cols(),
        p.nnz(),
        run.launch.batch,
        run.launch.ld,
        spec.batch(),
        spec.ld(),
        run.offset,
        run.seed
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_patterns_parse_and_cover_the_edge_cases() {
        assert!(named_patterns().len() >= 10);
        let p = named("empty_rows_cols");
        assert_eq!((p.rows(), p.cols()), (9, 11));
        for r in [0, 3, 4] {
            assert!(p.row_range(r).is_empty(), "row {r}");
        }
        for c in [1u32, 5, 6] {
            assert!(!p.col_idx().contains(&c), "column {c}");
        }
        assert_eq!(named("single_nonzero").nnz(), 1);
        assert_eq!(named("all_zero").nnz(), 0);
        let d = named("dense_row");
        assert_eq!(d.row_range(2).len(), d.cols());
        let odd = named("odd_7x96");
        assert_eq!((odd.rows(), odd.cols()), (7, 96));
        assert_eq!(named("dense").nnz(), 12 * 20);
    }

    #[test]
    fn guards_catch_writes_on_either_side() {
        for offset in [0, 5, 15] {
            let mut g = Guarded::new(10, offset, 1.0);
            assert_eq!(g.offset(), offset);
            assert_eq!(g.get().as_ptr() as usize % 4, 0);
            assert_eq!(g.get().as_ptr() as usize % 64, 4 * offset);
            g.get_mut().fill(2.0);
            assert!(g.check_guards().is_ok());
            let start = g.start;
            g.data[start + 10] = 0.0;
            assert!(g.check_guards().unwrap_err().contains("past its end"));
            g.data[start + 10] = GUARD_VALUE;
            g.data[start - 1] = 0.0;
            assert!(g.check_guards().unwrap_err().contains("before its start"));
        }
    }

    /// The interpreter through `check_fn`, and deliberately broken variants of it.
    #[test]
    fn check_fn_accepts_the_interpreter_and_catches_breakage() {
        let p = named("empty_rows_cols");
        let run = Run::new(3, 5, 1).offset(3);
        for op in Op::ALL {
            let spec = fixed_spec("t", op, &p, run.launch);
            check_fn(&spec, run, false, |l, a| {
                interp::run(&spec, l, a).map_err(|e| e.to_string())
            })
            .unwrap();
            // one result off
            let e = check_fn(&spec, run, false, |l, mut a| {
                interp::run(&spec, l, reborrow(&mut a)).map_err(|e| e.to_string())?;
                out_of(a)[0] += 0.5;
                Ok(())
            })
            .unwrap_err();
            assert!(e.contains("element 0"), "{op}: {e}");
            // an element left unwritten
            let e = check_fn(&spec, run, false, |_, _| Ok(())).unwrap_err();
            assert!(e.contains("got NaN"), "{op}: {e}");
        }
        // padding written
        let spec = fixed_spec("t", Op::SpmmT, &p, run.launch);
        let breaks_padding = |l: Launch, mut a: Args<'_, [f32]>| {
            interp::run(&spec, l, reborrow(&mut a)).map_err(|e| e.to_string())?;
            out_of(a)[3] = 0.0;
            Ok(())
        };
        let e = check_fn(&spec, run, false, breaks_padding).unwrap_err();
        assert!(e.contains("padding column 3 of output row 0"), "{e}");
        check_fn(&spec, run, true, breaks_padding).unwrap();
    }

    fn reborrow<'b>(a: &'b mut Args<'_, [f32]>) -> Args<'b, [f32]> {
        match a {
            Args::Spmm { values, x, bias, y } => Args::Spmm {
                values,
                x,
                bias: *bias,
                y,
            },
            Args::SpmmT { values, dy, dx } => Args::SpmmT { values, dy, dx },
            Args::Sddmm { dy, x, dw } => Args::Sddmm { dy, x, dw },
            Args::DenseGrad { dy, x, grad } => Args::DenseGrad { dy, x, grad },
        }
    }

    fn out_of<'b>(a: Args<'b, [f32]>) -> &'b mut [f32] {
        match a {
            Args::Spmm { y, .. } => y,
            Args::SpmmT { dx, .. } => dx,
            Args::Sddmm { dw, .. } => dw,
            Args::DenseGrad { grad, .. } => grad,
        }
    }

    #[test]
    fn verify_catches_modified_inputs_and_guards() {
        let p = named("dense_row");
        let run = Run::new(5, 8, 2).offset(7);
        let spec = fixed_spec("t", Op::SPMM, &p, run.launch);
        let mut ops = Operands::new(&spec, run);
        let want = ops.reference(&spec).unwrap();
        interp::run(&spec, run.launch, ops.args()).unwrap();
        ops.verify(&want, false).unwrap();
        let mut bad = ops.clone();
        bad.x.get_mut()[0] += 1.0;
        assert!(bad.verify(&want, false).unwrap_err().contains("input x"));
        let mut bad = ops.clone();
        let end = bad.out.start + bad.out.len;
        bad.out.data[end] = 1.0;
        assert!(bad.verify(&want, false).unwrap_err().contains("output"));
    }

    #[test]
    fn random_is_pattern_random_and_strides_dedup() {
        assert_eq!(
            *random(30, 40, 0.1, 9),
            Pattern::random(30, 40, 0.1, 9).unwrap()
        );
        assert_eq!(strides(1), vec![1, 4, 16]);
        assert_eq!(strides(16), vec![16, 19]);
    }
}
