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
