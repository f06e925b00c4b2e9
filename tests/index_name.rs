//! `--index-name`: the index under another name (Diffusers'), found there
//! by `--verify-only` and `--resume`, and an index of the other name left
//! by an earlier run treated as an earlier output.

mod common;
use common::*;

const DIFFUSERS: &str = "diffusion_pytorch_model.safetensors.index.json";

#[test]
fn the_diffusers_index_name_is_written_verified_resumed_and_retired() {
    let input = torch_fixture();
    let mapping = input.join("mapping.json");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let args = |extra: &[&'static str]| {
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        args.extend([
            "--mapping".into(),
            s(&mapping).into(),
            s(&input).into(),
            s(&out).into(),
        ]);
        args
    };
    let run = |ranks, extra: &[&'static str]| {
        let args = args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        consolidate(ranks, &args)
    };
    let text = stderr(&run(2, &["--index-name", "diffusers"]));
    assert!(text.contains(&format!("and {DIFFUSERS} to")), "{text}");
    let files = names(&out);
    assert!(files.contains(&DIFFUSERS.to_string()), "{files:?}");
    assert!(!files.contains(&"model.safetensors.index.json".to_string()));
    assert_matches_manifest_index(&out);

    let verified = run(2, &["--verify-only", "--index-name", "diffusers"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    // Without the name, --verify-only looks for the default index, and says so.
    let missing = run(0, &["--verify-only"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("model.safetensors.index.json"),
        "{}",
        stderr(&missing)
    );

    let resumed = run(2, &["--resume", "--index-name", "diffusers"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(
        stderr(&resumed).contains("keeping 2 of 2 files"),
        "{}",
        stderr(&resumed)
    );

    // The default name over a Diffusers output: the other index is an
    // earlier output, refused without --overwrite, retired with it.
    let refused = run(0, &[]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains(DIFFUSERS), "{}", stderr(&refused));
    let replaced = run(2, &["--overwrite"]);
    assert!(replaced.status.success(), "{}", stderr(&replaced));
    let files = names(&out);
    assert!(
        files.contains(&"model.safetensors.index.json".to_string()),
        "{files:?}"
    );
    assert!(!files.contains(&DIFFUSERS.to_string()), "{files:?}");
    assert_matches_manifest(&out, &input.join("manifest.json"));
}

/// The Diffusers-named index maps every tensor of the fixture's manifest.
fn assert_matches_manifest_index(out: &std::path::Path) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(DIFFUSERS)).unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(torch_fixture().join("manifest.json")).unwrap())
            .unwrap();
    let mapped = index["weight_map"].as_object().unwrap();
    for name in manifest.as_object().unwrap().keys() {
        assert!(mapped.contains_key(name), "{name} not in {DIFFUSERS}");
    }
}

#[test]
fn an_index_name_that_is_no_plain_file_name_is_refused() {
    let input = torch_fixture();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let run = consolidate(0, &["--index-name", "../x.index.json", s(&input), s(&out)]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("not an index file name"),
        "{}",
        stderr(&run)
    );
    assert!(!out.exists());
}
