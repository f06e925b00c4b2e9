//! The checkpoint model every input format is read into: each tensor's
//! name, dtype and full shape, and its pieces (input file, byte offset, block
//! of the full tensor). The plan, the copy and verification see only this
//! model and never ask which format it came from; adding a format is adding a
//! reader beside [`hf_shards`] and [`dcp`].

pub mod coverage;
pub mod dcp;
pub mod format;
pub mod hf_shards;
pub mod identity;
pub mod select;

use crate::checkpoint::coverage::{CoverageFault, check_coverage, region};
use crate::error::{Error, Result};
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::{byte_len, element_count};
use std::collections::HashMap;
use std::path::PathBuf;

/// How the checkpoint is read, from the command line.
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// `--input-format`.
    pub format: format::InputFormat,
    /// `--include` / `--exclude`.
    pub select: select::Selection,
    /// Accept a shard file set with (rank, index) files missing.
    pub allow_missing_shard_files: bool,
    /// How many ranks saved the checkpoint, if the user knows.
    pub source_ranks: Option<u32>,
    /// Whether every rank reads every header (or `.metadata`), or the work
    /// is shared and the results exchanged.
    pub headers: hf_shards::HeaderReading,
}

/// A checkpoint as read from disk, whatever its format.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The input files pieces live in, indexed by `Location::shard`.
    pub files: Vec<PathBuf>,
    /// Every tensor, sorted by name, its pieces tiling it exactly.
    pub tensors: Vec<FullTensor>,
    /// Consolidated outputs of an earlier run found among the inputs and
    /// ignored (when OUTPUT_DIR is INPUT_DIR).
    pub skipped_outputs: Vec<PathBuf>,
    /// Saved values that are not tensors (a step count, dataloader state):
    /// not weights, so not exported.
    pub non_tensors: Vec<String>,
    /// Tensors left out by `--include`/`--exclude`, with their bytes.
    pub excluded: Vec<(String, u64)>,
}

/// Where a piece's bytes live: an input file and an absolute byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    /// Index into the list of shards.
    pub shard: usize,
    /// Absolute offset of the piece's first byte in that file.
    pub offset: u64,
}

/// One saved piece of a tensor: a dense row-major block of the full tensor.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Piece {
    /// Where the piece's bytes are.
    pub location: Location,
    /// Where the piece starts in the full tensor, per dimension.
    pub offsets: Vec<u64>,
    /// The piece's shape.
    pub shape: Vec<u64>,
    /// Other copies of exactly this block (a replicated tensor saved by
    /// several ranks); their bytes must equal this piece's.
    pub replicas: Vec<Location>,
}

impl Piece {
    /// A piece at `location` covering the block at `offsets` of `shape`,
    /// with no replicas yet.
    pub fn new(location: Location, offsets: &[u64], shape: &[u64]) -> Piece {
        Piece {
            location,
            offsets: offsets.to_vec(),
            shape: shape.to_vec(),
            replicas: Vec::new(),
        }
    }
}

/// A full tensor reassembled from its pieces.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FullTensor {
    /// The tensor's name.
    pub name: String,
    /// Element type, the same in every piece.
    pub dtype: Dtype,
    /// Full shape.
    pub shape: Vec<u64>,
    /// Distinct pieces that tile the full shape exactly.
    pub pieces: Vec<Piece>,
}

impl FullTensor {
    /// Elements in the full tensor.
    pub fn element_count(&self) -> u64 {
        element_count(&self.shape).unwrap_or(0)
    }

    /// Size of the full tensor in bytes (validated not to overflow, for any
    /// dtype up to 8 bytes, when the pieces were indexed).
    pub fn byte_len(&self) -> u64 {
        self.element_count() * self.dtype.size()
    }
}

/// Builds one full tensor from all its saved pieces (from any input format):
/// identical blocks become one piece with replicas, the full shape is where
/// the pieces end, and the pieces must tile it exactly. `files` are the
/// input paths `Location::file` indexes, for messages.
pub fn tensor_from_pieces(
    name: &str,
    dtype: Dtype,
    pieces: Vec<Piece>,
    files: &[PathBuf],
) -> Result<FullTensor> {
    let inconsistent = |reason: String, hint: &'static str| Error::Inconsistent {
        tensor: name.to_owned(),
        reason,
        hint,
    };
    // Identical blocks saved by several ranks are one piece with replicas.
    let mut distinct: Vec<Piece> = Vec::with_capacity(pieces.len());
    let mut by_block: HashMap<(Vec<u64>, Vec<u64>), usize> = HashMap::new();
    for piece in pieces {
        match by_block.get(&(piece.offsets.clone(), piece.shape.clone())) {
            Some(&first) => distinct[first].replicas.push(piece.location),
            None => {
                by_block.insert((piece.offsets.clone(), piece.shape.clone()), distinct.len());
                distinct.push(piece);
            }
        }
    }
    let ndim = distinct[0].shape.len();
    let mut shape = vec![0u64; ndim];
    for piece in &distinct {
        for (d, full) in shape.iter_mut().enumerate() {
            let end = piece.offsets[d]
                .checked_add(piece.shape[d])
                .ok_or_else(|| {
                    inconsistent(
                        format!(
                            "piece in {} has offsets that overflow",
                            files[piece.location.shard].display()
                        ),
                        "the shard's metadata is corrupt; re-save the checkpoint",
                    )
                })?;
            *full = (*full).max(end);
        }
    }
    // FullTensor::byte_len relies on this check; 8-byte elements cover any
    // --dtype target too.
    if byte_len(&shape, Dtype::F64).is_none() {
        return Err(inconsistent(
            format!("full shape {shape:?} overflows"),
            "the shard's metadata is corrupt; re-save the checkpoint",
        ));
    }
    check_coverage(&shape, &distinct).map_err(|fault| match fault {
        CoverageFault::Overlap(a, b) => inconsistent(
            format!(
                "pieces {} (in {}) and {} (in {}) overlap",
                region(&distinct[a].offsets, &distinct[a].shape),
                files[distinct[a].location.shard].display(),
                region(&distinct[b].offsets, &distinct[b].shape),
                files[distinct[b].location.shard].display(),
            ),
            "the shards come from different saves or checkpoints; use one checkpoint's files only",
        ),
        CoverageFault::Gap(start, len) => inconsistent(
            format!(
                "no shard covers region {} of full shape {shape:?}",
                region(&start, &len)
            ),
            "a shard file is missing or truncated; copy every shard-*.safetensors file of the checkpoint",
        ),
        CoverageFault::Incomplete { covered, total } => inconsistent(
            format!("pieces cover {covered} of {total} elements of full shape {shape:?}"),
            "a shard file is missing or truncated; copy every shard-*.safetensors file of the checkpoint",
        ),
    })?;
    Ok(FullTensor {
        name: name.to_owned(),
        dtype,
        shape,
        pieces: distinct,
    })
}
