#!/usr/bin/env python3
"""Compares a safetensors output folder with one reference of a DeepSpeed
fixture's manifest.json (tests/fixtures/deepspeed/<case>/manifest.json).

Python standard library only: it reads model.safetensors.index.json (or a
single model.safetensors when there is no index), parses every safetensors
header itself (json + struct, so bf16 needs no framework) and hashes each
tensor's raw bytes. One line per problem, then a summary; exit 1 on any
mismatch, missing or extra tensor.

usage: check_deepspeed_reference.py OUTPUT_DIR MANIFEST
           [--key zero_to_fp32|zero_to_torch_bf16|live_masters|live_masters_bf16|module|...]
           [--tag TAG] [--omit-tied] [--skip NAME ...]

  --key        which reference of the manifest (default zero_to_fp32)
  --tag        take the reference from manifest["tags"][TAG] (the two-tag fixture)
  --omit-tied  leave out the tied aliases of manifest["shared_params"] (the
               reference has them as the converter gives them; an output that
               leaves them out, as save_pretrained does, then passes)
  --skip NAME  leave NAME out of the comparison (repeatable)
"""
import argparse
import hashlib
import json
import os
import struct
import sys

# torch dtype names (the manifest) -> safetensors dtype names
DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
          "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
         "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_tensors(out_dir, problems):
    """name -> (dtype, shape, sha256) of every tensor in the output folder."""
    index_path = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        index = json.load(open(index_path))
        weight_map = index["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(out_dir, "model.safetensors")):
        index, weight_map, files = None, None, ["model.safetensors"]
    else:
        problems.append(f"{out_dir}: neither model.safetensors.index.json nor model.safetensors")
        return {}
    got, total = {}, 0
    for file_name in files:
        path = os.path.join(out_dir, file_name)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data_start = 8 + n
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                total += end - begin
                numel = 1
                for d in entry["shape"]:
                    numel *= d
                if end - begin != numel * SIZES.get(entry["dtype"], 0) or data_start + end > size:
                    problems.append(f"{name}: {file_name} byte range {begin}..{end} does not fit "
                                    f"{entry['dtype']}{entry['shape']} in a file of {size} bytes")
                if weight_map is not None and weight_map.get(name) != file_name:
                    problems.append(f"{name}: index says {weight_map.get(name)}, found in {file_name}")
                if name in got:
                    problems.append(f"{name}: in more than one file")
                f.seek(data_start + begin)
                got[name] = (entry["dtype"], list(entry["shape"]), hashlib.sha256(f.read(end - begin)).hexdigest())
    if weight_map is not None:
        for name in sorted(set(weight_map) - set(got)):
            problems.append(f"{name}: in the index ({weight_map[name]}) but in no file")
        if index.get("metadata", {}).get("total_size") != total:
            problems.append(f"index total_size {index.get('metadata', {}).get('total_size')} != {total} "
                            "(sum of tensor bytes)")
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("manifest")
    ap.add_argument("--key", default="zero_to_fp32")
    ap.add_argument("--tag")
    ap.add_argument("--omit-tied", action="store_true")
    ap.add_argument("--skip", action="append", default=[])
    a = ap.parse_args()

    manifest = json.load(open(a.manifest))
    source = manifest["tags"][a.tag] if a.tag else manifest
    if a.key not in source:
        keys = sorted(k for k, v in source.items() if isinstance(v, dict) and v and
                      all(isinstance(e, dict) and "sha256" in e for e in v.values()))
        sys.exit(f"{a.manifest}: no reference {a.key!r}{' for tag ' + a.tag if a.tag else ''} "
                 f"(the converter may have refused: see 'converters'); references: {', '.join(keys)}")
    want = dict(source[a.key])
    skip = set(a.skip)
    if a.omit_tied:
        skip |= set(manifest.get("shared_params", {}))
    problems = []
    got = read_tensors(a.out_dir, problems)
    checked = passed = 0
    for name in sorted(want):
        if name in skip:
            continue
        checked += 1
        w = want[name]
        wt = (DTYPES.get(w["dtype"], w["dtype"]), list(w["shape"]), w["sha256"])
        if name not in got:
            problems.append(f"{name}: missing (want {wt[0]}{wt[1]})")
        elif got[name] != wt:
            g = got[name]
            what = [k for k, x, y in zip(("dtype", "shape", "sha256"), g, wt) if x != y]
            problems.append(f"{name}: {'/'.join(what)} differ: got {g[0]}{g[1]} {g[2][:16]}, "
                            f"want {wt[0]}{wt[1]} {wt[2][:16]}")
        else:
            passed += 1
    for name in sorted(set(got) - set(want) - skip):
        problems.append(f"{name}: extra tensor, not in the reference {a.key}")
    for p in problems:
        print("MISMATCH", p)
    print(f"{a.key}{' @' + a.tag if a.tag else ''}: {passed} of {checked} tensors equal, "
          f"{len(problems)} problem(s), {len(skip & set(want))} skipped")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
