//! Output files that are never seen half-written: each is written under a
//! hidden temporary name, synced, and renamed to its final name only when the
//! whole job has succeeded. A temporary file that is dropped without being
//! committed is removed; one left by a killed run is removed by the next run.

use crate::error::{Error, Result};
use rustix::fs::{FallocateFlags, fallocate};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

const TEMP_SUFFIX: &str = ".st-consolidate.tmp";

/// The hidden temporary name under which `name` is written (any bytes:
/// a `--report` name need not be UTF-8).
pub fn temp_name(name: impl AsRef<OsStr>) -> OsString {
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(TEMP_SUFFIX);
    temp
}

/// Whether `name` is a temporary name of this tool (of this run or of a
/// killed one).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(TEMP_SUFFIX)
}

/// An output file being written under its temporary name.
#[derive(Debug)]
pub struct PendingFile {
    file: File,
    temp_path: PathBuf,
    final_path: PathBuf,
    committed: bool,
}

impl PendingFile {
    /// Creates `dir/.name.st-consolidate.tmp`, `len` bytes long. Space is
    /// reserved up front where the filesystem allows, so a full disk is
    /// reported before any copying.
    pub fn create(dir: &Path, name: impl AsRef<OsStr>, len: u64) -> Result<PendingFile> {
        let name = name.as_ref();
        let temp_path = dir.join(temp_name(name));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp_path)
            .map_err(|e| Error::io("create", &temp_path, e))?;
        let pending = PendingFile {
            file,
            final_path: dir.join(name),
            temp_path,
            committed: false,
        };
        pending.reserve(len)?;
        Ok(pending)
    }

    fn reserve(&self, len: u64) -> Result<()> {
        if len > 0 {
            match fallocate(&self.file, FallocateFlags::empty(), 0, len) {
                // Filesystems without fallocate still work; ENOSPC then
                // shows up at the first write instead.
                Ok(()) | Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {}
                Err(e) => return Err(Error::io("reserve space for", &self.temp_path, e.into())),
            }
        }
        self.file
            .set_len(len)
            .map_err(|e| Error::io("size", &self.temp_path, e))
    }

    /// The open file, for positioned writes from any thread.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temporary path (for error messages).
    pub fn temp_path(&self) -> &Path {
        &self.temp_path
    }

    /// Flushes the file's data to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("sync", &self.temp_path, e))
    }

    /// Renames the file to its final name.
    pub fn commit(mut self) -> Result<PathBuf> {
        std::fs::rename(&self.temp_path, &self.final_path)
            .map_err(|e| Error::io("rename into place", &self.final_path, e))?;
        self.committed = true;
        Ok(self.final_path.clone())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp_path);
        }
    }
}

impl PendingFile {
    /// A pending `dir/name` holding `bytes`, synced: only the rename is left.
    pub fn with_contents(dir: &Path, name: impl AsRef<OsStr>, bytes: &[u8]) -> Result<PendingFile> {
        let pending = PendingFile::create(dir, name, 0)?;
        (&pending.file)
            .write_all(bytes)
            .map_err(|e| Error::io("write", &pending.temp_path, e))?;
        pending.sync()?;
        Ok(pending)
    }
}

/// A folder of this rank's own for building its files in before they go
/// to OUTPUT_DIR (staging: node-local scratch, as NeMo's `use_staging`
/// builds in a `mkdtemp` folder). Created new, never reused; removed with
/// whatever is left in it when dropped, on success and failure alike.
#[derive(Debug)]
pub struct StagingFolder {
    path: PathBuf,
}

impl StagingFolder {
    /// Creates a new folder under `root` (created if missing, as PyTorch's
    /// staging does), named after this host, process and rank so that no
    /// two ranks share one.
    pub fn create(root: &Path, rank: usize) -> Result<StagingFolder> {
        std::fs::create_dir_all(root)
            .map_err(|e| Error::io("create the staging folder", root, e))?;
        let host = crate::exec::lock::host_name();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!(
            "st-consolidate-staging-{host}-{}-rank{rank}-{started:x}",
            std::process::id()
        );
        let path = root.join(name);
        std::fs::create_dir(&path).map_err(|e| Error::io("create the staging folder", &path, e))?;
        Ok(StagingFolder { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagingFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Moves staged files into `dir`, each under its temporary name there,
/// copied and synced (the staging folder is usually on another
/// filesystem, so a rename would not do); the staged copies are removed.
/// Looks at `cancel` between slices of [`crate::exec::cancel::CANCEL_SLICE`] bytes.
pub fn move_into(
    staged: std::collections::BTreeMap<usize, PendingFile>,
    dir: &Path,
    cancel: &crate::exec::cancel::Cancel,
) -> Result<std::collections::BTreeMap<usize, PendingFile>> {
    use std::io::{Read, Seek};
    let mut moved = std::collections::BTreeMap::new();
    for (f, from) in staged {
        let name = from
            .final_path
            .file_name()
            .map(OsStr::to_os_string)
            .unwrap_or_default();
        let len = from
            .file
            .metadata()
            .map_err(|e| Error::io("inspect", &from.temp_path, e))?
            .len();
        let to = PendingFile::create(dir, &name, len)?;
        let mut reader = &from.file;
        reader
            .rewind()
            .map_err(|e| Error::io("read", &from.temp_path, e))?;
        let mut writer = &to.file;
        loop {
            cancel.check()?;
            let copied = std::io::copy(
                &mut reader.take(crate::exec::cancel::CANCEL_SLICE),
                &mut writer,
            )
            .map_err(|e| Error::io("copy the staged file into", &to.temp_path, e))?;
            if copied == 0 {
                break;
            }
        }
        to.sync()?;
        moved.insert(f, to);
    }
    Ok(moved)
}

/// Writes `bytes` to `dir/name` atomically: temporary file, sync, rename,
/// directory sync.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    PendingFile::with_contents(dir, name, bytes)?.commit()?;
    sync_dir(dir)
}

/// Syncs a directory so that renames inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let handle = File::open(dir).map_err(|e| Error::io("open", dir, e))?;
    match handle.sync_all() {
        // Some filesystems refuse fsync on directories; the rename stands.
        Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => Ok(()),
        other => other.map_err(|e| Error::io("sync", dir, e)),
    }
}

/// Removes temporary files that earlier, killed runs left in `dir`.
pub fn remove_stale_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_temp_name(&name) {
            std::fs::remove_file(entry.path())
                .map_err(|e| Error::io("remove stale", entry.path(), e))?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_files_vanish_and_committed_ones_appear() {
        let dir = tempfile::tempdir().unwrap();
        let pending = PendingFile::create(dir.path(), "a.bin", 16).unwrap();
        assert_eq!(std::fs::metadata(pending.temp_path()).unwrap().len(), 16);
        assert!(!dir.path().join("a.bin").exists());
        drop(pending);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let pending = PendingFile::create(dir.path(), "b.bin", 4).unwrap();
        pending.sync().unwrap();
        pending.commit().unwrap();
        assert_eq!(std::fs::read(dir.path().join("b.bin")).unwrap(), [0; 4]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn atomic_writes_and_stale_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), "index.json", b"{}").unwrap();
        assert_eq!(std::fs::read(dir.path().join("index.json")).unwrap(), b"{}");
        std::fs::write(
            dir.path()
                .join(temp_name("model-00001-of-00001.safetensors")),
            b"x",
        )
        .unwrap();
        std::fs::write(dir.path().join(".keep"), b"x").unwrap();
        let removed = remove_stale_temps(dir.path()).unwrap();
        assert_eq!(removed.len(), 1);
        assert!(dir.path().join(".keep").exists());
    }
}
