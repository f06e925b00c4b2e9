//! What operators see: progress for the whole job, the run report, and
//! name clean-up.

mod common;
use common::*;

#[test]
fn progress_is_reported_once_for_the_whole_job_in_a_log() {
    let input = torch_fixture();
    let mapping = input.join("mapping.json");
    // A long interval: only the final round runs, so one line means only
    // rank 0 printed it.
    let out = tempfile::tempdir().unwrap();
    let run = consolidate_ok(
        4,
        &[
            "--progress",
            "100",
            "--mapping",
            s(&mapping),
            s(&input),
            s(out.path()),
        ],
    );
    let text = stderr(&run);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("progress:"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains("311.10 KB of 311.10 KB (100.0%)") && lines[0].contains("GB/s"),
        "{text}"
    );

    for quiet in [&["--progress", "0"][..], &["-q"][..]] {
        let out = tempfile::tempdir().unwrap();
        let mut args = quiet.to_vec();
        args.extend(["--mapping", s(&mapping), s(&input), s(out.path())]);
        let run = consolidate_ok(2, &args);
        assert!(
            !stderr(&run).contains("progress:"),
            "{args:?}: {}",
            stderr(&run)
        );
    }
}

#[test]
fn progress_is_a_bar_on_a_terminal() {
    // `script` gives the process a pseudo-terminal.
    let input = torch_fixture();
    let out = tempfile::tempdir().unwrap();
    let command = format!("{BIN} --progress 0.1 {} {}", s(&input), s(out.path()));
    let run = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script (bsdutils) runs");
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{text}");
    assert!(
        text.contains("100%") && text.contains("eta"),
        "no bar:\n{text}"
    );
    assert!(
        !text.contains("progress:"),
        "log lines on a terminal:\n{text}"
    );

    // Under mpirun on a terminal, rank 0's stderr is a pipe to mpirun, so
    // the job's progress arrives as log lines, once per round, from rank 0.
    let out = tempfile::tempdir().unwrap();
    let command = format!(
        "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -n 4 {BIN} --progress 100 {} {}",
        s(&input),
        s(out.path())
    );
    let run = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{text}");
    let lines = text
        .matches("progress: 311.10 KB of 311.10 KB (100.0%)")
        .count();
    assert_eq!(lines, 1, "{text}");
}

#[test]
fn the_report_describes_the_run() {
    let input = torch_fixture();
    let out = tempfile::tempdir().unwrap();
    let report_path = out.path().join("reports/run.json");
    std::fs::create_dir_all(report_path.parent().unwrap()).unwrap();
    let mapping = input.join("mapping.json");
    let run = consolidate_ok(
        3,
        &[
            "--verify",
            "--threads",
            "1",
            "--report",
            s(&report_path),
            "--mapping",
            s(&mapping),
            s(&input),
            s(out.path()),
        ],
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["tool"], "st-consolidate-mpi");
    assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["world_size"], 3);
    assert_eq!(report["threads_per_rank"], serde_json::json!([1, 1, 1]));
    assert!(
        report["command_line"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--verify")
    );
    assert_eq!(report["input"]["files"], 4);
    assert_eq!(report["input"]["tensors"], 9);
    assert_eq!(report["input"]["bytes"], 311_098);
    let outputs = report["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    assert_eq!(outputs[0]["name"], "model-00001-of-00002.safetensors");
    assert_eq!(outputs[0]["rank"], 1);
    assert_eq!(outputs[1]["rank"], 2);
    let on_disk = std::fs::metadata(out.path().join("model-00002-of-00002.safetensors"))
        .unwrap()
        .len();
    assert_eq!(outputs[1]["bytes"], on_disk);
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 3);
    assert_eq!(ranks[0]["bytes"], 0, "rank 0 owns no file (index % 3)");
    let total: u64 = ranks.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    assert_eq!(total, 311_098);
    assert!(report["total_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(
        report["verify"],
        serde_json::json!({"ran": true, "result": "passed"})
    );
    // The same, for people.
    let text = stderr(&run);
    assert!(
        text.contains("wrote 2 files") && text.contains("on 3 ranks, verified"),
        "{text}"
    );
    assert!(text.contains("  rank 2: 1 file"), "{text}");
}

#[test]
fn prefixes_are_stripped_and_the_mapping_matches_stripped_names() {
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    // A mapping in stripped names.
    let original: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(input.join("mapping.json")).unwrap()).unwrap();
    let stripped: serde_json::Map<String, serde_json::Value> = original
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("model.").map(String::from).unwrap_or(k), v))
        .collect();
    let mapping = dir.path().join("mapping.json");
    std::fs::write(&mapping, serde_json::to_vec(&stripped).unwrap()).unwrap();
    let out = dir.path().join("out");
    consolidate_ok(
        2,
        &[
            "--strip-prefix",
            "model.",
            "--mapping",
            s(&mapping),
            s(&input),
            s(&out),
        ],
    );
    let tensors = output_tensors(&out);
    assert!(tensors.contains_key("embed_tokens.weight") && tensors.contains_key("lm_head.weight"));
    assert!(!tensors.keys().any(|k| k.starts_with("model.")));
    // Same bytes as the unstripped names in the manifest.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(input.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        tensors["embed_tokens.weight"].2,
        manifest["model.embed_tokens.weight"]["sha256"]
            .as_str()
            .unwrap()
    );

    // Two tensors that become one name: rename model.norm.weight to
    // "_orig_mod.lm_head.weight", then strip "_orig_mod.".
    let ckpt = copy_fixture();
    for path in snapshot(ckpt.path()).into_keys() {
        let header = st_consolidate_mpi::safetensors::header::read_header(&path);
        if !header.is_ok_and(|h| h.tensors.iter().any(|t| t.name == "model.norm.weight")) {
            continue;
        }
        let rename = |map: &mut serde_json::Value| {
            let map = map.as_object_mut().unwrap();
            let entry = map.remove("model.norm.weight").unwrap();
            map.insert("_orig_mod.lm_head.weight".into(), entry);
        };
        edit_sharding_info(&path, rename);
        edit_header(&path, rename);
    }
    let out = dir.path().join("clash");
    let args = ["--strip-prefix", "_orig_mod.", s(ckpt.path()), s(&out)];
    let text = assert_fails(
        2,
        &args,
        ckpt.path(),
        &out,
        &[
            "'_orig_mod.lm_head.weight'",
            "'lm_head.weight'",
            "would both be named",
        ],
    );
    assert!(text.contains("--strip-prefix"), "{text}");
}

#[test]
fn a_mapping_in_saved_names_works_with_strip_prefix() {
    // The fixture's mapping names tensors as saved ("model.embed_tokens...").
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let saved_mapping = input.join("mapping.json");
    let out = dir.path().join("out");
    let strip = ["--strip-prefix", "model."];
    let mut args = strip.to_vec();
    args.extend(["--mapping", s(&saved_mapping), s(&input), s(&out)]);
    consolidate_ok(2, &args);
    let tensors = output_tensors(&out);
    assert!(tensors.contains_key("embed_tokens.weight"), "{tensors:?}");
    // Same files as the mapping says for the saved names.
    let mapping: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&saved_mapping).unwrap()).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    for (saved, file) in &mapping {
        let output = saved.strip_prefix("model.").unwrap_or(saved);
        let expected = format!(
            "model-{:05}-of-{:05}.safetensors",
            file.as_u64().unwrap(),
            mapping.values().filter_map(|v| v.as_u64()).max().unwrap()
        );
        assert_eq!(index["weight_map"][output], expected.as_str(), "{saved}");
    }

    // Both names in the mapping, with different files: refused, naming both.
    let mut clash = mapping.clone();
    let (saved, file) = mapping
        .iter()
        .find(|(k, _)| k.starts_with("model."))
        .unwrap();
    let other = if file.as_u64() == Some(1) { 2 } else { 1 };
    let output = saved.strip_prefix("model.").unwrap().to_string();
    clash.insert(output.clone(), other.into());
    let clash_path = dir.path().join("clash.json");
    std::fs::write(&clash_path, serde_json::to_vec(&clash).unwrap()).unwrap();
    let out = dir.path().join("clash");
    let mut args = strip.to_vec();
    args.extend(["--mapping", s(&clash_path), s(&input), s(&out)]);
    let expected = format!(
        "tensor '{saved}' is listed under its output name '{output}' with file {other} and under \
         its saved name '{saved}' with file {file}"
    );
    assert_fails(1, &args, &input, &out, &[&expected]);
}
