"""An interpreter that exits while a daemon thread consolidates does not
crash: the running consolidation is stopped and waited for while the
interpreter is still whole, removes its temporary files and lock, and
publishes nothing. In a child process of its own, on a checkpoint that
takes seconds to consolidate (conftest.write_column_shards)."""

import subprocess
import sys

import pytest
from conftest import COPYING_INTO, FIXTURES, NEVER, left_in, read_outputs

EXIT = """
import os, sys, threading, time
import st_consolidate

def consolidate():
    st_consolidate.consolidate_safetensors_files(sys.argv[1], sys.argv[2], {"w": 1})

def copying(out):
    return os.path.exists(os.path.join(out, %r))

threading.Thread(target=consolidate, daemon=True).start()
if sys.argv[3] == "copying":
    while not copying(sys.argv[2]):
        time.sleep(0.002)
print("main module returns", flush=True)
""" % COPYING_INTO


# "at once": the thread may still be reading the checkpoint, or not have
# entered the call yet, when the interpreter exits.
@pytest.mark.parametrize("when", ["copying", "at once"])
def test_exiting_while_a_daemon_thread_consolidates_does_not_crash(slow_checkpoint, tmp, when):
    out = tmp / "out"
    proc = subprocess.run(
        [sys.executable, "-c", EXIT, str(slow_checkpoint), str(out), when],
        capture_output=True,
        text=True,
        timeout=NEVER,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["main module returns"], proc.stdout
    for crash in ("Fatal Python error", "Aborted", "Segmentation fault", "panicked", "core dumped"):
        assert crash not in proc.stderr, proc.stderr
    # Stopped, not cut off at process exit: nothing final-named, and no
    # temporary file or lock left behind.
    assert left_in(out) == [], proc.stderr


SAVE_AT_EXIT = """
import atexit, json, sys

def save():
    import st_consolidate
    mapping = json.load(open(sys.argv[3]))
    st_consolidate.consolidate_safetensors_files(sys.argv[1], sys.argv[2], mapping)
    print("consolidated at exit", flush=True)

atexit.register(save)
# Imported after: its exit callback runs first (callbacks run last in,
# first out), before save().
import st_consolidate
"""


def test_the_main_thread_still_consolidates_from_an_exit_callback(tmp):
    fixture = FIXTURES / "torch-dcp-w2"
    out = tmp / "out"
    proc = subprocess.run(
        [sys.executable, "-c", SAVE_AT_EXIT, str(fixture), str(out), str(fixture / "mapping.json")],
        capture_output=True,
        text=True,
        timeout=NEVER,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["consolidated at exit"], (proc.stdout, proc.stderr)
    tensors, index = read_outputs(out)
    assert tensors and index is not None
