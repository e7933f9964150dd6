//! `kill -9` at 20 random moments of a checkpointing run: after every kill the directory's
//! latest checkpoint loads, and the run, resumed each time, ends bit for bit like an
//! uninterrupted one, with each epoch's metrics line once.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use runtime::EpochMetrics;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sparse_train() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sparse-train"));
    c.current_dir(repo())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// 10 epochs of 120 steps, with mask updates inside epochs too.
const RUN: &[&str] = &[
    "--train-limit",
    "12000",
    "--eval-limit",
    "1000",
    "--density",
    "0.1",
    "--epochs",
    "10",
    "--update-frequency",
    "50",
    "--deterministic",
    "--keep",
    "2",
];

fn metrics(path: &Path) -> Vec<EpochMetrics> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn twenty_kills_at_random_moments_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, killed) = (dir.path().join("straight"), dir.path().join("killed"));
    let (m_straight, m_killed) = (
        dir.path().join("straight.jsonl"),
        dir.path().join("k.jsonl"),
    );
    let began = std::time::Instant::now();
    let out = sparse_train()
        .args(RUN)
        .args([
            "--checkpoint-dir",
            s(&straight),
            "--metrics-out",
            s(&m_straight),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Kills within the first fifth of a whole run's time: at start-up, inside epochs, while
    // checkpoints are written; a restarted run gets about two epochs further at most, so all
    // 20 kills land before the run can end.
    let horizon = began.elapsed().as_millis() as u64 / 5;
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let has_checkpoint = |d: &Path| runtime::checkpoint::resolve(d).is_ok();
    let start = |d: &Path| -> Command {
        let mut c = sparse_train();
        if has_checkpoint(d) {
            c.args(["--resume", s(d), "--metrics-out", s(&m_killed)]);
        } else {
            c.args(RUN)
                .args(["--checkpoint-dir", s(d), "--metrics-out", s(&m_killed)]);
        }
        c
    };
    let (mut kills, mut after_a_checkpoint) = (0, 0);
    while kills < 20 {
        let mut child = start(&killed).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..=horizon)));
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill: the run is done
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        if has_checkpoint(&killed) {
            after_a_checkpoint += 1;
            let out = sparse_train()
                .args(["--resume", s(&killed), "--eval-only", "--eval-limit", "100"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "after kill {kills}, latest does not load: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = start(&killed).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (a, b) = (metrics(&m_straight), metrics(&m_killed));
    assert_eq!(
        b.iter().map(|m| m.epoch).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>(),
        "each epoch once"
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.without_timings(), y.without_timings());
    }
    let model = |d: &Path| fs::read(d.join("epoch-010").join("model.safetensors")).unwrap();
    assert!(
        model(&straight) == model(&killed),
        "the final weights differ"
    );
    assert_eq!(kills, 20, "the run ended after {kills} kills");
    eprintln!("{kills} kills, {after_a_checkpoint} with a checkpoint to resume from");
}
