//! Start-up, for a front end that is a process of its own (the command):
//! the open-file limit, which launcher started the process, which
//! communicator to use, and the check that MPI's world is the job the
//! launcher started. The MPI part is behind the `mpi` feature; without it
//! every process is a job of one.

use crate::comm::{Communicator, SingleProcess};
use crate::error::{Error, Result};

/// Raises the soft open-file limit to the hard one. A rank holds one
/// descriptor per output file it owns for the whole run; thousands of
/// small files must not hit a soft limit of 1024 while the hard limit
/// allows more. Failing to raise it is no error: the run may not need it,
/// and opening a file says so if it does.
pub fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

/// Rank variables set by mpirun/mpiexec (OpenMPI, MPICH/Hydra, PMIx) and srun.
pub const LAUNCHER_RANK_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMIX_RANK",
    "SLURM_PROCID",
];

/// The launcher's rank for this process, read before MPI starts, so that a
/// bad command line is reported once rather than once per rank.
pub fn launcher_rank() -> usize {
    LAUNCHER_RANK_VARS
        .iter()
        .find_map(|var| std::env::var(var).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Whether a launcher started this process. Without one, MPI is not
/// initialized at all: a singleton MPI_Init costs a fraction of a second
/// and brings nothing to a job of one.
pub fn under_launcher() -> bool {
    LAUNCHER_RANK_VARS
        .iter()
        .any(|var| std::env::var_os(var).is_some())
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
pub fn check_world(comm: &dyn Communicator, launcher: Option<(&'static str, usize)>) -> Result<()> {
    match launcher {
        Some((var, tasks)) if tasks > comm.size() => Err(Error::WrongWorld {
            var,
            tasks,
            size: comm.size(),
        }),
        _ => Ok(()),
    }
}

/// The communicator this process runs with. With MPI, MPI is finalized
/// when this is dropped, so the front end keeps it until it is done and
/// must return normally rather than call `process::exit`.
pub struct World {
    #[cfg(feature = "mpi")]
    mpi: Option<crate::comm::mpi_world::MpiWorld>,
}

impl World {
    /// The communicator to run with.
    pub fn comm(&self) -> &dyn Communicator {
        #[cfg(feature = "mpi")]
        if let Some(world) = &self.mpi {
            return world;
        }
        &SingleProcess
    }
}

/// Starts this process's part of the job: raises the open-file limit,
/// initializes MPI if a launcher started the process (with the `mpi`
/// feature), and checks that the world is as large as the launcher's job.
pub fn start() -> Result<World> {
    raise_open_file_limit();
    #[cfg(feature = "mpi")]
    let world = World {
        mpi: mpi_world(under_launcher())?,
    };
    #[cfg(not(feature = "mpi"))]
    let world = World {};
    check_world(world.comm(), launcher_tasks())?;
    Ok(world)
}

/// MPI's world if `launched` (a launcher started this process), `None`
/// otherwise; an error if MPI was already initialized in this process.
#[cfg(feature = "mpi")]
pub fn mpi_world(launched: bool) -> Result<Option<crate::comm::mpi_world::MpiWorld>> {
    mpi_if_launched(launched, crate::comm::mpi_world::MpiWorld::init)
}

/// MPI's world if a launcher started this process, from `init`; `None`
/// (one process, MPI never initialized) without a launcher. `init` gives
/// `None` when MPI was initialized before: running on as one process would
/// have every task write every file (and be blamed on the srun plug-in),
/// so that is an error of its own.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn mpi_if_launched<W>(launched: bool, init: impl FnOnce() -> Option<W>) -> Result<Option<W>> {
    if !launched {
        return Ok(None);
    }
    init().map(Some).ok_or(Error::MpiAlreadyInitialized)
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

    #[test]
    fn mpi_starts_only_under_a_launcher() {
        let never = || -> Option<u8> { panic!("MPI must not be initialized without a launcher") };
        assert_eq!(mpi_if_launched(false, never).unwrap(), None);
        assert_eq!(mpi_if_launched(true, || Some(7u8)).unwrap(), Some(7));
    }

    #[test]
    fn mpi_initialized_by_someone_else_is_said_plainly() {
        let err = mpi_if_launched(true, || None::<u8>).unwrap_err();
        assert!(matches!(err, Error::MpiAlreadyInitialized), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with(
                "MPI was already initialized in this process (by mpi4py or another library)"
            ),
            "{text}"
        );
        assert!(text.contains("hint: "), "{text}");
        // Not the wrong-plug-in diagnosis, which would send the user to
        // srun's options.
        assert!(!text.contains("--mpi=pmix"), "{text}");
    }
}
