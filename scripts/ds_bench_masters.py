#!/usr/bin/env python3
"""Prints, for each ZeRO optimizer file of a DeepSpeed tag folder, the byte
ranges of its fp32 master partitions (optimizer_state_dict's
fp32_flat_groups, or single_partition_of_fp32_groups under ZeRO-1/2) inside
the file: one line "PATH OFFSET LENGTH" each. Python standard library only
(scripts/ds_reference_reader.py's allowlist unpickler); used by
scripts/bench-deepspeed.sh for its read-the-masters baseline.

usage: ds_bench_masters.py TAG_DIR
"""
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ds_reference_reader import ELEM, PtFile  # noqa: E402


def ranges(path):
    pt = PtFile(path)
    osd = pt.obj["optimizer_state_dict"]
    groups = osd.get("fp32_flat_groups") or osd.get("single_partition_of_fp32_groups")
    out = []
    for t in groups:
        cls, key = t.storage
        size = ELEM[cls][1]
        info = pt.zf.getinfo(f"{pt.prefix}data/{key}")
        assert info.compress_type == 0, "storage entries are STORED"
        with open(path, "rb") as f:  # local header: 30 bytes + name + extra
            f.seek(info.header_offset + 26)
            n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        data = info.header_offset + 30 + n + m
        out.append((path, data + t.offset * size, t.numel * size))
    return out


def main():
    files = glob.glob(os.path.join(sys.argv[1], "*zero_pp_rank_*_optim_states.pt"))
    files.sort(key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(p)).group(1)))
    for path in files:
        for p, off, length in ranges(path):
            print(p, off, length)


if __name__ == "__main__":
    main()
