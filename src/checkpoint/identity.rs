//! Input files' identities: device, inode, size, modification time and a
//! content signature, taken from the descriptor when a reader first opens
//! the file (before it reads anything from it) and checked again before the
//! run publishes, so an input replaced (`mv` over it) or rewritten during
//! the run stops the run instead of publishing bytes that no longer match
//! what was planned.
//!
//! Inputs are opened with `O_NONBLOCK` and checked to be regular files on
//! the open descriptor: a FIFO (or a link to one) would otherwise block the
//! open or the first read for ever, and a check of the path before opening
//! could be raced.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
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
    /// The identity of the file at `path` now (following symlinks, as reads
    /// do; a stat, so it cannot block on a FIFO).
    pub fn of(path: &Path) -> std::io::Result<FileIdentity> {
        Ok(FileIdentity::from_metadata(&std::fs::metadata(path)?))
    }

    fn from_metadata(meta: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// What a file was when this rank opened it: its identity and, when taken,
/// its content signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    identity: FileIdentity,
    signature: Option<String>,
}

/// Opens an input for reading without blocking (`O_NONBLOCK`: a FIFO's
/// open returns at once), refuses it unless the descriptor is a regular
/// file, and takes its identity and content signature from that descriptor
/// before anything else reads the file.
pub fn open_input(path: &Path) -> Result<(File, Seen)> {
    let (file, meta) = open_regular(path)?;
    let identity = FileIdentity::from_metadata(&meta);
    let signature = signature_of(&file, identity.size, path)?;
    Ok((
        file,
        Seen {
            identity,
            signature: Some(signature),
        },
    ))
}

/// Opens an input as [`open_input`] does (without blocking, refused unless
/// it is a regular file) and records its identity from the descriptor, but
/// reads nothing from it: the content signature is taken later by the
/// rank whose share of the inputs it is ([`Inputs::sign_share`]).
pub fn open_identified(path: &Path) -> Result<(File, Seen)> {
    let (file, meta) = open_regular(path)?;
    let identity = FileIdentity::from_metadata(&meta);
    Ok((
        file,
        Seen {
            identity,
            signature: None,
        },
    ))
}

/// Opens an input as [`open_input`] does (without blocking, refused unless
/// it is a regular file) and returns it with its metadata, taking no
/// signature: for a second open of a file whose identity this rank already
/// recorded (locating chunks after the plan), checked again at publish.
pub fn open_regular(path: &Path) -> Result<(File, std::fs::Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    let meta = file.metadata().map_err(|e| Error::io("inspect", path, e))?;
    if !meta.is_file() {
        let kind = meta.file_type();
        let what = if kind.is_fifo() {
            "a named pipe (FIFO)"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(Error::usage(
            format!(
                "input {} is not a regular file: it is {what}",
                path.display()
            ),
            "INPUT_DIR must hold the checkpoint's own files: put the real file in its place \
             (copy the checkpoint with `cp -rL` if it is made of links)",
        ));
    }
    Ok((file, meta))
}

/// One input file of a checkpoint, and what it was when this rank opened
/// it (`None` when this rank did not open it itself: another rank read the
/// checkpoint, or the reader does not open through [`open_input`]).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Input {
    path: PathBuf,
    /// Never sent to other ranks: a file's identity on one node says
    /// nothing about another node's copy.
    #[serde(skip)]
    seen: Option<Seen>,
}

/// Every input file a checkpoint was read from (for DCP, `.metadata` and
/// the `.distcp` files), in a fixed order, with what each was when this
/// rank opened it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Inputs {
    files: Vec<Input>,
}

impl Inputs {
    /// Inputs this rank has not opened itself yet.
    pub fn unopened(paths: &[PathBuf]) -> Inputs {
        Inputs {
            files: paths
                .iter()
                .map(|path| Input {
                    path: path.clone(),
                    seen: None,
                })
                .collect(),
        }
    }

    /// Adds a file opened with [`open_input`] or [`open_identified`].
    pub fn push_opened(&mut self, path: PathBuf, seen: Seen) {
        self.files.push(Input {
            path,
            seen: Some(seen),
        });
    }

    /// Adds a file this rank has not opened.
    pub fn push_unopened(&mut self, path: PathBuf) {
        self.files.push(Input { path, seen: None });
    }

    /// The input paths, in order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|input| input.path.as_path())
    }

    /// How many inputs there are.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Signs the inputs of `share` (indices into these inputs): each one's
    /// size and content signature, as taken when this rank opened it with
    /// [`open_input`], or else taken now from a fresh open (refused unless
    /// a regular file). A file this rank had opened without signing it
    /// ([`open_identified`]) must still be that file: otherwise it changed
    /// during the run. Signed inputs are checked again, signature included,
    /// by [`Inputs::check_unchanged`]. Returns `(size, signature)` per
    /// index of `share`, in its order, and the bytes read for it; on the
    /// caller's rayon pool.
    pub fn sign_share(&mut self, share: &[usize]) -> Result<(Vec<(u64, String)>, u64)> {
        use rayon::prelude::*;
        let files = &self.files;
        let signed = share
            .par_iter()
            .map(|&i| {
                let input = files
                    .get(i)
                    .ok_or_else(|| Error::internal(format!("input #{i} does not exist")))?;
                if let Some(seen) = &input.seen
                    && let Some(signature) = &seen.signature
                {
                    return Ok((seen.clone(), signature.clone(), 0));
                }
                let (_, now) = open_input(&input.path)?;
                if let Some(then) = &input.seen
                    && let Some(what) = identity_change(then.identity, now.identity)
                {
                    return Err(changed_during_run(&input.path, &what));
                }
                let signature = now.signature.clone().unwrap_or_default();
                let read = signature_bytes(now.identity.size);
                Ok((now, signature, read))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut read = 0;
        let mut out = Vec::with_capacity(share.len());
        for (&i, (seen, signature, bytes)) in share.iter().zip(signed) {
            out.push((seen.identity.size, signature));
            read += bytes;
            self.files[i].seen = Some(seen);
        }
        Ok((out, read))
    }

    /// The same inputs, each with an identity: those this rank did not open
    /// are stat'ed now (no signature: each input is signed by one rank per
    /// view of INPUT_DIR, see [`Inputs::sign_share`]).
    pub fn recorded(&self) -> Result<Inputs> {
        let files = self
            .files
            .iter()
            .map(|input| {
                let seen = match &input.seen {
                    Some(seen) => seen.clone(),
                    None => Seen {
                        identity: FileIdentity::of(&input.path)
                            .map_err(|e| Error::io("inspect", &input.path, e))?,
                        signature: None,
                    },
                };
                Ok(Input {
                    path: input.path.clone(),
                    seen: Some(seen),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Inputs { files })
    }

    /// Fails naming the first input that is no longer the file it was when
    /// recorded: another size, another file, a later modification, or other
    /// contents at its ends (when a signature was taken: the inputs this
    /// rank signed, see [`Inputs::sign_share`]). Returns the bytes it read
    /// to compare the signatures.
    pub fn check_unchanged(&self) -> Result<u64> {
        let mut read = 0;
        for input in &self.files {
            let Some(then) = &input.seen else { continue };
            if then.signature.is_some() {
                read += signature_bytes(then.identity.size);
            }
            if let Some(what) = changed(&input.path, then) {
                return Err(changed_during_run(&input.path, &what));
            }
        }
        Ok(read)
    }
}

/// The error for an input that changed while the run used it.
fn changed_during_run(path: &Path, what: &str) -> Error {
    Error::usage(
        format!(
            "input {} changed during the run: {what}; nothing was published",
            path.display()
        ),
        "rerun when no process writes to INPUT_DIR (a copy or a save still in progress?)",
    )
}

/// How identity `now` differs from `was`, if it does.
fn identity_change(was: FileIdentity, now: FileIdentity) -> Option<String> {
    if now.size != was.size {
        return Some(format!(
            "its size went from {} to {} bytes",
            was.size, now.size
        ));
    }
    if (now.dev, now.ino) != (was.dev, was.ino) {
        return Some("it was replaced by another file".to_string());
    }
    if now != was {
        return Some("it was modified".to_string());
    }
    None
}

/// How the file at `path` differs from what was seen, if it does.
fn changed(path: &Path, then: &Seen) -> Option<String> {
    let now = match FileIdentity::of(path) {
        Err(e) => return Some(format!("it can no longer be read ({e})")),
        Ok(now) => now,
    };
    if let Some(what) = identity_change(then.identity, now) {
        return Some(what);
    }
    let signed = then.signature.as_ref()?;
    match open_input(path) {
        Err(e) => Some(format!("it can no longer be read ({e})")),
        Ok((_, seen)) if seen.signature.as_ref() != Some(signed) => {
            Some("its contents changed (its modification time was kept)".to_string())
        }
        Ok(_) => None,
    }
}

/// What identifies this process's view of `input_dir`, if the kernel says:
/// ranks with equal views see the same files under it (the same kernel, by
/// its boot id; the same mount namespace; the same root directory; and
/// `input_dir` the same directory, by device and inode). Ranks on other
/// nodes, or in containers or mount namespaces of their own, have other
/// views. `None` where `/proc` does not tell (the caller then takes each
/// process for a view of its own).
pub fn view_of(input_dir: &Path) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let mounts = std::fs::read_link("/proc/self/ns/mnt").ok()?;
    let root = std::fs::metadata("/proc/self/root").ok()?;
    let dir = std::fs::metadata(input_dir).ok()?;
    Some(format!(
        "{} {} root {}:{} dir {}:{}",
        boot.trim(),
        mounts.display(),
        root.dev(),
        root.ino(),
        dir.dev(),
        dir.ino()
    ))
}

/// How much of each end of a file [`content_signature`] reads.
pub const SIGNATURE_BLOCK: u64 = 64 * 1024;

/// A cheap signature of a file's contents: its size and a SHA-256 of its
/// first and last [`SIGNATURE_BLOCK`] bytes, in hex. Ranks on different
/// nodes compare it to catch node-local copies of INPUT_DIR that differ
/// in their data (headers alone are compared by the plan's fingerprint).
/// It reads at most 128 KiB per file, so it cannot see a change in the
/// middle of a large file. Opens the file as [`open_input`] does.
pub fn content_signature(path: &Path) -> Result<String> {
    let (_, seen) = open_input(path)?;
    seen.signature
        .ok_or_else(|| Error::internal("open_input took no content signature"))
}

/// The bytes [`content_signature`] reads from a file of `size` bytes.
pub fn signature_bytes(size: u64) -> u64 {
    size.min(2 * SIGNATURE_BLOCK)
}

/// [`content_signature`] of an open file of `size` bytes.
fn signature_of(file: &File, size: u64, path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let read_err = |e| Error::io("read", path, e);
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

    fn recorded(paths: &[PathBuf]) -> Inputs {
        Inputs::unopened(paths).recorded().unwrap()
    }

    #[test]
    fn replaced_resized_and_modified_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.safetensors");
        std::fs::write(&path, b"abcd").unwrap();
        let paths = vec![path.clone()];
        let before = recorded(&paths);
        before.check_unchanged().unwrap();

        // Same size, new inode: a file moved over the original.
        let other = dir.path().join("other");
        std::fs::write(&other, b"wxyz").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let err = before.check_unchanged().unwrap_err().to_string();
        assert!(
            err.contains("shard.safetensors") && err.contains("replaced"),
            "{err}"
        );

        let before = recorded(&paths);
        std::fs::write(&path, b"abcdef").unwrap();
        let err = before.check_unchanged().unwrap_err().to_string();
        assert!(err.contains("from 4 to 6 bytes"), "{err}");

        std::fs::remove_file(&path).unwrap();
        let err = before.check_unchanged().unwrap_err().to_string();
        assert!(err.contains("can no longer be read"), "{err}");
    }

    #[test]
    fn contents_changed_under_a_kept_modification_time_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("__0_0.distcp");
        std::fs::write(&path, b"abcd").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let (_, seen) = open_input(&path).unwrap();
        let mut opened = Inputs::default();
        opened.push_opened(path.clone(), seen);
        opened.check_unchanged().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut &file, b"abce").unwrap();
        file.set_modified(mtime).unwrap();
        let err = opened.check_unchanged().unwrap_err().to_string();
        assert!(
            err.contains("__0_0.distcp") && err.contains("contents changed"),
            "{err}"
        );
        // Recorded by path only (no signature): not seen, as documented.
        assert!(
            recorded(std::slice::from_ref(&path))
                .check_unchanged()
                .is_ok()
        );
    }

    #[test]
    fn fifos_directories_and_links_to_them_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("__0_0.distcp");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).unwrap();
        let link = dir.path().join(".metadata");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        for path in [&fifo, &link] {
            let err = open_input(path).unwrap_err().to_string();
            assert!(
                err.contains(&*path.to_string_lossy())
                    && err.contains("is not a regular file: it is a named pipe (FIFO)"),
                "{err}"
            );
        }
        let err = open_input(dir.path()).unwrap_err().to_string();
        assert!(err.contains("it is a directory"), "{err}");
        let err = content_signature(&fifo).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
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
