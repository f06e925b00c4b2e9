//! Hostile inputs and command lines of the second round (issue 10): each
//! used to lose data, hang or garble its message. Every one now ends with one
//! clear message and writes nothing under a final name.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

const SHARD_1A: &str = "shard-00001-model-00001-of-00002.safetensors";
const SHARD_2A: &str = "shard-00002-model-00001-of-00002.safetensors";
const SHARD_2B: &str = "shard-00002-model-00002-of-00002.safetensors";

/// A tensor name with a newline, an ANSI colour code and a carriage return.
const EVIL: &str = "evil\n\x1b[31mred\r.weight";
/// How messages show [`EVIL`].
const EVIL_SHOWN: &str = "evil\\n\\u{1b}[31mred\\r.weight";

/// Runs on 2 ranks with `mapping` and checks a clean failure.
fn fails_with(input: &Path, mapping: &Path, needles: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let args = ["--mapping", s(mapping), s(input), s(out.path())];
    assert_fails(2, &args, input, out.path(), needles)
}

/// The message is one message: a single line from the tool (its hint
/// follows), and no raw control character reached the terminal.
fn assert_one_clean_message(text: &str) {
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("st-consolidate-mpi:"))
        .collect();
    assert_eq!(ours.len(), 1, "{text:?}");
    assert!(ours[0].contains("error:"), "{text:?}");
    assert!(
        !text.contains('\x1b') && !text.contains('\r'),
        "raw control characters in {text:?}"
    );
    assert!(!text.lines().any(|l| l.starts_with("[31m")), "{text:?}");
}

/// Renames tensor `from` to `to` in every shard holding it: header and
/// DCP_SHARDING_INFO alike, so that the checkpoint stays consistent.
fn rename_tensor(dir: &Path, from: &str, to: &str) {
    for name in names(dir).iter().filter(|n| n.starts_with("shard-")) {
        let path = dir.join(name);
        let rename = |object: &mut Value| {
            let object = object.as_object_mut().unwrap();
            if let Some(entry) = object.remove(from) {
                object.insert(to.to_string(), entry);
            }
        };
        edit_header(&path, rename);
        edit_sharding_info(&path, rename);
    }
}

/// Rewrites a shard's header with a second, identical entry for `tensor`
/// placed first: a JSON object cannot hold a key twice, so this edits text.
fn repeat_entry(path: &Path, tensor: &str) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let text = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let entry = format!("{{{}:{},", Value::from(tensor), header[tensor]);
    let json = text.replacen('{', &entry, 1);
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn dangling_symlinks_in_place_of_the_highest_rank_are_an_error() {
    // Rank 2 holds the end of every tensor. Skipped, its links would leave a
    // complete-looking one-rank checkpoint and every tensor would come out
    // short, with exit 0.
    let input = copy_fixture();
    for name in [SHARD_2A, SHARD_2B] {
        let path = input.path().join(name);
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(format!("/nonexistent/{name}"), &path).unwrap();
    }
    let mapping = input.path().join("mapping.json");
    let first = format!(
        "{} is a symbolic link to /nonexistent/{SHARD_2A}, which cannot be opened",
        input.path().join(SHARD_2A).display()
    );
    let text = fails_with(
        input.path(),
        &mapping,
        &[
            "2 entries named like a shard file cannot be read as one",
            &first,
            SHARD_2B,
            "hint: every *.safetensors entry of INPUT_DIR must be a readable shard file",
        ],
    );
    assert_one_clean_message(&text);

    // A folder named like a shard is no shard either.
    let input = copy_fixture();
    std::fs::create_dir(
        input
            .path()
            .join("shard-00003-model-00001-of-00002.safetensors"),
    )
    .unwrap();
    let mapping = input.path().join("mapping.json");
    fails_with(
        input.path(),
        &mapping,
        &["shard-00003-model-00001-of-00002.safetensors is a directory"],
    );
}

/// Runs a command line that is refused as a usage error: exit 2, `needle` once, and
/// OUTPUT_DIR not even created.
fn refused_by_the_command_line(ranks: usize, option: &[&str], needle: &str) {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("out");
    let fixture = torch_fixture();
    let mut args = option.to_vec();
    args.extend([s(&fixture), s(&target)]);
    let run = consolidate(ranks, &args);
    let text = stderr(&run);
    if ranks == 0 {
        assert_eq!(run.status.code(), Some(2), "{text}");
    } else {
        assert!(!run.status.success(), "{text}");
    }
    assert_eq!(text.matches(needle).count(), 1, "{option:?}: {text}");
    assert!(!target.exists(), "{option:?} created OUTPUT_DIR");
}

#[test]
fn thread_counts_above_1024_are_capped_and_0_is_refused() {
    // 65535 threads per rank used to be accepted and hang; they are now
    // taken as 1024 (tests/options.rs runs them), and 0 is refused.
    for ranks in [0, 2] {
        refused_by_the_command_line(ranks, &["--threads", "0"], "--threads 0 is not accepted");
    }
    let fixture = torch_fixture();
    let out = tempfile::tempdir().unwrap();
    let mapping = fixture.join("mapping.json");
    let args = ["-q", "--threads", "65535", "--mapping", s(&mapping)];
    consolidate_ok(0, &[&args[..], &[s(&fixture), s(out.path())]].concat());
    assert_matches_manifest(out.path(), &fixture.join("manifest.json"));
}

#[test]
fn progress_intervals_below_a_tenth_of_a_second_are_refused() {
    // --progress 1e-9 used to print a line per microsecond of copying.
    for value in ["1e-9", "0.09", "-0.5", "NaN", "inf", "86401"] {
        refused_by_the_command_line(
            0,
            &[&format!("--progress={value}")],
            "nor a number of seconds from 0.1 to 86400",
        );
    }
    let fixture = torch_fixture();
    let mapping = fixture.join("mapping.json");
    for value in ["0", "0.1"] {
        let out = tempfile::tempdir().unwrap();
        let args = ["--progress", value, "--mapping", s(&mapping)];
        consolidate_ok(2, &[&args[..], &[s(&fixture), s(out.path())]].concat());
        assert_matches_manifest(out.path(), &fixture.join("manifest.json"));
    }
}

#[test]
fn a_repeated_tensor_in_a_shard_header_is_refused() {
    // Identical twice: with the last one kept, the run used to succeed.
    let input = copy_fixture();
    repeat_entry(&input.path().join(SHARD_1A), "model.embed_tokens.weight");
    let mapping = input.path().join("mapping.json");
    let expected = format!(
        "{}: tensor 'model.embed_tokens.weight': appears twice in the header",
        input.path().join(SHARD_1A).display()
    );
    fails_with(input.path(), &mapping, &[&expected]);
}

#[test]
fn a_tensor_listed_twice_in_a_mapping_or_index_is_refused() {
    let fixture = torch_fixture();
    let original = std::fs::read_to_string(fixture.join("mapping.json")).unwrap();
    let files = tempfile::tempdir().unwrap();
    // The repeat comes last: with the last one kept, the embedding used to
    // move to file 2 without a word.
    let end = original.rfind('}').unwrap();
    let twice = format!(
        "{},\n \"model.embed_tokens.weight\": 2\n}}\n",
        &original[..end].trim_end()
    );
    let mapping = files.path().join("mapping.json");
    std::fs::write(&mapping, twice).unwrap();
    let expected = format!(
        "{}: the key 'model.embed_tokens.weight' appears twice",
        mapping.display()
    );
    fails_with(
        &fixture,
        &mapping,
        &[&expected, "hint: list every tensor once"],
    );

    let index = files.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"metadata": {}, "weight_map": {
            "lm_head.weight": "model-00002-of-00002.safetensors",
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let args = ["--hf-index", s(&index), s(&fixture), s(out.path())];
    let expected = format!(
        "{}: the key 'model.embed_tokens.weight' appears twice inside 'weight_map'",
        index.display()
    );
    assert_fails(2, &args, &fixture, out.path(), &[&expected]);
}

#[test]
fn control_characters_in_names_are_escaped_in_the_one_message() {
    // Renamed in one header only: that shard's entry has no sharding info.
    let input = copy_fixture();
    edit_header(&input.path().join(SHARD_1A), |header| {
        let header = header.as_object_mut().unwrap();
        let entry = header.remove("model.embed_tokens.weight").unwrap();
        header.insert(EVIL.to_string(), entry);
    });
    let mapping = input.path().join("mapping.json");
    let expected = format!("tensor '{EVIL_SHOWN}': has no entry in DCP_SHARDING_INFO");
    let text = fails_with(input.path(), &mapping, &[&expected]);
    assert_one_clean_message(&text);

    // Renamed everywhere: a consistent checkpoint whose tensor the mapping
    // does not name.
    let input = copy_fixture();
    rename_tensor(input.path(), "model.embed_tokens.weight", EVIL);
    let mapping = input.path().join("mapping.json");
    let expected = format!("not in the mapping {}: {EVIL_SHOWN}\n", mapping.display());
    let text = fails_with(input.path(), &mapping, &[&expected]);
    assert_one_clean_message(&text);

    // A file name from INPUT_DIR is shown the same way.
    let input = copy_fixture();
    let stray = "stray\n\x1b[31m.safetensors";
    std::fs::write(
        input.path().join(stray),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    )
    .unwrap();
    let mapping = input.path().join("mapping.json");
    let text = fails_with(
        input.path(),
        &mapping,
        &["stray\\n\\u{1b}[31m.safetensors: not a DCP shard"],
    );
    assert_one_clean_message(&text);
}

#[test]
fn verify_only_refuses_an_output_index_listing_a_tensor_twice() {
    let input = torch_fixture();
    let mapping = input.join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    consolidate_ok(2, &["--mapping", s(&mapping), s(&input), s(out.path())]);
    let index = out.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let doubled = text.replacen(
        "\"lm_head.weight\": \"model-00002-of-00002.safetensors\",",
        "\"lm_head.weight\": \"model-00001-of-00002.safetensors\",\n    \"lm_head.weight\": \"model-00002-of-00002.safetensors\",",
        1,
    );
    assert_ne!(doubled, text, "the index lists lm_head.weight");
    std::fs::write(&index, doubled).unwrap();
    let run = consolidate(2, &["--verify-only", s(&input), s(out.path())]);
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(
        text.contains("'lm_head.weight'") && text.contains("twice"),
        "{text}"
    );
    assert_eq!(text.matches("error:").count(), 1, "{text}");
}
