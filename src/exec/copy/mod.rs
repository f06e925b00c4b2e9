//! Moving bytes: fills a work item (a byte range of an output file) from the
//! shard files.
//!
//! Two paths, chosen per tensor:
//! - *direct*: when every piece's runs are long (row-sharded or replicated
//!   tensors), each run is copied file-to-file inside the kernel with
//!   `copy_file_range`, touching no user memory (through a buffer where the
//!   two files' filesystems refuse it: see the `range` module);
//! - *gathered*: when runs are short (column- or mesh-sharded tensors), a
//!   bounded window of the output is gathered from positioned reads of the
//!   pieces and written with one positioned write.
//!
//! Memory stays flat: at most three window-sized buffers per thread. Shards
//! are only ever read with `pread` or `copy_file_range`, never mapped, so a
//! shard truncated by another process during the run is an error naming the
//! file and tensor, not a SIGBUS.

mod inputs;
mod range;
mod replicas;

use crate::checkpoint::{FullTensor, Location};
use crate::error::{Error, Result};
use crate::exec::cancel::{CANCEL_SLICE, Cancel};
use crate::exec::convert::convert;
use crate::exec::runs::Runs;
use crate::plan::{Plan, WorkItem};
use crate::safetensors::dtype::Dtype;
pub use inputs::{OpenInputs, TRUNCATED_DURING_RUN, read_shard_at};
use range::{RangeCopier, Side};
pub use replicas::check_replicas;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Runs at least this long are copied in the kernel; shorter runs are gathered.
pub const DIRECT_MIN_RUN: u64 = 256 << 10;

/// Bytes of output gathered at a time on the gathered path.
pub const WINDOW_BYTES: u64 = 8 << 20;

/// Copies one work item into `out`, whose data section starts at
/// `plan.files[item.file].data_start()`.
pub fn copy_item(
    plan: &Plan,
    item: &WorkItem,
    out: &File,
    out_path: &Path,
    copied: &AtomicU64,
    cancel: &Cancel,
) -> Result<()> {
    let file = &plan.files[item.file];
    let mut inputs = OpenInputs::new(&plan.shards);
    // What this work item learns about in-kernel copies stays with it.
    let mut copier = RangeCopier::default();
    for entry in &file.entries {
        let lo = entry.bytes.start.max(item.bytes.start);
        let hi = entry.bytes.end.min(item.bytes.end);
        if lo >= hi {
            continue;
        }
        cancel.check()?;
        let tensor = &plan.tensors[entry.tensor];
        let job = TensorCopy::new(tensor, &local_source(entry, tensor, lo..hi))?;
        // Where this tensor's byte 0 lands in the output file.
        let out_base = file.data_start() + entry.bytes.start;
        let local = lo - entry.bytes.start..hi - entry.bytes.start;
        if entry.dtype == tensor.dtype && job.is_direct() {
            job.copy_direct(
                local.clone(),
                &mut inputs,
                &mut copier,
                (out, out_path),
                out_base,
                cancel,
            )?;
            copied.fetch_add(local.end - local.start, Ordering::Relaxed);
        } else {
            job.copy_windows(
                entry.dtype,
                local,
                &mut inputs,
                out,
                out_path,
                out_base,
                copied,
                cancel,
            )?;
        }
    }
    Ok(())
}

/// The source bytes of `tensor` (relative to its start) that fill the
/// output bytes `out` of its `entry` (`--dtype` changes the element size,
/// never the element count).
pub(crate) fn local_source(
    entry: &crate::plan::OutputEntry,
    tensor: &FullTensor,
    out: Range<u64>,
) -> Range<u64> {
    let (to, from) = (entry.dtype.size(), tensor.dtype.size());
    let first = (out.start - entry.bytes.start) / to;
    let last = (out.end - entry.bytes.start).div_ceil(to);
    first * from..last * from
}

/// One tensor's pieces, ready to be copied or gathered.
struct TensorCopy<'a> {
    tensor: &'a FullTensor,
    pieces: Vec<(Location, Runs)>,
}

impl<'a> TensorCopy<'a> {
    /// Computes the runs of every non-empty piece of `tensor`. The pieces
    /// with bytes in `source` (the tensor's source bytes to copy) must be
    /// located: the others may still point at their archive, since only
    /// the ranks that copy a chunk locate it.
    fn new(tensor: &'a FullTensor, source: &Range<u64>) -> Result<Self> {
        let pieces: Vec<(Location, Runs)> = tensor
            .pieces
            .iter()
            .map(|p| {
                let runs = Runs::new(&tensor.shape, &p.offsets, &p.shape, tensor.dtype.size());
                (p.location, runs)
            })
            .filter(|(_, runs)| !runs.runs_in(source).is_empty())
            .collect();
        if pieces.iter().any(|(location, _)| !location.is_located()) {
            return Err(Error::internal(format!(
                "'{}': a chunk was copied before it was located in its archive",
                tensor.name
            )));
        }
        Ok(TensorCopy { tensor, pieces })
    }

    /// Whether every run is long enough to copy in the kernel.
    fn is_direct(&self) -> bool {
        self.pieces
            .iter()
            .all(|(_, runs)| runs.run_len() >= DIRECT_MIN_RUN)
    }

    fn fail(&self, action: &'static str, path: &Path, source: std::io::Error) -> Error {
        Error::Copy {
            tensor: self.tensor.name.clone(),
            action,
            path: path.to_owned(),
            source,
        }
    }

    /// Copies the tensor's bytes `range` (relative to the tensor's start) run
    /// by run, file to file, in slices of at most [`CANCEL_SLICE`] bytes.
    fn copy_direct(
        &self,
        range: Range<u64>,
        inputs: &mut OpenInputs,
        copier: &mut RangeCopier,
        (out, out_path): (&File, &Path),
        out_base: u64,
        cancel: &Cancel,
    ) -> Result<()> {
        for (location, runs) in &self.pieces {
            let paths = inputs.paths;
            let input = inputs.get(location.shard)?;
            for n in runs.runs_in(&range) {
                let dst = runs.dst(n);
                let lo = dst.max(range.start);
                let hi = (dst + runs.run_len()).min(range.end);
                let src = location.offset + runs.src(n) + (lo - dst);
                let dst = out_base + lo;
                let mut done = 0;
                while done < hi - lo {
                    cancel.check()?;
                    let len = (hi - lo - done).min(CANCEL_SLICE);
                    copier
                        .copy(location.shard, input, src + done, out, dst + done, len)
                        .map_err(|(side, e)| match side {
                            Side::Read => self.fail("read", &paths[location.shard], e),
                            Side::Write => self.fail("write", out_path, e),
                            Side::Either => Error::CopyBetween {
                                tensor: self.tensor.name.clone(),
                                from: paths[location.shard].clone(),
                                to: out_path.to_owned(),
                                source: e,
                            },
                        })?;
                    done += len;
                }
            }
        }
        Ok(())
    }

    /// Writes the tensor's output bytes `range` (relative to the tensor's
    /// start, in `to` elements) window by window: gathered from the pieces,
    /// and converted on the way when `to` is not the source dtype.
    #[allow(clippy::too_many_arguments)]
    fn copy_windows(
        &self,
        to: Dtype,
        range: Range<u64>,
        inputs: &mut OpenInputs,
        out: &File,
        out_path: &Path,
        out_base: u64,
        copied: &AtomicU64,
        cancel: &Cancel,
    ) -> Result<()> {
        let size = to.size();
        let mut buffers = Buffers::default();
        let (mut element, end) = (range.start / size, range.end / size);
        while element < end {
            cancel.check()?;
            let stop = (element + self.window_elements(to)).min(end);
            let window = self.gather_as(to, element..stop, inputs, &mut buffers)?;
            out.write_all_at(window, out_base + element * size)
                .map_err(|e| self.fail("write", out_path, e))?;
            copied.fetch_add(window.len() as u64, Ordering::Relaxed);
            element = stop;
        }
        Ok(())
    }

    /// Elements per window when producing `to`: the source bytes and the
    /// output bytes of a window each stay within [`WINDOW_BYTES`].
    fn window_elements(&self, to: Dtype) -> u64 {
        WINDOW_BYTES / self.tensor.dtype.size().max(to.size())
    }

    /// Elements `elements` of the tensor as `to`: gathered straight into
    /// the output buffer, or into the scratch buffer and converted when `to`
    /// is not the source dtype. Buffers keep their capacity between calls,
    /// and every byte is overwritten because the pieces tile the tensor.
    fn gather_as<'b>(
        &self,
        to: Dtype,
        elements: Range<u64>,
        inputs: &mut OpenInputs,
        buffers: &'b mut Buffers,
    ) -> Result<&'b [u8]> {
        let from = self.tensor.dtype;
        let count = (elements.end - elements.start) as usize;
        let source = elements.start * from.size()..elements.end * from.size();
        let Buffers {
            pieces,
            scratch,
            window,
        } = buffers;
        window.resize(count * to.size() as usize, 0);
        if to == from {
            self.gather(source, inputs, pieces, window)?;
        } else {
            scratch.resize(count * from.size() as usize, 0);
            self.gather(source, inputs, pieces, scratch)?;
            convert(from, to, scratch, window);
        }
        Ok(window)
    }

    /// Fills `window` with the tensor's bytes `range` (relative to the
    /// tensor's start). Each piece's bytes for the window are contiguous in
    /// its shard and read with one positioned read: straight into `window`
    /// when they are a single run, else into `pieces` and scattered from
    /// there. A piece contributes at most the window's length (its bytes
    /// inside the window), so `pieces` stays within [`WINDOW_BYTES`].
    /// Reads, unlike memory maps, turn a shard truncated during the run
    /// into an error instead of a SIGBUS.
    fn gather(
        &self,
        range: Range<u64>,
        inputs: &mut OpenInputs,
        pieces: &mut Vec<u8>,
        window: &mut [u8],
    ) -> Result<()> {
        debug_assert_eq!(window.len() as u64, range.end - range.start);
        for (location, runs) in &self.pieces {
            let span = runs.src_span(&range);
            if span.is_empty() {
                continue;
            }
            let len = (span.end - span.start) as usize;
            let paths = inputs.paths;
            let input = inputs.get(location.shard)?;
            let read = |buffer: &mut [u8]| {
                read_shard_at(input, buffer, location.offset + span.start)
                    .map_err(|e| self.fail("read", &paths[location.shard], e))
            };
            let touched = runs.runs_in(&range);
            if touched.end - touched.start == 1 {
                let at = (runs.dst(touched.start).max(range.start) - range.start) as usize;
                read(&mut window[at..at + len])?;
            } else {
                pieces.resize(len, 0);
                read(pieces)?;
                runs.fill(window, range.start, pieces, span.start);
            }
        }
        Ok(())
    }
}

/// The reusable buffers of the gathered path, per thread: each within
/// [`WINDOW_BYTES`].
#[derive(Default)]
struct Buffers {
    /// One piece's bytes for the current window.
    pieces: Vec<u8>,
    /// The window in the source dtype, when converting.
    scratch: Vec<u8>,
    /// The window as written.
    window: Vec<u8>,
}
