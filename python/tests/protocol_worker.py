"""One rank of the torchrun protocol tests (test_protocol.py). Scenarios:

- ``stops``: for N = 1, 2, ... the victim rank sends itself SIGINT at its
  N-th collective (and waits until the call's signal watcher has taken it),
  over an earlier output; records for each N what each rank raised or
  whether the call said it published, and the output folder's files.
- ``options``: rank 1 is given verify=True, rank 0 not.
- ``panic``: rank 1 panics in phase 3 (the library's test hook).
- ``absent``: rank 1 never calls; rank 0's call must fail within the
  group's timeout.
- ``staged``: use_staging with a staging folder of each rank's own (as a
  node-local temporary folder is).

Writes RESULTS/rank-R.json."""

import hashlib
import json
import logging
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

import st_consolidate
from st_consolidate import _dist


def snapshot(folder):
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


class Said(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def outcome_of(call, said):
    said.lines.clear()
    try:
        call()
        what = ["returned", ""]
    except KeyboardInterrupt as e:
        what = ["KeyboardInterrupt", str(e)]
    except st_consolidate.ConsolidationError as e:
        what = [type(e).__name__, str(e)]
    published = any("after the point of no return" in line for line in said.lines)
    return what + [published]


def stops(rank, input_dir, mapping, out, victim=1):
    said = Said()
    logging.getLogger("st_consolidate").addHandler(said)
    counter = {"at": None, "seen": 0}

    class Stopping(_dist.TorchCommunicator):
        """Counts this rank's collectives; at the chosen one, interrupts
        this process and waits until the watcher (every 50 ms) took it."""

        def _step(self):
            counter["seen"] += 1
            if counter["seen"] == counter["at"]:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.3)

        def lowest_failed(self, failed):
            self._step()
            return super().lowest_failed(failed)

        def all_gather(self, payload):
            self._step()
            return super().all_gather(payload)

        def gather(self, payload):
            self._step()
            return super().gather(payload)

        def broadcast(self, payload, root):
            self._step()
            return super().broadcast(payload, root)

    _dist.TorchCommunicator = Stopping
    runs = []
    earlier = dict(fqn_to_index_mapping={name: 1 for name in mapping}, num_threads=1)
    n = 0
    while True:
        n += 1
        folder = f"{out}/stop-{n}"
        # The earlier output: the same tensors in one file.
        st_consolidate.consolidate_safetensors_files_on_every_rank(input_dir, folder, **earlier)
        before = snapshot(folder)
        dist.barrier()
        counter["at"] = n if rank == victim else None
        counter["seen"] = 0
        what = outcome_of(
            lambda: st_consolidate.consolidate_safetensors_files_on_every_rank(
                input_dir, folder, mapping, num_threads=1
            ),
            said,
        )
        called = counter["seen"]
        counter["at"] = None
        dist.barrier()
        runs.append({"at": n, "outcome": what, "before": before, "after": snapshot(folder), "left": sorted(os.listdir(folder))})
        # Past the victim's last collective: the last run was not stopped.
        done = [called < n]
        dist.broadcast_object_list(done, src=victim)
        if done[0]:
            break
    return {"runs": runs}


def main(scenario, input_dir, mapping_file, out, results):
    timeout = timedelta(seconds=15 if scenario == "absent" else 120)
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    mapping = json.loads(Path(mapping_file).read_text())
    seen = {"rank": rank}
    said = Said()
    logging.getLogger("st_consolidate").addHandler(said)
    if scenario == "stops":
        seen.update(stops(rank, input_dir, mapping, out))
    elif scenario == "options":
        seen["outcome"] = outcome_of(
            lambda: st_consolidate.consolidate(input_dir, f"{out}/options", verify=rank == 1), said
        )
        seen["exists"] = os.path.exists(f"{out}/options")
    elif scenario == "panic":
        if rank == 1:
            os.environ["ST_CONSOLIDATE_TEST_PANIC_AT_PHASE"] = "3"
        started = time.monotonic()
        seen["outcome"] = outcome_of(
            lambda: st_consolidate.consolidate_safetensors_files_on_every_rank(input_dir, f"{out}/panic", mapping),
            said,
        )
        seen["seconds"] = time.monotonic() - started
        seen["left"] = sorted(os.listdir(f"{out}/panic")) if os.path.isdir(f"{out}/panic") else []
    elif scenario == "absent":
        if rank == 0:
            started = time.monotonic()
            seen["outcome"] = outcome_of(
                lambda: st_consolidate.consolidate_safetensors_files_on_every_rank(
                    input_dir, f"{out}/absent", mapping
                ),
                said,
            )
            seen["seconds"] = time.monotonic() - started
        else:
            time.sleep(30)
        Path(results, f"rank-{rank}.json").write_text(json.dumps(seen))
        os._exit(0)
    elif scenario == "staged":
        staging = f"{out}/node-local-{rank}"
        os.makedirs(staging)
        st_consolidate.consolidate_safetensors_files_on_every_rank(
            input_dir, f"{out}/staged", mapping, use_staging=True, staging_dir=staging
        )
        st_consolidate.consolidate_safetensors_files_on_every_rank(input_dir, f"{out}/plain", mapping)
        seen["staging_left"] = os.listdir(staging)
    dist.barrier()
    Path(results, f"rank-{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
