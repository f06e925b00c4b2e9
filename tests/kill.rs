//! A run killed part-way leaves nothing under a final name, and the next run
//! cleans up and succeeds.

mod common;
use common::*;
use std::path::Path;

fn finals(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect()
}

#[test]
fn a_killed_run_leaves_no_final_file_and_a_rerun_succeeds() {
    // About 1 GB of column-sharded tensors: a couple of seconds of copying.
    // Under both schedules: with `balanced`, both ranks write into each file.
    let ckpt = tempfile::tempdir().unwrap();
    let args = [
        "--layout", "tp", "--ranks", "8", "--files", "4", "--layers", "9", "--hidden", "2048",
        "--vocab", "32000",
    ];
    make_shards(ckpt.path(), &args);
    for schedule in ["modulo", "balanced"] {
        kill_and_rerun(ckpt.path(), schedule);
    }
}

fn kill_and_rerun(ckpt: &Path, schedule: &str) {
    let mapping = ckpt.join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    kill_mid_copy(
        &[
            "--schedule",
            schedule,
            "--threads",
            "1",
            "--mapping",
            s(&mapping),
            s(ckpt),
            s(out.path()),
        ],
        out.path(),
    );
    assert_eq!(
        finals(out.path()),
        Vec::<String>::new(),
        "{schedule}: no final-named file or index"
    );

    // The rerun removes the stale temporaries and succeeds, verified.
    consolidate_ok(
        2,
        &[
            "--verify",
            "--schedule",
            schedule,
            "--mapping",
            s(&mapping),
            s(ckpt),
            s(out.path()),
        ],
    );
    assert!(
        !names(out.path()).iter().any(|n| n.starts_with('.')),
        "{:?}",
        names(out.path())
    );
    assert_matches_manifest(out.path(), &ckpt.join("manifest.json"));
}
