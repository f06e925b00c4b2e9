//! Input files' identities: device, inode, size and modification time,
//! recorded when the run plans and checked again before it publishes, so a
//! shard replaced (`mv` over it) or rewritten during the run stops the run
//! instead of publishing a mix of old and new bytes.

use crate::error::{Error, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What identifies one version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileIdentity {
    /// The identity of the file at `path` now (following symlinks, as reads do).
    pub fn of(path: &Path) -> std::io::Result<FileIdentity> {
        let meta = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }
}

/// The identities of `paths`, in order.
pub fn record(paths: &[PathBuf]) -> Result<Vec<FileIdentity>> {
    paths
        .iter()
        .map(|path| FileIdentity::of(path).map_err(|e| Error::io("inspect", path, e)))
        .collect()
}

/// Fails naming the first of `paths` that is no longer the file recorded.
pub fn check_unchanged(paths: &[PathBuf], recorded: &[FileIdentity]) -> Result<()> {
    for (path, then) in paths.iter().zip(recorded) {
        let now = FileIdentity::of(path);
        if now.as_ref().ok() != Some(then) {
            let what = match now {
                Err(e) => format!("it can no longer be read ({e})"),
                Ok(now) if now.size != then.size => {
                    format!("its size went from {} to {} bytes", then.size, now.size)
                }
                Ok(now) if (now.dev, now.ino) != (then.dev, then.ino) => {
                    "it was replaced by another file".to_string()
                }
                Ok(_) => "it was modified".to_string(),
            };
            return Err(Error::usage(
                format!(
                    "input {} changed during the run: {what}; nothing was published",
                    path.display()
                ),
                "rerun when no process writes to INPUT_DIR (a copy or a save still in progress?)",
            ));
        }
    }
    Ok(())
}

/// How much of each end of a file [`content_signature`] reads.
pub const SIGNATURE_BLOCK: u64 = 64 * 1024;

/// A cheap signature of a file's contents: its size and a SHA-256 of its
/// first and last [`SIGNATURE_BLOCK`] bytes, in hex. Ranks on different
/// nodes compare it to catch node-local copies of INPUT_DIR that differ
/// in their data (headers alone are compared by the plan's fingerprint).
/// It reads at most 128 KiB per file, so it cannot see a change in the
/// middle of a large file.
pub fn content_signature(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let read_err = |e| Error::io("read", path, e);
    let file = std::fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let mut hash = Sha256::new();
    hash.update(size.to_le_bytes());
    let head = size.min(SIGNATURE_BLOCK);
    let tail_start = size.saturating_sub(SIGNATURE_BLOCK).max(head);
    for (start, end) in [(0, head), (tail_start, size)] {
        let mut block = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        file.read_exact_at(&mut block, start).map_err(read_err)?;
        hash.update(&block);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaced_resized_and_modified_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.safetensors");
        std::fs::write(&path, b"abcd").unwrap();
        let paths = vec![path.clone()];
        let recorded = record(&paths).unwrap();
        check_unchanged(&paths, &recorded).unwrap();

        // Same size, new inode: a file moved over the original.
        let other = dir.path().join("other");
        std::fs::write(&other, b"wxyz").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let err = check_unchanged(&paths, &recorded).unwrap_err().to_string();
        assert!(
            err.contains("shard.safetensors") && err.contains("replaced"),
            "{err}"
        );

        let recorded = record(&paths).unwrap();
        std::fs::write(&path, b"abcdef").unwrap();
        let err = check_unchanged(&paths, &recorded).unwrap_err().to_string();
        assert!(err.contains("from 4 to 6 bytes"), "{err}");

        std::fs::remove_file(&path).unwrap();
        let err = check_unchanged(&paths, &recorded).unwrap_err().to_string();
        assert!(err.contains("can no longer be read"), "{err}");
    }

    #[test]
    fn the_signature_sees_size_and_both_ends_but_not_the_middle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.safetensors");
        let block = SIGNATURE_BLOCK as usize;
        let original: Vec<u8> = (0..3 * block).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &original).unwrap();
        let signed = content_signature(&path).unwrap();
        assert_eq!(signed.len(), 64);
        assert_eq!(content_signature(&path).unwrap(), signed);
        let changed = |at: usize| {
            let mut bytes = original.clone();
            bytes[at] ^= 1;
            std::fs::write(&path, &bytes).unwrap();
            content_signature(&path).unwrap()
        };
        assert_ne!(changed(0), signed, "first byte");
        assert_ne!(changed(block - 1), signed, "end of the first block");
        assert_ne!(changed(2 * block), signed, "start of the last block");
        assert_ne!(changed(3 * block - 1), signed, "last byte");
        // The documented blind spot: the middle is not read.
        assert_eq!(changed(block + 5), signed, "middle");
        std::fs::write(&path, &original[..3 * block - 1]).unwrap();
        assert_ne!(content_signature(&path).unwrap(), signed, "size");
        // Small files (shorter than one block) are read whole, once.
        std::fs::write(&path, b"abc").unwrap();
        let small = content_signature(&path).unwrap();
        std::fs::write(&path, b"abd").unwrap();
        assert_ne!(content_signature(&path).unwrap(), small);
        std::fs::remove_file(&path).unwrap();
        let err = content_signature(&path).unwrap_err().to_string();
        assert!(err.contains("shard.safetensors"), "{err}");
    }
}
