//! Issue 25's input and output checks: shard sets complete whatever their
//! names, output-named files without `DCP_SHARDING_INFO` among shards,
//! earlier outputs under any index name, `--index-name` refused before any
//! work, the warning for a glob that matches no saved name, and messages
//! that read well (counts, the demo).

mod common;
use common::*;
use st_consolidate_mpi::options::{Options, Spelling};
use std::path::Path;

/// A checkpoint saved from 2 ranks into 2 output files (every rank holds a
/// slice of every tensor: rank 2 holds each tensor's end).
fn two_rank_checkpoint(dir: &Path) {
    make_shards(
        dir,
        &[
            "--layout", "fsdp", "--ranks", "2", "--files", "2", "--seed", "25",
        ],
    );
}

fn shard(dir: &Path, rank: u32, index: u32) -> std::path::PathBuf {
    dir.join(format!(
        "shard-{rank:05}-model-{index:05}-of-00002.safetensors"
    ))
}

#[test]
fn a_missing_file_of_the_highest_rank_beside_a_shard_of_another_name_is_refused() {
    let ckpt = tempfile::tempdir().unwrap();
    two_rank_checkpoint(ckpt.path());
    // One file of the highest rank lost, and one shard kept under another
    // name: the named ones no longer all parse, which once switched the
    // check off (exit 0 with every tensor of output 2 cut short).
    std::fs::remove_file(shard(ckpt.path(), 2, 2)).unwrap();
    std::fs::rename(
        shard(ckpt.path(), 1, 1),
        ckpt.path().join("rank1-part1.safetensors"),
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let mapping = ckpt.path().join("mapping.json");
    let text = assert_fails(
        2,
        &["--mapping", s(&mapping), s(ckpt.path()), s(&out)],
        ckpt.path(),
        &out,
        &["shard-00002-model-00002-of-00002.safetensors", "missing"],
    );
    assert!(text.contains("--allow-missing-shard-files"), "{text}");
}

#[test]
fn named_shards_beside_shards_of_other_names_are_refused_unless_allowed() {
    let ckpt = tempfile::tempdir().unwrap();
    two_rank_checkpoint(ckpt.path());
    // Every file of rank 2 renamed: the named set (rank 1) looks complete,
    // but nothing vouches for the others.
    for index in 1..=2 {
        std::fs::rename(
            shard(ckpt.path(), 2, index),
            ckpt.path().join(format!("late-{index}.safetensors")),
        )
        .unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let mapping = ckpt.path().join("mapping.json");
    let args = ["--mapping", s(&mapping), s(ckpt.path()), s(&out)];
    let text = assert_fails(
        0,
        &args,
        ckpt.path(),
        &out,
        &[
            "late-1.safetensors",
            "late-2.safetensors",
            "--allow-missing-shard-files",
        ],
    );
    assert!(!text.contains("shard-00001-model"), "{text}");
    // The user vouches for them: every tensor whole.
    let mut allowed = vec!["--allow-missing-shard-files"];
    allowed.extend(args);
    consolidate_ok(2, &allowed);
    assert_matches_manifest(&out, &ckpt.path().join("manifest.json"));
}

/// A one-rank checkpoint whose shards are named like outputs
/// (`model-IIIII-of-NNNNN`, NeMo's own tests save them so).
fn output_named_checkpoint(dir: &Path) {
    make_shards(dir, &["--layout", "zoo", "--ranks", "1", "--seed", "26"]);
    for name in names(dir) {
        if let Some((_, i, n)) = st_consolidate_mpi::safetensors::naming::parse_shard_name(&name) {
            let to = format!("model-{i:05}-of-{n:05}.safetensors");
            std::fs::rename(dir.join(&name), dir.join(to)).unwrap();
        }
    }
}

#[test]
fn an_output_named_shard_without_sharding_info_is_refused_by_name() {
    let ckpt = tempfile::tempdir().unwrap();
    output_named_checkpoint(ckpt.path());
    let lost = ckpt.path().join("model-00002-of-00003.safetensors");
    edit_header(&lost, |header| {
        header["__metadata__"]
            .as_object_mut()
            .unwrap()
            .remove("DCP_SHARDING_INFO");
    });
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    // No mapping: nothing else would notice the tensors it holds.
    let text = assert_fails(
        2,
        &[s(ckpt.path()), s(&out)],
        ckpt.path(),
        &out,
        &["model-00002-of-00003.safetensors", "DCP_SHARDING_INFO"],
    );
    assert!(!text.contains("earlier output"), "{text}");
}

#[test]
fn earlier_outputs_among_shards_are_skipped_with_one_note_naming_them() {
    let ckpt = tempfile::tempdir().unwrap();
    two_rank_checkpoint(ckpt.path());
    let mapping = ckpt.path().join("mapping.json");
    // An earlier run into INPUT_DIR itself left consolidated files there.
    consolidate_ok(
        0,
        &["--mapping", s(&mapping), s(ckpt.path()), s(ckpt.path())],
    );
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let run = consolidate_ok(2, &["--mapping", s(&mapping), s(ckpt.path()), s(&out)]);
    let text = stderr(&run);
    let notes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("model-00001-of-00002.safetensors"))
        .collect();
    assert_eq!(notes.len(), 1, "{text}");
    assert!(
        notes[0].contains("model-00002-of-00002.safetensors") && notes[0].contains("skipp"),
        "{text}"
    );
    assert_matches_manifest(&out, &ckpt.path().join("manifest.json"));
}

#[test]
fn an_index_of_an_earlier_run_under_a_custom_name_is_an_earlier_output() {
    let input = torch_fixture();
    let mapping = input.join("mapping.json");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    // Two files under a custom index name ...
    consolidate_ok(
        2,
        &[
            "--index-name",
            "custom.index.json",
            "--mapping",
            s(&mapping),
            s(&input),
            s(&out),
        ],
    );
    assert!(names(&out).contains(&"custom.index.json".to_string()));
    // ... then one file (5 GB default) under the default name: the old
    // files and the index naming them are earlier outputs.
    let again = [s(&input), s(&out)];
    let refused = consolidate(0, &again);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("custom.index.json"),
        "{}",
        stderr(&refused)
    );
    let mut overwrite = vec!["--overwrite"];
    overwrite.extend(again);
    consolidate_ok(2, &overwrite);
    let left: Vec<String> = names(&out)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        left,
        [
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json"
        ],
        "the custom index named files this run removed"
    );
    // An index of another tool under a custom name is left alone.
    std::fs::write(
        out.join("other.index.json"),
        br#"{"metadata": {"total_size": 1}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    consolidate_ok(0, &overwrite);
    assert!(names(&out).contains(&"other.index.json".to_string()));
}

#[test]
fn bad_index_names_are_refused_before_output_dir_is_touched() {
    let input = torch_fixture();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    for length in [245, 256, 300] {
        let name = format!("{}.index.json", "i".repeat(length - ".index.json".len()));
        let run = consolidate(0, &["--index-name", &name, s(&input), s(&out)]);
        assert_eq!(run.status.code(), Some(2), "{length}: {}", stderr(&run));
        let text = stderr(&run);
        assert!(
            text.contains("--index-name") && text.contains("255 bytes"),
            "{text}"
        );
        assert!(!out.exists(), "OUTPUT_DIR created for a {length}-byte name");
    }
    // The longest accepted name works to the end (its temporary name fits).
    use st_consolidate_mpi::safetensors::naming::{MAX_INDEX_NAME_BYTES, TEMP_DECORATION_BYTES};
    let temp = st_consolidate_mpi::exec::output::temp_name("x");
    assert_eq!(temp.len(), 1 + TEMP_DECORATION_BYTES);
    assert_eq!(MAX_INDEX_NAME_BYTES, 235);
    let longest = format!("{}.index.json", "i".repeat(235 - ".index.json".len()));
    consolidate_ok(0, &["--index-name", &longest, s(&input), s(&out)]);
    assert!(names(&out).contains(&longest));
    // A NUL cannot pass argv; the keyword (the Python binding's way) can.
    let mut options = Options::new(&input, work.path().join("out2"), Spelling::Keywords);
    options.index_name = Some("model\0.index.json".into());
    let text = options.into_config().unwrap_err().to_string();
    assert!(
        text.starts_with("index_name: 'model\\0.index.json'") && text.contains("NUL"),
        "{text}"
    );
}

#[test]
fn a_glob_matching_no_saved_name_warns_with_the_names_it_would_match() {
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layout-accelerate");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let run = consolidate_ok(
        0,
        &[
            "--exclude",
            "lm_head.*",
            "--exclude",
            "model.model.embed_tokens.*",
            s(&input),
            s(&out),
        ],
    );
    let text = stderr(&run);
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("lm_head.*")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    let warning = warnings[0];
    assert!(warning.contains("warning"), "{text}");
    assert!(warning.contains("model.lm_head.weight"), "{text}");
    assert!(warning.contains("'model.lm_head.*'"), "{text}");
    assert!(warning.contains("saved names"), "{text}");
    // A pattern that matches saved names is no part of it.
    assert!(
        !text.contains("'model.model.embed_tokens.*' matches no"),
        "{text}"
    );
    // Globs keep matching the saved names: lm_head is written.
    let index = std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap();
    assert!(index.contains("\"lm_head.weight\""), "{index}");
    assert!(!index.contains("embed_tokens"), "{index}");
}

#[test]
fn counts_agree_in_number() {
    let input = torch_fixture();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    // The default 5 GB: one output file.
    let text = stderr(&consolidate_ok(0, &[s(&input), s(&out)]));
    assert!(text.contains("into 1 file on 1 rank"), "{text}");
    for wrong in ["1 files", "1 ranks", "(s)"] {
        assert!(!text.contains(wrong), "{wrong:?} in:\n{text}");
    }
}

/// The README's demo (`scripts/demo.sh`) says nothing of its own making:
/// its `mpirun` line, run as it is written there, gives no note and no
/// warning.
#[test]
fn the_demo_runs_without_a_note_or_warning() {
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.sh"))
            .unwrap();
    let line = script
        .lines()
        .find(|l| l.starts_with("mpirun "))
        .expect("demo.sh runs mpirun");
    let input = torch_fixture();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let words: Vec<String> = line
        .split_whitespace()
        .map(|w| {
            w.trim_matches('"')
                .replace("$input", s(&input))
                .replace("$output", s(&out))
        })
        .collect();
    assert_eq!(words[..2], ["mpirun", "-n"]);
    let ranks: usize = words[2].parse().unwrap();
    assert!(words[3].ends_with("st-consolidate-mpi"), "{line}");
    let args: Vec<&str> = words[4..].iter().map(String::as_str).collect();
    let text = stderr(&consolidate_ok(ranks, &args));
    for word in ["note", "warning"] {
        assert!(!text.contains(word), "{word} in the demo's output:\n{text}");
    }
    assert_matches_manifest(&out, &input.join("manifest.json"));
}
