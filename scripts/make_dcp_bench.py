#!/usr/bin/env python3
"""Writes a Llama-like bf16 checkpoint of about GB gigabytes in PyTorch DCP's
default format (`.metadata` + `__R_I.distcp`), for scripts/bench.sh.

  make_dcp_bench.py OUT_DIR --gb G [--ranks 2] [--layout mixed|rows]

OUT_DIR receives:
  checkpoint/     written by PyTorch's own dcp.save with FileSystemWriter from
                  RANKS gloo ranks on CPU, every weight a DTensor
  manifest.json   {name: {shape, dtype, sha256}} of every full tensor, for
                  scripts/check_manifest.py

Layouts (1-D mesh over the ranks):
  mixed   embeddings, lm_head, q/k/v, gate/up row-sharded (Shard(0)); o_proj
          and down_proj column-sharded (Shard(1)); norms replicated
  rows    every matrix row-sharded; norms replicated

The checkpoint holds tensors only: no step counter or other non-tensor value
(accelerate merge-weights, the peer it is timed against, crashes on those).

Each rank generates only its own pieces, each piece from a seed of its own
(tensor name and piece index), so no tensor is ever gathered over gloo; the
manifest is computed afterwards, one full tensor at a time, by building each
tensor from the same seeded pieces. The rendezvous port is DCP_BENCH_PORT, or
a free one.
"""
import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

REPLICATED = None  # placement of the norms: one piece, the same on every rank


def shapes(gb):
    """(hidden, vocab, layers): Llama shapes (hidden 2048, vocab 32000, MLP
    width 2 x hidden) with as many layers as reach about GB of bf16, the same
    sizing as the safetensors checkpoints of scripts/bench.sh; hidden 256 and
    vocab 4000 below 0.5 GB, for smoke runs."""
    hidden, vocab = (2048, 32000) if gb >= 0.5 else (256, 4000)
    layers = max(1, round((gb * 1e9 / 2 - 2 * vocab * hidden) / (10 * hidden * hidden)))
    return hidden, vocab, layers


def tensor_specs(gb, layout):
    """[(name, full shape, shard dim or REPLICATED)] in state-dict order."""
    hidden, vocab, layers = shapes(gb)
    cols = 1 if layout == "mixed" else 0
    specs = [("model.embed_tokens.weight", (vocab, hidden), 0)]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (hidden,), REPLICATED),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden), 0),
            (f"{p}.self_attn.k_proj.weight", (hidden, hidden), 0),
            (f"{p}.self_attn.v_proj.weight", (hidden, hidden), 0),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden), cols),
            (f"{p}.post_attention_layernorm.weight", (hidden,), REPLICATED),
            (f"{p}.mlp.gate_proj.weight", (2 * hidden, hidden), 0),
            (f"{p}.mlp.up_proj.weight", (2 * hidden, hidden), 0),
            (f"{p}.mlp.down_proj.weight", (hidden, 2 * hidden), cols),
        ]
    specs += [("model.norm.weight", (hidden,), REPLICATED), ("lm_head.weight", (vocab, hidden), 0)]
    return specs


def piece_shape(shape, dim, ranks):
    """Shape of each rank's piece. DTensor cuts like torch.chunk; the shapes
    here divide evenly, which the caller checks."""
    if dim is REPLICATED:
        return shape
    out = list(shape)
    out[dim] //= ranks
    return tuple(out)


def piece(name, shape, dim, ranks, index):
    """Piece `index` of tensor `name` (the whole tensor when replicated),
    random normal bf16 from a seed of its own."""
    key = f"{name}#{'R' if dim is REPLICATED else index}"
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(piece_shape(shape, dim, ranks), generator=g, dtype=torch.bfloat16)


def save_rank(rank, ranks, specs, ckpt, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    mesh = init_device_mesh("cpu", (ranks,))
    state = {}
    for name, shape, dim in specs:
        local = piece(name, shape, dim, ranks, rank)
        placement = Replicate() if dim is REPLICATED else Shard(dim)
        full_stride = torch.empty(shape, device="meta").stride()
        state[name] = DTensor.from_local(local, mesh, [placement], run_check=False,
                                         shape=torch.Size(shape), stride=full_stride)
    dcp.save(state, storage_writer=FileSystemWriter(ckpt))
    del state  # about GB / RANKS per rank; free it before the barrier
    dist.barrier()
    dist.destroy_process_group()


def manifest(specs, ranks):
    """sha256 of each full tensor's row-major bytes, built one tensor at a time
    from the same seeded pieces the ranks saved."""
    out = {}
    for name, shape, dim in specs:
        if dim is REPLICATED:
            full = piece(name, shape, dim, ranks, 0)
        else:
            full = torch.cat([piece(name, shape, dim, ranks, r) for r in range(ranks)], dim=dim)
        assert tuple(full.shape) == tuple(shape), name
        data = full.contiguous().view(torch.uint8).numpy()
        out[name] = {"shape": list(shape), "dtype": "BF16", "sha256": hashlib.sha256(data).hexdigest()}
        del full, data
    return out


def free_port():
    if os.environ.get("DCP_BENCH_PORT"):
        return int(os.environ["DCP_BENCH_PORT"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    if sys.byteorder != "little":
        sys.exit("manifests hash little-endian bytes: run this on a little-endian machine")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--gb", type=float, required=True, help="approximate checkpoint size in GB (1e9 bytes)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layout", choices=("mixed", "rows"), default="mixed")
    args = parser.parse_args()
    if os.path.exists(args.out_dir):
        sys.exit(f"{args.out_dir} exists: remove it first (the checkpoint is generated whole)")
    specs = tensor_specs(args.gb, args.layout)
    for name, shape, dim in specs:
        if dim is not REPLICATED and shape[dim] % args.ranks:
            sys.exit(f"{name}: dimension {dim} of {shape} does not divide by {args.ranks} ranks: "
                     f"choose --ranks among the divisors of {shape[dim]}")

    # Build in a hidden sibling folder and rename at the end, so an
    # interrupted run leaves no folder that looks complete.
    parent = os.path.dirname(os.path.abspath(args.out_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".dcp-bench-", dir=parent)
    try:
        t0 = time.monotonic()
        ckpt = os.path.join(work, "checkpoint")
        mp.spawn(save_rank, args=(args.ranks, specs, ckpt, free_port()), nprocs=args.ranks, join=True)
        t1 = time.monotonic()
        with open(os.path.join(work, "manifest.json"), "w") as f:
            json.dump(manifest(specs, args.ranks), f, indent=1)
            f.write("\n")
        os.chmod(work, 0o755)  # mkdtemp made it private
        os.rename(work, args.out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    files = sorted(os.listdir(os.path.join(args.out_dir, "checkpoint")))
    size = sum(os.path.getsize(os.path.join(args.out_dir, "checkpoint", f)) for f in files)
    hidden, vocab, layers = shapes(args.gb)
    print(f"{args.out_dir}: torch {torch.__version__}, {args.ranks} ranks, layout {args.layout}, "
          f"hidden {hidden}, vocab {vocab}, {layers} layers, {len(specs)} tensors, "
          f"{len(files)} files, {size / 1e9:.2f} GB; saved in {t1 - t0:.1f} s, "
          f"manifest in {time.monotonic() - t1:.1f} s")


if __name__ == "__main__":
    main()
