//! The balanced schedule: every rank busy, outputs byte-identical to the
//! modulo schedule's, for 1 to 8 ranks.

mod common;
use common::*;
use std::path::Path;

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

#[test]
fn shared_header_reading_gives_the_same_plan_and_outputs() {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &[
            "--layout", "2d", "--ranks", "6", "--files", "5", "--layers", "5", "--hidden", "24",
            "--vocab", "77",
        ],
    );
    let mapping = ckpt.path().join("mapping.json");
    let dry = |headers: &str| {
        let run = consolidate_ok(
            3,
            &[
                "--dry-run",
                "--headers",
                headers,
                "--mapping",
                s(&mapping),
                s(ckpt.path()),
                "unused",
            ],
        );
        String::from_utf8_lossy(&run.stdout).into_owned()
    };
    let all = dry("all");
    assert!(all.contains("5 output files"), "{all}");
    assert_eq!(dry("shared"), all);

    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    consolidate_ok(3, &["--mapping", s(&mapping), s(ckpt.path()), s(a.path())]);
    let report = b.path().join("report.json");
    consolidate_ok(
        3,
        &[
            "--headers",
            "shared",
            "--report",
            s(&report),
            "--mapping",
            s(&mapping),
            s(ckpt.path()),
            s(b.path()),
        ],
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    std::fs::remove_file(b.path().join("report.json")).unwrap();
    assert_eq!(contents(a.path()), contents(b.path()));
    // 30 shard files over 3 ranks: 10 headers each, not 30.
    let read: Vec<u64> = report["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["header_files_read"].as_u64().unwrap())
        .collect();
    assert_eq!(read, [10, 10, 10]);
}

#[test]
fn shared_header_reading_still_names_a_bad_file() {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &["--layout", "mixed", "--ranks", "3", "--files", "2"],
    );
    // File 4 (from 0) in sorted order is read by rank 4 % 3 = 1.
    let victim = ckpt
        .path()
        .join("shard-00003-model-00001-of-00002.safetensors");
    std::fs::write(&victim, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ").unwrap();
    let out = tempfile::tempdir().unwrap();
    let text = assert_fails(
        3,
        &["--headers", "shared", s(ckpt.path()), s(out.path())],
        ckpt.path(),
        out.path(),
        &[
            "shard-00003-model-00001-of-00002.safetensors",
            "not valid JSON",
        ],
    );
    assert!(text.contains("rank 1: error"), "{text}");
}

#[test]
fn dry_run_previews_any_number_of_ranks() {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        // ~15 MB: 230 KB per rank, so 4 KiB block alignment costs under 2%.
        ckpt.path(),
        &[
            "--layout", "mixed", "--ranks", "4", "--files", "4", "--layers", "8", "--hidden",
            "256", "--vocab", "4000",
        ],
    );
    let mapping = ckpt.path().join("mapping.json");
    let run = consolidate_ok(
        0,
        &[
            "--dry-run",
            "--ranks",
            "64",
            "--mapping",
            s(&mapping),
            s(ckpt.path()),
            "unused",
        ],
    );
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(text.contains("4 output files on 64 ranks"), "{text}");
    let (_, modulo_idle) = balance(&text, "modulo");
    let (ratio, balanced_idle) = balance(&text, "balanced");
    assert_eq!(modulo_idle, 60, "modulo leaves 60 of 64 ranks idle: {text}");
    assert_eq!(balanced_idle, 0, "{text}");
    assert!(ratio <= 1.05, "balanced max/mean {ratio}");
}
