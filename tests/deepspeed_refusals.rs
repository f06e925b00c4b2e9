//! DeepSpeed checkpoints this tool cannot convert faithfully are refused
//! before anything is written, on every rank alike, naming what was found
//! and what to do: tensor or pipeline parallel, experts, NVMe-offloaded
//! partitions, missing, extra, truncated or foreign rank files, two saves
//! mixed in one folder, and a pickle naming a global outside the allowlist.

mod common;

use common::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/deepspeed")
        .join(name)
        .join("checkpoint")
}

/// A writable copy of a case's save_dir; returns (temp dir, save_dir, tag
/// folder).
fn copy_case(name: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let save_dir = tmp.path().join("checkpoint");
    let status = Command::new("cp")
        .args(["-r", s(&fixture(name)), s(&save_dir)])
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("chmod")
        .args(["-R", "u+w", s(&save_dir)])
        .status()
        .unwrap();
    assert!(status.success());
    let tag = save_dir.join("global_step2");
    (tmp, save_dir, tag)
}

fn refused(ranks: usize, input: &Path, out: &Path, needles: &[&str]) -> String {
    assert_fails(ranks, &[s(input), s(out)], input, out, needles)
}

#[test]
fn tensor_parallel_files_are_refused_naming_the_file_and_ds_to_universal() {
    let input = fixture("z2-tp2-dp2-bf16");
    if !input.exists() {
        // The generator writes this case; a checkout without it is broken.
        panic!("missing fixture {}", input.display());
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    refused(
        2,
        &input,
        &out,
        &[
            "mp_rank_01",
            "tensor- or pipeline-parallel",
            "ds_to_universal",
        ],
    );
}

#[test]
fn pipeline_expert_and_nvme_layouts_are_refused_by_their_files() {
    for (extra, needles) in [
        (
            "layer_01-model_00-model_states.pt",
            ["pipeline-parallel", "layer_01-model_00"],
        ),
        (
            "layer_0_expert_1_mp_rank_00_model_states.pt",
            ["mixture-of-experts", "expert_1"],
        ),
        ("offloaded_tensors", ["offloaded", "NVMe"]),
    ] {
        let (tmp, save_dir, tag) = copy_case("z2-w2-bf16");
        match extra.ends_with(".pt") {
            true => std::fs::write(tag.join(extra), b"x").unwrap(),
            false => std::fs::create_dir(tag.join(extra)).unwrap(),
        }
        refused(2, &save_dir, &tmp.path().join("out"), &needles);
    }
}

#[test]
fn missing_extra_truncated_and_foreign_rank_files_are_refused() {
    let optim = |rank: u32| format!("bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt");
    // Missing: a 3-rank save with its last rank's file gone.
    let (tmp, save_dir, tag) = copy_case("z2-w3-bf16");
    std::fs::remove_file(tag.join(optim(2))).unwrap();
    refused(
        2,
        &save_dir,
        &tmp.path().join("out"),
        &["partitioned over 3 ranks", "missing: zero_pp_rank_2"],
    );
    // Extra: a 2-rank save with a third file.
    let (tmp, save_dir, tag) = copy_case("z3-w2-bf16");
    std::fs::copy(tag.join(optim(1)), tag.join(optim(2))).unwrap();
    refused(
        1,
        &save_dir,
        &tmp.path().join("out"),
        &["beyond the partition count: zero_pp_rank_2"],
    );
    // Truncated.
    let (tmp, save_dir, tag) = copy_case("z2-w2-bf16");
    let path = tag.join(optim(1));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    refused(
        2,
        &save_dir,
        &tmp.path().join("out"),
        &[&optim(1), "not a torch.save zip archive"],
    );
    // Foreign: rank 1's file of another save (3 ranks instead of 2).
    let (tmp, save_dir, tag) = copy_case("z2-w2-bf16");
    let other = fixture("z2-w3-bf16").join("global_step2").join(optim(1));
    std::fs::copy(other, tag.join(optim(1))).unwrap();
    refused(
        2,
        &save_dir,
        &tmp.path().join("out"),
        &[&optim(1), "different saves"],
    );
}

#[test]
fn two_saves_mixed_in_one_tag_folder_are_refused() {
    // A bf16 run's optimizer files beside an fp32 run's.
    let (tmp, save_dir, tag) = copy_case("z2-w2-bf16");
    let fp32 = fixture("z2-w2-fp32-untied").join("global_step2");
    let plain = "zero_pp_rank_0_mp_rank_00_optim_states.pt";
    std::fs::copy(fp32.join(plain), tag.join(plain)).unwrap();
    refused(2, &save_dir, &tmp.path().join("out"), &["two saves", plain]);
    // A ZeRO-3 save's model states beside a ZeRO-2 save's.
    let (tmp, save_dir, tag) = copy_case("z2-w2-bf16");
    let zero3 = fixture("z3-w2-bf16").join("global_step2");
    let model = "zero_pp_rank_0_mp_rank_00_model_states.pt";
    std::fs::copy(zero3.join(model), tag.join(model)).unwrap();
    refused(
        2,
        &save_dir,
        &tmp.path().join("out"),
        &["two saves", "ZeRO-3"],
    );
}

/// Rewrites the torch.save archive at `path` with `edit` applied to its
/// data.pkl (entries stored, as torch.save stores them).
fn edit_pickle(path: &Path, edit: impl Fn(Vec<u8>) -> Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).unwrap();
        let name = entry.name().unwrap().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if name.ends_with("/data.pkl") {
            data = edit(data);
        }
        out.start_file(name, stored).unwrap();
        out.write_all(&data).unwrap();
    }
    std::fs::write(path, out.finish().unwrap().into_inner()).unwrap();
}

fn replace(haystack: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = haystack
        .windows(from.len())
        .position(|w| w == from)
        .expect("the pickle names the global");
    [&haystack[..at], to, &haystack[at + from.len()..]].concat()
}

#[test]
fn a_pickle_naming_a_global_outside_the_allowlist_is_refused_by_name() {
    let (tmp, save_dir, tag) = copy_case("z2-w2-bf16");
    let path = tag.join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt");
    edit_pickle(&path, |pkl| {
        replace(
            pkl,
            b"deepspeed.runtime.fp16.loss_scaler\nLossScaler\n",
            b"os\nsystem\n",
        )
    });
    refused(
        2,
        &save_dir,
        &tmp.path().join("out"),
        &["os.system", "bf16_zero_pp_rank_1"],
    );
    // The edit alone, with an allowed global, converts: the refusal is the
    // global's, not the rewrite's.
    let (tmp, save_dir, tag) = copy_case("z2-w2-bf16");
    let path = tag.join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt");
    edit_pickle(&path, |pkl| pkl);
    consolidate_ok(1, &["-q", s(&save_dir), s(&tmp.path().join("out"))]);
}

#[test]
fn tags_are_chosen_with_latest_or_tag_and_a_wrong_one_lists_those_present() {
    let (tmp, save_dir, tag) = copy_case("z2-w2-bf16");
    let out = tmp.path().join("out");
    let text = assert_fails(
        1,
        &["--tag", "global_step9", s(&save_dir), s(&out)],
        &save_dir,
        &out,
        &["no tag folder global_step9", "global_step2"],
    );
    assert!(text.contains("hint:"), "{text}");
    std::fs::write(save_dir.join("latest"), "global_step7").unwrap();
    refused(
        1,
        &save_dir,
        &out,
        &["names the tag \"global_step7\"", "--tag"],
    );
    consolidate_ok(1, &["-q", "--tag", "global_step2", s(&save_dir), s(&out)]);
    // The tag folder itself needs no tag.
    consolidate_ok(1, &["-q", s(&tag), s(&tmp.path().join("out2"))]);
}

#[test]
fn autoeps_partition_native_expert_state_is_refused() {
    // AutoEP's ZeRO-3 optimizer state carries ds_zero_partition_groups;
    // here an existing key of rank 1's file is renamed to it.
    let (tmp, save_dir, tag) = copy_case("z3-w2-bf16");
    let path = tag.join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt");
    edit_pickle(&path, |pkl| {
        replace(
            pkl,
            b"X\x08\x00\x00\x00overflow",
            b"X\x18\x00\x00\x00ds_zero_partition_groups",
        )
    });
    refused(
        2,
        &save_dir,
        &tmp.path().join("out"),
        &["AutoEP", "bf16_zero_pp_rank_1", "ds_to_universal"],
    );
}
