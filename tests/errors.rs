//! Bad inputs: every one ends the run with one clear message and a non-zero
//! exit on every rank, writes nothing under a final name, and leaves the
//! inputs byte-identical.

mod common;
use common::*;
use serde_json::json;
use std::path::Path;

const SHARD_1A: &str = "shard-00001-model-00001-of-00002.safetensors";
const SHARD_2A: &str = "shard-00002-model-00001-of-00002.safetensors";

/// Runs on 2 ranks with the fixture's mapping and checks a clean failure.
fn fails_with(input: &Path, needles: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let mapping = input.join("mapping.json");
    let args = ["--mapping", s(&mapping), s(input), s(out.path())];
    assert_fails(2, &args, input, out.path(), needles)
}

#[test]
fn a_deleted_shard_file_is_named() {
    // Rank 2 held the end of every tensor in this file: without the file set
    // check the tensors would silently shrink, as PyTorch's consolidation does.
    let input = copy_fixture();
    std::fs::remove_file(input.path().join(SHARD_2A)).unwrap();
    fails_with(input.path(), &["1 shard file missing", SHARD_2A]);
}

#[test]
fn a_missing_middle_piece_is_a_gap_naming_the_region() {
    // 4 source ranks, rows chunked 250 each: rank 2's file gone leaves a
    // hole at rows 250:500 of lm_head (the first tensor by name). Nothing is written as zeros.
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &["--layout", "fsdp", "--ranks", "4", "--files", "1"],
    );
    std::fs::remove_file(
        ckpt.path()
            .join("shard-00002-model-00001-of-00001.safetensors"),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let args = ["--allow-missing-shard-files", s(ckpt.path()), s(out.path())];
    assert_fails(
        2,
        &args,
        ckpt.path(),
        out.path(),
        &["lm_head.weight", "no shard covers region [250:500, 0:64]"],
    );
}

#[test]
fn an_empty_input_dir_is_refused() {
    let input = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    assert_fails(
        2,
        &[s(input.path()), s(out.path())],
        input.path(),
        out.path(),
        &["holds no checkpoint"],
    );
}

#[test]
fn a_safetensors_file_without_dcp_metadata_is_not_a_shard() {
    let input = copy_fixture();
    let stray = input.path().join("adapter.safetensors");
    std::fs::write(&stray, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap();
    fails_with(input.path(), &["adapter.safetensors", "not a DCP shard"]);
}

#[test]
fn truncated_and_malformed_files_are_refused() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("shorter than the 8-byte", b"\x01\x02".to_vec()),
        (
            "exceeds the 100000000-byte limit",
            u64::MAX.to_le_bytes().to_vec(),
        ),
        (
            "runs past the end",
            [&100u64.to_le_bytes()[..], b"{}"].concat(),
        ),
        (
            "not UTF-8",
            [&2u64.to_le_bytes()[..], &[0xff, 0xfe]].concat(),
        ),
        (
            "not a JSON object",
            [&2u64.to_le_bytes()[..], b"[]"].concat(),
        ),
        ("not valid JSON", [&2u64.to_le_bytes()[..], b"{\""].concat()),
    ];
    for (needle, bytes) in cases {
        let input = copy_fixture();
        std::fs::write(input.path().join(SHARD_1A), bytes).unwrap();
        fails_with(input.path(), &[SHARD_1A, needle]);
    }
    // A shard cut short in its data section.
    let input = copy_fixture();
    let path = input.path().join(SHARD_1A);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    fails_with(input.path(), &[SHARD_1A, "data section holds"]);
}

#[test]
fn bad_tensor_entries_are_refused_with_the_tensor_named() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "unknown dtype \"Q8\"",
            Box::new(|h| h["model.embed_tokens.weight"]["dtype"] = json!("Q8")),
        ),
        (
            "cannot be consolidated",
            Box::new(|h| h["model.embed_tokens.weight"]["dtype"] = json!("F4")),
        ),
        (
            "do not match shape",
            Box::new(|h| h["model.embed_tokens.weight"]["shape"] = json!([499, 64])),
        ),
        (
            "overflows",
            Box::new(|h| h["model.embed_tokens.weight"]["shape"] = json!([u64::MAX, 64])),
        ),
    ];
    for (needle, edit) in edits {
        let input = copy_fixture();
        edit_header(&input.path().join(SHARD_1A), edit);
        fails_with(input.path(), &[SHARD_1A, needle]);
    }
}

#[test]
fn sharding_info_must_match_the_tensors() {
    let input = copy_fixture();
    edit_sharding_info(&input.path().join(SHARD_1A), |info| {
        info.as_object_mut()
            .unwrap()
            .remove("model.embed_tokens.weight");
    });
    fails_with(
        input.path(),
        &[
            SHARD_1A,
            "model.embed_tokens.weight",
            "no entry in DCP_SHARDING_INFO",
        ],
    );

    let input = copy_fixture();
    edit_sharding_info(&input.path().join(SHARD_1A), |info| {
        info["ghost.weight"] = json!({"saved_offsets": [0]});
    });
    fails_with(
        input.path(),
        &[SHARD_1A, "ghost.weight", "absent from the file"],
    );

    let input = copy_fixture();
    edit_sharding_info(&input.path().join(SHARD_1A), |info| {
        info["model.embed_tokens.weight"] = json!({"saved_offsets": [0]});
    });
    fails_with(
        input.path(),
        &["model.embed_tokens.weight", "has 1 dimensions"],
    );
}

#[test]
fn pieces_must_agree_and_not_overlap() {
    let input = copy_fixture();
    edit_header(&input.path().join(SHARD_2A), |h| {
        h["model.embed_tokens.weight"]["dtype"] = json!("F16")
    });
    fails_with(
        input.path(),
        &["model.embed_tokens.weight", "dtype F16 differs from BF16"],
    );

    let input = copy_fixture();
    edit_sharding_info(&input.path().join(SHARD_2A), |info| {
        info["model.embed_tokens.weight"] = json!({"saved_offsets": [400, 0]});
    });
    fails_with(input.path(), &["model.embed_tokens.weight", "overlap"]);
}

#[test]
fn bad_mappings_are_refused() {
    for (text, needle) in [
        ("{\"a\": 0}", "not an integer from 1 to 99999"),
        ("[1]", "not a JSON object"),
        ("{", "not valid JSON"),
    ] {
        let input = copy_fixture();
        std::fs::write(input.path().join("mapping.json"), text).unwrap();
        fails_with(input.path(), &["mapping.json", needle]);
    }
    let input = copy_fixture();
    std::fs::write(input.path().join("mapping.json"), "{\"lm_head.weight\": 1}").unwrap();
    fails_with(
        input.path(),
        &[
            "not in the mapping",
            "model.embed_tokens.weight",
            "--unmapped last",
        ],
    );
}

#[test]
fn an_unwritable_output_dir_is_refused() {
    let input = copy_fixture();
    let blocker = input.path().join("a-file");
    std::fs::write(&blocker, b"").unwrap();
    let out = blocker.join("out");
    let mapping = input.path().join("mapping.json");
    assert_fails(
        2,
        &["--mapping", s(&mapping), s(input.path()), s(&out)],
        input.path(),
        &out,
        &["OUTPUT_DIR", "a-file"],
    );
    // A read-only filesystem refuses even root.
    let out = Path::new("/proc/st-consolidate-test");
    assert_fails(
        1,
        &["--mapping", s(&mapping), s(input.path()), s(out)],
        input.path(),
        out,
        &["/proc/st-consolidate-test"],
    );
}

#[test]
fn existing_outputs_are_replaced_only_with_overwrite() {
    let input = torch_fixture();
    let mapping = input.join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    let args = ["--mapping", s(&mapping), s(&input), s(out.path())];
    consolidate_ok(2, &args);
    let first = snapshot(out.path());
    let run = consolidate(2, &args);
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        text.contains("already holds model-00001-of-00002.safetensors")
            && text.contains("--overwrite"),
        "{text}"
    );
    assert_eq!(
        snapshot(out.path()),
        first,
        "nothing is touched without --overwrite"
    );
    // A temporary file left by a killed run is cleaned up by the next one.
    std::fs::write(
        out.path()
            .join(".model-00001-of-00002.safetensors.st-consolidate.tmp"),
        b"junk",
    )
    .unwrap();
    consolidate_ok(
        2,
        &[
            "--overwrite",
            "--mapping",
            s(&mapping),
            s(&input),
            s(out.path()),
        ],
    );
    assert_eq!(snapshot(out.path()), first);
}

#[test]
fn consolidating_into_the_input_folder_works_and_reruns() {
    let input = copy_fixture();
    let dir = input.path();
    let mapping = dir.join("mapping.json");
    let args = ["--mapping", s(&mapping), s(dir), s(dir)];
    consolidate_ok(2, &args);
    // The rerun sees the outputs among the inputs, skips them as earlier
    // outputs, and needs --overwrite.
    let run = consolidate(2, &args);
    assert!(stderr(&run).contains("--overwrite"), "{}", stderr(&run));
    consolidate_ok(
        2,
        &["--overwrite", "--mapping", s(&mapping), s(dir), s(dir)],
    );
    let manifest = torch_fixture().join("manifest.json");
    assert_matches_manifest(dir, &manifest);
}

#[test]
fn replicas_with_different_bytes_are_refused() {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(ckpt.path(), &["--layout", "zoo", "--ranks", "4"]);
    // zoo.*.norm is saved whole by 3 ranks; corrupt one copy's last byte.
    let victim = ckpt
        .path()
        .join("shard-00002-model-00001-of-00003.safetensors");
    let header = st_consolidate_mpi::safetensors::header::read_header(&victim).unwrap();
    let norm = header
        .tensors
        .iter()
        .find(|t| t.name.ends_with(".norm"))
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[(header.data_start + norm.end - 1) as usize] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mapping = ckpt.path().join("mapping.json");
    assert_fails(
        2,
        &["--mapping", s(&mapping), s(ckpt.path()), s(out.path())],
        ckpt.path(),
        out.path(),
        &[&norm.name, "replicated piece", "differs", "rank 1: error"],
    );
}

#[test]
fn a_full_disk_is_reported_and_cleaned_up() {
    // 200 KB holds one of the two ~155 KB outputs but not both: one rank
    // fails with ENOSPC, the other's finished temporary file is removed too.
    let disk = SmallDisk::new("200k");
    let input = torch_fixture();
    let out = disk.0.path().join("out");
    let mapping = input.join("mapping.json");
    let args = ["--mapping", s(&mapping), s(&input), s(&out)];
    assert_fails(
        2,
        &args,
        &input,
        &out,
        &["No space left on device", "the disk is full"],
    );
    assert_eq!(names(&out), Vec::<String>::new());
}

#[test]
fn bad_report_paths_and_blocked_outputs_are_refused_before_writing() {
    let input = copy_fixture();
    let mapping = input.path().join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    let missing_dir = out.path().join("no/such/dir/report.json");
    let args = [
        "--report",
        s(&missing_dir),
        "--mapping",
        s(&mapping),
        s(input.path()),
        s(out.path()),
    ];
    assert_fails(
        2,
        &args,
        input.path(),
        out.path(),
        &["--report", "no/such/dir"],
    );
    let args = [
        "--report",
        s(&mapping),
        "--mapping",
        s(&mapping),
        s(input.path()),
        s(out.path()),
    ];
    assert_fails(
        2,
        &args,
        input.path(),
        out.path(),
        &["would replace the --mapping file", s(&mapping)],
    );
    // A directory where an output should go: refused before any rename.
    std::fs::create_dir(out.path().join("model-00002-of-00002.safetensors")).unwrap();
    let args = [
        "--overwrite",
        "--mapping",
        s(&mapping),
        s(input.path()),
        s(out.path()),
    ];
    let text = consolidate(3, &args);
    assert_eq!(text.status.code(), Some(1));
    assert!(
        stderr(&text).contains("is not a regular file"),
        "{}",
        stderr(&text)
    );
    assert_eq!(names(out.path()), ["model-00002-of-00002.safetensors"]);
}

#[test]
fn an_output_over_a_file_the_run_reads_is_refused_before_writing() {
    // --hf-assets naming OUTPUT_DIR itself: each copy would replace the file
    // it is copied from (with --dtype, an edited config.json over the input).
    let input = torch_fixture();
    let out = tempfile::tempdir().unwrap();
    let config = out.path().join("config.json");
    std::fs::write(&config, r#"{"torch_dtype": "float32"}"#).unwrap();
    let args = [
        "--overwrite",
        "--dtype",
        "bf16",
        "--hf-assets",
        s(out.path()),
        s(&input),
        s(out.path()),
    ];
    assert_fails(
        2,
        &args,
        out.path(),
        out.path(),
        &[&format!(
            "{} (a --hf-assets file this run copies) would overwrite the --hf-assets file",
            s(&config)
        )],
    );
}

#[test]
fn a_low_open_file_limit_is_raised_for_many_outputs() {
    // 543 output files, each held open by its owner, under a soft limit of
    // 64 descriptors.
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &[
            "--layout", "mixed", "--ranks", "2", "--layers", "60", "--hidden", "16", "--vocab",
            "50",
        ],
    );
    let out = tempfile::tempdir().unwrap();
    let command = format!(
        "ulimit -Sn 64 && {BIN} -q --max-shard-size 1B {} {}",
        s(ckpt.path()),
        s(out.path())
    );
    let run = std::process::Command::new("sh")
        .args(["-c", &command])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert_matches_manifest(out.path(), &ckpt.path().join("manifest.json"));
    assert_eq!(names(out.path()).len(), 544, "543 files and the index");
}

#[test]
fn source_ranks_catches_a_lost_highest_rank() {
    // Every file of rank 4 gone: the pieces of ranks 1-3 still tile a
    // smaller tensor, which only the expected rank count can reveal.
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &["--layout", "fsdp", "--ranks", "4", "--files", "2"],
    );
    for i in 1..=2 {
        std::fs::remove_file(
            ckpt.path()
                .join(format!("shard-00004-model-0000{i}-of-00002.safetensors")),
        )
        .unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let args = ["--source-ranks", "4", s(ckpt.path()), s(out.path())];
    assert_fails(
        2,
        &args,
        ckpt.path(),
        out.path(),
        &["2 shard files missing", "shard-00004-model-00001-of-00002"],
    );
    // With 3 the set is complete (the tensors are then 3/4 of their size:
    // the user said so).
    let ok_out = tempfile::tempdir().unwrap();
    let args = ["--source-ranks", "3", s(ckpt.path()), s(ok_out.path())];
    consolidate_ok(1, &args);
    let args = ["--source-ranks", "2", s(ckpt.path()), s(out.path())];
    assert_fails(
        1,
        &args,
        ckpt.path(),
        out.path(),
        &["come from rank 3, but --source-ranks is 2"],
    );
}

#[test]
fn ranks_that_see_different_inputs_are_stopped() {
    // MPMD launch: rank 1 gets another mapping, which the run's first
    // collective (the options every rank must share) refuses.
    let input = torch_fixture();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.json");
    std::fs::write(&other, r#"{"lm_head.weight": 1, "model.norm.weight": 2}"#).unwrap();
    let out = dir.path().join("out");
    let run = std::process::Command::new("mpirun")
        .args([
            "--oversubscribe",
            "-n",
            "1",
            BIN,
            s(&input),
            s(&out),
            ":",
            "-n",
            "1",
            BIN,
            "--unmapped",
            "last",
        ])
        .args(["--mapping", s(&other), s(&input), s(&out)])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(
        text.contains("the ranks were given different options: mapping is SingleFile on rank 0, but rank 1: Mapping("),
        "{text}"
    );
    assert_eq!(text.matches("error:").count(), 1, "{text}");
    assert!(!out.join("model.safetensors.index.json").exists());
}
