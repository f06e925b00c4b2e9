//! The checkpoint model every input format is read into: each tensor's
//! name, dtype and full shape, and its pieces (input file, byte offset, block
//! of the full tensor). The plan, the copy and verification see only this
//! model and never ask which format it came from; adding a format is adding a
//! reader beside [`hf_shards`] and [`dcp`].

pub mod coverage;
pub mod dcp;
pub mod deepspeed;
pub mod format;
pub mod hf_shards;
pub mod identity;
pub mod select;
pub mod wire;

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
    /// Plan from a DCP checkpoint's `.metadata` alone, without opening the
    /// chunk files (`--dry-run`). (Pieces point at their archive either
    /// way: a run locates each rank's after the plan.)
    pub plan_only: bool,
    /// `--tag`: a DeepSpeed checkpoint's tag folder to read instead of the
    /// one its `latest` file names.
    pub tag: Option<String>,
    /// `--keep-tied`: write a DeepSpeed checkpoint's tied aliases as
    /// copies of their owners instead of leaving them out.
    pub keep_tied: bool,
    /// `--exclude-frozen-parameters`: leave a DeepSpeed checkpoint's
    /// frozen parameters out, as `zero_to_fp32` does with that flag.
    pub exclude_frozen: bool,
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
    /// Every file the checkpoint was read from (`files`, and a DCP
    /// checkpoint's `.metadata`), with what each was when this rank opened
    /// it: compared across ranks and checked again before publishing.
    pub inputs: identity::Inputs,
    /// For a DCP checkpoint saved from a nested state dict (`dcp.save({"model":
    /// sd})`), each tensor's top-level key there (`model`), by tensor name,
    /// from `.metadata`'s planner_data; tensors saved at the top level have
    /// none. Only recorded, never applied to the names.
    #[serde(default)]
    pub top_level_keys: std::collections::BTreeMap<String, String>,
    /// What the reader did that the user should know of, one line each
    /// (a DeepSpeed checkpoint's tied aliases left out, frozen parameters
    /// taken from the model states).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Where a piece's bytes live: an input file and an absolute byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    /// Index into the list of shards.
    pub shard: usize,
    /// Absolute offset of the piece's first byte in that file.
    pub offset: u64,
    /// The CRC-32 the input format stores for these bytes, if it stores one
    /// (a DCP chunk's zip entry; 0 there means the writer recorded none).
    /// Checked by `--verify`, never by the copy.
    pub crc32: Option<u32>,
    /// `Some(len)` while a DCP chunk is not located yet: `offset` is then
    /// where its torch.save archive of `len` bytes starts (as `.metadata`
    /// says), not where its bytes are, and nothing may read from it until
    /// [`dcp::locate::locate_pieces`] has found them inside. Readers locate
    /// after the plan, each rank only the pieces it copies or verifies.
    /// `None`: `offset` is the piece's first byte.
    #[serde(default)]
    pub archive_len: Option<u64>,
}

impl Location {
    /// A location whose `offset` is the piece's first byte.
    pub fn at(shard: usize, offset: u64) -> Location {
        Location {
            shard,
            offset,
            crc32: None,
            archive_len: None,
        }
    }

    /// Whether `offset` is where the piece's bytes are (not the start of an
    /// archive still to be searched).
    pub fn is_located(&self) -> bool {
        self.archive_len.is_none()
    }
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

/// What a reader's messages about a tensor's pieces call them and advise.
#[derive(Clone, Copy, Debug)]
pub struct PieceHints {
    /// What holds a piece, in messages: "shard", "chunk".
    pub holder: &'static str,
    /// For pieces whose metadata cannot be right (dimensions, overflow).
    pub corrupt: &'static str,
    /// For pieces that overlap.
    pub overlap: &'static str,
    /// For pieces that leave part of the tensor uncovered.
    pub missing: &'static str,
}

/// The HF-shards reader's hints.
pub const SHARD_HINTS: PieceHints = PieceHints {
    holder: "shard",
    corrupt: "the shard's metadata is corrupt; re-save the checkpoint",
    overlap: "the shards come from different saves or checkpoints; use one checkpoint's files only",
    missing: "a shard file is missing or truncated; copy every shard-*.safetensors file of the checkpoint",
};

/// What a reader knows of one tensor besides its pieces.
#[derive(Clone, Copy, Debug)]
pub struct TensorSpec<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Its element type.
    pub dtype: Dtype,
    /// Its full shape, when the format records one (DCP's `.metadata`);
    /// `None` when the full shape is where the pieces end (HF shards).
    pub shape: Option<&'a [u64]>,
    /// How messages name pieces and what they advise.
    pub hints: &'a PieceHints,
}

/// Builds one full tensor from all its saved pieces, for every input
/// format: identical blocks become one piece with replicas, the full shape
/// is the recorded one (or where the pieces end), and the pieces must tile
/// it exactly. Never panics: no pieces, pieces of another rank than the
/// tensor's, pieces outside the recorded shape and sizes that overflow are
/// errors naming the tensor (and the file, from `files`, which
/// `Location::shard` indexes).
pub fn tensor_from_pieces(
    spec: &TensorSpec,
    pieces: Vec<Piece>,
    files: &[PathBuf],
) -> Result<FullTensor> {
    let hints = spec.hints;
    let inconsistent = |reason: String, hint: &'static str| Error::Inconsistent {
        tensor: spec.name.to_owned(),
        reason,
        hint,
    };
    let file_of = |piece: &Piece| match files.get(piece.location.shard) {
        Some(path) => path.display().to_string(),
        None => format!("input file #{}", piece.location.shard),
    };
    let ndim = match (spec.shape, pieces.first()) {
        (Some(shape), _) => shape.len(),
        (None, Some(first)) => first.shape.len(),
        (None, None) => {
            return Err(inconsistent(
                "no piece of it was saved".to_owned(),
                hints.corrupt,
            ));
        }
    };
    if let Some(odd) = pieces
        .iter()
        .find(|p| p.shape.len() != ndim || p.offsets.len() != ndim)
    {
        return Err(inconsistent(
            format!(
                "a piece in {} has offsets {:?} and shape {:?}, but the tensor has {ndim} dimension(s)",
                file_of(odd),
                odd.offsets,
                odd.shape
            ),
            hints.corrupt,
        ));
    }
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
    let mut ends = vec![0u64; ndim];
    for piece in &distinct {
        for (d, end) in ends.iter_mut().enumerate() {
            let piece_end = piece.offsets[d]
                .checked_add(piece.shape[d])
                .ok_or_else(|| {
                    inconsistent(
                        format!("a piece in {} has offsets that overflow", file_of(piece)),
                        hints.corrupt,
                    )
                })?;
            *end = (*end).max(piece_end);
        }
    }
    let shape = match spec.shape {
        None => ends,
        Some(shape) => {
            let outside = distinct
                .iter()
                .find(|p| (0..ndim).any(|d| p.offsets[d] + p.shape[d] > shape[d]));
            if let Some(piece) = outside {
                return Err(inconsistent(
                    format!(
                        "piece {} (in {}) lies outside the full shape {shape:?}",
                        region(&piece.offsets, &piece.shape),
                        file_of(piece)
                    ),
                    hints.corrupt,
                ));
            }
            shape.to_vec()
        }
    };
    // FullTensor::byte_len relies on this check; 8-byte elements cover any
    // --dtype target too.
    if byte_len(&shape, Dtype::F64).is_none() {
        return Err(inconsistent(
            format!("full shape {shape:?} overflows"),
            hints.corrupt,
        ));
    }
    check_coverage(&shape, &distinct).map_err(|fault| match fault {
        CoverageFault::Overlap(a, b) => inconsistent(
            format!(
                "pieces {} (in {}) and {} (in {}) overlap",
                region(&distinct[a].offsets, &distinct[a].shape),
                file_of(&distinct[a]),
                region(&distinct[b].offsets, &distinct[b].shape),
                file_of(&distinct[b]),
            ),
            hints.overlap,
        ),
        CoverageFault::Gap(start, len) => inconsistent(
            format!(
                "no {} covers region {} of full shape {shape:?}",
                hints.holder,
                region(&start, &len)
            ),
            hints.missing,
        ),
        CoverageFault::Incomplete { covered, total } => inconsistent(
            format!("pieces cover {covered} of {total} elements of full shape {shape:?}"),
            hints.missing,
        ),
    })?;
    Ok(FullTensor {
        name: spec.name.to_owned(),
        dtype: spec.dtype,
        shape,
        pieces: distinct,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(shard: usize, offsets: &[u64], shape: &[u64]) -> Piece {
        Piece::new(Location::at(shard, 0), offsets, shape)
    }

    fn build(shape: Option<&[u64]>, pieces: Vec<Piece>) -> Result<FullTensor> {
        let spec = TensorSpec {
            name: "w",
            dtype: Dtype::F32,
            shape,
            hints: &SHARD_HINTS,
        };
        tensor_from_pieces(&spec, pieces, &[PathBuf::from("a"), PathBuf::from("b")])
    }

    #[test]
    fn no_pieces_and_mixed_ranks_are_errors_not_panics() {
        let err = build(None, vec![]).unwrap_err().to_string();
        assert!(
            err.contains("tensor 'w': no piece of it was saved"),
            "{err}"
        );
        // A recorded empty shape needs no piece; a non-empty one does.
        assert_eq!(build(Some(&[0, 4]), vec![]).unwrap().shape, [0, 4]);
        let err = build(Some(&[2]), vec![]).unwrap_err().to_string();
        assert!(err.contains("no shard covers region [0:2]"), "{err}");
        let mixed = vec![piece(0, &[0, 0], &[1, 4]), piece(1, &[1], &[1])];
        let err = build(None, mixed).unwrap_err().to_string();
        assert!(
            err.contains(
                "a piece in b has offsets [1] and shape [1], but the tensor has 2 dimension(s)"
            ),
            "{err}"
        );
        let lopsided = vec![Piece {
            offsets: vec![0],
            ..piece(0, &[0, 0], &[1, 4])
        }];
        assert!(build(None, lopsided).is_err());
    }

    #[test]
    fn a_recorded_shape_is_kept_and_pieces_outside_it_refused() {
        // Pieces ending short of the recorded shape leave a gap, rather
        // than shrinking the tensor to where they end.
        let short = vec![piece(0, &[0], &[2])];
        let err = build(Some(&[3]), short.clone()).unwrap_err().to_string();
        assert!(err.contains("no shard covers region [2:3]"), "{err}");
        assert_eq!(build(None, short).unwrap().shape, [2]);
        let err = build(Some(&[3]), vec![piece(1, &[2], &[2])])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("piece [2:4] (in b) lies outside the full shape [3]"),
            "{err}"
        );
        let replicated = vec![piece(0, &[0], &[3]), piece(1, &[0], &[3])];
        let tensor = build(Some(&[3]), replicated).unwrap();
        assert_eq!(tensor.pieces.len(), 1);
        assert_eq!(tensor.pieces[0].replicas[0].shard, 1);
    }
}
