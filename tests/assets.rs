//! `--hf-assets DIR`: the files besides the weights are copied into
//! OUTPUT_DIR with their subfolders (never weights, indices or hidden files), config.json follows
//! `--dtype`, and existing files need `--overwrite`.

mod common;
use common::*;
use std::path::Path;

/// Everything an original model folder holds: assets and weights.
fn model_folder(dir: &Path, config: &str) {
    std::fs::create_dir_all(dir.join("subfolder")).unwrap();
    for (name, text) in [
        ("config.json", config),
        ("generation_config.json", r#"{"do_sample": false}"#),
        ("tokenizer.json", r#"{"model": {}}"#),
        ("tokenizer_config.json", "{}"),
        ("special_tokens_map.json", "{}"),
        ("chat_template.jinja", "{{ messages }}"),
        ("merges.txt", "a b\n"),
        ("modeling_custom.py", "import torch\n"),
        ("README.md", "# model\n"),
        ("model.safetensors", "weights"),
        ("model-00001-of-00002.safetensors", "weights"),
        ("model.safetensors.index.json", "{}"),
        ("pytorch_model.bin", "weights"),
        ("pytorch_model.bin.index.json", "{}"),
        ("optimizer.pt", "weights"),
        ("rng.pth", "weights"),
        (".gitattributes", "hidden"),
        ("subfolder/inner.json", "{}"),
        ("subfolder/weights.safetensors", "weights"),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

const ASSETS: [&str; 9] = [
    "README.md",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "merges.txt",
    "modeling_custom.py",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

#[test]
fn every_asset_and_no_weight_is_copied_and_listed() {
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let assets = dir.path().join("orig");
    let config = r#"{"torch_dtype": "float32", "hidden_size": 16}"#;
    model_folder(&assets, config);
    let before = snapshot(&assets);
    let out = dir.path().join("out");
    let report = dir.path().join("report.json");
    let mapping = input.join("mapping.json");
    let args = [
        "--hf-assets",
        s(&assets),
        "--report",
        s(&report),
        "--mapping",
        s(&mapping),
    ];
    let mut args = args.to_vec();
    args.extend([s(&input), s(&out)]);
    let text = stderr(&consolidate_ok(2, &args));
    assert_eq!(
        snapshot(&assets),
        before,
        "the assets folder is left as it was"
    );
    let copied: Vec<String> = names(&out)
        .into_iter()
        .filter(|n| !n.starts_with("model-") && !n.starts_with("model.safetensors"))
        .collect();
    // Subfolders are copied whole, without their weights.
    let mut expected: Vec<&str> = ASSETS.to_vec();
    expected.push("subfolder");
    expected.sort();
    assert_eq!(copied, expected, "{:?}", names(&out));
    assert_eq!(names(&out.join("subfolder")), ["inner.json"]);
    for name in ASSETS {
        let (a, b) = (
            std::fs::read(assets.join(name)),
            std::fs::read(out.join(name)),
        );
        assert_eq!(
            a.unwrap(),
            b.unwrap(),
            "{name}: copied as it is without --dtype"
        );
    }
    // The weights are the consolidated ones, not the folder's.
    assert_matches_manifest(&out, &input.join("manifest.json"));
    assert!(
        text.contains("copied 10 files besides the weights: README.md, chat_template.jinja"),
        "{text}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let mut listed: Vec<&str> = ASSETS.to_vec();
    listed.push("subfolder/inner.json");
    listed.sort();
    assert_eq!(report["assets"], serde_json::json!(listed));
}

/// The config.json a `--dtype bf16 --hf-assets` run writes from a model
/// folder holding `config`.
fn config_after_bf16_export(config: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let assets = dir.path().join("orig");
    model_folder(&assets, config);
    let out = dir.path().join("out");
    let input = torch_fixture();
    let args = [
        "--dtype",
        "bf16",
        "--hf-assets",
        s(&assets),
        s(&input),
        s(&out),
    ];
    consolidate_ok(1, &args);
    serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap()
}

#[test]
fn dtype_updates_the_config_field_present() {
    for (config, field) in [
        (
            r#"{"torch_dtype": "float32", "vocab_size": 7}"#,
            "torch_dtype",
        ),
        (r#"{"dtype": "float32", "vocab_size": 7}"#, "dtype"),
        (r#"{"vocab_size": 7}"#, "dtype"),
    ] {
        let got = config_after_bf16_export(config);
        let mut want: serde_json::Value = serde_json::from_str(config).unwrap();
        want[field] = "bfloat16".into();
        assert_eq!(got, want, "{config}");
    }
}

#[test]
fn existing_assets_need_overwrite() {
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let assets = dir.path().join("orig");
    model_folder(&assets, "{}");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("tokenizer.json"), "mine").unwrap();
    let args = ["--hf-assets", s(&assets), s(&input), s(&out)];
    let run = consolidate(2, &args);
    let text = stderr(&run);
    assert!(!run.status.success(), "{text}");
    assert!(
        text.contains("already holds tokenizer.json (files --hf-assets would copy)"),
        "{text}"
    );
    assert!(text.contains("hint: pass --overwrite"), "{text}");
    assert_eq!(names(&out), ["tokenizer.json"]);
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), b"mine");
    let mut args = args.to_vec();
    args.insert(0, "--overwrite");
    consolidate_ok(2, &args);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"{\"model\": {}}"
    );
}

#[test]
fn a_tied_lm_head_missing_from_the_shards_is_a_note() {
    let input = torch_fixture();
    let mapping = input.join("mapping.json");
    for (config, expected, unexpected) in [
        (
            r#"{"tie_word_embeddings": true}"#,
            "note: 'lm_head.weight'",
            "warning:",
        ),
        (
            r#"{"tie_word_embeddings": false}"#,
            "warning: 'lm_head.weight'",
            "note:",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let assets = dir.path().join("orig");
        model_folder(&assets, config);
        let out = dir.path().join("out");
        let args = [
            "--exclude",
            "lm_head.weight",
            "--mapping",
            s(&mapping),
            "--hf-assets",
            s(&assets),
            s(&input),
            s(&out),
        ];
        let text = stderr(&consolidate_ok(2, &args));
        assert_eq!(text.matches(expected).count(), 1, "{text}");
        assert!(!text.contains(unexpected), "{text}");
        assert!(!output_tensors(&out).contains_key("lm_head.weight"));
    }
}

/// The run's assets besides the weights in `out`, and the inode of each.
fn asset_inodes(out: &Path) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    names(out)
        .into_iter()
        .filter(|n| ASSETS.contains(&n.as_str()))
        .map(|n| {
            let ino = std::fs::metadata(out.join(&n)).unwrap().ino();
            (n, ino)
        })
        .collect()
}

#[test]
fn under_resume_an_equal_asset_is_kept_and_another_one_needs_overwrite() {
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let assets = dir.path().join("orig");
    model_folder(&assets, r#"{"torch_dtype": "float32"}"#);
    let out = dir.path().join("out");
    let args = [
        "--dtype",
        "bf16",
        "--hf-assets",
        s(&assets),
        s(&input),
        s(&out),
    ];
    consolidate_ok(2, &args);
    let index = out.join("model.safetensors.index.json");
    // A run killed after renaming its assets, before the index: resuming
    // keeps them (config.json compared as --dtype rewrites it).
    std::fs::remove_file(&index).unwrap();
    let before = asset_inodes(&out);
    assert_eq!(before.len(), ASSETS.len());
    let mut resume = args.to_vec();
    resume.insert(0, "--resume");
    let text = stderr(&consolidate_ok(2, &resume));
    assert!(
        text.contains("resume: keeping 10 asset(s) already in"),
        "{text}"
    );
    assert_eq!(asset_inodes(&out), before, "kept, not rewritten");
    assert!(index.exists());

    // The user's own README.md: refused, as without --resume, and untouched.
    std::fs::write(out.join("README.md"), "my notes\n").unwrap();
    let run = consolidate(2, &resume);
    let text = stderr(&run);
    assert!(!run.status.success(), "{text}");
    assert!(
        text.contains(
            "already holds README.md (files --hf-assets would copy, with other contents)"
        ),
        "{text}"
    );
    assert!(text.contains("hint: pass --overwrite"), "{text}");
    assert_eq!(std::fs::read(out.join("README.md")).unwrap(), b"my notes\n");
    assert!(
        !text.contains("consolidating"),
        "refused before copying: {text}"
    );

    resume.insert(0, "--overwrite");
    consolidate_ok(2, &resume);
    assert_eq!(std::fs::read(out.join("README.md")).unwrap(), b"# model\n");
}

#[test]
fn weights_of_every_format_and_the_checkpoint_itself_are_not_assets() {
    // --hf-assets pointing at the DCP checkpoint itself, OUTPUT_DIR inside it.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let fixture = torch_fixture().join("../torch-dcpfs-w2/checkpoint");
    for name in [".metadata", "__0_0.distcp", "__1_0.distcp"] {
        std::fs::copy(fixture.join(name), ckpt.join(name)).unwrap();
    }
    for name in [
        "tf_model.h5",
        "flax_model.msgpack",
        "model-q4_k_m.gguf",
        "last.ckpt",
        "model.onnx",
    ] {
        std::fs::write(ckpt.join(name), "weights").unwrap();
    }
    std::fs::write(ckpt.join("config.json"), "{}").unwrap();
    let out = ckpt.join("out");
    let args = ["--hf-assets", s(&ckpt), s(&ckpt), s(&out)];
    let text = stderr(&consolidate_ok(2, &args));
    let copied: Vec<String> = names(&out)
        .into_iter()
        .filter(|n| !n.starts_with("model-") && !n.starts_with("model.safetensors"))
        .collect();
    assert_eq!(copied, ["config.json"], "{text}");
    assert!(
        text.contains("copied 1 file besides the weights: config.json"),
        "{text}"
    );
}

#[test]
fn a_dangling_link_is_named_before_any_weight_is_copied() {
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let assets = dir.path().join("snapshot");
    model_folder(&assets, "{}");
    // A Hugging Face cache snapshot whose blob was never downloaded.
    std::fs::remove_file(assets.join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink("../blobs/4f2a9c", assets.join("tokenizer.json")).unwrap();
    let out = dir.path().join("out");
    let args = ["--hf-assets", s(&assets), s(&input), s(&out)];
    let link = assets.join("tokenizer.json");
    let text = assert_fails(
        2,
        &args,
        &input,
        &out,
        &[
            s(&link),
            "is a link to ../blobs/4f2a9c, which does not exist",
        ],
    );
    assert!(!text.contains("consolidating"), "{text}");
    assert!(names(&out).is_empty(), "{:?}", names(&out));
}

#[test]
fn an_unusable_assets_folder_or_config_is_found_before_the_copy() {
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // --overwrite: no check of existing files lists the folder early.
    let missing = dir.path().join("no-such-folder");
    let args = [
        "--overwrite",
        "--hf-assets",
        s(&missing),
        s(&input),
        s(&out),
    ];
    let text = assert_fails(2, &args, &input, &out, &["no-such-folder"]);
    assert!(!text.contains("consolidating"), "{text}");
    let not_a_folder = input.join("mapping.json");
    let args = [
        "--resume",
        "--hf-assets",
        s(&not_a_folder),
        s(&input),
        s(&out),
    ];
    let text = assert_fails(2, &args, &input, &out, &["mapping.json"]);
    assert!(!text.contains("consolidating"), "{text}");

    let assets = dir.path().join("orig");
    model_folder(&assets, r#"{"torch_dtype": "float32",}"#);
    let args = [
        "--dtype",
        "bf16",
        "--hf-assets",
        s(&assets),
        s(&input),
        s(&out),
    ];
    let text = assert_fails(2, &args, &input, &out, &["config.json", "not valid JSON"]);
    assert!(!text.contains("consolidating"), "{text}");
    assert!(!names(&out).iter().any(|n| n.starts_with("model")));
}

#[test]
fn dtype_updates_the_nested_configs_of_a_multimodal_model() {
    let config = r#"{"torch_dtype": "float32", "model_type": "llava",
        "text_config": {"torch_dtype": "float32", "hidden_size": 8},
        "vision_config": {"dtype": "float32", "patch_size": 14}}"#;
    let got = config_after_bf16_export(config);
    assert_eq!(
        got,
        serde_json::json!({"torch_dtype": "bfloat16", "model_type": "llava",
            "text_config": {"torch_dtype": "bfloat16", "hidden_size": 8},
            "vision_config": {"dtype": "bfloat16", "patch_size": 14}})
    );
}
