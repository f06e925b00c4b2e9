#!/usr/bin/env python3
"""Checks a consolidation of a PyTorch DCP checkpoint against PyTorch's own reader.

  check_dcp_reference.py CKPT_DIR OUT_DIR [--exclude-prefix optim.]...

CKPT_DIR is the DCP checkpoint (`.metadata` + `__R_I.distcp`), loaded whole with
PyTorch's reader, the way torch.distributed.checkpoint.format_utils.dcp_to_torch_save
does (_load_state_dict with _EmptyStateDictLoadPlanner, no_dist=True). OUT_DIR is
the consolidated output, loaded with safetensors.torch.load_file over every file
its model.safetensors.index.json weight_map names.

Every output tensor must be a tensor of the checkpoint with the same dtype, shape
and bytes (bit for bit, so NaN payloads and -0.0 count too), every checkpoint
tensor not under an excluded prefix must be in the output, and the index must
name the file that holds each tensor. Prints "N passed, M failed"; exits 1 on
any failure.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict


def load_checkpoint_tensors(ckpt_dir):
    """{fqn: full tensor} for every tensor of the checkpoint, as PyTorch loads it."""
    reader = FileSystemReader(ckpt_dir)
    metadata = reader.read_metadata()
    nested = {}
    _load_state_dict(nested, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    tensors = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        value = nested
        for key in metadata.planner_data[fqn]:  # the path into the nested state dict
            value = value[key]
        tensors[fqn] = value
    return tensors


def load_output_tensors(out_dir):
    """({name: tensor}, problems) over the files the index's weight_map names."""
    index_path = os.path.join(out_dir, "model.safetensors.index.json")
    with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    tensors, problems = {}, []
    for file_name in sorted(set(weight_map.values())):
        for name, tensor in load_file(os.path.join(out_dir, file_name)).items():
            if weight_map.get(name) != file_name:
                problems.append(f"{name}: in {file_name}, but the index says {weight_map.get(name)}")
            if name in tensors:
                problems.append(f"{name}: in more than one output file")
            tensors[name] = tensor
    for name in sorted(set(weight_map) - set(tensors)):
        problems.append(f"{name}: in the index ({weight_map[name]}) but in no output file")
    return tensors, problems


def raw_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def compare(got, want):
    """None when equal, else what differs."""
    if got.dtype != want.dtype:
        return f"dtype {got.dtype}, PyTorch reads {want.dtype}"
    if got.shape != want.shape:
        return f"shape {list(got.shape)}, PyTorch reads {list(want.shape)}"
    if not torch.equal(raw_bytes(got), raw_bytes(want)):
        differ = (raw_bytes(got) != raw_bytes(want)).nonzero()
        return f"bytes differ ({differ.numel()} of {raw_bytes(got).numel()}, first at byte {differ[0].item()})"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--exclude-prefix", action="append", default=[], metavar="PREFIX",
                        help="checkpoint tensors under PREFIX need not be in the output (repeatable)")
    args = parser.parse_args()

    expected = load_checkpoint_tensors(args.ckpt_dir)
    got, problems = load_output_tensors(args.out_dir)
    passed = 0
    for name, tensor in got.items():
        if name not in expected:
            problems.append(f"{name}: in the output but not a tensor of the checkpoint")
            continue
        difference = compare(tensor, expected[name])
        if difference:
            problems.append(f"{name}: {difference}")
        else:
            passed += 1
    for name in expected:
        if name not in got and not any(name.startswith(p) for p in args.exclude_prefix):
            problems.append(f"{name}: a checkpoint tensor missing from the output")
    for problem in problems:
        print("MISMATCH", problem)
    print(f"{passed} passed, {len(problems)} failed (torch {torch.__version__}, "
          f"{len(expected)} checkpoint tensors, {len(got)} output tensors)")
    return 1 if problems or not got else 0


if __name__ == "__main__":
    sys.exit(main())
