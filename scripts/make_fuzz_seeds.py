#!/usr/bin/env python3
"""Writes the seed corpus of the `pickle` fuzz target (fuzz/seeds/pickle/;
scripts/fuzz.sh passes it to libFuzzer): DeepSpeed's own data.pkl pickles
from tests/fixtures/deepspeed, and memo-heavy small DCP `.metadata` pickles, made with PyTorch's
own metadata classes and Python's pickler, in which parts are shared
through the pickle memo the way crafted files share them (issue 20): one
tensor entry under many names, one chunk repeated in a list, one attribute
dict behind many objects, lists of shared chunks; and a plain one.

  make_fuzz_seeds.py [OUT_DIR]     (default fuzz/seeds/pickle)

Run with the PyTorch venv's python (target/torch-venv/bin/python); the
seeds are committed, so this only needs to run again to change them.
"""
import os
import pickle
import sys

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)


def chunk(row, cols=4):
    return ChunkStorageMetadata(offsets=torch.Size([row, 0]), sizes=torch.Size([1, cols]))


def tensor(rows, chunks):
    return TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([rows, 4]), chunks)


def storage(state_dict):
    out = {}
    at = 0
    for name, entry in state_dict.items():
        if isinstance(entry, BytesStorageMetadata):
            out[MetadataIndex(name)] = _StorageInfo("__0_0.distcp", at, 10)
            at += 10
            continue
        for c in entry.chunks:
            out[MetadataIndex(name, c.offsets)] = _StorageInfo("__0_0.distcp", at, 100)
            at += 100
    return out


def metadata(state_dict, with_storage=True):
    planner = {name: ("model", name) for name in state_dict}
    return Metadata(state_dict, planner, storage(state_dict) if with_storage else {})


def seeds():
    plain = {f"t{i}": tensor(8, [chunk(r) for r in range(8)]) for i in range(4)}
    plain["step"] = BytesStorageMetadata()
    yield "plain", metadata(plain)
    shared_entry = tensor(8, [chunk(r) for r in range(8)])
    yield "shared-entry", metadata({f"t{i}": shared_entry for i in range(64)}, False)
    one = chunk(0)
    yield "repeated-chunk", metadata({"w": tensor(256, [one] * 256)}, False)
    chunks = [chunk(r) for r in range(32)]
    yield "shared-chunks", metadata({f"t{i}": tensor(32, list(chunks)) for i in range(32)}, False)
    shared_list = [chunk(r) for r in range(16)]
    yield "shared-list", metadata({f"t{i}": tensor(16, shared_list) for i in range(16)}, False)
    first = tensor(1, [chunk(0)])
    first.__dict__.update({f"junk{k}": None for k in range(200)})
    entries = {"t0": first}
    for i in range(1, 32):
        other = TensorStorageMetadata.__new__(TensorStorageMetadata)
        object.__setattr__(other, "__dict__", first.__dict__)
        entries[f"t{i}"] = other
    yield "shared-attributes", metadata(entries, False)


def deepspeed_seeds():
    """The data.pkl of every kind of file the DeepSpeed fixtures hold (a
    model-states and an optimizer-states file of each stage, BF16_Optimizer,
    sub-groups), as DeepSpeed pickled them."""
    import glob
    import zipfile

    root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "deepspeed")
    for case in ["z1-w2-bf16", "z2-w2-bf16", "z3-w2-bf16", "bf16opt-z1-w2", "z3-w2-bf16-subgroups-untied"]:
        for path in sorted(glob.glob(os.path.join(root, case, "checkpoint", "global_step2", "*rank_0*.pt"))):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
                kind = "optim" if "optim_states" in path else "model"
                yield f"ds-{case}-{kind}.pkl", archive.read(name)
    # A training script's client state, as DeepSpeed pickles it into the
    # model-states file: numpy numbers, an RNG state, argparse arguments.
    import argparse

    import numpy as np

    state = {
        "iteration": np.int64(7),
        "loss": np.float32(1.5),
        "rng": np.random.RandomState(0).get_state(),
        "args": argparse.Namespace(lr=0.1),
    }
    yield "ds-client-state.pkl", pickle.dumps(state, protocol=2)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "fuzz/seeds/pickle"
    os.makedirs(out, exist_ok=True)
    for name, data in deepspeed_seeds():
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(data)
        print(path, len(data))
    for name, value in seeds():
        for protocol in (2, 4):
            path = os.path.join(out, f"{name}-p{protocol}.pkl")
            with open(path, "wb") as f:
                pickle.dump(value, f, protocol=protocol)
            print(path, os.path.getsize(path))


if __name__ == "__main__":
    main()
