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
}
