//! `--resume`: outputs an earlier run completed are kept untouched, every
//! other planned file is rewritten, under both schedules and any ranks.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const INDEX: &str = "model.safetensors.index.json";

/// (inode, mtime in ns) of every model file in `dir`.
fn identities(dir: &Path) -> BTreeMap<String, (u64, i64)> {
    names(dir)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .map(|n| {
            let meta = std::fs::metadata(dir.join(&n)).unwrap();
            (
                n,
                (meta.ino(), meta.mtime() * 1_000_000_000 + meta.mtime_nsec()),
            )
        })
        .collect()
}

/// A checkpoint whose mapping gives several output files, consolidated once.
fn consolidated() -> (tempfile::TempDir, tempfile::TempDir) {
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(ckpt.path(), &["--layout", "zoo", "--ranks", "6"]);
    let out = tempfile::tempdir().unwrap();
    let mapping = ckpt.path().join("mapping.json");
    consolidate_ok(
        2,
        &["--mapping", s(&mapping), s(ckpt.path()), s(out.path())],
    );
    assert!(identities(out.path()).len() >= 3, "{:?}", names(out.path()));
    (ckpt, out)
}

fn resume(ranks: usize, extra: &[&str], ckpt: &Path, out: &Path) -> String {
    let mapping = ckpt.join("mapping.json");
    let mut args = extra.to_vec();
    args.extend(["--resume", "--mapping", s(&mapping), s(ckpt), s(out)]);
    stderr(&consolidate_ok(ranks, &args))
}

/// The files whose inode or mtime changed between two listings.
fn rewritten(
    before: &BTreeMap<String, (u64, i64)>,
    after: &BTreeMap<String, (u64, i64)>,
) -> Vec<String> {
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    before
        .iter()
        .filter(|(name, id)| after[*name] != **id)
        .map(|(name, _)| name.clone())
        .collect()
}

#[test]
fn only_a_deleted_file_is_rewritten_under_both_schedules() {
    let (ckpt, out) = consolidated();
    let manifest = ckpt.path().join("manifest.json");
    for (schedule, ranks) in [("modulo", 2), ("balanced", 3), ("balanced", 1)] {
        let before = identities(out.path());
        let files: Vec<&String> = before.keys().collect();
        let gone = files[1].clone();
        std::fs::remove_file(out.path().join(&gone)).unwrap();
        std::fs::remove_file(out.path().join(INDEX)).unwrap();
        let text = resume(ranks, &["--schedule", schedule], ckpt.path(), out.path());
        let expected = format!("kept {}, wrote 1 file ", files.len() - 1);
        assert!(text.contains(&expected), "{schedule}: {text}");
        assert_eq!(
            rewritten(&before, &identities(out.path())),
            [gone.as_str()],
            "{schedule}"
        );
        assert_matches_manifest(out.path(), &manifest);
        assert!(!names(out.path()).iter().any(|n| n.starts_with('.')));
    }
}

#[test]
fn a_file_cut_short_or_of_another_plan_or_with_wrong_bytes_is_rewritten() {
    let (ckpt, out) = consolidated();
    let manifest = ckpt.path().join("manifest.json");
    // Cut short: a final-named file can only be that way by someone else's
    // hand, but it must not be kept.
    let before = identities(out.path());
    let first = before.keys().next().unwrap().clone();
    let path = out.path().join(&first);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let text = resume(2, &[], ckpt.path(), out.path());
    assert!(
        text.contains(&format!("kept {}, wrote 1 file ", before.len() - 1)),
        "{text}"
    );
    let after = identities(out.path());
    assert_eq!(rewritten(&before, &after), [first.as_str()]);
    assert_matches_manifest(out.path(), &manifest);

    // Same size and header, one tensor byte changed: with --verify the
    // tensor bytes are compared too, and the file is rewritten.
    let before = after;
    let bytes = std::fs::read(&path).unwrap();
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    std::fs::write(&path, &flipped).unwrap();
    let before = BTreeMap::from_iter(before.into_iter().map(|(n, id)| {
        let id = if n == first {
            identities(out.path())[&n]
        } else {
            id
        };
        (n, id)
    }));
    let text = resume(3, &["--verify"], ckpt.path(), out.path());
    assert!(
        text.contains(&format!("{first} differs from the inputs")),
        "{text}"
    );
    assert_eq!(
        rewritten(&before, &identities(out.path())),
        [first.as_str()]
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // Another mapping: the same file names, tensors moved between files 1
    // and 2. Both change header; every other file is kept.
    let mapping: BTreeMap<String, u32> =
        serde_json::from_slice(&std::fs::read(ckpt.path().join("mapping.json")).unwrap()).unwrap();
    let swapped: BTreeMap<String, u32> = mapping
        .iter()
        .map(|(k, &v)| {
            (
                k.clone(),
                match v {
                    1 => 2,
                    2 => 1,
                    v => v,
                },
            )
        })
        .collect();
    // Outside OUTPUT_DIR, in a folder of this test's own (a shared path
    // such as OUTPUT_DIR/.. is raced by tests running beside this one).
    let spare = tempfile::tempdir().unwrap();
    let other = spare.path().join("other-mapping.json");
    std::fs::write(&other, serde_json::to_vec(&swapped).unwrap()).unwrap();
    let before = identities(out.path());
    let args = [
        "--resume",
        "--mapping",
        s(&other),
        s(ckpt.path()),
        s(out.path()),
    ];
    let text = stderr(&consolidate_ok(2, &args));
    assert!(
        text.contains(&format!("kept {}, wrote 2 files", before.len() - 2)),
        "{text}"
    );
    let changed = rewritten(&before, &identities(out.path()));
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert_matches_manifest(out.path(), &manifest);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join(INDEX)).unwrap()).unwrap();
    let (name, &file) = swapped.iter().next().unwrap();
    assert!(
        index["weight_map"][name]
            .as_str()
            .unwrap()
            .starts_with(&format!("model-{file:05}"))
    );
    std::fs::remove_file(other).unwrap();
}

#[test]
fn outputs_of_another_file_count_still_need_overwrite() {
    let (ckpt, out) = consolidated();
    let stray = out.path().join("model-00001-of-00009.safetensors");
    std::fs::write(&stray, b"older").unwrap();
    let mapping = ckpt.path().join("mapping.json");
    let args = [
        "--resume",
        "--mapping",
        s(&mapping),
        s(ckpt.path()),
        s(out.path()),
    ];
    let run = consolidate(2, &args);
    let text = stderr(&run);
    assert!(!run.status.success(), "{text}");
    assert!(
        text.contains("already holds model-00001-of-00009.safetensors"),
        "{text}"
    );
    assert!(text.contains("hint:"), "{text}");
    assert_eq!(std::fs::read(&stray).unwrap(), b"older");
}

#[test]
fn a_killed_run_resumes_and_verifies() {
    let ckpt = tempfile::tempdir().unwrap();
    let args = [
        "--layout", "tp", "--ranks", "8", "--files", "4", "--layers", "9", "--hidden", "2048",
        "--vocab", "32000",
    ];
    make_shards(ckpt.path(), &args);
    let mapping = ckpt.path().join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    let run_args = [
        "--threads",
        "1",
        "--mapping",
        s(&mapping),
        s(ckpt.path()),
        s(out.path()),
    ];
    let mut first = vec!["--resume"];
    first.extend(run_args);
    kill_mid_copy(&first, out.path());
    assert!(
        names(out.path()).iter().all(|n| n.starts_with('.')),
        "{:?}",
        names(out.path())
    );
    let mut rerun = vec!["--resume"];
    rerun.extend(run_args);
    let text = stderr(&consolidate_ok(2, &rerun));
    assert!(text.contains("kept 0, wrote"), "{text}");
    let mut check = vec!["--verify-only"];
    check.extend(&run_args[2..]);
    consolidate_ok(2, &check);
    assert_matches_manifest(out.path(), &ckpt.path().join("manifest.json"));
}

/// sha256 of every model file in `dir`, by name.
fn file_digests(dir: &Path) -> BTreeMap<String, String> {
    use sha2::{Digest, Sha256};
    names(dir)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .map(|n| {
            let digest = Sha256::digest(std::fs::read(dir.join(&n)).unwrap());
            (n, digest.iter().map(|b| format!("{b:02x}")).collect())
        })
        .collect()
}

#[test]
fn a_change_in_the_middle_of_an_input_is_noticed_by_resume() {
    // Shards of several hundred KiB: their first and last 64 KiB (what
    // the inputs' fingerprint signs) leave most of the data out.
    let ckpt = tempfile::tempdir().unwrap();
    let big = ["--ranks", "2", "--hidden", "256", "--vocab", "4000"];
    make_shards(ckpt.path(), &big);
    let mapping = ckpt.path().join("mapping.json");
    let out = tempfile::tempdir().unwrap();
    let args = ["--mapping", s(&mapping), s(ckpt.path()), s(out.path())];
    consolidate_ok(1, &args);
    // A fine-tune that changed one byte in the middle of the largest shard
    // only: same size, same first and last 64 KiB.
    let largest = names(ckpt.path())
        .into_iter()
        .filter(|n| n.starts_with("shard-"))
        .max_by_key(|n| std::fs::metadata(ckpt.path().join(n)).unwrap().len())
        .unwrap();
    let path = ckpt.path().join(&largest);
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 3 * 65536, "{largest}: {} bytes", bytes.len());
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&path, &bytes).unwrap();
    let text = resume(2, &[], ckpt.path(), out.path());
    assert!(
        text.contains("differs from the inputs; it is rewritten"),
        "{text}"
    );
    // What a fresh run writes from the changed checkpoint.
    let fresh = tempfile::tempdir().unwrap();
    consolidate_ok(
        1,
        &["--mapping", s(&mapping), s(ckpt.path()), s(fresh.path())],
    );
    assert_eq!(file_digests(out.path()), file_digests(fresh.path()));
}
