//! The OUTPUT_DIR lock and the copy on filesystems that fail or refuse:
//! a lock whose token cannot be written is not left behind, and
//! `copy_file_range` falls back to reads and writes per copy, never for the
//! rest of the process.

mod common;
use common::*;
use st_consolidate_mpi::exec::lock::{Holder, LOCK_NAME, OutputLock};
use std::io::Write;
use std::path::Path;

/// Fills the filesystem of `dir` until a write fails with ENOSPC, so that
/// creating an empty file still works but writing one byte does not.
fn fill(dir: &Path) -> std::path::PathBuf {
    let ballast = dir.join("ballast");
    let mut file = std::fs::File::create(&ballast).unwrap();
    let chunk = vec![0xA5u8; 4096];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    ballast
}

#[test]
fn a_lock_whose_token_cannot_be_written_is_not_left_behind() {
    let disk = SmallDisk::new("1m");
    let out = disk.0.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let ballast = fill(disk.0.path());

    let err = OutputLock::acquire(&out, &Holder::me())
        .unwrap_err()
        .to_string();
    assert!(err.contains("No space left"), "{err}");
    assert_eq!(
        names(&out),
        Vec::<String>::new(),
        "nothing left in OUTPUT_DIR"
    );

    // The same through the binary: one message naming the full disk, and a
    // later run, with space again, takes the lock and consolidates.
    let ckpt = copy_fixture();
    let args = [s(ckpt.path()), s(&out)];
    assert_fails(1, &args, ckpt.path(), &out, &["No space left"]);
    assert!(!out.join(LOCK_NAME).exists(), "an empty lock was left");
    std::fs::remove_file(ballast).unwrap();
    consolidate_ok(1, &args);
    assert!(!out.join(LOCK_NAME).exists());
}

#[test]
fn outputs_on_another_filesystem_than_the_shards_are_exact() {
    // Row-sharded tensors take the in-kernel path, which the kernel refuses
    // from this folder's filesystem to a tmpfs (EXDEV): those copies go
    // through a buffer, and copies within one filesystem stay in the kernel.
    let ckpt = tempfile::tempdir().unwrap();
    make_shards(
        ckpt.path(),
        &[
            "--layout", "fsdp", "--ranks", "2", "--files", "2", "--layers", "1", "--hidden", "256",
            "--vocab", "4096",
        ],
    );
    let plan = plan_for(ckpt.path(), None);
    let want = manifest_digests(ckpt.path());
    let disk = SmallDisk::new("64m");
    let near = tempfile::tempdir().unwrap();
    for out in [
        disk.0.path(),
        near.path(),
        disk.0.path().join("again").as_path(),
    ] {
        std::fs::create_dir_all(out).unwrap();
        let paths = write_outputs(&plan, out).unwrap();
        assert_eq!(
            output_digests(&plan, &paths),
            want,
            "into {}",
            out.display()
        );
    }
}
