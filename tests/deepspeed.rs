//! DeepSpeed ZeRO checkpoints written by DeepSpeed 0.19.8
//! (tests/fixtures/deepspeed, `scripts/make_deepspeed_fixtures.py`),
//! consolidated by the real binary and compared tensor by tensor (sha256 of
//! the bytes) with what DeepSpeed's own converters wrote from the same
//! folder: `zero_to_fp32.py` by default, `zero_to_torch.py --dtype bf16`
//! under `--dtype bf16`. Where DeepSpeed writes nothing (ZeRO-1's frozen
//! parameters, which it drops; BF16_Optimizer checkpoints, which it
//! refuses) the reference is the live engine's values at save time, also
//! in the manifest.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepspeed")
}

/// A fixture case's manifest and folders.
struct Case {
    name: String,
    manifest: serde_json::Value,
    /// The save_dir (holding `latest`).
    save_dir: PathBuf,
    /// Its tag folder.
    tag_dir: PathBuf,
}

impl Case {
    fn load(name: &str) -> Case {
        let dir = fixtures().join(name);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let save_dir = dir.join(manifest["save_dir"].as_str().unwrap());
        let tag_dir = save_dir.join(manifest["tag"].as_str().unwrap());
        Case {
            name: name.to_owned(),
            manifest,
            save_dir,
            tag_dir,
        }
    }

    fn aliases(&self) -> BTreeSet<String> {
        names_of(&self.manifest["shared_params"])
    }

    /// What a run must write: DeepSpeed's converter's tensors (`reference`),
    /// tied aliases left out unless `keep_tied`, and the live engine's
    /// values (`live`) for what the converter does not write.
    fn expected(
        &self,
        reference: &str,
        live: &str,
        keep_tied: bool,
    ) -> BTreeMap<String, (Vec<u64>, String, String)> {
        let mut want = tensors_of(&self.manifest[live]);
        let converter = tensors_of(&self.manifest[reference]);
        let aliases = self.aliases();
        for (name, tensor) in converter {
            if aliases.contains(&name) && !keep_tied {
                continue;
            }
            want.insert(name, tensor);
        }
        // Where DeepSpeed wrote nothing (BF16_Optimizer), an alias is its
        // owner's copy.
        if keep_tied && let Some(shared) = self.manifest["shared_params"].as_object() {
            for (alias, owner) in shared {
                if let Some(tensor) = want.get(owner.as_str().unwrap()).cloned() {
                    want.entry(alias.clone()).or_insert(tensor);
                }
            }
        }
        want
    }
}

fn names_of(value: &serde_json::Value) -> BTreeSet<String> {
    match value {
        serde_json::Value::Object(map) => map.keys().cloned().collect(),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// Safetensors' name of a torch dtype in a manifest.
fn safetensors_dtype(torch: &str) -> String {
    match torch {
        "float32" => "F32",
        "bfloat16" => "BF16",
        "float16" => "F16",
        "int64" => "I64",
        "int32" => "I32",
        "bool" => "BOOL",
        other => panic!("dtype {other} in a manifest"),
    }
    .to_owned()
}

fn tensors_of(value: &serde_json::Value) -> BTreeMap<String, (Vec<u64>, String, String)> {
    let Some(map) = value.as_object() else {
        return BTreeMap::new();
    };
    map.iter()
        .map(|(name, t)| {
            let shape = serde_json::from_value(t["shape"].clone()).unwrap();
            let dtype = safetensors_dtype(t["dtype"].as_str().unwrap());
            (
                name.clone(),
                (shape, dtype, t["sha256"].as_str().unwrap().to_owned()),
            )
        })
        .collect()
}

/// Every case DeepSpeed's layout lets this tool convert.
fn convertible_cases() -> Vec<Case> {
    let mut cases: Vec<Case> = std::fs::read_dir(fixtures())
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("manifest.json").is_file())
        .map(|e| Case::load(&e.file_name().to_string_lossy()))
        .filter(|c| c.manifest["tensor_parallel"].as_u64() == Some(1))
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(cases.len() >= 6, "the DeepSpeed fixtures are missing");
    cases
}

fn check(case: &Case, out: &Path, want: &BTreeMap<String, (Vec<u64>, String, String)>, how: &str) {
    let got = output_tensors(out);
    let got_names: BTreeSet<&String> = got.keys().collect();
    let want_names: BTreeSet<&String> = want.keys().collect();
    assert_eq!(got_names, want_names, "{}: {how}: tensor names", case.name);
    for (name, tensor) in want {
        assert_eq!(&got[name], tensor, "{}: {how}: tensor {name}", case.name);
    }
}

#[test]
fn every_case_equals_deepspeeds_converters_at_1_2_and_3_ranks() {
    for case in convertible_cases() {
        let fp32 = case.expected("zero_to_fp32", "live_masters", false);
        let bf16 = case.expected("zero_to_torch_bf16", "live_masters_bf16", false);
        let tied = case.expected("zero_to_fp32", "live_masters", true);
        let tmp = tempfile::tempdir().unwrap();
        let (save_dir, tag_dir) = (s(&case.save_dir), s(&case.tag_dir));
        // (ranks, arguments, expected): the folder with `latest` and the tag
        // folder, both schedules and header modes, the dtypes, tied copies.
        let runs: [(usize, Vec<&str>, &BTreeMap<_, _>); 4] = [
            (0, vec![save_dir], &fp32),
            (
                2,
                vec![
                    "--keep-tied",
                    "--max-shard-size",
                    "3KB",
                    "--verify",
                    tag_dir,
                ],
                &tied,
            ),
            (
                3,
                vec![
                    "--dtype",
                    "bf16",
                    "--headers",
                    "shared",
                    "--schedule",
                    "balanced",
                    save_dir,
                ],
                &bf16,
            ),
            (
                3,
                vec!["--headers", "shared", "--max-shard-size", "2KB", tag_dir],
                &fp32,
            ),
        ];
        for (i, (ranks, args, want)) in runs.iter().enumerate() {
            let out = tmp.path().join(format!("out{i}"));
            let mut argv = vec!["-q"];
            argv.extend(args);
            argv.push(s(&out));
            consolidate_ok(*ranks, &argv);
            check(&case, &out, want, &format!("{ranks} ranks {args:?}"));
        }
    }
}

#[test]
fn the_full_matrix_of_ranks_schedules_and_header_modes_on_both_stages() {
    for name in ["z2-w3-bf16", "z3-w3-bf16"] {
        let case = Case::load(name);
        let want = case.expected("zero_to_fp32", "live_masters", false);
        let tmp = tempfile::tempdir().unwrap();
        for ranks in [1, 2, 3] {
            for schedule in ["modulo", "balanced"] {
                for headers in ["all", "shared"] {
                    let out = tmp.path().join(format!("{ranks}-{schedule}-{headers}"));
                    let args = [
                        "-q",
                        "--max-shard-size",
                        "2KB",
                        "--schedule",
                        schedule,
                        "--headers",
                        headers,
                        s(&case.save_dir),
                        s(&out),
                    ];
                    consolidate_ok(ranks, &args);
                    check(
                        &case,
                        &out,
                        &want,
                        &format!("{ranks} ranks {schedule} {headers}"),
                    );
                }
            }
        }
    }
}

#[test]
fn tied_aliases_are_named_in_one_note_and_zero1_frozen_parameters_in_another() {
    let case = Case::load("z1-w2-bf16");
    let tmp = tempfile::tempdir().unwrap();
    let out = consolidate_ok(0, &[s(&case.save_dir), s(&tmp.path().join("o"))]);
    let text = stderr(&out);
    assert!(
        text.contains("left out: 'lm_head.weight' = 'model.embed_tokens.weight'"),
        "{text}"
    );
    assert!(
        text.contains("2 frozen parameter(s) exported from the model states")
            && text.contains("model.frozen_proj.weight"),
        "{text}"
    );
    assert!(
        text.contains("note: not exported: the optimizer's states"),
        "{text}"
    );
}

#[test]
fn inputs_are_left_untouched_and_resume_keeps_what_it_wrote() {
    let case = Case::load("z3-w2-bf16");
    let before = snapshot(&case.tag_dir);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let args = ["--max-shard-size", "3KB", s(&case.save_dir), s(&out)];
    consolidate_ok(2, &args);
    let resumed = consolidate_ok(2, &["--resume", args[0], args[1], args[2], args[3]]);
    let text = stderr(&resumed);
    assert!(text.contains("kept 3, wrote 0 files"), "{text}");
    let verified = consolidate_ok(2, &["--verify-only", s(&case.save_dir), s(&out)]);
    assert!(verified.status.success());
    assert_eq!(snapshot(&case.tag_dir), before);
}

#[test]
fn hf_trainers_checkpoint_folder_gives_a_loadable_folder_in_one_command() {
    // checkpoint-N holds the Trainer's own 16-bit model.safetensors, its
    // state and RNG files beside `latest`: the DeepSpeed checkpoint is
    // read, and --hf-assets on the same folder copies the model's files
    // only.
    let case = Case::load("hf-trainer-z3-w2-bf16");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    let dir = s(&case.save_dir);
    consolidate_ok(2, &["-q", "--hf-assets", dir, dir, s(&out)]);
    assert_eq!(
        names(&out),
        [
            "config.json",
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json"
        ]
    );
    check(
        &case,
        &out,
        &case.expected("zero_to_fp32", "live_masters", false),
        "checkpoint-2",
    );
}
