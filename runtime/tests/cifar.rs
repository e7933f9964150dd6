//! `sparse-train --data cifar10` and `--data synthetic` end to end: CIFAR-10's binary format
//! written by the test (no registry ships CIFAR-10), with class-dependent images that a
//! model can learn; resume; and clear errors for missing or damaged files.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{metrics, ok, s, sparse_train};
use rand::{Rng, SeedableRng};

const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];

fn err(args: &[&str]) -> String {
    let out = sparse_train(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "sparse-train {args:?} should fail"
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// One record of class `label`: dim noise, with channel `label % 3`'s rows
/// `3·label .. 3·label + 3` bright.
fn record(label: u8, rng: &mut impl Rng) -> Vec<u8> {
    let mut r = vec![label];
    for c in 0..3 {
        for y in 0..32 {
            for _ in 0..32 {
                let bright = c == usize::from(label) % 3
                    && (3 * label as usize..3 * label as usize + 3).contains(&y);
                r.push(if bright {
                    200 + rng.random_range(0..50)
                } else {
                    rng.random_range(0..60)
                });
            }
        }
    }
    r
}

/// A CIFAR-10 directory with `per_file` records in each training file and `test` test
/// records.
fn write_cifar(dir: &Path, per_file: usize, test: usize) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut file = |name: &str, n: usize| {
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| {
                let label = rng.random_range(0..10u8);
                record(label, &mut rng)
            })
            .collect();
        fs::write(dir.join(name), bytes).unwrap();
    };
    for name in TRAIN_FILES {
        file(name, per_file);
    }
    file("test_batch.bin", test);
    dir.to_path_buf()
}

#[test]
fn a_model_learns_cifar_format_data_with_augmentation_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_cifar(&tmp.path().join("cifar"), 120, 300);
    let run = |stop_after: &str, m: &Path, ck: &Path| {
        ok(&[
            "--stop-after-epoch",
            stop_after,
            "--data",
            "cifar10",
            "--data-dir",
            s(&data),
            "--density",
            "0.2",
            "--epochs",
            "3",
            "--deterministic",
            "--metrics-out",
            s(m),
            "--checkpoint-dir",
            s(ck),
        ])
    };
    let (m, ck) = (tmp.path().join("m.jsonl"), tmp.path().join("ck"));
    let out = run("3", &m, &ck);
    assert!(
        out.contains("540 train / 60 validation / 300 test, 10 classes"),
        "{out}"
    );
    assert!(out.contains("batch 128"), "{out}");
    let straight = metrics(&m);
    let test = straight[2].test_acc.unwrap();
    assert!(
        test > 0.5,
        "test accuracy {test} after 3 epochs (chance is 0.1)"
    );
    let state = fs::read_to_string(ck.join("epoch-003/state.json")).unwrap();
    assert!(
        state.contains("\"source\": \"cifar10\"") && state.contains("\"augmentation\""),
        "{state}"
    );

    // Stopped after epoch 1 and resumed, the run repeats the straight one (augmentation
    // included).
    let (m2, ck2) = (tmp.path().join("m2.jsonl"), tmp.path().join("ck2"));
    run("1", &m2, &ck2);
    ok(&[
        "--data",
        "cifar10",
        "--data-dir",
        s(&data),
        "--resume",
        s(&ck2),
        "--epochs",
        "3",
        "--metrics-out",
        s(&m2),
    ]);
    let resumed = metrics(&m2);
    assert_eq!(resumed.len(), 3);
    for (a, b) in straight.iter().zip(&resumed) {
        assert_eq!(a.train_loss, b.train_loss, "epoch {}", a.epoch);
        assert_eq!(a.test_acc, b.test_acc, "epoch {}", a.epoch);
    }

    // The checkpoint does not resume on MNIST.
    let e = err(&["--resume", s(&ck2), "--epochs", "3"]);
    assert!(e.contains("cifar10 data") && e.contains("mnist"), "{e}");
}

/// WRN-16-2 (batch normalisation, residual blocks, dropout, stride-2 convolutions, global
/// pooling) learns the class-dependent images: 2 epochs of 21 steps at batch 32.
#[test]
fn a_wide_resnet_learns_cifar_format_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_cifar(&tmp.path().join("cifar"), 150, 200);
    let m = tmp.path().join("m.jsonl");
    let ck = tmp.path().join("ck");
    ok(&[
        "--model",
        "wrn-16-2",
        "--data",
        "cifar10",
        "--data-dir",
        s(&data),
        "--density",
        "0.1",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--deterministic",
        "--metrics-out",
        s(&m),
        "--checkpoint-dir",
        s(&ck),
    ]);
    let test = metrics(&m)[1].test_acc.unwrap();
    // 0.44 when this test was written (0.95 with 43 steps an epoch).
    assert!(
        test > 0.3,
        "test accuracy {test} after 2 epochs (chance is 0.1)"
    );
    // The checkpoint holds PyTorch's names: batch-norm statistics, no conv biases.
    let bytes = fs::read(ck.join("epoch-002/model.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>();
    for want in [
        "conv1.weight",
        "block1.layer.0.bn1.running_mean",
        "block1.layer.0.convShortcut.weight",
        "block3.layer.1.conv2.mask",
        "bn1.running_var",
        "fc.bias",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    assert!(!names.iter().any(|n| n == "conv1.bias"));
    // It evaluates again from the checkpoint, with the same accuracy.
    let out = ok(&[
        "--data",
        "cifar10",
        "--data-dir",
        s(&data),
        "--resume",
        s(&ck),
        "--eval-only",
    ]);
    assert!(out.contains(&format!("{:.2}%", test * 100.0)), "{out}");
}

#[test]
fn synthetic_data_trains_a_conv_net() {
    let out = ok(&[
        "--data",
        "synthetic",
        "--model",
        "lenet5",
        "--train-limit",
        "256",
        "--eval-limit",
        "128",
        "--epochs",
        "1",
    ]);
    assert!(
        out.contains("synthetic data (256 train / 128 validation / 128 test"),
        "{out}"
    );
    let e = err(&["--data", "synthetic", "--data-dir", "x"]);
    assert!(e.contains("takes no --data-dir"), "{e}");
}

#[test]
fn missing_and_damaged_cifar_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let e = err(&["--data", "cifar10"]);
    assert!(e.contains("--data cifar10 needs --data-dir"), "{e}");
    let e = err(&[
        "--data",
        "cifar10",
        "--data-dir",
        s(&tmp.path().join("nowhere")),
    ]);
    assert!(e.contains("nowhere") && e.contains("not found"), "{e}");

    let data = write_cifar(&tmp.path().join("cifar"), 20, 10);
    fs::remove_file(data.join("data_batch_4.bin")).unwrap();
    let e = err(&["--data", "cifar10", "--data-dir", s(&data)]);
    assert!(
        e.contains("data_batch_4.bin") && e.contains("not found"),
        "{e}"
    );

    let data = write_cifar(&tmp.path().join("cifar"), 20, 10);
    let f = data.join("test_batch.bin");
    let bytes = fs::read(&f).unwrap();
    fs::write(&f, &bytes[..bytes.len() - 1]).unwrap();
    let e = err(&["--data", "cifar10", "--data-dir", s(&data)]);
    assert!(
        e.contains("test_batch.bin") && e.contains("not a whole number of 3073-byte records"),
        "{e}"
    );
}
