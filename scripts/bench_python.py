"""The in-process contenders of scripts/bench-python.sh, one per process:

    bench_python.py make DIR GB          a checkpoint of about GB bytes: 8 ranks'
                                         HF shards (DCP_SHARDING_INFO), 4 output files
    bench_python.py run NAME IN OUT      NAME: dropin, torch or nemo, num_threads=5

`run` prints one JSON line: seconds from the call to durable output (every
output file and OUTPUT_DIR fsynced, as the CLI does itself) and the extra
peak RSS over the process's RSS just before the call (after importing
everything)."""

import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python" / "tests"))


def rss_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def make(folder, gb):
    import torch
    from conftest import write_shards

    g = torch.Generator().manual_seed(7)
    rows, cols = 4096, 2048  # 32 MiB in f32
    count = max(1, int(float(gb) * 1e9 / (rows * cols * 4)))
    tensors = {f"layer.{i:03d}.weight": torch.randn(rows, cols, generator=g) for i in range(count)}
    mapping = {name: 1 + i % 4 for i, name in enumerate(sorted(tensors))}
    write_shards(folder, tensors, mapping, ranks=8)
    Path(folder, "mapping.json").write_text(json.dumps(mapping))


def durable(folder):
    for path in Path(folder).iterdir():
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def run(name, input_dir, output_dir):
    mapping = json.loads(Path(input_dir, "mapping.json").read_text())
    if name == "dropin":
        import st_consolidate

        function = st_consolidate.consolidate_safetensors_files
    elif name == "torch":
        from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files as function
    else:
        from nemo_automodel.components.checkpoint._backports.consolidate_hf_safetensors import (
            consolidate_safetensors_files as function,
        )
    os.makedirs(output_dir, exist_ok=True)
    before = rss_kib()
    started = time.monotonic()
    function(input_dir, output_dir, mapping, num_threads=5)
    durable(output_dir)
    seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"name": name, "seconds": seconds, "extra_rss_mb": max(0, peak - before) / 1024}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        run(*sys.argv[2:5])
