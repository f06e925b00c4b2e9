#!/usr/bin/env python3
"""Writes a large PyTorch-compatible DCP checkpoint with tiny chunks, for
the `.metadata` scale benchmark (scripts/bench-scale.sh, issue 20): the
metadata of a model saved by FSDP on many ranks, with chunks small enough
for the machine to hold.

  make_dcp_scale.py OUT_DIR --tensors T --ranks R [--cols C]

T tensors of shape [R, C] float32 (default C = 4), each row-sharded over R
ranks: T x R chunks. 1137 tensors x 512 ranks = 582,144 chunks, the count
of a 405B Llama saved by FSDP on 512 ranks (about 1 GB of disk).

OUT_DIR receives:
  checkpoint/     `.metadata` pickled with PyTorch's own metadata classes
                  (as FileSystemWriter.finish does), and one `__<r>_0.distcp`
                  per rank holding that rank's chunks, each a torch.save
                  archive, as FileSystemWriter writes them
  manifest.json   {name: {shape, dtype, sha256}} of every full tensor, for
                  scripts/check_manifest.py

Tensor i holds i * R * C + arange(R * C): every chunk differs.
"""
import argparse
import hashlib
import io
import json
import os
import pickle

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--tensors", type=int, required=True)
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--cols", type=int, default=4)
    args = parser.parse_args()
    ranks, cols = args.ranks, args.cols
    ckpt = os.path.join(args.out, "checkpoint")
    os.makedirs(ckpt, exist_ok=True)
    names = [f"model.layers.{i // 9}.w{i % 9}.weight" for i in range(args.tensors)]
    full = {
        name: (torch.arange(ranks * cols, dtype=torch.float32) + i * ranks * cols).reshape(ranks, cols)
        for i, name in enumerate(names)
    }
    state_dict = {}
    storage = {}
    for name in names:
        chunks = [
            ChunkStorageMetadata(offsets=torch.Size([r, 0]), sizes=torch.Size([1, cols]))
            for r in range(ranks)
        ]
        properties = TensorProperties(dtype=torch.float32)
        state_dict[name] = TensorStorageMetadata(properties, torch.Size([ranks, cols]), chunks)
    for rank in range(ranks):
        file_name = f"__{rank}_0.distcp"
        at = 0
        with open(os.path.join(ckpt, file_name), "wb") as out:
            for name in names:
                buffer = io.BytesIO()
                torch.save(full[name][rank : rank + 1].clone(), buffer)
                data = buffer.getvalue()
                out.write(data)
                index = MetadataIndex(name, torch.Size([rank, 0]))
                storage[index] = _StorageInfo(file_name, at, len(data))
                at += len(data)
    planner = {name: (name,) for name in names}
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(Metadata(state_dict, planner, storage), f)
    manifest = {
        name: {
            "shape": list(t.shape),
            "dtype": "F32",
            "sha256": hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest(),
        }
        for name, t in full.items()
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    print(f"{ckpt}: {len(names)} tensors x {ranks} ranks = {len(names) * ranks} chunks")


if __name__ == "__main__":
    main()
