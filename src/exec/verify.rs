//! Verification: reads consolidated files back and compares every tensor
//! byte with the shard pieces. Used by `--verify` (after writing, before the
//! files get their final names) and `--verify-only` (an existing output).

use crate::checkpoint::hf_shards::sharding::{FullTensor, Location, Piece, region};
use crate::error::{Error, Result};
use crate::exec::convert::{can_convert, convert};
use crate::exec::copy::{ShardFiles, read_shard_at};
use crate::plan::Plan;
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::{JsonError, parse_unique_json, read_header};
use crate::safetensors::naming::INDEX_NAME;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One output file to check: where each of its tensors' bytes start.
#[derive(Clone, Debug)]
pub struct Target {
    /// The output file (temporary or final name).
    pub path: PathBuf,
    /// Name shown in messages.
    pub name: String,
    /// (index into `plan.tensors`, absolute offset of its first byte, the
    /// dtype it was written in).
    pub tensors: Vec<(usize, u64, Dtype)>,
}

/// The files `rank` just wrote, at their temporary paths.
pub fn written_targets(plan: &Plan, rank: usize, temp_paths: &[PathBuf]) -> Vec<Target> {
    plan.files_of(rank)
        .into_iter()
        .zip(temp_paths)
        .map(|(f, path)| {
            let file = &plan.files[f];
            Target {
                path: path.clone(),
                name: file.name.clone(),
                tensors: file
                    .entries
                    .iter()
                    .map(|e| (e.tensor, file.data_start() + e.bytes.start, e.dtype))
                    .collect(),
            }
        })
        .collect()
}

/// Checks an existing output folder's index and headers against the plan,
/// and returns the files for `rank` to compare byte by byte (file `i` of the
/// index, in sorted order, goes to rank `i % size`) with every structural
/// problem found.
pub fn existing_targets(
    plan: &Plan,
    out_dir: &Path,
    rank: usize,
    size: usize,
) -> Result<(Vec<Target>, Vec<String>)> {
    let index_path = out_dir.join(INDEX_NAME);
    let text = std::fs::read(&index_path).map_err(|e| Error::io("read", &index_path, e))?;
    let bad_index = |reason: String| Error::Mapping {
        path: index_path.clone(),
        reason,
        hint: "the output is incomplete or not from a consolidation; rerun the consolidation with --overwrite",
    };
    // A tensor listed twice in the index is as wrong as in a mapping.
    let index = std::str::from_utf8(&text)
        .map_err(|e| bad_index(format!("not valid UTF-8: {e}")))
        .and_then(|text| {
            parse_unique_json(text).map_err(|e| match e {
                JsonError::Syntax(e) => bad_index(format!("not valid JSON: {e}")),
                JsonError::Duplicate(dup) => bad_index(dup.to_string()),
            })
        })?;
    let weight_map = index
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| bad_index("has no \"weight_map\" object".into()))?;
    let by_name: BTreeMap<&str, usize> = plan
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut problems = Vec::new();
    let mut files: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, file) in weight_map {
        match file.as_str() {
            Some(file) => files.entry(file).or_default().push(name),
            None => problems.push(format!(
                "{INDEX_NAME}: '{name}' maps to {file}, not a file name"
            )),
        }
    }
    // Index-wide checks once, on rank 0: every shard tensor listed, and
    // total_size equal to the tensor bytes the output files' headers hold.
    if rank == 0 {
        for name in by_name.keys() {
            if !weight_map.contains_key(*name) {
                problems.push(format!("'{name}' is in the shards but not in {INDEX_NAME}"));
            }
        }
        let mut held = 0u64;
        for file in files.keys() {
            if let Ok(header) = read_header(&out_dir.join(file)) {
                held += header.tensors.iter().map(|t| t.end - t.begin).sum::<u64>();
            }
        }
        match index
            .pointer("/metadata/total_size")
            .and_then(|v| v.as_u64())
        {
            Some(total) if total == held => {}
            other => problems.push(format!(
                "{INDEX_NAME}: total_size is {other:?}, but its files hold {held} bytes of tensors"
            )),
        }
    }
    let mut targets = Vec::new();
    for (i, (file, names)) in files.iter().enumerate() {
        if i % size != rank {
            continue;
        }
        let path = out_dir.join(file);
        let header = match read_header(&path) {
            Ok(header) => header,
            Err(err) => {
                problems.push(
                    err.to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
                continue;
            }
        };
        let listed: BTreeSet<&str> = names.iter().copied().collect();
        let mut tensors = Vec::new();
        for entry in &header.tensors {
            if !listed.contains(entry.name.as_str()) {
                problems.push(format!(
                    "{file}: holds '{}', which {INDEX_NAME} does not map to it",
                    entry.name
                ));
                continue;
            }
            let Some(&t) = by_name.get(entry.name.as_str()) else {
                problems.push(format!("{file}: '{}' is not in the shards", entry.name));
                continue;
            };
            let tensor = &plan.tensors[t];
            let dtype_ok = can_convert(tensor.dtype, entry.dtype);
            if !dtype_ok || entry.shape != tensor.shape {
                problems.push(format!(
                    "{file}: '{}' is {} {:?}, the shards say {} {:?}",
                    entry.name, entry.dtype, entry.shape, tensor.dtype, tensor.shape
                ));
                continue;
            }
            tensors.push((t, header.data_start + entry.begin, entry.dtype));
        }
        for name in listed {
            if !header.tensors.iter().any(|e| e.name == name) {
                problems.push(format!(
                    "{file}: '{name}' is listed in {INDEX_NAME} but missing from the file"
                ));
            }
        }
        targets.push(Target {
            path,
            name: file.to_string(),
            tensors,
        });
    }
    Ok((targets, problems))
}

/// Compares every tensor byte of `targets` with the shards, in parallel.
/// Returns one line per mismatching tensor; I/O failures are errors.
pub fn compare(plan: &Plan, targets: &[Target]) -> Result<Vec<String>> {
    let jobs: Vec<(&Target, usize, u64, Dtype)> = targets
        .iter()
        .flat_map(|t| {
            t.tensors
                .iter()
                .map(move |&(tensor, at, dtype)| (t, tensor, at, dtype))
        })
        .collect();
    let results: Vec<Option<String>> = jobs
        .par_iter()
        .map(|&(target, tensor, at, dtype)| compare_tensor(plan, target, tensor, at, dtype))
        .collect::<Result<_>>()?;
    Ok(results.into_iter().flatten().collect())
}

/// Output elements read back at a time: the output, the piece bytes and
/// their conversion each stay within 8 MiB.
const WINDOW_BYTES: u64 = 8 << 20;

/// Compares one written tensor with its pieces. The output is read back
/// once, window by window; inside a window, every piece (and every replica
/// of it) that reaches into the window is read from its shard with one
/// positioned read and compared with the output, row by row.
///
/// The geometry here ([`PieceRows`]) is written independently of the copy's
/// (`runs`, `copy`): a mistake in the copy's arithmetic writes bytes that
/// this check does not reproduce.
fn compare_tensor(
    plan: &Plan,
    target: &Target,
    t: usize,
    at: u64,
    dtype: Dtype,
) -> Result<Option<String>> {
    let tensor = &plan.tensors[t];
    let size = dtype.size();
    let file = File::open(&target.path).map_err(|e| Error::io("open", &target.path, e))?;
    let pieces: Vec<(&Piece, PieceRows)> = tensor
        .pieces
        .iter()
        .map(|p| (p, PieceRows::new(&tensor.shape, &p.offsets, &p.shape)))
        .filter(|(_, rows)| !rows.is_empty())
        .collect();
    let mut expected = Expected::new(plan, tensor, dtype);
    let mut written = Vec::new();
    let step = WINDOW_BYTES / tensor.dtype.size().max(size);
    let mut start = 0;
    while start < tensor.element_count() {
        let window = start..(start + step).min(tensor.element_count());
        written.resize(((window.end - window.start) * size) as usize, 0);
        file.read_exact_at(&mut written, at + window.start * size)
            .map_err(|e| Error::io("read back", &target.path, e))?;
        if let Some((byte, piece, location)) =
            first_difference(&pieces, &mut expected, &window, &written)?
        {
            return Ok(Some(format!(
                "'{}' in {}: first difference at byte {} of the tensor (piece {} from {})",
                tensor.name,
                target.name,
                window.start * size + byte,
                region(&piece.offsets, &piece.shape),
                plan.shards[location.shard].display()
            )));
        }
        start = window.end;
    }
    Ok(None)
}

/// The first byte of `written` (the tensor's elements `window`) that
/// differs from what a piece or one of its replicas holds, with that piece
/// and copy.
fn first_difference<'p>(
    pieces: &[(&'p Piece, PieceRows)],
    expected: &mut Expected,
    window: &Range<u64>,
    written: &[u8],
) -> Result<Option<(u64, &'p Piece, Location)>> {
    let size = expected.dtype.size();
    let mut first: Option<(u64, &Piece, Location)> = None;
    for (piece, rows) in pieces {
        let Some(part) = rows.part_in(window) else {
            continue;
        };
        for location in std::iter::once(&piece.location).chain(&piece.replicas) {
            let ours = expected.read(location, &part.elements)?;
            let found = rows.first_difference(&part, window, ours, written, size);
            if let Some(byte) = found.filter(|&b| first.is_none_or(|(f, ..)| b < f)) {
                first = Some((byte, piece, *location));
            }
        }
    }
    Ok(first)
}

/// Reads piece elements from the shards as the output should hold them.
struct Expected<'a> {
    tensor: &'a FullTensor,
    /// The dtype the tensor was written in.
    dtype: Dtype,
    inputs: ShardFiles<'a>,
    /// Piece bytes as stored.
    source: Vec<u8>,
    /// Piece bytes converted to `dtype`, when it differs.
    converted: Vec<u8>,
}

impl<'a> Expected<'a> {
    fn new(plan: &'a Plan, tensor: &'a FullTensor, dtype: Dtype) -> Self {
        Expected {
            tensor,
            dtype,
            inputs: ShardFiles::new(&plan.shards),
            source: Vec::new(),
            converted: Vec::new(),
        }
    }

    /// Elements `elements` of the piece copy at `location`, in the written
    /// dtype. Buffers are reused, so memory stays within a window.
    fn read(&mut self, location: &Location, elements: &Range<u64>) -> Result<&[u8]> {
        let from = self.tensor.dtype;
        let count = (elements.end - elements.start) as usize;
        self.source.resize(count * from.size() as usize, 0);
        let offset = location.offset + elements.start * from.size();
        let input = self.inputs.get(location.shard)?;
        read_shard_at(input, &mut self.source, offset).map_err(|e| Error::Copy {
            tensor: self.tensor.name.clone(),
            action: "read",
            path: self.inputs.path(location.shard).to_owned(),
            source: e,
        })?;
        if from == self.dtype {
            return Ok(&self.source);
        }
        self.converted.resize(count * self.dtype.size() as usize, 0);
        convert(from, self.dtype, &self.source, &mut self.converted);
        Ok(&self.converted)
    }
}

/// Where a piece's elements sit in its full tensor, row by row. A row is
/// the piece's extent along the last dimension: contiguous in the piece's
/// bytes and in the tensor's. Row `r` starts at tensor element
/// `sum over d of (offsets[d] + index[d]) * stride[d]`, where `index` is `r`
/// written in the piece's shape (last dimension 0) and `stride` holds the
/// full tensor's row-major element strides.
#[derive(Debug)]
struct PieceRows {
    /// Piece extent per dimension (dimensions of size 1 in the full tensor
    /// dropped: they do not move any element).
    shape: Vec<u64>,
    /// Piece start per kept dimension.
    offsets: Vec<u64>,
    /// Full-tensor element stride per kept dimension.
    strides: Vec<u64>,
}

/// The elements of a piece that fall into a window of the tensor.
#[derive(Debug)]
struct Part {
    /// Rows of the piece touching the window.
    rows: Range<u64>,
    /// The piece's elements inside the window, a contiguous range of its
    /// own (row-major) elements.
    elements: Range<u64>,
}

impl PieceRows {
    fn new(full: &[u64], offsets: &[u64], shape: &[u64]) -> PieceRows {
        let mut kept = PieceRows {
            shape: Vec::new(),
            offsets: Vec::new(),
            strides: Vec::new(),
        };
        let mut stride = 1;
        for d in (0..full.len()).rev() {
            if full[d] != 1 || shape[d] != 1 {
                kept.shape.insert(0, shape[d]);
                kept.offsets.insert(0, offsets[d]);
                kept.strides.insert(0, stride);
            }
            stride *= full[d];
        }
        kept
    }

    fn is_empty(&self) -> bool {
        self.shape.contains(&0)
    }

    /// Elements per row (a 0-D piece is one row of one element).
    fn row_len(&self) -> u64 {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows.
    fn row_count(&self) -> u64 {
        let outer = self.shape.len().saturating_sub(1);
        self.shape[..outer].iter().product()
    }

    /// Tensor element index of the first element of row `row`.
    fn row_start(&self, row: u64) -> u64 {
        let Some(last) = self.shape.len().checked_sub(1) else {
            return 0;
        };
        let mut rest = row;
        let mut at = self.offsets[last] * self.strides[last];
        for d in (0..last).rev() {
            at += (self.offsets[d] + rest % self.shape[d]) * self.strides[d];
            rest /= self.shape[d];
        }
        at
    }

    /// The first row for which `before(row)` is false; rows start in
    /// increasing order, so `before` must be true for a prefix of them.
    fn first_row_not(&self, before: impl Fn(u64) -> bool) -> u64 {
        let (mut lo, mut hi) = (0, self.row_count());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if before(mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The piece's rows and elements inside the tensor elements `window`.
    fn part_in(&self, window: &Range<u64>) -> Option<Part> {
        let len = self.row_len();
        let first = self.first_row_not(|r| self.row_start(r) + len <= window.start);
        let end = self.first_row_not(|r| self.row_start(r) < window.end);
        if first >= end {
            return None;
        }
        let skip = window.start.saturating_sub(self.row_start(first));
        let last_start = self.row_start(end - 1);
        let keep = (window.end - last_start).min(len);
        Some(Part {
            rows: first..end,
            elements: first * len + skip..(end - 1) * len + keep,
        })
    }

    /// Compares `expected` (the piece's elements `part.elements`, `size`
    /// bytes each) with `written` (the tensor's elements `window`). Rows
    /// that follow each other in the tensor too are compared as one slice.
    /// Returns the first differing byte, relative to the window.
    fn first_difference(
        &self,
        part: &Part,
        window: &Range<u64>,
        expected: &[u8],
        written: &[u8],
        size: u64,
    ) -> Option<u64> {
        let len = self.row_len();
        // The pending slice: window element, piece element, elements.
        let mut pending: Option<(u64, u64, u64)> = None;
        let mut found = None;
        let mut compare = |(at, from, count): (u64, u64, u64)| {
            let theirs = &written[(at * size) as usize..((at + count) * size) as usize];
            let from = from - part.elements.start;
            let ours = &expected[(from * size) as usize..((from + count) * size) as usize];
            if found.is_none() && ours != theirs {
                let i = ours.iter().zip(theirs).position(|(a, b)| a != b);
                found = i.map(|i| at * size + i as u64);
            }
        };
        for row in part.rows.clone() {
            let start = self.row_start(row);
            let (lo, hi) = (start.max(window.start), (start + len).min(window.end));
            let piece_element = row * len + (lo - start);
            let at = lo - window.start;
            pending = match pending {
                Some((p_at, p_from, p_count))
                    if p_at + p_count == at && p_from + p_count == piece_element =>
                {
                    Some((p_at, p_from, p_count + hi - lo))
                }
                Some(done) => {
                    compare(done);
                    Some((at, piece_element, hi - lo))
                }
                None => Some((at, piece_element, hi - lo)),
            };
        }
        if let Some(done) = pending {
            compare(done);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The tensor element of each piece element, placed one by one.
    fn placement(full: &[u64], offsets: &[u64], shape: &[u64]) -> Vec<u64> {
        let count: u64 = shape.iter().product();
        (0..count)
            .map(|linear| {
                let mut rest = linear;
                let mut index = vec![0; shape.len()];
                for d in (0..shape.len()).rev() {
                    index[d] = rest % shape[d];
                    rest /= shape[d];
                }
                (0..full.len()).fold(0, |at, d| at * full[d] + offsets[d] + index[d])
            })
            .collect()
    }

    /// Byte `k` of tensor element `e`.
    fn byte(e: u64, k: u64) -> u8 {
        (e * 7 + k * 3 + 1) as u8
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// For a random piece (0-D to 5-D, with size-1 dimensions) and window,
        /// `part_in` finds exactly the piece elements inside the window, equal
        /// bytes compare equal, and a flipped byte is found where it is when
        /// it belongs to the piece, and not at all when it does not.
        #[test]
        fn rows_find_exactly_the_flipped_byte(
            dims in prop::collection::vec((1u64..=5, 0u64..5, 0u64..5), 0..=5),
            window_at in 0u64..400,
            window_len in 1u64..60,
            flip in 0u64..10_000,
            size in prop::sample::select(vec![1u64, 2, 4]),
        ) {
            let full: Vec<u64> = dims.iter().map(|d| d.0).collect();
            let offsets: Vec<u64> = dims.iter().map(|d| d.1 % d.0).collect();
            let shape: Vec<u64> =
                dims.iter().zip(&offsets).map(|(d, o)| 1 + d.2 % (d.0 - o)).collect();
            let total: u64 = full.iter().product();
            let start = window_at % total;
            let window = start..(start + window_len).min(total);
            let place = placement(&full, &offsets, &shape);
            let inside: Vec<u64> =
                (0..place.len() as u64).filter(|&p| window.contains(&place[p as usize])).collect();
            let rows = PieceRows::new(&full, &offsets, &shape);
            let Some(part) = rows.part_in(&window) else {
                prop_assert!(inside.is_empty());
                return Ok(());
            };
            prop_assert_eq!(part.elements.clone(), inside[0]..inside[inside.len() - 1] + 1);
            prop_assert_eq!(inside.len() as u64, part.elements.end - part.elements.start);
            let bytes = |elements: &mut dyn Iterator<Item = u64>| -> Vec<u8> {
                elements.flat_map(|e| (0..size).map(move |k| byte(e, k))).collect()
            };
            let ours = bytes(&mut part.elements.clone().map(|p| place[p as usize]));
            let mut written = bytes(&mut window.clone());
            prop_assert_eq!(rows.first_difference(&part, &window, &ours, &written, size), None);

            let element = place[inside[(flip % inside.len() as u64) as usize] as usize];
            let at = (element - window.start) * size + flip % size;
            written[at as usize] ^= 0x40;
            prop_assert_eq!(rows.first_difference(&part, &window, &ours, &written, size), Some(at));
            written[at as usize] ^= 0x40;

            let others: Vec<u64> = window.clone().filter(|e| !place.contains(e)).collect();
            if !others.is_empty() {
                let element = others[(flip % others.len() as u64) as usize];
                written[((element - window.start) * size) as usize] ^= 0x40;
                prop_assert_eq!(rows.first_difference(&part, &window, &ours, &written, size), None);
            }
        }
    }

    #[test]
    fn size_one_dimensions_are_dropped_and_empty_pieces_seen() {
        let conv = PieceRows::new(&[8, 4, 1, 1], &[2, 0, 0, 0], &[3, 4, 1, 1]);
        assert_eq!((conv.row_count(), conv.row_len()), (3, 4));
        assert_eq!((conv.row_start(0), conv.row_start(2)), (8, 16));
        let scalar = PieceRows::new(&[], &[], &[]);
        assert_eq!(
            (scalar.row_count(), scalar.row_len(), scalar.row_start(0)),
            (1, 1, 0)
        );
        assert!(PieceRows::new(&[0, 4], &[0, 0], &[0, 4]).is_empty());
    }
}
