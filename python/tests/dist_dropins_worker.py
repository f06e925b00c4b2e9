"""One rank of test_dropins.py's torchrun cases, each next to what
PyTorch's own function does on the same call. Writes what it saw to
RESULTS/rank-R.json.

- outsider: a subgroup of rank 0 only; rank 1, not a member, calls with it.
- reinit: a call, destroy_process_group, a new init_process_group, a call;
  with "twin", the collectives go over a gloo twin of the default group (as
  for NCCL), whose cache must follow the group's lifetime.
- never: rank 1 never calls; rank 0's call must fail within the group's
  timeout with a ConsolidationError, not a raw gloo error.
"""

import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

import st_consolidate
from st_consolidate import _dist


def outcome(call):
    try:
        call()
        return None
    except Exception as e:
        return [type(e).__name__, str(e)]


def torch_peer():
    import torch.distributed.checkpoint._consolidate_hf_safetensors as m

    return m.consolidate_safetensors_files_on_every_rank


def main(scenario, input_dir, mapping_file, out, results, variant=""):
    mapping = json.loads(Path(mapping_file).read_text())
    seen = {}
    if scenario == "outsider":
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        sub = dist.new_group(ranks=[0])
        seen["ours"] = outcome(
            lambda: st_consolidate.consolidate_safetensors_files_on_every_rank(
                input_dir, f"{out}/ours", mapping, process_group=sub
            )
        )
        os.makedirs(f"{out}/peer", exist_ok=True)
        seen["peer"] = outcome(lambda: torch_peer()(input_dir, f"{out}/peer", mapping, process_group=sub))
    elif scenario == "reinit":
        if variant == "twin":
            # The default group is gloo here; make the drop-in treat it as
            # one whose collectives need a gloo twin (an NCCL group).
            _dist._needs_twin = lambda dist, group: True
        # A store per incarnation: torch names groups alike after a re-init
        # (its group count starts again) and torchrun's store keeps the
        # first incarnation's keys, so init_process_group itself, on that
        # store, may read a departed peer's address and fail ("Gloo
        # connectFullMesh failed ... Connection refused"): torch's race,
        # not the drop-in's.
        stores = iter([f"file://{out}/store-1", f"file://{out}/store-2"])
        ranks = {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}

        def init(backend):
            dist.init_process_group(backend, init_method=next(stores), **ranks)

        init("gloo")
        rank = dist.get_rank()
        seen["first"] = outcome(
            lambda: st_consolidate.consolidate_safetensors_files_on_every_rank(input_dir, f"{out}/first", mapping)
        )
        first_world = dist.group.WORLD
        dist.destroy_process_group()
        del first_world
        gc.collect()
        seen["twins_after_destroy"] = len(_dist._gloo_twins)
        init("gloo")
        seen["second"] = outcome(
            lambda: st_consolidate.consolidate_safetensors_files_on_every_rank(input_dir, f"{out}/second", mapping)
        )
        seen["twins"] = len(_dist._gloo_twins)
        os.makedirs(f"{out}/peer-second", exist_ok=True)
        seen["peer"] = outcome(lambda: torch_peer()(input_dir, f"{out}/peer-second", mapping))
    elif scenario == "never":
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
        rank = dist.get_rank()
        done = Path(results, "rank-0.json")
        if rank == 0:
            started = time.monotonic()
            seen["ours"] = outcome(
                lambda: st_consolidate.consolidate_safetensors_files_on_every_rank(input_dir, f"{out}/ours", mapping)
            )
            seen["seconds"] = time.monotonic() - started
        else:
            # Never calls: waits for rank 0 to have failed, then leaves.
            while not done.exists():
                time.sleep(0.05)
            return
        done.write_text(json.dumps(seen))
        # The group is broken: leave without its collectives.
        sys.stdout.flush()
        os._exit(0)
    dist.barrier()
    Path(results, f"rank-{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
