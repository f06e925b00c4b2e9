//! The communicator: the only module that names MPI.
//!
//! rsmpi's `Communicator` trait is sealed and cannot be mocked, so the rest
//! of the program talks to this small trait instead. [`SingleProcess`] runs
//! everything in one process (unit tests, `--dry-run` previews); [`MpiWorld`]
//! is the real thing.

use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};

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
    fn lowest_failed(&self, failed: bool) -> Option<usize>;
    /// Collective: rank 0 receives every rank's bytes, in rank order; the
    /// others receive `None`. Payloads must stay below 2 GiB.
    fn gather(&self, bytes: &[u8]) -> Option<Vec<Vec<u8>>>;
    /// Collective: every rank receives every rank's bytes, in rank order.
    /// Payloads must stay below 2 GiB in total.
    fn all_gather(&self, bytes: &[u8]) -> Vec<Vec<u8>>;
    /// Collective: element-wise sums over all ranks, by a non-blocking
    /// all-reduce on a communicator of its own (so it never mixes with the
    /// other collectives), polled until done. Used for progress while
    /// worker threads copy.
    fn sum_nonblocking(&self, values: [u64; 2]) -> [u64; 2];
}

/// The number of tasks the launcher says it started, and the variable that
/// says so: srun's `SLURM_STEP_NUM_TASKS` (not `SLURM_NTASKS`, which a batch
/// script also sees while running a single process), OpenMPI's
/// `OMPI_COMM_WORLD_SIZE` or Hydra's `PMI_SIZE`.
pub fn launcher_tasks() -> Option<(&'static str, usize)> {
    ["SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .into_iter()
        .find_map(|var| Some((var, std::env::var(var).ok()?.parse().ok()?)))
}

/// Fails before anything is done if MPI's world is smaller than the job the
/// launcher started (a mismatched PMI plugin gives N singletons of size 1).
pub fn check_world(
    comm: &dyn Communicator,
    launcher: Option<(&'static str, usize)>,
) -> crate::Result<()> {
    match launcher {
        Some((var, tasks)) if tasks > comm.size() => Err(crate::Error::WrongWorld {
            var,
            tasks,
            size: comm.size(),
        }),
        _ => Ok(()),
    }
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
    fn lowest_failed(&self, failed: bool) -> Option<usize> {
        failed.then_some(0)
    }
    fn gather(&self, bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
        Some(vec![bytes.to_vec()])
    }
    fn sum_nonblocking(&self, values: [u64; 2]) -> [u64; 2] {
        values
    }
    fn all_gather(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        vec![bytes.to_vec()]
    }
}

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

    fn lowest_failed(&self, failed: bool) -> Option<usize> {
        let size = self.world.size();
        let mine = if failed { self.world.rank() } else { size };
        let mut lowest = size;
        self.world
            .all_reduce_into(&mine, &mut lowest, SystemOperation::min());
        (lowest < size).then(|| usize::try_from(lowest).unwrap_or(0))
    }

    fn sum_nonblocking(&self, values: [u64; 2]) -> [u64; 2] {
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
        sums
    }

    fn all_gather(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let count = mpi::Count::try_from(bytes.len()).unwrap_or(mpi::Count::MAX);
        let bytes = &bytes[..usize::try_from(count).unwrap_or(0)];
        let mut counts = vec![0 as mpi::Count; self.size()];
        self.world.all_gather_into(&count, &mut counts[..]);
        receive_parts(&counts, |partition| {
            self.world.all_gather_varcount_into(bytes, partition)
        })
    }

    fn gather(&self, bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
        let root = self.world.process_at_rank(0);
        let count = mpi::Count::try_from(bytes.len()).unwrap_or(mpi::Count::MAX);
        let bytes = &bytes[..usize::try_from(count).unwrap_or(0)];
        if self.world.rank() != 0 {
            root.gather_into(&count);
            root.gather_varcount_into(bytes);
            return None;
        }
        let mut counts = vec![0 as mpi::Count; self.size()];
        root.gather_into_root(&count, &mut counts[..]);
        Some(receive_parts(&counts, |partition| {
            root.gather_varcount_into_root(bytes, partition)
        }))
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

    #[test]
    fn singleton_worlds_under_a_bigger_job_are_refused() {
        let err = check_world(&SingleProcess, Some(("SLURM_STEP_NUM_TASKS", 4))).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("SLURM_STEP_NUM_TASKS=4")
                && text.contains("--mpi=pmix")
                && text.contains("--mpi=pmi2"),
            "{text}"
        );
        assert!(check_world(&SingleProcess, Some(("PMI_SIZE", 1))).is_ok());
        assert!(check_world(&SingleProcess, None).is_ok());
    }
}
