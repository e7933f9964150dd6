//! Golden tests (insta snapshots) of what kernel-dump prints for a small fixed pattern:
//! `ir`, `clif`, `opencl` and `rust`. Review changes with `cargo insta review`, or accept
//! them with `INSTA_UPDATE=always cargo test -p kernel-dump --test snapshots`.

use clap::Parser;
use kernel_dump::{artefacts, Cli};

fn dump(extra: &[&str]) -> String {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/two.sir");
    let mut args = vec![
        "kernel-dump",
        "--mask",
        fixture,
        "--pattern",
        "small",
        "--batch",
        "3",
    ];
    args.extend_from_slice(extra);
    let cli = Cli::try_parse_from(args).unwrap();
    artefacts(&cli)
        .unwrap()
        .into_iter()
        .map(|a| format!(";; ===== {} =====\n{}", a.file, a.text))
        .collect::<Vec<_>>()
        .join("")
        .replace(env!("CARGO_MANIFEST_DIR"), "$DIR")
}

#[test]
fn ir() {
    insta::assert_snapshot!(dump(&["--emit", "ir"]));
}

#[test]
fn clif() {
    insta::assert_snapshot!(dump(&[
        "--emit", "clif", "--op", "spmm", "--bias", "--relu"
    ]));
}

#[test]
fn clif_spmm_t_and_sddmm() {
    insta::assert_snapshot!(dump(&["--emit", "clif", "--op", "spmm-t"]));
    insta::assert_snapshot!(dump(&["--emit", "clif", "--op", "sddmm"]));
}

#[test]
fn opencl() {
    insta::assert_snapshot!(dump(&[
        "--emit",
        "opencl",
        "--backend",
        "opencl",
        "--op",
        "spmm",
        "--strategy",
        "unrolled"
    ]));
    insta::assert_snapshot!(dump(&[
        "--emit",
        "opencl",
        "--backend",
        "opencl",
        "--op",
        "spmm-t",
        "--strategy",
        "table"
    ]));
}

#[test]
fn rust() {
    insta::assert_snapshot!(dump(&["--emit", "rust", "--bias", "--relu"]));
}
