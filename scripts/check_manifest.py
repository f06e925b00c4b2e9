#!/usr/bin/env python3
"""Checks a consolidated output folder against a manifest of full-tensor sha256s.

Independent of the Rust code on purpose: it uses only the Python standard
library to read model.safetensors.index.json and every safetensors header,
and hashes each tensor's bytes.

usage: check_manifest.py OUTPUT_DIR MANIFEST_JSON
"""
import hashlib
import json
import os
import re
import struct
import sys

SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
         "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8,
         "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
         "I64": 8, "U64": 8, "F64": 8}


def check_with_safetensors(out_dir, manifest, files):
    """Loads every file with the safetensors library itself, when installed,
    so that the output is proven to load the way real loaders read it."""
    try:
        import safetensors
    except ImportError:
        return []
    problems = []
    for file_name in files:
        path = os.path.join(out_dir, file_name)
        with safetensors.safe_open(path, framework="numpy") as f:
            # "format": "pt", and the inputs' fingerprint --resume checks
            # (older builds, which bench.sh may time, wrote none).
            meta = dict(f.metadata() or {})
            fingerprint = meta.pop("st_consolidate_input", None)
            well_formed = fingerprint is None or re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
            if meta != {"format": "pt"} or not well_formed:
                problems.append(f"{file_name}: safetensors reads metadata {f.metadata()}")
        with open(path, "rb") as f:
            for name, tensor in safetensors.deserialize(f.read()):
                want = manifest.get(name)
                got = (list(tensor["shape"]), tensor["dtype"], hashlib.sha256(tensor["data"]).hexdigest())
                if want is None or got != (list(want["shape"]), want["dtype"], want["sha256"]):
                    problems.append(f"{name}: safetensors {safetensors.__version__} loads {got}")
    print(f"loaded every file with safetensors {safetensors.__version__}")
    return problems


def main(out_dir, manifest_path):
    manifest = json.load(open(manifest_path))
    index = json.load(open(os.path.join(out_dir, "model.safetensors.index.json")))
    weight_map = index["weight_map"]
    problems = []
    if set(weight_map) != set(manifest):
        problems.append(f"tensor names differ: index-only {sorted(set(weight_map) - set(manifest))}, "
                        f"manifest-only {sorted(set(manifest) - set(weight_map))}")
    total = 0
    for file_name in sorted(set(weight_map.values())):
        path = os.path.join(out_dir, file_name)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            if (8 + n) % 8:
                problems.append(f"{file_name}: header not padded to 8 bytes")
            if header.get("__metadata__", {}).get("format") != "pt":
                problems.append(f"{file_name}: __metadata__.format is not 'pt'")
            data_start = 8 + n
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                total += end - begin
                if (data_start + begin) % SIZES[entry["dtype"]]:
                    problems.append(f"{name}: not aligned to its element size")
                if weight_map.get(name) != file_name:
                    problems.append(f"{name}: index says {weight_map.get(name)}, found in {file_name}")
                expected = manifest.get(name)
                if expected is None:
                    continue
                f.seek(data_start + begin)
                digest = hashlib.sha256(f.read(end - begin)).hexdigest()
                got = (list(entry["shape"]), entry["dtype"], digest)
                want = (list(expected["shape"]), expected["dtype"], expected["sha256"])
                if got != want:
                    problems.append(f"{name}: got {got}, want {want}")
    problems += check_with_safetensors(out_dir, manifest, sorted(set(weight_map.values())))
    if index["metadata"]["total_size"] != total:
        problems.append(f"total_size {index['metadata']['total_size']} != {total}")
    for p in problems:
        print("MISMATCH", p)
    print(f"{len(manifest) - len(problems)} passed, {len(problems)} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
