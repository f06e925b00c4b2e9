//! `st_consolidate._native`: the library's run, called from Python.
//!
//! Thin on purpose: keyword arguments become the library's [`Config`], the
//! communicator and the message sink are Python objects, and the outcome
//! becomes a dict or an exception. The GIL is released for the whole run
//! and taken again only by the communicator, the logger and (on the main
//! thread) the signal watcher; no panic crosses into Python. `signals`
//! stops a run on Ctrl-C, `exit` the runs still going when the interpreter
//! exits.

mod comm;
mod config;
mod exit;
mod signals;
mod sink;

use comm::PyCommunicator;
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use sink::PyLogger;
use st_consolidate_mpi::comm::Communicator;
use st_consolidate_mpi::run::{Config, Summary, run};
use st_consolidate_mpi::{Error, Result};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// How a failure is raised in Python.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Kind {
    /// The inputs or the arguments are unusable: `InputError` (a
    /// `ValueError` and a `RuntimeError`).
    Input,
    /// Anything else: `ConsolidationError` (a `RuntimeError`).
    Other,
    /// Ctrl-C: `KeyboardInterrupt`, after the run cleaned up.
    Interrupted,
    /// Another rank failed and says why.
    Peer,
}

/// A failure as every rank raises it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Failure {
    kind: Kind,
    message: String,
}

fn kind_of(err: &Error) -> Kind {
    match err {
        Error::BadFile { .. }
        | Error::BadTensor { .. }
        | Error::NotDcpShard { .. }
        | Error::Inconsistent { .. }
        | Error::Mapping { .. }
        | Error::Unmapped { .. }
        | Error::Usage { .. }
        | Error::BadCheckpoint { .. }
        | Error::BadIndex { .. } => Kind::Input,
        Error::Cancelled => Kind::Interrupted,
        Error::PeerFailed(_) => Kind::Peer,
        _ => Kind::Other,
    }
}

/// Runs the library on this rank with the GIL released. A panic becomes
/// an internal error; a failure anywhere becomes the same [`Failure`] on
/// every rank (the lowest failing rank's), exchanged in one more
/// collective that every rank reaches, since every phase ends in `agree`.
fn run_detached(
    config: &Config,
    comm: &PyCommunicator,
    logger: &PyLogger,
) -> Result<Summary, Failure> {
    let outcome =
        catch_unwind(AssertUnwindSafe(|| run(config, comm, logger))).unwrap_or_else(|panic| {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::internal(format!(
                "a panic in the consolidation: {text}"
            )))
        });
    let err = match outcome {
        Ok(summary) => return Ok(summary),
        Err(err) => err,
    };
    let mine = Failure {
        kind: kind_of(&err),
        message: err.to_string(),
    };
    // A broken communicator would only fail (or time out) again.
    if comm.size() == 1 || matches!(err, Error::Communicator { .. }) {
        return Err(mine);
    }
    let payload = serde_json::to_vec(&mine).unwrap_or_default();
    let Ok(all) = comm.all_gather(&payload) else {
        return Err(mine);
    };
    let first = all.iter().enumerate().find_map(|(rank, bytes)| {
        let failure: Failure = serde_json::from_slice(bytes).ok()?;
        (failure.kind != Kind::Peer).then_some((rank, failure))
    });
    match first {
        Some((rank, failure)) => Err(Failure {
            kind: failure.kind,
            message: format!("rank {rank} failed: {}", failure.message),
        }),
        None => Err(mine),
    }
}

/// The summary as a dict: files, bytes, seconds, skipped, plan (dry run),
/// report (the run report's JSON, rank 0) and human (its closing line).
fn summary_dict<'py>(
    py: Python<'py>,
    summary: &Summary,
    output_dir: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("files", summary.files)?;
    dict.set_item("bytes", summary.bytes)?;
    dict.set_item("seconds", summary.seconds)?;
    dict.set_item("skipped", summary.skipped.clone())?;
    dict.set_item("plan", summary.plan_text.clone())?;
    let report = summary
        .report
        .as_ref()
        .and_then(|r| serde_json::to_string(r).ok());
    dict.set_item("report", report)?;
    let human = summary.report.as_ref().map(|r| r.human(output_dir));
    dict.set_item("human", human)?;
    Ok(dict)
}

/// Raises `failure` as `st_consolidate`'s exception for its kind.
fn raise(py: Python<'_>, failure: Failure) -> PyErr {
    let class = match failure.kind {
        Kind::Interrupted => return PyKeyboardInterrupt::new_err(failure.message),
        Kind::Input => "InputError",
        _ => "ConsolidationError",
    };
    match py
        .import("st_consolidate._errors")
        .and_then(|m| m.getattr(class))
    {
        Ok(class) => PyErr::from_type(
            class
                .cast_into()
                .unwrap_or_else(|_| py.get_type::<pyo3::exceptions::PyRuntimeError>()),
            failure.message,
        ),
        Err(e) => e,
    }
}

/// Consolidates `input_dir` into `output_dir`: see `st_consolidate.consolidate`.
#[pyfunction]
#[pyo3(signature = (input_dir, output_dir, options, communicator, logger))]
fn consolidate<'py>(
    py: Python<'py>,
    input_dir: std::path::PathBuf,
    output_dir: std::path::PathBuf,
    options: &Bound<'py, PyDict>,
    communicator: Option<&Bound<'py, PyAny>>,
    logger: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let config = config::from_options(input_dir, output_dir, options).map_err(|e| {
        raise(
            py,
            Failure {
                kind: kind_of(&e),
                message: e.to_string(),
            },
        )
    })?;
    let comm = PyCommunicator::new(communicator)?;
    let logger = PyLogger::new(logger);
    // As the command does: each output file this rank owns stays open for
    // the run. Raised at the call, not at import, so that importing the
    // package changes nothing in the process.
    st_consolidate_mpi::launch::raise_open_file_limit();
    let watch = signals::on_main_thread(py)?;
    // Held until the call has the GIL again (see `exit`).
    let Some(_running) = exit::Running::enter(&config.cancel, watch) else {
        return Err(raise(
            py,
            Failure {
                kind: Kind::Other,
                message: "the Python interpreter is exiting: no consolidation starts now\n  hint: join the thread that consolidates before the interpreter exits".into(),
            },
        ));
    };
    let (outcome, raised) = py.detach(|| {
        signals::run_watching_signals(
            watch,
            &config.cancel,
            || run_detached(&config, &comm, &logger),
            |e| {
                Err(Failure {
                    kind: Kind::Other,
                    message: format!(
                        "cannot start the consolidation's thread: {e}\n  hint: the process is out of threads or memory; call it from another thread or with fewer threads running"
                    ),
                })
            },
        )
    });
    // The exception a signal handler raised (KeyboardInterrupt), once the
    // run has stopped and cleaned up.
    if let Some(raised) = raised {
        return Err(raised);
    }
    match outcome {
        Ok(summary) => summary_dict(py, &summary, &config.output.display().to_string()),
        // Stopped because the interpreter exits, on a thread that is not
        // interrupted: no KeyboardInterrupt there.
        Err(failure) if failure.kind == Kind::Interrupted && !watch && exit::exiting() => {
            Err(raise(
                py,
                Failure {
                    kind: Kind::Other,
                    ..failure
                },
            ))
        }
        Err(failure) => Err(raise(py, failure)),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(consolidate, m)?)?;
    m.add_function(wrap_pyfunction!(exit::stop_for_exit, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
