//! The mapping sources and the other options, end to end under mpirun.

mod common;
use common::*;
use std::path::Path;

#[test]
fn hf_index_gives_the_same_files_as_the_mapping() {
    let input = torch_fixture();
    let by_mapping = tempfile::tempdir().unwrap();
    consolidate_ok(
        2,
        &[
            "--mapping",
            s(&input.join("mapping.json")),
            s(&input),
            s(by_mapping.path()),
        ],
    );
    let index = by_mapping.path().join("model.safetensors.index.json");
    let by_index = tempfile::tempdir().unwrap();
    consolidate_ok(4, &["--hf-index", s(&index), s(&input), s(by_index.path())]);
    let strip = |dir: &Path| {
        snapshot(dir)
            .into_iter()
            .map(|(p, b)| (p.file_name().unwrap().to_owned(), b))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(by_mapping.path()), strip(by_index.path()));
}

#[test]
fn no_mapping_gives_one_file() {
    let input = torch_fixture();
    let out = tempfile::tempdir().unwrap();
    consolidate_ok(2, &[s(&input), s(out.path())]);
    assert_eq!(
        names(out.path()),
        [
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json"
        ]
    );
    assert_matches_manifest(out.path(), &input.join("manifest.json"));
}

#[test]
fn max_shard_size_fills_files_in_name_order() {
    let input = torch_fixture();
    let out = tempfile::tempdir().unwrap();
    consolidate_ok(3, &["--max-shard-size", "100KB", s(&input), s(out.path())]);
    assert_matches_manifest(out.path(), &input.join("manifest.json"));
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let files: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Names in sorted order never go back to an earlier file.
    assert!(files.windows(2).all(|w| w[0] <= w[1]), "{files:?}");
    let count = names(out.path()).len() - 1;
    assert!(count >= 3, "311 KB in 100 KB files: {count}");
    for name in names(out.path()).iter().filter(|n| n.starts_with("model-")) {
        let header =
            st_consolidate_mpi::safetensors::header::read_header(&out.path().join(name)).unwrap();
        let data: u64 = header.tensors.iter().map(|t| t.end - t.begin).sum();
        // Only a single tensor larger than the limit may exceed it.
        assert!(
            data <= 100_000 || header.tensors.len() == 1,
            "{name}: {data} bytes"
        );
    }
}

#[test]
fn unmapped_tensors_can_go_last_and_missing_names_warn() {
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("mapping.json");
    std::fs::write(
        &mapping,
        r#"{"lm_head.weight": 1, "model.norm.weight": 2, "not.in.shards": 2}"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let run = consolidate_ok(
        2,
        &[
            "--unmapped",
            "last",
            "--mapping",
            s(&mapping),
            s(&input),
            s(&out),
        ],
    );
    assert!(
        stderr(&run).contains("'not.in.shards' is in the mapping but in no shard"),
        "{}",
        stderr(&run)
    );
    assert_matches_manifest(&out, &input.join("manifest.json"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(
        index["weight_map"]["lm_head.weight"],
        "model-00001-of-00002.safetensors"
    );
    assert_eq!(
        index["weight_map"]["model.embed_tokens.weight"],
        "model-00002-of-00002.safetensors"
    );
    assert!(index["weight_map"].get("not.in.shards").is_none());
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = consolidate_ok(
        2,
        &[
            "--dry-run",
            "--mapping",
            s(&input.join("mapping.json")),
            s(&input),
            s(&out),
        ],
    );
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        text.contains("9 tensors") && text.contains("2 output files on 2 ranks"),
        "{text}"
    );
    assert!(
        text.contains("model-00001-of-00002.safetensors") && text.contains("max/mean"),
        "{text}"
    );
    assert_eq!(text.matches("plan:").count(), 1, "printed once:\n{text}");
    assert!(!out.exists());
}

#[test]
fn verify_passes_and_verify_only_catches_a_flipped_byte() {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &["--layout", "mixed", "--ranks", "4", "--files", "3"],
    );
    let mapping = ckpt.path().join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    let run = consolidate_ok(
        2,
        &[
            "--verify",
            "--mapping",
            s(&mapping),
            s(ckpt.path()),
            s(out.path()),
        ],
    );
    assert!(stderr(&run).contains("verified"), "{}", stderr(&run));
    let run = consolidate_ok(3, &["--verify-only", s(ckpt.path()), s(out.path())]);
    assert!(stderr(&run).contains("all equal"), "{}", stderr(&run));

    // Flip one byte inside the last tensor of file 2.
    let victim = out.path().join("model-00002-of-00003.safetensors");
    let header = st_consolidate_mpi::safetensors::header::read_header(&victim).unwrap();
    let last = header.tensors.last().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[(header.data_start + last.end - 3) as usize] ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    let run = consolidate(3, &["--verify-only", s(ckpt.path()), s(out.path())]);
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "'{}' in model-00002-of-00003.safetensors",
            last.name
        )),
        "{text}"
    );
    assert_eq!(text.matches("error:").count(), 1, "{text}");

    // A wrong total_size in the index is caught too.
    let index_path = out.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path)
        .unwrap()
        .replace("\"total_size\": ", "\"total_size\": 1");
    std::fs::write(&index_path, text).unwrap();
    let run = consolidate(1, &["--verify-only", s(ckpt.path()), s(out.path())]);
    assert!(stderr(&run).contains("total_size"), "{}", stderr(&run));
}

#[test]
fn help_explains_every_option() {
    let run = consolidate(0, &["--help"]);
    assert!(run.status.success());
    let text = String::from_utf8_lossy(&run.stdout);
    for option in [
        "--mapping",
        "--hf-index",
        "--max-shard-size",
        "--unmapped",
        "--threads",
        "--dry-run",
        "--overwrite",
        "--verify",
        "--verify-only",
        "--quiet",
        "Examples:",
    ] {
        assert!(text.contains(option), "{option} missing from --help");
    }
    let run = consolidate(0, &["--mapping", "a", "--hf-index", "b", "in", "out"]);
    assert_eq!(run.status.code(), Some(2));
}

/// A Hydra launcher's variables (PMI_RANK, PMI_SIZE) over an OpenMPI
/// build: MPI starts a singleton world, as under a mismatched srun plug-in.
/// The launcher's rank 0 alone says so, naming the variable; no rank
/// writes anything.
#[test]
fn a_world_smaller_than_the_launchers_job_is_refused_once() {
    let input = torch_fixture();
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("out");
    let as_rank = |rank: &str| {
        std::process::Command::new(BIN)
            .args([s(&input), s(&target)])
            .env("PMI_RANK", rank)
            .env("PMI_SIZE", "4")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .output()
            .unwrap()
    };
    let rank0 = as_rank("0");
    assert_eq!(rank0.status.code(), Some(1), "{}", stderr(&rank0));
    let text = stderr(&rank0);
    assert!(
        text.contains(
            "MPI reports a world of 1 rank(s), but the launcher started 4 tasks (PMI_SIZE=4)"
        ) && text.contains("--mpi=pmix"),
        "{text}"
    );
    let rank1 = as_rank("1");
    assert_eq!(rank1.status.code(), Some(1));
    assert_eq!(stderr(&rank1), "", "only the launcher's rank 0 speaks");
    assert!(!target.exists(), "nothing written");
}

/// The option rules both front ends share, as tests/option_cases.json
/// lists them (python/tests/test_options.py checks the Python side of
/// each case against the same file).
fn shared_refusals() -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/option_cases.json");
    let cases: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    cases["refused"].as_array().unwrap().clone()
}

fn strings(value: &serde_json::Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// Every shared case: exit 2 (a usage error, as clap's), the library's
/// reason and hint in the command's spelling, once, and OUTPUT_DIR not
/// even created. The message is exactly the library's
/// `Options::into_config` error: the binary adds no rule of its own.
#[test]
fn the_command_refuses_the_shared_cases_with_the_librarys_words() {
    let fixture = torch_fixture();
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("out");
    for case in shared_refusals() {
        let mut args = strings(&case["args"]);
        let expected = strings(&case["command"]);
        args.extend([s(&fixture), s(&target)]);
        let run = consolidate(0, &args);
        let text = stderr(&run);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{args:?}: {text}");
        assert_eq!(
            lines[0],
            format!("st-consolidate-mpi: error: {}", expected[0])
        );
        assert!(
            lines[1].starts_with(&format!("  hint: {}", expected[1])),
            "{args:?}: {text}"
        );
        assert!(!target.exists(), "{args:?} created OUTPUT_DIR");
    }
    // Under mpirun, the launcher's rank 0 alone says it.
    let run = consolidate(2, &["--threads", "0", s(&fixture), s(&target)]);
    assert!(!run.status.success());
    assert_eq!(
        stderr(&run).matches("--threads 0 is not accepted").count(),
        1
    );
    assert!(!target.exists());
}

/// `--dtype` takes NeMo's and PyTorch's names (normalised as NeMo's
/// resolve_dtype_cast does), with the same result as the command's own.
#[test]
fn nemo_and_torch_dtype_names_work_from_the_command() {
    let fixture = torch_fixture();
    let work = tempfile::tempdir().unwrap();
    let convert = |name: &str| {
        let out = work.path().join(name);
        consolidate_ok(0, &["-q", "--dtype", name, s(&fixture), s(&out)]);
        snapshot(&out)
            .into_iter()
            .map(|(p, b)| (p.file_name().unwrap().to_owned(), b))
            .collect::<Vec<_>>()
    };
    let bf16 = convert("bf16");
    let header = st_consolidate_mpi::safetensors::header::read_header(
        &work.path().join("bf16/model-00001-of-00001.safetensors"),
    )
    .unwrap();
    assert!(
        header
            .tensors
            .iter()
            .any(|t| t.dtype == st_consolidate_mpi::safetensors::dtype::Dtype::BF16),
        "nothing converted to BF16"
    );
    for alias in ["bfloat16", "torch.bfloat16", "BF16", "bf_16"] {
        assert!(
            convert(alias) == bf16,
            "--dtype {alias} differs from --dtype bf16"
        );
    }
    let f32 = convert("f32");
    for alias in ["fp32", "float32", "torch.float32", "float"] {
        assert!(
            convert(alias) == f32,
            "--dtype {alias} differs from --dtype f32"
        );
    }
    assert!(f32 != bf16);
}

/// Any positive thread count works (above 1024 taken as 1024, on one rank
/// and under mpirun; a count too large for 64 bits too), as
/// `ThreadPoolExecutor(max_workers=N)` takes any positive N. 65535 per
/// rank used to be accepted and hang, then refused.
#[test]
fn any_positive_thread_count_works_capped() {
    let fixture = torch_fixture();
    let mapping = fixture.join("mapping.json");
    for (ranks, threads) in [(0, "65535"), (2, "100000"), (0, "99999999999999999999999")] {
        let out = tempfile::tempdir().unwrap();
        let args = ["-q", "--threads", threads, "--mapping", s(&mapping)];
        consolidate_ok(ranks, &[&args[..], &[s(&fixture), s(out.path())]].concat());
        assert_matches_manifest(out.path(), &fixture.join("manifest.json"));
    }
}

/// `--unmapped omit` (the drop-ins' rule, PyTorch's behaviour) is the
/// command's too: one choice table for both front ends.
#[test]
fn unmapped_tensors_can_be_left_out_from_the_command() {
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("mapping.json");
    std::fs::write(&mapping, r#"{"lm_head.weight": 1, "model.norm.weight": 2}"#).unwrap();
    let out = dir.path().join("out");
    let run = consolidate_ok(
        0,
        &[
            "--unmapped",
            "omit",
            "--mapping",
            s(&mapping),
            s(&input),
            s(&out),
        ],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let mapped: Vec<&String> = index["weight_map"].as_object().unwrap().keys().collect();
    assert_eq!(mapped, ["lm_head.weight", "model.norm.weight"]);
    assert!(
        stderr(&run).contains("model.embed_tokens.weight"),
        "{}",
        stderr(&run)
    );
}
