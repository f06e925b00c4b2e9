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
use st_consolidate_mpi::Error;
use st_consolidate_mpi::comm::Communicator;
use st_consolidate_mpi::exec::cancel::StopReason;
use st_consolidate_mpi::failure::{FailureKind, job_message};
use st_consolidate_mpi::messages::Messages;
use st_consolidate_mpi::run::{Summary, run};

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

/// Raises `err` as `st_consolidate`'s exception for its kind: the
/// library's failure protocol has already given every rank the failing
/// rank's kind and message; here kinds only become classes. The rank that
/// was interrupted raises `KeyboardInterrupt`; a peer's interrupt, like
/// any failure of a peer, is a `ConsolidationError` naming that rank.
fn raise(py: Python<'_>, err: &Error, comm: Option<&PyCommunicator>) -> PyErr {
    let message = match comm {
        Some(comm) => job_message(err, comm.rank(), comm.size()),
        None => err.to_string(),
    };
    let class = match (err, err.kind()) {
        (Error::Cancelled(_), FailureKind::Interrupted) => {
            return PyKeyboardInterrupt::new_err(message);
        }
        (_, FailureKind::Input) => "InputError",
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
            message,
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
    let config =
        config::from_options(input_dir, output_dir, options).map_err(|e| raise(py, &e, None))?;
    let comm = PyCommunicator::new(communicator)?;
    let logger = PyLogger::new(logger);
    // As the command does: each output file this rank owns stays open for
    // the run. Raised at the call, not at import, so that importing the
    // package changes nothing in the process.
    st_consolidate_mpi::launch::raise_open_file_limit();
    let watch = signals::on_main_thread(py)?;
    // Held until the call has the GIL again (see `exit`).
    let Some(_running) = exit::Running::enter(&config.cancel, watch) else {
        return Err(raise(py, &Error::Cancelled(StopReason::Exiting), None));
    };
    let (outcome, raised) = py.detach(|| {
        signals::run_watching_signals(
            watch,
            &config.cancel,
            || run(&config, &comm, &logger),
            |e| {
                Err(Error::internal(format!(
                    "cannot start the consolidation's thread: {e} (the process is out of threads or memory; call it from another thread or with fewer threads running)"
                )))
            },
        )
    });
    match (outcome, raised) {
        (Ok(summary), raised) => {
            let dict = summary_dict(py, &summary, &config.output.display().to_string())?;
            if let Some(note) = summary.late_cancel_note(&config.output) {
                logger.warning(&note);
            }
            // The interrupt the signal watcher took while the publish
            // completed: delivered again, as if it arrived now.
            if raised.is_some() {
                py.import("_thread")?.call_method0("interrupt_main")?;
            }
            Ok(dict)
        }
        // The exception a signal handler raised (KeyboardInterrupt), once the
        // run has stopped and cleaned up.
        (Err(_), Some(raised)) => Err(raised),
        (Err(err), None) => Err(raise(py, &err, Some(&comm))),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(consolidate, m)?)?;
    m.add_function(wrap_pyfunction!(exit::stop_for_exit, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
