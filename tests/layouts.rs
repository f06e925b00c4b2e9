//! The README's examples as written, on folders laid out the way the peers
//! write them (tests/fixtures/layout-*, written by PyTorch with
//! scripts/make_layout_fixtures.py), and the notes a run prints about what
//! it exports and how its ranks are used.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The arguments of the README's example that follows the comment line
/// starting with `comment`, with its placeholder paths replaced.
fn readme_example(comment: &str, paths: &[(&str, &str)]) -> Vec<String> {
    let readme = std::fs::read_to_string(fixture("../../README.md")).unwrap();
    let mut lines = readme.lines().skip_while(|l| !l.starts_with(comment));
    assert!(
        lines.next().is_some(),
        "no README example after {comment:?}"
    );
    let mut command = String::new();
    for line in lines {
        command.push_str(line.trim_end_matches('\\').trim());
        command.push(' ');
        if !line.ends_with('\\') {
            break;
        }
    }
    let words: Vec<String> = command
        .split_whitespace()
        .map(|w| w.trim_matches('\'').to_string())
        .collect();
    let start = words
        .iter()
        .position(|w| w == "st-consolidate-mpi")
        .unwrap_or_else(|| panic!("not a st-consolidate-mpi command: {command}"));
    words[start + 1..]
        .iter()
        .map(|w| {
            paths
                .iter()
                .find(|(from, _)| w == from)
                .map_or(w.clone(), |(_, to)| to.to_string())
        })
        .collect()
}

/// name -> sha256 of every tensor the original model holds.
fn model_manifest() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(fixture("layout-manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_torchtitan_example_exports_the_model_alone() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("hf-out");
    let input = fixture("layout-torchtitan");
    let args = readme_example(
        "# a torchtitan-style DCP checkpoint",
        &[
            ("outputs/checkpoint/step-1000", s(&input)),
            ("hf-out/", s(&out)),
        ],
    );
    assert!(args.iter().any(|a| a == "--exclude"), "{args:?}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = consolidate_ok(2, &args);
    let text = stderr(&run);
    assert!(!text.contains("optimizer state"), "{text}");
    let got: BTreeMap<String, String> = output_tensors(&out)
        .into_iter()
        .map(|(name, (_, _, sha))| (name, sha))
        .collect();
    assert_eq!(got, model_manifest());
}

#[test]
fn optimizer_state_in_an_export_gets_one_note_and_short_lines() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let input = fixture("layout-torchtitan");
    let run = consolidate_ok(2, &[s(&input), s(&out)]);
    let text = stderr(&run);
    let notes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("look like optimizer state"))
        .collect();
    assert_eq!(notes.len(), 1, "one note, from rank 0:\n{text}");
    assert!(notes[0].contains("(66.7%)"), "{}", notes[0]);
    assert!(notes[0].contains("--exclude 'optimizer.*'"), "{}", notes[0]);
    // 263 non-tensor entries, named by group with counts.
    assert!(text.contains("skipped 263 non-tensor entries"), "{text}");
    assert!(
        text.contains("\n    optimizer.param_groups.*: 252 entries\n"),
        "{text}"
    );
    let summary = &text[text.find("wrote 1 file and").expect("summary")..];
    for line in summary.lines().filter(|l| !l.contains(s(&out))) {
        assert!(line.chars().count() <= 80, "line past a screen: {line}");
    }
    // The report keeps the full list.
    let report = work.path().join("r.json");
    let out2 = work.path().join("out2");
    consolidate_ok(0, &["-q", "--report", s(&report), s(&input), s(&out2)]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(
        report["input"]["non_tensors"].as_array().unwrap().len(),
        263
    );
}

#[test]
fn state_buffers_outside_an_optimizer_key_are_named_by_suffix() {
    let facts = st_consolidate_mpi::report::InputFacts {
        tensors: vec![
            ("w".into(), 30, true),
            ("state.w.exp_avg".into(), 30, true),
            ("state.w.exp_avg_sq".into(), 40, true),
            ("state.v.exp_avg".into(), 100, false),
        ],
        ..Default::default()
    };
    let note = st_consolidate_mpi::report::optimizer_note(&facts).unwrap();
    assert!(note.contains("(70.0%)"), "{note}");
    assert!(
        note.contains("--exclude '*.exp_avg' --exclude '*.exp_avg_sq'"),
        "{note}"
    );
    let facts = st_consolidate_mpi::report::InputFacts {
        tensors: vec![("model.w".into(), 30, true), ("optim.x".into(), 9, false)],
        ..Default::default()
    };
    assert_eq!(st_consolidate_mpi::report::optimizer_note(&facts), None);
}

#[test]
fn idle_ranks_under_modulo_get_one_line_and_none_under_balanced() {
    let work = tempfile::tempdir().unwrap();
    let input = fixture("layout-accelerate");
    let idle = |text: &str| {
        text.lines()
            .filter(|l| l.contains("ranks are idle"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let out = work.path().join("modulo");
    let text = stderr(&consolidate_ok(3, &[s(&input), s(&out)]));
    let lines = idle(&text);
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("2 of 3 ranks are idle"), "{}", lines[0]);
    assert!(lines[0].contains("--schedule balanced"), "{}", lines[0]);
    assert!(text.contains("wrote 1 file and"), "singular: {text}");

    let out = work.path().join("balanced");
    let text = stderr(&consolidate_ok(
        3,
        &["--schedule", "balanced", s(&input), s(&out)],
    ));
    assert!(idle(&text).is_empty(), "{text}");
    // One rank, one file: nobody is idle.
    let out = work.path().join("one");
    let text = stderr(&consolidate_ok(1, &[s(&input), s(&out)]));
    assert!(idle(&text).is_empty(), "{text}");
}

#[test]
fn the_accelerate_example_writes_the_original_model_names_and_layout() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("hf-out");
    let orig = fixture("layout-orig");
    let index = orig.join("model.safetensors.index.json");
    let input = fixture("layout-accelerate");
    let args = readme_example(
        "# an accelerate FSDP SHARDED_STATE_DICT folder",
        &[
            ("orig/model.safetensors.index.json", s(&index)),
            ("ckpt/pytorch_model_fsdp_0", s(&input)),
            ("hf-out/", s(&out)),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = stderr(&consolidate_ok(4, &args));
    let notes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("top-level key 'model'"))
        .collect();
    assert_eq!(notes.len(), 1, "said once:\n{text}");
    let got: BTreeMap<String, String> = output_tensors(&out)
        .into_iter()
        .map(|(name, (_, _, sha))| (name, sha))
        .collect();
    assert_eq!(got, model_manifest());
    // The original model's file layout: the same weight_map.
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(
        read(&out.join("model.safetensors.index.json"))["weight_map"],
        read(&index)["weight_map"]
    );

    // --keep-top-level-key keeps the saved names.
    let kept = work.path().join("kept");
    consolidate_ok(0, &["--keep-top-level-key", s(&input), s(&kept)]);
    let names: Vec<String> = output_tensors(&kept).into_keys().collect();
    assert!(names.iter().all(|n| n.starts_with("model.")), "{names:?}");
    assert!(
        names.contains(&"model.lm_head.weight".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"model.model.embed_tokens.weight".to_string()));
}

#[test]
fn a_checkpoint_with_tensors_under_several_keys_keeps_its_names() {
    // torchtitan: the model at the top level, the optimizer under `optimizer`.
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let text = stderr(&consolidate_ok(
        0,
        &[s(&fixture("layout-torchtitan")), s(&out)],
    ));
    assert!(!text.contains("top-level key"), "{text}");
    let names: Vec<String> = output_tensors(&out).into_keys().collect();
    assert!(
        names.iter().any(|n| n.starts_with("optimizer.state.")),
        "{names:?}"
    );
    assert!(names.contains(&"lm_head.weight".to_string()), "{names:?}");
}

#[test]
fn a_dry_run_plans_from_the_metadata_alone() {
    // The chunk archive is gone: a dry run, which reads none, still plans;
    // a real run locates every chunk and refuses.
    let work = tempfile::tempdir().unwrap();
    let ckpt = work.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let src = fixture("layout-accelerate");
    std::fs::copy(src.join(".metadata"), ckpt.join(".metadata")).unwrap();
    std::fs::write(ckpt.join("__0_0.distcp"), b"").unwrap();
    let out = work.path().join("out");
    let run = consolidate_ok(2, &["--dry-run", s(&ckpt), s(&out)]);
    let text = stderr(&run);
    assert!(
        text.contains("no chunk was located in its archive"),
        "{text}"
    );
    let plan = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(plan.contains("model-00001-of-00001.safetensors"), "{plan}");
    let real = consolidate(0, &[s(&ckpt), s(&out)]);
    assert!(!real.status.success());
    assert!(stderr(&real).contains("__0_0.distcp"), "{}", stderr(&real));
}
