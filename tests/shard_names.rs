//! Shards are recognised by content, as PyTorch's and NeMo's consolidation
//! recognise them: every `*.safetensors` of INPUT_DIR carrying
//! `DCP_SHARDING_INFO` is a shard, whatever it is called. And NeMo's
//! `.hf_metadata` folder: its mapping, dtype map and assets (subfolders
//! whole) without any option.

mod common;
use common::*;
use std::path::Path;

/// A one-rank checkpoint whose shards are renamed `model-IIIII-of-NNNNN`
/// (as NeMo's own tests save them) or to any other name.
fn renamed_checkpoint(dir: &Path, rename: impl Fn(u32, u32) -> String) {
    make_shards(dir, &["--layout", "zoo", "--ranks", "1", "--seed", "11"]);
    for name in names(dir) {
        let Some((_, index, count)) =
            st_consolidate_mpi::safetensors::naming::parse_shard_name(&name)
        else {
            continue;
        };
        std::fs::rename(dir.join(&name), dir.join(rename(index, count))).unwrap();
    }
}

#[test]
fn shards_named_like_outputs_or_anything_else_consolidate_bit_exact() {
    type Rename = fn(u32, u32) -> String;
    let cases: [(&str, Rename); 2] = [
        ("model", |i, n| {
            format!("model-{i:05}-of-{n:05}.safetensors")
        }),
        ("other", |i, _| format!("rank0-part{i}.safetensors")),
    ];
    for (what, rename) in cases {
        let ckpt = tempfile::tempdir().unwrap();
        renamed_checkpoint(ckpt.path(), rename);
        assert!(
            !names(ckpt.path()).iter().any(|n| n.starts_with("shard-")),
            "{what}"
        );
        let mapping = ckpt.path().join("mapping.json");
        for ranks in [0, 2] {
            let out = tempfile::tempdir().unwrap();
            let run = consolidate_ok(
                ranks,
                &["--mapping", s(&mapping), s(ckpt.path()), s(out.path())],
            );
            assert!(stderr(&run).contains("consolidating"), "{what}");
            assert_matches_manifest(out.path(), &ckpt.path().join("manifest.json"));
        }
    }
}

#[test]
fn a_safetensors_file_without_sharding_info_among_shards_is_refused_by_name() {
    let ckpt = tempfile::tempdir().unwrap();
    renamed_checkpoint(ckpt.path(), |i, n| {
        format!("model-{i:05}-of-{n:05}.safetensors")
    });
    // A plain safetensors file (no DCP_SHARDING_INFO) under another name.
    let stray = ckpt.path().join("adapter.safetensors");
    let header = br#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[1, 2]);
    std::fs::write(&stray, bytes).unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let mapping = ckpt.path().join("mapping.json");
    assert_fails(
        2,
        &["--mapping", s(&mapping), s(ckpt.path()), s(&out)],
        ckpt.path(),
        &out,
        &["adapter.safetensors: not a DCP shard"],
    );
}

#[test]
fn nemo_hf_metadata_gives_mapping_dtype_map_and_assets_with_subfolders() {
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    make_shards(&model, &["--layout", "zoo", "--ranks", "2", "--seed", "12"]);
    let meta = model.join(".hf_metadata");
    std::fs::create_dir_all(meta.join("1_Pooling")).unwrap();
    std::fs::rename(
        model.join("mapping.json"),
        meta.join("fqn_to_file_index_mapping.json"),
    )
    .unwrap();
    std::fs::write(meta.join("fqn_to_dtype_mapping.json"), b"{}").unwrap();
    std::fs::write(meta.join("config.json"), br#"{"torch_dtype": "float32"}"#).unwrap();
    std::fs::write(meta.join("tokenizer.json"), b"{}").unwrap();
    std::fs::write(meta.join("1_Pooling/config.json"), b"{\"mean\": true}").unwrap();
    std::fs::write(meta.join("1_Pooling/weights.safetensors"), b"not copied").unwrap();

    let out = model.join("consolidated");
    let report = work.path().join("report.json");
    let run = consolidate_ok(
        2,
        &[
            "--dtype",
            "bf16",
            "--report",
            s(&report),
            s(&model),
            s(&out),
        ],
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let taken = report["input"]["from_hf_metadata"].as_array().unwrap();
    assert_eq!(taken.len(), 3, "{taken:?}");
    assert!(
        taken[0]
            .as_str()
            .unwrap()
            .ends_with("fqn_to_file_index_mapping.json")
    );
    assert!(
        taken[1]
            .as_str()
            .unwrap()
            .ends_with("fqn_to_dtype_mapping.json")
    );
    assert!(taken[2].as_str().unwrap().starts_with("assets: "));
    let text = stderr(&run);
    assert!(
        text.contains("fqn_to_file_index_mapping.json as the mapping")
            && text.contains("fqn_to_dtype_mapping.json as the dtype map"),
        "{text}"
    );
    let mut files = names(&out);
    files.retain(|n| !n.ends_with(".safetensors"));
    assert_eq!(
        files,
        [
            "1_Pooling",
            "config.json",
            "model.safetensors.index.json",
            "tokenizer.json"
        ]
    );
    assert_eq!(names(&out.join("1_Pooling")), ["config.json"]);
    assert_eq!(
        std::fs::read(out.join("1_Pooling/config.json")).unwrap(),
        b"{\"mean\": true}"
    );
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(config.contains("\"torch_dtype\": \"bfloat16\""), "{config}");
    // The mapping spread the tensors over its files.
    let index = std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap();
    assert!(index.contains("-of-0000"), "{index}");

    // --no-hf-metadata: no mapping (everything in one file), no assets.
    let plain = work.path().join("plain");
    let run = consolidate_ok(
        0,
        &[
            "--no-hf-metadata",
            "--unmapped",
            "last",
            s(&model),
            s(&plain),
        ],
    );
    assert!(!stderr(&run).contains(".hf_metadata"), "{}", stderr(&run));
    assert_eq!(
        names(&plain),
        [
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json"
        ]
    );
}
