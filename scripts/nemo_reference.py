#!/usr/bin/env python3
"""NeMo Automodel 0.7.0 as the reference for st-consolidate-mpi.

    nemo_reference.py make DIR [--names shard|model]
        Writes a checkpoint folder laid out as NeMo Automodel saves one:
        DIR/model/ with the HF shards (DCP_SHARDING_INFO in each header) and
        DIR/model/.hf_metadata/ with fqn_to_file_index_mapping.json,
        fqn_to_dtype_mapping.json, config.json, generation_config.json,
        tokenizer files and a sentence-transformers subfolder. The tensors
        cover each branch of NeMo's dtype rules (_resolve_output_dtype):
        mapped F32 under a cast, FP8 and integer tensors, restored
        originals, a quantized original. Their bytes are random bits, NaNs
        included, so every conversion is compared bit for bit.
        --names shard: 3 source ranks, shard-RRRRR-model-IIIII-of-NNNNN names;
        --names model: 1 source rank, model-IIIII-of-NNNNN names (NeMo's tests).
    nemo_reference.py nemo DIR OUT [--cast DTYPE]
        What NeMo's offline tool does: consolidate_safetensors_files_on_every_rank
        with the two mappings and the cast, then every other .hf_metadata
        entry copied (folders whole), config.json's torch_dtype set after a cast.
    nemo_reference.py compare A B
        Exits 1 unless both folders hold the same tensors (name, dtype, shape,
        bytes), the same index weight_map and total_size, the same set of
        non-weight files, and the same config.json dtype.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

TORCH = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
SIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
        "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}

# name: (saved dtype, shape, mapped original dtype or None, output file index)
TENSORS = {
    "model.embed_tokens.weight": ("BF16", [9, 4], "F32", 1),      # mapped F32: upcast under a cast, restored without
    "model.layers.0.mlp.up_proj.weight": ("F32", [7, 6], "BF16", 1),  # restored to BF16; cast otherwise
    "model.layers.0.mlp.fp8_proj.weight": ("F8_E4M3", [6, 4], "BF16", 1),  # FP8 restored without a cast, kept under one
    "model.layers.0.mlp.fp8_scale": ("F8_E4M3", [5], "F32", 2),   # FP8 mapped F32: stays FP8 under a cast
    "model.layers.0.mlp.e5m2": ("F8_E5M2", [4, 2], "F16", 2),
    "model.layers.0.mlp.e8m0": ("F8_E8M0", [3, 2], "F64", 2),
    "model.layers.0.self_attn.q_proj.weight": ("BF16", [5, 3], "F8_E4M3", 2),  # quantized original: kept, warned
    "model.layers.0.self_attn.packed": ("F32", [4], "I8", 2),     # packed original: kept, warned
    "model.layers.0.norm.weight": ("F16", [6], None, 1),          # unmapped: the cast alone
    "model.layers.0.f64": ("F64", [3, 3], "F32", 2),              # mapped F32 from F64
    "model.rotary.inv_freq": ("F32", [4], "F32", 1),              # mapped as saved
    "model.position_ids": ("I64", [1, 8], "I64", 1),              # integers never change
    "model.int_mapped_float": ("I32", [5], "BF16", 2),            # an integer mapped to a float stays
    "model.mask": ("BOOL", [3, 3], "BOOL", 2),
    "model.u8": ("U8", [7], None, 1),
    "lm_head.weight": ("BF16", [9, 4], "BF16", 2),
}
INDEX_COUNT = 2


def full_bytes(name, dtype, shape):
    """Deterministic random bits for a tensor (bool as 0/1). F16 and F64
    NaNs become infinities: PyTorch's F16->F32 and F64->BF16 casts give a
    NaN other bits in the last n % 8 elements of a call (its scalar tail on
    AVX2) than elsewhere, so no single answer exists there (README, --dtype);
    every other NaN is kept and compared."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape)) if shape else 1
    raw = rng.integers(0, 256, count * SIZE[dtype], dtype=np.uint8)
    if dtype == "BOOL":
        raw = raw & 1
    if dtype == "F16":
        bits = raw.view(np.uint16)
        nan = (bits & 0x7C00) == 0x7C00
        bits[nan] &= 0xFC00
    if dtype == "F64":
        bits = raw.view(np.uint64)
        nan = (bits & np.uint64(0x7FF0000000000000)) == np.uint64(0x7FF0000000000000)
        bits[nan] &= np.uint64(0xFFF0000000000000)
    return raw.reshape(list(shape[:1]) + [-1] if shape else [1, -1])


def as_tensor(rows, dtype, shape):
    tensor = torch.from_numpy(np.ascontiguousarray(rows).reshape(-1)).view(TORCH[dtype])
    return tensor.reshape(shape)


def make(args):
    model = os.path.join(args.dir, "model")
    meta = os.path.join(model, ".hf_metadata")
    os.makedirs(os.path.join(meta, "1_Pooling"), exist_ok=True)
    ranks = 3 if args.names == "shard" else 1
    for index in range(1, INDEX_COUNT + 1):
        for rank in range(ranks):
            tensors, info = {}, {}
            for name, (dtype, shape, _, file) in TENSORS.items():
                if file != index:
                    continue
                rows = full_bytes(name, dtype, shape)
                n = shape[0] if shape else 1
                step = -(-n // ranks)  # torch.chunk: ceil-sized pieces
                begin, end = min(rank * step, n), min((rank + 1) * step, n)
                piece_shape = [end - begin] + shape[1:]
                tensors[name] = as_tensor(rows[begin:end], dtype, piece_shape)
                info[name] = {"saved_offsets": [begin] + [0] * (len(shape) - 1)}
            stem = f"model-{index:05}-of-{INDEX_COUNT:05}.safetensors"
            file_name = f"shard-{rank + 1:05}-{stem}" if args.names == "shard" else stem
            metadata = {"format": "pt", "DCP_VERSION": "1.0", "DCP_SHARDING_INFO": json.dumps(info)}
            save_file(tensors, os.path.join(model, file_name), metadata=metadata)
    with open(os.path.join(meta, "fqn_to_file_index_mapping.json"), "w") as f:
        json.dump({name: spec[3] for name, spec in TENSORS.items()}, f, indent=2)
    with open(os.path.join(meta, "fqn_to_dtype_mapping.json"), "w") as f:
        json.dump({name: spec[2] for name, spec in TENSORS.items() if spec[2]}, f, indent=2)
    config = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32", "hidden_size": 4,
              "text_config": {"hidden_size": 4}}
    files = {
        "config.json": json.dumps(config, indent=2),
        "generation_config.json": json.dumps({"do_sample": False}),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}),
        "tokenizer_config.json": json.dumps({"model_max_length": 64}),
        "special_tokens_map.json": json.dumps({"eos_token": "</s>"}),
        "modules.json": json.dumps([{"idx": 0, "path": "", "type": "Transformer"}]),
        "1_Pooling/config.json": json.dumps({"pooling_mode_mean_tokens": True}),
    }
    for name, text in files.items():
        with open(os.path.join(meta, name), "w") as f:
            f.write(text)


def nemo(args):
    from nemo_automodel.components.checkpoint._backports.consolidate_hf_safetensors import (
        consolidate_safetensors_files_on_every_rank,
        resolve_dtype_cast,
    )

    model = os.path.join(args.dir, "model")
    meta = os.path.join(model, ".hf_metadata")
    with open(os.path.join(meta, "fqn_to_file_index_mapping.json")) as f:
        mapping = json.load(f)
    with open(os.path.join(meta, "fqn_to_dtype_mapping.json")) as f:
        dtypes = json.load(f)
    cast = resolve_dtype_cast(args.cast)
    os.makedirs(args.out, exist_ok=True)
    consolidate_safetensors_files_on_every_rank(
        model, args.out, mapping, num_threads=1, cast_dtype=cast, fqn_to_dtype_mapping=dtypes
    )
    # The offline tool's copy rule: every other .hf_metadata entry, folders
    # whole; config.json's torch_dtype follows the cast.
    skip = {"fqn_to_file_index_mapping.json", "fqn_to_dtype_mapping.json"}
    for entry in os.listdir(meta):
        if entry in skip:
            continue
        src, dst = os.path.join(meta, entry), os.path.join(args.out, entry)
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    if cast is not None:
        path = os.path.join(args.out, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["torch_dtype"] = str(cast).removeprefix("torch.")
        with open(path, "w") as f:
            json.dump(config, f, indent=2)


def tensors_of(folder):
    found = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = f.read()
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            found[key] = (entry["dtype"], entry["shape"], hashlib.sha256(data[begin:end]).hexdigest(), name)
        with safe_open(path, "pt") as f:  # the safetensors library loads it
            assert set(f.keys()) == {k for k in header if k != "__metadata__"}
    return found


def other_files(folder):
    out = set()
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if not rel.endswith(".safetensors") and not rel.endswith(".index.json") and not rel.startswith("."):
                out.add(rel)
    return out


def config_dtype(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = json.load(f)
    return config.get("torch_dtype", config.get("dtype"))


def compare(args):
    problems = []
    mine, theirs = tensors_of(args.a), tensors_of(args.b)
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            problems.append(f"{name}: {mine.get(name)} != {theirs.get(name)}")
    index = []
    for folder in (args.a, args.b):
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            index.append(json.load(f))
    if index[0]["weight_map"] != index[1]["weight_map"]:
        problems.append(f"weight_map differs: {index[0]['weight_map']} != {index[1]['weight_map']}")
    if index[0]["metadata"]["total_size"] != index[1]["metadata"]["total_size"]:
        problems.append(f"total_size {index[0]['metadata']['total_size']} != {index[1]['metadata']['total_size']}")
    if other_files(args.a) != other_files(args.b):
        problems.append(f"non-weight files differ: {sorted(other_files(args.a))} != {sorted(other_files(args.b))}")
    if config_dtype(args.a) != config_dtype(args.b):
        problems.append(f"config.json dtype {config_dtype(args.a)} != {config_dtype(args.b)}")
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"equal: {len(mine)} tensors, {len(other_files(args.a))} non-weight files")


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("dir")
    p.add_argument("--names", choices=["shard", "model"], default="shard")
    p = sub.add_parser("nemo")
    p.add_argument("dir")
    p.add_argument("out")
    p.add_argument("--cast")
    p = sub.add_parser("compare")
    p.add_argument("a")
    p.add_argument("b")
    args = parser.parse_args()
    {"make": make, "nemo": nemo, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    main()
