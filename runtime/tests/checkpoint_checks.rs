//! What a checkpoint load checks, end to end through `sparse-train --resume … --eval-only`:
//! the model file's checksum, finite weights, biases and momenta, each mask's count of active
//! weights against the saved masking state, and the epoch and step; a checkpoint written
//! before the checksum and counts were kept still loads.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use runtime::checkpoint::{model_checksum, MODEL_FILE, STATE_FILE};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sparse_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparse-train"))
        .args(args)
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("sparse-train runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One epoch on 600 images into `dir/ck`; returns its checkpoint folder.
fn checkpoint(dir: &Path) -> PathBuf {
    let ck = dir.join("ck");
    let out = sparse_train(&[
        "--train-limit",
        "600",
        "--eval-limit",
        "200",
        "--density",
        "0.3",
        "--epochs",
        "1",
        "--checkpoint-dir",
        s(&ck),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ck.join("epoch-001")
}

/// A copy of the checkpoint folder `from` under `dir/name`.
fn copy(from: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    fs::create_dir_all(&to).unwrap();
    for f in [MODEL_FILE, STATE_FILE] {
        fs::copy(from.join(f), to.join(f)).unwrap();
    }
    to
}

/// `--resume FOLDER --eval-only`: the error line, or `None` if it loaded.
fn load_error(folder: &Path) -> Option<String> {
    let out = sparse_train(&["--resume", s(folder), "--eval-only", "--eval-limit", "200"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    if out.status.success() {
        None
    } else {
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        Some(err)
    }
}

fn edit_state(folder: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = folder.join(STATE_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Sets entry 0 of `tensor` to `value` and the checksum in state.json to match, so only the
/// value check can catch it.
fn poison(folder: &Path, tensor: &str, value: f32) {
    let bytes = fs::read(folder.join(MODEL_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    let t = owned.iter_mut().find(|t| t.0 == tensor).expect("tensor");
    t.3[..4].copy_from_slice(&value.to_le_bytes());
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, sh, data)| (n.clone(), TensorView::new(*d, sh.clone(), data).unwrap()))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    fs::write(folder.join(MODEL_FILE), &out).unwrap();
    edit_state(folder, |v| {
        v["model_checksum"] = model_checksum(&out).into()
    });
}

#[test]
fn loaded_checkpoints_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = checkpoint(dir.path());
    assert_eq!(load_error(&good), None);
    let state = runtime::checkpoint::read_state(&good).unwrap();
    assert!(state
        .model_checksum
        .as_deref()
        .unwrap()
        .starts_with("xxh3-64:"));
    assert_eq!(state.nonzeros.len(), 3);

    // A flipped bit anywhere in the model file.
    let f = copy(&good, dir.path(), "flipped");
    let mut bytes = fs::read(f.join(MODEL_FILE)).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x10;
    fs::write(f.join(MODEL_FILE), &bytes).unwrap();
    let e = load_error(&f).expect("refused");
    assert!(
        e.contains("model.safetensors") && e.contains("checksum"),
        "{e}"
    );

    // NaN and infinity in each kind of tensor, named.
    for (tensor, value) in [
        ("fc1.weight", f32::NAN),
        ("fc2.bias", f32::INFINITY),
        ("fc3.momentum", f32::NEG_INFINITY),
        ("fc1.bias_momentum", f32::NAN),
    ] {
        let f = copy(&good, dir.path(), tensor);
        poison(&f, tensor, value);
        let e = load_error(&f).expect("refused");
        assert!(
            e.contains(&format!("tensor {tensor}: entry 0 is")) && e.contains("not a finite"),
            "{tensor}: {e}"
        );
    }

    // A mask that disagrees with the masking state.
    let f = copy(&good, dir.path(), "nnz");
    let fc2 = state.nonzeros["fc2"];
    edit_state(&f, |v| v["nonzeros"]["fc2"] = (fc2 + 1).into());
    let e = load_error(&f).expect("refused");
    assert!(
        e.contains(&format!("fc2.mask has {fc2} nonzeros")) && e.contains(&(fc2 + 1).to_string()),
        "{e}"
    );

    // Epoch and step that cannot go together (6 steps per epoch here).
    for (epoch, step, partial) in [
        (1, 7, None),
        (2, 6, None),
        (0, 6, None),
        (0, 7, Some(7)),
        (1, 9, Some(3)),
    ] {
        let f = copy(&good, dir.path(), &format!("progress-{epoch}-{step}"));
        edit_state(&f, |v| {
            v["epoch"] = epoch.into();
            v["step"] = step.into();
            if let Some(p) = partial {
                v["partial_epoch"] = serde_json::json!({
                    "step_in_epoch": p, "loss_sum": 0.0, "dense_steps": 0, "seconds": 0.0,
                    "shuffle_rng": v["shuffle_rng"].clone()
                });
            }
        });
        let e = load_error(&f).expect("refused");
        assert!(e.contains("cannot be"), "epoch {epoch} step {step}: {e}");
    }

    // Written before the checksum and the counts were kept: loads.
    let f = copy(&good, dir.path(), "older");
    edit_state(&f, |v| {
        let o = v.as_object_mut().unwrap();
        o.remove("model_checksum");
        o.remove("nonzeros");
        o.remove("keep");
    });
    assert_eq!(load_error(&f), None);
}
