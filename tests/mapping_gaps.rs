//! A mapping with gaps (indices 1, 3, 2000), as PyTorch writes it: the
//! input set holds files of the indices used only, each `-of-02000`, and
//! the output is one file per index that holds a tensor, named as
//! PyTorch names it, not 1,997 empty files besides.

mod common;
use common::*;
use serde_json::json;
use std::path::Path;

/// The PyTorch fixture saved with a mapping using indices 1 and 2000
/// (its files 1 and 2 renamed so): what HuggingFaceStorageWriter leaves
/// for `fqn_to_index_mapping` values 1 and 2000. Returns the fixture's
/// mapping, its file 2 now index 2000.
fn gapped_input(dir: &Path) -> serde_json::Map<String, serde_json::Value> {
    for rank in 1..=2 {
        for (from, to) in [(1, 1), (2, 2000)] {
            std::fs::rename(
                dir.join(format!(
                    "shard-{rank:05}-model-{from:05}-of-00002.safetensors"
                )),
                dir.join(format!(
                    "shard-{rank:05}-model-{to:05}-of-02000.safetensors"
                )),
            )
            .unwrap();
        }
    }
    let mapping: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("mapping.json")).unwrap()).unwrap();
    let mut mapping = mapping.as_object().unwrap().clone();
    for index in mapping.values_mut() {
        if index == &json!(2) {
            *index = json!(2000);
        }
    }
    mapping
}

fn write_mapping(path: &Path, mapping: &serde_json::Map<String, serde_json::Value>) {
    std::fs::write(path, serde_json::to_vec(mapping).unwrap()).unwrap();
}

#[test]
fn a_mapping_with_gaps_writes_the_indices_that_hold_tensors_only() {
    let input = copy_fixture();
    let mut mapping = gapped_input(input.path());
    // One tensor moves to index 3, which no input file is named after.
    mapping["model.norm.weight"] = json!(3);
    let map_file = tempfile::NamedTempFile::new().unwrap();
    write_mapping(map_file.path(), &mapping);
    let out = tempfile::tempdir().unwrap();
    let args = [
        "--mapping",
        s(map_file.path()),
        s(input.path()),
        s(out.path()),
    ];
    consolidate_ok(2, &args);
    assert_eq!(
        names(out.path()),
        [
            "model-00001-of-02000.safetensors",
            "model-00003-of-02000.safetensors",
            "model-02000-of-02000.safetensors",
            "model.safetensors.index.json",
        ]
    );
    assert_matches_manifest(out.path(), &torch_fixture().join("manifest.json"));
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        index["weight_map"]["model.norm.weight"],
        "model-00003-of-02000.safetensors"
    );
    assert_eq!(
        index["weight_map"]["lm_head.weight"],
        "model-02000-of-02000.safetensors"
    );
}

#[test]
fn a_gap_in_the_input_set_is_not_a_missing_file_but_a_lost_file_still_is() {
    let input = copy_fixture();
    let mapping = gapped_input(input.path());
    write_mapping(&input.path().join("mapping.json"), &mapping);
    // Every index some rank wrote must come from every rank: rank 2's file
    // of index 2000 is missing, indices 2..1999 are not.
    std::fs::remove_file(
        input
            .path()
            .join("shard-00002-model-02000-of-02000.safetensors"),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let map_file = input.path().join("mapping.json");
    let args = ["--mapping", s(&map_file), s(input.path()), s(out.path())];
    assert_fails(
        1,
        &args,
        input.path(),
        out.path(),
        &[
            "1 shard file missing from the set of 2 ranks x 2000 output files: \
             shard-00002-model-02000-of-02000.safetensors\n",
        ],
    );
}

#[test]
fn an_index_whose_tensors_are_all_left_out_gets_no_file() {
    // --include keeps the tensors of file 1 only: file 2 of the mapping
    // would be empty, so it is not written (the index names file 1 only).
    let input = copy_fixture();
    let out = tempfile::tempdir().unwrap();
    let map_file = input.path().join("mapping.json");
    let args = [
        "--mapping",
        s(&map_file),
        "--include",
        "model.embed_tokens.weight",
        s(input.path()),
        s(out.path()),
    ];
    consolidate_ok(1, &args);
    assert_eq!(
        names(out.path()),
        [
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json"
        ]
    );
}
