//! Stopping a run from outside it: a front end that learns the run must
//! stop (the Python extension, on Ctrl-C or when the interpreter exits)
//! sets the run's [`Cancel`]; the copy checks it between slices of at most
//! [`CANCEL_SLICE`] bytes and the run after each phase, and the run then
//! fails with [`Error::Cancelled`] like any other failure: its temporary
//! files are removed and nothing is published. One per run, never
//! process-wide.

use crate::error::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes copied between two looks at the flag: 64 MiB take tens of
/// milliseconds to copy, and one more call per 64 MiB costs nothing.
pub const CANCEL_SLICE: u64 = 64 << 20;

/// A run's cancellation flag, shared by its clones.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Asks the run to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether the run was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// [`Error::Cancelled`] once the run was asked to stop.
    pub fn check(&self) -> Result<()> {
        match self.is_cancelled() {
            true => Err(Error::Cancelled),
            false => Ok(()),
        }
    }
}
