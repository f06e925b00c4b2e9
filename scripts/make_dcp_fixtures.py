#!/usr/bin/env python3
"""Writes small PyTorch DCP checkpoints in the default FileSystemWriter format
(`.metadata` + `__R_I.distcp`), for the tests of the DCP reader.

  make_dcp_fixtures.py OUT_DIR --variant NAME    one fixture into OUT_DIR
  make_dcp_fixtures.py --all FIXTURES_DIR        every variant this PyTorch
      supports, into FIXTURES_DIR/dcp-v<MAJOR><MINOR>-<variant>

Each fixture folder holds:
  checkpoint/         written by dcp.save from WORLD gloo ranks on CPU
  manifest.json       {name: {shape, dtype, sha256}} of every full model tensor
                      (not optim.*, not non-tensor entries), computed from the
                      original full tensors before saving
  manifest-all.json   the same, including the optimizer-state tensors
  reference.json      the manifest of what PyTorch's own reader
                      (_load_state_dict + _EmptyStateDictLoadPlanner) loads back,
                      model tensors; the script fails unless what it loads
                      equals manifest-all.json, optimizer state included
  mapping.json        {name: output file index from 1} for the model tensors
  info.json           torch version, ranks, mesh, thread_count, stream
                      transforms, each tensor's placements, non-tensor entries

The ranks never communicate tensors: each builds every full tensor from a
fixed seed and keeps its own piece, so dtypes gloo cannot scatter (float8,
uint16...) can be sharded too. The rendezvous port is DCP_FIXTURE_PORT, or a
free one.
"""
import argparse
import hashlib
import inspect
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.device_mesh import init_device_mesh

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # PyTorch < 2.5 kept DTensor private
    from torch.distributed._tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed._tensor._utils import compute_local_shape_and_global_offset

OPTIM_PREFIX = "optim."

# torch dtype -> safetensors dtype string, for the dtypes this PyTorch has.
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64",
}


def torch_version():
    """(major, minor) of this PyTorch, e.g. (2, 15)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def version_tag():
    return "v%d%d" % torch_version()


def has_dtype(name):
    """Whether this PyTorch has the dtype and can torch.save it (2.5 has
    uint16/32/64 but no storage class to pickle them with)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        return False
    try:
        torch.save(torch.zeros(dtype.itemsize, dtype=torch.uint8).view(dtype), io.BytesIO())
    except (KeyError, RuntimeError, TypeError):
        return False
    return True


# ---------------------------------------------------------------- tensors

def seeded(name):
    """One generator per tensor name, so every rank and the manifest agree."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def make_tensor(name, shape, dtype):
    """Random values covering the dtype: normal floats, finite float8 values,
    every bit pattern of integers, both booleans."""
    g = seeded(name)
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g, dtype=torch.uint8).bool()
    if dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        base = torch.float64 if dtype == torch.float64 else torch.float32
        return (torch.randn(shape, generator=g, dtype=base) * 3).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if str(dtype) == "torch.float8_e8m0fnu":
        # Powers of two, unsigned: every exponent byte except 0xFF (NaN).
        return torch.randint(0, 255, shape, generator=g, dtype=torch.uint8).view(dtype)
    if dtype.is_floating_point and dtype.itemsize == 1:
        # float8: finite random values (NaN never compares equal, which would
        # make torch.equal useless in the checks).
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    # Integers: every bit pattern, via random bytes.
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def tensor_bytes(t):
    """Row-major little-endian bytes of the full tensor (x86 is little endian)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def describe(t):
    return {"shape": list(t.shape), "dtype": SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")],
            "sha256": hashlib.sha256(tensor_bytes(t)).hexdigest()}


# ---------------------------------------------------------------- variants
# A variant is a list of (name, shape, dtype name, placements) where placements
# is None for a plain (non-DTensor) tensor that every rank holds, plus the
# non-tensor entries. "S0" = Shard(0), "R" = Replicate().

def variant_w2():
    tensors = [
        ("model.embed_tokens.weight", (1001, 32), "bfloat16", ["S0"]),          # rows, uneven
        ("model.layers.0.self_attn.q_proj.weight", (64, 66), "bfloat16", ["S1"]),  # columns
        ("model.layers.0.self_attn.k_proj.weight", (32, 65), "float16", ["S1"]),   # columns, uneven
        ("model.layers.0.self_attn.v_proj.weight", (32, 64), "float32", ["R"]),    # replicated
        ("model.layers.0.self_attn.o_proj.weight", (64, 64), "float32", None),     # plain tensor
        ("model.layers.0.mlp.gate_proj.weight", (1, 64), "bfloat16", ["S0"]),      # rank 1 empty
        ("model.layers.0.mlp.up_proj.bias", (1,), "float32", ["S0"]),              # rank 1 empty
        ("model.layers.0.mlp.down_proj.weight", (64, 1), "float16", ["S1"]),       # rank 1 empty
        ("model.layers.0.conv.weight", (3, 5, 7, 9), "float64", ["S3"]),           # 4-D, last dim
        ("model.layers.0.input_layernorm.weight", (64,), "float32", ["R"]),
        ("model.norm.weight", (3,), "bfloat16", ["S0"]),                           # 1-D uneven
        ("model.scale", (), "float32", ["R"]),                                     # 0-d DTensor
        ("model.temperature", (), "float64", None),                                # 0-d plain
        ("lm_head.weight", (1003, 32), "bfloat16", ["S0"]),
        ("optim.state.model.embed_tokens.weight.exp_avg", (1001, 32), "float32", ["S0"]),
        ("optim.state.model.embed_tokens.weight.exp_avg_sq", (1001, 32), "float32", ["S0"]),
        ("optim.state.model.layers.0.self_attn.q_proj.weight.exp_avg", (64, 66), "float32", ["S1"]),
        ("optim.state.model.layers.0.self_attn.q_proj.weight.step", (), "float32", None),
    ]
    extras = {"step": 7, "extra": {"lr": 0.1, "note": "fixture"},
              "optim.param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0, 1]}]}
    return tensors, extras


def variant_w4_mesh():
    tensors = [
        ("model.embed_tokens.weight", (1001, 16), "float32", ["S0", "S0"]),      # 4 row chunks, uneven
        ("model.layers.0.self_attn.q_proj.weight", (64, 66), "bfloat16", ["S0", "S1"]),
        ("model.layers.0.self_attn.k_proj.weight", (30, 66), "bfloat16", ["S1", "S0"]),
        ("model.layers.0.self_attn.v_proj.weight", (32, 48), "float16", ["R", "S1"]),  # dp replicas
        ("model.layers.0.self_attn.o_proj.weight", (48, 32), "float16", ["S0", "R"]),
        ("model.layers.0.mlp.up_proj.weight", (3, 5), "float32", ["S0", "S1"]),       # uneven both
        ("model.layers.0.mlp.up_proj.bias", (3,), "float32", ["S0", "S0"]),           # one empty
        ("model.layers.0.mlp.gate_proj.weight", (1, 4), "bfloat16", ["S0", "S1"]),    # two empty
        ("model.layers.0.mlp.down_proj.weight", (2, 3, 4, 10), "bfloat16", ["S3", "S3"]),  # 4-D
        ("model.layers.0.input_layernorm.weight", (32,), "float32", ["R", "R"]),
        ("model.scale", (), "float32", ["R", "R"]),
        ("lm_head.weight", (64, 16), "float64", None),
        ("optim.state.model.layers.0.self_attn.q_proj.weight.exp_avg", (64, 66), "float32", ["S0", "S1"]),
    ]
    extras = {"step": 11, "extra": {"lr": 0.05, "mesh": "dp x tp"}}
    return tensors, extras


DTYPE_ORDER = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
               "uint64", "uint32", "uint16", "uint8", "bool", "float8_e4m3fn", "float8_e5m2",
               "float8_e8m0fnu"]


def variant_dtypes_t3():
    tensors = []
    for i, dtype in enumerate(d for d in DTYPE_ORDER if has_dtype(d)):
        layer = f"model.layers.{i}"
        tensors += [
            (f"{layer}.self_attn.q_proj.weight", (7, 6), dtype, ["S0"]),   # rows, uneven
            (f"{layer}.self_attn.o_proj.weight", (4, 9), dtype, ["S1"]),   # columns, uneven
            (f"{layer}.input_layernorm.weight", (5,), dtype, ["R"]),
        ]
    tensors.append(("optim.state.model.layers.0.self_attn.q_proj.weight.exp_avg", (7, 6), "float32", ["S0"]))
    return tensors, {"step": 3}


def variant_zstd():
    tensors = [
        ("model.embed_tokens.weight", (33, 16), "bfloat16", ["S0"]),
        ("model.layers.0.self_attn.q_proj.weight", (16, 18), "float32", ["S1"]),
        ("model.norm.weight", (16,), "float32", ["R"]),
    ]
    return tensors, {"step": 1}


def variant_more_dtypes():
    """Dtypes safetensors names but the converter refuses (complex64, fnuz float8)."""
    tensors = []
    for i, dtype in enumerate(d for d in ("complex64", "float8_e4m3fnuz", "float8_e5m2fnuz") if has_dtype(d)):
        tensors.append((f"model.layers.{i}.self_attn.q_proj.weight", (5, 4), dtype, ["S0"]))
    tensors.append(("model.norm.weight", (4,), "float32", ["R"]))
    return tensors, {}


# name -> (builder, world size, mesh shape, thread_count, zstd)
VARIANTS = {
    "w2": (variant_w2, 2, (2,), 1, False),
    "w4-mesh": (variant_w4_mesh, 4, (2, 2), 1, False),
    "dtypes-t3": (variant_dtypes_t3, 2, (2,), 3, False),
    "zstd": (variant_zstd, 2, (2,), 1, True),
    "more-dtypes": (variant_more_dtypes, 2, (2,), 1, False),
}


def zstd_extension():
    try:
        from torch.distributed.checkpoint._extension import ZStandard
    except ImportError:
        return None
    return ZStandard() if ZStandard.is_available() else None


def unsupported_reason(variant):
    """None when this PyTorch can write the variant, else why not."""
    _, _, _, _, zstd = VARIANTS[variant]
    if zstd and "_extensions" not in inspect.signature(FileSystemWriter).parameters:
        return "its FileSystemWriter has no _extensions (stream transforms)"
    if zstd and zstd_extension() is None:
        return "ZStandard needs the zstandard module (pip install zstandard, or put it on PYTHONPATH)"
    if variant == "more-dtypes" and not has_dtype("complex64"):
        return "it cannot save complex64"
    return None


def placement(code):
    return Replicate() if code == "R" else Shard(int(code[1:]))


def layout(codes):
    if codes is None:
        return "plain tensor on every rank"
    return ", ".join("Replicate()" if c == "R" else f"Shard({c[1:]})" for c in codes)


def full_tensors(variant):
    tensors, extras = VARIANTS[variant][0]()
    return [(n, make_tensor(n, s, getattr(torch, d)), p) for n, s, d, p in tensors], extras


# ---------------------------------------------------------------- saving

def local_dtensor(full, mesh, placements):
    """This rank's piece as a DTensor, split locally by DTensor's own code when
    this PyTorch can (src_data_rank=None), else by the same offsets DCP uses."""
    if "src_data_rank" in inspect.signature(distribute_tensor).parameters:
        return distribute_tensor(full, mesh, placements, src_data_rank=None)
    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    local = full
    for dim, (start, size) in enumerate(zip(offset, shape)):
        local = local.narrow(dim, start, size)
    return DTensor.from_local(local.clone(), mesh, placements, run_check=False,
                              shape=full.shape, stride=full.stride())


def save_rank(rank, variant, work, port):
    _, world, mesh_shape, thread_count, zstd = VARIANTS[variant]
    os.chdir(work)  # so .metadata records the relative checkpoint id "checkpoint"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    names = ("dp", "tp")[: len(mesh_shape)] if len(mesh_shape) > 1 else None
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    tensors, extras = full_tensors(variant)
    state = dict(extras)
    for name, full, codes in tensors:
        state[name] = full.clone() if codes is None else local_dtensor(full, mesh, [placement(c) for c in codes])
    kwargs = {"thread_count": thread_count}
    if zstd:
        kwargs["_extensions"] = [zstd_extension()]
    dcp.save(state, storage_writer=FileSystemWriter("checkpoint", **kwargs))
    dist.barrier()
    if torch_version() >= (2, 6):
        dist.destroy_process_group()
    # else: PyTorch 2.5's gloo at times hangs in destroy_process_group on the
    # rank hosting the store once its peers have left; exiting frees it all.


def free_port():
    if os.environ.get("DCP_FIXTURE_PORT"):
        return int(os.environ["DCP_FIXTURE_PORT"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- reference

def load_with_torch(ckpt):
    """What PyTorch's own reader loads (the path dcp_to_torch_save takes):
    returns ({fqn: tensor}, {fqn: non-tensor value}) by flat fqn."""
    reader = FileSystemReader(ckpt)
    metadata = reader.read_metadata()
    nested = {}
    _load_state_dict(nested, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    tensors, others = {}, {}
    for fqn, meta in metadata.state_dict_metadata.items():
        value = nested
        for key in metadata.planner_data[fqn]:
            value = value[key]
        (tensors if isinstance(meta, TensorStorageMetadata) else others)[fqn] = value
    return tensors, others


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


def generate(variant, out_dir):
    if os.path.exists(out_dir):
        sys.exit(f"{out_dir} exists: remove it first (fixtures are regenerated whole)")
    builder, world, mesh_shape, thread_count, zstd = VARIANTS[variant]
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".dcp-fixture-", dir=parent)
    try:
        mp.spawn(save_rank, args=(variant, work, free_port()), nprocs=world, join=True)
        tensors, extras = full_tensors(variant)
        manifest_all = {name: describe(t) for name, t, _ in tensors}
        manifest = {n: d for n, d in manifest_all.items() if not n.startswith(OPTIM_PREFIX)}
        loaded, others = load_with_torch(os.path.join(work, "checkpoint"))
        reference_all = {name: describe(t) for name, t in loaded.items()}
        if reference_all != manifest_all:
            bad = sorted(n for n in set(reference_all) | set(manifest_all)
                         if reference_all.get(n) != manifest_all.get(n))
            sys.exit(f"{variant}: PyTorch's reader disagrees with the saved tensors on {bad}")
        reference = {n: reference_all[n] for n in manifest}
        model = list(manifest)
        half = (len(model) + 1) // 2
        write_json(os.path.join(work, "manifest.json"), manifest)
        write_json(os.path.join(work, "manifest-all.json"), manifest_all)
        write_json(os.path.join(work, "reference.json"), reference)
        write_json(os.path.join(work, "mapping.json"), {n: 1 if i < half else 2 for i, n in enumerate(model)})
        write_json(os.path.join(work, "info.json"), {
            "torch": torch.__version__, "variant": variant, "world_size": world,
            "mesh_shape": list(mesh_shape), "thread_count": thread_count,
            "stream_transforms": ["zstd"] if zstd else [],
            "placements": {n: layout(p) for n, _, p in tensors},
            "non_tensor_entries": sorted(others),
        })
        os.chmod(work, 0o755)  # mkdtemp made it private
        os.rename(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    files = sorted(os.listdir(os.path.join(out_dir, "checkpoint")))
    size = sum(os.path.getsize(os.path.join(out_dir, "checkpoint", f)) for f in files)
    print(f"{out_dir}: torch {torch.__version__}, {world} ranks, {len(manifest)} model + "
          f"{len(manifest_all) - len(manifest)} optim tensors, {len(others)} non-tensor entries, "
          f"files {files}, {size} bytes; PyTorch's reader agrees")


def main():
    if sys.byteorder != "little":
        sys.exit("manifests hash little-endian bytes: run this on a little-endian machine")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="w2")
    parser.add_argument("--all", metavar="FIXTURES_DIR")
    args = parser.parse_args()
    if args.all:
        for variant in VARIANTS:
            reason = unsupported_reason(variant)
            if reason:
                print(f"torch {torch.__version__}: variant {variant} skipped: {reason}")
            else:
                generate(variant, os.path.join(args.all, f"dcp-{version_tag()}-{variant}"))
    elif args.out_dir:
        reason = unsupported_reason(args.variant)
        if reason:
            sys.exit(f"torch {torch.__version__} cannot write variant {args.variant}: {reason}")
        generate(args.variant, args.out_dir)
    else:
        parser.error("give OUT_DIR or --all FIXTURES_DIR")


if __name__ == "__main__":
    main()
