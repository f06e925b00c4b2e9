//! End-to-end: the real binary, under `mpirun -n 1, 2, 4`, reproduces every
//! tensor of the PyTorch-written fixture and of generated checkpoints, bit
//! for bit.

mod common;
use common::*;
use std::path::Path;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn torch_fixture_is_reproduced_on_1_2_and_4_ranks() {
    let input = torch_fixture();
    let mapping = input.join("mapping.json");
    let before = snapshot(&input);
    let mut outputs = Vec::new();
    let mut dirs = Vec::new();
    for ranks in [1, 2, 4] {
        let out = tempfile::tempdir().unwrap();
        consolidate_ok(
            ranks,
            &["--mapping", path(&mapping), path(&input), path(out.path())],
        );
        assert_matches_manifest(out.path(), &input.join("manifest.json"));
        assert_eq!(
            names(out.path()),
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json"
            ]
        );
        outputs.push(snapshot(out.path()).into_values().collect::<Vec<_>>());
        dirs.push(out);
    }
    // Byte-identical outputs whatever the number of ranks.
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(snapshot(&input), before, "inputs must be untouched");
}

#[test]
fn torch_fixture_runs_without_a_launcher() {
    let input = torch_fixture();
    let out = tempfile::tempdir().unwrap();
    let mapping = input.join("mapping.json");
    consolidate_ok(
        0,
        &["--mapping", path(&mapping), path(&input), path(out.path())],
    );
    assert_matches_manifest(out.path(), &input.join("manifest.json"));
}

#[test]
fn every_dtype_and_awkward_shape_on_many_source_ranks() {
    // The zoo: all 19 dtypes (integer, bool and fp8 included), 0-D, 4-D and
    // 6-D tensors, empty tensors, empty pieces, uneven chunks, 2-D meshes and
    // replicas saved by several ranks.
    for source_ranks in ["1", "3", "4", "16"] {
        let ckpt = tempfile::tempdir().unwrap();
        make_shards(
            ckpt.path(),
            &[
                "--layout",
                "zoo",
                "--ranks",
                source_ranks,
                "--seed",
                source_ranks,
            ],
        );
        let mapping = ckpt.path().join("mapping.json");
        for ranks in [1, 2, 4] {
            let out = tempfile::tempdir().unwrap();
            consolidate_ok(
                ranks,
                &[
                    "--mapping",
                    path(&mapping),
                    path(ckpt.path()),
                    path(out.path()),
                ],
            );
            assert_matches_manifest(out.path(), &ckpt.path().join("manifest.json"));
        }
    }
}

#[test]
fn model_layouts_row_column_mesh_and_fsdp() {
    for (layout, source_ranks, dtype) in [
        ("mixed", "8", "bf16"),
        ("tp", "4", "f32"),
        ("2d", "6", "f16"),
        ("fsdp", "5", "i64"),
    ] {
        let ckpt = tempfile::tempdir().unwrap();
        make_shards(
            ckpt.path(),
            &[
                "--layout",
                layout,
                "--ranks",
                source_ranks,
                "--dtype",
                dtype,
                "--files",
                "3",
                "--layers",
                "3",
                "--hidden",
                "40",
                "--vocab",
                "333",
            ],
        );
        let mapping = ckpt.path().join("mapping.json");
        for ranks in [1, 2, 4] {
            let out = tempfile::tempdir().unwrap();
            consolidate_ok(
                ranks,
                &[
                    "--mapping",
                    path(&mapping),
                    path(ckpt.path()),
                    path(out.path()),
                ],
            );
            assert_matches_manifest(out.path(), &ckpt.path().join("manifest.json"));
            assert_eq!(
                names(out.path()).len(),
                4,
                "{layout}: 3 files and the index"
            );
        }
    }
}
