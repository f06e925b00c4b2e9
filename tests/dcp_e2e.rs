//! The real binary on PyTorch DCP checkpoints (`.metadata` + `__R_I.distcp`)
//! written by PyTorch 2.15 and 2.5: every fixture consolidates to the sha256
//! of every tensor PyTorch saved, with and without a launcher and on 1 to 3
//! ranks; damaged and hostile checkpoints are refused with one message, on
//! every rank, leaving the inputs as they were; the summary, the report and
//! the dry run say what was skipped and left out.

mod common;

use common::*;
use serde_json::Value as Json;
use st_consolidate_mpi::checkpoint::dcp::read_dcp_checkpoint;
use st_consolidate_mpi::safetensors::dtype::Dtype;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every non-hostile DCP fixture (`tests/fixtures/README-dcp.md`).
const FIXTURES: [&str; 8] = [
    "dcp-v215-w2",
    "dcp-v215-w4-mesh",
    "dcp-v215-dtypes-t3",
    "dcp-v215-more-dtypes",
    "dcp-v25-w2",
    "dcp-v25-w4-mesh",
    "dcp-v25-dtypes-t3",
    "dcp-v25-more-dtypes",
];

/// What a DCP input without a mapping option gives when it is under 5 GB.
const ONE_FILE: [&str; 2] = [
    "model-00001-of-00001.safetensors",
    "model.safetensors.index.json",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn checkpoint(name: &str) -> PathBuf {
    fixture(name).join("checkpoint")
}

fn read_json(path: &Path) -> Json {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// Bytes of every tensor of a manifest, by name.
fn manifest_bytes(path: &Path) -> Vec<(String, u64)> {
    let manifest = read_json(path);
    manifest
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let dtype = Dtype::parse(t["dtype"].as_str().unwrap()).unwrap();
            let elements: u64 = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product();
            (name.clone(), elements * dtype.size())
        })
        .collect()
}

/// Writes the tensors of `manifest` that `keep` accepts to `out`.
fn filtered_manifest(manifest: &Path, out: &Path, keep: impl Fn(&str) -> bool) -> usize {
    let mut all = read_json(manifest);
    let map = all.as_object_mut().unwrap();
    map.retain(|name, _| keep(name));
    let kept = map.len();
    fs::write(out, serde_json::to_vec(&all).unwrap()).unwrap();
    kept
}

/// A writable copy of a fixture's checkpoint folder (`.metadata` included).
fn copy_checkpoint(name: &str) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(checkpoint(name)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    copy
}

fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// stdout and stderr of a run, together.
fn all_output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// Bit-exact consolidation of every fixture.

/// The model (optimizer state left out) on no launcher and 1, 2, 3 ranks,
/// then everything, each against the sha256 PyTorch computed before saving;
/// the model also against what PyTorch's own reader loads back.
fn reproduces_every_tensor(name: &str) {
    let input = checkpoint(name);
    let work = tempfile::tempdir().unwrap();
    for ranks in [0, 1, 2, 3] {
        let out = work.path().join(format!("model-{ranks}"));
        eprintln!("{name}: --exclude 'optim.*' on {ranks} rank(s)");
        consolidate_ok(ranks, &["-q", "--exclude", "optim.*", s(&input), s(&out)]);
        assert_eq!(names(&out), ONE_FILE, "{name} on {ranks} rank(s)");
        assert_matches_manifest(&out, &fixture(name).join("manifest.json"));
    }
    assert_matches_manifest(
        &work.path().join("model-2"),
        &fixture(name).join("reference.json"),
    );
    let out = work.path().join("all");
    eprintln!("{name}: everything on 2 ranks");
    consolidate_ok(2, &["-q", s(&input), s(&out)]);
    assert_eq!(names(&out), ONE_FILE, "{name}");
    assert_matches_manifest(&out, &fixture(name).join("manifest-all.json"));
}

#[test]
fn the_fixture_list_is_complete() {
    // A new fixture must be added to FIXTURES (or be the hostile zstd one).
    let mut found: Vec<String> = names(&fixture(""))
        .into_iter()
        .filter(|n| n.starts_with("dcp-v") && n != "dcp-v215-zstd")
        .collect();
    found.sort();
    let mut listed: Vec<String> = FIXTURES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed);
    // Each optimizer state is really there, so --exclude has work to do
    // (more-dtypes has none).
    for name in FIXTURES.iter().filter(|n| !n.ends_with("more-dtypes")) {
        let all = manifest_bytes(&fixture(name).join("manifest-all.json"));
        assert!(all.iter().any(|(t, _)| t.starts_with("optim.")), "{name}");
    }
}

#[test]
fn v215_w2_reproduces_every_tensor() {
    reproduces_every_tensor("dcp-v215-w2");
}

#[test]
fn v215_w4_mesh_reproduces_every_tensor() {
    reproduces_every_tensor("dcp-v215-w4-mesh");
}

#[test]
fn v215_dtypes_t3_reproduces_every_tensor() {
    reproduces_every_tensor("dcp-v215-dtypes-t3");
}

#[test]
fn v215_more_dtypes_reproduces_every_tensor() {
    reproduces_every_tensor("dcp-v215-more-dtypes");
}

#[test]
fn v25_w2_reproduces_every_tensor() {
    reproduces_every_tensor("dcp-v25-w2");
}

#[test]
fn v25_w4_mesh_reproduces_every_tensor() {
    reproduces_every_tensor("dcp-v25-w4-mesh");
}

#[test]
fn v25_dtypes_t3_reproduces_every_tensor() {
    reproduces_every_tensor("dcp-v25-dtypes-t3");
}

#[test]
fn v25_more_dtypes_reproduces_every_tensor() {
    reproduces_every_tensor("dcp-v25-more-dtypes");
}

#[test]
fn shared_headers_and_the_balanced_schedule_give_the_same_bytes() {
    let work = tempfile::tempdir().unwrap();
    for name in ["dcp-v215-w4-mesh", "dcp-v25-w2"] {
        let input = checkpoint(name);
        let manifest = fixture(name).join("manifest.json");
        for ranks in [2, 3] {
            let out = work.path().join(format!("{name}-shared-{ranks}"));
            let args = [
                "-q",
                "--headers",
                "shared",
                "--exclude",
                "optim.*",
                s(&input),
                s(&out),
            ];
            consolidate_ok(ranks, &args);
            assert_matches_manifest(&out, &manifest);
        }
        let out = work.path().join(format!("{name}-balanced"));
        let args = [
            "-q",
            "--schedule",
            "balanced",
            "--exclude",
            "optim.*",
            s(&input),
            s(&out),
        ];
        consolidate_ok(3, &args);
        assert_matches_manifest(&out, &manifest);
    }
}

#[test]
fn a_mapping_splits_a_dcp_checkpoint_into_its_files() {
    for name in ["dcp-v215-w2", "dcp-v25-w4-mesh"] {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("out");
        let mapping_path = fixture(name).join("mapping.json");
        let input = checkpoint(name);
        let args = [
            "-q",
            "--mapping",
            s(&mapping_path),
            "--exclude",
            "optim.*",
            s(&input),
            s(&out),
        ];
        consolidate_ok(2, &args);
        assert_eq!(
            names(&out),
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json"
            ],
            "{name}"
        );
        assert_matches_manifest(&out, &fixture(name).join("manifest.json"));
        // Each tensor is in the file the mapping names.
        let mapping = read_json(&mapping_path);
        let index = read_json(&out.join("model.safetensors.index.json"));
        for (tensor, file) in mapping.as_object().unwrap() {
            let want = format!("model-{:05}-of-00002.safetensors", file.as_u64().unwrap());
            assert_eq!(index["weight_map"][tensor], Json::String(want), "{tensor}");
        }
    }
}

#[test]
fn dtype_bf16_converts_floats_and_verify_only_agrees() {
    let name = "dcp-v215-dtypes-t3";
    let input = checkpoint(name);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let args = [
        "-q",
        "--dtype",
        "bf16",
        "--exclude",
        "optim.*",
        s(&input),
        s(&out),
    ];
    consolidate_ok(2, &args);
    let got = output_tensors(&out);
    let manifest = read_json(&fixture(name).join("manifest.json"));
    let manifest = manifest.as_object().unwrap();
    assert_eq!(got.len(), manifest.len());
    let mut converted = 0;
    for (tensor, want) in manifest {
        let (shape, dtype, sha) = &got[tensor];
        let shape_json: Vec<u64> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(shape, &shape_json, "{tensor}");
        let saved = want["dtype"].as_str().unwrap();
        if ["F16", "F32", "F64"].contains(&saved) {
            assert_eq!(dtype, "BF16", "{tensor}");
            converted += 1;
        } else {
            // BF16 stays itself, and integers, bool and float8 are copied.
            assert_eq!(dtype, saved, "{tensor}");
            assert_eq!(sha, want["sha256"].as_str().unwrap(), "{tensor}");
        }
    }
    assert_eq!(converted, 9, "three tensors each of F16, F32, F64");

    let verify = [
        "--verify-only",
        "--dtype",
        "bf16",
        "--exclude",
        "optim.*",
        s(&input),
        s(&out),
    ];
    let text = stderr(&consolidate_ok(2, &verify));
    assert!(text.contains("all equal"), "{text}");

    // Not vacuous: one changed byte in a converted tensor is found.
    let file = out.join(ONE_FILE[0]);
    let header = st_consolidate_mpi::safetensors::header::read_header(&file).unwrap();
    let victim = header
        .tensors
        .iter()
        .find(|t| t.name == "model.layers.1.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(victim.dtype, Dtype::BF16, "layer 1 is F32 as saved");
    let mut bytes = fs::read(&file).unwrap();
    bytes[(header.data_start + victim.begin) as usize] ^= 0x40;
    fs::write(&file, bytes).unwrap();
    let out_run = consolidate(2, &verify);
    let text = stderr(&out_run);
    assert!(!out_run.status.success(), "{text}");
    assert!(
        text.contains("model.layers.1.self_attn.q_proj.weight"),
        "{text}"
    );
}

#[test]
fn verify_reads_back_every_byte() {
    let name = "dcp-v25-w4-mesh";
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let run = consolidate_ok(
        3,
        &[
            "--verify",
            "--exclude",
            "optim.*",
            s(&checkpoint(name)),
            s(&out),
        ],
    );
    let text = stderr(&run);
    assert!(
        text.contains("verified: every written byte equals the inputs"),
        "{text}"
    );
    assert_matches_manifest(&out, &fixture(name).join("manifest.json"));
}

// ---------------------------------------------------------------------------
// Hostile and damaged checkpoints.

/// Each rank's exit status, printed by a shell around the binary (mpirun's
/// own status only says that some rank failed). The shell itself exits 0 so
/// that mpirun does not kill the ranks still finishing when one has failed.
fn exit_codes_per_rank(ranks: usize, args: &[&str]) -> Vec<i32> {
    let script = r#""$0" "$@"; echo "rank-exit $OMPI_COMM_WORLD_RANK $?" >&2"#;
    let out = Command::new("mpirun")
        .args(["--oversubscribe", "-n", &ranks.to_string(), "sh", "-c"])
        .arg(script)
        .arg(BIN)
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let mut codes = vec![None; ranks];
    for line in stderr(&out).lines() {
        if let Some(rest) = line.strip_prefix("rank-exit ") {
            let (rank, code) = rest.split_once(' ').unwrap();
            codes[rank.parse::<usize>().unwrap()] = Some(code.parse::<i32>().unwrap());
        }
    }
    codes
        .into_iter()
        .map(|c| c.unwrap_or_else(|| panic!("a rank did not finish:\n{}", stderr(&out))))
        .collect()
}

/// Refused on 2 ranks and on 3 (where every rank must exit with 1), with
/// every needle in the one message. Returns the message.
fn refused(input: &Path, extra: &[&str], needles: &[&str]) -> String {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let mut args: Vec<&str> = extra.to_vec();
    args.extend([s(input), s(&out)]);
    let text = assert_fails(2, &args, input, &out, needles);
    assert_fails(3, &args, input, &out, needles);
    assert_eq!(exit_codes_per_rank(3, &args), [1, 1, 1], "{args:?}");
    assert!(names(&out).is_empty(), "{:?}", names(&out));
    text
}

#[test]
fn a_metadata_pickle_that_would_run_code_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let pwned = dir.path().join("PWNED");
    // A protocol-2 style pickle calling os.system (GLOBAL, MARK, STRING,
    // TUPLE, REDUCE): loading it with pickle.load would create `pwned`.
    let pickle = format!("cos\nsystem\n(S'touch {}'\ntR.", pwned.display());
    fs::write(dir.path().join(".metadata"), pickle).unwrap();
    fs::copy(
        checkpoint("dcp-v215-w2").join("__0_0.distcp"),
        dir.path().join("__0_0.distcp"),
    )
    .unwrap();
    let text = refused(dir.path(), &[], &[".metadata", "os.system"]);
    assert!(!pwned.exists(), "the pickle ran: {text}");
}

#[test]
fn a_truncated_distcp_file_is_refused() {
    let dir = copy_checkpoint("dcp-v215-w2");
    let path = dir.path().join("__1_0.distcp");
    truncate(&path, fs::metadata(&path).unwrap().len() / 2);
    refused(
        dir.path(),
        &[],
        &["__1_0.distcp", "tensor '", "past the end of the file"],
    );
}

#[test]
fn the_last_chunk_running_past_the_end_of_its_file_is_refused() {
    let dir = copy_checkpoint("dcp-v25-w2");
    let file = "__1_0.distcp";
    // The last chunk in the file, from the library's reading of the intact
    // copy; one byte less and only its range passes the end.
    let read = read_dcp_checkpoint(dir.path()).unwrap();
    let (last, _) = read
        .tensors
        .iter()
        .flat_map(|t| {
            t.pieces
                .iter()
                .filter(|p| read.files[p.location.shard].ends_with(file))
                .map(move |p| (t.name.clone(), p.location.offset))
        })
        .max_by_key(|&(_, at)| at)
        .unwrap();
    let path = dir.path().join(file);
    truncate(&path, fs::metadata(&path).unwrap().len() - 1);
    let needle = format!("tensor '{last}'");
    refused(
        dir.path(),
        &[],
        &[file, &needle, "past the end of the file"],
    );
}

#[test]
fn a_chunk_whose_archive_disagrees_with_the_metadata_is_refused() {
    let dir = copy_checkpoint("dcp-v215-w2");
    // The metadata's float32 dtype global (memoized, used by every F32
    // tensor) becomes float16, the same length: only the dtype changes, and
    // the chunks' data.pkl still say torch.float32.
    let path = dir.path().join(".metadata");
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.windows(7).position(|w| w == b"float32").unwrap();
    bytes[at..at + 7].copy_from_slice(b"float16");
    fs::write(&path, bytes).unwrap();
    refused(
        dir.path(),
        &[],
        &[".distcp", "tensor '", "torch.float32", ".metadata says F16"],
    );
}

#[test]
fn swapped_distcp_files_are_refused() {
    let dir = copy_checkpoint("dcp-v215-w2");
    let (a, b) = (
        dir.path().join("__0_0.distcp"),
        dir.path().join("__1_0.distcp"),
    );
    let swap = dir.path().join("swap");
    fs::rename(&a, &swap).unwrap();
    fs::rename(&b, &a).unwrap();
    fs::rename(&swap, &b).unwrap();
    refused(dir.path(), &[], &[".distcp", "tensor '"]);
}

#[test]
fn a_missing_distcp_file_is_refused() {
    let dir = copy_checkpoint("dcp-v215-w4-mesh");
    fs::remove_file(dir.path().join("__2_0.distcp")).unwrap();
    refused(dir.path(), &[], &["__2_0.distcp", "tensor '"]);
}

#[test]
fn compressed_items_are_refused() {
    let input = checkpoint("dcp-v215-zstd");
    refused(&input, &[], &["__0_0.distcp", "tensor '", "stream.zstd/1"]);
}

#[test]
fn a_folder_with_both_formats_asks_for_input_format() {
    let dir = copy_checkpoint("dcp-v215-w2");
    let shard = "shard-00001-model-00001-of-00002.safetensors";
    fs::copy(torch_fixture().join(shard), dir.path().join(shard)).unwrap();
    refused(dir.path(), &[], &["both", ".metadata", "--input-format"]);
}

#[test]
fn an_empty_folder_says_what_each_format_looks_like() {
    let dir = tempfile::tempdir().unwrap();
    refused(
        dir.path(),
        &[],
        &[
            "holds no checkpoint",
            ".metadata",
            "__R_I.distcp",
            "shard-RRRRR-model-IIIII-of-NNNNN.safetensors",
        ],
    );
}

// ---------------------------------------------------------------------------
// What the summary, the report and the dry run say.

#[test]
fn non_tensor_entries_are_named_once_and_reported() {
    let name = "dcp-v215-w2";
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let report = work.path().join("r.json");
    let input = checkpoint(name);
    let args = [
        "--exclude",
        "optim.*",
        "--report",
        s(&report),
        s(&input),
        s(&out),
    ];
    let run = consolidate_ok(3, &args);
    let text = all_output(&run);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("non-tensor entr"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let info = read_json(&fixture(name).join("info.json"));
    let non_tensors: Vec<&str> = info["non_tensor_entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        lines[0].contains(&format!(
            "skipped {} non-tensor entries (not weights; --report lists each):",
            non_tensors.len()
        )),
        "{}",
        lines[0]
    );
    // Named by group with counts, one short line each.
    let owned: Vec<String> = non_tensors.iter().map(|e| e.to_string()).collect();
    for (group, count) in st_consolidate_mpi::report::non_tensor_groups(&owned) {
        let entries = if count == 1 { "entry" } else { "entries" };
        let line = format!("\n    {group}: {count} {entries}");
        assert!(text.contains(&line), "{line:?} not in {text}");
    }
    assert!(text.contains("left out 4 tensors"), "{text}");

    let report = read_json(&report);
    let input = &report["input"];
    assert_eq!(input["format"], "dcp");
    let mut reported: Vec<&str> = input["non_tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    reported.sort();
    assert!(reported.contains(&"step"));
    assert_eq!(reported, non_tensors);
    let optimizer: Vec<(String, u64)> = manifest_bytes(&fixture(name).join("manifest-all.json"))
        .into_iter()
        .filter(|(t, _)| t.starts_with("optim."))
        .collect();
    assert_eq!(input["excluded_tensors"], optimizer.len());
    let optimizer_bytes: u64 = optimizer.iter().map(|o| o.1).sum();
    assert_eq!(input["excluded_bytes"], optimizer_bytes);
    assert_matches_manifest(&out, &fixture(name).join("manifest.json"));
}

/// The `name prefix` row of a dry run for `prefix`.
fn prefix_row<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} row in:\n{text}"))
}

#[test]
fn the_dry_run_lists_name_prefixes_and_what_is_exported() {
    let name = "dcp-v215-w2";
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let input = checkpoint(name);
    let all = manifest_bytes(&fixture(name).join("manifest-all.json"));
    let count_bytes = |prefix: &str| {
        let of: Vec<u64> = all
            .iter()
            .filter(|(t, _)| t.starts_with(prefix))
            .map(|t| t.1)
            .collect();
        (of.len(), of.iter().sum::<u64>())
    };

    let run = consolidate_ok(0, &["--dry-run", s(&input), s(&out)]);
    let text = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(text.contains("name prefix"), "{text}");
    for prefix in ["model.", "optim.", "lm_head."] {
        let row = prefix_row(&text, &format!("{prefix}*"));
        let (count, bytes) = count_bytes(prefix);
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(fields[1], count.to_string(), "{row}");
        assert_eq!(fields[2], bytes.to_string(), "{row}");
        assert!(row.ends_with("yes"), "{row}");
    }
    assert!(text.contains("non-tensor entries (skipped, not weights):"));
    assert!(!out.exists(), "a dry run writes nothing");

    let run = consolidate_ok(
        2,
        &["--dry-run", "--exclude", "optim.*", s(&input), s(&out)],
    );
    let text = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        prefix_row(&text, "optim.*").ends_with("no (--include/--exclude)"),
        "{text}"
    );
    assert!(prefix_row(&text, "model.*").ends_with("yes"), "{text}");
    assert_eq!(
        text.matches("name prefix").count(),
        1,
        "rank 0 only:\n{text}"
    );
    assert!(!out.exists(), "a dry run writes nothing");
}

#[test]
fn include_selects_tensors_in_both_formats() {
    let work = tempfile::tempdir().unwrap();
    let keep_model = |name: &str| name.starts_with("model.");
    let inputs = [
        (torch_fixture(), torch_fixture().join("manifest.json")),
        (
            checkpoint("dcp-v25-w2"),
            fixture("dcp-v25-w2").join("manifest-all.json"),
        ),
    ];
    for (i, (input, manifest)) in inputs.iter().enumerate() {
        let all = manifest_bytes(manifest);
        assert!(all.iter().any(|(t, _)| t == "lm_head.weight"));
        let expected = work.path().join(format!("expected-{i}.json"));
        let kept = filtered_manifest(manifest, &expected, keep_model);
        assert!(kept > 0 && kept < all.len());

        let out = work.path().join(format!("include-{i}"));
        let run = consolidate_ok(2, &["--include", "model.*", s(input), s(&out)]);
        assert_matches_manifest(&out, &expected);
        let index = fs::read_to_string(out.join("model.safetensors.index.json")).unwrap();
        assert!(!index.contains("lm_head"), "{index}");
        let left_out = all.len() - kept;
        assert!(
            stderr(&run).contains(&format!(
                "left out {left_out} tensor{}",
                if left_out == 1 { " " } else { "s" }
            )),
            "{}",
            stderr(&run)
        );

        // The same selection by exclusion, patterns repeated.
        let out = work.path().join(format!("exclude-{i}"));
        let args = [
            "-q",
            "--exclude",
            "lm_head.*",
            "--exclude",
            "optim.*",
            s(input),
            s(&out),
        ];
        consolidate_ok(2, &args);
        assert_matches_manifest(&out, &expected);
    }
}

#[test]
fn a_selection_that_leaves_nothing_is_refused() {
    // A typo in --include ("modle.*") must not publish an empty model.
    let input = checkpoint("dcp-v215-w2");
    refused(
        &input,
        &["--include", "modle.*"],
        &["--include 'modle.*'", "model.*"],
    );
}
