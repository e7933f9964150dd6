//! Where a training checkpoint lives: the one rule every tool uses to find it.
//!
//! A checkpoint is a folder holding [`STATE_FILE`] and [`MODEL_FILE`]. A checkpoint
//! directory (what `sparse-train --checkpoint-dir` writes) holds one folder per checkpoint
//! and a [`LATEST_FILE`] pointer: one line naming the newest folder, relative to the
//! directory. [`resolve_checkpoint`] accepts either: a folder that is a checkpoint is taken
//! as it is; otherwise the directory's `latest` pointer must name a checkpoint folder beside
//! it — one line, not empty, no `/` and no `..`, so a pointer can never lead outside the
//! directory.
//!
//! The rule lives here, beside the safetensors reader, because both the runtime (resume) and
//! `kernel-dump` (`--checkpoint`) need it and `kernel-dump` must not depend on the runtime.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// The training state inside a checkpoint folder (format version, schedules, plan, …).
pub const STATE_FILE: &str = "state.json";
/// The tensors inside a checkpoint folder (weights, masks, biases, momentum).
pub const MODEL_FILE: &str = "model.safetensors";
/// The pointer file in a checkpoint directory: one line naming its newest checkpoint folder.
pub const LATEST_FILE: &str = "latest";

/// Why a path is not a checkpoint; [`CheckpointError`] adds the path.
#[derive(Debug, Error)]
pub enum CheckpointProblem {
    /// The `latest` pointer exists but cannot be read.
    #[error("cannot read the latest pointer: {0}")]
    Unreadable(#[source] std::io::Error),
    /// The `latest` pointer is empty, spans several lines, or holds `/` or `..`.
    #[error(
        "bad latest pointer {0:?}: it must be one line naming a folder beside it (not empty, \
         no `/`, no `..`)"
    )]
    BadPointer(String),
    /// The folder the `latest` pointer names lacks a checkpoint file.
    #[error("the latest pointer names a folder without {0}")]
    PointerTargetIncomplete(&'static str),
    /// Neither a checkpoint folder nor a directory with a `latest` pointer.
    #[error(
        "no checkpoint here: not a checkpoint (a folder holding state.json and \
         model.safetensors{0}) nor a checkpoint directory (no latest pointer)"
    )]
    NotACheckpoint(&'static str),
}

/// A path that does not lead to a checkpoint, and why.
#[derive(Debug, Error)]
#[error("{}: {problem}", path.display())]
pub struct CheckpointError {
    /// The path the problem is about: the path given, the `latest` pointer, or the folder it
    /// names.
    pub path: PathBuf,
    /// What is wrong.
    #[source]
    pub problem: CheckpointProblem,
}

impl CheckpointError {
    fn new(path: impl Into<PathBuf>, problem: CheckpointProblem) -> Self {
        CheckpointError {
            path: path.into(),
            problem,
        }
    }
}

/// The checkpoint file `folder` lacks, [`STATE_FILE`] first, if any.
fn missing_file(folder: &Path) -> Option<&'static str> {
    [STATE_FILE, MODEL_FILE]
        .into_iter()
        .find(|name| !folder.join(name).is_file())
}

/// The order of a checkpoint folder's name, `(epoch, step)`, for `epoch-NNN` (a whole epoch:
/// `step = u64::MAX`, after every partial checkpoint of that epoch) and
/// `epoch-NNN-step-SSSSSS` (an epoch interrupted after `SSSSSS` steps); `None` for any
/// other name.
pub fn checkpoint_order(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix("epoch-")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match rest.split_once("-step-") {
        Some((e, s)) if digits(e) && digits(s) => Some((e.parse().ok()?, s.parse().ok()?)),
        Some(_) => None,
        None if digits(rest) => Some((rest.parse().ok()?, u64::MAX)),
        None => None,
    }
}

/// The name of the checkpoint folder that `name` was moved aside from by an interrupted write
/// (`.old-NAME-PID` gives `NAME`); `None` for any other name.
pub fn moved_aside(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(".old-")?;
    Some(rest.rsplit_once('-').map_or(rest, |(n, _)| n))
}

/// The checkpoint folder a path leads to, and how it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedCheckpoint {
    /// The checkpoint folder (holds [`STATE_FILE`] and [`MODEL_FILE`]).
    pub folder: PathBuf,
    /// Set when the `latest` pointer could not be followed (missing, or naming a folder an
    /// interrupted write left incomplete or moved aside) and the newest complete checkpoint
    /// of the directory was taken instead: why.
    pub recovered: Option<String>,
}

/// Finds the checkpoint folder of `path` (see [`locate_checkpoint`]).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf, CheckpointError> {
    locate_checkpoint(path).map(|l| l.folder)
}

/// Finds the checkpoint folder of `path`: `path` itself if it holds [`STATE_FILE`] and
/// [`MODEL_FILE`]; otherwise the folder that `path`'s [`LATEST_FILE`] pointer names, which
/// must hold both. The pointer is one line (a trailing newline and surrounding white space
/// are ignored), not empty, without `/` or `..`.
///
/// Recovery: a process killed between the steps of a checkpoint write can leave the pointer
/// missing (killed before the first pointer was written) or naming a folder that is moved
/// aside (killed while replacing a folder of the same name). Then the newest complete
/// checkpoint of the directory is taken — a folder named as [`checkpoint_order`] reads, or
/// one moved aside as `.old-NAME-PID` — and [`LocatedCheckpoint::recovered`] says so. A
/// pointer that is malformed is never second-guessed: it is an error.
pub fn locate_checkpoint(path: &Path) -> Result<LocatedCheckpoint, CheckpointError> {
    let found = |folder: PathBuf| LocatedCheckpoint {
        folder,
        recovered: None,
    };
    let missing_here = missing_file(path);
    if missing_here.is_none() {
        return Ok(found(path.to_path_buf()));
    }
    let latest = path.join(LATEST_FILE);
    if !latest.is_file() {
        if let Some(newest) = newest_complete(path) {
            return Ok(LocatedCheckpoint {
                recovered: Some(format!(
                    "{} has no latest pointer; took its newest complete checkpoint, {}",
                    path.display(),
                    newest.display()
                )),
                folder: newest,
            });
        }
        // Name the missing file where the folder holds the other one: a half-written or
        // hand-copied checkpoint is likelier than a wrong path.
        let detail = match missing_here {
            Some(STATE_FILE) if path.join(MODEL_FILE).is_file() => "; state.json is missing",
            Some(MODEL_FILE) => "; model.safetensors is missing",
            _ => "",
        };
        return Err(CheckpointError::new(
            path,
            CheckpointProblem::NotACheckpoint(detail),
        ));
    }
    let text = std::fs::read_to_string(&latest)
        .map_err(|e| CheckpointError::new(&latest, CheckpointProblem::Unreadable(e)))?;
    let name = text.trim();
    if name.is_empty()
        || name.contains('\n')
        || name.contains("..")
        || name.chars().any(std::path::is_separator)
    {
        return Err(CheckpointError::new(
            &latest,
            CheckpointProblem::BadPointer(name.to_string()),
        ));
    }
    let folder = path.join(name);
    if let Some(file) = missing_file(&folder) {
        if let Some(newest) = newest_complete(path) {
            return Ok(LocatedCheckpoint {
                recovered: Some(format!(
                    "the latest pointer names {}, which lacks {file} (a write was \
                     interrupted); took the newest complete checkpoint, {}",
                    folder.display(),
                    newest.display()
                )),
                folder: newest,
            });
        }
        return Err(CheckpointError::new(
            folder,
            CheckpointProblem::PointerTargetIncomplete(file),
        ));
    }
    Ok(found(folder))
}

/// The newest complete checkpoint folder directly inside `dir`: `epoch-…` folders, and
/// folders an interrupted write moved aside (`.old-NAME-PID`), ordered by
/// [`checkpoint_order`] of their name.
fn newest_complete(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut best: Option<((u32, u64), PathBuf)> = None;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let ordered = moved_aside(&name).unwrap_or(&name);
        let Some(key) = checkpoint_order(ordered) else {
            continue;
        };
        let path = e.path();
        if missing_file(&path).is_none() && best.as_ref().is_none_or(|(k, _)| key > *k) {
            best = Some((key, path));
        }
    }
    best.map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, empty directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "sparse-ir-checkpoint-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn checkpoint_folder(path: &Path, files: &[&str]) {
        fs::create_dir_all(path).unwrap();
        for f in files {
            fs::write(path.join(f), b"").unwrap();
        }
    }

    #[test]
    fn a_checkpoint_folder_is_itself() {
        let dir = TempDir::new();
        checkpoint_folder(&dir.0, &[STATE_FILE, MODEL_FILE]);
        assert_eq!(resolve_checkpoint(&dir.0).unwrap(), dir.0);
    }

    #[test]
    fn a_directory_resolves_through_latest() {
        let dir = TempDir::new();
        checkpoint_folder(&dir.0.join("epoch-001"), &[STATE_FILE, MODEL_FILE]);
        checkpoint_folder(&dir.0.join("epoch-002"), &[STATE_FILE, MODEL_FILE]);
        fs::write(dir.0.join(LATEST_FILE), "epoch-002\n").unwrap();
        assert_eq!(resolve_checkpoint(&dir.0).unwrap(), dir.0.join("epoch-002"));
    }

    #[test]
    fn bad_pointers_are_refused() {
        let dir = TempDir::new();
        checkpoint_folder(&dir.0.join("epoch-001"), &[STATE_FILE, MODEL_FILE]);
        for bad in [
            "",
            "\n",
            "../epoch-001",
            "..",
            "sub/epoch-001",
            "/tmp",
            "epoch-001\nepoch-002",
        ] {
            fs::write(dir.0.join(LATEST_FILE), bad).unwrap();
            let e = resolve_checkpoint(&dir.0).unwrap_err();
            assert_eq!(e.path, dir.0.join(LATEST_FILE), "{bad:?}");
            assert!(
                matches!(e.problem, CheckpointProblem::BadPointer(_)),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains("bad latest pointer"), "{e}");
        }
    }

    #[test]
    fn a_pointer_to_an_incomplete_folder_is_refused() {
        for (files, missing) in [
            (&[MODEL_FILE][..], STATE_FILE),
            (&[STATE_FILE][..], MODEL_FILE),
            (&[][..], STATE_FILE),
        ] {
            let dir = TempDir::new();
            checkpoint_folder(&dir.0.join("epoch-001"), files);
            fs::write(dir.0.join(LATEST_FILE), "epoch-001\n").unwrap();
            let e = resolve_checkpoint(&dir.0).unwrap_err();
            assert_eq!(e.path, dir.0.join("epoch-001"));
            assert!(
                matches!(e.problem, CheckpointProblem::PointerTargetIncomplete(f) if f == missing),
                "{e}"
            );
            assert!(e.to_string().contains(missing), "{e}");
        }
        // A pointer to a folder that does not exist at all.
        let dir = TempDir::new();
        fs::write(dir.0.join(LATEST_FILE), "epoch-009\n").unwrap();
        let e = resolve_checkpoint(&dir.0).unwrap_err();
        assert!(matches!(
            e.problem,
            CheckpointProblem::PointerTargetIncomplete(STATE_FILE)
        ));
    }

    /// Killed between moving a folder aside and renaming its replacement into place: the
    /// pointer names a missing folder, and the newest complete checkpoint is taken — here the
    /// one moved aside, newer than the other folders.
    #[test]
    fn a_pointer_to_a_missing_folder_recovers_the_newest_complete_checkpoint() {
        let dir = TempDir::new();
        checkpoint_folder(&dir.0.join("epoch-001"), &[STATE_FILE, MODEL_FILE]);
        checkpoint_folder(
            &dir.0.join("epoch-002-step-000040"),
            &[STATE_FILE, MODEL_FILE],
        );
        checkpoint_folder(
            &dir.0.join(".old-epoch-002-4242"),
            &[STATE_FILE, MODEL_FILE],
        );
        // Unfinished: never taken, however new.
        checkpoint_folder(&dir.0.join("epoch-003"), &[MODEL_FILE]);
        checkpoint_folder(
            &dir.0.join(".tmp-epoch-004-4242"),
            &[STATE_FILE, MODEL_FILE],
        );
        fs::write(dir.0.join(LATEST_FILE), "epoch-002\n").unwrap();
        let found = locate_checkpoint(&dir.0).unwrap();
        assert_eq!(found.folder, dir.0.join(".old-epoch-002-4242"));
        let why = found.recovered.expect("says it recovered");
        assert!(
            why.contains("epoch-002") && why.contains("interrupted"),
            "{why}"
        );
        // Without the folder moved aside, the partial checkpoint of epoch 2 is the newest.
        fs::remove_dir_all(dir.0.join(".old-epoch-002-4242")).unwrap();
        assert_eq!(
            resolve_checkpoint(&dir.0).unwrap(),
            dir.0.join("epoch-002-step-000040")
        );
        // Killed before the first pointer was written: the folder is still found.
        fs::remove_file(dir.0.join(LATEST_FILE)).unwrap();
        let found = locate_checkpoint(&dir.0).unwrap();
        assert_eq!(found.folder, dir.0.join("epoch-002-step-000040"));
        assert!(found.recovered.unwrap().contains("no latest pointer"));
        // A pointer that is followed says nothing.
        fs::write(dir.0.join(LATEST_FILE), "epoch-001").unwrap();
        assert_eq!(locate_checkpoint(&dir.0).unwrap().recovered, None);
    }

    #[test]
    fn checkpoint_names_order_by_epoch_then_step() {
        assert_eq!(checkpoint_order("epoch-007"), Some((7, u64::MAX)));
        assert_eq!(checkpoint_order("epoch-007-step-000120"), Some((7, 120)));
        assert!(checkpoint_order("epoch-007-step-000120") < checkpoint_order("epoch-007"));
        assert!(checkpoint_order("epoch-007") < checkpoint_order("epoch-008-step-000001"));
        for bad in [
            "epoch-",
            "epoch-x",
            "epoch-1-step-",
            "epoch-+1",
            "latest",
            ".tmp-epoch-1",
        ] {
            assert_eq!(checkpoint_order(bad), None, "{bad}");
        }
    }

    #[test]
    fn neither_is_refused() {
        let dir = TempDir::new();
        let e = resolve_checkpoint(&dir.0).unwrap_err();
        assert_eq!(e.path, dir.0);
        assert!(matches!(e.problem, CheckpointProblem::NotACheckpoint(_)));
        let text = e.to_string();
        assert!(
            text.contains("no checkpoint here") && text.contains("not a checkpoint"),
            "{text}"
        );
        // A path that does not exist.
        let gone = dir.0.join("nonexistent");
        let e = resolve_checkpoint(&gone).unwrap_err();
        assert_eq!(e.path, gone);
        // A folder with only one of the two files, and no pointer: the missing one is named.
        checkpoint_folder(&dir.0, &[MODEL_FILE]);
        let e = resolve_checkpoint(&dir.0).unwrap_err();
        assert!(e.to_string().contains("state.json is missing"), "{e}");
    }
}
