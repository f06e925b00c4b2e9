"""Shared helpers: checkpoints written as PyTorch's HuggingFaceStorageWriter
writes them (per-rank shards with DCP_SHARDING_INFO), the peers' own
functions (captured before any patch), and outputs read byte for byte."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def torch_peer():
    import torch.distributed.checkpoint._consolidate_hf_safetensors as m

    return m.consolidate_safetensors_files


def nemo_peer():
    import nemo_automodel.components.checkpoint._backports.consolidate_hf_safetensors as m

    return m.consolidate_safetensors_files


def _making_output_dir(peer):
    """PyTorch's function expects output_dir to exist; so do the peers'
    callers (they create it)."""

    def call(input_dir, output_dir, *args, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        return peer(input_dir, output_dir, *args, **kwargs)

    return call


# The originals, before any test patches them.
TORCH_PEER = _making_output_dir(torch_peer())
NEMO_PEER = _making_output_dir(nemo_peer())


def read_outputs(folder):
    """{tensor: (dtype, shape, bytes)} over every .safetensors in folder,
    and the index's (weight_map, total_size) if there is one."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            tensors[name] = (entry["dtype"], entry["shape"], data[8 + n + start : 8 + n + end], path.name)
    index_path = Path(folder) / "model.safetensors.index.json"
    index = None
    if index_path.exists():
        raw = json.loads(index_path.read_text())
        index = (raw["weight_map"], raw["metadata"]["total_size"])
    return tensors, index


def assert_same_output(ours, theirs):
    mine, my_index = read_outputs(ours)
    peer, peer_index = read_outputs(theirs)
    assert sorted(mine) == sorted(peer)
    for name in peer:
        assert mine[name] == peer[name], name
    assert my_index == peer_index


def write_shards(folder, tensors, mapping=None, ranks=2):
    """Writes `tensors` ({name: torch tensor}) as `ranks` ranks of
    HuggingFaceStorageWriter(save_distributed=True) would: each tensor cut
    along dim 0 into one piece per rank (whole if it has fewer rows), one
    file per (rank, output index) holding its pieces and their offsets."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mapping = mapping or {name: 1 for name in tensors}
    count = max(mapping.values())
    for rank in range(ranks):
        per_file = {}
        for name, tensor in tensors.items():
            rows = tensor.shape[0] if tensor.dim() else 0
            if rows >= ranks:
                step = -(-rows // ranks)
                lo, hi = rank * step, min(rows, (rank + 1) * step)
                if lo >= hi:
                    continue
                piece, offsets = tensor[lo:hi], [lo] + [0] * (tensor.dim() - 1)
            elif rank == 0:
                piece, offsets = tensor, [0] * tensor.dim()
            else:
                continue
            per_file.setdefault(mapping.get(name, count), {})[name] = (piece.contiguous(), offsets)
        for index, pieces in per_file.items():
            info = {name: {"saved_offsets": offsets} for name, (_, offsets) in pieces.items()}
            save_file(
                {name: piece for name, (piece, _) in pieces.items()},
                str(folder / f"shard-{rank + 1:05d}-model-{index:05d}-of-{count:05d}.safetensors"),
                metadata={"format": "pt", "DCP_VERSION": "1.0", "DCP_SHARDING_INFO": json.dumps(info)},
            )
    return mapping


def run_torchrun(script, nproc, *args, timeout=120):
    """Runs `script` under torchrun with `nproc` gloo ranks on this host."""
    import random

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={random.randint(20000, 40000)}",
        str(script),
        *map(str, args),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def write_column_shards(folder, rows=4_000_000, columns=64):
    """A checkpoint that is slow to consolidate for its size (256 MB take
    seconds): one uint8 tensor of rows x columns saved by `columns` ranks,
    each holding one column, so that every run of output bytes is a single
    byte gathered from another file. Returns the mapping."""
    from safetensors.torch import save_file

    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(columns):
        column = torch.full((rows, 1), rank, dtype=torch.uint8)
        info = {"w": {"saved_offsets": [0, rank]}}
        save_file(
            {"w": column},
            str(folder / f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"),
            metadata={"format": "pt", "DCP_VERSION": "1.0", "DCP_SHARDING_INFO": json.dumps(info)},
        )
    return {"w": 1}


# The temporary name of the one output file of write_column_shards's
# checkpoint: "." + its final name + the library's suffix. (Other files get
# temporary names earlier: the OUTPUT_DIR lock's token is staged too.)
COPYING_INTO = ".model-00001-of-00001.safetensors.st-consolidate.tmp"

# A safety net, not an assertion on speed: a child that never gets there
# fails the test instead of hanging it.
NEVER = 120


def copying(out):
    """Whether a consolidation into `out` is copying: its output file
    exists under its temporary name (created and sized just before the
    copy)."""
    return (out / COPYING_INTO).exists()


def wait_until_copying(proc, out):
    """Waits until child `proc`'s consolidation into `out` copies."""
    import time

    deadline = time.monotonic() + NEVER
    while not copying(out):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the copy never began"
        time.sleep(0.002)


def left_in(out):
    """Every name in `out`, hidden ones too ([] if it does not exist)."""
    return sorted(os.listdir(out)) if out.is_dir() else []


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("columns") / "in"
    write_column_shards(folder)
    return folder
