//! A ZeRO partition is a flat range of a tensor's row-major elements; the
//! checkpoint model holds dense N-d blocks. A flat range `[start, end)` of a
//! tensor is at most `2·ndim − 1` such blocks: a partial row, whole rows, a
//! partial row, each partial row split the same way one dimension down.
//! The blocks come out in element order, so each one's bytes follow the
//! previous one's in the partition.

/// One block of a flat range: where it starts in the full tensor, its
/// shape, and its first element's row-major index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Offsets in the full tensor, per dimension.
    pub offsets: Vec<u64>,
    /// The block's shape.
    pub shape: Vec<u64>,
    /// Row-major index of the block's first element in the full tensor.
    pub first: u64,
}

/// The blocks tiling elements `[start, end)` of a row-major tensor of
/// `shape`, in element order. The caller keeps `end` within the element
/// count (an empty range gives no block).
pub fn blocks(shape: &[u64], start: u64, end: u64) -> Vec<Block> {
    let mut out = Vec::new();
    push_blocks(shape, start, end, &mut Vec::new(), 0, &mut out);
    out
}

/// Appends the blocks of `[start, end)` of the sub-tensor of `shape` that
/// sits at `prefix` (offsets of the leading dimensions, each of size 1 in
/// the blocks) and whose first element is `base` in the full tensor.
fn push_blocks(
    shape: &[u64],
    start: u64,
    end: u64,
    prefix: &mut Vec<u64>,
    base: u64,
    out: &mut Vec<Block>,
) {
    if start >= end {
        return;
    }
    let Some((&rows, inner)) = shape.split_first() else {
        // A scalar: its one element.
        out.push(Block {
            offsets: prefix.clone(),
            shape: vec![1; prefix.len()],
            first: base,
        });
        return;
    };
    let row: u64 = inner.iter().product();
    if row == 0 || rows == 0 {
        return;
    }
    let mut at = start;
    // A partial first row.
    if !at.is_multiple_of(row) {
        let r = at / row;
        let row_end = ((r + 1) * row).min(end);
        prefix.push(r);
        push_blocks(
            inner,
            at - r * row,
            row_end - r * row,
            prefix,
            base + r * row,
            out,
        );
        prefix.pop();
        at = row_end;
    }
    // Whole rows.
    let whole = (end / row).saturating_sub(at / row);
    if at < end && whole > 0 {
        let mut offsets = prefix.clone();
        offsets.push(at / row);
        offsets.extend(std::iter::repeat_n(0, inner.len()));
        let mut block_shape = vec![1; prefix.len()];
        block_shape.push(whole);
        block_shape.extend_from_slice(inner);
        out.push(Block {
            offsets,
            shape: block_shape,
            first: base + at,
        });
        at += whole * row;
    }
    // A partial last row.
    if at < end {
        let r = at / row;
        prefix.push(r);
        push_blocks(inner, 0, end - r * row, prefix, base + r * row, out);
        prefix.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::coverage::check_coverage;
    use crate::checkpoint::{Location, Piece};
    use proptest::prelude::*;

    fn row_major_index(shape: &[u64], offsets: &[u64]) -> u64 {
        shape
            .iter()
            .zip(offsets)
            .fold(0, |index, (dim, offset)| index * dim + offset)
    }

    #[test]
    fn a_range_is_a_partial_row_whole_rows_and_a_partial_row() {
        // 4 x 5: elements 3..17 are [0, 3:5], rows 1..3, [3, 0:2].
        let got = blocks(&[4, 5], 3, 17);
        let want = vec![
            Block {
                offsets: vec![0, 3],
                shape: vec![1, 2],
                first: 3,
            },
            Block {
                offsets: vec![1, 0],
                shape: vec![2, 5],
                first: 5,
            },
            Block {
                offsets: vec![3, 0],
                shape: vec![1, 2],
                first: 15,
            },
        ];
        assert_eq!(got, want);
        assert_eq!(blocks(&[7], 2, 5).len(), 1);
        assert_eq!(
            blocks(&[], 0, 1),
            vec![Block {
                offsets: vec![],
                shape: vec![],
                first: 0
            }]
        );
        assert!(blocks(&[3, 0], 0, 0).is_empty());
    }

    proptest! {
        /// Any split of any tensor into consecutive flat ranges gives
        /// blocks that tile it exactly, each at most 2·ndim − 1 per range,
        /// in element order, each block's first element where it says.
        #[test]
        fn consecutive_ranges_tile_the_tensor(
            shape in prop::collection::vec(1u64..6, 0..4),
            cuts in prop::collection::vec(0u64..400, 0..6),
        ) {
            let total: u64 = shape.iter().product();
            let mut bounds: Vec<u64> = cuts.into_iter().map(|c| c % (total + 1)).collect();
            bounds.push(0);
            bounds.push(total);
            bounds.sort_unstable();
            let mut pieces = Vec::new();
            for range in bounds.windows(2) {
                let (start, end) = (range[0], range[1]);
                let got = blocks(&shape, start, end);
                prop_assert!(got.len() as u64 <= (2 * shape.len() as u64).saturating_sub(1).max(1));
                let mut next = start;
                for block in &got {
                    prop_assert_eq!(block.first, next);
                    prop_assert_eq!(block.first, row_major_index(&shape, &block.offsets));
                    next += block.shape.iter().product::<u64>();
                    pieces.push(Piece::new(Location::at(0, 0), &block.offsets, &block.shape));
                }
                prop_assert_eq!(next, end);
            }
            prop_assert!(check_coverage(&shape, &pieces).is_ok());
        }
    }
}
