//! The balanced schedule: every rank busy, outputs byte-identical to the
//! modulo schedule's, for 1 to 8 ranks.

mod common;
use common::*;
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    snapshot(dir)
        .into_iter()
        .map(|(p, b)| (p.file_name().unwrap().to_string_lossy().into_owned(), b))
        .collect()
}

#[test]
fn balanced_on_one_output_file_keeps_all_ranks_writing() {
    // ~20 MB in a single output file.
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &[
            "--layout", "mixed", "--ranks", "4", "--files", "1", "--layers", "4", "--hidden",
            "256", "--vocab", "4000",
        ],
    );
    let modulo = tempfile::tempdir().unwrap();
    consolidate_ok(4, &[s(ckpt.path()), s(modulo.path())]);
    let balanced = tempfile::tempdir().unwrap();
    let report = balanced.path().join("report.json");
    consolidate_ok(
        4,
        &[
            "--schedule",
            "balanced",
            "--verify",
            "--report",
            s(&report),
            s(ckpt.path()),
            s(balanced.path()),
        ],
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    std::fs::remove_file(balanced.path().join("report.json")).unwrap();
    assert_eq!(contents(modulo.path()), contents(balanced.path()));
    assert_matches_manifest(balanced.path(), &ckpt.path().join("manifest.json"));
    let bytes: Vec<u64> = report["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["bytes"].as_u64().unwrap())
        .collect();
    assert!(bytes.iter().all(|&b| b > 0), "every rank writes: {bytes:?}");
    let (max, min) = (
        *bytes.iter().max().unwrap() as f64,
        *bytes.iter().min().unwrap() as f64,
    );
    assert!(max / min < 1.01, "{bytes:?}");
}

#[test]
fn outputs_are_identical_across_schedules_and_rank_counts() {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(ckpt.path(), &["--layout", "zoo", "--ranks", "6"]);
    let mapping = ckpt.path().join("mapping.json");
    let reference = tempfile::tempdir().unwrap();
    consolidate_ok(
        1,
        &[
            "--mapping",
            s(&mapping),
            s(ckpt.path()),
            s(reference.path()),
        ],
    );
    assert_matches_manifest(reference.path(), &ckpt.path().join("manifest.json"));
    let expected = contents(reference.path());
    for ranks in 1..=8 {
        for schedule in ["modulo", "balanced"] {
            let out = tempfile::tempdir().unwrap();
            consolidate_ok(
                ranks,
                &[
                    "--schedule",
                    schedule,
                    "--threads",
                    "1",
                    "--mapping",
                    s(&mapping),
                    s(ckpt.path()),
                    s(out.path()),
                ],
            );
            assert!(
                contents(out.path()) == expected,
                "{ranks} ranks, {schedule}"
            );
        }
    }
    // With --dtype too, where block boundaries must not split elements.
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    consolidate_ok(
        1,
        &[
            "--dtype",
            "bf16",
            "--mapping",
            s(&mapping),
            s(ckpt.path()),
            s(a.path()),
        ],
    );
    consolidate_ok(
        7,
        &[
            "--dtype",
            "bf16",
            "--schedule",
            "balanced",
            "--mapping",
            s(&mapping),
            s(ckpt.path()),
            s(b.path()),
        ],
    );
    assert!(contents(a.path()) == contents(b.path()));
}
