//! The library's [`Communicator`] over a Python object: `st_consolidate`'s
//! torch.distributed communicator (`_dist.TorchCommunicator`), or none at
//! all for one process.
//!
//! The run calls these from its main thread with the GIL released; each
//! call re-attaches for the duration of one collective only. A Python
//! exception (torch raises on a timeout or a lost peer) becomes
//! [`Error::Communicator`]. Every collective also checks for a pending
//! signal (Ctrl-C) first, and joins the collective as failed rather than
//! leaving it: the peers learn of the interruption and everyone stops.

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use st_consolidate_mpi::comm::Communicator;
use st_consolidate_mpi::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// A communicator reached through Python, or `None` for a job of one.
pub struct PyCommunicator {
    object: Option<Py<PyAny>>,
    rank: usize,
    size: usize,
    ranks_on_node: usize,
    /// Set when a collective saw Ctrl-C, so that the call raises
    /// `KeyboardInterrupt` once the run has cleaned up.
    interrupted: AtomicBool,
}

impl PyCommunicator {
    /// Reads rank, size and ranks per node from `object` (attributes
    /// `rank`, `size`, `ranks_on_node`) once.
    pub fn new(object: Option<&Bound<'_, PyAny>>) -> PyResult<PyCommunicator> {
        let (rank, size, ranks_on_node) = match object {
            Some(o) => (
                o.getattr("rank")?.extract()?,
                o.getattr("size")?.extract()?,
                o.getattr("ranks_on_node")?.extract()?,
            ),
            None => (0, 1, 1),
        };
        Ok(PyCommunicator {
            object: object.map(|o| o.clone().unbind()),
            rank,
            size,
            ranks_on_node,
            interrupted: AtomicBool::new(false),
        })
    }

    /// Whether a collective saw Ctrl-C.
    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// Runs one collective with the interpreter attached; `call` gets the
    /// communicator object (`None` for one process) and whether a signal is
    /// pending. A pending signal still joins the collective (as a failure
    /// where the protocol allows it) and then fails this rank.
    fn collective<T>(
        &self,
        call: impl for<'py> FnOnce(Python<'py>, Option<&Bound<'py, PyAny>>, bool) -> PyResult<T>,
    ) -> Result<T> {
        let outcome = Python::try_attach(|py| {
            let interrupted = match py.check_signals() {
                Ok(()) => false,
                Err(e) if e.is_instance_of::<PyKeyboardInterrupt>(py) => true,
                Err(e) => return Err(e),
            };
            let object = self.object.as_ref().map(|o| o.bind(py));
            let value = call(py, object, interrupted)?;
            Ok((value, interrupted))
        });
        match outcome {
            Some(Ok((_, true))) => {
                self.interrupted.store(true, Ordering::Relaxed);
                Err(self.error(
                    "interrupted (KeyboardInterrupt)".into(),
                    "nothing was published; call again to consolidate",
                ))
            }
            Some(Ok((value, false))) => Ok(value),
            Some(Err(e)) => Err(self.error(
                e.to_string(),
                "check the process group: a rank may have died or timed out",
            )),
            None => Err(self.error(
                "the Python interpreter is shutting down".into(),
                "join the consolidation thread before the interpreter exits",
            )),
        }
    }

    fn error(&self, reason: String, hint: &str) -> Error {
        Error::Communicator {
            rank: self.rank,
            reason,
            hint: hint.into(),
        }
    }
}

/// A list of `bytes` from Python, as owned buffers.
fn byte_list(value: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u8>>> {
    value
        .try_iter()?
        .map(|item| Ok(item?.cast_into::<PyBytes>()?.as_bytes().to_vec()))
        .collect()
}

impl Communicator for PyCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn ranks_on_node(&self) -> usize {
        self.ranks_on_node
    }

    fn lowest_failed(&self, failed: bool) -> Result<Option<usize>> {
        self.collective(|_, object, interrupted| match object {
            None => Ok((failed || interrupted).then_some(0)),
            Some(o) => o
                .call_method1("lowest_failed", (failed || interrupted,))?
                .extract(),
        })
    }

    fn gather(&self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        self.collective(|py, object, _| match object {
            None => Ok(Some(vec![bytes.to_vec()])),
            Some(o) => {
                let parts = o.call_method1("gather", (PyBytes::new(py, bytes),))?;
                if parts.is_none() {
                    Ok(None)
                } else {
                    byte_list(&parts).map(Some)
                }
            }
        })
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.collective(|py, object, _| match object {
            None => Ok(vec![bytes.to_vec()]),
            Some(o) => byte_list(&o.call_method1("all_gather", (PyBytes::new(py, bytes),))?),
        })
    }

    fn sum_polled(&self, values: [u64; 2]) -> Result<[u64; 2]> {
        // The copy threads never need the GIL, so a blocking all-reduce
        // does not stall them.
        self.collective(|_, object, _| match object {
            None => Ok(values),
            Some(o) => o.call_method1("sum", (values.to_vec(),))?.extract(),
        })
    }
}
