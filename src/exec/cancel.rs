//! Stopping a run from outside it: a front end that learns the run must
//! stop (the Python extension, on Ctrl-C or when the interpreter exits)
//! sets the run's [`Cancel`], saying why. The copy checks it between
//! slices of at most [`CANCEL_SLICE`] bytes and every phase before its
//! work, up to the run's point of no return (see `run`); the run then
//! fails with [`Error::Cancelled`] like any other failure: its temporary
//! files are removed and nothing is published. Past the point of no
//! return the flag is no longer looked at: the publish completes and the
//! run reports success ([`crate::run::Summary::late_cancel`] says that a
//! stop arrived meanwhile). One per run, never process-wide.

pub use crate::error::StopReason;
use crate::error::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Bytes copied between two looks at the flag: 64 MiB take tens of
/// milliseconds to copy, and one more call per 64 MiB costs nothing.
pub const CANCEL_SLICE: u64 = 64 << 20;

/// A run's cancellation flag, shared by its clones.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicU8>);

const NOT_STOPPED: u8 = 0;

impl Cancel {
    /// Asks the run to stop because of an interrupt.
    pub fn cancel(&self) {
        self.stop(StopReason::Interrupted);
    }

    /// Asks the run to stop, saying why. The first reason given is kept.
    pub fn stop(&self, reason: StopReason) {
        let code = match reason {
            StopReason::Interrupted => 1,
            StopReason::Exiting => 2,
        };
        let _ = self
            .0
            .compare_exchange(NOT_STOPPED, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Why the run was asked to stop, if it was.
    pub fn reason(&self) -> Option<StopReason> {
        match self.0.load(Ordering::Relaxed) {
            NOT_STOPPED => None,
            1 => Some(StopReason::Interrupted),
            _ => Some(StopReason::Exiting),
        }
    }

    /// Whether the run was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.reason().is_some()
    }

    /// [`Error::Cancelled`] once the run was asked to stop.
    pub fn check(&self) -> Result<()> {
        match self.reason() {
            Some(reason) => Err(Error::Cancelled(reason)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_is_kept_and_clones_share_it() {
        let cancel = Cancel::default();
        assert!(cancel.check().is_ok());
        let clone = cancel.clone();
        clone.stop(StopReason::Exiting);
        cancel.cancel();
        assert_eq!(cancel.reason(), Some(StopReason::Exiting));
        assert!(matches!(
            cancel.check(),
            Err(Error::Cancelled(StopReason::Exiting))
        ));
    }
}
