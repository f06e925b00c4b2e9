//! The command's message sink: lines on stderr, and on a terminal a live
//! progress bar (one line per round otherwise, for Slurm output files and
//! pipes).

use indicatif::{ProgressBar, ProgressStyle};
use st_consolidate_mpi::messages::{Messages, ProgressView};
use st_consolidate_mpi::progress::line;
use std::io::IsTerminal;
use std::time::Duration;

/// Writes every message to stderr, one write per line: stderr is
/// unbuffered, and a line written in pieces interleaves with other ranks'
/// lines in mpirun's forwarding.
pub struct Stderr;

/// `text` and its newline in one write (`eprintln!` writes them apart).
pub fn write_line(text: &str) {
    use std::io::Write;
    let line = format!("{text}\n");
    // Nowhere to report a failure to write to stderr.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

impl Messages for Stderr {
    fn info(&self, text: &str) {
        write_line(text);
    }
    fn warning(&self, text: &str) {
        write_line(text);
    }
    fn detail(&self, text: &str) {
        write_line(text);
    }
    fn progress(&self, total: u64) -> Box<dyn ProgressView + '_> {
        if !std::io::stderr().is_terminal() {
            return Box::new(Lines { total });
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {percent}% {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Box::new(Bar(bar))
    }
}

/// A live bar on a terminal.
struct Bar(ProgressBar);

impl ProgressView for Bar {
    /// A bar is redrawn often; log lines come once per interval.
    fn round(&self, interval: Duration) -> Duration {
        interval.min(Duration::from_millis(200))
    }
    fn update(&self, done: u64, _: Duration) {
        self.0.set_position(done);
    }
    fn finish(&self) {
        self.0.finish();
    }
}

/// One line per round.
struct Lines {
    total: u64,
}

impl ProgressView for Lines {
    fn update(&self, done: u64, elapsed: Duration) {
        write_line(&line(done, self.total, elapsed));
    }
}
