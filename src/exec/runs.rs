//! Where a piece's bytes land in its full tensor.
//!
//! A piece is a dense row-major block of the full row-major tensor. Its bytes
//! split into equal *runs* that are contiguous in both: trailing dimensions
//! that the piece spans completely merge into one run, so a row-sharded piece
//! is a single run and a column-sharded one is one run per row. Everything
//! here is pure arithmetic over byte offsets, so it is tested exhaustively
//! against an element-by-element reference.

use std::ops::Range;

/// The runs of one piece inside its full tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Runs {
    /// Bytes per run.
    run_len: u64,
    /// Number of runs.
    count: u64,
    /// Piece extent in the outer (non-merged) dimensions.
    outer_shape: Vec<u64>,
    /// Full-tensor byte stride of each outer dimension.
    outer_strides: Vec<u64>,
    /// Full-tensor byte offset of each outer dimension's start, summed.
    base: u64,
}

impl Runs {
    /// Computes the runs of a piece with `offsets` and `shape` inside a full
    /// tensor of shape `full` with `elem`-byte elements. The caller guarantees
    /// the piece lies inside the full shape (the coverage check does).
    pub fn new(full: &[u64], offsets: &[u64], shape: &[u64], elem: u64) -> Runs {
        let ndim = full.len();
        // Byte strides of the full tensor, row-major.
        let mut strides = vec![elem; ndim];
        for d in (0..ndim.saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * full[d + 1];
        }
        if shape.contains(&0) {
            return Runs {
                run_len: 0,
                count: 0,
                outer_shape: vec![],
                outer_strides: vec![],
                base: 0,
            };
        }
        if ndim == 0 {
            return Runs {
                run_len: elem,
                count: 1,
                outer_shape: vec![],
                outer_strides: vec![],
                base: 0,
            };
        }
        // The split dimension k: every dimension after it is spanned fully.
        let mut k = ndim - 1;
        while k > 0 && shape[k] == full[k] {
            k -= 1;
        }
        let run_len = shape[k] * strides[k];
        let base = (0..=k).map(|d| offsets[d] * strides[d]).sum();
        Runs {
            run_len,
            count: shape[..k].iter().product(),
            outer_shape: shape[..k].to_vec(),
            outer_strides: strides[..k].to_vec(),
            base,
        }
    }

    /// Bytes per run.
    pub fn run_len(&self) -> u64 {
        self.run_len
    }

    /// Number of runs.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Byte offset of run `n` in the full tensor. Increases with `n`.
    pub fn dst(&self, n: u64) -> u64 {
        let mut rest = n;
        let mut offset = self.base;
        for d in (0..self.outer_shape.len()).rev() {
            offset += (rest % self.outer_shape[d]) * self.outer_strides[d];
            rest /= self.outer_shape[d];
        }
        offset
    }

    /// Byte offset of run `n` within the piece's own bytes.
    pub fn src(&self, n: u64) -> u64 {
        n * self.run_len
    }

    /// The runs that intersect the full-tensor byte range `window`.
    pub fn runs_in(&self, window: &Range<u64>) -> Range<u64> {
        let first = self.partition_point(|n| self.dst(n) + self.run_len <= window.start);
        let end = self.partition_point(|n| self.dst(n) < window.end);
        first..end.max(first)
    }

    /// Smallest run index for which `pred` is false (`pred` is monotone).
    fn partition_point(&self, pred: impl Fn(u64) -> bool) -> u64 {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The piece bytes needed to fill `window`: a contiguous range, since runs
    /// are stored in the piece in the same order they appear in the tensor.
    pub fn src_span(&self, window: &Range<u64>) -> Range<u64> {
        let runs = self.runs_in(window);
        if runs.is_empty() {
            return 0..0;
        }
        let first_dst = self.dst(runs.start);
        let last_dst = self.dst(runs.end - 1);
        let start = self.src(runs.start) + window.start.saturating_sub(first_dst);
        let end = self.src(runs.end - 1) + (window.end - last_dst).min(self.run_len);
        start..end
    }

    /// Copies into `window_bytes` (the full-tensor range starting at
    /// `window_start`) every part of this piece that falls inside it.
    /// `src` holds the piece's bytes from offset `src_start` on, and must
    /// cover [`Runs::src_span`] of the window.
    pub fn fill(&self, window_bytes: &mut [u8], window_start: u64, src: &[u8], src_start: u64) {
        let window = window_start..window_start + window_bytes.len() as u64;
        for n in self.runs_in(&window) {
            let dst = self.dst(n);
            let lo = dst.max(window.start);
            let hi = (dst + self.run_len).min(window.end);
            let from = (self.src(n) + (lo - dst) - src_start) as usize;
            let to = (lo - window.start) as usize;
            let len = (hi - lo) as usize;
            window_bytes[to..to + len].copy_from_slice(&src[from..from + len]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Element-by-element reference: place each element of the piece.
    fn reference(
        full: &[u64],
        offsets: &[u64],
        shape: &[u64],
        elem: usize,
        piece: &[u8],
        out: &mut [u8],
    ) {
        let count: u64 = shape.iter().product();
        for linear in 0..count {
            let mut rest = linear;
            let mut index = vec![0u64; shape.len()];
            for d in (0..shape.len()).rev() {
                index[d] = rest % shape[d];
                rest /= shape[d];
            }
            let mut dst = 0u64;
            for d in 0..full.len() {
                dst = dst * full[d] + offsets[d] + index[d];
            }
            let (s, t) = (linear as usize * elem, dst as usize * elem);
            out[t..t + elem].copy_from_slice(&piece[s..s + elem]);
        }
    }

    /// A full shape plus, per dimension, the cut points of a random grid.
    fn tiling() -> impl Strategy<Value = (Vec<u64>, Vec<Vec<u64>>, usize)> {
        (0usize..=6, prop::sample::select(vec![1usize, 2, 4, 8])).prop_flat_map(|(ndim, elem)| {
            let dims =
                prop::collection::vec((0u64..=5, prop::collection::vec(0u64..=5, 0..3)), ndim);
            dims.prop_map(move |dims| {
                let full: Vec<u64> = dims.iter().map(|(n, _)| *n).collect();
                let cuts = dims
                    .into_iter()
                    .map(|(n, mut cuts)| {
                        cuts.iter_mut().for_each(|c| *c = (*c).min(n));
                        cuts.push(0);
                        cuts.push(n);
                        cuts.sort_unstable();
                        cuts
                    })
                    .collect();
                (full, cuts, elem)
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Assembling every piece of a random grid, window by window, equals
        /// the element-by-element reference, for 0-D to 6-D shapes with empty
        /// dimensions and empty pieces, and all element sizes.
        #[test]
        fn windowed_fill_matches_reference((full, cuts, elem) in tiling(), window in 1usize..64) {
            let ndim = full.len();
            let total = full.iter().product::<u64>() as usize * elem;
            let mut expected = vec![0u8; total];
            let mut got = vec![0u8; total];
            // Enumerate grid cells (pieces), including zero-sized ones.
            let cells: Vec<usize> = cuts.iter().map(|c| c.len() - 1).collect();
            let cell_count: usize = cells.iter().product();
            for cell in 0..cell_count {
                let mut rest = cell;
                let mut offsets = vec![0u64; ndim];
                let mut shape = vec![0u64; ndim];
                for d in (0..ndim).rev() {
                    let i = rest % cells[d];
                    rest /= cells[d];
                    offsets[d] = cuts[d][i];
                    shape[d] = cuts[d][i + 1] - cuts[d][i];
                }
                let len = shape.iter().product::<u64>() as usize * elem;
                let piece: Vec<u8> = (0..len).map(|b| (b * 7 + cell * 13 + 1) as u8).collect();
                reference(&full, &offsets, &shape, elem, &piece, &mut expected);
                let runs = Runs::new(&full, &offsets, &shape, elem as u64);
                prop_assert_eq!(runs.count() * runs.run_len(), len as u64);
                for start in (0..total).step_by(window) {
                    let end = (start + window).min(total);
                    let span = runs.src_span(&(start as u64..end as u64));
                    let src = &piece[span.start as usize..span.end as usize];
                    runs.fill(&mut got[start..end], start as u64, src, span.start);
                }
            }
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn row_sharded_pieces_are_one_run_and_columns_one_run_per_row() {
        let rows = Runs::new(&[10, 4], &[6, 0], &[4, 4], 2);
        assert_eq!((rows.count(), rows.run_len(), rows.dst(0)), (1, 32, 48));
        let cols = Runs::new(&[10, 4], &[0, 2], &[10, 2], 2);
        assert_eq!((cols.count(), cols.run_len()), (10, 4));
        assert_eq!((cols.dst(0), cols.dst(1)), (4, 12));
        let scalar = Runs::new(&[], &[], &[], 8);
        assert_eq!((scalar.count(), scalar.run_len()), (1, 8));
    }
}
