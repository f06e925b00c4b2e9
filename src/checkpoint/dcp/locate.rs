//! Locating chunks inside their `torch.save` archives, after the plan.
//!
//! `.metadata` says which byte range of which `.distcp` file holds each
//! chunk's archive; where the chunk's bytes are inside it (and whether the
//! archive is really the chunk) takes two small reads and the checks of
//! [`super::archive`]. Nothing but the copy and verification needs that, so
//! the reader leaves every piece pointing at its archive
//! ([`Location::archive_len`]) and each rank locates, once the plan says
//! which, only the pieces it copies or verifies: at 582k chunks on N ranks,
//! about 1/N of the small reads each instead of all of them on every rank
//! (or on one).

use super::archive::{ChunkRequest, locate_chunk_data};
use crate::checkpoint::coverage::region;
use crate::checkpoint::identity::open_regular;
use crate::checkpoint::{FullTensor, Location};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;

/// What to locate, and what messages name.
#[derive(Clone, Copy, Debug)]
pub struct Wanted<'a> {
    /// Each tensor's name as saved (what `.metadata` calls it), by index
    /// into the tensors.
    pub names: &'a [String],
    /// The input files [`Location::shard`] indexes.
    pub files: &'a [PathBuf],
    /// `(tensor, piece)` pairs, each located with its replicas; repeats and
    /// pieces already located are skipped.
    pub pieces: &'a [(usize, usize)],
}

/// What locating cost: for `-v` and the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Located {
    /// Chunk copies located (a replicated piece counts once per copy).
    pub chunks: u64,
    /// Bytes of the chunk files read to locate and check them.
    pub archive_bytes: u64,
}

impl std::ops::AddAssign for Located {
    fn add_assign(&mut self, other: Located) {
        self.chunks += other.chunks;
        self.archive_bytes += other.archive_bytes;
    }
}

/// Locates every wanted piece not located yet, and its replicas: each
/// chunk's archive is checked ([`locate_chunk_data`]) and the location
/// replaced by where its bytes are, with the CRC-32 stored for them. Files
/// are opened once each (regular files only, without blocking); the
/// archives are read in parallel on the caller's rayon pool. The first
/// failure, in the order of `wanted.pieces`, is the error: it names the
/// file and the tensor, as the reader's own errors do.
pub fn locate_pieces(tensors: &mut [FullTensor], wanted: &Wanted) -> Result<Located> {
    // Every copy (0: the piece's own location, then its replicas) still
    // pointing at an archive, in the order asked for.
    let mut seen = HashSet::new();
    let mut todo: Vec<(usize, usize, usize)> = Vec::new();
    for &(t, p) in wanted.pieces {
        if !seen.insert((t, p)) {
            continue;
        }
        let piece = tensor_piece(tensors, t, p)?;
        let copies = std::iter::once(&piece.location).chain(&piece.replicas);
        for (c, location) in copies.enumerate() {
            if !location.is_located() {
                todo.push((t, p, c));
            }
        }
    }
    let mut open: HashMap<usize, (File, u64)> = HashMap::new();
    for &(t, p, c) in &todo {
        let shard = copy_of(&tensors[t], p, c).shard;
        if open.contains_key(&shard) {
            continue;
        }
        let name = wanted.names.get(t).map_or("?", String::as_str);
        let path = file_path(wanted, shard)?;
        let (file, meta) = open_regular(path).map_err(|err| naming_tensor(err, name))?;
        open.insert(shard, (file, meta.len()));
    }
    // In batches, so that what is held between the parallel reads and the
    // updates stays small whatever the count (an error is large).
    let mut cost = Located::default();
    for batch in todo.chunks(BATCH) {
        let tensors_read: &[FullTensor] = tensors;
        let results: Vec<Result<(Location, u64)>> = batch
            .par_iter()
            .map(|&(t, p, c)| locate_one(tensors_read, wanted, &open, (t, p, c)))
            .collect();
        for (&(t, p, c), result) in batch.iter().zip(results) {
            let (located, bytes) = result?;
            let piece = &mut tensors[t].pieces[p];
            match c {
                0 => piece.location = located,
                _ => piece.replicas[c - 1] = located,
            }
            cost += Located {
                chunks: 1,
                archive_bytes: bytes,
            };
        }
    }
    Ok(cost)
}

/// Chunks located per parallel batch.
const BATCH: usize = 1 << 14;

/// Locates copy `c` of piece `p` of tensor `t`: where its bytes are, and
/// how many bytes of its file were read to find and check them.
fn locate_one(
    tensors: &[FullTensor],
    wanted: &Wanted,
    open: &HashMap<usize, (File, u64)>,
    (t, p, c): (usize, usize, usize),
) -> Result<(Location, u64)> {
    let tensor = &tensors[t];
    let piece = &tensor.pieces[p];
    let location = copy_of(tensor, p, c);
    let (file, file_len) = &open[&location.shard];
    let request = ChunkRequest {
        dtype: tensor.dtype,
        sizes: &piece.shape,
        offset: location.offset,
        length: location.archive_len.unwrap_or(0),
    };
    let data =
        locate_chunk_data(file, *file_len, &request).map_err(|refusal| Error::BadTensor {
            path: wanted.files[location.shard].clone(),
            tensor: wanted.names.get(t).cloned().unwrap_or_default(),
            reason: format!(
                "chunk {}: {}",
                region(&piece.offsets, &piece.shape),
                refusal.reason
            ),
            hint: refusal.hint,
        })?;
    let located = Location {
        shard: location.shard,
        offset: data.offset,
        crc32: Some(data.crc32),
        archive_len: None,
    };
    Ok((located, data.bytes_read))
}

/// Copy `c` of piece `p` of `tensor`: 0 is the piece's own location, then
/// its replicas.
fn copy_of(tensor: &FullTensor, p: usize, c: usize) -> Location {
    let piece = &tensor.pieces[p];
    match c {
        0 => piece.location,
        _ => piece.replicas[c - 1],
    }
}

fn tensor_piece(tensors: &[FullTensor], t: usize, p: usize) -> Result<&crate::checkpoint::Piece> {
    tensors
        .get(t)
        .and_then(|tensor| tensor.pieces.get(p))
        .ok_or_else(|| Error::internal(format!("piece {p} of tensor #{t} does not exist")))
}

fn file_path<'a>(wanted: &Wanted<'a>, shard: usize) -> Result<&'a PathBuf> {
    wanted
        .files
        .get(shard)
        .ok_or_else(|| Error::internal(format!("input file #{shard} does not exist")))
}

/// An input that cannot be opened or inspected, as an error that names the
/// tensor whose chunk is in it.
pub(super) fn naming_tensor(err: Error, tensor: &str) -> Error {
    match err {
        Error::Io {
            action,
            path,
            source,
        } => Error::Copy {
            tensor: tensor.to_owned(),
            action,
            path,
            source,
        },
        other => other,
    }
}

/// Every chunk copy located in `tensors` (those this rank read in their
/// archives), encoded for [`compare_located`]: for each, in order of
/// (tensor, piece, copy), the tensor as a step from the previous one, the
/// piece, the copy, the file, where its bytes are and the CRC-32 stored for
/// them, as varints (about 12 bytes a chunk).
pub fn encode_located(tensors: &[FullTensor]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut previous = 0u64;
    for (t, tensor) in tensors.iter().enumerate() {
        for (p, piece) in tensor.pieces.iter().enumerate() {
            let copies = std::iter::once(&piece.location).chain(&piece.replicas);
            for (c, location) in copies.enumerate() {
                if !location.is_located() {
                    continue;
                }
                let t = t as u64;
                for value in [
                    t - previous,
                    p as u64,
                    c as u64,
                    location.shard as u64,
                    location.offset,
                    location.crc32.map_or(0, |crc| u64::from(crc) + 1),
                ] {
                    put_varint(&mut out, value);
                }
                previous = t;
            }
        }
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// One located chunk copy as [`encode_located`] wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LocatedCopy {
    /// (tensor, piece, copy).
    key: (u64, u64, u64),
    /// (file, offset, stored CRC-32 + 1, or 0 for none).
    at: (u64, u64, u64),
}

/// Reads one rank's [`encode_located`] bytes in order.
struct LocatedReader<'a> {
    bytes: &'a [u8],
    tensor: u64,
}

impl LocatedReader<'_> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self
                .bytes
                .split_first()
                .ok_or_else(|| "it ends inside a number".to_string())?;
            self.bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a number is longer than 64 bits".to_string())
    }

    fn next(&mut self) -> std::result::Result<Option<LocatedCopy>, String> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let step = self.varint()?;
        self.tensor = self
            .tensor
            .checked_add(step)
            .ok_or_else(|| "a tensor number overflows".to_string())?;
        let key = (self.tensor, self.varint()?, self.varint()?);
        let at = (self.varint()?, self.varint()?, self.varint()?);
        Ok(Some(LocatedCopy { key, at }))
    }
}

/// Compares where the ranks located the chunks: `located[r]` is rank `r`'s
/// [`encode_located`], `hosts[r]` its host. Every chunk copy that two ranks
/// located must be at the same offset of the same file, with the same
/// stored CRC-32, for both: otherwise they read different copies of that
/// file (node-local copies of INPUT_DIR that differ inside, where the ends
/// compared before the plan agree), and the error names the file, the
/// tensor and both ranks. A chunk that one rank alone located is compared
/// with nothing. Reads the ranks' lists side by side (a merge), holding one
/// entry of each.
pub fn compare_located(
    located: &[Vec<u8>],
    hosts: &[String],
    names: &[String],
    files: &[PathBuf],
) -> Result<()> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let garbled = |rank: usize, what: String| {
        Error::ranks_disagree(
            format!("rank {rank} sent an unreadable list of the chunks it located: {what}"),
            "all ranks must run the same st-consolidate-mpi binary",
        )
    };
    let mut readers: Vec<LocatedReader> = located
        .iter()
        .map(|bytes| LocatedReader { bytes, tensor: 0 })
        .collect();
    let mut heads: Vec<Option<LocatedCopy>> = vec![None; readers.len()];
    let mut heap = BinaryHeap::new();
    for (rank, reader) in readers.iter_mut().enumerate() {
        heads[rank] = reader.next().map_err(|e| garbled(rank, e))?;
        if let Some(head) = heads[rank] {
            heap.push(Reverse((head.key, rank)));
        }
    }
    let mut first: Option<(LocatedCopy, usize)> = None;
    while let Some(Reverse((key, rank))) = heap.pop() {
        let Some(copy) = heads[rank] else { continue };
        match first {
            Some((seen, by)) if seen.key == key && seen.at != copy.at => {
                return Err(located_differently(
                    (seen, by),
                    (copy, rank),
                    hosts,
                    names,
                    files,
                ));
            }
            Some((seen, _)) if seen.key == key => {}
            _ => first = Some((copy, rank)),
        }
        let next = readers[rank].next().map_err(|e| garbled(rank, e))?;
        if let Some(next) = next {
            if next.key <= key {
                return Err(garbled(rank, "its chunks are out of order".to_string()));
            }
            heap.push(Reverse((next.key, rank)));
        }
        heads[rank] = next;
    }
    Ok(())
}

/// The error for a chunk copy two ranks located differently.
fn located_differently(
    (a, rank_a): (LocatedCopy, usize),
    (b, rank_b): (LocatedCopy, usize),
    hosts: &[String],
    names: &[String],
    files: &[PathBuf],
) -> Error {
    let file = |shard: u64| {
        usize::try_from(shard)
            .ok()
            .and_then(|s| files.get(s))
            .map_or_else(
                || format!("input file #{shard}"),
                |p| p.display().to_string(),
            )
    };
    let host = |rank: usize| hosts.get(rank).map_or("?", String::as_str);
    let crc = |stored: u64| match stored {
        0 => "none".to_string(),
        crc => format!("{:08x}", crc - 1),
    };
    let (t, p, c) = a.key;
    let name = usize::try_from(t)
        .ok()
        .and_then(|t| names.get(t))
        .map_or("?", String::as_str);
    let copy = match c {
        0 => String::new(),
        c => format!(", replica {c}"),
    };
    let at = |x: LocatedCopy, rank: usize| {
        let place = match x.at.0 == a.at.0 {
            true => String::new(),
            false => format!(" of {}", file(x.at.0)),
        };
        format!(
            "rank {rank} on {} finds them at byte {}{place} (stored CRC-32 {})",
            host(rank),
            x.at.1,
            crc(x.at.2)
        )
    };
    Error::ranks_disagree(
        format!(
            "input {} does not hold the same chunk archive on every rank: for tensor '{}' (chunk {p}{copy}), {}, {}",
            file(a.at.0),
            crate::error::shown(name),
            at(a, rank_a),
            at(b, rank_b)
        ),
        "the ranks read different copies of this file (node-local copies of INPUT_DIR that differ, or a file rewritten during the run): make every node's copy identical (or use a shared filesystem) and rerun; nothing was written",
    )
}
