//! What the run accepts at its edges (issue 17, cases 5-8): a checkpoint
//! with nothing to export, a tensor named `__metadata__`, arguments that are
//! not UTF-8, and PyTorch's own `enable_consolidation` layout. The
//! checkpoints in tests/fixtures/torch-edge were written by PyTorch's own
//! writers (make.py there).

mod common;
use common::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn edge(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch-edge")
        .join(name)
}

#[test]
fn a_checkpoint_of_only_non_tensor_entries_has_nothing_to_export() {
    let input = edge("no-tensors");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    for ranks in [0, 2] {
        assert_fails(
            ranks,
            &[s(&input), s(&out)],
            &input,
            &out,
            &[
                &format!("INPUT_DIR {} holds no tensors", s(&input)),
                "only 3 non-tensor entries (not weights): step, extra.lr, extra.note",
                "nothing to export",
            ],
        );
        assert!(!out.exists(), "nothing written, not even OUTPUT_DIR");
    }
    // A dry run has nothing to show either.
    assert_fails(
        0,
        &["--dry-run", s(&input), s(&out)],
        &input,
        &out,
        &["nothing to export"],
    );
}

#[test]
fn a_selection_that_leaves_nothing_is_still_refused_by_its_patterns() {
    let input = edge("metadata-name");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    assert_fails(
        2,
        &["--exclude", "*", s(&input), s(&out)],
        &input,
        &out,
        &[
            "--exclude '*'",
            "leave(s) none of the checkpoint's 2 tensors",
        ],
    );
}

#[test]
fn a_tensor_named_metadata_is_refused_by_name_in_both_formats() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let dcp = edge("metadata-name");
    for ranks in [0, 2] {
        assert_fails(
            ranks,
            &[s(&dcp), s(&out)],
            &dcp,
            &out,
            &[
                &format!(
                    "tensor '__metadata__' (in {}) has the name safetensors keeps",
                    s(&dcp.join("__0_0.distcp"))
                ),
                "--exclude '__metadata__'",
            ],
        );
    }
    // With --strip-prefix that leaves it as it is, too.
    assert_fails(
        0,
        &["--strip-prefix", "model.", s(&dcp), s(&out)],
        &dcp,
        &out,
        &["tensor '__metadata__'"],
    );
    // PyTorch's HF writer puts the tensor under a second "__metadata__" key.
    let hf = edge("metadata-name-hf");
    let shard = hf.join("shard-00001-model-00001-of-00001.safetensors");
    assert_fails(
        2,
        &[s(&hf), s(&out)],
        &hf,
        &out,
        &[
            &format!("{}: tensor '__metadata__'", s(&shard)),
            "no safetensors file can hold",
        ],
    );
    // Left out, the rest consolidates; a prefix can give it a storable name.
    consolidate_ok(2, &["-q", "--exclude", "__metadata__", s(&dcp), s(&out)]);
    let tensors = output_tensors(&out);
    assert_eq!(tensors.keys().collect::<Vec<_>>(), ["model.w"]);
    let renamed = work.path().join("renamed");
    consolidate_ok(0, &["-q", "--strip-prefix", "__", s(&dcp), s(&renamed)]);
    let tensors = output_tensors(&renamed);
    assert_eq!(
        tensors.keys().collect::<Vec<_>>(),
        ["metadata__", "model.w"]
    );
}

/// A path whose last component is `stem` followed by Latin-1 `é` (0xE9),
/// which is not UTF-8.
fn latin1(dir: &Path, stem: &str) -> PathBuf {
    let mut name = stem.as_bytes().to_vec();
    name.push(0xE9);
    dir.join(OsStr::from_bytes(&name))
}

#[test]
fn arguments_that_are_not_utf8_work() {
    let work = tempfile::tempdir().unwrap();
    let input = latin1(work.path(), "ckpt");
    std::fs::create_dir(&input).unwrap();
    for (path, bytes) in snapshot(&torch_fixture()) {
        std::fs::write(input.join(path.file_name().unwrap()), bytes).unwrap();
    }
    let reports = latin1(work.path(), "reports");
    std::fs::create_dir(&reports).unwrap();
    for ranks in [0, 2] {
        let out = latin1(work.path(), &format!("out-{ranks}"));
        let report = latin1(&reports, &format!("run-{ranks}"));
        let mut command = if ranks == 0 {
            Command::new(BIN)
        } else {
            let mut c = Command::new("mpirun");
            c.args(["--oversubscribe", "-n", "2", BIN]);
            c
        };
        let run = command
            .arg("--report")
            .arg(&report)
            .arg("--mapping")
            .arg(input.join("mapping.json"))
            .arg(&input)
            .arg(&out)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .output()
            .unwrap();
        let text = stderr(&run);
        assert!(run.status.success(), "{text}");
        assert!(!text.contains("panicked"), "{text}");
        assert_matches_manifest(&out, &torch_fixture().join("manifest.json"));
        // The report is at the very name asked for, its command line lossy.
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let line: Vec<&str> = report["command_line"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let shown = out.to_string_lossy();
        assert!(line.contains(&shown.as_ref()), "{line:?}");
        assert!(shown.contains('\u{FFFD}'));
    }
}

#[test]
fn pytorch_enable_consolidation_layout_reads_the_sharded_subfolder() {
    let input = edge("consolidated");
    let manifest = edge("consolidated-manifest.json");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let run = consolidate_ok(2, &[s(&input), s(&out)]);
    assert_matches_manifest(&out, &manifest);
    let text = stderr(&run);
    let note = format!(
        "reading the shards in {}: {} itself holds no shard files",
        s(&input.join("sharded")),
        s(&input)
    );
    assert_eq!(text.matches(&note).count(), 1, "{text}");
    // PyTorch's own index gives PyTorch's own file layout.
    let laid_out = work.path().join("laid-out");
    let index = input.join("model.safetensors.index.json");
    consolidate_ok(0, &["-q", "--hf-index", s(&index), s(&input), s(&laid_out)]);
    assert_matches_manifest(&laid_out, &manifest);
    let files: Vec<String> = names(&laid_out)
        .into_iter()
        .filter(|n| n.starts_with("model-"))
        .collect();
    assert_eq!(
        files,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
}

#[test]
fn shards_in_input_dir_itself_win_over_a_sharded_subfolder() {
    // INPUT_DIR's own files carry DCP_SHARDING_INFO: they are the input,
    // whatever sharded/ holds.
    let input = copy_fixture();
    let sharded = input.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    for (path, bytes) in snapshot(&edge("consolidated/sharded")) {
        std::fs::write(sharded.join(path.file_name().unwrap()), bytes).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let mapping = input.path().join("mapping.json");
    let run = consolidate_ok(
        0,
        &["--mapping", s(&mapping), s(input.path()), s(out.path())],
    );
    assert!(
        !stderr(&run).contains("reading the shards in"),
        "{}",
        stderr(&run)
    );
    assert_matches_manifest(out.path(), &torch_fixture().join("manifest.json"));
}
