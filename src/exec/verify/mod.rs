//! Verification: reads consolidated files back and compares every tensor
//! byte with the shard pieces, and checks every input piece that carries a
//! stored CRC-32 (a DCP chunk's zip entry) against it, so that bit rot in
//! an input, which the copy faithfully reproduces, is caught too. Used by
//! `--verify` (after writing, before the files get their final names) and
//! `--verify-only` (an existing output).

mod assign;
mod targets;

use crate::checkpoint::coverage::region;
use crate::checkpoint::{FullTensor, Location, Piece};
use crate::error::{Error, Result};
use crate::exec::convert::convert;
use crate::exec::copy::{OpenInputs, read_shard_at};
use crate::plan::Plan;
use crate::safetensors::dtype::Dtype;
use crate::safetensors::header::element_count;
pub use assign::{across_hosts, targets_to_verify, verifier_of};
use rayon::prelude::*;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
pub use targets::{Target, existing_targets, planned_target, written_targets};

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
        .map(|&(target, tensor, at, dtype)| {
            let line = compare_tensor(plan, target, tensor, at, dtype)?;
            // Across nodes, the two hosts whose copies of INPUT_DIR met.
            Ok(match (line, &target.origin) {
                (Some(line), Some(origin)) => Some(format!("{line}; {origin}")),
                (line, _) => line,
            })
        })
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
    check_located(tensor)?;
    let file = File::open(&target.path).map_err(|e| Error::io("open", &target.path, e))?;
    let pieces: Vec<(&Piece, PieceRows)> = tensor
        .pieces
        .iter()
        .map(|p| (p, PieceRows::new(&tensor.shape, &p.offsets, &p.shape)))
        .filter(|(_, rows)| !rows.is_empty())
        .collect();
    let mut expected = Expected::new(plan, tensor, dtype);
    let mut crcs: Vec<Vec<Option<StoredCrc>>> = pieces
        .iter()
        .map(|(piece, _)| copies(piece).map(StoredCrc::new).collect())
        .collect();
    let mut written = Vec::new();
    let step = WINDOW_BYTES / tensor.dtype.size().max(size);
    let mut start = 0;
    while start < tensor.element_count() {
        let window = start..(start + step).min(tensor.element_count());
        written.resize(((window.end - window.start) * size) as usize, 0);
        file.read_exact_at(&mut written, at + window.start * size)
            .map_err(|e| Error::io("read back", &target.path, e))?;
        if let Some((byte, piece, location)) =
            first_difference(&pieces, &mut crcs, &mut expected, &window, &written)?
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
    // Every piece copy was read whole, in order: its CRC-32 is complete.
    for ((piece, _), crcs) in pieces.iter().zip(crcs) {
        for (location, crc) in copies(piece).zip(crcs) {
            let Some(crc) = crc else { continue };
            let chunk = region(&piece.offsets, &piece.shape);
            let file = plan.shards[location.shard].display();
            match crc.finish(element_count(&piece.shape).unwrap_or(u64::MAX)) {
                None => {
                    return Err(Error::internal(format!(
                        "'{}': chunk {chunk} in {file} was not read whole and in order by verification",
                        tensor.name
                    )));
                }
                Some(computed) if computed != crc.stored => {
                    return Ok(Some(format!(
                        "'{}': chunk {chunk} in {file} has CRC-32 {computed:08x}, not the {:08x} stored in its zip entry: \
                         the input is damaged (bit rot or a bad copy), and so is {}; copy the .distcp file again from where the checkpoint was saved",
                        tensor.name, crc.stored, target.name
                    )));
                }
                Some(_) => {}
            }
        }
    }
    Ok(None)
}

/// Fails unless every copy of every piece of `tensor` is located: a DCP
/// chunk still pointing at its archive must never be read as its bytes
/// (the run locates what each rank reads before it reads it).
pub fn check_located(tensor: &FullTensor) -> Result<()> {
    match tensor
        .pieces
        .iter()
        .flat_map(copies)
        .any(|l| !l.is_located())
    {
        true => Err(Error::internal(format!(
            "'{}': a chunk was read before it was located in its archive",
            tensor.name
        ))),
        false => Ok(()),
    }
}

/// A piece's stored copies: the piece's own location, then its replicas'.
fn copies(piece: &Piece) -> impl Iterator<Item = &Location> {
    std::iter::once(&piece.location).chain(&piece.replicas)
}

/// The CRC-32 of one stored copy of a piece, accumulated as verification
/// reads the piece's elements: window after window, each part starts where
/// the last ended, so the bytes arrive in order without a second read.
struct StoredCrc {
    stored: u32,
    hasher: crc32fast::Hasher,
    /// The next piece element expected; `None` once a read skipped some.
    next: Option<u64>,
}

impl StoredCrc {
    /// For a copy whose format stored a CRC-32 (0 means not recorded).
    fn new(location: &Location) -> Option<StoredCrc> {
        match location.crc32 {
            Some(stored) if stored != 0 => Some(StoredCrc {
                stored,
                hasher: crc32fast::Hasher::new(),
                next: Some(0),
            }),
            _ => None,
        }
    }

    /// Adds the stored bytes of piece elements `elements`.
    fn update(&mut self, elements: &Range<u64>, bytes: &[u8]) {
        if self.next == Some(elements.start) {
            self.hasher.update(bytes);
            self.next = Some(elements.end);
        } else {
            self.next = None;
        }
    }

    /// The CRC-32 of the whole piece of `elements` elements, if every one
    /// was added in order.
    fn finish(&self, elements: u64) -> Option<u32> {
        (self.next == Some(elements)).then(|| self.hasher.clone().finalize())
    }
}

/// Piece copies `--verify` checks against a stored CRC-32, and those that
/// carry none (a DCP writer with CRC-32 off), over the tensors of
/// `targets` (this rank's share: the ranks' counts add up to the job's);
/// empty pieces hold nothing to check and count in neither.
pub fn stored_crc_counts(plan: &Plan, targets: &[Target]) -> (usize, usize) {
    let mut counts = (0, 0);
    let tensors: std::collections::BTreeSet<usize> = targets
        .iter()
        .flat_map(|target| target.tensors.iter().map(|&(t, _, _)| t))
        .collect();
    for tensor in tensors.into_iter().filter_map(|t| plan.tensors.get(t)) {
        for piece in &tensor.pieces {
            if element_count(&piece.shape) == Some(0) {
                continue;
            }
            for location in copies(piece) {
                match location.crc32 {
                    Some(0) => counts.1 += 1,
                    Some(_) => counts.0 += 1,
                    None => {}
                }
            }
        }
    }
    counts
}

/// What the verification summary adds about stored CRC-32s (`counts`, as
/// [`stored_crc_counts`] gives them, summed over the ranks): nothing for
/// inputs that carry none (HF shards).
pub fn stored_crc_summary(counts: (usize, usize)) -> String {
    match counts {
        (0, 0) => String::new(),
        (checked, 0) => format!("; {checked} DCP chunk(s) match the CRC-32 stored with them"),
        (checked, skipped) => format!(
            "; {checked} DCP chunk(s) match the CRC-32 stored with them, {skipped} carry none (saved with CRC-32 off) and were not checked against one"
        ),
    }
}

/// The first byte of `written` (the tensor's elements `window`) that
/// differs from what a piece or one of its replicas holds, with that piece
/// and copy. Adds each copy's stored bytes to its CRC-32 (`crcs`, by piece
/// and copy).
fn first_difference<'p>(
    pieces: &[(&'p Piece, PieceRows)],
    crcs: &mut [Vec<Option<StoredCrc>>],
    expected: &mut Expected,
    window: &Range<u64>,
    written: &[u8],
) -> Result<Option<(u64, &'p Piece, Location)>> {
    let size = expected.dtype.size();
    let mut first: Option<(u64, &Piece, Location)> = None;
    for ((piece, rows), crcs) in pieces.iter().zip(crcs) {
        let Some(part) = rows.part_in(window) else {
            continue;
        };
        for (location, crc) in copies(piece).zip(crcs.iter_mut()) {
            let ours = expected.read(location, &part.elements, crc.as_mut())?;
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
    inputs: OpenInputs<'a>,
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
            inputs: OpenInputs::new(&plan.shards),
            source: Vec::new(),
            converted: Vec::new(),
        }
    }

    /// Elements `elements` of the piece copy at `location`, in the written
    /// dtype, their stored bytes added to `crc` if given. Buffers are
    /// reused, so memory stays within a window.
    fn read(
        &mut self,
        location: &Location,
        elements: &Range<u64>,
        crc: Option<&mut StoredCrc>,
    ) -> Result<&[u8]> {
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
        if let Some(crc) = crc {
            crc.update(elements, &self.source);
        }
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
