//! Command-line tests of kernel-dump: every `--emit` kind works, and bad input gives a clear
//! error naming the problem.

use std::process::{Command, Output};

fn kernel_dump(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kernel-dump"))
        .args(args)
        .output()
        .expect("kernel-dump runs")
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
    let out = ok(&["--mask", &st, "--tensor", "conv.mask", "--emit", "ir"]);
    assert!(out.contains("pattern conv 4x18"), "{out}");
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
    sparse_ir::mask_io::write_mask_safetensors(
        ckpt.join("model.safetensors"),
        &[("fc1.mask", &pattern, &[5, 7])],
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
    let e = fails(&["--checkpoint", root, "--layer", "fc2"]);
    assert!(e.contains("layer fc2") && e.contains("fc2.mask"), "{e}");
    let e = fails(&["--checkpoint", "/nonexistent", "--layer", "fc1"]);
    assert!(e.contains("not a checkpoint"), "{e}");
}
