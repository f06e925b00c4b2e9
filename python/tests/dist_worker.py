"""One rank of the torchrun tests (test_dist.py): on_every_rank with the
default group, with process_group=None, and with a subgroup that excludes
global rank 0; or a failure on the last rank. Writes what it saw to
RESULTS/rank-R.json."""

import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

import st_consolidate


def main(scenario, input_dir, mapping_file, out, results):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mapping = json.loads(Path(mapping_file).read_text())
    seen = {"rank": rank, "world": world}
    if scenario == "outputs":
        st_consolidate.consolidate_safetensors_files_on_every_rank(input_dir, f"{out}/default", mapping, num_threads=2)
        st_consolidate.consolidate_safetensors_files_on_every_rank(
            input_dir, f"{out}/none", mapping, num_threads=2, process_group=None
        )
        # new_group is collective over the world: every rank calls it.
        members = list(range(1, world)) or [0]
        sub = dist.new_group(ranks=members)
        if rank in members:
            st_consolidate.consolidate_safetensors_files_on_every_rank(
                input_dir, f"{out}/sub", mapping, num_threads=2, process_group=sub
            )
            summary = st_consolidate.consolidate(input_dir, f"{out}/sub-consolidate", process_group=sub)
            seen["sub_files"] = summary.files
    elif scenario == "failure":
        # The last rank is given a folder that is not there.
        given = f"{input_dir}-missing" if rank == world - 1 else input_dir
        started = time.monotonic()
        try:
            st_consolidate.consolidate_safetensors_files_on_every_rank(given, f"{out}/fail", mapping)
        except Exception as e:
            seen["error"] = [type(e).__name__, str(e), isinstance(e, ValueError), isinstance(e, RuntimeError)]
        seen["seconds"] = time.monotonic() - started
    dist.barrier()
    Path(results, f"rank-{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
