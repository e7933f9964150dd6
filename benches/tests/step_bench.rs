//! `step-bench` end to end on a small model: one row per density in child processes, the
//! JSON's fields, the compute budget's masks, and clear errors.

use std::process::Command;

fn step_bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_step-bench"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn rows_report_the_masks_flops_fraction_under_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rows.json");
    let out = step_bench(&[
        "--model",
        "lenet5",
        "--batch",
        "16",
        "--density",
        "0.1,1",
        "--threads",
        "1",
        "--steps",
        "1",
        "--init",
        "erk",
        "--flops-budget",
        "0.05",
        "--json",
        json.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["version"], 1);
    let rows = report["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    // The sparse row: 10 % of the weights, ERK's densities scaled to 5 % of the multiply-adds.
    let sparse = &rows[0];
    assert_eq!(sparse["density"], 0.1);
    assert_eq!(sparse["flops_budget"], 0.05);
    let f = sparse["flops_fraction"].as_f64().unwrap();
    assert!(f > 0.04 && f <= 0.05, "{f}");
    assert_eq!(sparse["steps"], 2); // one ordinary step and one window step
    for key in ["step_ms_mean", "step_ms_median", "peak_rss_mb", "update_ms"] {
        assert!(sparse[key].as_f64().unwrap() > 0.0, "{key}: {sparse}");
    }
    // The dense row ignores the budget.
    let dense = &rows[1];
    assert_eq!(dense["flops_fraction"], 1.0);
    assert!(dense.get("flops_budget").is_none(), "{dense}");

    for (args, says) in [
        (
            vec!["--flops-budget", "2"],
            "--flops-budget 2 is not in (0, 1]",
        ),
        (
            vec!["--flops-budget", "0.1", "--masks-from", "/nonexistent"],
            "excludes --masks-from",
        ),
    ] {
        let mut all = vec!["--model", "lenet5"];
        all.extend(args);
        let out = step_bench(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{err}");
    }
}
