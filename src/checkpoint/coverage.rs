//! The tiling check: the distinct pieces of a tensor must cover its full
//! shape exactly, with no gap and no overlap. A sweep, with no per-element
//! bookkeeping; only the error path locates the first gap.

use crate::checkpoint::Piece;
use crate::safetensors::header::element_count;

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
    use crate::checkpoint::Location;

    fn piece(offsets: &[u64], shape: &[u64]) -> Piece {
        Piece::new(Location::at(0, 0), offsets, shape)
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
