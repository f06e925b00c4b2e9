//! The library's run as a second front end sees it, without the binary or
//! MPI (it also runs with `--no-default-features`): messages arrive through
//! the sink, the finished report is returned, and a failing collective is
//! an error, not a hang or a panic.

use st_consolidate_mpi::Error;
use st_consolidate_mpi::comm::{Communicator, SingleProcess};
use st_consolidate_mpi::messages::{Messages, ProgressView};
use st_consolidate_mpi::run::{Config, run};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch-dcp-w2")
}

/// Every message, with its kind.
#[derive(Default)]
struct Recorder(RefCell<Vec<(&'static str, String)>>);

impl Messages for Recorder {
    fn info(&self, text: &str) {
        self.0.borrow_mut().push(("info", text.into()));
    }
    fn warning(&self, text: &str) {
        self.0.borrow_mut().push(("warning", text.into()));
    }
    fn detail(&self, text: &str) {
        self.0.borrow_mut().push(("detail", text.into()));
    }
    fn progress(&self, _: u64) -> Box<dyn ProgressView + '_> {
        Box::new(ProgressRecorder(self))
    }
}

struct ProgressRecorder<'a>(&'a Recorder);

impl ProgressView for ProgressRecorder<'_> {
    fn update(&self, done: u64, _: Duration) {
        self.0.0.borrow_mut().push(("progress", done.to_string()));
    }
}

#[test]
fn run_returns_the_report_and_speaks_only_through_the_sink() {
    let out = tempfile::tempdir().unwrap();
    let mut config = Config::new(fixture(), out.path());
    config.verbosity = st_consolidate_mpi::run::Verbosity::Verbose;
    let messages = Recorder::default();
    let summary = run(&config, &SingleProcess, &messages).unwrap();
    let report = summary.report.expect("rank 0 gets the run report");
    assert_eq!(report.outputs.len(), summary.files);
    assert!(summary.files >= 1 && summary.bytes > 0);
    let said = messages.0.borrow();
    assert!(
        said.iter()
            .any(|(kind, text)| *kind == "info" && text.starts_with("consolidating ")),
        "{said:?}"
    );
    assert!(said.iter().any(|(kind, _)| *kind == "detail"), "{said:?}");
    let total: u64 = said
        .iter()
        .filter(|(kind, _)| *kind == "progress")
        .map(|(_, done)| done.parse::<u64>().unwrap())
        .max()
        .unwrap();
    assert_eq!(total, summary.bytes);
}

/// One rank whose gathers fail, as torch.distributed raises on a timeout.
struct BrokenGather;

impl Communicator for BrokenGather {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn ranks_on_node(&self) -> usize {
        1
    }
    fn lowest_failed(&self, failed: bool) -> st_consolidate_mpi::Result<Option<usize>> {
        SingleProcess.lowest_failed(failed)
    }
    fn gather(&self, _: &[u8]) -> st_consolidate_mpi::Result<Option<Vec<Vec<u8>>>> {
        Err(broken())
    }
    fn all_gather(&self, _: &[u8]) -> st_consolidate_mpi::Result<Vec<Vec<u8>>> {
        Err(broken())
    }
    fn broadcast(&self, _: usize, _: &[u8]) -> st_consolidate_mpi::Result<Vec<u8>> {
        Err(broken())
    }
    fn sum_polled(&self, values: [u64; 2]) -> st_consolidate_mpi::Result<[u64; 2]> {
        Ok(values)
    }
}

fn broken() -> Error {
    Error::Communicator {
        rank: 0,
        reason: "timed out".into(),
        hint: "check the job".into(),
    }
}

#[test]
fn a_failing_collective_is_an_error_and_nothing_is_published() {
    let out = tempfile::tempdir().unwrap();
    let config = Config::new(fixture(), out.path());
    let err = run(
        &config,
        &BrokenGather,
        &st_consolidate_mpi::messages::Silent,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Communicator { .. }), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    let published: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .collect();
    assert!(published.is_empty(), "{published:?}");
}

/// A sink that cancels the run when the copy is announced, as the Python
/// extension does on Ctrl-C.
struct CancelsAtCopy(st_consolidate_mpi::exec::cancel::Cancel);

impl Messages for CancelsAtCopy {
    fn info(&self, text: &str) {
        if text.starts_with("consolidating ") {
            self.0.cancel();
        }
    }
    fn warning(&self, _: &str) {}
    fn detail(&self, _: &str) {}
    fn progress(&self, _: u64) -> Box<dyn ProgressView + '_> {
        Box::new(st_consolidate_mpi::messages::Silent)
    }
}

#[test]
fn a_cancelled_run_fails_and_leaves_the_output_folder_empty() {
    let out = tempfile::tempdir().unwrap();
    let config = Config::new(fixture(), out.path());
    let err = run(
        &config,
        &SingleProcess,
        &CancelsAtCopy(config.cancel.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled(_)), "{err}");
    assert!(err.to_string().contains("nothing was published"), "{err}");
    // No output, no temporary file, no lock.
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
