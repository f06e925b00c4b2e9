//! Copying one byte range from a shard file to an output file: in the
//! kernel with `copy_file_range` where the two files' filesystems allow it,
//! else with positioned reads and writes through a buffer.
//!
//! Whether the kernel can copy is learned per work item and per input file
//! ([`RangeCopier`]), never for the whole process: the library may be called
//! many times in one process (the Python package), on other filesystems each
//! time. Only the errnos that mean "no in-kernel copy between these files"
//! turn to the buffered copy; every other error is reported, naming the file.

use super::inputs::read_shard_at;
use rustix::fs::{OFlags, copy_file_range, fcntl_getfl};
use rustix::io::Errno;
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

/// Which file an I/O error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// The shard being read.
    Read,
    /// The output being written.
    Write,
    /// Either: an in-kernel copy failed without saying which.
    Either,
}

/// A failed copy: the side it failed on and the error.
pub(super) type CopyError = (Side, std::io::Error);

/// Copies byte ranges into one work item's output, remembering which input
/// shards `copy_file_range` cannot copy from into it, so that a refused pair
/// costs one failed call per work item, not one per run.
#[derive(Debug, Default)]
pub(super) struct RangeCopier {
    /// Shards (indices into the plan's shards) copied through a buffer.
    buffered: HashSet<usize>,
}

impl RangeCopier {
    /// Copies `len` bytes of shard `shard` (`input`) at `src` to `output` at
    /// `dst`: in the kernel unless that pair has been refused, through a
    /// buffer for what the kernel did not copy.
    pub(super) fn copy(
        &mut self,
        shard: usize,
        input: &File,
        src: u64,
        output: &File,
        dst: u64,
        len: u64,
    ) -> Result<(), CopyError> {
        let mut done = 0;
        if self.in_kernel(shard) {
            let (copied, stop) = copy_in_kernel(input, src, output, dst, len)?;
            if stop == Stop::Unsupported {
                self.buffered.insert(shard);
            }
            done = copied;
        }
        // What is left: all of it for a refused pair, or the rest after an
        // input that ended early (the buffered read then reports it).
        copy_through_buffer(input, src + done, output, dst + done, len - done)
    }

    /// Whether ranges of `shard` are still copied in the kernel.
    pub(super) fn in_kernel(&self, shard: usize) -> bool {
        !self.buffered.contains(&shard)
    }
}

/// Why [`copy_in_kernel`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Everything was copied.
    Done,
    /// The input ended early.
    ShortInput,
    /// No in-kernel copy between these two files.
    Unsupported,
}

/// Copies with `copy_file_range` until done, the input ends or the kernel
/// refuses the pair; returns the bytes copied and why it stopped.
fn copy_in_kernel(
    input: &File,
    src: u64,
    output: &File,
    dst: u64,
    len: u64,
) -> Result<(u64, Stop), CopyError> {
    let mut done = 0;
    while done < len {
        let (mut off_in, mut off_out) = (src + done, dst + done);
        let chunk = (len - done).min(1 << 30) as usize;
        match copy_file_range(input, Some(&mut off_in), output, Some(&mut off_out), chunk) {
            Ok(0) => return Ok((done, Stop::ShortInput)),
            Ok(copied) => done += copied as u64,
            Err(errno) => match classify(errno, input, output) {
                Verdict::Retry => {}
                Verdict::Unsupported => return Ok((done, Stop::Unsupported)),
                Verdict::Fail(side) => return Err((side, errno.into())),
            },
        }
    }
    Ok((done, Stop::Done))
}

/// What an errno of `copy_file_range` means for the copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Interrupted: call again.
    Retry,
    /// No in-kernel copy between these files: copy through a buffer.
    Unsupported,
    /// A real error, on this side.
    Fail(Side),
}

/// Sorts an errno of `copy_file_range(input, output)` (flags 0, offsets
/// given, within both files' range): only those that mean "not supported
/// here" let the copy fall back.
fn classify(errno: Errno, input: &File, output: &File) -> Verdict {
    match errno {
        Errno::INTR => Verdict::Retry,
        // EXDEV: the files are on different filesystems (kernels before 5.3,
        // and since 5.19 unless both share a filesystem driver that copies
        // across its instances: tmpfs to ext4, overlayfs layers, NFS
        // mounts). ENOSYS: a kernel or sandbox without the call.
        // EOPNOTSUPP: a filesystem without it (FUSE, some NFS servers).
        Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP => Verdict::Unsupported,
        // EINVAL is the kernel's answer to bad arguments, and some
        // filesystems' (and sandboxes') to a copy they do not support. The
        // arguments are valid for any two distinct regular files, so only
        // then is it a refusal; otherwise a descriptor is not what it
        // should be, and that is reported.
        Errno::INVAL if distinct_regular_files(input, output) => Verdict::Unsupported,
        Errno::INVAL => Verdict::Fail(Side::Either),
        // EPERM: the output is immutable or append-only.
        Errno::NOSPC | Errno::DQUOT | Errno::FBIG | Errno::PERM => Verdict::Fail(Side::Write),
        Errno::BADF => Verdict::Fail(badly_opened(input, output)),
        // An in-kernel copy does not say which side failed.
        _ => Verdict::Fail(Side::Either),
    }
}

/// Whether `input` and `output` are regular files and not the same file.
fn distinct_regular_files(input: &File, output: &File) -> bool {
    match (input.metadata(), output.metadata()) {
        (Ok(a), Ok(b)) => a.is_file() && b.is_file() && (a.dev(), a.ino()) != (b.dev(), b.ino()),
        _ => false,
    }
}

/// Which side of an EBADF was opened wrongly: an input not open for
/// reading, or an output not open for writing or opened for appending.
fn badly_opened(input: &File, output: &File) -> Side {
    let readable = fcntl_getfl(input).is_ok_and(|flags| (flags & OFlags::RWMODE) != OFlags::WRONLY);
    let writable = fcntl_getfl(output).is_ok_and(|flags| {
        (flags & OFlags::RWMODE) != OFlags::RDONLY && !flags.contains(OFlags::APPEND)
    });
    match (readable, writable) {
        (false, _) => Side::Read,
        (true, false) => Side::Write,
        (true, true) => Side::Either,
    }
}

/// The portable copy: positioned reads and writes through a buffer.
pub(super) fn copy_through_buffer(
    input: &File,
    mut src: u64,
    output: &File,
    mut dst: u64,
    mut len: u64,
) -> Result<(), CopyError> {
    let mut buffer = vec![0u8; len.min(1 << 20) as usize];
    while len > 0 {
        let chunk = &mut buffer[..len.min(1 << 20) as usize];
        read_shard_at(input, chunk, src).map_err(|e| (Side::Read, e))?;
        output
            .write_all_at(chunk, dst)
            .map_err(|e| (Side::Write, e))?;
        src += chunk.len() as u64;
        dst += chunk.len() as u64;
        len -= chunk.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::path::Path;

    fn pattern(len: u32) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// `dir/name` holding `bytes`, opened for reading and writing.
    fn file_in(dir: &Path, name: &str, bytes: &[u8]) -> File {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    fn open_with(path: &Path, options: &mut OpenOptions) -> File {
        options.open(path).unwrap()
    }

    #[test]
    fn both_copy_paths_copy_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(3_000_000);
        let input = file_in(dir.path(), "in", &data);
        for buffered in [false, true] {
            let name = format!("out-{buffered}");
            let output = file_in(dir.path(), &name, &[0u8; 16]);
            let result = if buffered {
                copy_through_buffer(&input, 7, &output, 3, 2_500_000)
            } else {
                RangeCopier::default().copy(0, &input, 7, &output, 3, 2_500_000)
            };
            result.unwrap();
            let got = std::fs::read(dir.path().join(&name)).unwrap();
            assert_eq!(&got[..3], &[0, 0, 0]);
            assert_eq!(&got[3..], &data[7..2_500_007], "buffered={buffered}");
        }
    }

    #[test]
    fn a_short_input_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let input = file_in(dir.path(), "in", &[1, 2, 3]);
        let output = file_in(dir.path(), "out", &[]);
        let mut copier = RangeCopier::default();
        let err = copier.copy(0, &input, 0, &output, 0, 10).unwrap_err();
        assert_eq!(err.0, Side::Read);
        assert!(copier.in_kernel(0), "a short input is no refusal");
        let err = copy_through_buffer(&input, 0, &output, 0, 10).unwrap_err();
        assert_eq!(err.0, Side::Read);
    }

    #[test]
    fn only_not_supported_here_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = file_in(dir.path(), "a", b"abc");
        let b = file_in(dir.path(), "b", b"");
        for errno in [Errno::XDEV, Errno::NOSYS, Errno::OPNOTSUPP, Errno::INVAL] {
            assert_eq!(classify(errno, &a, &b), Verdict::Unsupported, "{errno:?}");
        }
        assert_eq!(classify(Errno::INTR, &a, &b), Verdict::Retry);
        // EINVAL between a file and itself, or with a descriptor that is not
        // a regular file, is a wrongly chosen descriptor, not a refusal.
        let same = open_with(&dir.path().join("a"), OpenOptions::new().read(true));
        assert_eq!(
            classify(Errno::INVAL, &a, &same),
            Verdict::Fail(Side::Either)
        );
        let folder = File::open(dir.path()).unwrap();
        assert_eq!(
            classify(Errno::INVAL, &folder, &b),
            Verdict::Fail(Side::Either)
        );
        for errno in [Errno::PERM, Errno::NOSPC, Errno::DQUOT, Errno::FBIG] {
            assert_eq!(
                classify(errno, &a, &b),
                Verdict::Fail(Side::Write),
                "{errno:?}"
            );
        }
        assert_eq!(classify(Errno::IO, &a, &b), Verdict::Fail(Side::Either));
    }

    #[test]
    fn a_bad_descriptor_is_reported_on_its_side() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let good = file_in(dir.path(), "g", b"abc");
        let write_only = open_with(&path, OpenOptions::new().write(true));
        let read_only = open_with(&path, OpenOptions::new().read(true));
        let append = open_with(&path, OpenOptions::new().append(true));
        assert_eq!(badly_opened(&write_only, &good), Side::Read);
        assert_eq!(badly_opened(&good, &read_only), Side::Write);
        assert_eq!(badly_opened(&good, &append), Side::Write);
        assert_eq!(badly_opened(&good, &good), Side::Either);
    }

    #[test]
    fn a_wrongly_opened_output_is_an_error_and_no_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let input = file_in(dir.path(), "in", &pattern(1 << 20));
        std::fs::write(dir.path().join("out"), [0u8; 16]).unwrap();
        let read_only = File::open(dir.path().join("out")).unwrap();
        let mut copier = RangeCopier::default();
        let (side, err) = copier
            .copy(0, &input, 0, &read_only, 0, 1 << 20)
            .unwrap_err();
        assert_eq!(side, Side::Write);
        assert_eq!(err.raw_os_error(), Some(Errno::BADF.raw_os_error()));
        assert!(copier.in_kernel(0), "EBADF must not turn to the slow copy");
        // The next copy, with a good descriptor, is done in the kernel.
        let output = file_in(dir.path(), "out2", &[]);
        copier.copy(0, &input, 0, &output, 0, 1 << 20).unwrap();
        assert!(copier.in_kernel(0));
    }

    #[test]
    fn a_refused_pair_falls_back_for_that_shard_and_that_copier_only() {
        // /dev/shm is a tmpfs, another filesystem than the temporary
        // folder's: copy_file_range refuses the pair with EXDEV.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let local = tempfile::tempdir().unwrap();
        let data = pattern(1 << 20);
        let far = file_in(shm.path(), "far", &data);
        let near = file_in(local.path(), "near", &data);
        assert_ne!(
            far.metadata().unwrap().dev(),
            near.metadata().unwrap().dev()
        );
        let output = file_in(local.path(), "out", &[]);

        let mut copier = RangeCopier::default();
        copier.copy(0, &far, 0, &output, 0, 1 << 20).unwrap();
        assert!(!copier.in_kernel(0), "EXDEV: shard 0 goes through a buffer");
        copier.copy(1, &near, 0, &output, 1 << 20, 1 << 20).unwrap();
        assert!(
            copier.in_kernel(1),
            "shard 1, on the same filesystem, does not"
        );
        let got = std::fs::read(local.path().join("out")).unwrap();
        assert_eq!(&got[..1 << 20], &data[..]);
        assert_eq!(&got[1 << 20..], &data[..]);
    }
}
