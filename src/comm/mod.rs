//! The communicator: the seam between the run and whatever connects the
//! ranks.
//!
//! rsmpi's `Communicator` trait is sealed and cannot be mocked, so the rest
//! of the program talks to this small trait instead. [`SingleProcess`] runs
//! everything in one process (unit tests, `--dry-run` previews);
//! [`mpi_world::MpiWorld`] (feature `mpi`) is the command's; the Python extension
//! implements it over torch.distributed; [`threads::ThreadWorld`] runs N
//! ranks as threads of one process, for tests of the protocols.
//!
//! Every collective can fail (torch.distributed raises on a timeout or a
//! lost peer), and says so with [`crate::Error::Communicator`] rather than
//! leaving the caller to hang or panic.

pub mod collectives;
#[cfg(feature = "mpi")]
pub mod mpi_world;
pub mod threads;

use crate::Result;

/// The collectives the driver needs, and nothing more.
pub trait Communicator {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// Number of ranks in the job.
    fn size(&self) -> usize;
    /// Number of ranks sharing this node (and its cores).
    fn ranks_on_node(&self) -> usize;
    /// Collective: each rank says whether it failed; all learn the lowest
    /// failed rank, if any. Doubles as the barrier that fences each phase.
    fn lowest_failed(&self, failed: bool) -> Result<Option<usize>>;
    /// Collective: rank 0 receives every rank's bytes, in rank order; the
    /// others receive `None`. Payloads of any size arrive whole.
    fn gather(&self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>>;
    /// Collective: every rank receives every rank's bytes, in rank order.
    /// Payloads of any size arrive whole.
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Collective: every rank receives `root`'s bytes (the others' `bytes`
    /// are ignored; pass an empty slice). For one rank's data going to all
    /// (the shared headers, a failure): each rank holds one payload, never
    /// one per rank as with [`Communicator::all_gather`].
    fn broadcast(&self, root: usize, bytes: &[u8]) -> Result<Vec<u8>>;
    /// Collective: element-wise sums over all ranks. It waits for them, but
    /// by polling a non-blocking all-reduce on a communicator of its own (so
    /// it never mixes with the other collectives and never parks in MPI
    /// while worker threads copy). Used for progress.
    fn sum_polled(&self, values: [u64; 2]) -> Result<[u64; 2]>;
}

/// A job of one rank, without MPI.
#[derive(Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn ranks_on_node(&self) -> usize {
        1
    }
    fn lowest_failed(&self, failed: bool) -> Result<Option<usize>> {
        Ok(failed.then_some(0))
    }
    fn gather(&self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        Ok(Some(vec![bytes.to_vec()]))
    }
    fn sum_polled(&self, values: [u64; 2]) -> Result<[u64; 2]> {
        Ok(values)
    }
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
    fn broadcast(&self, _root: usize, bytes: &[u8]) -> Result<Vec<u8>> {
        Ok(bytes.to_vec())
    }
}
