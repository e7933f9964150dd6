//! Tests of the `.sir` text format: golden files, round-trip properties and parse errors.
//!
//! Golden files live in `tests/golden/*.sir`; each is the printer's output for a module built
//! in [`golden_modules`], in the spirit of Cranelift's filetests. When the printer changes on
//! purpose, rewrite them with
//!
//! ```text
//! BLESS=1 cargo test -p sparse-ir --test text
//! ```
//!
//! and review the diff. Without `BLESS`, a difference (or a missing file) fails the test.

use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;
use sparse_ir::text::{self, Module, ParseError, ParseErrorKind};
use sparse_ir::{Dim, Op, Pattern, PatternError, VerifyError};

/// The 3 × 4 example used across sparse-ir: row 0: 1 3; row 1: empty; row 2: 0 1 2.
fn example() -> Pattern {
    Pattern::from_csr(3, 4, vec![0, 2, 2, 5], vec![1, 3, 0, 1, 2]).unwrap()
}

fn golden_modules() -> Vec<(&'static str, Module)> {
    let mut out = Vec::new();

    // The example with one kernel per op, fixed and run-time dims.
    let mut m = Module::new();
    m.add_pattern("fc1", example()).unwrap();
    let dims = [
        (Dim::Fixed(100), Dim::Fixed(112)),
        (Dim::Fixed(1), Dim::Fixed(1)),
        (Dim::Fixed(3), Dim::Any),
        (Dim::Any, Dim::Any),
        (Dim::Any, Dim::Fixed(16)),
        (Dim::Fixed(17), Dim::Fixed(32)),
        (Dim::Fixed(128), Dim::Fixed(128)),
    ];
    for (op, (batch, ld)) in Op::ALL.into_iter().zip(dims) {
        m.add_kernel("fc1", op, "fc1", batch, ld).unwrap();
    }
    out.push(("example", m));

    // Convolution kernels: every conv op on a 2-channel 3×3 pattern.
    let mut m = Module::new();
    m.add_pattern(
        "conv2",
        Pattern::from_coo(2, 18, &[(0, 0), (0, 13), (1, 17)]).unwrap(),
    )
    .unwrap();
    let geometry = sparse_ir::ConvGeometry {
        in_channels: 2,
        height: 12,
        width: 11,
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    for (op, (batch, ld)) in Op::CONV_ALL.into_iter().zip(dims) {
        m.add_conv_kernel("conv2", op, "conv2", geometry, batch, ld)
            .unwrap();
    }
    out.push(("conv", m));

    // Edge shapes: no rows, no columns, all-zero, one nonzero, a full row next to empty ones.
    let mut m = Module::new();
    m.add_pattern("empty0x0", Pattern::empty(0, 0).unwrap())
        .unwrap();
    m.add_pattern("no_rows", Pattern::empty(0, 5).unwrap())
        .unwrap();
    m.add_pattern("no_cols", Pattern::empty(4, 0).unwrap())
        .unwrap();
    m.add_pattern("all_zero", Pattern::empty(3, 3).unwrap())
        .unwrap();
    m.add_pattern("single", Pattern::from_coo(1, 1, &[(0, 0)]).unwrap())
        .unwrap();
    m.add_pattern(
        "full_row",
        Pattern::from_coo(3, 5, &[(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]).unwrap(),
    )
    .unwrap();
    m.add_pattern("dense", Pattern::dense(2, 3).unwrap())
        .unwrap();
    m.add_kernel(
        "layer.with-dots_1",
        Op::SPMM,
        "all_zero",
        Dim::Any,
        Dim::Any,
    )
    .unwrap();
    out.push(("edge", m));

    // An odd-sized layer: 7 × 96 with a deterministic scatter, and its three training kernels.
    let entries: Vec<(usize, usize)> = (0..7)
        .flat_map(|r| (0..96).map(move |c| (r, c)))
        .filter(|&(r, c)| (r * 31 + c * 17 + r * c * 5) % 7 == 0 && r != 4)
        .collect();
    let mut m = Module::new();
    m.add_pattern("fc_odd", Pattern::from_coo(7, 96, &entries).unwrap())
        .unwrap();
    for op in [
        Op::Spmm {
            bias: true,
            relu: true,
        },
        Op::SpmmT,
        Op::Sddmm,
    ] {
        m.add_kernel("fc_odd", op, "fc_odd", Dim::Fixed(17), Dim::Fixed(32))
            .unwrap();
    }
    out.push(("odd", m));
    out
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

#[test]
fn golden_files() {
    let bless = std::env::var_os("BLESS").is_some_and(|v| !v.is_empty() && v != "0");
    let mut failures = Vec::new();
    for (name, module) in golden_modules() {
        let path = golden_dir().join(format!("{name}.sir"));
        let printed = text::print(&module);
        if bless {
            std::fs::create_dir_all(golden_dir()).unwrap();
            std::fs::write(&path, &printed).unwrap();
        }
        let stored = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!(
                    "{}: {e} (run with BLESS=1 to create it)",
                    path.display()
                ));
                continue;
            }
        };
        if stored != printed {
            failures.push(format!(
                "{}: the printer's output differs (run with BLESS=1 to rewrite and review the diff)\n--- stored\n{stored}\n--- printed\n{printed}",
                path.display()
            ));
            continue;
        }
        // And the golden text parses back to the module it was printed from.
        let parsed = text::parse(&stored).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(parsed, module, "{}", path.display());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn golden_example_reads_as_documented() {
    // Pin the exact canonical form once, independent of the golden files.
    let mut m = Module::new();
    m.add_pattern("fc1", example()).unwrap();
    m.add_kernel(
        "fc1",
        Op::Spmm {
            bias: true,
            relu: true,
        },
        "fc1",
        Dim::Fixed(100),
        Dim::Fixed(112),
    )
    .unwrap();
    m.add_kernel("fc1", Op::SpmmT, "fc1", Dim::Any, Dim::Any)
        .unwrap();
    let want = "sparsejit-ir 1

pattern fc1 3x4 nnz=5
  0: 1 3
  1:
  2: 0 1 2

kernel fc1 op=spmm(bias,relu) pattern=fc1 batch=100 ld=112
kernel fc1 op=spmm_t pattern=fc1 batch=any ld=any
";
    assert_eq!(m.to_string(), want);
    let parsed: Module = want.parse().unwrap();
    assert_eq!(parsed, m);
    // Kernels share the module's pattern.
    let fc1 = parsed.pattern("fc1").unwrap();
    for k in parsed.kernels() {
        assert_eq!(k.pattern_name(), "fc1");
        assert!(Arc::ptr_eq(k.spec().pattern(), fc1));
    }
    assert_eq!(text::print(&Module::new()), "sparsejit-ir 1\n");
    assert_eq!(text::parse("sparsejit-ir 1\n").unwrap(), Module::new());
}

#[test]
fn print_pattern_is_a_complete_file() {
    let s = text::print_pattern("fc1", &example());
    assert_eq!(
        s,
        "sparsejit-ir 1\n\npattern fc1 3x4 nnz=5\n  0: 1 3\n  1:\n  2: 0 1 2\n"
    );
    let m = text::parse(&s).unwrap();
    assert_eq!(m.patterns().len(), 1);
    assert_eq!(**m.pattern("fc1").unwrap(), example());
    assert!(m.kernels().is_empty());
}

#[test]
fn lenet_sized_layer_round_trips() {
    // 300 × 784 at ~5 % density, the largest LeNet-300-100 layer.
    let p = Pattern::random(300, 784, 0.05, 42).unwrap();
    let mut m = Module::new();
    m.add_pattern("fc1", p.clone()).unwrap();
    m.add_kernel("fc1", Op::SPMM, "fc1", Dim::Fixed(100), Dim::Fixed(112))
        .unwrap();
    let s = m.to_string();
    assert!(s.contains(&format!("pattern fc1 300x784 nnz={}\n", p.nnz())));
    assert_eq!(s.lines().count(), 1 + 1 + 1 + 300 + 1 + 1);
    let back = text::parse(&s).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.pattern("fc1").unwrap().hash(), p.hash());
    assert_eq!(back.to_string(), s);
}

#[test]
fn comments_whitespace_and_crlf_are_ignored() {
    let noisy = "# a leading comment\r\n\
                 \r\n\
                 sparsejit-ir\t1   ; version\r\n\
                 pattern fc1 3x4 nnz=5 # header\r\n\
                 0: 1 3\r\n\
                 ; a comment between rows\r\n\
                 \t1:   ;empty row\r\n\
                 \x20\x20\x20\x202:0\t1 2\r\n\
                 kernel fc1 ld=112 batch=100 pattern=fc1 op=spmm(bias,relu)#x\r\n";
    let m = text::parse(noisy).unwrap();
    assert_eq!(**m.pattern("fc1").unwrap(), example());
    let k = m.kernels()[0].spec();
    assert_eq!(
        k.op(),
        Op::Spmm {
            bias: true,
            relu: true
        }
    );
    assert_eq!((k.batch(), k.ld()), (Dim::Fixed(100), Dim::Fixed(112)));
    // Printing gives the canonical text, which parses to the same module.
    let canonical = m.to_string();
    assert!(!canonical.contains('#') && !canonical.contains('\r'));
    assert_eq!(text::parse(&canonical).unwrap(), m);
}

// ---------------------------------------------------------------------------------------------
// Round-trip properties

fn arb_pattern() -> impl Strategy<Value = Pattern> {
    (0usize..9, 0usize..9)
        .prop_flat_map(|(rows, cols)| {
            (
                Just(rows),
                Just(cols),
                proptest::collection::vec(any::<bool>(), rows * cols),
            )
        })
        .prop_map(|(rows, cols, mask)| Pattern::from_dense_mask(rows, cols, &mask).unwrap())
}

fn arb_name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_.-]{0,7}"
}

fn arb_dim() -> impl Strategy<Value = Dim> {
    prop_oneof![Just(Dim::Any), (1usize..200).prop_map(Dim::Fixed)]
}

fn arb_op() -> impl Strategy<Value = Op> {
    (0..Op::ALL.len()).prop_map(|i| Op::ALL[i])
}

/// A random kernel: (layer, op, index of the pattern, batch, ld).
type KernelDraw = (String, Op, usize, Dim, Dim);

fn arb_module() -> impl Strategy<Value = Module> {
    let patterns = proptest::collection::vec((arb_name(), arb_pattern()), 0..5);
    let kernels = proptest::collection::vec(
        (arb_name(), arb_op(), 0usize..100, arb_dim(), arb_dim()),
        0..8,
    );
    (patterns, kernels).prop_map(|(patterns, kernels): (_, Vec<KernelDraw>)| {
        let mut m = Module::new();
        let mut names = Vec::new();
        for (name, p) in patterns {
            // Duplicate names are rejected; keep the first.
            if m.add_pattern(name.clone(), p).is_ok() {
                names.push(name);
            }
        }
        if !names.is_empty() {
            for (layer, op, pick, batch, ld) in kernels {
                let ld = match (batch, ld) {
                    // Keep the spec valid: ld covers the batch.
                    (Dim::Fixed(b), Dim::Fixed(l)) => Dim::Fixed(b.max(l)),
                    (_, ld) => ld,
                };
                m.add_kernel(layer, op, &names[pick % names.len()], batch, ld)
                    .unwrap();
            }
        }
        m
    })
}

/// Adds comments, blank lines, extra whitespace and CRLF line ends to canonical text, none of
/// which changes its meaning.
fn decorate(canonical: &str, seed: u64) -> String {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = String::from("; leading comment\n");
    for line in canonical.lines() {
        let r = next();
        if r % 5 == 0 {
            out.push_str("   # between lines\n\n");
        }
        let indent = ["", " ", "\t", "    "][(r >> 8) as usize % 4];
        let sep = [" ", "  ", "\t", " \t "][(r >> 16) as usize % 4];
        let words: Vec<&str> = line.split_whitespace().collect();
        out.push_str(indent);
        out.push_str(&words.join(sep));
        if (r >> 24) % 3 == 0 {
            out.push_str(" ; trailing comment");
        }
        out.push_str(if (r >> 32) % 2 == 0 { "\n" } else { "\r\n" });
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn print_then_parse_is_identity(m in arb_module()) {
        let s = text::print(&m);
        let back = text::parse(&s).map_err(|e| TestCaseError::fail(format!("{e}\n{s}")))?;
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(text::print(&back), s);
    }

    #[test]
    fn decorated_text_means_the_same(m in arb_module(), seed in any::<u64>()) {
        let s = text::print(&m);
        let noisy = decorate(&s, seed);
        let back = text::parse(&noisy).map_err(|e| TestCaseError::fail(format!("{e}\n{noisy}")))?;
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(text::print(&back), s);
    }

    #[test]
    fn parser_never_panics_on_mutations(m in arb_module(), pos in any::<usize>(), byte in 0u8..128) {
        // Replace one character of valid text: the parser gives a module or an error, never a
        // panic, and whatever it accepts prints and parses back to itself.
        let mut bytes = text::print(&m).into_bytes();
        let i = pos % bytes.len();
        bytes[i] = byte;
        let s = String::from_utf8(bytes).unwrap();
        if let Ok(parsed) = text::parse(&s) {
            prop_assert_eq!(text::parse(&text::print(&parsed)).unwrap(), parsed);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parse errors: line, column and message

const HEAD: &str = "sparsejit-ir 1\n";

fn parse_err(text: &str) -> ParseError {
    match text::parse(text) {
        Ok(m) => panic!("expected an error, parsed {m:?} from\n{text}"),
        Err(e) => e,
    }
}

/// Asserts the error's position and that its message contains `needle`.
#[track_caller]
fn assert_err(text: &str, line: usize, column: usize, needle: &str) -> ParseError {
    let e = parse_err(text);
    let msg = e.to_string();
    assert_eq!(
        (e.line, e.column),
        (line, column),
        "position of {msg:?} in\n{text}"
    );
    assert!(
        msg.starts_with(&format!("{line}:{column}: ")),
        "{msg:?} should start with line:column"
    );
    assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
    e
}

#[test]
fn version_errors() {
    let e = assert_err("", 1, 1, "expected the version line `sparsejit-ir 1`");
    assert!(e.to_string().ends_with("found end of input"), "{e}");
    assert_err("; only a comment\n\n", 3, 1, "found end of input");
    assert_err(
        "pattern fc1 1x1 nnz=0\n  0:\n",
        1,
        1,
        "expected the version line `sparsejit-ir 1`, found \"pattern\"",
    );
    let e = assert_err(
        "sparsejit-ir 2\n",
        1,
        14,
        "unsupported format version 2 (this parser reads version 1)",
    );
    assert_eq!(e.kind, ParseErrorKind::UnsupportedVersion { version: 2 });
    assert_err(
        "sparsejit-ir\n",
        1,
        14,
        "expected the format version number, found end of line",
    );
    assert_err(
        "sparsejit-ir one\n",
        1,
        14,
        "bad number for format version: \"one\"",
    );
    assert_err(
        "sparsejit-ir 1 extra\n",
        1,
        16,
        "trailing garbage \"extra\" after the end of the version line",
    );
    assert_err("  sparsejit-IR 1\n", 1, 3, "found \"sparsejit-IR\"");
}

#[test]
fn unknown_keyword() {
    let e = assert_err(
        &format!("{HEAD}\npatern fc1 1x1 nnz=0\n"),
        3,
        1,
        "unknown keyword \"patern\" (expected `pattern` or `kernel`)",
    );
    assert!(matches!(e.kind, ParseErrorKind::UnknownKeyword { .. }));
    assert_err(
        &format!("{HEAD}sparsejit-ir 1\n"),
        2,
        1,
        "unknown keyword \"sparsejit-ir\"",
    );
    // A keyword is case-sensitive and must stand alone.
    assert_err(
        &format!("{HEAD}Pattern a 0x0 nnz=0\n"),
        2,
        1,
        "unknown keyword \"Pattern\"",
    );
}

#[test]
fn bad_numbers() {
    assert_err(
        &format!("{HEAD}pattern a 3ax4 nnz=0\n"),
        2,
        11,
        "bad number for rows: \"3a\" (expected decimal digits)",
    );
    assert_err(
        &format!("{HEAD}pattern a 3x nnz=0\n"),
        2,
        13,
        "bad number for cols: \"\" (expected decimal digits)",
    );
    assert_err(
        &format!("{HEAD}pattern a 1x-4 nnz=0\n"),
        2,
        13,
        "bad number for cols: \"-4\"",
    );
    assert_err(
        &format!("{HEAD}pattern a 1x4 nnz=+1\n"),
        2,
        19,
        "bad number for nnz: \"+1\" (expected decimal digits)",
    );
    assert_err(
        &format!("{HEAD}pattern a 1x4 nnz=99999999999999999999999\n"),
        2,
        19,
        "bad number for nnz: \"99999999999999999999999\" (too large)",
    );
    assert_err(
        &format!("{HEAD}pattern a 2x4 nnz=2\n  0: 1 two\n"),
        3,
        8,
        "bad number for column index: \"two\"",
    );
    assert_err(
        &format!("{HEAD}pattern a 2x4 nnz=2\n  0: 1 4294967296\n"),
        3,
        8,
        "bad number for column index: \"4294967296\" (too large)",
    );
    assert_err(
        &format!("{HEAD}pattern a 2x4 nnz=0\n  0x: 1\n"),
        3,
        3,
        "bad number for row number: \"0x\"",
    );
}

#[test]
fn header_syntax() {
    assert_err(
        &format!("{HEAD}pattern\n"),
        2,
        9,
        "expected a pattern name, found end of line",
    );
    assert_err(
        &format!("{HEAD}pattern a\n"),
        2,
        11,
        "expected the shape ROWSxCOLS, found end of line",
    );
    assert_err(
        &format!("{HEAD}pattern a 3X4 nnz=0\n"),
        2,
        11,
        "expected the shape ROWSxCOLS, found \"3X4\"",
    );
    assert_err(
        &format!("{HEAD}pattern a 3x4\n"),
        2,
        15,
        "expected `nnz=N`, found end of line",
    );
    assert_err(
        &format!("{HEAD}pattern a 3x4 nz=0\n"),
        2,
        15,
        "expected `nnz=N`, found \"nz=0\"",
    );
    assert_err(
        &format!("{HEAD}pattern a 0x4 nnz=0 more\n"),
        2,
        21,
        "trailing garbage \"more\" after the end of the pattern header line",
    );
    let e = assert_err(
        &format!("{HEAD}pattern 1st 0x0 nnz=0\n"),
        2,
        9,
        "invalid pattern name \"1st\"",
    );
    assert_eq!(e.kind, ParseErrorKind::PatternName { name: "1st".into() });
    let e = assert_err(
        &format!("{HEAD}pattern a 4294967296x1 nnz=0\n"),
        2,
        11,
        "pattern a: invariant `size`: rows = 4294967296 does not fit in u32",
    );
    assert!(matches!(
        e.kind,
        ParseErrorKind::InvalidPattern {
            source: PatternError::Invalid(VerifyError::Size { what: "rows", .. }),
            ..
        }
    ));
}

#[test]
fn nnz_mismatch() {
    let e = assert_err(
        &format!("{HEAD}pattern fc1 3x4 nnz=6\n  0: 1 3\n  1:\n  2: 0 1 2\n"),
        2,
        17,
        "pattern fc1: header says nnz=6 but its rows hold 5 column indices",
    );
    assert_eq!(
        e.kind,
        ParseErrorKind::NnzMismatch {
            pattern: "fc1".into(),
            header: 6,
            actual: 5
        }
    );
    // Also for a pattern without rows.
    assert_err(
        &format!("{HEAD}pattern z 0x4 nnz=1\n"),
        2,
        15,
        "header says nnz=1 but its rows hold 0",
    );
}

#[test]
fn rows_out_of_order_or_missing() {
    // Row 1 skipped.
    let e = assert_err(
        &format!("{HEAD}pattern fc1 3x4 nnz=5\n  0: 1 3\n  2: 0 1 2\n"),
        4,
        3,
        "pattern fc1: expected row 1, found row 2 (rows are listed in order, each once)",
    );
    assert_eq!(
        e.kind,
        ParseErrorKind::RowOutOfOrder {
            pattern: "fc1".into(),
            expected: 1,
            found: 2
        }
    );
    // Row 0 repeated.
    assert_err(
        &format!("{HEAD}pattern fc1 3x4 nnz=5\n  0: 1 3\n  0: 1 3\n"),
        4,
        3,
        "expected row 1, found row 0",
    );
    // Not starting at 0.
    assert_err(
        &format!("{HEAD}pattern p 2x2 nnz=0\n1:\n"),
        3,
        1,
        "expected row 0, found row 1",
    );
    // The pattern ends early: at the next keyword, and at the end of input.
    let e = assert_err(
        &format!("{HEAD}pattern fc1 3x4 nnz=5\n  0: 1 3\n  1:\nkernel fc1 op=spmm pattern=fc1 batch=1 ld=1\n"),
        5,
        1,
        "pattern fc1 declares 3 rows but lists only 2; found \"kernel\" where row 2 should be",
    );
    assert!(matches!(
        e.kind,
        ParseErrorKind::MissingRows {
            rows: 3,
            listed: 2,
            ..
        }
    ));
    assert_err(
        &format!("{HEAD}pattern fc1 3x4 nnz=5\n  0: 1 3\n  1:\n"),
        5,
        1,
        "pattern fc1 declares 3 rows but lists only 2; found end of input where row 2 should be",
    );
    // Without a final newline the end of input is just past the last character.
    assert_err(
        &format!("{HEAD}pattern fc1 3x4 nnz=5\n  0: 1 3"),
        3,
        9,
        "found end of input",
    );
    // More rows than declared.
    let e = assert_err(
        &format!("{HEAD}pattern p 1x2 nnz=1\n  0: 1\n  1: 0\n"),
        4,
        3,
        "row line \"1:\" outside a pattern",
    );
    assert!(matches!(e.kind, ParseErrorKind::RowOutsidePattern { .. }));
    assert_err(&format!("{HEAD}0: 1\n"), 2, 1, "outside a pattern");
    // A row label without its colon.
    assert_err(
        &format!("{HEAD}pattern p 1x2 nnz=1\n  0 1\n"),
        3,
        4,
        "expected `:` after the row number, found \"1\"",
    );
}

#[test]
fn column_errors_wrap_the_verifier() {
    let e = assert_err(
        &format!("{HEAD}pattern fc1 2x4 nnz=3\n  0: 1 3\n  1: 4\n"),
        4,
        6,
        "pattern fc1: invariant `col_in_range`: row 1, index 2: column 4 is out of range for 4 columns",
    );
    assert_eq!(
        e.kind,
        ParseErrorKind::InvalidPattern {
            pattern: "fc1".into(),
            source: PatternError::Invalid(VerifyError::ColOutOfRange {
                row: 1,
                index: 2,
                col: 4,
                cols: 4
            })
        }
    );
    let e = assert_err(
        &format!("{HEAD}pattern fc1 2x4 nnz=3\n  0: 1\n  1: 3 2\n"),
        4,
        8,
        "invariant `col_sorted_unique`: row 1, index 2: column 2 follows column 3 (unsorted)",
    );
    assert!(matches!(
        e.kind,
        ParseErrorKind::InvalidPattern {
            source: PatternError::Invalid(VerifyError::ColNotSortedUnique { .. }),
            ..
        }
    ));
    assert_err(
        &format!("{HEAD}pattern fc1 2x4 nnz=3\n  0: 1 1\n  1: 3\n"),
        3,
        8,
        "row 0, index 1: column 1 follows column 1 (duplicate)",
    );
    // A column in a zero-column pattern.
    assert_err(
        &format!("{HEAD}pattern q 1x0 nnz=1\n0: 0\n"),
        3,
        4,
        "column 0 is out of range for 0 columns",
    );
    // The column of the first token after the colon when written without a space.
    assert_err(
        &format!("{HEAD}pattern q 1x2 nnz=1\n0:7\n"),
        3,
        3,
        "column 7 is out of range",
    );
}

#[test]
fn duplicate_pattern() {
    let e = assert_err(
        &format!("{HEAD}pattern a 0x1 nnz=0\n; another\npattern a 1x1 nnz=0\n  0:\n"),
        4,
        9,
        "duplicate pattern name \"a\" (first defined on line 2)",
    );
    assert_eq!(
        e.kind,
        ParseErrorKind::DuplicatePattern {
            name: "a".into(),
            first_line: 2
        }
    );
}

#[test]
fn kernel_errors() {
    let p = format!("{HEAD}pattern fc1 1x1 nnz=1\n  0: 0\n");
    let k = |line: &str| format!("{p}{line}\n");
    // Unknown pattern, and one defined only below the kernel.
    let e = assert_err(
        &k("kernel fc1 op=spmm pattern=fc2 batch=1 ld=1"),
        4,
        28,
        "unknown pattern \"fc2\" (a kernel's pattern must be defined above it)",
    );
    assert_eq!(
        e.kind,
        ParseErrorKind::UnknownPattern { name: "fc2".into() }
    );
    assert_err(
        &format!("{HEAD}kernel l op=spmm pattern=late batch=any ld=any\npattern late 0x0 nnz=0\n"),
        2,
        26,
        "unknown pattern \"late\"",
    );
    assert_err(
        &k("kernel"),
        4,
        8,
        "expected a layer name, found end of line",
    );
    assert_err(
        &k("kernel op=spmm pattern=fc1 batch=1 ld=1"),
        4,
        8,
        "expected a layer name, found \"op=spmm\"",
    );
    assert_err(
        &k("kernel fc1 op=spmm pattern=fc1 batch=1 ld=1 strategy=jit"),
        4,
        45,
        "unknown kernel attribute \"strategy\" (expected op, pattern, batch, ld, or for a convolution input, kernel, stride, padding)",
    );
    assert_err(
        &k("kernel fc1 op=spmm pattern=fc1 batch=1 op=sddmm ld=1"),
        4,
        40,
        "kernel attribute `op` given twice",
    );
    assert_err(
        &k("kernel fc1 op=spmm pattern=fc1 batch=1"),
        4,
        40,
        "kernel attribute `ld=` missing",
    );
    assert_err(
        &k("kernel fc1 pattern=fc1 batch=1 ld=1"),
        4,
        37,
        "kernel attribute `op=` missing",
    );
    assert_err(
        &k("kernel fc1 op=spmm pattern=fc1 batch=1 ld=1 junk"),
        4,
        45,
        "expected an attribute KEY=VALUE, found \"junk\"",
    );
    let e = assert_err(
        &k("kernel fc1 op=gemm pattern=fc1 batch=1 ld=1"),
        4,
        15,
        "unknown op \"gemm\"",
    );
    assert!(matches!(e.kind, ParseErrorKind::BadOp { .. }));
    assert_err(
        &k("kernel fc1 op=spmm(bias,bias) pattern=fc1 batch=1 ld=1"),
        4,
        15,
        "unknown or repeated epilogue \"bias\"",
    );
    assert_err(
        &k("kernel fc1 op=spmm pattern=fc1 batch=lots ld=1"),
        4,
        38,
        "batch: expected a whole number or `any`, got \"lots\"",
    );
    assert_err(
        &k("kernel fc1 op=spmm pattern=fc1 batch=1 ld="),
        4,
        43,
        "ld: expected a whole number or `any`, got \"\"",
    );
    // Spec invariants from KernelSpec::new, at the offending value.
    let e = assert_err(
        &k("kernel fc1 op=spmm pattern=fc1 batch=100 ld=64"),
        4,
        45,
        "kernel \"fc1\": invariant `ld_covers_batch`: layer fc1: ld = 64 is smaller than batch = 100",
    );
    assert!(matches!(
        e.kind,
        ParseErrorKind::InvalidKernel {
            source: VerifyError::LdTooSmall {
                ld: 64,
                batch: 100,
                ..
            },
            ..
        }
    ));
    assert_err(
        &k("kernel fc1 op=spmm pattern=fc1 batch=any ld=0"),
        4,
        45,
        "ld = 0 is smaller than batch = 1",
    );
    assert_err(
        &k("kernel fc1 op=spmm pattern=fc1 batch=0 ld=1"),
        4,
        38,
        "invariant `batch_positive`",
    );
    assert_err(
        &k("kernel 9fc op=spmm pattern=fc1 batch=1 ld=1"),
        4,
        8,
        "invariant `layer_name`",
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    // "é" is two bytes but one column.
    assert_err(
        &format!("{HEAD}pattern a 0x0 nnz=0 ; é\nkernel é op=spmm pattern=a batch=1 ld=1 x\n"),
        3,
        41,
        "expected an attribute KEY=VALUE, found \"x\"",
    );
    assert_err(
        &format!("{HEAD}pattern é 0x0 nnz=0\n"),
        2,
        9,
        "invalid pattern name \"é\"",
    );
    assert_err(
        &format!("{HEAD}pattern a é nnz=0\n"),
        2,
        11,
        "expected the shape ROWSxCOLS",
    );
}

#[test]
fn conv_kernel_errors() {
    // a 2-channel 3×3 pattern (18 columns)
    let p = format!("{HEAD}pattern c 2x18 nnz=1\n  0: 4\n  1:\n");
    let k = |line: &str| format!("{p}{line}\n");
    let col = |line: &str, at: &str| line.find(at).unwrap() + 1;
    let good =
        "kernel c op=conv pattern=c input=2x8x8 kernel=3 stride=1 padding=1 batch=any ld=any";
    assert!(text::parse(&k(good)).is_ok());
    assert_err(
        &k("kernel c op=conv pattern=c batch=any ld=any"),
        5,
        col("kernel c op=conv pattern=c batch=any ld=any", "op=") + 3,
        "kernel \"c\": invariant `conv_op_geometry`: layer c: conv needs a convolution geometry",
    );
    assert_err(
        &k("kernel c op=spmm pattern=c input=2x8x8 kernel=3 stride=1 padding=1 batch=1 ld=1"),
        5,
        col(
            "kernel c op=spmm pattern=c input=2x8x8 kernel=3 stride=1 padding=1 batch=1 ld=1",
            "op=",
        ) + 3,
        "spmm takes no convolution geometry",
    );
    assert_err(
        &k("kernel c op=conv pattern=c input=2x8x8 kernel=3 stride=1 batch=1 ld=1"),
        5,
        71,
        "kernel attribute `padding=` missing",
    );
    assert_err(
        &k("kernel c op=conv pattern=c input=2x8 kernel=3 stride=1 padding=1 batch=1 ld=1"),
        5,
        col(
            "kernel c op=conv pattern=c input=2x8 kernel=3 stride=1 padding=1 batch=1 ld=1",
            "2x8",
        ),
        "input: expected CHANNELSxHEIGHTxWIDTH, got \"2x8\"",
    );
    assert_err(
        &k("kernel c op=conv pattern=c input=2x8x8 kernel=three stride=1 padding=1 batch=1 ld=1"),
        5,
        col(
            "kernel c op=conv pattern=c input=2x8x8 kernel=three stride=1 padding=1 batch=1 ld=1",
            "three",
        ),
        "kernel: expected a whole number, got \"three\"",
    );
    assert_err(
        &k("kernel c op=conv pattern=c input=3x8x8 kernel=3 stride=1 padding=1 batch=1 ld=1"),
        5,
        col(
            "kernel c op=conv pattern=c input=3x8x8 kernel=3 stride=1 padding=1 batch=1 ld=1",
            "input=",
        ) + 6,
        "the pattern has 18 columns, but 3 input channels of a 3x3 window need 27",
    );
    assert_err(
        &k("kernel c op=conv_t pattern=c input=2x8x8 kernel=3 stride=0 padding=1 batch=1 ld=1"),
        5,
        col(
            "kernel c op=conv_t pattern=c input=2x8x8 kernel=3 stride=0 padding=1 batch=1 ld=1",
            "input=",
        ) + 6,
        "stride = 0 is outside 1..=65536",
    );
    assert_err(
        &k("kernel c op=conv pattern=c input=2x8x8 kernel=3 stride=1 padding=1 input=2x8x8 batch=1 ld=1"),
        5,
        68,
        "kernel attribute `input` given twice",
    );
}
