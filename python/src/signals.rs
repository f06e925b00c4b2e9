//! Ctrl-C during a call. Python runs signal handlers only on its main
//! thread, and only while that thread runs Python code; a call releases
//! the GIL for the whole run, so nothing would notice Ctrl-C until the
//! run ends. On the main thread, the run therefore goes to a thread of its
//! own while the calling thread watches: every [`SIGNAL_POLL`] it attaches
//! and runs the pending signal handlers. When one raises (KeyboardInterrupt
//! from Ctrl-C, or an exception of the application's own handler), the run
//! is cancelled and waited for (it removes its temporary files and
//! publishes nothing), and the call raises that exception.

use pyo3::prelude::*;
use st_consolidate_mpi::exec::cancel::Cancel;
use std::sync::mpsc;
use std::time::Duration;

/// How often the watcher looks for a signal: prompt for a person at the
/// keyboard, and a GIL acquisition every 50 ms costs the copy nothing (it
/// never takes the GIL).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Whether the calling thread is Python's main thread, the only one whose
/// signal handlers run.
pub fn on_main_thread(py: Python<'_>) -> PyResult<bool> {
    let threading = py.import("threading")?;
    let current = threading.call_method0("current_thread")?;
    let main = threading.call_method0("main_thread")?;
    Ok(current.is(&main))
}

/// Runs `work` (with the GIL released by the caller); if `watch`, on a
/// thread of its own while this thread runs Python's signal handlers and
/// cancels `cancel` when one raises. Returns what `work` returned (or
/// `no_thread`'s value if no thread could be started) and the exception a
/// handler raised, if any.
pub fn run_watching_signals<T: Send>(
    watch: bool,
    cancel: &Cancel,
    work: impl FnOnce() -> T + Send,
    no_thread: impl FnOnce(std::io::Error) -> T,
) -> (T, Option<PyErr>) {
    if !watch {
        return (work(), None);
    }
    let (done_tx, done_rx) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("st-consolidate".into())
            .spawn_scoped(scope, move || {
                // Dropped when the work ends, even by a panic: wakes the
                // watcher at once instead of at its next poll.
                let _done = done_tx;
                work()
            });
        let worker = match worker {
            Ok(worker) => worker,
            Err(e) => return (no_thread(e), None),
        };
        let mut raised = None;
        while let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(SIGNAL_POLL) {
            if raised.is_some() {
                continue;
            }
            if let Some(Err(e)) = Python::try_attach(|py| py.check_signals()) {
                raised = Some(e);
                cancel.cancel();
            }
        }
        match worker.join() {
            Ok(value) => (value, raised),
            // The work catches its panics (`run_detached`); should one
            // escape, pyo3 turns it into a PanicException.
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
