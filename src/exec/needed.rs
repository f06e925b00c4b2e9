//! Which input pieces a rank reads, so that it locates those and no others
//! (a DCP chunk is found in its archive only once a rank needs its bytes:
//! see [`crate::checkpoint::dcp::locate`]).
//!
//! Pieces are named `(tensor, piece)`, indices into [`Plan::tensors`] and
//! that tensor's pieces; every list is sorted and without repeats.

use crate::exec::copy::local_source;
use crate::exec::runs::Runs;
use crate::exec::verify::Target;
use crate::plan::Plan;
use std::collections::BTreeSet;

/// The pieces `rank` reads to write its share of the plan: those whose
/// bytes fall in its work items (its files under the modulo schedule, its
/// range under balanced), and the replicated pieces of the files it
/// creates (their replicas are compared before the copy). Pieces that hold
/// no element, which the copy never reads, go with the tensor's first byte
/// (or, for a tensor of no bytes, with its file's writer), so that every
/// chunk is still located and checked by exactly one rank.
pub fn pieces_to_copy(plan: &Plan, rank: usize) -> Vec<(usize, usize)> {
    let mut wanted = BTreeSet::new();
    for item in plan.work_items(rank) {
        for entry in &plan.files[item.file].entries {
            let lo = entry.bytes.start.max(item.bytes.start);
            let hi = entry.bytes.end.min(item.bytes.end);
            if lo >= hi {
                continue;
            }
            let tensor = &plan.tensors[entry.tensor];
            // The same source range the copy reads for this item.
            let source = local_source(entry, tensor, lo..hi);
            let from = tensor.dtype.size();
            for (p, piece) in tensor.pieces.iter().enumerate() {
                let runs = Runs::new(&tensor.shape, &piece.offsets, &piece.shape, from);
                let reads = match runs.count() {
                    0 => lo == entry.bytes.start,
                    _ => !runs.runs_in(&source).is_empty(),
                };
                if reads {
                    wanted.insert((entry.tensor, p));
                }
            }
        }
    }
    for f in plan.files_to_write(rank) {
        for entry in &plan.files[f].entries {
            let tensor = &plan.tensors[entry.tensor];
            let empty = entry.bytes.is_empty();
            for (p, piece) in tensor.pieces.iter().enumerate() {
                if empty || !piece.replicas.is_empty() {
                    wanted.insert((entry.tensor, p));
                }
            }
        }
    }
    wanted.into_iter().collect()
}

/// Every piece of the tensors `targets` compare: verification reads each
/// tensor whole, from every copy of every piece.
pub fn pieces_to_verify(plan: &Plan, targets: &[Target]) -> Vec<(usize, usize)> {
    let tensors: BTreeSet<usize> = targets
        .iter()
        .flat_map(|target| target.tensors.iter().map(|&(t, _, _)| t))
        .collect();
    tensors
        .into_iter()
        .filter(|&t| t < plan.tensors.len())
        .flat_map(|t| (0..plan.tensors[t].pieces.len()).map(move |p| (t, p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{FullTensor, Location, Piece};
    use crate::plan::Schedule;
    use crate::plan::mapping::Assignment;
    use crate::safetensors::dtype::Dtype;

    /// Tensor `t{i}` of `rows[i]` rows of 1024 bytes, cut into row pieces of
    /// `rows_per_piece`, each tensor in a file of its own.
    fn plan(rows: &[u64], rows_per_piece: u64, ranks: usize, schedule: Schedule) -> Plan {
        let tensors: Vec<FullTensor> = rows
            .iter()
            .enumerate()
            .map(|(i, &n)| FullTensor {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![n, 1024],
                pieces: (0..n.div_ceil(rows_per_piece))
                    .map(|k| {
                        let start = k * rows_per_piece;
                        let shape = [rows_per_piece.min(n - start), 1024];
                        Piece::new(Location::at(0, 0), &[start, 0], &shape)
                    })
                    .collect(),
            })
            .collect();
        let assignment = Assignment {
            file_of: (1..=rows.len() as u32).collect(),
            file_count: rows.len() as u32,
            missing: vec![],
        };
        let dtypes = vec![Dtype::U8; tensors.len()];
        let mut plan = Plan::new(vec![], tensors, assignment, ranks, dtypes, None);
        plan.schedule = schedule;
        plan
    }

    fn all_pieces(plan: &Plan) -> Vec<(usize, usize)> {
        (0..plan.tensors.len())
            .flat_map(|t| (0..plan.tensors[t].pieces.len()).map(move |p| (t, p)))
            .collect()
    }

    #[test]
    fn under_modulo_each_rank_reads_its_files_pieces() {
        let plan = plan(&[8, 8, 8, 8], 2, 2, Schedule::Modulo);
        let (a, b) = (pieces_to_copy(&plan, 0), pieces_to_copy(&plan, 1));
        // Files 1 and 3 (tensors 0 and 2) are rank 1's.
        assert!(a.iter().all(|&(t, _)| t == 1 || t == 3), "{a:?}");
        assert!(b.iter().all(|&(t, _)| t == 0 || t == 2), "{b:?}");
        let mut both: Vec<_> = a.into_iter().chain(b).collect();
        both.sort_unstable();
        assert_eq!(both, all_pieces(&plan));
    }

    #[test]
    fn under_balanced_a_tensor_split_between_ranks_is_split_by_piece() {
        // One tensor of 64 rows in 16 pieces of 4 KiB, on 2 ranks: the
        // boundary falls at row 32, between pieces 7 and 8.
        let plan = plan(&[64], 4, 2, Schedule::Balanced);
        let a = pieces_to_copy(&plan, 0);
        let b = pieces_to_copy(&plan, 1);
        assert_eq!(a, (0..8).map(|p| (0, p)).collect::<Vec<_>>());
        assert_eq!(b, (8..16).map(|p| (0, p)).collect::<Vec<_>>());
    }

    #[test]
    fn empty_pieces_and_replicated_ones_are_read_by_one_rank() {
        let mut plan = plan(&[8, 8], 4, 2, Schedule::Balanced);
        // An empty piece at the end of tensor 0, and a replica of piece 0
        // of tensor 1.
        let empty = Piece::new(Location::at(0, 0), &[8, 0], &[0, 1024]);
        plan.tensors[0].pieces.push(empty);
        plan.tensors[1].pieces[0].replicas.push(Location::at(0, 0));
        let (a, b) = (pieces_to_copy(&plan, 0), pieces_to_copy(&plan, 1));
        assert!(a.contains(&(0, 2)) && !b.contains(&(0, 2)), "{a:?} {b:?}");
        // Rank 1 owns file 1 (tensor 0) and rank 0 file 2 (tensor 1, whose
        // first piece has a replica): each checks the replicas it creates.
        let owner = plan.files[1].owner;
        assert!(pieces_to_copy(&plan, owner).contains(&(1, 0)));
    }

    #[test]
    fn verification_reads_whole_tensors() {
        let plan = plan(&[8, 8], 2, 1, Schedule::Modulo);
        let target = Target {
            path: "x".into(),
            name: "x".into(),
            tensors: vec![(1, 0, Dtype::U8)],
            origin: None,
        };
        let wanted = pieces_to_verify(&plan, &[target]);
        assert_eq!(wanted, (0..4).map(|p| (1, p)).collect::<Vec<_>>());
    }
}
