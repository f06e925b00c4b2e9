//! The library's message sink over a Python `logging.Logger` (the
//! `st_consolidate` logger): notes and the summary at INFO, warnings at
//! WARNING, per-rank detail at DEBUG, one progress line per round at INFO.
//! Quiet by default, as the peers are: `logging` shows only warnings until
//! the application configures it.

use pyo3::prelude::*;
use st_consolidate_mpi::messages::{Messages, ProgressView};
use st_consolidate_mpi::progress::line;
use std::time::Duration;

/// Sends each message to `logger.<level>(text)`.
pub struct PyLogger {
    logger: Py<PyAny>,
}

impl PyLogger {
    /// Logs through `logger`.
    pub fn new(logger: &Bound<'_, PyAny>) -> PyLogger {
        PyLogger {
            logger: logger.clone().unbind(),
        }
    }

    /// Logs `text` at `level` ("info", "warning", "debug"). A message is
    /// dropped if the interpreter is shutting down or the handler raises:
    /// a log line must never fail a consolidation.
    pub fn log(&self, level: &str, text: &str) {
        Python::try_attach(|py| {
            if let Err(e) = self.logger.call_method1(py, level, ("%s", text)) {
                e.write_unraisable(py, None);
            }
        });
    }
}

impl Messages for PyLogger {
    fn info(&self, text: &str) {
        self.log("info", text);
    }
    fn warning(&self, text: &str) {
        self.log("warning", text);
    }
    fn detail(&self, text: &str) {
        self.log("debug", text);
    }
    fn progress(&self, total: u64) -> Box<dyn ProgressView + '_> {
        Box::new(ProgressLines {
            logger: self,
            total,
        })
    }
}

/// One INFO line per progress round.
struct ProgressLines<'a> {
    logger: &'a PyLogger,
    total: u64,
}

impl ProgressView for ProgressLines<'_> {
    fn update(&self, done: u64, elapsed: Duration) {
        self.logger.log("info", &line(done, self.total, elapsed));
    }
}
