//! Command-line tests of kernel-dump: every `--emit` kind works, and bad input gives a clear
//! error naming the problem.

use std::process::{Command, Output};

fn kernel_dump(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kernel-dump"))
        .args(args)
        .output()
        .expect("kernel-dump runs")
}

/// The memory the limit tests tell kernel-dump the machine has (16 GiB), so that their
/// limits do not depend on the machine running them.
const TEST_MEMORY: &str = "17179869184";

/// Runs kernel-dump on a machine of [`TEST_MEMORY`] and checks that it fails cleanly: exit
/// code 1 (not a panic's 101 or an abort's signal) with an error and no panic message; the
/// error.
fn fails_within_memory(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kernel-dump"))
        .args(args)
        .env(sparse_ir::limits::MEMORY_ENV, TEST_MEMORY)
        .output()
        .expect("kernel-dump runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "kernel-dump {args:?}: {stderr}");
    assert!(
        stderr.starts_with("error: ") && !stderr.contains("panicked"),
        "{stderr}"
    );
    stderr
}

fn ok(args: &[&str]) -> String {
    let out = kernel_dump(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kernel-dump {args:?} failed: {stderr}"
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = kernel_dump(args);
    assert!(!out.status.success(), "kernel-dump {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/two.sir");
const MASKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../macros/tests/masks");

#[test]
fn default_prints_plan_and_stats() {
    let out = ok(&["--random", "30x40", "--density", "0.1", "--no-measure"]);
    assert!(out.contains("random.plan.txt"), "{out}");
    assert!(out.contains("random.stats.txt"), "{out}");
    assert!(out.contains("rows 30  cols 40"), "{out}");
    assert!(out.contains("spmm batch 100 ld 112: strategy"), "{out}");
}

#[test]
fn plan_on_two_threads() {
    let out = ok(&[
        "--random",
        "300x784",
        "--density",
        "0.2",
        "--op",
        "spmm",
        "--threads",
        "2",
        "--no-measure",
    ]);
    // the device line names the thread count (`avx512x2`), and so do the plan's reasons
    assert!(
        out.lines()
            .any(|l| l.starts_with("backend cpu, ") && l.ends_with("x2")),
        "{out}"
    );
    assert!(out.contains("2 thread(s)"), "{out}");
}

#[test]
fn stats_and_plan_of_the_issue_example() {
    let out = ok(&[
        "--random",
        "300x784",
        "--density",
        "0.05",
        "--emit",
        "stats",
        "--emit",
        "plan",
        "--op",
        "spmm",
    ]);
    assert!(out.contains("rows 300  cols 784"), "{out}");
    assert!(out.contains("row-length histogram"), "{out}");
    assert!(
        out.contains("measured (every strategy, median of 21 runs): generic"),
        "{out}"
    );
    assert!(out.contains("  predicted: generic"), "{out}");
    // Batch 100 by default: the row-blocked generic kernel, its ISA level named first.
    assert!(
        ["avx512", "avx2", "portable"]
            .iter()
            .any(|isa| out.contains(&format!("  generic variant: {isa} row-blocked"))),
        "{out}"
    );
    assert!(out.contains("code bytes"), "{out}");
}

#[test]
fn asm_is_x86_64_assembly() {
    let out = ok(&[
        "--mask",
        FIXTURE,
        "--pattern",
        "small",
        "--op",
        "spmm",
        "--batch",
        "8",
        "--emit",
        "asm",
    ]);
    assert!(out.contains("ret"), "{out}");
    assert!(
        out.contains("vfmadd") || out.contains("mulps") || out.contains("movups"),
        "{out}"
    );
}

#[test]
fn vcode_is_listed() {
    let out = ok(&[
        "--mask",
        FIXTURE,
        "--pattern",
        "small",
        "--op",
        "spmm",
        "--batch",
        "1",
        "--emit",
        "vcode",
    ]);
    assert!(out.contains("small.spmm.b1.vcode"), "{out}");
    // VCode is Cranelift's own listing: blocks and virtual-register-free machine instructions
    assert!(out.contains("block0"), "{out}");
    assert!(out.contains("ret"), "{out}");
    let asm = ok(&[
        "--mask",
        FIXTURE,
        "--pattern",
        "small",
        "--op",
        "spmm",
        "--batch",
        "1",
        "--emit",
        "asm",
    ]);
    assert_ne!(
        asm.replace(".s =====", ""),
        out.replace(".vcode =====", ""),
        "asm and vcode differ"
    );
}

#[test]
fn every_emit_kind_writes_files_under_out() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    ok(&[
        "--mask",
        FIXTURE,
        "--pattern",
        "small",
        "--op",
        "spmm",
        "--batch",
        "4",
        "--out",
        out_dir,
        "--no-measure",
        "--emit",
        "ir",
        "--emit",
        "clif",
        "--emit",
        "vcode",
        "--emit",
        "asm",
        "--emit",
        "rust",
        "--emit",
        "plan",
        "--emit",
        "stats",
    ]);
    for file in [
        "small.sir",
        "small.spmm.b4.clif",
        "small.spmm.b4.vcode",
        "small.spmm.b4.s",
        "small.rs",
        "small.plan.txt",
        "small.stats.txt",
    ] {
        let path = dir.path().join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!text.is_empty(), "{file} is empty");
    }
    let sir = std::fs::read_to_string(dir.path().join("small.sir")).unwrap();
    assert!(sir.contains("pattern small 4x6 nnz=7"), "{sir}");
    let opencl = ok(&[
        "--mask",
        FIXTURE,
        "--pattern",
        "small",
        "--backend",
        "opencl",
        "--emit",
        "opencl",
        "--op",
        "all",
    ]);
    assert!(opencl.contains("__kernel"), "{opencl}");
}

#[test]
fn reads_npy_and_safetensors_masks() {
    let npy = format!("{MASKS}/edge_7x96.npy");
    let out = ok(&["--mask", &npy, "--emit", "stats", "--op", "spmm"]);
    assert!(out.contains("rows 7  cols 96"), "{out}");
    assert!(out.contains("empty rows 1"), "{out}");
    let st = format!("{MASKS}/conv_4x2x3x3.safetensors");
    // A 4-D mask is a convolution: it needs its input size.
    let out = ok(&[
        "--mask",
        &st,
        "--tensor",
        "conv.mask",
        "--input",
        "5x5",
        "--emit",
        "ir",
    ]);
    assert!(out.contains("pattern conv 4x18"), "{out}");
    assert!(
        out.contains("kernel conv op=conv pattern=conv input=2x5x5 kernel=3 stride=1 padding=0"),
        "{out}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let st = format!("{MASKS}/conv_4x2x3x3.safetensors");
    let e = fails(&["--mask", &st, "--tensor", "fc9.mask"]);
    assert!(e.contains("fc9.mask") && e.contains("not found"), "{e}");
    let e = fails(&["--mask", "/nonexistent/mask.npy"]);
    assert!(
        e.contains("/nonexistent/mask.npy") && e.contains("no such file"),
        "{e}"
    );
    let garbage = format!("{MASKS}/garbage.npy");
    let e = fails(&["--mask", &garbage]);
    assert!(e.contains("garbage.npy") && e.contains("magic"), "{e}");
    let e = fails(&["--random", "30x40", "--density", "1.5"]);
    assert!(e.contains("outside (0, 1]"), "{e}");
    let e = fails(&["--random", "30x40", "--density", "0"]);
    assert!(e.contains("outside (0, 1]"), "{e}");
    let e = fails(&["--random", "30by40", "--density", "0.1"]);
    assert!(e.contains("ROWSxCOLS"), "{e}");
    let e = fails(&["--mask", FIXTURE]);
    assert!(
        e.contains("holds 2 patterns") && e.contains("--pattern"),
        "{e}"
    );
    let e = fails(&["--mask", FIXTURE, "--pattern", "nope"]);
    assert!(e.contains("no pattern \"nope\""), "{e}");
    let e = fails(&[
        "--random",
        "30x40",
        "--density",
        "0.1",
        "--strategy",
        "table",
    ]);
    assert!(e.contains("belongs to the opencl backend"), "{e}");
    let e = fails(&[
        "--random",
        "30x40",
        "--density",
        "0.1",
        "--batch",
        "8",
        "--ld",
        "4",
    ]);
    assert!(e.contains("--ld 4 is smaller than --batch 8"), "{e}");
    let e = fails(&[]);
    assert!(e.contains("no input"), "{e}");
}

#[test]
fn checkpoint_layers_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("epoch-001");
    std::fs::create_dir(&ckpt).unwrap();
    let pattern = sparse_ir::Pattern::random(5, 7, 0.4, 3).unwrap();
    let conv = sparse_ir::Pattern::random(4, 18, 0.4, 3).unwrap();
    sparse_ir::mask_io::write_mask_safetensors(
        ckpt.join("model.safetensors"),
        &[
            ("fc1.mask", &pattern, &[5, 7]),
            ("conv1.mask", &conv, &[4, 2, 3, 3]),
        ],
    )
    .unwrap();
    // A checkpoint folder holds both files (the runtime writes them together).
    std::fs::write(ckpt.join("state.json"), "{}").unwrap();
    std::fs::write(dir.path().join("latest"), "epoch-001\n").unwrap();
    let root = dir.path().to_str().unwrap();
    let out = ok(&[
        "--checkpoint",
        root,
        "--layer",
        "fc1",
        "--emit",
        "stats",
        "--op",
        "spmm",
    ]);
    assert!(out.contains("rows 5  cols 7"), "{out}");
    // A conv layer's 4-D mask is a convolution.
    let out = ok(&[
        "--checkpoint",
        root,
        "--layer",
        "conv1",
        "--input",
        "6x6",
        "--emit",
        "ir",
        "--op",
        "conv-grad",
    ]);
    assert!(
        out.contains("op=conv_grad pattern=conv1 input=2x6x6 kernel=3 stride=1 padding=0"),
        "{out}"
    );
    let e = fails(&["--checkpoint", root, "--layer", "conv1"]);
    assert!(e.contains("layer conv1 is a 4-D mask (4x2x3x3)"), "{e}");
    let e = fails(&["--checkpoint", root, "--layer", "fc2"]);
    assert!(e.contains("layer fc2") && e.contains("fc2.mask"), "{e}");
    let e = fails(&["--checkpoint", "/nonexistent", "--layer", "fc1"]);
    assert!(e.contains("not a checkpoint"), "{e}");
}

/// The arguments of the convolution the tests dump: 8 output channels, 4 input channels, a
/// 3x3 window over a 10x10 input, stride 2, padding 1 (an 8x5x5 output).
const CONV: [&str; 10] = [
    "--random",
    "8x4x3x3",
    "--density",
    "0.3",
    "--input",
    "10x10",
    "--stride",
    "2",
    "--padding",
    "1",
];

fn conv_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = CONV.to_vec();
    args.extend_from_slice(extra);
    args
}

/// The text of the one artefact printed to stdout, without its `;; ===== name =====` line.
fn only_artefact(out: &str) -> &str {
    let (head, text) = out.split_once('\n').unwrap();
    assert!(head.starts_with(";; ===== "), "{out}");
    assert!(!text.contains(";; ===== "), "one artefact: {out}");
    text
}

#[test]
fn conv_ir_parses_back_with_its_geometry() {
    let out = ok(&conv_args(&["--emit", "ir", "--batch", "4"]));
    let module =
        sparse_ir::text::parse(only_artefact(&out)).unwrap_or_else(|e| panic!("{e}\n{out}"));
    let pattern = module.pattern("random").expect("the pattern");
    assert_eq!((pattern.rows(), pattern.cols()), (8, 36));
    let want = sparse_ir::ConvGeometry {
        in_channels: 4,
        height: 10,
        width: 10,
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    let ops: Vec<String> = module
        .kernels()
        .iter()
        .map(|k| {
            assert_eq!(k.spec().geometry(), Some(&want), "{out}");
            assert_eq!(k.spec().batch(), sparse_ir::Dim::Fixed(4));
            k.spec().op().to_string()
        })
        .collect();
    assert_eq!(ops, ["conv", "conv_t", "conv_grad", "conv_dense_grad"]);
    assert!(
        out.contains("op=conv pattern=random input=4x10x10 kernel=3 stride=2 padding=1"),
        "{out}"
    );
    // The epilogue and one op.
    let out = ok(&conv_args(&[
        "--emit", "ir", "--op", "conv", "--bias", "--relu",
    ]));
    let module = sparse_ir::text::parse(only_artefact(&out)).unwrap();
    assert_eq!(module.kernels().len(), 1);
    assert_eq!(
        module.kernels()[0].spec().op(),
        sparse_ir::Op::Conv {
            bias: true,
            relu: true
        }
    );
}

#[test]
fn conv_plan_and_stats() {
    let out = ok(&conv_args(&["--emit", "plan", "--emit", "stats"]));
    let geometry =
        "convolution input=4x10x10 kernel=3 stride=2 padding=1: output 8x5x5, 400 input features, 200 output features";
    assert_eq!(out.matches(geometry).count(), 2, "plan and stats: {out}");
    for op in ["conv", "conv_t", "conv_grad", "conv_dense_grad"] {
        assert!(
            out.contains(&format!("\n{op} batch 100 ld 112: strategy ")),
            "{op}: {out}"
        );
    }
    assert!(
        out.contains("measured (every strategy, median of 21 runs): generic"),
        "{out}"
    );
    assert!(
        out.contains("jit n/a (not available for convolutions: "),
        "{out}"
    );
    assert!(out.contains("rows 8  cols 36"), "{out}");
    assert!(out.contains("live output channels"), "{out}");
    // The JIT bakes conv, conv_t and conv_grad; conv_dense_grad has no pattern to bake in.
    assert!(out.contains("jit conv batch 100: 2 functions"), "{out}");
    assert!(
        out.contains("jit conv_dense_grad batch 100: not available for convolutions: "),
        "{out}"
    );
    // The OpenCL planner and emitter.
    let out = ok(&conv_args(&[
        "--backend",
        "opencl",
        "--emit",
        "plan",
        "--emit",
        "stats",
        "--op",
        "conv-grad",
    ]));
    assert!(out.contains("conv_grad batch 100: csr ("), "{out}");
    assert!(out.contains("opencl conv_grad batch 100: csr ("), "{out}");
}

#[test]
fn conv_from_npy_every_emit_kind() {
    let dir = tempfile::tempdir().unwrap();
    let mask = dir.path().join("conv1.npy");
    let pattern = sparse_ir::Pattern::random(6, 2 * 3 * 3, 0.4, 5).unwrap();
    sparse_ir::mask_io::write_mask_npy(&mask, &pattern, &[6, 2, 3, 3]).unwrap();
    let mask = mask.to_str().unwrap();
    let out_dir = dir.path().join("out");
    let out_dir = out_dir.to_str().unwrap();
    ok(&[
        "--mask",
        mask,
        "--input",
        "7x9",
        "--padding",
        "1",
        "--batch",
        "3",
        "--op",
        "conv",
        "--out",
        out_dir,
        "--no-measure",
        "--emit",
        "ir",
        "--emit",
        "clif",
        "--emit",
        "vcode",
        "--emit",
        "asm",
        "--emit",
        "opencl",
        "--emit",
        "rust",
        "--emit",
        "plan",
        "--emit",
        "stats",
    ]);
    let read = |file: &str| {
        let path = dir.path().join("out").join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let sir = read("conv1.sir");
    assert!(sir.contains("pattern conv1 6x18"), "{sir}");
    assert!(
        sir.contains("kernel conv1 op=conv pattern=conv1 input=2x7x9 kernel=3 stride=1 padding=1 batch=3 ld=16"),
        "{sir}"
    );
    for file in [
        "conv1.conv.b3.clif",
        "conv1.conv.b3.vcode",
        "conv1.conv.b3.s",
    ] {
        // The JIT's code for the convolution, its layer and geometry in the header.
        let text = read(file);
        assert!(
            text.contains("input=2x7x9 kernel=3 stride=1 padding=1")
                && text.contains("code bytes")
                && !text.contains("not available"),
            "{file}: {text}"
        );
    }
    let rust = read("conv1.rs");
    assert!(rust.contains("not available for convolutions"), "{rust}");
    let cl = read("conv1.conv.b3.csr.cl");
    assert!(cl.contains("__kernel") && cl.contains("op conv"), "{cl}");
    assert!(read("conv1.plan.txt").contains("output 6x7x9"));
    assert!(read("conv1.stats.txt").contains("rows 6  cols 18"));
    // OpenCL strategies without convolution kernels say so instead of failing.
    let out = ok(&[
        "--mask",
        mask,
        "--input",
        "7x9",
        "--backend",
        "opencl",
        "--strategy",
        "table",
        "--op",
        "conv-t",
        "--emit",
        "opencl",
    ]);
    assert!(
        out.contains("// conv_t (table): not available for convolutions: "),
        "{out}"
    );
    // The dumped `.sir` reads back as a convolution, its geometry included.
    let sir_path = dir.path().join("out/conv1.sir");
    let out = ok(&[
        "--mask",
        sir_path.to_str().unwrap(),
        "--emit",
        "stats",
        "--op",
        "conv-t",
        "--no-measure",
    ]);
    assert!(
        out.contains("convolution input=2x7x9 kernel=3 stride=1 padding=1"),
        "{out}"
    );
}

#[test]
fn conv_bad_input_is_a_clear_error() {
    let conv = ["--random", "8x4x3x3", "--density", "0.3"];
    let with = |extra: &[&str]| {
        let mut args = conv.to_vec();
        args.extend_from_slice(extra);
        fails(&args)
    };
    let e = with(&[]);
    assert!(
        e.contains("4-D mask (8x4x3x3)") && e.contains("--input HxW"),
        "{e}"
    );
    let e = with(&["--input", "2x2"]);
    assert!(
        e.contains("a 3x3 window does not fit the 2x2 input with padding 0"),
        "{e}"
    );
    let e = with(&["--input", "10x10", "--stride", "0"]);
    assert!(e.contains("stride = 0 is outside"), "{e}");
    let e = with(&["--input", "10by10"]);
    assert!(e.contains("HEIGHTxWIDTH"), "{e}");
    let e = with(&["--input", "65536x65536"]);
    assert!(e.contains("more than 2^32 features"), "{e}");
    let e = with(&["--input", "10x10", "--op", "spmm"]);
    assert!(
        e.contains("--op spmm is a matrix op") && e.contains("conv-dense-grad"),
        "{e}"
    );
    let e = fails(&["--random", "30x40", "--density", "0.1", "--op", "conv-t"]);
    assert!(
        e.contains("--op conv-t is a convolution op") && e.contains("2-D mask (30x40)"),
        "{e}"
    );
    let e = fails(&["--random", "30x40", "--density", "0.1", "--input", "10x10"]);
    assert!(
        e.contains("--input 10x10 is for a convolution") && e.contains("2-D mask"),
        "{e}"
    );
    let e = fails(&["--mask", FIXTURE, "--pattern", "small", "--input", "4x4"]);
    assert!(e.contains("is a 2-D mask (4x6)"), "{e}");
    let e = fails(&["--random", "8x4x3x3", "--density", "0.3", "--stride", "2"]);
    assert!(e.contains("--input"), "{e}");
    let e = fails(&["--random", "8x4x3x5", "--density", "0.3", "--input", "9x9"]);
    assert!(e.contains("window must be square"), "{e}");
    let e = fails(&["--random", "8x4x3", "--density", "0.3"]);
    assert!(e.contains("OUTxINxKxK"), "{e}");
    // Declared sizes are checked before anything is allocated.
    let e = fails_within_memory(&[
        "--random",
        "100000x100000x3x3",
        "--density",
        "0.1",
        "--input",
        "9x9",
    ]);
    assert!(
        e.contains("about 9000000000 nonzeros, more than the 4294967295 a pattern holds"),
        "{e}"
    );
    let e = fails_within_memory(&[
        "--random",
        "8x4x3x3",
        "--density",
        "0.3",
        "--input",
        "1024x1024",
        "--op",
        "conv",
        "--emit",
        "plan",
    ]);
    assert!(
        e.contains("--batch 100 (ld 112): timing conv (input=4x1024x1024")
            && e.contains("needs 24.4 GiB"),
        "{e}"
    );
    // Masks of other ranks and shapes.
    let dir = tempfile::tempdir().unwrap();
    let three = dir.path().join("three.npy");
    let array = sparse_ir::NdArray::new(
        vec![2, 3, 4],
        sparse_ir::mask_io::ArrayData::U8(vec![1; 24]),
    )
    .unwrap();
    sparse_ir::mask_io::write_npy(&three, &array).unwrap();
    let e = fails(&["--mask", three.to_str().unwrap(), "--input", "8x8"]);
    assert!(e.contains("three.npy") && e.contains("3-D"), "{e}");
    let oblong = dir.path().join("oblong.npy");
    let array = sparse_ir::NdArray::new(
        vec![2, 2, 3, 2],
        sparse_ir::mask_io::ArrayData::U8(vec![1; 24]),
    )
    .unwrap();
    sparse_ir::mask_io::write_npy(&oblong, &array).unwrap();
    let e = fails(&["--mask", oblong.to_str().unwrap(), "--input", "8x8"]);
    assert!(
        e.contains("oblong.npy") && e.contains("window must be square"),
        "{e}"
    );
}

#[test]
fn sizes_are_checked_against_the_machines_memory() {
    // Both aborted on a failed allocation once; now clear errors, exit code 1.
    let e = fails_within_memory(&[
        "--random",
        "100000x100000",
        "--density",
        "0.9",
        "--emit",
        "stats",
        "--no-measure",
    ]);
    assert!(
        e.contains("--random 100000x100000 --density 0.9: about 9000000000 nonzeros"),
        "{e}"
    );
    let e = fails_within_memory(&[
        "--random",
        "300x784",
        "--density",
        "0.05",
        "--batch",
        "100000000",
    ]);
    assert!(
        e.contains("--batch 100000000 (ld 100000000): timing spmm")
            && e.contains("on a 300x784 pattern needs 695.9 GiB, more than the 8.0 GiB one")
            && e.contains("16.0 GiB that SPARSEJIT_MEMORY_BYTES sets")
            && e.contains("use --no-measure"),
        "{e}"
    );
    // A pattern whose nonzeros fit u32 but not the memory.
    let e = fails_within_memory(&["--random", "100000x100000", "--density", "0.1"]);
    assert!(
        e.contains("--random 100000x100000 --density 0.1: the pattern (about 1000000000 nonzeros)")
            && e.contains("needs 11.2 GiB, more than the 8.0 GiB"),
        "{e}"
    );
}

#[test]
fn sparse_random_patterns_draw_in_time_of_their_nonzeros() {
    // 10^12 entries at 10^-9: about a thousand nonzeros, drawn without visiting every entry.
    let start = std::time::Instant::now();
    let out = ok(&[
        "--random",
        "1000000x1000000",
        "--density",
        "1e-9",
        "--emit",
        "stats",
        "--no-measure",
    ]);
    assert!(out.contains("rows 1000000  cols 1000000  nnz "), "{out}");
    assert!(
        start.elapsed().as_secs_f64() < 30.0,
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn rows_too_long_for_one_jit_function_are_left_to_the_generic_kernels() {
    // One 400,000-nonzero row: compiling it took 16 s and 2.9 GB; the JIT refuses it now,
    // and `spmm_t` (400,000 rows of one nonzero) still compiles.
    let out = ok(&["--random", "1x400000", "--density", "1", "--emit", "stats"]);
    for op in ["spmm", "sddmm"] {
        assert!(
            out.contains(&format!(
                "jit {op} batch 100: layer random: strategy jit cannot run {op}: a row of \
                 400000 nonzeros is more than the 8192 one JIT function compiles"
            )),
            "{out}"
        );
    }
    assert!(out.contains("jit spmm_t batch 100: 100 functions"), "{out}");
    let out = ok(&[
        "--random",
        "1x400000",
        "--density",
        "1",
        "--emit",
        "plan",
        "--no-measure",
        "--batch",
        "4",
    ]);
    assert!(
        out.contains("jit not considered: a row has more than the 8192 nonzeros"),
        "{out}"
    );
}
