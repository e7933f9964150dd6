//! The checkpoint folder's lock and tidying, in a test binary of their own: a test that
//! spawns processes beside them would hold a forked copy of the lock file until its exec,
//! and make "the lock is free again" flaky.

use std::fs;

use runtime::CheckpointWriter;

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// A checkpoint folder takes one run at a time: while a writer holds it, a second writer (as
/// a second `sparse-train` would) is refused with an error naming the folder; the lock goes
/// with its holder. The folder is then tidied: a checkpoint moved aside by an interrupted
/// write comes back, unfinished copies and pointers go.
#[test]
fn a_checkpoint_folder_takes_one_run_and_is_tidied() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let first = CheckpointWriter::new(&ck, 3).unwrap();
    let clone = first.clone();
    let e = CheckpointWriter::new(&ck, 3).unwrap_err().to_string();
    assert!(
        e.contains(s(&ck)) && e.contains("in use by another run"),
        "{e}"
    );
    drop(first);
    // A clone keeps the lock.
    assert!(CheckpointWriter::new(&ck, 3).is_err());
    drop(clone);

    // Leftovers of a write interrupted between its two renames: epoch-002 moved aside, its
    // replacement still in .tmp, latest naming epoch-002.
    fs::create_dir(ck.join(".old-epoch-002-4242")).unwrap();
    fs::write(ck.join(".old-epoch-002-4242").join("state.json"), "{}").unwrap();
    fs::create_dir(ck.join(".tmp-epoch-002-4242")).unwrap();
    fs::write(ck.join(".latest-4242"), "epoch-002\n").unwrap();
    // A superseded copy: epoch-001 is there, its old copy goes.
    fs::create_dir(ck.join("epoch-001")).unwrap();
    fs::create_dir(ck.join(".old-epoch-001-7")).unwrap();
    let _w = CheckpointWriter::new(&ck, 3).unwrap();
    assert!(ck.join("epoch-002").join("state.json").is_file());
    assert!(ck.join("epoch-001").is_dir());
    let hidden: Vec<String> = fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.') && n != ".lock")
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}
