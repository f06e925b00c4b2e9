#!/usr/bin/env python3
"""Writes tests/fixtures/casts/: what PyTorch's tensor.to(dtype) gives for
every 8-bit (FP8) and 16-bit input and for samples of f32 and f64 (random values plus every
kind of special: zeros, infinities, NaNs with payloads and signs, subnormals,
rounding ties, overflow edges). st-consolidate-mpi's --dtype must match it
bit for bit.

Each file is raw little-endian: SRC.bin holds the inputs, SRC-to-DST.bin the
outputs of torch. Run with a Python that has torch:
    python scripts/make_cast_fixtures.py tests/fixtures/casts
"""
import sys

import numpy as np
import torch

out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/casts"
rng = np.random.default_rng(20261129)
dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "f64": torch.float64}
int_views = {"bf16": torch.int16, "f16": torch.int16, "f32": torch.int32, "f64": torch.int64}


def specials32():
    bits = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
            0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FC12345, 0xFFA54321, 0x00000001,
            0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x477FEFFF, 0x477FF000,
            0x477FE000, 0x38800000, 0x33800000, 0x33000000, 0x33000001, 0x3F808000,
            0x3F818000, 0x3F808001, 0x3F80FFFF, 0x7F7F8000, 0x7F7F7FFF, 0x387FC000]
    # Ties and near-ties for bf16 (low 16 bits) and f16 (low 13 bits).
    base = rng.integers(0, 2**32, 2000, dtype=np.uint64).astype(np.uint32)
    ties = np.concatenate([(base & 0xFFFF0000) | 0x8000, (base & 0xFFFFE000) | 0x1000,
                           (base & 0xFFFF0000) | 0x7FFF, (base & 0xFFFFE000) | 0x0FFF])
    rand = rng.integers(0, 2**32, 40000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([np.array(bits, dtype=np.uint32), ties, rand]).view(np.float32)


def specials64():
    bits = [0, 1 << 63, 0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000,
            0xFFF8000000000000, 0x7FF0000000000001, 0x7FF8123456789ABC, 0xFFF4000000000000,
            0x0000000000000001, 0x000FFFFFFFFFFFFF, 0x47EFFFFFE0000000, 0x47EFFFFFF0000000,
            0x3FF0100000000000, 0x3FF0100000000001, 0x3FF0100040000000, 0x3FF0000010000000,
            0x40EFFE0000000000, 0x40EFFC0000000001, 0x3E70000000000000, 0x3690000000000000]
    base = rng.integers(0, 2**63, 2000, dtype=np.uint64)
    near = np.concatenate([(base & ~np.uint64(0xFFFFFFFFFFF)) | np.uint64(0x80000000000),
                           (base & ~np.uint64(0x1FFFFFFF)) | np.uint64(0x10000000)])
    rand = rng.integers(0, 2**64, 40000, dtype=np.uint64)
    # Values in the normal ranges of the targets, where rounding matters most.
    normal = rng.standard_normal(20000) * np.exp(rng.uniform(-30, 30, 20000))
    return np.concatenate([np.array(bits, dtype=np.uint64), near, rand]).view(np.float64).tolist() + normal.tolist()


sources = {
    "bf16": torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16),
    "f16": torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.float16),
    "f32": torch.from_numpy(specials32().copy()),
    "f64": torch.tensor(specials64(), dtype=torch.float64),
}
for src, values in sources.items():
    values.view(int_views[src]).numpy().tofile(f"{out}/{src}.bin")
    for dst in ("bf16", "f16", "f32", "f64"):
        if dst != src:
            values.to(dtypes[dst]).view(int_views[dst]).numpy().tofile(f"{out}/{src}-to-{dst}.bin")

# FP8, which --dtype-map restores to an ordinary float (NeMo's rule): every
# one of the 256 bit patterns of each type.
fp8 = {"f8e4m3": torch.float8_e4m3fn, "f8e5m2": torch.float8_e5m2, "f8e8m0": torch.float8_e8m0fnu}
for src, dtype in fp8.items():
    values = torch.arange(0, 256, dtype=torch.int32).to(torch.uint8).view(dtype)
    values.view(torch.uint8).numpy().tofile(f"{out}/{src}.bin")
    for dst in ("bf16", "f16", "f32", "f64"):
        values.to(dtypes[dst]).view(int_views[dst]).numpy().tofile(f"{out}/{src}-to-{dst}.bin")
print(f"torch {torch.__version__}: wrote {out}")
