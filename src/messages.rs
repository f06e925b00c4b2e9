//! Where a run's messages go. The library never writes to stderr or stdout
//! itself: each front end provides a sink (the command: stderr and a
//! progress bar; the Python extension: the `logging` module), and the run
//! decides only what to say and when.

use std::time::Duration;

/// Receives what a run has to say. The run calls it from its main thread
/// only, and has already applied the verbosity (nothing is sent when
/// quiet), so a sink only chooses how to show each kind.
pub trait Messages {
    /// A note or a summary line, from rank 0.
    fn info(&self, text: &str);
    /// Something the user should look at, from rank 0; the run goes on.
    fn warning(&self, text: &str);
    /// Per-rank detail (`-v`), from every rank.
    fn detail(&self, text: &str);
    /// Starts showing the job's progress (rank 0 only) towards `total`
    /// bytes.
    fn progress(&self, total: u64) -> Box<dyn ProgressView + '_>;
}

/// One progress display, from its start to its [`ProgressView::finish`].
pub trait ProgressView {
    /// How long to wait between updates when asked for `interval`: a live
    /// bar redraws more often than a log takes lines.
    fn round(&self, interval: Duration) -> Duration {
        interval
    }
    /// `done` of the total bytes are copied, `elapsed` after the start.
    fn update(&self, done: u64, elapsed: Duration);
    /// Copying has ended.
    fn finish(&self) {}
}

/// A sink that drops everything (library tests, callers that want no
/// output).
#[derive(Debug, Default)]
pub struct Silent;

impl Messages for Silent {
    fn info(&self, _: &str) {}
    fn warning(&self, _: &str) {}
    fn detail(&self, _: &str) {}
    fn progress(&self, _: u64) -> Box<dyn ProgressView + '_> {
        Box::new(Silent)
    }
}

impl ProgressView for Silent {
    fn update(&self, _: u64, _: Duration) {}
}
