//! `--resume` keeps a file only if it was written from the same inputs:
//! every header records a content-only fingerprint of the inputs, a file of
//! the same layout from another checkpoint is rewritten, and one from a
//! version that recorded no fingerprint is rewritten unless `--verify`
//! finds its bytes equal to the inputs.

mod common;
use common::*;
use st_consolidate_mpi::plan::fingerprint::FINGERPRINT_KEY;
use st_consolidate_mpi::safetensors::header::{encode_header, read_header};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const INDEX: &str = "model.safetensors.index.json";

/// A checkpoint of several output files; `seed` changes every tensor's
/// bytes but no shape (the same model at another step).
fn checkpoint(dir: &Path, seed: &str) {
    make_shards(dir, &["--layout", "zoo", "--ranks", "4", "--seed", seed]);
}

fn run(ranks: usize, extra: &[&str], ckpt: &Path, out: &Path) -> String {
    let mapping = ckpt.join("mapping.json");
    let mut args = extra.to_vec();
    args.extend(["--mapping", s(&mapping), s(ckpt), s(out)]);
    stderr(&consolidate_ok(ranks, &args))
}

/// (inode, mtime in ns) of every model file in `dir`.
fn identities(dir: &Path) -> BTreeMap<String, (u64, i64)> {
    names(dir)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .map(|n| {
            let meta = std::fs::metadata(dir.join(&n)).unwrap();
            (
                n,
                (meta.ino(), meta.mtime_nsec() + meta.mtime() * 1_000_000_000),
            )
        })
        .collect()
}

fn fingerprint_of(path: &Path) -> Option<String> {
    read_header(path)
        .unwrap()
        .metadata
        .get(FINGERPRINT_KEY)
        .cloned()
}

#[test]
fn files_written_from_another_checkpoint_are_rewritten() {
    let (a, b, out) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    checkpoint(a.path(), "1");
    checkpoint(b.path(), "2");
    run(2, &[], a.path(), out.path());
    let before = identities(out.path());
    assert!(before.len() >= 3, "{before:?}");
    std::fs::remove_file(out.path().join(INDEX)).unwrap();
    let text = run(2, &["--resume"], b.path(), out.path());
    assert!(text.contains("kept 0, wrote"), "{text}");
    for name in before.keys() {
        assert!(
            text.contains(&format!("resume: {name} was written from other inputs")),
            "{name}: {text}"
        );
    }
    let after = identities(out.path());
    assert!(
        before.iter().all(|(n, id)| after[n] != *id),
        "every file rewritten"
    );
    assert_matches_manifest(out.path(), &b.path().join("manifest.json"));
    let mapping = b.path().join("mapping.json");
    let verify = [
        "--verify-only",
        "--mapping",
        s(&mapping),
        s(b.path()),
        s(out.path()),
    ];
    consolidate_ok(2, &verify);
}

#[test]
fn the_same_inputs_elsewhere_give_the_same_bytes_and_are_kept() {
    let (a, out_a, out_b) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    checkpoint(a.path(), "1");
    // A copy in another folder: other inodes, other mtimes, other paths.
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(a.path()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
    }
    run(1, &[], a.path(), out_a.path());
    run(3, &[], copy.path(), out_b.path());
    assert_eq!(names(out_a.path()), names(out_b.path()));
    for name in names(out_a.path()) {
        let (x, y) = (out_a.path().join(&name), out_b.path().join(&name));
        assert_eq!(
            std::fs::read(&x).unwrap(),
            std::fs::read(&y).unwrap(),
            "{name}"
        );
        if name.ends_with(".safetensors") {
            let recorded = fingerprint_of(&x).unwrap();
            assert!(recorded.starts_with("sha256:"), "{recorded}");
        }
    }
    let before = identities(out_a.path());
    std::fs::remove_file(out_a.path().join(INDEX)).unwrap();
    let text = run(2, &["--resume"], copy.path(), out_a.path());
    assert!(
        text.contains(&format!("kept {}, wrote 0", before.len())),
        "{text}"
    );
    assert_eq!(identities(out_a.path()), before);
}

/// Rewrites `path` as a version without the fingerprint wrote it: the same
/// tensors and data, `__metadata__` holding only `"format": "pt"`.
fn strip_fingerprint(path: &Path) {
    let header = read_header(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut legacy = encode_header(&metadata, &header.tensors);
    legacy.extend_from_slice(&bytes[header.data_start as usize..]);
    std::fs::write(path, legacy).unwrap();
    assert_eq!(fingerprint_of(path), None);
}

#[test]
fn a_file_without_a_fingerprint_is_kept_only_if_its_bytes_equal_the_inputs() {
    let (ckpt, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    checkpoint(ckpt.path(), "1");
    let manifest = ckpt.path().join("manifest.json");
    run(2, &[], ckpt.path(), out.path());
    // File 1: owned by rank 1 of 2, so it is compared off rank 0.
    let name = names(out.path())[0].clone();
    let path = out.path().join(&name);
    let planned = std::fs::read(&path).unwrap();

    // --resume compares every candidate's tensor bytes with the inputs
    // (with or without --verify): equal, it is kept as it is.
    for extra in [&[][..], &["--verify"][..]] {
        strip_fingerprint(&path);
        let legacy = std::fs::read(&path).unwrap();
        let before = identities(out.path());
        let mut args = vec!["--resume"];
        args.extend(extra);
        let text = run(2, &args, ckpt.path(), out.path());
        assert!(
            text.contains("but its tensor bytes equal the inputs; it is kept"),
            "{text}"
        );
        assert!(
            text.contains(&format!("kept {}, wrote 0", before.len())),
            "{text}"
        );
        assert_eq!(identities(out.path()), before);
        assert_eq!(std::fs::read(&path).unwrap(), legacy);
    }
    let legacy = std::fs::read(&path).unwrap();
    assert_matches_manifest(out.path(), &manifest);
    let mapping = ckpt.path().join("mapping.json");
    let verify = [
        "--verify-only",
        "--mapping",
        s(&mapping),
        s(ckpt.path()),
        s(out.path()),
    ];
    consolidate_ok(2, &verify);

    // One tensor byte changed: resume rewrites it with this version's header.
    let mut flipped = legacy.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    std::fs::write(&path, &flipped).unwrap();
    let text = run(2, &["--resume"], ckpt.path(), out.path());
    assert!(
        text.contains(&format!("resume: {name} differs from the inputs")),
        "{text}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), planned);
    assert_matches_manifest(out.path(), &manifest);
}
