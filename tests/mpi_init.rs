//! MPI initialized by someone else before the command's start-up (as
//! mpi4py does in a Python process): the start-up says so instead of
//! running on as one process. A singleton MPI world, no launcher needed.
#![cfg(feature = "mpi")]

use st_consolidate_mpi::Error;
use st_consolidate_mpi::comm::mpi_world::MpiWorld;
use st_consolidate_mpi::launch::mpi_world;

#[test]
fn mpi_initialized_before_the_start_up_is_an_error_saying_so() {
    let first = MpiWorld::init().expect("the first initialization succeeds");
    let err = mpi_world(true).err().expect("the second start-up fails");
    assert!(matches!(err, Error::MpiAlreadyInitialized), "{err}");
    assert!(
        err.to_string().contains("by mpi4py or another library"),
        "{err}"
    );
    // Without a launcher MPI is not touched, initialized or not.
    assert!(mpi_world(false).unwrap().is_none());
    drop(first);
}
