"""Ctrl-C during a one-process call stops it cleanly: the call raises
KeyboardInterrupt once the run has removed its temporary files, and
nothing is published. In a child process of its own, on a checkpoint
that takes seconds to consolidate (conftest.write_column_shards)."""

import signal
import subprocess
import sys

from conftest import NEVER, left_in, wait_until_copying

CTRL_C = """
import logging, sys
import st_consolidate
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
try:
    st_consolidate.consolidate_safetensors_files(sys.argv[1], sys.argv[2], {"w": 1})
    print("returned", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    sys.exit(42)
"""


def test_ctrl_c_during_a_one_process_call_stops_it_cleanly(slow_checkpoint, tmp):
    out = tmp / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C, str(slow_checkpoint), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_copying(proc, out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=NEVER)
    assert proc.returncode == 42, (stdout, stderr)
    lines = stdout.splitlines()
    assert lines[-1] == "KeyboardInterrupt", (stdout, stderr)
    assert "returned" not in lines, stdout
    # The copy itself stopped part-way (not at the next phase, once it
    # had copied everything): the last progress round counts fewer bytes
    # than the total.
    progress = [line for line in lines if line.startswith("progress: ")]
    assert progress and "(100.0%)" not in progress[-1], stdout
    # Nothing published, no temporary file, no lock.
    assert left_in(out) == [], stderr
