//! `sparse-train --distributed` under `mpirun`, 2 ranks, against one process: the same losses,
//! masks and accuracy; communication in proportion to the nonzeros; a killed rank, a rank that
//! stops answering, or SIGTERM ends the job with the last checkpoint loadable. Needs the cargo feature `mpi` and
//! OpenMPI's `mpirun` (`make deps` installs it); run as root with `--allow-run-as-root`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use runtime::EpochMetrics;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string())
        .arg(env!("CARGO_BIN_EXE_sparse-train"))
        .arg("--distributed")
        .current_dir(repo())
        .env("RUST_LOG", "warn");
    c
}

fn plain() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sparse-train"));
    c.current_dir(repo()).env("RUST_LOG", "warn");
    c
}

fn run(mut c: Command, args: &[&str]) -> Output {
    let out = c.args(args).output().unwrap_or_else(|e| {
        panic!("cannot start {c:?}: {e} (mpirun comes with Debian's openmpi-bin)")
    });
    assert!(
        out.status.success(),
        "{c:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How many mask entries of two checkpoint directories differ, and how many there are.
fn mask_differences(a: &Path, b: &Path) -> (usize, usize) {
    let (ma, mb) = (masks(a), masks(b));
    let total = ma.iter().map(|(_, m)| m.len()).sum();
    let differ = ma
        .iter()
        .zip(&mb)
        .map(|((na, x), (nb, y))| {
            assert_eq!(na, nb);
            x.iter().zip(y).filter(|(p, q)| p != q).count()
        })
        .sum();
    (differ, total)
}

fn metrics(path: &Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `NAME.mask` of every layer in a checkpoint directory's latest checkpoint.
fn masks(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let latest = std::fs::read_to_string(dir.join("latest")).unwrap();
    let bytes = std::fs::read(dir.join(latest.trim()).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n.ends_with(".mask"))
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    out.sort();
    out
}

const RUN: &[&str] = &[
    "--train-limit",
    "3000",
    "--eval-limit",
    "1000",
    "--threads",
    "1",
    "--deterministic",
    "--batch-size",
    "100",
];

#[test]
fn two_ranks_train_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (pm, dm) = (dir.path().join("p.jsonl"), dir.path().join("d.jsonl"));
    let (pc, dc) = (dir.path().join("p"), dir.path().join("d"));
    let args = |m: &Path, c: &Path| {
        let mut a = RUN.to_vec();
        a.extend([
            "--epochs",
            "1",
            "--metrics-out",
            s(m),
            "--checkpoint-dir",
            s(c),
        ]);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let pa = args(&pm, &pc);
    let da = args(&dm, &dc);
    run(plain(), &pa.iter().map(String::as_str).collect::<Vec<_>>());
    let out = run(
        mpirun(2),
        &da.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Rank 0 alone prints and writes.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let epoch_lines = stdout.lines().filter(|l| l.starts_with("epoch")).count();
    assert_eq!(epoch_lines, 1, "{stdout}");
    let (p, d) = (metrics(&pm), metrics(&dm));
    assert_eq!(d.len(), 1);
    let rel = (p[0].train_loss - d[0].train_loss).abs() / p[0].train_loss;
    assert!(
        rel <= 1e-4,
        "losses {} and {}",
        p[0].train_loss,
        d[0].train_loss
    );
    let acc = (p[0].test_acc.unwrap() - d[0].test_acc.unwrap()).abs();
    assert!(
        acc <= 0.005,
        "test accuracy {:?} and {:?}",
        p[0].test_acc,
        d[0].test_acc
    );
    assert!(p[0].comm_bytes.is_none() && d[0].comm_bytes.is_some());

    // Two epochs: a mask update after the first; the masks stay within 0.1 % of each other.
    let (pc2, dc2) = (dir.path().join("p2"), dir.path().join("d2"));
    let mut a = RUN.to_vec();
    a.extend(["--epochs", "2", "--stop-after-epoch", "1"]);
    let mut pa = a.clone();
    pa.extend(["--checkpoint-dir", s(&pc2)]);
    let mut da = a.clone();
    da.extend(["--checkpoint-dir", s(&dc2)]);
    run(plain(), &pa);
    run(mpirun(2), &da);
    let (differ, total) = mask_differences(&pc2, &dc2);
    assert!(
        differ * 1000 <= total,
        "{differ} of {total} mask entries differ"
    );
}

#[test]
fn three_ranks_sum_through_rank_zero_and_train_as_one_process() {
    // More than two ranks reduce to rank 0 and broadcast; shares of 34, 33 and 33 samples.
    let dir = tempfile::tempdir().unwrap();
    let (pm, dm) = (dir.path().join("p.jsonl"), dir.path().join("d.jsonl"));
    let (pc, dc) = (dir.path().join("p"), dir.path().join("d"));
    let mut a = RUN.to_vec();
    a.extend(["--epochs", "2", "--stop-after-epoch", "1"]);
    let mut pa = a.clone();
    pa.extend(["--metrics-out", s(&pm), "--checkpoint-dir", s(&pc)]);
    let mut da = a.clone();
    da.extend(["--metrics-out", s(&dm), "--checkpoint-dir", s(&dc)]);
    run(plain(), &pa);
    run(mpirun(3), &da);
    let (p, d) = (metrics(&pm), metrics(&dm));
    let rel = (p[0].train_loss - d[0].train_loss).abs() / p[0].train_loss;
    assert!(
        rel <= 1e-4,
        "losses {} and {}",
        p[0].train_loss,
        d[0].train_loss
    );
    let (differ, total) = mask_differences(&pc, &dc);
    assert!(
        differ * 1000 <= total,
        "{differ} of {total} mask entries differ"
    );
}

#[test]
fn communication_follows_the_nonzeros() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.jsonl");
    let mut a = RUN.to_vec();
    a.extend([
        "--epochs",
        "2",
        "--dense-momentum",
        "window:4",
        "--metrics-out",
        s(&m),
    ]);
    run(mpirun(2), &a);
    let d = metrics(&m);
    // Epoch 1 ends with a mask update (4 window steps of dense gradients); epoch 2 is the
    // last, with no update and no window.
    let ratio = |e: &EpochMetrics| {
        e.comm_bytes.unwrap() as f64 / e.comm_bytes_dense_equivalent.unwrap() as f64
    };
    assert!(ratio(&d[0]) <= 0.25, "epoch 1: {}", ratio(&d[0]));
    assert!(ratio(&d[1]) <= 0.1, "epoch 2: {}", ratio(&d[1]));
    assert!(ratio(&d[1]) > 0.0);
}

/// Waits for `child` at most `limit`; kills it and fails if it is still running.
fn wait_for(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the job did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the checkpoint directory has a first checkpoint.
fn wait_for_checkpoint(dir: &Path) {
    let start = Instant::now();
    while !dir.join("latest").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn loads(dir: &Path) {
    run(
        plain(),
        &["--resume", s(dir), "--eval-only", "--eval-limit", "200"],
    );
}

/// A long 2-rank run checkpointing into `ck` with a collective timeout of `timeout` seconds,
/// started and past its first checkpoint.
fn long_run(ck: &Path, timeout: u32) -> std::process::Child {
    let timeout = timeout.to_string();
    let mut a = RUN.to_vec();
    a.extend([
        "--epochs",
        "200",
        "--mpi-timeout",
        &timeout,
        "--checkpoint-dir",
        s(ck),
    ]);
    let job = mpirun(2)
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(ck);
    job
}

/// The pid of one rank of the run checkpointing into `ck` (a `sparse-train` process whose
/// command line names the folder), read from /proc.
fn a_rank(ck: &Path) -> String {
    let needle = format!("--checkpoint-dir\0{}", s(ck));
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            comm.trim() == "sparse-train" && String::from_utf8_lossy(&cmdline).contains(&needle)
        })
        .expect("a rank is running")
}

#[test]
fn a_killed_rank_ends_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut job = long_run(&ck, 20);
    Command::new("kill")
        .args(["-9", &a_rank(&ck)])
        .status()
        .unwrap();
    let status = wait_for(&mut job, Duration::from_secs(90));
    assert!(!status.success());
    loads(&ck);
}

#[test]
fn a_rank_that_stops_answering_ends_the_job_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut job = long_run(&ck, 3);
    // A stopped rank neither dies nor answers: the other waits in a collective until its
    // watchdog ends it, and mpirun ends the job.
    Command::new("kill")
        .args(["-STOP", &a_rank(&ck)])
        .status()
        .unwrap();
    let status = wait_for(&mut job, Duration::from_secs(60));
    assert!(!status.success());
    loads(&ck);
}

#[test]
fn sigterm_stops_every_rank_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut job = long_run(&ck, 20);
    Command::new("kill")
        .args(["-TERM", &job.id().to_string()])
        .status()
        .unwrap();
    let status = wait_for(&mut job, Duration::from_secs(90));
    assert!(!status.success(), "an interrupted run exits non-zero");
    loads(&ck);
}

#[test]
fn a_bad_configuration_is_a_clear_error() {
    let out = mpirun(2)
        .args(["--batch-size", "1", "--train-limit", "100", "--epochs", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("smaller than the 2 ranks"), "{err}");
}

#[test]
fn a_distributed_run_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (ck, m, p) = (
        dir.path().join("ck"),
        dir.path().join("m.jsonl"),
        dir.path().join("p.jsonl"),
    );
    let mut a = RUN.to_vec();
    a.extend([
        "--epochs",
        "2",
        "--stop-after-epoch",
        "1",
        "--checkpoint-dir",
        s(&ck),
    ]);
    a.extend(["--metrics-out", s(&m)]);
    run(mpirun(2), &a);
    run(mpirun(2), &["--resume", s(&ck), "--metrics-out", s(&m)]);
    let mut b = RUN.to_vec();
    b.extend(["--epochs", "2", "--metrics-out", s(&p)]);
    run(plain(), &b);
    let (d, p) = (metrics(&m), metrics(&p));
    assert_eq!(d.len(), 2);
    for (x, y) in d.iter().zip(&p) {
        assert!((x.train_loss - y.train_loss).abs() <= 1e-4 * y.train_loss);
        assert_eq!(x.nnz_total, y.nnz_total);
    }
}
