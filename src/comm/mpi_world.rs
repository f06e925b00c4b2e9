//! [`MpiWorld`]: the [`Communicator`] over MPI (rsmpi), behind the `mpi`
//! feature. MPI reports errors by aborting the job (its default error
//! handler), so these collectives never return an error of their own.

use super::Communicator;
use crate::Result;
use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};
use std::ops::Range;

/// `MPI_COMM_WORLD`. MPI is finalized when this is dropped, so `main` must
/// return normally rather than call `process::exit`.
pub struct MpiWorld {
    // Field order matters: the communicators are freed before the universe
    // finalizes MPI.
    world: SimpleCommunicator,
    /// A duplicate of the world for progress reductions.
    progress: SimpleCommunicator,
    ranks_on_node: usize,
    _universe: mpi::environment::Universe,
}

impl MpiWorld {
    /// Initializes MPI. Only the main thread calls MPI; worker threads only
    /// copy bytes, so `Funneled` suffices. Returns `None` if MPI was already
    /// initialized.
    pub fn init() -> Option<MpiWorld> {
        let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)?;
        let world = universe.world();
        let node = world.split_shared(world.rank());
        let ranks_on_node = usize::try_from(node.size()).unwrap_or(1).max(1);
        let progress = world.duplicate();
        Some(MpiWorld {
            world,
            progress,
            ranks_on_node,
            _universe: universe,
        })
    }
}

impl Communicator for MpiWorld {
    fn rank(&self) -> usize {
        usize::try_from(self.world.rank()).unwrap_or(0)
    }

    fn size(&self) -> usize {
        usize::try_from(self.world.size()).unwrap_or(1)
    }

    fn ranks_on_node(&self) -> usize {
        self.ranks_on_node
    }

    fn lowest_failed(&self, failed: bool) -> Result<Option<usize>> {
        let size = self.world.size();
        let mine = if failed { self.world.rank() } else { size };
        let mut lowest = size;
        self.world
            .all_reduce_into(&mine, &mut lowest, SystemOperation::min());
        Ok((lowest < size).then(|| usize::try_from(lowest).unwrap_or(0)))
    }

    fn sum_polled(&self, values: [u64; 2]) -> Result<[u64; 2]> {
        let mut sums = [0u64; 2];
        mpi::request::scope(|scope| {
            let mut request = self.progress.immediate_all_reduce_into(
                scope,
                &values[..],
                &mut sums[..],
                SystemOperation::sum(),
            );
            loop {
                match request.test() {
                    Ok(_) => break,
                    Err(pending) => {
                        request = pending;
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                }
            }
        });
        Ok(sums)
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let lengths = self.lengths(bytes);
        let mut parts = vec![Vec::new(); lengths.len()];
        for round in rounds(&lengths, mpi::Count::MAX) {
            let mine = &bytes[round.ranges[self.rank()].clone()];
            let received = receive_parts(&round.counts, |partition| {
                self.world.all_gather_varcount_into(mine, partition)
            });
            append(&mut parts, received);
        }
        Ok(parts)
    }

    fn broadcast(&self, root: usize, bytes: &[u8]) -> Result<Vec<u8>> {
        let is_root = root == self.rank();
        let root = self
            .world
            .process_at_rank(mpi::Rank::try_from(root).unwrap_or(0));
        let mut len = if is_root { bytes.len() as u64 } else { 0 };
        root.broadcast_into(&mut len);
        let mut buffer = if is_root {
            bytes.to_vec()
        } else {
            vec![0u8; usize::try_from(len).unwrap_or(0)]
        };
        // In slices an MPI count can hold.
        for slice in buffer.chunks_mut(mpi::Count::MAX as usize) {
            root.broadcast_into(slice);
        }
        Ok(buffer)
    }

    fn gather(&self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        let root = self.world.process_at_rank(0);
        let lengths = self.lengths(bytes);
        let mut parts = vec![Vec::new(); lengths.len()];
        for round in rounds(&lengths, mpi::Count::MAX) {
            let mine = &bytes[round.ranges[self.rank()].clone()];
            if self.world.rank() == 0 {
                let received = receive_parts(&round.counts, |partition| {
                    root.gather_varcount_into_root(mine, partition)
                });
                append(&mut parts, received);
            } else {
                root.gather_varcount_into(mine);
            }
        }
        Ok((self.world.rank() == 0).then_some(parts))
    }
}

impl MpiWorld {
    /// Collective: every rank's payload length, so that all ranks agree on
    /// the rounds of [`rounds`].
    fn lengths(&self, bytes: &[u8]) -> Vec<u64> {
        let mut lengths = vec![0u64; self.size()];
        self.world
            .all_gather_into(&(bytes.len() as u64), &mut lengths[..]);
        lengths
    }
}

/// One round of a variable-count collective: the byte range each rank
/// sends, and its length as an MPI count.
#[derive(Debug, PartialEq, Eq)]
struct Round {
    ranges: Vec<Range<usize>>,
    counts: Vec<mpi::Count>,
}

/// Splits payloads of `lengths` bytes (one per rank) into rounds that each
/// move at most `limit` bytes in total, so that no count or displacement
/// overflows MPI's `int`: in round k, every rank sends its next
/// `limit / ranks` bytes, or what is left of them. Nothing is ever cut off;
/// small payloads take one round. Needs `ranks <= limit`, which holds for
/// any world (ranks are numbered by an `int`).
fn rounds(lengths: &[u64], limit: mpi::Count) -> Vec<Round> {
    let per_rank = (limit as u64 / lengths.len().max(1) as u64).max(1);
    let longest = lengths.iter().copied().max().unwrap_or(0);
    (0..longest.div_ceil(per_rank))
        .map(|k| {
            let ranges: Vec<Range<usize>> = lengths
                .iter()
                .map(|&len| {
                    let start = (k * per_rank).min(len);
                    start as usize..(start + per_rank).min(len) as usize
                })
                .collect();
            // Each range holds at most per_rank <= limit bytes: it fits.
            let counts = ranges.iter().map(|r| r.len() as mpi::Count).collect();
            Round { ranges, counts }
        })
        .collect()
}

/// Appends each rank's bytes of one round to what it sent before.
fn append(parts: &mut [Vec<u8>], received: Vec<Vec<u8>>) {
    for (part, more) in parts.iter_mut().zip(received) {
        part.extend_from_slice(&more);
    }
}

/// Runs a variable-count receive of `counts[r]` bytes from each rank r
/// into one buffer, and cuts it into each rank's part.
fn receive_parts(
    counts: &[mpi::Count],
    receive: impl FnOnce(&mut PartitionMut<'_, [u8], &[mpi::Count], Vec<mpi::Count>>),
) -> Vec<Vec<u8>> {
    let sizes: Vec<usize> = counts
        .iter()
        .map(|&n| usize::try_from(n).unwrap_or(0))
        .collect();
    let displs: Vec<mpi::Count> = counts
        .iter()
        .scan(0, |next, &n| {
            let start = *next;
            *next += n;
            Some(start)
        })
        .collect();
    let mut buffer = vec![0u8; sizes.iter().sum()];
    receive(&mut PartitionMut::new(&mut buffer[..], counts, displs));
    let mut offset = 0;
    sizes
        .iter()
        .map(|&n| {
            offset += n;
            buffer[offset - n..offset].to_vec()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays `rounds` for `lengths` and returns what each rank would
    /// receive, checking every round against `limit` on the way.
    fn replay(lengths: &[u64], limit: mpi::Count) -> Vec<Vec<u8>> {
        let payloads: Vec<Vec<u8>> = lengths
            .iter()
            .enumerate()
            .map(|(r, &len)| (0..len).map(|i| (i as usize * 7 + r) as u8).collect())
            .collect();
        let mut parts = vec![Vec::new(); lengths.len()];
        for round in rounds(lengths, limit) {
            assert!(round.counts.iter().map(|&c| c as i64).sum::<i64>() <= limit as i64);
            for (range, &count) in round.ranges.iter().zip(&round.counts) {
                assert_eq!(range.len(), count as usize);
            }
            let received = payloads
                .iter()
                .zip(&round.ranges)
                .map(|(p, r)| p[r.clone()].to_vec())
                .collect();
            append(&mut parts, received);
        }
        assert_eq!(parts, payloads, "lengths {lengths:?}, limit {limit}");
        parts
    }

    #[test]
    fn payloads_over_the_limit_move_whole_in_several_rounds() {
        assert_eq!(
            rounds(&[3, 0, 5], 100).len(),
            1,
            "small payloads: one round"
        );
        assert_eq!(rounds(&[0, 0], 100).len(), 0);
        assert_eq!(
            rounds(&[5, 0, 12], 6).len(),
            6,
            "2 bytes per rank per round"
        );
        for lengths in [
            vec![12],
            vec![5, 0, 12],
            vec![7, 7, 7, 7],
            vec![0, 1, 2, 3, 4, 5, 6],
        ] {
            // A real world never has more ranks than the limit (2^31 - 1).
            for limit in [1, 2, 3, 6, 7, 100]
                .into_iter()
                .filter(|&l| l >= lengths.len() as i32)
            {
                replay(&lengths, limit);
            }
        }
    }

    #[test]
    fn the_real_limit_splits_a_payload_over_2_gib() {
        // Only the plan: no 2 GiB buffer is allocated.
        let over = mpi::Count::MAX as u64 + 10;
        let plan = rounds(&[over, 1], mpi::Count::MAX);
        assert_eq!(plan.len(), 3);
        let sent: u64 = plan.iter().map(|r| r.ranges[0].len() as u64).sum();
        assert_eq!(sent, over);
        for round in &plan {
            let total: i64 = round.counts.iter().map(|&c| c as i64).sum();
            assert!(total <= mpi::Count::MAX as i64);
        }
    }
}
