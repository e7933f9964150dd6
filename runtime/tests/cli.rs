//! The `sparse-train` binary end to end, on small subsets of the vendored MNIST: a smoke
//! training run, bit-identical resume with `--deterministic`, a checkpoint killed mid-write,
//! Ctrl-C, `--eval-only`, `--init-from`, `--plot`, and clear errors for bad data files.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{metrics, ok, repo, s, sparse_train};

/// A quick configuration: 600 training images (6 steps of 100), 300 validation and test.
const SMALL: &[&str] = &[
    "--train-limit",
    "600",
    "--eval-limit",
    "300",
    "--density",
    "0.3",
    "--lr",
    "0.1",
];

#[test]
fn smoke_one_epoch_learns() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.jsonl");
    let plot = dir.path().join("p.svg");
    let out = ok(&[
        "--train-limit",
        "3000",
        "--eval-limit",
        "1000",
        "--density",
        "0.3",
        "--epochs",
        "1",
        "--metrics-out",
        s(&m),
        "--plot",
        s(&plot),
    ]);
    assert!(out.contains("test accuracy"), "{out}");
    let lines = metrics(&m);
    assert_eq!(lines.len(), 1);
    let l = &lines[0];
    assert_eq!(l.version, 1);
    assert_eq!(l.epoch, 1);
    assert_eq!(l.steps, 30);
    let (val, test) = (l.val_acc.unwrap(), l.test_acc.unwrap());
    assert!(
        val > 0.5 && test > 0.5,
        "val {val}, test {test}: not well above chance"
    );
    assert_eq!(l.layers.len(), 3);
    assert_eq!(
        l.nnz_total,
        l.layers.iter().map(|x| x.nnz).sum::<usize>(),
        "nnz_total"
    );
    assert!(!l.mask_updated, "no mask update after the last epoch");
    for layer in &l.layers {
        assert!(layer.strategies.contains_key("spmm"), "{layer:?}");
        assert!(layer.strategies.contains_key("sddmm"), "{layer:?}");
    }
    assert!(
        !l.layers[0].strategies.contains_key("spmm_t"),
        "fc1 needs no input gradient"
    );
    let svg = fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("fc1") && svg.contains("fc3"));
}

/// The metrics of a run interrupted after epoch 1 and resumed equal, bit for bit (timings
/// aside), those of the uninterrupted run; so do the final weights, masks and momenta.
#[test]
fn deterministic_resume_matches_uninterrupted_run() {
    deterministic_resume(&[]);
}

/// The same with mask updates inside epochs (every 4 of the 6 steps), which recompile
/// layers mid-epoch with the epoch's plan.
#[test]
fn deterministic_resume_with_updates_inside_epochs() {
    deterministic_resume(&["--update-frequency", "4", "--dense-momentum", "window:2"]);
}

fn deterministic_resume(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (ma, mb) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let (ca, cb) = (dir.path().join("ck-a"), dir.path().join("ck-b"));
    let common = |m: &Path, c: &Path| -> Vec<String> {
        let mut v: Vec<String> = SMALL.iter().map(|x| x.to_string()).collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v.extend(
            [
                "--epochs",
                "3",
                "--deterministic",
                "--metrics-out",
                s(m),
                "--checkpoint-dir",
                s(c),
            ]
            .iter()
            .map(|x| x.to_string()),
        );
        v
    };
    let a = common(&ma, &ca);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let mut b = common(&mb, &cb);
    b.extend(["--stop-after-epoch".to_string(), "1".to_string()]);
    let out = ok(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("stopped after epoch 1"), "{out}");
    assert_eq!(metrics(&mb).len(), 1);
    assert_eq!(
        fs::read_to_string(cb.join("latest")).unwrap().trim(),
        "epoch-001"
    );
    let out = ok(&[
        "--resume",
        s(&cb),
        "--metrics-out",
        s(&mb),
        "--checkpoint-dir",
        s(&cb),
    ]);
    assert!(out.contains("resumed"), "{out}");

    let (la, lb) = (metrics(&ma), metrics(&mb));
    assert_eq!(la.len(), 3);
    assert_eq!(lb.len(), 3, "metrics are appended on resume");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x.without_timings(), y.without_timings());
    }
    if extra.is_empty() {
        assert!(la[0].mask_updated && la[1].mask_updated && !la[2].mask_updated);
    }
    assert!(la[2].test_acc.is_some() && la[0].test_acc.is_none());
    for e in ["epoch-002", "epoch-003"] {
        let wa = fs::read(ca.join(e).join("model.safetensors")).unwrap();
        let wb = fs::read(cb.join(e).join("model.safetensors")).unwrap();
        let (ta, tb) = (
            safetensors::SafeTensors::deserialize(&wa).unwrap(),
            safetensors::SafeTensors::deserialize(&wb).unwrap(),
        );
        let mut names = ta.names();
        names.sort();
        assert_eq!(names.len(), 15);
        for name in names {
            let (x, y) = (ta.tensor(name).unwrap(), tb.tensor(name).unwrap());
            let differ = x
                .data()
                .chunks(4)
                .zip(y.data().chunks(4))
                .filter(|(p, q)| p != q)
                .count();
            assert_eq!(differ, 0, "{e}: {name} differs in {differ} elements");
        }
        assert!(wa == wb, "{e}: checkpoints differ");
    }
}

/// Killed half-way through writing a checkpoint: the previous one and the pointer to it stay
/// intact, and the run resumes from it to the same result.
#[test]
fn checkpoint_killed_mid_write_leaves_previous_intact() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let m = dir.path().join("m.jsonl");
    let mut args: Vec<&str> = SMALL.to_vec();
    args.extend([
        "--epochs",
        "3",
        "--deterministic",
        "--checkpoint-dir",
        s(&ck),
    ]);
    args.extend(["--metrics-out", s(&m)]);
    let mut crash = args.clone();
    crash.extend(["--crash-in-checkpoint", "2"]);
    let out = sparse_train(&crash);
    assert!(!out.status.success(), "the process was to abort");
    assert_eq!(
        fs::read_to_string(ck.join("latest")).unwrap().trim(),
        "epoch-001"
    );
    assert!(!ck.join("epoch-002").exists());
    let leftovers: Vec<_> = fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert_eq!(leftovers.len(), 1, "the half-written folder stays aside");
    let state = runtime::checkpoint::read_state(&ck.join("epoch-001")).unwrap();
    assert_eq!((state.epoch, state.version), (1, 1));

    // Epoch 2's metrics line is written only after its checkpoint: none yet.
    assert_eq!(metrics(&m).iter().map(|l| l.epoch).collect::<Vec<_>>(), [1]);

    // Resume from the directory (its latest), which goes on checkpointing there, into the
    // same metrics file, and finish.
    let out = ok(&["--resume", s(&ck), "--metrics-out", s(&m)]);
    assert!(out.contains("checkpoints go on into"), "{out}");
    assert_eq!(
        fs::read_to_string(ck.join("latest")).unwrap().trim(),
        "epoch-003"
    );
    let leftovers = fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.') && n != ".lock")
        .count();
    assert_eq!(leftovers, 0, "the next run cleans up");
    // The same result as an uninterrupted run, each epoch's line once.
    let m3 = dir.path().join("m3.jsonl");
    let mut full: Vec<&str> = SMALL.to_vec();
    full.extend(["--epochs", "3", "--deterministic", "--metrics-out", s(&m3)]);
    ok(&full);
    let (resumed, whole) = (metrics(&m), metrics(&m3));
    assert_eq!(
        resumed.iter().map(|l| l.epoch).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for (x, y) in resumed.iter().zip(&whole) {
        assert_eq!(x.without_timings(), y.without_timings());
    }
}

/// Killed between moving a checkpoint folder aside and renaming its replacement into place:
/// `latest` names a folder that is not there. Reading the directory takes the newest
/// complete checkpoint (with a warning); the next run on it restores the folder and goes on.
#[test]
fn a_kill_between_the_renames_recovers_the_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut args: Vec<&str> = SMALL.to_vec();
    args.extend([
        "--epochs",
        "3",
        "--deterministic",
        "--checkpoint-dir",
        s(&ck),
    ]);
    ok(&args);
    // Redo epoch 3 from epoch 2, killed while replacing epoch-003.
    let out = sparse_train(&[
        "--resume",
        s(&ck.join("epoch-002")),
        "--crash-in-checkpoint",
        "3",
        "--crash-at",
        "rename",
    ]);
    assert!(!out.status.success(), "the process was to abort");
    assert_eq!(
        fs::read_to_string(ck.join("latest")).unwrap().trim(),
        "epoch-003"
    );
    assert!(!ck.join("epoch-003").exists(), "moved aside");
    let found = runtime::checkpoint::resolve(&ck).unwrap();
    assert!(
        found
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".old-epoch-003-"),
        "{found:?}"
    );
    let state = runtime::checkpoint::read_state(&found).unwrap();
    assert_eq!(state.epoch, 3);
    // Read-only use (no lock taken, nothing tidied) works on the recovered folder …
    let out = sparse_train(&["--resume", s(&ck), "--eval-only"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("lacks state.json"),
        "a warning says why: {text}"
    );
    // … and the next run restores it and goes on.
    let out = ok(&["--resume", s(&ck), "--epochs", "4"]);
    assert!(out.contains("(epoch 3, step 18)"), "{out}");
    assert_eq!(
        fs::read_to_string(ck.join("latest")).unwrap().trim(),
        "epoch-004"
    );
    assert!(ck.join("epoch-003").join("state.json").is_file());
}

/// `--resume DIR/epoch-NNN` goes on checkpointing into DIR, keeping as many as the first run
/// did; extending the run keeps its schedules and says so.
#[test]
fn a_resumed_run_goes_on_in_its_folder_with_its_keep_and_schedules() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut args: Vec<&str> = SMALL.to_vec();
    args.extend(["--epochs", "2", "--checkpoint-dir", s(&ck), "--keep", "1"]);
    ok(&args);
    let first = runtime::checkpoint::read_state(&ck.join("epoch-002")).unwrap();
    assert_eq!(first.keep, Some(1));
    let out = ok(&["--resume", s(&ck.join("epoch-002")), "--epochs", "4"]);
    assert!(out.contains("checkpoints go on into"), "{out}");
    assert!(
        out.contains("keeps the prune-rate schedule it started with"),
        "{out}"
    );
    let mut names: Vec<String> = fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, [".lock", "epoch-004", "latest"], "--keep 1 held");
    let last = runtime::checkpoint::read_state(&ck.join("epoch-004")).unwrap();
    assert_eq!(last.epoch, 4);
    assert_eq!(
        last.prune_rate_schedule.total_steps(),
        first.prune_rate_schedule.total_steps(),
        "the 2-epoch schedule goes on"
    );
    assert_eq!(last.history[..2], first.history[..]);
}

#[test]
fn keeps_the_newest_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut args: Vec<&str> = SMALL.to_vec();
    args.extend(["--epochs", "4", "--checkpoint-dir", s(&ck), "--keep", "2"]);
    ok(&args);
    let mut names: Vec<String> = fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    // `.lock` stays (empty): the lock on it went with the process.
    assert_eq!(names, [".lock", "epoch-003", "epoch-004", "latest"]);
}

#[test]
fn eval_only_and_init_from_agree() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut args: Vec<&str> = SMALL.to_vec();
    args.extend(["--epochs", "1", "--checkpoint-dir", s(&ck)]);
    ok(&args);
    let m1 = dir.path().join("e1.jsonl");
    ok(&["--resume", s(&ck), "--eval-only", "--metrics-out", s(&m1)]);
    let m2 = dir.path().join("e2.jsonl");
    let model = ck.join("epoch-001/model.safetensors");
    let mut args: Vec<&str> = SMALL.to_vec();
    args.extend([
        "--init-from",
        s(&model),
        "--eval-only",
        "--metrics-out",
        s(&m2),
    ]);
    ok(&args);
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(fs::read_to_string(p).unwrap().trim()).unwrap()
    };
    let (a, b) = (read(&m1), read(&m2));
    assert!(a["test_acc"].as_f64().unwrap() > 0.0, "{a}");
    assert_eq!(a["test_acc"], b["test_acc"]);
    assert_eq!(a["val_acc"], b["val_acc"]);
    assert_eq!(a["nnz_total"], b["nnz_total"]);
}

#[cfg(unix)]
#[test]
fn ctrl_c_writes_a_checkpoint_and_resumes() {
    interrupt_writes_a_checkpoint_and_resumes("-INT");
}

/// SIGTERM (what `kill`, a batch scheduler or a container stop sends) saves a checkpoint as
/// Ctrl-C does.
#[cfg(unix)]
#[test]
fn sigterm_writes_a_checkpoint_and_resumes() {
    interrupt_writes_a_checkpoint_and_resumes("-TERM");
}

#[cfg(unix)]
fn interrupt_writes_a_checkpoint_and_resumes(signal: &str) {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sparse-train"))
        .args([
            "--train-limit",
            "20000",
            "--eval-limit",
            "100",
            "--density",
            "0.3",
        ])
        .args(["--epochs", "1000", "--checkpoint-dir", s(&ck)])
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until training starts (the header line is printed once the kernels are compiled).
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let header = lines.next().unwrap().unwrap();
    assert!(header.starts_with("lenet300-100 on"), "{header}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = child.wait().unwrap().code();
    let out: Vec<String> = lines.map_while(|l| l.ok()).collect();
    assert_eq!(code, Some(130), "{out:?}");
    assert!(out.iter().any(|l| l.contains("interrupted")), "{out:?}");
    let latest = fs::read_to_string(ck.join("latest")).unwrap();
    let state = runtime::checkpoint::read_state(&ck.join(latest.trim())).unwrap();
    assert!(state.step > 0);
    if let Some(p) = &state.partial_epoch {
        assert!(latest.contains("-step-"), "{latest}");
        assert_eq!(state.step % 200, p.step_in_epoch);
    }
    // It resumes (here: evaluates), and training continues from the interrupted step.
    let out = ok(&["--resume", s(&ck), "--eval-only"]);
    assert!(out.contains("validation"), "{out}");
    let m = dir.path().join("m.jsonl");
    let epochs = (state.epoch + 1).to_string();
    ok(&[
        "--resume",
        s(&ck),
        "--epochs",
        &epochs,
        "--metrics-out",
        s(&m),
    ]);
    let lines = metrics(&m);
    assert_eq!(
        lines.len(),
        state.epoch as usize + 1,
        "the run's history and the new epoch"
    );
    let last = lines.last().unwrap();
    assert_eq!(last.epoch, state.epoch + 1);
    assert_eq!(last.steps, u64::from(state.epoch + 1) * 200);
}

#[test]
fn bad_data_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = repo().join("data/mnist");
    let setup = |name: &str| -> PathBuf {
        let d = dir.path().join(name);
        fs::create_dir_all(&d).unwrap();
        for f in [
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ] {
            fs::copy(mnist.join(f), d.join(f)).unwrap();
        }
        d
    };
    let run_err = |d: &Path| -> String {
        let out = sparse_train(&["--data-dir", s(d), "--epochs", "1"]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };

    // A truncated gzip stream.
    let d = setup("truncated-gz");
    let f = d.join("t10k-labels-idx1-ubyte.gz");
    let bytes = fs::read(&f).unwrap();
    fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = run_err(&d);
    assert!(
        e.contains("t10k-labels-idx1-ubyte.gz") && e.contains("gzip"),
        "{e}"
    );

    // A raw file cut short.
    let d = setup("truncated-raw");
    fs::remove_file(d.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let mut raw = vec![0, 0, 8, 1, 0, 0, 0x27, 0x10];
    raw.extend(vec![1u8; 5000]);
    fs::write(d.join("t10k-labels-idx1-ubyte"), raw).unwrap();
    let e = run_err(&d);
    assert!(
        e.contains("t10k-labels-idx1-ubyte") && e.contains("truncated"),
        "{e}"
    );

    // Not an IDX file at all.
    let d = setup("garbage");
    fs::remove_file(d.join("train-labels-idx1-ubyte.gz")).unwrap();
    fs::write(d.join("train-labels-idx1-ubyte"), b"hello world").unwrap();
    let e = run_err(&d);
    assert!(
        e.contains("train-labels-idx1-ubyte") && e.contains("not an IDX file"),
        "{e}"
    );

    // Labels that do not match the images.
    let d = setup("mismatch");
    fs::remove_file(d.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let mut raw = vec![0, 0, 8, 1, 0, 0, 0, 5];
    raw.extend([1u8; 5]);
    fs::write(d.join("t10k-labels-idx1-ubyte"), raw).unwrap();
    let e = run_err(&d);
    assert!(e.contains("5 labels for 10000 images"), "{e}");

    // A missing file and a missing directory.
    let d = setup("missing");
    fs::remove_file(d.join("train-images-idx3-ubyte.gz")).unwrap();
    let e = run_err(&d);
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("not found"),
        "{e}"
    );
    let e = run_err(&dir.path().join("nowhere"));
    assert!(e.contains("nowhere") && e.contains("not found"), "{e}");
}

#[test]
fn bad_options_are_clear_errors() {
    let out = sparse_train(&[
        "--backend",
        "opencl",
        "--train-limit",
        "100",
        "--eval-limit",
        "10",
    ]);
    if cfg!(feature = "opencl") {
        // built with OpenCL: the run trains (runtime/tests/opencl_training.rs checks it)
        // or, without a platform, says so
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || e.contains("no OpenCL platform"),
            "{e}"
        );
    } else {
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("backend opencl") && e.contains("--features opencl"),
            "{e}"
        );
    }
    let out = sparse_train(&["--dense-momentum", "window:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("window:K"));
    let out = sparse_train(&["--growth", "sideways"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("momentum|random"));
    let out = sparse_train(&[
        "--density",
        "0",
        "--train-limit",
        "100",
        "--eval-limit",
        "10",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--density 0"));
    // A batch larger than the training set, and one larger than the machine's memory.
    let out = sparse_train(&["--batch-size", "1000", "--train-limit", "600"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--batch-size 1000 is more than the 600 training samples"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sparse-train"))
        .args(["--batch-size", "50000", "--eval-limit", "10"])
        .current_dir(repo())
        .env("SPARSEJIT_MEMORY_BYTES", "200000000")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("at batch 50000") && err.contains("more than"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = sparse_train(&["--resume", s(dir.path())]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint here"));
}

/// Two `sparse-train` processes on one checkpoint folder: the second stops at start with
/// the folder's name and a non-zero exit, and the first finishes its run.
#[cfg(unix)]
#[test]
fn a_second_run_on_a_checkpoint_folder_is_refused() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let mut first = Command::new(env!("CARGO_BIN_EXE_sparse-train"))
        .args(SMALL)
        .args(["--epochs", "30", "--checkpoint-dir", s(&ck)])
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The header line is printed after the lock is taken and the kernels are compiled.
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let header = lines.next().unwrap().unwrap();
    assert!(header.starts_with("lenet300-100 on"), "{header}");
    let mut args: Vec<&str> = SMALL.to_vec();
    args.extend(["--epochs", "1", "--checkpoint-dir", s(&ck)]);
    let second = sparse_train(&args);
    let err = String::from_utf8_lossy(&second.stderr).to_string();
    assert!(!second.status.success(), "{err}");
    assert!(err.contains("in use by another run"), "{err}");
    for _ in lines.by_ref() {}
    assert!(first.wait().unwrap().success());
    assert_eq!(
        fs::read_to_string(ck.join("latest")).unwrap().trim(),
        "epoch-030"
    );
}

/// An output file that cannot be written is an error before training, not after epoch 1.
#[test]
fn unwritable_outputs_fail_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, b"").unwrap();
    for flag in ["--plot", "--metrics-out", "--checkpoint-dir"] {
        let target = file.join("out");
        let mut args: Vec<&str> = SMALL.to_vec();
        args.extend(["--epochs", "1", flag, s(&target)]);
        let out = sparse_train(&args);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(stderr.contains(s(&target)), "{flag}: {stderr}");
        assert!(
            !stdout.contains("epoch   1/1"),
            "{flag}: trained first: {stdout}"
        );
    }
}

/// Warnings for a thread count beyond the cores and a layer the density leaves empty; a run
/// logs no INFO lines unless asked, and never colours a log that is not on a terminal.
#[test]
fn warnings_and_quiet_uncoloured_logs() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = (cores + 1).to_string();
    let args = [
        "--train-limit",
        "600",
        "--eval-limit",
        "100",
        "--epochs",
        "2",
        "--density",
        "0.0001",
        "--threads",
        &threads,
    ];
    let out = sparse_train(&args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("--threads {threads} is more than")),
        "{err}"
    );
    assert!(
        err.contains("layer fc3 has no nonzero weight at density 0.0001"),
        "{err}"
    );
    let quiet = Command::new(env!("CARGO_BIN_EXE_sparse-train"))
        .args(args)
        .current_dir(repo())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("INFO"));
    let info = Command::new(env!("CARGO_BIN_EXE_sparse-train"))
        .args(args)
        .current_dir(repo())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&info.stderr);
    assert!(log.contains("INFO") && log.contains("mask update"), "{log}");
    assert!(!log.contains('\u{1b}'), "coloured: {log}");
}

/// `sparse-train … | head -1`: the run ends when the reader goes, quietly (by SIGPIPE),
/// without a panic.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_run_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_sparse-train"))
        .args(SMALL)
        .args(["--epochs", "50"])
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("lenet300-100 on"), "{first}");
    drop(reader);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.status.success() || out.status.signal() == Some(13),
        "{:?}: {err}",
        out.status
    );
}

#[cfg(not(feature = "mpi"))]
#[test]
fn distributed_without_mpi_says_how_to_build_it() {
    let out = sparse_train(&["--distributed", "--epochs", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features mpi"), "{err}");
}

/// `--flops-budget`: the run keeps it and prints it, a checkpoint keeps it, and bad values
/// are clear errors.
#[test]
fn flops_budget_is_kept_checkpointed_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_file = dir.path().join("m.jsonl");
    let ck = dir.path().join("ck");
    let common = [
        "--model",
        "lenet5",
        "--train-limit",
        "600",
        "--eval-limit",
        "100",
        "--update-frequency",
        "3",
    ];
    let mut args = common.to_vec();
    args.extend([
        "--epochs",
        "2",
        "--flops-budget",
        "0.05",
        "--metrics-out",
        s(&metrics_file),
        "--checkpoint-dir",
        s(&ck),
    ]);
    let text = ok(&args);
    assert!(text.contains("  flops "), "{text}");
    let lines = metrics(&metrics_file);
    assert_eq!(lines.len(), 2);
    for m in &lines {
        let f = m.flops_fraction.unwrap();
        assert!(f > 0.0 && f <= 0.05, "{f}");
    }
    // `latest` is a file naming the newest checkpoint folder.
    let latest = std::fs::read_to_string(ck.join("latest")).unwrap();
    let state = std::fs::read_to_string(ck.join(latest.trim()).join("state.json")).unwrap();
    assert!(state.contains("\"flops_budget\": 0.05"), "{state}");

    let out = sparse_train(&["--resume", s(&ck), "--flops-budget", "0.1", "--eval-only"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--flops-budget 0.1 differs"), "{err}");

    for (extra, says) in [
        (
            vec!["--flops-budget", "1.5"],
            "--flops-budget 1.5 is not in (0, 1]",
        ),
        (
            vec!["--flops-budget", "0"],
            "--flops-budget 0 is not in (0, 1]",
        ),
        (
            vec!["--flops-budget", "0.1", "--density", "1"],
            "--flops-budget needs a sparse run",
        ),
    ] {
        let mut args = common.to_vec();
        args.extend(extra);
        let out = sparse_train(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{err}");
    }
}
