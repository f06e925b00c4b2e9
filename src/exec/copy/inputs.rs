//! Reading the input shard files: a cache that opens each file on first
//! use, and positioned reads that say when a file shrank during the run.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The input shard files, opened on first use and kept open for one unit of
/// work.
pub struct OpenInputs<'a> {
    pub(super) paths: &'a [PathBuf],
    open: HashMap<usize, File>,
}

impl<'a> OpenInputs<'a> {
    /// No file is opened until it is needed.
    pub fn new(paths: &'a [PathBuf]) -> Self {
        OpenInputs {
            paths,
            open: HashMap::new(),
        }
    }

    /// The path of shard `shard`.
    pub fn path(&self, shard: usize) -> &'a Path {
        &self.paths[shard]
    }

    /// Shard `shard` (an index into the plan's shards), opened for reading.
    pub fn get(&mut self, shard: usize) -> Result<&File> {
        if !self.open.contains_key(&shard) {
            let path = &self.paths[shard];
            let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
            self.open.insert(shard, file);
        }
        Ok(&self.open[&shard])
    }
}

/// What a shard that ends before its header says means: the header was
/// checked against the file's length when the run started.
pub const TRUNCATED_DURING_RUN: &str = "file is shorter than its header says: it was truncated or overwritten during the run; rerun when no process writes to INPUT_DIR";

/// Reads exactly `buffer.len()` bytes of a shard file at `offset`. A short
/// read becomes an [`std::io::ErrorKind::UnexpectedEof`] error that says the
/// file changed during the run.
pub fn read_shard_at(input: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    input
        .read_exact_at(buffer, offset)
        .map_err(explain_short_read)
}

/// Replaces std's "failed to fill whole buffer" with [`TRUNCATED_DURING_RUN`].
fn explain_short_read(err: std::io::Error) -> std::io::Error {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, TRUNCATED_DURING_RUN)
    } else {
        err
    }
}
