//! Interpreter exit while consolidations run on other threads (a daemon
//! thread, as NeMo's async save uses). Once the interpreter finalizes, a
//! thread that takes the GIL again (as every call does when its run ends,
//! and the logger and the communicator do meanwhile) is stopped inside
//! the interpreter or aborts it, and a run cut off at process exit leaves
//! its temporary files and its OUTPUT_DIR lock behind. So every running
//! call is registered here, and an `atexit` callback (registered by
//! `st_consolidate`; exit callbacks run before finalization starts, with
//! the interpreter whole) cancels them all and waits, with the GIL
//! released, until each call has returned to Python: its run removed its
//! temporary files and published nothing. Calls started after that on
//! other threads are refused. Process-wide by nature, as the interpreter's exit is.

use pyo3::prelude::*;
use st_consolidate_mpi::exec::cancel::{Cancel, StopReason};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// The calls in progress, and whether the interpreter is exiting.
struct Calls {
    exiting: bool,
    running: Vec<(u64, Cancel)>,
    next_id: u64,
}

static CALLS: Mutex<Calls> = Mutex::new(Calls {
    exiting: false,
    running: Vec::new(),
    next_id: 0,
});

/// Signalled whenever a call ends.
static ENDED: Condvar = Condvar::new();

fn calls() -> MutexGuard<'static, Calls> {
    // Nothing panics while holding it: a poisoned registry is still whole.
    CALLS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A call in progress, from before its run starts until the call has the
/// GIL again after it: dropping it (at the end of the call) ends it.
pub struct Running(u64);

impl Running {
    /// Registers a call whose run `cancel` stops; `None` for a call on
    /// another thread than the main one once the interpreter is exiting.
    /// The main thread may still call (from an exit callback that runs
    /// after this module's, to save at exit): finalization waits for it.
    pub fn enter(cancel: &Cancel, on_main_thread: bool) -> Option<Running> {
        let mut calls = calls();
        if calls.exiting && !on_main_thread {
            return None;
        }
        let id = calls.next_id;
        calls.next_id += 1;
        calls.running.push((id, cancel.clone()));
        Some(Running(id))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        calls().running.retain(|(id, _)| *id != self.0);
        ENDED.notify_all();
    }
}

/// The `atexit` callback: stops every running consolidation and waits
/// until each call has returned, refusing new ones. It waits as long as
/// runs take to stop: the copy stops within one slice, but a run waiting
/// in a torch.distributed collective stops only when the collective
/// returns or times out.
#[pyfunction]
pub fn stop_for_exit(py: Python<'_>) {
    {
        let mut registry = calls();
        registry.exiting = true;
        for (_, cancel) in &registry.running {
            cancel.stop(StopReason::Exiting);
        }
    }
    // Released: the runs' threads take the GIL to end their calls.
    py.detach(|| {
        let mut registry = calls();
        while !registry.running.is_empty() {
            registry = ENDED.wait(registry).unwrap_or_else(PoisonError::into_inner);
        }
    });
}
