//! `verify::compare` against outputs written by the real copy: silent on
//! correct outputs of every layout, and exact about which tensor is wrong
//! when a byte, a piece's placement or a replica is off.

mod common;
use common::*;
use st_consolidate_mpi::exec::verify::{compare, planned_target};
use st_consolidate_mpi::plan::Plan;
use st_consolidate_mpi::safetensors::dtype::Dtype;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A checkpoint of `layout` from 4 ranks into 2 files, its plan, and its
/// outputs written by the copy into a second folder.
struct Written {
    ckpt: tempfile::TempDir,
    _out: tempfile::TempDir,
    plan: Plan,
    paths: Vec<PathBuf>,
}

fn write_layout(layout: &str, shard_dtype: &str, export: Option<Dtype>) -> Written {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &[
            "--layout",
            layout,
            "--ranks",
            "4",
            "--files",
            "2",
            "--hidden",
            "96",
            "--vocab",
            "300",
            "--dtype",
            shard_dtype,
            "--seed",
            "7",
        ],
    );
    let plan = plan_for(ckpt.path(), export);
    let out = tempfile::tempdir().unwrap();
    let paths = write_outputs(&plan, out.path()).unwrap();
    Written {
        ckpt,
        _out: out,
        plan,
        paths,
    }
}

fn mismatches(written: &Written) -> Vec<String> {
    let targets: Vec<_> = (written.paths.iter().enumerate())
        .map(|(f, path)| planned_target(&written.plan, f, path.clone()))
        .collect();
    compare(&written.plan, &targets).unwrap()
}

/// Overwrites `bytes.len()` bytes of tensor `name` in the outputs, from the
/// tensor's byte `at` on.
fn overwrite(written: &Written, name: &str, at: u64, bytes: &[u8]) {
    let (file, start, len) = locate(&written.plan, name);
    assert!(at + bytes.len() as u64 <= len);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .open(&written.paths[file])
        .unwrap();
    out.write_all_at(bytes, start + at).unwrap();
}

/// The bytes of tensor `name` in the outputs.
fn read_tensor(written: &Written, name: &str) -> Vec<u8> {
    let (file, start, len) = locate(&written.plan, name);
    let bytes = std::fs::read(&written.paths[file]).unwrap();
    bytes[start as usize..(start + len) as usize].to_vec()
}

fn assert_only(lines: &[String], name: &str, byte: Option<u64>) {
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with(&format!("'{name}' in ")), "{lines:?}");
    if let Some(byte) = byte {
        assert!(
            lines[0].contains(&format!("first difference at byte {byte} of the tensor")),
            "{lines:?}"
        );
    }
}

#[test]
fn correct_outputs_of_every_layout_compare_equal() {
    for layout in ["mixed", "tp", "2d", "fsdp", "zoo"] {
        for export in [None, Some(Dtype::BF16)] {
            let written = write_layout(layout, "f32", export);
            // The copy is right (every tensor matches the manifest when not
            // converted), so compare must find nothing.
            if export.is_none() {
                assert_eq!(
                    output_digests(&written.plan, &written.paths),
                    manifest_digests(written.ckpt.path()),
                    "{layout}"
                );
            }
            assert_eq!(
                mismatches(&written),
                Vec::<String>::new(),
                "{layout} {export:?}"
            );
        }
    }
}

#[test]
fn one_flipped_byte_is_reported_for_its_tensor_only() {
    for (layout, export) in [("tp", None), ("2d", None), ("mixed", Some(Dtype::BF16))] {
        let written = write_layout(layout, "f32", export);
        for name in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.embed_tokens.weight",
        ] {
            let (_, _, len) = locate(&written.plan, name);
            let at = len / 2 + 3;
            let original = read_tensor(&written, name)[at as usize];
            overwrite(&written, name, at, &[original ^ 0x10]);
            assert_only(&mismatches(&written), name, Some(at));
            overwrite(&written, name, at, &[original]);
            assert!(mismatches(&written).is_empty(), "{layout} {name}");
        }
    }
}

/// What a run-arithmetic bug writes: the pieces of a column-sharded tensor
/// one after the other (each piece taken as a single run), or the right
/// bytes one element too far.
#[test]
fn misplaced_pieces_are_reported() {
    let written = write_layout("tp", "bf16", None);
    let name = "model.layers.1.self_attn.k_proj.weight";
    let t = written
        .plan
        .tensors
        .iter()
        .position(|t| t.name == name)
        .unwrap();
    let tensor = &written.plan.tensors[t];
    assert!(
        tensor.pieces.len() == 4 && tensor.pieces.iter().all(|p| p.offsets[0] == 0),
        "{name} is column-sharded"
    );
    let good = read_tensor(&written, name);

    let mut pieces = tensor.pieces.clone();
    pieces.sort_by_key(|p| p.offsets.clone());
    let mut concatenated = Vec::new();
    for piece in &pieces {
        let len = piece.shape.iter().product::<u64>() * tensor.dtype.size();
        let mut bytes = vec![0u8; len as usize];
        std::fs::File::open(&written.plan.shards[piece.location.shard])
            .unwrap()
            .read_exact_at(&mut bytes, piece.location.offset)
            .unwrap();
        concatenated.extend_from_slice(&bytes);
    }
    assert_eq!(concatenated.len(), good.len());
    assert_ne!(concatenated, good);
    overwrite(&written, name, 0, &concatenated);
    let first = concatenated.iter().zip(&good).position(|(a, b)| a != b);
    assert_only(&mismatches(&written), name, first.map(|i| i as u64));

    let mut shifted = good.clone();
    shifted.rotate_right(2);
    overwrite(&written, name, 0, &shifted);
    assert_only(&mismatches(&written), name, None);

    overwrite(&written, name, 0, &good);
    assert!(mismatches(&written).is_empty());
}

/// `--verify-only` reads every replica of a replicated piece: a replica
/// that differs from the output is reported (a normal run refuses such
/// shards before copying).
#[test]
fn a_differing_replica_is_reported() {
    let written = write_layout("zoo", "f32", None);
    let (t, piece) = written
        .plan
        .tensors
        .iter()
        .enumerate()
        .find_map(|(t, tensor)| {
            let piece = tensor
                .pieces
                .iter()
                .find(|p| !p.replicas.is_empty() && !p.shape.contains(&0))?;
            Some((t, piece.clone()))
        })
        .expect("the zoo has replicated tensors");
    let replica = piece.replicas[0];
    let shard: &Path = &written.plan.shards[replica.shard];
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(shard)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, replica.offset).unwrap();
    file.write_all_at(&[byte[0] ^ 1], replica.offset).unwrap();
    let lines = mismatches(&written);
    let name = &written.plan.tensors[t].name;
    assert_only(&lines, name, Some(0));
    assert!(lines[0].contains(&shard.display().to_string()), "{lines:?}");
}
