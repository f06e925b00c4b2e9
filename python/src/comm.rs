//! The library's [`Communicator`] over a Python object: `st_consolidate`'s
//! torch.distributed communicator (`_dist.TorchCommunicator`), or none at
//! all for one process.
//!
//! The run calls these from its main thread with the GIL released; each
//! call re-attaches for the duration of one collective only. A Python
//! exception (torch raises on a timeout or a lost peer) becomes
//! [`Error::Communicator`]. Ctrl-C is not seen here (the run's thread is
//! not Python's main thread): the call's signal watcher cancels the run,
//! which then fails at its next check and tells the peers at the next
//! collective like any other failure.

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use st_consolidate_mpi::comm::Communicator;
use st_consolidate_mpi::{Error, Result};

/// A communicator reached through Python, or `None` for a job of one.
pub struct PyCommunicator {
    object: Option<Py<PyAny>>,
    rank: usize,
    size: usize,
    ranks_on_node: usize,
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
        })
    }

    /// Runs one collective with the interpreter attached; `call` gets the
    /// communicator object (`None` for one process).
    fn collective<T>(
        &self,
        call: impl for<'py> FnOnce(Python<'py>, Option<&Bound<'py, PyAny>>) -> PyResult<T>,
    ) -> Result<T> {
        let outcome = Python::try_attach(|py| {
            let object = self.object.as_ref().map(|o| o.bind(py));
            call(py, object)
        });
        match outcome {
            Some(Ok(value)) => Ok(value),
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
        self.collective(|_, object| match object {
            None => Ok(failed.then_some(0)),
            Some(o) => o.call_method1("lowest_failed", (failed,))?.extract(),
        })
    }

    fn gather(&self, bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        self.collective(|py, object| match object {
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
        self.collective(|py, object| match object {
            None => Ok(vec![bytes.to_vec()]),
            Some(o) => byte_list(&o.call_method1("all_gather", (PyBytes::new(py, bytes),))?),
        })
    }

    fn broadcast(&self, root: usize, bytes: &[u8]) -> Result<Vec<u8>> {
        self.collective(|py, object| match object {
            None => Ok(bytes.to_vec()),
            Some(o) => {
                let sent = o.call_method1("broadcast", (PyBytes::new(py, bytes), root))?;
                Ok(sent.cast_into::<PyBytes>()?.as_bytes().to_vec())
            }
        })
    }

    fn sum_polled(&self, values: [u64; 2]) -> Result<[u64; 2]> {
        // The copy threads never need the GIL, so a blocking all-reduce
        // does not stall them.
        self.collective(|_, object| match object {
            None => Ok(values),
            Some(o) => o.call_method1("sum", (values.to_vec(),))?.extract(),
        })
    }
}
