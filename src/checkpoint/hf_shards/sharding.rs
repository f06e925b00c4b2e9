//! PyTorch Distributed Checkpoint sharding: where each piece of a tensor sits
//! in the full tensor, and the check that the pieces tile it exactly.

use crate::error::{Error, Result};
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::{Header, byte_len, element_count};
use crate::safetensors::json::{JsonError, parse_unique_json};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// The metadata key holding the JSON-encoded sharding information.
pub const SHARDING_INFO_KEY: &str = "DCP_SHARDING_INFO";

/// One input shard file and its parsed header.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// Path of the shard file.
    pub path: PathBuf,
    /// Its validated header.
    pub header: Header,
}

/// Where a piece's bytes live: an input file and an absolute byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Index into the list of shards.
    pub shard: usize,
    /// Absolute offset of the piece's first byte in that file.
    pub offset: u64,
}

/// One saved piece of a tensor: a dense row-major block of the full tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// Decodes a shard's `DCP_SHARDING_INFO` into per-tensor piece offsets.
///
/// Returns `Ok(None)` when the file carries no DCP metadata at all.
pub fn sharding_info(shard: &Shard) -> Result<Option<HashMap<String, Vec<u64>>>> {
    let Some(text) = shard.header.metadata.get(SHARDING_INFO_KEY) else {
        return Ok(None);
    };
    let bad = |reason: String| Error::BadFile {
        path: shard.path.clone(),
        reason: format!("{SHARDING_INFO_KEY}: {reason}"),
    };
    let value = parse_unique_json(text).map_err(|e| match e {
        JsonError::Syntax(e) => bad(format!("not valid JSON: {e}")),
        JsonError::Duplicate(dup) => bad(dup.to_string()),
    })?;
    let Value::Object(entries) = value else {
        return Err(bad("not a JSON object".into()));
    };
    let mut offsets = HashMap::with_capacity(entries.len());
    for (name, entry) in entries {
        let saved = entry
            .get("saved_offsets")
            .and_then(Value::as_array)
            .and_then(|list| list.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| {
                bad(format!(
                    "entry '{name}' has no list of non-negative \"saved_offsets\""
                ))
            })?;
        offsets.insert(name, saved);
    }
    for tensor in &shard.header.tensors {
        let saved = offsets.get(&tensor.name).ok_or_else(|| Error::BadTensor {
            path: shard.path.clone(),
            tensor: tensor.name.clone(),
            reason: format!("has no entry in {SHARDING_INFO_KEY}"),
            hint: "the shard's metadata is incomplete; re-save the checkpoint",
        })?;
        if saved.len() != tensor.shape.len() {
            return Err(Error::BadTensor {
                path: shard.path.clone(),
                tensor: tensor.name.clone(),
                reason: format!(
                    "saved_offsets {saved:?} has {} dimensions but the shape {:?} has {}",
                    saved.len(),
                    tensor.shape,
                    tensor.shape.len()
                ),
                hint: "the shard's metadata is inconsistent; re-save the checkpoint",
            });
        }
    }
    if offsets.len() != shard.header.tensors.len() {
        let mut absent: Vec<&String> = offsets
            .keys()
            .filter(|name| !shard.header.tensors.iter().any(|t| &t.name == *name))
            .collect();
        absent.sort();
        return Err(bad(format!(
            "names tensor(s) absent from the file: {absent:?}"
        )));
    }
    Ok(Some(offsets))
}

/// Groups the pieces of every tensor across all shards, checks that they
/// agree and tile their full tensor exactly. Tensors come back sorted by name.
pub fn index_pieces(
    shards: &[Shard],
    infos: &[HashMap<String, Vec<u64>>],
) -> Result<Vec<FullTensor>> {
    // name -> (dtype, first file that defined it, pieces)
    let mut grouped: BTreeMap<&str, (Dtype, usize, Vec<Piece>)> = BTreeMap::new();
    for (shard_index, (shard, info)) in shards.iter().zip(infos).enumerate() {
        for tensor in &shard.header.tensors {
            let location = Location {
                shard: shard_index,
                offset: shard.header.data_start + tensor.begin,
            };
            let piece = Piece::new(location, &info[&tensor.name], &tensor.shape);
            let (dtype, first, pieces) =
                grouped
                    .entry(&tensor.name)
                    .or_insert((tensor.dtype, shard_index, Vec::new()));
            let disagree = |what: String| Error::BadTensor {
                path: shard.path.clone(),
                tensor: tensor.name.clone(),
                reason: format!("{what} in {}", shards[*first].path.display()),
                hint: "the shards come from different checkpoints; use one checkpoint's files only",
            };
            if *dtype != tensor.dtype {
                return Err(disagree(format!(
                    "dtype {} differs from {dtype}",
                    tensor.dtype
                )));
            }
            if pieces[..]
                .first()
                .is_some_and(|p: &Piece| p.shape.len() != tensor.shape.len())
            {
                return Err(disagree(format!(
                    "has {} dimensions, unlike its piece",
                    tensor.shape.len()
                )));
            }
            pieces.push(piece);
        }
    }
    grouped
        .into_iter()
        .map(|(name, (dtype, _, pieces))| assemble(name, dtype, pieces, shards))
        .collect()
}

fn assemble(name: &str, dtype: Dtype, pieces: Vec<Piece>, shards: &[Shard]) -> Result<FullTensor> {
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
                            shards[piece.location.shard].path.display()
                        ),
                        "the shard's metadata is corrupt; re-save the checkpoint",
                    )
                })?;
            *full = (*full).max(end);
        }
    }
    // FullTensor::byte_len relies on this check; 8-byte elements cover any
    // --dtype target too.
    if byte_len(&shape, crate::safetensors::dtype::Dtype::F64).is_none() {
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
                shards[distinct[a].location.shard].path.display(),
                region(&distinct[b].offsets, &distinct[b].shape),
                shards[distinct[b].location.shard].path.display(),
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

/// Formats a block as `[start:end, ...]` in numpy slice notation.
pub fn region(start: &[u64], len: &[u64]) -> String {
    let dims: Vec<String> = start
        .iter()
        .zip(len)
        .map(|(s, l)| format!("{s}:{}", s + l))
        .collect();
    format!("[{}]", dims.join(", "))
}

/// Why distinct pieces do not tile a full shape.
#[derive(Debug, PartialEq, Eq)]
pub enum CoverageFault {
    /// Pieces `a` and `b` (indices) share at least one element.
    Overlap(usize, usize),
    /// The first uncovered block in row-major order: start and length per dim.
    Gap(Vec<u64>, Vec<u64>),
    /// Elements are uncovered, but the gap is too fragmented to locate cheaply.
    Incomplete {
        /// Elements covered by pieces.
        covered: u64,
        /// Elements in the full shape.
        total: u64,
    },
}

/// Checks that distinct pieces (blocks inside `shape`) tile `shape` exactly.
///
/// No per-element bookkeeping: disjointness is a sweep over the dimension
/// with the most distinct starts, and completeness then follows from the
/// element counts adding up. Only the error path looks for the first gap.
pub fn check_coverage(shape: &[u64], pieces: &[Piece]) -> Result<(), CoverageFault> {
    let total = element_count(shape).unwrap_or(u64::MAX);
    let non_empty: Vec<usize> = (0..pieces.len())
        .filter(|&i| element_count(&pieces[i].shape) != Some(0))
        .collect();
    if let Some((a, b)) = find_overlap(shape.len(), pieces, &non_empty) {
        return Err(CoverageFault::Overlap(a, b));
    }
    // Disjoint pieces inside the shape: they tile it iff the counts add up.
    // The sum cannot exceed `total`, so it cannot overflow.
    let covered: u64 = non_empty
        .iter()
        .map(|&i| element_count(&pieces[i].shape).unwrap_or(0))
        .sum();
    if covered == total {
        return Ok(());
    }
    Err(first_gap(shape, pieces, &non_empty)
        .unwrap_or(CoverageFault::Incomplete { covered, total }))
}

fn find_overlap(ndim: usize, pieces: &[Piece], candidates: &[usize]) -> Option<(usize, usize)> {
    if ndim == 0 {
        // Distinct 0-d pieces do not exist; dedup made them one.
        return None;
    }
    let distinct_starts = |d: usize| {
        let mut starts: Vec<u64> = candidates.iter().map(|&i| pieces[i].offsets[d]).collect();
        starts.sort_unstable();
        starts.dedup();
        starts.len()
    };
    let sweep = (0..ndim).max_by_key(|&d| distinct_starts(d)).unwrap_or(0);
    let mut order = candidates.to_vec();
    order.sort_unstable_by_key(|&i| pieces[i].offsets[sweep]);
    for (k, &a) in order.iter().enumerate() {
        let end_a = pieces[a].offsets[sweep] + pieces[a].shape[sweep];
        for &b in &order[k + 1..] {
            if pieces[b].offsets[sweep] >= end_a {
                break;
            }
            let overlaps = (0..ndim).all(|d| {
                let (pa, pb) = (&pieces[a], &pieces[b]);
                pa.offsets[d] < pb.offsets[d] + pb.shape[d]
                    && pb.offsets[d] < pa.offsets[d] + pa.shape[d]
            });
            if overlaps {
                return Some((a.min(b), a.max(b)));
            }
        }
    }
    None
}

/// Finds the first uncovered grid cell in row-major order. The grid is cut at
/// every piece boundary, so each cell is wholly inside or outside each piece.
fn first_gap(shape: &[u64], pieces: &[Piece], candidates: &[usize]) -> Option<CoverageFault> {
    const MAX_PROBES: u64 = 50_000_000;
    let ndim = shape.len();
    let cuts: Vec<Vec<u64>> = (0..ndim)
        .map(|d| {
            let mut cuts = vec![0, shape[d]];
            for &i in candidates {
                cuts.push(pieces[i].offsets[d]);
                cuts.push(pieces[i].offsets[d] + pieces[i].shape[d]);
            }
            cuts.sort_unstable();
            cuts.dedup();
            cuts
        })
        .collect();
    let mut cell = vec![0usize; ndim];
    let mut probes = 0u64;
    loop {
        let low: Vec<u64> = (0..ndim).map(|d| cuts[d][cell[d]]).collect();
        let covered = candidates.iter().any(|&i| {
            (0..ndim).all(|d| {
                pieces[i].offsets[d] <= low[d] && low[d] < pieces[i].offsets[d] + pieces[i].shape[d]
            })
        });
        probes += candidates.len() as u64 + 1;
        if !covered {
            let len = (0..ndim).map(|d| cuts[d][cell[d] + 1] - low[d]).collect();
            return Some(CoverageFault::Gap(low, len));
        }
        if probes > MAX_PROBES {
            return None;
        }
        // Advance the row-major cell counter.
        let mut d = ndim;
        loop {
            if d == 0 {
                return None;
            }
            d -= 1;
            cell[d] += 1;
            if cell[d] + 1 < cuts[d].len() {
                break;
            }
            cell[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(offsets: &[u64], shape: &[u64]) -> Piece {
        Piece::new(
            Location {
                shard: 0,
                offset: 0,
            },
            offsets,
            shape,
        )
    }

    fn shard_with_info(info: &str) -> Shard {
        let json = r#"{"__metadata__":{"DCP_SHARDING_INFO":"@@"},"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#
            .replace("@@", &info.replace('"', "\\\""));
        let header =
            crate::safetensors::header::parse_header(json.as_bytes(), 8 + json.len() as u64 + 2)
                .unwrap();
        Shard {
            path: PathBuf::from("shard-00001-model-00001-of-00001.safetensors"),
            header,
        }
    }

    #[test]
    fn sharding_info_naming_a_tensor_twice_is_refused() {
        let good = shard_with_info(r#"{"w":{"saved_offsets":[4]}}"#);
        assert_eq!(sharding_info(&good).unwrap().unwrap()["w"], [4]);
        // serde_json alone keeps the last entry: the piece would silently move.
        let twice = shard_with_info(r#"{"w":{"saved_offsets":[0]},"w":{"saved_offsets":[4]}}"#);
        let err = sharding_info(&twice).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "shard-00001-model-00001-of-00001.safetensors: invalid safetensors file: DCP_SHARDING_INFO: the key 'w' appears twice\n"
            ),
            "{err}"
        );
        let field = shard_with_info(r#"{"w":{"saved_offsets":[0],"saved_offsets":[4]}}"#);
        let err = sharding_info(&field).unwrap_err().to_string();
        assert!(
            err.contains("the key 'saved_offsets' appears twice inside 'w'"),
            "{err}"
        );
    }

    #[test]
    fn row_column_and_mesh_tilings_pass() {
        let rows = [
            piece(&[0, 0], &[3, 4]),
            piece(&[3, 0], &[2, 4]),
            piece(&[5, 0], &[0, 4]),
        ];
        assert_eq!(check_coverage(&[5, 4], &rows), Ok(()));
        let cols = [piece(&[0, 0], &[5, 3]), piece(&[0, 3], &[5, 1])];
        assert_eq!(check_coverage(&[5, 4], &cols), Ok(()));
        let mesh = [
            piece(&[0, 0], &[2, 2]),
            piece(&[0, 2], &[2, 2]),
            piece(&[2, 0], &[2, 2]),
            piece(&[2, 2], &[2, 2]),
        ];
        assert_eq!(check_coverage(&[4, 4], &mesh), Ok(()));
        assert_eq!(check_coverage(&[], &[piece(&[], &[])]), Ok(()));
    }

    #[test]
    fn a_missing_piece_is_reported_as_the_first_gap() {
        let mesh = [
            piece(&[0, 0], &[2, 2]),
            piece(&[0, 2], &[2, 2]),
            piece(&[2, 2], &[2, 2]),
        ];
        assert_eq!(
            check_coverage(&[4, 4], &mesh),
            Err(CoverageFault::Gap(vec![2, 0], vec![2, 2]))
        );
        let rows = [piece(&[0, 0], &[3, 4]), piece(&[5, 0], &[2, 4])];
        assert_eq!(
            check_coverage(&[7, 4], &rows),
            Err(CoverageFault::Gap(vec![3, 0], vec![2, 4]))
        );
    }

    #[test]
    fn overlaps_are_reported() {
        let pieces = [piece(&[0, 0], &[3, 4]), piece(&[2, 0], &[3, 4])];
        assert_eq!(
            check_coverage(&[5, 4], &pieces),
            Err(CoverageFault::Overlap(0, 1))
        );
        let mesh = [
            piece(&[0, 0], &[2, 3]),
            piece(&[1, 2], &[1, 2]),
            piece(&[1, 0], &[1, 2]),
        ];
        assert!(matches!(
            check_coverage(&[2, 4], &mesh),
            Err(CoverageFault::Overlap(_, _))
        ));
    }

    #[test]
    fn ten_thousand_piece_tilings_pass() {
        // A 100 x 100 mesh and 10,000 column pieces (timed in the benchmark).
        let mut pieces = Vec::new();
        for i in 0..100 {
            for j in 0..100 {
                pieces.push(piece(&[i * 3, j * 5], &[3, 5]));
            }
        }
        assert_eq!(check_coverage(&[300, 500], &pieces), Ok(()));
        let columns: Vec<Piece> = (0..10_000).map(|j| piece(&[0, j * 2], &[64, 2])).collect();
        assert_eq!(check_coverage(&[64, 20_000], &columns), Ok(()));
    }
}
