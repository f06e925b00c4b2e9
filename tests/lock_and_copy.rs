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
    assert_eq!(names(&out), Vec::<String>::new(), "nothing left in OUTPUT_DIR");

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
